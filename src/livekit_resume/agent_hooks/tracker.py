"""What changed in a live chat context since the last commit, as store records.

LiveKit's events are not a log (function calls and config updates arrive silently,
recent items are edited in place or replaced by id), so a checkpoint reads the
context itself. The work stays flat in the conversation's length:

- one C-speed pointer comparison of the committed prefix with the live list (no
  per-item Python work) tells whether an item before the tail was inserted, removed
  or replaced by another object (LiveKit's ``_upsert_item``, an app's truncation);
- the last `EDIT_WINDOW` committed items are checked for edits in place (LiveKit sets
  a message's ``metrics`` once it is added, a preemptive user message's final
  transcript, a handoff output turned into an error) by their *shape*: a frozen copy
  of their fields taken when they were last read, compared by value with the live
  item (in C, no copy taken). Only an item that no longer equals its shape is
  converted and hashed again;
- only new and changed items are converted, hashed and encoded.

A diff is done in two steps: `StreamTracker.diff` reads the live items (on the event
loop: a consistent moment) into a `Plan` of plain data, and `Plan.build` hashes and
encodes it into a `Change` (pure work on plain data: it may run on a worker thread).
The tracker's committed state is never copied: a change holds only what it adds and
removes, and `StreamTracker.accept` applies it in place.

Each stream's seal (snapshot/seal.py: a sum of one term per live item over its id, the
id before it and its stored data) is kept up to date the same way: a diff subtracts the
terms of the records it replaces or removes and adds the new ones, so the head of every
commit commits to exactly the items the store will hold, at a cost flat in the length.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import copysign
from typing import Any, NamedTuple, TypeVar

from livekit import rtc
from livekit.agents import llm
from pydantic import BaseModel

from ..snapshot.chat import saved_id
from ..snapshot.model import ItemData
from ..snapshot.seal import Sealed, SealKey, item_digest, pack_item, packed_digest
from ..snapshot.values import saved_form
from ..stores.base import Record

__all__ = [
    "EDIT_WINDOW",
    "Change",
    "Plan",
    "StaleChange",
    "StreamTracker",
    "digest",
    "unique_ids",
    "weight",
]

log = logging.getLogger("livekit_resume")

# LiveKit edits only recent items in place (a message's metrics once it is added, a
# preemptive user message's final transcript, a handoff output turned into an error).
# Re-checking this many trailing items per checkpoint catches those at a fixed cost.
EDIT_WINDOW = 12
# An item holding more bytes than this is packed in pieces (`seal.pack_item`), so that
# its build on a worker thread never holds the GIL long.
PIECES_OVER = 1 << 20


def digest(data: ItemData) -> bytes:
    """A hash of an item's plain data, to tell whether it changed (and its seal leaf)."""
    return item_digest(data)


Encoder = Callable[[ItemData, bytes, bytes], "bytes | tuple[bytes, bytes]"]
"""(an item's plain data, its digest, its msgpack as hashed) -> the frame to store, or
(the frame, the digest of the data it holds) when that is not the item's own (an item
shrunk to fit). The msgpack is the frame's body: a large item is packed once."""
Converter = Callable[[llm.ChatItem], ItemData]


class Index(NamedTuple):
    """A stream's committed items by id (`StreamTracker.index`): leaves, seal terms, seal."""

    digests: dict[str, bytes]
    terms: dict[str, int]
    seal: int


# the seal of an empty stream, and of no key: what a tracker starts from
_UNKEYED = SealKey("", None)

V = TypeVar("V")


class Overlay(Mapping[str, V]):
    """A committed mapping seen through one change (what it removes, then what it sets),
    without copying it."""

    __slots__ = ("_base", "_removed", "_set")

    def __init__(self, base: Mapping[str, V], removed: set[str], set_: Mapping[str, V]) -> None:
        self._base, self._removed, self._set = base, removed, set_

    def __getitem__(self, key: str) -> V:
        if key in self._set:
            return self._set[key]
        if key in self._removed:
            raise KeyError(key)
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        return key in self._set or (key not in self._removed and key in self._base)

    def get(self, key: str, default: Any = None) -> Any:  # on every item written: no raise
        if key in self._set:
            return self._set[key]
        if key in self._removed:
            return default
        return self._base.get(key, default)

    def __iter__(self) -> Iterator[str]:  # O(n): never on a checkpoint's path
        yield from self._set
        yield from (k for k in self._base if k not in self._removed and k not in self._set)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_LEAVES = frozenset({str, bytes, type(None)})
