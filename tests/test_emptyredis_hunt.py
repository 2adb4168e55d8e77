"""Hunt: a Redis that forgets, stalls, or comes back different, under a
live `ResumableSession` (a real `AgentSession` driven by the scripted LLM), on a real
``redis-server`` of the test alone that persists nothing (``--save "" --appendonly no``):
a restart brings it back empty, a ``SAVE`` then a restart brings it back older."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ToolCall
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_hooks import KEY, start

DEADLINE = 20.0


@pytest.fixture
def bare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, persisting nothing: a restart comes back empty."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def open_store(server: RedisServer, **kw: Any) -> Store:
    return lr.open_store(server.url, namespace=f"h{uuid.uuid4().hex[:8]}", **kw)


async def stored_texts(store: Store) -> list[str]:
    stored = await store.load(KEY)
    snap = Codec().decode_parts(KEY, stored.head, stored.streams, version=stored.version)
    return [
        " ".join(str(c) for c in item["content"])
        for item in snap.history
        if item["type"] == "message"
    ]


def live_texts(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in item.content)
        for item in session.history.items
        if item.type == "message"
    ]


async def settled(rs: lr.ResumableSession) -> None:
    await asyncio.wait_for(rs._autosave.idle.wait(), DEADLINE)


# ------------------------------------------------------------------------------------
# Rolled back under a live holder whose lease survived, nothing new to write


@pytest.mark.parametrize("how", ["aclose", "checkpoint", "aclose_autosave", "renewal"])
async def test_a_rollback_under_a_holder_with_nothing_new_is_not_taken_for_saved(
    bare_redis: RedisServer, how: str
) -> None:
    """The server comes back from an RDB taken one turn ago (a restore from backup, a
    failover to a lagging replica), the holder's lease and epoch in it. The holder has
    nothing new since its last commit and closes (the job ends: ``aclose()``, with
    autosave on or off), calls ``checkpoint()`` to make sure it is stored, or only
    renews its lease (autosave): the save
    finds nothing to draft and only *renews* the lease, which renew.lua grants (same
    epoch and owner) without looking at the version; ``aclose`` then releases the lease,
    ``checkpoint`` returns the version the store no longer holds. (Autosave's own
    renewals are granted the same way, so nothing notices until a next turn.) The store
    is left at the older version: the last turn is lost, and a restore elsewhere resumes
    the conversation without it.

    Expected (docs/failure-model.md, "Redis rolled back under a live holder"): the holder
    finds the store went back ("the head behind the version it committed") and writes the
    whole conversation on top; "what is lost: nothing the live worker holds". And the
    row "checkpoint() of a worker taken over, with nothing new since its last commit":
    a save that finds nothing new asks the store rather than answering from memory, so
    that a worker is never told a version is the store's latest when it is not."""
    store = open_store(bare_redis)
    autosave = how in ("aclose_autosave", "renewal")
    kw: dict[str, Any] = {"lease_ttl": 1.5} if how == "renewal" else {}
    session, rs, _ = await start(store, ["one", "two", "three"], autosave=autosave, **kw)
    await session.run(user_input="a")
    await rs.checkpoint()
    if autosave:
        await settled(rs)
    bare_redis.cli("save")  # the backup: version 1, rs's lease and epoch in it
    await session.run(user_input="b")
    latest = await rs.checkpoint()
    if autosave:
        await settled(rs)
        latest = rs.version
    held = live_texts(session)
    bare_redis.kill()
    bare_redis.start()  # same port, loads the RDB taken after turn a
    assert (await store.load(KEY)).version < latest
    try:
        if how.startswith("aclose"):
            await rs.aclose()
        elif how == "checkpoint":
            await rs.checkpoint()
        else:  # autosave's next renewal (every 0.5 s) finds the store went back
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while (await store.load(KEY)).version < latest:
                assert loop.time() < deadline, "the renewals never noticed the rollback"
                await asyncio.sleep(0.05)
            await settled(rs)
        assert await stored_texts(store) == held, (
            f"{how}() returned as saved, but the store still holds the rolled-back "
            f"version {(await store.load(KEY)).version} without the last turn"
        )
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()


# ------------------------------------------------------------------------------------
# coverage: restarted empty, nothing new said: the whole conversation comes back


@pytest.mark.parametrize("how", ["aclose", "renewal"])
async def test_restarted_empty_with_no_new_turn_the_conversation_is_written_back_whole(
    bare_redis: RedisServer, how: str
) -> None:
    """passes: coverage. Redis restarts without its data and the caller says nothing
    more: the job's close (autosave off) or autosave's next lease renewal (autosave on,
    lease_ttl 1.5 s) finds the session vanished, acquires it again and writes it whole
    (userdata set by a tool included); another worker then restores all of it
    (docs/failure-model.md, "Redis restarted without its data": nothing the live worker
    holds is lost). The existing tests bring it back with a new turn only."""
    store = open_store(bare_redis)
    autosave = how == "renewal"
    kw: dict[str, Any] = {"lease_ttl": 1.5} if autosave else {}
    session, rs, _ = await start(
        store,
        ["hello", [ToolCall("book", {"day": "monday"})], "booked"],
        autosave=autosave,
        **kw,
    )
    await session.run(user_input="hi")
    await session.run(user_input="book monday")
    if autosave:
        await settled(rs)
    else:
        await rs.checkpoint()
    held = live_texts(session)
    bare_redis.kill()
    bare_redis.start()  # same port, empty
    try:
        if how == "aclose":
            await rs.aclose()
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while True:
                try:
                    await store.load(KEY)
                    break
                except lr.SnapshotNotFound:
                    assert loop.time() < deadline, "never written back"
                    await asyncio.sleep(0.05)
            await settled(rs)
            await rs.aclose()
        assert await stored_texts(store) == held
        s2, rs2, _ = await start(store, ["again"], owner="w2")
        assert rs2.resumed and s2.userdata.day == "monday"
        assert live_texts(s2) == held
        await rs2.aclose()
        await s2.aclose()
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
