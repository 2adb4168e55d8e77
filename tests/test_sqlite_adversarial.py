"""The SQLite store against a hostile file and a hostile moment: rows altered outside the
library (wrong types, missing rows, absurd numbers), a lock held past a commit, a
clock stepped back while another process writes. Each test failed before its fix.

The contract: nothing acknowledged is lost or read short, bad data is `SnapshotCorrupt`
(never a shorter conversation, a silent fresh start or a bare TypeError), and a refused
operation changes nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from livekit_resume.errors import SnapshotCorrupt, SnapshotNotFound
from livekit_resume.stores.base import Commit, Lease, Record, page_of
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.sqlite.transactions import write

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
