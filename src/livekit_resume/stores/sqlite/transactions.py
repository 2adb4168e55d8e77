"""The two kinds of transaction every SQLite operation runs in, and the purge of a key."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from ...errors import LeaseLost, SessionBusy

__all__ = ["purge", "read", "write"]


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, holding the database's write lock from its first read.

    A refusal (`LeaseLost`, `SessionBusy`) is raised before anything but the purge of
    an expired session was written, so that purge is kept; any other error rolls back.

    COMMIT itself can fail (SQLITE_BUSY in a rollback-journal file whose readers hold
    their lock past the busy timeout, a full disk): SQLite may then keep the transaction
    open, holding the write lock, and every later BEGIN of this connection would fail.
    It is rolled back, so nothing landed and the operation can be run again whole.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except (LeaseLost, SessionBusy):
        _commit(conn)
        raise
    except BaseException:
        _rollback(conn)
        raise
    _commit(conn)


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # The original error is what matters; a failing rollback (the connection may
        # already have rolled back on a disk error) must not replace it.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def read(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every SELECT inside sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the original error is what matters
                conn.execute("ROLLBACK")
        raise
    conn.execute("ROLLBACK")  # a read transaction has nothing to keep


def purge(conn: sqlite3.Connection, ns: str, key: str) -> None:
    """Delete every row of session ``key`` in namespace ``ns`` (inside a transaction)."""
    for table in ("log", "versions", "sessions"):
        conn.execute(f"DELETE FROM {table} WHERE ns=? AND key=?", (ns, key))
    # remote commands (stores/sqlite/control.py), in a table made on first use
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name='commands'").fetchone():
        conn.execute("DELETE FROM commands WHERE ns=? AND key=?", (ns, key))
