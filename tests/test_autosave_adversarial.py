"""Autosave and lease renewal of a live session whose Redis is slow, frozen, flapping or
briefly gone: a real `AgentSession` driven by the scripted LLM, real ``redis-server``
processes this file starts, faults injected into them (SIGSTOP, kill and restart).

Each test is bounded by a deadline far above the time it takes; none asserts a timing
except where the bound itself is the promise (`CLOSE_SAVE_BUDGET`).
"""

from __future__ import annotations

import asyncio
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
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_hooks import KEY, settled, start

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


async def stored_texts(store: RedisStore) -> list[str]:
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
