"""Hunt `reclaim`: a review of 3b29035 (`Store.acquire(..., reclaim=E)`, epochs
``max(previous + 1, clock in microseconds)``, `LeaseHolder._acquire_kept` reclaiming the
holder's own epoch when its session *vanished*). Three cases failed on it, fixed in the
commit that added this file: a reclaim is granted only at or below the store's clock.

Store-level tests drive `LeaseHolder` (what `ResumableSession` uses) or the stores
themselves; the end-to-end ones drive real `AgentSession`s with the scripted LLM on a
``redis-server`` of the test alone (as tests/test_lost_hunt.py does).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.agent_hooks.lease import LeaseHolder
from livekit_resume.stores.base import Commit, Lease, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite.store import SQLiteStore
from tests import ROOT, child_env
from tests.redis_servers import RedisServer
from tests.test_hooks import start
from tests.test_lost_hunt import bare_redis, close_all, live_texts, outcome, owner_of, stored_texts

__all__ = ["bare_redis"]  # a fixture, shared

pytestmark = pytest.mark.filterwarnings("ignore")

LEASE = 30.0


class Clock:
    """The store's clock: the real one, ``offset`` seconds off (a store whose clock
    steps back: a failover to a host whose clock is behind, a VM restored, NTP)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class ForgetfulMemoryStore(MemoryStore):
    """A MemoryStore that can lose all its data (Redis restarted empty)."""

    def forget(self) -> None:
        self._sessions.clear()
        self._tombstones.clear()


async def commit_under(store: Store, holder: LeaseHolder, base: int, data: bytes) -> int:
    return await holder.commit(Commit(holder.key, holder.epoch, base, data, [], 0, whole=True))


# ------------------------------------------------ 1. a store whose clock runs behind


async def test_with_the_store_clock_behind_a_zombie_does_not_reclaim_over_the_newest() -> None:
    """w1 holds the key (E1); w2 takes it over (E2); w1 has not heard (a zombie). The
    store loses its data (Redis restarted empty, a failover to an empty replica) and
    comes back with its clock 60 s behind (another host; a VM restored). A new job, w3,
    restores the call with ``takeover=True``: the store hands it ``floor(clock) + 1``,
    which is below E1 and E2. Then the zombie w1 writes.

    What should happen: w3 is the newest holder and keeps the key; the zombie is
    refused (DESIGN.md: "a zombie worker can never overwrite the conversation of the
    worker that took over"; failure-model.md: "If another worker acquired the empty key
    first, that worker keeps it and this one is fenced"). Before 3b29035 it was so: w1's
    commit was *vanished*, its acquisition without takeover refused by w3's live lease
    (`SessionBusy` -> `LeaseLost`).

    What happened (before the fix): w1's commit finds the store's epoch (w3's) older
    than its own, so `LeaseHolder.reacquire` passes E1 as ``reclaim`` and the store
    grants it *over w3's live lease* (stores/base.py `acquired_epoch`: ``if reclaim is
    not None and reclaim > epoch: return reclaim``; acquire.lua the same): the zombie
    un-fences itself and w3, the newest holder, is fenced. The rule takes "the store's
    epoch is below mine" for "the store forgot an acquisition", which only holds while
    the store's clock never runs behind an epoch it handed out before.

    Fix: an epoch this store handed out from its clock is never above its clock now, so
    a reclaim above ``epoch_floor(now)`` means the clock ran back, not that the store
    forgot: grant a reclaim only when ``reclaim <= epoch_floor(now, tombstone)`` (else
    treat it as a plain acquisition), in `acquired_epoch` and acquire.lua alike."""
    clock = Clock()
    store = ForgetfulMemoryStore(clock=clock)
    key = f"skew-{uuid.uuid4().hex[:8]}"
    w1 = LeaseHolder(store, key, "w1", LEASE)
    w2 = LeaseHolder(store, key, "w2", LEASE)
    w3 = LeaseHolder(store, key, "w3", LEASE)
    await w1.acquire(takeover=False)
    v = await commit_under(store, w1, 0, b"w1 says hello")
    await asyncio.sleep(0.002)
    await w2.acquire(takeover=True)
    await commit_under(store, w2, v, b"w2's conversation")
    assert w1.epoch < w2.epoch
    store.forget()
    clock.offset = -60.0
    await w3.acquire(takeover=True)  # the newest holder: a re-dispatched job
    got = await outcome(commit_under(store, w1, v, b"zombie words"))
    assert isinstance(got, lr.LeaseLost) and got.vanished  # the store's epoch < E1
    reclaimed = await outcome(w1.reacquire(v))
    info = await store.info(key)
    assert info is not None
    assert isinstance(reclaimed, lr.LeaseLost), (
        f"the zombie w1 (epoch {w1.epoch}) was granted the key over the newest holder "
        f"w3's live lease; the store is now held by {info.owner!r} at {info.epoch}"
    )
    assert info.owner == "w3" and info.epoch == w3.epoch


