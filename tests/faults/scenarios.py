"""The scenarios: each injects its fault, asserts its invariant, and returns its figures.

A scenario takes a `Lab` (forked workers), a `Target` (which store) and its run counts;
`tests/test_faults.py` picks the counts (CI bounds, times ``RESUME_SOAK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from livekit.agents import llm
from prometheus_client import REGISTRY

from livekit_resume import (
    CommandRefused,
    ResumableSession,
    ResumeError,
    StoreUnavailable,
    control,
    open_store,
)
from livekit_resume.snapshot.chat import ctx_from_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Commit, SessionInfo, Store, Stored
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests import _child_agent as agent_kit
from tests.faults.cluster import FailoverPair
from tests.faults.figures import Row
from tests.faults.forkserver import Lab
from tests.faults.sentinel import SentinelPair
from tests.faults.watch import WatchStore
from tests.faults.workers import STREAM, digest_items, turn_text
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.redis_servers import RedisServer

__all__ = [
    "ProbeStore",
    "Target",
    "failed_suspend",
    "failover",
    "load",
    "oom",
    "redis_lost_data",
    "redis_outage",
    "restore_session",
    "sigkill_sessions",
    "sigkill_store",
    "user_texts",
    "zombies",
]

# Where in a commit a kill lands: a random slice of about one commit's duration after
# the line that triggered it. This is the fault's timing, not a wait for something.
KILL_JITTER = 0.03
# A zombie's lease in that scenario: short, so that freezing it past the lease is quick.
ZOMBIE_LEASE_TTL = 1.5
# Bounds one outage phase: the client's timeout, its retries and autosave's backoff
# (capped at 10 s) fit many times over; it catches a hang, it is not a timing.
OUTAGE_DEADLINE = 60.0
# What a session may hold while its store is down: the turns themselves are a few KiB;
# anything growing with the retries (queued snapshots, tasks) would pass this.
MEMORY_BOUND = 4 * 1024 * 1024
# RSS growth allowed for the load scenario's sessions over its run: their histories are a
# few MiB; a leak per commit or per turn (thousands of each) would pass this.
LOAD_MEMORY_BOUND = 256 * 1024 * 1024
# Reads of the new primary right after a failover: the client may meet a closed
# connection of the dead one before it refreshes its slot map.
FAILOVER_READ_ATTEMPTS = 5


@dataclass
class Target:
    """A store the workers and the test open by URL (each process its own connections)."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> Store:
        return open_store(self.url, **self.options)

    def worker_args(self, **more: Any) -> dict[str, Any]:
        return {"url": self.url, "options": self.options, **more}


def user_texts(items: list[llm.ChatItem]) -> list[str]:
    return [
        i.text_content or "" for i in items if isinstance(i, llm.ChatMessage) and i.role == "user"
    ]


async def corrupt_versions(store: Store, key: str, codec: Codec) -> list[str]:
    """Every retained version that does not load and decode whole, with the error."""
    bad: list[str] = []
    for info in await store.versions(key):
        try:
            stored = await store.load(key, info.version)
            codec.decode_parts(key, stored.head, stored.streams, version=stored.version)
        except Exception as e:
            bad.append(f"v{info.version}: {type(e).__name__}: {e}")
    return bad


async def restore_session(
    store: Store, key: str, *, takeover: bool = True, **opts: Any
) -> tuple[Any, Any, ResumableSession, Any]:
    """The test agent's session restored under ``key``: (model, session, rs, agent)."""
    model, session = agent_kit.build_session()
    rs = ResumableSession(
        store, key, registry=agent_kit.registry(), userdata_type=agent_kit.Notes, **opts
    )
    agent = await rs.restore(session, default=agent_kit.Scribe, takeover=takeover)
    return model, session, rs, agent


