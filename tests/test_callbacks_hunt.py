"""Hunt (area: the API called from inside LiveKit): `ResumableSession.pause`, `resume`,
`suspend`, `end` and `checkpoint` called from a function tool, from Agent callbacks
(``on_enter``, ``on_user_turn_completed``), from an `AgentTask` awaited by a tool, and
while a tool hands off to a new agent. Real `AgentSession`s (text mode, no room) driven
by ``session.run(user_input=...)`` with the scripted LLM; SQLite files and the memory
store. Each test that FAILS names a defect; "passes: coverage" ones guard a promise not
tested elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool, llm

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests.lk.fake_voice import make_voice_session, voice_fakes
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

KEY = "room-hunt-cb"
WAIT = 10.0

# the ResumableSession of the running test, for the agents' tools and callbacks
RS: dict[str, lr.ResumableSession] = {}
# what the tools and callbacks measured or met
SEEN: dict[str, Any] = {}


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        lr.open_store(f"sqlite:///{tmp_path}/cb.db") if request.param == "sqlite" else MemoryStore()
    )
    RS.clear()
    SEEN.clear()
    yield s
    RS.clear()
    SEEN.clear()
    await s.aclose()


class Errors(logging.Handler):
    """Every ERROR record logged (LiveKit's and ours) while installed."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


@pytest.fixture
def errors() -> Any:
    handler = Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def latest(store: Store) -> Snapshot:
    return from_stored(codec_for(store), await store.load(KEY))


def user_texts(items: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item.get("type", "message") == "message" and item.get("role") == "user":
            out.extend(c for c in item.get("content") or [] if isinstance(c, str))
    return out


def outputs_of(items: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in items:
        if d.get("type") == "function_call_output":
            out.setdefault(d["call_id"], []).append(str(d.get("output")))
    return out


def live_outputs(items: list[llm.ChatItem]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in items:
        if isinstance(i, llm.FunctionCallOutput):
            out.setdefault(i.call_id, []).append(i.output)
    return out


async def until(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    async def check() -> bool:
        return pred()

    await eventually(check, what, timeout)


async def start(
    store: Store,
    reg: lr.AgentRegistry,
    model: ScriptedLLM,
    default: Callable[[], Agent],
    **options: Any,
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session = make_text_session(model)
    options.setdefault("autosave", True)
    rs = lr.ResumableSession(store, KEY, registry=reg, **options)
    RS["rs"] = rs
    agent = await asyncio.wait_for(rs.restore(session, default=default), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs


async def shut(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(rs.aclose(), WAIT)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(session.aclose(), WAIT)


async def timed(coro: Any) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await coro
    return loop.time() - t0


# ------------------------------------------------------------------ agents


class Billing(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You handle invoices.")


class Front(Agent):
    """A front desk whose tools call the API: hold (pause), transfer while holding
    (pause + handoff), snapshot (checkpoint), call back later (suspend)."""

    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def hold(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold."""
        SEEN["pause_took"] = await timed(RS["rs"].pause())
        return "the caller is on hold"

    @function_tool
    async def hold_for_a_human(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold while a human looks at the case, then go on."""
        await RS["rs"].pause()
        await asyncio.sleep(SEEN.get("hold_for", 0.0))
        await RS["rs"].resume()
        return "the human approved the refund"

    @function_tool
    async def transfer_on_hold(self, ctx: RunContext[Any]) -> Agent:
        """Hold the caller and transfer them to billing."""
        await RS["rs"].pause()
        return Billing()

    @function_tool
    async def note(self, ctx: RunContext[Any]) -> str:
        """Save the conversation now."""
        SEEN["checkpoint"] = await RS["rs"].checkpoint()
        return "noted"

    @function_tool
    async def call_back_later(self, ctx: RunContext[Any]) -> str:
        """The caller will call back later."""
        SEEN["suspend_took"] = await timed(RS["rs"].suspend())
        return "talk to you later"


def front_registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(Billing)
    return reg


# ------------------------------------------------------------------ tests


async def test_pause_from_a_tool_that_hands_off_keeps_the_handoff(store: Store) -> None:
    """The tool ``transfer_on_hold`` puts the caller on hold (``rs.pause()``) and returns
    ``Billing()``: LiveKit's documented handoff. Expected: the handoff happens (an agent
    handed to while paused is silenced, session.py ``on_handoff``), and after
    ``rs.resume()`` the caller talks to Billing; the call is answered with the
    tool's own result, not an error."""
    reg = front_registry()
    model = ScriptedLLM([[ToolCall("transfer_on_hold", call_id="call_t")]], default="ok")
    session, rs = await start(store, reg, model, Front)
    try:
        await asyncio.wait_for(session.run(user_input="I have a billing question"), WAIT)
        await until(lambda: rs.state == "paused", "paused by the tool")
        await until(lambda: "call_t" in live_outputs(list(session.history.items)), "answered")
        await asyncio.sleep(0.3)
        out = live_outputs(list(session.history.items))["call_t"]
        await asyncio.wait_for(rs.resume(), WAIT)
        assert type(session.current_agent) is Billing, (
            f"the handoff the tool returned did not happen: current agent "
            f"{type(session.current_agent).__name__}, the call answered {out}"
        )
        snap = await latest(store)
        assert snap.agent is not None and snap.agent.agent_id == "billing", snap.agent
    finally:
        await shut(session, rs)


async def test_a_hold_tool_pauses_promptly_and_resume_answers_again(
    store: Store, errors: Errors
) -> None:
    """passes: coverage. A ``hold`` tool calls ``rs.pause()``: it returns promptly (the
    reply running the tool is not waited for, lifecycle.md), the pause snapshot holds the
    caller's turn, the tool's own result is saved once it returns (autosave while
    paused), nothing is answered while paused, and ``rs.resume()`` brings the replies
    back. No ERROR is logged."""
    reg = front_registry()
    model = ScriptedLLM([[ToolCall("hold", call_id="call_h")]], default="ok")
    session, rs = await start(store, reg, model, Front)
    try:
        await asyncio.wait_for(session.run(user_input="please hold on a moment"), WAIT)
        await until(lambda: "pause_took" in SEEN, "pause returned in the tool")
        assert SEEN["pause_took"] < 1.0, SEEN
        assert rs.state == "paused"

        async def saved() -> bool:
            snap = await latest(store)
            return "call_h" in outputs_of(snap.history)

        await eventually(saved, "the hold tool's result saved", WAIT)
        snap = await latest(store)
        assert snap.state == "paused"
        assert "please hold on a moment" in user_texts(snap.history)
        assert outputs_of(snap.history)["call_h"] == ["the caller is on hold"]
        assert [t.call_id for t in snap.tool_calls] == []
        asked = len(model.requests)
        await asyncio.wait_for(rs.resume(), WAIT)
        await asyncio.wait_for(session.run(user_input="I am back"), WAIT)
        assert len(model.requests) == asked + 1
        assert not errors.records, errors.texts()
    finally:
        await shut(session, rs)


async def test_a_tool_that_holds_then_resumes_logs_no_livekit_error(
    store: Store, errors: Errors
) -> None:
    """A ``hold_for_a_human`` tool pauses the call, waits for a human's decision (here
    5.5 s), resumes and returns the decision. Expected: no ERROR logged, and the
    decision recorded as the tool's result, answered by the agent once resumed.

    A tool that runs 5.5 s without the pause logs nothing: LiveKit waits for tools."""
    reg = front_registry()
    SEEN["hold_for"] = 5.5
    model = ScriptedLLM(
        [[ToolCall("hold_for_a_human", call_id="call_hh")], "Good news: refunded."],
        default="ok",
    )
    session, rs = await start(store, reg, model, Front)
    try:
        await asyncio.wait_for(session.run(user_input="I want a refund"), 15.0)
        await until(lambda: "call_hh" in live_outputs(list(session.history.items)), "done", 15)
        await asyncio.sleep(0.3)
        out = live_outputs(list(session.history.items))["call_hh"]
        assert not errors.records, (errors.texts(), out)
        assert out == ["the human approved the refund"], out
    finally:
        await shut(session, rs)


async def test_checkpoint_from_a_tool_keeps_the_turn_and_the_running_call(store: Store) -> None:
    """passes: coverage. ``rs.checkpoint()`` from a tool returns at once with a version
    that holds the caller's turn and the calling tool as running; the next save holds
    its result and no running call."""
    reg = front_registry()
    model = ScriptedLLM([[ToolCall("note", call_id="call_n")], "Noted."], default="ok")
    session, rs = await start(store, reg, model, Front, autosave=False)
    try:
        await asyncio.wait_for(session.run(user_input="my order is 4711"), WAIT)
        v = SEEN["checkpoint"]
        mid = from_stored(codec_for(store), await store.load(KEY, v))
        assert "my order is 4711" in user_texts(mid.history)
        assert [t.call_id for t in mid.tool_calls] == ["call_n"]
        v2 = await asyncio.wait_for(rs.checkpoint(), WAIT)
        assert v2 > v
        snap = await latest(store)
        assert outputs_of(snap.history)["call_n"] == ["noted"]
        assert snap.tool_calls == []
    finally:
        await shut(session, rs)


async def test_suspend_from_a_tool_then_restore_keeps_the_conversation_once(
    store: Store, errors: Errors
) -> None:
    """A ``call_back_later`` tool calls ``rs.suspend()``. Expected: it returns promptly,
    stored ``suspended`` with the caller's turn; a restore in a new session holds each
    turn once and the suspend call answered once; the restored agent answers."""
    reg = front_registry()
    model = ScriptedLLM([[ToolCall("call_back_later", call_id="call_s")]], default="ok")
    session, rs = await start(store, reg, model, Front)
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="call me back tomorrow"), WAIT)
        await until(lambda: "suspend_took" in SEEN, "suspend returned in the tool")
        assert SEEN["suspend_took"] < 1.0, SEEN
        snap = await latest(store)
        assert snap.state == "suspended"
        assert user_texts(snap.history) == ["call me back tomorrow"]
    finally:
        await shut(session, rs)
    model2 = ScriptedLLM([], default="welcome back")
    s2, rs2 = await start(store, reg, model2, Front)
    try:
        assert rs2.resumed
        await asyncio.wait_for(s2.run(user_input="hello again"), WAIT)
        req = model2.requests[0]
        assert req.texts("user") == ["call me back tomorrow", "hello again"], req.texts("user")
        outs = live_outputs(req.items)
        assert list(outs) == ["call_s"] and len(outs["call_s"]) == 1, outs
        assert not errors.records, errors.texts()
    finally:
        await shut(s2, rs2)


class Ender(Agent):
    """Ends the call from ``on_user_turn_completed`` when the caller says goodbye."""

    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        if "goodbye" in (new_message.text_content or ""):
            SEEN["end_took"] = await timed(RS["rs"].end())


class Suspender(Agent):
    """Suspends from ``on_enter`` when the app asks it to (a caller flagged as gone)."""

    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")

    async def on_enter(self) -> None:
        if SEEN.get("suspend_on_enter"):
            SEEN["suspend_took"] = await timed(RS["rs"].suspend())


def callbacks_registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Ender)
    reg.register(Suspender)
    return reg


async def test_end_from_on_user_turn_completed_returns_promptly(
    store: Store, errors: Errors
) -> None:
    """A voice call (fake VAD, STT, TTS, audio): ``on_user_turn_completed`` (LiveKit's
    documented hook for a finished user turn) ends the call when the caller says
    goodbye. Expected: ``end()`` returns promptly (lifecycle.md: a suspend, final save,
    release and close, takes ~5 ms; it took 2 s, waiting for LiveKit's close, which waits
    for this hook), the store says ``ended``, and no ERROR is logged. The goodbye itself
    is in the ended snapshot once the end is done: LiveKit 1.8.9 adds the turn to the
    history after the hook returns, and the end saves it then (lifecycle.md)."""
    reg = callbacks_registry()
    model = ScriptedLLM([], default="noted")
    session = make_voice_session(model)
    fakes = voice_fakes(session)
    rs = lr.ResumableSession(store, KEY, registry=reg)
    RS["rs"] = rs
    agent = await asyncio.wait_for(rs.restore(session, default=Ender), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    try:
        fakes.audio_in.say("my order is 4711")
        await asyncio.wait_for(fakes.audio_out.wait_for_segment(1), WAIT)
        fakes.audio_in.say("thanks goodbye")
        await until(lambda: "end_took" in SEEN, "end returned", 15)
        await until(lambda: rs.state == "ended", "the end is done", 5)
        snap = await latest(store)
        assert snap.state == "ended"
        problems: list[str] = []
        if SEEN["end_took"] >= 1.0:
            problems.append(f"end() took {SEEN['end_took']:.1f}s")
        if user_texts(snap.history) != ["my order is 4711", "thanks goodbye"]:
            problems.append(f"the ended snapshot's user turns: {user_texts(snap.history)}")
        problems.extend(errors.texts())
        assert not problems, problems
    finally:
        await shut(session, rs)


async def test_suspend_from_on_enter_returns_promptly(store: Store, errors: Errors) -> None:
    """An agent's ``on_enter`` suspends the session (the app learnt the caller is gone).
    Expected: ``suspend()`` returns promptly, the store says ``suspended``, no ERROR."""
    reg = callbacks_registry()
    model = ScriptedLLM([], default="noted")
    session, rs = await start(store, reg, model, Suspender)
    try:
        await asyncio.wait_for(session.run(user_input="my order is 4711"), WAIT)
    finally:
        await shut(session, rs)
    SEEN["suspend_on_enter"] = True
    s2, rs2 = await start(store, reg, model, Suspender)
    try:
        await until(lambda: "suspend_took" in SEEN, "suspend returned", 15)
        snap = await latest(store)
        assert snap.state == "suspended"
        assert user_texts(snap.history) == ["my order is 4711"]
        assert SEEN["suspend_took"] < 1.0, (
            f"suspend() from on_enter took {SEEN['suspend_took']:.1f}s"
        )
        assert not errors.records, errors.texts()
    finally:
        await shut(s2, rs2)


class AskCode(AgentTask[str]):
    """A task the parent's tool awaits; its own ``hold`` tool pauses the call."""

    def __init__(self) -> None:
        super().__init__(instructions="Ask for the SMS code.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the code")

    @function_tool
    async def hold(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold while they look for the code."""
        SEEN["pause_took"] = await timed(RS["rs"].pause())
        return "on hold"

    @function_tool
    async def record_code(self, ctx: RunContext[Any], code: str) -> None:
        """Record the code."""
        self.complete(code)


class Verifier(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You verify callers.")

    @function_tool
    async def verify(self, ctx: RunContext[Any]) -> str:
        """Verify the caller by SMS code."""
        code = await AskCode()
        return f"verified with {code}"


async def test_pause_from_a_tasks_tool_then_resume_lets_the_task_complete(
    store: Store, errors: Errors
) -> None:
    """Inside an `AgentTask` awaited by the parent's ``verify`` tool, the task's ``hold``
    tool pauses the call (the caller looks for the SMS code). After ``rs.resume()`` the
    caller gives the code and the task completes: expected, the parent's ``verify`` call
    answered with its result ("verified with 1234"), saved, and no ERROR logged."""
    reg = lr.AgentRegistry()
    reg.register(Verifier)
    model = ScriptedLLM(
        [
            [ToolCall("verify", call_id="call_v")],
            "What is the code?",
            [ToolCall("hold", call_id="call_h")],
            [ToolCall("record_code", {"code": "1234"}, call_id="call_c")],
            "You are verified.",
        ],
        default="ok",
    )
    session, rs = await start(store, reg, model, Verifier)
    try:
        await asyncio.wait_for(session.run(user_input="verify me"), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="hold on, let me find it"), WAIT)
        await until(lambda: rs.state == "paused", "paused by the task's tool")
        await asyncio.sleep(0.3)
        await asyncio.wait_for(rs.resume(), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="the code is 1234"), WAIT)
        await until(lambda: type(session.current_agent) is Verifier, "back to the parent")
        await until(
            lambda: "call_v" in live_outputs(list(session.history.items)), "verify answered"
        )
        out = live_outputs(list(session.history.items))["call_v"]
        assert out == ["verified with 1234"], (out, errors.texts())
        await asyncio.wait_for(rs.checkpoint(), WAIT)
        snap = await latest(store)
        assert outputs_of(snap.history).get("call_v") == ["verified with 1234"]
        assert not errors.records, errors.texts()
    finally:
        await shut(session, rs)
