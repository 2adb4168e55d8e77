"""Hunt review18: a review of 24b71bb (session.py).

24b71bb: (1) `_aclose_on_error` waits for a suspend or an end under way; once it stored
its state the session is left as it stored it (``rs.state`` suspended/ended, ``_closing``
None, restorable in place) unless the app's aclose came meanwhile; (2) `_give_up` takes
the save lock around `_detach_and_release`; (3) `_require` says "being given up".

Real `AgentSession`s (text mode, the scripted LLM); the gated `MemoryStore` of
test_review17_hunt (`CountedStore`), so each window is entered deterministically.
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
    bounded,
    key_fixture,
    sigterm_kept,
    store_fixture,
    until,
)
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import QUIET, Clerk
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
from tests.test_review17_hunt import into_the_final_save as into_the_final_save_17

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


store = store_fixture(CountedStore)
key = key_fixture("r18")


async def error_close_during_commit(store: CountedStore, model: Any, reasons: list[Any]) -> None:
    """Once a commit waits at the gate: LiveKit closes the session on errors, then the
    commit passes."""
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await asyncio.sleep(0.02)
    store.commit_gate.open()


# ------------------------------- 1. what a suspend that returned leaves behind


async def test_suspend_returned_says_suspended_and_restores_at_once_after_an_error_close(
    store: CountedStore, key: str
) -> None:
    """suspend(): "final snapshot, lease released, session closed"; restore(): "After a
    `suspend` it may be called again ... with ... the closed one". The app awaits
    `rs.suspend()` and, once it returns, reads `rs.state` and restores in place; LiveKit
    closed the session on errors while the final save was on its way (24b71bb (1):
    the session is left "as it stored it"). Right when suspend() returns the session
    must say suspended and a restore in place must be taken, not refused (the error
    close's task, which sets the state, runs only a loop turn or two later)."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    store.commit_gate.arm()
    helper = asyncio.ensure_future(error_close_during_commit(store, model, reasons))
    try:
        async with asyncio.timeout(3.0):
            await rs.suspend()  # awaited in this very task
        state_now, closing_now = rs.state, (rs._closing, rs._closing and rs._closing.done())
        stored, owner, _v = await stored_state(store, key)
        assert (stored, owner) == ("suspended", None)
        restore_error: BaseException | None = None
        session.history.items.clear()
        try:
            agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
        except RuntimeError as e:
            restore_error = e
        await bounded(helper, "helper")
    finally:
        await cleanup(store, helper)
    assert state_now == "suspended", (
        f"suspend() returned; rs.state {state_now!r}, _closing {closing_now!r}; "
        f"the restore in place: {restore_error!r}"
    )
    assert restore_error is None, f"restore right after suspend() returned: {restore_error}"
    await bounded(session.start(agent), "restart")
    assert rs.resumed and "my name is Ada" in said(session)
    await rs.aclose()
    await session.aclose()


# --------------------- 2. the save lock at the release: whose save holds it, how long


async def into_the_settle_failing_with(
    store: CountedStore, rs: lr.ResumableSession, session: Any, queue: Any
) -> asyncio.Future[int]:
    """A suspend whose settle's save fails (a store blip: "A failure here leaves the
    final save standing"), with another save (``queue()``) queued behind it on the save
    lock: that save takes the lock as the suspend goes on to its release, and its own
    commit (the settle's, kept pending and sent again first) is held at the gate."""
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    session.history.add_message(role="user", content="one more thing: blue door")
    store.commit_gate.open()
    store.commit_gate.arm()  # the final save passes; the settle's save is held
    await bounded(store.commit_gate.entered.wait(), "the settle's commit")
    while store.reasons[-1] != "suspend":
        # autosave's save (the suspend's own events, its debounce late under load) took
        # the lock between the final save and the settle: let it through
        store.commit_gate.open()
        store.commit_gate.arm()
        await bounded(store.commit_gate.entered.wait(), "the settle's commit")
    queue()
    await until(lambda: bool(rs._lock._waiters), "a save waits behind the settle")
    store.fail_next = True
    store.commit_gate.open()
    store.commit_gate.arm()  # the settle's save fails; the next commit is held
    await until(
        lambda: store.commit_gate.entered.is_set() or suspending.done(),
        "the queued save's commit (or the suspend done)",
    )
    return suspending


async def test_a_suspend_is_not_held_by_autosaves_commit_stuck_at_its_release(
    store: CountedStore, key: str
) -> None:
    """suspend(): "final snapshot, lease released, session closed"; autosave "never
    blocks the voice loop" and `Autosave.aclose` stops it "without a final save (the
    session takes that itself)". Before 24b71bb the release cancelled autosave's save
    under way (its commit kept pending); since, the release waits for the save lock
    first, which autosave's own save holds: a suspend whose final save is stored waits,
    lease held, as long as autosave's commit hangs on the store (a frozen Redis: tens
    of seconds; here, until the gate opens). The suspend must end (suspended, lease
    free) without waiting for autosave's stuck commit."""
    session, rs, _ = await begin(store, key)
    suspending = await into_the_settle_failing_with(
        store, rs, session, lambda: rs._autosave.trigger("manual")
    )
    try:
        done, _ = await asyncio.wait({suspending}, timeout=1.0)
        state_then = rs.state
        _s, owner_then, _v = await stored_state(store, key)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert done, (
        f"the suspend, its final save stored, still waits for autosave's commit after 1 s "
        f"(rs.state {state_then!r}, lease owner {owner_then!r})"
    )
    assert rs.state == "suspended"


async def test_aclose_while_a_suspends_release_waits_for_a_stuck_checkpoint_is_bounded(
    store: CountedStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """failure-model.md: `aclose()` "with the store frozen ... A close ends within 6 s
    whatever the store does" (`CLOSE_SAVE_BUDGET`, then the release). An app's
    `checkpoint()` holds the save lock, its commit stuck on the store, while a suspend
    (its final save stored) waits for the lock to release (24b71bb (2)); the job shuts
    down (the app's `aclose()`): it must end within its budget (here cut to 0.3 s: at
    most 0.3 + `CLOSE_RELEASE_WAIT`), the lease free and `rs.state` closed; once the
    stuck commit ends, nobody is told the session was taken over (`on_lost`)."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.3)
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    checkpoints: list[asyncio.Future[int]] = []
    suspending = await into_the_settle_failing_with(
        store, rs, session, lambda: checkpoints.append(asyncio.ensure_future(rs.checkpoint()))
    )
    try:
        assert not suspending.done(), "the suspend waits for the app's checkpoint"
        started = time.monotonic()
        await bounded(rs.aclose(), "aclose", 5.0)
        took = time.monotonic() - started
        _s, owner, _v = await stored_state(store, key)
        state_after_close = rs.state
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await bounded(asyncio.gather(*checkpoints, return_exceptions=True), "checkpoint")
        await asyncio.sleep(0.05)
    finally:
        await cleanup(store, suspending, *checkpoints)
    assert took < 0.3 + autosave_mod.CLOSE_RELEASE_WAIT + 0.5, f"aclose took {took:.2f} s"
    assert owner is None, f"the lease is still held after aclose: {owner}"
    assert state_after_close == "closed"
    assert rs.state == "closed"
    assert not lost, f"on_lost called though nobody took the session over: {lost}"
    stored, owner, _v = await stored_state(store, key)
    assert (stored, owner) == ("suspended", None)
    await session.aclose()


# ------------------- 3. an error close waiting for a suspend stuck on a frozen store


@pytest.mark.parametrize("what", ["suspend", "end"])
async def test_aclose_after_an_error_close_during_a_stuck_final_save_is_bounded(
    store: CountedStore, key: str, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """failure-model.md: `aclose()` "with the store frozen (a stopped Redis: every call
    waits out the client's timeouts and retries) ... A close ends within 6 s whatever
    the store does"; lifecycle.md: the job's shutdown saves and releases "well inside
    the 10 s LiveKit leaves". A suspend's (or an end's) final save hangs on the frozen
    store; LiveKit closes the session on errors meanwhile (24b71bb (1): the error close
    now waits for the suspend under way, unbounded); then the job shuts down (the app's
    `aclose()`, which waits for the error close under way). The aclose must end within
    its budget (cut to 0.3 s here: 0.3 + `CLOSE_RELEASE_WAIT` at most) and free the
    lease, not wait as long as the store does."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.3)
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    store.commit_gate.arm()
    finishing = asyncio.ensure_future(rs.suspend() if what == "suspend" else rs.end())
    closing: asyncio.Future[None] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), f"the {what}'s final save")
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await until(lambda: rs._closing is not None, "the hooks heard the error close")
        started = time.monotonic()
        closing = asyncio.ensure_future(rs.aclose())
        done, _ = await asyncio.wait({closing}, timeout=3.0)
        took = time.monotonic() - started
        _s, owner, _v = await stored_state(store, key)
    finally:
        store.commit_gate.open()
        await cleanup(store, finishing, *([closing] if closing else []))
    assert done, "aclose() still waits after 3 s (the store frozen; budget 0.3 s)"
    assert took < 0.3 + autosave_mod.CLOSE_RELEASE_WAIT + 0.5, f"aclose took {took:.2f} s"
    assert owner is None, f"aclose returned with the lease held by {owner}"
    assert rs.state == "closed"
    await session.aclose()


