"""What an operator sees under failure: Prometheus metrics, OpenTelemetry spans, logs.

Real parts: a real `AgentSession` driven with the scripted LLM, SQLite files, and
``redis-server`` processes this test starts (never port 6379).
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession
from prometheus_client import REGISTRY

import livekit_resume as lr
from livekit_resume.errors import LeaseLost, StoreUnavailable
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.redis_servers import RedisFactory

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "Obs3rve-S3cret-pw-9f1c"


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
    """The sum of a counter's samples over every label value."""
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
    script: list[Any] | None = None,
    **kw: Any,
) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(script or [], default="ok"))
    rs = lr.ResumableSession(store, key, registry=registry(), owner=owner, autosave=autosave, **kw)
    agent = await rs.restore(session, default=Helper, takeover=takeover)
    await session.start(agent)
    return session, rs


async def finish(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = lr.open_store(f"sqlite:///{tmp_path}/obs.db")
    yield store
    await store.aclose()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An in-memory span exporter behind a real SDK tracer provider (undone after)."""
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
    # LiveKit's own proxy tracer would bind to this provider for good (see test_hooks)
    monkeypatch.setattr(lk_tracer, "_tracer", trace.NoOpTracer())
    monkeypatch.setattr(hooks, "tracer", provider.get_tracer("livekit_resume"))
    yield exporter
    provider.shutdown()


def ours(exporter: Any, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


# ------------------------------------------------------------------ metrics


def test_every_documented_metric_has_exactly_the_documented_labels() -> None:
    """guide.md's table names each metric with its labels (``{reason}``, ``{error}``,
    ``{where}``, ``{command,outcome}``): an operator's dashboards and alerts are written
    against those label names, so the exported families must carry exactly them."""
    # every module that defines a metric (the package imports them lazily)
    import livekit_resume.agent_hooks.autosave
    import livekit_resume.agent_hooks.capture
    import livekit_resume.agent_hooks.control
    import livekit_resume.agent_hooks.lease
    import livekit_resume.agent_hooks.room
    import livekit_resume.agent_hooks.session  # noqa: F401

    table = re.findall(
        r"^\| `(livekit_resume_[a-z_]+)(?:\{([a-z_,]+)\})?`",
        (ROOT / "docs/guide.md").read_text(),
        re.M,
    )
    assert table
    collectors = {m.name: m for m in REGISTRY.collect() if m.name.startswith("livekit_resume_")}
    for name, labels in table:
        base = name.removesuffix("_total")
        assert base in collectors, name
        documented = set(labels.split(",")) if labels else set()
        exported: set[str] = set()
        for s in collectors[base].samples:
            exported |= set(s.labels) - {"le"}
        # a labelled family with no sample yet exposes no label names: ask the collector
        for collector in list(REGISTRY._collector_to_names):
            if getattr(collector, "_name", None) == base:
                exported |= set(getattr(collector, "_labelnames", ()))
        assert exported == documented, (name, exported, documented)


async def test_app_reasons_and_keys_never_become_metric_label_values(
    sqlite_store: Store,
) -> None:
    """Label values must be bounded: a cluster with a million sessions (each with its
    own key and owner), or an app passing a free-form ``checkpoint(reason=...)``, must
    not create a series per session or per call. After a session's checkpoints, a
    failed save and its close, no livekit_resume sample carries the key, the owner or
    the app's reason text as a label value."""
    tag = uuid.uuid4().hex[:10]
    key, owner, reason = f"room-{tag}", f"owner-{tag}", f"manual-{tag}"
    session, rs = await begin(sqlite_store, key, owner=owner, autosave=True, debounce=0.01)
    await session.run(user_input="hello")
    await rs.checkpoint(reason)
    await session.run(user_input="again")
    await rs.checkpoint(reason)
    await finish(session, rs)
    for metric in REGISTRY.collect():
        if not metric.name.startswith("livekit_resume_"):
            continue
        for s in metric.samples:
            for value in s.labels.values():
                assert tag not in value, (s.name, s.labels)


