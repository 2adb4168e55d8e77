"""The two kinds of transaction every SQLite operation runs in, and the purge of a key."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from ...errors import LeaseLost, SessionBusy

__all__ = ["is_busy", "lock_now", "purge", "read", "write"]

# Primary result codes (the low byte of an extended code) of a lock held elsewhere.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


@contextlib.contextmanager
def write(conn: sqlite3.Connection, *, begun: bool = False) -> Iterator[None]:
    """One write transaction, holding the database's write lock from its first read.

    A refusal (`LeaseLost`, `SessionBusy`) is raised before anything but the purge of
    an expired session was written, so that purge is kept; any other error rolls back.

    COMMIT itself can fail (SQLITE_BUSY in a rollback-journal file whose readers hold
    their lock past the busy timeout, a full disk): SQLite may then keep the transaction
    open, holding the write lock, and every later BEGIN of this connection would fail.
    It is rolled back, so nothing landed and the operation can be run again whole.

    ``begun``: the transaction was begun already (`lock_now`).
    """
    if not begun:
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


def lock_now(conn: sqlite3.Connection) -> bool:
    """Begin a write transaction if the write lock is free now (without waiting for
    it); False when another connection holds it. Then `write` with ``begun=True``."""
    waited = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={waited}")
    return True


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says another connection holds a lock this one needs."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


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
