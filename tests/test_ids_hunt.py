"""Hunt (ids): what an application does to the live chat context between checkpoints.

Promise (DESIGN.md "Restore must be exact", docs/snapshots.md, docs/guide.md "Chat items
never refuse, because an item that could not be saved would stop every later
checkpoint"): a checkpoint either stores the live state so that a restore gives it back,
or refuses with a clear typed error naming the item, and never fails forever because of
one odd item (later turns must still be saved); nothing stored is lost or changed by a
refused checkpoint.

Real `AgentSession`s (text mode, no room) with the scripted LLM, `ResumableSession` on
memory, SQLite and a real redis-server (autosave off: every save is an explicit
`checkpoint()`, so a failure is seen where it happens).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.chat import ctx_from_data
from livekit_resume.stores.base import Store
from tests.conftest import STORE_FACTORIES
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, Turn, make_text_session

KEY = "room-hunt-ids"
WAIT = 5.0


class Desk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the desk.")

    @function_tool
    async def lookup(self, ctx: RunContext[Any], what: str) -> str:
        """Look something up."""
        return f"found {what}"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Desk)
    return reg


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = await STORE_FACTORIES[request.param](request, tmp_path)
    yield s
    await s.aclose()


class Live:
    """A started session with its ResumableSession."""

    def __init__(self, session: AgentSession[Any], rs: lr.ResumableSession, agent: Agent):
        self.session, self.rs, self.agent = session, rs, agent

    async def turn(self, text: str) -> None:
        await asyncio.wait_for(asyncio.ensure_future(self.session.run(user_input=text)), WAIT)

    async def checkpoint(self) -> int:
        return await asyncio.wait_for(self.rs.checkpoint(), WAIT)

    @property
    def items(self) -> list[llm.ChatItem]:
        return self.session.history.items

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.rs.aclose(), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.session.aclose(), WAIT)


async def start(store: Store, replies: list[Turn], key: str = KEY) -> Live:
    session = make_text_session(ScriptedLLM(list(replies)))
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return Live(session, rs, agent)


@pytest.fixture
async def live(store: Store) -> AsyncIterator[Live]:
    lv = await start(store, [f"reply {i}" for i in range(10)])
    yield lv
    await lv.close()


async def restored(store: Store, key: str = KEY) -> tuple[list[llm.ChatItem], list[llm.ChatItem]]:
    """(history, agent context items) the store holds now, decoded as a restore decodes
    them (the live session keeps its lease: nothing is taken over)."""
    snap = from_stored(codec_for(store), await asyncio.wait_for(store.load(key), WAIT))
    hist = list(ctx_from_data(snap.history).items)
    ctx = list(ctx_from_data(snap.agent.chat_ctx).items) if snap.agent else []
    return hist, ctx


async def full_restore(
    store: Store, key: str = KEY
) -> tuple[list[llm.ChatItem], list[llm.ChatItem]]:
    """(history, agent chat_ctx items) a new process restores, before start(); only once
    the live session is closed (it takes the lease)."""
    session = make_text_session(ScriptedLLM([]))
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    hist = list(session.history.items)
    ctx = list(agent.chat_ctx.items)
    try:
        await asyncio.wait_for(rs.aclose(), WAIT)
    finally:
        await asyncio.wait_for(session.aclose(), WAIT)
    return hist, ctx


def _norm(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, llm.ImageContent):
        return ("image", v.id, v.image if isinstance(v.image, str) else "frame")
    return v


def fields(item: llm.ChatItem) -> dict[str, Any]:
    d = {k: item.__dict__[k] for k in type(item).model_fields if k != "hash"}
    normed: dict[str, Any] = _norm(d)
    return normed


def assert_same(live: list[llm.ChatItem], got: list[llm.ChatItem]) -> None:
    """``got`` begins with ``live``, field for field (ids, created_at, content...)."""
    assert [i.id for i in got[: len(live)]] == [i.id for i in live], (
        [i.id for i in got],
        [i.id for i in live],
    )
    for a, b in zip(live, got, strict=False):
        assert fields(b) == fields(a), (a.id, fields(a), fields(b))


async def last_texts(store: Store) -> list[str]:
    hist, _ = await restored(store)
    return [i.text_content or "" for i in hist if isinstance(i, llm.ChatMessage)]


# ------------------------------------------------------------------ the known defect


async def test_int_id_does_not_stop_later_checkpoints(store: Store, live: Live) -> None:
    """guide.md: "Chat items never refuse, because an item that could not be saved would
    stop every later checkpoint". An app sets a message's id to an int (pydantic does not
    validate assignment): the next checkpoint must save (id as text) or refuse with a
    typed error naming the item, and a later turn must still be saved."""
    await live.turn("hello")
    await live.checkpoint()
    msg = next(i for i in live.items if isinstance(i, llm.ChatMessage) and i.role == "user")
    msg.id = 12345  # type: ignore[assignment]
    try:
        await live.checkpoint()
    except lr.ResumeError as e:
        assert "12345" in str(e)
    await live.turn("second turn")
    await live.checkpoint()  # must not fail forever
    texts = await last_texts(store)
    assert "second turn" in texts and "hello" in texts


# ------------------------------------------------------------------ scenario helpers


async def saved_then(live: Live, store: Store, label: str) -> list[llm.ChatItem]:
    """Checkpoint the live state; on success the restore must give it back exactly (the
    history, and the agent's context); on refusal the error must be typed. Returns the
    live history as checkpointed."""
    snapshot = list(live.items)
    agent_items = list(live.agent.chat_ctx.items)
    try:
        await live.checkpoint()
    except lr.ResumeError:
        return snapshot
    hist, ctx = await restored(store)
    assert_same(snapshot, hist)
    assert_same(agent_items, ctx)
    return snapshot


async def later_turn_saved(live: Live, store: Store, text: str = "later turn") -> None:
    """The promise that matters most: after whatever the app did, a later turn is saved."""
    await live.turn(text)
    await live.checkpoint()
    hist, _ = await restored(store)
    texts = [i.text_content for i in hist if isinstance(i, llm.ChatMessage)]
    assert text in texts, texts


async def later_item_saved(live: Live, store: Store) -> None:
    """As `later_turn_saved`, for a history LiveKit's own reply path may not take (it
    sorts by created_at): the later item is added as an app would add it."""
    later = llm.ChatMessage(role="user", content=["later item"])
    live.items.append(later)
    await live.checkpoint()
    hist, _ = await restored(store)
    assert later.id in [i.id for i in hist]


async def saved_as(live: Live, store: Store, ids: list[str]) -> None:
    """The store holds the live history item for item, under ``ids``: a later item with
    an earlier one's id is saved as ``<id>~2`` (the store keys items by id), the rest
    under their own."""
    hist, _ = await restored(store)
    assert [i.id for i in hist] == ids
    for a, b in zip(live.items, hist, strict=True):
        assert {**fields(b), "id": a.id} == fields(a), a.id


def user_msgs(live: Live) -> list[llm.ChatMessage]:
    return [i for i in live.items if isinstance(i, llm.ChatMessage) and i.role == "user"]


# ------------------------------------------------------------------ duplicate / reused ids


async def test_same_item_object_appended_twice(store: Store, live: Live) -> None:
    """An app appends an existing item again (`history.items.append(existing)`): two
    items with one id. The checkpoint saves the second as ``<id>~2``, and a later turn is
    saved (an error here would fail every later checkpoint)."""
    await live.turn("hello")
    await live.checkpoint()
    first = user_msgs(live)[0]
    live.items.append(first)
    await live.checkpoint()
    await saved_as(live, store, [i.id for i in live.items[:-1]] + [f"{first.id}~2"])
    await later_turn_saved(live, store)


async def test_copied_item_appended(store: Store, live: Live) -> None:
    """An app copies an item (`model_copy`) and appends it: same id, another object.
    Saved as ``<id>~2``; later turns still saved."""
    await live.turn("hello")
    await live.checkpoint()
    first = user_msgs(live)[0]
    live.items.append(first.model_copy(update={"content": ["edited copy"]}))
    await live.checkpoint()
    await saved_as(live, store, [i.id for i in live.items[:-1]] + [f"{first.id}~2"])
    await later_turn_saved(live, store)


async def test_chat_ctx_copy_merged_back(store: Store, live: Live) -> None:
    """`ChatContext.copy()` results merged back into the history (`items.extend`):
    every item of the copy has an id the history already holds."""
    await live.turn("hello")
    await live.checkpoint()
    live.items.extend(live.session.history.copy().items[-2:])
    try:
        await live.checkpoint()
    except lr.ResumeError as e:
        assert any(i.id in str(e) for i in live.items)
    await later_turn_saved(live, store)


async def test_id_reused_after_delete(store: Store, live: Live) -> None:
    """An item is deleted, then a new item takes its id: a legal live state (ids
    unique). The checkpoint must save it and a restore give back exactly the live
    history."""
    await live.turn("hello")
    await live.turn("again")
    await live.checkpoint()
    gone = user_msgs(live)[0]
    live.items.remove(gone)
    await live.checkpoint()
    live.items.append(llm.ChatMessage(role="user", content=["reborn"], id=gone.id))
    await saved_then(live, store, "reused")
    await live.checkpoint()
    hist, _ = await restored(store)
    assert_same(live.items, hist)
    await later_turn_saved(live, store)


async def test_id_reused_after_delete_same_checkpoint(store: Store, live: Live) -> None:
    """Delete an item and add a new one with its id between two checkpoints: the live
    state has unique ids; restore must give it back exactly."""
    await live.turn("hello")
    await live.turn("again")
    await live.checkpoint()
    gone = user_msgs(live)[0]
    live.items.remove(gone)
    live.items.append(llm.ChatMessage(role="user", content=["reborn"], id=gone.id))
    await live.checkpoint()
    hist, _ = await restored(store)
    assert_same(live.items, hist)
    await later_turn_saved(live, store)


async def test_id_changed_to_another_items_id(store: Store, live: Live) -> None:
    """An app changes an item's id to the id of another existing item (two items, one
    id). The later one saved as ``<id>~2``; later turns still saved."""
    await live.turn("hello")
    await live.turn("again")
    await live.checkpoint()
    a, b = user_msgs(live)[:2]
    b.id = a.id
    await live.checkpoint()
    await saved_as(live, store, [f"{i.id}~2" if i is b else i.id for i in live.items])
    await later_turn_saved(live, store)


async def test_id_renamed_to_fresh_id_recent(store: Store, live: Live) -> None:
    """An app renames a recent item (in the edit window) to a new unique id: the live
    state is legal; livekit-1.8.9.md says the check "sees an item whose id an app
    changed in place"; restore must give it back exactly."""
    await live.turn("hello")
    await live.turn("again")
    await live.checkpoint()
    user_msgs(live)[0].id = "renamed_item"
    await live.checkpoint()
    hist, _ = await restored(store)
    assert_same(live.items, hist)
    await later_turn_saved(live, store)


