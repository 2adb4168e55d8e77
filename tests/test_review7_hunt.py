"""Hunt (review of rev7's fixes): the API called from inside the session (silence.py
`own_speech`/`in_livekit_task`, `Silencer.silence` leaving the caller's reply uncut and the
others cut and not waited for), a failed end finished by a later suspend (session.py
`_end_unsaved`), and the Redis command channel on a database other than 0.

Real `AgentSession`s (text, voice fakes, the fake realtime model) driven by the scripted
LLM, SQLite / memory / a real redis-server. Each test that FAILS names a defect;
"passes: coverage" ones guard a promise of this round not tested elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
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
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests import child_env
from tests.lk.fake_realtime import FakeRealtimeModel
from tests.lk.fake_voice import make_voice_session, voice_fakes
from tests.lk.scripted_llm import Reply, ScriptedLLM, ToolCall, make_text_session
from tests.redis_servers import RedisServer
from tests.test_callbacks_hunt import Errors, errors
from tests.test_ended_hunt import CommitsFail, _kept_aside, _start_call

KEY = "room-hunt-rev7"
WAIT = 10.0

__all__ = ["errors"]  # a fixture

RS: dict[str, lr.ResumableSession] = {}
SEEN: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _clean() -> Any:
    RS.clear()
    SEEN.clear()
    yield
    RS.clear()
    SEEN.clear()


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        lr.open_store(f"sqlite:///{tmp_path}/rev7.db")
        if request.param == "sqlite"
        else MemoryStore()
    )
    yield s
    await s.aclose()


async def latest(store: Store, key: str = KEY) -> Snapshot:
    return from_stored(codec_for(store), await store.load(key))


async def until(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    async def check() -> bool:
        return pred()

    await eventually(check, what, timeout)


def said(session: AgentSession[Any]) -> list[str]:
    return [m.text_content or "" for m in session.history.messages() if m.role == "assistant"]


def live_outputs(items: list[llm.ChatItem]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in items:
        if isinstance(i, llm.FunctionCallOutput):
            out.setdefault(i.call_id, []).append(i.output)
    return out


async def shut(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(rs.aclose(), WAIT)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(session.aclose(), WAIT)


# ---------------------------------------------------------------- agents


class RtHolder(Agent):
    """A realtime agent whose ``hold`` tool pauses the call."""

    def __init__(self) -> None:
        super().__init__(instructions="You put callers on hold.")

    @function_tool
    async def hold(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold."""
        await RS["rs"].pause()
        SEEN["paused_in_tool"] = True
        return "the caller is on hold"


