"""API hunt: ResumableSession's public methods under takeovers, refusals, concurrency
and cancellation (the code of e449639: `_checkpoint` telling on_lost of any LeaseLost,
the whole rewrite after a `SnapshotCorrupt` refusal, `restore(salvage=True)` falling
back to the newest readable version). Real memory and SQLite stores, real text-mode
AgentSessions; thin wrappers only inject a store's failures."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.stores.base import Commit, Store
from tests.test_agent_state_adversarial import store
from tests.test_hooks import KEY, Receptionist, Visit, registry, start
from tests.test_session_faults import live_texts, saved, texts

__all__ = ["store"]

DEADLINE = 10.0


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tuple[Store, Path]]:
    path = tmp_path / "hunt.db"
    s: Store = lr.open_store(f"sqlite:///{path}")
    yield s, path
    await s.aclose()


def lose_latest(path: Path, key: str = KEY) -> int:
    """Delete the latest version's row of ``key`` as a hand outside livekit-resume would."""
    with sqlite3.connect(path) as db:
        (top,) = db.execute("SELECT MAX(version) FROM versions WHERE key=?", (key,)).fetchone()
        db.execute("DELETE FROM versions WHERE key=? AND version=?", (key, top))
    return int(top)


class Wrapped:
    """A store passing everything through; subclasses inject failures."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LoseReply(Wrapped):
    """Applies the next ``times`` commits, then raises StoreUnavailable (reply lost)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.times = 0

    async def commit(self, commit: Commit) -> int:
        version = await self.inner.commit(commit)
        if self.times > 0:
            self.times -= 1
            raise lr.StoreUnavailable("reply lost (test)")
        return version


