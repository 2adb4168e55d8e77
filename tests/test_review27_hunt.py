"""Hunt `review27`: a review of f00493b (a reclaim at the store's epoch by the owner
whose lease ran out there keeps that epoch; on Redis a reclaim that made its session
anew reads the tombstone again and is fenced, what it made deleted under its lease).

Reuses tests/test_review26_hunt.py's backends (MemoryStore, a SQLiteStore that can
forget and go back to a copy, a real ``redis-server`` of the test alone), injected
clock and ``save`` (session.py ``_commit_or_reacquire`` for a whole commit).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.agent_hooks.lease import LeaseHolder
from livekit_resume.errors import LeaseLost, StoreUnavailable
from livekit_resume.stores.base import Commit, Lease
from tests.redis_servers import RedisServer
from tests.test_fence_hunt import FakeClock
from tests.test_lost_hunt import bare_redis
from tests.test_review26_hunt import (
    KINDS,
    LEASE,
    backend,
    make_backend,
    save,
    tick,
    vanished_under_r,
)

__all__ = ["backend", "bare_redis"]  # fixtures, shared

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------- Redis: the race set up


async def rm_whose_delete_fails(store: Any, key: str) -> None:
    """An operator's ``rm`` whose tombstone is laid and whose delete script then fails
    (a slot being moved): `StoreUnavailable`, the session left, its tombstone standing
    (failure-model.md's known limit)."""
    run = store._run

    async def delete_fails(script: str, k: str, args: list[Any]) -> Any:
        if script == "delete":
            raise StoreUnavailable("slot being moved (the delete script)")
        return await run(script, k, args)

    store._run = delete_fails
    try:
        with pytest.raises(StoreUnavailable):
            await store.delete(key)
    finally:
        store._run = run


@contextlib.contextmanager
def deletes_watched(store: Any) -> Iterator[list[Any]]:
    """Inside, every ``store.delete`` is recorded by its lease (None: an ``rm``)."""
    deletes: list[Any] = []
    delete = store.delete

    async def watched(k: str, *, lease: Any = None) -> bool:
        deletes.append(lease)
        return bool(await delete(k, lease=lease))

    store.delete = watched
    try:
        yield deletes
    finally:
        store.delete = delete


async def _reclaim_then_save(r: LeaseHolder, version: int, data: bytes) -> Any:
    """What R's save does once its commit said vanished: reacquire (the reclaim), then
    the whole commit; the version that landed or the `LeaseLost` that fenced it."""
    try:
        version = await r.reacquire(version)
    except LeaseLost as e:
        return e
    return await save(r, version, data)


def _race_first_read(
    store: Any, other: Any, clock: FakeClock, key: str, then: Any = None
) -> tuple[Any, list[Any]]:
    """``store._tombstone`` replaced: the first read (``_take``'s, before the script that
    creates the session) lets W restore the key and an operator ``rm`` it before it
    answers what it read (none); later reads go to ``then(read, key)`` (default: the
    real read)."""
    read = store._tombstone
    calls: list[Any] = []

    async def patched(k: str, fencing: int | None = None) -> int | None:
        calls.append(k)
        if len(calls) == 1:
            seen = await read(k, fencing)
            clock.advance(100)
            await other.acquire(key, "W", ttl=LEASE)
            clock.advance(100)
            assert await other.delete(key)  # the operator's rm
            clock.advance(100)
            return None if seen is None else int(seen)
        got = await (then(read, k) if then is not None else read(k, fencing))
        return None if got is None else int(got)

    store._tombstone = patched
    return read, calls


# ------------------------------------- 1. the re-read fails: a retry skips it (FAILS)


async def test_redis_a_reclaim_racing_an_rm_retried_after_the_reread_failed_is_still_fenced(
    bare_redis: RedisServer,
) -> None:
    """The race of review26 (R's reclaim reads "no tombstone"; W restores the key and an
    operator ``rm``s it; R's script then creates the session at E1, below the
    tombstone), with the second read of the tombstone (``_fence_reclaim_of_deleted``)
    failing once: a connection reset, a Cluster node holding the tombstone's slot
    being down for a moment (`StoreUnavailable`).

    Should (failure-model.md, the ``rm`` row: "The tombstone is read again after such a
    reclaim, which is then fenced and what it made deleted"; "a store failing again in
    the middle of that acquisition leaves the session *vanished* until it is done"):
    the reacquire fails (StoreUnavailable), the holder stays vanished and its next save
    reclaims again: fenced (`LeaseLost`, "deleted"), the key stays deleted.

    Does: the first reclaim left the session it created (R's live lease at E1) in
    place. The retry's acquire script finds R's own live lease at E1 (kept, created =
    0), so `_take` does not read the tombstone again: R is granted and writes the
    deleted conversation back below its tombstone."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)  # W's, the rm's
    key = f"rr-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)

        async def blip(read: Any, k: str) -> int | None:
            raise StoreUnavailable("connection reset by peer (the tombstone's read)")

        read, calls = _race_first_read(store, other, clock, key, then=blip)
        first: Any
        try:
            first = await r.reacquire(v1)
        except (StoreUnavailable, LeaseLost) as e:
            first = e
        store._tombstone = read
        assert len(calls) == 2, calls  # the race ran and the re-read was made (and failed)
        assert r.vanished, "a reacquire that failed leaves the holder vanished"
        clock.advance(100)
        got = await save(r, v1, b"R: the deleted conversation")
        info = await store.info(key)
        tomb = await store._tombstone(key)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"R's reclaim of epoch {r.epoch}, retried after its re-read of the tombstone "
            f"failed ({first!r}), was granted: save -> {got!r}; the key holds "
            f"{None if info is None else (info.owner, info.epoch, info.version)} below its "
            f"tombstone {tomb}: the conversation the operator deleted written back"
        )
        assert info is None or info.version == 0, info
    finally:
        await other.aclose()
        await store.aclose()


@pytest.mark.parametrize("retry", ["by-the-holder", "by-redis-py"])
async def test_redis_a_reclaim_racing_an_rm_whose_reply_was_lost_is_fenced_when_retried(
    bare_redis: RedisServer, retry: str
) -> None:
    """The same race, with the reply of the acquire script that created the session
    lost (a connection dropped after the script ran, a reply over the output buffer
    limit: test_review25_hunt.py). ``by-the-holder``: `StoreUnavailable` reaches the
    holder, which stays vanished and reclaims again at its next save. ``by-redis-py``:
    the client's own `Retry` (on by default) sends the same script again at once, which
    finds the session made (test_review25_hunt.py's
    ``test_redis_a_reacquire_retried_by_redis_py_does_not_fence_its_own_holder``).

    Should: R's reclaim is fenced ("deleted"), the key stays deleted (as in
    test_review26_hunt.py's race without the lost reply). Does: the answer that counts
    is from the script run again, which finds R's own live lease at E1 (kept, created =
    0): `_take` reads the tombstone again only for a ``created`` reply, so R is granted
    and writes the deleted conversation back below its tombstone."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    key = f"rl-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)
        read, _calls = _race_first_read(store, other, clock, key)
        run = store._run
        lost: list[Any] = []

        async def loses_create_reply(script: str, k: str, args: list[Any]) -> Any:
            reply = await run(script, k, args)
            # the creating call: told the key is not listed ('0'), with the tombstone read
            if script == "acquire" and not lost and len(args) == 8 and args[6] == "0":
                lost.append(reply)
                if retry == "by-redis-py":
                    return await run(script, k, args)  # the same command sent again
                raise StoreUnavailable("connection closed after the acquire script ran")
            return reply

        store._run = loses_create_reply
        first: Any
        try:
            first = await r.reacquire(v1)
        except (StoreUnavailable, LeaseLost) as e:
            first = e
        store._run = run
        store._tombstone = read
        assert lost and lost[0][0] == b"ok" and int(lost[0][3]) == 1, (lost, first)
        clock.advance(100)
        if retry == "by-the-holder":
            assert isinstance(first, StoreUnavailable), first
            got = await save(r, v1, b"R: the deleted conversation")
        else:
            got = (
                first
                if isinstance(first, Exception)
                else await save(r, first, b"R: the deleted conversation")
            )
        info = await store.info(key)
        tomb = await store._tombstone(key)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"[{retry}] R's reclaim of epoch {r.epoch}, whose creating reply was lost and "
            f"which was sent again, was granted: save -> {got!r}; the key holds "
            f"{None if info is None else (info.owner, info.epoch, info.version)} below its "
            f"tombstone {tomb}: the conversation the operator deleted written back"
        )
    finally:
        await other.aclose()
        await store.aclose()