class AskCode(AgentTask[str]):
    """A task the parent's ``verify`` tool awaits; its ``hold`` tool pauses the call."""

    def __init__(self) -> None:
        super().__init__(instructions="Ask for the SMS code.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the code")

    @function_tool
    async def hold(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold while they look for the code."""
        if SEEN.get("no_pause"):
            return "on hold"  # the control: the same turn without a pause
        await RS["rs"].pause()
        hold_for = float(SEEN.get("hold_for", 0.0))
        if hold_for:
            await asyncio.sleep(hold_for)  # hold music, then a human says go on
            await RS["rs"].resume()
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
        SEEN["verify_speech"] = ctx.speech_handle.id
        code = await AskCode()
        return f"verified with {code}"


NOTICE = "Please hold the line while I look this up " + " ".join(f"w{n}" for n in range(40))


class Announcer(Agent):
    """A tool that announces the hold (``say``) and then pauses."""

    def __init__(self) -> None:
        super().__init__(instructions="You put callers on hold politely.")

    @function_tool
    async def hold_politely(self, ctx: RunContext[Any]) -> str:
        """Tell the caller they are put on hold, then hold."""
        ctx.session.say(NOTICE)
        # the notice is being spoken: heard for a while from its playout's start, not from
        # the say (under load the playout began late, and the pause cut it unheard)
        for _ in range(1000):
            if ctx.session.agent_state == "speaking":
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(float(SEEN.get("say_for", 0.8)))
        await RS["rs"].pause()
        SEEN["paused_in_tool"] = True
        return "the caller is on hold"


class Supervisor(Agent):
    """Session A's agent: its tool pauses another session (B) of this process."""

    def __init__(self) -> None:
        super().__init__(instructions="You supervise calls.")

    @function_tool
    async def hold_other_call(self, ctx: RunContext[Any]) -> str:
        """Put the other call on hold."""
        await RS["b"].pause()
        SEEN["b_paused"] = True
        return "the other call is on hold"


class Talker(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You talk a lot.")


REGISTRY = lr.AgentRegistry()
for _cls in (RtHolder, Verifier, Announcer, Supervisor, Talker):
    REGISTRY.register(_cls)


# ------------------------------------------------------ 1. a realtime model's own tool


async def test_a_realtime_agent_pausing_from_its_own_tool_does_not_reply_while_paused(
    store: Store,
) -> None:
    """FAILS. A realtime agent (the fake OpenAI-shaped model, no auto tool reply) runs
    a ``hold`` tool that calls ``rs.pause()``. lifecycle.md: called from a tool, "no
    reply follows it while paused"; realtime.md/realtime.py: "While paused, every reply
    LiveKit schedules is interrupted before it is played or recorded". Expected: once
    the tool returned, the model is not asked for its tool reply and nothing is said
    while paused.

    What happens: the reply running the tool is now left uncut (`Silencer.silence`,
    ``if speech is not own``), but a realtime model's tool reply is not an ``llm_node``
    call: LiveKit 1.8.9 runs it on that very handle (`_realtime_reply_task(
    speech_handle=speech_handle, tool_reply=True)`) with no ``speech_created``, so the
    RealtimeGate never sees it either. The model is asked and its reply recorded while
    paused. A regression of rev7: with the previous silence.py (every heard speech cut)
    this passes. Fix: leave ``own`` uncut only on a pipeline agent (its tool reply goes
    through the silenced ``llm_node``); on a realtime one, mark it and have the gate cut
    its tool reply (e.g. interrupt ``own`` once its tool returned: hook
    ``function_tools_executed`` while paused, or wrap the tool reply's
    ``realtime_generation`` path by interrupting ``own`` after its ``_tasks`` gain the
    reply task)."""
    model = FakeRealtimeModel(
        [Reply("One moment.", [ToolCall("hold")]), "Thanks for holding, I am back."],
        default="ok",
    )
    session: AgentSession[Any] = AgentSession(llm=model)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    RS["rs"] = rs
    try:
        await asyncio.wait_for(session.start(await rs.restore(session, default=RtHolder)), WAIT)
        rt = model.active_session
        session.generate_reply(user_input="please put me on hold")
        await until(lambda: "paused_in_tool" in SEEN, "the tool paused the call")
        await until(
            lambda: bool(live_outputs(list(session.history.items))), "the tool's output recorded"
        )
        await asyncio.sleep(1.5)
        assert rs.state == "paused"
        words = said(session)
        assert "Thanks for holding, I am back." not in words and len(rt.responses) == 1, (
            f"while paused the model was asked {len(rt.responses) - 1} more time(s) "
            f"({[n for n in rt.names() if n in ('generate_reply', 'interrupt')]}) and the "
            f"agent said {words}"
        )
    finally:
        await shut(session, rs)


# ---------------------------------------------- 2. a tool inside an AgentTask pausing


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "control"])
async def test_pause_from_a_tasks_tool_leaves_the_parents_reply_to_answer(
    store: Store, errors: Errors, paused: bool
) -> None:
    """FAILS. Inside an `AgentTask` the parent's ``verify`` tool awaits, the task's
    ``hold`` tool pauses the call; the app resumes; the caller gives the code; the task
    completes and ``verify`` returns "verified with 1234". lifecycle.md: called from a
    tool, "the reply whose tool calls is neither interrupted nor waited for" (cut,
    "LiveKit would drop the agent handoff the tool returns"...). The parent's reply
    runs the ``verify`` tool that awaits this very task: expected, it is not cut either,
    so once the task completes the agent answers ``verify``'s result ("You are
    verified.").

    What happens: `Silencer.silence` skips only the speech of the task's own tool
    (``own``); the loop ``for speech in list(self._speeches): if speech is not own:
    speech.interrupt(force=True)`` cuts the parent's reply, whose tool still awaits the
    task (force overrides the hold LiveKit puts on it while an inline task runs). The
    ``verify`` result is recorded but its reply never comes (LiveKit skips a tool
    reply of an interrupted speech). Pre-existing (HEAD~1 fails too). The control
    (``control``: the same turns, the ``hold`` tool not pausing) passes."""
    SEEN["no_pause"] = not paused
    model = ScriptedLLM(
        [
            [ToolCall("verify", call_id="call_v")],
            "What is the code?",
            [ToolCall("hold", call_id="call_h")],
            *([] if paused else ["Take your time."]),
            [ToolCall("record_code", {"code": "1234"}, call_id="call_c")],
            "You are verified.",
        ],
        default="ok",
    )
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=True)
    RS["rs"] = rs
    try:
        await asyncio.wait_for(session.start(await rs.restore(session, default=Verifier)), WAIT)
        await asyncio.wait_for(session.run(user_input="verify me"), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="hold on, let me find it"), WAIT)
        if paused:
            await until(lambda: rs.state == "paused", "paused by the task's tool")
            await asyncio.sleep(0.3)
            await asyncio.wait_for(rs.resume(), WAIT)
        else:
            await until(lambda: "call_h" in live_outputs(list(session.history.items)), "held")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="the code is 1234"), WAIT)
        await until(
            lambda: "call_v" in live_outputs(list(session.history.items)), "verify answered"
        )
        await asyncio.sleep(0.5)
        out = live_outputs(list(session.history.items))["call_v"]
        assert out == ["verified with 1234"], out
        assert "You are verified." in said(session), (
            f"the parent never answered verify's result: said {said(session)}; the model "
            f"was asked {len(model.requests)} times; errors {errors.texts()}"
        )
    finally:
        await shut(session, rs)


