"""Review of 288fa21 by tests: StoreClosed, the SQLite call deadline, the counted gc pause.

Not a repeat of tests/test_worker_hunt.py: edges of each change (a busy_timeout the store
accepts but the new deadline arithmetic cannot take, the busy wait restored after a
shortened call, a read-only store, truncate_wal; gc pauses nested, overlapping, failing
and cancelled; what a session does once autosave stopped on a closed store).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.llm import ChatMessage

import livekit_resume as lr
from livekit_resume import gcpause
from livekit_resume.gcpause import gc_paused
from livekit_resume.stores.base import StoreClosed
from livekit_resume.stores.sqlite.store import SQLiteStore
from tests._gated import bounded, sigterm_kept, until
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import QUIET, REGISTRY, Clerk, Job

__all__ = ["sigterm_kept"]

pytestmark = pytest.mark.filterwarnings("ignore")

_ROOT = str(Path(__file__).resolve().parent.parent)


# ------------------------------------------------------------------ helpers


@pytest.fixture
async def sessions() -> AsyncIterator[list[AgentSession[Any]]]:
    made: list[AgentSession[Any]] = []
    yield made
    for s in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.aclose(), 5)


async def start(
    store: Any, key: str, made: list[AgentSession[Any]], **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session = make_text_session(ScriptedLLM(default=f"noted for {key}"))
    made.append(session)
    kw.setdefault("debounce", 0.01)
    rs = lr.ResumableSession(store, key, registry=REGISTRY, **kw)
    agent = await bounded(rs.restore(session, default=Clerk), f"restore {key}")
    await bounded(session.start(agent), f"start {key}")
    return session, rs


def _hold_write_lock(path: str, held: threading.Event, release: threading.Event) -> None:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(20)
        conn.execute("COMMIT")
    finally:
        conn.close()


@contextlib.contextmanager
def write_locked(path: str, for_s: float | None = None) -> Iterator[threading.Event]:
    """Another connection (another process, to SQLite's locks) holds the write lock;
    released after ``for_s`` seconds, or on leaving."""
    held, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_hold_write_lock, args=(path, held, release), daemon=True)
    t.start()
    assert held.wait(5), "the lock was never taken"
    timer = None
    if for_s is not None:
        timer = threading.Timer(for_s, release.set)
        timer.start()
    try:
        yield release
    finally:
        release.set()
        if timer is not None:
            timer.cancel()
        t.join(5)


def _sleep_on_thread(seconds: float) -> Any:
    def fn(conn: sqlite3.Connection) -> None:
        time.sleep(seconds)

    return fn


def _busy_ms(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA busy_timeout").fetchone()[0])


async def _sqlite(tmp_path: Path, **kw: Any) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path / f"r23-{uuid.uuid4().hex[:6]}.db"), **kw)
    await bounded(store.keys(), "first open")  # creates the file and schema
    return store


# ============================================== 2. SQLite: the call deadline


async def test_an_infinite_busy_timeout_the_store_accepts_still_opens_and_works(
    tmp_path: Path,
) -> None:
    """SQLiteStore validates busy_timeout as ">= 0 (inf is allowed, and waits for ever by
    request)". 288fa21 computes ``int(busy_timeout * 1000)`` in Connection.__init__ and
    ``int((deadline - now) * 1000)`` in `_wait_until`: OverflowError for inf, a store
    that cannot even be constructed (it could before)."""
    path = str(tmp_path / "inf.db")
    store = SQLiteStore(path, busy_timeout=math.inf)  # accepted by the validation
    try:
        await bounded(store.keys(), "a read with busy_timeout=inf")
        with write_locked(path, for_s=0.4):
            lease = await bounded(store.acquire("k", "w", ttl=30), "acquire waits out the lock")
        assert lease.owner == "w"
    finally:
        await store.aclose()


async def test_a_call_queued_past_its_deadline_does_not_leave_the_next_call_unwaited(
    tmp_path: Path,
) -> None:
    """A call that queued past its whole budget runs with busy_timeout 0; the next call,
    made with its full budget, must wait out a lock held for less than busy_timeout."""
    busy = 1.0
    store = await _sqlite(tmp_path, busy_timeout=busy)
    conn = store._conn
    try:
        sleeper = asyncio.ensure_future(conn.run(_sleep_on_thread(busy + 0.3)))
        await asyncio.sleep(0.05)
        seen = await bounded(conn.run(_busy_ms), "the queued call", 5)
        assert seen == 0, f"a call queued past its deadline ran with busy_timeout {seen} ms"
        await sleeper
        full = await bounded(conn.run(_busy_ms), "a fresh call", 5)
        assert full == int(busy * 1000), full
        with write_locked(store.path, for_s=0.4):
            t0 = time.monotonic()
            await bounded(store.acquire("k", "w", ttl=30), "acquire after a 0 ms call", 5)
            assert time.monotonic() - t0 < busy + 0.6
    finally:
        await store.aclose()


async def test_a_shortened_wait_still_waits_for_a_lock_freed_within_it(tmp_path: Path) -> None:
    """Queued behind local work for part of its budget, a call waits what is left: a lock
    freed within that is waited for (not an immediate failure)."""
    busy = 1.5
    store = await _sqlite(tmp_path, busy_timeout=busy)
    try:
        with write_locked(store.path, for_s=0.9):
            sleeper = asyncio.ensure_future(store._conn.run(_sleep_on_thread(0.5)))
            await asyncio.sleep(0.02)
            t0 = time.monotonic()
            lease = await bounded(store.acquire("k", "w", ttl=30), "the queued acquire", 5)
            took = time.monotonic() - t0
            await sleeper
        assert lease.owner == "w"
        assert took < busy + 0.5, took
    finally:
        await store.aclose()


async def test_a_busy_timeout_of_zero_fails_at_once_and_then_works(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path, busy_timeout=0)
    try:
        with write_locked(store.path):
            t0 = time.monotonic()
            with pytest.raises(lr.StoreUnavailable) as got:
                await bounded(store.acquire("k", "w", ttl=30), "acquire on a locked file", 5)
            assert not isinstance(got.value, StoreClosed)
            assert time.monotonic() - t0 < 1.0
        assert await bounded(store._conn.run(_busy_ms), "pragma") == 0
        lease = await bounded(store.acquire("k", "w", ttl=30), "acquire once free")
        assert lease.owner == "w"
    finally:
        await store.aclose()


async def test_truncate_wal_after_a_shortened_call_leaves_the_full_wait_for_the_next(
    tmp_path: Path,
) -> None:
    """truncate_wal reads PRAGMA busy_timeout and puts back what it read: a delete queued
    behind local work (its wait shortened) must not leave a shortened wait that
    `_wait_until` does not know about."""
    busy = 1.0
    store = await _sqlite(tmp_path, busy_timeout=busy)
    try:
        lease = await store.acquire("gone", "w", ttl=30)
        await store.release(lease)
        sleeper = asyncio.ensure_future(store._conn.run(_sleep_on_thread(0.6)))
        await asyncio.sleep(0.02)
        await bounded(store.delete("gone"), "a queued delete", 5)
        await sleeper
        assert await bounded(store._conn.run(_busy_ms), "pragma") == int(busy * 1000)
        with write_locked(store.path, for_s=0.6):
            await bounded(store.acquire("k", "w", ttl=30), "acquire after the delete", 5)
    finally:
        await store.aclose()


async def test_a_read_only_store_queued_reads_work_and_wait_again(tmp_path: Path) -> None:
    busy = 1.0
    writer = await _sqlite(tmp_path, busy_timeout=busy)
    lease = await writer.acquire("k", "w", ttl=30)
    await writer.release(lease)
    ro = SQLiteStore(writer.path, busy_timeout=busy, read_only=True)
    try:
        sleeper = asyncio.ensure_future(ro._conn.run(_sleep_on_thread(busy + 0.2)))
        await asyncio.sleep(0.02)
        keys = await bounded(ro.keys(), "a queued read-only read", 5)
        await sleeper
        assert keys == ["k"], keys
        assert await bounded(ro._conn.run(_busy_ms), "pragma") == int(busy * 1000)
        assert await bounded(ro.info("k"), "info") is not None
    finally:
        await ro.aclose()
        await writer.aclose()


async def test_ten_queued_calls_all_succeed_when_the_lock_frees_in_time(tmp_path: Path) -> None:
    """Ten acquires made at once while another process holds the lock for 0.5 s of a
    1.5 s busy_timeout: all succeed (the later ones have less to wait, but the lock is
    free by then), none waits past busy_timeout."""
    busy = 1.5
    store = await _sqlite(tmp_path, busy_timeout=busy)
    try:
        with write_locked(store.path, for_s=0.5):

            async def one(i: int) -> float:
                t0 = time.monotonic()
                await store.acquire(f"k{i}", "w", ttl=30)
                return time.monotonic() - t0

            took = await bounded(asyncio.gather(*(one(i) for i in range(10))), "acquires", 6)
        assert max(took) < busy + 0.5, took
    finally:
        await store.aclose()


@pytest.mark.parametrize("busy", [0.05, 0.1])
async def test_a_short_busy_timeout_bounds_queued_calls_too(tmp_path: Path, busy: float) -> None:
    """The contract of 288fa21 (failure-model.md): "every call waits at most busy_timeout
    from when it was made, queued or not". `_wait_until` keeps the full wait when what
    is left is within 100 ms of busy_timeout: with busy_timeout <= 0.1 s that is always,
    so ten calls queued on a locked file still wait one full busy_timeout each in turn
    (the tenth ten timeouts), the defect the commit fixed for longer timeouts."""
    store = await _sqlite(tmp_path, busy_timeout=busy)
    try:
        with write_locked(store.path):

            async def one(i: int) -> float:
                t0 = time.monotonic()
                with contextlib.suppress(lr.StoreUnavailable):
                    await store.acquire(f"k{i}", "w", ttl=30)
                return time.monotonic() - t0

            # twenty calls: queued one timeout after another, the last waited 20 x busy
            took = await bounded(asyncio.gather(*(one(i) for i in range(20))), "acquires", 8)
        assert max(took) < busy + 0.4, [round(t, 3) for t in took]
    finally:
        await store.aclose()


_CHILD = r"""
import asyncio, sys, time
sys.path[:0] = {paths!r}
from livekit_resume.stores.sqlite.store import SQLiteStore

