"""Differential hunts: each fast path against its slow path or a ground truth.

1. `chat.item_from_data`'s fast path (items built with ``__new__``) against the strict
   pydantic validation its slow path runs (a reference written out here).
2. `Codec._items`' shortcuts (agent references by bytes, seal leaves from the body).
3. The checkpoint's change detection (committed prefix by identity/equality, edit
   window by frozen shapes) against the ground truth: a restore into a new session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from livekit.agents import AgentSession, llm
from pydantic import ValidationError

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot import chat
from tests.test_fidelity_adversarial import World, append, live_items

# -- exact comparison helpers --------------------------------------------------------


def exact(value: Any) -> Any:
    """A value with every leaf's exact type kept (str subclasses, -0.0, NaN, bool/int)."""
    if isinstance(value, dict):
        return (
            "dict",
            type(value).__name__,
            tuple(sorted(((exact(k), exact(v)) for k, v in value.items()), key=repr)),
        )
    if isinstance(value, (list, tuple)):
        return ("seq", type(value).__name__, tuple(exact(v) for v in value))
    if isinstance(value, float):
        return ("float", type(value).__name__, repr(value))
    if hasattr(value, "model_dump") and hasattr(value, "__pydantic_fields_set__"):
        return model_exact(value)
    return (type(value).__name__, value)


def model_exact(item: Any) -> Any:
    return (
        type(item).__name__,
        exact(dict(item.__dict__)),
        tuple(sorted(item.model_fields_set)),
        exact(item.__pydantic_extra__),
        exact(item.__pydantic_private__),
    )


# -- 1. item_from_data: fast path vs strict validation ----------------------------------


def reference_item(data: dict[str, Any]) -> llm.ChatItem:
    """The slow path of `item_from_data`, without any shortcut: keys checked, content
    parts built, strict pydantic validation (metrics repaired as documented), extra
    metrics kept."""
    item_id = data.get("id")
    if not isinstance(item_id, str):
        raise SnapshotCorrupt("id")
    kind = data.get("type")
    cls = chat._ITEM_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SnapshotCorrupt("type")
    chat._check_keys(item_id, str(kind), data, *chat._ITEM_KEYS[cls])
    values = dict(data)
    if cls is llm.ChatMessage:
        content = data["content"]
        if not isinstance(content, list):
            raise SnapshotCorrupt("content")
        values["content"] = [c for p in content for c in chat._content_from_data(item_id, p)]
    try:
        item = chat._ITEM_ADAPTER.validate_python(values, strict=True)
    except ValidationError as exc:
        if not (cls is llm.ChatMessage and type(data["metrics"]) is dict and chat._in_metrics(exc)):
            raise SnapshotCorrupt("invalid") from exc
        values["metrics"] = chat._restorable_metrics(data["metrics"], "ref")
        try:
            item = chat._ITEM_ADAPTER.validate_python(values, strict=True)
        except ValidationError as again:
            raise SnapshotCorrupt("invalid") from again
    if isinstance(item, llm.ChatMessage):
        for k, v in values["metrics"].items():
            item.metrics.setdefault(k, v)  # type: ignore[misc]
    return item


def judged(fn: Any, data: Any) -> Any:
    try:
        return ("ok", model_exact(fn(data)))
    except SnapshotCorrupt:
        return ("refused",)


class S(str):
    """A str subclass (an enum-like app type, or a tagged string)."""


class F(float):
    pass


def base_message() -> dict[str, Any]:
    return chat.item_to_data(
        llm.ChatMessage(
            id="item_m",
            role="user",
            content=["hi"],
            created_at=1.5,
            extra={"k": 1},
            metrics={"e2e_latency": 0.5, "custom": [1]},  # type: ignore[typeddict-unknown-key]
        )
    )


def base_call() -> dict[str, Any]:
    return chat.item_to_data(
        llm.FunctionCall(
            id="item_c",
            call_id="c1",
            name="lookup",
            arguments='{"q": 1}',
            created_at=2.0,
            extra={"a": "b"},
            group_id="g",
        )
    )


def base_output() -> dict[str, Any]:
    return chat.item_to_data(
        llm.FunctionCallOutput(
            id="item_o",
            call_id="c1",
            name="lookup",
            output="out",
            is_error=False,
            created_at=3.0,
        )
    )


def base_handoff() -> dict[str, Any]:
    return chat.item_to_data(
        llm.AgentHandoff(id="item_h", old_agent_id=None, new_agent_id="a", created_at=4.0)
    )


BASES = [base_message, base_call, base_output, base_handoff]

odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.text(max_size=4).map(S),
    st.floats(allow_nan=False).map(F),
    st.binary(max_size=3),
    st.lists(st.one_of(st.text(max_size=3), st.integers(), st.text(max_size=2).map(S)), max_size=3),
    st.dictionaries(
        st.one_of(
            st.sampled_from(sorted(chat._DECLARED_METRICS)),
            st.text(max_size=3),
            st.sampled_from(["e2e_latency", "llm_node_ttft"]).map(S),
            st.integers(),
        ),
        st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), st.text(max_size=2)),
        max_size=3,
    ),
    st.sampled_from(["user", "assistant", "system", "developer", "tool", "message"]),
    st.sampled_from(["user", "assistant"]).map(S),
)


@st.composite
def mutated_items(draw: Any) -> dict[str, Any]:
    data = draw(st.sampled_from(BASES))()
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "drop", "add", "reorder"]))
        keys = list(data)
        if op == "set":
            data[draw(st.sampled_from(keys))] = draw(odd_values)
        elif op == "drop":
            data.pop(draw(st.sampled_from(keys)))
        elif op == "add":
            data[draw(st.sampled_from(["hash", "extra", "bogus", "metrics"]))] = draw(odd_values)
        else:
            order = draw(st.permutations(keys))
            data = {k: data[k] for k in order}
    return cast(dict[str, Any], data)


_SUBCLASS_KEY = {
    "id": "item_m",
    "type": "message",
    "role": "user",
    "content": ["hi"],
    "interrupted": False,
    "transcript_confidence": None,
    "extra": {S("e2e_latency"): None},
    "metrics": {"e2e_latency": 0.5},
    "created_at": 1.5,
}  # found by a CI run: the fast path kept the str subclass key validation makes a str


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_items())
@example(_SUBCLASS_KEY)
@example({**_SUBCLASS_KEY, "extra": {}, "content": [S("hi")]})
@example({**_SUBCLASS_KEY, "extra": {}, "metrics": {S("e2e_latency"): 0.5}})
def test_item_from_data_agrees_with_strict_validation(data: dict[str, Any]) -> None:
    """Whatever the map, the fast path and strict validation judge it alike, and build
    the same item (field values and their exact types, fields set, extra, private)."""
    want = judged(reference_item, data)
    got = judged(chat.item_from_data, data)
    # twice: the second read takes the remembered shape
    again = judged(chat.item_from_data, data)
    assert got == want, data
    assert again == want, data


def test_item_from_data_shape_cache_never_skips_a_content_check() -> None:
    """A remembered shape (keys + value types) says nothing of the values' contents:
    a second map of the same shape with a bad role, a non-str part or a bad metric is
    still refused or validated."""
    good = base_message()
    chat.item_from_data(good)
    for bad in (
        {**good, "role": "tool"},
        {**good, "content": ["a", 1]},
        {**good, "extra": {1: "x"}},
        {**good, "metrics": {"e2e_latency": "fast"}},
    ):
        assert judged(chat.item_from_data, bad) == judged(reference_item, bad), bad


# -- 3. checkpoint change detection vs restore ------------------------------------------


def dump_exact(items: list[llm.ChatItem]) -> list[Any]:
    return [exact(i.model_dump()) for i in items]


async def fill(session: AgentSession[None], n: int) -> list[llm.ChatMessage]:
    msgs = []
    for i in range(n):
        m = llm.ChatMessage(
            id=f"item_fill_{i}",
            role="user" if i % 2 == 0 else "assistant",
            content=[f"message {i}"],
            created_at=1000.0 + i,
            extra={"n": 1, "z": 0.0, "a": 1, "b": 2},
        )
        append(session, m)
        msgs.append(m)
    return msgs


def replace_everywhere(session: AgentSession[None], old: llm.ChatItem, new: llm.ChatItem) -> None:
    h = session.history.items
    h[h.index(old)] = new
    a = session.current_agent._chat_ctx.items
    for i, it in enumerate(a):
        if it is old:
            a[i] = new


async def roundtrip(
    world: World, session: AgentSession[None], rs: Any
) -> tuple[Any, Any, Any, Any]:
    """Checkpoint, restore in a new session: the live and restored (history, agent ctx),
    exactly dumped; the restored lists limited to the live ids (a restore's own start
    adds a handoff of its own)."""
    await rs.checkpoint()
    live = live_items(session)
    h, a = (dump_exact(x) for x in live)
    await world.close_last()
    s2, _ = await world.start(takeover=True)
    back = live_items(s2)
    h2, a2 = (
        dump_exact([it for it in b if it.id in {x.id for x in lv}])
        for b, lv in zip(back, live, strict=True)
    )
    return h, a, h2, a2


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    await w.close_all()