async def sigkill_sessions(lab: Lab, target: Target, *, runs: int, chain: int) -> Row:
    """A live autosaving session is SIGKILLed at a random moment; the test restores it.

    Runs come in chains on one key: each worker restores what the test left, talks,
    and dies; the test takes over, checks, starts the session and closes it cleanly.
    Invariants: the restored version is at least the last acknowledged one, every
    acknowledged turn's user message is in the restored history exactly once, every
    retained version decodes whole, and versions strictly increase across workers.
    """
    row = Row("SIGKILL live session", target.name)
    store, codec, rng = target.open(), Codec(), random.Random(runs)
    try:
        while row.runs < runs:
            key = f"kill-{uuid.uuid4().hex[:8]}"
            acked_texts: list[str] = []
            last = 0
            for r in range(min(chain, runs - row.runs)):
                tag = f"{key}-r{r}"
                child = await lab.spawn(
                    "session_turns", **target.worker_args(key=key, tag=tag, seed=rng.random())
                )
                ready = await child.expect("READY")
                assert int(ready[0]) == last, f"worker restored {ready[0]}, expected {last}"
                for _ in range(rng.randint(0, 4)):
                    await child.expect("COMMIT")
                await asyncio.sleep(rng.uniform(0, KILL_JITTER))
                fault = time.monotonic()
                await child.kill()
                row.runs += 1
                row.faults += 1

                commits = [int(w[0]) for w in child.words("COMMIT")]
                assert commits == sorted(set(commits)) and all(v > last for v in commits), (
                    f"versions not strictly increasing after {last}:\n{child.output}"
                )
                row.acked += len(commits)
                acked = max(commits, default=last)
                acked_texts += [turn_text(tag, int(w[0])) for w in child.words("TURN")]

                _model, session, rs, agent = await restore_session(store, key)
                row.recover.append(time.monotonic() - fault)
                users = user_texts(list(session.history.items))
                missing = [t for t in acked_texts if users.count(t) != 1]
                row.lost += max(0, acked - rs.version)
                assert rs.version >= acked and not missing, (
                    f"restored v{rs.version}, acknowledged v{acked}; turns missing or "
                    f"doubled: {missing}\n{child.output}"
                )
                bad = await corrupt_versions(store, key, codec)
                row.corrupt += len(bad)
                assert not bad, f"retained versions do not decode: {bad}"
                await session.start(agent)
                await rs.aclose()
                await session.aclose()
                last = rs.version
    finally:
        await store.aclose()
    return row


def _check_stored(stored: Stored) -> str | None:
    """Whether a version of the store-level workers reads as its head says (None: it does)."""
    head = json.loads(stored.head)
    items = stored.streams.get(STREAM, [])
    got = digest_items(items)
    if got != head["digest"] or len(items) != head["items"]:
        return f"v{stored.version}: head says {head}, items read as {got} ({len(items)})"
    return None


async def sigkill_store(lab: Lab, target: Target, *, runs: int, chain: int) -> Row:
    """Workers doing raw `Store.commit` loops (appends, edits, removals) are SIGKILLed.

    Invariants: the latest version is the last acknowledged one or the one after it (a
    commit that landed but whose answer died with the worker), and it reads exactly
    as its worker said it would; every retained version reads as its head says.
    """
    row = Row("SIGKILL store commit loop", target.name)
    store, rng = target.open(), random.Random(runs + 1)
    try:
        while row.runs < runs:
            key = f"commits-{uuid.uuid4().hex[:8]}"
            last, last_digest = 0, digest_items([])
            for _ in range(min(chain, runs - row.runs)):
                child = await lab.spawn(
                    "store_commits", **target.worker_args(key=key, seed=rng.random())
                )
                ready = await child.expect("READY")
                assert int(ready[0]) == last, f"worker loaded {ready[0]}, expected {last}"
                for _ in range(rng.randint(0, 8)):
                    await child.expect("COMMIT")
                await asyncio.sleep(rng.uniform(0, KILL_JITTER / 3))
                fault = time.monotonic()
                await child.kill()
                row.runs += 1
                row.faults += 1

                commits = [(int(w[0]), w[1]) for w in child.words("COMMIT")]
                pending = {int(w[0]): w[1] for w in child.words("PENDING")}
                row.acked += len(commits)
                acked, acked_digest = commits[-1] if commits else (last, last_digest)
                stored = await store.load(key)
                row.recover.append(time.monotonic() - fault)
                row.lost += max(0, acked - stored.version)
                want = acked_digest if stored.version == acked else pending.get(stored.version)
                got = digest_items(stored.streams.get(STREAM, []))
                assert stored.version in (acked, acked + 1) and got == want, (
                    f"latest v{stored.version} reads {got}; acknowledged v{acked}, "
                    f"expected {want}\n{child.output}"
                )
                bad = []
                for info in await store.versions(key):
                    problem = _check_stored(await store.load(key, info.version))
                    if problem:
                        bad.append(problem)
                row.corrupt += len(bad)
                assert not bad, f"retained versions torn: {bad}"
                last, last_digest = stored.version, got
    finally:
        await store.aclose()
    return row