async def main():
    store = SQLiteStore({path!r}, busy_timeout={busy!r})
    failures, worst = 0, 0.0
    async def one(i):
        nonlocal failures, worst
        lease = await store.acquire(f"child-{{i}}", "child", ttl=30)
        for n in range(25):
            t0 = time.monotonic()
            try:
                lease = await store.renew(lease, ttl=30)
            except Exception as e:
                failures += 1
                print("FAIL", type(e).__name__, e, flush=True)
            worst = max(worst, time.monotonic() - t0)
    await asyncio.gather(*(one(i) for i in range(5)))
    await store.aclose()
    print("RESULT", failures, worst, flush=True)

asyncio.run(main())
"""


async def test_two_processes_with_several_sessions_each_never_fail_a_short_contention(
    tmp_path: Path,
) -> None:
    """Two processes, five writers each, renewing leases flat out: every lock is held
    for milliseconds, so no call may fail or wait past busy_timeout."""
    import sys

    busy = 2.0
    store = await _sqlite(tmp_path, busy_timeout=busy)
    here = _ROOT
    code = _CHILD.format(paths=[here + "/src", here], path=store.path, busy=busy)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    failures, worst = 0, 0.0
    try:

        async def one(i: int) -> None:
            nonlocal failures, worst
            lease = await store.acquire(f"parent-{i}", "parent", ttl=30)
            for _ in range(25):
                t0 = time.monotonic()
                try:
                    lease = await store.renew(lease, ttl=30)
                except Exception:
                    failures += 1
                worst = max(worst, time.monotonic() - t0)

        await bounded(asyncio.gather(*(one(i) for i in range(5))), "parent writers", 9)
        out, err = await bounded(proc.communicate(), "the child", 9)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.aclose()
    text = out.decode()
    assert "RESULT" in text, (text, err.decode()[-2000:])
    _, c_fail, c_worst = text.strip().splitlines()[-1].split()
    assert failures == 0 and int(c_fail) == 0, text
    assert worst < busy + 1.0 and float(c_worst) < busy + 1.0, (worst, c_worst)


# ============================================== 3. the counted gc pause


@pytest.fixture
def gc_clean() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    assert gcpause._pauses == 0
    yield
    assert gcpause._pauses == 0, f"gc pause counter leaked: {gcpause._pauses}"
    assert gc.isenabled(), "gc left disabled"
    if not was:
        gc.disable()


def test_an_exception_inside_the_pause_ends_it(gc_clean: None) -> None:
    with pytest.raises(ZeroDivisionError), gc_paused():
        assert not gc.isenabled()
        _ = 1 / 0
    assert gc.isenabled() and gcpause._pauses == 0


def test_nested_pauses_on_one_thread_end_with_the_outer(gc_clean: None) -> None:
    with gc_paused():
        with gc_paused():
            with pytest.raises(KeyError), gc_paused():
                raise KeyError("x")
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_pause_false_inside_a_pause_changes_nothing(gc_clean: None) -> None:
    with gc_paused():
        with gc_paused(False):
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with gc_paused(False):
        assert gc.isenabled()


def test_a_loop_pause_inside_a_threads_pause_that_ends_first(gc_clean: None) -> None:
    """Thread pause starts; the loop's pause starts; the thread's ends (raising); gc
    stays off until the loop's ends."""
    inside, go, done = threading.Event(), threading.Event(), threading.Event()

    def thread() -> None:
        try:
            with gc_paused():
                inside.set()
                go.wait(5)
                raise RuntimeError("decode failed")
        except RuntimeError:
            pass
        finally:
            done.set()

    t = threading.Thread(target=thread)
    t.start()
    assert inside.wait(5)
    with gc_paused():
        go.set()
        assert done.wait(5)
        assert not gc.isenabled(), "the thread's pause ending turned gc on under the loop's"
    t.join(5)
    assert gc.isenabled()


