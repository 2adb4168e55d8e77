"""Review of round 9's fixes: metrics counted in `ResumableSession`, untraced loops, and
the Redis store's clearing of version bodies an earlier release's ``rm`` leaves.

Real parts: a real `AgentSession` driven with the scripted LLM, SQLite files, and
``redis-server`` processes the suite starts (never port 6379). Faults are injected at the
store's own boundary (a commit held back or answered late), never inside livekit-agents.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from livekit.agents import Agent, AgentSession, function_tool
from prometheus_client import REGISTRY

import livekit_resume as lr
from livekit_resume.errors import LeaseLost, SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.redis_servers import RedisFactory, RedisServer


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Helper)
    return reg


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def family_total(name: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == name.removesuffix("_total"):
            total += sum(s.value for s in metric.samples if s.name == name)
    return total


async def begin(
    store: Store,
    key: str,
    *,
    owner: str = "w1",
    autosave: bool = False,
    takeover: bool = False,
    **kw: Any,
) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, key, registry=registry(), owner=owner, autosave=autosave, **kw)
    agent = await rs.restore(session, default=Helper, takeover=takeover)
    await session.start(agent)
    return session, rs


async def finish(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


def key_() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[str]:
    yield f"sqlite:///{tmp_path}/review9.db"


# ------------------------------------------------------------------ metrics


async def test_a_takeover_found_by_the_renewal_during_an_app_checkpoint_counts_once(
    db: str,
) -> None:
    """Another worker takes the session over while the app's ``checkpoint()`` is on its
    way to the store; the lease renewal meets the takeover first (autosave stops: one
    lost lease), then the checkpoint's commit is refused with LeaseLost too. guide.md:
    ``checkpoint_failures_total{error="LeaseLost"}`` moves "once, when the session is
    lost": one takeover, one count, whichever of the two saw it first."""
    store_a, store_b = lr.open_store(db), lr.open_store(db)
    key = key_()
    gate = asyncio.Event()
    real_commit = store_a.commit

    async def held_commit(commit: Any) -> int:
        await gate.wait()  # the commit is slow to reach the store
        return await real_commit(commit)

    try:
        # autosave on (it renews the lease every lease_ttl/3), its debounce long: only
        # the app's checkpoint writes
        s1, rs1 = await begin(store_a, key, owner="old", autosave=True, lease_ttl=0.6, debounce=30)
        await s1.run(user_input="hello")
        # sampled before the takeover: the renewal (every 0.2 s) may meet it while the
        # new worker's session is still starting
        before = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost")
        s2, rs2 = await begin(store_b, key, owner="new", takeover=True)
        store_a.commit = held_commit  # type: ignore[method-assign]
        saving = asyncio.ensure_future(rs1.checkpoint())
        for _ in range(100):
            if rs1._autosave.lost is not None:
                break
            await asyncio.sleep(0.02)
        assert rs1._autosave.lost is not None  # the renewal found the takeover
        gate.set()
        with pytest.raises(LeaseLost):
            await saving
        moved = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost") - before
        await finish(s1, rs1)
        await finish(s2, rs2)
    finally:
        await store_a.aclose()
        await store_b.aclose()
    assert moved == 1


async def test_a_session_lost_twice_in_one_autosave_counts_one_lost_lease(
    make_redis: RedisFactory,
) -> None:
    """The store loses the session under its holder (Redis emptied), autosave acquires
    it again, and the store loses it again before the rewrite lands: autosave gives up,
    the session is lost. guide.md: ``checkpoint_failures_total{error="LeaseLost"}``
    counts it "once, when the session is lost", not once in the checkpoint and again
    in autosave."""
    server = make_redis()
    store = lr.open_store(server.url, namespace=f"r{uuid.uuid4().hex[:6]}")
    raw = redis.Redis(port=server.port)
    key = key_()
    real_commit = store.commit
    flushes = 0

    async def losing_commit(commit: Any) -> int:
        nonlocal flushes
        if flushes < 2:
            flushes += 1
            raw.flushdb()  # the store lost its data just before this commit
        return await real_commit(commit)

    try:
        session, rs = await begin(store, key, autosave=True, debounce=0.01)
        await session.run(user_input="hello")
        await asyncio.wait_for(rs._autosave.idle.wait(), 5)
        before = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost")
        store.commit = losing_commit  # type: ignore[method-assign]
        await session.run(user_input="more")
        for _ in range(100):
            if rs._autosave.lost is not None:
                break
            await asyncio.sleep(0.02)
        assert rs._autosave.lost is not None and rs._autosave.lost.vanished
        moved = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost") - before
        await finish(session, rs)
    finally:
        raw.close()
        await store.aclose()
    assert flushes == 2
    assert moved == 1


