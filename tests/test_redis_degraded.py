"""A live session on a standalone Redis that refuses or holds its writes for a while, or
drops its connections: what failure-model.md promises of autosave (retried, every turn
stored once, versions in step) and control.md of the command inbox. Real
``redis-server`` processes of each test alone (``make_redis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as sync_redis
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests.redis_servers import RedisFactory
from tests.test_autosave_adversarial import live_texts, stored_texts
from tests.test_hooks import KEY as HOOKS_KEY
from tests.test_hooks import Visit, start


@contextlib.asynccontextmanager
async def live_session(
    url: str, script: list[str], **store_options: Any
) -> AsyncIterator[tuple[Store, AgentSession[Visit], lr.ResumableSession]]:
    """A store of a namespace of its own on ``url`` and a started session on it with
    autosave, each closed at the end."""
    store = lr.open_store(url, namespace=f"h{os.urandom(4).hex()}", **store_options)
    try:
        session, rs, _ = await start(store, script, autosave=True)
        try:
            yield store, session, rs
        finally:
            await rs.aclose()
            await session.aclose()
    finally:
        await store.aclose()


async def test_writes_refused_for_want_of_replicas_are_retried_and_every_turn_lands_once(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``min-replicas-to-write 1`` with no replica: every script write is refused
    (NOREPLICAS). failure-model.md "store unreachable": autosave retries, the voice loop
    never sees it, the latest state is written once the store takes writes again; the
    versions stay consecutive (nothing written twice or lost)."""
    server = make_redis()
    async with live_session(server.url, ["one", "two", "three"]) as (store, session, rs):
        await session.run(user_input="a")
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        before = rs.version
        caplog.set_level(logging.WARNING, logger="livekit_resume")
        server.cli("CONFIG", "SET", "min-replicas-to-write", "1")
        await session.run(user_input="b")  # answered while every write is refused
        await asyncio.sleep(0.5)
        assert any("NOREPLICAS" in r.getMessage() for r in caplog.records)
        assert (await store.load(HOOKS_KEY)).version == before  # nothing written meanwhile
        server.cli("CONFIG", "SET", "min-replicas-to-write", "0")
        await session.run(user_input="c")
        await asyncio.wait_for(rs._autosave.idle.wait(), 20)
        assert rs._autosave.lost is None
        assert await stored_texts(store) == live_texts(session)
        versions = [v.version for v in await store.versions(HOOKS_KEY)]
        assert versions == list(range(versions[0], versions[-1] + 1)) and versions[-1] == rs.version


async def test_writes_paused_past_the_socket_timeout_land_each_commit_once(
    make_redis: RedisFactory,
) -> None:
    """``CLIENT PAUSE <ms> WRITE`` longer than the client's socket timeout (a failover
    manoeuvre): reads are served, writes hang. failure-model.md "store stalls past the
    client timeout": the commit is sent again with its id, lands once, autosave goes on."""
    server = make_redis()
    async with live_session(server.url, ["one", "two", "three"], socket_timeout=0.3, retries=1) as (
        store,
        session,
        rs,
    ):
        await session.run(user_input="a")
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        server.cli("CLIENT", "PAUSE", "2000", "WRITE")
        await session.run(user_input="b")
        await asyncio.sleep(2.5)
        await session.run(user_input="c")
        await asyncio.wait_for(rs._autosave.idle.wait(), 20)
        assert rs._autosave.lost is None and rs._autosave.failures >= 1
        assert await stored_texts(store) == live_texts(session)
        versions = [v.version for v in await store.versions(HOOKS_KEY)]
        assert versions == list(range(1, rs.version + 1))


async def test_the_command_inbox_hears_commands_after_its_connection_is_killed(
    make_redis: RedisFactory,
) -> None:
    """``CLIENT KILL TYPE pubsub`` on a standalone server (an operator, a proxy): the
    owner's command inbox listens again, so a remote pause sent afterwards is applied
    (control.md; the existing tests cover a Cluster failover and a reader's own error)."""
    server = make_redis()
    async with live_session(server.url, ["one", "two"], socket_timeout=1) as (store, session, rs):
        sender = lr.open_store(server.url, namespace=store.namespace)  # type: ignore[attr-defined]
        try:
            await session.run(user_input="a")
            await asyncio.wait_for(rs._autosave.idle.wait(), 10)
            assert server.cli("CLIENT", "KILL", "TYPE", "pubsub").strip() == "1"
            await asyncio.sleep(0.3)
            assert await lr.control(sender).pause(HOOKS_KEY, timeout=5) >= 1
            assert rs.state == "paused"
        finally:
            await sender.aclose()


async def test_a_password_changed_under_a_live_session_is_unavailable_then_saves_again(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``CONFIG SET requirepass`` changed while a session runs, its connections dropped:
    autosave fails with a `StoreUnavailable` naming the credentials (no hang), and once
    the password is right again the latest state is written, nothing lost."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    server = make_redis("--requirepass", "pw1")
    url = f"redis://:pw1@127.0.0.1:{server.port}/0"
    async with live_session(url, ["one", "two", "three"], socket_timeout=1.0) as (
        store,
        session,
        rs,
    ):
        await session.run(user_input="a")
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        sync_redis.Redis(port=server.port, password="pw1").config_set("requirepass", "pw2")
        admin = sync_redis.Redis(port=server.port, password="pw2")
        admin.client_kill_filter(_type="normal", skipme=True)
        await session.run(user_input="b")
        await asyncio.sleep(1.0)
        assert rs._autosave.failures >= 1
        assert any(
            "StoreUnavailable" in r.getMessage() and "username-password" in r.getMessage()
            for r in caplog.records
        )
        admin.config_set("requirepass", "pw1")
        await session.run(user_input="c")
        await asyncio.wait_for(rs._autosave.idle.wait(), 30)
        assert rs._autosave.lost is None
        assert await stored_texts(store) == live_texts(session)
