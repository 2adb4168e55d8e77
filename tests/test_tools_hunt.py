"""Hunt: tool calls and tool state across checkpoints, pauses, suspends and crashes.

Real `AgentSession`s (text mode, no room) driven by ``session.run(user_input=...)`` with
the scripted LLM; real SQLite files. Each test is a defect reproduction that fails on
the current code unless marked "passes: coverage".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, RunResult, function_tool, llm
from livekit.agents.voice.events import ToolCallEnded

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

KEY = "room-hunt-tools"
WAIT = 10.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/tools.db")
    yield s
    await s.aclose()


async def load(store: Store) -> Any:
    stored = await store.load(KEY)
    return Codec().decode_parts(KEY, stored.head, stored.streams)


def calls(items: list[llm.ChatItem]) -> dict[str, llm.FunctionCall]:
    return {i.call_id: i for i in items if isinstance(i, llm.FunctionCall)}


def outputs(items: list[llm.ChatItem]) -> dict[str, list[llm.FunctionCallOutput]]:
    out: dict[str, list[llm.FunctionCallOutput]] = {}
    for i in items:
        if isinstance(i, llm.FunctionCallOutput):
            out.setdefault(i.call_id, []).append(i)
    return out


def saved_call_ids(snap: Any) -> set[str]:
    """Every call id the snapshot knows of: in the history, the agent's context, or
    the tool state."""
    found = {d["call_id"] for d in snap.history if d.get("type") == "function_call"}
    if snap.agent is not None:
        found |= {d["call_id"] for d in snap.agent.chat_ctx if d.get("type") == "function_call"}
    found |= {t.call_id for t in snap.tool_calls}
    return found


# ------------------------------------------------------------------ agents


class Desk(Agent):
    """A fast tool with a side effect, and a slow one that waits to be released."""

    def __init__(self) -> None:
        super().__init__(instructions="You are the desk.")
        self.charged = 0
        self.quick_done = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()

    @function_tool
    async def charge_card(self, ctx: RunContext[Any], amount: int) -> str:
        """Charge the caller's card."""
        self.charged += amount
        self.quick_done.set()
        return f"charged {amount}"

    @function_tool
    async def slow_lookup(self, ctx: RunContext[Any], what: str) -> str:
        """Look something up slowly."""
        self.slow_started.set()
        await self.release.wait()
        return "found"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Desk)
    return reg


async def started(
    store: Store, model: ScriptedLLM, *, owner: str, reg: lr.AgentRegistry | None = None
) -> tuple[AgentSession[Any], lr.ResumableSession, Agent]:
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=reg or registry(), autosave=False, owner=owner)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs, agent


def ended_listener(session: AgentSession[Any], call_id: str) -> asyncio.Event:
    ended = asyncio.Event()

    def on_update(ev: Any) -> None:
        if isinstance(ev.update, ToolCallEnded) and ev.update.call_id == call_id:
            ended.set()

    session.on("tool_execution_updated", on_update)
    return ended


# ------------------------------------------------------------------ tests


