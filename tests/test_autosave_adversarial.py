"""Autosave and lease renewal of a live session whose Redis is slow, frozen, flapping or
briefly gone: a real `AgentSession` driven by the scripted LLM, real ``redis-server``
processes this file starts, faults injected into them (SIGSTOP, kill and restart).

Each test is bounded by a deadline far above the time it takes; none asserts a timing
except where the bound itself is the promise (`CLOSE_SAVE_BUDGET`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from prometheus_client import REGISTRY

import livekit_resume as lr
from livekit_resume.agent_hooks import autosave
from livekit_resume.errors import StoreUnavailable
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import DEFAULT_LEASE_TTL, Lease, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_hooks import (
    HANDOFF_SCRIPT,
    KEY,
    Billing,
    Receptionist,
    Visit,
    registry,
    settled,
    start,
)

# Bounds a broken store; not a timing.
DEADLINE = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, with an append-only file (a restart keeps it)."""
    require_redis_server()
    s = RedisServer(tmp_path / "redis", extra=["--appendonly", "yes", "--appendfsync", "always"])
    s.start()
    try:
        yield s
    finally:
        s.resume()
        s.stop()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    """A store with a short client timeout: a frozen server fails an operation in about
    ``socket_timeout * (retries + 1)`` seconds."""
    s = RedisStore.from_url(
        server.url, namespace=f"a{uuid.uuid4().hex[:8]}", socket_timeout=0.5, retries=3
    )
    try:
        yield s
    finally:
        await s.aclose()


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def texts_of(items: list[Any]) -> list[str]:
    return [" ".join(str(c) for c in i["content"]) for i in items if i["type"] == "message"]


def live_texts(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in item.content)
        for item in session.history.items
        if item.type == "message"
    ]


async def stored_texts(store: Store) -> list[str]:
    stored = await store.load(KEY)
    snap = Codec().decode_parts(KEY, stored.head, stored.streams, version=stored.version)
    return texts_of(snap.history)


# -- aclose against a frozen store ----------------------------------------------------


