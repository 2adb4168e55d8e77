"""The bridge between a `Snapshot` and what a `Store` holds: the one place that knows
how a snapshot becomes a `Commit` and how a `Stored` version becomes a snapshot again.

A snapshot is stored as a small **head** (the snapshot without its chat items, framed
by the codec, with each stream's item count) and two **streams** of item frames,
``history`` and ``agent``. A checkpoint writes only what changed (`delta_commit`); an
import, a repair or a session written anew clears both streams and writes every item
(`whole_commit`). An agent item equal to its history twin is stored once, as a
reference (`is_twin`); such a reference must be written whole again when its twin
leaves the history (`dangling_refs`). Restore reads it all back (`from_stored`), or
what is intact of it (`salvage_stored`).

Every head is bound to the version the store will give it (a commit's base version
+ 1) and seals the item records that version reads (snapshot/seal.py), so an older head
replayed as the newest, or item records replaced, reordered or mixed between versions,
are refused on restore; `codec_for` binds the frames to the store's namespace.

`snapshot` knows nothing of stores and `stores` nothing of snapshots: only this module
sees both (and `agent_hooks`, which uses it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import SnapshotCorrupt, SnapshotNotFound, SnapshotTooLarge
from .settings import CODEC_SETTINGS, Settings
from .snapshot.codec import AGENT, HISTORY, Codec
from .snapshot.model import Snapshot
from .snapshot.salvage import Damage, salvage_parts
from .snapshot.seal import Sealed
from .stores.base import Commit, Record, Store, Stored, offers, records_from_streams

__all__ = [
    "Namespaced",
    "codec_for",
    "dangling_refs",
    "delta_commit",
    "from_stored",
    "is_twin",
    "listing_info",
    "older_heads",
    "salvage_stored",
    "whole_commit",
]


@runtime_checkable
class Namespaced(Protocol):
    """A store that names its namespace (SQLiteStore, RedisStore)."""

    @property
    def namespace(self) -> str: ...


def codec_for(store: Store, **options: Any) -> Codec:
    """The codec of ``store``'s sessions: keys and migration flags from the environment
    (`settings.CODEC_SETTINGS`, ``options`` winning), frames bound to the store's
    namespace (else ``RESUME_NAMESPACE``, else the default)."""
    names = [n for n in CODEC_SETTINGS if n not in options]
    settings = Settings.only(*names, **{k: v for k, v in options.items() if k in CODEC_SETTINGS})
    rest = {k: v for k, v in options.items() if k not in CODEC_SETTINGS}
    if offers(store, Namespaced) and "namespace" not in options:
        rest["namespace"] = store.namespace
    return settings.codec(**rest)


def session_codec(
    store: Store,
    codec: Codec | None,
    *,
    signing_keys: str | None = None,
    encryption_keys: str | None = None,
) -> Codec:
    """A session's codec: ``codec``, or `codec_for` with the keys given. One given must
    be bound to the store's namespace, or its frames would verify nowhere else: the
    command line and the other workers read them with the store's."""
    if codec is None:
        keys = {"signing_keys": signing_keys, "encryption_keys": encryption_keys}
        return codec_for(store, **{name: value for name, value in keys.items() if value})
    if signing_keys or encryption_keys:
        raise ValueError("pass the keys to the Codec, or keys without a codec, not both")
    if offers(store, Namespaced) and codec.namespace != store.namespace:
        raise ValueError(
            f"the codec is bound to namespace {codec.namespace!r}, the store to "
            f"{store.namespace!r}: make it with Codec(namespace={store.namespace!r}, ...)"
        )
    return codec


def listing_info(
    snap: Snapshot, *, items: int, owner: str | None, source: str | None = None
) -> dict[str, str | int | float | bool | None]:
    """The small, unsigned dict a version carries for listings (`ls`, `history`)."""
    info: dict[str, str | int | float | bool | None] = {
        "state": snap.state,
        "reason": snap.reason,
        "agent": snap.agent.agent_id if snap.agent else None,
        "items": items,
        "owner": owner,
    }
    if source is not None:
        info["source"] = source
    return info


def is_twin(history_digests: Mapping[str, bytes] | None, item_id: str, digest: bytes) -> bool:
    """Whether an agent item equals its history twin, and is stored as a reference."""
    return history_digests is not None and history_digests.get(item_id) == digest


def dangling_refs(history_records: Sequence[Record]) -> frozenset[str]:
    """Ids removed from the history by these records: an agent item stored as a
    reference to one of them must be written whole, or it would dangle."""
    return frozenset(r.id for r in history_records if r.data is None and r.id)