async def test_far_back_rename_then_old_id_reused(store: Store, live: Live) -> None:
    """Documented: an in-place edit beyond the last 12 items is not re-saved (the store
    keeps the old id). But the live ids are unique: an item renamed far back and a new
    item that takes its old id must not stop every later checkpoint (guide.md: nothing
    may stop every later checkpoint)."""
    for n in range(8):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    old = user_msgs(live)[0]
    old_id = old.id
    old.id = "renamed_item"
    await live.checkpoint()
    live.items.append(llm.ChatMessage(role="user", content=["takes the old id"], id=old_id))
    await live.checkpoint()
    await saved_as(live, store, [i.id for i in live.items])
    await later_turn_saved(live, store)


async def test_swap_ids_of_two_items(store: Store, live: Live) -> None:
    """Two items exchange ids (unique still): restore must be exact."""
    await live.turn("hello")
    await live.turn("again")
    await live.checkpoint()
    a, b = user_msgs(live)[:2]
    a.id, b.id = b.id, a.id
    await live.checkpoint()
    hist, _ = await restored(store)
    assert_same(live.items, hist)
    await later_turn_saved(live, store)


# ------------------------------------------------------------------ contexts rewritten


async def _exact_after(live: Live, store: Store) -> None:
    await live.checkpoint()
    hist, ctx = await restored(store)
    assert_same(live.items, hist)
    assert len(hist) == len(live.items)
    agent_items = live.agent.chat_ctx.items
    assert_same(agent_items, ctx)
    assert len(ctx) == len(agent_items)
    await later_turn_saved(live, store)


