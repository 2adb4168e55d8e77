"""Hunt (review of 062fa19, 729db2e): LiveKit closes the session on unrecoverable
provider errors (`CloseReason.ERROR`); the hooks save it stored ``suspended``, release
it and give it up as a suspend (`ResumableSession._aclose_on_error`), and
`resumable_job`'s policy restores it in place when the caller comes back.

Real `AgentSession`s: a scripted LLM failing as a provider does (``max_retry=0``), and
the suite's realtime server double (``tests/lk/fake_realtime.py``) emitting LiveKit's
``RealtimeModelError`` as a plugin does; SQLite stores; `resumable_job` on LiveKit's mock
room (``tests/test_job_policy_adversarial.py``'s `Job`).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, llm
from livekit.agents.voice.events import CloseReason

import livekit_resume as lr
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests._child_realtime import REGISTRY as RT_REGISTRY
from tests._child_realtime import Concierge
from tests._llmfail_llm import Fail, FailingLLM
from tests.lk.fake_realtime import FakeRealtimeModel, make_realtime_session
from tests.lk.scripted_llm import make_text_session
from tests.test_llmfail_hunt import CONN, WAIT, say

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/r12.db")
    yield s
    await s.aclose()


@pytest.fixture
def key() -> str:
    return f"room-r12-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def _sigterm_kept() -> Iterator[None]:
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


async def _is(value: bool) -> bool:
    return value


async def outage(session: AgentSession[Any], closed: asyncio.Event) -> None:
    for text in ("a", "b", "c", "d"):
        if closed.is_set():
            break
        await say(session, text)
    await asyncio.wait_for(closed.wait(), WAIT)


def rt_error(model: FakeRealtimeModel) -> None:
    """The realtime provider's websocket fails for good, as a plugin reports it."""
    rt = model.active_session
    err = llm.RealtimeModelError(
        timestamp=time.time(),
        label=model.label,
        error=ConnectionError("realtime websocket closed (test)"),
        recoverable=False,
    )
    rt.emit("error", err)


async def rt_begin(
    store: Store, key: str, model: FakeRealtimeModel, **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession, Any, Any]:
    session, mic, speaker = make_realtime_session(model, userdata={})
    rs = lr.ResumableSession(store, key, registry=RT_REGISTRY, debounce=0.01, **kw)
    await asyncio.wait_for(session.start(await rs.restore(session, default=Concierge)), WAIT)
    return session, rs, mic, speaker


async def rt_error_close(session: AgentSession[Any], model: FakeRealtimeModel) -> None:
    closed = asyncio.Event()
    session.on("close", lambda ev: closed.set())
    for _ in range(10):
        if closed.is_set():
            break
        rt_error(model)
        await asyncio.sleep(0.01)
    await asyncio.wait_for(closed.wait(), WAIT)


# ------------------------------------------------ 1. a realtime model's error close


async def test_a_realtime_error_close_is_stored_suspended_and_restored_in_place(
    store: Store, key: str
) -> None:
    """The realtime provider fails for good (LiveKit counts its ``RealtimeModelError``s
    under llm errors and closes the session, ``CloseReason.ERROR``): the conversation is
    stored ``suspended``, the lease free, and a restore in place on the same
    `AgentSession` brings the whole conversation back to a new realtime session."""
    model = FakeRealtimeModel(["Hello, how can I help?", "Welcome back."])
    session, rs, mic, _speaker = await rt_begin(store, key, model)
    reasons: list[CloseReason] = []
    session.on("close", lambda ev: reasons.append(ev.reason))
    try:
        mic.say("hi there")
        await eventually(
            lambda: _is(any(getattr(i, "role", "") == "assistant" for i in session.history.items)),
            "greeted",
            WAIT,
        )
        await rs.checkpoint("manual")
        await rt_error_close(session, model)
        await eventually(lambda: _is(rs.state == "suspended"), "given up", WAIT)
        assert reasons == [CloseReason.ERROR]
        info = await store.info(key)
        assert info is not None and info.owner is None and info.info.get("state") == "suspended", (
            info
        )
        first = model.active_session
        session.history.items.clear()
        agent = await asyncio.wait_for(rs.restore(session, default=Concierge), WAIT)
        await asyncio.wait_for(session.start(agent), WAIT)
        assert rs.state == "active"
        again = model.active_session
        assert again is not first
        texts = [getattr(i, "text_content", None) for i in again.chat_ctx.items]
        assert "hi there" in texts, texts
    finally:
        await rs.aclose()
        await session.aclose()


# ------------------------------------------------ 2. on hold at the error close


