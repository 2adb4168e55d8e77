"""Hunt review25: a review of 53d0545 (a reclaim below the store's epoch, or at or below
a deleted key's tombstone, is fenced: `LeaseLost` straight from `Store.acquire`; a
delete's tombstone holds max(session epoch, clock in microseconds)).

Real `AgentSession`s driven by the scripted LLM (tests/test_hooks.py `start`), a real
``redis-server`` of each Redis test alone, persisting nothing but a ``SAVE``d RDB (a
restart comes back at it: a rollback).
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.redis.scripts import script_source
from tests.redis_servers import RedisServer
from tests.test_hooks import KEY, start
from tests.test_lost_hunt import bare_redis, close_all, live_texts, outcome, stored_texts

__all__ = ["bare_redis"]  # a fixture, shared

pytestmark = pytest.mark.filterwarnings("ignore")


class LosesAnAcquireReply:
    """A store whose next acquisition, once ``armed``, lands and then has its reply lost
    (`StoreUnavailable`, as a connection dropped after the script ran)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.granted: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire(self, key: str, owner: str, **kw: Any) -> Any:
        lease = await self.inner.acquire(key, owner, **kw)
        if self.armed:
            self.armed = False
            self.granted.append(lease)
            raise lr.StoreUnavailable("the acquisition's reply was lost (test)")
        return lease


async def _own_acquisition_scenario(
    store: Any, roll_back: Any, expire_lease: Any, owner_of: Any
) -> None:
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    wrapped = LosesAnAcquireReply(store)
    session, rs, _ = await start(
        wrapped, ["one", "two", "three", "four"], owner="w1", on_lost=on_lost
    )
    try:
        await session.run(user_input="first words")
        await rs.checkpoint()
        first_epoch = rs._holder.epoch
        snap = await roll_back(None)  # the backup / the lagging replica: v1
        await session.run(user_input="second words")
        await rs.checkpoint()
        await roll_back(snap)  # the store comes back at v1, epoch E1, w1's lease
        await expire_lease()  # down past the lease's ttl: the lease ran out meanwhile
        await session.run(user_input="third words")
        wrapped.armed = True
        got1 = await outcome(rs.checkpoint())  # head behind: vanished, reacquired, reply lost
        assert isinstance(got1, lr.StoreUnavailable), repr(got1)
        (granted,) = wrapped.granted
        # its own lease, run out: kept at E1 since review26 (a new epoch before)
        assert granted.owner == "w1" and granted.epoch >= first_epoch
        got2 = await outcome(rs.checkpoint())  # the store answers again
        await asyncio.sleep(0)  # on_lost's task, if any, runs
        assert isinstance(got2, int), (
            f"w1's checkpoint after its own acquisition's reply was lost: {got2!r} "
            f"(on_lost told: {lost!r}); nobody else ever acquired the session, the store "
            f"holds w1's own epoch {granted.epoch} (w1 reclaimed {first_epoch})"
        )
        assert not lost
        assert await owner_of() == "w1"
        assert await stored_texts(store) == live_texts(session)
    finally:
        await rs.aclose()
        await session.aclose()