async def test_a_long_hold_inside_an_agent_task_loses_nothing_and_logs_no_error(
    store: Store, errors: Errors
) -> None:
    """FAILS. As above, but the task's ``hold`` tool holds the caller 5.5 s (hold music)
    and resumes itself. lifecycle.md: an interrupted reply running a tool is what made
    "LiveKit cancel [it] 5 s later with an ERROR, the tool's result lost". Expected: no
    ERROR, and the parent's ``verify`` answered "verified with 1234" once the code is
    given.

    What happens: the parent's reply (running ``verify``, awaiting the task) is cut by
    the pause (silence.py, the loop over ``self._speeches``); 5 s later LiveKit's
    interruption timeout logs "speech not done in time after interruption" and cancels
    its tasks, ``verify`` among them. Pre-existing (HEAD~1 fails too). Fix: leave uncut
    every speech the caller runs under, not only its own: the speeches of replies whose
    tools await the running inline `AgentTask` (LiveKit holds their interruptions while
    it runs: ``speech._interruption_holds``, or walk the ``_SpeechHandleContextVar``
    chain the task's ``__await_impl`` reads)."""
    SEEN["hold_for"] = 5.5
    model = ScriptedLLM(
        [
            [ToolCall("verify", call_id="call_v")],
            "What is the code?",
            [ToolCall("hold", call_id="call_h")],
            "Thanks for waiting, what is the code?",
            [ToolCall("record_code", {"code": "1234"}, call_id="call_c")],
            "You are verified.",
        ],
        default="ok",
    )
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=True)
    RS["rs"] = rs
    try:
        await asyncio.wait_for(session.start(await rs.restore(session, default=Verifier)), WAIT)
        await asyncio.wait_for(session.run(user_input="verify me"), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="hold on, let me find it"), 15.0)
        await until(lambda: "call_h" in live_outputs(list(session.history.items)), "held", 15)
        await until(lambda: rs.state == "active", "resumed by the tool")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.run(user_input="the code is 1234"), WAIT)
        with contextlib.suppress(AssertionError):
            await until(lambda: "call_v" in live_outputs(list(session.history.items)), "verify", 5)
        out = live_outputs(list(session.history.items)).get("call_v")
        cut = [getattr(r, "speech_id", None) for r in errors.records]
        assert out == ["verified with 1234"] and not errors.records, (
            f"verify answered {out}; errors: {errors.texts()} for speeches {cut} (the "
            f"parent's reply running verify: {SEEN.get('verify_speech')})"
        )
    finally:
        await shut(session, rs)


# ------------------------------------ 3. say() from the tool, then pause: what was heard