# Equal across types in Python (1 == 1.0 == True), not in the JSON saved of them: a copy
# holds them as `_Exact`, so that a value changed from 1 to True is an edit.
_NUMBERS = frozenset({int, float, bool})
_STR = {str}


# How deep `_shape` copies; below, a value compares unequal to everything (a cycle, or
# nesting the value walk cuts anyway): its item is read again, and written only if its
# data moved. Well below Python's recursion limit, with a checkpoint's own frames.
_SHAPE_DEPTH = 64


def _shape(value: Any, depth: int = 0) -> Any:
    """A frozen copy of ``value`` (containers copied all the way down, immutable leaves
    shared) that compares equal to ``value`` itself, as long as nothing in it changed:
    an item edited in place, at any depth, no longer equals the copy taken when it was
    read. The copy is on the left of every comparison (``copy == live``), so that a
    comparison runs in C (dict and list equality) down to a nested model (`_Frozen`),
    a dict whose key order or key types count (`_Dict`), or an app's value that is not
    plain data (`_Saved`)."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind in _NUMBERS:
        return _Exact(value)
    if depth >= _SHAPE_DEPTH:
        return _UNEQUAL
    depth += 1
    if kind is dict:
        # a save keeps a dict's order and turns its keys into strings (1 and True into
        # "1" and "true"): dict == looks at neither
        if not value or (len(value) == 1 and type(next(iter(value))) is str):
            return _fields(value, depth)
        keys = tuple(value)
        if {*map(type, keys)} != _STR:
            keys = tuple(k if type(k) is str else _shape(k, depth) for k in keys)
        return _Dict(_fields(value, depth), keys)
    if kind is list:
        return [v if type(v) in _LEAVES else _shape(v, depth) for v in value]
    if kind is tuple:
        return tuple(v if type(v) in _LEAVES else _shape(v, depth) for v in value)
    if kind is rtc.AudioFrame:  # kept (media="keep") as its samples and fields
        return _Saved(kind, _shape(_frame_form(value), depth), _frame_form)
    if kind is rtc.VideoFrame:
        # by identity: kept as LiveKit's own encoding of it, which LiveKit caches
        return _Same(value)
    if isinstance(value, BaseModel) and kind.__module__.startswith("livekit."):
        return _Frozen(value, depth)  # a content part: saved field by field
    # Anything else (a set, a Decimal, a datetime, a dataclass, an app's model, a dict
    # subclass) by its saved form: == can miss what a save tells apart (1 and True in a
    # set, two zones of one instant), or see what it does not (an app's own __eq__).
    form = _saved_form(value)
    return _Saved(kind, _shape(form, depth) if form is not _UNEQUAL else _UNEQUAL, _saved_form)


def _fields(value: dict[Any, Any], depth: int) -> dict[Any, Any]:
    """A dict's copy as a plain dict: for one whose order is fixed (a model's fields) or
    cannot move (a single str key)."""
    return {k: v if type(v) in _LEAVES else _shape(v, depth) for k, v in value.items()}


def _saved_form(value: Any) -> Any:
    try:
        return saved_form(value)
    except Exception:  # an app's value whose conversion fails: read its item again
        return _UNEQUAL


def _frame_form(frame: rtc.AudioFrame) -> Any:
    return (
        bytes(frame.data),
        frame.sample_rate,
        frame.num_channels,
        frame.samples_per_channel,
        _saved_form(frame.userdata),
    )


class _Unequal:
    """Below `_SHAPE_DEPTH`: never equal, so the item is read again."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


_UNEQUAL = _Unequal()


class _Exact:
    """A number in a copy (`_NUMBERS`): equal to a live one of the same type and value."""

    __slots__ = ("_value",)

    def __init__(self, value: int | float) -> None:
        self._value = value

    def __eq__(self, other: object) -> bool:
        if type(other) is _Exact:
            other = other._value
        value = self._value
        if other is value:
            return True
        if type(other) is not type(value) or other != value:
            return False
        # -0.0 == 0.0, not in the data saved of them
        return (
            bool(value) or type(value) is not float or copysign(1.0, value) == copysign(1.0, other)
        )

    __hash__ = None  # type: ignore[assignment]


