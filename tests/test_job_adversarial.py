"""An adversarial pass over the job lifecycle: pause, resume, suspend and close racing
timers, shutdown and each other; stores that fail in ways they should not; remote
commands meeting a store in trouble. Each test was a defect on the branch it fixed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Lease, Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import Reply, ScriptedLLM, make_text_session
from tests.test_hooks import KEY, settled, start, store
from tests.test_session_faults import live_texts, saved, texts
from tests.test_voice import REGISTRY, Counter

DEADLINE = 10.0


__all__ = ["store"]  # the fixture, shared with test_hooks


async def listening(store: Store, sessions: list[AgentSession[Any]]) -> lr.ResumableSession:
    """A started session on ``store`` (autosave off) that said one turn and listens for
    remote commands."""
    session = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, owner="w1", autosave=False)
    await session.start(await rs.restore(session, default=Counter))
    await asyncio.wait_for(rs._control.listening.wait(), DEADLINE)
    await session.run(user_input="remember the blue door")
    return rs


def state_of(rs: lr.ResumableSession) -> str:
    return rs.state


class Untyped:
    """A store (a custom backend, a wrapper) whose calls fail with an error that is not
    `StoreUnavailable`: ``commit_after`` applies the commit and then raises, as a
    connection reset while reading the reply does; ``renew_fails`` raises on renew."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.commit_after = 0
        self.commit_before = 0
        self.renew_fails = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Commit) -> int:
        if self.commit_before > 0:
            self.commit_before -= 1
            raise ConnectionResetError("connection reset by peer (test)")
        version = await self.inner.commit(commit)
        if self.commit_after > 0:
            self.commit_after -= 1
            raise ConnectionResetError("connection reset by peer (test)")
        return version

    async def renew(self, lease: Lease, *, ttl: float = 30.0) -> Lease:
        if self.renew_fails:
            raise OSError("network is unreachable (test)")
        return await self.inner.renew(lease, ttl=ttl)


async def test_a_resume_as_the_long_pause_timer_fires_is_not_undone_by_a_suspend(
    store: Store,
) -> None:
    session, rs, _ = await start(store, ["one", "two"], suspend_after=0.05)
    await session.run(user_input="a")
    await rs.pause()
    resumed: list[asyncio.Future[None]] = []
    original = rs._suspend_long_pause

    def fire() -> None:
        # the caller is back in the very loop turn the timer fires (a command, a join
        # heard just before it): the resume's step is queued before the suspend's
        resumed.append(asyncio.ensure_future(rs.resume()))
        original()

    rs._long_pause.arm(0.05, fire)

    async def fired() -> bool:
        return bool(resumed) and resumed[0].done()

    await eventually(fired, "the timer fired and resume returned", DEADLINE)
    resumed[0].result()  # resume() returned
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert state_of(rs) == "active", "resume() returned, then the long pause suspended it"
    await rs.aclose()
    await session.aclose()


async def test_a_commit_applied_then_failing_untyped_does_not_fence_the_live_session(
    store: Store,
) -> None:
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    flaky = Untyped(store)
    session, rs, _ = await start(flaky, ["one", "two", "three"], autosave=True, on_lost=on_lost)
    await session.run(user_input="a")
    await settled(rs)
    flaky.commit_after = 1
    await session.run(user_input="b")
    await settled(rs)
    await session.run(user_input="c")
    await settled(rs)
    assert rs._autosave.lost is None and not lost, "a connection reset fenced a live session"
    assert texts(await saved(store)) == live_texts(session)
    await rs.aclose()
    await session.aclose()