# ------------------------------------------------ 4. in a job: rejoin, the room


def shown(j: Any) -> list[str]:
    from livekit_resume.agent_hooks.room import ATTR_STATE

    return [
        c.args[0][ATTR_STATE]
        for c in j.room.local_participant.set_attributes.call_args_list
        if c.args and ATTR_STATE in c.args[0]
    ]


async def test_two_error_closes_in_a_job_each_restored_on_rejoin_and_shown(
    store: CountedStore, key: str
) -> None:
    """failure-model.md: after LiveKit's error close the session "is given up as a
    suspend (`rs.state` `suspended`, the room shown so)" and "`resumable_job` restores
    it in place when the caller comes back"; 24b71bb (1): an error close during a
    suspend's final save leaves it as the suspend stored it. First that (the stored
    branch, which clears ``_closing`` itself), then, restored on a rejoin, a second
    error close (the plain branch): each time the room shows suspended, a rejoin
    restores the conversation, and the job is not shut down."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    suspending = await into_the_final_save_17(store, rs)
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "suspended"
    await until(lambda: shown(j)[-1:] == ["suspended"], f"the room shows suspended {shown(j)}")
    j.leave()
    j.join()
    await until(lambda: rs.state == "active" and rs._started(), f"restored on rejoin ({rs.state})")
    await until(lambda: shown(j)[-1:] == ["active"], f"the room shows active {shown(j)}")
    await bounded(session.run(user_input="and my pin is 1234"), "a turn after the restore")
    # the second error close: no suspend under way
    n = len(reasons)
    llm_fails_for_good(model)
    await until(lambda: len(reasons) > n, "LiveKit closed the session again")
    await until(lambda: rs.state == "suspended" and closed_down(rs), f"given up again ({rs.state})")
    await until(lambda: shown(j)[-1:] == ["suspended"], f"the room shows suspended {shown(j)}")
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    j.leave()
    j.join()
    await until(lambda: rs.state == "active", f"restored on the second rejoin ({rs.state})")
    assert "my name is Ada" in said(session) and "and my pin is 1234" in said(session)
    assert not j.shutdowns, j.shutdowns
    await j.shut_down(session)


async def test_an_error_close_during_an_ends_final_save_then_the_jobs_shutdown(
    store: CountedStore, key: str
) -> None:
    """lifecycle.md: `end()` "saves a last snapshot marked `ended`, releases the lease
    and closes the session ... An ended conversation is never resumed: a later call
    under the key starts a new conversation". LiveKit's error close during the end's
    final save (24b71bb (1): left as the end stored it, ``ended``), then the job's
    shutdown: it ends promptly, the store says ended with no owner, a caller joining
    then is not restored in this job, and the next job for the key starts afresh."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    ending = await into_the_final_save_17(store, rs, "end")
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(ending, "end")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, ending)
    assert rs.state == "ended"
    await bounded(j.shut_down(session), "the job's shutdown")
    assert rs.state == "closed"  # type: ignore[comparison-overlap]
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None)
    j.leave()
    j.join()
    await asyncio.sleep(0.05)
    assert rs.state == "closed"
    j2 = type(j)(key)
    session2 = make_text_session(ScriptedLLM(default="hello"))
    rs2 = await bounded(
        lr.resumable_job(
            j2.ctx,
            session2,
            registry=rs._registry,
            default=Clerk,
            store=store,
            room_options=QUIET,
            leave_grace=None,
        ),
        "the next job",
    )
    assert not rs2.resumed
    assert "my name is Ada" not in said(session2)
    await j2.shut_down(session2)