async def test_redis_emptied_with_its_clock_behind_the_newest_holder_keeps_the_call(
    bare_redis: RedisServer,
) -> None:
    """End to end, on a real ``redis-server`` whose clock (the store's ``clock``, what
    its scripts use as NOW) is 60 s behind once it restarts empty. w1 has the call; w2
    takes it over and talks; Redis restarts empty; a new job w3 restores with
    ``takeover=True`` (an empty store: a fresh call) and talks; then the zombie w1, which
    never heard of w2, says something and checkpoints.

    Should: w1 is refused (`LeaseLost`, its ``on_lost`` told) and w3 keeps the call
    and its conversation, as before 3b29035 (w1's acquisition without takeover was
    refused by w3's live lease). Does: w1's checkpoint lands (it reclaims E1 over w3's
    live lease: stores/lua/acquire.lua ``if reclaim and reclaim > below``), the store
    holds the zombie's conversation, owner w1, and w3's next checkpoint is refused
    (`LeaseLost`: its job ends the call). Fix as in the test above: grant a reclaim
    only when it is not above the store's clock (``math.floor(NOW * 1000000)``)."""
    clock = Clock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    lost1: list[BaseException] = []

    async def on_lost1(e: lr.LeaseLost) -> None:
        lost1.append(e)

    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", on_lost=on_lost1)
    s2 = rs2 = s3 = rs3 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", takeover=True)
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # empty
        clock.offset = -60.0
        s3, rs3, _ = await start(store, ["hello from w3"], owner="w3", takeover=True)
        await s3.run(user_input="I am the caller, back again")
        assert isinstance(await outcome(rs3.checkpoint()), int)
        await s1.run(user_input="zombie words")
        got1 = await outcome(rs1.checkpoint())
        owner = await owner_of(store)
        texts = await stored_texts(store)
        await s3.run(user_input="book me on monday")
        got3 = await outcome(rs3.checkpoint())
        assert isinstance(got1, lr.LeaseLost), (
            f"the zombie w1's checkpoint: {got1!r}; the store is held by {owner!r} and "
            f"holds {texts!r}; the newest holder w3's next checkpoint: {got3!r}"
        )
        assert isinstance(got3, int) and await owner_of(store) == "w3"
        assert "zombie words" not in await stored_texts(store)
    finally:
        await close_all(store, (rs1, rs2, rs3), (s1, s2, s3))


# ------------------------------------------------ 2. reclaims racing each other


def _forgotten_epochs() -> tuple[int, int]:
    """Two epochs a store handed out before it forgot them (below its clock now)."""
    now = int(time.time() * 1_000_000)
    return now - 2_000_000, now - 1_000_000


def _holder(store: Store, key: str, owner: str, epoch: int) -> LeaseHolder:
    h = LeaseHolder(store, key, owner, LEASE)
    h.lease = Lease(key, owner, epoch, time.time() + LEASE)
    return h


