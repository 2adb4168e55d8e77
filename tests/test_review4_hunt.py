"""Hunt: review of the session's fixes (review4): a renewal saying the store's version
(`Lease.version`, `LeaseHolder.renew(version)`), a pause under way waited for by the job
policy (`_pausing` a Future), a restore in place starting from the job's first userdata
(`_userdata_again`), resume resetting the long-pause retry delay.

Real `AgentSession`s driven by the scripted LLM, jobs on LiveKit's mock room (the `Job`
helper of tests/test_job_policy_adversarial.py), real stores (memory, SQLite in
tmp_path). A failing test is a defect; a "passes: coverage" one guards a promise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.agent_hooks.lease import REACQUIRED
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_agent_state_adversarial import store
from tests.test_job_hunt import run_job
from tests.test_job_policy_adversarial import (  # noqa: F401  (_sigterm_kept: autouse)
    Job,
    _sigterm_kept,
    state_is,
)
from tests.test_rejoin_hunt import (
    _suspended_clinic_call,
    closing,
    demo_registry,
    stored_snap,
    user_texts_of,
)

__all__ = ["store"]

T = 5.0  # bound per step; never a timing


def _reacquired() -> float:
    return float(REACQUIRED._value.get())


# ------------------------- (4) a restore in place starting afresh, without userdata_type


async def test_a_worker_without_userdata_type_does_not_write_a_removed_calls_userdata_back(
    store: Store,
) -> None:
    """A worker deployed without ``userdata_type`` (docs/guide.md: it "leaves
    session.userdata alone ... and keeps the saved userdata in every snapshot it
    writes") resumes a call whose snapshot holds userdata (the caller's name, saved by a
    worker that has the type). The call is suspended in the job, an operator removes it
    (``rm``: "deletes a session: every version"), and the caller reconnects: the restore
    in place finds nothing and starts a new conversation. docs/lifecycle.md (this
    session's addition): a restore in place that starts a new conversation "(the stored
    one stale and archived, ended, or removed by rm) starts from ... the userdata the job
    began with ... without `userdata_type` userdata is not saved". The commit that added
    it calls a new conversation carrying the old userdata "rm undone by the next save".

    What happens: `Capture._dump_userdata` writes ``Capture._saved_userdata`` when the
    worker has no userdata type, and a restore that finds nothing (`_load_into`, only
    ``capture.fresh()``) never clears it: the removed conversation's userdata (its
    caller's name) is written under the key again by the new call's first save."""
    from livekit_resume.cli.demo.agents import Receptionist, Visit

    j1, s1, rs1, _ = await _suspended_clinic_call(store)
    await asyncio.wait_for(j1.shut_down(s1), T)
    key = rs1.key
    j2 = Job("room-untyped")
    s2 = make_text_session(ScriptedLLM(default="ok"), userdata=Visit())
    closed = closing(s2)
    rs2 = await asyncio.wait_for(
        run_job(
            j2, s2, store, key=key, leave_grace=0.1, registry=demo_registry(), default=Receptionist
        ),
        T,
    )
    try:
        assert rs2.resumed
        j2.leave()
        await asyncio.wait_for(closed.wait(), T)
        await state_is(rs2, "suspended", T)
        assert await store.delete(key)
        j2.join()
        await state_is(rs2, "active", T)
        assert not rs2.resumed and user_texts_of(s2) == []
        await asyncio.wait_for(rs2.checkpoint(), T)
        snap = await stored_snap(store, key)
        assert not (snap.userdata or {}).get("name"), (
            f"the removed call's userdata is written back: {snap.userdata!r}"
        )
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)


# --------------- (2) a version that legitimately goes down: nothing stored after a suspend


async def test_a_restore_in_place_that_finds_nothing_starts_at_version_0_not_as_a_store_loss(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The suspended call is removed (``rm``) and the caller reconnects: the restore in
    place finds nothing stored and starts a new conversation. `ResumableSession.version`
    is documented as "The last committed version (0 before the first commit)": nothing
    of this conversation is committed, and the store holds no version. The first save of
    the new conversation is an ordinary first commit; docs/failure-model.md keeps the
    warning "the store lost it ..." and ``livekit_resume_sessions_reacquired`` (guide.md:
    "sessions that vanished from the store under their holder") for a store that lost
    data under a live holder, which nothing here did.

    What happens: `ResumableSession._load_into` with ``stored is None`` leaves
    ``self._version`` at the removed conversation's version: ``rs.version`` and the
    policy's log ("restored in this job at version N") name a version the store does not
    have, the first renewal (`LeaseHolder.renew(version)`, new) or commit finds the
    store "behind" and takes it for a store that lost acknowledged versions: a warning,
    the reacquired counter, a second acquisition. Fix: set ``self._version = 0`` (the
    store's head, 0 when nothing is stored) in `_load_into` when ``stored is None``."""
    j, s, rs, _ = await _suspended_clinic_call(store)
    try:
        assert rs.version > 0
        assert await store.delete(rs.key)
        before = _reacquired()
        caplog.set_level(logging.WARNING, logger="livekit_resume")
        seen: list[int] = []
        restore = rs.restore

        async def restore_and_look(*args: Any, **kwargs: Any) -> Any:
            agent = await restore(*args, **kwargs)
            seen.append(rs.version)  # as the restore in place leaves it
            return agent

        rs.restore = restore_and_look  # type: ignore[method-assign]
        j.join()
        await state_is(rs, "active", T)
        assert not rs.resumed
        await asyncio.wait_for(rs.checkpoint(), T)
        lost = [r for r in caplog.records if "the store lost it" in r.getMessage()]
        assert not lost and _reacquired() == before, (
            "the first save of a new conversation was taken for a store that lost versions: "
            + "; ".join(r.getMessage() for r in lost)
        )
        assert seen == [0], f"nothing stored, yet rs.version is {seen} after the restore"
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------- (1) the long pause's retry delay, after a suspend of someone else's