def delta_commit(
    codec: Codec,
    snap: Snapshot,
    records: Sequence[Record],
    counts: Mapping[str, int],
    *,
    base_version: int,
    owner: str | None,
    commit_id: str = "",
    seals: Mapping[str, int] | None = None,
    whole: bool = False,
) -> Commit:
    """The commit of one checkpoint: the head (without items, with each stream's count,
    bound to version ``base_version + 1`` and to ``seals``, each stream's seal once the
    records apply) and the item records that turn version ``base_version`` into this
    snapshot (``whole``: they clear each stream first, see `Commit`)."""
    return Commit(
        key=snap.key,
        epoch=snap.epoch,
        base_version=base_version,
        head=codec.encode_head(snap, counts=counts, version=base_version + 1, seals=seals),
        records=list(records),
        size=sum(counts.values()),
        info=listing_info(snap, items=counts.get(HISTORY, 0), owner=owner),
        commit_id=commit_id,
        whole=whole,
    )


def whole_commit(
    codec: Codec,
    snap: Snapshot,
    *,
    base_version: int,
    owner: str | None,
    source: str | None = None,
    commit_id: str = "",
) -> Commit:
    """A commit that makes the store hold exactly ``snap`` as its next version.

    Both streams are cleared, then every item is appended in order, each after its
    predecessor; agent items are written whole (no references), which is always valid.
    """
    key = snap.key
    agent_items = snap.agent.chat_ctx if snap.agent is not None else []
    streams = {
        HISTORY: [(i["id"], codec.encode_item(key, HISTORY, i)) for i in snap.history],
        AGENT: [(i["id"], codec.encode_item(key, AGENT, i)) for i in agent_items],
    }
    records = [Record(HISTORY, "", None), Record(AGENT, "", None)]
    records += records_from_streams(streams)
    head_snap = snap.model_copy(update={"version": 0})
    seals = {HISTORY: codec.seal(HISTORY, snap.history), AGENT: codec.seal(AGENT, agent_items)}
    return Commit(
        key=key,
        epoch=snap.epoch,
        base_version=base_version,
        head=codec.encode_head(head_snap, version=base_version + 1, seals=seals),
        records=records,
        size=len(snap.history) + len(agent_items),
        info=listing_info(snap, items=len(snap.history), owner=owner, source=source),
        commit_id=commit_id,
        whole=True,
    )


def from_stored(
    codec: Codec, stored: Stored, *, sealed: dict[str, Sealed] | None = None
) -> Snapshot:
    """Decode a stored version whole; `SnapshotCorrupt` if any byte of it is damaged.
    ``sealed`` receives what checking each stream's seal computed (`Codec.decode_parts`)."""
    return codec.decode_parts(
        stored.key, stored.head, stored.streams, version=stored.version, sealed=sealed
    )


async def older_heads(
    store: Store, key: str, below: int, codec: Codec | None = None
) -> list[tuple[int, bytes]]:
    """Heads of the retained versions before ``below``, newest first, for salvage; with
    ``codec``, only those bound to the version they are stored as (or to none)."""
    heads = []
    for info in reversed(await store.versions(key)):
        if info.version >= below:
            continue
        try:
            head = (await store.load(key, info.version)).head
            if codec is not None:
                codec.decode_head(key, head, version=info.version)
        except (SnapshotCorrupt, SnapshotNotFound, SnapshotTooLarge):
            continue  # damaged or replayed too, or it expired meanwhile
        heads.append((info.version, head))
    return heads


async def newest_readable(store: Store, key: str) -> tuple[int, Stored | None]:
    """For a session whose latest version cannot be read (its record lost): that
    version's number (the head's, which `Store.versions` lists last, damaged or not) and
    the newest retained version before it that loads (None when none does)."""
    listed = await store.versions(key)
    for older in reversed(listed[:-1]):
        if older.damaged is not None:
            continue
        try:
            return listed[-1].version, await store.load(key, older.version)
        except (SnapshotCorrupt, SnapshotNotFound):
            continue  # damaged further in, or trimmed meanwhile
    return (listed[-1].version if listed else 0), None


async def salvage_stored(
    store: Store, codec: Codec, stored: Stored
) -> tuple[Snapshot, list[Damage]]:
    """What is intact of a damaged version, and what was lost. A head that does not
    decode (damaged, or over the frame limit) is taken from the newest older version
    whose head does; a head of a newer format is `IncompatibleSnapshot`, not damage.

    Salvage keeps what is intact, not what is stale: a head bound to another version
    (replayed), or intact items that are not the ones the head seals (older editions,
    reordered), are `SignatureMismatch` (or `SnapshotCorrupt` without keys) as on any
    restore. Once items are lost the seal cannot be checked: what remains is taken as
    it is, each frame authenticated on its own (docs/security.md)."""
    fallback: list[tuple[int, bytes]] = []
    try:
        codec.decode_head(stored.key, stored.head)
    except (SnapshotCorrupt, SnapshotTooLarge):
        fallback = await older_heads(store, stored.key, stored.version, codec)
    else:
        codec.decode_head(stored.key, stored.head, version=stored.version)  # not replayed
    args = (codec, stored.key, stored.head, stored.streams)
    snap, damage = salvage_parts(*args, version=stored.version, fallback_heads=fallback)
    if not damage:
        agent = snap.agent.chat_ctx if snap.agent is not None else []
        codec.check_seals(stored.key, stored.head, {HISTORY: snap.history, AGENT: agent})
    return snap, damage