async def test_a_close_while_redis_is_frozen_returns_within_the_close_budget(
    server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LiveKit gives shutdown callbacks about 10 s: `aclose` promises to give up on the
    final save after `CLOSE_SAVE_BUDGET`. A frozen server (SIGSTOP) answers nothing, and
    one attempt of a save waits out every client timeout and retry; the budget must bound
    the whole close (the save, then the lease's release), not only the gaps between
    attempts."""
    budget = 1.0
    monkeypatch.setattr(autosave, "CLOSE_SAVE_BUDGET", budget)
    monkeypatch.setattr(autosave, "CLOSE_RELEASE_WAIT", 0.5, raising=False)
    failures = counted("livekit_resume_final_save_failures_total")
    release_failures = counted("livekit_resume_lease_release_failures_total")
    session, rs, _ = await start(store, ["one", "two"], autosave=True)
    await session.run(user_input="said before the freeze")
    await settled(rs)
    server.pause()
    try:
        await session.run(user_input="said while frozen")
        began = time.monotonic()
        closing = asyncio.ensure_future(rs.aclose())
        done, _ = await asyncio.wait({closing}, timeout=budget + 0.5 + 1.0)
        took = time.monotonic() - began
    finally:
        server.resume()
    await asyncio.wait_for(closing, DEADLINE)
    assert done, f"aclose took over {took:.1f}s with a {budget}s close budget"
    assert rs.state == "closed"
    # what an operator sees: the failed final save and the release left to expire
    assert counted("livekit_resume_final_save_failures_total") == failures + 1
    assert counted("livekit_resume_lease_release_failures_total") == release_failures + 1
    await session.aclose()


async def test_a_close_during_a_short_freeze_saves_the_last_turn_and_releases_the_lease(
    server: RedisServer, store: RedisStore
) -> None:
    """The freeze ends within the close budget: the autosave stuck in it and the final
    save behind it both land, the last turn is stored, and the lease is released (the
    next worker restores at once, without waiting out the lease)."""
    session, rs, _ = await start(store, ["one", "two"], autosave=True)
    await session.run(user_input="said before the freeze")
    await settled(rs)
    server.pause()
    try:
        await session.run(user_input="the last turn, said while frozen")
        await asyncio.sleep(0.1)  # its autosave is on its way into the frozen server
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.3)
    finally:
        server.resume()
    await asyncio.wait_for(closing, DEADLINE)
    live = live_texts(session)
    assert await stored_texts(store) == live
    info = await store.info(KEY)
    assert info is not None and info.owner is None and info.version == rs.version
    await session.aclose()


# -- a session the store lost, then a crash while it is acquired again ------------------


class CrashWhileAcquiring:
    """A real `RedisStore` whose server is killed (SIGKILL) when ``armed`` and the
    hooks next acquire the session again (`reacquire`): right after the acquisition
    landed, its reply lost with the server (``at="acquire"``), or before the holder
    learned which version the store holds (``at="info"``)."""

    def __init__(self, inner: RedisStore, server: RedisServer, at: str) -> None:
        self.inner = inner
        self.server = server
        self.at = at
        self.armed = False
        self.crashed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _crash(self, at: str) -> bool:
        if not self.armed or at != self.at:
            return False
        self.armed = False
        self.server.kill()
        self.crashed.set()
        return True

    async def acquire(self, key: str, owner: str, **kw: Any) -> Any:
        lease = await self.inner.acquire(key, owner, **kw)
        if self._crash("acquire"):
            raise lr.StoreUnavailable("the acquisition's reply was lost with the server (test)")
        return lease

    async def info(self, key: str) -> Any:
        self._crash("info")
        return await self.inner.info(key)


def lose_data(server: RedisServer) -> None:
    """A killed server comes back empty (its append-only file gone: a failover to an
    empty replica, a host replaced)."""
    assert not server.running
    for path in server.directory.iterdir():
        if path.name != "redis.log":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


async def failed_again(rs: lr.ResumableSession, failures: int) -> None:
    await eventually(
        lambda: _true(rs._autosave.failures > failures), "autosave failed again", DEADLINE
    )


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("at", ["acquire", "info"])
async def test_a_crash_while_a_vanished_session_is_acquired_again_does_not_fence_its_holder(
    server: RedisServer, store: RedisStore, at: str
) -> None:
    """Redis down mid-turn (the commit is kept pending), back without its data (the
    session vanished: acquired again under a new epoch), and down once more right after
    that acquisition (its reply lost, or before the holder read the store's version).
    The acquisition is durable; the pending commit still carries the old epoch. Sent
    as it was once the store is back, it is refused with the newer epoch, which reads as
    a takeover: the holder fenced by its own acquisition, autosave stopped for good,
    every later turn unsaved."""
    crashing = CrashWhileAcquiring(store, server, at)
    session, rs, _ = await start(crashing, ["one", "two", "three"], autosave=True)
    await session.run(user_input="before the outage")
    await settled(rs)

    server.kill()
    failures = rs._autosave.failures
    await session.run(user_input="said while redis was down")  # its commit is kept pending
    await failed_again(rs, failures)
    lose_data(server)
    crashing.armed = True
    server.start()
    await asyncio.wait_for(crashing.crashed.wait(), DEADLINE)
    failures = rs._autosave.failures
    await failed_again(rs, failures)  # the reacquire met the crash
    server.start()  # its append-only file holds the new acquisition

    await session.run(user_input="after the outage")
    await asyncio.wait_for(rs._autosave.idle.wait(), DEADLINE)
    assert rs._autosave.lost is None, f"autosave stopped: {rs._autosave.lost}"
    assert await stored_texts(store) == live_texts(session)
    info = await store.info(KEY)
    assert info is not None and info.owner == "w1" and info.version == rs.version
    await rs.aclose()
    await session.aclose()


# -- a store flapping through a handoff and a tool call ----------------------------------


class Flapper:
    """Kills the server (SIGKILL) and starts it again from its append-only file, over and
    over, until stopped: down ``down`` seconds, up ``up`` seconds."""

    def __init__(self, server: RedisServer, *, down: float = 0.15, up: float = 0.25) -> None:
        self.server = server
        self.down = down
        self.up = up
        self.cycles = 0
        self.is_down = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.to_thread(self.server.kill)
            self.is_down.set()
            await asyncio.sleep(self.down)
            await asyncio.to_thread(self.server.start)
            self.is_down.clear()
            self.cycles += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.up)

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        if not self.server.running:
            await asyncio.to_thread(self.server.start)


async def test_a_store_flapping_through_a_handoff_and_a_tool_call_ends_up_holding_it_all(
    server: RedisServer,
) -> None:
    """Down for longer than the client's own retries ride out, up for a few hundred
    milliseconds, again and again: commits fail, some after they landed."""
    store = RedisStore.from_url(
        server.url, namespace=f"a{uuid.uuid4().hex[:8]}", socket_timeout=0.5, retries=1
    )
    try:
        await _flapping_handoff(server, store)
    finally:
        await store.aclose()


async def _flapping_handoff(server: RedisServer, store: RedisStore) -> None:
    session, rs, _ = await start(store, [*HANDOFF_SCRIPT, "Anything else?"], autosave=True)
    await settled(rs)
    flapper = Flapper(server)
    try:
        # each turn said while the server is down: its autosave meets the fault
        await asyncio.wait_for(flapper.is_down.wait(), DEADLINE)
        await session.run(user_input="I need an invoice")  # a handoff to Billing
        assert isinstance(session.current_agent, Billing)
        await asyncio.sleep(flapper.down + 0.05)
        await asyncio.wait_for(flapper.is_down.wait(), DEADLINE)
        await session.run(user_input="for 40 euros")  # a tool call
        await asyncio.sleep(flapper.down + 0.05)
        await asyncio.wait_for(flapper.is_down.wait(), DEADLINE)
        await session.run(user_input="thanks")
    finally:
        await flapper.stop()
    assert rs._autosave.failures >= 1, "no fault was injected"
    await asyncio.wait_for(rs._autosave.idle.wait(), DEADLINE)
    assert rs._autosave.lost is None, f"autosave stopped: {rs._autosave.lost}"
    assert await stored_texts(store) == live_texts(session)
    assert rs.version == (await store.load(KEY)).version
    versions = [v.version for v in await store.versions(KEY)]
    assert versions == sorted(set(versions))
    live = live_texts(session)
    await rs.suspend()

    again, rs2, _ = await start(store, ["Welcome back."], owner="w2")
    assert rs2.resumed and isinstance(again.current_agent, Billing)
    assert live_texts(again)[: len(live)] == live
    await rs2.aclose()
    await again.aclose()


# -- a stall longer than the lease ---------------------------------------------------


async def test_turns_said_while_redis_is_frozen_past_the_lease_are_all_saved_under_its_epoch(
    server: RedisServer, store: RedisStore
) -> None:
    """Frozen for longer than the lease TTL, turns coming meanwhile: renewals and commits
    fail (or land late); nobody else could take the session, so once the server runs
    again the holder goes on under the same epoch, and its next commit holds every turn
    said meanwhile."""
    session, rs, _ = await start(
        store, ["one", "two", "three", "four"], autosave=True, lease_ttl=1.0
    )
    await session.run(user_input="before the freeze")
    await settled(rs)
    epoch = rs._holder.epoch
    failures = rs._autosave.failures
    server.pause()
    try:
        await session.run(user_input="said while frozen")
        await session.run(user_input="said while still frozen")
        await failed_again(rs, failures)
        await asyncio.sleep(1.2)  # the fault itself: past the lease TTL (1 s)
    finally:
        server.resume()
    await session.run(user_input="after the freeze")
    await stored_every_turn_under(rs, session, store, epoch)
    await rs.aclose()
    await session.aclose()


async def stored_every_turn_under(
    rs: lr.ResumableSession, session: AgentSession[Any], store: RedisStore, epoch: int
) -> None:
    """Once autosave settles after a fault: it goes on, the store holds every turn of the
    live session, and the holder and every version kept ``epoch``."""
    await asyncio.wait_for(rs._autosave.idle.wait(), DEADLINE)
    assert rs._autosave.lost is None, f"autosave stopped: {rs._autosave.lost}"
    assert await stored_texts(store) == live_texts(session)
    info = await store.info(KEY)
    assert info is not None and info.owner == "w1" and info.epoch == epoch
    assert {v.epoch for v in await store.versions(KEY)} == {epoch}


class Partition:
    """A TCP proxy between one worker and the server. `cut` stops forwarding both ways
    (what is sent waits, as across a network partition); `heal` delivers it and goes on.
    `hold_next_reply`: the server's next reply is held for a while (a slow link
    carrying a large snapshot), while what the client sends reaches the server at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._hold = 0.0
        self.open = asyncio.Event()
        self.open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def hold_next_reply(self, seconds: float) -> None:
        self._hold = seconds

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.open.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for src, dst, replies in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.ensure_future(self._pipe(src, dst, replies))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if replies and self._hold:
                    hold, self._hold = self._hold, 0.0
                    await asyncio.sleep(hold)
                await self.open.wait()
                dst.write(data)
                await dst.drain()
        await self.open.wait()
        dst.close()

    async def aclose(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_a_worker_cut_off_past_its_lease_is_fenced_once_it_hears_from_the_store(
    server: RedisServer,
) -> None:
    """One worker cut off from Redis (a partition; the server itself is fine) for longer
    than its lease while the caller talks on; another worker restores the session (the
    lease expired) and writes. Once the partition heals, the first worker's delayed and
    new writes are all refused, its autosave stops with `LeaseLost` and `on_lost` runs;
    nothing it sends lands under its stale epoch."""
    partition = Partition(server.port)
    namespace = f"a{uuid.uuid4().hex[:8]}"
    cut_off = RedisStore.from_url(
        await partition.start(), namespace=namespace, socket_timeout=0.3, retries=1
    )
    direct = RedisStore.from_url(server.url, namespace=namespace)
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    try:
        s1, rs1, _ = await start(
            cut_off, ["one", "two", "three"], autosave=True, lease_ttl=1.0, on_lost=on_lost
        )
        await s1.run(user_input="before the partition")
        await settled(rs1)
        old_epoch = rs1._holder.epoch
        failures = rs1._autosave.failures
        partition.cut()
        await s1.run(user_input="said while cut off")
        await failed_again(rs1, failures)
        await asyncio.sleep(1.1)  # the fault itself: past the lease TTL (1 s)

        s2, rs2, _ = await start(direct, ["x"], owner="w2")  # no takeover: it expired
        assert rs2.resumed
        await s2.run(user_input="said to the second worker")
        await rs2.checkpoint()
        new_epoch = rs2._holder.epoch
        assert new_epoch > old_epoch

        partition.heal()
        await s1.run(user_input="said to the first worker after the partition")
        await asyncio.wait_for(rs1._autosave.idle.wait(), DEADLINE)
        await eventually(lambda: _true(bool(lost)), "on_lost ran", DEADLINE)
        assert rs1._autosave.lost is not None
        with pytest.raises(lr.LeaseLost):
            await rs1.checkpoint()
        await asyncio.sleep(0.3)  # anything of the first worker's still on its way lands
        first = next(v.version for v in await direct.versions(KEY) if v.epoch == new_epoch)
        later = [v for v in await direct.versions(KEY) if v.version >= first]
        assert {v.epoch for v in later} == {new_epoch}
        assert await stored_texts(direct) == live_texts(s2)
        await rs1.aclose()
        info = await direct.info(KEY)
        assert info is not None and info.owner == "w2"  # the fenced worker released nothing
        await rs2.aclose()
        await s2.aclose()
        await s1.aclose()
    finally:
        await partition.aclose()
        await cut_off.aclose()
        await direct.aclose()


# -- the first renewal after a slow restore ------------------------------------------


async def _rival_takes(store: Store, since: float, *, until: float, ttl: float) -> float | None:
    """Another worker trying to acquire the session every 20 ms until ``until`` seconds
    after ``since`` (`time.monotonic`): the seconds after ``since`` when it got the lease
    (given back at once), or None when it never did."""
    while time.monotonic() < since + until:
        try:
            lease = await store.acquire(KEY, "rival", ttl=ttl)
        except lr.SessionBusy:
            await asyncio.sleep(0.02)
            continue
        took = time.monotonic() - since
        await store.release(lease)
        return took
    return None


async def test_a_lease_granted_by_a_slow_restore_is_renewed_before_it_expires(
    server: RedisServer,
) -> None:
    """The lease runs from when the restore's acquisition was sent. A restore whose
    reply comes slowly (a large snapshot over a slow link, a loaded loop) returns late
    in that lease; the job then waits for its caller before `session.start()`, and
    nothing is committed meanwhile. The first renewal is due a third of the TTL after
    the acquisition, not after the restore returned, or the lease runs out in between
    and another worker restores the session from under a live one."""
    ttl = 1.5
    slow = Partition(server.port)
    namespace = f"a{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(await slow.start(), namespace=namespace, socket_timeout=5.0)
    rival = RedisStore.from_url(server.url, namespace=namespace)
    try:
        first, rs0, _ = await start(store, ["one"], lease_ttl=ttl)
        await first.run(user_input="a turn to restore")
        await rs0.suspend()

        session: AgentSession[Visit] = AgentSession(llm=ScriptedLLM([]), userdata=Visit())
        rs = lr.ResumableSession(
            store, KEY, registry=registry(), userdata_type=Visit, owner="w2", lease_ttl=ttl
        )
        slow.hold_next_reply(1.2)  # the acquisition's: over two thirds of the lease
        sent = time.monotonic()
        await rs.restore(session, default=lambda: Receptionist(rs))
        assert rs.resumed
        # waiting for the caller to join before session.start(): only renewals keep it
        taken = await _rival_takes(rival, sent, until=2 * ttl, ttl=ttl)  # a lifetime, and more
        assert taken is None, f"another worker acquired the lease {taken:.2f}s after the restore"
        await rs.aclose()
        await first.aclose()
    finally:
        await slow.aclose()
        await store.aclose()
        await rival.aclose()


async def test_writes_paused_past_the_lease_by_a_failover_lose_no_turn_and_keep_the_epoch(
    server: RedisServer, store: RedisStore
) -> None:
    """``CLIENT PAUSE WRITE`` (what a failover does while the replica catches up), longer
    than the lease: every commit and renewal waits in the server, reads go on; a client
    that timed out meanwhile gets its command dropped with its connection. Once writes
    resume the holder goes on under its epoch and stores every turn."""
    session, rs, _ = await start(store, ["one", "two", "three"], autosave=True, lease_ttl=1.0)
    await session.run(user_input="before the pause")
    await settled(rs)
    epoch = rs._holder.epoch
    server.cli("client", "pause", "1500", "write")
    await session.run(user_input="said while writes were paused")
    await session.run(user_input="said while writes were still paused")
    await asyncio.sleep(1.6)  # the fault itself
    await session.run(user_input="after the pause")
    await stored_every_turn_under(rs, session, store, epoch)
    await rs.aclose()
    await session.aclose()


class _RenewalsFailing(MemoryStore):
    """A memory store whose lease renewals fail until ``until`` (`time.monotonic`), as
    in an outage, and take ``slow`` seconds each (a store coming back, a loaded loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.until = 0.0
        self.slow = 0.0
        self.attempts = 0

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        await asyncio.sleep(self.slow)
        if time.monotonic() < self.until:
            self.attempts += 1
            raise StoreUnavailable("renewals are failing (test)")
        return await super().renew(lease, ttl=ttl)


async def test_an_idle_session_keeps_its_lease_through_an_outage_of_most_of_its_ttl() -> None:
    """A failed renewal was tried again only a whole interval (a third of the TTL)
    later: an idle session (paused, waiting for its caller) renewed at a third and two
    thirds of its lease during an outage of 0.8 TTL, both failed, and the third try was
    due as the lease ran out: a renewal a little slow then came too late, and another
    worker took the session. Tried again sooner after a failure, the first renewal after
    the outage lands with time to spare."""
    ttl = 3.0
    store = _RenewalsFailing()
    failed_before = REGISTRY.get_sample_value("livekit_resume_lease_renewal_failures_total")
    session, rs, _ = await start(store, ["one"], autosave=True, lease_ttl=ttl)
    try:
        await settled(rs)
        start_at = time.monotonic()
        store.until, store.slow = start_at + 0.8 * ttl, 0.25
        taken = await _rival_takes(store, start_at, until=ttl + 0.5, ttl=ttl)
        assert taken is None, f"another worker took the lease {taken:.2f} s in"
        assert store.attempts >= 2  # the outage did meet the renewals
        assert rs._autosave.lost is None
        failed = REGISTRY.get_sample_value("livekit_resume_lease_renewal_failures_total")
        assert failed is not None and failed - (failed_before or 0) == store.attempts
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()


class _SwallowingRenewals(MemoryStore):
    """A memory store whose renewals hang, and turn the cancellation that ends them into
    an error of their own (a client whose timeout swallowed it)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewing = asyncio.Event()

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        self.renewing.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise StoreUnavailable("the renewal was cut (test)") from None
        return await super().renew(lease, ttl=ttl)


async def test_a_close_during_a_renewal_whose_cancellation_is_swallowed_ends() -> None:
    """Autosave stops its loops by cancelling them. A store call that turned that
    cancellation into an error (redis-py's ``asyncio.wait_for`` can, on Python 3.11) was
    taken for a failed renewal: the loop retried and never ended, and the close waited
    for it for ever (a CI run hung here for 7 minutes)."""
    store = _SwallowingRenewals()
    session, rs, _ = await start(store, ["one"], autosave=True, lease_ttl=1.5)
    try:
        await settled(rs)
        await asyncio.wait_for(store.renewing.wait(), 5)
        await asyncio.wait_for(rs.aclose(), 8)  # the close budget, then the release's wait
    finally:
        await session.aclose()
        await store.aclose()
