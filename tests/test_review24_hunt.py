"""Hunt review24: a review, by tests, of 63a3252 (session.py).

The old suspend's tail after a restore into a new AgentSession (its `_finishing`
dropped by `_restore`): what it still writes on the new life (`_session_close`), the
lease, and the job policy; and the error close's new 'ended' path (an end asked
during LiveKit's error close): a rejoin, a job's shutdown.

Real AgentSessions (text mode, the scripted LLM); the gated store of
tests/test_review22_hunt.py. Every test bounded; every turn checked in what is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from tests._gated import bounded, key_fixture, sigterm_kept, until
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import Clerk
from tests.test_review14_hunt import (
    begin,
    closes,
    job_begin,
    llm_fails_for_good,
    stored_state,
)
from tests.test_review22_hunt import (
    Store22,
    cleanup,
    into_a_new_life,
    short_wait,
    store,
    stored_said,
)

__all__ = ["key", "short_wait", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")

key = key_fixture("r24")


def hold_close(session: AgentSession[Any]) -> asyncio.Event:
    """The AgentSession's close waits for the returned event (a tool LiveKit does not
    cancel, a slow provider's close): the real close then runs."""
    gate = asyncio.Event()
    real = session.aclose

    async def slow_aclose() -> None:
        await gate.wait()
        await real()

    session.aclose = slow_aclose  # type: ignore[method-assign]
    return gate


# ------------------------- 1. the old tail's LiveKit close, kept as the new life's


async def test_old_tail_close_does_not_hold_a_restore_in_place_after_the_new_lifes_error_close(
    store: Store22, key: str, short_wait: None
) -> None:
    """The old suspend's tail, released after the restore into a new AgentSession, closes
    the OLD AgentSession (`_give_up`: ``self._session_close = ... session.aclose()``),
    and that close is slow (a tool LiveKit does not cancel). The new life then meets
    LiveKit's error close (given up suspended), and the caller rejoins: a restore in
    place into the new AgentSession must not wait on the OLD session's close (it is
    not the one LiveKit restarts)."""
    session, rs, _model = await begin(store, key)
    old_close = hold_close(session)
    model = ScriptedLLM(default="noted")
    suspending, target = await into_a_new_life(store, rs, model)
    restoring: asyncio.Future[Any] | None = None
    try:
        store.publish_gate.open()
        await bounded(asyncio.gather(suspending, return_exceptions=True), "the old tail")
        reasons = await closes(target)
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the new AgentSession")
        await until(lambda: rs.state == "suspended", f"the error close gave it up ({rs.state})")
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        target.history.items.clear()
        restoring = asyncio.ensure_future(rs.restore(target, default=Clerk))
        done, _ = await asyncio.wait({restoring}, timeout=2.0)
        assert done, (
            "the restore in place into the new AgentSession (closed by LiveKit, its close "
            "done) still waits after 2 s, on the OLD AgentSession's close that the old "
            f"suspend's tail left in _session_close ({rs._session_close!r})"
        )
        agent = restoring.result()
        await bounded(target.start(agent), "restart")
        await bounded(target.run(user_input="and the door is blue"), "a turn")
        await bounded(rs.checkpoint(), "checkpoint")
        state, owner, _v = await stored_state(store, key)
        assert state == "active" and owner is not None
        await bounded(rs.aclose(), "aclose")
    finally:
        old_close.set()
        await cleanup(store, suspending, *([restoring] if restoring else []))
        await bounded(target.aclose(), "the new AgentSession closes")
        await bounded(session.aclose(), "the old AgentSession closes")
    got, resumed = await stored_said(store, key)
    assert resumed
    for text in ("my name is Ada", "and my pin is 1234", "and the door is blue"):
        assert got.count(text) == 1, (text, got)