async def zombies(lab: Lab, target: Target, *, runs: int) -> Row:
    """A live worker is frozen (SIGSTOP) past its lease; another process takes over and
    commits; the zombie is thawed (SIGCONT). The worker is frozen after a few turns,
    once its autosave is idle (its lease renewals still run), never inside a SQLite
    transaction, whose lock would block every process (see docs/reliability.md).

    Invariants: every version after the takeover carries the new owner's epoch; the
    zombie acknowledges no version after the takeover; its autosave stops on
    `LeaseLost` and an explicit checkpoint is refused; the new owner's history holds
    every turn the zombie acknowledged, and is what the store holds at the end.
    """
    row = Row("zombie: SIGSTOP past lease, takeover, SIGCONT", target.name)
    store, rng = target.open(), random.Random(runs + 2)
    try:
        for r in range(runs):
            key = f"zombie-{uuid.uuid4().hex[:8]}"
            tag = f"{key}-z"
            child = await lab.spawn(
                "session_turns",
                **target.worker_args(
                    key=key,
                    tag=tag,
                    seed=rng.random(),
                    lease_ttl=ZOMBIE_LEASE_TTL,
                    quiet_after=rng.randint(2, 4),
                ),
            )
            await child.expect("READY")
            await child.expect("QUIET")
            await child.signal(signal.SIGSTOP)
            fault = time.monotonic()
            row.runs += 1
            row.faults += 1
            info = await store.info(key)
            assert info is not None and info.lease_expires_at is not None
            # The fault itself: the worker stays frozen until its lease has run out.
            await asyncio.sleep(max(0.0, info.lease_expires_at - time.time()) + 0.1)

            _model, session, rs, agent = await restore_session(
                store, key, lease_ttl=ZOMBIE_LEASE_TTL
            )
            row.recover.append(time.monotonic() - fault)
            taken = rs.version
            assert rs._lease is not None
            epoch = rs._lease.epoch
            await session.start(agent)
            await session.run(user_input=f"remember the new owner {r}")
            await rs.checkpoint()

            assert await child.signal(signal.SIGCONT)
            await child.expect("LOST")
            assert await child.expect("CHECKPOINT") == ["LeaseLost"], child.output
            await session.run(user_input=f"remember the new owner again {r}")
            final = await rs.checkpoint()

            zombie_commits = [int(w[0]) for w in child.words("COMMIT")]
            row.acked += len(zombie_commits) + (final - taken)
            late = [v for v in zombie_commits if v > taken]
            foreign = [
                (v.version, v.epoch)
                for v in await store.versions(key)
                if v.version > taken and v.epoch != epoch
            ]
            assert not late and not foreign, (
                f"zombie wrote after the takeover at v{taken}: acknowledged {late}, "
                f"foreign epochs {foreign}\n{child.output}"
            )
            users = user_texts(list(session.history.items))
            acked_texts = [turn_text(tag, int(w[0])) for w in child.words("TURN")]
            missing = [t for t in acked_texts if users.count(t) != 1]
            assert not missing, f"turns the zombie acknowledged are missing: {missing}"
            stored = await store.load(key)
            snap = Codec().decode_parts(key, stored.head, stored.streams)
            assert stored.version == final and [i["id"] for i in snap.history] == [
                i.id for i in session.history.items
            ]
            await rs.aclose()
            await session.aclose()
            await child.kill()
    finally:
        await store.aclose()
    return row


# ------------------------------------------------------- in-process scenarios