class Script(Wrapped):
    """Commits answered from ``plan`` (an exception to raise, "hang", or None: pass
    through), one entry per commit; then through."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.plan: list[Any] = []
        self.sent: list[Commit] = []
        self.hanging = asyncio.Event()

    async def commit(self, commit: Commit) -> int:
        self.sent.append(commit)
        if self.plan:
            step = self.plan.pop(0)
            if step == "hang":
                self.hanging.set()
                await asyncio.sleep(3600)
            elif step is not None:
                raise step
        return await self.inner.commit(commit)


class Told:
    def __init__(self) -> None:
        self.errors: list[lr.LeaseLost] = []
        self.event = asyncio.Event()

    async def __call__(self, e: lr.LeaseLost) -> None:
        self.errors.append(e)
        self.event.set()


async def taken_by_w2(store: Store) -> tuple[AgentSession[Visit], lr.ResumableSession]:
    s2, rs2, _ = await start(store, ["from w2"], owner="w2", takeover=True)
    return s2, rs2


async def close_all(*pairs: tuple[lr.ResumableSession, AgentSession[Any]]) -> None:
    for rs, s in pairs:
        await rs.aclose()
        await s.aclose()


# -- (2) a refusal for a lost latest, with a commit pending ----------------------------


async def test_a_pending_commit_that_landed_as_the_lost_latest_is_not_a_takeover(
    sqlite_store: tuple[Store, Path],
) -> None:
    """Expected: a commit whose reply was lost (it landed as version N+1) and whose row
    is then lost is written over whole by the next save: nobody took the session, so no
    LeaseLost, on_lost never runs, autosave goes on and every turn is stored.
    Actual: the resend (or the whole rewrite, based on N) meets head N+1 under the same
    epoch: `head_moved_error` "another writer shares this lease", a non-vanished
    LeaseLost; `_checkpoint` (session.py ~593) calls `Autosave.lose` and on_lost runs."""
    inner, path = sqlite_store
    store = LoseReply(inner)
    told = Told()
    s1, rs1, _ = await start(store, ["one", "two", "three"], on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    await s1.run(user_input="b")
    store.times = 1
    with pytest.raises(lr.StoreUnavailable):
        await rs1.checkpoint()  # landed as the next version, reply lost
    lose_latest(path)
    await s1.run(user_input="c")
    try:
        await rs1.checkpoint()
        await asyncio.sleep(0.05)
        assert not told.errors, f"on_lost told of a takeover nobody made: {told.errors}"
        assert texts(await saved(inner)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


async def test_a_refused_append_then_a_vanished_rewrite_does_not_stop_autosave(
    store: Store,
) -> None:
    """Expected: the whole rewrite after a `SnapshotCorrupt` refusal that meets a vanished
    session (`LeaseLost.vanished`: nobody took it) acquires it again and writes it whole,
    as any save does; autosave goes on, on_lost is not told.
    Actual: `_commit_or_reacquire`'s SnapshotCorrupt handler (session.py ~625) calls
    `_commit_now` outside the `except LeaseLost` that reacquires; the vanished LeaseLost
    reaches autosave's loop, whose `except LeaseLost` (autosave.py ~127) stops it for
    good and runs on_lost."""
    wrapped = Script(store)
    told = Told()
    s1, rs1, _ = await start(wrapped, ["one", "two"], autosave=True, on_lost=told)
    try:
        await s1.run(user_input="a")
        await asyncio.wait_for(rs1._autosave.idle.wait(), DEADLINE)
        wrapped.plan = [
            SnapshotCorrupt("latest lost (test)"),
            lr.LeaseLost("vanished (test)", vanished=True),
        ]
        await s1.run(user_input="b")
        await asyncio.sleep(0.5)
        await asyncio.wait_for(rs1._autosave.idle.wait(), DEADLINE)
        assert not told.errors, f"on_lost told for a session nobody took: {told.errors}"
        assert rs1._autosave.lost is None
        assert texts(await saved(store)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


async def test_a_store_that_keeps_refusing_raises_snapshot_corrupt_each_time(
    store: Store,
) -> None:
    """A store refusing every append and the whole rewrite too: each checkpoint raises the
    typed SnapshotCorrupt (one rewrite try each), on_lost is not told, and once the
    store takes commits again the whole conversation is stored."""
    wrapped = Script(store)
    told = Told()
    s1, rs1, _ = await start(wrapped, ["one", "two"], on_lost=told)
    try:
        await s1.run(user_input="a")
        await rs1.checkpoint()
        wrapped.plan = [SnapshotCorrupt("refused (test)")] * 3
        await s1.run(user_input="b")
        with pytest.raises(SnapshotCorrupt):
            await rs1.checkpoint()
        with pytest.raises(SnapshotCorrupt):
            await rs1.checkpoint()
        assert not wrapped.plan  # 2 + 1: the second checkpoint tried the rewrite only
        await rs1.checkpoint()
        assert wrapped.sent[-1].whole
        assert not told.errors
        assert texts(await saved(store)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


async def test_a_rewrite_cancelled_mid_commit_is_finished_by_the_next_save(store: Store) -> None:
    """The whole rewrite after a refusal, cancelled (wait_for) while its commit is on the
    way: the next checkpoint stores every turn, and the session is not lost."""
    wrapped = Script(store)
    s1, rs1, _ = await start(wrapped, ["one", "two"])
    try:
        await s1.run(user_input="a")
        await rs1.checkpoint()
        await s1.run(user_input="b")
        wrapped.plan = [SnapshotCorrupt("refused (test)"), "hang"]
        task = asyncio.ensure_future(rs1.checkpoint())
        await asyncio.wait_for(wrapped.hanging.wait(), DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await rs1.checkpoint()
        assert rs1._autosave.lost is None
        assert texts(await saved(store)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


# -- (3) restore(salvage=True) over a lost latest ---------------------------------------


def billing_only() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    from tests.test_hooks import Billing

    reg.register(Billing)
    return reg


async def free(store: Store) -> bool:
    """Whether nobody holds KEY's lease (a third worker acquires it without takeover)."""
    try:
        lease = await store.acquire(KEY, "w3", ttl=30)
    except lr.SessionBusy:
        return False
    await store.release(lease)
    return True


