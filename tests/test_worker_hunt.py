"""Hunt: one worker process, many sessions at once over ONE shared store object.

A LiveKit worker's sessions (and in thread/in-process executors, its jobs) share one
store: a memory store, one SQLite store (one connection on one worker thread) or one
Redis store (one pool and one subscriber connection for every inbox). These tests run
5-30 real `AgentSession`s (text mode, the scripted LLM) over one store and look for
interference: the GC pause of a restore (process-global), commands aimed at one session,
one session's failure or close, and many suspends and restores at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.llm import ChatMessage

import livekit_resume as lr
from livekit_resume.agent_hooks import session as session_mod
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests._gated import bounded, sigterm_kept, until
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import REGISTRY, Clerk

__all__ = ["sigterm_kept"]

pytestmark = pytest.mark.filterwarnings("ignore")

LONG = 2000  # items: far past OFFLOAD_ITEMS, the decode runs on a worker thread


# ------------------------------------------------------------------ helpers


async def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **kw: Any) -> Store:
    if kind == "memory":
        return lr.open_store("memory://", **kw)
    if kind == "sqlite":
        return lr.open_store(f"sqlite:///{tmp_path}/worker-{uuid.uuid4().hex[:6]}.db", **kw)
    from tests.redis_servers import build_redis_store

    store: Store = await build_redis_store(
        "redis", request, namespace=f"w{uuid.uuid4().hex[:10]}", **kw
    )
    return store


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await _open(request.param, request, tmp_path)
    yield s
    await s.aclose()


@pytest.fixture
async def sessions() -> AsyncIterator[list[AgentSession[Any]]]:
    made: list[AgentSession[Any]] = []
    yield made
    for s in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.aclose(), 5)


async def start(
    store: Store,
    key: str,
    made: list[AgentSession[Any]],
    *,
    autosave: bool = True,
    **kw: Any,
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session = make_text_session(ScriptedLLM(default=f"noted for {key}"))
    made.append(session)
    rs = lr.ResumableSession(store, key, registry=REGISTRY, debounce=0.01, autosave=autosave, **kw)
    agent = await bounded(rs.restore(session, default=Clerk), f"restore {key}")
    await bounded(session.start(agent), f"start {key}")
    return session, rs


async def saved_texts(store: Store, key: str) -> tuple[list[str], list[str]]:
    """The stored (latest) version's message texts and item ids, of ``key``."""
    stored = await store.load(key)
    snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
    texts = [
        " ".join(str(c) for c in item["content"])
        for item in snap.history
        if item["type"] == "message"
    ]
    return texts, [item["id"] for item in snap.history]


def user_texts(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in i.content)
        for i in session.history.items
        if i.type == "message" and i.role == "user"
    ]


async def long_session(store: Store, key: str, made: list[AgentSession[Any]]) -> None:
    """``key`` stored with a LONG-item history, suspended (no owner)."""
    session, rs = await start(store, key, made, autosave=False)
    for n in range(LONG):
        session.history.items.append(ChatMessage(role="user", content=[f"{key} note {n}"]))
    await bounded(rs.checkpoint(), "checkpoint")
    await bounded(rs.suspend(), "suspend")


# ----------------------------------------------------------- 1. the GC pause of a restore


