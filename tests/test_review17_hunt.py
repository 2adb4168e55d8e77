"""Hunt review17: a review of a0c331d (session.py).

a0c331d: (1) `_give_up` sets `rs.state` to the suspend's/end's state after its release
only if no close came meanwhile (``self._closing is None``); (2) `_attach`'s ``on_close``
ignores LiveKit closing the AgentSession once a suspend's/end's final save is stored
(``self._stored_as is not None``).

Here: every ordering of a suspend or an end with LiveKit's close (normal, error), the
app's `aclose()`, the job's shutdown and a rejoin, landing before the final save is
stored, during it, during the settle, during the release, after; and an app
`checkpoint()` racing the suspend's release. Real `AgentSession`s (text mode, the
scripted LLM); a `MemoryStore` whose calls are held at gates (test_review14_hunt's
`GatedStore`), so each window is entered deterministically.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents.voice.events import CloseReason

import livekit_resume as lr
from tests._gated import (
    CountedStore,
    bounded,
    key_fixture,
    sigterm_kept,
    store_fixture,
    until,
)
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import Clerk
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


store = store_fixture(CountedStore)
key = key_fixture("r17")


def closed_down(rs: lr.ResumableSession) -> bool:
    return rs._closing is None or rs._closing.done()


async def into_the_final_save(
    store: CountedStore, rs: lr.ResumableSession, what: str = "suspend"
) -> asyncio.Future[int]:
    """A suspend (or end) whose final save's commit is held at the store's gate."""
    store.commit_gate.arm()
    task = asyncio.ensure_future(rs.suspend() if what == "suspend" else rs.end())
    await bounded(store.commit_gate.entered.wait(), f"the {what}'s final save")
    info = await store.info(rs.key)
    assert info is not None and info.info.get("state") != "suspended"  # not stored yet
    return task


# ------------------------------------ 1. an error close during the final save


async def test_an_error_close_during_a_suspends_final_save_leaves_it_restorable(
    store: CountedStore, key: str
) -> None:
    """suspend(): "final snapshot, lease released, session closed" and `restore` "after
    a `suspend` ... may be called again" (with the closed session); failure-model.md: a
    LiveKit error close is "given up as a suspend (`rs.state` `suspended`...)". LiveKit
    closing the session on errors while the suspend's final save is on its way (before
    it is stored: ``_stored_as`` still None, so a0c331d's on_close acts on it) must end
    the same way: suspended, and restorable in place. `_aclose_on_error` leaves it to
    the suspend under way (``given_up``) and keeps ``_closing`` set; `_give_up` then,
    since a0c331d, skips its state as "an aclose came meanwhile": the session says
    closed and refuses every restore."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    suspending = await into_the_final_save(store, rs)
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        assert reasons == [CloseReason.ERROR]
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, suspending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "suspended", f"suspend() returned, the store says suspended: {rs.state}"
    session.history.items.clear()
    try:
        agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    except RuntimeError as e:
        pytest.fail(f"suspended (error close during its final save), restore refuses: {e}")
    await bounded(session.start(agent), "restart")
    assert rs.resumed and "my name is Ada" in said(session)
    await rs.aclose()
    await session.aclose()


async def test_an_error_close_during_a_jobs_suspend_final_save_is_restored_on_rejoin(
    store: CountedStore, key: str
) -> None:
    """lifecycle.md: "a caller who joins while the final snapshot of a suspend is being
    written has the conversation restored in place once it is written"; failure-model:
    a session LiveKit closed on errors is given up as a suspend and "`resumable_job`
    restores it in place when the caller comes back to the room". Both at once (the
    error close lands during the suspend's final save): the caller rejoining must find
    the conversation back in this job."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    suspending = await into_the_final_save(store, rs)
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, suspending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    j.leave()
    j.join()
    await until(lambda: rs.state == "active", f"restored on rejoin (it is {rs.state})", 2.0)
    assert "my name is Ada" in said(session)
    assert not j.shutdowns
    await j.shut_down(session)


async def test_an_error_close_during_an_ends_final_save_leaves_it_ended(
    store: CountedStore, key: str
) -> None:
    """end(): "a last snapshot marked ``ended``, the lease released, the session
    closed"; `state` lists ``ended``. An error close during the end's final save: the
    end returns, the store says ended with no owner, and `rs.state` says ``ended``
    (not ``closed``: the end was neither overtaken by an app's `aclose()` nor a
    shutdown; LiveKit's error close was the end's own close)."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    ending = await into_the_final_save(store, rs, "end")
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(ending, "end")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, ending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None)
    assert rs.state == "ended", rs.state


