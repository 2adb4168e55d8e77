"""What a deleted session leaves (`Store.delete`): its epoch, for `TOMBSTONE_TTL`, under
a SHA-256 of its key, never the key itself (``rm`` leaves no trace of it).

The ``tombstones`` table is additive, as ``commands`` is: made by the first delete that
needs it (``IF NOT EXISTS``), outside the schema version. A file without it has no
tombstone, which is what a reader of an older version, or one that never deleted,
finds. Every function runs inside the caller's write transaction.
"""

from __future__ import annotations

import hashlib
import sqlite3

from ..log import TOMBSTONE_TTL, tombstone_epoch

__all__ = ["lay", "tombstone"]

_TABLE = """
CREATE TABLE IF NOT EXISTS tombstones (
    ns TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (ns, key_sha256)
) WITHOUT ROWID"""


def _hashed(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _absent(exc: sqlite3.OperationalError) -> bool:
    return "no such table: tombstones" in str(exc)


def tombstone(conn: sqlite3.Connection, ns: str, key: str, now: float) -> int | None:
    """The epoch the delete of ``key`` left, while its tombstone lasts."""
    try:
        row = conn.execute(
            "SELECT epoch FROM tombstones WHERE ns=? AND key_sha256=? AND until > ?",
            (ns, _hashed(key), now),
        ).fetchone()
    except sqlite3.OperationalError as e:
        if _absent(e):
            return None
        raise
    return int(row[0]) if row is not None else None


def lay(conn: sqlite3.Connection, ns: str, key: str, epoch: int, now: float) -> None:
    """Leave ``key``'s tombstone at ``epoch``, or the clock's if higher
    (`tombstone_epoch`; above any it had: the session's epochs started above it); the
    ones past their time go."""
    epoch = tombstone_epoch(epoch, now)
    conn.execute(_TABLE)
    conn.execute("DELETE FROM tombstones WHERE until <= ?", (now,))
    conn.execute(
        "INSERT OR REPLACE INTO tombstones (ns, key_sha256, epoch, until) VALUES (?, ?, ?, ?)",
        (ns, _hashed(key), epoch, now + TOMBSTONE_TTL),
    )