class _Gated:
    """Wraps `build_items` (run inside `_decode`'s GC pause, on a worker thread for a
    long history): each call notes it is inside and waits until let go."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.inside: list[threading.Event] = [threading.Event(), threading.Event()]
        self.go: list[threading.Event] = [threading.Event(), threading.Event()]
        self.gc_inside: list[bool] = []
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, snap: Any) -> Any:
        with self.lock:
            i = self.n
            self.n += 1
        if i < 2:
            self.inside[i].set()
            self.go[i].wait(10)
            self.gc_inside.append(gc.isenabled())
        return self.real(snap)

    def release(self) -> None:
        for ev in self.go:
            ev.set()


async def _wait_thread(ev: threading.Event, what: str) -> None:
    await bounded(asyncio.to_thread(ev.wait, 8), what)
    assert ev.is_set(), what


@pytest.fixture
async def memstore() -> AsyncIterator[Store]:
    s = lr.open_store("memory://")
    yield s
    await s.aclose()


async def test_two_overlapping_threaded_restores_leave_gc_enabled(
    memstore: Store, sessions: list[AgentSession[Any]]
) -> None:
    await long_session(memstore, "gc-a", sessions)
    await long_session(memstore, "gc-b", sessions)
    assert gc.isenabled()
    a, b = make_text_session(ScriptedLLM()), make_text_session(ScriptedLLM())
    sessions += [a, b]
    ra = lr.ResumableSession(memstore, "gc-a", registry=REGISTRY, autosave=False)
    rb = lr.ResumableSession(memstore, "gc-b", registry=REGISTRY, autosave=False)
    await bounded(asyncio.gather(ra.restore(a, default=Clerk), rb.restore(b, default=Clerk)))
    assert gc.isenabled()
    assert len(a.history.items) >= LONG and len(b.history.items) >= LONG
    await ra.aclose()
    await rb.aclose()
    assert gc.isenabled()


async def test_overlapping_restores_keep_gc_off_when_the_app_turned_it_off(
    memstore: Store, sessions: list[AgentSession[Any]]
) -> None:
    await long_session(memstore, "gc-c", sessions)
    await long_session(memstore, "gc-d", sessions)
    gc.disable()
    try:
        a, b = make_text_session(ScriptedLLM()), make_text_session(ScriptedLLM())
        sessions += [a, b]
        ra = lr.ResumableSession(memstore, "gc-c", registry=REGISTRY, autosave=False)
        rb = lr.ResumableSession(memstore, "gc-d", registry=REGISTRY, autosave=False)
        await bounded(asyncio.gather(ra.restore(a, default=Clerk), rb.restore(b, default=Clerk)))
        assert not gc.isenabled(), "a restore turned on the GC the app had turned off"
        await ra.aclose()
        await rb.aclose()
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_one_restores_pause_ending_does_not_end_anothers_still_decoding(
    memstore: Store, sessions: list[AgentSession[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore A pauses GC; B's decode starts meanwhile (sees GC off: takes no pause of
    its own); A ends and turns GC on under B, still decoding its 2,000 items."""
    await long_session(memstore, "gc-g", sessions)
    await long_session(memstore, "gc-h", sessions)
    gated = _Gated(session_mod.build_items)  # type: ignore[attr-defined]
    monkeypatch.setattr(session_mod, "build_items", gated)
    a, b = make_text_session(ScriptedLLM()), make_text_session(ScriptedLLM())
    sessions += [a, b]
    ra = lr.ResumableSession(memstore, "gc-g", registry=REGISTRY, autosave=False)
    rb = lr.ResumableSession(memstore, "gc-h", registry=REGISTRY, autosave=False)
    try:
        ta = asyncio.ensure_future(ra.restore(a, default=Clerk))
        await _wait_thread(gated.inside[0], "A's decode")
        tb = asyncio.ensure_future(rb.restore(b, default=Clerk))
        await _wait_thread(gated.inside[1], "B's decode")
        gated.go[0].set()
        await bounded(ta, "A restored")
        gated.go[1].set()
        await bounded(tb, "B restored")
        assert gc.isenabled()
        assert gated.gc_inside[1] is False, "B's decode ran with GC on: A's pause ended under it"
    finally:
        gated.release()
        gc.enable()
        await ra.aclose()
        await rb.aclose()


# ------------------------------------- 4. many sessions suspending and restored at once


def _check_conversation(key: str, texts: list[str], ids: list[str], turns: int) -> None:
    users = [t for t in texts if t.startswith("turn ")]
    assert users == [f"turn {n} of {key}" for n in range(turns)], (key, texts)
    others = [t for t in texts if " of " in t or "noted for" in t]
    assert all(t.endswith(key) for t in others), (key, texts)
    assert texts.count(f"noted for {key}") == turns, (key, texts)
    assert len(ids) == len(set(ids)), (key, ids)


async def _turn(session: AgentSession[Any], key: str, n: int) -> None:
    await bounded(session.run(user_input=f"turn {n} of {key}"), f"turn {n} of {key}")


