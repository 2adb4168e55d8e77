"""Hunt review19: a review of 24b71bb and d9f2ea3 (agent_hooks/session.py).

- `_give_up` cancels autosave (`self._autosave.aclose()`), then releases under the save
  lock; `rs.state` becomes the stored state unless a final close came;
- `_aclose_on_error` waits for a suspend/end under way (or the app's aclose);
- `_checkpoint` raises RuntimeError, not LeaseLost/on_lost, when the lease was released
  under it by the session's own close or suspend (``self._holder.lease is None``).

Here: the behaviour these touch, which must still hold: a suspend right after a turn
with autosave on stores the turn; suspend_after and the leave grace with autosave
saving; a remote command during the give-up; on_lost for a real takeover during a
suspend or racing aclose; a checkpoint around a restore in place. Real AgentSessions,
the gated MemoryStore of test_review17_hunt (`CountedStore`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import livekit_resume as lr
from tests._gated import (
    CountedStore,
    LoadGatedStore,
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
    job_begin,
    said,
    stored_state,
)

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


store = store_fixture(CountedStore)
key = key_fixture("r19")


async def stored_said(store: Any, key: str) -> list[str]:
    """What the user said, as a fresh worker restores it from the store."""
    fresh = make_text_session(ScriptedLLM(default="noted"))
    other = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    await bounded(other.restore(fresh, default=Clerk), "a fresh restore")
    out = said(fresh)
    await bounded(other.aclose(), "the fresh one's close")
    return out


def lost_sink() -> tuple[list[BaseException], Any]:
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    return lost, on_lost


async def take_over(store: Any, key: str) -> tuple[lr.ResumableSession, Any]:
    """Another worker restores the key with takeover=True."""
    session = make_text_session(ScriptedLLM(default="other"))
    rs = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    agent = await bounded(rs.restore(session, default=Clerk, takeover=True), "takeover")
    await bounded(session.start(agent), "the taker's start")
    return rs, session


# ---------------------------------- 1. a suspend right after a turn, autosave on


@pytest.mark.parametrize("how", ["suspend", "end"])
async def test_suspend_right_after_a_turn_stores_that_turn(
    store: CountedStore, key: str, how: str
) -> None:
    """suspend()/end(): "final snapshot, lease released" — the snapshot is of the session
    as it is: the turn just taken (autosave's debounce not yet over, or its save
    cancelled by the give-up) is in the store, marked so, once the call returns."""
    session, rs, _ = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    v = await bounded(getattr(rs, how)(), how)
    assert rs.state == {"suspend": "suspended", "end": "ended"}[how]
    state, owner, stored = await stored_state(store, key)
    assert (state, owner, stored) == (rs.state, None, v)
    if how == "suspend":  # an ended conversation restores afresh: read back a suspend's
        assert "the code is 4711" in await stored_said(store, key)
    await session.aclose()


async def test_suspend_while_autosaves_commit_is_in_flight_stores_the_turn(
    store: CountedStore, key: str
) -> None:
    """The same with autosave's own commit of the turn held in flight (a slow store) when
    the suspend starts: the suspend's final save waits its turn on the save lock, and
    the store holds the turn, suspended, lease free, once suspend returns."""
    session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(store.commit_gate.entered.wait(), "autosave's commit")
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "suspended"
    state, owner, v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None) and v == rs.version
    assert "the code is 4711" in await stored_said(store, key)
    await session.aclose()


async def test_a_turn_during_the_final_save_is_stored_by_the_settle_with_autosave_on(
    store: CountedStore, key: str
) -> None:
    """suspend's settle (`_settled`): what reached the session while the final save was on
    its way is saved too before it is given up. Autosave, triggered by that same item,
    is cancelled by the give-up: the store must still hold it."""
    session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="one more thing: blue door")
        store.commit_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "suspended"
    assert "one more thing: blue door" in await stored_said(store, key)
    await session.aclose()


# -------------------------- 2. a real takeover during a suspend, or racing aclose


async def test_a_takeover_during_a_suspends_final_save_calls_on_lost_and_writes_nothing(
    store: CountedStore, key: str
) -> None:
    """ResumableSession: ``on_lost`` is awaited when a save finds the session taken over
    by another worker (`LeaseLost`); suspend: "If the final snapshot cannot be stored the
    error is raised". Another worker restores with takeover=True while the first's final
    save is in flight: the suspend raises LeaseLost, on_lost is called, and the first
    writes nothing after (the taker's checkpoints land on its own versions)."""
    lost, on_lost = lost_sink()
    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    taker: lr.ResumableSession | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        taker, tsession = await take_over(store, key)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(suspending, return_exceptions=True), "suspend")
    finally:
        await cleanup(store, suspending)
    await until(lambda: bool(lost), "on_lost called", 1.0)
    assert isinstance(outcome[0], lr.LeaseLost), f"suspend(): {outcome[0]!r}"
    landed = store.landed
    await bounded(tsession.run(user_input="taker's turn"), "the taker's turn")
    v = await bounded(taker.checkpoint(), "the taker's checkpoint")
    await asyncio.sleep(0.1)
    assert store.landed == landed + 1, "the first worker wrote after the takeover"
    info = await store.info(key)
    assert info is not None and info.owner == taker._owner and info.version == v
    await taker.aclose()
    await tsession.aclose()
    await rs.aclose()
    await session.aclose()