async def test_two_holders_reclaiming_a_forgotten_key_the_lower_loses_in_any_order(
    make_store: Any,
) -> None:
    """passes: coverage. Two holders the store forgot (E_low < E_high, a store emptied
    after a takeover) reclaim the key through `LeaseHolder.reacquire`: low first, high
    first, and both at once. Whatever the order, the store ends held by the high one at
    E_high, the low one gets `LeaseLost` (not vanished) at its reacquisition or its next
    commit, and a takeover after it is above E_high. On every backend (memory, SQLite,
    fakeredis, a real Redis, a Redis Cluster)."""
    store: Store = await make_store()
    low_e, high_e = _forgotten_epochs()
    for order in ("low first", "high first", "together"):
        key = f"race-{uuid.uuid4().hex[:8]}"
        low = _holder(store, key, "low", low_e)
        high = _holder(store, key, "high", high_e)
        if order == "low first":
            assert await low.reacquire(3) == 0
            assert await high.reacquire(5) == 0
            got_low: Any = None
        elif order == "high first":
            assert await high.reacquire(5) == 0
            got_low = await outcome(low.reacquire(3))
            assert isinstance(got_low, lr.LeaseLost) and not got_low.vanished, order
        else:
            got_low, got_high = await asyncio.gather(
                outcome(low.reacquire(3)), outcome(high.reacquire(5))
            )
            assert got_high == 0, (order, got_high)
            assert got_low == 0 or (isinstance(got_low, lr.LeaseLost) and not got_low.vanished), (
                order,
                got_low,
            )
        info = await store.info(key)
        assert info is not None and (info.owner, info.epoch) == ("high", high_e), (order, info)
        fenced = await outcome(store.commit(Commit(key, low_e, 0, b"low", [], 0)))
        assert isinstance(fenced, lr.LeaseLost) and not fenced.vanished, (order, fenced)
        assert await store.commit(Commit(key, high_e, 0, b"high", [], 0)) == 1
        later = await store.acquire(key, "later", ttl=LEASE, takeover=True)
        assert later.epoch > high_e


async def test_sqlite_reclaim_from_another_process_fences_this_one(tmp_path: Path) -> None:
    """passes: coverage. SQLite, two processes on one file: this process's holder
    reclaims a forgotten key at E_low and writes; a child process reclaims E_high
    (`Store.acquire` ``reclaim``) over that live lease; this process's next commit is
    refused as a takeover (not vanished), and the child's low reclaim afterwards is
    fenced (`LeaseLost`: below the store's epoch)."""
    path = tmp_path / "two.db"
    store = SQLiteStore(path)
    key = f"proc-{uuid.uuid4().hex[:8]}"
    low_e, high_e = _forgotten_epochs()
    try:
        low = _holder(store, key, "low", low_e)
        assert await low.reacquire(2) == 0
        assert await commit_under(store, low, 0, b"low") == 1
        code = f"""
import asyncio, sys
from livekit_resume.stores.sqlite.store import SQLiteStore
from livekit_resume.errors import LeaseLost
async def main():
    s = SQLiteStore({str(path)!r})
    lease = await s.acquire({key!r}, "high", ttl=30, reclaim={high_e})
    print(lease.epoch, lease.owner)
    try:
        await s.acquire({key!r}, "low2", ttl=30, reclaim={low_e})
        print("granted")
    except LeaseLost as e:
        print("fenced" if not e.vanished else "vanished")
    await s.aclose()
asyncio.run(main())
"""
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            env=child_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(high_e), "high", "fenced"], done.stdout
        got = await outcome(commit_under(store, low, 1, b"low again"))
        assert isinstance(got, lr.LeaseLost) and not got.vanished, got
        info = await store.info(key)
        assert info is not None and (info.owner, info.epoch, info.version) == ("high", high_e, 1)
    finally:
        await store.aclose()


# ------------------------------------------------ 3. Redis: a listed key whose head is gone