def test_the_app_turned_gc_off_before_any_mix_stays_off(gc_clean: None) -> None:
    gc.disable()
    try:
        inside, go = threading.Event(), threading.Event()

        def thread() -> None:
            with gc_paused():
                inside.set()
                go.wait(5)

        t = threading.Thread(target=thread)
        t.start()
        assert inside.wait(5)
        with gc_paused(), gc_paused():
            go.set()
        t.join(5)
        with contextlib.suppress(ValueError), gc_paused():
            raise ValueError
        assert not gc.isenabled(), "a pause turned on a collector the app had turned off"
        assert gcpause._pauses == 0
    finally:
        gc.enable()


def test_many_threads_random_nesting_and_failures_leave_gc_on(gc_clean: None) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        barrier.wait(5)
        for _ in range(300):
            depth = rnd.randint(1, 3)
            try:
                with contextlib.ExitStack() as stack:
                    for _ in range(depth):
                        stack.enter_context(gc_paused(rnd.random() < 0.9))
                    if rnd.random() < 0.01:
                        time.sleep(0.001)
                    if rnd.random() < 0.3:
                        raise ValueError("boom")
            except ValueError:
                pass
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(9)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert gcpause._pauses == 0 and gc.isenabled()


async def test_cancelling_the_awaiting_task_while_a_thread_decodes_leaves_gc_on(
    gc_clean: None,
) -> None:
    """asyncio.to_thread cancelled: the thread runs on to its end; the pause ends there."""
    inside, go = threading.Event(), threading.Event()
    finished = threading.Event()

    def decode() -> None:
        with gc_paused():
            inside.set()
            go.wait(5)
        finished.set()

    task = asyncio.ensure_future(asyncio.to_thread(decode))
    await bounded(asyncio.to_thread(inside.wait, 5), "decoding")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not gc.isenabled()  # the thread still decodes
    go.set()
    await bounded(asyncio.to_thread(finished.wait, 5), "decode done")
    await until(lambda: gc.isenabled(), "gc on again")