async def test_old_tail_does_not_overwrite_the_new_lifes_session_close(
    store: Store22, key: str, short_wait: None
) -> None:
    """The new life suspends while the old tail is still held (its event frozen); its
    own `_give_up` keeps the NEW AgentSession's close in `_session_close`. The old tail,
    released then, must not replace it with the OLD session's close: a restore in place
    into the new session would wait on the wrong close (here held: forever)."""
    session, rs, _model = await begin(store, key)
    old_close = hold_close(session)
    suspending, target = await into_a_new_life(store, rs)
    restoring: asyncio.Future[Any] | None = None
    try:
        await bounded(rs.suspend(), "the new life's suspend")
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        store.publish_gate.open()
        await bounded(asyncio.gather(suspending, return_exceptions=True), "the old tail")
        await until(lambda: not target._started, "the new AgentSession closed", 3.0)
        assert rs.state == "suspended", rs.state
        target.history.items.clear()
        restoring = asyncio.ensure_future(rs.restore(target, default=Clerk))
        done, _ = await asyncio.wait({restoring}, timeout=2.0)
        assert done, (
            "the restore in place into the new AgentSession (its own close done) still "
            "waits after 2 s on the OLD AgentSession's close, set by the old tail after "
            f"the new life's suspend ({rs._session_close!r})"
        )
        agent = restoring.result()
        await bounded(target.start(agent), "restart")
        await bounded(target.run(user_input="and the door is blue"), "a turn")
        await bounded(rs.checkpoint(), "checkpoint")
        state, owner, _v = await stored_state(store, key)
        assert state == "active" and owner is not None and rs.state == "active"  # type: ignore[comparison-overlap]
        await bounded(rs.aclose(), "aclose")
    finally:
        old_close.set()
        await cleanup(store, suspending, *([restoring] if restoring else []))
        await bounded(target.aclose(), "the new AgentSession closes")
        await bounded(session.aclose(), "the old AgentSession closes")
    got, resumed = await stored_said(store, key)
    assert resumed
    for text in ("my name is Ada", "and my pin is 1234", "and the door is blue"):
        assert got.count(text) == 1, (text, got)


# ----------------------------- 2. the old tail and the new life's lease / bookkeeping


async def test_a_restore_during_the_final_save_is_refused_and_the_lease_stays(
    store: Store22, key: str, short_wait: None
) -> None:
    """The old tail's release runs before the state says suspended: a restore into a
    new AgentSession asked during the final save is refused, and cannot make the old
    tail release a new life's lease. The store then says suspended, no owner; a restore
    after it holds the lease through the old tail's end."""
    session, rs, _model = await begin(store, key)
    store.commit_gate.arm()
    store.publish_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    target = make_text_session(ScriptedLLM(default="noted"))
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save")
        with pytest.raises(RuntimeError):
            await bounded(rs.restore(target, default=Clerk), "a restore too early")
        store.commit_gate.open()
        await until(lambda: rs.state == "suspended", f"suspended ({rs.state})")
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        agent = await bounded(rs.restore(target, default=Clerk), "restore into a new one")
        await bounded(target.start(agent), "start")
        store.publish_gate.open()
        await bounded(asyncio.gather(suspending, return_exceptions=True), "the old tail")
        await asyncio.sleep(0.1)
        await bounded(target.run(user_input="and my pin is 1234"), "a turn")
        await bounded(rs.checkpoint(), "checkpoint")
        state, owner, _v = await stored_state(store, key)
        assert (state, rs.state, rs._finishing) == ("active", "active", None)
        assert owner is not None and rs._holder.lease is not None
        assert rs._busy() is None
        await bounded(rs.aclose(), "aclose")
    finally:
        await cleanup(store, suspending)
        await bounded(target.aclose(), "the new AgentSession closes")
        await bounded(session.aclose(), "the old AgentSession closes")
    got, resumed = await stored_said(store, key)
    assert resumed and "and my pin is 1234" in got and "my name is Ada" in got, got