# ---------------------------------- 2. other closes around the final save


async def test_aclose_during_a_suspends_final_save_is_final_and_stores_it_suspended(
    store: CountedStore, key: str
) -> None:
    """aclose() is final (`restore` raises `RuntimeError` "when aclose ran first or
    meanwhile"); the suspend's final save stands: the store says suspended, no owner;
    `rs.state` closed (a0c331d), and a restore in a new process resumes it."""
    _session, rs, _ = await begin(store, key)
    suspending = await into_the_final_save(store, rs)
    try:
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await bounded(closing, "aclose")
    finally:
        await cleanup(store, suspending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "closed"
    with pytest.raises(RuntimeError):
        await bounded(rs.restore(make_text_session(ScriptedLLM()), default=Clerk), "restore")
    rs2 = lr.ResumableSession(store, key, registry=rs._registry)
    fresh = make_text_session(ScriptedLLM(default="noted"))
    await bounded(rs2.restore(fresh, default=Clerk), "restore elsewhere")
    assert rs2.resumed and "my name is Ada" in said(fresh)
    await rs2.aclose()


async def test_a_normal_close_during_a_suspends_final_save_stores_it_suspended(
    store: CountedStore, key: str
) -> None:
    """LiveKit closing the session normally (`session.aclose()`) during the final
    save: taken as a close (`_aclose`), final. The suspend's final save stands: store
    suspended, no owner; the suspend returns; the session is closed."""
    session, rs, _ = await begin(store, key)
    suspending = await into_the_final_save(store, rs)
    closing = asyncio.ensure_future(session.aclose())
    try:
        await until(lambda: rs._closing is not None, "the hooks heard the close")
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await bounded(closing, "session close")
        await until(lambda: closed_down(rs), "the hooks' close is done")
    finally:
        await cleanup(store, suspending, closing)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "closed"


async def test_an_error_close_during_a_suspends_release_is_ignored(
    store: CountedStore, key: str
) -> None:
    """a0c331d (2): once the final save is stored, LiveKit's close (an error) "leaves it
    as it is": the suspend ends suspended, lease free, and a restore in place works."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.release_gate.entered.wait(), "the suspend's release")
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        assert rs._closing is None
        store.release_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "suspended"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    session.history.items.clear()
    agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    await bounded(session.start(agent), "restart")
    assert rs.resumed and "my name is Ada" in said(session)
    await rs.aclose()
    await session.aclose()


async def test_a_jobs_shutdown_during_a_suspends_final_save_is_final(
    store: CountedStore, key: str
) -> None:
    """The job's shutdown (LiveKit closes the session, then the shutdown callbacks'
    `rs.aclose()`) during a suspend's final save: the final save stands (suspended, no
    owner), `rs.state` closed, and a participant joining afterwards restores nothing."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=30.0)
    suspending = await into_the_final_save(store, rs)
    shutting = asyncio.ensure_future(j.shut_down(session))
    try:
        await until(lambda: rs._closing is not None, "the hooks heard the close")
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await bounded(shutting, "shutdown")
    finally:
        await cleanup(store, suspending, shutting)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "closed"
    j.join("someone")
    await asyncio.sleep(0.1)
    assert rs.state == "closed"
    _s, owner, _v = await stored_state(store, key)
    assert owner is None


