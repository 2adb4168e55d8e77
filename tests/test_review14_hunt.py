"""Hunt review14: the last commits of the previous round (9d9c404, 923975c, 5306316).

- a suspend's or an end's state (``rs.state``) becomes ``suspended``/``ended`` only once
  its lease is released (`_give_up`); the final save, then the settle (`_settled`), run
  with the session still ``paused`` and `_stored_as` making every save store the final
  state;
- a restore drops a commit left pending by the session before it;
- LiveKit's error close (`CloseReason.ERROR`) is given up as a suspend
  (`_aclose_on_error`) and `resumable_job` restores it in place on a rejoin.

Real `AgentSession`s (text mode, the scripted LLM); the store is a `MemoryStore` whose
calls the test can hold at a gate (`GatedStore`), so that each window of a suspend
(final save, settle, release) is entered deterministically; `resumable_job` on
LiveKit's mock room (``tests/test_job_policy_adversarial.py``'s `Job`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from livekit.agents import AgentSession, APIConnectionError, llm
from livekit.agents.voice.events import CloseReason

import livekit_resume as lr
from tests._gated import (
    GatedStore,
    bounded,
    key_fixture,
    sigterm_kept,
    store_fixture,
    until,
)
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import QUIET, REGISTRY, Clerk, Job

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------ helpers


store = store_fixture(GatedStore)
key = key_fixture("r14")


async def begin(
    store: GatedStore, key: str, model: ScriptedLLM | None = None, **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession, ScriptedLLM]:
    model = model or ScriptedLLM(default="noted")
    session = make_text_session(model)
    rs = lr.ResumableSession(store, key, registry=REGISTRY, debounce=0.01, **kw)
    agent = await bounded(rs.restore(session, default=Clerk), "restore")
    await bounded(session.start(agent), "start")
    await bounded(session.run(user_input="my name is Ada"), "a turn")
    await bounded(rs.checkpoint(), "checkpoint")
    return session, rs, model


async def stored_state(store: GatedStore, key: str) -> tuple[Any, str | None, int]:
    info = await store.info(key)
    assert info is not None
    return info.info.get("state"), info.owner, info.version


def llm_fails_for_good(model: llm.LLM[Any], n: int = 5) -> None:
    """The provider reports unrecoverable errors, as a plugin does (its ``error`` event):
    past ``max_unrecoverable_errors`` LiveKit closes the session, `CloseReason.ERROR`."""
    for _ in range(n):
        model.emit(
            "error",
            llm.LLMError(
                timestamp=time.time(),
                label="scripted",
                error=APIConnectionError("the provider is down (test)"),
                recoverable=False,
            ),
        )


async def closes(session: AgentSession[Any]) -> list[Any]:
    out: list[Any] = []
    session.on("close", lambda ev: out.append(ev.reason))
    return out


async def cleanup(store: GatedStore, *tasks: asyncio.Future[Any]) -> None:
    """Open every gate (a suspend's rest runs to its end, cancelled or not), then cancel
    and reap ``tasks``, bounded."""
    store.commit_gate.open()
    store.renew_gate.open()
    store.release_gate.open()
    for t in tasks:
        if not t.done():
            t.cancel()
    await bounded(asyncio.gather(*tasks, return_exceptions=True), "the tasks unwind")


# ------------------------------------------- 1. what each moment of a suspend says


async def test_a_suspend_returns_with_state_store_and_version_agreeing(
    store: GatedStore, key: str
) -> None:
    """suspend(): "final snapshot, lease released, session closed"; `rs.state` says
    ``suspended`` once returned, the store holds that version marked suspended with no
    owner, and `rs.version` is the version the store holds."""
    _session, rs, _ = await begin(store, key)
    version = await bounded(rs.suspend(), "suspend")
    assert rs.state == "suspended"
    state, owner, stored = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert version == rs.version == stored


async def test_while_a_suspend_releases_its_lease_the_state_is_not_yet_suspended_and_then_is(
    store: GatedStore, key: str
) -> None:
    """923975c: the state becomes ``suspended`` once the lease is released, so a caller
    who sees it may restore the key at once: at no moment does `rs.state` say suspended
    while the store still names this session's owner."""
    _session, rs, _ = await begin(store, key)
    seen: list[tuple[str, str | None]] = []

    async def watch() -> None:
        while True:
            info = await store.info(key)
            seen.append((rs.state, info.owner if info else None))
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.release_gate.entered.wait(), "the suspend's release")
        await asyncio.sleep(0.05)
        assert rs.state != "suspended", "suspended while the lease is held"
        store.release_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, watcher, suspending)
    assert rs.state == "suspended"  # type: ignore[comparison-overlap]
    assert not [s for s in seen if s[0] == "suspended" and s[1] is not None], seen


