"""The rules every backend follows for the item log, compaction, retention and epochs.

A session's items are kept as an append-only **log** of `Record` s, one log per
*generation*. A version remembers its generation and how long that log was when it was
committed, so a checkpoint appends only what changed and its cost does not grow with the
conversation. Loading folds the version's prefix of the log back into ordered items
(`fold_records`).

**The compaction rule**, the same for every backend:

1. A commit appends its records to the current generation. Then, if the log it leaves
   holds more records than `needs_compaction` allows for ``Commit.size`` live items, the
   version just committed is given a fresh generation: its log folded and written back
   as plain appends (`compacted`). Nothing else decides when to compact, so a backend
   never compacts on a read, on a lease operation or before the append.
2. Compaction never changes what any version reads: the older retained versions keep
   the generation they were committed in, and a generation is dropped only once no
   retained version uses it (versions beyond ``keep`` go first).
3. Where the backend can fold inside the commit's atomic step (memory, SQLite), it does;
   a log that cannot be folded (damaged) then refuses the commit whole. Where it cannot
   (Redis: its scripts cannot fold), it compacts right after the commit, in a step that
   does nothing if the head moved meanwhile; a failure there leaves the commit standing
   and the next commit finds the log long and tries again.

Epochs and leases: `epoch_floor` is where a new session's epochs start, and
`lease_is_live` is when a lease counts as held.

This module knows nothing of the `Store` protocol (stores/base.py imports it, never
the reverse) nor of the snapshot format: items are bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import SnapshotCorrupt

__all__ = [
    "COMPACT_SLACK",
    "DEFAULT_KEEP",
    "TOMBSTONE_TTL",
    "Record",
    "compacted",
    "epoch_floor",
    "fold_records",
    "fold_rows",
    "lease_is_live",
    "needs_compaction",
    "records_from_streams",
    "tombstone_epoch",
]

# Versions kept loadable for rollback unless a store is told otherwise: a few turns back.
DEFAULT_KEEP = 10
# Compaction runs when the log holds more than twice the live items plus this slack:
# pure appends never trigger it, and small edit bursts do not fold a long log.
COMPACT_SLACK = 64


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


def fold_records(records: Iterable[Record], key: str = "?") -> dict[str, list[tuple[str, bytes]]]:
    """Apply records in order and return each stream's items in order.

    Raises `SnapshotCorrupt` when a record places an item after one that does not
    exist: the log was altered or torn.
    """
    return fold_rows(((r.stream, r.id, r.data, r.after) for r in records), key)


def fold_rows(
    rows: Iterable[tuple[str, str, bytes | None, str | None]], key: str = "?"
) -> dict[str, list[tuple[str, bytes]]]:
    """`fold_records` of records given as plain ``(stream, id, data, after)`` tuples: a
    store reading thousands of records folds them without making a `Record` of each."""
    streams: dict[str, tuple[list[str], dict[str, bytes]]] = {}
    for stream, item_id, item, after in rows:
        entry = streams.get(stream)  # not setdefault: it would build a pair per record
        if entry is None:
            entry = streams[stream] = ([], {})
        order, data = entry
        if item is None:
            if item_id == "":
                order.clear()
                data.clear()
            elif item_id in data:
                del data[item_id]
                order.remove(item_id)
            continue
        if item_id in data:
            idx = order.index(item_id)
            if after == (order[idx - 1] if idx else None):
                data[item_id] = item  # edited where it stands: the common case
                continue
            del order[idx]
        if after is None:
            order.insert(0, item_id)
        elif order and order[-1] == after:
            order.append(item_id)  # appended at the tail: the common case
        else:
            try:
                order.insert(order.index(after) + 1, item_id)
            except ValueError:
                raise SnapshotCorrupt(
                    f"session {key!r}: item {item_id!r} of stream {stream!r} follows "
                    f"{after!r}, which does not exist; the stored log is damaged"
                ) from None
        data[item_id] = item
    return {
        name: list(zip(order, map(data.__getitem__, order), strict=True))
        for name, (order, data) in streams.items()
    }


def needs_compaction(log_len: int, size: int) -> bool:
    """Whether a log of ``log_len`` records (the commit's own appended) holding ``size``
    live items must be folded into a new generation (rule 1 above)."""
    return log_len > 2 * max(size, 0) + COMPACT_SLACK


def records_from_streams(streams: Mapping[str, Sequence[tuple[str, bytes]]]) -> list[Record]:
    """Folded streams written back as a fresh log of appends (what compaction stores)."""
    out: list[Record] = []
    for name, items in streams.items():
        prev: str | None = None
        for item_id, data in items:
            out.append(Record(name, item_id, data, prev))
            prev = item_id
    return out


def compacted(records: Iterable[Record], key: str = "?") -> list[Record]:
    """The log of a new generation: ``records`` folded and written back as appends.

    Raises `SnapshotCorrupt` like `fold_records` when the log is damaged."""
    return records_from_streams(fold_records(records, key))


# How long a deleted session's tombstone is kept (`Store.delete`): far longer than any
# lease, so a holder frozen through the delete still finds it when it wakes up.
TOMBSTONE_TTL = 86_400.0


def epoch_floor(now: float, tombstone: int = 0) -> int:
    """The epoch a session that does not exist yet is considered to be at.

    Epochs start from the clock in microseconds, not from 0: a session deleted or expired
    and then created again never hands out an epoch that a worker of its former life
    may still hold, so that worker's fencing stays in force. Each epoch handed out is a
    store transaction (tens of microseconds at least), so a former life cannot count up
    to the clock of the next (in milliseconds, three takeovers within one could). Exact
    up to 2**53, as Redis's Lua numbers are: the year 2255. Never below the
    ``tombstone`` a delete left, whatever the clock did since.
    """
    return max(int(now * 1_000_000), tombstone)


def tombstone_epoch(epoch: int, now: float) -> int:
    """The epoch a delete's tombstone holds: the session's, or the clock's if that is
    higher. A store rolled back to before a takeover deletes at the epoch it remembers,
    below the one the worker that took over holds; every epoch handed out before the
    delete is below the clock, so that worker is fenced by the tombstone too, never
    told to write the deleted conversation back."""
    return max(epoch, epoch_floor(now))


def lease_is_live(expires_at: float | None, now: float) -> bool:
    """A lease counts as held until its expiry; NaN or None means no lease."""
    return expires_at is not None and not math.isnan(expires_at) and expires_at > now
