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
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT
from livekit_resume.stores.base import Store
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
