"""Hunt: the model provider fails mid-conversation.

Real `AgentSession`s (text mode, no room) on a scripted LLM whose turns can fail as a
provider's do (``tests/_llmfail_llm.py``: text or tool calls streamed, then an
`APIConnectionError`, an `APIStatusError` or a plain exception), with LiveKit's own retry,
``error`` event and close after ``max_unrecoverable_errors``
(agent_session.py ``_on_error``, ``CloseReason.ERROR``). Stores: SQLite files and a real
``redis-server``. Each test says what a user or operator expects; one that fails on the
current code is a finding.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import (
    Agent,
    AgentSession,
    APIStatusError,
    RunContext,
    ToolError,
    function_tool,
    llm,
)
from livekit.agents.voice.agent_session import SessionConnectOptions
from livekit.agents.voice.events import CloseEvent, CloseReason

import livekit_resume as lr
from livekit_resume.agent_hooks.autosave import CHECKPOINT_FAILURES, CHECKPOINTS
from livekit_resume.agent_hooks.room import ATTR_STATE
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests._llmfail_llm import FAST, Fail, FailingLLM
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

WAIT = 5.0
CONN = SessionConnectOptions(llm_conn_options=FAST)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = lr.open_store(f"sqlite:///{tmp_path}/llmfail.db")
    else:
        from tests.redis_servers import build_redis_store

        s = await build_redis_store("redis", request, namespace=f"lf{uuid.uuid4().hex[:8]}")
    yield s
    await s.aclose()


@pytest.fixture
def key() -> str:
    return f"room-llmfail-{uuid.uuid4().hex[:8]}"


class Desk(Agent):
    """A tool that works, one that refuses (`ToolError`), one with a bug, and one that
    fails once it is released."""

    def __init__(self) -> None:
        super().__init__(instructions="You are the desk.")
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    @function_tool
    async def lookup(self, ctx: RunContext[Any], what: str = "x") -> str:
        """Look something up."""
        return f"found {what}"

    @function_tool
    async def charge(self, ctx: RunContext[Any]) -> str:
        """Charge the card."""
        raise ToolError("card declined")

    @function_tool
    async def buggy(self, ctx: RunContext[Any]) -> str:
        """A tool with a bug."""
        raise KeyError("oops")

    @function_tool
    async def slow_fail(self, ctx: RunContext[Any]) -> str:
        """Fails, slowly."""
        self.started.set()
        await self.release.wait()
        raise ToolError("the booking system refused")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Desk)
    return reg


async def begin(
    store: Store,
    key: str,
    model: llm.LLM[Any],
    *,
    owner: str = "w1",
    takeover: bool = False,
    **kw: Any,
) -> tuple[AgentSession[Any], lr.ResumableSession, Agent]:
    session = make_text_session(model, conn_options=CONN)
    kw.setdefault("debounce", 0.01)
    rs = lr.ResumableSession(store, key, registry=registry(), owner=owner, **kw)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk, takeover=takeover), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs, agent


async def say(session: AgentSession[Any], text: str) -> BaseException | None:
    """One user turn; what the run raised (the provider's error), if anything."""
    try:
        await asyncio.wait_for(session.run(user_input=text), WAIT)
    except TimeoutError:
        raise
    except Exception as e:
        return e
    return None


async def shut(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await asyncio.wait_for(rs.aclose(), WAIT)
    await asyncio.wait_for(session.aclose(), WAIT)


async def load(store: Store, key: str) -> Any:
    stored = await store.load(key)
    return Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)


def convo(items: list[llm.ChatItem]) -> list[tuple[Any, ...]]:
    """What a model reads of a context: messages, calls and outputs, in order."""
    out: list[tuple[Any, ...]] = []
    for i in items:
        if isinstance(i, llm.ChatMessage) and i.role in ("user", "assistant"):
            out.append((i.role, i.text_content, i.interrupted))
        elif isinstance(i, llm.FunctionCall):
            out.append(("call", i.call_id, i.name))
        elif isinstance(i, llm.FunctionCallOutput):
            out.append(("output", i.call_id, i.output, i.is_error))
    return out


def unanswered(items: list[llm.ChatItem]) -> set[str]:
    calls = {i.call_id for i in items if isinstance(i, llm.FunctionCall)}
    answered = {i.call_id for i in items if isinstance(i, llm.FunctionCallOutput)}
    return calls - answered


async def settled(rs: lr.ResumableSession) -> None:
    """Autosave has written what the session holds."""
    await asyncio.wait_for(rs._autosave.idle.wait(), WAIT)


async def next_request(
    store: Store, key: str, text: str, **kw: Any
) -> tuple[llm.ChatContext, lr.ResumableSession]:
    """Another worker restores ``key`` and answers ``text``: the context its model got."""
    model = ScriptedLLM(default="welcome back")
    session, rs, _ = await begin(store, key, model, owner=f"w-{uuid.uuid4().hex[:4]}", **kw)
    try:
        assert await say(session, text) is None
        return model.requests[0].chat_ctx, rs
    finally:
        await shut(session, rs)


# ------------------------------------------------- 1. a reply that failed half-way


async def test_a_reply_cut_by_the_provider_is_restored_as_the_session_held_it(
    store: Store, key: str
) -> None:
    """The provider drops the stream after a few words (`APIConnectionError`, no retry).
    LiveKit keeps the user's turn and the words it had forwarded as the assistant's
    message. The next call must give the model exactly that conversation: the user's
    turn once, the partial reply as LiveKit held it, then the new turn."""
    model = FailingLLM(["hello there", Fail("let me look that")], default="ok")
    session, rs, _ = await begin(store, key, model)
    assert await say(session, "one") is None
    assert await say(session, "two") is not None  # the provider's error
    live = convo(session.history.items)
    assert ("assistant", "let me look that", False) in live or any(
        m[0] == "assistant" and m[1] and m[1].startswith("let me") for m in live
    )
    await settled(rs)
    await shut(session, rs)

    sent, rs2 = await next_request(store, key, "three")
    assert rs2.resumed
    assert convo(sent.items) == [*live, ("user", "three", False)]


async def test_a_provider_error_after_its_tool_call_leaves_every_call_answered(
    store: Store, key: str
) -> None:
    """The provider streams a tool call, then fails. LiveKit runs the tool all the same;
    the snapshot and the restored context hold the call with its output: a model is
    never sent a call without an answer (OpenAI refuses such a context)."""
    model = FailingLLM(
        [Fail("checking", tool_calls=[ToolCall("lookup", {"what": "flight"}, call_id="c1")])],
        default="done",
    )
    session, rs, _ = await begin(store, key, model)
    await say(session, "find my flight")
    await settled(rs)
    await shut(session, rs)
    live = convo(session.history.items)
    assert ("output", "c1", "found flight", False) in live

    sent, _ = await next_request(store, key, "and?")
    assert not unanswered(sent.items)
    assert convo(sent.items) == [*live, ("user", "and?", False)]


# ------------------------------------- 2. LiveKit closes the session on its errors


async def test_a_session_livekit_closed_on_unrecoverable_errors_is_resumable(
    store: Store, key: str
) -> None:
    """The provider is down: every request fails, and on the 4th unrecoverable error in a
    row (``max_unrecoverable_errors`` 3) LiveKit closes the `AgentSession` itself
    (`CloseReason.ERROR`). The close's final save must leave the conversation resumable
    (not ended), the lease free for the next worker, every turn before the outage and
    during it saved, and the next call resumed (``rs.resumed``)."""
    model = FailingLLM(["hi, how can I help?"], default=Fail(error=APIStatusError("503")))
    session, rs, _ = await begin(store, key, model)
    closes: list[CloseEvent] = []
    session.on("close", closes.append)
    assert await say(session, "hello") is None
    for text in ("a", "b", "c", "d"):
        await say(session, text)
    await eventually(lambda: _true(bool(closes)), "LiveKit closed the session", WAIT)
    assert closes[0].reason == CloseReason.ERROR
    await eventually(lambda: _true(rs.state == "suspended"), "the hooks gave it up", WAIT)
    live = convo(session.history.items)

    info = await store.info(key)
    assert info is not None
    assert info.owner is None, f"the lease is still held by {info.owner!r}"
    assert info.info.get("state") == "suspended"  # given up, resumable: ls says so
    assert info.version == rs.version
    snap = await load(store, key)
    assert snap.state == "suspended"

    sent, rs2 = await next_request(store, key, "are you back?")
    assert rs2.resumed
    assert convo(sent.items) == [*live, ("user", "are you back?", False)]
    await session.aclose()


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------- 3. tools raising


async def test_a_tools_error_output_is_saved_and_restored(store: Store, key: str) -> None:
    """A tool refuses (`ToolError`) and another has a bug (`KeyError`): LiveKit answers each
    call with an error output. Both outputs, marked as errors, are what the next call's
    model reads, so it does not call them again as if they had never run."""
    model = FailingLLM(
        [[ToolCall("charge", call_id="c1")], "declined", [ToolCall("buggy", call_id="c2")], "oh"],
        default="ok",
    )
    session, rs, _ = await begin(store, key, model)
    assert await say(session, "pay") is None
    assert await say(session, "again") is None
    await settled(rs)
    await shut(session, rs)
    live = convo(session.history.items)
    assert ("output", "c1", "card declined", True) in live

    sent, _ = await next_request(store, key, "so?")
    restored = convo(sent.items)
    assert restored == [*live, ("user", "so?", False)]


async def test_a_crash_while_a_tool_that_will_fail_runs_restores_it_answered(
    store: Store, key: str
) -> None:
    """The worker dies while a tool runs (it would have raised): the last autosave holds
    the call as running. The next worker's model gets the call answered once (the
    snapshot's "interrupted" answer), never a call without an answer; the dead worker's
    tool failing later writes nothing over the new holder."""
    model = FailingLLM([[ToolCall("slow_fail", call_id="c9")]], default="sorry")
    session, rs, agent = await begin(store, key, model, lease_ttl=30.0)
    assert isinstance(agent, Desk)
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="book it"))
    await asyncio.wait_for(agent.started.wait(), WAIT)
    await settled(rs)
    snap = await load(store, key)
    assert [t.call_id for t in snap.tool_calls] == ["c9"]
    # the process dies: no final save, no release (the lease is taken over)
    await rs._autosave.aclose()

    sent, _ = await next_request(store, key, "did it work?", takeover=True)
    assert not unanswered(sent.items)
    outs = [i for i in sent.items if isinstance(i, llm.FunctionCallOutput) and i.call_id == "c9"]
    assert len(outs) == 1
    version = (await store.info(key)).version  # type: ignore[union-attr]

    agent.release.set()
    await asyncio.wait_for(run, WAIT)  # the tool's error answered, and replied to
    await asyncio.wait_for(rs.aclose(), WAIT)  # refused: taken over
    await session.aclose()
    assert (await store.info(key)).version == version  # type: ignore[union-attr]