# ------------------------------------------- 2. the compensating delete (coverage)


async def test_redis_a_fenced_reclaim_leaves_no_ghost_and_the_key_free(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. After the race, R's reclaim is fenced and what it made deleted:
    `keys` (``ls``) does not list the key (no ghost entry left by the first trip's
    index record), `info` says no session, and a new job restores the key without
    takeover, at an epoch above the tombstone."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    key = f"rg-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)
        read, calls = _race_first_read(store, other, clock, key)
        got = await _reclaim_then_save(r, v1, b"R: the deleted conversation")
        store._tombstone = read
        assert len(calls) == 2, calls
        assert isinstance(got, LeaseLost) and not got.vanished and "deleted" in str(got), got
        assert await store.info(key) is None
        assert key not in await store.keys(), await store.keys()
        assert key not in await other.keys()
        tomb = await store._tombstone(key)
        clock.advance(100)
        n = await other.acquire(key, "N", ttl=LEASE)
        assert tomb is not None and n.epoch > tomb, (n.epoch, tomb)
        assert key in await store.keys()
        assert await other.commit(Commit(key, n.epoch, 0, b"N: hello", [], 0)) == 1
    finally:
        await other.aclose()
        await store.aclose()


async def test_redis_the_compensating_delete_racing_a_takeover_deletes_nothing_of_it(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. After the race, R's script made the session at E1; before R
    reads the tombstone again, a third worker X takes the key over (E3). R's
    compensating delete, fenced by R's lease, is refused: R is fenced ("deleted"), X's
    session lives on, listed, and X commits to it."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    key = f"rx-{uuid.uuid4().hex[:6]}"
    taken: list[Any] = []
    try:
        r, v1 = await vanished_under_r(store, clock, key)

        async def takeover_first(read: Any, k: str) -> int | None:
            clock.advance(100)
            taken.append(await other.acquire(key, "X", ttl=LEASE, takeover=True))
            clock.advance(100)
            got = await read(k)
            return None if got is None else int(got)

        read, calls = _race_first_read(store, other, clock, key, then=takeover_first)
        got = await _reclaim_then_save(r, v1, b"R: the deleted conversation")
        store._tombstone = read
        assert taken, calls
        assert isinstance(got, LeaseLost) and not got.vanished, got
        info = await store.info(key)
        assert info is not None and info.owner == "X" and info.epoch == taken[0].epoch, info
        assert key in await store.keys()
        x = taken[0]
        assert await other.commit(Commit(key, x.epoch, 0, b"X: hello", [], 0)) == 1
    finally:
        await other.aclose()
        await store.aclose()


async def test_redis_the_compensating_delete_failing_still_fences_the_reclaimer(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. After the race, R's compensating delete fails
    (`StoreUnavailable`): R is fenced all the same (`LeaseLost` "deleted", not the
    StoreUnavailable, which would leave it vanished and retrying), its next save is
    refused too, the key stays listed (what it made is there), and once R's session
    closes (its release) a new job restores the key without takeover."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    key = f"rd-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)
        read, _calls = _race_first_read(store, other, clock, key)
        delete = store.delete

        tried: list[Any] = []

        async def failing_delete(k: str, *, lease: Any = None) -> bool:
            tried.append(lease)
            raise StoreUnavailable("connection reset (the compensating delete)")

        store.delete = failing_delete
        got = await _reclaim_then_save(r, v1, b"R: the deleted conversation")
        store.delete = delete
        store._tombstone = read
        assert len(tried) == 1 and tried[0].epoch == r.epoch, tried
        assert isinstance(got, LeaseLost) and not got.vanished and "deleted" in str(got), got
        info = await store.info(key)
        assert info is not None and info.version == 0, info
        await r.release()  # R's session closes on_lost
        clock.advance(100)
        n = await other.acquire(key, "N", ttl=LEASE)
        assert await other.commit(Commit(key, n.epoch, 0, b"N: hello", [], 0)) == 1
        assert (await store.load(key)).head == b"N: hello"
    finally:
        await other.aclose()
        await store.aclose()


# --------------------------- 3. change 1: an operator between, a rollback to each state


async def test_rolled_back_to_after_an_operators_takeover_the_zombie_is_fenced(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """passes: coverage. R holds the key (E1) and freezes past its lease; an operator's
    ``revert --takeover`` / ``import --takeover`` (cli/snapshots.py: acquire with
    takeover under a name of its own, commit, release) runs. The store then goes back
    to a copy made (a) after the operator's acquisition, (b) after its commit, (c) after
    its release. R wakes and saves: fenced in each (`LeaseLost`, not vanished; the
    store's epoch is the operator's, the holder not R), the operator's version stands.
    Also (d): a copy from before the operator (R's lease expired there): R keeps E1, a
    grant (the operator's action is what the rollback lost), on every store."""
    for kind in KINDS:
        for at in ("acquired", "committed", "released", "before"):
            b = await make_backend(kind, tmp_path, request)
            try:
                key = f"op-{uuid.uuid4().hex[:6]}"
                r = LeaseHolder(b.store, key, "R", LEASE)
                await r.acquire(takeover=False)
                assert await save(r, 0, b"R: hello") == 1
                tick(b)
                assert await save(r, 1, b"R: my name is Ada") == 2
                b.clock.advance(5_000_000)  # R frozen past its lease
                copies: dict[str, Any] = {"before": await b.snapshot()}
                op = await b.store.acquire(key, "livekit-resume:host:1:ab", ttl=60, takeover=True)
                copies["acquired"] = await b.snapshot()
                tick(b)
                v = await b.store.commit(Commit(key, op.epoch, 2, b"OP: reverted", [], 0))
                assert v == 3
                copies["committed"] = await b.snapshot()
                tick(b)
                await b.store.release(op)
                copies["released"] = await b.snapshot()
                tick(b)
                await b.rollback(copies[at])
                tick(b)
                got = await save(r, 2, b"R: zombie words")
                info = await b.store.info(key)
                if at == "before":
                    assert isinstance(got, int) and r.epoch < op.epoch, (kind, at, got)
                    continue
                assert isinstance(got, LeaseLost) and not got.vanished, (
                    f"[{kind}, rolled back to {at}] the zombie R (epoch {r.epoch}) saved: "
                    f"{got!r}; the store: {info}"
                )
                stored = await b.store.load(key)
                expect = b"R: my name is Ada" if at == "acquired" else b"OP: reverted"
                assert stored.head == expect, (kind, at, stored.head)
            finally:
                await b.close()


async def test_an_expired_leases_holder_is_kept_alike_on_every_store_whatever_ran_since(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """passes: coverage. The holder of an expired lease, kept by every store: after
    reads of the key (info, load, versions, keys), another owner's renewal, release,
    fenced delete and commit of a wrong epoch (all refused), the owner's reclaim at the
    store's epoch keeps the epoch on memory, SQLite and Redis alike; another owner's
    is a new epoch; after the owner's release, a new epoch."""
    results: dict[str, list[Any]] = {}
    for kind in KINDS:
        b = await make_backend(kind, tmp_path, request)
        s = b.store
        out: list[Any] = []
        try:
            # expired, then many reads and refused writes by others
            key = f"ex-{uuid.uuid4().hex[:6]}"
            a = await s.acquire(key, "A", ttl=LEASE)
            assert await s.commit(Commit(key, a.epoch, 0, b"A: hi", [], 0)) == 1
            b.clock.advance(2_000_000)
            info = await s.info(key)
            out.append(("info owner after expiry", info.owner, info.epoch == a.epoch))
            await s.load(key)
            await s.versions(key)
            await s.keys()
            other = Lease(key, "B", a.epoch, a.expires_at)
            for attempt in ("renew", "release", "delete", "commit"):
                try:
                    if attempt == "renew":
                        await s.renew(other, ttl=LEASE)
                    elif attempt == "release":
                        await s.release(other)
                    elif attempt == "delete":
                        await s.delete(key, lease=other)
                    elif attempt == "commit":
                        await s.commit(Commit(key, a.epoch + 1, 1, b"B", [], 0))
                    out.append((attempt, "done"))
                except LeaseLost as e:
                    out.append((attempt, "LeaseLost", e.vanished))
            tick(b)
            back = await s.acquire(key, "A", ttl=LEASE, reclaim=a.epoch)
            out.append(("own reclaim at the epoch", back.epoch == a.epoch))
            # another owner's reclaim at an expired lease's epoch
            key = f"eo-{uuid.uuid4().hex[:6]}"
            a = await s.acquire(key, "A", ttl=LEASE)
            b.clock.advance(2_000_000)
            got = await s.acquire(key, "B", ttl=LEASE, reclaim=a.epoch)
            out.append(("other's reclaim at the epoch", got.epoch > a.epoch))
            # released by its owner, then its reclaim
            key = f"er-{uuid.uuid4().hex[:6]}"
            a = await s.acquire(key, "A", ttl=LEASE)
            tick(b)
            await s.release(a)
            tick(b)
            got = await s.acquire(key, "A", ttl=LEASE, reclaim=a.epoch)
            out.append(("own reclaim after its release", got.epoch > a.epoch))
            results[kind] = out
        finally:
            await b.close()
    mem = results["memory"]
    assert mem[0] == ("info owner after expiry", None, True), mem
    assert ("own reclaim at the epoch", True) in mem, mem
    assert ("other's reclaim at the epoch", True) in mem, mem
    assert ("own reclaim after its release", True) in mem, mem
    for kind in KINDS:
        assert results[kind] == mem, (kind, results[kind], mem)


async def test_redis_an_rm_whose_delete_failed_then_a_zombies_reclaim_leaves_the_live_session(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage (failure-model.md, known limit "A Redis delete that fails may
    leave its tombstone"). Redis restarts empty under R (E1); W restores the key (E2)
    and commits; an operator's ``rm`` lays its tombstone (>= E2) and its delete script
    fails (`StoreUnavailable`): W's session lives on below the tombstone. R's reclaim
    of E1 meets W's head: fenced (stale, not "deleted"), no compensating delete runs,
    and W's session, its lease and its version are untouched; W commits on."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    other: Any = lr.open_store(bare_redis.url, namespace=ns, clock=clock)
    key = f"rf-{uuid.uuid4().hex[:6]}"
    try:
        r, v1 = await vanished_under_r(store, clock, key)
        clock.advance(100)
        w = await other.acquire(key, "W", ttl=60)
        assert await other.commit(Commit(key, w.epoch, 0, b"W: hello", [], 0)) == 1
        clock.advance(100)
        await rm_whose_delete_fails(other, key)  # the operator's rm
        tomb = await store._tombstone(key)
        assert tomb is not None and tomb >= w.epoch, (tomb, w.epoch)
        with deletes_watched(store) as deletes:
            clock.advance(100)
            got = await _reclaim_then_save(r, v1, b"R: zombie words")
        assert isinstance(got, LeaseLost) and not got.vanished, got
        assert not deletes, deletes
        info = await store.info(key)
        assert info is not None and (info.owner, info.epoch, info.version) == ("W", w.epoch, 1)
        assert key in await store.keys()
        assert await other.commit(Commit(key, w.epoch, 1, b"W: book me", [], 0)) == 2
    finally:
        await other.aclose()
        await store.aclose()
