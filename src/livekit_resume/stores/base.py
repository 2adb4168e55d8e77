"""The store contract every backend implements, and the pieces they share.

A store keeps, per session key:

- a **lease** (owner, fencing epoch, expiry). The epoch grows on every acquisition
  that is not a renewal by the live holder, and it survives release, so a zombie
  writer's epoch can never become current again;
- **versions** 1, 2, 3 ... each with an opaque ``head`` (the snapshot without its
  items, already framed by the codec) and a small unsigned ``info`` dict for listings;
- an append-only **log of item records** shared by the versions of one generation.
  A version remembers how long the log was when it was committed, so a checkpoint
  only appends what changed: its cost does not grow with the conversation.
  Compaction folds a log into a new generation when superseded records pile up.

Stores know nothing of LiveKit or of the snapshot format: heads and item payloads
are bytes. Folding records back into ordered items is `fold_records`, shared here.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import LeaseLost, SessionBusy, SnapshotCorrupt, SnapshotNotFound

__all__ = [
    "COMPACT_SLACK",
    "DEFAULT_KEEP",
    "DEFAULT_LEASE_TTL",
    "MAX_KEY_BYTES",
    "Commit",
    "Info",
    "Lease",
    "Record",
    "SessionInfo",
    "SnapshotInfo",
    "Store",
    "Stored",
    "busy_error",
    "epoch_floor",
    "fold_records",
    "head_moved_error",
    "lease_is_live",
    "lease_lost_error",
    "needs_compaction",
    "not_found_error",
    "not_retained_error",
    "records_from_streams",
    "validate_key",
    "validate_lease_ttl",
    "validate_ttl",
]

# Long enough for a room name plus a prefix, short enough to keep Redis keys and
# SQLite indexes small. Rooms longer than this are a caller bug, not data.
MAX_KEY_BYTES = 512
# Versions kept loadable for rollback unless a store is told otherwise: a few turns back.
DEFAULT_KEEP = 10
# A worker renews at a third of this; 30 s tolerates a GC pause or a slow store
# without letting a dead worker block a restore for long.
DEFAULT_LEASE_TTL = 30.0
# Compaction runs when the log holds more than twice the live items plus this slack:
# pure appends never trigger it, and small edit bursts do not fold a long log.
COMPACT_SLACK = 64

# Below a millisecond no store can tell a TTL from zero.
MIN_TTL = 0.001

Info = Mapping[str, "str | int | float | bool | None"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: str) -> str:
    """Return ``key`` if it can name a session, else raise `ValueError` saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError("session key must be a non-empty string")
    if _CONTROL.search(key):
        raise ValueError(f"session key {key!r} contains control characters")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"session key is over {MAX_KEY_BYTES} bytes (starts {key[:32]!r})")
    return key


