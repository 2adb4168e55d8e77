"""Resource leaks of a long-lived worker process: many session lifecycles, one after
another, in one process, on one shared store (or one store per job, as `resumable_job`
opens it), then what is still alive counted. A count that grows with the number of past
sessions is a leak. A job run in the worker's own process (LiveKit's THREAD executor)
ends, but nothing of it may stay.

Lifecycles that come out clean, checked when these were written (restore, turns,
checkpoint, pause, resume, suspend, end, aclose, LiveKit closing the session, a
takeover's `LeaseLost`, a store failing the final save, remote pause and suspend,
restores cancelled half-way, restore in place into one `AgentSession` thirty times, on
memory, SQLite and a real redis-server), are not repeated here.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, JobExecutorType

import livekit_resume as lr
from livekit_resume.agent_hooks import job as job_module
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.memory import MemoryStore
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import QUIET, REGISTRY, Clerk, Job, _sigterm_kept

__all__ = ["_sigterm_kept"]  # the fixture (autouse), shared with its module

BOUND = 15.0  # every lifecycle and every wait of this file ends within this


class Retired(Agent):
    """An agent of an earlier deploy: its snapshots name it, the job's registry no more."""

    def __init__(self) -> None:
        super().__init__(instructions="You were removed in the last deploy.")


EARLIER = lr.AgentRegistry()
EARLIER.register(Retired)