async def test_update_chat_ctx_truncated(store: Store, live: Live) -> None:
    """`agent.update_chat_ctx(ctx.truncate(max_items=2))`: the agent's context shrinks;
    the checkpoint stores it and the stored agent context is exactly the live one."""
    for n in range(4):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    ctx = live.agent.chat_ctx.copy()
    ctx.truncate(max_items=2)
    await live.agent.update_chat_ctx(ctx)
    await _exact_after(live, store)


async def test_update_chat_ctx_reordered(store: Store, live: Live) -> None:
    """The agent's context replaced by its items in reverse order: stored as live."""
    for n in range(3):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    ctx = live.agent.chat_ctx.copy()
    ctx.items.reverse()
    await live.agent.update_chat_ctx(ctx)
    await _exact_after(live, store)


async def test_update_chat_ctx_from_scratch(store: Store, live: Live) -> None:
    """The agent's context replaced by a ChatContext built from scratch."""
    await live.turn("hello")
    await live.checkpoint()
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content="brand new")
    ctx.add_message(role="user", content="summary of before")
    await live.agent.update_chat_ctx(ctx)
    await _exact_after(live, store)


async def test_history_items_reassigned(store: Store, live: Live) -> None:
    """`session.history.items = list(reversed(...))`: another list object, reordered."""
    for n in range(3):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    live.session.history.items = list(reversed(live.items))
    await _exact_after(live, store)