class ProbeStore(WatchStore):
    """`WatchStore` that also counts failed commits and times the good ones, so a test
    waits on "a commit has failed since" instead of guessing how long an outage lasts."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.failures = 0
        self.latencies: list[float] = []
        self.by_key: dict[str, list[int]] = {}
        self.last_error: Exception | None = None
        self.inflight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self._failed = asyncio.Event()

    async def commit(self, commit: Commit) -> int:
        await self.gate.wait()  # closed: commits wait here, before reaching the store
        start = time.perf_counter()
        self.inflight += 1
        try:
            version = await super().commit(commit)
        except Exception as e:
            self.failures += 1
            self.last_error = e
            self._failed.set()
            raise
        finally:
            self.inflight -= 1
            self._changed.set()
        self.latencies.append(time.perf_counter() - start)
        self.by_key.setdefault(commit.key, []).append(version)
        return version

    async def next_failure(self, *, timeout: float = OUTAGE_DEADLINE) -> None:
        """Wait until a commit fails from now on."""
        self._failed.clear()
        await asyncio.wait_for(self._failed.wait(), timeout)


def _probe(url: str, prefix: str, **options: Any) -> ProbeStore:
    """A watched Redis store in a namespace of its own (``prefix`` + a random suffix)."""
    return ProbeStore(
        RedisStore.from_url(url, namespace=f"{prefix}{uuid.uuid4().hex[:8]}", **options)
    )


async def _fresh_session(
    store: Store, key: str, *, plain: bool = False
) -> tuple[Any, ResumableSession]:
    if plain:  # a reply and no tool call: one LLM request per turn
        session = make_text_session(ScriptedLLM(default="noted"), userdata=agent_kit.Notes())
    else:
        _model, session = agent_kit.build_session()
    rs = ResumableSession(
        store, key, registry=agent_kit.registry(), userdata_type=agent_kit.Notes, debounce=0.02
    )
    await session.start(await rs.restore(session, default=agent_kit.Scribe))
    return session, rs


async def _turn(session: Any, store: WatchStore, text: str) -> str:
    await asyncio.wait_for(session.run(user_input=text), OUTAGE_DEADLINE)
    for item in reversed(session.history.items):
        if isinstance(item, llm.ChatMessage) and item.text_content == text:
            return str(item.id)
    raise AssertionError(f"{text!r} is not in the history")


async def assert_stored_whole(store: Store, key: str, session: Any) -> int:
    """The latest version holds exactly the live history; return that version."""
    stored = await store.load(key)
    snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
    saved = ctx_from_data(snap.history).items
    live = list(session.history.items)
    assert [i.id for i in saved] == [i.id for i in live], "stored history differs from live"
    assert llm.ChatContext(saved).is_equivalent(llm.ChatContext(live))
    return stored.version


async def redis_outage(server: RedisServer, *, mode: str, runs: int, turns_down: int) -> Row:
    """A session keeps answering turns while its Redis is down, then saves every turn.

    ``mode`` ``"stall"``: the server is frozen (SIGSTOP) past the client's socket
    timeout, so commits time out although the server applies them later (an ambiguous
    outcome); ``"restart"``: it is SIGKILLed and restarted from its append-only file.
    Invariants: every turn gets its answer while the store is down; the tasks and the
    memory the session holds stay bounded meanwhile; once the store is back, autosave
    (which never stopped) writes the latest state: the stored history is the live one,
    and no version acknowledged before the fault is lost.
    """
    label = "SIGSTOP past socket_timeout" if mode == "stall" else "SIGKILL, restart from AOF"
    row = Row(f"Redis outage mid-conversation ({label})", "redis")
    grown: list[int] = []
    for r in range(runs):
        store = _probe(server.url, "o", socket_timeout=1.0, retries=1)
        key = f"outage-{r}"
        try:
            session, rs = await _fresh_session(store, key)
            for t in range(3):
                await store.wait_saved(await _turn(session, store, f"remember before {t}"))
            before = store.versions_written[-1]
            tasks = len(asyncio.all_tasks())
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            if mode == "stall":
                server.pause()
            else:
                server.kill()
            row.runs += 1
            row.faults += 1
            try:
                for t in range(turns_down):
                    failure = asyncio.ensure_future(store.next_failure())
                    await _turn(session, store, f"remember while down {t}")
                    await failure  # this turn's state met the outage
                grown.append(tracemalloc.get_traced_memory()[0] - base)
                extra_tasks = len(asyncio.all_tasks()) - tasks
            finally:
                tracemalloc.stop()
                if mode == "stall":
                    server.resume()
                else:
                    server.start()
            back = time.monotonic()
            last = session.history.items[-1].id
            await store.wait_saved(last, timeout=OUTAGE_DEADLINE)
            await asyncio.wait_for(rs._autosave.idle.wait(), OUTAGE_DEADLINE)
            row.recover.append(time.monotonic() - back)
            assert rs._autosave.lost is None, f"autosave stopped: {rs._autosave.lost}"
            assert extra_tasks <= 2, f"{extra_tasks} more tasks while the store was down"
            assert grown[-1] < MEMORY_BOUND, f"session grew {grown[-1]} bytes while down"
            latest = await assert_stored_whole(store, key, session)
            row.acked += len(store.versions_written)
            row.lost += int(latest < before)
            bad = await corrupt_versions(store, key, Codec())
            row.corrupt += len(bad)
            assert latest >= before and not bad, f"v{latest} < v{before} or corrupt: {bad}"
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
    row.notes = (
        f"{turns_down} turns answered while down; memory held meanwhile <= {max(grown) // 1024} KiB"
    )
    return row


def _rss() -> int:
    """Resident memory of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(server: RedisServer, *, sessions: int, duration: float, every: float) -> Row:
    """Many live sessions in one process against one Redis, each taking a turn about
    every ``every`` seconds for ``duration`` seconds.

    Invariants: per session, acknowledged versions strictly increase and the final
    stored history is the live one (nothing lost or reordered); memory stays bounded.
    Reported: commits per second and store commit latency (p50, p99).
    """
    row = Row(f"load: {sessions} live sessions, a turn every ~{every:g} s", "redis")
    store = _probe(server.url, "l")
    rng = random.Random(sessions)
    live: list[tuple[str, Any, ResumableSession]] = []
    try:
        for i in range(sessions):
            key = f"load-{i}"
            session, rs = await _fresh_session(store, key, plain=True)
            live.append((key, session, rs))
        rss_start = _rss()
        store.latencies.clear()
        turns = 0

        async def talk(session: Any, offset: float) -> None:
            nonlocal turns
            due = start + offset
            n = 0
            while due < start + duration:
                # the user's pace: this session's next turn is due at a fixed cadence
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await _turn(session, store, f"turn {n}")
                n += 1
                turns += 1
                due += every

        start = time.monotonic()
        await asyncio.gather(*(talk(s, rng.uniform(0, every)) for _, s, _ in live))
        elapsed = time.monotonic() - start
        committed = len(store.latencies)
        latencies = list(store.latencies)
        for key, session, rs in live:
            await asyncio.wait_for(rs._autosave.idle.wait(), OUTAGE_DEADLINE)
            versions = store.by_key.get(key, [])
            assert versions == sorted(set(versions)), f"{key}: versions out of order {versions}"
            latest = await assert_stored_whole(store, key, session)
            assert latest == versions[-1], f"{key}: stored v{latest}, acknowledged {versions[-1]}"
        rss_grown = _rss() - rss_start
        assert rss_grown < LOAD_MEMORY_BOUND, f"memory grew {rss_grown >> 20} MiB under load"
        row.runs = sessions
        row.acked = sum(len(v) for v in store.by_key.values())
        row.notes = (
            f"{elapsed:.0f} s, {turns} turns, {committed / elapsed:.0f} commits/s, "
            f"commit p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms, RSS +{rss_grown >> 20} MiB"
        )
    finally:
        for _key, session, rs in live:
            await rs.aclose()
            await session.aclose()
        await store.aclose()
    return row