async def test_aclose_during_a_suspends_release_leaves_the_session_closed(
    store: GatedStore, key: str
) -> None:
    """aclose(): "final save ... and release the lease"; `state` lists ``closed``, and
    `restore` raises `RuntimeError` "when aclose ran first". A suspend's release that
    ends after an `aclose()` returned must not turn the session back to ``suspended``:
    a caller who then sees suspended restores the key (923975c: "a caller who sees
    suspended may restore the key at once") and is refused, the session being closed."""
    _session, rs, _ = await begin(store, key)
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.release_gate.entered.wait(), "the suspend's release")
        await bounded(rs.aclose(), "aclose")
        assert rs.state == "closed"
        store.release_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    fresh = make_text_session(ScriptedLLM(default="noted"))
    if rs.state == "suspended":  # type: ignore[comparison-overlap]
        # it says so: a restore must then work, as the restore docstring promises
        try:
            await bounded(rs.restore(fresh, default=Clerk), "restore")
        except RuntimeError as e:
            pytest.fail(f"rs.state says suspended after aclose(), and restore refuses: {e}")
        finally:
            await rs.aclose()
    assert rs.state == "closed", f"aclose() returned, then the state became {rs.state!r}"


async def into_the_settle(
    store: GatedStore, rs: lr.ResumableSession
) -> tuple[asyncio.Future[int], asyncio.Future[int]]:
    """A suspend past its final save, its settle waiting: an app's `checkpoint()` queued
    behind the final save holds the save lock, its lease confirmation (a renewal) held at
    the store's gate. Returns the suspend's and the checkpoint's tasks."""
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    checkpointing = asyncio.ensure_future(rs.checkpoint())
    await until(lambda: bool(rs._lock._waiters), "the checkpoint waits behind the final save")
    store.renew_gate.arm()
    store.commit_gate.open()
    await bounded(store.renew_gate.entered.wait(), "the checkpoint's renewal")
    info = await store.info(rs.key)
    assert info is not None and info.info.get("state") == "suspended"  # the final save landed
    assert info.owner is not None  # its lease still held: the settle is to come
    return suspending, checkpointing


async def test_an_error_close_during_a_suspends_settle_leaves_it_restorable(
    store: GatedStore, key: str
) -> None:
    """A suspend whose final save is stored: the store says suspended and the rest "runs
    to its end" (session.py). LiveKit closing the session on errors meanwhile (the
    provider down) is given up as a suspend (`_aclose_on_error`): either way the session
    ends ``suspended``, and `restore` "after a `suspend` ... may be called again". Before
    9d9c404 the state was suspended from the final save on, and LiveKit's close was not
    acted on; now the session is ``paused`` through the settle and the close runs as a
    final `aclose`, leaving a session that says suspended (or closed) and refuses every
    restore (``_closing`` stays set: `resumable_job`'s policy never restores it on a
    rejoin either)."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    suspending, checkpointing = await into_the_settle(store, rs)
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        assert reasons == [CloseReason.ERROR]
        await asyncio.sleep(0.05)
        store.renew_gate.open()
        await bounded(suspending, "suspend")
        await bounded(asyncio.gather(checkpointing, return_exceptions=True), "checkpoint")
        await until(lambda: rs._closing is None or rs._closing.done(), "the hooks' close is done")
    finally:
        await cleanup(store, suspending, checkpointing)
    state, owner, _version = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.state == "suspended", rs.state
    session.history.items.clear()
    try:
        agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    except RuntimeError as e:
        pytest.fail(f"a session suspended, then closed by LiveKit on errors, refuses: {e}")
    await bounded(session.start(agent), "restart")
    assert rs.state == "active" and rs.resumed  # type: ignore[comparison-overlap]
    await rs.aclose()
    await session.aclose()


# ------------------------------------------------------------ 2. in a job


async def job_begin(
    store: GatedStore, name: str, model: ScriptedLLM | None = None, **kw: Any
) -> tuple[Job, AgentSession[Any], lr.ResumableSession, ScriptedLLM]:
    model = model or ScriptedLLM(default="noted")
    j = Job(name)
    session = make_text_session(model)
    kw.setdefault("leave_grace", None)
    rs = await bounded(
        lr.resumable_job(
            j.ctx,
            session,
            registry=REGISTRY,
            default=Clerk,
            store=store,
            room_options=QUIET,
            debounce=0.01,
            **kw,
        ),
        "resumable_job",
    )
    await bounded(session.run(user_input="my name is Ada"), "a turn")
    await bounded(rs.checkpoint(), "checkpoint")
    return j, session, rs, model


def said(session: AgentSession[Any]) -> list[str]:
    return [
        t
        for i in session.history.items
        if getattr(i, "role", "") == "user"
        for t in [getattr(i, "text_content", None)]
        if t
    ]


async def test_a_caller_joining_during_a_suspends_settle_has_it_restored_in_place(
    store: GatedStore, key: str
) -> None:
    """lifecycle.md: "a caller who joins while the final snapshot of a suspend is being
    written has the conversation restored in place once it is written", and a join
    waits out a suspend under way. Here the join comes during the settle."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=30.0)
    suspending, checkpointing = await into_the_settle(store, rs)
    try:
        j.join("caller2")
        await asyncio.sleep(0.05)
        store.renew_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: rs.state == "active", f"restored in place (it is {rs.state})")
    finally:
        await cleanup(store, suspending, checkpointing)
    assert rs.resumed and "my name is Ada" in said(session)
    _state, owner, _v = await stored_state(store, key)
    assert owner is not None
    await j.shut_down(session)