@pytest.mark.parametrize("n_sessions", [20])
async def test_twenty_sessions_suspend_and_restore_at_once_without_crossing(
    shared: Store, sessions: list[AgentSession[Any]], n_sessions: int
) -> None:
    keys = [f"room-{i:02d}-{uuid.uuid4().hex[:4]}" for i in range(n_sessions)]
    live: dict[str, tuple[AgentSession[Any], lr.ResumableSession]] = {}

    async def first(key: str) -> None:
        live[key] = await start(shared, key, sessions)
        await _turn(live[key][0], key, 0)
        await bounded(live[key][1].checkpoint(), "checkpoint")

    await bounded(asyncio.gather(*(first(k) for k in keys)), "all started", 60)

    async def cycle(i: int, key: str) -> None:
        _session, rs = live[key]
        await bounded(rs.suspend(), f"suspend {key}")
        assert rs.state == "suspended"
        fresh = make_text_session(ScriptedLLM(default=f"noted for {key}"))
        sessions.append(fresh)
        if i % 2 == 0:  # in place: the same ResumableSession restores again
            rs2 = rs
        else:
            rs2 = lr.ResumableSession(shared, key, registry=REGISTRY, debounce=0.01)
        agent = await bounded(rs2.restore(fresh, default=Clerk), f"restore {key}")
        assert rs2.resumed
        await bounded(fresh.start(agent), f"start {key}")
        live[key] = (fresh, rs2)
        await _turn(fresh, key, 1)
        await bounded(rs2.checkpoint(), "checkpoint")
        await _turn(fresh, key, 2)
        await bounded(rs2.checkpoint(), "checkpoint")

    await bounded(asyncio.gather(*(cycle(i, k) for i, k in enumerate(keys))), "cycles", 90)

    for key in keys:
        session, _rs = live[key]
        assert user_texts(session) == [f"turn {n} of {key}" for n in range(3)]
        texts, ids = await saved_texts(shared, key)
        _check_conversation(key, texts, ids, 3)
    await bounded(asyncio.gather(*(rs.aclose() for _, rs in live.values())), "closes", 30)
    for key in keys:
        texts, ids = await saved_texts(shared, key)
        _check_conversation(key, texts, ids, 3)


# ------------------------------------- 2. commands aimed at one session among many


async def _listening(rs: lr.ResumableSession) -> None:
    await bounded(rs._control.listening.wait(), f"{rs.key} listening")