async def test_history_items_cleared(store: Store, live: Live) -> None:
    """`session.history.items.clear()`, then a turn: the store holds only what is live."""
    for n in range(2):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    live.items.clear()
    await _exact_after(live, store)


async def test_history_item_inserted_in_middle(store: Store, live: Live) -> None:
    """An item inserted in the middle of the history (ids unique)."""
    for n in range(3):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    live.items.insert(2, llm.ChatMessage(role="user", content=["inserted"]))
    await _exact_after(live, store)


async def test_history_truncate_in_place(store: Store, live: Live) -> None:
    """`session.history.truncate(max_items=3)` in place."""
    for n in range(4):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    live.session.history.truncate(max_items=3)
    await _exact_after(live, store)


async def test_history_replaced_by_equal_copies(store: Store, live: Live) -> None:
    """Every item replaced by a deep copy (same ids, other objects): nothing changed
    in value; stored as live."""
    for n in range(3):
        await live.turn(f"turn {n}")
    await live.checkpoint()
    live.session.history.items = [
        i.model_copy(deep=isinstance(i, llm.ChatMessage)) for i in live.items
    ]
    await _exact_after(live, store)


# ------------------------------------------------------------------ odd but valid content


def _msg(**kw: Any) -> llm.ChatMessage:
    kw.setdefault("role", "user")
    kw.setdefault("content", ["odd"])
    return llm.ChatMessage(**kw)


EXACT_ITEMS: dict[str, Any] = {
    "empty_content": lambda: _msg(content=[]),
    "image_url": lambda: _msg(
        content=["look", llm.ImageContent(image="https://example.com/a.png", inference_width=64)]
    ),
    "long_text": lambda: _msg(content=["x" * 300_000]),
    "nul_chars": lambda: _msg(content=["a\x00b\x00"], extra={"k\x00": "v\x00"}),
    "nan_inf_extra": lambda: _msg(extra={"nan": math.nan, "inf": math.inf, "ninf": -math.inf}),
    "nested_extra": lambda: _msg(extra={"a": {"b": {"c": [1, 2.5, None, {"d": True}]}}}),
    "created_at_zero": lambda: _msg(created_at=0.0),
    "created_at_negative": lambda: _msg(created_at=-12345.5),
    "created_at_far_future": lambda: _msg(created_at=1e12),
    "args_nan_json": lambda: llm.FunctionCall(
        call_id="c_nan", name="f", arguments='{"x": NaN, "y": Infinity}'
    ),
    "orphan_output": lambda: llm.FunctionCallOutput(
        call_id="matches_nothing", name="f", output="ok", is_error=False
    ),
}


@pytest.mark.parametrize("kind", sorted(EXACT_ITEMS))
async def test_odd_item_saved_exactly(store: Store, live: Live, kind: str) -> None:
    """Items with odd but valid content (snapshots.md: every item "with its id, exact
    created_at, metrics and extra" comes back): saved and restored field for field, and
    later turns still saved."""
    await live.turn("hello")
    await live.checkpoint()
    live.items.append(EXACT_ITEMS[kind]())
    await _exact_after(live, store)


async def test_created_at_odd_values_full_restore(store: Store) -> None:
    """Items whose created_at is 0, negative, far future: a real restore (which places
    items by created_at) gives the history back in its live order, each item once
    (DESIGN: the restored history begins with the saved items, each exactly once)."""
    live = await start(store, ["r1", "r2"])
    try:
        await live.turn("hello")
        live.items.append(_msg(content=["zero"], created_at=0.0))
        live.items.append(_msg(content=["neg"], created_at=-5.0))
        live.items.append(_msg(content=["future"], created_at=1e12))
        await live.turn("after")
        await live.checkpoint()
        snapshot = list(live.items)
    finally:
        await live.close()
    hist, _ = await full_restore(store)
    assert_same(snapshot, hist)


