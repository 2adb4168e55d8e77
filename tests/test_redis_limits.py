"""A real Redis that refuses or limits work, each condition then cleared: a restore
whose reply the server refuses to send, a large turn refused for memory. Real
``redis-server`` processes of each test alone (``make_redis``), loopback only, stopped
at the end.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.errors import StoreUnavailable
from tests.redis_servers import RedisFactory, RedisServer
from tests.test_autosave_adversarial import live_texts, stored_texts
from tests.test_hooks import KEY, Receptionist, Visit, registry, start
from tests.test_redis_faults import used_memory


async def suspended_session(server: RedisServer, namespace: str, user_input: str) -> int:
    """A conversation saved and suspended on ``server`` (lease free); its version."""
    store = lr.open_store(server.url, namespace=namespace, socket_timeout=1.0, retries=1)
    try:
        session, rs, _ = await start(store, ["one", "two", "three"], autosave=True)
        await session.run(user_input=user_input)
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        version = await rs.suspend()
        await session.aclose()
        return version
    finally:
        await store.aclose()


async def restore_on(store: lr.Store) -> lr.ResumableSession:
    """A new job's plain restore of ``KEY`` (no takeover, as README's "by hand")."""
    session: AgentSession[Visit] = AgentSession(userdata=Visit())
    rs = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit)
    await asyncio.wait_for(rs.restore(session, default=lambda: Receptionist(rs)), 20)
    return rs


async def test_a_restore_whose_reply_the_output_buffer_limit_cut_holds_no_lease(
    make_redis: RedisFactory,
) -> None:
    """``client-output-buffer-limit normal 64kb 64kb 0`` and a history larger than that:
    the server runs the restore's acquire, then closes the connection on the load's
    reply. The restore fails with `StoreUnavailable`, and the lease its acquire took
    was never given back: once the limit was lifted, the next job's restore was refused
    `SessionBusy` for the whole lease TTL, and ``ls`` named a holder that held nothing.
    The holder now asks the store, and gives back a lease that names it."""
    server = make_redis()
    namespace = f"h{os.urandom(4).hex()}"
    big = base64.b64encode(os.urandom(300_000)).decode()  # does not compress below 64 kB
    version = await suspended_session(server, namespace, big)

    server.cli("CONFIG", "SET", "client-output-buffer-limit", "normal 64kb 64kb 0")
    store = lr.open_store(server.url, namespace=namespace, socket_timeout=1.0, retries=1)
    try:
        with pytest.raises(StoreUnavailable, match="client-output-buffer-limit"):
            await restore_on(store)
        server.cli("CONFIG", "SET", "client-output-buffer-limit", "normal 0 0 0")

        info = await store.info(KEY)
        assert info is not None and info.version == version
        assert info.owner is None, f"a failed restore left its lease held by {info.owner!r}"
        rs = await restore_on(store)  # SessionBusy: held by the failed restore's owner
        assert rs.version == version
        await rs.aclose()
    finally:
        await store.aclose()


async def test_a_large_turn_refused_for_memory_while_staged_is_saved_once_memory_is_back(
    make_redis: RedisFactory,
) -> None:
    """``noeviction`` at ``maxmemory`` while a live session's turn of
    4 MB is staged in pieces. Autosave fails with `StoreUnavailable` (out of memory),
    leaves no staged piece, and once memory is back the next checkpoint holds every
    item of the live history, the large one included."""
    server = make_redis("--maxmemory-policy", "noeviction")
    store = lr.open_store(
        server.url, namespace=f"h{os.urandom(4).hex()}", socket_timeout=2.0, retries=1
    )
    try:
        session, rs, _ = await start(store, ["one", "two", "three", "four"], autosave=True)
        await session.run(user_input="a")
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        before = rs.version
        server.cli("CONFIG", "SET", "maxmemory", str(used_memory(server) + (1 << 20)))
        await session.run(user_input=base64.b64encode(os.urandom(3 << 20)).decode())
        await asyncio.sleep(1.0)
        assert rs._autosave.failures >= 1 and rs.version == before
        assert [k for k in server.cli("KEYS", "*").split() if ":up:" in k] == []
        server.cli("CONFIG", "SET", "maxmemory", "0")
        await session.run(user_input="c")
        await asyncio.wait_for(rs._autosave.idle.wait(), 20)
        assert rs._autosave.lost is None
        assert await stored_texts(store) == live_texts(session)
        assert await store.keys() == [KEY]
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()


async def test_a_server_at_its_maxclients_or_a_replica_is_named_as_such(
    make_redis: RedisFactory,
) -> None:
    """The server says why it cannot serve: at its ``maxclients``, or a read-only
    replica. The error told the operator to check that the server is up and the URL
    right, which it is."""
    server = make_redis()
    namespace = f"h{os.urandom(4).hex()}"
    await suspended_session(server, namespace, "a")
    server.cli("CONFIG", "SET", "maxclients", "1")
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)  # the one
    try:
        store = lr.open_store(server.url, namespace=namespace, socket_timeout=1.0, retries=1)
        try:
            with pytest.raises(StoreUnavailable, match="maxclients"):
                await store.info(KEY)
        finally:
            await store.aclose()
    finally:
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.1)  # the server saw the connection go
    server.cli("CONFIG", "SET", "maxclients", "100")
    server.cli("REPLICAOF", "127.0.0.1", "1")  # a primary that is not there: read-only
    store = lr.open_store(server.url, namespace=namespace, socket_timeout=1.0, retries=1)
    try:
        assert (await store.info(KEY)) is not None  # reads are served
        with pytest.raises(StoreUnavailable, match="read-only replica"):
            await restore_on(store)
    finally:
        await store.aclose()
        server.cli("REPLICAOF", "NO", "ONE")