async def test_a_salvage_takeover_that_cannot_restore_does_not_fence_the_live_holder(
    sqlite_store: tuple[Store, Path],
) -> None:
    """Expected (failure-model.md: "a live session is taken over only once what it holds
    is read and found restorable here"): a worker whose registry lacks the saved agent,
    restoring with takeover and salvage a session whose latest row is lost, fails with
    UnknownAgent and leaves the live holder saving.
    Actual: `_newest_readable` (session.py ~390) acquires with takeover *before* it reads
    or checks anything, so the holder is fenced (its next checkpoint LeaseLost, on_lost
    told) by a restore that then fails."""
    store, path = sqlite_store
    told = Told()
    s1, rs1, _ = await start(store, ["one", "two", "three"], on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    await s1.run(user_input="b")
    await rs1.checkpoint()
    lose_latest(path)
    s2: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs2 = lr.ResumableSession(store, KEY, registry=billing_only(), userdata_type=Visit, owner="w2")
    try:
        with pytest.raises(lr.UnknownAgent):
            await rs2.restore(s2, default=lambda: Receptionist(rs2), takeover=True, salvage=True)
        await s1.run(user_input="c")
        await rs1.checkpoint()  # the holder goes on: written whole over the lost row
        assert not told.errors
        assert texts(await saved(store)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


async def test_a_salvage_takeover_with_no_readable_version_does_not_fence_the_live_holder(
    sqlite_store: tuple[Store, Path],
) -> None:
    """Expected: with no version that reads (the only one lost), a restore with takeover
    and salvage raises SnapshotCorrupt without fencing the live holder, which holds the
    whole conversation and writes it whole.
    Actual: `_newest_readable` (session.py ~390) takes the lease over first; the holder's
    next save is LeaseLost and its turns are never stored."""
    store, path = sqlite_store
    told = Told()
    s1, rs1, _ = await start(store, ["one", "two"], on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    lose_latest(path)
    s2: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs2 = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner="w2")
    try:
        with pytest.raises(SnapshotCorrupt):
            await rs2.restore(s2, default=lambda: Receptionist(rs2), takeover=True, salvage=True)
        await s1.run(user_input="b")
        await rs1.checkpoint()
        assert not told.errors
        assert texts(await saved(store)) == live_texts(s1)
    finally:
        await close_all((rs1, s1))


async def test_a_failed_salvage_releases_the_lease_and_may_be_tried_again(
    sqlite_store: tuple[Store, Path],
) -> None:
    """No readable version: restore(salvage=True) raises SnapshotCorrupt, holds no lease;
    a second restore on the same object raises the same (not RuntimeError)."""
    store, path = sqlite_store
    s1, rs1, _ = await start(store, ["one"])
    await s1.run(user_input="a")
    await rs1.suspend()
    lose_latest(path)
    s2: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs2 = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner="w2")
    for _ in range(2):
        with pytest.raises(SnapshotCorrupt):
            await rs2.restore(s2, default=lambda: Receptionist(rs2), salvage=True)
        assert await free(store)
    assert rs2._lease is None and rs2.state == "active" and not s2.history.items


async def test_a_salvage_restore_while_another_worker_holds_it_is_busy(
    sqlite_store: tuple[Store, Path],
) -> None:
    """Without takeover, a salvage restore of a session held live is SessionBusy, and the
    holder's lease stands."""
    store, path = sqlite_store
    s1, rs1, _ = await start(store, ["one", "two"])
    try:
        await s1.run(user_input="a")
        await rs1.checkpoint()
        await s1.run(user_input="b")
        await rs1.checkpoint()
        lose_latest(path)
        s2: AgentSession[Visit] = AgentSession(userdata=Visit())
        rs2 = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner="w2")
        with pytest.raises(lr.SessionBusy):
            await rs2.restore(s2, default=lambda: Receptionist(rs2), salvage=True)
        assert not await free(store)
        await rs1.checkpoint()
    finally:
        await close_all((rs1, s1))


async def test_a_salvage_restore_cancelled_at_each_step_leaves_no_lease(
    sqlite_store: tuple[Store, Path],
) -> None:
    """A salvage restore over a lost latest, cancelled (wait_for) after 0..n loop steps:
    each attempt either restores (then closed) or leaves the lease free; a later
    salvage restore gets every turn of the newest readable version."""
    store, path = sqlite_store
    s1, rs1, _ = await start(store, ["one", "two"])
    await s1.run(user_input="a")
    await rs1.checkpoint()
    kept = live_texts(s1)
    await s1.run(user_input="b")
    await rs1.suspend()
    lose_latest(path)
    for steps in range(0, 60):
        s2: AgentSession[Visit] = AgentSession(userdata=Visit())
        rs2 = lr.ResumableSession(
            store, KEY, registry=registry(), userdata_type=Visit, owner=f"w{steps}"
        )
        task = asyncio.ensure_future(
            rs2.restore(s2, default=partial(Receptionist, rs2), salvage=True)
        )
        for _ in range(steps):
            await asyncio.sleep(0)
        await asyncio.sleep(steps * 0.002)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert await free(store), f"cancelled after {steps} steps: lease held"
            assert not s2.history.items
            continue
        assert live_texts(s2) == kept
        await rs2.aclose()
        assert await free(store)
        break
    else:
        pytest.fail("no restore finished within 60 tries")


# -- (1) a takeover found by any save --------------------------------------------------