def _alive(refs: list[weakref.ref[Any]]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


# ------------------------------------------------- resumable_job in a worker's process


async def test_jobs_that_ended_are_not_kept_alive_by_the_policy_registry() -> None:
    """job.py keeps each job's `JobPolicy` in ``_policies``, a WeakKeyDictionary keyed by
    the `JobContext`, so that the entry goes when the job does. It never does: the value
    holds its key. The policy holds the `ResumableSession` (and its ``rejoin`` closure),
    whose ``on_lost`` closure holds ``ctx`` (``ctx.shutdown``); a WeakKeyDictionary's
    values are strong, so the context is reachable from the module for ever. Every job a
    worker ran in its process stays in memory: its JobContext, room, ResumableSession,
    AgentSession with the whole conversation, agent and models."""
    store = MemoryStore()
    contexts: list[weakref.ref[Any]] = []
    hooks: list[weakref.ref[Any]] = []
    sessions: list[weakref.ref[Any]] = []
    entries = len(job_module._policies)

    async def one_job(n: int) -> None:
        j = Job(f"room-{n}", executor=JobExecutorType.THREAD)
        session = make_text_session(ScriptedLLM(default="noted"))
        rs = await lr.resumable_job(
            j.ctx,
            session,
            registry=REGISTRY,
            default=Clerk,
            store=store,
            leave_grace=None,
            room_options=QUIET,
            debounce=0.01,
        )
        await session.run(user_input=f"my order number is {n}")
        await j.shut_down(session)
        assert rs.state == "closed"
        contexts.append(weakref.ref(j.ctx))
        hooks.append(weakref.ref(rs))
        sessions.append(weakref.ref(session))

    try:
        for n in range(20):
            await asyncio.wait_for(one_job(n), BOUND)
        counts = {
            "JobContext": _alive(contexts),
            "ResumableSession": _alive(hooks),
            "AgentSession": _alive(sessions),
            "_policies entries": len(job_module._policies) - entries,
        }
        # a constant is allowed (the last job, say); 20 jobs past must not all be here
        assert all(count <= 1 for count in counts.values()), (
            f"after 20 jobs ended and were dropped, still alive: {counts}"
        )
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_failed_resumable_job_closes_the_store_it_opened(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`resumable_job(store=None)` opens its own store (``RESUME_STORE``) and closes it in
    the shutdown callback it registers once the restore is done. A restore that fails
    before (an agent the deploy removed, `UnknownAgent`; a snapshot that no longer
    validates; a corrupt record; `SessionBusy`; the store blinking) raises out of
    resumable_job with the store still open and nobody left to close it: on SQLite its
    thread and file descriptors, on Redis its pool and subscriber connections, one set
    per failed job, for as long as the worker runs."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.db"
        server = None
    else:
        server = request.getfixturevalue("disposable_redis")
        url = server.url
    monkeypatch.setenv("RESUME_STORE", url)

    # the conversation an earlier deploy saved, with an agent this deploy removed
    store = lr.open_store(url)
    try:
        session = make_text_session(ScriptedLLM(default="noted"))
        rs = lr.ResumableSession(store, "caller-42", registry=EARLIER)
        await session.start(await rs.restore(session, default=Retired))
        await session.run(user_input="hello")
        await rs.suspend()
        await session.aclose()
    finally:
        await store.aclose()

    def held() -> int:
        if server is None:
            return sum(t.name.startswith("livekit-resume-sqlite") for t in threading.enumerate())
        return len(server.cli("CLIENT", "LIST").strip().splitlines())

    before = held()
    for n in range(8):
        j = Job(f"room-{n}", executor=JobExecutorType.THREAD)
        session = make_text_session(ScriptedLLM(default="noted"))
        with pytest.raises(lr.UnknownAgent):
            await asyncio.wait_for(
                lr.resumable_job(
                    j.ctx,
                    session,
                    registry=REGISTRY,
                    default=Clerk,
                    key="caller-42",
                    leave_grace=None,
                    room_options=QUIET,
                ),
                BOUND,
            )
        await j.shut_down(session)  # LiveKit ends the failed job: nothing left to close
    await asyncio.sleep(0.2)
    after = held()
    what = "SQLite store threads" if server is None else "Redis connections"
    assert after - before <= 1, f"{what}: {before} before 8 failed jobs, {after} after"


# --------------------------------------------------------------- stores after aclose


async def test_a_closed_redis_store_refuses_every_call_and_connects_no_more(
    disposable_redis: Any,
) -> None:
    """``RedisStore.aclose`` closed the client's pool, and the next call on the store
    made a new connection (redis-py reconnects on demand) and succeeded, a lease
    included, where the SQLite store refuses with `StoreUnavailable`. A closed store used
    again (a late callback of a job whose store was closed at its shutdown) held a
    connection nobody closes, and granted leases nobody renews or releases."""
    store = lr.open_store(disposable_redis.url, namespace=f"c{uuid.uuid4().hex[:8]}")
    lease = await store.acquire("k", "w1", ttl=10)
    await store.commit(Commit("k", lease.epoch, 0, b"h", [Record("h", "a", b"a")], 1))
    await store.aclose()

    def connections() -> int:
        return len(disposable_redis.cli("CLIENT", "LIST").strip().splitlines())

    before = connections()
    stale = Lease("k", "w1", lease.epoch, lease.expires_at)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "acquire": lambda: store.acquire("k2", "w1", ttl=10),
        "renew": lambda: store.renew(stale, ttl=10),
        "release": lambda: store.release(stale),
        "commit": lambda: store.commit(
            Commit("k", lease.epoch, 1, b"h", [Record("h", "b", b"b", "a")], 2)
        ),
        "load": lambda: store.load("k"),
        "info": lambda: store.info("k"),
        "versions": lambda: store.versions("k"),
        "keys": store.keys,
        "delete": lambda: store.delete("k"),
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            got = await asyncio.wait_for(call(), BOUND)
            outcomes[name] = f"answered {got!r}"
        except lr.StoreUnavailable as e:
            assert "closed" in str(e), e
        except lr.ResumeError as e:
            outcomes[name] = f"refused: {type(e).__name__}: {e}"
    opened = connections() - before
    await store.aclose()  # a second close is harmless
    assert not outcomes and opened == 0, (
        f"calls on a closed RedisStore: {outcomes}; {opened} new connection(s) to the server"
    )


# ------------------------------------------------------------------- memory store


async def test_the_memory_store_forgets_the_command_inboxes_of_ended_sessions() -> None:
    """memory_control.py: an inbox leaving takes itself out of ``_inboxes[key]`` and leaves
    the key with an empty set, for ever: one entry per session key the process ever
    listened on, even once the session is deleted or expired (`ttl`). The Redis and
    SQLite channels keep nothing per key once its last inbox left."""
    store = MemoryStore(ttl=60)
    try:
        for n in range(60):
            key = f"room-{n}-{uuid.uuid4().hex[:6]}"
            session = make_text_session(ScriptedLLM(default="noted"))
            rs = lr.ResumableSession(store, key, registry=REGISTRY, lease_ttl=10)
            await session.start(await rs.restore(session, default=Clerk))
            await session.run(user_input="hello")
            await asyncio.wait_for(rs.suspend(), BOUND)
            await session.aclose()
            assert await store.delete(key)
        kept = store._commands._inboxes
        assert len(kept) <= 1, (
            f"60 sessions listened, ended and were deleted: {len(kept)} keys still in the "
            f"command channel ({sum(map(len, kept.values()))} inboxes)"
        )
    finally:
        await store.aclose()
