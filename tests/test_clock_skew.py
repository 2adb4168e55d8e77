"""Clock skew: a worker, an operator's host or a Cluster node whose clock runs ahead of
or behind the clock that wrote a session's times (Redis: its server's ``TIME``) reads
them by the store's clock, not its own.

Clock skew between a worker and Redis is simulated by replacing the ``time`` module the
code under test reads its wall clock from (only that module's view: the Redis server
keeps its real clock, as it would on another machine). Every test uses a real
``redis-server`` the tests start (``redis_server`` fixture, never port 6379) and, where
a session is needed, real `AgentSession`s with the scripted LLM.
"""

from __future__ import annotations

import asyncio
import base64
import time
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from livekit.agents import Agent

import livekit_resume as lr
from livekit_resume import tokens as tokens_module
from livekit_resume.agent_hooks import job as job_module
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import Job, _sigterm_kept, run_job

__all__ = ["_sigterm_kept"]  # the fixture (autouse), shared with its module

DEADLINE = 5.0
SKEW = 120.0  # seconds between a worker's wall clock and Redis's


def _skewed_time(offset: float) -> Any:
    """A stand-in for the ``time`` module whose wall clock runs ``offset`` seconds off
    the real one (monotonic and the rest unchanged): a worker host whose NTP drifted."""
    real = time.time
    fake = types.SimpleNamespace(
        **{n: getattr(time, n) for n in dir(time) if not n.startswith("__")}
    )
    fake.time = lambda: real() + offset
    return fake


@pytest.fixture
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    from tests.redis_servers import build_redis_store

    store: Store = await build_redis_store(
        "redis", request, namespace=f"hunt{uuid.uuid4().hex[:10]}"
    )
    yield store
    await store.aclose()


async def _a_call_that_just_ended(store: Store, key: str) -> lr.ResumableSession:
    """A caller's call in a job of its own: one turn, then the caller hangs up and the
    job ends (its shutdown closes the session: final save, lease released). Seconds ago
    by every clock."""
    j = Job(key)
    session = make_text_session(ScriptedLLM(default="noted"))
    try:
        rs = await asyncio.wait_for(run_job(j, session, store), DEADLINE)
        await asyncio.wait_for(session.run(user_input="my order number is 4711"), DEADLINE)
        await asyncio.wait_for(rs.aclose(), DEADLINE)
        return rs
    finally:
        await session.aclose()


