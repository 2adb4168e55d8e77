"""Hunt: AgentTasks, handoffs and parallel tool calls across checkpoints, crashes and
restores. Real `AgentSession`s (text mode, no room) driven by
``session.run(user_input=...)``; real SQLite files. A small LLM of our own streams a
batch's tool calls one chunk at a time, with a gate between them, as a provider does.
Each test is a defect reproduction that fails on the current code unless its docstring
says "passes: coverage"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool, llm
from livekit.agents.voice.events import ToolCallEnded

import livekit_resume as lr
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, ScriptedLLMStream, ToolCall, make_text_session

KEY = "room-hunt-tasks"
WAIT = 8.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/tasks.db")
    yield s
    await s.aclose()


# ------------------------------------------------------------------ a gated LLM


class GatedLLM(ScriptedLLM):
    """A ScriptedLLM whose tool calls stream one per chunk; before sending call ``i``
    (i > 0) of request ``n`` it awaits ``gates[(n, i)]()`` if there is one."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gates: dict[tuple[int, int], Callable[[], Awaitable[None]]] = {}

    def chat(self, **kw: Any) -> ScriptedLLMStream:
        stream = super().chat(**kw)
        stream.__class__ = GatedStream
        return stream


class GatedStream(ScriptedLLMStream):
    async def _run(self) -> None:
        s = self._scripted
        assert isinstance(s, GatedLLM)
        n = s.requests.index(self._request) + 1
        if self._request.reply is None:
            self._request.reply = s._resolve(s._next_turn(), self._request.chat_ctx)
        reply = self._request.reply
        chunk_id = f"gated_{n}"
        if reply.text:
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", content=reply.text))
        for i, c in enumerate(reply.tool_calls):
            gate = s.gates.get((n, i))
            if gate is not None:
                await gate()
            call = llm.FunctionToolCall(
                name=c.name, arguments=c.arguments_json(), call_id=s._call_id(c)
            )
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", tool_calls=[call]))


# ------------------------------------------------------------------ helpers


async def load(store: Store) -> Any:
    stored = await store.load(KEY)
    return Codec().decode_parts(KEY, stored.head, stored.streams)