async def test_a_save_that_lands_a_commit_sent_again_is_timed(db: str) -> None:
    """A commit whose answer was lost (the store applied it, the reply timed out) is
    sent again by the next save, which lands it: guide.md, ``checkpoint_seconds`` is the
    "time to capture and commit a snapshot, for saves that committed one". That save
    committed one and is counted in ``checkpoints_total``; the histogram must count it
    too. Left out, the saves a store blip slowed down, the very ones the histogram is
    for, never show in it, and its count falls behind the checkpoints counted."""
    store = lr.open_store(db)
    key = key_()
    real_commit = store.commit
    lost_replies = 0

    async def reply_lost(commit: Any) -> int:
        nonlocal lost_replies
        version = await real_commit(commit)
        if lost_replies == 0:
            lost_replies += 1
            raise StoreUnavailable("the reply was lost (timeout)")
        return version

    try:
        session, rs = await begin(store, key)
        await session.run(user_input="hello")
        store.commit = reply_lost  # type: ignore[method-assign]
        ok_before = family_total("livekit_resume_checkpoints_total")
        timed_before = sample("livekit_resume_checkpoint_seconds_count")
        with pytest.raises(StoreUnavailable):
            await rs.checkpoint()
        version = await rs.checkpoint()  # sends the same commit again, which lands
        assert [v.version for v in await store.versions(key)][-1] == version
        committed = family_total("livekit_resume_checkpoints_total") - ok_before
        timed = sample("livekit_resume_checkpoint_seconds_count") - timed_before
        await finish(session, rs)
    finally:
        await store.aclose()
    assert committed == 1
    assert timed == committed


# ------------------------------------------------------------------ Redis: bodies left


def _session_names(raw: redis.Redis, namespace: str, key: str) -> list[str]:
    return sorted(k.decode() for k in raw.scan_iter(match=f"{namespace}:{{{key}}}:*"))


async def _rm_as_an_earlier_release(store: Any, raw: redis.Redis, ns: str, key: str) -> None:
    """What the ``rm`` of the release before ``v:<n>:b`` did (tests/test_upgrade_hunt.py
    runs it for real): the tombstone laid at the session's epoch, the key taken out of
    the index, and every key it knows deleted: the head, the records, the log. The
    version bodies, which it does not know, stay."""
    info = await store.info(key)
    await store._lay_tombstone(key, info.epoch)
    await store._namespace_index.forget(key)
    names = _session_names(raw, ns, key)
    assert any(n.endswith(":b") for n in names)
    raw.delete(*[n for n in names if not n.endswith(":b")])


async def _converse(store: Store, key: str, turns: list[str]) -> None:
    session, rs = await begin(store, key)
    for turn in turns:
        await session.run(user_input=turn)
        await rs.checkpoint()
    await rs.suspend()
    await session.aclose()


async def test_bodies_an_earlier_rm_left_do_not_block_a_caller_who_calls_back_days_later(
    redis_server: RedisServer,
) -> None:
    """schema.md: after an earlier release's ``rm``, "the bodies left under the key's
    tombstone are removed by the next call under the key, which starts anew". A
    tombstone lives a day (TOMBSTONE_TTL); the bodies live for ever (no session ttl).
    A caller who calls back two days after the operator's ``rm`` (the tombstone expired,
    which is what deleting it here does) must get a new conversation, not
    ``SnapshotCorrupt`` ("lost its head key") on every call until someone runs ``rm``
    again: the server does not evict, so these bodies can be nothing but leftovers."""
    ns = f"r9{uuid.uuid4().hex[:6]}"
    store: Any = lr.open_store(redis_server.url, namespace=ns)
    raw = redis.Redis(port=redis_server.port)
    key = key_()
    try:
        await _converse(store, key, ["hello", "more"])
        await _rm_as_an_earlier_release(store, raw, ns, key)
        # a day later: expired
        raw.delete(store._names.tombstone(key), store._names.legacy_tombstone(key))
        session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
        try:
            await rs.restore(session, default=Helper)
            assert not rs.resumed
        finally:
            await rs.aclose()
    finally:
        raw.close()
        await store.aclose()


async def test_an_evicted_session_under_an_old_tombstone_is_reported_not_wiped(
    make_redis: RedisFactory,
) -> None:
    """On a server that evicts (maxmemory-policy allkeys-lru), a key deleted with ``rm``
    this morning (its tombstone lives a day) is called again: a new conversation is
    written under it, then the server evicts its head, records and log, leaving its
    version bodies. store.py says "an eviction's remains are still reported": the next
    restore must raise ``SnapshotCorrupt`` (lost its head key), as for any eviction, so
    that the operator learns the server drops sessions, not wipe the remains and start
    anew with a warning that blames "an earlier release's delete" for what eviction did
    to a session written after that delete."""
    server = make_redis("--maxmemory", "200mb", "--maxmemory-policy", "allkeys-lru")
    ns = f"r9{uuid.uuid4().hex[:6]}"
    store: Any = lr.open_store(server.url, namespace=ns)
    raw = redis.Redis(port=server.port)
    key = key_()
    try:
        await _converse(store, key, ["first life"])
        assert await store.delete(key)  # this release's rm: a tombstone for a day
        await _converse(store, key, ["second life", "more of it"])
        # what eviction left of the second life: its bodies
        names = _session_names(raw, ns, key)
        raw.delete(*[n for n in names if not n.endswith(":b")])
        assert _session_names(raw, ns, key)
        session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
        try:
            with pytest.raises(SnapshotCorrupt, match="head"):
                await rs.restore(session, default=Helper)
        finally:
            await rs.aclose()
    finally:
        raw.close()
        await store.aclose()


