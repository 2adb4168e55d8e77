"""Async tools (LiveKit's ``RunContext.update``) that report progress while they run.

What LiveKit 1.8.9 puts into the context (read in ``voice/events.py`` ``RunContext.update``
and ``voice/tool_executor.py``, checked here on a real ``AgentSession``):

* the first ``ctx.update(msg)`` answers the call itself: an output with the call's own
  ``call_id`` whose text is ``UPDATE_TEMPLATE`` ("... The task is still running ..."), and
  LiveKit marks the call ``extra["__livekit_agents_tool_non_blocking"] = True``;
* each later update adds a pair (call + output) with ``call_id`` ``<id>_update_<n>``;
* the real result comes last as a pair with ``call_id`` ``<id>_final`` (also for a tool
  that fails or returns None; a cancelled tool gets none).

So a call still running at a checkpoint has only progress outputs; after a restore it must
be answered as interrupted, like any other call cut off by the restore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, RunResult, function_tool, llm

import livekit_resume as lr
from livekit_resume.agent_hooks.session import SUSPEND_CLOSE_WAIT
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

KEY = "room-async-tools"
STILL_RUNNING = "The task is still running"
NON_BLOCKING_EXTRA = "__livekit_agents_tool_non_blocking"  # set by RunContext.update


class Reporter(Agent):
    """An agent whose one tool reports progress twice, then waits to be released."""

    def __init__(self) -> None:
        super().__init__(instructions="You fetch reports.")
        self.updated = asyncio.Event()
        self.release = asyncio.Event()

    @function_tool
    async def fetch_report(self, ctx: RunContext[Any], what: str) -> str:
        """Fetch a report in the background."""
        await ctx.update("started fetching")
        await ctx.update("half way")
        self.updated.set()
        await self.release.wait()
        return "report ready"


def _calls(ctx: llm.ChatContext) -> dict[str, llm.FunctionCall]:
    return {i.call_id: i for i in ctx.items if isinstance(i, llm.FunctionCall)}


def _outputs(ctx: llm.ChatContext) -> dict[str, list[llm.FunctionCallOutput]]:
    out: dict[str, list[llm.FunctionCallOutput]] = {}
    for i in ctx.items:
        if isinstance(i, llm.FunctionCallOutput):
            out.setdefault(i.call_id, []).append(i)
    return out


async def _run_until_progress(
    session: AgentSession[Any], agent: Reporter
) -> asyncio.Future[RunResult[Any]]:
    await session.run(user_input="hello")
    run: asyncio.Future[RunResult[Any]] = asyncio.ensure_future(
        session.run(user_input="get the report")
    )
    await asyncio.wait_for(agent.updated.wait(), 5)
    return run


async def test_livekit_puts_progress_outputs_for_a_running_async_tool() -> None:
    model = ScriptedLLM(
        ["hi", [ToolCall("fetch_report", {"what": "x"}, call_id="call_r")], "on it"],
        default="ok",
    )
    session = make_text_session(model)
    agent = Reporter()
    await session.start(agent)
    run = await _run_until_progress(session, agent)
    # the second update's pair is inserted before the first update becomes the call's output
    await asyncio.wait_for(_wait_for_output(session, "call_r"), 5)

    for ctx in (session.history, agent.chat_ctx):
        calls, outputs = _calls(ctx), _outputs(ctx)
        assert calls["call_r"].extra.get(NON_BLOCKING_EXTRA) is True
        assert [o.output for o in outputs["call_r"]] == [
            o.output for o in outputs["call_r"] if STILL_RUNNING in o.output
        ]
        assert len(outputs["call_r"]) == 1
        assert "started fetching" in outputs["call_r"][0].output
        assert "half way" in outputs["call_r_update_1"][0].output
        assert STILL_RUNNING in outputs["call_r_update_1"][0].output
        assert "call_r_final" not in calls and "call_r_final" not in outputs

    agent.release.set()
    await asyncio.wait_for(_wait_for_output(session, "call_r_final"), 5)
    final = _outputs(session.history)["call_r_final"]
    assert [o.output for o in final] == ["report ready"]
    await run
    await session.aclose()


async def _wait_for_output(session: AgentSession[Any], call_id: str) -> None:
    changed = asyncio.Event()

    def on_update(_: Any) -> None:
        changed.set()

    # outputs arrive silently (no event of their own); the tool-update and item events
    # around them are the moments to look again
    session.on("tool_execution_updated", on_update)
    session.on("conversation_item_added", on_update)
    try:
        while call_id not in _outputs(session.history):
            changed.clear()
            await changed.wait()
    finally:
        session.off("tool_execution_updated", on_update)
        session.off("conversation_item_added", on_update)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(
        "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/async.db"
    )
    yield s
    await s.aclose()


def _registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Reporter)
    return reg


async def test_async_tool_running_at_checkpoint_is_restored_as_interrupted(
    store: Store,
) -> None:
    model = ScriptedLLM(
        ["hi", [ToolCall("fetch_report", {"what": "x"}, call_id="call_r")], "on it"],
        default="ok",
    )
    s1 = make_text_session(model)
    rs1 = lr.ResumableSession(store, KEY, registry=_registry(), autosave=False, owner="w1")
    agent = await rs1.restore(s1, default=Reporter)
    assert isinstance(agent, Reporter)
    await s1.start(agent)
    run = await _run_until_progress(s1, agent)
    await asyncio.wait_for(_wait_for_output(s1, "call_r"), 5)
    assert "call_r" in rs1._running
    await rs1.checkpoint("tool")
    # a hard stop here: the process dies with the tool still running
    run.cancel()
    await rs1._detach_and_release()

    model2 = ScriptedLLM(["The report could not be confirmed."], default="ok")
    s2 = make_text_session(model2)
    rs2 = lr.ResumableSession(store, KEY, registry=_registry(), autosave=False, owner="w2")
    await s2.start(await rs2.restore(s2, default=Reporter))
    await asyncio.wait_for(s2.run(user_input="so?"), 10)

    sent = model2.requests[0].chat_ctx
    outputs = _outputs(sent)
    final = outputs["call_r_final"]
    assert [(o.output, o.is_error) for o in final] == [(INTERRUPTED_OUTPUT, True)]
    final_call = _calls(sent)["call_r_final"]
    assert final_call.name == "fetch_report"
    # every call the model sees has exactly one output, and the interrupted answer comes
    # after the progress the model was told about
    assert all(len(v) == 1 for v in outputs.values())
    assert set(outputs) == set(_calls(sent))
    items = sent.items
    assert items.index(final_call) + 1 == items.index(final[0])
    for progress in (outputs["call_r"][0], outputs["call_r_update_1"][0]):
        assert items.index(progress) < items.index(final_call)
    await rs2.aclose()
    await s2.aclose()
    agent.release.set()  # closing waits for a running tool that is not cancellable
    await s1.aclose()


# -- a suspend while an async tool runs ----------------------------------------------------


async def _tool_running(
    store: Store, reg: lr.AgentRegistry
) -> tuple[AgentSession[Any], lr.ResumableSession, Reporter, asyncio.Future[RunResult[Any]]]:
    model = ScriptedLLM(
        ["hi", [ToolCall("fetch_report", {"what": "x"}, call_id="call_r")], "on it"],
        default="ok",
    )
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False, owner="w1")
    agent = await rs.restore(session, default=Reporter)
    assert isinstance(agent, Reporter)
    await session.start(agent)
    run = await _run_until_progress(session, agent)
    assert "call_r" in rs._running
    return session, rs, agent, run


async def test_a_suspend_returns_once_saved_and_released_while_an_async_tool_runs(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """LiveKit's close waits for a tool that cannot be cancelled (an async tool, by
    default), however long it runs. The suspend waited in it: saved and released, yet
    ``suspend()`` did not return, ``pause``/``resume`` were refused as "being
    suspended", and a caller rejoining waited for the tool."""
    session, rs, agent, run = await _tool_running(store, _registry())
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    suspend = asyncio.ensure_future(rs.suspend())
    try:
        await asyncio.wait({suspend}, timeout=SUSPEND_CLOSE_WAIT + 3)
        assert suspend.done(), "suspend() still waits for the tool in LiveKit's close"
        assert rs.state == "suspended" and rs._lease is None
        assert (await store.info(KEY)) is not None
        assert not closed.is_set()  # LiveKit's close goes on by itself, for the tool
        assert [r for r in caplog.records if "waiting for fetch_report" in r.getMessage()]
        agent.release.set()
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        agent.release.set()
        await suspend
        run.cancel()
        await session.aclose()