async def test_a_caller_joining_during_a_jobs_suspend_final_save_is_restored(
    store: CountedStore, key: str
) -> None:
    """lifecycle.md: "a caller who joins while the final snapshot of a suspend is being
    written has the conversation restored in place once it is written"."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=30.0)
    suspending = await into_the_final_save(store, rs)
    try:
        j.join("caller2")
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: rs.state == "active", f"restored in place ({rs.state})")
    finally:
        await cleanup(store, suspending)
    assert rs.resumed and "my name is Ada" in said(session)
    await j.shut_down(session)


# ------------------------------ 3. an app's checkpoint racing the suspend's release


async def into_the_release_with_a_checkpoint(
    store: CountedStore, rs: lr.ResumableSession, session: Any
) -> tuple[asyncio.Future[int], asyncio.Future[int]]:
    """A suspend whose settle's first save fails (a store blink: "A failure here leaves
    the final save standing", and the session is given up), with an app's `checkpoint()`
    queued behind that save: the checkpoint takes the save lock as the suspend goes on
    to its release, which takes no lock. Its lease confirmation (a renewal) is held at
    the store's gate until the release is done. Returns the suspend's and checkpoint's
    tasks, the release done."""
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    session.history.add_message(role="user", content="one more thing: blue door")
    store.commit_gate.open()
    store.commit_gate.arm()  # the final save passes; the settle's save is held
    await bounded(store.commit_gate.entered.wait(), "the settle's commit")
    checkpointing = asyncio.ensure_future(rs.checkpoint())
    await until(lambda: bool(rs._lock._waiters), "the checkpoint waits behind the settle")
    store.renew_gate.arm()
    store.fail_next = True
    store.commit_gate.open()  # the settle's save fails: the suspend goes on to its release
    await bounded(store.renew_gate.entered.wait(), "the checkpoint's renewal")
    # the suspend reaches its release: it waits for the checkpoint (the save lock), or,
    # as before, releases the lease under it
    await until(
        lambda: rs.state == "suspended" or bool(rs._lock._waiters),
        f"the suspend at its release ({rs.state})",
    )
    return suspending, checkpointing


async def test_a_checkpoint_racing_a_suspends_release_does_not_shut_the_job_down(
    store: CountedStore, key: str
) -> None:
    """ResumableSession: ``on_lost`` is awaited "when a save ... finds the session taken
    over by another worker (`LeaseLost`)"; resumable_job's on_lost ends the job. Nobody
    took this session over: its own suspend released the lease while an app's
    `checkpoint()` (which took the save lock once the settle gave up) confirmed it. The
    job must stay, suspended, and restore the conversation in place when the caller
    rejoins (lifecycle.md). The checkpoint may fail, but not as a takeover."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=30.0)
    suspending, checkpointing = await into_the_release_with_a_checkpoint(store, rs, session)
    try:
        store.renew_gate.open()
        await bounded(suspending, "suspend")
        await bounded(asyncio.gather(checkpointing, return_exceptions=True), "checkpoint")
        await asyncio.sleep(0.1)  # on_lost, if it runs, is a task of its own
    finally:
        await cleanup(store, suspending, checkpointing)
    outcome = checkpointing.exception() if not checkpointing.cancelled() else None
    assert not j.shutdowns, f"the job was shut down: {j.shutdowns} ({outcome!r})"
    assert not isinstance(outcome, lr.LeaseLost), f"the checkpoint: {outcome!r}"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    j.leave()
    j.join()
    await until(lambda: rs.state == "active", f"restored on rejoin (it is {rs.state})", 2.0)
    assert "one more thing: blue door" in said(session)
    await j.shut_down(session)


