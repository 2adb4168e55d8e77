"""Hunt review21: a review, by tests, of 467ac74 (session.py), looking for regressions.

- `_finish_now`: a suspend/end whose speech cut meets LiveKit's error close goes on;
- `_commit_now`: an end asked for and not stored wins over an explicit state;
- `end()` during LiveKit's error close (`_end_in_error_close`);
- `restore()` waits for a suspend's tail; `_life` lets `_aclose_on_error` leave a
  restored life alone;
- a checkpoint refused with LeaseLost after the session's own release.

Real AgentSessions (text mode, the scripted LLM), the gated MemoryStore of
tests/_gated.py. Every test bounded; every turn checked in what is stored.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.voice.events import CloseReason

import livekit_resume as lr
from livekit_resume.agent_hooks import autosave as autosave_mod
from tests._gated import (
    CountedStore,
    bounded,
    key_fixture,
    sigterm_kept,
    store_fixture,
    until,
)
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import REGISTRY, Clerk
from tests.test_review14_hunt import (
    begin,
    cleanup,
    closes,
    job_begin,
    llm_fails_for_good,
    said,
    stored_state,
)

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


class Store21(CountedStore):
    """`CountedStore` whose ``down`` fails every commit (`StoreUnavailable`)."""

    async def commit(self, commit: Any) -> int:
        if self.down:
            await self.commit_gate.passing()
            raise lr.StoreUnavailable("the store is down (test)")
        return await super().commit(commit)


store = store_fixture(Store21)
key = key_fixture("r21")


async def stored_said(store: Any, key: str) -> tuple[list[str], bool]:
    """What the user said, as a fresh worker restores it (the lease must be free), and
    whether it resumed at all (an ended conversation is not)."""
    fresh = make_text_session(ScriptedLLM(default="noted"))
    other = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    await bounded(other.restore(fresh, default=Clerk, takeover=True), "a fresh restore")
    out, resumed = said(fresh), other.resumed
    await bounded(other.aclose(), "the fresh one's close")
    return out, resumed


async def hooks_settled(rs: lr.ResumableSession) -> None:
    await until(
        lambda: rs._finishing is None and (rs._closing is None or rs._closing.done()),
        f"the hooks are done (state {rs.state})",
    )


def cut_then_error_close(rs: lr.ResumableSession, model: Any, reasons: list[Any]) -> Any:
    """Have the next speech cut (`Silencer.silence`) meet LiveKit's error close."""
    silence = rs._silencer.silence

    async def silence_then_error_close(s: AgentSession[Any]) -> None:
        await silence(s)
        rs._silencer.silence = silence  # type: ignore[method-assign]
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await until(lambda: rs._closing is not None, "the hooks heard the close")

    rs._silencer.silence = silence_then_error_close  # type: ignore[method-assign,assignment]
    return silence


async def restore_in_place_and_talk(
    store: CountedStore, key: str, session: AgentSession[Any], rs: lr.ResumableSession, text: str
) -> None:
    session.history.items.clear()
    agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    await bounded(session.start(agent), "restart")
    await bounded(session.run(user_input=text), "a turn after the restore")
    await bounded(rs.checkpoint(), "a checkpoint after the restore")


# ------------------------------------ 1. a suspend (not an end) cut by an error close


async def test_a_suspend_cut_by_an_error_close_is_stored_suspended_and_restores_in_place(
    store: CountedStore, key: str
) -> None:
    """A suspend whose speech cut meets LiveKit's error close now goes on (467ac74):
    it returns, the store says suspended with no owner, rs.state suspended; a restore in
    place then takes it up and its turns are stored active."""
    session, rs, model = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    reasons = await closes(session)
    cut_then_error_close(rs, model, reasons)
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        version = await bounded(suspending, "suspend")
        await hooks_settled(rs)
        await asyncio.sleep(0.1)
        assert reasons == [CloseReason.ERROR]
        assert rs.state == "suspended", rs.state
        state, owner, v = await stored_state(store, key)
        assert (state, owner, v) == ("suspended", None, version)
        await restore_in_place_and_talk(store, key, session, rs, "and my pin is 1234")
        state, owner, _v = await stored_state(store, key)
        assert state == "active" and owner is not None, (state, owner)
        await bounded(rs.aclose(), "aclose")
    finally:
        await cleanup(store, suspending)
    got, resumed = await stored_said(store, key)
    assert resumed and "the code is 4711" in got and "and my pin is 1234" in got, got
    await session.aclose()