async def test_an_error_close_while_on_hold_is_stored_suspended_and_the_restore_is_live(
    store: Store, key: str
) -> None:
    """The caller is on hold (``rs.pause()``) when the realtime provider fails for good.
    The conversation is stored ``suspended`` (not ``paused`` with nobody holding it: `ls`
    would show a hold no worker keeps), ``rs.state`` says ``suspended``, and the restore
    in place when the caller is back is live: audio on, replies allowed (a suspend from a
    hold restores active), not silenced by the hold the session had before its close."""
    model = FakeRealtimeModel(["Hello, how can I help?", "Welcome back."])
    session, rs, mic, _speaker = await rt_begin(store, key, model)
    try:
        mic.say("hi there")
        await eventually(
            lambda: _is(any(getattr(i, "role", "") == "assistant" for i in session.history.items)),
            "greeted",
            WAIT,
        )
        await asyncio.wait_for(rs.pause(), WAIT)
        assert rs.state == "paused"
        await rt_error_close(session, model)
        await eventually(lambda: _is(rs.state == "suspended"), "given up", WAIT)
        info = await store.info(key)
        assert info is not None and info.owner is None and info.info.get("state") == "suspended", (
            info
        )
        session.history.items.clear()
        agent = await asyncio.wait_for(rs.restore(session, default=Concierge), WAIT)
        await asyncio.wait_for(session.start(agent), WAIT)
        assert _state(rs) == "active"
        assert session.input.audio_enabled and session.output.audio_enabled, (
            session.input.audio_enabled,
            session.output.audio_enabled,
        )
        with pytest.raises(RuntimeError):
            await rs.resume()  # nothing on hold any more
        assert _state(rs) == "active"
        await asyncio.wait_for(rs.pause(), WAIT)  # a hold works again
        await asyncio.wait_for(rs.resume(), WAIT)
        assert _state(rs) == "active"
    finally:
        await rs.aclose()
        await session.aclose()


# ------------------------------------------------ 3. remote commands


# ------------------------------------------------ 4. taken over before the rejoin


async def test_a_rejoin_after_another_worker_took_the_given_up_session_leaves_it_there(
    store: Store, _sigterm_kept: None
) -> None:
    """Given up after the error close, the conversation is restored by another worker
    (the caller reached another room's agent, an operator moved it). The caller's rejoin
    in this job's room must not take it back: the restore in place is refused
    (`SessionBusy`, logged), the other worker keeps the lease, this job stays suspended."""
    from tests.test_job_policy_adversarial import REGISTRY, Clerk, Job, run_job

    name = f"room-r12-take-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    rs = await run_job(j, session, store, leave_grace=0.2)
    other = None
    try:
        assert await say(session, "hello") is None
        await outage(session, closed)
        await eventually(lambda: _is(rs.state == "suspended"), "given up", WAIT)
        other = make_text_session(FailingLLM([], default="ok"), conn_options=CONN)
        rs2 = lr.ResumableSession(store, name, registry=REGISTRY, owner="w2")
        await asyncio.wait_for(other.start(await rs2.restore(other, default=Clerk)), WAIT)
        j.leave()
        j.join()
        await asyncio.sleep(0.4)
        info = await store.info(name)
        assert info is not None and info.owner == "w2", info
        assert rs.state == "suspended", rs.state
        assert rs2.state == "active"
        await rs2.aclose()
    finally:
        await j.shut_down(session)
        if other is not None:
            await other.aclose()


# ------------------------------------------------ 5. suspend_after armed


async def test_a_long_pause_timer_armed_at_the_error_close_does_not_suspend_the_restore(
    store: Store, key: str
) -> None:
    """On hold with ``suspend_after`` armed when the provider fails for good: the error
    close gives the session up, and the timer of that hold must not fire into the
    session restored in place afterwards (it would suspend a live call)."""
    model = FakeRealtimeModel(["Hello, how can I help?", "Welcome back."])
    session, rs, mic, _speaker = await rt_begin(store, key, model, suspend_after=0.4)
    try:
        mic.say("hi there")
        await eventually(
            lambda: _is(any(getattr(i, "role", "") == "assistant" for i in session.history.items)),
            "greeted",
            WAIT,
        )
        await asyncio.wait_for(rs.pause(), WAIT)
        await rt_error_close(session, model)
        await eventually(lambda: _is(rs.state == "suspended"), "given up", WAIT)
        session.history.items.clear()
        agent = await asyncio.wait_for(rs.restore(session, default=Concierge), WAIT)
        await asyncio.wait_for(session.start(agent), WAIT)
        await asyncio.sleep(0.6)
        assert rs.state == "active", rs.state
        info = await store.info(key)
        assert info is not None and info.owner is not None, info
    finally:
        await rs.aclose()
        await session.aclose()


def _state(rs: lr.ResumableSession) -> str:
    """``rs.state`` read anew (mypy keeps the narrowing of an earlier assert)."""
    return rs.state