async def test_created_at_nan_does_not_stop_checkpoints(store: Store, live: Live) -> None:
    """created_at set to NaN (a float: no validation refuses it): the checkpoint saves
    it (or a typed refusal naming it) and later turns are saved; the decoded history
    keeps every item once."""
    await live.turn("hello")
    await live.checkpoint()
    live.items.append(_msg(content=["nan time"], created_at=math.nan))
    with contextlib.suppress(lr.ResumeError):
        await live.checkpoint()
    await later_turn_saved(live, store)
    hist, _ = await restored(store)
    assert [i.id for i in hist] == [i.id for i in live.items]


async def test_created_at_nan_full_restore(store: Store) -> None:
    """A real restore of a history holding a NaN created_at: each saved item exactly
    once, in the saved order (DESIGN "Restore must be exact")."""
    live = await start(store, ["r1", "r2"])
    try:
        await live.turn("hello")
        live.items.append(_msg(content=["nan time"], created_at=math.nan))
        await live.turn("after")
        await live.checkpoint()
        snapshot = [i.id for i in live.items]
    finally:
        await live.close()
    hist, _ = await full_restore(store)
    assert [i.id for i in hist[: len(snapshot)]] == snapshot


CONVERTED_ITEMS: dict[str, tuple[Any, Any]] = {
    # (make item, check of the stored item) — the guide's documented conversions
    "lone_surrogate_text": (
        lambda: _msg(content=["a\ud800b"]),
        lambda it: it.content == ["a\ufffdb"],
    ),
    "lone_surrogate_extra": (
        lambda: _msg(extra={"k": "\udfff"}),
        lambda it: it.extra == {"k": "\ufffd"},
    ),
    "interrupted_int": (
        lambda: _with(_msg(), interrupted=1),
        lambda it: it.interrupted is True,
    ),
    "interrupted_str": (
        lambda: _with(_msg(), interrupted="yes"),
        lambda it: type(it.interrupted) is bool,
    ),
    "extra_int_keys": (
        lambda: _with(_msg(), extra={1: "a", "b": {2: "c"}}),
        lambda it: it.extra.get("1") == "a",
    ),
    "extra_tuple_key": (
        lambda: _with(_msg(), extra={(1, 2): "a"}),
        lambda it: len(it.extra) == 1,
    ),
    "created_at_str": (
        lambda: _with(_msg(), created_at="yesterday"),
        lambda it: type(it.created_at) is float,
    ),
    "created_at_none": (
        lambda: _with(_msg(), created_at=None),
        lambda it: type(it.created_at) is float,
    ),
    "content_none": (
        lambda: _with(_msg(), content=None),
        lambda it: isinstance(it.content, list),
    ),
    "content_int_part": (
        lambda: _with(_msg(), content=[42]),
        lambda it: it.content == ["42"],
    ),
    "args_not_str": (
        lambda: _with(llm.FunctionCall(call_id="c1", name="f", arguments="{}"), arguments={"x": 1}),
        lambda it: isinstance(it.arguments, str),
    ),
}


def _with(item: Any, **fields: Any) -> Any:
    for k, v in fields.items():
        setattr(item, k, v)  # pydantic does not validate assignment
    return item


@pytest.mark.parametrize("kind", sorted(CONVERTED_ITEMS))
async def test_odd_assignment_converted_not_fatal(store: Store, live: Live, kind: str) -> None:
    """guide.md: a lone surrogate becomes U+FFFD, a non-str key of extra its text, a
    value of a type LiveKit does not hold there is converted (lax mode) or its default,
    "each with a warning"; the checkpoint never fails on it and later turns are saved."""
    make, check = CONVERTED_ITEMS[kind]
    await live.turn("hello")
    await live.checkpoint()
    item = make()
    live.items.append(item)
    await live.checkpoint()
    hist, _ = await restored(store)
    got = next(i for i in hist if i.id == item.id)
    assert check(got), fields(got)
    await later_item_saved(live, store)


# ------------------------------------------------------------------ tool call pairs


