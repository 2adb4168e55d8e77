"""Hunt (review of 134d027): after LiveKit closes the session on unrecoverable errors
(`CloseReason.ERROR`) the hooks close it, then give it up as a suspend
(`ResumableSession._aclose_on_error`); the settle runs with the give-up to its end.

Real `AgentSession`s on a scripted LLM that fails as a provider does
(``tests/_llmfail_llm.py``, ``max_retry=0``), a SQLite store, `resumable_job` on LiveKit's
mock room (``tests/test_job_policy_adversarial.py``'s `Job`).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.voice.events import CloseEvent, CloseReason

import livekit_resume as lr
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests._llmfail_llm import Fail, FailingLLM
from tests.lk.scripted_llm import make_text_session
from tests.test_llmfail_hunt import CONN, WAIT, Desk, begin, say

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/r11.db")
    yield s
    await s.aclose()


@pytest.fixture
def key() -> str:
    return f"room-r11-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def _sigterm_kept() -> Iterator[None]:
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


async def _is(value: bool) -> bool:
    return value


async def outage(session: AgentSession[Any], closed: asyncio.Event) -> None:
    """The provider is down: turns fail until LiveKit closes the session (ERROR)."""
    for text in ("a", "b", "c", "d"):
        if closed.is_set():
            break
        await say(session, text)
    await asyncio.wait_for(closed.wait(), WAIT)


# ------------------------------------------------ 1. aclose() during the error close


async def test_an_aclose_during_the_error_close_leaves_the_session_closed_for_good(
    store: Store, key: str
) -> None:
    """The app (a shutdown callback) calls ``rs.aclose()`` while the hooks are closing the
    session LiveKit closed on errors. ``aclose`` is final ("Does not close the
    AgentSession... safe to call from several places at once"; `restore` raises
    "RuntimeError when aclose ran first or meanwhile"): once it returned the session is
    ``closed``, and a restore is refused, not granted the lease again by a job that
    is shutting down."""
    model = FailingLLM(["hi"], default=Fail())
    session, rs, _ = await begin(store, key, model)
    closed = asyncio.Event()
    app_close: list[asyncio.Future[None]] = []

    def on_close(ev: CloseEvent) -> None:
        assert ev.reason == CloseReason.ERROR
        closed.set()
        app_close.append(asyncio.ensure_future(rs.aclose()))  # the shutdown, at once

    session.on("close", on_close)
    assert await say(session, "hello") is None
    await outage(session, closed)
    await asyncio.wait_for(app_close[0], WAIT)
    await asyncio.sleep(0.05)
    assert rs.state == "closed", f"aclose() returned and the session is {rs.state!r}"
    session.history.items.clear()
    fresh = make_text_session(FailingLLM([], default="ok"), conn_options=CONN)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(rs.restore(fresh, default=Desk), WAIT)
    info = await store.info(key)
    assert info is not None and info.owner is None, f"held by {info and info.owner!r}"
    await rs.aclose()
    await fresh.aclose()


async def test_a_job_shut_down_during_the_error_close_does_not_restore_on_a_join(
    store: Store, _sigterm_kept: None
) -> None:
    """LiveKit closes the session on provider errors and the job is shut down at once
    (its shutdown callback runs ``rs.aclose()`` while the hooks still close it). A
    participant event the room delivers after (the caller leaving and joining as the
    job winds down) must not restore the conversation into the job being shut down:
    the lease would be taken and renewed by a job that is gone, and another worker's
    restore refused until it expires."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-r11-job-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    closed = asyncio.Event()
    shut: list[asyncio.Future[None]] = []

    def on_close(_ev: CloseEvent) -> None:
        closed.set()
        shut.append(asyncio.ensure_future(j.shut_down(session)))

    session.on("close", on_close)
    rs = await run_job(j, session, store, leave_grace=0.2)
    try:
        assert await say(session, "hello") is None
        await outage(session, closed)
        await asyncio.wait_for(shut[0], WAIT)
        model.push("welcome back")
        j.leave()
        j.join()
        await asyncio.sleep(0.3)
        info = await store.info(name)
        assert info is not None and info.owner is None, (
            f"the shut-down job holds the lease again ({info and info.owner!r}, rs {rs.state})"
        )
        assert rs.state == "closed"
    finally:
        await rs.aclose()
        await session.aclose()