class _Saved:
    """A copy of a value by its saved form: equal to a live value of the same type whose
    saved form (by ``form``) equals it."""

    __slots__ = ("_form", "_kind", "_to_form")

    def __init__(self, kind: type, form: Any, to_form: Callable[[Any], Any]) -> None:
        self._kind, self._form, self._to_form = kind, form, to_form

    def __eq__(self, other: object) -> bool:
        if type(other) is _Saved:
            return self._kind is other._kind and bool(self._form == other._form)
        return type(other) is self._kind and bool(self._form == self._to_form(other))

    __hash__ = None  # type: ignore[assignment]


class _Same:
    """A copy of an object compared by identity."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __eq__(self, other: object) -> bool:
        if type(other) is _Same:
            return self._value is other._value
        return other is self._value

    __hash__ = None  # type: ignore[assignment]


class _Dict:
    """A copy of a dict whose key order or key types a save keeps and == ignores:
    equal to a live dict with the same items, keys of the same types, in the same order."""

    __slots__ = ("_items", "_keys")

    def __init__(self, items: dict[Any, Any], keys: tuple[Any, ...]) -> None:
        self._items, self._keys = items, keys

    def __eq__(self, other: object) -> bool:
        if type(other) is _Dict:
            return bool(self._items == other._items) and bool(self._keys == other._keys)
        return bool(self._items == other) and bool(self._keys == tuple(other))  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]


class _Frozen:
    """A frozen copy of a model (`_shape`): equal to the live model while its type, its
    field values and its extra fields are still those it was copied with."""

    __slots__ = ("_extra", "_fields", "_kind")

    def __init__(self, item: BaseModel, depth: int = 0) -> None:
        self._kind = type(item)
        self._fields = _fields(item.__dict__, depth + 1)
        extra = item.__pydantic_extra__
        self._extra = None if extra is None else _shape(extra, depth)

    def __eq__(self, other: object) -> bool:
        if type(other) is _Frozen:
            return (
                self._kind is other._kind
                and bool(self._fields == other._fields)
                and bool(self._extra == other._extra)
            )
        if type(other) is not self._kind:
            return False
        extra = other.__pydantic_extra__
        return bool(self._fields == other.__dict__) and (
            extra is None if self._extra is None else bool(self._extra == extra)
        )

    __hash__ = None  # type: ignore[assignment]


def weight(data: Any, depth: int = 0) -> int:
    """About how many bytes ``data`` holds: decides whether encoding it is worth a
    worker thread. Only strings and bytes count; counting stops six levels down (a kept
    audio part's PCM is five: item, content, part, frames, frame)."""
    kind = type(data)
    if kind is str or kind is bytes:
        return len(data)
    if depth > 5:
        return 0
    values = data.values() if kind is dict else data if kind is list or kind is tuple else ()
    total = 0
    for v in values:
        k = type(v)
        if k is str or k is bytes:
            total += len(v)
        elif k is dict or k is list or k is tuple:
            total += weight(v, depth + 1)
    return total


@dataclass(slots=True)
class _Put:
    """One item to (re)write: where it stands and what it holds when read."""

    item: llm.ChatItem
    after: str | None
    data: ItemData
    only_if_changed: bool = False
    """An item edited in place, maybe: written only if its data's digest moved."""
    size: int = -1
    """`weight` of ``data`` once measured (-1: not yet)."""

    def weight(self) -> int:
        if self.size < 0:
            self.size = weight(self.data)
        return self.size


@dataclass
class Change:
    """A stream's pending change: its records, and what it does to the committed state.

    The state once committed is the tracker's own with ``removed`` dropped and the
    ``digests``/``terms``/``shrunk`` entries set (see `StreamTracker.accept`)."""

    records: list[Record]
    digests: Mapping[str, bytes] = field(default_factory=dict)
    """Every item's digest once committed (a view: nothing is copied)."""
    datas: dict[str, ItemData] = field(default_factory=dict)
    seal: int = 0
    """The stream's seal once committed (what the head commits to)."""
    shrunk: Mapping[str, bytes] = field(default_factory=dict)
    """Items stored as other data than their own (shrunk to fit): their stored digest."""
    count: int = 0
    """The stream's length once committed."""
    whole: bool = False
    """The records clear the stream and write it anew (`StreamTracker.full`)."""
    keep: int = 0
    objs: list[llm.ChatItem] = field(default_factory=list)
    """The committed objects from ``keep`` on are ``objs``."""
    ids: list[str] = field(default_factory=list)
    """Their ids as read."""
    removed: set[str] = field(default_factory=set)
    set_digests: dict[str, bytes] = field(default_factory=dict)
    set_terms: dict[str, int] = field(default_factory=dict)
    set_shrunk: dict[str, bytes] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    base: object = None
    """The tracker state this change was computed from."""


class StaleChange(RuntimeError):
    """A change read from another committed state than the tracker holds now."""


class StreamTracker:
    """Remembers one committed stream (ids, objects, content hashes) and diffs against it."""

    def __init__(self, stream: str, *, seal_key: SealKey = _UNKEYED) -> None:
        self.stream = stream
        self.seal_key = seal_key
        self._objs: list[llm.ChatItem] = []
        # the committed items' ids as they were read (an app may change an item's id in
        # place: the store still holds it under the old one)
        self._ids: list[str] = []
        self._digests: dict[str, bytes] = {}
        self._terms: dict[str, int] = {}
        self._shrunk: dict[str, bytes] = {}
        # the shapes of the last EDIT_WINDOW committed items, as last read
        self._shapes: dict[str, Any] = {}
        self._seal = 0
        self._gen = object()  # changes to the state are applied only onto this one
        self._aliased: set[str] = set()  # ids warned of as given to a second item

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

    def baseline(
        self,
        items: Sequence[llm.ChatItem],
        datas: Sequence[ItemData],
        sealed: Sealed | None = None,
        index: Index | None = None,
    ) -> None:
        """Adopt ``items`` (whose plain data is ``datas``) as what the store holds.
        ``sealed``: the leaves and terms a restore verified ``datas`` with (same order),
        reused rather than hashed again; its terms only if under this tracker's key.
        ``index``: `index` of the same, made already (off the event loop)."""
        if index is None:
            index = self.index(datas, sealed)
        self._objs = list(items)
        self._ids = [it.id for it in self._objs]
        self._digests, self._terms, self._seal = index
        # The edit window's items as restored: one untouched is not read again. Read
        # again, it would be converted by this worker's policy and written anew if that
        # differs from the writer's (media="drop" here, "keep" there: a recent photo
        # dropped from the store that nobody edited, while older ones stayed).
        self._shrunk = {}
        self._shapes = {it.id: _Frozen(it) for it in self._objs[-EDIT_WINDOW:]}
        self._gen = object()

    def index(self, datas: Sequence[ItemData], sealed: Sealed | None = None) -> Index:
        """What `baseline` keeps of ``datas`` by id (their leaves and seal terms) and
        their seal. Reads no live item: a restore makes it on the thread it decodes on,
        as building these maps for thousands of items would hold the event loop."""
        ids = [d["id"] for d in datas]
        if sealed is None or len(sealed.leaves) != len(ids):
            leaves = [digest(d) for d in datas]
        else:
            leaves = sealed.leaves
        digests = dict(zip(ids, leaves, strict=True))
        if sealed is not None and sealed.key is self.seal_key and leaves is sealed.leaves:
            return Index(digests, dict(zip(ids, sealed.terms, strict=True)), sealed.seal)
        term, after, seal = self.seal_key.term, None, 0
        terms: dict[str, int] = {}
        for item_id, leaf in zip(ids, leaves, strict=True):
            t = terms[item_id] = term(self.stream, item_id, after, leaf)
            seal = self.seal_key.add(seal, t)
            after = item_id
        return Index(digests, terms, seal)

    def reset(self) -> None:
        self._objs, self._ids, self._digests = [], [], {}
        self._terms, self._shrunk, self._shapes, self._seal = {}, {}, {}, 0
        self._gen = object()

    def _intact(self, items: Sequence[llm.ChatItem]) -> bool:
        """Whether ``items`` starts with the committed objects, the very same ones."""
        old, n_old = self._objs, len(self._objs)
        if len(items) < n_old:
            return False
        if not isinstance(items, list):
            return all(map(operator.is_, items, old))
        # list == compares pointers first and never touches an identical pair: ~1 ns
        # per item. The live tail is lent to our list for the comparison (and taken
        # back), so the lists have one length and nothing long is copied.
        old.extend(items[n_old:])
        try:
            return list.__eq__(items, old)  # an equal but other object passes: its data is equal
        except Exception:  # an item's __eq__ that cannot answer: compare by identity
            return all(map(operator.is_, items, old))
        finally:
            del old[n_old:]

    def diff(
        self,
        items: Sequence[llm.ChatItem],
        convert: Converter,
        *,
        rewrite: frozenset[str] = frozenset(),
        shaped: dict[int, Any] | None = None,
    ) -> Plan:
        """Read what turns the committed stream into ``items``; the items whose ids are
        in ``rewrite`` are written again even if unchanged. Reads the items only now:
        the plan holds plain data, and building it may happen elsewhere. ``shaped``
        keeps item shapes by object identity, for diffs of one moment sharing objects."""
        try:
            return self._diff(items, convert, rewrite, shaped, None)
        except _Twice:
            pass
        # Two live items under one id (an app appended an item twice, or gave one
        # another's id): read again with the later ones saved as `unique_ids` names
        # them, every id compared. An error here would fail every later checkpoint.
        raw = _saved_ids(items)
        sids = _unique(raw)
        self._warn_aliased(items, raw, sids)
        return self._diff(items, convert, rewrite, shaped, sids)

    def _diff(
        self,
        items: Sequence[llm.ChatItem],
        convert: Converter,
        rewrite: frozenset[str],
        shaped: dict[int, Any] | None,
        sids: list[str] | None,
    ) -> Plan:
        """`diff`; ``sids``: the ids to save the items under (`unique_ids`), else each
        item's `saved_id`, and `_Twice` raised if two are one."""
        old = self._objs
        n_old, n_new = len(old), len(items)

        def sid(i: int) -> str:
            if sids is not None:
                return sids[i]
            item_id = items[i].id
            return item_id if type(item_id) is str and item_id.isascii() else saved_id(item_id)

        if self._intact(items):
            first = n_old  # the committed prefix is intact: the common case
        else:
            first = next(
                (i for i, (a, b) in enumerate(zip(items, old, strict=False)) if a is not b),
                min(n_old, n_new),
            )
        # An item's id changed in place (an app's doing): the store holds it under the old
        # one, so from there on the stream is written anew. Seen in the edit window, and
        # for an item asked for again; further back the store keeps the old id (as it
        # keeps any edit there), and ``ids`` names what it holds. Read with ``sids``,
        # every id is compared: a new item may take an old id the store still holds.
        ids = self._ids

        def renamed_before(hi: int, lo: int) -> int:
            # the first item renamed in [lo, hi), and in the window before it, and so on:
            # every item before ``first`` in the window below it must be under its
            # stored id, or it would be written again under the new one, and not removed
            while True:
                if sids is None and [it.id for it in items[lo:hi]] == ids[lo:hi]:
                    return hi  # the common case, compared in C
                found = next((i for i in range(lo, hi) if sid(i) != ids[i]), hi)
                if found == hi:
                    return hi
                hi, lo = found, max(0, found - EDIT_WINDOW)

        first = renamed_before(first, 0 if sids is not None else max(0, first - EDIT_WINDOW))
        if rewrite:
            renamed = self._renamed(sid, rewrite, first)
            if renamed < first:  # and the window before it, looked at from there
                first = renamed_before(renamed, max(0, renamed - EDIT_WINDOW))
        plan = Plan(self, n_new)
        if first < n_old:
            live = sids if sids is not None else _saved_ids(items)
            # what the store holds once committed: the items before ``first`` under the
            # ids it holds them by (one renamed further back keeps its old id there)
            plan.ids = [*ids[:first], *live[first:]]
            alive = set(plan.ids)
            if len(alive) != n_new:  # the set is made anyway: a duplicate anywhere
                raise _Twice(_TWICE.format(self.stream))
            plan.removals = [
                Record(self.stream, gone, None) for gone in ids[first:] if gone not in alive
            ]
            plan.keep, plan.objs = 0, list(items)
        else:
            plan.keep, plan.objs = n_old, list(items[n_old:])
            plan.ids = sids[n_old:] if sids is not None else _saved_ids(plan.objs)
        removed = {r.id for r in plan.removals}
        puts, shapes = plan.puts, plan.shapes
        shaped = {} if shaped is None else shaped

        def shape_of(item: llm.ChatItem) -> Any:
            shape = shaped.get(id(item), _MISSING)  # the objects outlive the read
            if shape is _MISSING:
                shape = shaped[id(item)] = _Frozen(item)
            return shape

        def read(i: int) -> ItemData:
            item = items[i]
            data = convert(item)
            if sids is not None and data["id"] != sids[i]:
                data = {**data, "id": sids[i]}  # a copy: the other stream may share it
            shapes[data["id"]] = shape_of(item)
            return data

        # in-place edits of recent committed items: only an item no longer equal to its
        # shape is read again (compared in C: an unchanged item costs no copy)
        known = self._shapes
        for i in range(max(0, first - EDIT_WINDOW), first):
            item, item_id = items[i], ids[i]  # under its stored id (`renamed_before`)
            if item_id not in rewrite:
                shape = known.get(item_id, _MISSING)
                if shape is not _MISSING and shaped.get(id(item)) is shape:
                    continue  # found equal to this very shape in this read (other stream)
                try:
                    same = bool(shape == item)
                except Exception:  # a value whose == cannot answer (an array): read it again
                    same = False
                if same:
                    # the shape is the item's as read now: the other stream's diff of
                    # one moment, holding the same object, need not compare it again
                    shaped.setdefault(id(item), shape)
                    continue
            after = ids[i - 1] if i else None
            puts.append(_Put(item, after, read(i), item_id not in rewrite))
        # items asked for again (rare: their stored form must change), where they stand
        placed = {p.data["id"] for p in puts}
        wanted = {i for i in rewrite if i in self._digests and i not in removed and i not in placed}
        if wanted and first < n_old:
            wanted.difference_update(ids[first:])  # (re)placed below anyway
        # from the tail, stopping once all are found: the items asked for are mostly recent
        for i in range(first - 1, -1, -1):
            if not wanted:
                break
            if ids[i] in wanted:
                wanted.discard(ids[i])
                puts.append(_Put(items[i], ids[i - 1] if i else None, read(i)))
        # everything from the first divergence on is (re)placed in order
        fresh_ids = plan.ids[first - plan.keep :]
        fresh = set(fresh_ids)
        digests = self._digests
        if len(fresh) != n_new - first or (first == n_old and any(i in digests for i in fresh)):
            # the store keys items by id: two items with one id would fold into one
            raise _Twice(_TWICE.format(self.stream))
        after = ids[first - 1] if first else None
        for i, item_id in enumerate(fresh_ids, first):
            puts.append(_Put(items[i], after, read(i)))
            after = item_id
        return plan

    def _warn_aliased(self, items: Sequence[llm.ChatItem], raw: list[str], sids: list[str]) -> None:
        """Say once per name which items are saved under another id (``sids``, of
        `_unique`) than their own (``raw``, of `_saved_ids`)."""
        for item, own, item_id in zip(items, raw, sids, strict=True):
            if item_id != own and item_id not in self._aliased:
                self._aliased.add(item_id)
                log.warning(
                    "%s holds two chat items with the id %r: the later one is saved as %r "
                    "(and restored so); LiveKit gives each item a unique id",
                    self.stream,
                    item.id,
                    item_id,
                )

    def _renamed(self, sid: Callable[[int], str], rewrite: frozenset[str], first: int) -> int:
        """``first``, or the place of an item asked for again (``rewrite``) whose id
        changed in place, if before it: found from the tail, as `diff` finds them."""
        ids = self._ids
        pending = {i for i in rewrite if i in self._digests}
        if first < len(ids):
            pending.difference_update(ids[first:])
        lowest = first
        for i in range(first - 1, -1, -1):
            if not pending:
                break
            if ids[i] in pending:
                pending.discard(ids[i])
                if sid(i) != ids[i]:
                    lowest = i
        return lowest

    def full(
        self,
        items: Sequence[llm.ChatItem],
        convert: Converter,
        *,
        shaped: dict[int, Any] | None = None,
    ) -> Plan:
        """Read what clears the stored stream and writes ``items`` anew, in order: for a
        store that lost the session, or a log with a damaged record to leave behind."""
        plan = Plan(self, len(items), whole=True)
        plan.objs = list(items)
        raw = _saved_ids(plan.objs)
        plan.ids = sids = _unique(raw)
        self._warn_aliased(plan.objs, raw, sids)
        after: str | None = None
        for item, item_id in zip(plan.objs, sids, strict=True):
            shape = shaped.get(id(item), _MISSING) if shaped is not None else _MISSING
            plan.shapes[item_id] = _Frozen(item) if shape is _MISSING else shape
            data = convert(item)
            if data["id"] != item_id:
                data = {**data, "id": item_id}
            plan.puts.append(_Put(item, after, data))
            after = item_id
        return plan

    def accept(self, change: Change) -> None:
        """The change was committed: it is the new baseline. A change that writes the
        stream whole applies onto any state; another only onto the one it was read from
        (`StaleChange`: nothing is applied)."""
        if change.base is not self._gen and not change.whole:
            raise StaleChange(f"{self.stream}: a change accepted onto another state")
        if change.whole:
            self._digests, self._terms, self._shrunk = {}, {}, {}
        for item_id in change.removed:
            self._digests.pop(item_id, None)
            self._terms.pop(item_id, None)
            self._shrunk.pop(item_id, None)
        self._digests.update(change.set_digests)
        self._terms.update(change.set_terms)
        self._shrunk.update(change.set_shrunk)
        self._seal = change.seal
        if change.keep:
            del self._objs[change.keep :]
            self._objs.extend(change.objs)
            del self._ids[change.keep :]
            self._ids.extend(change.ids)
        else:
            self._objs, self._ids = change.objs, change.ids
        shapes = {**self._shapes, **change.shapes}
        self._shapes = {i: shapes[i] for i in self._ids[-EDIT_WINDOW:] if i in shapes}
        self._gen = object()


_MISSING = object()
_TWICE = "{} holds two chat items with the same id"


class _Twice(ValueError):
    """Two live items read under one id: `StreamTracker.diff` reads them again."""


def unique_ids(items: Sequence[llm.ChatItem]) -> list[str]:
    """The ids ``items`` are saved under: each item's `saved_id`, but a later item whose
    id an earlier one has gets ``<id>~<n>``, the least ``n`` from 2 no item has: the
    store keys items by id, and two items under one would fold into one."""
    return _unique(_saved_ids(items))


def _unique(saved: list[str]) -> list[str]:
    """`unique_ids` of items whose `_saved_ids` are ``saved`` (a new list if any
    differs)."""
    taken = set(saved)
    if len(taken) == len(saved):
        return saved
    ids = list(saved)
    seen: set[str] = set()
    for i, item_id in enumerate(ids):
        if item_id in seen:
            n = 2
            while f"{item_id}~{n}" in taken:
                n += 1
            item_id = ids[i] = f"{item_id}~{n}"
            taken.add(item_id)
        seen.add(item_id)
    return ids


def _saved_ids(items: Sequence[llm.ChatItem]) -> list[str]:
    """Each item's `saved_id`: at C speed when all are ASCII text, as LiveKit's are."""
    ids = [it.id for it in items]
    try:
        if all(map(str.isascii, ids)):
            return ids
    except TypeError:  # not text (an app's assignment)
        pass
    return [saved_id(i) for i in ids]


class Plan:
    """A stream's change as read from the live items: plain data, not yet hashed or
    encoded. `build` touches no LiveKit object: what it stores is what was read."""

    def __init__(self, tracker: StreamTracker, count: int, *, whole: bool = False) -> None:
        self.tracker = tracker
        self.count = count
        self.whole = whole
        self.removals: list[Record] = []
        """The records removing committed items (known before anything is encoded)."""
        self.puts: list[_Put] = []
        self.shapes: dict[str, Any] = {}
        self.keep = 0
        self.objs: list[llm.ChatItem] = []
        self.ids: list[str] = []
        self._base = tracker._gen

    @property
    def datas(self) -> Iterator[ItemData]:
        """The plain data of every item the plan may write."""
        return (p.data for p in self.puts)

    def written(self) -> Iterator[str]:
        """Ids the plan may write (a superset of what its change will)."""
        return (p.data["id"] for p in self.puts)

    def weight(self, counted: set[int] | None = None) -> int:
        """About how many bytes the plan's items hold (`weight`). ``counted``: the
        identities of data counted already (another plan's, shared): skipped, and
        added to."""
        if counted is None:
            return sum(p.weight() for p in self.puts)
        total = 0
        for p in self.puts:
            if id(p.data) not in counted:
                counted.add(id(p.data))
                total += p.weight()
        return total

    def build(self, encode: Encoder, memo: dict[int, tuple[bytes, bytes]] | None = None) -> Change:
        """Hash and encode the plan into the records of one commit. ``memo`` keeps the
        digests and msgpack of data dicts by identity, for plans sharing them (both
        streams)."""
        t = self.tracker
        if self._base is not t._gen:
            raise RuntimeError(f"{t.stream}: the tracker moved since this plan was read")
        base_digests = {} if self.whole else t._digests
        change = Change(
            [Record(t.stream, "", None)] if self.whole else [],
            count=self.count,
            whole=self.whole,
            keep=self.keep,
            objs=self.objs,
            ids=self.ids,
            shapes=self.shapes,
            base=self._base,
        )
        removed = change.removed
        seal = _Seal(t, {} if self.whole else t._terms, {} if self.whole else t._shrunk, change)
        seal.seal = 0 if self.whole else t._seal
        digests = Overlay(base_digests, removed, change.set_digests)
        change.records += self.removals
        for gone in self.removals:
            seal.drop(gone.id)
        memo = {} if memo is None else memo
        for put in self.puts:
            known = memo.get(id(put.data))
            if known is None:
                # the digest's input is the frame's body; megabytes are packed in pieces
                packed = pack_item(put.data, pieces=put.weight() > PIECES_OVER)
                known = memo[id(put.data)] = (packed_digest(packed), packed)
            d, packed = known
            item_id = put.data["id"]  # as read: the live item may be renamed since
            if put.only_if_changed and digests.get(item_id) == d:
                continue
            frame = seal.place(item_id, put.after, d, encode(put.data, d, packed))
            change.records.append(Record(t.stream, item_id, frame, put.after))
            change.set_digests[item_id] = d
            change.datas[item_id] = put.data
        change.digests = digests
        change.shrunk = Overlay({} if self.whole else t._shrunk, removed, change.set_shrunk)
        change.seal = seal.seal
        return change


class _Seal:
    """A stream's seal being updated by one change: each record placed or removed swaps
    its item's term (snapshot/seal.py). Reads the committed terms, writes the change's."""

    def __init__(
        self,
        tracker: StreamTracker,
        terms: Mapping[str, int],
        shrunk: Mapping[str, bytes],
        change: Change,
    ) -> None:
        self._stream, self._key = tracker.stream, tracker.seal_key
        self._terms, self._shrunk, self._change = terms, shrunk, change
        self.seal = 0

    def drop(self, item_id: str) -> None:
        c = self._change
        old = c.set_terms.pop(item_id, None)
        if old is None and item_id not in c.removed:
            old = self._terms.get(item_id)
        if old is not None:
            self.seal = self._key.sub(self.seal, old)
        c.removed.add(item_id)  # every committed entry of the id goes; set_* ones follow
        c.set_shrunk.pop(item_id, None)

    def place(
        self, item_id: str, after: str | None, d: bytes, encoded: bytes | tuple[bytes, bytes]
    ) -> bytes:
        """Account for ``item_id`` stored after ``after``; return its frame."""
        frame, stored = encoded if isinstance(encoded, tuple) else (encoded, d)
        self.drop(item_id)
        c = self._change
        if stored != d:
            c.set_shrunk[item_id] = stored
        term = c.set_terms[item_id] = self._key.term(self._stream, item_id, after, stored)
        self.seal = self._key.add(self.seal, term)
        return frame