async def test_checkpoints_total_counts_every_committed_snapshot_by_its_reason(
    sqlite_store: Store,
) -> None:
    """guide.md: ``livekit_resume_checkpoints_total{reason}`` counts *snapshots
    committed*, by reason. A manual checkpoint, a pause, a suspend each commit a
    snapshot (a new version); an operator watching the rate of saves by reason expects
    each of them there, not only autosave's."""
    key = f"room-{uuid.uuid4().hex[:8]}"
    session, rs = await begin(sqlite_store, key, autosave=False)
    before = {
        r: sample("livekit_resume_checkpoints_total", reason=r)
        for r in ("manual", "pause", "suspend")
    }
    await session.run(user_input="hello")
    v1 = await rs.checkpoint()
    await session.run(user_input="more")
    v2 = await rs.pause()
    v3 = await rs.suspend()
    await session.aclose()
    assert v1 < v2 < v3  # three snapshots committed
    after = {r: sample("livekit_resume_checkpoints_total", reason=r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {"manual": 1, "pause": 1, "suspend": 1}


async def test_an_autosave_that_commits_nothing_counts_no_checkpoint(sqlite_store: Store) -> None:
    """A turn triggers autosave; the app's own ``checkpoint()`` commits it first, inside
    the debounce window. Autosave then finds nothing new and writes nothing: the store
    holds one new version, written by the app, so ``checkpoints_total`` (snapshots
    committed) must show no autosave checkpoint (``turn``, ``tool``, ``handoff``) for it.
    Counting a no-op as a commit inflates the save rate an operator watches and hides a
    store that receives nothing."""
    key = f"room-{uuid.uuid4().hex[:8]}"
    session, rs = await begin(sqlite_store, key, autosave=True, debounce=0.5)
    await asyncio.wait_for(rs._autosave.idle.wait(), 5)  # the start's own save
    auto = ("turn", "tool", "handoff")
    before = {r: sample("livekit_resume_checkpoints_total", reason=r) for r in auto}
    version_before = rs.version
    await session.run(user_input="hello")  # triggers autosave ("turn")
    await rs.checkpoint()  # commits the turn, normally before autosave's debounce is over
    await asyncio.wait_for(rs._autosave.idle.wait(), 5)
    written = [v for v in await sqlite_store.versions(key) if v.version > version_before]
    # what the store received, by reason: normally one version, reason "manual"
    stored = {r: sum(1 for v in written if v.info.get("reason") == r) for r in auto}
    assert len(written) == 1
    after = {r: sample("livekit_resume_checkpoints_total", reason=r) for r in auto}
    assert {r: after[r] - before[r] for r in auto} == stored, [v.info for v in written]
    await finish(session, rs)


async def _taken_over(store: Store, caplog: pytest.LogCaptureFixture) -> tuple[str, float]:
    """The old holder ``old`` is taken over by ``new``; the old one goes on talking,
    then checkpoints by hand and closes. Returns the key and the LeaseLost count's move."""
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    key = f"room-{uuid.uuid4().hex[:8]}"
    lost_before = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost")
    s1, rs1 = await begin(store, key, owner="old", autosave=True, debounce=0.01)
    await s1.run(user_input="hello")
    await rs1.checkpoint()
    s2, rs2 = await begin(store, key, owner="new", takeover=True)
    await s1.run(user_input="still talking to the old worker")
    await asyncio.wait_for(rs1._autosave.idle.wait(), 5)
    with pytest.raises(LeaseLost):
        await rs1.checkpoint()
    await finish(s1, rs1)
    await finish(s2, rs2)
    return key, sample("livekit_resume_checkpoint_failures_total", error="LeaseLost") - lost_before


async def test_a_takeover_counts_one_lost_lease_and_logs_one_error(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker takes the session over while this one still runs it. The old
    holder's autosave, its manual checkpoint and its close each meet the lost lease:
    ``checkpoint_failures_total{error="LeaseLost"}`` moves exactly once (one event), and
    one ERROR says so (a live call this worker can no longer save), not one per save
    that met it."""
    _, moved = await _taken_over(sqlite_store, caplog)
    assert moved == 1
    errors = [
        f"{r.filename}:{r.lineno} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("livekit_resume") and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1 and "autosave stopped" in errors[0], errors


async def test_every_warning_about_a_taken_over_session_carries_its_key(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Log pipelines group and filter by the structured ``key`` field (every other
    warning about a session passes ``extra={"key": ...}``): the old holder's warnings
    after a takeover (its final save refused) must carry it too."""
    key, _ = await _taken_over(sqlite_store, caplog)
    unkeyed = [
        f"{r.filename}:{r.lineno} {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("livekit_resume")
        and r.levelno >= logging.WARNING
        and getattr(r, "key", None) != key
    ]
    assert not unkeyed, unkeyed


async def test_a_store_blip_retried_counts_one_checkpoint_and_logs_a_keyed_warning(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls (SIGSTOP) while autosave commits, past the client timeout, then
    runs again and applies the commit it had buffered; autosave sends the same commit
    again and goes on (failure-model.md). One snapshot was committed: the checkpoint
    counter moves once, the failed attempt counts as a failure, and the blip is a
    WARNING carrying the key, never an ERROR nor a traceback."""
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    server = make_redis()
    store = lr.open_store(
        server.url, namespace=f"o{uuid.uuid4().hex[:8]}", retries=0, socket_timeout=0.3
    )
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key, autosave=True, debounce=0.01)
        await asyncio.wait_for(rs._autosave.idle.wait(), 5)
        version_before = rs.version
        ok_before = family_total("livekit_resume_checkpoints_total")
        failed_before = family_total("livekit_resume_checkpoint_failures_total")
        caplog.clear()
        server.pause()
        try:
            await session.run(user_input="hello")
            for _ in range(100):
                if rs._autosave.failures:
                    break
                await asyncio.sleep(0.05)
        finally:
            server.resume()
        assert rs._autosave.failures
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        assert rs.version - version_before == 1
        assert family_total("livekit_resume_checkpoints_total") - ok_before == 1
        assert family_total("livekit_resume_checkpoint_failures_total") - failed_before >= 1
        mine = [r for r in caplog.records if r.name.startswith("livekit_resume")]
        await finish(session, rs)
    finally:
        await store.aclose()
    assert any(r.levelno == logging.WARNING for r in mine)
    for r in mine:
        where = f"{r.filename}:{r.lineno} {r.getMessage()}"
        assert r.levelno < logging.ERROR, where
        assert r.exc_info is None, where
        if r.levelno >= logging.WARNING:
            assert getattr(r, "key", None) == key, where


async def test_a_resume_with_the_store_down_warns_with_the_key_and_counts_the_announce(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``resume()`` is instant and does not fail on a store that is down: it warns
    that the state is not saved, and the ``resumed`` event cannot be published
    (``announce_failures_total{where="store"}`` moves once). Each warning about the
    session carries ``extra={"key": ...}`` for the log pipeline, and nothing is an
    ERROR: the session goes on and autosave saves once the store is back."""
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    server = make_redis()
    store = lr.open_store(
        server.url, namespace=f"o{uuid.uuid4().hex[:8]}", retries=0, socket_timeout=0.3
    )
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key)
        await session.run(user_input="hello")
        await rs.pause()
        server.kill()
        before = sample("livekit_resume_announce_failures_total", where="store")
        caplog.clear()
        await rs.resume()
        assert rs.state == "active"
        assert sample("livekit_resume_announce_failures_total", where="store") - before == 1
        mine = [r for r in caplog.records if r.name.startswith("livekit_resume")]
        server.start()  # back (empty), so that the close does not wait out its budget
        await finish(session, rs)
    finally:
        await store.aclose()
    warned = [r for r in mine if r.levelno >= logging.WARNING]
    assert warned
    for r in warned:
        where = f"{r.filename}:{r.lineno} {r.getMessage()}"
        assert r.levelno < logging.ERROR, where
        assert getattr(r, "key", None) == key, where


def _flip_first_item(path: Path, key: str) -> None:
    import sqlite3

    with sqlite3.connect(path) as conn:
        seq, data = conn.execute(
            "SELECT seq, data FROM log WHERE key=? AND stream='history' "
            "AND data IS NOT NULL ORDER BY gen, seq LIMIT 1",
            (key,),
        ).fetchone()
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x10
        conn.execute(
            "UPDATE log SET data=? WHERE key=? AND seq=? AND stream='history'",
            (bytes(damaged), key, seq),
        )


async def test_a_salvage_counts_once_and_only_when_the_session_is_restored(tmp_path: Path) -> None:
    """``sessions_salvaged_total`` counts *damaged snapshots restored with what was
    intact*. A salvage restore that then fails (the agent is not registered on this
    worker: UnknownAgent) restored nothing and must not count; the retry that restores
    it counts once; a later restore of the now whole session counts nothing."""
    path = tmp_path / "salvage.db"
    store = lr.open_store(f"sqlite:///{path}")
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key)
        await session.run(user_input="first")
        await session.run(user_input="second")
        await rs.suspend()
        await session.aclose()
        _flip_first_item(path, key)
        before = sample("livekit_resume_sessions_salvaged_total")

        empty = lr.AgentRegistry()  # a worker that lacks the agent
        s_bad: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs_bad = lr.ResumableSession(store, key, registry=empty, autosave=False)
        with pytest.raises(lr.UnknownAgent):
            await rs_bad.restore(s_bad, default=Helper, salvage=True)
        await rs_bad.aclose()
        assert sample("livekit_resume_sessions_salvaged_total") - before == 0

        s2: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
        rs2 = lr.ResumableSession(store, key, registry=registry(), autosave=False)
        await s2.start(await rs2.restore(s2, default=Helper, salvage=True))
        await rs2.checkpoint()
        await rs2.suspend()
        await s2.aclose()
        assert sample("livekit_resume_sessions_salvaged_total") - before == 1

        s3, rs3 = await begin(store, key)
        await finish(s3, rs3)
        assert sample("livekit_resume_sessions_salvaged_total") - before == 1
    finally:
        await store.aclose()


# ------------------------------------------------------------------ spans


async def test_autosave_checkpoint_spans_are_not_children_of_the_ended_restore_span(
    sqlite_store: Store, spans: Any
) -> None:
    """guide.md: every restore and checkpoint is a span. An autosave checkpoint minutes
    or hours after the restore is its own operation: its span must not be parented
    under the restore span, which ended long before (a trace then grows for the life of
    the call, and the checkpoint shows up inside a restore that "took" 2 ms)."""
    key = f"room-{uuid.uuid4().hex[:8]}"
    session, rs = await begin(sqlite_store, key, autosave=True, debounce=0.01)
    await session.run(user_input="hello")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(rs._autosave.idle.wait(), 5)
    await finish(session, rs)
    (restore,) = ours(spans, "livekit_resume.restore")
    turns = [
        s
        for s in ours(spans, "livekit_resume.checkpoint")
        if (s.attributes or {}).get("livekit_resume.reason") in ("turn", "tool", "handoff")
    ]
    assert turns
    for s in turns:
        assert s.parent is None or s.parent.span_id != restore.context.span_id, (
            "autosave's checkpoint span is a child of the restore span"
        )
        assert s.context.trace_id != restore.context.trace_id


async def test_failed_checkpoint_and_refused_restore_spans_are_errors_without_the_password(
    make_redis: RedisFactory, spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that cannot reach the store (Redis killed) raises StoreUnavailable:
    its span ends with status ERROR and the exception recorded, carries the key and
    reason; a restore the server refuses (wrong password) is an ERROR span too. Neither
    the spans (status, events with the exception's stack trace, attributes), the
    exception texts nor any log record shows the store URL's password (security.md:
    no secret shown)."""
    from opentelemetry.trace import StatusCode

    caplog.set_level(logging.DEBUG)
    server = make_redis("--requirepass", PASSWORD)
    url = f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/0"
    store = lr.open_store(url, namespace=f"o{uuid.uuid4().hex[:8]}", retries=0, socket_timeout=0.5)
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key)
        await session.run(user_input="hello")
        await rs.checkpoint()
        await session.run(user_input="more")
        server.kill()
        with pytest.raises(StoreUnavailable) as failed:
            await rs.checkpoint("manual")
        text = "".join(traceback.format_exception(failed.value))
        server.start()  # back (empty), so that the close does not wait out its budget
        await finish(session, rs)
        # the same server refusing a wrong password: the restore's span and error
        wrong = lr.open_store(url.replace(PASSWORD, PASSWORD + "-wrong"), namespace="ow", retries=0)
        try:
            refused_rs = lr.ResumableSession(wrong, key, registry=registry())
            with pytest.raises(StoreUnavailable) as refused:
                await refused_rs.restore(
                    AgentSession(llm=ScriptedLLM([], default="ok")), default=Helper
                )
            text += "".join(traceback.format_exception(refused.value))
            await refused_rs.aclose()
        finally:
            await wrong.aclose()
    finally:
        await store.aclose()
    restores = ours(spans, "livekit_resume.restore")
    assert restores[-1].status.status_code == StatusCode.ERROR
    cps = ours(spans, "livekit_resume.checkpoint")
    bad = [s for s in cps if s.status.status_code == StatusCode.ERROR]
    assert len(bad) >= 1
    span = bad[0]
    assert (span.attributes or {}).get("livekit_resume.key") == key
    assert (span.attributes or {}).get("livekit_resume.reason") == "manual"
    assert any(e.name == "exception" for e in span.events)
    shown = [text, *(r.getMessage() for r in caplog.records)]
    for s in spans.get_finished_spans():
        shown.append(str(s.status.description))
        shown.append(repr(dict(s.attributes or {})))
        shown.extend(repr(dict(e.attributes or {})) for e in s.events)
    for said in shown:
        assert PASSWORD not in said, said
    assert PASSWORD not in repr(store) + str(store)


async def test_a_restore_that_cannot_reach_the_store_counts_nothing(tmp_path: Path) -> None:
    """A session that never started (its restore failed: the store is down) wrote
    nothing, held no lease and committed nothing: no livekit_resume counter moves (a
    release or final-save failure counted for it would page about a lease that never
    existed)."""
    from tests.redis_servers import dead_port

    def counters() -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if metric.name.startswith("livekit_resume_") and metric.type == "counter":
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        out[f"{s.name}{sorted(s.labels.items())}"] = s.value
        return out

    before = counters()
    with dead_port() as port:
        store = lr.open_store(f"redis://127.0.0.1:{port}/0", retries=0, socket_timeout=0.3)
        try:
            session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
            rs = lr.ResumableSession(store, f"room-{uuid.uuid4().hex[:8]}", registry=registry())
            with pytest.raises(StoreUnavailable):
                await rs.restore(session, default=Helper)
            await rs.aclose()
        finally:
            await store.aclose()
    after = counters()
    moved = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert not moved, moved


async def test_every_span_ends_and_failures_are_errors(
    sqlite_store: Store, spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans are never left open, whatever ends the operation: a restore refused
    (SessionBusy: another worker holds the session), a checkpoint refused (LeaseLost,
    after a takeover) and a checkpoint cancelled mid-way. The refusals end with status
    ERROR and the exception recorded, and carry the session's key."""
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import StatusCode

    started: list[Any] = []
    ended: list[Any] = []

    class Track(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            started.append(span.context.span_id)

        def on_end(self, span: Any) -> None:
            ended.append(span.context.span_id)

    from opentelemetry import trace

    trace.get_tracer_provider().add_span_processor(Track())  # type: ignore[attr-defined]
    key = f"room-{uuid.uuid4().hex[:8]}"
    s1, rs1 = await begin(sqlite_store, key, owner="old")
    await s1.run(user_input="hello")
    await rs1.checkpoint()

    busy: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs_busy = lr.ResumableSession(sqlite_store, key, registry=registry(), owner="busy")
    with pytest.raises(lr.SessionBusy):
        await rs_busy.restore(busy, default=Helper)
    await rs_busy.aclose()

    await s1.run(user_input="more")
    task = asyncio.ensure_future(rs1.checkpoint())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    s2, rs2 = await begin(sqlite_store, key, owner="new", takeover=True)
    await s1.run(user_input="after the takeover")
    with pytest.raises(LeaseLost):
        await rs1.checkpoint()
    await finish(s1, rs1)
    await finish(s2, rs2)

    assert started and sorted(started) == sorted(ended)
    restores = ours(spans, "livekit_resume.restore")
    refused = [s for s in restores if s.status.status_code == StatusCode.ERROR]
    assert len(refused) == 1
    assert (refused[0].attributes or {}).get("livekit_resume.key") == key
    assert any(e.name == "exception" for e in refused[0].events)
    lost = [
        s
        for s in ours(spans, "livekit_resume.checkpoint")
        if any(
            (e.attributes or {}).get("exception.type", "").endswith("LeaseLost") for e in s.events
        )
    ]
    assert lost and all(s.status.status_code == StatusCode.ERROR for s in lost)
    assert all((s.attributes or {}).get("livekit_resume.key") == key for s in lost)


async def test_a_store_that_lost_the_session_is_reacquired_once_without_a_lost_lease(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without its data under a live holder: the store says the
    session vanished, which is not a takeover (failure-model.md: "a warning, and
    livekit_resume_sessions_reacquired"). ``sessions_reacquired_total`` moves once,
    ``checkpoint_failures_total{error="LeaseLost"}`` does not move, autosave goes on,
    and nothing is logged at ERROR."""
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    server = make_redis()
    store = lr.open_store(
        server.url, namespace=f"o{uuid.uuid4().hex[:8]}", retries=1, socket_timeout=0.5
    )
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key, autosave=True, debounce=0.01)
        await session.run(user_input="hello")
        await asyncio.wait_for(rs._autosave.idle.wait(), 5)
        reacquired = sample("livekit_resume_sessions_reacquired_total")
        lost = sample("livekit_resume_checkpoint_failures_total", error="LeaseLost")
        caplog.clear()
        server.stop()
        server.start()  # empty: no persistence
        await session.run(user_input="after the restart")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if rs._autosave.idle.is_set() and rs.version:
                break
        await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        version = await rs.checkpoint()
        assert version >= 1 and rs._autosave.lost is None
        assert sample("livekit_resume_sessions_reacquired_total") - reacquired == 1
        assert sample("livekit_resume_checkpoint_failures_total", error="LeaseLost") == lost
        mine = [r for r in caplog.records if r.name.startswith("livekit_resume")]
        await finish(session, rs)
    finally:
        await store.aclose()
    errors = [
        f"{r.filename}:{r.lineno} {r.getMessage()}" for r in mine if r.levelno >= logging.ERROR
    ]
    assert not errors, errors


async def test_a_checkpoint_that_fails_is_counted_as_failed(make_redis: RedisFactory) -> None:
    """guide.md: ``livekit_resume_checkpoint_failures_total{error}`` counts *checkpoints
    that failed*. The app's ``checkpoint()`` and a ``suspend()`` whose save cannot reach
    the store (Redis down) raise StoreUnavailable: two checkpoints failed, and an alert
    on that counter must see them, not only autosave's background failures."""
    server = make_redis()
    store = lr.open_store(
        server.url, namespace=f"o{uuid.uuid4().hex[:8]}", retries=0, socket_timeout=0.3
    )
    key = f"room-{uuid.uuid4().hex[:8]}"
    try:
        session, rs = await begin(store, key)
        await session.run(user_input="hello")
        await rs.checkpoint()
        await session.run(user_input="more")
        before = sample("livekit_resume_checkpoint_failures_total", error="StoreUnavailable")
        server.kill()
        with pytest.raises(StoreUnavailable):
            await rs.checkpoint()
        with pytest.raises(StoreUnavailable):
            await rs.suspend()
        moved = (
            sample("livekit_resume_checkpoint_failures_total", error="StoreUnavailable") - before
        )
        server.start()
        await finish(session, rs)
    finally:
        await store.aclose()
    assert moved == 2
