"""What only the SQLite store promises: several OS processes on one file, typed errors
for a bad file, an event loop never blocked, and ``open_store("sqlite:///…")``.

The store contract itself is checked by test_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from livekit_resume.errors import (
    IncompatibleSnapshot,
    LeaseLost,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreUnavailable,
)
from livekit_resume.stores.base import Commit, Record, Store
from livekit_resume.stores.log import needs_compaction
from livekit_resume.stores.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteStore
from livekit_resume.stores.url import open_store

WRITER = Path(__file__).with_name("_sqlite_writer.py")
KEY = "room-7"
# Generous: a child on a loaded CI machine may wait for the write lock a while.
REPLY_TIMEOUT = 120.0


class Child:
    """A real OS process running tests/_sqlite_writer.py, spoken to through its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, db: Path, keep: int = 1000) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WRITER),
            str(db),
            str(keep),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = cls(proc)
        assert "ready" in await child.reply()
        return child

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), REPLY_TIMEOUT)
        if not line:
            pytest.fail(f"writer process {self.proc.pid} died (exit {await self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ok(self, **cmd: Any) -> Any:
        await self.send(**cmd)
        answer = await self.reply()
        assert "ok" in answer, answer
        return answer["ok"]

    async def refused(self, **cmd: Any) -> str:
        await self.send(**cmd)
        answer = await self.reply()
        assert "error" in answer, answer
        return str(answer["error"])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # died
                await self.send(op="exit")
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Started children are collected here and always stopped."""
    started: list[Child] = []
    yield started
    await asyncio.gather(*(c.stop() for c in started))


async def spawn(children: list[Child], db: Path, n: int = 1) -> list[Child]:
    new = list(await asyncio.gather(*(Child.start(db) for _ in range(n))))
    children.extend(new)
    return new


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "resume.db", keep=1000)
    yield s
    await s.aclose()


# -- several processes on one file --------------------------------------------------------


async def test_stale_process_gets_lease_lost_and_only_accepted_versions_are_stored(
    tmp_path: Path, children: list[Child], store: SQLiteStore
) -> None:
    a, b = await spawn(children, Path(store.path), 2)
    old = await a.ok(op="acquire", key=KEY, owner="worker-a")
    assert await a.ok(op="commit", key=KEY, epoch=old, base=0, item="a1") == 1
    assert await a.ok(op="commit", key=KEY, epoch=old, base=1, item="a2", after="a1") == 2

    new = await b.ok(op="acquire", key=KEY, owner="worker-b", takeover=True)
    assert new > old
    assert await a.refused(op="commit", key=KEY, epoch=old, base=2, item="zombie") == "LeaseLost"
    assert await a.refused(op="renew", key=KEY, owner="worker-a", epoch=old) == "LeaseLost"

    # Both processes write at the same moment, round after round: only B gets through.
    accepted = ["a1", "a2"]
    for n in range(3, 23):
        item, after = f"b{n}", accepted[-1]
        await a.send(op="commit", key=KEY, epoch=old, base=n - 1, item=f"zombie{n}", after=after)
        await b.send(op="commit", key=KEY, epoch=new, base=n - 1, item=item, after=after)
        from_a, from_b = await a.reply(), await b.reply()
        assert from_a.get("error") == "LeaseLost", from_a
        assert from_b == {"ok": n}
        accepted.append(item)

    listed = await store.versions(KEY)
    assert [v.version for v in listed] == list(range(1, 23))
    assert [v.epoch for v in listed] == [old, old] + [new] * 20
    for version in range(1, 23):
        stored = await store.load(KEY, version)
        assert stored.head == accepted[version - 1].encode()
        assert stored.streams == {"h": [(i, i.encode()) for i in accepted[:version]]}


@pytest.mark.slow  # each child imports livekit-agents: about 2 s of CPU apiece
async def test_many_processes_commit_without_losing_or_tearing_a_version(
    tmp_path: Path, children: list[Child]
) -> None:
    db = tmp_path / "fresh.db"  # the children race to create the schema too
    own = await spawn(children, db, 4)
    shared = await spawn(children, db, 3)
    count, rounds = 60, 25
    for i, child in enumerate(own):
        await child.send(op="burst", key=f"room-{i}", owner=f"worker-{i}", count=count)
    for i, child in enumerate(shared):
        await child.send(op="chain", key=KEY, owner=f"rival-{i}", rounds=rounds)
    bursts = [await child.reply() for child in own]
    chains = [await child.reply() for child in shared]

    store = SQLiteStore(db, keep=1000)
    try:
        for i, answer in enumerate(bursts):
            key = f"room-{i}"
            assert answer == {"ok": list(range(1, count + 1))}
            assert [v.version for v in await store.versions(key)] == list(range(1, count + 1))
            for n in range(1, count + 1):
                stored = await store.load(key, n)
                assert stored.head == f"{key}:{n}".encode()
                expected = [(f"{key}-{m}", f"{key}-{m}".encode()) for m in range(1, n + 1)]
                assert stored.streams == {"h": expected}

        accepted: dict[int, str] = {}
        lost = 0
        for answer in chains:
            assert "ok" in answer, answer
            for version, item in answer["ok"]["accepted"]:
                assert version not in accepted, f"version {version} granted twice"
                accepted[version] = item
            lost += answer["ok"]["lost"]
        assert len(accepted) + lost == len(shared) * rounds
        assert accepted, "no round of the takeover race ever committed"
        # Exactly the accepted versions are stored, each one its parent plus its own item.
        assert [v.version for v in await store.versions(KEY)] == sorted(accepted)
        assert sorted(accepted) == list(range(1, len(accepted) + 1))
        previous: list[tuple[str, bytes]] = []
        for version in sorted(accepted):
            stored = await store.load(KEY, version)
            item = accepted[version]
            assert stored.head == item.encode()
            assert stored.streams == {"h": [*previous, (item, item.encode())]}
            previous = stored.streams["h"]
    finally:
        await store.aclose()


async def test_killed_writer_leaves_only_whole_versions(
    tmp_path: Path, children: list[Child], store: SQLiteStore
) -> None:
    (child,) = await spawn(children, Path(store.path))
    await child.send(op="burst", key=KEY, owner="worker-a", count=100_000, progress=True)
    last = 0
    while last < 20:
        last = (await child.reply())["progress"]
    child.proc.send_signal(signal.SIGKILL)
    await child.proc.wait()

    top = await store.load(KEY)
    assert top.version >= last
    # The writer keeps 1000 versions: exactly the last ones are listed, none missing.
    listed = [v.version for v in await store.versions(KEY)]
    assert listed == list(range(max(1, top.version - 999), top.version + 1))
    assert top.head == f"{KEY}:{top.version}".encode()
    assert [i for i, _ in top.streams["h"]] == [f"{KEY}-{n}" for n in range(1, top.version + 1)]
    # The dead worker's lease is still live; a takeover fences it and carries on.
    lease = await store.acquire(KEY, "worker-b", takeover=True)
    after = top.streams["h"][-1][0]
    commit = Commit(KEY, lease.epoch, top.version, b"b", [Record("h", "b", b"b", after)], 1)
    assert await store.commit(commit) == top.version + 1


# -- a bad file ---------------------------------------------------------------------------


async def test_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    garbage = b"these are not the pages you are looking for\n" * 200
    path.write_bytes(garbage)
    store = SQLiteStore(path)
    try:
        for call in (store.load(KEY), store.acquire(KEY, "w"), store.keys()):
            with pytest.raises(SnapshotCorrupt, match=r"notes\.db"):
                await call
    finally:
        await store.aclose()
    assert path.read_bytes() == garbage


async def test_database_of_another_application_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = path.read_bytes()
    store = SQLiteStore(path)
    try:
        with pytest.raises(SnapshotCorrupt, match=r"another application.*users"):
            await store.acquire(KEY, "w")
    finally:
        await store.aclose()
    assert path.read_bytes() == before  # not even switched to WAL


async def test_schema_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    store = SQLiteStore(path)
    await store.acquire(KEY, "w")
    await store.aclose()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStore(path)
    try:
        with pytest.raises(IncompatibleSnapshot, match=f"schema version {SCHEMA_VERSION + 1}"):
            await store.keys()
    finally:
        await store.aclose()


async def test_unreachable_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "resume.db"
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreUnavailable, match="missing-dir"):
            await store.keys()
    finally:
        await store.aclose()


async def test_database_locked_beyond_busy_timeout_is_unavailable(
    tmp_path: Path, store: SQLiteStore
) -> None:
    quick = SQLiteStore(store.path, busy_timeout=0.2)
    await quick.acquire(KEY, "w")  # the file exists and is ours
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match=r"resume\.db.*locked"):
            await quick.acquire(KEY, "w")
        assert await quick.keys() == [KEY]  # readers are not blocked by a writer (WAL)
        blocker.execute("ROLLBACK")
        assert (await quick.acquire(KEY, "w")).owner == "w"
    finally:
        blocker.close()
        await quick.aclose()


async def test_closed_store_is_unavailable(store: SQLiteStore) -> None:
    await store.acquire(KEY, "w")
    await store.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.keys()
    await store.aclose()  # twice is fine


# -- the file -----------------------------------------------------------------------------


async def test_file_is_wal_and_stamped_with_schema(store: SQLiteStore) -> None:
    await store.acquire(KEY, "w")
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def test_snapshots_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    first = SQLiteStore(path)
    lease = await first.acquire(KEY, "w")
    await first.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"\x00x")], 1))
    await first.aclose()
    second = SQLiteStore(path)
    try:
        stored = await second.load(KEY)
        assert (stored.version, stored.head, stored.streams) == (1, b"h", {"h": [("x", b"\x00x")]})
        with pytest.raises(LeaseLost):  # the epoch was kept on disk too
            await second.commit(Commit(KEY, lease.epoch + 1, 1, b"h2", [], 1))
    finally:
        await second.aclose()


async def test_expired_sessions_are_purged_from_the_file(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteStore(tmp_path / "ttl.db", ttl=60, clock=lambda: now[0])
    try:
        for key in ("old", "fresh"):
            lease = await store.acquire(key, "w")
            records = [Record("h", str(n), b"x", str(n - 1) if n else None) for n in range(5)]
            await store.commit(Commit(key, lease.epoch, 0, b"h", records, 5))
            now[0] += 30
        now[0] += 1  # "old" was written 61 s ago, "fresh" 31 s ago
        assert await store.keys() == ["fresh"]
        conn = sqlite3.connect(store.path)
        try:
            for table in ("sessions", "versions", "log"):
                rows = conn.execute(f"SELECT DISTINCT key FROM {table}").fetchall()
                assert rows == [("fresh",)], table
        finally:
            conn.close()
    finally:
        await store.aclose()


async def test_a_tidy_purges_a_bounded_batch_of_expired_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other process's writes wait for a tidy's transaction: each purges at most
    `PURGE_BATCH` expired sessions, the next tidies the rest; no read sees them meanwhile."""
    from livekit_resume.stores.sqlite import sessions

    monkeypatch.setattr(sessions, "PURGE_BATCH", 2)
    now = [1000.0]
    store = SQLiteStore(tmp_path / "ttl.db", ttl=60, clock=lambda: now[0])
    try:
        for key in ("a", "b", "c", "d", "e"):
            lease = await store.acquire(key, "w")
            await store.commit(Commit(key, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
        now[0] += 61
        lease = await store.acquire("fresh", "w")
        await store.commit(Commit("fresh", lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
        left = []
        for _ in range(4):
            assert await store.keys() == ["fresh"]
            conn = sqlite3.connect(store.path)
            try:
                left.append(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
            finally:
                conn.close()
        assert left == [4, 2, 1, 1]  # "fresh" stays
    finally:
        await store.aclose()


async def test_compaction_happens_at_the_commit_the_log_rule_names(store: SQLiteStore) -> None:
    """stores/log.py: append, then fold when `needs_compaction` holds for the log the
    commit leaves; the version that triggered it reads the folded generation."""
    lease = await store.acquire(KEY, "w")
    first = next(n for n in range(1, 1000) if needs_compaction(n, 1))
    for n in range(1, first + 1):
        await store.commit(Commit(KEY, lease.epoch, n - 1, b"h", [Record("h", "a", b"%d" % n)], 1))
    conn = sqlite3.connect(store.path)
    try:
        rows = conn.execute("SELECT version, gen, log_end FROM versions ORDER BY version")
        gens = {version: (gen, end) for version, gen, end in rows}
    finally:
        conn.close()
    assert gens[first - 1] == (0, first - 1)  # appended only, one record a commit
    assert gens[first] == (1, 1)  # folded in the same commit: one live item
    assert (await store.load(KEY)).streams == {"h": [("a", b"%d" % first)]}
    assert (await store.load(KEY, first - 1)).streams == {"h": [("a", b"%d" % (first - 1))]}


async def test_large_records_are_written_in_slices_and_read_back_exactly(
    store: SQLiteStore,
) -> None:
    """A record past `_BLOB_SLICE` goes in through incremental blob I/O (the GIL is let
    go between slices): its bytes, its neighbours and a compaction keep it exact."""
    from livekit_resume.stores.sqlite import store as module

    lease = await store.acquire(KEY, "w")
    big = os.urandom(module._BLOB_SLICE * 2 + 12345)  # three slices, the last partial
    edge = os.urandom(module._BLOB_SLICE)  # exactly one slice: bound whole
    records = [Record("h", "a", b"small"), Record("h", "b", big, "a"), Record("h", "c", edge, "b")]
    statements: list[str] = []
    await store._run(lambda conn: conn.set_trace_callback(statements.append))
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", records, 3))
    await store._run(lambda conn: conn.set_trace_callback(None))
    # only the large one in slices; Python 3.10 has no Connection.blobopen and binds it whole
    sliced = 1 if sys.version_info >= (3, 11) else 0
    assert sum("zeroblob" in s for s in statements) == sliced
    expected = {"h": [("a", b"small"), ("b", big), ("c", edge)]}
    assert (await store.load(KEY)).streams == expected
    log_len, version = 3, 1
    while not needs_compaction(log_len, 3):  # replace "a" until the log folds
        await store.commit(
            Commit(KEY, lease.epoch, version, b"h", [Record("h", "a", b"v%d" % version)], 3)
        )
        log_len, version = log_len + 1, version + 1
    conn = sqlite3.connect(store.path)
    try:
        gen = conn.execute("SELECT gen FROM versions ORDER BY version DESC").fetchone()[0]
    finally:
        conn.close()
    assert gen >= 1  # folded into a fresh generation, the large record copied in slices
    expected["h"][0] = ("a", b"v%d" % (version - 1))
    assert (await store.load(KEY)).streams == expected


async def test_commit_appends_without_reading_or_rewriting_the_log(store: SQLiteStore) -> None:
    lease = await store.acquire(KEY, "w")
    history = [Record("h", f"m{n}", b"x" * 300, f"m{n - 1}" if n else None) for n in range(2000)]
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", history, 2000))
    statements: list[str] = []

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append)

    await store._run(trace)
    three = [Record("h", f"n{n}", b"y" * 300, f"n{n - 1}" if n else "m1999") for n in range(3)]
    await store.commit(Commit(KEY, lease.epoch, 1, b"h", three, 2003))
    touching_log = [s for s in statements if " log " in s.replace("\n", " ") or "FROM log" in s]
    assert touching_log, statements  # the trace works
    assert all(s.startswith(("INSERT INTO log", "DELETE FROM log")) for s in touching_log), (
        touching_log
    )
    assert sum(s.startswith("INSERT INTO log") for s in touching_log) == 3


# -- the event loop -----------------------------------------------------------------------


async def test_commit_waiting_for_a_locked_file_does_not_block_the_loop(
    store: SQLiteStore,
) -> None:
    lease = await store.acquire(KEY, "w")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        commit = asyncio.ensure_future(
            store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
        )
        ticks = 0
        while ticks < 20:  # the loop keeps running while the commit waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not commit.done()
        blocker.execute("ROLLBACK")
        assert await asyncio.wait_for(commit, 30) == 1
    finally:
        blocker.close()


async def test_heartbeat_keeps_ticking_during_a_large_commit(store: SQLiteStore) -> None:
    lease = await store.acquire(KEY, "w")
    payload = os.urandom(2048)
    records = [Record("h", f"m{n}", payload, f"m{n - 1}" if n else None) for n in range(20_000)]
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.ensure_future(heartbeat())
    await asyncio.sleep(0)
    ticks_before = ticks
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", records, len(records)))
    ticks_during = ticks - ticks_before
    done.set()
    await beat
    assert ticks_during > 100, f"the loop ran only {ticks_during} times during the commit"
    stored = await store.load(KEY)
    assert len(stored.streams["h"]) == 20_000


def _batch_allowed() -> bool:
    """Whether this host lets a thread make itself SCHED_BATCH (a sandbox may refuse)."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_the_store_thread_handed_work_does_not_preempt_the_loop(store: SQLiteStore) -> None:
    # handed a transaction while the loop holds the GIL, a normal thread would wake only
    # to preempt the loop's thread and wait for the GIL: a batch thread does not preempt
    if not _batch_allowed():
        pytest.skip("this host refuses SCHED_BATCH to a thread: the store leaves it as it is")
    policy = await store._conn.run(lambda conn: os.sched_getscheduler(0))
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the loop's own thread is untouched


# -- open_store -----------------------------------------------------------------------------


async def test_open_store_with_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESUME_TTL", raising=False)
    store = open_store("sqlite:///data/rel.db", keep=2)
    assert isinstance(store, SQLiteStore) and isinstance(store, Store)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir("/")  # the path was fixed when the store was opened
    try:
        lease = await store.acquire(KEY, "w")
        for n in range(3):
            await store.commit(Commit(KEY, lease.epoch, n, b"h", [], 0))
        assert [v.version for v in await store.versions(KEY)] == [2, 3]  # keep=2 applied
        info = await store.info(KEY)
        assert info is not None and info.expires_at is None
    finally:
        await store.aclose()
    assert store.path == str(tmp_path / "data" / "rel.db")
    assert (tmp_path / "data" / "rel.db").is_file()


async def test_open_store_with_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUME_TTL", "3600")
    target = tmp_path / "abs dir" / "resume.db"
    target.parent.mkdir()
    url = f"sqlite:///{target}"  # sqlite:////tmp/...: four slashes, an absolute path
    assert url.startswith("sqlite:////")
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    try:
        lease = await store.acquire(KEY, "w")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h", [], 0))
        info = await store.info(KEY)
        assert info is not None and info.expires_at == pytest.approx(info.updated_at + 3600)
    finally:
        await store.aclose()
    assert store.path == str(target)
    reopened = open_store(url)
    try:
        assert (await reopened.load(KEY)).version == 1
    finally:
        await reopened.aclose()


def test_open_store_needs_a_file_name() -> None:
    with pytest.raises(ValueError, match="names no file"):
        open_store("sqlite:///")


async def test_unknown_key_in_an_empty_file(store: SQLiteStore) -> None:
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY)


# -- schema 1 files (before namespaces and commit ids) ------------------------------------

# The tables as livekit-resume wrote them at schema version 1, verbatim.
_SCHEMA_V1 = """
CREATE TABLE sessions (
    key TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    owner TEXT,
    lease_expires_at REAL,
    touched_at REAL NOT NULL,
    gen INTEGER NOT NULL,
    version INTEGER NOT NULL,
    log_len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE versions (
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    created_at REAL NOT NULL,
    head BLOB NOT NULL,
    gen INTEGER NOT NULL,
    log_end INTEGER NOT NULL,
    size INTEGER NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (key, version)
);
CREATE TABLE log (
    key TEXT NOT NULL,
    gen INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    item_id TEXT NOT NULL,
    after TEXT,
    data BLOB,
    PRIMARY KEY (key, gen, seq)
);
"""


def _schema_1_file(path: Path, epoch: int = 7) -> None:
    """A WAL file as schema 1 left it: session KEY at version 2 (items m0, m1), its lease
    released, and a session "other" with a live lease and no version yet."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        for statement in _SCHEMA_V1.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("PRAGMA user_version=1")
        now = 1_700_000_000.0
        conn.execute(
            "INSERT INTO sessions VALUES (?, ?, NULL, NULL, ?, 0, 2, 2)", (KEY, epoch, now)
        )
        conn.execute(
            "INSERT INTO sessions VALUES ('other', 3, 'old-worker', ?, ?, 0, 0, 0)",
            (4_000_000_000.0, now),
        )
        for n in (1, 2):
            conn.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, 0, ?, 10, ?)",
                (KEY, n, epoch, now, f"head {n}".encode(), n, json.dumps({"n": n})),
            )
        conn.execute("INSERT INTO log VALUES (?, 0, 0, 'h', 'm0', NULL, ?)", (KEY, b"item 0"))
        conn.execute("INSERT INTO log VALUES (?, 0, 1, 'h', 'm1', 'm0', ?)", (KEY, b"item 1"))
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_a_schema_1_file_is_migrated_in_place_and_takes_idempotent_commits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    _schema_1_file(path)
    store = SQLiteStore(path)
    try:
        assert await store.keys() == ["other", KEY]
        old = await store.load(KEY)
        assert (old.version, old.head, old.info) == (2, b"head 2", {"n": 2})
        assert old.streams == {"h": [("m0", b"item 0"), ("m1", b"item 1")]}
        assert (await store.load(KEY, 1)).streams == {"h": [("m0", b"item 0")]}
        with pytest.raises(SessionBusy):  # the old lease is still in force
            await store.acquire("other", "new-worker", ttl=30)

        lease = await store.acquire(KEY, "new-worker", ttl=30)
        assert lease.epoch > 7  # the file held 7
        added = [Record("h", "m2", b"2", "m1")]
        third = Commit(KEY, lease.epoch, 2, b"head 3", added, 3, commit_id="retry-me")
        assert await store.commit(third) == 3
        assert await store.commit(third) == 3  # the retry finds its landed version
        assert [v.version for v in await store.versions(KEY)] == [1, 2, 3]
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2 == SCHEMA_VERSION
        namespaces = conn.execute("SELECT DISTINCT ns FROM sessions").fetchall()
        assert namespaces == [("lkresume",)]  # old rows live in the default namespace
    finally:
        conn.close()
    elsewhere = SQLiteStore(path, namespace="tenant-b")
    try:
        assert await elsewhere.keys() == []
    finally:
        await elsewhere.aclose()


async def test_a_read_only_store_reads_a_schema_1_file_without_migrating_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    _schema_1_file(path)
    before = path.read_bytes()
    store = SQLiteStore(path, read_only=True)
    try:
        assert await store.keys() == ["other", KEY]
        stored = await store.load(KEY)
        assert (stored.version, stored.head) == (2, b"head 2")
        assert stored.streams == {"h": [("m0", b"item 0"), ("m1", b"item 1")]}
        info = await store.info("other")
        assert info is not None and info.owner == "old-worker"
    finally:
        await store.aclose()
    assert path.read_bytes() == before
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


async def test_two_processes_opening_a_schema_1_file_migrate_it_once(
    tmp_path: Path, children: list[Child]
) -> None:
    path = tmp_path / "old.db"
    _schema_1_file(path)
    a, b = await spawn(children, path, 2)
    await a.send(op="acquire", key="third", owner="worker-a")
    await b.send(op="acquire", key="fourth", owner="worker-b")
    assert "ok" in await a.reply() and "ok" in await b.reply()
    store = SQLiteStore(path)
    try:
        assert await store.keys() == ["fourth", "other", KEY, "third"]
        assert (await store.load(KEY)).version == 2
    finally:
        await store.aclose()
