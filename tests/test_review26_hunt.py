"""Hunt `review26`: a review of `Store.acquire(..., reclaim=...)` (3b29035, 6b3f9ee,
53d0545, 8e052d1, 50033b5): the same sequences run on MemoryStore, a SQLiteStore on a
tmp file and a real ``redis-server`` of the test alone, each with the same injected
clock, and compared; a zombie whose lease had expired in the state a store went back
to; a reclaim racing an operator's ``rm`` through Redis's separate tombstone read.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.agent_hooks.lease import LeaseHolder
from livekit_resume.errors import LeaseLost, SessionBusy
from livekit_resume.stores.base import Commit
from livekit_resume.stores.memory import MemoryStore
from tests.redis_servers import RedisServer
from tests.test_fence_hunt import FakeClock, ForgetfulSQLiteStore
from tests.test_hooks import KEY, start
from tests.test_lost_hunt import bare_redis, close_all, outcome, stored_texts

__all__ = ["bare_redis"]  # a fixture, shared

pytestmark = pytest.mark.filterwarnings("ignore")

LEASE = 1.0  # seconds, by the injected clock


# ------------------------------------------------------------------ three stores


class Backend:
    """One store of a kind, with the injected clock, and the two things a store can do
    to its data: forget it all (restarted empty) and go back to an earlier copy (a
    failover to a lagging replica, a backup restored)."""

    kind = "?"

    def __init__(self, store: Any, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock

    async def forget(self) -> None:
        raise NotImplementedError

    async def snapshot(self) -> Any:
        raise NotImplementedError

    async def rollback(self, snap: Any) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        await self.store.aclose()


class MemoryBackend(Backend):
    kind = "memory"

    async def forget(self) -> None:
        self.store._sessions.clear()
        self.store._tombstones.clear()

    async def snapshot(self) -> Any:
        return copy.deepcopy((self.store._sessions, self.store._tombstones))

    async def rollback(self, snap: Any) -> None:
        sessions, tombstones = copy.deepcopy(snap)
        self.store._sessions.clear()
        self.store._sessions.update(sessions)
        self.store._tombstones.clear()
        self.store._tombstones.update(tombstones)


class SQLiteBackend(Backend):
    kind = "sqlite"

    async def forget(self) -> None:
        self.store.forget()

    async def snapshot(self) -> Any:
        return self.store.snapshot()

    async def rollback(self, snap: Any) -> None:
        self.store.rollback(snap)

    async def close(self) -> None:
        await self.store.aclose()
        self.store._side.close()


class RedisBackend(Backend):
    kind = "redis"

    async def forget(self) -> None:
        await self.store._client.flushdb()

    async def snapshot(self) -> Any:
        raw = self.store._client
        out = []
        for k in await raw.keys("*"):
            out.append((k, await raw.pttl(k), await raw.dump(k)))
        return out

    async def rollback(self, snap: Any) -> None:
        raw = self.store._client
        await raw.flushdb()
        for k, pttl, data in snap:
            await raw.restore(k, max(pttl, 0), data, replace=True)


async def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    clock = FakeClock()
    if kind == "memory":
        return MemoryBackend(MemoryStore(clock=clock), clock)
    if kind == "sqlite":
        path = tmp_path / f"r26-{uuid.uuid4().hex[:6]}.db"
        return SQLiteBackend(ForgetfulSQLiteStore(path, clock), clock)
    server: RedisServer = request.getfixturevalue("bare_redis")
    store = lr.open_store(server.url, namespace=f"r{uuid.uuid4().hex[:8]}", clock=clock)
    return RedisBackend(store, clock)


KINDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = await make_backend(request.param, tmp_path, request)
    try:
        yield b
    finally:
        await b.close()


async def save(h: LeaseHolder, version: int, data: bytes) -> Any:
    """session.py `_commit_or_reacquire` for a whole commit: reacquire first if the
    holder is vanished; on a vanished `LeaseLost`, reacquire and commit again once.
    The version that landed, or the `LeaseLost` that fenced the holder."""
    try:
        if h.vanished:
            version = await h.reacquire(version)
        try:
            return await h.commit(Commit(h.key, h.epoch, version, data, [], 0, whole=True))
        except LeaseLost as e:
            if not e.vanished:
                raise
            version = await h.reacquire(version)
            return await h.commit(Commit(h.key, h.epoch, version, data, [], 0, whole=True))
    except LeaseLost as e:
        return e


async def vanished_under_r(store: Any, clock: FakeClock, key: str) -> tuple[LeaseHolder, int]:
    """R holds ``key`` on a Redis store and commits v1; Redis restarts empty; R's next
    commit says vanished (what makes it reclaim next)."""
    r = LeaseHolder(store, key, "R", LEASE)
    await r.acquire(takeover=False)
    v1 = await save(r, 0, b"R: hello")
    assert v1 == 1
    clock.advance(100)
    await store._client.flushdb()  # restarted without its data
    clock.advance(100)
    with pytest.raises(LeaseLost) as gone:
        await r.commit(Commit(key, r.epoch, v1, b"R: x", [], 0, whole=True))
    assert gone.value.vanished
    return r, v1


def tick(b: Backend, us: int = 100) -> None:
    b.clock.advance(us)


# ------------------------------ 1. a zombie whose lease had expired in the state restored


async def test_rolled_back_to_a_zombies_expired_lease_the_newer_holder_keeps_the_call(
    backend: Backend,
) -> None:
    """R holds the key (E1) and commits v1; the store's state is copied (a replica, a
    backup). R commits v2, then freezes (a GC pause, a partition) past its lease. W, a
    new job, restores the call without takeover (the lease is free: E2 > E1) and talks
    (v3). The store goes back to the copy (a failover to the lagging replica; a backup
    restored): epoch E1, R's lease, *expired there too* (its expiry is the copy's).
    R wakes and saves first; then W saves.

    Should (failure-model.md, "Redis rolled back": "of the holders a store forgot, the
    latest wins", what is lost: "nothing the live worker holds"; multi-worker.md: "a
    zombie ... cannot overwrite the conversation of the worker that took over"): W,
    the newest holder, keeps the call: its next save lands (reclaiming E2, as when R's
    lease is still live in the copy, or the store is emptied), and R is fenced.

    Does: R's commit finds the head behind v2 (vanished) and reclaims E1, which is the
    store's own epoch: `acquired_epoch` (stores/base.py) grants a reclaim only *above*
    the store's epoch, so it falls through to an ordinary acquisition of an expired
    lease, ``max(epoch + 1, clock)``: a brand-new epoch from the clock, above E2. W's
    next save is then refused as a takeover (`LeaseLost`, not vanished): on_lost, the
    call ended, W's turns lost; the zombie's conversation stands. Same in acquire.lua."""
    b = backend
    key = f"exp-{uuid.uuid4().hex[:6]}"
    r = LeaseHolder(b.store, key, "R", LEASE)
    w = LeaseHolder(b.store, key, "W", LEASE)
    await r.acquire(takeover=False)
    v1 = await save(r, 0, b"R: hello")
    assert v1 == 1
    copy_ = await b.snapshot()
    tick(b)
    v2 = await save(r, v1, b"R: my name is Ada")
    assert v2 == 2
    b.clock.advance(5_000_000)  # R frozen past its lease
    await w.acquire(takeover=False)
    assert w.epoch > r.epoch
    tick(b)
    v3 = await save(w, v2, b"W: the caller, on W now")
    assert v3 == 3
    tick(b)
    await b.rollback(copy_)
    tick(b)
    zombie = await save(r, v2, b"R: zombie words")
    tick(b)
    newer = await save(w, v3, b"W: book me on monday")
    info = await b.store.info(key)
    assert isinstance(newer, int), (
        f"[{b.kind}] the newest holder W (epoch {w.epoch}) was fenced after the store went "
        f"back to the zombie R's expired lease: {newer!r}; R's save {zombie!r} reclaimed "
        f"its epoch as a new one ({r.epoch}, above W's); the store is held by "
        f"{info.owner if info else None!r} at {info.epoch if info else None}"
    )
    fenced = await save(r, zombie if isinstance(zombie, int) else v2, b"R: more")
    assert isinstance(fenced, LeaseLost) and not fenced.vanished, fenced
    stored = await b.store.load(key)
    assert stored.head == b"W: book me on monday"


# ---------------------------------- 2. Redis: the tombstone read in a round trip of its own


async def test_redis_a_reclaim_racing_an_rm_does_not_write_the_deleted_session_back(
    bare_redis: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Redis restarts empty under R (epoch E1). R's save finds the session vanished and
    reclaims E1. Its first trip finds no head, so `RedisStore._take` reads the key's
    tombstone (none) in a round trip of its own (stores/redis/store.py ``_take``:
    ``tombstone = await self._tombstone(key)``) and then runs the acquire script that
    creates the session with what it read. In between, another worker W restores the
    key (a new session, E2 > E1) and an operator runs ``rm`` of it (a tombstone at
    E2 or the clock, above E1).

    Should (failure-model.md, the ``rm`` row and "A reclaim ... at or below a deleted
    session's tombstone is fenced (`LeaseLost`, not vanished)"; memory and SQLite,
    where the read is inside the acquisition, fence it for the same order of
    events): R is fenced, and the key stays deleted.

    Does: the script is handed the stale "no tombstone", creates the session and grants
    the reclaim at E1, below the tombstone: R writes the conversation back over the
    operator's ``rm`` (and a session now lives at an epoch below its key's tombstone)."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other = lr.open_store(bare_redis.url, namespace=ns, clock=clock)  # W's, the operator's
    key = f"rm-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)
        read = store._tombstone
        raced: list[Any] = []

        async def stale_read(k: str, fencing: int | None = None) -> int | None:
            seen = await read(k, fencing)
            if not raced:
                clock.advance(100)
                w = await other.acquire(key, "W", ttl=LEASE)
                raced.append(w)
                clock.advance(100)
                raced.append(await other.delete(key))  # the operator's rm
                clock.advance(100)
            return None if seen is None else int(seen)

        store._tombstone = stale_read
        got: Any
        try:
            got = await r.reacquire(v1)  # what the save does next
            got = await save(r, got, b"R: the deleted conversation")
        except LeaseLost as e:
            got = e
        store._tombstone = read
        assert raced and raced[1] is True, raced
        info = await store.info(key)
        tomb = await store._tombstone(key)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"R's reclaim of epoch {r.epoch} racing W's restore (epoch {raced[0].epoch}) and an "
            f"rm (tombstone {tomb}): {got!r}; the key now holds "
            f"{None if info is None else (info.owner, info.epoch, info.version)}: the "
            "deleted conversation written back below its tombstone"
        )
        assert info is None
    finally:
        await other.aclose()
        await store.aclose()


async def test_a_reclaim_after_the_key_was_made_again_and_removed_is_fenced_on_every_store(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """passes: coverage (the serial order the Redis race above interleaves): Redis
    emptied, W restores the key anew (above E1), an operator removes it, then R
    reclaims E1: fenced (`LeaseLost` "deleted", not vanished), nothing created, on all
    three stores."""
    for kind in KINDS:
        b = await make_backend(kind, tmp_path, request)
        try:
            key = f"rm2-{uuid.uuid4().hex[:6]}"
            r = LeaseHolder(b.store, key, "R", LEASE)
            await r.acquire(takeover=False)
            assert await save(r, 0, b"R: hello") == 1
            tick(b)
            await b.forget()
            tick(b)
            w = await b.store.acquire(key, "W", ttl=LEASE)
            assert w.epoch > r.epoch
            tick(b)
            assert await b.store.delete(key)
            tick(b)
            got = await save(r, 1, b"R: back")
            assert isinstance(got, LeaseLost) and not got.vanished, (kind, got)
            assert "deleted" in str(got), (kind, got)
            assert await b.store.info(key) is None, kind
        finally:
            await b.close()


# ------------------------------------------ 3. one table of acquisitions, three stores


async def _outcome(aw: Any) -> Any:
    try:
        lease = await aw
    except LeaseLost as e:
        return ("LeaseLost", e.vanished, e.current_epoch, "deleted" in str(e))
    except SessionBusy as e:
        return ("SessionBusy", e.holder)
    return ("granted", lease.owner, lease.epoch)


async def _run_table(b: Backend) -> list[tuple[str, Any]]:
    """Each row: a fresh key brought to a state, then one acquisition. The clock moves
    by the same steps on every store, so the epochs must be the same numbers."""
    s = b.store
    out: list[tuple[str, Any]] = []

    def now_us() -> int:
        return int(b.clock.us)

    async def row(name: str, aw: Any) -> None:
        out.append((name, await _outcome(aw)))
        tick(b)

    async def held(key: str, owner: str, *, release: bool = False, expire: bool = False) -> int:
        lease = await s.acquire(key, owner, ttl=LEASE)
        tick(b)
        if release:
            await s.release(lease)
            tick(b)
        if expire:
            b.clock.advance(2_000_000)
        return int(lease.epoch)

    def k() -> str:
        return f"t-{uuid.uuid4().hex[:8]}"

    key = k()
    await row("new key, reclaim below the clock", s.acquire(key, "B", reclaim=now_us() - 10**6))
    key = k()
    await row("new key, reclaim above the clock", s.acquire(key, "B", reclaim=now_us() + 10**6))
    key = k()
    await row("new key, reclaim at the clock", s.acquire(key, "B", reclaim=now_us()))
    key = k()
    e = await held(key, "A")
    await row("live other, reclaim below", s.acquire(key, "B", reclaim=e - 1))
    key = k()
    e = await held(key, "A")
    await row(
        "live other, takeover + reclaim below", s.acquire(key, "B", takeover=True, reclaim=e - 1)
    )
    key = k()
    e = await held(key, "A")
    await row("live own, reclaim below", s.acquire(key, "A", reclaim=e - 1))
    key = k()
    e = await held(key, "A", expire=True)
    await row("expired own, reclaim below", s.acquire(key, "A", reclaim=e - 1))
    key = k()
    e = await held(key, "A", expire=True)
    await row("expired own, reclaim at", s.acquire(key, "A", reclaim=e))
    key = k()
    e = await held(key, "A")
    await row("live own, reclaim at", s.acquire(key, "A", reclaim=e))
    key = k()
    e = await held(key, "A")
    await row("live other, reclaim at", s.acquire(key, "B", reclaim=e))
    key = k()
    e = await held(key, "A", expire=True)
    await row("expired other, reclaim at", s.acquire(key, "B", reclaim=e))
    key = k()
    e = await held(key, "A")
    b.clock.advance(10)
    await row("live other, reclaim above, under the clock", s.acquire(key, "B", reclaim=e + 5))
    key = k()
    e = await held(key, "A")
    await row("live other, reclaim above the clock", s.acquire(key, "B", reclaim=now_us() + 10**6))
    key = k()
    e = await held(key, "A")
    await row(
        "live other, takeover + reclaim above the clock",
        s.acquire(key, "B", takeover=True, reclaim=now_us() + 10**6),
    )
    key = k()
    e = await held(key, "A", release=True)
    b.clock.advance(10)
    await row("released, reclaim above", s.acquire(key, "B", reclaim=e + 5))
    key = k()
    e = await held(key, "A", release=True)
    await row("released, reclaim below (same owner)", s.acquire(key, "A", reclaim=e - 1))
    # deleted keys
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    tick(b)
    await row("deleted, reclaim at the session's epoch", s.acquire(key, "A", reclaim=e))
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    tomb = now_us()
    tick(b)
    await row("deleted, reclaim at the tombstone's clock", s.acquire(key, "A", reclaim=tomb))
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    tomb = now_us()
    b.clock.advance(1000)
    await row("deleted, reclaim just above the tombstone", s.acquire(key, "A", reclaim=tomb + 1))
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    b.clock.advance(1000)
    await row("deleted, plain acquire", s.acquire(key, "C"))
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    tick(b)
    c = await held(key, "C")
    await row("deleted then made again, reclaim of the old epoch", s.acquire(key, "A", reclaim=e))
    key = k()
    e = await held(key, "A")
    await s.delete(key)
    tick(b)
    c = await held(key, "C", expire=True)
    await row(
        "deleted then made again and expired, reclaim between",
        s.acquire(key, "A", reclaim=c + 1),
    )
    # a store that forgot: a fresh key after forget keeps nothing
    key = k()
    e = await held(key, "A")
    await b.forget()
    tick(b)
    await row("forgotten, reclaim of the held epoch", s.acquire(key, "A", reclaim=e))
    return out


async def test_the_same_acquisitions_give_the_same_answers_on_memory_sqlite_and_redis(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """passes: coverage. A table of 23 acquisitions (new, live, expired, released,
    deleted, deleted and made again, forgotten keys; own and other owners; reclaims
    below, at and above the store's epoch and the clock; with and without takeover),
    run with the same injected clock on MemoryStore, SQLiteStore and a real Redis
    (acquire.lua): every grant, refusal and epoch is the same on the three (the Python
    rule, `stores.base.acquired_epoch`, and acquire.lua agree on every row)."""
    tables: dict[str, list[tuple[str, Any]]] = {}
    for kind in KINDS:
        b = await make_backend(kind, tmp_path, request)
        try:
            tables[kind] = await _run_table(b)
        finally:
            await b.close()
    mem = tables["memory"]
    diffs = [
        (name, {kind: tables[kind][i][1] for kind in KINDS})
        for i, (name, _) in enumerate(mem)
        if len({repr(tables[kind][i][1]) for kind in KINDS}) > 1
    ]
    assert not diffs, "\n".join(f"{n}: {d}" for n, d in diffs)


# ------------------------------------------- 4. two jobs of one worker, one key


async def test_a_zombie_job_of_the_same_worker_is_fenced_under_an_owner_name_of_its_own(
    backend: Backend,
) -> None:
    """Two jobs of one key on one worker (a job frozen, its call dispatched again to the
    same worker), each under an owner name of its own (`resumable_job`'s: worker, job,
    process). Job 1 holds the key (E1) and freezes past its lease; job 2 restores it
    without takeover (E2 > E1) and writes. The store is emptied; job 1's renewal finds
    it vanished; job 2 saves (reclaiming E2); then the zombie job 1 saves: fenced, and
    job 2 keeps the call. (The hunt passed one worker-wide name to both: the store
    takes one name for one holder, its reclaim below the store's epoch is taken for
    its own acquisition whose reply was lost, and the zombie wrote over job 2. The
    ``owner`` of `ResumableSession` now says a name is one holder's own.)"""
    b = backend
    key = f"own-{uuid.uuid4().hex[:6]}"
    job1 = LeaseHolder(b.store, key, "worker-7:job-1:101", LEASE)
    job2 = LeaseHolder(b.store, key, "worker-7:job-2:102", LEASE)
    await job1.acquire(takeover=False)
    assert await save(job1, 0, b"job1: hello") == 1
    b.clock.advance(5_000_000)  # job 1 frozen past its lease
    await job2.acquire(takeover=False)
    assert job2.epoch > job1.epoch
    tick(b)
    assert await save(job2, 1, b"job2: the caller, on job 2") == 2
    tick(b)
    await b.forget()
    tick(b)
    assert await job1.renew(1) is False  # job 1's renewal: vanished (it saves next)
    tick(b)
    v = await save(job2, 2, b"job2: written whole again")
    assert isinstance(v, int), v
    tick(b)
    zombie = await save(job1, 1, b"job1: zombie words")
    tick(b)
    newer = await save(job2, v, b"job2: book me on monday")
    assert isinstance(zombie, LeaseLost) and not zombie.vanished, (
        f"[{b.kind}] the zombie job 1 (epoch {job1.epoch}) saved: {zombie!r}, over the "
        f"newer job 2's epoch {job2.epoch}; job 2's next save: {newer!r}"
    )
    assert isinstance(newer, int), newer
    assert (await b.store.load(key)).head == b"job2: book me on monday"


async def test_redis_end_to_end_a_backup_restored_under_a_frozen_zombie_ends_the_live_call(
    bare_redis: RedisServer,
) -> None:
    """Test 1 end to end: real `AgentSession`s and `ResumableSession`s (scripted LLM) on
    a real ``redis-server`` whose clock (the store's ``clock``) the test moves. w1 has
    the call and checkpoints; the store's keys are copied (a backup; a replica that
    stops receiving); w1 talks on, checkpoints, and freezes past its lease; the call is
    re-dispatched to w2, which restores it (the lease expired: no takeover needed) and
    talks; the copy is restored. The zombie w1 says something and checkpoints; then
    the caller, on w2, does.

    Should: w2 keeps the call and its turns ("nothing the live worker holds" is lost);
    w1 is fenced. Does: w1's checkpoint reclaims its epoch as a new one from the clock
    (its lease had expired in the copy), above w2's; w2's checkpoint is `LeaseLost`
    (its job would end the call) and the store keeps the zombie's conversation."""
    clock = FakeClock()
    store = lr.open_store(bare_redis.url, namespace=f"e{uuid.uuid4().hex[:8]}", clock=clock)
    b = RedisBackend(store, clock)
    s1 = rs1 = s2 = rs2 = None
    try:
        s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", lease_ttl=LEASE)
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        copy_ = await b.snapshot()
        clock.advance(100_000)
        await s1.run(user_input="I need a cleaning")
        await rs1.checkpoint()
        clock.advance(5_000_000)  # w1 frozen past its lease
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", lease_ttl=LEASE)
        await s2.run(user_input="book me on monday")
        await rs2.checkpoint()
        clock.advance(100_000)
        await b.rollback(copy_)
        clock.advance(100_000)
        await s1.run(user_input="zombie words")
        got1 = await outcome(rs1.checkpoint())
        clock.advance(100_000)
        await s2.run(user_input="make it 10am")
        got2 = await outcome(rs2.checkpoint())
        info = await store.info(KEY)
        texts = await stored_texts(store)
        assert isinstance(got2, int), (
            f"the live holder w2's checkpoint after the restore: {got2!r}; the zombie w1's "
            f"checkpoint: {got1!r}; the store is held by {info.owner if info else None!r} "
            f"and holds {texts!r}"
        )
        assert "make it 10am" in texts and "zombie words" not in texts, texts
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))