@pytest.mark.parametrize("what", ["suspend", "end"])
async def test_aclose_during_the_final_save_of_a_finish_cut_by_an_error_close(
    store: CountedStore, key: str, what: str
) -> None:
    """A suspend (an end) cut by LiveKit's error close goes on to its final save; the
    app's aclose (a job's shutdown) arrives while that save is held at the store. No
    hang, one lease release, the store holds the finish's state with no owner at the
    session's version, rs.state closed."""
    session, rs, model = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    # the turn's autosave written first: on a loaded machine its commit, late, was the
    # one the gate held, before the suspend's cut had met the error close
    await bounded(rs._autosave.idle.wait(), "the turn autosaved")
    reasons = await closes(session)
    cut_then_error_close(rs, model, reasons)
    store.commit_gate.arm()
    finishing = asyncio.ensure_future(getattr(rs, what)())
    closing: asyncio.Future[Any] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        assert rs._closing is not None and rs._closed_on_error
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(finishing, return_exceptions=True), what)
        await bounded(closing, "aclose")
        await hooks_settled(rs)
    finally:
        await cleanup(store, finishing, *([closing] if closing else []))
    assert isinstance(outcome[0], int), outcome
    assert rs.state == "closed", rs.state
    assert rs._holder.lease is None
    expected = {"suspend": "suspended", "end": "ended"}[what]
    state, owner, v = await stored_state(store, key)
    assert (state, owner, v) == (expected, None, rs.version)
    assert store.release_gate.calls == 1, store.release_gate.calls
    got, resumed = await stored_said(store, key)
    if what == "suspend":
        assert resumed and "the code is 4711" in got, got
    else:
        assert not resumed
    await session.aclose()


async def test_in_a_job_a_shutdown_during_an_end_cut_by_an_error_close_stores_it_ended(
    store: CountedStore, key: str
) -> None:
    """In a job: the app's end cut by LiveKit's error close, then the job shuts down
    while the end's final save is held. Bounded, the store says ended, no owner."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    cut_then_error_close(rs, model, reasons)
    store.commit_gate.arm()
    ending = asyncio.ensure_future(rs.end())
    down: asyncio.Future[Any] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the end's final save")
        down = asyncio.ensure_future(j.shut_down(session))
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await bounded(down, "the job's shutdown")
    finally:
        await cleanup(store, ending, *([down] if down else []))
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None), (state, owner, outcome, rs.state)
    _got, resumed = await stored_said(store, key)
    assert not resumed


# ------------------------------------------- 3. end() during LiveKit's error close


async def error_close_held_at(
    store: CountedStore, gate: str, model: Any, reasons: list[Any]
) -> None:
    getattr(store, gate).arm()
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await bounded(getattr(store, gate).entered.wait(), f"the error close at {gate}")


async def test_an_end_too_late_for_the_error_close_leaves_it_restorable_in_place(
    store: CountedStore, key: str
) -> None:
    """LiveKit's error close stored the session suspended and releases its lease (held
    at the store); the app's end() comes then: too late, refused (RuntimeError, "given
    up suspended first"). The session is then as the error close gives it up: rs.state
    suspended (not closed: no aclose came), restorable in place; and the end that was
    refused must not make the restored conversation's saves store it ended."""
    session, rs, model = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    reasons = await closes(session)
    await error_close_held_at(store, "release_gate", model, reasons)
    ending = asyncio.ensure_future(rs.end())
    try:
        await asyncio.sleep(0.02)
        store.release_gate.open()
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await hooks_settled(rs)
    finally:
        await cleanup(store, ending)
    assert isinstance(outcome[0], RuntimeError), outcome
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "suspended", (
        f"an end refused as too late left rs.state {rs.state!r} (closing "
        f"{rs._closing is not None}, _end_unsaved {rs._end_unsaved}): the store says "
        "suspended and no aclose came, yet no restore in place can take it up"
    )
    await restore_in_place_and_talk(store, key, session, rs, "and my pin is 1234")
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("active", owner) and owner is not None, (
        f"the restored conversation's checkpoint stored it {state!r}"
    )
    await bounded(rs.aclose(), "aclose")
    got, resumed = await stored_said(store, key)
    assert resumed and "the code is 4711" in got and "and my pin is 1234" in got, got
    await session.aclose()


