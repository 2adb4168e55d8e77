"""Adversarial interleavings of the multi-worker and job guarantees: two workers (two
store objects on one SQLite file or one redis-server namespace) racing a takeover, an
operator's command, and the job policy's participant events (``JobPolicy``, what
`resumable_job` runs on room events).

Each test drives one interleaving deterministically (a hook in a store wrapper, or two
room events delivered back to back as a room delivers a queued pair) and asserts a
promise of DESIGN.md or of a docstring.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.agent_hooks.job import JobPolicy
from livekit_resume.stores.base import Commit, Lease, Store
from livekit_resume.testing.poll import eventually
from tests.test_hooks import KEY, Receptionist, start
from tests.test_job import RoomStandIn, closing

DEADLINE = 10.0
GRACE = 0.2


class HookedStore:
    """A store that runs a hook (once) just before its next commit, load or delete goes
    out: something landing while that call is in flight. A hook's coroutine is awaited
    (another worker acting meanwhile); after a plain hook (a room event) the loop turns
    once, so the room's event handlers run before the call lands."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.before_commit: Callable[[], Any] | None = None
        self.before_load: Callable[[], Any] | None = None
        self.before_delete: Callable[[], Any] | None = None
        self.before_acquire: Callable[[], Any] | None = None

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name == "_acquire_load":  # RedisStore takes the lease and loads in one call

            async def acquire_load(*args: Any, **kwargs: Any) -> Any:
                await self._run("before_acquire")
                return await found(*args, **kwargs)

            return acquire_load
        return found

    async def _run(self, name: str) -> None:
        hook = getattr(self, name)
        setattr(self, name, None)
        if hook is None:
            return
        result = hook()
        if inspect.isawaitable(result):
            await result
        else:
            await asyncio.sleep(0)

    async def commit(self, commit: Commit) -> int:
        await self._run("before_commit")
        return await self.inner.commit(commit)

    async def load(self, key: str, version: int | None = None) -> Any:
        await self._run("before_load")
        return await self.inner.load(key, version)

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        await self._run("before_delete")
        return bool(await self.inner.delete(key, lease=lease))

    async def acquire(self, key: str, owner: str, **options: Any) -> Any:
        await self._run("before_acquire")
        return await self.inner.acquire(key, owner, **options)


@pytest.fixture(params=["sqlite", "redis"])
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, Store]]:
    """Two store objects on the same data, as two workers have."""
    opts: dict[str, Any] = {}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/workers.db"
    else:
        server = request.getfixturevalue("redis_server")
        url, opts = server.url, {"namespace": f"w{uuid.uuid4().hex[:10]}"}
    a, b = lr.open_store(url, **opts), lr.open_store(url, **opts)
    yield a, b
    await a.aclose()
    await b.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    s = lr.open_store(f"sqlite:///{tmp_path}/job.db")
    yield s
    await s.aclose()


def rejoin_for(
    rs: lr.ResumableSession, session: AgentSession[Any], closed: asyncio.Event
) -> Callable[[], Any]:
    """What `resumable_job`'s ``rejoin`` does (job.py): wait for the suspend to close the
    session, restore it in place into the same AgentSession, start it again."""

    async def rejoin() -> None:
        await closed.wait()
        closed.clear()
        session.history.items.clear()
        agent = await rs.restore(session, default=lambda: Receptionist(rs), takeover=True)
        if isinstance(agent, Receptionist):
            agent.rs = rs
        await session.start(agent)

    return rejoin


async def rejoining_policy(
    store: Store, *, leave_grace: float = GRACE, **opts: Any
) -> tuple[HookedStore, RoomStandIn, AgentSession[Any], lr.ResumableSession, JobPolicy]:
    """A started session on ``store`` (hooked) in a stand-in room, under a started
    JobPolicy that restores in place as `resumable_job`'s does."""
    hooked = HookedStore(store)
    room = RoomStandIn()
    session, rs, _ = await start(hooked, ["one", "two", "three"], room=room, **opts)
    rejoin = rejoin_for(rs, session, closing(session))
    policy = JobPolicy(rs, room, leave_grace=leave_grace, rejoin=rejoin)  # type: ignore[arg-type]
    policy.start()
    return hooked, room, session, rs, policy