async def _settled(store: ProbeStore, rs: ResumableSession, session: Any) -> None:
    """Wait until autosave has written the live session's last item and has nothing left."""
    await store.wait_saved(session.history.items[-1].id, timeout=OUTAGE_DEADLINE)
    await asyncio.wait_for(rs._autosave.idle.wait(), OUTAGE_DEADLINE)
    assert rs._autosave.lost is None, f"autosave stopped: {rs._autosave.lost}"


async def redis_lost_data(server: RedisServer, *, runs: int) -> Row:
    """Redis restarts WITHOUT its data (no persistence) while a session holds its lease.

    Invariants: autosave goes on (its lease vanished, nobody took it: it acquires the
    session again, reclaiming its own epoch, and writes it whole), the turns taken meanwhile are
    answered, and the store ends up holding the whole live history.
    """
    row = Row("Redis restarted without its data, lease held", "redis")
    gone = 0
    for r in range(runs):
        store = _probe(server.url, "d")
        key = f"lost-data-{r}"
        try:
            session, rs = await _fresh_session(store, key)
            for t in range(3):
                await store.wait_saved(await _turn(session, store, f"remember before {t}"))
            acked_before = list(store.versions_written)
            epoch = rs._lease.epoch if rs._lease else None
            server.kill()
            server.start()  # empty: --save "" --appendonly no
            row.runs += 1
            row.faults += 1
            back = time.monotonic()
            for t in range(2):
                await _turn(session, store, f"remember after {t}")
            await _settled(store, rs, session)
            row.recover.append(time.monotonic() - back)
            latest = await assert_stored_whole(store, key, session)
            # acquired again at its own epoch, reclaimed (`Store.acquire`): the store forgot it
            assert rs._lease is not None and rs._lease.epoch == epoch, "epoch not reclaimed"
            retained = {v.version for v in await store.versions(key)}
            gone += sum(1 for v in acked_before if v not in retained or v > latest)
            row.acked += len(store.versions_written)
            bad = await corrupt_versions(store, key, Codec())
            row.corrupt += len(bad)
            assert not bad, f"corrupt after the data loss: {bad}"
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
    row.notes = (
        f"the server lost {gone} earlier versions with its data; every turn was "
        "written again whole under its own epoch, reclaimed"
    )
    return row