async def test_a_long_pause_after_a_suspend_and_restore_starts_its_retries_afresh(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix of this session (session.py `resume`: "a later long pause meets its own
    outage") makes a later long pause retry its failed suspend after the first delay
    (``LONG_PAUSE_RETRY``), not after the one the last outage grew (up to a minute, its
    lease held and the caller's slot kept that long). The same holds when the long pause
    that grew the delay ends with a suspend that is not its own (the app's
    ``rs.suspend()``, the job policy's leave grace) and the session is restored again
    in place (docs/lifecycle.md: "After a suspend it may be called again").

    What happens: only `resume` and a successful long-pause suspend
    (`_suspend_still_paused`) reset ``_long_pause_retry``; a suspend through `suspend()`
    and a later `restore()` keep the grown delay. Fix: reset it in `_finish` (or in
    `restore`), wherever a pause ends."""
    from livekit_resume.agent_hooks import session as session_module
    from tests.test_pause_hunt import Clerk, DownStore, closing, finish, started

    monkeypatch.setattr(session_module, "LONG_PAUSE_RETRY", 0.2)
    flaky = DownStore(lr.open_store(f"sqlite:///{tmp_path}/retry.db"))
    session, rs, _ = await started(flaky, autosave=False, suspend_after=0.2)
    try:
        closed = closing(session)
        await session.run(user_input="hi")
        await rs.pause()
        flaky.down, flaky.commits = True, 0

        async def failed(times: int) -> bool:
            return flaky.commits >= times

        # the long pause's suspend fails at 0.2 s, then 0.2, 0.4 and 0.8 later: 1.6 s next
        await eventually(lambda: failed(4), "four suspends failed", T)
        flaky.down = False
        await asyncio.wait_for(rs.suspend(), T)  # the app's suspend, the store back
        await asyncio.wait_for(closed.wait(), T)
        session2 = make_text_session(ScriptedLLM(default="ok"))
        agent = await asyncio.wait_for(rs.restore(session2, default=Clerk), T)
        await asyncio.wait_for(session2.start(agent), T)
        closed2 = closing(session2)
        await asyncio.wait_for(session2.run(user_input="again"), T)
        await rs.pause()
        flaky.down, flaky.commits = True, 0
        await eventually(lambda: failed(1), "the second pause's suspend failed", T)
        flaky.down = False
        try:
            await asyncio.wait_for(closed2.wait(), 1.2)  # retried 0.2 s later, not 1.6 s
        except TimeoutError:
            pytest.fail(f"the next long pause is still {rs.state!r} 1.2 s after its suspend failed")
        assert rs.state == "suspended"
    finally:
        if rs.state != "suspended":
            await finish(session2 if "session2" in locals() else session, rs)
        await flaky.inner.aclose()


# ------------------------------ (2) a renewal racing a commit: never a false "behind"


class _GatedRenew:
    """Wraps a real store; a renewal waits for ``gate`` before it reaches the store
    (``before=True``) or after the store answered (``before=False``): a commit lands
    meanwhile. The network's timing, not our code."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.before = True
        self.sent = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(self, lease: Any, *, ttl: float = 30.0) -> Any:
        self.sent.set()
        if self.before:
            await self.gate.wait()
            return await self.inner.renew(lease, ttl=ttl)
        renewed = await self.inner.renew(lease, ttl=ttl)
        await self.gate.wait()
        return renewed


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_a_renewal_racing_a_commit_is_never_taken_for_a_store_gone_back(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """passes: coverage. Autosave's renewal runs beside the commits (not under the
    session's lock): this session's `LeaseHolder.renew(version)` marks the session
    vanished, to be written whole, when the store's version is behind the one passed.
    Whichever reaches the store first, a renewal and a commit in flight must never make
    a healthy session rewrite itself whole (docs/failure-model.md keeps that for a
    store that lost versions): the version passed is the one the holder had committed
    when the renewal was sent, never ahead of the store."""
    from livekit_resume.testing.llm import ScriptedLLM as Model
    from tests.redis_servers import build_redis_store
    from tests.test_pause_hunt import Clerk, registry

    inner: Store = (
        await build_redis_store("redis", request, namespace=f"r4{tmp_path.name[-8:]}")
        if kind == "redis"
        else lr.open_store(f"sqlite:///{tmp_path}/race.db")
    )
    store = _GatedRenew(inner)
    session = make_text_session(Model(default="ok"))
    rs = lr.ResumableSession(store, "race-key", registry=registry(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Clerk), T)
    await asyncio.wait_for(session.start(agent), T)
    before = _reacquired()
    try:
        for order, text in ((True, "one"), (False, "two")):
            store.before, store.gate, store.sent = order, asyncio.Event(), asyncio.Event()
            renewal = asyncio.ensure_future(rs._renew())
            await asyncio.wait_for(store.sent.wait(), T)
            await asyncio.wait_for(session.run(user_input=text), T)
            landed = await asyncio.wait_for(rs.checkpoint(), T)
            store.gate.set()
            await asyncio.wait_for(renewal, T)
            assert not rs._holder.vanished, f"a renewal racing commit {landed} said 'behind'"
            store.before = True
            store.gate.set()
            assert await asyncio.wait_for(rs.checkpoint(), T) == landed  # nothing new
        assert _reacquired() == before
        assert (await inner.load("race-key")).version == rs.version
    finally:
        store.gate.set()
        await rs.aclose()
        await session.aclose()
        await inner.aclose()