async def test_in_a_job_a_rejoin_after_an_end_too_late_for_the_error_close(
    store: CountedStore, key: str
) -> None:
    """In a job: LiveKit's error close gives the session up suspended (the provider
    down), the app's end() comes during its release and is refused; the caller leaves
    and comes back. The store says suspended: the rejoin restores it in place, and the
    turns after are stored active (not ended, as the refused end would have it)."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    reasons = await closes(session)
    await error_close_held_at(store, "release_gate", model, reasons)
    ending = asyncio.ensure_future(rs.end())
    try:
        await asyncio.sleep(0.02)
        store.release_gate.open()
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await hooks_settled(rs)
        assert isinstance(outcome[0], RuntimeError), outcome
        j.leave()
        j.join()
        try:
            await until(
                lambda: rs.state == "active" and rs._started(),
                f"restored in place on rejoin (rs.state {rs.state})",
                2.0,
            )
            before = rs.version
            await bounded(session.run(user_input="and my pin is 1234"), "a turn")
            await until(lambda: rs.version > before, "autosave stored the turn")
            state, owner, _v = await stored_state(store, key)
            assert (state, owner is not None) == ("active", True), state
        finally:
            await j.shut_down(session)
    finally:
        await cleanup(store, ending)
    got, resumed = await stored_said(store, key)
    assert resumed and "and my pin is 1234" in got, got


async def test_two_ends_during_the_error_closes_final_save_both_return_the_ended_version(
    store: CountedStore, key: str
) -> None:
    """Two end() calls (the app's and a tool's) while LiveKit's error close saves: both
    return the version stored ended; the store says ended; no hang."""
    session, rs, model = await begin(store, key)
    session.history.add_message(role="user", content="thanks, goodbye")
    reasons = await closes(session)
    await error_close_held_at(store, "commit_gate", model, reasons)
    e1 = asyncio.ensure_future(rs.end())
    e2 = asyncio.ensure_future(rs.end())
    try:
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(e1, e2, return_exceptions=True), "two ends")
        await hooks_settled(rs)
    finally:
        await cleanup(store, e1, e2)
    state, owner, v = await stored_state(store, key)
    assert (state, owner) == ("ended", None), (state, outcome)
    assert outcome == [v, v], (outcome, v)
    _got, resumed = await stored_said(store, key)
    assert not resumed
    await session.aclose()


async def test_an_end_during_the_error_close_with_the_store_down_is_bounded_and_refused(
    store: CountedStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is down as LiveKit's error close saves, and the app's end() comes: it
    is refused within the close's budget (nothing stored ended), the lease freed, and
    the store holds what it held (the last checkpoint), the lease free."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.4)
    session, rs, model = await begin(store, key)
    v0 = rs.version
    reasons = await closes(session)
    store.down = True
    session.history.add_message(role="user", content="said as the store went down")
    await error_close_held_at(store, "commit_gate", model, reasons)
    ending = asyncio.ensure_future(rs.end())
    try:
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        started = time.monotonic()
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        took = time.monotonic() - started
        await hooks_settled(rs)
    finally:
        store.down = False
        await cleanup(store, ending)
    assert isinstance(outcome[0], RuntimeError), outcome
    assert took < 2.0, took
    state, owner, v = await stored_state(store, key)
    assert (state, owner, v) == ("active", None, v0), (state, owner, v)
    await session.aclose()


# ------------------------- 2. an end asked for and not stored, then undone by a resume


@pytest.mark.parametrize("then", ["suspend", "pause_resume_checkpoint"])
async def test_a_failed_end_undone_by_resume_is_not_stored_ended_later(
    store: Store21, key: str, then: str
) -> None:
    """failure-model.md: an end whose save fails is remembered "until a resume". After
    resume(), a suspend stores suspended (and the conversation resumes), a pause and a
    checkpoint store paused/active: no save stores ended."""
    session, rs, _model = await begin(store, key)
    store.down = True
    with pytest.raises(lr.StoreUnavailable):
        await bounded(rs.end(), "end with the store down")
    assert rs.state == "paused" and rs._end_unsaved
    store.down = False
    await bounded(rs.resume(), "resume")
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    try:
        if then == "suspend":
            await bounded(rs.suspend(), "suspend")
            want = "suspended"
        else:
            await bounded(rs.pause(), "pause")
            state, _o, _v = await stored_state(store, key)
            assert state == "paused", state
            await bounded(rs.resume(), "resume")
            await bounded(rs.checkpoint(), "checkpoint")
            want = "active"
        state, _owner, _v = await stored_state(store, key)
        assert state == want, (state, rs.state)
        await bounded(rs.aclose(), "aclose")
    finally:
        await cleanup(store)
    got, resumed = await stored_said(store, key)
    assert resumed and "the code is 4711" in got, got
    await session.aclose()


# ----------------------------- 4. a restore waits for the suspend's tail: how long


class Store21Events(Store21):
    """`Store21` publishing events; the publication of ``suspended`` waits at
    ``publish_gate`` (a store whose event channel froze)."""

    def __init__(self) -> None:
        super().__init__()
        from tests._gated import Gate

        self.publish_gate = Gate()
        self.events: list[str] = []

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        if event == "suspended":
            await self.publish_gate.passing()
        self.events.append(event)


async def test_a_restore_into_a_new_session_is_not_held_by_a_frozen_suspend_announcement(
    key: str,
) -> None:
    """A suspend says suspended once its lease is free; its announcement on the store's
    event channel then hangs (a frozen channel; `Announcer.announce` has no bound). A
    restore into a new AgentSession (a second resumable_job call on seeing suspended)
    now waits for the suspend's whole tail (467ac74): it must not wait longer than the
    tail's own bound on LiveKit's close (SUSPEND_CLOSE_WAIT, 2 s)."""
    store = Store21Events()
    session = make_text_session(ScriptedLLM(default="noted"))
    target = make_text_session(ScriptedLLM(default="noted"))
    rs = lr.ResumableSession(store, key, registry=REGISTRY, debounce=0.01)
    suspending: asyncio.Future[Any] | None = None
    restoring: asyncio.Future[Any] | None = None
    try:
        agent = await bounded(rs.restore(session, default=Clerk), "restore")
        await bounded(session.start(agent), "start")
        await bounded(session.run(user_input="the code is 4711"), "a turn")
        store.publish_gate.arm()
        suspending = asyncio.ensure_future(rs.suspend())
        await until(lambda: rs.state == "suspended", f"the state says suspended ({rs.state})")
        restoring = asyncio.ensure_future(rs.restore(target, default=Clerk))
        done, _ = await asyncio.wait({restoring}, timeout=3.0)
        assert done, "the restore waited over 3 s for the suspend's frozen announcement"
        agent = restoring.result()
        await bounded(target.start(agent), "start")
        await bounded(target.run(user_input="and my pin is 1234"), "a turn")
        await bounded(rs.checkpoint(), "checkpoint")
        state, owner, _v = await stored_state(store, key)
        assert state == "active" and owner is not None
    finally:
        store.open_gates()
        store.publish_gate.open()
        for t in (suspending, restoring):
            if t is not None and not t.done():
                t.cancel()
        await asyncio.gather(
            *[t for t in (suspending, restoring) if t is not None], return_exceptions=True
        )
        await bounded(rs.aclose(), "aclose")
        await target.aclose()
        await session.aclose()
        await store.aclose()


async def test_in_a_job_a_rejoin_after_a_suspend_restores_quickly(store: Store21, key: str) -> None:
    """In a job: the app suspends, the caller leaves and comes back: the rejoin's
    restore in place (which now waits for the suspend's tail) is done well within a
    second, and the turns after it are stored."""
    j, session, rs, _model = await job_begin(store, key, leave_grace=30.0)
    try:
        await bounded(session.run(user_input="the code is 4711"), "a turn")
        await bounded(rs.suspend(), "suspend")
        j.leave()
        started = time.monotonic()
        j.join()
        await until(lambda: rs.state == "active" and rs._started(), f"restored ({rs.state})", 2.0)
        took = time.monotonic() - started
        assert took < 1.0, took
        before = rs.version
        await bounded(session.run(user_input="and my pin is 1234"), "a turn")
        await until(lambda: rs.version > before, "autosave stored the turn")
        assert not j.shutdowns
    finally:
        await j.shut_down(session)
        await cleanup(store)
    got, resumed = await stored_said(store, key)
    assert resumed and "the code is 4711" in got and "and my pin is 1234" in got, got
