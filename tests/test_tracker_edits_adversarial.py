"""In-place edits of a recent chat item that the checkpoint's edit check misses.

The checkpoint keeps a frozen copy ("shape", agent_hooks/tracker.py) of each of the last
`EDIT_WINDOW` committed items and writes an item again only once it no longer equals
that copy. The ground truth is what a save of the live item holds
(`chat.item_to_data`): after an in-place edit and a second checkpoint, a restore into a
new session must hold exactly that.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit import rtc
from livekit.agents import AgentSession, llm
from pydantic import BaseModel, Field, PrivateAttr, computed_field

from livekit_resume.snapshot import chat
from tests.test_fastpaths_adversarial import fill, saved_form
from tests.test_fidelity_adversarial import World, append, live_items


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    await w.close_all()


def saved(items: list[llm.ChatItem], media: str = "drop") -> list[Any]:
    return [saved_form(chat.item_to_data(it, media=media)) for it in items]  # type: ignore[arg-type]


async def edit_and_restore(
    world: World,
    setup: Callable[[list[llm.ChatMessage], AgentSession[None]], Any],
    edit: Callable[[Any], Any],
    *,
    media: str = "drop",
) -> tuple[list[Any], list[Any], list[Any]]:
    """Fill a session, ``setup`` a recent item (returns what ``edit`` gets), checkpoint,
    ``edit`` it in place, checkpoint again, restore: (saved before the edit, saved of
    the live items after it, saved of the restored items), history only."""
    session, rs = await world.start(media=media)
    msgs = await fill(session, 6)
    target = setup(msgs, session)
    await rs.checkpoint()
    first = saved(live_items(session)[0], media)
    edit(target)
    live = saved(live_items(session)[0], media)
    return first, live, await restored(world, session, rs, media)


async def restored(world: World, session: AgentSession[None], rs: Any, media: str = "drop") -> Any:
    """Checkpoint, restore into a new session: the saved form of each history item the
    restore gives back, in the live history's order."""
    await rs.checkpoint()
    ids = [it.id for it in live_items(session)[0]]
    await world.close_last()
    s2, _ = await world.start(takeover=True, media=media)
    by_id = {it.id: it for it in live_items(s2)[0]}
    return saved([by_id[i] for i in ids if i in by_id], media)


def check(first: list[Any], live: list[Any], back: list[Any]) -> None:
    """The edit changed what a save holds, and the restore holds what a save of the live
    items holds (the message tells whether the restore has the pre-edit save)."""
    assert live != first, "the edit does not change what a save holds: the test proves nothing"
    wrong = [i for i, (a, b) in enumerate(zip(back, live, strict=False)) if a != b]
    stale = all(back[i] == first[i] for i in wrong) if len(back) == len(first) else False
    assert back == live, f"items {wrong} restored " + (
        "as saved before the edit (the edit was missed)" if stale else "unlike either save"
    )


