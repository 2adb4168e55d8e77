"""Framing: how plain data becomes one self-checking frame of bytes and back, safely.

A frame is::

    header  "LKRS" | format version u8 | flags u8 | reserved u16 | body length u32
    body    msgpack of plain data, then zlib (flag 1) or, from format 4, raw deflate
            with the framer's preset dictionary (flag 8), then AES-GCM (flag 4)
    trailer CRC-32 of header+body, or (flag 2) kid length u8 | kid | HMAC-SHA256

Decoding checks, in this order, before it allocates anything the frame cannot
justify: length, magic, declared size against the limit, checksum or HMAC, format
version, then decrypts, decompresses (bounded) and unpacks (bounded) the body.
Only msgpack's plain types exist in a body: nothing is ever unpickled or imported.

The HMAC and the AES-GCM tag also cover a ``context`` the caller gives (what the frame
is bound to: see `codec`). This module knows nothing of snapshots: `Framer` frames any
plain data, and `codec.Codec` builds on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

from ..errors import IncompatibleSnapshot, SignatureMismatch, SnapshotCorrupt, SnapshotTooLarge
from ..gcpause import gc_paused
from ..msgscan import MAX_VALUES, too_many_values
from .model import FORMAT_VERSION

__all__ = [
    "COMPRESS_OVER",
    "DEFAULT_MAX_FRAME",
    "FLAG_ENCRYPTED",
    "FLAG_SIGNED",
    "FLAG_ZDICT",
    "FLAG_ZLIB",
    "MAGIC",
    "MAX_DEPTH",
    "ZDICT_FROM",
    "ZDICT_OVER",
    "Context",
    "Framer",
    "Keyring",
    "all_str",
    "gc_paused",
    "plain_data",
    "read_frames",
]

MAGIC = b"LKRS"
_HEADER = struct.Struct(">4sBBHI")
_CRC = struct.Struct(">I")
_HMAC_LEN = 32
_NONCE_LEN = 12

FLAG_ZLIB = 1
FLAG_SIGNED = 2
FLAG_ENCRYPTED = 4
FLAG_ZDICT = 8
_KNOWN_FLAGS = FLAG_ZLIB | FLAG_SIGNED | FLAG_ENCRYPTED | FLAG_ZDICT
# The first format whose frames may carry FLAG_ZDICT.
ZDICT_FROM = 4
# Raw deflate (no zlib header and Adler-32: the frame has its own check), 32 KiB window.
_RAW_DEFLATE = -15

# A long conversation with kept inline images stays well under this; anything larger
# is a bug or an attack, and refusing it bounds the memory a decode may take.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# Lists and maps nest at most this deep in a frame. pydantic serializes at most 255
# levels (a snapshot wraps its values in a few of its own), and anything deeper is
# refused on both sides, so a value that was written can always be shown and re-saved.
MAX_DEPTH = 200
# Bodies smaller than this are stored raw: zlib's header and CPU cost buy nothing there.
COMPRESS_OVER = 1024
# Bodies up to this size are cleared of the depth walk by one C pass over their bytes
# (`_may_nest`): microseconds here, a long hold of the GIL for a body of megabytes.
_SCAN_DEPTH_UNDER = 64 * 1024
# With a preset dictionary, even a short body compresses (its keys are in the
# dictionary): only the tiniest are not worth a try.
ZDICT_OVER = 32

Context = bytes | Callable[[int], bytes]
"""A frame's context, or a function of the frame's format version that gives it."""


@dataclass(frozen=True)
class Keyring:
    """Named keys: the first one writes, all of them read (rotation)."""

    keys: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, spec: str, *, sizes: Sequence[int] = ()) -> Keyring:
        """Parse ``kid:base64key[,kid:base64key…]`` (the ``RESUME_*_KEYS`` form)."""
        keys: list[tuple[str, bytes]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kid, sep, b64 = part.partition(":")
            if not sep:
                # without its "kid:" the whole part is the secret: never echo it
                raise ValueError("a key is not of the form kid:base64key (value not shown)")
            # a "kid" that reads as key material is the secret written first
            # ("base64key:kid"): never echo it
            keyish = _keyish(kid)
            shown = "'***' (it reads as a key: expected kid:base64key)" if keyish else repr(kid)
            if not kid or len(kid.encode()) > 255:
                shown = "'***'" if keyish else repr(kid[:32])
                raise ValueError(f"key id {shown}: expected kid:base64key")
            if not kid.isprintable() or any(c.isspace() for c in kid):
                # "k1 :KEY" would write under "k1 ", a key id no "k1:KEY" reader holds
                bare = "".join(c for c in kid if c.isprintable() and not c.isspace())
                named = "'***'" if _keyish(bare) else repr(kid[:32])
                raise ValueError(f"key id {named} holds spaces or unprintable characters")
            try:
                key = base64.b64decode(b64, validate=True)
            except ValueError:
                raise ValueError(f"key {shown} is not valid base64") from None
            if sizes and len(key) not in sizes:
                raise ValueError(f"key {shown} has {len(key)} bytes; expected one of {sizes}")
            if len(key) < 16:
                raise ValueError(f"key {shown} has {len(key)} bytes; use at least 16")
            if any(i == kid for i, _ in keys):
                # one kid, two keys: one of them would silently shadow the other
                raise ValueError(f"key id {shown} is given twice: each key needs its own")
            keys.append((kid, key))
        if not keys:
            raise ValueError("no keys in key specification")
        return cls(tuple(keys))

    def __repr__(self) -> str:
        # keys are secrets: a repr (a log line, a traceback's locals) shows their ids only
        return f"Keyring(kids={[kid for kid, _ in self.keys]!r})"

    def get(self, kid: str) -> bytes | None:
        return next((k for i, k in self.keys if i == kid), None)


# What a key's text is made of, in any of the spellings people paste: base64, base64url
# (``secrets.token_urlsafe``), with or without padding, hex.
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=")


def _keyish(text: str) -> bool:
    """Whether ``text`` reads as key material of 16 bytes or more, in base64, base64url
    (padded or not) or hex: what a key, never a key id, is."""
    return len(text.rstrip("=")) >= 22 and _KEY_CHARS.issuperset(text)


class Framer:
    """Frames plain data and opens frames: limits, checksum or HMAC, AES-GCM, zlib.

    It reads a frame of any format version; `codec.Codec`, which knows the snapshot
    format, refuses the versions it cannot read (`_check_kind`).

    ``zdict`` is a preset dictionary (`zlib`'s ``zdict``): bytes that the bodies framed
    often share, so that even a short one compresses. Frames compressed with it carry
    `FLAG_ZDICT` and are read only with the very same dictionary: it is part of the
    format and never changes (another dictionary would need another flag)."""

    def __init__(
        self,
        *,
        signing_keys: Keyring | str | None = None,
        encryption_keys: Keyring | str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        allow_plaintext: bool = False,
        zdict: bytes | None = None,
    ) -> None:
        if isinstance(signing_keys, str):
            signing_keys = Keyring.parse(signing_keys)
        if isinstance(encryption_keys, str):
            encryption_keys = Keyring.parse(encryption_keys, sizes=(16, 24, 32))
        self._sign = signing_keys
        self._aeads: dict[str, Any] = {}  # AES-GCM by key id, made on first use
        # HMAC-SHA256 keyed once per signing key: a verify copies it (a restore checks
        # thousands of frames, and keying costs more than hashing a small frame)
        self._macs: dict[str, hmac.HMAC] = {}
        for kid, key in signing_keys.keys if signing_keys is not None else ():
            if kid not in self._macs:  # as `Keyring.get`: the first key of a kid
                self._macs[kid] = hmac.new(key, digestmod=hashlib.sha256)
        self._encrypt = encryption_keys
        self._max = max_frame
        self._allow_plaintext = allow_plaintext
        self._zdict = zdict
        # (version << 8 | flags) of frames `_check_kind` let through: it depends on
        # nothing else, and a restore opens thousands of frames of one or two kinds
        self._kinds_ok: set[int] = set()

    def pack(
        self,
        obj: Any,
        *,
        context: Context = b"",
        version: int = FORMAT_VERSION,
        label: str = "frame",
        packed: bytes | None = None,
        remedy: str = "drop inline media (media='drop')",
    ) -> bytes:
        """Frame plain data. ``version`` is only ever lowered by tests of old formats;
        ``label`` names what is framed in errors (session, stream, item id) and
        ``remedy`` what makes it smaller, after which a larger max_frame; a callable
        ``context`` is given the format version written; ``packed`` is
        ``msgpack.packb(obj, use_bin_type=True)`` when the caller made it already (a
        large item is packed once, for its digest and its frame).

        The limit is checked on the body before compression, exactly as `unpack` checks
        it after decompression: nothing is written that a reader would refuse."""
        try:
            body: bytes = msgpack.packb(obj, use_bin_type=True) if packed is None else packed
        except (TypeError, ValueError, OverflowError) as e:
            _check_depth(obj, label)  # too deep for msgpack itself: say so
            raise TypeError(f"snapshot holds a value that is not plain data: {e}") from e
        # a pass in C over a small body clears it without the walk; a large body is
        # walked (mostly one long string), never scanned holding the GIL
        if len(body) > _SCAN_DEPTH_UNDER or _may_nest(body):
            _check_depth(obj, label)
        if too_many_values(body):  # a reader would refuse it
            raise SnapshotTooLarge(
                f"{label} holds more than {MAX_VALUES:,} values (lists, maps, strings, "
                "numbers), more than a restore reads; keep large data out of userdata, "
                "tool values and agent state"
            )
        if len(body) > self._max:
            raise SnapshotTooLarge(
                f"{label} is {len(body)} bytes, over the limit of {self._max} bytes a "
                f"restore reads (max_frame); {remedy}, or give every worker and the CLI a "
                "larger max_frame"
            )
        # only a MAC or a cipher binds the context: made for them alone
        bound = b""
        if self._sign is not None or self._encrypt is not None:
            bound = context(version) if callable(context) else context
        flags = 0
        parts: list[bytes] = [body]  # the body, in pieces when deflated in slices
        if self._zdict is not None and version >= ZDICT_FROM:
            if len(body) > ZDICT_OVER:
                deflated = _deflate(body, self._zdict)
                if sum(map(len, deflated)) < len(body):
                    parts, flags = deflated, FLAG_ZDICT
        elif len(body) > COMPRESS_OVER:
            small = zlib.compress(body, 1)
            if len(small) < len(body):
                parts, flags = [small], flags | FLAG_ZLIB
        if self._encrypt is not None:
            kid, key = self._encrypt.keys[0]
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            parts, flags = [self._seal(kid, key, body, bound)], flags | FLAG_ENCRYPTED
        size = sum(map(len, parts))
        if size > self._max:  # only the few bytes of AES-GCM can get here
            raise SnapshotTooLarge(
                f"{label} is {size} bytes once encrypted, over the limit of "
                f"{self._max} bytes a restore reads (max_frame); {remedy}, or give every "
                "worker and the CLI a larger max_frame"
            )
        if self._sign is not None:
            flags |= FLAG_SIGNED
        header = _HEADER.pack(MAGIC, version, flags, 0, size)
        # the checksum and the MAC are fed piece by piece, and the frame joined once: a
        # large body is copied once, not once per concatenation (each holds the GIL)
        if self._sign is None:
            crc = zlib.crc32(header)
            for part in parts:
                crc = zlib.crc32(part, crc)
            return b"".join((header, *parts, _CRC.pack(crc)))
        kid = self._sign.keys[0][0]
        kid_b = bytes([len(kid.encode())]) + kid.encode()
        mac = self._macs[kid].copy()  # keyed once (the first key of its kid: this one)
        mac.update(header)
        for part in parts:
            mac.update(part)
        mac.update(kid_b + bound)
        return b"".join((header, *parts, kid_b, mac.digest()))

    def unpack(self, frame: bytes, *, context: Context = b"") -> tuple[int, Any]:
        """Verify and open a frame; return its format version and its plain data. A
        callable ``context`` is given the frame's format version."""
        version, _flags, data = self._unpack(frame, context)
        return version, data

    def _unpack(self, frame: bytes, context: Context) -> tuple[int, int, Any]:
        version, flags, body = self._body(frame, context)
        return version, flags, plain_data(body)

    def _body(self, frame: bytes, context: Context) -> tuple[int, int, bytes]:
        """A frame's format version, flags and body: verified, decrypted, decompressed."""
        if type(frame) is not bytes:
            if not isinstance(frame, (bytes, bytearray, memoryview)):
                raise SnapshotCorrupt(f"expected bytes, got {type(frame).__name__}")
            frame = bytes(frame)
        if len(frame) < _HEADER.size + _CRC.size:
            raise SnapshotCorrupt(f"frame of {len(frame)} bytes is truncated")
        magic, version, flags, _reserved, size = _HEADER.unpack_from(frame)
        if magic != MAGIC:
            raise SnapshotCorrupt("bytes are not a livekit-resume frame (bad magic)")
        if size > self._max:
            raise SnapshotTooLarge(f"frame declares {size} bytes; the limit is {self._max}")
        end = _HEADER.size + size
        if end > len(frame):
            raise SnapshotCorrupt(
                f"frame is truncated: body declares {size} bytes, "
                f"{len(frame) - _HEADER.size} present"
            )
        header_body, trailer = frame[:end], frame[end:]
        if callable(context) and flags & (FLAG_SIGNED | FLAG_ENCRYPTED):
            context = context(version)  # only a MAC or a cipher reads it
        if flags & FLAG_SIGNED:
            self._verify(header_body, trailer, context)  # type: ignore[arg-type]  # bytes by now
        else:
            if self._sign is not None:
                raise SignatureMismatch("frame is unsigned but signing keys are configured")
            if len(trailer) != _CRC.size or _CRC.unpack(trailer)[0] != zlib.crc32(header_body):
                raise SnapshotCorrupt("frame checksum does not match: bytes were altered or torn")
        if version << 8 | flags not in self._kinds_ok:
            self._check_kind(version, flags)
            self._kinds_ok.add(version << 8 | flags)
        body = header_body[_HEADER.size :]
        if flags & FLAG_ENCRYPTED:
            body = self._open(body, context)  # type: ignore[arg-type]  # bytes by now
        if flags & FLAG_ZDICT:
            body = self._inflate(body, self._zdict)
        elif flags & FLAG_ZLIB:
            body = self._inflate(body)
        return version, flags, body

    def _check_kind(self, version: int, flags: int) -> None:
        """Refuse a verified frame this framer must not read: unknown flags, or
        (encryption keys set) an unencrypted frame, unless allowed."""
        if flags & ~_KNOWN_FLAGS:
            raise IncompatibleSnapshot(f"frame has unknown flags {flags:#x}")
        if flags & FLAG_ZDICT and (version < ZDICT_FROM or flags & FLAG_ZLIB):
            raise SnapshotCorrupt(
                f"frame of format {version} has flags {flags:#x}: a preset dictionary "
                f"(flag {FLAG_ZDICT}) exists from format {ZDICT_FROM} on, never with zlib"
            )
        if flags & FLAG_ZDICT and self._zdict is None:
            raise IncompatibleSnapshot(
                "frame is compressed with a preset dictionary this reader was not given"
            )
        if self._encrypt is not None and not flags & FLAG_ENCRYPTED and not self._allow_plaintext:
            raise SignatureMismatch(
                "frame is not encrypted but encryption keys are configured "
                "(RESUME_ENCRYPTION_KEYS): refused as a possible forgery; while migrating "
                "a store written without encryption, set RESUME_ALLOW_PLAINTEXT=1",
                plaintext=True,
            )

    def _verify(self, header_body: bytes, trailer: bytes, context: bytes) -> None:
        if not trailer or len(trailer) != 1 + trailer[0] + _HMAC_LEN:
            raise SnapshotCorrupt("signed frame has a malformed trailer")
        kid_b = trailer[1 : 1 + trailer[0]]
        kid = kid_b.decode("utf-8", "replace")
        keyed = self._macs.get(kid)
        if keyed is None:
            raise SignatureMismatch(
                f"frame is signed with key {kid!r}, which is not among the configured "
                "signing keys (RESUME_SIGNING_KEYS)",
                unknown_key=kid,
            )
        mac = keyed.copy()  # HMAC(key, header | body | kid length | kid | context)
        mac.update(header_body)
        mac.update(trailer[: 1 + trailer[0]])
        mac.update(context)
        if not hmac.compare_digest(mac.digest(), trailer[1 + trailer[0] :]):
            raise SignatureMismatch(f"frame signature does not verify with key {kid!r}")

    def _seal(self, kid: str, key: bytes, body: bytes, context: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = self._aeads.get(kid)
        if aead is None:  # the writing key is its kid's first key, as `_open` finds it
            aead = self._aeads[kid] = AESGCM(key)
        nonce = os.urandom(_NONCE_LEN)
        kid_b = kid.encode()
        return bytes([len(kid_b)]) + kid_b + nonce + aead.encrypt(nonce, body, context)

    def _open(self, body: bytes, context: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not body or len(body) < 1 + body[0] + _NONCE_LEN:
            raise SnapshotCorrupt("encrypted body is truncated")
        kid = body[1 : 1 + body[0]].decode("utf-8", "replace")
        aead = self._aeads.get(kid)
        if aead is None:
            key = self._encrypt.get(kid) if self._encrypt is not None else None
            if key is None:
                raise SignatureMismatch(
                    f"frame is encrypted with key {kid!r}, which is not among the "
                    "configured encryption keys (RESUME_ENCRYPTION_KEYS)",
                    unknown_key=kid,
                )
            aead = self._aeads[kid] = AESGCM(key)  # one per key: a restore opens thousands
        start = 1 + body[0]
        nonce, sealed = body[start : start + _NONCE_LEN], body[start + _NONCE_LEN :]
        try:
            return aead.decrypt(nonce, sealed, context)
        except InvalidTag:
            raise SignatureMismatch(f"frame does not decrypt with key {kid!r}") from None

    def _inflate(self, body: bytes, zdict: bytes | None = None) -> bytes:
        """``body`` decompressed: zlib, or raw deflate with the preset ``zdict``."""
        d = zlib.decompressobj() if zdict is None else zlib.decompressobj(_RAW_DEFLATE, zdict)
        try:
            out = d.decompress(body, self._max + 1)
        except zlib.error as e:
            raise SnapshotCorrupt(f"frame body does not decompress: {e}") from None
        if len(out) > self._max or d.unconsumed_tail:
            raise SnapshotTooLarge(f"frame body inflates past the limit of {self._max} bytes")
        if not d.eof:
            raise SnapshotCorrupt("compressed frame body is truncated")
        return out


def holds_what_it_declares(frame: bytes) -> bool:
    """Whether ``frame`` carries at least the body its header declares: a frame over a
    reader's limit that does is a large frame (the reader's configuration), one that
    does not is damage (a torn write, a flipped size)."""
    if len(frame) < _HEADER.size:
        return False
    magic, _version, _flags, _reserved, size = _HEADER.unpack_from(frame)
    return bool(magic == MAGIC and _HEADER.size + size <= len(frame))


def all_str(values: Iterable[Any]) -> bool:
    """Whether every value (every key of a map) is a `str`: ``join`` checks them all in
    one pass in C, where a restore would loop over thousands of items in Python."""
    try:
        "".join(values)
    except TypeError:
        return False
    return True


# Bodies are deflated at level 1: for a small item frame (a turn's checkpoint writes a
# few) it takes under half the CPU of level 6 for about 1 % more bytes, and a large
# body three times less for a few percent more. A body larger than this is fed to
# zlib in slices of this size: zlib joins each call's output into one new bytes object
# while holding the GIL, which for one call over 50 MB stalls the event loop ~20 ms; a
# slice's output is copied in well under a millisecond.
_LEVEL = 1
_SLICE = 1 << 20


def _deflate(body: bytes, zdict: bytes) -> list[bytes]:
    """``body`` as raw deflate with the preset dictionary, in pieces to be joined."""
    deflate = _deflater(_LEVEL, len(body), zdict)
    if len(body) <= _SLICE:
        return [deflate.compress(body), deflate.flush()]
    view = memoryview(body)
    parts = [deflate.compress(view[i : i + _SLICE]) for i in range(0, len(body), _SLICE)]
    parts.append(deflate.flush())
    return parts


def read_frames(stream: BinaryIO, *, max_frame: int = DEFAULT_MAX_FRAME) -> list[bytes]:
    """Split a stream of concatenated frames (an export file) into frames, reading no
    frame past ``max_frame``. Checksums are left to `Codec.unpack`."""
    frames: list[bytes] = []
    while header := stream.read(_HEADER.size):
        if len(header) < _HEADER.size:
            raise SnapshotCorrupt(f"frame {len(frames)} is truncated in its header")
        magic, _version, flags, _reserved, size = _HEADER.unpack(header)
        if magic != MAGIC:
            raise SnapshotCorrupt(f"frame {len(frames)} is not a livekit-resume frame")
        if size > max_frame:
            raise SnapshotTooLarge(
                f"frame {len(frames)} declares {size} bytes; the limit is {max_frame}"
            )
        body = stream.read(size)
        if flags & FLAG_SIGNED:
            kid_len = stream.read(1)
            trailer = kid_len + stream.read(kid_len[0] + _HMAC_LEN) if kid_len else b""
            want = 1 + kid_len[0] + _HMAC_LEN if kid_len else 1
        else:
            trailer, want = stream.read(_CRC.size), _CRC.size
        if len(body) < size or len(trailer) < want:
            raise SnapshotCorrupt(f"frame {len(frames)} is truncated")
        frames.append(header + body + trailer)
    return frames


def _deflater(level: int, size: int, zdict: bytes | None = None) -> Any:
    """A raw deflate for ``size`` bytes (after ``zdict``): its window just holds them
    (9 to 15 bits), its hash table sized to match (memLevel 3 to 9). The default state,
    a 32 KiB window and memLevel 9, is ~400 KB allocated and partly cleared per frame,
    most of what a small frame costs; the output reads back with any window."""
    bits = max(9, min(-_RAW_DEFLATE, (size + len(zdict or b"")).bit_length()))
    mem = max(3, min(9, bits - 6))
    if zdict is None:
        return zlib.compressobj(level, zlib.DEFLATED, -bits, mem)
    # Loading the dictionary hashes all of it, more than a small frame's own deflate:
    # it is loaded once per state shape, and each frame starts from a copy.
    primed = _PRIMED.get((level, bits, zdict))
    if primed is None:
        primed = zlib.compressobj(level, zlib.DEFLATED, -bits, mem, zlib.Z_DEFAULT_STRATEGY, zdict)
        if len(_PRIMED) >= 64:  # a few shapes per dictionary; the format has one
            _PRIMED.clear()
        _PRIMED[level, bits, zdict] = primed
    return primed.copy()


# Deflate states with a preset dictionary loaded, by (level, window bits, dictionary).
_PRIMED: dict[tuple[int, int, bytes], Any] = {}


def plain_data(body: bytes) -> Any:
    """A verified body's plain data, within the depth limit."""
    # Every declared length is bounded by the body itself: a hostile header cannot make
    # msgpack allocate more than the frame carries.
    if too_many_values(body):
        raise SnapshotTooLarge(
            f"frame body holds more than {MAX_VALUES:,} values: unpacked, it would take "
            "far more memory than its bytes"
        )
    n = len(body)
    try:
        data = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, ...)
        raise SnapshotCorrupt(f"frame body is not valid msgpack: {type(e).__name__}: {e}") from None
    if _may_nest(body) and _too_deep(data):
        raise SnapshotTooLarge(f"frame holds values nested deeper than {MAX_DEPTH} levels")
    return data


# Every byte that is not the first byte of a msgpack map or array header (fixmap,
# fixarray, array 16/32, map 16/32).
_NOT_CONTAINER = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


def _may_nest(body: bytes) -> bool:
    """Whether ``body`` (msgpack) can nest deeper than `MAX_DEPTH`: each level of a value
    has its own header byte, so a body with no more such bytes than that cannot. One
    pass in C clears almost every item frame before the walk in `_too_deep`."""
    return len(body) > MAX_DEPTH and len(body.translate(None, _NOT_CONTAINER)) > MAX_DEPTH


def _check_depth(obj: Any, label: str) -> None:
    if _too_deep(obj):
        raise SnapshotTooLarge(
            f"{label}: values nest deeper than {MAX_DEPTH} levels; flatten the data "
            "(userdata, extra, agent state) before it is saved"
        )


def _too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and maps in ``obj`` nest more than ``limit`` levels (level by level,
    without recursion, so a hostile value cannot exhaust Python's stack; every frame
    read is walked, hence the plain loops)."""
    level: list[Any] = [obj]
    depth = 0
    while level:
        depth += 1
        below: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                value = value.values()
            elif not isinstance(value, (list, tuple)):
                continue
            if depth > limit:
                return True
            below += value
        level = below
    return False
