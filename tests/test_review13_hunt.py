"""Hunt review13: LiveKit closes the session on errors (`CloseReason.ERROR`) while the
Redis store is down (frozen by SIGSTOP, or killed): `ResumableSession._aclose_on_error`
runs `_aclose("suspended")`, whose final save fails after `CLOSE_SAVE_BUDGET` and whose
release may fail too. Real `AgentSession`s (text mode) on a failing scripted LLM, a real
``redis-server`` of each test's own. Each test says what a user or operator expects; one
that fails on the current code is a finding.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.voice.events import CloseEvent, CloseReason

import livekit_resume as lr
from livekit_resume.agent_hooks import autosave
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests._llmfail_llm import Fail, FailingLLM
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_llmfail_hunt import CONN, WAIT, Desk, convo, load, registry, say

LOST: dict[str, list[Exception]] = {}  # on_lost's calls, by key
TTL = 0.6  # the lease's: a new worker may take the session over once it lapsed


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone; what it acknowledged survives a SIGKILL."""
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
    s = RedisStore.from_url(
        server.url, namespace=f"r13{uuid.uuid4().hex[:6]}", socket_timeout=0.3, retries=1
    )
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture(autouse=True)
def short_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autosave, "CLOSE_SAVE_BUDGET", 0.6)
    monkeypatch.setattr(autosave, "CLOSE_RELEASE_WAIT", 0.3)


@pytest.fixture
def key() -> str:
    return f"room-r13-{uuid.uuid4().hex[:8]}"


async def _true(v: bool) -> bool:
    return v


async def error_close_with_store_down(
    server: RedisServer, store: RedisStore, key: str, how: str
) -> tuple[AgentSession[Any], lr.ResumableSession, FailingLLM, list[tuple[Any, ...]]]:
    """One acknowledged turn, then the store goes down (``how``: pause or kill), the
    provider fails four turns in a row and LiveKit closes the session (ERROR); the hooks'
    close runs against the dead store. Returns once the hooks gave up; the store is back.
    Also what the store had acknowledged (the conversation before the outage)."""
    model = FailingLLM(["hi, how can I help?"], default=Fail())
    session = make_text_session(model, conn_options=CONN)
    rs = lr.ResumableSession(
        store,
        key,
        registry=registry(),
        owner="w1",
        debounce=0.01,
        lease_ttl=TTL,
        on_lost=partial(_append, LOST.setdefault(key, [])),
    )
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    closes: list[CloseEvent] = []
    session.on("close", closes.append)
    assert await say(session, "hello") is None
    await asyncio.wait_for(rs.checkpoint(), WAIT)
    acked = convo(session.history.items)
    if how == "pause":
        server.pause()
    else:
        server.kill()
    try:
        for text in ("a", "b", "c", "d"):
            await say(session, text)
        await eventually(lambda: _true(bool(closes)), "LiveKit closed the session", WAIT)
        assert closes[0].reason == CloseReason.ERROR
        await eventually(
            lambda: _true(
                rs.state == "closed" or (rs.state == "suspended" and rs._closing is None)
            ),
            "the hooks' error close ended",
            WAIT,
        )
    finally:
        if how == "pause":
            server.resume()
        else:
            server.start()
    return session, rs, model, acked


