"""The file format: what makes a SQLite file ours, its tables, and how older files are
read (read-only) or migrated (writable).

Layout (schema version `SCHEMA_VERSION`, stamped with ``PRAGMA user_version`` and marked
as ours with ``PRAGMA application_id``). Every row carries its namespace ``ns`` beside
the session key: one file holds the sessions of several tenants or deployments, and none
sees another's.

- ``sessions``: one row per key: lease (epoch, owner, expiry and the ttl it was granted
  for), ``touched_at`` for the session TTL, the head ``version``, the current log
  generation ``gen`` and its length.
- ``versions``: one row per retained version: head bytes, listing info, where its items
  end in the log (``gen``, ``log_end``) and the ``commit_id`` that wrote it.
- ``log``: item records, append-only per generation (stores/log.py's rules).
- ``commands``: remote commands and their answers (stores/sqlite/control.py), created
  on first use. It is additive, outside the schema version: a reader of schema 2 that
  does not know it ignores it.
- ``tombstones``: what a delete leaves (stores/sqlite/tombstones.py), additive in the
  same way, made by the first delete.

Older files are migrated in place when a writable store opens them (schema 1 had no
namespaces: its sessions land in `DEFAULT_NAMESPACE`). A read-only store never writes:
it reads an older schema through temporary views instead.
"""

from __future__ import annotations

import logging
import sqlite3

from ...errors import IncompatibleSnapshot, SnapshotCorrupt
from .transactions import write

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_NAMESPACE",
    "SCHEMA_VERSION",
    "check",
    "create",
    "migrate",
    "stand_in",
]

logger = logging.getLogger("livekit_resume")

# Bumped on every change of the tables below; a file stamped with a higher number was
# written by a newer livekit-resume and is refused rather than misread. 2: namespaces,
# the commit id of each version, the ttl each lease was granted for.
SCHEMA_VERSION = 2
# SQLite's slot for "which application's file format is this" ("LKRS"): it tells our
# file apart from any other SQLite database before we touch a single table.
APPLICATION_ID = 0x4C4B5253
# The namespace of a store that names none: the same as RedisStore's, so a session key
# means the same session whichever store a deployment moves to.
DEFAULT_NAMESPACE = "lkresume"

# The current schema; "{temp}" is "TEMP " when a read-only store stands in empty tables
# for a file that has none yet. 'lkresume' is DEFAULT_NAMESPACE: rows a schema-1 process
# still writes during a rolling upgrade land there, where its sessions were migrated.
_SCHEMA = """
CREATE {temp}TABLE IF NOT EXISTS sessions (
    ns TEXT NOT NULL DEFAULT 'lkresume',
    key TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    owner TEXT,
    lease_expires_at REAL,
    lease_ttl REAL,
    touched_at REAL NOT NULL,
    gen INTEGER NOT NULL,
    version INTEGER NOT NULL,
    log_len INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE {temp}TABLE IF NOT EXISTS versions (
    ns TEXT NOT NULL DEFAULT 'lkresume',
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    created_at REAL NOT NULL,
    head BLOB NOT NULL,
    gen INTEGER NOT NULL,
    log_end INTEGER NOT NULL,
    size INTEGER NOT NULL,
    info TEXT NOT NULL,
    commit_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (ns, key, version)
);
CREATE {temp}TABLE IF NOT EXISTS log (
    ns TEXT NOT NULL DEFAULT 'lkresume',
    key TEXT NOT NULL,
    gen INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    item_id TEXT NOT NULL,
    after TEXT,
    data BLOB,
    PRIMARY KEY (ns, key, gen, seq)
);
"""
_TABLES = frozenset({"sessions", "versions", "log"})
# Schema 1's columns, table by table; the columns schema 2 adds take their DEFAULT (or
# NULL). The namespace joins every primary key, which ALTER TABLE cannot change: the
# migration copies each table into its new shape, in one transaction.
_V1_COLUMNS = {
    "sessions": "key, epoch, owner, lease_expires_at, touched_at, gen, version, log_len",
    "versions": "key, version, epoch, created_at, head, gen, log_end, size, info",
    "log": "key, gen, seq, stream, item_id, after, data",
}
# How a read-only store sees a schema-1 file without migrating it: temporary views with
# the current columns (temp names shadow the file's own tables).
_V1_VIEWS = {
    "sessions": "SELECT 'lkresume' AS ns, key, epoch, owner, lease_expires_at, "
    "NULL AS lease_ttl, touched_at, gen, version, log_len FROM main.sessions",
    "versions": "SELECT 'lkresume' AS ns, key, version, epoch, created_at, head, gen, "
    "log_end, size, info, '' AS commit_id FROM main.versions",
    "log": "SELECT 'lkresume' AS ns, key, gen, seq, stream, item_id, after, data FROM main.log",
}