# ------------------------------------------------------------- 4. an error storm


async def test_an_error_storm_writes_one_version_per_turn_and_logs_no_error(
    store: Store, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider fails every request, each after a retry (one recoverable error event,
    then an unrecoverable one). Autosave writes what is new (the user's turns), never a
    version per error with nothing new; livekit-resume logs nothing at ERROR or WARNING
    for the provider's errors (LiveKit does); a `checkpoint()` after it all finds nothing
    new."""
    retrying = SessionConnectOptions(
        llm_conn_options=type(FAST)(max_retry=1, retry_interval=0, timeout=5),
        max_unrecoverable_errors=10,
    )
    model = FailingLLM(["hi"], default=Fail())
    session = make_text_session(model, conn_options=retrying)
    written = _total(CHECKPOINTS)
    failed = _total(CHECKPOINT_FAILURES)
    rs = lr.ResumableSession(store, key, registry=registry(), owner="w1", debounce=0.01)
    agent = await rs.restore(session, default=Desk)
    await session.start(agent)
    errors: list[Any] = []
    session.on("error", errors.append)
    try:
        with caplog.at_level(logging.DEBUG, logger="livekit_resume"):
            assert await say(session, "hello") is None
            await settled(rs)
            before = rs.version
            for n in range(5):
                await say(session, f"turn {n}")
                await settled(rs)
            assert len(errors) >= 10  # two attempts a turn
            assert rs.version - before <= 5, "more versions than turns"
            assert await rs.checkpoint() == rs.version
            # one count per version written, and no failure counted for the provider's
            assert _total(CHECKPOINTS) - written == rs.version
            assert _total(CHECKPOINT_FAILURES) == failed
        noisy = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("livekit_resume")
            and r.levelno >= logging.WARNING
            and "persists nothing" not in r.getMessage()  # the test server's config
        ]
        assert not noisy
    finally:
        await shut(session, rs)


def _total(metric: Any) -> float:
    return float(
        sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))
    )


@pytest.fixture(autouse=True)
def _quiet_livekit() -> Iterator[None]:
    """LiveKit logs every provider error with its traceback: not ours to read here."""
    lk = logging.getLogger("livekit.agents")
    level = lk.level
    lk.setLevel(logging.CRITICAL)
    yield
    lk.setLevel(level)


# ------------------------------------------- 2b. the same, under resumable_job's policy


@pytest.fixture
def _sigterm_kept() -> Iterator[None]:
    """`resumable_job` ignores SIGTERM in its (job) process: not in pytest's."""
    import signal

    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


async def test_a_job_whose_session_livekit_closed_on_errors_restores_it_for_a_rejoining_caller(
    store: Store, _sigterm_kept: None
) -> None:
    """Under `resumable_job` the provider goes down and LiveKit closes the session itself
    (`CloseReason.ERROR`); LiveKit does not end the job, and the caller is still in the
    room. The conversation is saved and its lease free, exactly as after a suspend, yet
    the job sits in the room with a closed session for good: the caller leaving and
    coming back (the provider healthy again) gets nothing, where after a suspend the
    policy restores the conversation in place ("a participant joining the room later
    restores it in this job", docs/lifecycle.md). Expected: a participant joining after
    such a close restores it in place, as after a suspend (or the job ends itself so the
    room can be served again); not a silent agent until the room empties."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-llmfail-job-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    rs = await run_job(j, session, store, leave_grace=0.2)
    try:
        assert await say(session, "hello") is None
        for text in ("a", "b", "c", "d"):
            await say(session, text)
        await asyncio.wait_for(closed.wait(), WAIT)
        await eventually(lambda: _true(rs.state == "suspended"), "the hooks gave it up", WAIT)
        info = await store.info(name)
        assert info is not None and info.owner is None
        model.push("welcome back")  # the provider is back
        j.leave()
        j.join()

        async def back() -> bool:
            return rs.state == "active" and bool(getattr(session, "_started", False))

        await eventually(
            back,
            f"the rejoining caller's conversation is restored in this job (rs is {rs.state}, "
            f"shutdowns asked: {j.shutdowns})",
            1.0,
        )
        assert await say(session, "are you back?") is None
        assert rs.resumed
    finally:
        await j.shut_down(session)


async def test_the_room_does_not_show_active_once_livekit_closed_the_session_on_errors(
    store: Store, _sigterm_kept: None
) -> None:
    """README: "The room's clients see the state in the agent's participant attributes
    ``resume.state``". LiveKit closes the session on unrecoverable provider errors but
    leaves the job, and the agent participant, in the room; the hooks save and release
    the conversation, given up as a suspend. A client that reads ``resume.state`` (to
    show "reconnecting", to ask for a new agent) must not be told ``active`` about a
    session nothing answers any more (a close published nothing of its own)."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-llmfail-attr-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    rs = await run_job(j, session, store, leave_grace=None)
    try:
        assert await say(session, "hello") is None
        for text in ("a", "b", "c", "d"):
            await say(session, text)
        await eventually(lambda: _true(rs.state == "suspended"), "the hooks gave it up", WAIT)
        await asyncio.sleep(0.05)  # the room's update is sent in the background

        def shown() -> list[str]:
            return [
                c.args[0][ATTR_STATE]
                for c in j.room.local_participant.set_attributes.call_args_list
                if c.args and ATTR_STATE in c.args[0]
            ]

        assert shown(), "the room was never shown a state"
        assert shown()[-1] != "active", (
            f"the room still shows resume.state=active for a closed session: {shown()}"
        )
    finally:
        await j.shut_down(session)
