"""The seal: what a snapshot head commits to about the item records it reads.

Each item frame is authenticated on its own (key, namespace, stream, id), so a writer
without the key can still replace an item's newest record with an older edition of it,
reorder records, or mix records of different versions. The head therefore carries, per
stream, a **seal**: the sum modulo 2**256 of one term per live item,

    term = BLAKE2b-256(key = seal key, msgpack([stream, id, after, leaf]))

where ``after`` is the id of the item before it in the stream (``None`` for the first)
and ``leaf`` the digest of the item's plain data (`item_digest`). A sum is a multiset
hash: a checkpoint updates it in constant time per changed record (subtract the terms
of the records it replaces or removes, add the new ones), so the cost of a checkpoint
stays flat in the conversation's length; a restore recomputes it from what it loaded
(O(n), like the decode itself) and compares. ``after`` puts the order in it, ``leaf``
the edition. A keyed hash (the key derived from the signing key, else the encryption
key) leaves a writer without the key nothing to aim a sum at.

Compaction rewrites the log without changing any item's (stream, id, after, data), so
the seal survives it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .model import ItemData

__all__ = [
    "SEAL_BYTES",
    "SealKey",
    "Sealed",
    "item_digest",
    "pack_item",
    "packed_digest",
    "seal_from_bytes",
    "seal_to_bytes",
]

SEAL_BYTES = 32
_MOD = 1 << (8 * SEAL_BYTES)
# Domain separation: the seal key is derived from a signing or encryption key, never
# that key itself, so a seal term can never be mistaken for a frame's HMAC or cipher.
_LABEL = b"livekit-resume item seal v1"


def item_digest(data: ItemData) -> bytes:
    """The digest of an item's plain data: tells editions apart, and feeds its seal term."""
    return packed_digest(pack_item(data))


def pack_item(data: ItemData, *, pieces: bool = False) -> bytes:
    """An item's msgpack as `item_digest` hashes it: exactly an item frame's body, so a
    writer packs an item once for its digest and its frame (`packed_digest`).

    ``pieces``: the same bytes, made piece by piece (`_pack_pieces`) so that no single
    step holds the GIL for long: for an item holding megabytes, built on a worker
    thread while the event loop runs (msgpack packs a 50 MB string in one ~80 ms call)."""
    if pieces:
        out: list[bytes] = []
        _pack_pieces(data, out)
        return b"".join(out)  # bytes.join copies large buffers without the GIL
    return bytes(_packer().pack(data))


_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's msgpack packer (``use_bin_type``, as ``packb``): packing with one
    kept packer skips making one per call, a third of the cost of a small value. One
    per thread: a packer is not thread-safe, and items are built on worker threads."""
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
        return packer


# Strings and bytes longer than this are written by `_pack_pieces` in chunks of it.
_CHUNK = 1 << 20


def _pack_pieces(obj: Any, out: list[bytes]) -> None:
    """Append msgpack's exact bytes for ``obj`` (``packb(obj, use_bin_type=True)``):
    maps and arrays header by header, long strings and bytes in chunks (each chunk's
    encoding one short step), everything else packed by msgpack itself."""
    kind = type(obj)
    if kind is dict:
        out.append(_header(len(obj), 0x80, 16, 0xDE))
        for k, v in obj.items():
            _pack_pieces(k, out)
            _pack_pieces(v, out)
    elif kind is list or kind is tuple:
        out.append(_header(len(obj), 0x90, 16, 0xDC))
        for v in obj:
            _pack_pieces(v, out)
    elif kind is str and len(obj) > _CHUNK:
        # slices of code points encode on their own: their UTF-8 is the whole's, in parts
        parts = []
        for i in range(0, len(obj), _CHUNK):
            parts.append(obj[i : i + _CHUNK].encode("utf-8"))
            # Let go of the GIL between slices: a thread that wants it (the event
            # loop's) would otherwise wait out the 5 ms switch interval each time.
            time.sleep(0)
        out.append(_STR32.pack(0xDB, sum(map(len, parts))))
        out += parts
    elif kind is bytes and len(obj) > _CHUNK:
        out.append(_STR32.pack(0xC6, len(obj)))  # bin 32
        out.append(obj)
    else:
        out.append(msgpack.packb(obj, use_bin_type=True))


_STR32 = struct.Struct(">BI")


def _header(n: int, fix: int, fix_below: int, code16: int) -> bytes:
    """A map's or an array's header: fix form, else 16-bit, else 32-bit (``code16 + 1``)."""
    if n < fix_below:
        return bytes([fix | n])
    if n < 1 << 16:
        return struct.pack(">BH", code16, n)
    return struct.pack(">BI", code16 + 1, n)


def packed_digest(packed: bytes) -> bytes:
    """`item_digest` of the item whose msgpack (as `item_digest` packs it) is ``packed``:
    an item frame's body is exactly that, so a reader hashes the bytes it verified."""
    return hashlib.blake2b(packed, digest_size=32).digest()