def _execute_script(conn: sqlite3.Connection, temp: str) -> None:
    for statement in _SCHEMA.format(temp=temp).split(";"):
        if statement.strip():
            conn.execute(statement)


def check(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a file that is not ours, or ours but newer or altered; accept a new, empty one."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise IncompatibleSnapshot(
                f"SQLite store {path} has schema version {version}, written by a "
                f"newer livekit-resume (this one reads up to {SCHEMA_VERSION}); upgrade "
                "livekit-resume or use another file"
            )
        if version < 1:
            raise SnapshotCorrupt(
                f"SQLite store {path} is marked as livekit-resume's but has no "
                "schema version; the file was altered: restore it or use another file"
            )
        return
    names = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master")]
    if app_id == 0 and version == 0 and not names:
        return  # a new, empty file: the schema is created next
    # A file with a user_version but no application id is not ours, tables or none: every
    # livekit-resume file with a schema version carries its id (schema 1's too). Taken for
    # an empty one, another application's freshly stamped file was switched to WAL and
    # then called an altered store of ours.
    shown = ", ".join(sorted(names)[:5]) or "none"
    raise SnapshotCorrupt(
        f"{path} is a SQLite database of another application (application_id "
        f"{app_id:#x}, tables: {shown}); livekit-resume will not touch it: point the "
        "store at another file"
    )


def create(conn: sqlite3.Connection, path: str) -> None:
    """Create the current schema in a new, empty file and mark the file as ours."""
    with write(conn):
        # Another process may have created it between our check and our lock.
        if conn.execute("PRAGMA user_version").fetchone()[0] != 0:
            return
        if {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} & _TABLES:
            raise SnapshotCorrupt(
                f"{path} already holds tables named like livekit-resume's but "
                "without its mark; point the store at another file"
            )
        _execute_script(conn, "")
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring a schema-1 file to the current schema, in one transaction.

    Its sessions go to `DEFAULT_NAMESPACE` (where a store of that era kept them, as
    far as any namespace-aware reader is concerned); its versions get no commit id
    and its leases no granted ttl (their expiry is then taken as it stands).
    """
    with write(conn):
        # Another process may have migrated it between our check and our lock.
        if conn.execute("PRAGMA user_version").fetchone()[0] != 1:
            return
        for table in _V1_COLUMNS:
            conn.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
        _execute_script(conn, "")
        for table, columns in _V1_COLUMNS.items():
            conn.execute(
                f"INSERT INTO {table} (ns, {columns}) SELECT ?, {columns} FROM {table}_v1",
                (DEFAULT_NAMESPACE,),
            )
            conn.execute(f"DROP TABLE {table}_v1")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    logger.info(
        "SQLite store %s migrated from schema 1 to %d",
        path,
        SCHEMA_VERSION,
        extra={"path": path},
    )


def stand_in(conn: sqlite3.Connection, version: int) -> None:
    """For a read-only connection: make a file of schema ``version`` read as the current
    schema without writing to it (temporary tables or views, gone at close)."""
    if version == 0:  # an empty file: an empty store, seen through empty tables
        _execute_script(conn, "TEMP ")
    elif version == 1:
        for table, select in _V1_VIEWS.items():
            conn.execute(f"CREATE TEMP VIEW {table} AS {select}")
