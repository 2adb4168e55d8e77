"""What changed in a live chat context since the last commit, as store records.

LiveKit's events are not a log (function calls and config updates arrive silently,
recent items are edited in place or replaced by id), so a checkpoint reads the
context itself. The work stays flat in the conversation's length: one C-speed
identity check of the committed prefix, then only new items and a short window of
recent ones are converted and hashed.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
from livekit.agents import llm

from ..snapshot.model import ItemData
from ..stores.base import Record

__all__ = ["EDIT_WINDOW", "Change", "StreamTracker", "digest"]

# LiveKit edits only recent items in place (a message's metrics once it is added, a
# preemptive user message's final transcript, a handoff output turned into an error).
# Re-checking this many trailing items per checkpoint catches those at a fixed cost.
EDIT_WINDOW = 12


def digest(data: ItemData) -> bytes:
    """A short hash of an item's plain data, to tell whether it changed."""
    return hashlib.blake2b(msgpack.packb(data, use_bin_type=True), digest_size=16).digest()


Encoder = Callable[[llm.ChatItem, ItemData, bytes], bytes]
"""(item, its plain data, its digest) -> the frame to store."""
Converter = Callable[[llm.ChatItem], ItemData]


@dataclass
class Change:
    """A stream's pending change: its records, and the state to adopt once committed."""

    records: list[Record]
    objs: list[llm.ChatItem]
    digests: dict[str, bytes]
    datas: dict[str, ItemData] = field(default_factory=dict)


class StreamTracker:
    """Remembers one committed stream (ids, objects, content hashes) and diffs against it."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self._objs: list[llm.ChatItem] = []
        self._digests: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._objs)

    def has(self, item_id: str) -> bool:
        """Whether ``item_id`` is in the committed stream."""
        return item_id in self._digests

    def baseline(self, items: Sequence[llm.ChatItem], datas: Sequence[ItemData]) -> None:
        """Adopt ``items`` (whose plain data is ``datas``) as what the store holds."""
        self._objs = list(items)
        self._digests = {d["id"]: digest(d) for d in datas}

    def reset(self) -> None:
        self._objs, self._digests = [], {}

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
        if first < n_old:
            alive = {it.id for it in items}
            for gone in old[first:]:
                if gone.id not in alive:
                    records.append(Record(self.stream, gone.id, None))
                    digests.pop(gone.id, None)

        def put(i: int, data: ItemData, d: bytes) -> None:
            item = items[i]
            after = items[i - 1].id if i else None
            records.append(Record(self.stream, item.id, encode(item, data, d), after))
            digests[item.id] = d
            datas[item.id] = data

        # in-place edits of recent committed items
        for i in range(max(0, min(first, n_old) - EDIT_WINDOW), first):
            data = convert(items[i])
            d = digest(data)
            if digests.get(items[i].id) != d:
                put(i, data, d)
        # items asked for again (rare: their stored form must change), where they stand
        if rewrite:
            for i in range(min(first, n_old)):
                if items[i].id in rewrite and items[i].id not in datas:
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
        return Change(records, list(items), digests, datas)

    def full(self, items: Sequence[llm.ChatItem], convert: Converter, encode: Encoder) -> Change:
        """Records that clear the stored stream and write ``items`` anew, in order: for a
        store that lost the session, or a log with a damaged record to leave behind."""
        records = [Record(self.stream, "", None)]
        digests: dict[str, bytes] = {}
        datas: dict[str, ItemData] = {}
        after: str | None = None
        for item in items:
            if item.id in digests:
                raise ValueError(f"{self.stream} holds two chat items with the id {item.id!r}")
            data = convert(item)
            d = digest(data)
            records.append(Record(self.stream, item.id, encode(item, data, d), after))
            digests[item.id], datas[item.id], after = d, data, item.id
        return Change(records, list(items), digests, datas)

    def accept(self, change: Change) -> None:
        """The change was committed: it is the new baseline."""
        self._objs, self._digests = change.objs, change.digests