async def test_every_method_racing_a_takeover_writes_nothing_and_tells_on_lost_once(
    store: Store,
) -> None:
    """w2 takes the session over; w1's autosave, checkpoint, pause and end all run at
    once: each raises a typed error (LeaseLost or RuntimeError), nothing is written
    after the takeover, on_lost runs exactly once, and w2's lease stands after w1's
    aclose."""
    told = Told()
    s1, rs1, _ = await start(store, ["one", "two"], autosave=True, on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    s2, rs2 = await taken_by_w2(store)
    taken = await store.versions(KEY)
    try:
        await s1.run(user_input="b")  # autosave triggered too
        results = await asyncio.wait_for(
            asyncio.gather(
                rs1.checkpoint(), rs1.pause(), rs1.end(), rs1.checkpoint(), return_exceptions=True
            ),
            DEADLINE,
        )
        for r in results:
            assert isinstance(r, (lr.LeaseLost, RuntimeError)), results
        await asyncio.sleep(0.3)
        assert len(told.errors) == 1, told.errors
        assert await store.versions(KEY) == taken
        await rs1.aclose()
        assert await store.versions(KEY) == taken
        assert not await free(store)
        await rs2.checkpoint()
    finally:
        await close_all((rs1, s1), (rs2, s2))


@pytest.mark.parametrize("method", ["checkpoint", "pause", "suspend", "end", "aclose"])
async def test_a_method_meeting_a_takeover_tells_on_lost_once_and_leaves_w2_holding(
    store: Store, method: str
) -> None:
    """Each public save meeting w2's takeover: nothing written, on_lost once (also after
    further calls), and w1's aclose does not release w2's lease."""
    told = Told()
    s1, rs1, _ = await start(store, ["one", "two"], on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    s2, rs2 = await taken_by_w2(store)
    taken = await store.versions(KEY)
    try:
        await s1.run(user_input="b")
        call = getattr(rs1, method)()
        if method == "aclose":
            await asyncio.wait_for(call, DEADLINE)
        else:
            with pytest.raises(lr.LeaseLost):
                await asyncio.wait_for(call, DEADLINE)
        await asyncio.wait_for(told.event.wait(), DEADLINE)
        with pytest.raises((lr.LeaseLost, RuntimeError)):
            await rs1.checkpoint()
        await rs1.aclose()
        await asyncio.sleep(0.05)
        assert len(told.errors) == 1
        assert await store.versions(KEY) == taken
        assert not await free(store)
        await s2.run(user_input="hello w2")
        await rs2.checkpoint()
    finally:
        await close_all((rs1, s1), (rs2, s2))


@pytest.mark.parametrize("then", ["aclose", "suspend", "end", "raise", "pause"])
async def test_on_lost_that_closes_suspends_or_raises_ends_cleanly(store: Store, then: str) -> None:
    """on_lost calling aclose/suspend/end/pause itself, or raising: it runs once, nothing
    hangs, nothing is written, w2 keeps its lease, and a later aclose ends closed."""
    calls: list[str] = []
    done = asyncio.Event()
    rs1_ref: list[lr.ResumableSession] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        calls.append(then)
        try:
            if then == "raise":
                raise ValueError("app bug (test)")
            await getattr(rs1_ref[0], then)()
        finally:
            done.set()

    s1, rs1, _ = await start(store, ["one", "two"], autosave=True, on_lost=on_lost)
    rs1_ref.append(rs1)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    s2, rs2 = await taken_by_w2(store)
    taken = await store.versions(KEY)
    try:
        await s1.run(user_input="b")  # autosave meets the takeover
        await asyncio.wait_for(done.wait(), DEADLINE)
        await asyncio.wait_for(rs1.aclose(), DEADLINE)
        assert rs1.state == "closed"
        assert calls == [then]
        assert await store.versions(KEY) == taken
        assert not await free(store)
    finally:
        await close_all((rs1, s1), (rs2, s2))


async def test_a_takeover_found_by_the_renewal_while_a_suspend_saves(store: Store) -> None:
    """A suspend under way while w2 takes over: the suspend raises LeaseLost, state is not
    'suspended', on_lost once, nothing written."""
    told = Told()
    wrapped = Script(store)
    s1, rs1, _ = await start(wrapped, ["one"], on_lost=told)
    await s1.run(user_input="a")
    await rs1.checkpoint()
    s2, rs2 = await taken_by_w2(store)
    taken = await store.versions(KEY)
    try:
        with pytest.raises(lr.LeaseLost):
            await asyncio.wait_for(rs1.suspend(), DEADLINE)
        assert rs1.state != "suspended"
        await asyncio.wait_for(told.event.wait(), DEADLINE)
        with pytest.raises((lr.LeaseLost, RuntimeError)):
            await rs1.suspend()
        assert len(told.errors) == 1
        assert await store.versions(KEY) == taken
    finally:
        await close_all((rs1, s1), (rs2, s2))


# -- concurrency and cancellation of the public methods ----------------------------------


async def test_two_finishes_at_once_one_wins_the_other_is_refused(store: Store) -> None:
    s1, rs1, _ = await start(store, ["one"])
    await s1.run(user_input="a")
    r = await asyncio.gather(rs1.suspend(), rs1.end(), rs1.pause(), return_exceptions=True)
    assert isinstance(r[0], int), r
    assert all(isinstance(x, RuntimeError) for x in r[1:]), r
    assert rs1.state == "suspended"
    assert (await saved(store)).state == "suspended"
    assert await free(store)
    await rs1.aclose()
    await s1.aclose()


async def test_methods_after_aclose_are_refused_typed(store: Store) -> None:
    s1, rs1, _ = await start(store, ["one"])
    await s1.run(user_input="a")
    await rs1.aclose()
    versions = await store.versions(KEY)
    for name in ("checkpoint", "pause", "resume", "suspend", "end"):
        with pytest.raises(RuntimeError):
            await getattr(rs1, name)()
    with pytest.raises(RuntimeError):
        await rs1.restore(AgentSession(userdata=Visit()), default=lambda: Receptionist(rs1))
    await rs1.aclose()
    assert rs1.state == "closed"
    assert await store.versions(KEY) == versions
    assert await free(store)
    await s1.aclose()


async def test_checkpoints_cancelled_at_every_step_lose_no_turn(store: Store) -> None:
    """checkpoint cancelled after 0..n loop steps, with turns in between: the versions
    stay in step with the store and every turn is finally stored."""
    s1, rs1, _ = await start(store, [f"r{i}" for i in range(30)])
    try:
        for steps in range(0, 12):
            await s1.run(user_input=f"u{steps}")
            task = asyncio.ensure_future(rs1.checkpoint())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        v = await rs1.checkpoint()
        assert v == (await store.versions(KEY))[-1].version
        assert texts(await saved(store)) == live_texts(s1)
        assert rs1._autosave.lost is None
    finally:
        await close_all((rs1, s1))


async def test_pause_resume_checkpoint_from_two_tasks_keep_state_consistent(store: Store) -> None:
    s1, rs1, _ = await start(store, ["one", "two"], autosave=True)
    try:
        await s1.run(user_input="a")
        for _ in range(5):
            r = await asyncio.gather(
                rs1.pause(), rs1.checkpoint(), rs1.pause(), return_exceptions=True
            )
            assert sum(isinstance(x, int) for x in (r[0], r[2])) == 1, r
            assert str(rs1.state) == "paused"
            back = await asyncio.gather(rs1.resume(), rs1.resume(), return_exceptions=True)
            assert sum(x is None for x in back) == 1, back
            assert str(rs1.state) == "active"
        await asyncio.wait_for(rs1._autosave.idle.wait(), DEADLINE)
        await rs1.checkpoint()
        assert (await saved(store)).state == "active"
    finally:
        await close_all((rs1, s1))


async def _salvaged(
    store: Store, owner: str
) -> tuple[AgentSession[Visit], lr.ResumableSession, Any]:
    s2: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs2 = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner=owner)
    agent = await rs2.restore(s2, default=lambda: Receptionist(rs2), salvage=True)
    if isinstance(agent, Receptionist):
        agent.rs = rs2
    return s2, rs2, agent


async def test_a_salvaged_session_checkpointed_with_nothing_new_reads_without_salvage(
    sqlite_store: tuple[Store, Path],
) -> None:
    """After restore(salvage=True) rolled back past a lost latest, a checkpoint with no
    new turn writes the session whole: a later restore reads without salvage."""
    store, path = sqlite_store
    s1, rs1, _ = await start(store, ["one", "two"])
    await s1.run(user_input="a")
    await rs1.checkpoint()
    kept = live_texts(s1)
    await s1.run(user_input="b")
    await rs1.suspend()
    lose_latest(path)
    s2, rs2, agent = await _salvaged(store, "w2")
    assert live_texts(s2) == kept
    await s2.start(agent)
    await rs2.checkpoint()  # nothing new said: the whole session all the same
    await rs2.aclose()
    await s2.aclose()
    s3: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs3 = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner="w3")
    try:
        await rs3.restore(s3, default=lambda: Receptionist(rs3))
        assert live_texts(s3) == kept
    finally:
        await rs3.aclose()