async def test_resume_within_keeps_a_call_saved_seconds_ago_on_a_worker_clock_ahead_of_redis(
    redis_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/lifecycle.md, hang-up and call back: "With `resume_within`, a conversation
    last saved too long ago is not resumed"; docs/failure-model.md, Clocks: "Redis leases
    use the server's clock, so workers with skewed clocks agree."

    The caller hangs up and calls back at once (a new room, the same key): the new job
    runs on a worker whose wall clock is 2 minutes ahead of Redis's. `archive_stale`
    takes the conversation's age as *this worker's* ``time.time()`` minus the head's
    ``touched`` (written by Redis's ``TIME``), so a conversation saved a second ago is
    "120 s old", over ``resume_within=60``: it is archived and the caller starts afresh,
    the agent greeting them as a stranger."""
    key = f"caller-{uuid.uuid4().hex[:6]}"
    first = await _a_call_that_just_ended(redis_store, key)
    assert first.version >= 1

    monkeypatch.setattr(job_module, "time", _skewed_time(+SKEW))  # the second worker's clock
    j = Job(key)
    session = make_text_session(ScriptedLLM(default="noted"))
    try:
        rs = await asyncio.wait_for(run_job(j, session, redis_store, resume_within=60), DEADLINE)
        archived = [k for k in await redis_store.keys() if k.startswith(f"{key}~")]
        assert rs.resumed and not archived, (
            f"a conversation saved moments ago was archived as stale ({archived}) because "
            f"this worker's clock runs {SKEW:.0f}s ahead of Redis's"
        )
        await rs.aclose()
    finally:
        await session.aclose()


async def test_resume_within_archives_a_stale_call_on_a_worker_clock_behind_redis(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the test above: the conversation was last saved 90 s ago by
    Redis's clock (a store given a clock 90 s back plays the server as it was then);
    the next call, ``resume_within=60``, lands on a worker 2 minutes behind Redis. The
    age it computes is -30 s, so a conversation over ``resume_within`` is resumed."""
    from tests.redis_servers import build_redis_store

    ns = f"hunt{uuid.uuid4().hex[:10]}"
    then = await build_redis_store("redis", request, namespace=ns, clock=lambda: time.time() - 90)
    key = f"caller-{uuid.uuid4().hex[:6]}"
    try:
        await _a_call_that_just_ended(then, key)
    finally:
        await then.aclose()

    now = await build_redis_store("redis", request, namespace=ns)  # Redis's own TIME
    try:
        info = await now.info(key)
        assert info is not None and info.owner is None
        monkeypatch.setattr(job_module, "time", _skewed_time(-SKEW))
        j = Job(key)
        session = make_text_session(ScriptedLLM(default="noted"))
        try:
            rs = await asyncio.wait_for(run_job(j, session, now, resume_within=60), DEADLINE)
            assert not rs.resumed, (
                "a conversation last saved 90 s ago (Redis's clock) was resumed with "
                f"resume_within=60, as this worker's clock runs {SKEW:.0f}s behind Redis's"
            )
            await rs.aclose()
        finally:
            await session.aclose()
    finally:
        await now.aclose()


def test_ls_counts_a_live_lease_down_by_the_stores_clock_not_the_operators(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/cli.md, ``ls``: "The lease holder and its countdown are the store's word, by
    the store's clock (Redis's `TIME`), not this host's". A worker holds a 60 s lease it
    just took; the operator's host runs 75 s ahead of Redis (or behind). The holder is
    shown (the store says the lease is live), but its countdown is Redis's expiry minus
    *this host's* ``time.time()``: "0s left" for a lease with a minute to go (and, behind,
    more seconds left than the lease was ever granted)."""
    import json

    from typer.testing import CliRunner

    from livekit_resume.cli import app
    from livekit_resume.cli import read as cli_read

    ns = f"hunt{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("RESUME_NAMESPACE", ns)
    url = str(redis_server.url)
    key = f"room-{uuid.uuid4().hex[:6]}"

    async def hold() -> None:
        store = lr.open_store(url)
        try:
            await store.acquire(key, "w-live", ttl=60)
        finally:
            await store.aclose()

    asyncio.run(hold())
    shown: dict[float, Any] = {}
    for offset in (+75.0, -75.0):
        monkeypatch.setattr(cli_read, "time", _skewed_time(offset))
        result = CliRunner().invoke(app, ["--store", url, "--json", "ls"])
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.stdout)
        assert row["owner"] == "w-live", row
        shown[offset] = row["lease_expires_in"]
    assert all(30 < left <= 60 for left in shown.values()), (
        f"a 60 s lease taken just now counts down {shown} (operator's clock +75 s / -75 s "
        "off Redis's): the countdown is by this host's clock, not the store's"
    )


async def test_a_cluster_lists_a_live_session_whatever_the_clock_of_the_index_node(
    request: pytest.FixtureRequest,
) -> None:
    """`RedisStore.keys`: "Each member is checked against its head here, so deleted and
    expired sessions never show"; docs/failure-model.md: "Redis leases use the server's
    clock". On a Cluster a session's head lives on its slot's node and is written (and
    expired, PEXPIRE) by that node's clock; `Namespace._live` checks ``touched + ttl``
    against the ``TIME`` of the *index's* node, another machine. That node 2 minutes
    ahead hides from ``keys()`` / ``ls`` a session its own node still holds (written 4
    minutes ago, ``ttl`` 5 minutes: a minute to live); behind, it lists sessions gone.

    The session's node as it was 4 minutes ago is played by a store given that clock;
    the index node's clock by the lister's client answering ``TIME`` 120 s ahead."""
    from tests.redis_servers import build_redis_store

    ns = f"hunt{uuid.uuid4().hex[:10]}"
    lister: Any = await build_redis_store("redis_cluster", request, namespace=ns, ttl=300)
    try:
        assert await lister.keys() == []  # connected: the client knows the slots' nodes
        client = lister._server.client
        index_node = client.get_node_from_key(lister._names.index)
        key = next(  # a session on another node than the index's
            k
            for k in (f"room-{uuid.uuid4().hex[:6]}" for _ in range(1000))
            if client.get_node_from_key(lister._names.head(k)) != index_node
        )
        then = await build_redis_store(
            "redis_cluster", request, namespace=ns, ttl=300, clock=lambda: time.time() - 240
        )
        try:
            lease = await then.acquire(key, "w-live", ttl=60)
            await then.release(lease)
        finally:
            await then.aclose()
        assert await lister.info(key) is not None  # its node holds it: a live session
        real_time = client.time

        async def index_node_ahead(*args: Any, **kwargs: Any) -> Any:
            sec, usec = await real_time(*args, **kwargs)
            ahead = kwargs.get("target_nodes") == index_node
            return int(sec) + (int(SKEW) if ahead else 0), usec

        client.time = index_node_ahead
        listed = await lister.keys()
        assert key in listed, (
            f"a session its node holds (1 minute left of its ttl) is not listed, as the "
            f"index's node runs {SKEW:.0f}s ahead of the session's: {listed}"
        )
    finally:
        await lister.aclose()


TOKEN_KEYS = "c1:" + base64.b64encode(b"c" * 32).decode()


class Desk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")


async def _suspended_conversation(store: Store, key: str) -> None:
    session = make_text_session(ScriptedLLM(["noted"]))
    reg = lr.AgentRegistry()
    reg.register(Desk)
    rs = lr.ResumableSession(store, key, registry=reg, autosave=False)
    await session.start(await rs.restore(session, default=Desk))
    await session.run(user_input="remember the blue door")
    await rs.suspend()
    await session.aclose()


async def test_a_token_issued_on_a_worker_clock_behind_redis_is_not_born_expired(
    redis_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's expiry was the issuing host's clock plus its ttl, checked against the
    verifying host's clock: a back end 2 minutes behind issued 60 s tokens already
    expired, and the caller who came back got a fresh call. Both sides now read the
    store's clock (`SessionInfo.read_at`), as leases do."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", TOKEN_KEYS)
    key = f"call-{uuid.uuid4().hex[:8]}"
    await _suspended_conversation(redis_store, key)
    monkeypatch.setattr(tokens_module, "time", _skewed_time(-SKEW))  # the issuer's clock
    token = await lr.issue_token(redis_store, key, ttl=60)
    monkeypatch.setattr(tokens_module, "time", time)  # the verifier's, right
    assert await lr.verify_token(redis_store, token) == key


async def test_an_expired_token_is_refused_on_a_worker_clock_behind_redis(
    redis_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: a verifier 2 minutes behind accepted a token expired by
    every other clock for 2 minutes more."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", TOKEN_KEYS)
    key = f"call-{uuid.uuid4().hex[:8]}"
    await _suspended_conversation(redis_store, key)
    token = await lr.issue_token(redis_store, key, ttl=0.2)
    await asyncio.sleep(0.5)
    monkeypatch.setattr(tokens_module, "time", _skewed_time(-SKEW))  # the verifier's clock
    with pytest.raises(lr.TokenRefused, match="expired"):
        await lr.verify_token(redis_store, token)