async def failed_suspend(server: RedisServer, *, runs: int) -> Row:
    """``suspend()`` while Redis is down (killed; it comes back from its append-only file).

    Invariants: the failed suspend raises, keeps the lease and leaves the session
    retryable; once Redis is back a second ``suspend()`` stores every turn as
    ``suspended`` and releases the lease, so a new worker restores it without takeover.
    """
    row = Row("suspend() while Redis is down, then again", "redis")
    for r in range(runs):
        store = _probe(server.url, "s", socket_timeout=1.0, retries=1)
        key = f"suspend-{r}"
        try:
            session, rs = await _fresh_session(store, key)
            for t in range(2):
                await store.wait_saved(await _turn(session, store, f"remember {t}"))
            await _turn(session, store, "remember the last words")
            live = [i.id for i in session.history.items]
            server.kill()
            row.runs += 1
            row.faults += 1
            try:
                with pytest.raises(ResumeError):
                    await asyncio.wait_for(rs.suspend(), OUTAGE_DEADLINE)
            finally:
                server.start()
            back = time.monotonic()
            assert rs._lease is not None, "a failed suspend released the lease"
            version = await asyncio.wait_for(rs.suspend(), OUTAGE_DEADLINE)
            row.recover.append(time.monotonic() - back)
            row.acked += len(store.versions_written)
            stored = await store.load(key)
            snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
            assert stored.version == version and snap.state == "suspended"
            assert [i["id"] for i in snap.history] == live, "the suspended version lost turns"

            _model, other = agent_kit.build_session()
            rs2 = ResumableSession(
                store, key, registry=agent_kit.registry(), userdata_type=agent_kit.Notes
            )
            await rs2.restore(other, default=agent_kit.Scribe)  # no takeover: it was released
            assert [i.id for i in other.history.items] == live
            await rs2.aclose()
        finally:
            await store.aclose()
    return row


