"""Review hunt of 3660cb6 (chat item ids): `saved_id`, `unique_ids`, the tracker's
fallback read (`StreamTracker.diff` -> `_diff` with every id compared).

Promises (docs/guide.md, the paragraph on ids): an item's odd id is saved as text; "a
second item under an id an earlier one has ... is saved, and restored, as `<id>~2` (the
least free `~n`), with a warning; once the first is gone, the copy is saved under its own
id again. Each of these stopped every later checkpoint with a `ValueError` before".
guide.md: chat items never refuse, "an item that could not be saved would stop every
later checkpoint". DESIGN.md "Restore must be exact". A checkpoint with nothing new
writes nothing (`rs.version` unchanged).

Real `AgentSession`s (text mode) with the scripted LLM; memory, SQLite and a real
redis-server (the `store` fixture of tests/test_ids_hunt.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import llm

import livekit_resume as lr
from livekit_resume.agent_hooks.tracker import unique_ids
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_ids_hunt import (  # noqa: F401  (fixtures: store, live)
    KEY,
    WAIT,
    Desk,
    Live,
    fields,
    full_restore,
    live,
    registry,
    restored,
    start,
    store,
)

__all__ = ["live", "store"]


def umsgs(lv: Live) -> list[llm.ChatMessage]:
    return [i for i in lv.items if isinstance(i, llm.ChatMessage) and i.role == "user"]


async def turns(lv: Live, n: int, prefix: str = "turn") -> None:
    for k in range(n):
        await lv.turn(f"{prefix} {k}")


async def quiet_checkpoint(lv: Live) -> None:
    """A checkpoint with nothing new since the last must write nothing."""
    v = lv.rs.version
    await lv.checkpoint()
    assert lv.rs.version == v, (v, lv.rs.version)


async def stored_ids(store: Store) -> tuple[list[str], list[str]]:
    hist, ctx = await restored(store)
    return [i.id for i in hist], [i.id for i in ctx]


def same_but_id(live_items: list[llm.ChatItem], got: list[llm.ChatItem]) -> None:
    assert len(got) == len(live_items), ([i.id for i in got], [i.id for i in live_items])
    for a, b in zip(live_items, got, strict=True):
        assert {**fields(b), "id": a.id} == fields(a), (a.id, b.id)


# ------------------------------------------------------------------ far-back rename hole


async def test_far_back_rename_then_rewrite_from_middle_then_old_id_reused(
    store: Store, live: Live
) -> None:
    """guide.md: an id changed to another's / a new item taking an id renamed away far
    back no longer stops every later checkpoint. Here an item far back (beyond the edit
    window) is renamed, then a checkpoint rewrites the stream from a recent point (the last
    item removed), then a new item takes the far-back item's old id: the live ids are
    unique, and every later checkpoint must still save."""
    await turns(live, 8)
    await live.checkpoint()
    old = live.items[0]
    old_id = old.id
    old.id = "renamed_far_back"
    live.items.pop()  # the last reply removed: the stream diverges near its end
    await live.checkpoint()
    live.items.append(llm.ChatMessage(role="user", content=["takes the old id"], id=old_id))
    await live.checkpoint()
    await live.turn("later turn")
    await live.checkpoint()
    hist, _ = await restored(store)
    texts = [i.text_content for i in hist if isinstance(i, llm.ChatMessage)]
    assert "later turn" in texts and "takes the old id" in texts, texts


# ------------------------------------------------------------------ helpers (sessions)


async def begin(store: Store, n_replies: int = 20, **kw: Any) -> Live:
    session = make_text_session(ScriptedLLM([f"reply {i}" for i in range(n_replies)]))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, **kw)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return Live(session, rs, agent)


async def reopen(store: Store, lv: Live, **kw: Any) -> Live:
    """Close ``lv`` and restore the key in a 'new process' (a new AgentSession)."""
    await lv.close()
    return await begin(store, **kw)


async def restored_is_live(store: Store, lv: Live) -> None:
    """The store holds the live history and agent context item for item: ids as
    `unique_ids` names them, every other field as live."""
    hist, ctx = await restored(store)
    assert [i.id for i in hist] == unique_ids(lv.items)
    same_but_id(lv.items, hist)
    agent_items = list(lv.agent.chat_ctx.items)
    assert [i.id for i in ctx] == unique_ids(agent_items)
    same_but_id(agent_items, ctx)


# ------------------------------------------------------------------ duplicates, then restore


@pytest.mark.parametrize("how", ["same_object", "copy_edited"])
async def test_duplicate_in_history_quiet_checkpoints_then_restore_and_go_on(
    store: Store, how: str
) -> None:
    """guide.md: a second item under one id is saved, and restored, as `<id>~2`. With the
    duplicate in the edit window (the fallback read each time), a checkpoint with nothing
    new writes nothing; a new process restores it (ids `<id>`, `<id>~2`), more turns are
    saved, and its quiet checkpoints write nothing either; nothing grows."""
    lv = await begin(store)
    try:
        await turns(lv, 2)
        await lv.checkpoint()
        first = umsgs(lv)[0]
        dup = first if how == "same_object" else first.model_copy(update={"content": ["copy"]})
        lv.items.append(dup)
        await lv.checkpoint()
        await restored_is_live(store, lv)
        for _ in range(3):
            await quiet_checkpoint(lv)
        await lv.turn("after dup")
        await lv.checkpoint()
        await quiet_checkpoint(lv)
        await restored_is_live(store, lv)
        n_live = len(lv.items)
        snapshot = [fields(i) for i in (await restored(store))[0]]
    finally:
        await lv.close()
    lv2 = await begin(store)
    try:
        got = [fields(i) for i in lv2.items]
        assert got[: len(snapshot)] == snapshot  # a start may add its own items after
        assert [i.id for i in lv2.items].count(f"{first.id}~2") == 1
        await lv2.checkpoint()  # what the start added
        await quiet_checkpoint(lv2)
        await lv2.turn("in the new process")
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
        await restored_is_live(store, lv2)
        hist, _ = await restored(store)
        assert len(hist) == len(lv2.items) and len(hist) <= n_live + 4
    finally:
        await lv2.close()


async def test_first_occurrence_removed_copy_takes_its_own_id_back(
    store: Store, live: Live
) -> None:
    """guide.md: "once the first is gone, the copy is saved under its own id again". The
    `<id>~2` record is removed (no growth); restore exact; quiet checkpoints after."""
    await turns(live, 2)
    await live.checkpoint()
    first = umsgs(live)[0]
    copy = first.model_copy(update={"content": ["the copy"]})
    live.items.append(copy)
    await live.checkpoint()
    live.items.remove(first)
    await live.checkpoint()
    hist, _ = await restored(store)
    assert [i.id for i in hist] == [i.id for i in live.items]
    assert f"{first.id}~2" not in [i.id for i in hist]
    same_but_id(live.items, hist)
    await quiet_checkpoint(live)
    await live.turn("later")
    await live.checkpoint()
    await restored_is_live(store, live)


async def test_three_copies_and_app_id_taking_the_tilde_name(store: Store, live: Live) -> None:
    """unique_ids: the least free `~n`. [a, a, a] saved as a, a~2, a~3; then an app item
    with the id `a~2` (another item) appended: every item still saved under a distinct
    id, restore item for item, and quiet checkpoints write nothing."""
    await turns(live, 1)
    await live.checkpoint()
    first = umsgs(live)[0]
    live.items.append(first)
    live.items.append(first.model_copy(update={"content": ["third"]}))
    await live.checkpoint()
    hist, _ = await restored(store)
    ids = [i.id for i in hist]
    assert ids.count(first.id) == 1 and f"{first.id}~2" in ids and f"{first.id}~3" in ids
    other = llm.ChatMessage(role="user", content=["app item named ~2"], id=f"{first.id}~2")
    live.items.append(other)
    await live.checkpoint()
    await restored_is_live(store, live)
    hist, _ = await restored(store)
    got = next(i for i in hist if i.id == f"{first.id}~2")
    assert isinstance(got, llm.ChatMessage) and got.text_content == "app item named ~2"
    await quiet_checkpoint(live)
    await live.turn("later")
    await live.checkpoint()
    await restored_is_live(store, live)
    await quiet_checkpoint(live)


@pytest.mark.parametrize(
    "a,b", [(5, "5"), ("x\ud800", "x\ufffd"), (None, "null")], ids=["int", "surrogate", "none"]
)
async def test_raw_ids_that_save_alike(store: Store, live: Live, a: Any, b: Any) -> None:
    """guide.md: an id saved as text (5 as "5", a lone surrogate as U+FFFD, None as
    "null"): two items whose ids differ but save alike are a second item under one id,
    saved as `<id>~2`; a new process restores both; quiet checkpoints write nothing."""
    await turns(live, 1)
    await live.checkpoint()
    m1 = llm.ChatMessage(role="user", content=["first odd"])
    m2 = llm.ChatMessage(role="user", content=["second odd"])
    m1.id, m2.id = a, b
    live.items.extend([m1, m2])
    await live.checkpoint()
    hist, _ = await restored(store)
    assert [i.id for i in hist][-2:] == [item_to_data(m1)["id"], item_to_data(m1)["id"] + "~2"]
    assert [getattr(i, "text_content", None) for i in hist][-2:] == ["first odd", "second odd"]
    await quiet_checkpoint(live)
    await live.turn("later")
    await live.checkpoint()
    await quiet_checkpoint(live)
    n = len(live.items)
    live2 = await reopen(store, live)
    try:
        assert len(live2.items) >= n
        await live2.checkpoint()  # what the start added
        await quiet_checkpoint(live2)
        await live2.turn("new process")
        await live2.checkpoint()
        await quiet_checkpoint(live2)
        await restored_is_live(store, live2)
    finally:
        await live2.close()


# ------------------------------------------------------------------ the agent's stream


async def test_duplicate_in_agent_ctx_only(store: Store, live: Live) -> None:
    """The agent's context (which shares item objects with the history) holds an item
    twice, the history once: the agent stream saves `<id>~2`, the history its own;
    restore exact; quiet checkpoints write nothing; a new process goes on."""
    await turns(live, 2)
    await live.checkpoint()
    ctx = live.agent.chat_ctx.copy()
    ctx.items.append(ctx.items[-2])
    await live.agent.update_chat_ctx(ctx)
    agent_ids = [i.id for i in live.agent.chat_ctx.items]
    assert len(set(agent_ids)) < len(agent_ids), agent_ids  # the duplicate is live
    await live.checkpoint()
    await restored_is_live(store, live)
    await quiet_checkpoint(live)
    await live.turn("later")
    await live.checkpoint()
    await quiet_checkpoint(live)
    await restored_is_live(store, live)
    lv2 = await reopen(store, live)
    try:
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
        await lv2.turn("new process")
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
        await restored_is_live(store, lv2)
    finally:
        await lv2.close()


async def test_duplicate_in_both_streams_at_other_positions(store: Store, live: Live) -> None:
    """One item twice in the history (appended at the end) and twice in the agent's
    context (put first too): each stream names its second one `<id>~2`; the agent item
    may be stored as a reference to its history twin; restore exact; then the history's
    first occurrence is removed (its `<id>` record now holds the other): the agent's
    items must still restore as they are live."""
    await turns(live, 3)
    await live.checkpoint()
    target = umsgs(live)[1]
    live.items.append(target.model_copy(update={"content": ["edited copy"]}))
    ctx = live.agent.chat_ctx.copy()
    ctx.items.insert(0, target)
    await live.agent.update_chat_ctx(ctx)
    await live.checkpoint()
    await restored_is_live(store, live)
    await quiet_checkpoint(live)
    live.items.remove(target)  # the history's first occurrence gone: the copy is "<id>"
    await live.checkpoint()
    await restored_is_live(store, live)
    await quiet_checkpoint(live)
    await live.turn("later")
    await live.checkpoint()
    await restored_is_live(store, live)
    lv2 = await reopen(store, live)
    try:
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
        await restored_is_live(store, lv2)
    finally:
        await lv2.close()


async def test_history_first_removed_while_agent_refs_it(store: Store, live: Live) -> None:
    """History [.., A, .., A'] (A' a copy, saved `<id>~2`), agent context holds A once
    (stored as a reference to the history's `<id>`). A is removed from the history: the
    history's `<id>` record now holds A'. The agent's item must restore as A, not as
    A' (a reference must not read the new edition: bridge.py `dangling_refs`/`_edited`)."""
    await turns(live, 2)
    await live.checkpoint()
    a = umsgs(live)[0]
    live.items.append(a.model_copy(update={"content": ["the copy"]}))
    await live.checkpoint()
    live.items.remove(a)
    await live.checkpoint()
    hist, ctx = await restored(store)
    back = next(i for i in ctx if i.id == a.id)
    assert fields(back) == fields(a)
    copy = next(i for i in hist if i.id == a.id)
    assert isinstance(copy, llm.ChatMessage) and copy.text_content == "the copy"
    await restored_is_live(store, live)
    await quiet_checkpoint(live)


# ------------------------------------------------------------------ whole rewrites, rewrite sets


async def test_store_lost_session_full_rewrite_with_duplicate(
    store: Store, live: Live, request: pytest.FixtureRequest
) -> None:
    """A store that lost the session (deleted, no tombstone): the next checkpoint
    acquires it again and writes every stream whole (`StreamTracker.full`, which uses
    `unique_ids`): the duplicate is saved as `<id>~2`, restore exact, quiet after."""
    if "redis" in request.node.name:
        pytest.skip("lose() emulates a data loss on memory/SQLite only")
    from tests.test_session_faults import lose

    await turns(live, 2)
    first = umsgs(live)[0]
    live.items.append(first)
    await live.checkpoint()
    await lose(store, KEY)
    await live.turn("after the loss")
    with contextlib.suppress(lr.ResumeError):
        await live.checkpoint()  # the one that finds the loss may refuse; the next saves
    await live.checkpoint()
    await restored_is_live(store, live)
    await quiet_checkpoint(live)


async def test_oversized_tool_output_appended_twice(store: Store) -> None:
    """A tool output over the codec's max frame is saved smaller (its output replaced by
    a note); appended twice, both copies are saved (`<id>~2`), each as a stand-in; later
    checkpoints with nothing new write nothing; a new process restores both."""
    from livekit_resume.bridge import codec_for

    codec = codec_for(store, max_frame=64 * 1024)
    lv = await begin(store, codec=codec)
    try:
        await lv.turn("hello")
        await lv.checkpoint()
        call = llm.FunctionCall(call_id="c1", name="lookup", arguments="{}")
        out = llm.FunctionCallOutput(
            call_id="c1", name="lookup", output="y" * (128 * 1024), is_error=False
        )
        lv.items.extend([call, out, out])
        await lv.checkpoint()
        hist, _ = await restored(store)
        assert [i.id for i in hist][-2:] == [out.id, f"{out.id}~2"]
        assert all(len(i.output) < 64 * 1024 for i in hist[-2:])  # type: ignore[union-attr]
        for _ in range(2):
            await quiet_checkpoint(lv)
        await lv.turn("later")
        await lv.checkpoint()
        await quiet_checkpoint(lv)
    finally:
        await lv.close()
    lv2 = await begin(store, codec=codec)
    try:
        ids = [i.id for i in lv2.items]
        assert out.id in ids and f"{out.id}~2" in ids
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
    finally:
        await lv2.close()


# ------------------------------------------------------------------ handoff


class Other(Desk):
    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__()
        if chat_ctx is not None:
            self._chat_ctx = chat_ctx.copy()


def registry2() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Desk)
    reg.register(Other)
    return reg


