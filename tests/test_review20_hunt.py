"""Hunt review20: a review, by tests, of 5701f93, d9f2ea3 and 24b71bb (session.py).

- 5701f93: `_require` refuses a save unless the state is active or paused (a restore in
  place holds the new lease before it has read the conversation);
- d9f2ea3/24b71bb: a suspend's or an end's release cancels autosave, then takes the save
  lock; `_give_up` sets the stored state (and clears ``_closing``) after an error close
  that waits for it; `_aclose_on_error` waits for the suspend (or the app's aclose).

Real AgentSessions (text mode, the scripted LLM), the gated MemoryStore of
test_review17_hunt (`CountedStore`). Every test bounded; every turn checked in the store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.agent_hooks import autosave as autosave_mod
from tests._gated import (
    CountedStore,
    Gate,
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
    closes,
    job_begin,
    llm_fails_for_good,
    said,
    stored_state,
)
from tests.test_review17_hunt import closed_down

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


store = store_fixture(LoadGatedStore)
key = key_fixture("r20")


async def stored_said(store: Any, key: str) -> list[str]:
    """What the user said, as a fresh worker restores it from the store (the store's
    lease must be free)."""
    fresh = make_text_session(ScriptedLLM(default="noted"))
    other = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    await bounded(other.restore(fresh, default=Clerk), "a fresh restore")
    out = said(fresh)
    await bounded(other.aclose(), "the fresh one's close")
    return out


async def turn_autosaved(session: Any, rs: lr.ResumableSession, text: str) -> None:
    """A user turn, then wait until autosave has committed after it (no checkpoint of
    the test's: autosave alone)."""
    before = rs.version
    await bounded(session.run(user_input=text), f"the turn {text!r}")
    await until(
        lambda: rs.version > before and rs._autosave.idle.is_set(),
        f"autosave stored {text!r} (version {rs.version}, state {rs.state})",
        3.0,
    )


async def error_close_during_commit(store: CountedStore, model: Any, reasons: list[Any]) -> None:
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await asyncio.sleep(0.02)
    store.commit_gate.open()


# ------------- 1. a restore right after a suspend that met LiveKit's error close


@pytest.mark.parametrize("where", ["in_place", "new_session"])
async def test_a_restore_right_after_suspend_returned_over_an_error_close_stays_restored(
    store: LoadGatedStore, key: str, where: str
) -> None:
    """suspend(): "A later `restore` under the same key ... continues from here";
    d9f2ea3: "a suspend whose final save met LiveKit's error close says suspended when
    it returns, and restores at once". The app restores right when suspend() returns
    (same task, no await between). The error close's task (`_aclose_on_error`), still
    waiting on the suspend's ``_finishing`` future, wakes a loop turn or two later: it
    must not touch the session restored meanwhile (it finds ``_stored_as`` None, takes
    it for a suspend that failed, and closes the restored session: a final save marked
    suspended, the lease released, autosave and the listeners detached, the state
    suspended). The restored session must stay active, held, and save its turns."""
    session, rs, model = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(rs._autosave.idle.wait(), "the turn autosaved")  # not the commit held
    reasons = await closes(session)
    store.commit_gate.arm()
    helper = asyncio.ensure_future(error_close_during_commit(store, model, reasons))
    target = session if where == "in_place" else make_text_session(ScriptedLLM(default="noted"))
    try:
        async with asyncio.timeout(3.0):
            await rs.suspend()
            if where == "in_place":
                session.history.items.clear()
            agent = await rs.restore(target, default=Clerk)
        await bounded(helper, "helper")
        await bounded(target.start(agent), "start")
        await asyncio.sleep(0.2)  # the error close's task has long woken by now
        state_then, lease_then = rs.state, rs._holder.lease
        await bounded(target.run(user_input="and my pin is 1234"), "a turn after the restore")
        await asyncio.sleep(0.3)  # autosave's debounce is 0.01 s
        _s, owner, _v = await stored_state(store, key)
    finally:
        await cleanup(store, helper)
    assert state_then == "active", f"restored, then rs.state {state_then!r}"
    assert lease_then is not None, "restored, then the lease was released under it"
    assert owner is not None, "the restored session's lease is free in the store"
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    assert "the code is 4711" in got and "and my pin is 1234" in got, got
    await target.aclose()
    if target is not session:
        await session.aclose()


# ----------------------- 2. 5701f93: saves that must still happen (active, paused)


async def test_autosave_and_checkpoints_through_a_pause_resume_cycle_store_every_turn(
    store: LoadGatedStore, key: str
) -> None:
    """pause(): "state saved"; resume(): "the state saved before it returns"; checkpoint
    during the pause and right after the resume; autosave's saves in the window after
    resume(). No save refused, no autosave failure, every turn stored, and the stored
    state follows (paused, then active)."""
    session, rs, _ = await begin(store, key)
    await bounded(rs.pause(), "pause")
    assert (await stored_state(store, key))[0] == "paused"
    session.history.add_message(role="user", content="said while on hold")
    await bounded(rs.checkpoint(), "a checkpoint while paused")
    assert (await stored_state(store, key))[0] == "paused"
    resuming = asyncio.ensure_future(rs.resume())
    # the app's checkpoint in the very window of the resume (its state set, its save due)
    await until(lambda: rs.state == "active", "resumed")
    v = await bounded(rs.checkpoint(), "a checkpoint as resume() runs")
    await bounded(resuming, "resume")
    assert (await stored_state(store, key))[0] == "active" and v <= rs.version
    await turn_autosaved(session, rs, "back again: blue door")
    await turn_autosaved(session, rs, "and the red one")
    assert rs._autosave.failures == 0
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    for t in ("my name is Ada", "said while on hold", "back again: blue door", "and the red one"):
        assert t in got, (t, got)
    await session.aclose()


async def test_a_checkpoint_during_a_handoff_is_stored(store: LoadGatedStore, key: str) -> None:
    """checkpoint(): "Commit a snapshot of the live session now" — during a handoff
    (`update_agent`, its transition under way) too: the state is untouched by it."""
    session, rs, _ = await begin(store, key)
    session.update_agent(Clerk())
    v = await bounded(rs.checkpoint(), "a checkpoint during the handoff")
    await asyncio.sleep(0.05)
    await bounded(session.run(user_input="after the handoff"), "a turn")
    v2 = await bounded(rs.checkpoint(), "a checkpoint after the handoff")
    assert v2 > v
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    assert "my name is Ada" in got and "after the handoff" in got, got
    await session.aclose()


@pytest.mark.parametrize("where", ["in_place", "new_session"])
async def test_saves_right_after_a_restore_are_taken(
    store: LoadGatedStore, key: str, where: str
) -> None:
    """After a suspend, restore() "may be called again, with a new `AgentSession` or the
    closed one". The app's checkpoint right after restore() returned (before start: the
    version, nothing new), right after start, and autosave's saves after: none refused,
    every turn stored."""
    session, rs, _ = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(rs.suspend(), "suspend")
    if where == "in_place":
        target = session
        session.history.items.clear()
    else:
        target = make_text_session(ScriptedLLM(default="noted"))
    agent = await bounded(rs.restore(target, default=Clerk), "restore")
    v0 = await bounded(rs.checkpoint(), "a checkpoint before start")
    assert v0 == rs.version
    await bounded(target.start(agent), "start")
    await bounded(rs.checkpoint(), "a checkpoint right after start")
    await turn_autosaved(target, rs, "and my pin is 1234")
    assert rs._autosave.failures == 0 and rs.state == "active"
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    assert "the code is 4711" in got and "and my pin is 1234" in got, got
    await target.aclose()
    if target is not session:
        await session.aclose()


async def test_a_checkpoint_as_a_restore_in_place_finishes_is_taken(
    store: LoadGatedStore, key: str
) -> None:
    """The restore in place has read the conversation and made the session active, and
    still waits for its announcement and the command inbox: a save then (a tool's, a
    webhook's) is of the restored conversation and is taken (not refused as
    'suspended'); the restore ends normally and every turn is stored."""
    session, rs, _ = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(rs.suspend(), "suspend")
    session.history.items.clear()
    restoring = asyncio.ensure_future(rs.restore(session, default=Clerk))
    outcome: list[Any] = []
    try:
        await until(lambda: rs.state == "active" or restoring.done(), "the restore's attach")
        if not restoring.done():
            outcome = await bounded(
                asyncio.gather(rs.checkpoint(), return_exceptions=True), "checkpoint"
            )
        agent = await bounded(restoring, "restore in place")
    finally:
        await cleanup(store, restoring)
    if outcome:
        assert isinstance(outcome[0], int), f"checkpoint as the restore finished: {outcome[0]!r}"
    await bounded(session.start(agent), "restart")
    await turn_autosaved(session, rs, "and my pin is 1234")
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    assert "the code is 4711" in got and "and my pin is 1234" in got, got
    await session.aclose()


async def test_a_periodic_checkpoint_across_suspend_and_restore_in_place_loses_nothing(
    store: LoadGatedStore, key: str
) -> None:
    """An app checkpointing on a timer (every few ms) through a suspend and a restore in
    place whose read is held (5701f93's window): the saves in the window are refused
    (RuntimeError), none stores the emptied session; once restored the timer's saves
    are taken again (not refused for good), autosave saves the turns after, and the
    store holds every turn."""
    session, rs, _ = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    results: list[Any] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            try:
                results.append(await rs.checkpoint())
            except Exception as e:
                results.append(e)
            await asyncio.sleep(0.005)

    tick = asyncio.ensure_future(ticker())
    restoring: asyncio.Future[Any] | None = None
    try:
        await asyncio.sleep(0.03)
        await bounded(rs.suspend(), "suspend")
        v_suspended = rs.version
        session.history.items.clear()
        store.load_gate.arm()
        restoring = asyncio.ensure_future(rs.restore(session, default=Clerk))
        await bounded(store.load_gate.entered.wait(), "the restore's read")
        n = len(results)
        await asyncio.sleep(0.05)
        in_window = results[n:]
        _s, _o, v_window = await stored_state(store, key)
        store.load_gate.open()
        agent = await bounded(restoring, "restore in place")
        await bounded(session.start(agent), "restart")
        n2 = len(results)
        await asyncio.sleep(0.05)
        after = results[n2:]
        await turn_autosaved(session, rs, "and my pin is 1234")
    finally:
        stop.set()
        store.load_gate.open()
        await cleanup(store, tick, *([restoring] if restoring else []))
    assert in_window and all(isinstance(r, RuntimeError) for r in in_window), in_window
    assert v_window == v_suspended, "a save in the restore's window was stored"
    assert after and all(isinstance(r, int) for r in after), after
    assert rs._autosave.failures == 0
    await bounded(rs.aclose(), "aclose")
    got = await stored_said(store, key)
    assert "the code is 4711" in got and "and my pin is 1234" in got, got
    await session.aclose()


# ---------------------- 3. d9f2ea3/24b71bb: the release lock, bounded closes, state


async def test_aclose_during_a_suspends_stuck_final_save_is_bounded(
    store: LoadGatedStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose(): "A store that cannot be reached is retried for up to
    `CLOSE_SAVE_BUDGET` seconds" — with a suspend's final save stuck on the frozen store
    (no error close): aclose ends within its budget, the lease free, the state closed;
    once the store answers, the suspend ends, the state still closed, nobody told of a
    takeover, the store holding the conversation with no owner."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.3)
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        t0 = time.monotonic()
        await bounded(rs.aclose(), "aclose", 4.0)
        took = time.monotonic() - t0
        _s, owner, v_closed = await stored_state(store, key)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(suspending, return_exceptions=True), "suspend")
        await asyncio.sleep(0.05)
    finally:
        await cleanup(store, suspending)
    assert took < 0.3 + autosave_mod.CLOSE_RELEASE_WAIT + 0.5, f"aclose took {took:.2f} s"
    assert owner is None
    assert rs.state == "closed", f"{rs.state!r}; the suspend: {outcome[0]!r}"
    assert not lost, lost
    # the suspend's commit, sent before the release, may land after it (a store fences
    # by epoch): then it is the suspend's final save, marked suspended, and no more
    state, owner, v = await stored_state(store, key)
    assert owner is None and (v == v_closed or (v == v_closed + 1 and state == "suspended"))
    assert "my name is Ada" in await stored_said(store, key)
    await session.aclose()


async def test_a_suspend_waits_for_the_apps_checkpoint_and_stores_what_it_drafted(
    store: LoadGatedStore, key: str
) -> None:
    """24b71bb: "a suspend's or an end's release takes the save lock, so an app's
    checkpoint under way ends first". The checkpoint's commit (something new in it)
    is in flight as the suspend reaches its release: the suspend waits, the checkpoint
    lands (no RuntimeError, no on_lost), the store holds its item marked suspended
    with no owner, and rs.state says suspended."""
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    checkpointing: asyncio.Future[int] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        checkpointing = asyncio.ensure_future(rs.checkpoint())
        await until(lambda: bool(rs._lock._waiters), "the checkpoint waits its turn")
        session.history.add_message(role="user", content="a tool's late word: blue door")
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        outcome = await bounded(asyncio.gather(checkpointing, return_exceptions=True), "ckpt")
    finally:
        await cleanup(store, suspending, *([checkpointing] if checkpointing else []))
    assert not isinstance(outcome[0], BaseException), repr(outcome[0])
    assert rs.state == "suspended" and not lost
    state, owner, v = await stored_state(store, key)
    assert (state, owner, v) == ("suspended", None, rs.version)
    assert "a tool's late word: blue door" in await stored_said(store, key)
    await session.aclose()


@pytest.mark.parametrize("what", ["suspend", "end"])
async def test_an_error_close_during_the_final_save_then_aclose_after_it_returned(
    store: LoadGatedStore, key: str, what: str
) -> None:
    """LiveKit's error close during the final save, then the app's aclose right after
    suspend()/end() returned (before the error close's task woke): closed, the store
    as the suspend/end left it, no owner; the error close's task ends (no hang)."""
    session, rs, model = await begin(store, key)
    await bounded(session.run(user_input="the code is 4711"), "a turn")
    await bounded(rs._autosave.idle.wait(), "the turn autosaved")  # not the commit held
    reasons = await closes(session)
    store.commit_gate.arm()
    helper = asyncio.ensure_future(error_close_during_commit(store, model, reasons))
    try:
        async with asyncio.timeout(3.0):
            await (rs.suspend() if what == "suspend" else rs.end())
            closing = rs.aclose()
            await closing
        await bounded(helper, "helper")
        await asyncio.sleep(0.1)
    finally:
        await cleanup(store, helper)
    assert rs.state == "closed"
    assert closed_down(rs)
    state, owner, v = await stored_state(store, key)
    assert (state, owner, v) == ({"suspend": "suspended", "end": "ended"}[what], None, rs.version)
    if what == "suspend":
        assert "the code is 4711" in await stored_said(store, key)
    await session.aclose()


async def test_in_a_job_an_error_close_during_the_final_save_then_rejoin_saves_turns(
    store: LoadGatedStore, key: str
) -> None:
    """In a job: the app's suspend meets LiveKit's error close during its final save;
    the caller leaves and comes back: restored in place, and the turns after are
    autosaved (the error close's task did not undo the restore), the job not shut
    down."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    helper = asyncio.ensure_future(error_close_during_commit(store, model, reasons))
    try:
        await bounded(helper, "helper")
        await bounded(suspending, "suspend")
        j.leave()
        j.join()
        await until(lambda: rs.state == "active" and rs._started(), f"restored ({rs.state})")
        await asyncio.sleep(0.1)
        assert rs.state == "active" and rs._holder.lease is not None
        await turn_autosaved(session, rs, "and my pin is 1234")
    finally:
        await cleanup(store, suspending, helper)
    assert not j.shutdowns, j.shutdowns
    await j.shut_down(session)
    got = await stored_said(store, key)
    assert "my name is Ada" in got and "and my pin is 1234" in got, got


# ------- 4. a restore in the give-up's tail (state suspended, the suspend not returned)


class LoadGatedStoreEvents(LoadGatedStore):
    """`LoadGatedStore` that publishes events (an `EventPublisher`); the publication of
    ``held_event`` waits at ``publish_gate``."""

    def __init__(self, held_event: str = "suspended") -> None:
        super().__init__()
        self.publish_gate = Gate()
        self.held_event = held_event
        self.events: list[str] = []

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        if event == self.held_event:
            await self.publish_gate.passing()
        self.events.append(event)


@pytest.mark.parametrize(
    ("error_close", "where"),
    [(True, "new_session"), (True, "in_place"), (False, "new_session")],
)
async def test_a_restore_once_the_state_says_suspended_is_not_undone_by_the_suspends_tail(
    key: str, error_close: bool, where: str
) -> None:
    """923975c/d9f2ea3: the state of a suspend becomes the session's "once its lease is
    released ... a caller who sees it may restore the key at once". The app sees
    ``rs.state == "suspended"`` and restores into a new AgentSession while the suspend
    still runs its tail (its announcement held at the store). With LiveKit's error
    close during the final save, `_give_up` cleared ``_closing`` so the restore is
    taken; then the suspend returns, and the error close's task, which waited on it,
    finds ``_stored_as`` None (the restore's) and closes the restored session as if
    the suspend had failed: its final save marked suspended, the lease released,
    autosave and the listeners off. In place (the AgentSession LiveKit closed on errors:
    not running, its close not yet started by the tail) the restore is taken too, and
    the tail then closes the restarted session. The restored session must stay active,
    running and held, and its turns stored. (Without the error close a restore into a
    new session is left alone: kept as coverage.)"""
    store = LoadGatedStoreEvents()
    suspending: asyncio.Future[Any] | None = None
    helper: asyncio.Future[Any] | None = None
    model = ScriptedLLM(default="noted")
    session = make_text_session(model)
    target = session if where == "in_place" else make_text_session(ScriptedLLM(default="noted"))
    try:
        rs = lr.ResumableSession(store, key, registry=REGISTRY, debounce=0.01)
        agent = await bounded(rs.restore(session, default=Clerk), "restore")
        await bounded(session.start(agent), "start")
        await bounded(session.run(user_input="my name is Ada"), "a turn")
        await bounded(session.run(user_input="the code is 4711"), "a turn")
        await bounded(rs._autosave.idle.wait(), "the turn autosaved")  # not the commit held
        reasons = await closes(session)
        store.publish_gate.arm()
        if error_close:
            store.commit_gate.arm()
            helper = asyncio.ensure_future(error_close_during_commit(store, model, reasons))
        suspending = asyncio.ensure_future(rs.suspend())
        await until(lambda: rs.state == "suspended", f"the state says suspended ({rs.state})")
        assert not suspending.done()
        if where == "in_place":
            target.history.items.clear()
        restoring = asyncio.ensure_future(rs.restore(target, default=Clerk))
        await asyncio.sleep(0.05)  # the restore waits for the suspend's tail (its announcement)
        store.publish_gate.open()
        agent = await bounded(restoring, "restore on seeing suspended")
        await bounded(target.start(agent), "start")
        await bounded(asyncio.gather(suspending, return_exceptions=True), "the suspend's tail")
        if helper is not None:
            await bounded(helper, "helper")
        await asyncio.sleep(0.2)
        state_then, lease_then, running = rs.state, rs._holder.lease, rs._started()
        _s, owner, _v = await stored_state(store, key)
        assert state_then == "active", f"restored, then rs.state {state_then!r}"
        assert running, "the restored AgentSession was closed under it"
        assert lease_then is not None and owner is not None, "the restored lease was released"
        await turn_autosaved(target, rs, "and my pin is 1234")
        await bounded(rs.aclose(), "aclose")
        got = await stored_said(store, key)
        assert "the code is 4711" in got and "and my pin is 1234" in got, got
    finally:
        for g in (store.commit_gate, store.publish_gate, store.release_gate):
            g.open()
        for t in (suspending, helper):
            if t is not None and not t.done():
                t.cancel()
        await asyncio.gather(
            *[t for t in (suspending, helper) if t is not None], return_exceptions=True
        )
        await target.aclose()
        await session.aclose()
        await store.aclose()