def validate_ttl(ttl: float | None, name: str = "ttl") -> float | None:
    """Return a TTL if it is None or a finite number of seconds (at least a millisecond),
    else raise `ValueError` naming ``name`` and the value.

    0, a negative, NaN or infinite TTL would expire every session at once (or never) while
    its lease still looks held: each later commit would be `LeaseLost`.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds > 0, not {ttl!r}")
    if not (math.isfinite(ttl) and ttl >= MIN_TTL):
        raise ValueError(f"{name} must be a finite number of seconds >= {MIN_TTL}, not {ttl!r}")
    return float(ttl)


def validate_lease_ttl(ttl: float, session_ttl: float | None) -> float:
    """A lease ttl a store with ``session_ttl`` can honour, else `ValueError` naming both.

    A lease must never outlive the data: a session expiring while its lease still looks
    held would vanish under its live holder, and every later commit of that holder would
    be refused.
    """
    validate_ttl(ttl, "lease ttl")
    if session_ttl is not None and ttl > session_ttl:
        raise ValueError(
            f"lease ttl {ttl} s is longer than the store's session ttl {session_ttl} s: "
            "the session would expire under its live holder; use a lease ttl of at most "
            f"{session_ttl} s or a longer session ttl"
        )
    return float(ttl)


@dataclass(frozen=True, slots=True)
class Lease:
    """Ownership of one key: only the holder of the current ``epoch`` may commit."""

    key: str
    owner: str
    epoch: int
    expires_at: float  # wall-clock seconds (time.time())


@dataclass(frozen=True, slots=True)
class Record:
    """One change to an ordered stream of items.

    ``data=None`` removes item ``id``. Otherwise the item is (re)placed right after
    ``after`` (``None``: first). ``id=""`` with ``data=None`` clears the whole stream.
    """

    stream: str
    id: str
    data: bytes | None
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """What a checkpoint writes.

    ``base_version`` is the version the records apply to (0 for a new key); the store
    refuses the commit if the head moved since (`LeaseLost`), as it does for a stale
    ``epoch``. ``size`` is the caller's count of live items after the commit, used only
    to decide compaction. ``info`` is small, unsigned, for listings (state, reason...).

    ``commit_id`` is the idempotency key. A commit whose outcome the caller could not
    learn (a timeout, a dropped connection) is sent again unchanged, same id: if the
    first attempt landed, the store answers with that attempt's version instead of
    refusing a moved head. Empty: the store draws one, and only its own retries of
    that one call recognise each other.
    """

    key: str
    epoch: int
    base_version: int
    head: bytes
    records: Sequence[Record] = ()
    size: int = 0
    info: Info = field(default_factory=dict)
    commit_id: str = ""


@dataclass(frozen=True, slots=True)
class Stored:
    """A loaded version: the head bytes and each stream's items, in order."""

    key: str
    version: int
    epoch: int
    created_at: float
    head: bytes
    streams: dict[str, list[tuple[str, bytes]]]
    info: dict[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One retained version, as listings show it."""

    version: int
    epoch: int
    created_at: float
    size: int  # bytes this commit wrote (head + records)
    info: dict[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session key: its latest version and who holds it."""

    key: str
    version: int
    epoch: int
    owner: str | None
    lease_expires_at: float | None
    updated_at: float
    expires_at: float | None
    info: dict[str, str | int | float | bool | None]


@runtime_checkable
class Store(Protocol):
    """Async protocol every backend implements. Methods raise `StoreUnavailable` when
    the backend cannot be reached, `ValueError` for an invalid key."""

    async def acquire(
        self, key: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL, takeover: bool = False
    ) -> Lease:
        """Take the key's lease. A free or expired lease, or one already held by ``owner``,
        is granted; a live lease of another owner raises `SessionBusy` unless ``takeover``.
        Any acquisition that is not ``owner`` renewing its own live lease gets a new epoch."""
        ...

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Extend a lease still current (same epoch and owner), else raise `LeaseLost`."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up if still current; the epoch counter is kept."""
        ...

    async def commit(self, commit: Commit) -> int:
        """Atomically append a version; return its number. Raises `LeaseLost` for a stale
        epoch or a moved head; nothing is written then."""
        ...

    async def load(self, key: str, version: int | None = None) -> Stored:
        """The latest (or the given retained) version; `SnapshotNotFound` if none."""
        ...

    async def versions(self, key: str) -> list[SnapshotInfo]:
        """Retained versions, oldest first (empty if the key is unknown)."""
        ...

    async def info(self, key: str) -> SessionInfo | None:
        """The key's latest version and lease, or None if unknown."""
        ...

    async def keys(self) -> list[str]:
        """Every live session key, sorted."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove every trace of the key, lease included; False if it did not exist."""
        ...

    async def aclose(self) -> None:
        """Release connections and files."""
        ...


def fold_records(records: Iterable[Record], key: str = "?") -> dict[str, list[tuple[str, bytes]]]:
    """Apply records in order and return each stream's items in order.

    Raises `SnapshotCorrupt` when a record places an item after one that does not
    exist: the log was altered or torn.
    """
    streams: dict[str, tuple[list[str], dict[str, bytes]]] = {}
    for rec in records:
        order, data = streams.setdefault(rec.stream, ([], {}))
        if rec.data is None:
            if rec.id == "":
                order.clear()
                data.clear()
            elif rec.id in data:
                del data[rec.id]
                order.remove(rec.id)
            continue
        if rec.id in data:
            idx = order.index(rec.id)
            if rec.after == (order[idx - 1] if idx else None):
                data[rec.id] = rec.data  # edited where it stands: the common case
                continue
            del order[idx]
        if rec.after is None:
            order.insert(0, rec.id)
        elif order and order[-1] == rec.after:
            order.append(rec.id)  # appended at the tail: the common case
        else:
            try:
                order.insert(order.index(rec.after) + 1, rec.id)
            except ValueError:
                raise SnapshotCorrupt(
                    f"session {key!r}: item {rec.id!r} of stream {rec.stream!r} follows "
                    f"{rec.after!r}, which does not exist; the stored log is damaged"
                ) from None
        data[rec.id] = rec.data
    return {name: [(i, data[i]) for i in order] for name, (order, data) in streams.items()}


def epoch_floor(now: float) -> int:
    """The epoch a session that does not exist yet is considered to be at.

    Epochs start from the clock in milliseconds, not from 0: a session deleted or expired
    and then created again never hands out an epoch that a worker of its former life
    may still hold, so that worker's fencing stays in force.
    """
    return int(now * 1000)


def needs_compaction(log_len: int, size: int) -> bool:
    """Whether a log of ``log_len`` records holding ``size`` live items should be folded."""
    return log_len > 2 * max(size, 0) + COMPACT_SLACK


def lease_is_live(expires_at: float | None, now: float) -> bool:
    """A lease counts as held until its expiry; NaN or None means no lease."""
    return expires_at is not None and not math.isnan(expires_at) and expires_at > now


def records_from_streams(streams: Mapping[str, Sequence[tuple[str, bytes]]]) -> list[Record]:
    """Folded streams written back as a fresh log of appends (what compaction stores)."""
    out: list[Record] = []
    for name, items in streams.items():
        prev: str | None = None
        for item_id, data in items:
            out.append(Record(name, item_id, data, prev))
            prev = item_id
    return out


# The errors every backend raises, worded once so that they read the same everywhere.


def busy_error(key: str, holder: str | None, epoch: int) -> SessionBusy:
    return SessionBusy(
        f"session {key!r} is held by {holder!r} (epoch {epoch}); wait for its lease to "
        "expire or pass takeover=True to take it over",
        holder=holder,
    )


def lease_lost_error(key: str, epoch: int, current: int | None) -> LeaseLost:
    """``current=None``: the session's record is gone (deleted, expired, or the store
    lost its data), not taken by another writer."""
    if current is None:
        return LeaseLost(
            f"session {key!r} no longer exists in the store (deleted, expired, or the "
            f"store lost its data) while held at epoch {epoch}; acquire it again to write",
            vanished=True,
        )
    return LeaseLost(
        f"writer of session {key!r} at epoch {epoch} is stale (current epoch: {current}); "
        "another worker took the session over, so this one must stop writing",
        current_epoch=current,
    )


def head_moved_error(commit: Commit, head: int) -> LeaseLost:
    return LeaseLost(
        f"commit to session {commit.key!r} expected version {commit.base_version} but the "
        f"head is at {head}: another writer shares this lease; reload before writing",
        current_epoch=commit.epoch,
    )


def not_found_error(key: str) -> SnapshotNotFound:
    return SnapshotNotFound(f"no snapshot for session {key!r}")


def not_retained_error(key: str, version: int, kept: Sequence[int]) -> SnapshotNotFound:
    have = f"{kept[0]}..{kept[-1]}" if kept else "none"
    return SnapshotNotFound(f"session {key!r} has no version {version} (retained: {have})")
