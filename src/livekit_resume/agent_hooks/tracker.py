"""What changed in a live chat context since the last commit, as store records.

LiveKit's events are not a log (function calls and config updates arrive silently,
recent items are edited in place or replaced by id), so a checkpoint reads the
context itself. The work stays flat in the conversation's length: one C-speed
identity check of the committed prefix, then only new items and a short window of
recent ones are converted and hashed.

Each stream's seal (snapshot/seal.py: a sum of one term per live item over its id, the
id before it and its stored data) is kept up to date the same way: a diff subtracts the
terms of the records it replaces or removes and adds the new ones, so the head of every
commit commits to exactly the items the store will hold, at a cost flat in the length.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from livekit.agents import llm

from ..snapshot.model import ItemData
from ..snapshot.seal import SealKey, item_digest
from ..stores.base import Record

__all__ = ["EDIT_WINDOW", "Change", "StreamTracker", "digest"]

# LiveKit edits only recent items in place (a message's metrics once it is added, a
# preemptive user message's final transcript, a handoff output turned into an error).
# Re-checking this many trailing items per checkpoint catches those at a fixed cost.
EDIT_WINDOW = 12


def digest(data: ItemData) -> bytes:
    """A hash of an item's plain data, to tell whether it changed (and its seal leaf)."""
    return item_digest(data)


Encoder = Callable[[llm.ChatItem, ItemData, bytes], "bytes | tuple[bytes, bytes]"]
"""(item, its plain data, its digest) -> the frame to store, or (the frame, the digest
of the data it holds) when that is not the item's own (an item shrunk to fit)."""
Converter = Callable[[llm.ChatItem], ItemData]
# the seal of an empty stream, and of no key: what a tracker starts from
_UNKEYED = SealKey("", None)


@dataclass
class Change:
    """A stream's pending change: its records, and the state to adopt once committed."""

    records: list[Record]
    objs: list[llm.ChatItem]
    digests: dict[str, bytes]
    datas: dict[str, ItemData] = field(default_factory=dict)
    seal: int = 0
    """The stream's seal once committed (what the head commits to)."""
    terms: dict[str, int] = field(default_factory=dict)
    shrunk: dict[str, bytes] = field(default_factory=dict)
    """Items stored as other data than their own (shrunk to fit): their stored digest."""