async def test_handoff_with_duplicates_in_the_new_agents_context(store: Store) -> None:
    """A handoff to an agent whose context holds a duplicate (the history's items, one
    twice): the new agent's stream is written whole (`full`, `unique_ids`); restore gives
    it back item for item; quiet checkpoints after; a new process goes on."""
    session = make_text_session(ScriptedLLM([f"r{i}" for i in range(10)]))
    rs = lr.ResumableSession(store, KEY, registry=registry2(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    lv = Live(session, rs, agent)
    try:
        await turns(lv, 2)
        await lv.checkpoint()
        lv.items.append(umsgs(lv)[0])
        ctx = agent.chat_ctx.copy()
        ctx.items.append(ctx.items[-1])
        other = Other(chat_ctx=ctx)
        session.update_agent(other)

        async def switched() -> bool:
            return session.current_agent is other

        await eventually(switched, "the session runs the new agent", WAIT)
        lv.agent = other

        async def saved_as_live() -> bool:
            # checkpointed until the store holds what the session does: LiveKit adds the
            # handoff's items after the switch, and may add more under load
            await lv.checkpoint()
            try:
                await restored_is_live(store, lv)
            except AssertionError:
                return False
            return True

        await eventually(saved_as_live, "the store holds the session as it is", WAIT)
        await quiet_checkpoint(lv)
        await lv.turn("to the other")
        await lv.checkpoint()
        await quiet_checkpoint(lv)
        await restored_is_live(store, lv)
    finally:
        await lv.close()
    session = make_text_session(ScriptedLLM(["x", "y"]))
    rs = lr.ResumableSession(store, KEY, registry=registry2(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    assert type(agent) is Other
    await asyncio.wait_for(session.start(agent), WAIT)
    lv2 = Live(session, rs, agent)
    try:
        await lv2.checkpoint()
        await quiet_checkpoint(lv2)
        await lv2.turn("new process")
        await lv2.checkpoint()
        await restored_is_live(store, lv2)
    finally:
        await lv2.close()


# ------------------------------------------------------------------ performance sanity


async def test_long_history_fallback_only_with_a_duplicate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A long history (5,000 items) with unique ids never takes the fallback read
    (`unique_ids`' `_unique` not called on a diff); a duplicate far back (beyond the edit
    window) does not either (nothing there is compared); one in the edit window does, each
    checkpoint.
    The times are printed (reported, not asserted)."""
    from livekit_resume.agent_hooks import tracker as tr
    from livekit_resume.stores.memory import MemoryStore

    calls = {"n": 0}
    real = tr._unique

    def counted(saved: list[str]) -> list[str]:
        calls["n"] += 1
        return real(saved)

    monkeypatch.setattr(tr, "_unique", counted)
    # (caplog puts the level back after the test: left at ERROR, later tests in this
    # process that look for a warning found none)
    caplog.set_level(logging.ERROR, logger="livekit_resume")
    store = MemoryStore()
    lv = await begin(store)
    figures: dict[str, float] = {}
    try:
        await lv.turn("hello")
        lv.items.extend(
            llm.ChatMessage(role="user" if k % 2 else "assistant", content=[f"m{k}"])
            for k in range(5000)
        )
        await lv.checkpoint()

        async def timed(label: str, n: int = 5) -> None:
            best = float("inf")
            for k in range(n):
                lv.items.append(llm.ChatMessage(role="user", content=[f"{label} {k}"]))
                t0 = time.perf_counter()
                await lv.checkpoint()
                best = min(best, time.perf_counter() - t0)
            figures[label] = best * 1000

        calls["n"] = 0
        await timed("unique")
        assert calls["n"] == 0, "the fallback read with every id unique"
        lv.items[100].id = lv.items[50].id  # a duplicate far back: not looked at
        calls["n"] = 0
        await timed("dup_far_back")
        far_calls = calls["n"]
        # a duplicate in the edit window: every checkpoint reads every id
        lv.items.append(lv.items[-1])
        await lv.checkpoint()
        calls["n"] = 0
        await timed("dup_recent")
        recent_calls = calls["n"]
        assert recent_calls >= 5
        v = lv.rs.version
        await lv.checkpoint()
        assert lv.rs.version == v
    finally:
        await lv.close()
        await store.aclose()
    with capsys.disabled():
        print(
            "\n[review15 perf] best checkpoint ms, 5000 items: "
            + ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
            + f"; fallback calls far_back={far_calls} recent={recent_calls}"
        )


async def test_far_back_rename_then_rewrite_from_middle_then_item_removed(
    store: Store, live: Live
) -> None:
    """Same root as above, another consequence: an item renamed far back, a checkpoint
    that rewrites from a recent point, then the renamed item removed from the history.
    DESIGN "Restore must be exact": the store must not keep an item the live history no
    longer holds (nor refuse to restore)."""
    await turns(live, 8)
    await live.checkpoint()
    old = live.items[0]
    old.id = "renamed_far_back"
    live.items.pop()
    await live.checkpoint()
    live.items.remove(old)
    await live.checkpoint()
    await live.turn("later turn")
    await live.checkpoint()
    hist, _ = await restored(store)
    assert [i.id for i in hist] == [i.id for i in live.items]


async def test_far_back_rename_removed_then_new_process_restores(store: Store) -> None:
    """As above, then a new process restores the key: DESIGN "Restore must be exact" —
    it must get the live history back (each live item once, no item the history no
    longer holds), not a refusal or a salvage that loses turns."""
    lv = await begin(store)
    try:
        await turns(lv, 8)
        await lv.checkpoint()
        old = lv.items[0]
        old.id = "renamed_far_back"
        lv.items.pop()
        await lv.checkpoint()
        lv.items.remove(old)
        await lv.checkpoint()
        await lv.turn("later turn")
        await lv.checkpoint()
        live_ids = [i.id for i in lv.items]
    finally:
        await lv.close()
    lv2 = await begin(store)
    try:
        assert [i.id for i in lv2.items][: len(live_ids)] == live_ids
    finally:
        await lv2.close()
