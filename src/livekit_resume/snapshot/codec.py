"""Snapshots as frames and back: what each frame holds and what it is bound to.

A snapshot is stored as a head frame (the session without its chat items) and one frame
per chat item, or exported as one whole-snapshot frame (or, when that is over the limit,
an export head and its item frames). The bytes of each frame (checksum or HMAC, AES-GCM,
zlib, limits) are `frame.Framer`'s; this module decides what goes in them.

The HMAC and the AES-GCM tag also cover a ``context``: from format 3 on, the store's
namespace and the session key, and for a chat item its stream and id (format 1 and 2
frames: the key, stream and id only), so a valid frame cannot be moved to another
session or namespace. A snapshot head of format 3 also carries, inside its
authenticated body, the version it was written as and a seal of the item records it
reads (`seal`): a replayed older head, an older edition of an item, a reordered or
dropped record do not restore. With encryption keys configured, an unencrypted frame is
refused unless ``allow_plaintext`` (a migration from plaintext).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from ..errors import (
    IncompatibleSnapshot,
    SignatureMismatch,
    SnapshotCorrupt,
    SnapshotTooLarge,
)
from .frame import COMPRESS_OVER as COMPRESS_OVER
from .frame import (
    DEFAULT_MAX_FRAME,
    MAGIC,
    MAX_DEPTH,
    Framer,
    Keyring,
    all_str,
    gc_paused,
    plain_data,
    read_frames,
)
from .frame import FLAG_ENCRYPTED as FLAG_ENCRYPTED
from .frame import FLAG_SIGNED as FLAG_SIGNED
from .frame import FLAG_ZLIB as FLAG_ZLIB
from .frame import Context as Context
from .migrate import OLDEST_READABLE, item_is_current, migrate_head, migrate_item
from .model import FORMAT_VERSION, ItemData, Snapshot, describe_invalid
from .seal import Sealed, SealKey, item_digest, packed_digest, seal_from_bytes, seal_to_bytes

__all__ = [
    "BOUND_FROM",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_NAMESPACE",
    "MAGIC",
    "MAX_DEPTH",
    "Codec",
    "Keyring",
    "check_item_ids",
    "read_frames",
    "validate_snapshot",
]

HISTORY = "history"
AGENT = "agent"
# An agent item equal to the history item of the same id is stored as this marker.
_REF = {"ref": True}
# Its body, as every format writes it.
_REF_BODY: bytes = msgpack.packb(_REF, use_bin_type=True)
# The key of a multi-frame export's head that lists its item frames.
_EXPORT = "lkrs_export"
# The key of a head's binding: the version it was written as, its streams' seals.
_BOUND = "bound"
# The first format whose frames bind the namespace, and whose heads carry a binding.
BOUND_FROM = 3
# msgpack's header of an array of 5 (an item frame's context).
_FIXARRAY_5 = b"\x95"
# The namespace of a store told none (RedisStore's and SQLiteStore's default; the codec
# cannot import the stores): a codec told none binds the same.
DEFAULT_NAMESPACE = "lkresume"


# The preset dictionary of every format 4 frame (`frame.FLAG_ZDICT`): the msgpack of one
# item of each type as `chat.item_to_data` writes it (the commonest, a message, last:
# deflate reaches the end of a dictionary cheapest), then a head's field names. Even a
# short item then compresses to its own text and ids. Part of the format: it must never
# change (tests/test_format4.py pins its digest); a new one would need a new flag.
_T = 1.75e9
ZDICT: bytes = b"".join(
    msgpack.packb(sample, use_bin_type=True)
    for sample in (
        {
            "format_version": 4,
            "key": "",
            "version": 0,
            "created_at": _T,
            "writer": {"worker_id": None, "job_id": None, "pid": 0, "host": ""},
            "epoch": 0,
            "reason": "turn",
            "state": "active",
            "meta": {
                "conversation": "",
                "room": "",
                "participant_identity": "",
                "job_id": "",
                "agent_name": None,
                "language": None,
                "turn_count": 0,
                "usage": {},
                "extra": {},
            },
            "history": [],
            "agent": {
                "agent_id": "",
                "chat_ctx": [],
                "instructions": None,
                "state": None,
                "task": None,
            },
            "userdata": None,
            "tool_calls": [],
            "counts": {HISTORY: 0, AGENT: 0},
            _BOUND: {"version": 0, "kid": "", "seals": {}},
        },
        _REF,
        {
            "id": "item_",
            "type": "agent_config_update",
            "instructions": None,
            "tools_added": None,
            "tools_removed": None,
            "created_at": _T,
        },
        {
            "id": "item_",
            "type": "agent_handoff",
            "old_agent_id": None,
            "new_agent_id": "",
            "created_at": _T,
        },
        {
            "id": "item_",
            "type": "function_call_output",
            "name": "",
            "call_id": "call_",
            "output": "",
            "is_error": False,
            "created_at": _T,
            "reply_required": True,
        },
        {
            "id": "item_",
            "type": "function_call",
            "call_id": "call_",
            "arguments": "{}",
            "name": "",
            "created_at": _T,
            "extra": {},
            "group_id": None,
        },
        {
            "id": "item_",
            "type": "message",
            "role": "assistant",
            "content": [""],
            "interrupted": False,
            "transcript_confidence": None,
            "extra": {},
            "metrics": {
                "started_speaking_at": _T,
                "stopped_speaking_at": _T,
                "llm_node_ttft": 0.0,
                "tts_node_ttfb": 0.0,
                "e2e_latency": 0.0,
            },
            "created_at": _T,
        },
        {
            "id": "item_",
            "type": "message",
            "role": "user",
            "content": [""],
            "interrupted": False,
            "transcript_confidence": None,
            "extra": {},
            "metrics": {},
            "created_at": _T,
        },
    )
)


class Codec(Framer):
    """Turns snapshots into frames and back. Stateless apart from its keys and limits."""

    def __init__(
        self,
        *,
        signing_keys: Keyring | str | None = None,
        encryption_keys: Keyring | str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        namespace: str | None = None,
        allow_plaintext: bool = False,
        allow_unbound: bool = True,
    ) -> None:
        """``namespace`` is the store's (bound into every frame of a session);
        ``allow_plaintext`` reads unencrypted frames although encryption keys are set (a
        migration to encryption); ``allow_unbound=False`` refuses heads written before
        format 3, which carry no version binding and no seal."""
        super().__init__(
            signing_keys=signing_keys,
            encryption_keys=encryption_keys,
            max_frame=max_frame,
            allow_plaintext=allow_plaintext,
            zdict=ZDICT,
        )
        self.namespace = DEFAULT_NAMESPACE if namespace is None else namespace
        self._allow_unbound = allow_unbound
        ring = self._sign or self._encrypt  # the seal's key: signing, else encryption
        self.seal_key = SealKey(*ring.keys[0]) if ring is not None else SealKey("", None)
        self._item_prefix: dict[tuple[str, str], bytes] = {}
        # Without keys a reference frame binds nothing (no MAC, no cipher): every one of a
        # format is the same bytes, and half the records of a session are references.
        self._plain_refs = frozenset(
            self.pack(_REF, version=v)
            for v in range(OLDEST_READABLE, FORMAT_VERSION + 1)
            if ring is None
        )
        self._plain_ref_sizes = frozenset(map(len, self._plain_refs))
        self._ref_frame = self.pack(_REF) if ring is None else None  # what encode writes

    # --------------------------------------------------------------- contexts

    def head_context(self, key: str) -> bytes:
        """The context of a session's head frame (current format)."""
        return bytes(msgpack.packb(["head", self.namespace, key]))

    def item_context(self, key: str, stream: str, item_id: str) -> bytes:
        """The context of one chat item frame (current format): the msgpack of
        ``["item", namespace, key, stream, id]``, its constant part packed once."""
        return self._context_prefix(key, stream) + bytes(msgpack.packb(item_id))

    def _context_prefix(self, key: str, stream: str) -> bytes:
        """`item_context` without its item id: the msgpack of its first four values."""
        prefix = self._item_prefix.get((key, stream))
        if prefix is None:
            if len(self._item_prefix) > 64:
                self._item_prefix.clear()  # a codec serves few sessions at a time
            prefix = self._item_prefix[key, stream] = _FIXARRAY_5 + b"".join(
                msgpack.packb(s) for s in ("item", self.namespace, key, stream)
            )
        return prefix

    def _head_ctx(self, key: str) -> Callable[[int], bytes]:
        return lambda v: self.head_context(key) if v >= BOUND_FROM else key.encode()

    def _item_ctx(self, key: str, stream: str, item_id: str) -> Callable[[int], bytes]:
        def ctx(v: int) -> bytes:
            if v >= BOUND_FROM:
                return self.item_context(key, stream, item_id)
            return _item_context(key, stream, item_id)

        return ctx

    def _seal_key(self, kid: str) -> SealKey:
        if kid == self.seal_key.kid:
            return self.seal_key
        ring = self._sign or self._encrypt
        key = ring.get(kid) if ring is not None and kid else None
        if kid and key is None:
            raise SignatureMismatch(
                f"snapshot head is sealed with key {kid!r}, which is not among the "
                "configured keys (RESUME_SIGNING_KEYS, else RESUME_ENCRYPTION_KEYS)"
            )
        return SealKey(kid, key)

    def _check_kind(self, version: int, flags: int) -> None:
        """Refuse a verified frame this codec must not read: a newer format, then what
        `Framer` refuses (unknown flags, an unencrypted frame where keys are set)."""
        if version > FORMAT_VERSION:
            raise IncompatibleSnapshot(
                f"frame has format version {version}; this livekit-resume reads up to "
                f"{FORMAT_VERSION}: upgrade livekit-resume on this worker"
            )
        super()._check_kind(version, flags)

    # -------------------------------------------------------------- snapshots

    def encode(self, snapshot: Snapshot) -> bytes:
        """The whole snapshot as one frame (export, import, tests). Its key is inside
        the signed body, so the frame needs no outside context."""
        return self.pack(
            snapshot.model_dump(mode="python"), label=f"session {snapshot.key!r} snapshot"
        )

    def decode(self, frame: bytes) -> Snapshot:
        """A whole-snapshot frame back to a `Snapshot`."""
        version, data = self.unpack(frame)
        return _validate(migrate_head(data, version))

    def encode_export(self, snapshot: Snapshot) -> list[bytes]:
        """The snapshot as export frames: one whole-snapshot frame when it fits the limit,
        else a head frame followed by one frame per item, each within the limit.

        The head of a multi-frame export names its item count and a random export id;
        every item frame is bound (HMAC/AES-GCM context) to that id and its position, so
        a signed export can be neither reordered nor spliced with another one."""
        try:
            return [self.encode(snapshot)]
        except SnapshotTooLarge:
            pass  # items may each fit where the whole does not: split it
        export_id = os.urandom(8).hex()
        items = [(HISTORY, i) for i in snapshot.history]
        if snapshot.agent is not None:
            items += [(AGENT, i) for i in snapshot.agent.chat_ctx]
        data = snapshot.model_dump(mode="python", exclude={"history"})
        data["history"] = []
        if data.get("agent") is not None:
            data["agent"]["chat_ctx"] = []
        data[_EXPORT] = {"id": export_id, "items": len(items)}
        label = f"session {snapshot.key!r}"
        frames = [self.pack(data, label=f"{label} export head")]
        for n, (stream, item) in enumerate(items):
            frames.append(
                self.pack(
                    # the export id in the body too: an unkeyed frame's checksum does not
                    # cover the context, and an item frame of another export at the same
                    # position was imported in place of this one's
                    {"n": n, "stream": stream, "item": item, "export": export_id},
                    context=_export_context(export_id, n),
                    label=f"{label} {stream} item {item.get('id')!r}",
                )
            )
        return frames

    def decode_export(self, frames: Sequence[bytes]) -> Snapshot:
        """Export frames (see `encode_export`) back to one `Snapshot`."""
        if not frames:
            raise SnapshotCorrupt("export holds no frame")
        version, data = self.unpack(frames[0])
        spec = data.pop(_EXPORT, None) if isinstance(data, dict) else None
        if spec is None:
            if len(frames) > 1:
                raise SnapshotCorrupt(
                    f"export holds {len(frames)} frames but its first is a whole snapshot"
                )
            return _validate(migrate_head(data, version))
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("id"), str)
            or not isinstance(spec.get("items"), int)
        ):
            raise SnapshotCorrupt("export head has a malformed item list")
        if spec["items"] != len(frames) - 1:
            raise SnapshotCorrupt(
                f"export head lists {spec['items']} items but the file holds "
                f"{len(frames) - 1}: the file is truncated or altered"
            )
        streams: dict[str, list[Any]] = {HISTORY: [], AGENT: []}
        for n, frame in enumerate(frames[1:]):
            item_version, part = self.unpack(frame, context=_export_context(spec["id"], n))
            # the position is inside the body too: an unsigned export's frames cannot
            # be reordered unnoticed either
            if (
                not isinstance(part, dict)
                or part.get("n") != n
                or type(part.get("stream")) is not str
                or part["stream"] not in streams
                # absent in exports written before it was added (their own id is bound
                # by a keyed frame's context only)
                or part.get("export", spec["id"]) != spec["id"]
            ):
                raise SnapshotCorrupt(f"export item frame {n} is malformed or out of place")
            streams[part["stream"]].append(migrate_item(part.get("item"), item_version))
        data = migrate_head(data, version)
        data["history"] = streams[HISTORY]
        if isinstance(data.get("agent"), dict):
            data["agent"]["chat_ctx"] = streams[AGENT]
        elif streams[AGENT]:
            raise SnapshotCorrupt("export holds agent items but no agent")
        return _validate(data)

    def encode_head(
        self,
        snapshot: Snapshot,
        *,
        counts: Mapping[str, int] | None = None,
        version: int | None = None,
        seals: Mapping[str, int] | None = None,
    ) -> bytes:
        """The snapshot without its chat items, which are framed one by one. ``counts``
        gives each stream's length when the snapshot was built without its items.

        ``version`` is the number the store will give it (a commit's base version + 1):
        bound into the head with ``seals``, each stream's seal (`seal.SealKey`), so a
        head replayed at another version, or over other item records, is refused."""
        # a checkpoint's snapshot has no items: dumped whole, as pydantic dumps several
        # times faster without an ``exclude``
        exclude = {"history"} if snapshot.history else None
        data = snapshot.model_dump(mode="python", exclude=exclude)
        data["history"] = []
        if data.get("agent") is not None:
            data["agent"]["chat_ctx"] = []
        data["counts"] = (
            dict(counts)
            if counts is not None
            else {
                HISTORY: len(snapshot.history),
                AGENT: len(snapshot.agent.chat_ctx) if snapshot.agent else 0,
            }
        )
        if version is not None:
            data[_BOUND] = {
                "version": version,
                "kid": self.seal_key.kid,
                "seals": {s: seal_to_bytes(v) for s, v in (seals or {}).items()},
            }
        return self.pack(
            data,
            context=self._head_ctx(snapshot.key),
            label=f"session {snapshot.key!r} head",
            remedy="keep large data out of userdata, agent state and tool arguments",
        )

    def seal(self, stream: str, items: Sequence[ItemData]) -> int:
        """The seal of a whole stream (``encode_head``'s ``seals``), with this codec's key."""
        return self.seal_key.seal(stream, items)

    def encode_item(
        self,
        key: str,
        stream: str,
        item: ItemData,
        *,
        ref: bool = False,
        packed: bytes | None = None,
    ) -> bytes:
        """One chat item of ``stream``; ``ref`` marks an agent item equal to its history
        twin; ``packed`` is the item's msgpack when made already (`seal.pack_item`)."""
        if ref and self._ref_frame is not None:
            return self._ref_frame
        return self.pack(
            _REF if ref else item,
            context=self._item_ctx(key, stream, item["id"]),
            label=f"session {key!r} {stream} item {item['id']!r}",
            packed=None if ref else packed,
        )

    def decode_head(
        self, key: str, head: bytes, *, version: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A head frame as (snapshot data without items, upcast; the counts it lists).
        With ``version`` (the number the store gave it), a head bound to another version
        is refused: `SignatureMismatch` when keys authenticate it, else `SnapshotCorrupt`."""
        data, counts, bound = self._head(key, head)
        if version is not None:
            bound.check_version(version)
        return data, counts

    def _head(self, key: str, head: bytes) -> tuple[dict[str, Any], dict[str, Any], _Binding]:
        frame_version, flags, data = self._unpack(head, self._head_ctx(key))
        if not isinstance(data, dict):
            raise SnapshotCorrupt(f"session {key!r}: snapshot head is not a map")
        counts = data.pop("counts", None)
        bound = _Binding.read(key, data.pop(_BOUND, None), flags)
        if bound.version is None and not self._allow_unbound:
            raise SignatureMismatch(
                f"session {key!r}: snapshot head of format {frame_version} carries no "
                "version binding (written before format 3, or by hand) and unbound heads "
                "are refused (RESUME_ALLOW_UNBOUND=0)"
            )
        data = migrate_head(data, frame_version)
        if not isinstance(data, dict):
            raise SnapshotCorrupt(f"session {key!r}: snapshot head is not a map")
        return data, counts if isinstance(counts, dict) else {}, bound

    def decode_item(
        self, key: str, stream: str, item_id: str, frame: bytes, refs: Mapping[str, ItemData]
    ) -> ItemData:
        """One item frame of ``stream``, upcast; an agent reference is resolved in
        ``refs`` (the history items by id). Raises `SnapshotCorrupt` for a bad frame."""
        return self._items(key, stream, ((item_id, frame),), refs)[0][0]

    def decode_parts(
        self,
        key: str,
        head: bytes,
        streams: Mapping[str, Sequence[tuple[str, bytes]]],
        *,
        version: int | None = None,
        sealed: dict[str, Sealed] | None = None,
    ) -> Snapshot:
        """Rebuild a snapshot from its head and its streams of item frames. ``version`` is
        the number the store gave it (a head is written before the store numbers it):
        a head bound to another version is refused, and so are item records other than
        the ones its seals commit to (see `seal`). ``sealed`` receives, per stream whose
        seal was checked, the leaves and terms that matched it (for a tracker)."""
        with gc_paused():
            return self._decode_parts(key, head, streams, version, sealed)

    def _decode_parts(
        self,
        key: str,
        head: bytes,
        streams: Mapping[str, Sequence[tuple[str, bytes]]],
        version: int | None,
        sealed: dict[str, Sealed] | None,
    ) -> Snapshot:
        data, want, bound = self._head(key, head)
        if version is not None:
            bound.check_version(version)
        # the leaves (digests) of the items of the streams a seal covers, from their bodies
        sealing = bool(bound.seals)
        history, h_leaves = self._items(key, HISTORY, streams.get(HISTORY, ()), {}, sealing)
        by_id = {i["id"]: i for i in history}
        twin_leaves = dict(zip(by_id, h_leaves, strict=True)) if sealing else None
        agent_items, a_leaves = self._items(
            key, AGENT, streams.get(AGENT, ()), by_id, sealing, twin_leaves
        )
        got = {HISTORY: len(history), AGENT: len(agent_items)}
        if any(want.get(s, n) != n for s, n in got.items()):
            raise SnapshotCorrupt(
                f"session {key!r}: snapshot lists {want} items but the store holds {got}; "
                "the stored log is damaged"
            )
        checked = self._check_seals(
            bound, {HISTORY: history, AGENT: agent_items}, {HISTORY: h_leaves, AGENT: a_leaves}
        )
        if sealed is not None:
            sealed.update(checked)
        if version is not None:
            data["version"] = version
        return _with_items(data, history, agent_items)

    def check_seals(self, key: str, head: bytes, streams: Mapping[str, Sequence[ItemData]]) -> None:
        """Refuse ``streams`` (decoded items, in order) unless they are exactly the items
        ``head`` seals: `SignatureMismatch` when keys authenticate the head, else
        `SnapshotCorrupt`. A head without seals (before format 3) checks nothing."""
        self._check_seals(self._head(key, head)[2], streams)

    def _check_seals(
        self,
        bound: _Binding,
        streams: Mapping[str, Sequence[ItemData]],
        leaves: Mapping[str, list[bytes]] | None = None,
    ) -> dict[str, Sealed]:
        """``leaves``: per stream, its items' digests as hashed from their frames' bodies
        (`_items`). Returns each checked stream's `Sealed`, as it matched."""
        key = bound.key
        checked: dict[str, Sealed] = {}
        if not bound.seals:
            return checked
        sealer = self._seal_key(bound.kid)
        for stream, items in streams.items():
            want = bound.seals.get(stream)
            if want is None:
                continue
            given = leaves.get(stream) if leaves is not None else None
            got = None
            if given is not None:
                got = sealer.sealed_leaves(stream, [item["id"] for item in items], given)
            # a body that is not the canonical msgpack of its data (never one we wrote)
            # is judged as before: by its data packed again
            if got is None or got.seal != want:
                got = sealer.sealed(stream, items)
            if got.seal != want:
                raise bound.error(
                    f"session {key!r}: the {stream} items stored do not match the seal "
                    f"of version {bound.version}'s head: records were replaced by older "
                    "editions, reordered or mixed from other versions"
                )
            checked[stream] = got
        return checked

    def _items(
        self,
        key: str,
        stream: str,
        frames: Sequence[tuple[str, bytes]],
        refs: Mapping[str, ItemData],
        sealing: bool = False,
        ref_leaves: Mapping[str, bytes] | None = None,
    ) -> tuple[list[ItemData], list[bytes]]:
        """The items of ``stream``'s frames, each verified, upcast and checked; an agent
        reference is resolved in ``refs`` (the history items by id). With ``sealing``,
        also each item's seal leaf (`seal.item_digest`), hashed from the body just
        verified when the item reads as written (that body is the msgpack the writer
        hashed); a reference's is its twin's, from ``ref_leaves`` (by id).
        One loop with its lookups made once: it runs for every item of a restore."""
        ids = [item_id for item_id, _ in frames]
        if len(set(ids)) != len(ids):  # one check in C; the culprit found only here
            seen: set[str] = set()
            for item_id in ids:
                if item_id in seen:
                    raise SnapshotCorrupt(
                        f"session {key!r}: {stream} holds item {item_id!r} twice; "
                        "the stored log is damaged"
                    )
                seen.add(item_id)
        out: list[ItemData] = []
        got: list[bytes] = []
        twin_leaves = ref_leaves or {}
        add, add_leaf = out.append, got.append
        plain_refs, ref_sizes = self._plain_refs, self._plain_ref_sizes
        body_of, packb = self._body, msgpack.packb
        prefix = self._context_prefix(key, stream)  # `item_context`'s, made once
        for item_id, frame in frames:
            # the very bytes of a valid reference need no more checking (their length is
            # compared first: hashing every item frame to look it up costs more)
            if type(frame) is bytes and len(frame) in ref_sizes and frame in plain_refs:
                item: Any = _REF
            else:
                # only a MAC or a cipher reads the context: an unkeyed frame (flags at
                # byte 5) skips making it; a frame too short for flags fails in `_body`
                ctx = b""
                if len(frame) > 5 and frame[5] & (FLAG_SIGNED | FLAG_ENCRYPTED):
                    # `_item_ctx` of the version at byte 4, as `_body` reads it
                    ctx = (
                        prefix + packb(item_id)
                        if frame[4] >= BOUND_FROM
                        else _item_context(key, stream, item_id)
                    )
                version, _, body = body_of(frame, ctx)
                # a keyed reference (its frame verified) is these very bytes: no unpacking
                item = _REF if body == _REF_BODY else plain_data(body)
            # exactly what a writer writes: {"ref": 1} is equal to it, and malformed
            if item is _REF or (type(item) is dict and len(item) == 1 and item.get("ref") is True):
                twin = refs.get(item_id)
                if twin is None:
                    raise SnapshotCorrupt(
                        f"session {key!r}: agent item {item_id!r} refers to a history item "
                        "that does not exist"
                    )
                # the twin's own map: decoded once, and a restore rebuilds it once
                add(twin)
                if sealing:
                    add_leaf(twin_leaves[item_id])  # its twin's, as `refs` has it
                continue
            current = version == FORMAT_VERSION  # the common case: nothing to upcast
            if not current:
                item = migrate_item(item, version)
            if not isinstance(item, dict) or item.get("id") != item_id or not all_str(item):
                raise SnapshotCorrupt(
                    f"session {key!r}: {stream} item {item_id!r} is malformed or mislabelled"
                )
            add(item)
            if sealing:
                add_leaf(
                    packed_digest(body)
                    if current or item_is_current(version)
                    else item_digest(item)  # upcast: its body is not what the seal hashed
                )
        return out, got


@dataclass(frozen=True)
class _Binding:
    """What a head is bound to (none before format 3) and how a mismatch is reported."""

    key: str
    version: int | None
    kid: str
    seals: dict[str, int]
    authenticated: bool  # signed or encrypted: a mismatch is a forgery, not damage

    @classmethod
    def read(cls, key: str, raw: Any, flags: int) -> _Binding:
        authenticated = bool(flags & (FLAG_SIGNED | FLAG_ENCRYPTED))
        if raw is None:
            return cls(key, None, "", {}, authenticated)
        if not isinstance(raw, dict) or not isinstance(raw.get("seals"), dict):
            raise SnapshotCorrupt(f"session {key!r}: snapshot head has a malformed binding")
        version, kid = raw.get("version"), raw.get("kid")
        seals = {s: seal_from_bytes(v) for s, v in raw["seals"].items()}
        if not isinstance(version, int) or not isinstance(kid, str) or None in seals.values():
            raise SnapshotCorrupt(f"session {key!r}: snapshot head has a malformed binding")
        return cls(key, version, kid, cast("dict[str, int]", seals), authenticated)

    def error(self, message: str) -> SnapshotCorrupt:
        return SignatureMismatch(message) if self.authenticated else SnapshotCorrupt(message)

    def check_version(self, version: int) -> None:
        if self.version is not None and self.version != version:
            raise self.error(
                f"session {self.key!r}: the head stored as version {version} was written as "
                f"version {self.version}: an older version replayed as the newest (rollback) "
                "or a copied record; refused"
            )


def _export_context(export_id: str, n: int) -> bytes:
    return f"export\x00{export_id}\x00{n}".encode()


def _item_context(key: str, stream: str, item_id: str) -> bytes:
    return b"\x00".join((key.encode(), stream.encode(), item_id.encode()))


def _with_items(
    data: dict[str, Any], history: list[ItemData], agent_items: list[ItemData]
) -> Snapshot:
    """Head data and its decoded items as a `Snapshot`. Only the head goes through
    pydantic: an item is a map with string keys (`Codec.decode_item` checked that), all
    the model asks of it, and validating thousands of them as ``dict[str, Any]`` would
    copy each one for nothing (their fields are checked by `chat.item_from_data`)."""
    data["history"] = []
    agent = data.get("agent")
    if isinstance(agent, dict):
        agent["chat_ctx"] = []
    snap = _validate(data)
    snap.history = history
    if snap.agent is not None:
        snap.agent.chat_ctx = agent_items
    return snap


def validate_snapshot(data: Any) -> Snapshot:
    """Plain snapshot data (items included) as a `Snapshot`; `SnapshotCorrupt` when it
    does not match the format."""
    return _validate(data)


def _validate(data: Any) -> Snapshot:
    from pydantic import ValidationError

    try:
        return Snapshot.model_validate(data)
    except ValidationError as e:
        raise SnapshotCorrupt(
            f"snapshot does not match the format: {describe_invalid(e)}"
        ) from None


def check_item_ids(key: str, stream: str, items: Sequence[ItemData]) -> None:
    """Raise `SnapshotCorrupt` naming the item unless every item of ``stream`` has a
    string id used once. Stores place and replace items by id: an id missing or used
    twice would make every later version of the session unreadable. (Item frames from a
    store are checked by `Codec.decode_parts`; a whole-snapshot frame is plain data and
    is checked by whoever stores it, as import does.)"""
    seen: set[str] = set()
    for n, item in enumerate(items):
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise SnapshotCorrupt(
                f"session {key!r}: {stream} item {n} has a missing or non-string id ({item_id!r})"
            )
        if item_id in seen:
            raise SnapshotCorrupt(
                f"session {key!r}: {stream} holds two items with id {item_id!r}; "
                "ids must be unique within a stream"
            )
        seen.add(item_id)
