"""Hunt: review of the latest fixes (review5): the job policy re-arming the grace after a
failed step (`JobPolicy._again_after_grace`), a tool call's agent from LiveKit's activity
context (`listen.running_agent`), the control listener's `released` epoch and the pause
answers, a restore again that finds nothing stored (version 0, `rewrite`,
`Capture.fresh`), the job's first userdata set again after the restore in place.

Real `AgentSession`s driven by the scripted LLM, jobs on LiveKit's mock room (the `Job`
helper of tests/test_job_policy_adversarial.py), real stores (memory, SQLite in
tmp_path, a real redis-server from the tests' fixtures). A failing test is a defect; a
"passes: coverage" one guards a promise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_agent_state_adversarial import store
from tests.test_job_hunt import key_, run_job
from tests.test_job_policy_adversarial import (  # noqa: F401  (_sigterm_kept: autouse)
    Job,
    _sigterm_kept,
    state_is,
)
from tests.test_rejoin_hunt import (
    reaches,
    stored_user_texts,
)

__all__ = ["store"]

T = 5.0  # bound per step; never a timing


class SuspendsFail:
    """Wraps a real store: while ``down`` is set, a commit of a suspend fails at once
    (`StoreUnavailable`), as a locked or full SQLite file or a refused connection does.
    ``attempts`` counts the suspends tried. An outage, not our code."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self.attempts = 0
        self.failed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        if commit.info.get("reason") == "suspend":
            self.attempts += 1
            if self.down:
                self.failed.set()
                raise lr.StoreUnavailable("store is down (test)")
        return await self.inner.commit(commit)


# ----------------------------------- (1) the grace re-armed after a failed suspend


async def test_a_suspend_failing_with_no_grace_is_not_retried_in_a_hot_loop(
    store: Store,
) -> None:
    """``leave_grace=0`` (suspend as soon as the last caller leaves: the policy arms
    ``self._leave_grace or 0.0``, so 0 is a value it takes) and the store is down as
    the caller leaves: the suspend fails at once. This session's fix
    (`JobPolicy._again_after_grace`) tries the suspend again "after another grace";
    with a grace of 0 that is at once, again and again, for as long as the outage
    lasts: every attempt silences, drafts, encodes and sends a whole commit, and logs
    an error ("a pause, suspend or restore on a room event failed"). Elsewhere a
    failed step backs off (docs/failure-model.md: "autosave retries with backoff (0.2 s
    doubling to 10 s)"; the long pause's suspend: LONG_PAUSE_RETRY doubling to
    LONG_PAUSE_RETRY_CAP).

    Expected: over half a second of outage, a handful of attempts at most.
    Found: the retry is re-armed with ``call_later(0)`` after every failure: hundreds
    of suspends a second (the CPU of a worker serving other calls, a log flood).
    Fix: in `_again_after_grace`, arm ``max(leave_grace, backoff)`` with a backoff that
    doubles per consecutive failure (reset once a step succeeds)."""
    key = key_()
    flaky = SuspendsFail(store)
    j = Job("room-hot")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, flaky, key=key, leave_grace=0.0), T)
    try:
        await asyncio.wait_for(s.run(user_input="one thing"), T)
        flaky.down = True
        logger = logging.getLogger("livekit_resume")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # one error logged per attempt: not printed
        try:
            j.leave()
            await asyncio.wait_for(flaky.failed.wait(), T)
            first = flaky.attempts
            await asyncio.sleep(0.5)
            tried = flaky.attempts - first
            flaky.down = False
            assert await reaches(rs, "suspended", T), f"store back, session {rs.state}"
        finally:
            logger.setLevel(level)
        assert tried <= 10, (
            f"{tried} suspends tried (each logging an error) in 0.5 s of outage: a retry "
            "loop with no delay"
        )
        assert await stored_user_texts(store, key) == ["one thing"]
    finally:
        flaky.down = False
        await asyncio.wait_for(j.shut_down(s), T)


