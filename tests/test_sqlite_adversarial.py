"""The SQLite store against a hostile file and a hostile moment: rows altered outside the
library (wrong types, missing rows, absurd numbers), a lock held past a commit, a
clock stepped back while another process writes. Each test failed before its fix.

The contract: nothing acknowledged is lost or read short, bad data is `SnapshotCorrupt`
(never a shorter conversation, a silent fresh start or a bare TypeError), and a refused
operation changes nothing.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from livekit_resume.errors import SnapshotCorrupt, SnapshotNotFound
from livekit_resume.stores.base import Commit, Lease, Record, page_of
from livekit_resume.stores.log import COMPACT_SLACK, needs_compaction
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.sqlite.transactions import write
from livekit_resume.stores.url import open_store
from tests.test_sqlite import _schema_1_file

KEY = "room-9"
ITEMS = 3


async def _written(path: Path, *, items: int = ITEMS) -> Lease:
    """A session of ``items`` commits, each appending one item; the store closed."""
    store = SQLiteStore(path)
    try:
        lease = await store.acquire(KEY, "w")
        prev = None
        for n in range(items):
            record = Record("h", f"i{n}", b"item %d" % n, prev)
            await store.commit(Commit(KEY, lease.epoch, n, b"head %d" % n, [record], n + 1))
            prev = f"i{n}"
        return lease
    finally:
        await store.aclose()


def _alter(path: Path, sql: str, *args: object) -> None:
    """Change the file as an operator's sqlite3 shell (or a bad restore) would."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql, args)
        conn.commit()
    finally:
        conn.close()


def _rows(path: Path) -> list[tuple[object, ...]]:
    """Every row of the three tables, to show that a refusal changed nothing."""
    conn = sqlite3.connect(path)
    try:
        return [
            row
            for table in ("sessions", "versions", "log")
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
        ]
    finally:
        conn.close()


# -- a commit the lock refused -----------------------------------------------------------


def test_a_commit_refused_by_a_lock_leaves_no_transaction_open(tmp_path: Path) -> None:
    """COMMIT itself can be refused (SQLITE_BUSY: a rollback-journal file, where the
    store runs when WAL is unavailable, and a reader holding its lock past the busy
    timeout). SQLite then keeps the transaction open: left so, the connection held the
    write lock for ever and every later operation failed with "cannot start a
    transaction within a transaction"."""
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    reader = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    try:
        conn.execute("CREATE TABLE t (x)")
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM t").fetchall()  # a shared lock, held
        with pytest.raises(sqlite3.OperationalError, match="locked"), write(conn):
            conn.execute("INSERT INTO t VALUES (1)")
        assert not conn.in_transaction  # rolled back: nothing landed, nothing held
        reader.execute("ROLLBACK")
        with write(conn):  # the connection works again, and so does the retry
            conn.execute("INSERT INTO t VALUES (2)")
        assert reader.execute("SELECT x FROM t").fetchall() == [(2,)]
    finally:
        reader.close()
        conn.close()


# -- item records missing -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM log WHERE seq = 2",  # the last item's record
        "DELETE FROM log WHERE seq = 0",  # the first one
        "DELETE FROM log",  # the whole generation
        "UPDATE versions SET gen = gen + 7",  # a version naming a generation that is not there
        "UPDATE versions SET log_end = -5",
        "UPDATE versions SET log_end = 'x'",
        "UPDATE log SET data = 'text' WHERE seq = 1",  # an item that is not bytes
        "UPDATE versions SET head = 'text'",
        "UPDATE versions SET created_at = 'x'",
    ],
)
async def test_a_version_whose_records_are_missing_or_altered_is_corrupt(
    tmp_path: Path, sql: str
) -> None:
    """A version read short (an item or every item gone) was returned as a shorter
    or empty conversation: a restore would have carried on without those turns."""
    path = tmp_path / "resume.db"
    await _written(path)
    _alter(path, sql)
    store = SQLiteStore(path)
    try:
        with pytest.raises(SnapshotCorrupt, match=KEY):
            await store.load(KEY)
    finally:
        await store.aclose()