async def test_a_checkpoint_queued_behind_a_suspends_release_is_refused_not_lost(
    store: CountedStore, key: str
) -> None:
    """24b71bb (2)/(3): an app's `checkpoint()` that comes while a suspend releases the
    lease (under the save lock) waits, then finds the session given up: a
    `RuntimeError` saying so, not `LeaseLost` (``on_lost`` "when a save ... finds the
    session taken over by another worker": nobody did), nothing written after the
    suspend's release, and the session restorable."""
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    checkpointing: asyncio.Future[int] | None = None
    try:
        await bounded(store.release_gate.entered.wait(), "the suspend's release")
        v_released = (await stored_state(store, key))[2]
        session.history.add_message(role="user", content="late words")
        checkpointing = asyncio.ensure_future(rs.checkpoint())
        await asyncio.sleep(0.02)
        store.release_gate.open()
        await bounded(suspending, "suspend")
        outcome = await bounded(asyncio.gather(checkpointing, return_exceptions=True), "checkpoint")
        await asyncio.sleep(0.05)
    finally:
        await cleanup(store, suspending, *([checkpointing] if checkpointing else []))
    err = outcome[0]
    assert isinstance(err, RuntimeError) and not isinstance(err, lr.LeaseLost), repr(err)
    assert "given up" in str(err) or "suspended" in str(err), str(err)
    assert not lost, lost
    state, owner, v = await stored_state(store, key)
    assert (state, owner, v) == ("suspended", None, v_released)
    fresh = make_text_session(ScriptedLLM(default="noted"))
    rs2 = lr.ResumableSession(store, key, registry=rs._registry)
    await bounded(rs2.restore(fresh, default=Clerk), "restore elsewhere")
    assert rs2.resumed and "my name is Ada" in said(fresh)
    await rs2.aclose()