# ------------------------------------------------------------------ spans


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An in-memory exporter behind a real SDK tracer provider, LiveKit's own tracer
    bound to it too (its function_tool and agent turn spans are real), undone after."""
    from livekit.agents.telemetry import tracer as lk_tracer
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from livekit_resume.agent_hooks import session as hooks

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(lk_tracer, "_tracer", provider.get_tracer("livekit-agents"))
    monkeypatch.setattr(hooks, "tracer", provider.get_tracer("livekit_resume"))
    yield exporter
    provider.shutdown()


class Holder(Agent):
    rs: lr.ResumableSession | None = None

    def __init__(self) -> None:
        super().__init__(instructions="You put callers on hold.")

    @function_tool
    async def hold(self) -> str:
        """Put the caller on hold."""
        assert Holder.rs is not None
        await Holder.rs.pause()
        return "on hold"


async def test_a_tools_pause_and_a_remote_pause_are_traced_where_they_happen(
    db: str, spans: Any
) -> None:
    """A pause a tool asks for is part of the agent's turn: its checkpoint span belongs
    to LiveKit's trace of that turn (under its ``function_tool`` span). A pause an
    operator sends (lr.control) runs in the command loop, made under no trace: its
    checkpoint span is no child of the restore span, which ended long before. Neither
    lands in the restore's trace."""
    from livekit_resume.testing.llm import Reply, ToolCall

    reg = lr.AgentRegistry()
    reg.register(Holder)
    store = lr.open_store(db)
    key = key_()
    model = ScriptedLLM([Reply(tool_calls=[ToolCall("hold")]), "held"], default="ok")
    session: AgentSession[None] = AgentSession(llm=model)
    rs = lr.ResumableSession(store, key, registry=reg, autosave=False)
    Holder.rs = rs
    try:
        await session.start(await rs.restore(session, default=Holder))
        await session.run(user_input="please hold")
        assert rs.state == "paused"
        await rs.resume()
        await lr.control(store).pause(key)
        assert rs.state == "paused"
        await finish(session, rs)
    finally:
        Holder.rs = None
        await store.aclose()
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    (restore,) = [s for s in finished if s.name == "livekit_resume.restore"]
    pauses = [
        s
        for s in finished
        if s.name == "livekit_resume.checkpoint"
        and (s.attributes or {}).get("livekit_resume.reason") == "pause"
    ]
    assert len(pauses) == 2
    tool_pause, remote_pause = sorted(pauses, key=lambda s: s.start_time)
    for s in pauses:
        assert s.context.trace_id != restore.context.trace_id

    def ancestors(s: Any) -> list[str]:
        out = []
        while s.parent is not None and s.parent.span_id in by_id:
            s = by_id[s.parent.span_id]
            out.append(s.name)
        return out

    assert "function_tool" in ancestors(tool_pause), ancestors(tool_pause)
    assert remote_pause.parent is None, ancestors(remote_pause)


# ------------------------------------------------------------------ docs


def _guide_recipe() -> dict[str, Any]:
    """guide.md's "A deploy that changes an agent's instructions" code block, run."""
    import re

    guide = (Path(__file__).resolve().parents[1] / "docs/guide.md").read_text()
    at = guide.index("**A deploy that changes an agent's instructions**")
    (code,) = re.findall(r"```python\n(.*?)```", guide[at : guide.index("## Agents and", at)], re.S)
    scope: dict[str, Any] = {}
    exec(compile(code, "guide.md", "exec"), scope)
    return scope


async def test_the_guides_instructions_recipe_restores_when_registered_as_the_guide_shows(
    db: str,
) -> None:
    """guide.md's recipe for a deploy that changes instructions, run as the guide writes
    it (its class and its registry): a call saved under other instructions is restored
    hearing the recipe's prompt. The recipe first gave ``Receptionist`` a required
    ``rs`` argument that a registered class rebuilt "as Receptionist()" never gets:
    every call saved before failed ``IncompatibleSnapshot``."""
    recipe = _guide_recipe()
    Receptionist = recipe["Receptionist"]
    reg = recipe["registry"]
    store = lr.open_store(db)
    key = key_()
    try:
        first: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs = lr.ResumableSession(store, key, registry=reg, autosave=False)
        await first.start(await rs.restore(first, default=Receptionist))
        await first.current_agent.update_instructions("the prompt before the deploy")
        await first.run(user_input="hello")
        await rs.suspend()
        await first.aclose()

        model = ScriptedLLM([], default="welcome back")
        again: AgentSession[None] = AgentSession(llm=model)
        rs2 = lr.ResumableSession(store, key, registry=reg, autosave=False)
        try:
            agent = await rs2.restore(again, default=Receptionist)
            await again.start(agent)
            await again.run(user_input="can I come Sunday?")
            assert rs2.resumed
            assert [m.text_content for m in model.requests[0].system_messages] == [
                Receptionist.PROMPT
            ]
        finally:
            await rs2.aclose()
            await again.aclose()
    finally:
        await store.aclose()