async def test_an_error_close_during_a_jobs_suspend_settle_is_restored_on_rejoin(
    store: GatedStore, key: str
) -> None:
    """job.py / lifecycle.md: a session LiveKit closed on errors is given up as a suspend
    and `resumable_job`'s policy "restores it in place when the caller comes back"; a
    suspended session is restored in place by "a participant joining the room". A
    suspend of the app's whose settle meets that error close must end restorable the
    same way: the caller rejoining finds the conversation back."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    suspending, checkpointing = await into_the_settle(store, rs)
    try:
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await asyncio.sleep(0.05)
        store.renew_gate.open()
        await bounded(suspending, "suspend")
        await until(lambda: rs._closing is None or rs._closing.done(), "the hooks' close is done")
    finally:
        await cleanup(store, suspending, checkpointing)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    j.leave()
    j.join()
    await until(lambda: rs.state == "active", f"restored on rejoin (it is {rs.state})", 2.0)
    assert "my name is Ada" in said(session)
    await j.shut_down(session)


async def test_a_second_resumable_job_call_on_seeing_suspended_is_not_refused(
    store: GatedStore, key: str
) -> None:
    """923975c: "a caller who sees suspended may restore the key at once (a second
    resumable_job call in the job made on seeing it was refused SessionBusy)". The
    release is held at the store: the state must not say suspended before it is done."""
    j, _session, rs, _ = await job_begin(store, key)
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    again = make_text_session(ScriptedLLM(default="noted again"))
    try:
        await bounded(store.release_gate.entered.wait(), "the suspend's release")
        releasing = asyncio.get_running_loop().call_later(0.1, store.release_gate.open)
        await until(lambda: rs.state == "suspended", "suspended")
        rs2 = await bounded(
            lr.resumable_job(
                j.ctx,
                again,
                registry=REGISTRY,
                default=Clerk,
                store=store,
                room_options=QUIET,
                leave_grace=None,
                debounce=0.01,
            ),
            "the second resumable_job call",
        )
        releasing.cancel()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert rs2.state == "active" and rs2.resumed and "my name is Ada" in said(again)
    await rs2.aclose()
    await again.aclose()
    await rs.aclose()


# ------------------------------------- 3. saves during the settle, failures, cancels


async def test_what_arrives_during_the_final_save_is_stored_suspended_by_the_settle(
    store: GatedStore, key: str
) -> None:
    """`_settled`: what reached the session while the final save was on its way is saved
    too, and `_stored_as`: "every later save of this life stores that state". The last
    version holds the late item and says suspended; `rs.version` is that version."""
    session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="one more thing: blue door")
        rs._autosave.trigger("turn")  # an autosave queued behind the final save too
        store.commit_gate.open()
        version = await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    state, owner, stored = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert version == rs.version == stored
    fresh = make_text_session(ScriptedLLM(default="noted"))
    await bounded(rs.restore(fresh, default=Clerk), "restore")
    assert "one more thing: blue door" in said(fresh), said(fresh)
    await rs.aclose()


async def test_a_settle_whose_save_fails_still_gives_the_session_up_suspended(
    store: GatedStore, key: str
) -> None:
    """`_settled`: "A failure here leaves the final save standing": the suspend returns
    the final save's version, the session is given up (lease free, ``suspended``), and a
    restore (whose commits are not fenced by the failed one, 5306316) goes on writing."""
    session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the final save's commit")
        session.history.add_message(role="user", content="late item")
        store.fail_call = store.commit_gate.calls + 1  # the settle's commit, after this one
        store.commit_gate.open()
        version = await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert store.commit_gate.calls >= store.fail_call, "the settle sent no commit"
    assert rs.state == "suspended"
    state, owner, stored = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    assert rs.version == stored
    fresh = make_text_session(ScriptedLLM(default="noted"))
    agent = await bounded(rs.restore(fresh, default=Clerk), "restore")
    await bounded(fresh.start(agent), "start")
    await bounded(fresh.run(user_input="still there?"), "a turn")
    await bounded(rs.checkpoint(), "a checkpoint after the restore")
    assert version <= rs.version
    await rs.aclose()
    await fresh.aclose()


async def test_a_suspend_cancelled_during_its_release_still_ends_suspended(
    store: GatedStore, key: str
) -> None:
    """lifecycle.md: "a suspend cancelled after its final snapshot still closes the
    session"; session.py: the rest "runs to its end even if the caller is cancelled".
    Once the cancellation reached the caller: suspended, lease free, closed."""
    session, rs, _ = await begin(store, key)
    reasons = await closes(session)
    store.release_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    await bounded(store.release_gate.entered.wait(), "the suspend's release")
    suspending.cancel()
    await asyncio.sleep(0.05)
    assert not suspending.done(), "the caller's cancellation cut the suspend short"
    store.release_gate.open()
    with pytest.raises(asyncio.CancelledError):
        await bounded(suspending, "suspend")
    assert rs.state == "suspended"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("suspended", None)
    await until(lambda: bool(reasons), "the AgentSession closed")


async def test_calls_during_an_ends_release_are_refused_and_the_end_stands(
    store: GatedStore, key: str
) -> None:
    """lifecycle.md: while a suspend (or an end) runs, pause(), resume() and a second
    suspend() are refused; the end stands: ``ended`` stored, lease free, `rs.state`
    ``ended``, and later saves do not store it otherwise."""
    _session, rs, _ = await begin(store, key)
    store.release_gate.arm()
    ending = asyncio.ensure_future(rs.end())
    try:
        await bounded(store.release_gate.entered.wait(), "the end's release")
        for call in (rs.pause, rs.resume, rs.suspend, rs.end):
            with pytest.raises(RuntimeError):
                await bounded(call(), call.__name__)
        store.release_gate.open()
        await bounded(ending, "end")
    finally:
        await cleanup(store, ending)
    assert rs.state == "ended"
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None)


async def test_a_restore_after_an_error_close_whose_save_failed_is_not_fenced(
    store: GatedStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5306316: "a restore drops a commit left pending by the session before it (an error
    close's final save met an outage; sent again under the new lease it fenced the
    restored session, LeaseLost and the call ended)". The store's commits fail through
    the error close; restored in place once it is back, the session checkpoints on."""
    from livekit_resume.agent_hooks import autosave

    monkeypatch.setattr(autosave, "CLOSE_SAVE_BUDGET", 0.3)
    lost: list[Exception] = []

    async def on_lost(e: Exception) -> None:
        lost.append(e)

    session, rs, model = await begin(store, key, on_lost=on_lost)
    reasons = await closes(session)
    store.down = True
    session.history.add_message(role="user", content="said as the store went down")
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await until(lambda: rs.state == "suspended" and rs._closing is None, "given up as a suspend")
    assert rs._pending is not None  # the failed final save, left pending: the case at hand
    store.down = False
    session.history.items.clear()
    agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    await bounded(session.start(agent), "restart")
    await bounded(session.run(user_input="I am back"), "a turn")
    await bounded(rs.checkpoint(), "a checkpoint after the restore")
    assert not lost and rs.state == "active"
    await rs.aclose()
    await session.aclose()