async def test_a_restore_in_place_waits_for_the_close_a_tool_holds_and_keeps_no_late_output(
    store: Store,
) -> None:
    """Restored in place (the closed AgentSession, its history emptied) while LiveKit's
    close still waits for the tool: the restore waits for the close, and the tool's late
    result, added by the closing session, is not kept beside the snapshot's "interrupted"
    answer."""
    session, rs, agent, run = await _tool_running(store, _registry())
    suspend = asyncio.ensure_future(rs.suspend())
    try:
        await asyncio.wait({suspend}, timeout=SUSPEND_CLOSE_WAIT + 3)
        assert suspend.done(), "suspend() still waits for the tool in LiveKit's close"
        session.history.items.clear()
        restoring = asyncio.ensure_future(rs.restore(session, default=Reporter))
        await asyncio.sleep(0.3)
        assert not restoring.done()  # LiveKit restarts the session only once it closed
        agent.release.set()
        restored = await asyncio.wait_for(restoring, 10)
        assert "call_r_final" not in _outputs(session.history)  # the late result: gone
        final = _outputs(restored.chat_ctx)["call_r_final"]
        assert [(o.output, o.is_error) for o in final] == [(INTERRUPTED_OUTPUT, True)]
        await session.start(restored)
        assert rs.state == "active"
    finally:
        agent.release.set()
        await suspend
        run.cancel()
        await rs.aclose()
        await session.aclose()