async def test_an_old_tail_cancelled_after_the_restore_leaves_the_new_life_alone(
    store: Store22, key: str, short_wait: None
) -> None:
    """The old suspend's caller is cancelled while its tail is held (a job shutting
    down); the tail runs to its end and the cancellation goes on. The new life, paused
    meanwhile, keeps its bookkeeping: a resume works, a suspend stores suspended (not
    ended), every turn stored."""
    session, rs, _model = await begin(store, key)
    suspending, target = await into_a_new_life(store, rs)
    try:
        await bounded(rs.pause(), "the new life pauses")
        suspending.cancel()
        await asyncio.sleep(0.05)
        store.publish_gate.open()
        out = await bounded(asyncio.gather(suspending, return_exceptions=True), "old tail")
        assert isinstance(out[0], (asyncio.CancelledError, int)), out
        assert rs.state == "paused" and not rs._end_unsaved and rs._finishing is None
        await bounded(rs.resume(), "resume")
        await bounded(target.run(user_input="and the door is blue"), "a turn")
        v = await bounded(rs.suspend(), "the new life's suspend")
        state, owner, sv = await stored_state(store, key)
        assert (state, owner, sv) == ("suspended", None, v)
    finally:
        await cleanup(store, suspending)
        await bounded(target.aclose(), "the new AgentSession closes")
        await bounded(session.aclose(), "the old AgentSession closes")
    got, resumed = await stored_said(store, key)
    assert resumed
    for text in ("my name is Ada", "and my pin is 1234", "and the door is blue"):
        assert got.count(text) == 1, (text, got)


# --------------------------------- 3. an end during LiveKit's error close, in a job


async def _end_in_error_close(
    store: Store22, rs: lr.ResumableSession, session: AgentSession[Any], model: ScriptedLLM
) -> int:
    reasons = await closes(session)
    store.commit_gate.arm()
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await bounded(store.commit_gate.entered.wait(), "the error close's final save")
    ending = asyncio.ensure_future(rs.end())
    await asyncio.sleep(0.02)
    store.commit_gate.open()
    return int(await bounded(ending, "end"))


async def test_an_ended_call_is_not_restored_on_rejoin(store: Store22, key: str) -> None:
    """In a job: end() during LiveKit's error close stored it ended, rs says ended; the
    caller leaves and comes back: the job policy must not restore it in place (an ended
    call), the store stays ended, no owner."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    try:
        version = await _end_in_error_close(store, rs, session, model)
        await until(lambda: rs._closing is None or rs._closing.done(), "the close is done")
        assert rs.state == "ended"
        j.leave()
        j.join()
        await asyncio.sleep(0.5)
        state, owner, v = await stored_state(store, key)
        assert (rs.state, state, owner, v) == ("ended", "ended", None, version)
        with pytest.raises(RuntimeError):
            await bounded(rs.restore(session, default=Clerk), "a restore of an ended call")
        state, owner, v = await stored_state(store, key)
        assert (state, owner, v) == ("ended", None, version)
    finally:
        store.open_gates()
        await j.shut_down(session)
    assert rs.state in ("ended", "closed")
    _got, resumed = await stored_said(store, key)
    assert not resumed


async def test_a_job_shutdown_during_the_ended_announcement_closes_it_ended(
    store: Store22, key: str
) -> None:
    """The 'ended' event of the error close's new path is held (the store's event
    channel slow) and the job shuts down meanwhile: the shutdown is bounded, the store
    stays ended and unowned, rs ends closed (or ended) and no save stores it again."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    held = asyncio.Event()
    gate = asyncio.Event()
    real_publish = store.publish

    async def publish(k: str, event: str, **fields: Any) -> None:
        if event == "ended":
            held.set()
            await gate.wait()
        await real_publish(k, event, **fields)

    store.publish = publish  # type: ignore[method-assign,assignment]
    ending: asyncio.Future[Any] | None = None
    try:
        reasons = await closes(session)
        store.commit_gate.arm()
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await bounded(store.commit_gate.entered.wait(), "the error close's final save")
        ending = asyncio.ensure_future(rs.end())
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(held.wait(), "the ended event is being published")
        _s, _o, version = await stored_state(store, key)
        await bounded(j.shut_down(session), "the job's shutdown")
        state, owner, v = await stored_state(store, key)
        assert (state, owner, v) == ("ended", None, version)
        gate.set()
        got = await bounded(ending, "end")
        assert got == version
        assert rs.state in ("closed", "ended"), rs.state
        state, owner, v = await stored_state(store, key)
        assert (state, owner, v) == ("ended", None, version)
    finally:
        gate.set()
        store.open_gates()
        if ending is not None and not ending.done():
            ending.cancel()
            await asyncio.gather(ending, return_exceptions=True)
    _got, resumed = await stored_said(store, key)
    assert not resumed