# ----------------------------------------- 2. the provider still down at the rejoin


async def test_a_rejoin_while_the_provider_is_still_down_is_given_up_and_restored_again(
    store: Store, _sigterm_kept: None
) -> None:
    """The caller comes back while the provider is still down: restored in place, LiveKit
    closes it on errors again. Given up as the first time (suspended, lease free), and
    the caller's next return, the provider back, restores the whole conversation."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-r11-twice-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    closes: list[CloseEvent] = []
    closed = asyncio.Event()

    def on_close(ev: CloseEvent) -> None:
        closes.append(ev)
        closed.set()

    session.on("close", on_close)
    rs = await run_job(j, session, store, leave_grace=0.2)
    try:
        assert await say(session, "hello") is None
        await outage(session, closed)
        await eventually(lambda: _is(rs.state == "suspended"), "given up", WAIT)
        closed.clear()
        j.leave()
        j.join()
        await eventually(
            lambda: _is(rs.state == "active" and bool(getattr(session, "_started", False))),
            "restored in place",
            WAIT,
        )
        await outage(session, closed)  # still down
        await eventually(lambda: _is(rs.state == "suspended"), "given up again", WAIT)
        info = await store.info(name)
        assert info is not None and info.owner is None
        model.push("welcome back")
        j.leave()
        j.join()
        await eventually(
            lambda: _is(rs.state == "active" and bool(getattr(session, "_started", False))),
            "restored in place again",
            WAIT,
        )
        assert await say(session, "are you back?") is None
        texts = [getattr(i, "text_content", None) for i in session.history.items]
        assert "hello" in texts and "hi there" in texts and "welcome back" in texts
        assert [c.reason for c in closes] == [CloseReason.ERROR, CloseReason.ERROR]
    finally:
        await j.shut_down(session)


def shown(j: Any) -> list[str]:
    from livekit_resume.agent_hooks.room import ATTR_STATE

    return [
        c.args[0][ATTR_STATE]
        for c in j.room.local_participant.set_attributes.call_args_list
        if c.args and ATTR_STATE in c.args[0]
    ]


async def test_a_caller_who_rejoins_while_the_hooks_give_the_session_up_is_served(
    store: Store, _sigterm_kept: None
) -> None:
    """The caller hangs up and calls back while the hooks save and release the session
    LiveKit closed on errors (the provider back by then). Once given up (suspended), the
    caller in the room is served: restored in place, as a caller joining a moment later
    is. The policy skipped the join ("closing: the close is final") and nothing looked
    at the room again: the caller sits in a room with a silent agent."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-r11-join-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    closed = asyncio.Event()

    def on_close(_ev: CloseEvent) -> None:
        closed.set()
        model.push("welcome back")
        j.leave()
        j.join()  # heard while the hooks close it

    rs = await run_job(j, session, store, leave_grace=5.0)
    session.on("close", on_close)
    try:
        assert await say(session, "hello") is None
        await outage(session, closed)
        await eventually(
            lambda: _is(rs.state == "active" and bool(getattr(session, "_started", False))),
            "the caller who rejoined during the close is served once it is given up",
            1.5,
        )
    finally:
        await j.shut_down(session)


async def test_an_ended_call_still_shows_ended_in_the_room_after_the_job_shuts_down(
    store: Store, _sigterm_kept: None
) -> None:
    """The app ends the call (a goodbye); the job then shuts down, its callback running
    ``rs.aclose()`` as always. A room client reading ``resume.state`` must keep seeing
    ``ended``: told ``suspended`` it offers the caller a resume of a conversation that
    will never be resumed (134d027 has every close show itself, ``closed`` shown as
    ``suspended``)."""
    from tests.test_job_policy_adversarial import Job, run_job

    name = f"room-r11-end-{uuid.uuid4().hex[:6]}"
    j = Job(name)
    model = FailingLLM(["hi there"], default="bye")
    session = make_text_session(model, conn_options=CONN)
    rs = await run_job(j, session, store, leave_grace=None)
    assert await say(session, "hello") is None
    await asyncio.wait_for(rs.end(), WAIT)
    await asyncio.sleep(0.05)
    assert shown(j)[-1] == "ended", shown(j)
    await j.shut_down(session)
    await asyncio.sleep(0.05)
    assert shown(j)[-1] == "ended", f"the room was told {shown(j)} after an end"