async def test_a_checkpoint_racing_a_suspends_release_plain_session(
    store: CountedStore, key: str
) -> None:
    """The same race without a job: `on_lost` is not called (nobody took the session
    over), the suspend ends suspended with the lease free, and the session restores."""
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    suspending, checkpointing = await into_the_release_with_a_checkpoint(store, rs, session)
    try:
        store.renew_gate.open()
        await bounded(suspending, "suspend")
        await bounded(asyncio.gather(checkpointing, return_exceptions=True), "checkpoint")
        await asyncio.sleep(0.05)
    finally:
        await cleanup(store, suspending, checkpointing)
    assert not lost, f"on_lost called though nobody took the session over: {lost}"
    assert rs.state == "suspended"
    fresh = make_text_session(ScriptedLLM(default="noted"))
    await bounded(rs.restore(fresh, default=Clerk), "restore")
    assert "one more thing: blue door" in said(fresh)
    await rs.aclose()


async def test_a_checkpoint_commit_in_flight_across_a_suspend_and_a_restore_in_place(
    store: CountedStore, key: str
) -> None:
    """restore(): "After a `suspend` it may be called again ... with the closed one";
    5306316: a restore drops what the session before it left pending, so that nothing
    of the old life fences the restored one. An app's `checkpoint()` whose commit (the
    settle's failed save, sent again) is still on its way when the suspend released the
    lease and a restore in place took it anew lands with the old epoch: it must not fence
    the restored session (`on_lost`, every later checkpoint `LeaseLost`)."""
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    checkpointing: asyncio.Future[int] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="one more thing: blue door")
        store.commit_gate.open()
        store.commit_gate.arm()
        await bounded(store.commit_gate.entered.wait(), "the settle's commit")
        checkpointing = asyncio.ensure_future(rs.checkpoint())
        await until(lambda: bool(rs._lock._waiters), "the checkpoint waits behind the settle")
        store.fail_next = True
        store.commit_gate.open()
        store.commit_gate.arm()  # the settle's save fails; the checkpoint's commit is held
        await bounded(store.commit_gate.entered.wait(), "the checkpoint's commit")
        # the suspend reaches its release: it waits for the checkpoint's commit (the
        # save lock), or, as before, is done with the commit still on its way
        await until(
            lambda: suspending.done() or bool(rs._lock._waiters), "the suspend at its release"
        )
        if suspending.done():
            session.history.items.clear()
            agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
            await bounded(session.start(agent), "restart")
            store.commit_gate.open()
        else:
            store.commit_gate.open()
            await bounded(suspending, "suspend")
            session.history.items.clear()
            agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
            await bounded(session.start(agent), "restart")
        assert rs.state == "active"
        await bounded(asyncio.gather(checkpointing, return_exceptions=True), "checkpoint")
        await asyncio.sleep(0.05)
        assert not lost, f"the restored session was fenced by its old life: {lost}"
        await bounded(session.run(user_input="I am back"), "a turn")
        await bounded(rs.checkpoint(), "a checkpoint of the restored session")
        assert rs.state == "active"
    finally:
        await cleanup(store, suspending, *([checkpointing] if checkpointing else []))
        await rs.aclose()
        await session.aclose()


async def test_aclose_during_a_suspends_settle_is_final_and_releases(
    store: CountedStore, key: str
) -> None:
    """aclose() during the settle (the final save stored): final. The store holds the
    session suspended with no owner; `rs.state` closed (a0c331d (1)); the suspend
    returns; a new session elsewhere resumes the conversation."""
    session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="late item")
        store.commit_gate.open()
        store.commit_gate.arm()
        await bounded(store.commit_gate.entered.wait(), "the settle's commit")
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(suspending, "suspend")
        await bounded(closing, "aclose")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "closed"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    rs2 = lr.ResumableSession(store, key, registry=rs._registry)
    fresh = make_text_session(ScriptedLLM(default="noted"))
    await bounded(rs2.restore(fresh, default=Clerk), "restore elsewhere")
    assert "late item" in said(fresh)
    await rs2.aclose()