async def test_a_caller_back_during_the_outage_is_not_suspended_by_the_retry(
    store: Store,
) -> None:
    """passes: coverage. The grace's suspend failed (the store down) and the policy
    re-armed another grace (`_again_after_grace`); the caller comes back during the
    outage, then the store returns. docs/lifecycle.md: "they rejoin within
    `leave_grace` -> the agent, where it stopped ... resumed in place": the retry must
    never suspend the call the caller is back on (no timer left armed, the session
    active, no suspend written)."""
    key = key_()
    flaky = SuspendsFail(store)
    j = Job("room-back")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, flaky, key=key, leave_grace=0.2), T)
    try:
        await asyncio.wait_for(s.run(user_input="one thing"), T)
        flaky.down = True
        j.leave()
        await asyncio.wait_for(flaky.failed.wait(), T)
        j.join()
        await state_is(rs, "active", T)
        flaky.down = False
        tried = flaky.attempts
        await asyncio.sleep(0.8)  # four graces
        assert rs.state == "active" and flaky.attempts == tried, (
            f"session {rs.state}, {flaky.attempts - tried} suspends after the caller came back"
        )
        await asyncio.wait_for(s.run(user_input="still here"), T)
        await asyncio.wait_for(rs.checkpoint(), T)
        assert await stored_user_texts(store, key) == ["one thing", "still here"]
    finally:
        flaky.down = False
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------ (3) a restore again that finds nothing: version 0, written whole


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "redis_cluster"])
async def test_a_restore_again_after_rm_writes_a_new_conversation_on_every_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """passes: coverage. A session suspended, removed (``rm``: `Store.delete`, which
    leaves a tombstone) and restored again by the same `ResumableSession`: this
    session's fix starts it from version 0 with ``rewrite`` set (a whole commit at base
    0). docs/lifecycle.md: "from version 0 where nothing is stored any more". On every
    store the new conversation's first commit lands as version 1 holding only its own
    turns, the next one appends to it, and nothing is taken for a store that lost
    versions (`livekit_resume_sessions_reacquired`)."""
    from livekit_resume.agent_hooks.lease import REACQUIRED
    from tests.redis_servers import build_redis_store
    from tests.test_pause_hunt import Clerk, registry

    if kind.startswith("redis"):
        inner: Store = await build_redis_store(kind, request, namespace=f"r5{tmp_path.name[-8:]}")
    else:
        inner = lr.open_store("memory://" if kind == "memory" else f"sqlite:///{tmp_path}/r5.db")
    key = key_()
    rs = lr.ResumableSession(inner, key, registry=registry(), autosave=False)
    s1 = make_text_session(ScriptedLLM(default="ok"))
    s2 = make_text_session(ScriptedLLM(default="ok"))
    try:
        agent = await asyncio.wait_for(rs.restore(s1, default=Clerk), T)
        await asyncio.wait_for(s1.start(agent), T)
        for text in ("one", "two", "three"):
            await asyncio.wait_for(s1.run(user_input=text), T)
            await asyncio.wait_for(rs.checkpoint(), T)
        await asyncio.wait_for(rs.suspend(), T)
        assert rs.version >= 3
        assert await inner.delete(key)
        before = float(REACQUIRED._value.get())
        agent = await asyncio.wait_for(rs.restore(s2, default=Clerk), T)
        assert not rs.resumed and rs.version == 0
        await asyncio.wait_for(s2.start(agent), T)
        await asyncio.wait_for(s2.run(user_input="new"), T)
        v1 = await asyncio.wait_for(rs.checkpoint(), T)
        await asyncio.wait_for(s2.run(user_input="newer"), T)
        v2 = await asyncio.wait_for(rs.checkpoint(), T)
        assert (v1, v2) == (1, 2), f"versions {v1}, {v2}"
        # idle: nothing new, no version written (Capture.fresh forgot `_committed` once)
        assert await asyncio.wait_for(rs.checkpoint(), T) == 2
        assert float(REACQUIRED._value.get()) == before
        assert await stored_user_texts(inner, key) == ["new", "newer"]
        assert (await inner.info(key)).version == 2  # type: ignore[union-attr]
    finally:
        await rs.aclose()
        for s in (s1, s2):
            await s.aclose()
        await inner.aclose()