async def test_a_command_reaches_only_its_session_while_others_come_and_go(
    shared: Store, sessions: list[AgentSession[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from livekit_resume.stores.redis import control as redis_control

    monkeypatch.setattr(redis_control, "LINGER", 0.3)
    keys = [f"cmd-{i}-{uuid.uuid4().hex[:4]}" for i in range(8)]
    live: dict[str, tuple[AgentSession[Any], lr.ResumableSession]] = {}
    for key in keys:
        live[key] = await start(shared, key, sessions)
    for _, rs in live.values():
        await _listening(rs)
    remote = lr.control(shared)
    k = keys

    async def swap(key: str) -> None:  # suspended, then restored into a new session
        await live[key][1].suspend()
        live[key] = await start(shared, key, sessions)
        await _listening(live[key][1])

    results = await bounded(
        asyncio.gather(
            remote.pause(k[0], timeout=8),
            live[k[1]][1].suspend(),
            live[k[2]][1].aclose(),
            swap(k[3]),
            *(live[key][0].run(user_input=f"turn 0 of {key}") for key in k[4:]),
            return_exceptions=True,
        ),
        "the mixed burst",
        20,
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert live[k[0]][1].state == "paused"
    assert live[k[1]][1].state == "suspended"
    assert live[k[2]][1].state == "closed"
    assert live[k[3]][1].state == "active"
    for key in k[4:]:
        assert live[key][1].state == "active", key

    # a command to one of the survivors reaches it and nobody else
    assert await bounded(remote.pause(k[5], timeout=8), "pause k5") == live[k[5]][1].version
    assert live[k[5]][1].state == "paused"
    for key in (k[3], k[4], k[6], k[7]):
        assert live[key][1].state == "active", key
    # the swapped one still hears its commands on the shared channel
    await bounded(remote.pause(k[3], timeout=8), "pause k3")
    assert live[k[3]][1].state == "paused"

    # close every session but k0, one after another: k0 still hears
    for key in (k[3], k[4], k[5], k[6], k[7]):
        await bounded(live[key][1].aclose(), f"close {key}")
    await bounded(remote.resume(k[0], timeout=8), "resume k0")
    assert live[k[0]][1].state == "active"
    await bounded(live[k[0]][1].suspend(), "suspend k0")

    # nobody left: a session restored now (and again after the kept connection's
    # LINGER has passed) still gets commands
    live[k[4]] = await start(shared, k[4], sessions)
    await _listening(live[k[4]][1])
    await bounded(remote.pause(k[4], timeout=8), "pause after all closed")
    assert live[k[4]][1].state == "paused"
    await bounded(live[k[4]][1].aclose(), "close")
    await asyncio.sleep(1.0)  # past LINGER (0.3 s here)
    live[k[6]] = await start(shared, k[6], sessions)
    await _listening(live[k[6]][1])
    await bounded(remote.pause(k[6], timeout=8), "pause after LINGER")
    assert live[k[6]][1].state == "paused"
    await bounded(live[k[6]][1].aclose(), "close")


async def test_concurrent_restores_of_many_keys_all_listen_and_answer(
    shared: Store, sessions: list[AgentSession[Any]]
) -> None:
    """30 restores at once subscribe over the shared hub (Redis: one connection, one
    lock); each then answers its own pause, and only its own."""
    keys = [f"many-{i:02d}-{uuid.uuid4().hex[:4]}" for i in range(30)]
    pairs = await bounded(
        asyncio.gather(*(start(shared, key, sessions, autosave=False) for key in keys)),
        "30 restores",
        30,
    )
    live = dict(zip(keys, pairs, strict=True))
    for _, rs in pairs:
        await _listening(rs)
    remote = lr.control(shared)
    await bounded(
        asyncio.gather(*(remote.pause(key, timeout=8) for key in keys[::2])), "pauses", 20
    )
    for i, key in enumerate(keys):
        assert live[key][1].state == ("paused" if i % 2 == 0 else "active"), key
    await bounded(asyncio.gather(*(rs.aclose() for _, rs in pairs)), "closes", 20)


# --------------------------------- 3. one session's trouble, and the shared store's close


async def test_one_sessions_aclose_leaves_the_shared_store_open(
    shared: Store, sessions: list[AgentSession[Any]]
) -> None:
    keys = [f"own-{i}-{uuid.uuid4().hex[:4]}" for i in range(5)]
    live = {key: await start(shared, key, sessions) for key in keys}
    await bounded(live[keys[0]][1].aclose(), "one closes")
    await bounded(live[keys[0]][0].aclose(), "its AgentSession closes")
    for key in keys[1:]:
        session, rs = live[key]
        await _turn(session, key, 0)
        await bounded(rs.checkpoint(), f"{key} checkpoint after another closed")
        texts, ids = await saved_texts(shared, key)
        _check_conversation(key, texts, ids, 1)
    # a new session on the same store object, after one closed
    session, rs = await start(shared, keys[0], sessions)
    await _turn(session, keys[0], 0)
    await bounded(rs.checkpoint(), "checkpoint")
    await bounded(asyncio.gather(*(rs.aclose() for _, rs in live.values()), rs.aclose()), "all")


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_the_store_closed_under_running_sessions_gives_errors_not_hangs(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    store = await _open(kind, request, tmp_path)
    keys = [f"shut-{i}-{uuid.uuid4().hex[:4]}" for i in range(6)]
    live = {key: await start(store, key, sessions) for key in keys}
    for key in keys:
        await _turn(live[key][0], key, 0)
    await bounded(store.aclose(), "store.aclose", 5)
    loop = asyncio.get_running_loop()

    async def each(key: str) -> tuple[str, Any, float]:
        _session, rs = live[key]
        t0 = loop.time()
        try:
            out: Any = await asyncio.wait_for(rs.checkpoint(), 6)
        except TimeoutError:
            out = "hang"
        except Exception as e:
            out = e
        return key, out, loop.time() - t0

    got = await bounded(asyncio.gather(*(each(k) for k in keys)), "checkpoints", 9)
    for key, out, took in got:
        assert isinstance(out, lr.ResumeError), (key, out)
        assert took < 3.0, (key, out, took)
    # the live voice loop goes on (autosave fails in the background, never into it)
    await _turn(live[keys[1]][0], keys[1], 1)
    # closing each session ends, bounded (its final save fails, clearly)
    t0 = loop.time()
    res = await bounded(
        asyncio.gather(*(rs.aclose() for _, rs in live.values()), return_exceptions=True),
        "closes after the store closed",
        9,
    )
    assert loop.time() - t0 < 8.0, res


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_closing_a_session_after_the_store_closed_does_not_wait_out_the_budget(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    """A store closed by the app (a worker's shutdown callback that closes the store
    before its sessions) answers `StoreUnavailable("... is closed; open a new one")`,
    which no retry can change. A session's close then retries its final save for the
    whole CLOSE_SAVE_BUDGET (5 s) of LiveKit's ~10 s shutdown window."""
    store = await _open(kind, request, tmp_path)
    session, rs = await start(store, f"late-{uuid.uuid4().hex[:4]}", sessions)
    await _turn(session, rs.key, 0)
    await bounded(store.aclose(), "store.aclose", 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await bounded(rs.aclose(), "close", 9)
    took = loop.time() - t0
    assert took < 3.0, f"the close retried a closed store for {took:.1f} s"


async def test_one_killed_redis_connection_breaks_no_sessions_saves(
    disposable_redis: Any, sessions: list[AgentSession[Any]]
) -> None:
    store = lr.open_store(disposable_redis.url, namespace=f"kill{uuid.uuid4().hex[:6]}")
    try:
        keys = [f"kill-{i}-{uuid.uuid4().hex[:4]}" for i in range(10)]
        live = {key: await start(store, key, sessions, autosave=False) for key in keys}
        for _, rs in live.values():
            await _listening(rs)
        await bounded(asyncio.gather(*(rs.checkpoint() for _, rs in live.values())), "first saves")
        clients = disposable_redis.cli("CLIENT", "LIST").splitlines()
        normal = [ln for ln in clients if " cmd=client" not in ln and "sub=0" in ln]
        assert normal, clients
        cid = normal[0].split()[0].split("=")[1]
        disposable_redis.cli("CLIENT", "KILL", "ID", cid)

        async def turn_and_save(key: str) -> None:
            session, rs = live[key]
            await _turn(session, key, 0)
            await rs.checkpoint()

        res = await bounded(
            asyncio.gather(*(turn_and_save(k) for k in keys), return_exceptions=True),
            "saves after one connection was killed",
        )
        assert not [r for r in res if isinstance(r, BaseException)], res
        for key in keys:
            texts, ids = await saved_texts(store, key)
            _check_conversation(key, texts, ids, 1)
        # and the subscriber connection killed: every owner listens again
        disposable_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        remote = lr.control(store)

        async def paused(key: str) -> None:
            for _ in range(20):
                try:
                    await remote.pause(key, timeout=1.0)
                    return
                except lr.CommandRefused:
                    await asyncio.sleep(0.2)
            raise AssertionError(f"{key} never heard its pause again")

        await bounded(asyncio.gather(*(paused(k) for k in keys[:5])), "pauses", 9)
        for i, key in enumerate(keys):
            assert live[key][1].state == ("paused" if i < 5 else "active"), key
        await bounded(asyncio.gather(*(rs.aclose() for _, rs in live.values())), "closes")
    finally:
        await store.aclose()


def _hold_write_lock(path: str, held: threading.Event, release: threading.Event) -> None:
    import sqlite3

    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(20)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_another_process_locking_the_sqlite_file_delays_no_save_for_good(
    tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    path = str(tmp_path / "busy.db")
    store = lr.open_store(f"sqlite:///{path}", busy_timeout=0.2)
    try:
        keys = [f"busy-{i}-{uuid.uuid4().hex[:4]}" for i in range(10)]
        live = {key: await start(store, key, sessions) for key in keys}
        held, release = threading.Event(), threading.Event()
        locker = asyncio.ensure_future(asyncio.to_thread(_hold_write_lock, path, held, release))
        await _wait_thread(held, "the lock held")
        await bounded(
            asyncio.gather(*(live[k][0].run(user_input=f"turn 0 of {k}") for k in keys)),
            "turns while the file is locked (the voice loop is never blocked)",
        )
        await asyncio.sleep(1.0)
        release.set()
        await bounded(locker, "the lock released")

        async def stored(key: str) -> bool:
            try:
                texts, _ = await saved_texts(store, key)
            except lr.ResumeError:
                return False
            return f"turn 0 of {key}" in texts

        for key in keys:
            for _ in range(80):
                if await stored(key):
                    break
                await asyncio.sleep(0.1)
            texts, ids = await saved_texts(store, key)
            _check_conversation(key, texts, ids, 1)
        await bounded(asyncio.gather(*(rs.aclose() for _, rs in live.values())), "closes")
    finally:
        await store.aclose()


async def test_a_locked_sqlite_file_fails_each_save_within_its_busy_timeout(
    tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    """busy_timeout "is how long an operation waits for another process's write lock
    before StoreUnavailable" (SQLiteStore). The store runs every call on one thread, and
    each call waits out its busy_timeout there in turn: with N sessions saving at once,
    the last one waits N x busy_timeout (and every other call of every session, lease
    renewals and command polls included, waits behind them)."""
    path = str(tmp_path / "locked.db")
    busy = 0.3
    store = lr.open_store(f"sqlite:///{path}", busy_timeout=busy)
    held, release = threading.Event(), threading.Event()
    locker: asyncio.Future[None] | None = None
    try:
        keys = [f"lock-{i}-{uuid.uuid4().hex[:4]}" for i in range(8)]
        live = {key: await start(store, key, sessions, autosave=False) for key in keys}
        for key in keys:
            await _turn(live[key][0], key, 0)
        locker = asyncio.ensure_future(asyncio.to_thread(_hold_write_lock, path, held, release))
        await _wait_thread(held, "the lock held")
        loop = asyncio.get_running_loop()

        async def timed(key: str) -> tuple[Any, float]:
            t0 = loop.time()
            try:
                out: Any = await live[key][1].checkpoint()
            except Exception as e:
                out = e
            return out, loop.time() - t0

        got = await bounded(asyncio.gather(*(timed(k) for k in keys)), "checkpoints", 9)
        for out, _ in got:
            assert isinstance(out, lr.StoreUnavailable), out
        worst = max(t for _, t in got)
        assert worst < 4 * busy + 0.3, f"a save waited {worst:.2f} s with busy_timeout={busy} s"
    finally:
        release.set()
        if locker is not None:
            await bounded(locker, "the lock released")
        await store.aclose()


async def test_the_event_stream_tells_each_sessions_changes_in_order(
    redis_server: Any, sessions: list[AgentSession[Any]]
) -> None:
    """One store's event channel carries the state changes of all its sessions: each
    key's pause, resume and suspend arrive, in its own order, under its own key."""
    store = lr.open_store(redis_server.url, namespace=f"ev{uuid.uuid4().hex[:6]}")
    try:
        keys = [f"ev-{i}-{uuid.uuid4().hex[:4]}" for i in range(10)]
        live = {key: await start(store, key, sessions, autosave=False) for key in keys}
        seen: dict[str, list[str]] = {k: [] for k in keys}
        async with store.subscribe() as events:  # type: ignore[attr-defined]

            async def read() -> None:
                async for ev in events:
                    if ev["key"] in seen and ev["event"] != "committed":
                        seen[ev["key"]].append(ev["event"])

            reader = asyncio.ensure_future(read())

            async def cycle(key: str) -> None:
                rs = live[key][1]
                await rs.pause()
                await rs.resume()
                await rs.suspend()

            await bounded(asyncio.gather(*(cycle(k) for k in keys)), "cycles")
            await until(lambda: all("suspended" in v for v in seen.values()), "events", 5)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for key, evs in seen.items():
            core = [e for e in evs if e in ("paused", "resumed", "suspended")]
            assert core == ["paused", "resumed", "suspended"], (key, evs)
    finally:
        await store.aclose()


async def test_a_takeover_in_the_same_worker_fences_only_that_session(
    shared: Store, sessions: list[AgentSession[Any]]
) -> None:
    keys = [f"fence-{i}-{uuid.uuid4().hex[:4]}" for i in range(5)]
    live = {key: await start(shared, key, sessions) for key in keys}
    for key in keys:
        await _turn(live[key][0], key, 0)
        await bounded(live[key][1].checkpoint(), "checkpoint")
    _old_session, old = live[keys[0]]
    fresh = make_text_session(ScriptedLLM(default=f"noted for {keys[0]}"))
    sessions.append(fresh)
    new = lr.ResumableSession(shared, keys[0], registry=REGISTRY, debounce=0.01)
    await bounded(fresh.start(await new.restore(fresh, default=Clerk, takeover=True)), "takeover")
    with pytest.raises(lr.LeaseLost):
        await bounded(old.checkpoint(reason="manual"), "zombie checkpoint")
    await _turn(fresh, keys[0], 1)
    await bounded(new.checkpoint(), "new owner saves")
    for key in keys[1:]:
        await _turn(live[key][0], key, 1)
        await bounded(live[key][1].checkpoint(), f"{key} saves")
    texts, ids = await saved_texts(shared, keys[0])
    _check_conversation(keys[0], texts, ids, 2)
    for key in keys[1:]:
        texts, ids = await saved_texts(shared, key)
        _check_conversation(key, texts, ids, 2)
    await bounded(
        asyncio.gather(new.aclose(), *(live[k][1].aclose() for k in keys), return_exceptions=True),
        "closes",
    )