async def started(
    store: Store, reg: lr.AgentRegistry, model: llm.LLM[Any], default: Any, **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session = make_text_session(model)
    kw.setdefault("autosave", False)
    rs = lr.ResumableSession(store, KEY, registry=reg, **kw)
    agent = await asyncio.wait_for(rs.restore(session, default=default), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs


async def until(cond: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return cond()

    await eventually(check, what, timeout=WAIT)


def ended_events(session: AgentSession[Any]) -> dict[str, str]:
    ended: dict[str, str] = {}

    def on_update(ev: Any) -> None:
        if isinstance(ev.update, ToolCallEnded):
            ended[ev.update.call_id] = ev.update.status

    session.on("tool_execution_updated", on_update)
    return ended


def calls(items: list[llm.ChatItem]) -> list[str]:
    return [i.call_id for i in items if isinstance(i, llm.FunctionCall)]


def outputs(items: list[llm.ChatItem]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in items:
        if isinstance(i, llm.FunctionCallOutput):
            out.setdefault(i.call_id, []).append(i.output)
    return out


def saved_call_ids(snap: Any) -> set[str]:
    found = {d["call_id"] for d in snap.history if d.get("type") == "function_call"}
    if snap.agent is not None:
        found |= {d["call_id"] for d in snap.agent.chat_ctx if d.get("type") == "function_call"}
    found |= {t.call_id for t in snap.tool_calls}
    return found


async def crash(session: AgentSession[Any], rs: lr.ResumableSession, *runs: Any) -> None:
    """The process dies: no final save."""
    for r in runs:
        if r is not None:
            r.cancel()
    await rs._detach_and_release()
    await asyncio.wait_for(session.aclose(), WAIT)


# ------------------------------------------------------------------ agents


class AskEmail(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Ask for the caller's email address.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the email")

    @function_tool
    async def record_email(self, ctx: RunContext[Any], email: str) -> None:
        """Record the email address."""
        self.complete(email)


CHARGED: list[int] = []


class Shop(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the shop.")

    @function_tool
    async def subscribe(self, ctx: RunContext[Any]) -> str:
        """Subscribe the caller."""
        email = await AskEmail()
        return f"subscribed {email}"

    @function_tool
    async def charge_card(self, ctx: RunContext[Any], amount: int) -> str:
        """Charge the caller's card."""
        CHARGED.append(amount)
        return f"charged {amount}"


def shop_registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Shop)
    return reg


# ------------------------------------------------------------------ tests


async def test_a_parents_parallel_call_streamed_after_its_sibling_awaits_a_task_is_kept(
    store: Store,
) -> None:
    """The parent ``Shop`` answers with the batch ``[subscribe, charge_card]``; a
    provider streams tool calls one by one, and LiveKit starts each tool as its call
    streams in (generation.py `_execute_tools_task`: ``async for fnc_call in
    function_stream`` creates the tool's task at once). ``subscribe`` awaits
    ``AskEmail()``, which makes the task ``session.current_agent`` at once
    (agent_session.py `_update_activity`: ``self._agent = agent`` before the parent's
    pause). ``charge_card`` streams in after that: it runs on the parent's activity and
    is the parent's call (its call and output go into the parent's context with the
    batch), but listen.py `on_tool_update` looks at the *current* agent when its
    ``ToolCallStarted`` fires, finds an ``AgentTask`` with a parent and drops it as "a
    task's own tool". A crash while the task waits for the caller's email: the
    snapshot holds no trace of ``charge_card`` (the card was charged), the restored model
    never hears of it and may charge again. failure-model.md: a tool running at the
    time is answered "interrupted"; a tool that ran must not vanish (the same promise
    test_tools_hunt.py checks for a batch without a task)."""
    CHARGED.clear()
    reg = shop_registry()
    model = GatedLLM(
        [
            [
                ToolCall("subscribe", call_id="call_sub"),
                ToolCall("charge_card", {"amount": 40}, call_id="call_charge"),
            ],
            "What is your email?",
        ],
        default="ok",
    )
    session, rs = await started(store, reg, model, Shop)
    ended = ended_events(session)

    async def gate() -> None:
        await until(lambda: isinstance(session.current_agent, AskEmail), "AskEmail current")

    model.gates[(1, 1)] = gate
    run: asyncio.Future[Any] = asyncio.ensure_future(
        session.run(user_input="subscribe me and charge 40")
    )
    try:
        await until(lambda: "call_charge" in ended, "charge_card ended")
        assert CHARGED == [40]
        assert isinstance(session.current_agent, AskEmail)
        await model.wait_for_requests(2, timeout=WAIT)
        await rs.checkpoint("tool")
        snap = await load(store)
    finally:
        await crash(session, rs, run)

    model2 = ScriptedLLM(["Let me check."], default="ok")
    s2, rs2 = await started(store, reg, model2, Shop)
    try:
        await asyncio.wait_for(s2.run(user_input="was I charged?"), WAIT)
        sent = model2.requests[0].items
    finally:
        await rs2.aclose()
        await s2.aclose()
    assert "call_charge" in saved_call_ids(snap), (
        "the snapshot holds no trace of the parent's finished charge_card call "
        f"(tool state: {[t.call_id for t in snap.tool_calls]})"
    )
    assert calls(sent).count("call_charge") == 1, f"calls seen: {calls(sent)}"
    assert len(outputs(sent).get("call_charge", [])) == 1
    assert outputs(sent).get("call_sub") == [INTERRUPTED_OUTPUT]


NOTE_RELEASE: list[asyncio.Event] = []


class AskEmailNoted(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Ask for the caller's email address.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the email")

    @function_tool
    async def record_email(self, ctx: RunContext[Any], email: str) -> None:
        """Record the email address."""
        self.complete(email)

    @function_tool
    async def log_note(self, ctx: RunContext[Any], note: str) -> str:
        """Write a note to the CRM."""
        await NOTE_RELEASE[-1].wait()
        return "noted"


class NotedShop(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the shop.")

    @function_tool
    async def subscribe(self, ctx: RunContext[Any]) -> str:
        """Subscribe the caller."""
        email = await AskEmailNoted()
        return f"subscribed {email}"


async def test_a_tasks_own_call_streamed_after_the_task_completed_is_not_put_into_the_parent(
    store: Store,
) -> None:
    """The mirror of the test above. Inside ``AskEmailNoted`` the model answers the
    batch ``[record_email, log_note]``, streamed one call at a time. ``record_email``
    completes the task; LiveKit then hands back to the parent at once
    (agent.py `AgentTask.__await_impl` ``finally``: `_update_activity(old_agent,
    new_activity="resume")` sets ``session._agent`` to the parent *before* it drains
    the task's activity, and the drain waits for the task's speech, tools included).
    ``log_note`` streams in after that: it is the task's own call (it runs on the task's
    activity, with the task's tool, and is merged out of the parent's context:
    ``exclude_function_call=True``), but listen.py `on_tool_update` sees the parent as
    the current agent and records it in the tool state. A crash while it runs: the
    restore answers it "interrupted" inside the parent's context, a call to a tool the
    parent does not have: guide.md "The restored agent is that parent agent, never half
    a task" (the defect tests/test_handoff_hunt.py
    ::test_a_tasks_own_tool_call_in_flight_is_not_put_into_the_parents_context fixed
    for a call started while the task is current). Expected: every call the restored
    model sees is one of its tools."""
    NOTE_RELEASE.append(asyncio.Event())
    reg = lr.AgentRegistry()
    reg.register(NotedShop)
    model = GatedLLM(
        [
            [ToolCall("subscribe", call_id="call_sub")],
            "What is your email?",
            [
                ToolCall("record_email", {"email": "a@b.c"}, call_id="call_rec"),
                ToolCall("log_note", {"note": "vip"}, call_id="call_note"),
            ],
        ],
        default="ok",
    )
    session, rs = await started(store, reg, model, NotedShop)
    started_calls: set[str] = set()

    def on_update(ev: Any) -> None:
        fc = getattr(ev.update, "function_call", None)
        if fc is not None:
            started_calls.add(fc.call_id)

    session.on("tool_execution_updated", on_update)

    async def gate() -> None:
        await until(lambda: type(session.current_agent) is NotedShop, "the parent current again")

    model.gates[(3, 1)] = gate
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="sign me up"))
    run2: asyncio.Future[Any] | None = None
    try:
        await until(lambda: isinstance(session.current_agent, AskEmailNoted), "task current")
        await model.wait_for_requests(2, timeout=WAIT)
        run2 = asyncio.ensure_future(session.run(user_input="a@b.c"))
        await until(lambda: "call_note" in started_calls, "log_note started")
        await rs.checkpoint("tool")
    finally:
        NOTE_RELEASE[-1].set()
        await crash(session, rs, run, run2)

    model2 = ScriptedLLM([], default="ok")
    s2, rs2 = await started(store, reg, model2, NotedShop)
    try:
        await asyncio.wait_for(s2.run(user_input="hello?"), WAIT)
        req = model2.requests[0]
    finally:
        await rs2.aclose()
        await s2.aclose()
    foreign = [i.name for i in req.items if i.type == "function_call" and i.name not in req.tools]
    assert foreign == [], (
        f"the restored parent's context holds calls to tools it does not have: {foreign} "
        f"(its tools: {req.tools})"
    )


SLOW_RELEASE: list[asyncio.Event] = []


class Billing(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You handle invoices.")

    @function_tool
    async def invoice(self, ctx: RunContext[Any], amount: int) -> str:
        """Send an invoice."""
        return f"invoice of {amount} sent"


class Front(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def transfer(self, ctx: RunContext[Any]) -> str:
        """Transfer the caller to billing."""
        ctx.session.update_agent(Billing())
        return "transferring"

    @function_tool
    async def slow_lookup(self, ctx: RunContext[Any], what: str) -> str:
        """Look something up slowly."""
        await SLOW_RELEASE[-1].wait()
        return "found"


def front_registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(Billing)
    return reg


async def test_a_task_that_completes_while_paused_leaves_the_parent_silent_and_saved(
    store: Store,
) -> None:
    """passes: coverage. A pause while ``AskEmail`` waits for the caller; the app
    completes the task while paused (an out-of-band answer). LiveKit hands back to the
    parent and writes the parent's ``subscribe`` call and its result into the history:
    the parent must make no reply while paused (lifecycle.md: paused, no reply),
    autosave must hold the result, and after a crash the restored parent sees
    ``subscribe`` answered once, with its result, no phantom running call."""
    reg = shop_registry()
    model = ScriptedLLM([[ToolCall("subscribe", call_id="call_sub")], "What is your email?"])
    session, rs = await started(store, reg, model, Shop, autosave=True)
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="sign me up"))
    try:
        await until(lambda: isinstance(session.current_agent, AskEmail), "task current")
        await model.wait_for_requests(2, timeout=WAIT)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(rs.pause(), WAIT)
        n = len(model.requests)
        task = session.current_agent
        assert isinstance(task, AskEmail)
        task.complete("a@b.c")
        await until(lambda: type(session.current_agent) is Shop, "parent back")
        await until(
            lambda: "call_sub" in outputs(list(session.history.items)), "subscribe answered"
        )
        await asyncio.sleep(0.8)
        assert len(model.requests) == n, "the parent replied while paused"
        snap = await load(store)
        saved_out = {
            d["call_id"]: d.get("output")
            for d in snap.history
            if d.get("type") == "function_call_output"
        }
        assert saved_out.get("call_sub") == "subscribed a@b.c", saved_out
        assert [t.call_id for t in snap.tool_calls] == []
        assert (snap.agent.agent_id, snap.agent.task) == ("shop", None)
    finally:
        await crash(session, rs, run)

    model2 = ScriptedLLM([], default="ok")
    s2, rs2 = await started(store, reg, model2, Shop)
    try:
        assert type(s2.current_agent) is Shop
        await asyncio.wait_for(s2.run(user_input="hello?"), WAIT)
        req = model2.requests[0]
    finally:
        await rs2.aclose()
        await s2.aclose()
    assert outputs(req.items) == {"call_sub": ["subscribed a@b.c"]}, outputs(req.items)
    assert calls(req.items) == ["call_sub"]


class InnerCode(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Ask for the code sent by SMS.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the code")

    @function_tool
    async def record_code(self, ctx: RunContext[Any], code: str) -> None:
        """Record the code."""
        self.complete(code)


class OuterEmail(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Ask for the email, then verify it.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the email")

    @function_tool
    async def verify(self, ctx: RunContext[Any], email: str) -> str:
        """Verify the email with a code."""
        code = await InnerCode()
        self.complete(email)
        return f"verified with {code}"


class NestShop(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the shop.")

    @function_tool
    async def subscribe(self, ctx: RunContext[Any]) -> str:
        """Subscribe the caller."""
        email = await OuterEmail()
        return f"subscribed {email}"


@pytest.mark.parametrize("how", ["crash", "suspend"])
async def test_a_nested_task_at_a_crash_restores_the_root_parent_with_one_interrupted_call(
    store: Store, how: str
) -> None:
    """passes: coverage. A task awaiting a task (``NestShop.subscribe`` awaits
    ``OuterEmail``, whose tool ``verify`` awaits ``InnerCode``): a snapshot taken while the
    inner task runs (a crash after a checkpoint, or a suspend) restores into a new
    AgentSession as the root parent (guide.md: "saves the agent that started it (through
    nested tasks"), its ``subscribe`` call answered "interrupted" once, no trace of the
    outer task's own ``verify`` call, nothing running."""
    reg = lr.AgentRegistry()
    reg.register(NestShop)
    model = ScriptedLLM(
        [
            [ToolCall("subscribe", call_id="call_sub")],
            "What is your email?",
            [ToolCall("verify", {"email": "a@b.c"}, call_id="call_verify")],
            "What is the code?",
        ],
        default="ok",
    )
    session, rs = await started(store, reg, model, NestShop)
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="sign me up"))
    run2: asyncio.Future[Any] | None = None
    try:
        await until(lambda: isinstance(session.current_agent, OuterEmail), "outer current")
        await model.wait_for_requests(2, timeout=WAIT)
        await until(run.done, "first run done")
        run2 = asyncio.ensure_future(session.run(user_input="a@b.c"))
        await until(lambda: isinstance(session.current_agent, InnerCode), "inner current")
        await model.wait_for_requests(4, timeout=WAIT)
        await asyncio.sleep(0.2)
        if how == "crash":
            await rs.checkpoint("tool")
        else:
            await asyncio.wait_for(rs.suspend(), WAIT)
        snap = await load(store)
    finally:
        await crash(session, rs, run, run2)
    assert snap.agent.agent_id == "nest_shop"
    assert [t.call_id for t in snap.tool_calls] == ["call_sub"]

    model2 = ScriptedLLM([], default="ok")
    s2, rs2 = await started(store, reg, model2, NestShop)
    try:
        assert type(s2.current_agent) is NestShop
        await asyncio.wait_for(s2.run(user_input="hello?"), WAIT)
        req = model2.requests[0]
        assert rs2._running == {}
    finally:
        await rs2.aclose()
        await s2.aclose()
    assert calls(req.items) == ["call_sub"]
    assert outputs(req.items) == {"call_sub": [INTERRUPTED_OUTPUT]}
    assert req.tools == ["subscribe"]