class StreamTracker:
    """Remembers one committed stream (ids, objects, content hashes) and diffs against it."""

    def __init__(self, stream: str, *, seal_key: SealKey = _UNKEYED) -> None:
        self.stream = stream
        self.seal_key = seal_key
        self._objs: list[llm.ChatItem] = []
        self._digests: dict[str, bytes] = {}
        self._terms: dict[str, int] = {}
        self._shrunk: dict[str, bytes] = {}
        self._seal = 0

    @property
    def seal(self) -> int:
        """The committed stream's seal."""
        return self._seal

    def is_shrunk(self, item_id: str) -> bool:
        """Whether the store holds ``item_id`` as other data than its own."""
        return item_id in self._shrunk

    def __len__(self) -> int:
        return len(self._objs)

    def has(self, item_id: str) -> bool:
        """Whether ``item_id`` is in the committed stream."""
        return item_id in self._digests

    def baseline(self, items: Sequence[llm.ChatItem], datas: Sequence[ItemData]) -> None:
        """Adopt ``items`` (whose plain data is ``datas``) as what the store holds."""
        self._objs = list(items)
        self._digests = {d["id"]: digest(d) for d in datas}
        term, after = self.seal_key.term, None
        self._terms, self._shrunk, self._seal = {}, {}, 0
        for d in datas:
            t = self._terms[d["id"]] = term(self.stream, d["id"], after, self._digests[d["id"]])
            self._seal = self.seal_key.add(self._seal, t)
            after = d["id"]

    def reset(self) -> None:
        self._objs, self._digests = [], {}
        self._terms, self._shrunk, self._seal = {}, {}, 0

    def diff(
        self,
        items: Sequence[llm.ChatItem],
        convert: Converter,
        encode: Encoder,
        *,
        rewrite: frozenset[str] = frozenset(),
    ) -> Change:
        """Records that turn the committed stream into ``items``; the items whose ids are
        in ``rewrite`` are written again even if unchanged."""
        old = self._objs
        n_old, n_new = len(old), len(items)
        # map() stops at the shorter list: no slice copy of a long history
        if n_new >= n_old and all(map(operator.is_, items, old)):
            first = n_old  # the committed prefix is intact: the common case
        else:
            first = next(
                (i for i, (a, b) in enumerate(zip(items, old, strict=False)) if a is not b),
                min(n_old, n_new),
            )
        records: list[Record] = []
        digests = dict(self._digests)
        datas: dict[str, ItemData] = {}
        seal = _Seal(self, dict(self._terms), dict(self._shrunk), self._seal)
        if first < n_old:
            alive = {it.id for it in items}
            for gone in old[first:]:
                if gone.id not in alive:
                    records.append(Record(self.stream, gone.id, None))
                    digests.pop(gone.id, None)
                    seal.drop(gone.id)

        def put(i: int, data: ItemData, d: bytes) -> None:
            item = items[i]
            after = items[i - 1].id if i else None
            frame = seal.place(item.id, after, d, encode(item, data, d))
            records.append(Record(self.stream, item.id, frame, after))
            digests[item.id] = d
            datas[item.id] = data

        # in-place edits of recent committed items
        for i in range(max(0, min(first, n_old) - EDIT_WINDOW), first):
            data = convert(items[i])
            d = digest(data)
            if digests.get(items[i].id) != d:
                put(i, data, d)
        # items asked for again (rare: their stored form must change), where they stand
        wanted = {i for i in rewrite if i in self._digests and i not in datas}
        # from the tail, stopping once all are found: the items asked for are mostly recent
        for i in range(min(first, n_old) - 1, -1, -1):
            if not wanted:
                break
            if items[i].id in wanted:
                wanted.discard(items[i].id)
                data = convert(items[i])
                put(i, data, digest(data))
        # everything from the first divergence on is (re)placed in order
        placed = {items[i].id for i in range(first, n_new)}
        if len(placed) != n_new - first or (
            first == n_old and not placed.isdisjoint(self._digests)
        ):
            # the store keys items by id: two items with one id would fold into one
            raise ValueError(
                f"{self.stream} holds two chat items with the same id; LiveKit gives each "
                "item a unique id, so a context built by hand must do the same"
            )
        for i in range(first, n_new):
            data = convert(items[i])
            put(i, data, digest(data))
        return seal.change(Change(records, list(items), digests, datas))

    def full(self, items: Sequence[llm.ChatItem], convert: Converter, encode: Encoder) -> Change:
        """Records that clear the stored stream and write ``items`` anew, in order: for a
        store that lost the session, or a log with a damaged record to leave behind."""
        records = [Record(self.stream, "", None)]
        digests: dict[str, bytes] = {}
        datas: dict[str, ItemData] = {}
        seal = _Seal(self, {}, {}, 0)
        after: str | None = None
        for item in items:
            if item.id in digests:
                raise ValueError(f"{self.stream} holds two chat items with the id {item.id!r}")
            data = convert(item)
            d = digest(data)
            frame = seal.place(item.id, after, d, encode(item, data, d))
            records.append(Record(self.stream, item.id, frame, after))
            digests[item.id], datas[item.id], after = d, data, item.id
        return seal.change(Change(records, list(items), digests, datas))

    def accept(self, change: Change) -> None:
        """The change was committed: it is the new baseline."""
        self._objs, self._digests = change.objs, change.digests
        self._terms, self._shrunk, self._seal = change.terms, change.shrunk, change.seal


class _Seal:
    """A stream's seal being updated by one diff: each record placed or removed swaps
    its item's term (snapshot/seal.py)."""

    def __init__(
        self, tracker: StreamTracker, terms: dict[str, int], shrunk: dict[str, bytes], seal: int
    ) -> None:
        self._stream, self._key = tracker.stream, tracker.seal_key
        self.terms, self.shrunk, self.seal = terms, shrunk, seal

    def drop(self, item_id: str) -> None:
        old = self.terms.pop(item_id, None)
        if old is not None:
            self.seal = self._key.sub(self.seal, old)
        self.shrunk.pop(item_id, None)

    def place(
        self, item_id: str, after: str | None, d: bytes, encoded: bytes | tuple[bytes, bytes]
    ) -> bytes:
        """Account for ``item_id`` stored after ``after``; return its frame."""
        frame, stored = encoded if isinstance(encoded, tuple) else (encoded, d)
        self.drop(item_id)
        if stored != d:
            self.shrunk[item_id] = stored
        term = self.terms[item_id] = self._key.term(self._stream, item_id, after, stored)
        self.seal = self._key.add(self.seal, term)
        return frame

    def change(self, change: Change) -> Change:
        change.seal, change.terms, change.shrunk = self.seal, self.terms, self.shrunk
        return change