# in the edit window: beyond it, a replacement equal to the object it replaces is not
# a change (docs/livekit-1.8.9.md)
@pytest.mark.parametrize("far", [False], ids=["in-window"])
async def test_replaced_item_with_equal_but_retyped_extra_is_saved(world: World, far: bool) -> None:
    """An item replaced (a new object, same id) whose ``extra`` holds ``True`` where the
    old one held ``1``: pydantic's == says equal, the JSON saved of them differs. The
    restore must give back the live value."""
    session, rs = await world.start()
    msgs = await fill(session, 30)
    await rs.checkpoint()
    target = msgs[2] if far else msgs[-2]
    new = target.model_copy(update={"extra": {**target.extra, "n": True}})
    assert new == target  # pydantic: 1 == True
    replace_everywhere(session, target, new)
    h, a, h2, a2 = await roundtrip(world, session, rs)
    assert h2 == h
    assert a2 == a


@pytest.mark.parametrize("far", [False], ids=["in-window"])
async def test_replaced_item_with_negative_zero_is_saved(world: World, far: bool) -> None:
    """``0.0`` replaced by ``-0.0`` (equal by ==, saved as different floats)."""
    session, rs = await world.start()
    msgs = await fill(session, 30)
    await rs.checkpoint()
    target = msgs[3] if far else msgs[-3]
    new = target.model_copy(update={"extra": {**target.extra, "z": -0.0}})
    replace_everywhere(session, target, new)
    h, a, h2, a2 = await roundtrip(world, session, rs)
    assert h2 == h
    assert a2 == a


async def test_in_window_in_place_negative_zero_edit_is_saved(world: World) -> None:
    """An edit in place of a recent item (documented as seen): ``0.0`` to ``-0.0`` in
    its ``extra``."""
    session, rs = await world.start()
    msgs = await fill(session, 20)
    await rs.checkpoint()
    msgs[-1].extra["z"] = -0.0
    h, a, h2, a2 = await roundtrip(world, session, rs)
    assert h2 == h
    assert a2 == a


# -- 2. codec: agent-reference shortcut vs the decoded map ------------------------------

from livekit_resume.snapshot.codec import Codec  # noqa: E402
from livekit_resume.snapshot.model import AgentFrame, SessionMeta, Snapshot  # noqa: E402

_SIGN = "a:" + __import__("base64").b64encode(b"A" * 32).decode()


def _codec_snapshot() -> Snapshot:
    items = [
        {
            "id": f"item_{i}",
            "type": "message",
            "role": "user",
            "content": [f"hello {i}"],
            "created_at": 1_700_000_000.0 + i,
            "extra": {"n": i},
        }
        for i in range(4)
    ]
    return Snapshot(
        key="room-h",
        epoch=1,
        reason="turn",
        meta=SessionMeta(room="room-h", turn_count=4),
        history=items,
        agent=AgentFrame(agent_id="front", chat_ctx=items[-2:]),
    )


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
@pytest.mark.parametrize("body", [{"ref": 1}, {"ref": 1.0}], ids=["int", "float"])
def test_a_reference_frame_that_is_not_a_reference_is_refused(signed: bool, body: Any) -> None:
    """The writer's reference is exactly ``{"ref": True}`` (its bytes are the shortcut).
    A frame holding ``{"ref": 1}`` is no item (no id) and no reference the writer ever
    wrote; the slow path compares the decoded map with ``==`` (``1 == True``) and
    resolves it to the history twin as if it were one: an item frame that is not what
    it should be must be refused ("every item validated")."""
    codec = Codec(signing_keys=_SIGN) if signed else Codec()
    snap = _codec_snapshot()
    head = codec.encode_head(snap)
    history = [(i["id"], codec.encode_item(snap.key, "history", i)) for i in snap.history]
    assert snap.agent is not None
    agent = [
        (i["id"], codec.encode_item(snap.key, "agent", i, ref=True)) for i in snap.agent.chat_ctx
    ]
    # control: as written, it decodes
    assert codec.decode_parts(snap.key, head, {"history": history, "agent": agent}) == snap
    bad_id = agent[0][0]
    bad = codec.pack(body, context=codec._item_ctx(snap.key, "agent", bad_id))
    agent[0] = (bad_id, bad)
    with pytest.raises(SnapshotCorrupt):
        codec.decode_parts(snap.key, head, {"history": history, "agent": agent})


import datetime  # noqa: E402
import decimal  # noqa: E402
import enum  # noqa: E402


class Level(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Level.ONE, True),
        (decimal.Decimal("1"), True),
        (decimal.Decimal("1"), 1),
    ],
    ids=["intenum-to-bool", "decimal-to-bool", "decimal-to-int"],
)
async def test_in_window_edit_from_an_equal_immutable_value_is_saved(
    world: World, before: Any, after: Any
) -> None:
    """A recent item's ``extra`` value edited in place (documented as seen) from an
    immutable object that == the new value (an IntEnum, a Decimal) but is saved as
    something else (``1``, ``"1"``): the edit check keeps such a value as is and
    compares it with ==, so the edit is missed and the restore has the old value."""
    session, rs = await world.start()
    msgs = await fill(session, 6)
    msgs[-1].extra["v"] = before
    await rs.checkpoint()
    msgs[-1].extra["v"] = after
    h, a, h2, a2 = await roundtrip(world, session, rs)
    assert h2 == h
    assert a2 == a