async def test_compaction_refuses_a_log_with_a_missing_record_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Compaction folds the log into a new generation: over a log missing a record it
    would have written the shortened conversation back as whole, hiding the loss."""
    path = tmp_path / "resume.db"
    items = COMPACT_SLACK + 4
    lease = await _written(path, items=items)
    _alter(path, "DELETE FROM log WHERE seq = ?", items - 1)
    before = _rows(path)
    store = SQLiteStore(path)
    try:
        edit = Record("h", "i0", b"edited", None)
        assert needs_compaction(items + 1, 1)  # so this commit compacts
        with pytest.raises(SnapshotCorrupt, match=f"{KEY}.*missing"):
            await store.commit(Commit(KEY, lease.epoch, items, b"head", [edit], 1))
    finally:
        await store.aclose()
    assert _rows(path) == before


# -- session rows altered -----------------------------------------------------------------

_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("lease_expires_at", "abc"),
        ("lease_ttl", "abc"),
        ("touched_at", "abc"),
        ("epoch", "abc"),
        ("version", "abc"),
        ("gen", 1.5),
        ("log_len", "abc"),
        ("owner", b"w"),  # a blob: TEXT affinity keeps it
        ("epoch", -1),
        ("version", -1),
        ("epoch", _MAX),  # the next acquisition's epoch does not fit SQLite's INTEGER
        ("version", _MAX),  # nor the next version
    ],
)
@pytest.mark.parametrize("operation", ["acquire", "renew", "commit", "load", "info", "versions"])
async def test_a_session_row_with_an_impossible_value_is_corrupt_and_changes_nothing(
    tmp_path: Path, column: str, value: object, operation: str
) -> None:
    """Such a row raised a bare TypeError or OverflowError from deep inside the store, or
    was acted on (a negative version read as "no snapshot")."""
    path = tmp_path / "resume.db"
    lease = await _written(path)
    _alter(path, f"UPDATE sessions SET {column} = ?", value)
    before = _rows(path)
    store = SQLiteStore(path)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "acquire": lambda: store.acquire(KEY, "other", takeover=True),
        "renew": lambda: store.renew(lease),
        "commit": lambda: store.commit(Commit(KEY, lease.epoch, ITEMS, b"h", [], ITEMS)),
        "load": lambda: store.load(KEY),
        "info": lambda: store.info(KEY),
        "versions": lambda: store.versions(KEY),
    }
    try:
        with pytest.raises(SnapshotCorrupt, match=f"{KEY}.*{column}"):
            await calls[operation]()
        assert await store.keys() == [KEY]  # listed, so that an operator finds it
        assert await store.keys_page("", None, 10) == ([KEY], None)
    finally:
        await store.aclose()
    assert _rows(path) == before


async def test_a_session_row_with_an_impossible_value_can_still_be_removed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "resume.db"
    await _written(path)
    _alter(path, "UPDATE sessions SET touched_at = 'abc'")
    store = SQLiteStore(path, ttl=3600)
    try:
        assert await store.delete(KEY) is True
        assert _rows(path) == []
        assert (await store.acquire(KEY, "w")).owner == "w"
    finally:
        await store.aclose()


# -- the session row gone, its versions left ------------------------------------------------


async def test_versions_left_without_their_session_row_are_corrupt_not_a_fresh_start(
    tmp_path: Path,
) -> None:
    """The session row lost (deleted by hand, a partial restore) while its versions and
    items remain: `load` said "no snapshot", so a restore started the conversation
    afresh, and `acquire` handed out a lease on top of the remains."""
    path = tmp_path / "resume.db"
    await _written(path)
    _alter(path, "DELETE FROM sessions")
    before = _rows(path)
    store = SQLiteStore(path)
    try:
        with pytest.raises(SnapshotCorrupt, match=rf"{KEY}.*version 3"):
            await store.load(KEY)
        with pytest.raises(SnapshotCorrupt, match=KEY):
            await store.acquire(KEY, "w")
        assert _rows(path) == before
        assert await store.delete(KEY) is True  # rm removes what is left
        assert _rows(path) == []
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY)
        assert (await store.acquire(KEY, "w")).owner == "w"
    finally:
        await store.aclose()


# -- the file's tables ------------------------------------------------------------------------


async def test_a_table_dropped_from_the_file_is_corrupt_not_unavailable(tmp_path: Path) -> None:
    """It read as "unavailable: check the disk has room ...": retried for ever by
    autosave, where the file needs an operator."""
    path = tmp_path / "resume.db"
    await _written(path)
    _alter(path, "DROP TABLE log")
    store = SQLiteStore(path)
    try:
        with pytest.raises(SnapshotCorrupt, match="altered"):
            await store.load(KEY)
    finally:
        await store.aclose()


# -- paging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1])
async def test_a_page_limit_below_one_is_refused(tmp_path: Path, limit: int) -> None:
    """A limit of 0 returned no key but a cursor past the first one (a pager following
    it skipped that key); -1 raised IndexError."""
    sqlite_store = SQLiteStore(tmp_path / "resume.db")
    memory_store = MemoryStore()
    try:
        for store in (sqlite_store, memory_store):
            for key in ("a", "b", "c"):
                await store.acquire(key, "w")
            with pytest.raises(ValueError, match="limit"):
                await store.keys_page("", None, limit)
        with pytest.raises(ValueError, match="limit"):
            page_of(["a", "b"], "", None, limit)
    finally:
        await sqlite_store.aclose()
        await memory_store.aclose()


# -- reads while another process writes -----------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("step", [-50.0, 200.0])  # back: times ahead; forward: expired
async def test_a_read_that_would_tidy_a_row_does_not_wait_for_another_writer(
    tmp_path: Path, step: float
) -> None:
    """A read finding a row to tidy (a clock stepped back, an expired session) took the
    write lock to tidy it: while another process wrote, the read waited the whole
    busy timeout and then failed with StoreUnavailable, although WAL lets it read."""
    path = tmp_path / "resume.db"
    clock = _Clock()
    # a busy timeout far longer than the bound below: a read that waits for it fails
    store = SQLiteStore(path, clock=clock, ttl=100, busy_timeout=20.0)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        lease = await store.acquire(KEY, "w", ttl=30)
        await store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "i", b"x")], 1))
        clock.now += step
        blocker.execute("BEGIN IMMEDIATE")  # another process, writing
        if step < 0:
            assert (await asyncio.wait_for(store.load(KEY), 5)).version == 1
            assert await asyncio.wait_for(store.info(KEY), 5) is not None
            assert await asyncio.wait_for(store.versions(KEY), 5) != []
            assert await asyncio.wait_for(store.keys(), 5) == [KEY]
        else:
            with pytest.raises(SnapshotNotFound):
                await asyncio.wait_for(store.load(KEY), 5)
            assert await asyncio.wait_for(store.info(KEY), 5) is None
            assert await asyncio.wait_for(store.keys(), 5) == []
        # the read's tidy stepped aside without changing how long writes wait
        waits = await store._run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0])
        assert waits == 20_000
        blocker.execute("ROLLBACK")
        # the tidy is done later, by a write or a read that gets the lock
        await asyncio.wait_for(store.keys(), 5)
    finally:
        blocker.close()
        await store.aclose()


# -- a commit of the wrong types ----------------------------------------------------------------


def _bad_commits(epoch: int) -> list[Commit]:
    record = Record("h", "i", b"x")
    return [
        Commit(KEY, epoch, 0, "a str head"),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [Record("h", "i", "a str item")]),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [Record(7, "i", b"x")]),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [Record("h", "i", b"x", 3)]),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [("h", "i", b"x", None)]),  # type: ignore[list-item]
        Commit(KEY, epoch, "0", b"h", [record]),  # type: ignore[arg-type]
        Commit(KEY, str(epoch), 0, b"h", [record]),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [record], size=None),  # type: ignore[arg-type]
        Commit(KEY, epoch, 0, b"h", [record], info={"tags": {"a"}}),  # type: ignore[dict-item]
        Commit(KEY, epoch, 0, b"h", [record], info={"extra": {"a": 1}}),  # type: ignore[dict-item]
        Commit(KEY, epoch, 0, b"h", [record], commit_id=5),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("n", range(len(_bad_commits(1))))
@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_a_commit_of_the_wrong_types_is_refused_and_writes_nothing(
    tmp_path: Path, n: int, backend: str
) -> None:
    """SQLite kept a str head or item (which then read back as a damaged version), turned
    an int stream name into text, and raised a bare TypeError for a set in ``info``."""
    store: SQLiteStore | MemoryStore = (
        SQLiteStore(tmp_path / "resume.db") if backend == "sqlite" else MemoryStore()
    )
    try:
        lease = await store.acquire(KEY, "w")
        with pytest.raises(ValueError, match="commit"):
            await store.commit(_bad_commits(lease.epoch)[n])
        assert await store.versions(KEY) == []
        good = Commit(KEY, lease.epoch, 0, b"h", [Record("h", "i", b"x")], 1)
        assert await store.commit(good) == 1
        assert (await store.load(KEY)).streams == {"h": [("i", b"x")]}
    finally:
        await store.aclose()


# -- a read-only store while a writer changes the schema --------------------------------------


async def test_a_read_only_store_sees_a_file_migrated_after_it_opened(tmp_path: Path) -> None:
    """A read-only store reads a schema-1 file through views that put every row in the
    default namespace. Once a writer had migrated the file, those views read the new
    tables, every namespace's rows as the default one's: the reader saw (and loaded)
    another tenant's sessions."""
    path = tmp_path / "old.db"
    _schema_1_file(path)
    reader = SQLiteStore(path, read_only=True)
    tenant = SQLiteStore(path, namespace="tenant-b")
    try:
        assert await reader.keys() == ["other", "room-7"]
        lease = await tenant.acquire("secret", "b")  # migrates the file
        await tenant.commit(Commit("secret", lease.epoch, 0, b"b's", [Record("h", "x", b"b")], 1))
        assert await reader.keys() == ["other", "room-7"]
        with pytest.raises(SnapshotNotFound):
            await reader.load("secret")
        assert (await reader.load("room-7")).head == b"head 2"
    finally:
        await reader.aclose()
        await tenant.aclose()