class SealKey:
    """One seal key (``kid`` names the signing or encryption key it comes from; ``""``
    with no key: a plain hash, which detects damage but not a deliberate edit)."""

    __slots__ = ("_keyed", "kid")

    def __init__(self, kid: str, key: bytes | None) -> None:
        self.kid = kid
        seal_key = hmac.new(key, _LABEL, hashlib.sha256).digest() if key else b""
        # BLAKE2b keyed once: a keyed hash starts by compressing the key's block, and a
        # copy of this state skips that for each of the thousands of terms of a restore
        self._keyed = hashlib.blake2b(key=seal_key, digest_size=SEAL_BYTES)

    def term(self, stream: str, item_id: str, after: str | None, leaf: bytes) -> int:
        """One live item's term of its stream's seal."""
        h = self._keyed.copy()
        h.update(_packer().pack([stream, item_id, after, leaf]))
        return int.from_bytes(h.digest(), "big")

    def add(self, seal: int, term: int) -> int:
        return (seal + term) % _MOD

    def sub(self, seal: int, term: int) -> int:
        return (seal - term) % _MOD

    def seal(
        self, stream: str, items: Sequence[ItemData], leaves: dict[int, bytes] | None = None
    ) -> int:
        """The seal of a whole stream of items, in order (what a reader recomputes).
        ``leaves`` keeps each item's digest by the identity of its map, for the next
        stream: a restore decodes an agent item stored as a reference to its history
        twin as the twin's very map, and hashes it once."""
        return self.sealed(stream, items, leaves).seal

    def sealed(
        self, stream: str, items: Sequence[ItemData], leaves: dict[int, bytes] | None = None
    ) -> Sealed:
        """`seal`, with each item's leaf and term on the way (`Sealed`)."""
        leaves = {} if leaves is None else leaves
        got: list[bytes] = []
        for item in items:
            leaf = leaves.get(id(item))
            if leaf is None:
                leaf = leaves[id(item)] = item_digest(item)
            got.append(leaf)
        return self.sealed_leaves(stream, [item["id"] for item in items], got)

    def sealed_leaves(self, stream: str, ids: Sequence[str], leaves: list[bytes]) -> Sealed:
        """`sealed` of the items of ``ids`` whose leaves are ``leaves`` (kept, not
        copied): a restore has them from the frames it verified. One loop with its
        lookups made once: it runs for every item of every stream of a restore."""
        copy, pack, from_bytes = self._keyed.copy, _packer().pack, int.from_bytes
        terms: list[int] = []
        add = terms.append
        after = None
        for item_id, leaf in zip(ids, leaves, strict=True):
            h = copy()
            h.update(pack([stream, item_id, after, leaf]))
            add(from_bytes(h.digest(), "big"))
            after = item_id
        return Sealed(self, leaves, terms, sum(terms) % _MOD)


@dataclass(slots=True)
class Sealed:
    """A stream's seal as computed over its items, with what it took: each item's leaf
    (its digest) and term, in order. A restore that verified a head's seal hands these
    to the checkpoint tracker, which would otherwise hash every item again."""

    key: SealKey
    leaves: list[bytes]
    terms: list[int]
    seal: int


def seal_to_bytes(seal: int) -> bytes:
    return seal.to_bytes(SEAL_BYTES, "big")


def seal_from_bytes(raw: object) -> int | None:
    """A seal as stored in a head, or None when it is not one."""
    if isinstance(raw, bytes) and len(raw) == SEAL_BYTES:
        return int.from_bytes(raw, "big")
    return None