async def test_a_finished_parallel_call_is_not_lost_while_its_sibling_runs(store: Store) -> None:
    """Two parallel calls: ``charge_card`` finished (its side effect done), ``slow_lookup``
    still runs. LiveKit inserts a batch's calls and outputs into the history only once
    *every* tool of the batch finished (agent_activity.py `_pipeline_reply_task`: after
    ``await exe_task``, ``tool_messages = new_calls + new_fnc_outputs``), but it emits
    ``ToolCallEnded`` for each tool as it finishes (tool_executor.py ``_on_done``), and
    the hooks then drop the call from the tool state (listen.py ``on_tool_update``).

    A checkpoint in between holds the running ``slow_lookup`` but no trace at all of
    ``charge_card``: after a crash the restored model is never told the card was charged
    (DESIGN.md: tool state is "tool calls issued but not answered at snapshot time";
    docs/failure-model.md: a tool running at the time is answered "interrupted: may or
    may not have taken effect"). Expected: the charge call is in the snapshot (with its
    result, or at least answered "interrupted") and in the restored model's context."""
    model = ScriptedLLM(
        [
            [
                ToolCall("charge_card", {"amount": 40}, call_id="call_charge"),
                ToolCall("slow_lookup", {"what": "receipt"}, call_id="call_slow"),
            ],
            "done",
        ],
        default="ok",
    )
    s1, rs1, agent = await started(store, model, owner="w1")
    assert isinstance(agent, Desk)
    charge_ended = ended_listener(s1, "call_charge")
    run: asyncio.Future[RunResult[Any]] = asyncio.ensure_future(
        s1.run(user_input="charge 40 and find my receipt")
    )
    await asyncio.wait_for(agent.slow_started.wait(), WAIT)
    await asyncio.wait_for(agent.quick_done.wait(), WAIT)
    await asyncio.wait_for(charge_ended.wait(), WAIT)
    assert agent.charged == 40
    await rs1.checkpoint("tool")
    snap = await load(store)
    # a hard stop here: the process dies with slow_lookup still running
    run.cancel()
    await rs1._detach_and_release()

    model2 = ScriptedLLM(["Let me check."], default="ok")
    s2, rs2, _ = await started(store, model2, owner="w2")
    try:
        await asyncio.wait_for(s2.run(user_input="so, was I charged?"), WAIT)
        sent = model2.requests[0].items
        assert "call_charge" in saved_call_ids(snap), (
            f"the snapshot holds no trace of the finished charge_card call "
            f"(tool state: {[t.call_id for t in snap.tool_calls]})"
        )
        assert "call_charge" in calls(sent), (
            "the restored model is never told charge_card ran (card charged 40): "
            f"calls it sees: {sorted(calls(sent))}"
        )
        assert len(outputs(sent)["call_charge"]) == 1
    finally:
        await rs2.aclose()
        await s2.aclose()
        agent.release.set()
        await s1.aclose()


async def test_a_checkpoint_as_a_tool_ends_keeps_its_call(store: Store) -> None:
    """One tool, a checkpoint taken the moment it ends (here: scheduled from the
    ``ToolCallEnded`` event, as any autosave or app checkpoint may land there). LiveKit
    emits ``ToolCallEnded`` from the tool task's done callback (tool_executor.py
    ``_on_done``) and puts the call and its output into the history only later, once
    the pipeline's ``await exe_task`` resumes (agent_activity.py, "commit now so results
    survive"). listen.py drops the call from the tool state on ``ToolCallEnded``, so a
    snapshot taken in between holds the call neither as running nor in the history: a
    crash there restores a conversation in which the card was never charged.
    Expected: the call is in the snapshot (running, or with its output)."""
    model = ScriptedLLM(
        [[ToolCall("charge_card", {"amount": 40}, call_id="call_charge")], "done"],
        default="ok",
    )
    s1, rs1, agent = await started(store, model, owner="w1")
    assert isinstance(agent, Desk)
    snaps: list[asyncio.Future[int]] = []

    def on_update(ev: Any) -> None:
        if isinstance(ev.update, ToolCallEnded) and ev.update.call_id == "call_charge":
            snaps.append(asyncio.ensure_future(rs1.checkpoint("tool")))

    s1.on("tool_execution_updated", on_update)
    try:
        await asyncio.wait_for(s1.run(user_input="charge 40"), WAIT)
        assert snaps
        version = await snaps[0]
        stored = await store.load(KEY, version)
        snap = Codec().decode_parts(KEY, stored.head, stored.streams)
        assert agent.charged == 40
        assert "call_charge" in saved_call_ids(snap), (
            "a snapshot taken as charge_card ended holds no trace of it "
            f"(tool state {[t.call_id for t in snap.tool_calls]}, history types "
            f"{[d.get('type') for d in snap.history]})"
        )
    finally:
        await rs1.aclose()
        await s1.aclose()


class Reporter(Agent):
    """An async tool (LiveKit's ``RunContext.update``): progress, then a result later."""

    def __init__(self) -> None:
        super().__init__(instructions="You fetch reports.")
        self.updated = asyncio.Event()
        self.release = asyncio.Event()

    @function_tool
    async def fetch_report(self, ctx: RunContext[Any], what: str) -> str:
        """Fetch a report in the background."""
        await ctx.update("started fetching")
        self.updated.set()
        await self.release.wait()
        return "report ready: 3 invoices overdue"


async def history_has(session: AgentSession[Any], call_id: str) -> None:
    async def found() -> bool:
        return call_id in outputs(session.history.items)

    await eventually(found, f"an output of {call_id} in the history", timeout=WAIT)