async def test_redis_a_holder_is_not_fenced_by_its_own_acquisition_whose_reply_was_lost(
    bare_redis: RedisServer,
) -> None:
    """A holder w1 (epoch E1) commits v1; the server's RDB is taken (``SAVE``); w1
    commits v2; the server comes back from the RDB (a restart from a backup, a failover
    to a lagging replica) and w1's lease ran out while it was down. w1's next checkpoint
    finds the head behind v2 (vanished) and reacquires reclaiming E1: the store's epoch
    is E1 and the lease is not live, so it grants w1 a NEW epoch E2 > E1 (since
    review26 it keeps E1, w1's own lease run out), and that acquisition's reply is
    lost (`StoreUnavailable`, the store failing again). The
    documented behaviour (lease.py `reacquire`: "The next checkpoint then acquires again
    (the same epoch, the lease being live and ours)"; failure-model.md: "A store failing
    again in the middle of that acquisition leaves the session vanished until it is
    done") is that the next checkpoint acquires again, gets E2 (its own live lease) and
    writes the conversation whole.

    What happens: the holder still holds the old `Lease` (E1), so `_acquire_kept`
    reclaims E1; the store's epoch E2 is above it, and since 53d0545 a reclaim below the
    store's epoch is fenced (stores/lua/acquire.lua:34 ``{'stale', ...}``, base.py
    acquired_epoch:749 for the Python stores): `LeaseLost` (a takeover), on_lost runs
    (a `resumable_job` ends the call), and every later turn is unsaved, although nobody
    but w1 ever acquired the session. Before 53d0545 the reclaim below the store's epoch
    was a plain acquisition: w1's own live lease, renewed at E2.

    Fix: fence a reclaim below the store's epoch only where the store's holder is not
    ``owner`` with a live lease (base.py:749 ``if epoch is not None and reclaim < epoch
    and not (live and holder == owner)``; the same in acquire.lua before its 'stale'
    reply), or have `LeaseHolder._acquire_kept` remember the epoch it asked for and,
    on an unknown outcome, look at `info` (owner == self, epoch above) before reclaiming."""
    store = lr.open_store(bare_redis.url, namespace=f"r{uuid.uuid4().hex[:8]}")
    raw = store._client  # type: ignore[attr-defined]
    head = store._names.head(KEY)  # type: ignore[attr-defined]

    async def roll_back(snap: Any) -> Any:
        if snap is None:
            bare_redis.cli("save")
            return True
        bare_redis.kill()
        bare_redis.start()  # same port, the RDB
        return None

    async def expire_lease() -> None:
        await raw.hset(head, "expires", "1")

    async def owner_of() -> Any:
        info = await store.info(KEY)
        return info.owner if info is not None else None

    try:
        await _own_acquisition_scenario(store, roll_back, expire_lease, owner_of)
    finally:
        await store.aclose()


async def test_memory_a_holder_is_not_fenced_by_its_own_acquisition_whose_reply_was_lost() -> None:
    """The same on `MemoryStore` (base.py `acquired_epoch`:749): rolled back to v1
    under w1's own epoch E1, its lease run out; the reacquisition is granted E2 and its
    reply lost; the next checkpoint's reclaim of E1 is fenced by w1's own E2 (`LeaseLost`,
    on_lost told) instead of renewing w1's live lease at E2 and writing the
    conversation whole. Fix: as in the Redis test."""
    store = MemoryStore()

    async def roll_back(snap: Any) -> Any:
        if snap is None:
            return copy.deepcopy(store._sessions)
        store._sessions.clear()
        store._sessions.update(copy.deepcopy(snap))
        return None

    async def expire_lease() -> None:
        store._sessions[KEY].lease_expires_at = 1.0

    async def owner_of() -> Any:
        info = await store.info(KEY)
        return info.owner if info is not None else None

    await _own_acquisition_scenario(store, roll_back, expire_lease, owner_of)