async def finish(policy: JobPolicy, rs: lr.ResumableSession, session: AgentSession[Any]) -> None:
    """Whatever the test found: nothing of it outlives the test."""
    policy.stop()
    for task in list(policy._tasks):
        task.cancel()
    await asyncio.gather(*policy._tasks, return_exceptions=True)
    await rs.aclose()
    await session.aclose()


async def settle(policy: JobPolicy, rs: lr.ResumableSession, *final: str) -> str:
    """Wait until the policy has nothing in flight and nothing armed, and the session is
    in one of ``final``: the state it settled in."""

    async def settled() -> bool:
        return not policy._tasks and policy._timer is None and rs.state in final

    await eventually(settled, f"the session settles in one of {final}", DEADLINE)
    return rs.state


# -------------------------------------------------- the job policy and participants


@pytest.mark.parametrize("when", ["back_to_back", "pausing"])
async def test_a_caller_who_leaves_and_is_back_at_once_is_never_suspended(
    sqlite_store: Store, when: str
) -> None:
    """JobPolicy: "a participant back within the grace finds it resumed in place".
    The room delivers a leave and a join back to back (a queued pair of events, a
    network blip), or the join while the pause for the leave is cutting speech: the
    caller is in the room from then on, so the session must end up active, not
    suspended by a grace that nobody is waiting out."""
    room = RoomStandIn()
    session, rs, _ = await start(sqlite_store, ["one", "two"], room=room)
    policy = JobPolicy(rs, room, leave_grace=GRACE)  # type: ignore[arg-type]
    policy.start()
    await session.run(user_input="a")
    # The policy's pause held at its start, so that the join lands while it is under way
    # on every Python (from 3.12 a pause with no speech to cut may finish without yielding).
    pausing, go_on = asyncio.Event(), asyncio.Event()
    pause = rs.pause

    async def held_pause() -> int:
        pausing.set()
        await go_on.wait()
        return await pause()

    rs.pause = held_pause  # type: ignore[method-assign]
    try:
        room.leave("caller")
        if when == "pausing":
            await asyncio.wait_for(pausing.wait(), DEADLINE)
            assert rs.state == "active"
        else:
            go_on.set()
        room.join("caller")
        assert room.remote_participants  # the caller is back
        go_on.set()
        state = await settle(policy, rs, "active", "suspended", "closed")
        assert state == "active", "the caller is in the room but the session was suspended"
    finally:
        await finish(policy, rs, session)