async def test_redis_reclaim_of_a_listed_key_whose_head_is_gone(bare_redis: RedisServer) -> None:
    """passes: coverage. Redis, the first trip's 'absent' reply (the namespace index
    lists the key, its head is gone: expired, lost) and the create call that follows
    (ARGV [9] reclaim, [10] listed '0', [11] tombstone): a reclaim is granted at its
    epoch on a key with no tombstone, fenced at or below a tombstone (`LeaseLost`),
    and a key with remains (a version left, its head gone) is `SnapshotCorrupt` with or
    without a reclaim, creating nothing."""
    from livekit_resume.stores.redis.store import RedisStore

    ns = f"h{uuid.uuid4().hex[:8]}"
    store = lr.open_store(bare_redis.url, namespace=ns)
    assert isinstance(store, RedisStore)
    raw = store._client
    low_e, high_e = _forgotten_epochs()
    try:
        # listed, head gone, nothing else: granted at the reclaimed epoch
        key = f"gone-{uuid.uuid4().hex[:6]}"
        a = await store.acquire(key, "a", ttl=LEASE)
        await store.release(a)
        await raw.delete(store._names.head(key))
        got = await store.acquire(key, "w", ttl=LEASE, reclaim=low_e)
        assert (got.owner, got.epoch) == ("w", low_e)
        # deleted (a tombstone at its epoch): a reclaim at or below it is fenced
        key2 = f"tomb-{uuid.uuid4().hex[:6]}"
        b = await store.acquire(key2, "b", ttl=LEASE)
        assert await store.delete(key2, lease=b)
        with pytest.raises(lr.LeaseLost) as deleted:
            await store.acquire(key2, "w", ttl=LEASE, reclaim=b.epoch)
        assert not deleted.value.vanished and "deleted" in str(deleted.value)
        assert await store.info(key2) is None
        # a version left, the head gone: remains, nothing created
        key3 = f"rem-{uuid.uuid4().hex[:6]}"
        c = await store.acquire(key3, "c", ttl=LEASE)
        assert await store.commit(Commit(key3, c.epoch, 0, b"h", [], 0)) == 1
        await raw.delete(store._names.head(key3))
        with pytest.raises(lr.SnapshotCorrupt):
            await store.acquire(key3, "w", ttl=LEASE, reclaim=high_e)
        assert not await raw.exists(store._names.head(key3))
    finally:
        await store.aclose()


# ------------------------------------------------ 4. epochs near 2**53


async def test_a_reclaim_above_the_clock_is_not_granted_nor_corrupts_a_redis_session(
    bare_redis: RedisServer,
) -> None:
    """`validate_reclaim` (stores/base.py:223) accepts any epoch below 2**53 ("an epoch
    a store can hold"), so ``acquire(reclaim=2**53 - 1)`` is granted at that epoch.
    The next takeover then steps it to 2**53 (acquire.lua ``math.max(s.epoch + 1,
    ...)``), which the head cannot hold: session.lua `read_head` (``counter``: below
    2**53) calls the head corrupt, and every later `load`/`info` of the conversation
    raises `SnapshotCorrupt` ("has no valid epoch"). On memory and SQLite that lease
    holds 2**53 and its holder's `reacquire` raises a bare `ValueError` from
    `validate_reclaim`.

    Should: an acquisition the store grants never leaves the session at an epoch it
    cannot read back or step from (refused with a typed error, or the reclaim refused
    up front). Fix: bound a reclaim by what the store's own epochs can be, e.g. grant it
    only when ``reclaim <= epoch_floor(now)`` (an epoch this store handed out is never
    above its clock; the same check fixes section 1), and refuse a takeover whose next
    epoch would reach 2**53 with a typed error instead of writing it."""
    store = lr.open_store(bare_redis.url, namespace=f"b{uuid.uuid4().hex[:8]}")
    key = f"big-{uuid.uuid4().hex[:6]}"
    try:
        a = await store.acquire(key, "a", ttl=LEASE, reclaim=2**53 - 1)
        assert await store.commit(Commit(key, a.epoch, 0, b"the conversation", [], 0)) == 1
        took = await outcome(store.acquire(key, "b", ttl=LEASE, takeover=True))
        after = await outcome(store.load(key))
        assert not isinstance(after, lr.SnapshotCorrupt), (
            f"reclaim {a.epoch} granted; the takeover then returned {took!r}, and the "
            f"stored conversation reads: {after!r}"
        )
    finally:
        await store.aclose()