async def test_a_takeover_during_a_suspends_settle_calls_on_lost(
    store: CountedStore, key: str
) -> None:
    """The takeover lands while the suspend's settle commits what came during the final
    save: that save meets LeaseLost under a lease this session did NOT release, so it is a
    takeover: on_lost is called (not a RuntimeError 'given up'), and the first worker does
    not write after."""
    lost, on_lost = lost_sink()
    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    taker: lr.ResumableSession | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="one more thing: blue door")
        store.commit_gate.open()
        store.commit_gate.arm()
        await bounded(store.commit_gate.entered.wait(), "the settle's commit")
        taker, tsession = await take_over(store, key)
        store.commit_gate.open()
        await bounded(asyncio.gather(suspending, return_exceptions=True), "suspend")
    finally:
        await cleanup(store, suspending)
    await until(lambda: bool(lost), "on_lost called", 1.0)
    assert isinstance(lost[0], lr.LeaseLost)
    info = await store.info(key)
    assert info is not None and info.owner == taker._owner
    v = await bounded(taker.checkpoint(), "the taker's checkpoint (not fenced)")
    assert v >= info.version
    await taker.aclose()
    await tsession.aclose()
    await session.aclose()


async def test_a_takeover_racing_aclose_reaches_on_lost(store: CountedStore, key: str) -> None:
    """aclose(): "Final save (unless suspended or the lease is lost)". The app's checkpoint
    is in flight when another worker takes over and the app calls aclose (a shutdown):
    the lease was not released by this session when the checkpoint met the takeover, so
    the checkpoint raises LeaseLost and on_lost is called; aclose returns, and the
    first worker writes nothing after."""
    lost, on_lost = lost_sink()
    session, rs, _ = await begin(store, key, on_lost=on_lost)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(rs._autosave.idle.wait(), "the turn autosaved")  # not the commit held
    session.history.add_message(role="user", content="for the checkpoint")
    store.commit_gate.arm()
    checkpointing = asyncio.ensure_future(rs.checkpoint())
    closing: asyncio.Future[Any] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the checkpoint's commit")
        taker, tsession = await take_over(store, key)
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        outcome = await bounded(
            asyncio.gather(checkpointing, return_exceptions=True), "the checkpoint"
        )
        await bounded(closing, "aclose")
    finally:
        await cleanup(store, checkpointing, *([closing] if closing else []))
    assert isinstance(outcome[0], lr.LeaseLost), f"checkpoint(): {outcome[0]!r}"
    await until(lambda: bool(lost), "on_lost called", 1.0)
    info = await store.info(key)
    assert info is not None and info.owner == taker._owner
    await bounded(taker.checkpoint(), "the taker's checkpoint (not fenced)")
    await taker.aclose()
    await tsession.aclose()
    await session.aclose()


# ------------------------- 3. suspend_after and the leave grace, autosave saving then


async def test_suspend_after_firing_while_autosave_commits_stores_it_suspended(
    store: CountedStore, key: str
) -> None:
    """``suspend_after``: a pause longer than it becomes a suspend. Autosave's commit of
    something new is in flight (a slow store) when it fires: the suspend's final save
    waits for it, then the session is suspended, lease free, with that item stored."""
    session, rs, _ = await begin(store, key, suspend_after=0.2)
    await bounded(rs.pause(), "pause")
    store.commit_gate.arm()
    session.history.add_message(role="user", content="while on hold: blue door")
    rs._autosave.trigger("turn")
    try:
        await bounded(store.commit_gate.entered.wait(), "autosave's commit")
        await until(lambda: rs._finishing is not None, "suspend_after fired", 2.0)
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        await until(lambda: rs.state == "suspended", f"suspended (it is {rs.state})", 2.0)
    finally:
        await cleanup(store)
    state, owner, v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None) and v == rs.version
    assert "while on hold: blue door" in await stored_said(store, key)
    await session.aclose()