async def oom(server: RedisServer, *, runs: int) -> Row:
    """Redis under ``noeviction`` runs out of memory while a session saves.

    Invariants: the refusal reaches autosave as `StoreUnavailable` naming memory (not
    as corruption), autosave keeps retrying while the session keeps answering, and
    once memory is raised every turn is stored; nothing already stored is damaged.
    """
    row = Row("Redis out of memory (noeviction), then raised", "redis")
    for r in range(runs):
        store = _probe(server.url, "m")
        key = f"oom-{r}"
        try:
            session, rs = await _fresh_session(store, key)
            for t in range(2):
                await store.wait_saved(await _turn(session, store, f"remember {t}"))
            used = int(server.cli("info", "memory").split("used_memory:")[1].split()[0])
            server.cli("config", "set", "maxmemory", str(used + 256 * 1024))
            row.runs += 1
            row.faults += 1
            try:
                failure = asyncio.ensure_future(store.next_failure())
                while not failure.done():
                    # a long utterance that does not compress: a few of them fill the margin
                    big = os.urandom(24 * 1024).hex()
                    await _turn(session, store, f"remember {big}")
                    idle = asyncio.ensure_future(rs._autosave.idle.wait())
                    await asyncio.wait(
                        [failure, idle],
                        timeout=OUTAGE_DEADLINE,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    idle.cancel()
                await failure
                err = store.last_error
                assert isinstance(err, StoreUnavailable) and "memory" in str(err), repr(err)
                await _turn(session, store, "remember while full")
            finally:
                server.cli("config", "set", "maxmemory", "0")
            back = time.monotonic()
            await _settled(store, rs, session)
            row.recover.append(time.monotonic() - back)
            await assert_stored_whole(store, key, session)
            row.acked += len(store.versions_written)
            bad = await corrupt_versions(store, key, Codec())
            row.corrupt += len(bad)
            assert not bad, f"corrupt after OOM: {bad}"
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
    return row


async def _read_info(store: Store, key: str) -> SessionInfo | None:
    """``store.info(key)`` right after a failover, while the client finds the new primary:
    a few attempts, each with the store's own retries and backoff."""
    for _ in range(FAILOVER_READ_ATTEMPTS - 1):
        with contextlib.suppress(StoreUnavailable):
            return await store.info(key)
    return await store.info(key)


async def _until_commits(store: ProbeStore, keys: list[str], n: int) -> None:
    """Wait until every key has at least ``n`` acknowledged commits, and none is in flight."""

    async def wait() -> None:
        while store.inflight or any(len(store.by_key.get(k, [])) < n for k in keys):
            store._changed.clear()
            await store._changed.wait()

    await asyncio.wait_for(wait(), OUTAGE_DEADLINE)


async def failover(
    pair: FailoverPair | SentinelPair, *, wait_replicas: int, sessions: int, runs: int
) -> Row:
    """Sessions checkpoint continuously on a one-shard Redis Cluster, or on a primary
    found through Sentinel; the primary is SIGKILLed and its replica takes over
    (`CLUSTER FAILOVER TAKEOVER`, `SENTINEL FAILOVER`).

    Measured: acknowledged versions the new primary does not hold (asynchronous
    replication's loss). Asserted: with ``wait_replicas`` nothing acknowledged is lost;
    with or without it, every session's autosave goes on after the failover, the store
    ends up holding each live history whole, and every session's owner still takes an
    operator's command (`livekit_resume.control`).
    """
    mode = f"wait_replicas={wait_replicas}" if wait_replicas else "async replication"
    row = Row(
        f"{pair.kind.capitalize()} failover (primary SIGKILLed, replica takes over), {mode}",
        pair.kind,
    )
    # on a Cluster the store keeps the URL's nodes as seeds (dynamic_startup_nodes=False),
    # so a second failover does not leave it without a reachable node
    store = _probe(pair.url, "c", wait_replicas=wait_replicas, socket_timeout=1.0)
    live: list[tuple[str, Any, ResumableSession]] = []
    talkers: list[asyncio.Future[None]] = []
    stop = asyncio.Event()

    async def talk(session: Any) -> None:
        n = 0
        while not stop.is_set():
            await _turn(session, store, f"turn {n}")
            n += 1

    rewritten = _reacquired()
    try:
        for i in range(sessions):
            session, rs = await _fresh_session(store, f"failover-{i}", plain=True)
            live.append((f"failover-{i}", session, rs))
        keys = [k for k, _, _ in live]
        talkers = [asyncio.ensure_future(talk(s)) for _, s, _ in live]
        for r in range(runs):
            done = len(min(store.by_key.values(), key=len, default=[]))
            await _until_commits(store, keys, done + 3)
            if r:
                pair = await asyncio.to_thread(pair.swap)
            store.gate.clear()  # what the new primary holds is read before anyone writes again
            await asyncio.to_thread(pair.fail_over)
            row.runs += 1
            row.faults += 1
            back = time.monotonic()
            await _until_commits(store, keys, 0)  # the commits caught by the kill resolve
            for key in keys:
                acked = store.by_key.get(key, [0])[-1]
                info = await _read_info(store.inner, key)
                row.lost += max(0, acked - (info.version if info else 0))
            store.gate.set()
            done = len(min(store.by_key.values(), key=len, default=[]))
            await _until_commits(store, keys, done + 2)
            row.recover.append(time.monotonic() - back)
        stop.set()
        await asyncio.gather(*talkers)
        for key, session, rs in live:
            await _settled(store, rs, session)
            await assert_stored_whole(store, key, session)
        await asyncio.gather(*(_reached(store.inner, key, rs) for key, _, rs in live))
        row.acked = sum(len(v) for v in store.by_key.values())
        if wait_replicas:
            # A commit whose WAIT timed out stands on the primary, logged and counted as
            # under-replicated (a loaded machine can lag a replica past the timeout):
            # only those may be lost, never one the replica acknowledged.
            unreplicated = cast(RedisStore, store.inner).under_replicated
            assert row.lost <= unreplicated, (
                f"{row.lost} acknowledged versions lost despite WAIT, "
                f"{unreplicated} reported under-replicated"
            )
    finally:
        store.gate.set()
        for t in talkers:
            t.cancel()
        await asyncio.gather(*talkers, return_exceptions=True)
        for _key, session, rs in live:
            await rs.aclose()
            await session.aclose()
        await store.aclose()
    rewritten = _reacquired() - rewritten
    row.notes = f"{sessions} sessions checkpointing continuously" + (
        f"; {rewritten:.0f} times a session found the new primary behind what it had "
        "committed and wrote its conversation whole again"
        if rewritten
        else ""
    )
    return row


async def _reached(store: Store, key: str, rs: ResumableSession) -> None:
    """An operator's command still reaches the session's owner after the failovers: its
    inbox listens again on the new primary. Pub/sub is at most once, so a command sent
    while it was not listening yet is sent again, as a caller would."""
    remote = control(store)

    async def paused() -> bool:
        try:
            await remote.pause(key, timeout=1.0)
        except CommandRefused:
            return False
        return True

    await eventually(paused, f"{key}'s owner took a pause after the failover", OUTAGE_DEADLINE)
    assert rs.state == "paused", f"{key}: the command was answered but not applied"
    await remote.resume(key)


def _reacquired() -> float:
    """``livekit_resume_sessions_reacquired`` so far: sessions written whole again after
    the store lost them or versions of them."""
    return REGISTRY.get_sample_value("livekit_resume_sessions_reacquired_total") or 0.0


# Sessions stored before the server starts evicting; enough that some lose keys and some
# keep them all, few enough to stay quick.
EVICTION_SESSIONS = 12


async def eviction(server: RedisServer, *, runs: int) -> Row:
    """Redis under ``allkeys-lru`` evicts keys of stored sessions (a misconfiguration the
    store warns about at open, see docs/multi-worker.md).

    Invariants: every session then either loads whole as the conversation it last
    stored, or is refused with `SnapshotCorrupt` naming what is missing: never a torn
    read, and never "no snapshot" (a silent fresh start) while keys of it remain; `delete`
    (``livekit-resume rm``) leaves no key of it behind.
    """
    import redis.asyncio as redis

    from livekit_resume import SnapshotCorrupt, SnapshotNotFound

    row = Row("Redis evicting session keys (allkeys-lru), then rm", "redis")
    raw = redis.Redis.from_url(server.url)
    try:
        for r in range(runs):
            store = _probe(server.url, "e")
            stored: dict[str, list[str]] = {}
            try:
                for n in range(EVICTION_SESSIONS):
                    key = f"evict-{r}-{n}"
                    session, rs = await _fresh_session(store, key, plain=True)
                    for t in range(2):
                        await store.wait_saved(await _turn(session, store, f"remember {t}"))
                    await rs.suspend()
                    stored[key] = [i.id for i in session.history.items]
                row.runs += 1
                row.acked += len(store.versions_written)
                evicted = await _fill_until_evicted(server, raw, store, list(stored))
                row.faults += evicted
                for key, ids in stored.items():
                    prefix = f"{store.namespace}:{{{key}}}:"
                    try:
                        loaded = await store.load(key)
                        snap = Codec().decode_parts(
                            key, loaded.head, loaded.streams, version=loaded.version
                        )
                        assert [i["id"] for i in snap.history] == ids, f"{key}: torn read"
                    except SnapshotCorrupt:
                        row.lost += 1  # refused loudly: what eviction cost, named
                    except SnapshotNotFound:
                        left = await raw.keys(prefix + "*")
                        assert not left, f"{key}: read as new while {left} remain"
                        row.lost += 1
                    await store.delete(key)
                    assert not await raw.keys(prefix + "*"), f"rm left keys of {key}"
                assert row.lost > 0, "nothing was evicted: the scenario injected no fault"
            finally:
                server.cli("config", "set", "maxmemory", "0")
                await raw.flushall()
                await store.aclose()
    finally:
        await raw.aclose()
    row.notes = (
        f"{row.lost} of {row.runs * EVICTION_SESSIONS} sessions lost keys to eviction (the "
        "lost column counts sessions); each was refused by name, none read torn or as new, "
        "rm left none of their keys"
    )
    return row


async def _fill_until_evicted(server: RedisServer, raw: Any, store: Store, keys: list[str]) -> int:
    """Lower maxmemory and write filler until keys of at least one stored session are
    evicted; return the server's count of evicted keys."""
    used = int(server.cli("info", "memory").split("used_memory:")[1].split()[0])
    server.cli("config", "set", "maxmemory", str(used + 64 * 1024))
    from livekit_resume import SnapshotCorrupt

    async def intact(key: str) -> bool:
        try:
            return await store.info(key) is not None
        except SnapshotCorrupt:
            return False  # a version record is gone: said by name, as it must be

    filler = os.urandom(8 * 1024)
    for n in range(4096):
        await raw.set(f"filler:{n}", filler)
        if n % 32 == 31 and not all([await intact(k) for k in keys]):
            break
    stats = server.cli("info", "stats")
    return int(stats.split("evicted_keys:")[1].split()[0])