async def test_a_remote_pause_whose_save_fails_untyped_is_answered_at_once(
    store: Store, sessions: list[AgentSession[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Untyped(store)
    rs = await listening(flaky, sessions)
    flaky.commit_before = 1  # the pause's snapshot fails, as StoreUnavailable would
    caplog.set_level(logging.WARNING)
    # answered at once, not left to the sender's timeout; and done, with a warning: a
    # pause whose save fails is a pause all the same (the session is silent)
    await asyncio.wait_for(lr.control(store).pause(KEY, timeout=1.0), DEADLINE)
    assert rs.state == "paused"
    assert any(
        "pause of session" in r.getMessage() and "not saved" in r.getMessage()
        for r in caplog.records
    )
    await rs.aclose()


async def test_an_on_lost_callback_that_raises_is_logged_by_the_library(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_lost(e: lr.LeaseLost) -> None:
        raise ValueError("the app's on_lost failed (test)")

    s1, rs1, _ = await start(store, ["hi", "still"], owner="job-1", autosave=True, on_lost=on_lost)
    await s1.run(user_input="hello")
    await settled(rs1)
    s2, rs2, _ = await start(store, [], owner="job-2", takeover=True)
    caplog.set_level(logging.ERROR)
    await s1.run(user_input="are you there?")
    await settled(rs1)
    assert rs1._lost_task is not None
    await asyncio.gather(rs1._lost_task, return_exceptions=True)
    assert any(
        r.name == "livekit_resume" and "on_lost failed" in r.getMessage() for r in caplog.records
    )
    await rs2.aclose()
    await s2.aclose()
    await rs1.aclose()
    await s1.aclose()


class _BrokenOnce:
    """A command channel whose first inbox fails with an error that is not a
    `ResumeError` (a custom transport's ``ConnectionResetError``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def inbox(self, key: str) -> Any:
        if self.broken > 0:
            self.broken -= 1
            raise ConnectionResetError("subscription reset by peer (test)")
        return self.inner.inbox(key)


class _ChannelWrapper:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.channel = _BrokenOnce(inner.commands())  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commands(self) -> Any:
        return self.channel


async def test_an_inbox_failing_untyped_listens_again(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    wrapped = _ChannelWrapper(store)
    session = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(session)
    rs = lr.ResumableSession(wrapped, KEY, registry=REGISTRY, owner="w1", autosave=False)
    await session.start(await rs.restore(session, default=Counter))

    async def listening() -> bool:
        return rs._control.listening.is_set()

    await eventually(listening, "the owner listens again", DEADLINE)
    assert await asyncio.wait_for(lr.control(store).pause(KEY, timeout=2.0), DEADLINE) == rs.version
    await rs.aclose()


async def test_a_close_while_restoring_leaves_no_lease_held_and_no_autosave_running(
    store: Store,
) -> None:
    """The shutdown callback (``rs.aclose``) running while the restore takes its lease
    (a job shut down before its session started): the close is final, so the restore
    must not go on to hold the lease and autosave under a session that says closed."""
    from tests.test_lifecycle_races import SlowReplies

    slow = SlowReplies(store)
    slow.hold_acquire = True
    session: AgentSession[Any] = make_text_session(ScriptedLLM(default="noted"))
    rs = lr.ResumableSession(slow, KEY, registry=REGISTRY, owner="w1", debounce=0.01)
    restoring = asyncio.ensure_future(rs.restore(session, default=Counter))
    await asyncio.wait_for(slow.applied.wait(), DEADLINE)
    await rs.aclose()  # the job shuts down
    slow.hold_acquire = False
    slow.gate.set()
    await asyncio.gather(restoring, return_exceptions=True)
    info = await store.info(KEY)
    assert info is None or info.owner is None, f"a closed session holds the lease: {info}"
    assert not rs._autosave._tasks, "autosave runs under a closed session"
    assert state_of(rs) == "closed"
    await session.aclose()


async def test_a_final_save_whose_connection_resets_once_is_retried(store: Store) -> None:
    """`aclose` retries the final save through a store blip (`CLOSE_SAVE_BUDGET`); a
    connection reset the store did not wrap in `StoreUnavailable` is such a blip, and the
    last turn must not be lost to it."""
    flaky = Untyped(store)
    session, rs, _ = await start(flaky, ["one", "two"])
    await session.run(user_input="a")
    await rs.checkpoint()
    await session.run(user_input="the last turn")
    flaky.commit_before = 1
    await rs.aclose()
    assert texts(await saved(store)) == live_texts(session)
    await session.aclose()


async def test_a_remote_suspend_between_restore_and_start_loses_no_turn(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """`resumable_job` starts the session right after `restore` returned, and the owner
    listens from there: a suspend heard in between must not leave a session that then
    starts and talks with nothing saving it (no lease, no autosave, state suspended)."""
    session = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, owner="w1", debounce=0.01)
    agent = await rs.restore(session, default=Counter)
    with pytest.raises(lr.CommandRefused):
        await asyncio.wait_for(lr.control(store).suspend(KEY, timeout=1.0), DEADLINE)
    await session.start(agent)
    await session.run(user_input="remember the blue door")
    await rs.aclose()
    assert "remember the blue door" in texts(await saved(store))


class _SlowRenew:
    """A store whose renew reaches the store at once and whose reply is held back until
    ``gate`` opens: a remote command's lease check still on its way back."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.hold = False
        self.sent = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(self, lease: Lease, *, ttl: float = 30.0) -> Lease:
        renewed = await self.inner.renew(lease, ttl=ttl)
        if self.hold:
            self.sent.set()
            await self.gate.wait()
        return renewed


async def test_a_lease_check_answered_after_a_suspend_does_not_take_the_lease_back(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A remote command's lease check (a renewal) racing a local suspend: the renewal
    reached the store before the release, its answer after it. The suspended session
    must not believe it holds the lease again (and write under it)."""
    slow = _SlowRenew(store)
    rs = await listening(slow, sessions)
    slow.hold = True
    command = asyncio.ensure_future(lr.control(store).pause(KEY, timeout=2.0))
    await asyncio.wait_for(slow.sent.wait(), DEADLINE)
    version = await rs.suspend()
    slow.gate.set()
    await asyncio.gather(command, return_exceptions=True)
    assert rs._lease is None, "the suspended session holds a lease again"
    with pytest.raises(RuntimeError, match="suspended"):
        await rs.checkpoint()  # refused, as on any suspended session
    assert (await store.load(KEY)).version == version


async def test_a_pause_cutting_speech_as_the_session_closes_leaves_it_closed(
    store: Store,
) -> None:
    """The caller leaves (the job's policy pauses, cutting the reply being spoken) as the
    job shuts down (the session's close runs `aclose`): once the close is done the
    session is closed, not set back to paused with a long-pause timer armed."""
    session, rs, _ = await start(
        store, [Reply("one two three four five six", chunk_delay=1.0)], suspend_after=0.05
    )
    replying: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="a"))

    async def speaking() -> bool:
        return session.current_speech is not None

    await eventually(speaking, "a reply is being spoken", DEADLINE)
    pausing = asyncio.ensure_future(rs.pause())
    await asyncio.sleep(0)  # the pause waits for the speech to be cut
    await rs.aclose()
    results = await asyncio.gather(pausing, replying, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert state_of(rs) == "closed", "a pause finishing after the close set it back"
    assert not rs._long_pause.armed
    await session.aclose()


@pytest.mark.parametrize("verb", ["suspend", "end"])
async def test_a_suspend_cutting_speech_as_the_session_closes_leaves_it_closed(
    store: Store, verb: str
) -> None:
    """As for a pause: a suspend (or end) still cutting the reply when the session's close
    ran must not set the closed session back to paused."""
    session, rs, _ = await start(store, [Reply("one two three four five six", chunk_delay=1.0)])
    replying: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="a"))

    async def speaking() -> bool:
        return session.current_speech is not None

    await eventually(speaking, "a reply is being spoken", DEADLINE)
    finishing = asyncio.ensure_future(getattr(rs, verb)())
    await asyncio.sleep(0)  # the suspend waits for the speech to be cut
    await rs.aclose()
    results = await asyncio.gather(finishing, replying, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert state_of(rs) == "closed", f"a {verb} finishing after the close set it back"
    await session.aclose()