def in_extra(value: Any) -> Callable[[list[llm.ChatMessage], AgentSession[None]], Any]:
    def setup(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
        msgs[-1].extra["v"] = value
        return msgs[-1].extra

    return setup


async def assert_edit_restored(
    world: World,
    value: Any,
    edit: Callable[[Any], Any],
) -> None:
    check(*await edit_and_restore(world, in_extra(value), edit))


# -- values whose identity or repr is what the shape compares ------------------------


async def test_enum_member_whose_list_value_is_edited_in_place_is_saved(world: World) -> None:
    """An Enum compares by identity (``Enum.__eq__`` is object's) and is kept by the
    shape as the live object itself; its value is what a save holds ([1] then [1, 2])."""
    Codes = enum.Enum("Codes", {"ALL": [1]})  # a fresh class: its value is mutated
    await assert_edit_restored(world, Codes.ALL, lambda e: e["v"].value.append(2))


class Counted(BaseModel):
    """A model whose saved form has a computed field over private state."""

    _hits: int = PrivateAttr(0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hits(self) -> int:
        return self._hits


def _bump(e: dict[str, Any]) -> None:
    e["v"]._hits = 5


async def test_model_computed_field_over_private_state_edited_in_place_is_saved(
    world: World,
) -> None:
    """A pydantic model in ``extra``: the shape copies its ``__dict__`` (fields) and its
    extra, not ``__pydantic_private__``, while a save holds its computed fields, which may
    read private state ({"hits": 0} then {"hits": 5})."""
    await assert_edit_restored(world, Counted(), _bump)


class Secretive(BaseModel):
    a: int = 0
    token: str = Field("old", repr=False)


Pair = collections.namedtuple("Pair", ["left", "right"])


async def test_model_with_a_repr_hidden_field_inside_a_namedtuple_edited_is_saved(
    world: World,
) -> None:
    """A namedtuple is kept by the shape as the live object plus its ``repr``; a model
    inside with a ``Field(repr=False)`` field edited in place changes neither, and does
    change what a save holds."""

    def edit(e: dict[str, Any]) -> None:
        e["v"].left.token = "new"

    await assert_edit_restored(world, Pair(Secretive(token="old"), 1), edit)


@dataclasses.dataclass(eq=False, repr=False)
class Handle:
    """A hashable (by identity) dataclass with the default object repr."""

    n: int


async def test_dataclass_member_of_a_set_edited_in_place_is_saved(world: World) -> None:
    """A set is kept by the shape as a frozenset of its live members plus its repr: a
    member hashed by identity, with the object's repr, edited in place is missed."""

    def edit(e: dict[str, Any]) -> None:
        next(iter(e["v"])).n = 2

    await assert_edit_restored(world, {Handle(1)}, edit)


async def test_dataclass_inside_a_namedtuple_edited_in_place_is_saved(world: World) -> None:
    """The same through a namedtuple (kept as the live object and its repr)."""

    def edit(e: dict[str, Any]) -> None:
        e["v"].left.n = 2

    await assert_edit_restored(world, Pair(Handle(1), "x"), edit)


@dataclasses.dataclass(frozen=True)
class Key:
    """A hashable dataclass with a field left out of eq, hash and repr."""

    name: str
    notes: list[str] = dataclasses.field(default_factory=list, compare=False, repr=False)


async def test_frozen_dataclass_in_a_frozenset_with_hidden_field_edited_is_saved(
    world: World,
) -> None:
    """A frozen dataclass in a frozenset: its hidden list field edited in place."""

    def edit(e: dict[str, Any]) -> None:
        next(iter(e["v"])).notes.append("later")

    await assert_edit_restored(world, frozenset({Key("k")}), edit)


# -- media kept (media="keep"): frames compared by identity --------------------------


def _audio_message(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
    frame = rtc.AudioFrame.create(16000, 1, 160)
    m = llm.ChatMessage(
        id="item_audio",
        role="user",
        content=[llm.AudioContent(frame=[frame], transcript="hello")],
        created_at=2000.0,
    )
    append(session, m)
    return frame


async def test_kept_audio_frame_samples_edited_in_place_are_saved(world: World) -> None:
    """With ``media="keep"`` a save holds an audio part's PCM; the shape keeps the
    `rtc.AudioFrame` itself (compared by identity), so samples written into the frame's
    buffer in place (a reused buffer) are missed."""

    def edit(frame: rtc.AudioFrame) -> None:
        frame.data[0] = 1234

    check(*await edit_and_restore(world, _audio_message, edit, media="keep"))


async def test_kept_audio_frame_userdata_edited_in_place_is_saved(world: World) -> None:
    """The same for the frame's ``userdata`` dict (saved with ``media="keep"``)."""

    def edit(frame: rtc.AudioFrame) -> None:
        frame.userdata["speaker"] = "alice"

    check(*await edit_and_restore(world, _audio_message, edit, media="keep"))


async def test_kept_audio_frame_userdata_value_turned_bool_is_saved(world: World) -> None:
    """A frame's ``userdata`` value edited from ``1`` to ``True`` in place: equal by ==,
    saved as another type."""

    def edit(frame: rtc.AudioFrame) -> None:
        frame.userdata["n"] = True

    def setup(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
        frame = _audio_message(msgs, session)
        frame.userdata["n"] = 1
        return frame

    check(*await edit_and_restore(world, setup, edit, media="keep"))


# -- values whose own == is looser than what a save holds ----------------------------


class Tags(list[str]):
    """A list of tags compared case-insensitively (an app's own equality)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list):
            return NotImplemented
        return [str(t).lower() for t in self] == [str(t).lower() for t in other]

    __hash__ = None


class Caseless(dict[str, str]):
    """Names compared case-insensitively (an app's own equality)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict) or self.keys() != other.keys():
            return False
        return all(str(self[k]).lower() == str(other[k]).lower() for k in self)

    __hash__ = None


def _lower_first(e: dict[str, Any]) -> None:
    e["v"][0] = "vip"


def _lower_name(e: dict[str, Any]) -> None:
    e["v"]["name"] = "bob"


async def test_list_subclass_with_a_looser_eq_edited_in_place_is_saved(world: World) -> None:
    """A list subclass is copied, and the copy compared with ``copy == live``: Python
    asks the subclass's own ``__eq__`` first (reflected), which may call an edit equal
    ("VIP" to "vip")."""
    await assert_edit_restored(world, Tags(["VIP"]), _lower_first)


async def test_dict_subclass_with_a_looser_eq_edited_in_place_is_saved(world: World) -> None:
    """The same for a dict subclass ("Bob" to "bob")."""
    await assert_edit_restored(world, Caseless({"name": "Bob"}), _lower_name)


@dataclasses.dataclass
class Reading:
    """A stdlib dataclass with a non-field attribute (not in its save)."""

    raw: int

    def __post_init__(self) -> None:
        self.scale = 1


async def test_dataclass_non_field_attribute_edit_is_not_a_change(world: World) -> None:
    """A stdlib dataclass's non-field attribute is not in its save: editing it is no
    change (control: the restore still equals the live save)."""
    first, live, back = await edit_and_restore(
        world, in_extra(Reading(1)), lambda e: setattr(e["v"], "scale", 2)
    )
    assert back == live == first


# -- controls: in-place edits the shape sees (these pass) ----------------------------


@dataclasses.dataclass
class Point:
    x: int
    tags: list[str] = dataclasses.field(default_factory=list)


class Profile(BaseModel, extra="allow"):
    name: str = "a"
    prefs: dict[str, Any] = Field(default_factory=dict)


def _nested(depth: int) -> Any:
    value: Any = [0]
    for _ in range(depth):
        value = [value]
    return value


def _nested_dicts(depth: int) -> Any:
    value: Any = {"leaf": 1}
    for _ in range(depth):
        value = {"d": value}
    return value


def _deepest_to_bool(e: dict[str, Any]) -> None:
    node = e["v"]
    while "d" in node:
        node = node["d"]
    node["leaf"] = True


def _innermost(e: dict[str, Any]) -> None:
    node = e["v"]
    while isinstance(node[0], list):
        node = node[0]
    node[0] = 1


def _cyclic() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


_SEEN_EDITS: dict[str, tuple[Any, Callable[[dict[str, Any]], Any]]] = {
    "nested-dict-value": ({"a": {"b": [1, {"c": 2}]}}, lambda e: e["v"]["a"]["b"][1].update(c=3)),
    "bytearray-byte": (bytearray(b"ab"), lambda e: e["v"].__setitem__(0, 0x7A)),
    "memoryview-of-bytearray": (
        memoryview(bytearray(b"ab")),
        lambda e: e["v"].__setitem__(0, 0x7A),
    ),
    "big-int": ([2**70], lambda e: e["v"].__setitem__(0, 2**70 + 1)),
    "int-to-bool-in-list": ([1], lambda e: e["v"].__setitem__(0, True)),
    "zero-to-negative-zero-in-list": ([0.0], lambda e: e["v"].__setitem__(0, -0.0)),
    "nan-to-number": ([float("nan")], lambda e: e["v"].__setitem__(0, 1.0)),
    "int-to-float": ([1], lambda e: e["v"].__setitem__(0, 1.0)),
    "list-to-tuple-inner-edit": ([(1, [2])], lambda e: e["v"][0][1].append(3)),
    "dataclass-field": (Point(1), lambda e: setattr(e["v"], "x", 2)),
    "dataclass-nested-list": (Point(1), lambda e: e["v"].tags.append("t")),
    "model-field-dict": (Profile(), lambda e: e["v"].prefs.update(k=1)),
    "model-extra": (
        Profile.model_validate({"color": "red"}),
        lambda e: setattr(e["v"], "color", "blue"),
    ),
    "model-field-int-to-bool": (
        Profile(prefs={"k": 1}),
        lambda e: e["v"].prefs.update(k=True),
    ),
    "namedtuple-inner-list": (Pair([1], 2), lambda e: e["v"].left.append(2)),
    "defaultdict-value": (
        collections.defaultdict(list, {"a": [1]}),
        lambda e: e["v"]["a"].append(2),
    ),
    "ordereddict-order": (
        collections.OrderedDict(a=1, b=2),
        lambda e: e["v"].move_to_end("a"),
    ),
    "counter-zero-count": (collections.Counter(a=1), lambda e: e["v"].update(b=0)),
    "deque-append": (collections.deque([1]), lambda e: e["v"].append(2)),
    "set-add": ({1}, lambda e: e["v"].add(2)),
    "set-of-tuples-int-to-bool": ({(1, "a")}, lambda e: (e["v"].clear(), e["v"].add((True, "a")))),
    "deep-nesting-60": (_nested(60), _innermost),
    "deep-nesting-70": (_nested(70), _innermost),
    "dict-nesting-62-int-to-bool": (_nested_dicts(62), _deepest_to_bool),
    "dict-nesting-63-int-to-bool": (_nested_dicts(63), _deepest_to_bool),
    "dict-nesting-64-int-to-bool": (_nested_dicts(64), _deepest_to_bool),
    "dict-nesting-65-int-to-bool": (_nested_dicts(65), _deepest_to_bool),
    "cycle-grows": (_cyclic(), lambda e: e["v"].insert(0, 2)),
    "str-subclass-to-other-text": (
        type("Label", (str,), {})("a"),
        lambda e: e.update(v=type("Label", (str,), {})("b")),
    ),
    "tuple-key-int-to-bool": ({(1,): "x", "b": 1}, lambda e: _swap(e["v"], (1,), (True,))),
}


def _swap(d: dict[Any, Any], old: Any, new: Any) -> None:
    value = d.pop(old)
    d[new] = value


@pytest.mark.parametrize("case", list(_SEEN_EDITS))
async def test_in_window_edit_in_extra_is_restored_as_saved(world: World, case: str) -> None:
    """A recent item's ``extra`` value edited in place, in one of many kinds of value:
    the restore holds what a save of the live item holds."""
    value, edit = _SEEN_EDITS[case]
    first, live, back = await edit_and_restore(world, in_extra(value), edit)
    if live == first:
        pytest.skip("this edit does not change what a save holds")
    check(first, live, back)


# -- controls: in-place edits of an item's own fields --------------------------------


def _call_pair(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
    call = llm.FunctionCall(
        id="item_call",
        call_id="call_1",
        name="lookup",
        arguments='{"q": "x"}',
        extra={"k": [1]},
        created_at=2000.0,
    )
    out = llm.FunctionCallOutput(
        id="item_out",
        call_id="call_1",
        name="lookup",
        output="found",
        is_error=False,
        created_at=2001.0,
    )
    append(session, call)
    append(session, out)
    return msgs[-1], call, out


def _set(index: int, name: str, value: Any) -> Callable[[Any], None]:
    return lambda t: setattr(t[index], name, value)


_FIELD_EDITS: dict[str, Callable[[Any], Any]] = {
    "message-interrupted": _set(0, "interrupted", True),
    "message-created-at": _set(0, "created_at", 1005.5),
    "message-content-append": lambda t: t[0].content.append("more"),
    "message-content-image-url": lambda t: t[0].content.append(
        llm.ImageContent(image="https://example.com/a.png", inference_width=4)
    ),
    "message-transcript-confidence": _set(0, "transcript_confidence", 0.5),
    "message-metrics-nested": lambda t: t[0].metrics.update(
        {"stt_metadata": {"model_name": "m", "model_provider": "p"}}
    ),
    "call-arguments": _set(1, "arguments", '{"q": "y"}'),
    "call-name": _set(1, "name", "other"),
    "call-extra-nested": lambda t: t[1].extra["k"].append(True),
    "output-text": _set(2, "output", "found it"),
    "output-is-error": _set(2, "is_error", True),
}


@pytest.mark.parametrize("case", list(_FIELD_EDITS))
async def test_in_window_edit_of_an_item_field_is_restored_as_saved(
    world: World, case: str
) -> None:
    """A recent message, function call or its output edited in place in one of its own
    fields: the restore holds what a save of the live items holds."""
    check(*await edit_and_restore(world, _call_pair, _FIELD_EDITS[case]))


async def test_in_window_edit_of_a_content_image_field_is_restored_as_saved(
    world: World,
) -> None:
    """An image part (a model inside ``content``) edited in place."""
    image = llm.ImageContent(image="https://example.com/a.png")

    def setup(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
        msgs[-1].content.append(image)
        return image

    check(*await edit_and_restore(world, setup, lambda im: setattr(im, "inference_width", 9)))


async def test_in_window_edit_of_an_audio_transcript_is_restored_as_saved(world: World) -> None:
    """An audio part's transcript (kept with media dropped: the restore holds it as the
    message's text) edited in place."""
    session, rs = await world.start()
    await fill(session, 6)
    _audio_message([], session)
    await rs.checkpoint()
    live = session.history.items[-1]
    assert isinstance(live, llm.ChatMessage)
    live.content[0].transcript = "hello there"  # type: ignore[union-attr]
    await rs.checkpoint()
    await world.close_last()
    s2, _ = await world.start(takeover=True)
    back = next(it for it in live_items(s2)[0] if it.id == live.id)
    assert isinstance(back, llm.ChatMessage)
    assert back.text_content == "hello there"


# -- property: random values, a random in-place edit ---------------------------------

_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63, 2**64, 2**70, -(2**64)]),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, float("nan"), float("inf")]),
    st.text(max_size=3),
    st.binary(max_size=3),
)


class Label(str):
    """A str subclass (saved as its text)."""

    __slots__ = ()


class Count(int):
    """An int subclass (saved as its int)."""

    __slots__ = ()


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
        st.binary(max_size=3).map(bytearray),
        st.frozensets(st.text(max_size=2), max_size=3).map(set),
        st.builds(Point, st.integers(-2, 2), st.lists(st.text(max_size=2), max_size=2)),
        st.builds(Profile, name=st.text(max_size=2)),
        st.builds(Pair, children, children),
        st.dictionaries(st.text(max_size=2), children, max_size=3).map(collections.OrderedDict),
        st.lists(children, max_size=3).map(collections.deque),
        st.text(max_size=3).map(Label),
        st.integers(-2, 2).map(Count),
    )


_VALUES = st.recursive(_LEAF, _containers, max_leaves=8)


def _slots(value: Any, depth: int = 0) -> list[tuple[Any, str, Any]]:
    """Every place an in-place edit can go: (container, how, where)."""
    out: list[tuple[Any, str, Any]] = []
    if depth > 6:
        return out
    children: list[Any] = []
    if type(value) is list:
        out.append((value, "append", None))
        out += [(value, "set", i) for i in range(len(value))]
        children = list(value)
    elif type(value) is collections.OrderedDict:
        out += [(value, "set", k) for k in value] + [(value, "move", k) for k in value]
        children = list(value.values())
    elif type(value) is collections.deque:
        out += [(value, "append", None), (value, "appendleft", None)]
        children = list(value)
    elif type(value) is dict:
        out.append((value, "add", None))
        out += [(value, "set", k) for k in value]
        out += [(value, "del", k) for k in value]
        children = list(value.values())
    elif type(value) is tuple or type(value) is Pair:
        children = list(value)
    elif type(value) is bytearray:
        out += [(value, "byte", i) for i in range(len(value))]
    elif type(value) is set:
        out.append((value, "add-member", None))
    elif type(value) is Point:
        out += [(value, "attr", "x"), (value, "append", None)]
        children = [value.tags]
    elif type(value) is Profile:
        out += [(value, "attr", "name"), (value, "add", None)]
        children = [value.prefs]
    for child in children:
        out += _slots(child, depth + 1)
    return out


def _apply(slot: tuple[Any, str, Any], leaf: Any, data: st.DataObject) -> None:
    target, how, where = slot
    if type(target) is Point:
        if how == "attr":
            target.x = data.draw(st.integers(-2, 2))
        else:
            target.tags.append(data.draw(st.text(max_size=2)))
    elif type(target) is Profile:
        if how == "attr":
            target.name = data.draw(st.text(max_size=2))
        else:
            target.prefs[data.draw(st.text(max_size=2))] = leaf
    elif how == "append":
        target.append(leaf)
    elif how == "appendleft":
        target.appendleft(leaf)
    elif how == "move":
        target.move_to_end(where, last=False)
    elif how == "set":
        target[where] = leaf
    elif how == "add":
        target[data.draw(st.text(max_size=2))] = leaf
    elif how == "del":
        del target[where]
    elif how == "byte":
        target[where] = data.draw(st.integers(0, 255))
    elif how == "add-member":
        target.add(data.draw(st.text(max_size=2)))


async def _property_case(root: Path, value: Any, data: st.DataObject) -> None:
    world = World(root)
    try:
        session, rs = await world.start()
        msgs = await fill(session, 3)
        msgs[-1].extra["v"] = value
        await rs.checkpoint()
        first = saved(live_items(session)[0])
        slots = _slots(msgs[-1].extra)
        slot = data.draw(st.sampled_from(slots))
        _apply(slot, data.draw(_LEAF), data)
        live = saved(live_items(session)[0])
        back = await restored(world, session, rs)
        if live != first:
            check(first, live, back)
        else:
            assert back == live
    finally:
        await world.close_all()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(value=_VALUES, data=st.data())
def test_random_in_window_edit_in_extra_is_restored_as_saved(value: Any, data: Any) -> None:
    """Random ``extra`` values (numbers at the edges, bytes, sets, tuples, dataclasses,
    models, namedtuples, nesting), one random in-place edit, checkpoint, restore: the
    restore holds what a save of the live items holds."""
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(_property_case(Path(root), value, data))


# -- more: pydantic dataclasses, subclass replacing a plain container, kept frames ----


@pydantic.dataclasses.dataclass
class Scaled:
    """A pydantic dataclass: its save has a computed field over a non-field attribute."""

    raw: int

    def __post_init__(self) -> None:
        self.scale = 1

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def value(self) -> int:
        return self.raw * self.scale


async def test_pydantic_dataclass_computed_field_over_non_field_edited_is_saved(
    world: World,
) -> None:
    """A dataclass's shape copies its fields only; a pydantic dataclass's save also holds
    its computed fields, which may read other attributes ({"raw": 2, "value": 2} then
    {"raw": 2, "value": 6})."""
    await assert_edit_restored(world, Scaled(2), lambda e: setattr(e["v"], "scale", 3))


async def test_kept_audio_frame_appended_in_place_is_saved(world: World) -> None:
    """Control: a frame appended to a kept audio part's frame list is seen."""

    def setup(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
        _audio_message(msgs, session)
        return session.history.items[-1]

    def edit(m: Any) -> None:
        m.content[0].frame.append(rtc.AudioFrame.create(16000, 1, 80))

    check(*await edit_and_restore(world, setup, edit, media="keep"))


def _session_items(msgs: list[llm.ChatMessage], session: AgentSession[None]) -> Any:
    """The handoff and config update the session's start put first in its history (in
    the window: only six messages follow), and the last message."""
    items = session.history.items
    handoff = next(it for it in items if isinstance(it, llm.AgentHandoff))
    config = next(it for it in items if isinstance(it, llm.AgentConfigUpdate))
    return handoff, config, msgs[-1]


_OTHER_EDITS: dict[str, Callable[[Any], Any]] = {
    "handoff-old-agent": _set(0, "old_agent_id", "someone"),
    "config-tools-added-append": lambda t: t[1].tools_added.append("extra_tool"),
    "config-tools-removed": _set(1, "tools_removed", ["lookup"]),
    "config-instructions": _set(1, "instructions", "Changed."),
    "message-role": _set(2, "role", "developer"),
    "message-cache-breakpoint": lambda t: t[2].content.append(llm.CacheBreakpoint()),
    "message-content-str-to-label": lambda t: t[2].content.__setitem__(0, Label("other")),
}


@pytest.mark.parametrize("case", list(_OTHER_EDITS))
async def test_in_window_edit_of_a_handoff_config_or_role_is_restored_as_saved(
    world: World, case: str
) -> None:
    """The session's handoff and config update items, and a message's role and content
    parts, edited in place: the restore holds what a save of the live items holds."""
    check(*await edit_and_restore(world, _session_items, _OTHER_EDITS[case]))


async def test_a_checkpoint_leaves_an_iterator_in_extra_unconsumed(world: World) -> None:
    """An iterator in a recent item's ``extra`` (a generator): a save converts it
    through pydantic, which drains it, so the checkpoint eats the app's data and the
    next save of the live item holds [] while the store keeps [1, 2, 3]."""
    session, rs = await world.start()
    msgs = await fill(session, 6)
    numbers = iter([1, 2, 3])
    msgs[-1].extra["v"] = numbers
    await rs.checkpoint()
    assert list(numbers) == [1, 2, 3]


async def test_an_edit_reverted_after_a_checkpoint_is_saved(world: World) -> None:
    """Control: a value edited (checkpoint) then edited back (checkpoint): the restore
    holds the value as it is now."""
    session, rs = await world.start()
    msgs = await fill(session, 6)
    msgs[-1].extra["v"] = [1, {"a": 1}]
    await rs.checkpoint()
    msgs[-1].extra["v"][1]["a"] = 2
    await rs.checkpoint()
    await rs.checkpoint()
    msgs[-1].extra["v"][1]["a"] = 1
    live = saved(live_items(session)[0])
    assert await restored(world, session, rs) == live


_AFTER_RESTORE_EDITS: dict[str, Callable[[llm.ChatMessage], Any]] = {
    "extra-nested-int-to-bool": lambda m: m.extra["v"][0].__setitem__("k", True),
    "extra-nested-append": lambda m: m.extra["v"].append(None),
    "extra-big-int-changed": lambda m: m.extra.update(big=2**70 + 1),
    "content-append": lambda m: m.content.append("more"),
    "metrics-add": lambda m: m.metrics.update({"llm_node_ttft": 0.5}),
    "interrupted": lambda m: setattr(m, "interrupted", True),
}


@pytest.mark.parametrize("case", list(_AFTER_RESTORE_EDITS))
async def test_in_window_edit_of_a_restored_item_is_saved(world: World, case: str) -> None:
    """After a restore the edit window's shapes are taken of the restored items (built
    without validation): a restored item edited in place is still seen."""
    session, rs = await world.start()
    msgs = await fill(session, 6)
    msgs[-1].extra.update(v=[{"k": 1}], big=2**70)
    await rs.checkpoint()
    await world.close_last()
    s2, rs2 = await world.start(takeover=True)
    target = next(it for it in live_items(s2)[0] if it.id == msgs[-1].id)
    assert isinstance(target, llm.ChatMessage)
    first = saved(live_items(s2)[0])
    _AFTER_RESTORE_EDITS[case](target)
    live = saved(live_items(s2)[0])
    await rs2.checkpoint()
    ids = [it.id for it in live_items(s2)[0]]
    await world.close_last()
    s3, _ = await world.start(takeover=True)
    by_id = {it.id: it for it in live_items(s3)[0]}
    check(first, live, saved([by_id[i] for i in ids if i in by_id]))