class Other(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You handle everything else.")


async def test_a_tool_that_ended_during_a_suspend_is_not_saved_as_running_after_a_restore(
    store: Store,
) -> None:
    """A tool call that ended while the suspend closed the session ended unheard (the
    listeners were gone): it stayed in the tool state, every later snapshot listed it as
    running, and a restore put that call and an "interrupted" answer into the context
    of whatever agent was current, here one handed to later that never called it."""
    reg = _registry()
    reg.register(Other)
    session, rs, agent, run = await _tool_running(store, reg)
    suspend = asyncio.ensure_future(rs.suspend())
    await asyncio.sleep(0.2)
    agent.release.set()
    await asyncio.wait_for(suspend, 10)
    run.cancel()

    session.history.items.clear()
    await session.start(await rs.restore(session, default=Reporter))
    assert rs._running == {}
    other = Other()
    session.update_agent(other)
    await asyncio.wait_for(_handed_to(session, other), 5)
    await rs.checkpoint("handoff")
    live = [(type(i).__name__, i.id) for i in other.chat_ctx.items]
    await rs.aclose()
    await session.aclose()

    s2 = make_text_session(ScriptedLLM([], default="ok"))
    rs2 = lr.ResumableSession(store, KEY, registry=reg, autosave=False, owner="w2")
    restored = await rs2.restore(s2, default=Reporter)
    try:
        assert isinstance(restored, Other)
        assert [(type(i).__name__, i.id) for i in restored.chat_ctx.items] == live
    finally:
        await rs2.aclose()


async def _handed_to(session: AgentSession[Any], agent: Agent) -> None:
    """Until ``agent`` is current and started (its config update is in its context)."""

    async def started() -> bool:  # LiveKit adds the config update without an event
        return session.current_agent is agent and any(
            isinstance(i, llm.AgentConfigUpdate) for i in agent.chat_ctx.items
        )

    await eventually(started, "the handoff is done", timeout=5)