async def test_a_read_only_store_sees_sessions_written_after_it_opened_an_empty_file(
    tmp_path: Path,
) -> None:
    """On an empty file the reader stands in empty temporary tables, which hid the tables
    a writer created later: every session written after it opened stayed invisible."""
    path = tmp_path / "new.db"
    path.touch()
    reader = SQLiteStore(path, read_only=True)
    writer = SQLiteStore(path)
    try:
        assert await reader.keys() == []
        lease = await writer.acquire(KEY, "w")
        await writer.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "i", b"x")], 1))
        assert await reader.keys() == [KEY]
        assert (await reader.load(KEY)).streams == {"h": [("i", b"x")]}
    finally:
        await reader.aclose()
        await writer.aclose()


# -- settings and owners of the wrong kind ------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"busy_timeout": float("nan")}, {"keep": 2.5}, {"keep": True}, {"keep": "3"}],
)
def test_a_store_setting_of_the_wrong_kind_is_refused(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """A NaN busy timeout made the wait for a locked file endless (its deadline never
    passes); a keep of 2.5 or True was taken, and "3" raised a bare TypeError."""
    with pytest.raises(ValueError, match=next(iter(options))):
        SQLiteStore(tmp_path / "resume.db", **options)


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_a_lease_for_no_owner_is_refused(tmp_path: Path, backend: str) -> None:
    """A lease acquired for owner None was stored as a released one: any other worker
    took the session without takeover while its holder still wrote."""
    store: SQLiteStore | MemoryStore = (
        SQLiteStore(tmp_path / "resume.db") if backend == "sqlite" else MemoryStore()
    )
    try:
        with pytest.raises(ValueError, match="owner"):
            await store.acquire(KEY, None)  # type: ignore[arg-type]
        assert await store.info(KEY) is None
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("column", "value"),
    [("created_at", "x"), ("size", "x"), ("epoch", "x"), ("version", 1.5), ("size", -1)],
)
async def test_a_listed_version_with_an_impossible_value_is_corrupt(
    tmp_path: Path, column: str, value: object
) -> None:
    """`versions` returned such a row as it stood: `livekit-resume history` then died
    with a TypeError traceback instead of saying the session is damaged. It is listed
    damaged (as a `load` of it finds it), the others as they are: the operator rolls
    back past it. A row whose number is no version's is none: version 1 then reads as
    trimmed."""
    path = tmp_path / "resume.db"
    await _written(path)
    store = SQLiteStore(path)
    try:
        intact = await store.versions(KEY)
    finally:
        await store.aclose()
    _alter(path, f"UPDATE versions SET {column} = ? WHERE version = 1", value)
    store = SQLiteStore(path)
    try:
        listed = await store.versions(KEY)
    finally:
        await store.aclose()
    if column == "version":
        assert listed == intact[1:]
        return
    assert listed[1:] == intact[1:]
    damaged = listed[0]
    assert damaged.version == 1 and damaged.info == {}, damaged
    assert damaged.damaged is not None and re.search(f"{KEY}.*altered", damaged.damaged)


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
@pytest.mark.parametrize("version", ["1", b"1", [1]])
async def test_loading_a_version_that_is_not_a_number_is_refused(
    tmp_path: Path, backend: str, version: object
) -> None:
    """SQLite raised a bare TypeError from its range check; memory said "no version"."""
    store: SQLiteStore | MemoryStore = (
        SQLiteStore(tmp_path / "resume.db") if backend == "sqlite" else MemoryStore()
    )
    try:
        lease = await store.acquire(KEY, "w")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h"))
        with pytest.raises(ValueError, match="version"):
            await store.load(KEY, version)  # type: ignore[arg-type]
    finally:
        await store.aclose()


def test_a_path_with_a_nul_character_is_refused_when_the_store_is_made(tmp_path: Path) -> None:
    """It was accepted, and every operation then raised on the store's thread."""
    with pytest.raises(ValueError, match="NUL"):
        SQLiteStore(str(tmp_path / "a\x00b.db"))
    with pytest.raises(ValueError, match="NUL"):
        open_store("sqlite:///a%00b.db")


async def test_a_path_longer_than_sqlite_opens_is_refused_when_the_store_is_made(
    tmp_path: Path,
) -> None:
    """SQLite opens paths of at most 504 bytes here (512 with "-journal"). A longer one
    was accepted; every operation then failed with `StoreUnavailable` telling to check
    the file's permissions and locks, and an empty file was left behind."""
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    fits = deep / ("f" * (504 - len(str(deep)) - 1))
    too_long = deep / ("f" * (505 - len(str(deep)) - 1))
    with pytest.raises(ValueError, match="505 bytes"):
        SQLiteStore(too_long)
    assert not too_long.exists()
    store = SQLiteStore(fits)
    try:
        assert await store.keys() == []
    finally:
        await store.aclose()