# ------------------------------------------------ 5. end to end: rolled back, zombie first


async def test_rolled_back_the_zombie_writing_first_is_fenced_by_the_newer_holders_next_save(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. w1 has the call; an RDB is taken (``SAVE``: the lagging
    replica); w2 takes it over and talks; Redis comes back from the RDB (before the
    takeover: w1's lease live at E1). The zombie w1 writes first: its commit lands (the
    store forgot the takeover). w2 talks on and checkpoints: its epoch is above the
    store's, so it reclaims E2 over w1's lease and writes its conversation whole. w1's
    next checkpoint is refused as a takeover (not vanished) and its ``on_lost`` is told;
    the store holds w2's conversation, every turn once, none of the zombie's."""
    ns = f"z{uuid.uuid4().hex[:8]}"
    store = lr.open_store(bare_redis.url, namespace=ns)
    lost1: list[BaseException] = []

    async def on_lost1(e: lr.LeaseLost) -> None:
        lost1.append(e)

    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", on_lost=on_lost1)
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        bare_redis.cli("save")
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", takeover=True)
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # the RDB of before the takeover
        assert await owner_of(store) == "w1"
        await s1.run(user_input="zombie words")
        assert isinstance(await outcome(rs1.checkpoint()), int)  # forgotten: it lands
        await s2.run(user_input="book me on monday")
        got2 = await outcome(rs2.checkpoint())
        await s1.run(user_input="more zombie words")
        got1 = await outcome(rs1.checkpoint())
        texts = await stored_texts(store)
        assert isinstance(got2, int), got2
        assert isinstance(got1, lr.LeaseLost) and not got1.vanished, repr(got1)
        assert await owner_of(store) == "w2"
        assert texts == live_texts(s2)
        for t in ("my name is Ada", "my code is 4711", "book me on monday"):
            assert texts.count(t) == 1, (t, texts)
        assert not any("zombie" in t for t in texts), texts
        for _ in range(100):
            if lost1:
                break
            await asyncio.sleep(0.01)
        assert lost1 and not lost1[0].vanished  # type: ignore[attr-defined]
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))


class StoreOfBefore(ForgetfulMemoryStore):
    """A store written against the protocol before ``reclaim``: its ``acquire`` does not
    take the keyword (a third party's, a wrapper with an explicit signature)."""

    async def acquire(  # type: ignore[override]
        self, key: str, owner: str, *, ttl: float = 30.0, takeover: bool = False
    ) -> Lease:
        return await super().acquire(key, owner, ttl=ttl, takeover=takeover)


async def test_a_store_without_reclaim_still_takes_a_vanished_session_back() -> None:
    """passes: coverage. A store whose ``acquire`` predates ``reclaim`` is asked without
    it (`lease._takes_reclaim`): the holder of a session the store lost acquires it
    again and writes it whole, as before; asked with it, every such acquisition failed
    with a TypeError and the session was never saved again."""
    store: Any = StoreOfBefore()  # not a `Store` of today, by design
    key = f"old-{uuid.uuid4().hex[:8]}"
    holder = LeaseHolder(store, key, "w1", LEASE)
    await holder.acquire(takeover=False)
    v = await commit_under(store, holder, 0, b"hello")
    store.forget()
    got = await outcome(commit_under(store, holder, v, b"more"))
    assert isinstance(got, lr.LeaseLost) and got.vanished, repr(got)
    held = await holder.reacquire(v)
    assert await commit_under(store, holder, held, b"all of it") == held + 1
    info = await store.info(key)
    assert info is not None and info.owner == "w1"
