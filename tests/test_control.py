"""Remote control of live sessions (issue 16): `lr.control(store)` and the CLI verbs send
pause, resume and suspend through the store to the worker that holds the lease.

In-process tests run one conformance set over every store (memory, SQLite, fakeredis, a
real redis-server, a real Redis Cluster). The cross-process tests run the owner in a
real LiveKit job process (``tests.lk.jobs``) with a whole voice pipeline and control it
from this process, through the command line and the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, JobContext

import livekit_resume as lr
from livekit_resume.stores.base import Command, CommandReply, Controllable, Store
from livekit_resume.testing.poll import eventually
from tests.conftest import StoreFactory
from tests.lk import jobs, make_voice_session, voice_fakes
from tests.lk.jobs import JobHarness, RunningJob
from tests.lk.scripted_llm import ScriptedLLM, make_text_session

KEY = "call-7"
# Bounds a command that should be refused at once: far above any answer, so a test
# that waits for it instead of refusing fails instead of passing slowly.
NEVER = 600.0


class Clerk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")


REGISTRY = lr.AgentRegistry()
REGISTRY.register(Clerk)


@pytest.fixture
async def sessions() -> AsyncIterator[list[AgentSession[Any]]]:
    made: list[AgentSession[Any]] = []
    yield made
    for s in made:
        await s.aclose()


async def live(
    store: Store, sessions: list[AgentSession[Any]], *, owner: str = "w1", takeover: bool = False
) -> lr.ResumableSession:
    """A started text session under KEY whose owner listens for commands."""
    session = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, owner=owner, autosave=False)
    await session.start(await rs.restore(session, default=Clerk, takeover=takeover))
    await asyncio.wait_for(rs._control.listening.wait(), 10)
    await session.run(user_input="remember the blue door")
    await rs.checkpoint()
    return rs


# ------------------------------------------------------------ over every store


async def test_pause_resume_suspend_round_trip(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    rs = await live(store, sessions)
    remote = lr.control(store)

    version = await remote.pause(KEY)
    assert rs.state == "paused" and version == rs.version
    assert (await store.load(KEY)).info["state"] == "paused"
    assert await remote.pause(KEY) == version  # sent again after a lost answer: no change

    assert await remote.resume(KEY) == rs.version
    assert rs.state == "active"

    suspended = await remote.suspend(KEY)
    assert rs.state == "suspended" and suspended == rs.version
    info = await store.info(KEY)
    assert info is not None and info.owner is None  # the lease is given up
    assert (await store.load(KEY)).info["state"] == "suspended"


async def test_a_session_without_a_live_owner_is_refused_at_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    remote = lr.control(store)
    with pytest.raises(lr.CommandRefused, match="no such session"):
        await asyncio.wait_for(remote.pause("nobody", timeout=NEVER), 30)

    rs = await live(store, sessions)
    await rs.suspend()
    with pytest.raises(lr.CommandRefused, match=r"no live owner.*suspended") as e:
        await asyncio.wait_for(remote.resume(KEY, timeout=NEVER), 30)
    assert e.value.key == KEY and e.value.command == "resume"
    assert "resume of session 'call-7' refused" in str(e.value)


async def test_a_command_aimed_at_an_older_epoch_is_refused(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    old = await live(store, sessions, owner="w1")
    aimed = old._holder.epoch
    new = await live(store, sessions, owner="w2", takeover=True)
    assert new._holder.epoch > aimed
    remote = lr.control(store)

    with pytest.raises(lr.CommandRefused, match=rf"aimed at epoch {aimed}, .* \(taken over\)"):
        await asyncio.wait_for(remote.pause(KEY, epoch=aimed, timeout=NEVER), 30)
    assert old.state == new.state == "active"

    # the current epoch reaches the worker that took over, never the one it fenced
    await remote.pause(KEY)
    assert new.state == "paused" and old.state == "active"


async def test_the_owner_refuses_a_command_for_an_epoch_it_left(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """The sender checks the epoch before sending; the owner checks again on arrival,
    for a takeover that lands in between."""
    rs = await live(store, sessions)
    assert isinstance(store, Controllable)
    channel = store.commands()
    stale = Command(uuid.uuid4().hex, KEY, "pause", rs._holder.epoch - 1)
    await channel.send(stale)

    async def answered() -> bool:
        return (await channel.reply(stale)).status == "refused"

    await eventually(answered, "the owner refused the stale command")
    assert "(taken over)" in (await channel.reply(stale)).reason
    assert rs.state == "active"


async def test_an_owner_that_does_not_answer_is_refused_and_the_command_withdrawn(
    store: Store,
) -> None:
    """A live lease whose holder does not listen (a worker without the hooks, or a
    process gone): refused at once where the transport counts listeners (memory, Redis),
    after the timeout where it cannot (SQLite); never applied later either way."""
    await store.acquire(KEY, "silent-worker")
    remote = lr.control(store)
    with pytest.raises(lr.CommandRefused, match="silent-worker") as e:
        await asyncio.wait_for(remote.pause(KEY, timeout=0.3), 30)
    assert "not listening" in e.value.reason or "did not answer within 0.3 s" in e.value.reason


async def test_a_command_is_claimed_once_or_withdrawn_never_both(store: Store) -> None:
    assert isinstance(store, Controllable)
    channel = store.commands()
    taken = Command(uuid.uuid4().hex, KEY, "pause", 1)
    await channel.send(taken)
    assert (await channel.reply(taken)).status == "pending"
    assert await channel.claim(taken)
    assert not await channel.claim(taken) and not await channel.withdraw(taken)
    await channel.answer(taken, CommandReply("done", 7))
    assert await channel.reply(taken) == CommandReply("done", 7)

    given_up = Command(uuid.uuid4().hex, KEY, "resume", 1)
    await channel.send(given_up)
    assert await channel.withdraw(given_up)
    assert not await channel.claim(given_up)
    assert (await channel.reply(given_up)).status == "withdrawn"


async def test_an_inbox_hears_only_its_key_from_the_moment_it_is_active(store: Store) -> None:
    assert isinstance(store, Controllable)
    channel = store.commands()
    before = Command(uuid.uuid4().hex, KEY, "pause", 1)
    await channel.send(before)
    async with channel.inbox(KEY) as inbox:
        assert await channel.send(Command(uuid.uuid4().hex, "other", "pause", 1)) in (0, None)
        mine = Command(uuid.uuid4().hex, KEY, "suspend", 3)
        assert await channel.send(mine) in (1, None)
        assert await asyncio.wait_for(anext(inbox), 10) == mine


async def test_bad_arguments_are_value_errors(store: Store) -> None:
    remote = lr.control(store)
    with pytest.raises(ValueError, match="timeout"):
        await remote.pause(KEY, timeout=0)
    with pytest.raises(ValueError, match="unknown command"):
        await remote.send("explode", KEY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="session key"):
        await remote.pause("")