async def test_leave_grace_while_autosave_commits_suspends_and_restores_on_rejoin(
    store: CountedStore, key: str
) -> None:
    """lifecycle: the caller gone past ``leave_grace`` suspends the session; back in the
    room, it is restored in place. The turn saved by autosave at that moment (its commit
    held in flight) is in the store and in the restored session."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=0.3)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    try:
        j.leave()
        await until(lambda: rs.state == "paused", f"paused on leaving ({rs.state})", 2.0)
        store.commit_gate.arm()
        session.history.add_message(role="user", content="while away: blue door")
        rs._autosave.trigger("turn")
        await bounded(store.commit_gate.entered.wait(), "autosave's commit")
        await until(lambda: rs._finishing is not None, "the leave grace's suspend", 2.0)
        await asyncio.sleep(0.05)
        store.commit_gate.open()
        await until(lambda: rs.state == "suspended", f"suspended (it is {rs.state})", 2.0)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        assert not j.shutdowns, f"the job was shut down: {j.shutdowns}"
        j.join()
        await until(lambda: rs.state == "active", f"restored on rejoin ({rs.state})", 2.0)
    finally:
        await cleanup(store)
    assert "the code is 4711" in said(session)
    assert "while away: blue door" in said(session)
    await j.shut_down(session)


# ------------------------------------------ 4. a remote command during the give-up


@pytest.mark.parametrize("window", ["release", "commit"])
@pytest.mark.parametrize("verb", ["pause", "resume", "suspend"])
async def test_a_remote_command_during_a_suspends_give_up_is_answered_promptly(
    store: CountedStore, key: str, verb: str, window: str
) -> None:
    """control.md: a command goes to the worker holding the lease; "A command not applied
    raises `CommandRefused` naming why". Sent while the worker's suspend releases the
    lease (its release, or its final save's commit, held in flight), it is answered
    (refused, saying why, or applied), not left to its timeout, and the suspend ends
    suspended, lease free."""
    session, rs, _ = await begin(store, key)
    gate = store.release_gate if window == "release" else store.commit_gate
    gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    sending: asyncio.Future[Any] | None = None
    try:
        await bounded(gate.entered.wait(), f"the suspend's {window}")
        remote = lr.control(store)
        sending = asyncio.ensure_future(getattr(remote, verb)(key, timeout=2.0))
        await asyncio.sleep(0.1)
        gate.open()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcome = await bounded(asyncio.gather(sending, return_exceptions=True), "command")
        took = loop.time() - t0
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending, *([sending] if sending else []))
    assert took < 1.0, f"the command waited {took:.2f}s: {outcome[0]!r}"
    if isinstance(outcome[0], BaseException):
        assert isinstance(outcome[0], lr.CommandRefused), repr(outcome[0])
    assert rs.state == "suspended"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    await session.aclose()


# ------------------------------- 5. a checkpoint during the next life's restore


async def test_a_checkpoint_during_a_restore_in_place_does_not_overwrite_the_conversation(
    key: str,
) -> None:
    """restore(): "After a `suspend` it may be called again, with ... the closed one";
    checkpoint(): "Commit a snapshot of the live session". An app's checkpoint (a timer,
    a webhook) that comes while the restore in place holds the new lease but has not yet
    read the snapshot (the history emptied, as restore asks) must not commit that
    empty, half-restored session under the new lease: either it is refused, or it saves
    the restored conversation. The store and the restored session keep every turn."""
    store = LoadGatedStore()
    try:
        session, rs, _ = await begin(store, key)
        await bounded(session.run(user_input="the code is 4711"), "a turn")
        await bounded(rs.suspend(), "suspend")
        v_suspended = rs.version
        session.history.items.clear()
        store.load_gate.arm()
        restoring = asyncio.ensure_future(rs.restore(session, default=Clerk))
        checkpointing: asyncio.Future[Any] | None = None
        try:
            await bounded(store.load_gate.entered.wait(), "the restore's read")
            assert rs._holder.lease is not None
            checkpointing = asyncio.ensure_future(rs.checkpoint())
            await asyncio.sleep(0.05)
            store.load_gate.open()
            agent = await bounded(restoring, "restore in place")
            outcome = await bounded(
                asyncio.gather(checkpointing, return_exceptions=True), "the checkpoint"
            )
        finally:
            store.load_gate.open()
            await cleanup(store, restoring, *([checkpointing] if checkpointing else []))
        info = await store.info(key)
        assert info is not None
        await bounded(session.start(agent), "restart")
        assert "the code is 4711" in said(session), (
            f"restored session lost the turn; the checkpoint: {outcome[0]!r}"
        )
        await bounded(rs.checkpoint(), "a checkpoint after the restore")
        await bounded(rs.aclose(), "aclose")
        assert "the code is 4711" in await stored_said(store, key), (
            f"the store lost the turn (version {v_suspended} -> {info.version}); "
            f"the checkpoint during the restore: {outcome[0]!r}"
        )
        await session.aclose()
    finally:
        store.load_gate.open()
        await store.aclose()


# ------------- 6. a takeover met by a checkpoint after the session's own close released