async def _tool_session(store: Store) -> Live:
    return await start(
        store, [[ToolCall("lookup", {"what": "a"}, call_id="call_a")], "done", "r2", "r3"]
    )


async def test_two_outputs_for_one_call(store: Store) -> None:
    """An app adds a second output for a call already answered: the checkpoint stores
    both, a restore gives the history back exactly (each item once; DESIGN: the only
    new items are the ones a start adds) and later turns are saved."""
    live = await _tool_session(store)
    try:
        await live.turn("look up a")
        await live.checkpoint()
        live.items.append(
            llm.FunctionCallOutput(call_id="call_a", name="lookup", output="again", is_error=False)
        )
        await live.checkpoint()
        await live.turn("next")
        await live.checkpoint()
        snapshot = list(live.items)
    finally:
        await live.close()
    hist, _ = await full_restore(store)
    assert_same(snapshot, hist)


async def test_orphan_output_and_unanswered_call_restore(store: Store) -> None:
    """An output whose call_id matches nothing, and a call with no output: the history
    comes back with its saved items each once, in order; the unanswered call is answered
    with an explicit interrupted output (DESIGN)."""
    live = await _tool_session(store)
    try:
        await live.turn("look up a")
        live.items.append(
            llm.FunctionCallOutput(call_id="nobody", name="lookup", output="x", is_error=False)
        )
        live.items.append(llm.FunctionCall(call_id="call_open", name="lookup", arguments="{}"))
        await live.checkpoint()
        snapshot = list(live.items)
    finally:
        await live.close()
    hist, _ = await full_restore(store)
    saved = [i for i in hist if i.id in {s.id for s in snapshot}]
    assert_same(snapshot, saved)
    outs = [i for i in hist if isinstance(i, llm.FunctionCallOutput) and i.call_id == "call_open"]
    assert len(outs) == 1 and "interrupt" in outs[0].output.lower()


async def test_two_calls_same_call_id_restore(store: Store) -> None:
    """Two function calls sharing a call_id, one answered: saved and restored, each
    saved item once."""
    live = await _tool_session(store)
    try:
        await live.turn("look up a")
        live.items.append(
            llm.FunctionCall(call_id="call_a", name="lookup", arguments='{"what": "b"}')
        )
        await live.checkpoint()
        snapshot = list(live.items)
    finally:
        await live.close()
    hist, _ = await full_restore(store)
    saved = [i for i in hist if i.id in {s.id for s in snapshot}]
    assert_same(snapshot, saved)


# ------------------------------------------------------------------ odd ids


ODD_IDS: dict[str, Any] = {
    "int": 7,
    "none": None,
    "empty": "",
    "non_ascii": "item_ünïcødé_é",
    "lone_surrogate": "item_\ud800",
    "nul": "item\x00x",
    "long": "i" * 5000,
    "str_subclass": type("MyStr", (str,), {})("item_sub"),
}


@pytest.mark.parametrize("kind", sorted(ODD_IDS))
async def test_odd_id_on_new_item(store: Store, live: Live, kind: str) -> None:
    """A new item whose id an app set to an odd value: the checkpoint stores it (a
    restore gives back an item in its place) or refuses with a typed error naming it;
    either way a later item is saved (guide.md: chat items never refuse; nothing may
    stop every later checkpoint)."""
    await live.turn("hello")
    await live.checkpoint()
    item = _msg(content=["odd id"])
    item.id = ODD_IDS[kind]
    live.items.append(item)
    try:
        await live.checkpoint()
    except lr.ResumeError:
        pass
    else:
        hist, _ = await restored(store)
        assert "odd id" in [i.text_content for i in hist if isinstance(i, llm.ChatMessage)]
    await later_item_saved(live, store)


async def test_an_item_appended_twice_is_saved_again_and_nothing_before_it_changes(
    store: Store, live: Live
) -> None:
    """An item appended a second time is saved a second time, under ``<id>~2`` (the store
    keys items by id), and every item saved before it stays as it was: the checkpoint
    that meets it neither fails nor rewrites what the store holds."""
    await live.turn("hello")
    await live.checkpoint()
    before = [fields(i) for i in (await restored(store))[0]]
    twice = live.items[-1]
    live.items.append(twice)
    await live.checkpoint()
    hist = (await restored(store))[0]
    assert [fields(i) for i in hist[:-1]] == before
    assert hist[-1].id == f"{twice.id}~2"
    assert {**fields(hist[-1]), "id": twice.id} == fields(twice)