async def test_pause_from_a_tool_after_it_said_something_saves_what_was_heard() -> None:
    """FAILS. A voice call: the ``hold_politely`` tool announces the hold with
    ``session.say(...)`` and, while that notice is being spoken, calls ``rs.pause()``.
    silence.py: a pause "cuts the reply being spoken and waits until LiveKit has
    recorded what was heard"; the paused snapshot is the pause's "state saved".
    Expected: the paused snapshot holds what the live session records of the cut
    notice (the items of the history are the same).

    What happens: from a tool, `Silencer.silence` skips ``session.interrupt`` and
    waits for nothing ("the others are cut and not waited for: one queued behind it
    cannot end before it does"). But a ``say()`` from a tool is not queued behind the
    tool's reply: LiveKit 1.8.9 marks that reply's generation done before awaiting the
    tool, so the notice plays while the tool runs. The pause saves before LiveKit adds
    the cut notice to the history: the paused snapshot lacks what the caller heard.
    Pre-existing (HEAD~1 skipped the wait from a tool too). Fix: from a tool, wait for
    the others cut that are not queued behind ``own`` (the speech being played, i.e. the
    activity's ``_current_speech`` when it is not ``own``, or every cut speech already
    ``scheduled``), bounded by INTERRUPT_TIMEOUT as now."""
    store = MemoryStore()
    model = ScriptedLLM([[ToolCall("hold_politely", call_id="call_p")]], default="ok")
    session = make_voice_session(model)
    fakes = voice_fakes(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    RS["rs"] = rs
    try:
        await asyncio.wait_for(session.start(await rs.restore(session, default=Announcer)), WAIT)
        fakes.audio_in.say("can you put me on hold")
        await until(lambda: "paused_in_tool" in SEEN, "the tool paused the call", 15)
        await asyncio.sleep(1.0)  # LiveKit records the cut notice meanwhile
        played = fakes.audio_out.pushed_duration
        stored = await latest(store)
        assert stored.state == "paused"
        # what the live session records of the turn, but the tool's call and result (the
        # tool returned after its pause: saved as running, its result by the next save)
        live = [i.id for i in session.history.items if i.type == "message"]
        saved = [str(d.get("id")) for d in stored.history if d.get("type", "message") == "message"]
        notice = [
            (m.interrupted, m.text_content)
            for m in session.history.messages()
            if m.role == "assistant" and (m.text_content or "").startswith("Please hold")
        ]
        assert notice and notice[0][0], notice  # the notice was cut by the pause
        assert saved == live, (
            f"the paused snapshot lacks {[i for i in live if i not in saved]}, the cut "
            f"notice the caller heard ({played:.1f}s of audio pushed)"
        )
    finally:
        await shut(session, rs)
        await store.aclose()


# ------------------------------------------------ 4. session A's tool pausing session B


async def test_a_tool_of_one_session_pausing_another_cuts_and_waits_for_its_reply(
    tmp_path: Path,
) -> None:
    """passes: coverage. Two calls in one worker: session A's ``hold_other_call`` tool
    pauses session B while B's agent is speaking a long reply (voice). A's reply is no
    reply of B's (`own_speech` is not among B's speeches), so B's reply is cut and
    waited for: B's paused snapshot holds what B's history records (the cut reply),
    and A's own reply is not cut (its tool's result is recorded)."""
    store = lr.open_store(f"sqlite:///{tmp_path}/ab.db")
    long_reply = " ".join(f"word{n}" for n in range(80))
    model_b = ScriptedLLM([long_reply], default="ok")
    session_b = make_voice_session(model_b)
    fakes_b = voice_fakes(session_b)
    rs_b = lr.ResumableSession(store, "call-b", registry=REGISTRY, autosave=False)
    RS["b"] = rs_b
    model_a = ScriptedLLM([[ToolCall("hold_other_call", call_id="call_o")]], default="done")
    session_a = make_text_session(model_a)
    rs_a = lr.ResumableSession(store, "call-a", registry=REGISTRY, autosave=False)
    try:
        await session_b.start(await rs_b.restore(session_b, default=Talker))
        await session_a.start(await rs_a.restore(session_a, default=Supervisor))
        fakes_b.audio_in.say("tell me everything")
        await asyncio.wait_for(fakes_b.audio_out.wait_for_frames(20), WAIT)
        await asyncio.wait_for(session_a.run(user_input="put the other call on hold"), WAIT)
        assert SEEN.get("b_paused") and rs_b.state == "paused"
        stored = await latest(store, "call-b")
        live = [i.id for i in session_b.history.items]
        assert [str(d.get("id")) for d in stored.history] == live
        cut = [m for m in session_b.history.messages() if m.role == "assistant"]
        assert cut and cut[-1].interrupted
        assert live_outputs(list(session_a.history.items)).get("call_o") == [
            "the other call is on hold"
        ]
    finally:
        await shut(session_a, rs_a)
        await shut(session_b, rs_b)
        await store.aclose()


# ------------------------------------------------ 5. a failed end, then a suspend


async def test_a_failed_end_then_the_apps_suspend_stores_it_ended(tmp_path: Path) -> None:
    """passes: coverage. lifecycle.md: a failed ``end()`` "is remembered until a
    resume(): ... a suspend meanwhile (the app's, ...) ends it". The app's own
    ``suspend()`` after the store is back: stored ``ended``, the session says
    ``ended``, the next call does not resume it and keeps it aside once."""
    store = lr.open_store(f"sqlite:///{tmp_path}/fe.db")
    key = "caller-+15550701"
    flaky = CommitsFail(store)
    try:
        _ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), WAIT)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), WAIT)
        flaky.down = False
        await asyncio.wait_for(first.suspend(), WAIT)
        stored = await latest(store, key)
        assert (stored.state, first.state) == ("ended", "ended")
        await sa.aclose()
        _jb, sb, second = await _start_call(store, key)
        try:
            assert not second.resumed
            kept = await _kept_aside(store, key)
            assert [s.meta.conversation for s in kept.values()] == [stored.meta.conversation]
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


