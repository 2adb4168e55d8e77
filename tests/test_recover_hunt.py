"""A Redis call that meets socket timeouts and then an answer returns the answer.

Found on Python 3.10 (no longer supported: README), where redis-py bounds its socket
reads with the ``async_timeout`` package, which times out by calling ``task.cancel()``
and never takes that back: the store's check for a cancellation redis-py swallowed
(client.py ``_cancels``) read the count a plain timeout left as the caller's own
cancellation. Kept for every version: a real ``redis-server`` frozen with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from livekit_resume.stores.base import Commit
from livekit_resume.stores.redis import RedisStore
from tests.redis_servers import RedisServer, require_redis_server

KEY = "room-recover"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis_server()
    s = RedisServer(tmp_path / "redis")
    s.start()
    try:
        yield s
    finally:
        s.resume()
        s.stop()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(
        server.url, namespace=f"p{uuid.uuid4().hex[:8]}", socket_timeout=0.3, retries=3
    )
    try:
        yield s
    finally:
        await s.aclose()


async def test_a_call_that_recovers_after_a_socket_timeout_returns_its_answer(
    server: RedisServer, store: RedisStore
) -> None:
    """A server that stalls past ``socket_timeout`` and then answers a retry: the call
    returns the answer (the store retries a timeout, README). Nobody cancelled the
    caller, so it must never end with ``CancelledError``: a job would take that for its
    own shutdown and drop the session."""
    lease = await store.acquire(KEY, "worker-a")
    await store.commit(Commit(KEY, lease.epoch, 0, b"head", [], 0))
    server.pause()
    asyncio.get_running_loop().call_later(0.8, server.resume)  # after 2 timeouts of 0.3 s
    try:
        got = await store.load(KEY)
    except asyncio.CancelledError:
        pytest.fail("load() ended with CancelledError although nobody cancelled its caller")
    finally:
        server.resume()
    assert got.version == 1