async def reporting(
    store: Store, replies: list[Any]
) -> tuple[
    ScriptedLLM, AgentSession[Any], lr.ResumableSession, Reporter, asyncio.Future[RunResult[Any]]
]:
    """An autosaving session that said hello and asked for a report (``fetch_report``
    running), the model scripted to answer ``replies`` after the tool call."""
    reg = lr.AgentRegistry()
    reg.register(Reporter)
    model = ScriptedLLM(
        ["hi", [ToolCall("fetch_report", {"what": "x"}, call_id="call_r")], *replies],
        default="ok",
    )
    s1 = make_text_session(model)
    rs1 = lr.ResumableSession(store, KEY, registry=reg, autosave=True, debounce=0.05, owner="w1")
    agent = await asyncio.wait_for(rs1.restore(s1, default=Reporter), WAIT)
    assert isinstance(agent, Reporter)
    await s1.start(agent)
    await asyncio.wait_for(s1.run(user_input="hello"), WAIT)
    return model, s1, rs1, agent, asyncio.ensure_future(s1.run(user_input="get the report"))


async def test_a_tool_result_that_lands_while_paused_is_autosaved(store: Store) -> None:
    """An async tool's result lands while the session is paused (a caller on hold while
    the report is fetched: the very use of pause). LiveKit writes it into the history as
    the ``<call_id>_final`` pair (tool_executor.py ``_execute_tool``: "every final return
    ... goes through the coalescer") and ends the call (``ToolCallEnded``); the reply it
    asks for makes nothing while paused. None of that triggers autosave: listen.py
    triggers on ``ToolCallStarted`` only, not on ``ToolCallEnded`` nor on the result, and
    no ``conversation_item_added`` follows. So the store keeps the pause's snapshot, with
    the call "running", indefinitely: a crash a second later restores "interrupted: may
    or may not have taken effect" instead of the result the session held.
    docs/failure-model.md: a crash loses "the last debounce window (0.2 s)"; DESIGN.md
    Hooks: autosave listens to "item added, tools executed, handoff, close".
    Expected: within a few debounce windows the store holds the tool's result."""
    _model, s1, rs1, agent, run = await reporting(store, ["on it"])
    try:
        await asyncio.wait_for(agent.updated.wait(), WAIT)
        await history_has(s1, "call_r")  # the progress output
        await asyncio.wait_for(rs1.pause(), WAIT)
        paused_at = rs1.version
        agent.release.set()
        await history_has(s1, "call_r_final")  # the result, in the live session
        assert rs1._running == {}
        await asyncio.sleep(1.0)  # twenty debounce windows
        snap = await load(store)
        saved = {
            d["call_id"]: d.get("output")
            for d in snap.history
            if d.get("type") == "function_call_output"
        }
        assert "call_r_final" in saved, (
            f"1 s after fetch_report's result landed the store still holds version "
            f"{rs1.version} (the pause's was {paused_at}), without the result and with "
            f"the call saved as running: {[t.call_id for t in snap.tool_calls]}"
        )
    finally:
        agent.release.set()
        run.cancel()
        await rs1.aclose()
        await s1.aclose()


async def test_an_async_tool_result_answered_by_no_reply_is_autosaved(store: Store) -> None:
    """The same gap without a pause: an async tool's result lands and the model, asked
    to phrase it, says nothing (LiveKit tool_executor.py ``_on_speech_done``: "the LLM
    judged the content already covered and produced no output", status "skipped"). The
    result pair is in the history, the call has ended, yet no event autosave listens to
    fires (listen.py: ``ToolCallEnded`` only pops the call, it triggers nothing), so the
    store keeps the call as running and a crash answers it "interrupted".
    Expected: the result is saved within a few debounce windows."""
    model, s1, rs1, agent, run = await reporting(store, ["on it", ""])
    try:
        await asyncio.wait_for(agent.updated.wait(), WAIT)
        await history_has(s1, "call_r")
        await asyncio.wait_for(model.wait_for_requests(3), WAIT)
        await asyncio.sleep(0.5)  # "on it" said and saved
        agent.release.set()
        await history_has(s1, "call_r_final")
        await asyncio.wait_for(model.wait_for_requests(4), WAIT)
        await asyncio.sleep(1.0)
        snap = await load(store)
        saved = {d["call_id"] for d in snap.history if d.get("type") == "function_call_output"}
        assert "call_r_final" in saved, (
            f"1 s after fetch_report's result landed the store (version {rs1.version}) "
            f"lacks it and still lists the call as running: "
            f"{[t.call_id for t in snap.tool_calls]}"
        )
    finally:
        agent.release.set()
        run.cancel()
        await rs1.aclose()
        await s1.aclose()