async def test_a_failed_end_then_a_remote_suspend_stores_it_ended(tmp_path: Path) -> None:
    """passes: coverage. As above, the suspend sent by an operator
    (``lr.control(store).suspend``, what ``livekit-resume suspend`` sends): answered
    done, stored ``ended``."""
    store = lr.open_store(f"sqlite:///{tmp_path}/fr.db")
    key = "caller-+15550702"
    flaky = CommitsFail(store)
    try:
        _ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), WAIT)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), WAIT)
        flaky.down = False
        version = await asyncio.wait_for(lr.control(store).suspend(key), WAIT)
        stored = await latest(store, key)
        assert stored.state == "ended" and version == (await store.info(key)).version  # type: ignore[union-attr]
        assert first.state == "ended"
        await sa.aclose()
    finally:
        await store.aclose()


# ------------------------------------------------ 6. Redis: commands on database 3


async def _cli(url: str, ns: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit_resume", "--store", url, "--namespace", ns, "--json",
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_pauses_resumes_and_suspends_a_session_on_database_3(
    redis_server: RedisServer,
) -> None:
    """passes: coverage. A mixed deployment in one process: a live session of the same
    key (a phone number) on database 0 and on database 3 of one Redis, each store its
    own object. ``livekit-resume pause/resume/suspend KEY`` against database 3 reach
    database 3's session only (``<ns>:ctl:{key}:db3``), and the one on database 0 stays
    active and held."""
    ns = f"rev7{uuid.uuid4().hex[:6]}"
    key = "caller-+15550703"
    base = f"redis://127.0.0.1:{redis_server.port}"
    db0 = RedisStore.from_url(f"{base}/0", namespace=ns)
    db3 = RedisStore.from_url(f"{base}/3", namespace=ns)
    s0 = make_text_session(ScriptedLLM(default="zero"))
    s3 = make_text_session(ScriptedLLM(default="three"))
    rs0 = lr.ResumableSession(db0, key, registry=REGISTRY, autosave=False)
    rs3 = lr.ResumableSession(db3, key, registry=REGISTRY, autosave=False)
    try:
        await s0.start(await rs0.restore(s0, default=Talker))
        await s3.start(await rs3.restore(s3, default=Talker))
        await s0.run(user_input="hello zero")
        await s3.run(user_input="hello three")
        for verb, state in (("pause", "paused"), ("resume", "active"), ("suspend", "suspended")):
            code, out, err = await _cli(f"{base}/3", ns, verb, key)
            assert code == 0, (verb, out, err)
            assert json.loads(out)["command"] == verb
            assert rs3.state == state, (verb, rs3.state)
            assert rs0.state == "active", (verb, rs0.state)
        info0 = await db0.info(key)
        assert info0 is not None and info0.owner is not None
        assert (await latest(db3, key)).state == "suspended"
    finally:
        await shut(s0, rs0)
        await shut(s3, rs3)
        for s in (db0, db3):
            with contextlib.suppress(Exception):
                await s.delete(key)
            await s.aclose()