@pytest.mark.parametrize("how", ["pause", "kill"])
async def test_an_error_close_on_a_dead_store_leaves_the_session_resumable_in_place(
    server: RedisServer, store: RedisStore, key: str, how: str
) -> None:
    """LiveKit closes the session on provider errors while Redis is down: the final save
    and the release fail. The job stays in the room, so the hooks give the session up as
    a suspend (rs.state "suspended") for `resumable_job` to restore in place when the
    caller is back. Once the store and the provider are back, that restore in place (same
    rs, same owner, same AgentSession) must succeed, hold every turn the store
    acknowledged, and go on saving: the next turn stored, no lease lost. The caller comes
    back after the lease the failed release left has lapsed (a lease lasts 30 s by
    default: a caller back after a minute)."""
    session, rs, model, acked = await error_close_with_store_down(server, store, key, how)
    await asyncio.sleep(TTL * 1.5)  # the lease the failed release left lapses
    assert rs.state == "suspended", f"the hooks left rs {rs.state}"
    lost = LOST[key]
    session.history.items.clear()
    model.push("welcome back")
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    restored = convo(session.history.items)
    assert restored[: len(acked)] == acked, restored
    assert await say(session, "are you back?") is None
    await asyncio.wait_for(rs.checkpoint(), WAIT)
    assert not lost, f"the restored session lost its lease: {lost}"
    assert rs.state in ("active",), rs.state
    live = convo(session.history.items)
    snap = await load(store, key)
    stored = convo_of_snapshot(snap)
    assert stored == live, f"stored {stored}\nlive   {live}"
    await asyncio.wait_for(rs.aclose(), WAIT)
    await asyncio.wait_for(session.aclose(), WAIT)


@pytest.mark.parametrize("how", ["pause", "kill"])
async def test_an_error_close_on_a_dead_store_is_resumed_by_another_worker(
    server: RedisServer, store: RedisStore, key: str, how: str
) -> None:
    """Same outage; the caller comes back through another worker once the lease lapsed.
    It must resume (not start afresh), with every turn the store acknowledged."""
    session, _, _, acked = await error_close_with_store_down(server, store, key, how)
    await asyncio.sleep(TTL * 1.5)  # the lease the failed release left lapses
    model = ScriptedLLM(default="welcome back")
    s2 = make_text_session(model, conn_options=CONN)
    rs2 = lr.ResumableSession(store, key, registry=registry(), owner="w2", debounce=0.01)
    agent = await asyncio.wait_for(rs2.restore(s2, default=Desk), WAIT)
    await asyncio.wait_for(s2.start(agent), WAIT)
    assert rs2.resumed
    restored = convo(s2.history.items)
    assert restored[: len(acked)] == acked, restored
    assert await say(s2, "are you back?") is None
    await asyncio.wait_for(rs2.checkpoint(), WAIT)
    snap = await load(store, key)
    assert convo_of_snapshot(snap) == convo(s2.history.items)
    await asyncio.wait_for(rs2.aclose(), WAIT)
    await asyncio.wait_for(s2.aclose(), WAIT)
    await session.aclose()


async def _append(out: list[Exception], e: Exception) -> None:
    out.append(e)