async def test_a_caller_who_is_back_and_gone_again_is_suspended_after_the_grace(
    sqlite_store: Store,
) -> None:
    """JobPolicy: "pauses the session when the last remote participant leaves ... and
    suspends it when nobody [comes back]". A caller back for an instant and gone again
    (a flapping connection: join and leave delivered back to back) leaves the room empty:
    the grace must run again and suspend, not leave the session active with nobody
    there, holding its lease and its model connections for ever."""
    room = RoomStandIn()
    session, rs, _ = await start(sqlite_store, ["one", "two"], room=room)
    policy = JobPolicy(rs, room, leave_grace=GRACE)  # type: ignore[arg-type]
    policy.start()
    closed = closing(session)
    try:
        await session.run(user_input="a")
        room.leave("caller")
        await settle_paused(policy, rs)
        room.join("caller")
        room.leave("caller")
        assert not room.remote_participants  # nobody is in the room
        try:
            await asyncio.wait_for(closed.wait(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"nobody is in the room and the session is {rs.state} after {DEADLINE}s")
        assert rs.state == "suspended"
    finally:
        await finish(policy, rs, session)


async def test_a_caller_gone_while_the_store_blinks_is_still_suspended_after_the_grace(
    sqlite_store: Store,
) -> None:
    """JobPolicy: "pauses the session when the last remote participant leaves ... and
    suspends it when nobody does". A store that fails the pause's save once (a blip:
    `StoreUnavailable`, the save is sent again before the next one) leaves the session
    paused, silent, all the same: nobody coming back, the grace must still suspend it,
    not keep it paused with its lease and model connections until the job ends."""
    hooked = HookedStore(sqlite_store)
    room = RoomStandIn()
    session, rs, _ = await start(hooked, ["one", "two"], room=room)
    policy = JobPolicy(rs, room, leave_grace=GRACE)  # type: ignore[arg-type]
    policy.start()
    closed = closing(session)
    try:
        await session.run(user_input="a")

        def blink() -> None:
            raise lr.StoreUnavailable("the store did not answer in time")

        hooked.before_commit = blink  # the pause's save
        room.leave("caller")
        try:
            await asyncio.wait_for(closed.wait(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"nobody is in the room and the session is {rs.state} after {DEADLINE}s")
        assert rs.state == "suspended" and rs._lease is None
        info = await sqlite_store.info(KEY)
        assert info is not None and info.info["state"] == "suspended"
    finally:
        await finish(policy, rs, session)


async def settle_paused(policy: JobPolicy, rs: lr.ResumableSession) -> None:
    async def paused() -> bool:
        return rs.state == "paused" and policy._timer is not None and not policy._tasks

    await eventually(paused, "the session is paused with its grace running", DEADLINE)


async def test_a_caller_back_while_the_grace_suspends_the_session_gets_it_back(
    sqlite_store: Store,
) -> None:
    """JobPolicy with ``rejoin`` (what `resumable_job` passes): "a participant joining
    while the session is suspended in this job (the grace ran out ...) restores it in
    place". The caller joins while the grace's suspend is writing its final snapshot:
    once that suspend is done the caller is in the room, so the session must be active
    again (restored in place, or the suspend given up), not suspended for good."""
    hooked, room, session, rs, policy = await rejoining_policy(sqlite_store)
    try:
        await session.run(user_input="a")
        room.leave("caller")
        await settle_paused(policy, rs)
        hooked.before_commit = lambda: room.join("caller")  # the suspend's final snapshot
        state = await settle(policy, rs, "active", "suspended")
        assert room.remote_participants
        assert state == "active", "the caller is back in the room but the session stays suspended"
        assert rs._lease is not None
    finally:
        await finish(policy, rs, session)


async def test_a_caller_gone_again_while_restored_in_place_is_suspended_after_the_grace(
    sqlite_store: Store,
) -> None:
    """JobPolicy with ``rejoin``: a participant joining a suspended session restores it
    in place; one who leaves again while that restore runs leaves the room empty, and
    the grace must then pause and suspend it ("suspends it when nobody does [come
    back]"), not leave it active with nobody there."""
    hooked, room, session, rs, policy = await rejoining_policy(sqlite_store)
    try:
        await session.run(user_input="a")
        room.leave("caller")
        assert await settle(policy, rs, "suspended") == "suspended"
        restores = rs._holder.acquire_and_load
        restored = asyncio.Event()

        async def restore(*, takeover: bool) -> Any:
            try:
                return await restores(takeover=takeover)
            finally:
                restored.set()

        rs._holder.acquire_and_load = restore  # type: ignore[method-assign]
        suspended_again = asyncio.Event()
        session.on("close", lambda _ev: suspended_again.set())
        hooked.before_load = lambda: room.leave("caller")  # gone while the restore reads
        room.join("caller")
        await asyncio.wait_for(restored.wait(), DEADLINE)  # the restore in place ran
        assert not room.remote_participants  # nobody is in the room
        try:
            await asyncio.wait_for(suspended_again.wait(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"nobody is in the room and the session is {rs.state} after {DEADLINE}s")
        await settle(policy, rs, "suspended")
    finally:
        await finish(policy, rs, session)


# ------------------------------------------------------ remote control and takeover


class TakeoverAfterInfo:
    """The operator's store: right after the sender reads the session's epoch, another
    worker takes the session over (its restore has taken the lease; its inbox is not
    listening yet)."""

    def __init__(self, inner: Store, taker: Store) -> None:
        self.inner = inner
        self.taker = taker
        self.armed = True
        self.lease: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def info(self, key: str) -> Any:
        found = await self.inner.info(key)
        if self.armed:
            self.armed = False
            self.lease = await self.taker.acquire(key, "w2", takeover=True)
        return found


async def test_a_resume_sent_before_a_takeover_is_not_done_by_the_fenced_worker(
    two_stores: tuple[Store, Store], sessions: list[AgentSession[Any]]
) -> None:
    """remote.py: "A command carries the epoch it is aimed at: after a takeover it is
    refused"; control.py: "A command aimed at an older epoch is refused (the session was
    taken over since it was aimed)". The takeover lands between the operator reading
    the epoch and the owner taking the command: the fenced worker must not answer
    ``done`` (the conversation, now another worker's, was not resumed) nor un-pause
    itself and speak again."""
    from tests.test_control import KEY as CONTROL_KEY
    from tests.test_control import live

    a, b = two_stores
    old = await live(a, sessions, owner="w1")
    try:
        await old.pause()
        remote = lr.control(TakeoverAfterInfo(a, b))
        try:
            version = await asyncio.wait_for(remote.resume(CONTROL_KEY, timeout=5.0), 30)
        except lr.CommandRefused as e:
            assert "taken over" in e.reason
        else:
            pytest.fail(f"resume answered done (version {version}) by the fenced worker")
        assert old.state == "paused", "the fenced worker un-paused itself"
    finally:
        await old.aclose()


async def test_a_caller_back_while_suspend_after_suspends_the_session_gets_it_back(
    sqlite_store: Store,
) -> None:
    """resumable_job: "a pause longer than ``suspend_after`` suspends the session ...;
    a participant joining the room then restores it in this job". The caller joins
    while that suspend writes its final snapshot (the pause was the policy's, for their
    leave): once the suspend is done the caller is in the room, so the session must be
    active again, not suspended for good with its audio switched back on half-way."""
    # the grace outlasts the test: suspend_after decides
    hooked, room, session, rs, policy = await rejoining_policy(
        sqlite_store, leave_grace=DEADLINE * 3, suspend_after=GRACE
    )
    closed = closing(session)
    try:
        await session.run(user_input="a")
        room.leave("caller")
        await settle_paused(policy, rs)
        hooked.before_commit = lambda: room.join("caller")  # the suspend's final snapshot

        async def settled() -> bool:
            return (
                not policy._tasks
                and rs.state in ("active", "suspended")
                and (rs.state == "active" or closed.is_set())
            )

        await eventually(settled, "the session settles", DEADLINE)
        assert room.remote_participants
        assert rs.state == "active", (
            "the caller is back in the room but the session stays suspended"
        )
    finally:
        await finish(policy, rs, session)


# ------------------------------------------------- two workers, one conversation


def users(store_snapshot: Any) -> list[str]:
    return [
        " ".join(str(c) for c in i["content"])
        for i in store_snapshot.history
        if i["type"] == "message" and i["role"] == "user"
    ]


async def latest(store: Store, key: str) -> Any:
    from livekit_resume.bridge import from_stored
    from livekit_resume.snapshot.codec import Codec

    return from_stored(Codec(), await store.load(key))


async def test_workers_restoring_one_key_at_once_leave_exactly_one_holder(
    two_stores: tuple[Store, Store],
) -> None:
    """DESIGN.md, Ownership: a lease per key; without takeover a held session is refused
    (`SessionBusy`). Two workers restoring a new key at the same moment: one wins."""
    from tests.test_hooks import KEY

    a, b = two_stores
    results = await asyncio.gather(
        start(a, ["a"], owner="w1"), start(b, ["b"], owner="w2"), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    try:
        assert len(won) == 1, results
        assert all(isinstance(r, lr.SessionBusy) for r in results if r not in won)
        info = await a.info(KEY)
        assert info is not None and info.owner == won[0][1]._holder.owner
    finally:
        for session, rs, _ in won:
            await rs.aclose()
            await session.aclose()


@pytest.mark.parametrize("during", ["checkpoint", "aclose"])
async def test_a_takeover_while_the_old_worker_commits_keeps_the_new_workers_turns(
    two_stores: tuple[Store, Store], during: str
) -> None:
    """DESIGN.md, Ownership: "Every commit carries its epoch and the store refuses a
    stale one (`LeaseLost`): a zombie worker can never overwrite the conversation of the
    worker that took over." Worker 2 takes over and commits a turn while worker 1's
    commit (a checkpoint, or its final save on close) is in flight: worker 1's commit is
    refused, the versions run on without a gap, the last is worker 2's with its turn,
    and worker 2 still holds the lease once worker 1 is closed."""
    from tests.test_hooks import KEY

    a, b = two_stores
    stalling = HookedStore(a)
    s1, rs1, _ = await start(stalling, ["one", "two"], owner="w1")
    await s1.run(user_input="first")
    v1 = await rs1.checkpoint()
    taken: list[Any] = []

    async def take_over() -> None:
        s2, rs2, _ = await start(b, ["three"], owner="w2", takeover=True)
        taken.extend([s2, rs2])
        await s2.run(user_input="second, on worker 2")
        await rs2.checkpoint()

    try:
        await s1.run(user_input="lost on worker 1")
        stalling.before_commit = take_over
        if during == "checkpoint":
            with pytest.raises(lr.LeaseLost):
                await rs1.checkpoint()
        await rs1.aclose()
        s2, rs2 = taken
        versions = [v.version for v in await b.versions(KEY)]
        assert versions == list(range(1, versions[-1] + 1))
        assert versions[-1] == rs2.version > v1
        snap = await latest(b, KEY)
        assert users(snap) == ["first", "second, on worker 2"]
        info = await b.info(KEY)
        assert info is not None and info.owner == "w2" and info.epoch == rs2._holder.epoch
        await s2.run(user_input="third, on worker 2")
        assert await rs2.checkpoint() == versions[-1] + 1
    finally:
        await s1.aclose()
        if taken:
            await taken[1].aclose()
            await taken[0].aclose()


# ------------------------------------------------- resumable_job in job processes

from tests import test_resumable_job as _rj  # noqa: E402
from tests.lk.jobs import JobHarness  # noqa: E402

target = _rj.target


async def test_an_older_job_never_takes_the_conversation_back_from_a_newer_one(
    target: dict[str, Any],
) -> None:
    """job.py: "a new job for a key another job holds takes it over at once (the newest
    job wins, with fencing)". Alice leaves room web-a, the grace suspends her call in
    job 1 (alive, waiting for a rejoin); she calls back in room web-b and job 2 resumes
    the conversation (the key is her identity). Someone then joins web-a (her stale tab
    reconnecting): job 1, the older job, must not take the conversation back from job 2
    in the middle of her call, fencing it and ending it."""
    by_caller = _rj.metadata(target, key="identity", leave_grace=0.3)
    async with JobHarness() as harness:
        first = await harness.start_job(
            _rj.ENTRY, room="web-a", metadata=by_caller, participant_identity="alice"
        )
        await _rj.ready(first)
        await _rj.turn(first, _rj.TURNS[0])
        await first.send("leave alice CLIENT_INITIATED")
        await _rj.until_state(first, "suspended")

        second = await harness.start_job(
            _rj.ENTRY, room="web-b", metadata=by_caller, participant_identity="alice"
        )
        assert (await _rj.ready(second))[0]
        await _rj.turn(second, "I am back in a new room")

        await first.send("join alice")  # her old tab reconnects to web-a

        async def restored_in_job_1() -> bool:
            return (await _rj.state(first))[0] == "active"

        try:  # a restore in place takes well under a second; 6 s bounds it
            await eventually(restored_in_job_1, "job 1 restores the call", 6.0)
        except pytest.fail.Exception:
            taken_back = False  # job 1 left the conversation to job 2
        else:
            taken_back = True
        state, lost = await _rj.state(second)
        assert not taken_back, f"job 1 took the call back; job 2 is {state}, fenced: {lost}"
        assert (state, lost) == ("active", False)
        await _rj.turn(second, "still with me?")
        await second.shutdown()
        await first.shutdown()
    snap = await _rj.stored(target, "alice")
    assert _rj.user_texts(snap) == [_rj.TURNS[0], "I am back in a new room", "still with me?"]


async def test_a_resume_sent_while_the_owner_suspends_is_refused_or_the_session_resumed(
    two_stores: tuple[Store, Store], sessions: list[AgentSession[Any]]
) -> None:
    """remote.py: each call "returns the version the owner wrote" and everything not
    applied "raises `CommandRefused` naming why". An operator's resume reaching the owner
    while the owner's own suspend (suspend_after, the app) writes its final snapshot: it
    is either refused, or done and the session left active. Answering ``done`` and then
    suspending anyway tells the operator the call is back when it is over."""
    from tests.test_control import KEY as CONTROL_KEY
    from tests.test_control import live

    a, b = two_stores
    stalling = HookedStore(a)
    old = await live(stalling, sessions, owner="w1")
    outcome: dict[str, Any] = {}

    async def operator_resumes() -> None:
        try:
            outcome["done"] = await lr.control(b).resume(CONTROL_KEY, timeout=5.0)
        except lr.CommandRefused as e:
            outcome["refused"] = e.reason

    try:
        await old.pause()
        stalling.before_commit = operator_resumes  # the suspend's final snapshot
        await old.suspend()
        assert old.state == "suspended"
        assert "done" not in outcome, f"resume answered done, then the session was {old.state}"
        assert "refused" in outcome
    finally:
        await old.aclose()


async def test_a_lease_expired_under_a_long_checkpoint_fences_it_when_another_worker_acquires(
    two_stores: tuple[Store, Store],
) -> None:
    """DESIGN.md, Ownership: a lease per key with a TTL; a commit carrying a stale epoch
    is refused. Worker 1's lease (0.5 s) runs out while its checkpoint is stalled;
    worker 2 acquires the free session without takeover and commits a turn; worker 1's
    commit must then be refused and worker 2's turn stay the latest version."""
    from tests.test_hooks import KEY

    a, b = two_stores
    stalling = HookedStore(a)
    s1, rs1, _ = await start(stalling, ["one", "two"], owner="w1", lease_ttl=0.5)
    taken: list[Any] = []

    async def expire_and_acquire() -> None:
        async def expired() -> bool:
            info = await b.info(KEY)
            return info is not None and info.owner is None

        await eventually(expired, "worker 1's lease ran out", DEADLINE)
        s2, rs2, _ = await start(b, ["three"], owner="w2")  # no takeover: the lease is free
        taken.extend([s2, rs2])
        await s2.run(user_input="on worker 2")
        await rs2.checkpoint()

    try:
        await s1.run(user_input="first")
        v1 = await rs1.checkpoint()
        await s1.run(user_input="lost on worker 1")
        stalling.before_commit = expire_and_acquire
        with pytest.raises(lr.LeaseLost) as lost:
            await rs1.checkpoint()
        assert not lost.value.vanished
        rs2 = taken[1]
        assert rs2.version == v1 + 1
        assert [v.version for v in await b.versions(KEY)] == list(range(1, v1 + 2))
        assert users(await latest(b, KEY)) == ["first", "on worker 2"]
    finally:
        await rs1.aclose()
        await s1.aclose()
        if taken:
            await taken[1].aclose()
            await taken[0].aclose()


def _job_store(ctx: Any) -> Store:
    """The store a job child of this file is given in its dispatch metadata."""
    opts: dict[str, Any] = json.loads(ctx.job.metadata)
    return lr.open_store(opts["store"], **opts.get("store_options", {}))


def _job_call(
    ctx: Any, store: Store, *, leave_grace: float | None = GRACE
) -> Callable[[AgentSession[Any]], Awaitable[lr.ResumableSession]]:
    """`resumable_job` as this file's job children call it: the clerk, text only."""
    from livekit.agents.voice import room_io

    registry = lr.AgentRegistry()
    registry.register(_rj.Clerk)
    quiet = room_io.RoomOptions(audio_input=False, audio_output=False, text_output=False)

    def call(session: AgentSession[Any]) -> Awaitable[lr.ResumableSession]:
        return lr.resumable_job(
            ctx,
            session,
            registry=registry,
            default=_rj.Clerk,
            store=store,
            leave_grace=leave_grace,
            room_options=quiet,
            debounce=0.01,
        )

    return call


def _serve(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    """A job child's answers to ``turn`` (a user turn, saved) and ``state``."""
    from tests.lk import jobs

    async def turn(args: list[str]) -> None:
        await session.run(user_input=" ".join(args))
        await rs._autosave.idle.wait()
        jobs.report("TURN", rs.version)

    def state(_: list[str]) -> None:
        jobs.report("STATE", _rj.shown_state(session, rs), 0)

    jobs.on_command("turn", turn)
    jobs.on_command("state", state)


async def _entry_twice_at_once(ctx: Any) -> None:
    """A job whose code restores its key twice at the same moment (two handlers racing,
    say): `resumable_job` twice, concurrently, each with its own AgentSession."""
    from tests.lk import jobs
    from tests.lk.scripted_llm import ScriptedLLM, make_text_session

    call = _job_call(ctx, _job_store(ctx), leave_grace=None)
    results = await asyncio.gather(
        call(make_text_session(ScriptedLLM(default="noted"))),
        call(make_text_session(ScriptedLLM(default="noted"))),
        return_exceptions=True,
    )
    jobs.report(
        "TWICE_AT_ONCE",
        *(
            type(r).__name__ if isinstance(r, BaseException) else f"epoch={r._holder.epoch}"
            for r in results
        ),
    )


async def test_the_same_job_restoring_a_key_twice_at_once_is_refused(
    target: dict[str, Any],
) -> None:
    """job.py: "The same job restoring a key twice is refused (`SessionBusy`)." Two
    `resumable_job` calls of one job racing each other: one restores, the other is
    refused, never two sessions holding one lease at one epoch (both would write, and
    the second commit would end the job as if taken over)."""
    async with JobHarness() as harness:
        job = await harness.start_job(
            "tests.test_worker_races:_entry_twice_at_once",
            room="call-9",
            metadata=_rj.metadata(target),
        )
        outcomes = (await job.expect("TWICE_AT_ONCE")).split()[1:]
        await job.shutdown()
    assert sorted(o.split("=")[0] for o in outcomes) == ["SessionBusy", "epoch"], outcomes


async def _entry_again_during_rejoin(ctx: Any) -> None:
    """A job whose call was suspended by the leave grace; when the caller rejoins, the
    first call's policy restores it in place, and while that restore takes the lease the
    job's code calls `resumable_job` for the key again with a new AgentSession."""
    from tests.lk import jobs
    from tests.lk.scripted_llm import ScriptedLLM, make_text_session

    store = HookedStore(_job_store(ctx))
    call = _job_call(ctx, store)
    model = ScriptedLLM(default="noted")
    first = make_text_session(model)
    live = [(first, await call(first))]

    async def again() -> None:
        session = make_text_session(model)
        try:
            live.append((session, await call(session)))
        except lr.SessionBusy as e:
            jobs.report("AGAIN", type(e).__name__)
        else:
            jobs.report("AGAIN", f"epoch={live[-1][1]._holder.epoch}")

    def arm(_: list[str]) -> None:
        store.before_acquire = again  # the restore in place's acquisition of the lease

    def holders(_: list[str]) -> None:
        jobs.report(
            "HOLDERS",
            json.dumps(
                {
                    "held": [rs._held_epoch() for _, rs in live],
                    "ids": [[i.id for i in s.history.items] for s, _ in live],
                }
            ),
        )

    _serve(*live[0])
    jobs.on_command("arm", arm)
    jobs.on_command("holders", holders)
    jobs.report("READY", 0, live[0][1].version, "[]")


async def test_a_second_call_racing_the_restore_in_place_is_refused_and_one_holder_stays(
    target: dict[str, Any],
) -> None:
    """job.py: "The same job restoring a key twice is refused (`SessionBusy`)." The
    first call's session is suspended by the grace; the caller rejoins and its policy
    restores it in place. A second `resumable_job` call for the key made while that
    restore takes the lease must be refused: the restore in place completes, and one
    session holds the lease (two holders at one epoch both write, and the history is
    served twice)."""
    async with JobHarness() as harness:
        job = await harness.start_job(
            "tests.test_worker_races:_entry_again_during_rejoin",
            room="call-10",
            metadata=_rj.metadata(target),
        )
        await _rj.ready(job)
        await _rj.turn(job, _rj.TURNS[0])
        await job.send("leave caller CLIENT_INITIATED")
        await _rj.until_state(job, "suspended")
        await job.send("arm")
        await job.send("join caller")
        assert (await job.expect("AGAIN")).split()[1] == "SessionBusy"
        await _rj.until_state(job, "active")
        await job.send("holders")
        found = await job.expect_json("HOLDERS")
        assert len(found["held"]) == 1 and found["held"][0] is not None, found
        (ids,) = found["ids"]
        assert len(ids) == len(set(ids)), "an item is in the restored history twice"
        await _rj.turn(job, _rj.TURNS[1])
        await job.shutdown()
    assert _rj.user_texts(await _rj.stored(target, "call-10")) == list(_rj.TURNS[:2])


async def test_archiving_a_stale_conversation_never_deletes_a_turn_another_worker_wrote(
    two_stores: tuple[Store, Store],
) -> None:
    """job.py, `archive_stale`: "A session some worker still holds is left alone." A
    job with ``resume_within`` finds the conversation stale and free, and copies it
    aside; meanwhile another job for the key (re-dispatched, or the caller back in
    another room) restores it and commits a turn. The archiving job must then leave the
    key alone: removing it deletes that acknowledged turn, which the archive does not
    hold either."""
    import time

    from livekit_resume.agent_hooks.job import archive_stale
    from livekit_resume.snapshot.codec import Codec
    from tests.test_hooks import KEY

    a, b = two_stores
    s1, rs1, _ = await start(a, ["one"], owner="job-1")
    await s1.run(user_input="long ago")
    await rs1.suspend()

    async def stale() -> bool:
        info = await b.info(KEY)
        return info is not None and time.time() - info.updated_at > 0.3

    await eventually(stale, "the conversation is older than resume_within", DEADLINE)
    taken: list[Any] = []

    async def another_job_restores() -> None:
        s2, rs2, _ = await start(a, ["two"], owner="job-2", takeover=True)
        taken.extend([s2, rs2])
        await s2.run(user_input="acknowledged on job 2")
        await rs2.checkpoint()

    archiver = HookedStore(b)
    archiver.before_delete = another_job_restores
    try:
        await archive_stale(archiver, Codec(), KEY, older_than=0.3, owner="job-3")
        assert len(taken) == 2  # job 2 restored and committed meanwhile
        try:
            kept = await latest(b, KEY)
        except lr.SnapshotNotFound:
            pytest.fail("the key was removed under job 2: its acknowledged turn is gone")
        assert users(kept) == ["long ago", "acknowledged on job 2"]
    finally:
        if taken:
            await taken[1].aclose()
            await taken[0].aclose()


async def _entry_rejoin_start_fails(ctx: Any) -> None:
    """A job whose call was suspended by the leave grace; when the caller rejoins, the
    restore in place succeeds and the session's restart fails once (``arm``: the room
    went away mid-start, a model refused to connect)."""
    from livekit_resume.agent_hooks.job import _policies
    from tests.lk import jobs
    from tests.lk.scripted_llm import ScriptedLLM, make_text_session

    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await _job_call(ctx, _job_store(ctx))(session)
    starts = session.start
    failing: list[bool] = []

    async def start(*args: Any, **kwargs: Any) -> Any:  # a one-shot fault in the restart
        if failing:
            failing.clear()
            raise RuntimeError("the session could not start")
        return await starts(*args, **kwargs)

    session.start = start  # type: ignore[method-assign]

    def arm(_: list[str]) -> None:
        failing.append(True)

    def settled(_: list[str]) -> None:
        policy = _policies[ctx]()  # listening, so alive
        busy = (policy is not None and bool(policy._tasks)) or bool(failing)
        jobs.report("SETTLED", int(not busy), rs.state, int(rs._lease is not None))

    _serve(session, rs)
    jobs.on_command("arm", arm)
    jobs.on_command("settled", settled)
    jobs.report("READY", 0, rs.version, "[]")


async def test_a_restore_in_place_whose_session_fails_to_start_frees_the_call_for_a_retry(
    target: dict[str, Any],
) -> None:
    """job.py: a participant joining a suspended session restores it in place; one that
    cannot be restored "stays suspended ... and may try again on the next join". A
    restore that took the lease and whose session then failed to start holds nothing
    afterwards: no session runs, so the call must be suspended again with its lease
    released (not active, renewing a lease for a session nobody can reach, and never
    tried again), and the caller's next join restores it."""
    async with JobHarness() as harness:
        job = await harness.start_job(
            "tests.test_worker_races:_entry_rejoin_start_fails",
            room="call-11",
            metadata=_rj.metadata(target),
        )
        await _rj.ready(job)
        await _rj.turn(job, _rj.TURNS[0])

        async def settled() -> bool:
            await job.send("settled")
            return (await job.expect("SETTLED")).split()[1] == "1"

        await job.send("leave caller CLIENT_INITIATED")
        await _rj.until_state(job, "suspended")
        # the grace's suspend is over (else its step would see the join too, and a second
        # restore in place, queued behind the failing one, would hide what it left)
        await eventually(settled, "the grace's suspend is over", DEADLINE)
        await job.send("arm")
        await job.send("join caller")  # restored in place; its start fails
        await eventually(settled, "the restore in place is over", DEADLINE)
        await job.send("settled")
        _, _, state, held = (await job.expect("SETTLED")).split()
        assert (state, held) == ("suspended", "0"), f"no session runs, yet it is {state}"
        info = await _rj._info(target, "call-11")
        assert info is not None and info.owner is None, f"no session runs, yet {info}"
        await job.send("leave caller CLIENT_INITIATED")
        await job.send("join caller")  # the next join tries again
        await _rj.until_state(job, "active")
        await _rj.turn(job, _rj.TURNS[1])
        await job.shutdown()
    assert _rj.user_texts(await _rj.stored(target, "call-11")) == list(_rj.TURNS[:2])