async def test_a_real_restore_cancelled_mid_decode_leaves_gc_on(
    gc_clean: None, sessions: list[AgentSession[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long history restores on a worker thread (`_decode` in a gc pause); the restore
    is cancelled while it decodes (a job shut down). gc is on again once it ends, and a
    later restore of the key works."""
    from livekit_resume.agent_hooks import session as session_mod

    store = lr.open_store("memory://")
    key = f"long-{uuid.uuid4().hex[:4]}"
    session, rs = await start(store, key, sessions, autosave=False)
    for n in range(2000):
        session.history.items.append(ChatMessage(role="user", content=[f"note {n}"]))
    await bounded(rs.checkpoint(), "checkpoint")
    await bounded(rs.suspend(), "suspend")

    real = session_mod.build_items  # type: ignore[attr-defined]
    inside, go = threading.Event(), threading.Event()

    def gated(snap: Any) -> Any:
        inside.set()
        go.wait(5)
        return real(snap)

    monkeypatch.setattr(session_mod, "build_items", gated)
    s2 = make_text_session(ScriptedLLM(default="x"))
    sessions.append(s2)
    rs2 = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    task = asyncio.ensure_future(rs2.restore(s2, default=Clerk))
    await bounded(asyncio.to_thread(inside.wait, 5), "decoding on a thread")
    assert not gc.isenabled()
    task.cancel()
    go.set()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await bounded(task, "cancelled restore", 5)
    await until(lambda: gc.isenabled(), "gc on again after the cancelled restore", 5)
    monkeypatch.setattr(session_mod, "build_items", real)
    s3 = make_text_session(ScriptedLLM(default="y"))
    sessions.append(s3)
    rs3 = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    await bounded(rs3.restore(s3, default=Clerk, takeover=True), "restore again", 8)
    assert rs3.resumed
    await bounded(rs3.aclose(), "close")
    await store.aclose()


# ============================================== 1. StoreClosed


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_after_the_store_closed_autosave_stops_and_the_session_says_so_clearly(
    kind: str, tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    """The app closed the store under a live session with autosave: the save loop stops
    (failures counted), on_lost is not called (no takeover), the session stays active
    (the voice loop goes on), a checkpoint raises StoreClosed (a StoreUnavailable) at
    once, and the close ends quickly as closed."""
    store: Any = (
        lr.open_store("memory://")
        if kind == "memory"
        else lr.open_store(f"sqlite:///{tmp_path}/c.db")
    )
    lost: list[Any] = []

    async def on_lost(e: Any) -> None:
        lost.append(e)

    session, rs = await start(store, f"c-{uuid.uuid4().hex[:4]}", sessions, on_lost=on_lost)
    await bounded(session.run(user_input="turn 0"), "turn 0")
    # sampled before the close: turn 0's autosave, debounced and late under load, may be
    # the save that meets the closed store, while aclose is still running
    before = rs._autosave.failures
    await bounded(store.aclose(), "store close")
    await bounded(session.run(user_input="turn 1"), "turn 1 after the store closed")
    await until(lambda: rs._autosave.failures > before, "autosave met the closed store")
    await until(lambda: all(t.done() for t in rs._autosave._tasks[:1]), "save loop stopped")
    assert rs.state == "active"
    assert not lost, lost
    t0 = time.monotonic()
    with pytest.raises(StoreClosed):
        await bounded(rs.checkpoint(), "checkpoint on a closed store")
    assert time.monotonic() - t0 < 2.0
    # the voice loop goes on
    await bounded(session.run(user_input="turn 2"), "turn 2")
    t0 = time.monotonic()
    await bounded(rs.aclose(), "close", 5)
    assert time.monotonic() - t0 < 3.0
    assert rs.state == "closed"  # type: ignore[comparison-overlap]
    assert not lost


async def test_the_command_listener_stops_on_a_closed_sqlite_store(
    tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    store = lr.open_store(f"sqlite:///{tmp_path}/l.db")
    _session, rs = await start(store, f"l-{uuid.uuid4().hex[:4]}", sessions)
    await bounded(rs._control.listening.wait(), "listening")
    await bounded(store.aclose(), "store close")
    await until(lambda: not rs._control.listening.is_set(), "the listener noticed", 8)
    await bounded(rs.aclose(), "close", 5)


async def test_a_sqlite_store_closed_while_calls_are_in_flight_finishes_them(
    tmp_path: Path,
) -> None:
    """aclose racing calls already queued on the store's thread: those calls complete
    (they were made before the close); only later ones are StoreClosed."""
    store = await _sqlite(tmp_path, busy_timeout=2.0)
    sleeper = asyncio.ensure_future(store._conn.run(_sleep_on_thread(0.3)))
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(store.acquire(f"q{i}", "w", ttl=30)) for i in range(3)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(store.aclose())
    await asyncio.sleep(0)
    with pytest.raises(StoreClosed):
        await store.keys()
    got = await bounded(asyncio.gather(sleeper, *queued, return_exceptions=True), "queued", 5)
    await bounded(closing, "close", 5)
    assert not [g for g in got if isinstance(g, BaseException)], got


async def test_a_forked_childs_reused_sqlite_store_is_not_reported_closed(tmp_path: Path) -> None:
    """A SQLite store used before a fork: the child's calls are StoreUnavailable (open a
    new store), not StoreClosed (which would stop autosave for good as a close by the
    app). Here: the child's error type, reported back through a pipe."""
    import os

    store = await _sqlite(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)

            async def child() -> str:
                try:
                    await store.keys()
                except Exception as e:
                    return type(e).__name__
                return "ok"

            name = asyncio.new_event_loop().run_until_complete(child())
            os.write(w, name.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = await bounded(asyncio.to_thread(os.read, r, 100), "the child's answer", 8)
    finally:
        os.close(r)
        await asyncio.to_thread(os.waitpid, pid, 0)
        await store.aclose()
    assert got.decode() == "StoreUnavailable", got


async def test_a_job_closes_the_store_it_opened_only_after_its_sessions_final_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resumable_job with no store opens one (RESUME_STORE) and closes it in its
    shutdown callback, after `rs.aclose()`: the last turn, never checkpointed, is in
    the file and the lease is given back (StoreClosed would have cut both)."""
    path = tmp_path / "job.db"
    monkeypatch.setenv("RESUME_STORE", f"sqlite:///{path}")
    name = f"job-{uuid.uuid4().hex[:4]}"
    j = Job(name)
    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await bounded(
        lr.resumable_job(
            j.ctx,
            session,
            registry=REGISTRY,
            default=Clerk,
            room_options=QUIET,
            leave_grace=None,
            debounce=30.0,  # autosave would not save the last turn before the shutdown
        ),
        "resumable_job",
    )
    await bounded(session.run(user_input="the last words"), "a turn")
    # LiveKit's order: callbacks first here (the session's own close after): the
    # job's callback must save and release before closing the store it opened
    for callback in list(j.ctx._shutdown_callbacks):
        await bounded(callback("job ended"), "shutdown callback", 8)
    await bounded(session.aclose(), "session close", 5)
    assert rs.state == "closed"
    check = SQLiteStore(str(path))
    try:
        info = await check.info(name)
        assert info is not None and info.owner is None, info
        stored = await check.load(name)
        from livekit_resume.snapshot.codec import Codec

        snap = Codec().decode_parts(name, stored.head, stored.streams, version=stored.version)
        texts = [str(c) for i in snap.history if i["type"] == "message" for c in i["content"]]
        assert "the last words" in texts, texts
    finally:
        await check.aclose()