async def test_instructions_updated_after_a_checkpoint_come_back(world: World) -> None:
    """The agent frame is reused while (id, instructions, task) are unchanged: each
    `update_instructions` between checkpoints (also back to an earlier text) must reach
    the restore, with the agent's context as live."""
    session, rs = await world.start()
    await fill(session, 3)
    await rs.checkpoint()
    agent = session.current_agent
    first = agent.instructions
    for text in ("New text.", "Newer text.", first, "New text."):
        await agent.update_instructions(text)  # type: ignore[arg-type]
        await rs.checkpoint()
    await rs.checkpoint()
    live = agent.instructions
    live_ids = [it.id for it in agent._chat_ctx.items]
    live_ctx = dump_exact(list(agent._chat_ctx.items))
    await world.close_last()
    s2, _ = await world.start(takeover=True)
    assert s2.current_agent.instructions == live
    back = [it for it in s2.current_agent._chat_ctx.items if it.id in set(live_ids)]
    assert dump_exact(back) == live_ctx


def saved_form(value: Any) -> Any:
    """`exact`, with dict order kept: what a save of ``value`` holds, compared exactly."""
    if isinstance(value, dict):
        return ("dict", tuple((saved_form(k), saved_form(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(saved_form(v) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


async def saved_live_and_restored(
    world: World, session: AgentSession[None], rs: Any
) -> tuple[list[Any], list[Any]]:
    """What a save of each live history item holds, then the same of each item a restore
    gives back (after a checkpoint, in a new session), in order."""
    live = [saved_form(chat.item_to_data(it)) for it in live_items(session)[0]]
    await rs.checkpoint()
    await world.close_last()
    s2, _ = await world.start(takeover=True)
    ids = {it.id for it in live_items(session)[0]}
    back = [saved_form(chat.item_to_data(it)) for it in live_items(s2)[0] if it.id in ids]
    return live, back


def _swap_key(d: dict[Any, Any], old: Any, new: Any) -> None:
    value = d.pop(old)
    d[new] = value


def _reorder(d: dict[Any, Any]) -> None:
    first = next(iter(d))
    d[first] = d.pop(first)


_UTC = datetime.UTC
_CET = datetime.timezone(datetime.timedelta(hours=1))
_NOON = datetime.datetime(2026, 1, 1, 12, tzinfo=_UTC)
# (value put in a recent item's extra before the checkpoint, its in-place edit after):
# each edit leaves the value == to what it was, and changes what a save of it holds
_EQUAL_EDITS: dict[str, tuple[Any, Any]] = {
    "decimal-exponent": (decimal.Decimal("1"), lambda e: e.update(v=decimal.Decimal("1.0"))),
    "datetime-zone": (_NOON, lambda e: e.update(v=_NOON.astimezone(_CET))),
    "frozenset-int-to-bool": (frozenset({1}), lambda e: e.update(v=frozenset({True}))),
    "set-member-int-to-bool": ({1}, lambda e: (e["v"].discard(1), e["v"].add(True))),
    "dict-key-int-to-bool": ({1: "x"}, lambda e: _swap_key(e["v"], 1, True)),
    "dict-key-int-to-float": ({1: "x"}, lambda e: _swap_key(e["v"], 1, 1.0)),
    "dict-key-order": ({"a": 1, "b": 2}, lambda e: _reorder(e["v"])),
    "extra-key-order": (None, _reorder),
}


@pytest.mark.parametrize("case", list(_EQUAL_EDITS))
async def test_in_window_edit_to_an_equal_value_saved_otherwise_is_saved(
    world: World, case: str
) -> None:
    """A recent item's ``extra`` edited in place (documented as seen) so that it stays
    == to the copy the edit check took of it, while a save of it holds something else:
    the restore must hold what a save of the live item holds, in order."""
    before, edit = _EQUAL_EDITS[case]
    session, rs = await world.start()
    msgs = await fill(session, 6)
    target = msgs[-1]
    if before is not None:
        target.extra["v"] = before
    await rs.checkpoint()
    edit(target.extra)
    live, back = await saved_live_and_restored(world, session, rs)
    assert back == live


async def test_in_window_edit_of_metrics_order_is_saved(world: World) -> None:
    """The same for a message's ``metrics`` (a dict) reordered in place."""
    session, rs = await world.start()
    msgs = await fill(session, 6)
    msgs[-1].metrics.update({"llm_node_ttft": 0.5, "tts_node_ttfb": 0.25})
    await rs.checkpoint()
    _reorder(cast(dict[str, Any], msgs[-1].metrics))
    live, back = await saved_live_and_restored(world, session, rs)
    assert back == live