class DropsAReply:
    """A TCP proxy in front of a redis-server: once ``armed``, the first request that
    carries ``needle`` reaches the server, and its reply is dropped with the connection
    (a connection reset after the server ran the command): redis-py reconnects and
    sends the command again (its `Retry`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.needle: bytes | None = None
        self.dropped = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        drop = asyncio.Event()

        async def up() -> None:
            while data := await cr.read(65536):
                if self.needle is not None and self.needle in data:
                    self.needle = None
                    drop.set()
                sw.write(data)
                await sw.drain()
            sw.close()

        async def down() -> None:
            while data := await sr.read(65536):
                if drop.is_set():
                    self.dropped += 1
                    cw.close()
                    sw.close()
                    return
                cw.write(data)
                await cw.drain()
            cw.close()

        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        except asyncio.CancelledError:
            cw.close()
            sw.close()


async def test_redis_a_reacquire_retried_by_redis_py_does_not_fence_its_own_holder(
    bare_redis: RedisServer,
) -> None:
    """The same defect with nothing but a dropped connection: w1 (E1) commits v1, the
    RDB is taken, v2, the server comes back at the RDB with w1's lease run out. w1's
    next checkpoint finds the head behind (vanished) and reacquires reclaiming E1; the
    server runs the acquire script (a new epoch E2 for w1: the lease was not live) and
    the reply is lost with the connection. redis-py's own retry (`Retry`, on by default:
    ``retries``) sends the same acquisition again, which now meets w1's own E2 above the
    reclaim: ``{'stale', E2}`` (acquire.lua:34), `LeaseLost` (a takeover) raised by
    `Store.acquire` itself, on_lost told, autosave stopped, the call ended by a
    `resumable_job`, with nobody else ever near the session. Before 53d0545 the retried
    reclaim was a plain acquisition of w1's own live lease (E2). Fix: as in
    test_redis_a_holder_is_not_fenced_by_its_own_acquisition_whose_reply_was_lost (a
    reclaim below the store's epoch held live by ``owner`` itself is not fenced)."""
    proxy = DropsAReply(bare_redis.port)
    url = await proxy.start()
    store = lr.open_store(url, namespace=f"p{uuid.uuid4().hex[:8]}", socket_timeout=2.0)
    raw = store._client  # type: ignore[attr-defined]
    head = store._names.head(KEY)  # type: ignore[attr-defined]
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    session, rs, _ = await start(store, ["one", "two", "three"], owner="w1", on_lost=on_lost)
    try:
        await session.run(user_input="first words")
        await rs.checkpoint()
        bare_redis.cli("save")
        await session.run(user_input="second words")
        await rs.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # the RDB: v1, E1
        await raw.hset(head, "expires", "1")  # the lease ran out while it was down
        for name in ("acquire", "index", "commit", "info"):  # loaded: the EVALSHA runs
            await raw.script_load(script_source(name))
        await session.run(user_input="third words")
        proxy.needle = store._scripts._code["acquire"].sha.encode()  # type: ignore[attr-defined]
        got = await outcome(rs.checkpoint())
        await asyncio.sleep(0)
        assert proxy.dropped == 1
        assert isinstance(got, int), (
            f"w1's checkpoint, its reacquisition's reply lost and retried by redis-py: "
            f"{got!r}; on_lost told: {lost!r}"
        )
        assert not lost
        assert await stored_texts(store) == live_texts(session)
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
        await proxy.aclose()


async def test_memory_a_session_expired_by_its_ttl_is_written_back_by_its_holder() -> None:
    """passes: coverage. A session expired whole by the store's ttl (no delete: no
    tombstone) under its holder w1 (frozen past its lease and the ttl): w1's next
    checkpoint finds it vanished, reclaims its epoch (at or below the clock, nothing
    above it: granted) and writes the conversation whole; on_lost is not told. The
    reclaim rule of 53d0545 must not take a missing key with no tombstone for a delete."""
    now = [1_800_000_000.0]
    store = MemoryStore(ttl=60.0, clock=lambda: now[0])
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    session, rs, _ = await start(store, ["one", "two"], owner="w1", on_lost=on_lost)
    try:
        await session.run(user_input="first words")
        await rs.checkpoint()
        epoch = rs._holder.epoch
        now[0] += 3600  # frozen an hour: the lease and the session's ttl ran out
        assert await store.info(KEY) is None
        await session.run(user_input="second words")
        got = await outcome(rs.checkpoint())
        assert isinstance(got, int), repr(got)
        assert not lost
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("w1", epoch)
        assert await stored_texts(store) == live_texts(session)
    finally:
        await rs.aclose()
        await session.aclose()


async def test_redis_emptied_then_a_new_job_the_old_holder_whose_renewal_said_vanished_is_fenced(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. w1 holds the call (E1); Redis restarts empty; w1's renewal says
    vanished (`LeaseHolder.vanished`); a new job w2 restores the empty key (a new epoch
    from the clock, above E1) and talks; w1's next checkpoint reclaims E1 through
    `_commit_or_reacquire` -> `_reacquire` and `Store.acquire` answers 'stale' (the
    first trip's pipeline): `LeaseLost`, not vanished, on_lost told once, no retry
    loop (a second checkpoint raises the same without asking the store), w1's close
    does not release w2's lease, and w2's conversation stands whole."""
    store = lr.open_store(bare_redis.url, namespace=f"e{uuid.uuid4().hex[:8]}")
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", on_lost=on_lost)
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # empty
        assert await rs1._holder.renew(rs1.version) is False
        assert rs1._holder.vanished
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2")
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        await s1.run(user_input="zombie words")
        got = await outcome(rs1.checkpoint())
        again = await outcome(rs1.checkpoint())
        await asyncio.sleep(0.05)
        assert isinstance(got, lr.LeaseLost) and not got.vanished, repr(got)
        assert isinstance(again, lr.LeaseLost), repr(again)
        assert len(lost) == 1
        await rs1.aclose()
        info = await store.info(KEY)
        assert info is not None and info.owner == "w2" and info.epoch == rs2._holder.epoch
        texts = await stored_texts(store)
        assert texts == live_texts(s2) and "zombie words" not in texts
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))