def convo_of_snapshot(snap: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in snap.history:
        t = i.get("type")
        if t == "message" and i.get("role") in ("user", "assistant"):
            text = "\n".join(c for c in i.get("content", []) if isinstance(c, str))
            out.append((i["role"], text, bool(i.get("interrupted", False))))
        elif t == "function_call":
            out.append(("call", i.get("call_id"), i.get("name")))
        elif t == "function_call_output":
            out.append(("output", i.get("call_id"), i.get("output"), i.get("is_error")))
    return out


# ------------------------------------------- schema.md: bodies an earlier rm left


ACL_LINE = (  # docs/security.md, "Redis: the minimal ACL", with {ns} for acme
    "on >LONG-RANDOM-PASSWORD resetkeys ~{ns}:* resetchannels &{ns}:* -@all +evalsha "
    "+script|load +time +scan +ping +zadd +zrem +zscore +zrange +zremrangebyscore +hget "
    "+hgetall +hmget +hset +hdel +del +type +exists +llen +lrange +rpush +get +set +append "
    "+strlen +persist +pexpire +pttl +publish +subscribe +unsubscribe +wait +select"
)


async def test_eviction_remains_are_reported_not_wiped_on_a_server_that_hides_its_config(
    make_redis: Any,
) -> None:
    """store.py `_clear_bodies`: bodies alone are cleared only "on a server that evicts
    no key"; "on a server that may evict (or whose policy could not be read) they may be
    what an eviction left of a conversation: reported, not cleared". A managed Redis
    often hides ``CONFIG`` (security.md's minimal ACL has none); its policy cannot be
    read, and it may evict (allkeys-lru here). A conversation written there whose head,
    records and log were evicted, leaving its bodies, must be reported
    (`SnapshotCorrupt`, as for any eviction), not wiped and started anew with a
    warning blaming an earlier release's delete."""
    import redis

    from livekit_resume.errors import SnapshotCorrupt
    from tests.test_review9_hunt import Helper, _converse, _session_names
    from tests.test_review9_hunt import registry as helper_registry

    server = make_redis("--maxmemory", "200mb", "--maxmemory-policy", "allkeys-lru")
    ns = f"r13{uuid.uuid4().hex[:6]}"
    raw = redis.Redis(port=server.port)
    raw.execute_command("ACL", "SETUSER", "tenant", *ACL_LINE.format(ns=ns).split())  # type: ignore[no-untyped-call]
    url = f"redis://tenant:LONG-RANDOM-PASSWORD@127.0.0.1:{server.port}/0"
    store: Any = lr.open_store(url, namespace=ns)
    key = f"room-r13-{uuid.uuid4().hex[:8]}"
    try:
        await _converse(store, key, ["first life"])
        assert await store.delete(key)  # an rm this morning: a tombstone for a day
        await _converse(store, key, ["second life", "more of it"])
        names = _session_names(raw, ns, key)
        raw.delete(*[n for n in names if not n.endswith(":b")])  # evicted
        assert _session_names(raw, ns, key)
        session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs = lr.ResumableSession(store, key, registry=helper_registry(), autosave=False)
        try:
            with pytest.raises(SnapshotCorrupt, match="head"):
                await asyncio.wait_for(rs.restore(session, default=Helper), WAIT)
        finally:
            await rs.aclose()
    finally:
        raw.close()
        await store.aclose()


async def test_a_close_save_cut_by_the_close_budget_counts_as_a_failed_save(
    server: RedisServer, key: str
) -> None:
    """docs/guide.md's metrics table: ``livekit_resume_checkpoint_failures_total{error}``
    counts "saves that failed, by error type (a retried one each time ...)", and
    ``checkpoints_total`` counts the close's saves among "whoever saved them"
    (session.py: "every save's, whoever asked (autosave's, the app's, a pause's, a
    close's)"). On a frozen Redis with its default client timeouts, a close's final save
    is cut by `CLOSE_SAVE_BUDGET`: that save failed, and the failures counter an
    operator alerts on must move (by `OutOfTime`/`StoreUnavailable`, whatever the type),
    not only the final-save counter."""
    from prometheus_client import REGISTRY

    def failures() -> float:
        total = 0.0
        for metric in REGISTRY.collect():
            if metric.name == "livekit_resume_checkpoint_failures":
                total += sum(
                    s.value
                    for s in metric.samples
                    if s.name == "livekit_resume_checkpoint_failures_total"
                )
        return total

    store = RedisStore.from_url(
        server.url, namespace=f"r13{uuid.uuid4().hex[:6]}", socket_timeout=3.0, retries=1
    )
    try:
        model = ScriptedLLM(default="ok")
        session = make_text_session(model, conn_options=CONN)
        rs = lr.ResumableSession(store, key, registry=registry(), owner="w1", autosave=False)
        agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
        await asyncio.wait_for(session.start(agent), WAIT)
        assert await say(session, "hello") is None
        await asyncio.wait_for(rs.checkpoint(), WAIT)
        assert await say(session, "said before the freeze, never saved") is None
        before = failures()
        final = REGISTRY.get_sample_value("livekit_resume_final_save_failures_total") or 0.0
        server.pause()
        try:
            await asyncio.wait_for(rs.aclose(), WAIT)
        finally:
            server.resume()
        assert (REGISTRY.get_sample_value("livekit_resume_final_save_failures_total") or 0) == (
            final + 1
        )
        assert failures() > before, "the close's failed save was not counted as a failed save"
        await session.aclose()
    finally:
        await store.aclose()
