"""SQLite store: the embedded default. One file, no server, safe for several processes.

The file runs in WAL mode, so readers never wait for a writer. Every mutating operation
is one ``BEGIN IMMEDIATE`` transaction: it takes the database's write lock before it
reads, so its check (epoch, head version, lease) and its write are atomic across every
process on the machine. A busy database is waited for by SQLite's own busy handler
(``busy_timeout``). All SQLite work runs on one dedicated thread per store with one
connection, so no call ever blocks the event loop.

Layout (schema version `SCHEMA_VERSION`, stamped with ``PRAGMA user_version`` and marked
as ours with ``PRAGMA application_id``):

Every row carries its namespace ``ns`` beside the session key: one file holds the
sessions of several tenants or deployments, and none sees another's.

- ``sessions``: one row per key: lease (epoch, owner, expiry and the ttl it was granted
  for), ``touched_at`` for the session TTL, the head ``version``, the current log
  generation ``gen`` and its length.
- ``versions``: one row per retained version: head bytes, listing info, where its items
  end in the log (``gen``, ``log_end``) and the ``commit_id`` that wrote it.
- ``log``: item records, append-only per generation. A commit inserts its records at
  the end of the current generation and one version row; it never reads or rewrites
  the existing log, so its cost does not grow with the conversation. Only compaction,
  which `needs_compaction` makes rare, folds a generation into a new one.

Older files are migrated in place when a writable store opens them (schema 1 had no
namespaces: its sessions land in `DEFAULT_NAMESPACE`). A read-only store never writes:
it reads an older schema through temporary views instead.

Leases and the session TTL use this machine's wall clock (processes on one machine share
it). A clock stepped back would make a lease or a session look fresh for as long as the
step; a store that sees an expiry further ahead than its granted ttl, or a write time
in the future, pulls it back to now, so a step of any size delays a takeover by at most
one lease ttl and an expiry by at most one session ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar, cast

from ..errors import (
    IncompatibleSnapshot,
    LeaseLost,
    SessionBusy,
    SnapshotCorrupt,
    StoreUnavailable,
)
from .base import (
    DEFAULT_KEEP,
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    Record,
    SessionInfo,
    SnapshotInfo,
    Stored,
    busy_error,
    epoch_floor,
    fold_records,
    head_moved_error,
    lease_is_live,
    lease_lost_error,
    needs_compaction,
    not_found_error,
    not_retained_error,
    records_from_streams,
    validate_key,
    validate_lease_ttl,
    validate_ttl,
)

__all__ = ["APPLICATION_ID", "DEFAULT_NAMESPACE", "SCHEMA_VERSION", "SQLiteStore"]

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

# Primary result codes (the low byte of an extended code) meaning the file's bytes are bad.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# SQLITE_READONLY_DIRECTORY: a read-only connection to a WAL file could not create the
# -shm file beside it because the directory is not writable.
_SQLITE_READONLY_DIRECTORY = 1544
_SQLITE_CANTOPEN = 14
# Backoff for the SQLITE_BUSY answers SQLite's busy handler does not wait on: short first
# (the conflict is a fresh file's WAL switch or a recovery, over in milliseconds).
_BUSY_FIRST_PAUSE = 0.005
_BUSY_MAX_PAUSE = 0.2
_CORRUPT_WORDS = ("file is not a database", "malformed")

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

_T = TypeVar("_T")
_InfoDict = dict[str, "str | int | float | bool | None"]


# The shortest TTL (session or lease) accepted: below a millisecond a TTL is a typo


@dataclass(frozen=True, slots=True)
class _Session:
    epoch: int
    owner: str | None
    lease_expires_at: float | None
    lease_ttl: float | None
    touched_at: float
    gen: int
    version: int
    log_len: int


_SESSION_COLUMNS = (
    "epoch, owner, lease_expires_at, lease_ttl, touched_at, gen, version, log_len"
)


class SQLiteStore:
    """A `Store` in one SQLite file, shared safely by the processes of one machine.

    ``namespace`` separates the sessions of tenants or deployments sharing one file;
    ``keep`` versions stay loadable; ``ttl`` (seconds without writes) expires whole
    sessions; ``busy_timeout`` is how long an operation waits for another process's
    write lock before `StoreUnavailable`. ``read_only`` opens an existing file without
    ever writing to it (no file created, no migration, no purge of expired sessions):
    for listings and exports, even of a file or directory without write permission.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        read_only: bool = False,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must not be negative")
        # The same rule as RedisStore's, so that a namespace valid for one is for both.
        if (
            not isinstance(namespace, str)
            or not namespace
            or any(c in namespace for c in "{}")
            or not namespace.isprintable()
        ):
            raise ValueError(
                f"namespace {namespace!r} must be a non-empty printable string without braces"
            )
        raw = os.fspath(path)
        if raw in ("", ":memory:"):
            # SQLite would give each connection a private database gone at close.
            raise ValueError(
                f"SQLite path {raw!r} persists nothing; use memory:// (MemoryStore) for a "
                "store that lives in the process, or name a file"
            )
        # Resolved now: the file is opened later on the worker thread, and a relative
        # path must mean the working directory of the caller, not of that moment.
        self._path = str(Path(raw).expanduser().absolute())
        self._ns = namespace
        self._keep = keep
        self._ttl = validate_ttl(ttl)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._read_only = read_only
        # One thread, one connection: SQLite work is serialized here and never runs on
        # the event loop. The thread starts on the first operation.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="livekit-resume-sqlite"
        )
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @property
    def path(self) -> str:
        """The absolute path of the database file."""
        return self._path

    @property
    def namespace(self) -> str:
        """The namespace whose sessions this store sees."""
        return self._ns

    @property
    def read_only(self) -> bool:
        """Whether this store only reads (see the class docstring)."""
        return self._read_only

    def __repr__(self) -> str:
        ro = ", read_only=True" if self._read_only else ""
        return (
            f"SQLiteStore({self._path!r}, namespace={self._ns!r}, keep={self._keep}, "
            f"ttl={self._ttl}{ro})"
        )

    # -- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StoreUnavailable(f"SQLite store {self._path} is closed; open a new one")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        except RuntimeError as exc:
            if self._closed:  # closed while this call was being scheduled
                raise StoreUnavailable(f"SQLite store {self._path} is closed") from exc
            raise

    def _writable(self, what: str) -> None:
        if self._read_only:
            raise StoreUnavailable(
                f"SQLite store {self._path} is open read-only, so it cannot {what}; "
                "open it without read_only=True (or ?mode=ro) to write"
            )

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Runs on the store's thread: open the file if needed, run ``fn``, type errors.

        SQLite answers some lock conflicts with an immediate SQLITE_BUSY that its busy
        handler never waits on (switching a fresh file to WAL while other processes open
        it, WAL recovery, a read snapshot gone stale). Every ``fn`` is one whole
        transaction, rolled back on error, so it is simply run again until
        ``busy_timeout`` has passed.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = _BUSY_FIRST_PAUSE
        while True:
            try:
                if self._conn is None:
                    self._conn = self._open_read_only() if self._read_only else self._open()
                return fn(self._conn)
            except sqlite3.ProgrammingError:
                raise  # a bug in this module, not a state of the file
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise self._translate(exc) from exc
                time.sleep(pause)  # on the store's own thread, never the event loop
                pause = min(pause * 2, _BUSY_MAX_PAUSE)
            except sqlite3.DatabaseError as exc:
                raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> Exception:
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        text = str(exc)
        corrupt = (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)) or any(
            word in text for word in _CORRUPT_WORDS
        )
        if corrupt:
            return SnapshotCorrupt(
                f"SQLite store {self._path} is damaged or is not a database ({text}); "
                "restore the file from a backup or point the store at another file"
            )
        if isinstance(exc, sqlite3.IntegrityError):
            return SnapshotCorrupt(
                f"SQLite store {self._path} holds rows that contradict each other ({text}); "
                "the file was altered outside livekit-resume"
            )
        return StoreUnavailable(
            f"SQLite store {self._path} is unavailable ({text}); check that the file is "
            "readable and writable, the disk has room, and no process holds the database "
            f"locked for longer than busy_timeout ({self._busy_timeout} s)"
        )

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE / COMMIT
            check_same_thread=False,
        )
        try:
            with _read(conn):  # one snapshot: another process may be creating the schema
                self._check_schema(conn)  # before any write: a foreign file is never touched
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite store %s runs in %s mode, not WAL: readers will wait for writers",
                    self._path,
                    mode,
                    extra={"path": self._path},
                )
            # WAL + NORMAL: a commit survives a crash of the process (SIGKILL included) and
            # is atomic; only a power loss may drop the last commits. One fsync per
            # checkpoint instead of per commit keeps autosave cheap.
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._create_schema(conn)
            elif version < SCHEMA_VERSION:
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """Open the file with SQLite's ``mode=ro``: nothing is created or written.

        A WAL file whose directory is not writable cannot get the ``-shm`` index SQLite
        reads it through; it is then opened ``immutable``. That is safe only because no
        writer has the file open: a writer would have created the index beside it.
        """
        if not os.path.isfile(self._path):
            raise StoreUnavailable(
                f"no store at {self._path}: the file does not exist (a read-only store never "
                "creates one); check the path or RESUME_STORE"
            )
        uri = "file:" + urllib.parse.quote(self._path) + "?mode=ro"
        try:
            conn = self._connect_uri(uri)
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code not in (_SQLITE_READONLY_DIRECTORY, _SQLITE_CANTOPEN):
                raise
            wal = Path(self._path + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                # immutable would ignore the commits still in the -wal file
                raise StoreUnavailable(
                    f"SQLite store {self._path} cannot be read: its directory is not "
                    f"writable and {wal.name} holds commits not yet in the file; open it "
                    "once with write access (or copy the file, its -wal included, elsewhere)"
                ) from exc
            logger.debug(
                "SQLite store %s: directory not writable, reading the file as immutable",
                self._path,
                extra={"path": self._path},
            )
            conn = self._connect_uri(uri + "&immutable=1")
        try:
            with _read(conn):
                self._check_schema(conn)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # an empty file: an empty store, seen through empty tables
                for statement in _SCHEMA.format(temp="TEMP ").split(";"):
                    if statement.strip():
                        conn.execute(statement)
            elif version == 1:
                for table, select in _V1_VIEWS.items():
                    conn.execute(f"CREATE TEMP VIEW {table} AS {select}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_uri(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            # Opening is lazy: the first read is what meets a missing -shm or a bad file.
            conn.execute("PRAGMA user_version").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise IncompatibleSnapshot(
                    f"SQLite store {self._path} has schema version {version}, written by a "
                    f"newer livekit-resume (this one reads up to {SCHEMA_VERSION}); upgrade "
                    "livekit-resume or use another file"
                )
            if version < 1:
                raise SnapshotCorrupt(
                    f"SQLite store {self._path} is marked as livekit-resume's but has no "
                    "schema version; the file was altered: restore it or use another file"
                )
            return
        names = [r[0] for r in conn.execute("SELECT name FROM main.sqlite_master")]
        if app_id == 0 and not names:
            return  # a new, empty file: the schema is created next
        shown = ", ".join(sorted(names)[:5]) or "none"
        raise SnapshotCorrupt(
            f"{self._path} is a SQLite database of another application (application_id "
            f"{app_id:#x}, tables: {shown}); livekit-resume will not touch it: point the "
            "store at another file"
        )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with _write(conn):
            # Another process may have created it between our check and our lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] != 0:
                return
            if {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} & _TABLES:
                raise SnapshotCorrupt(
                    f"{self._path} already holds tables named like livekit-resume's but "
                    "without its mark; point the store at another file"
                )
            for statement in _SCHEMA.format(temp="").split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a schema-1 file to the current schema, in one transaction.

        Its sessions go to `DEFAULT_NAMESPACE` (where a store of that era kept them, as
        far as any namespace-aware reader is concerned); its versions get no commit id
        and its leases no granted ttl (their expiry is then taken as it stands).
        """
        with _write(conn):
            # Another process may have migrated it between our check and our lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] != 1:
                return
            for table in _V1_COLUMNS:
                conn.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
            for statement in _SCHEMA.format(temp="").split(";"):
                if statement.strip():
                    conn.execute(statement)
            for table, columns in _V1_COLUMNS.items():
                conn.execute(
                    f"INSERT INTO {table} (ns, {columns}) SELECT ?, {columns} FROM {table}_v1",
                    (DEFAULT_NAMESPACE,),
                )
                conn.execute(f"DROP TABLE {table}_v1")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        logger.info(
            "SQLite store %s migrated from schema 1 to %d",
            self._path,
            SCHEMA_VERSION,
            extra={"path": self._path},
        )

    def _expired(self, touched_at: float, now: float) -> bool:
        # A write time in the future (a clock stepped back) counts as now: see `_session`.
        return self._ttl is not None and min(touched_at, now) + self._ttl <= now

    @staticmethod
    def _skewed(s: _Session, now: float) -> bool:
        """Whether the row's times run ahead of ``now`` further than they could have been
        set: the wall clock was stepped back since."""
        ahead = (
            s.lease_ttl is not None
            and s.lease_expires_at is not None
            and s.lease_expires_at - now > s.lease_ttl
        )
        return ahead or s.touched_at > now

    def _lease_expiry(self, s: _Session, now: float) -> float | None:
        """The lease's expiry, never more than its granted ttl after ``now``."""
        if s.lease_ttl is None or s.lease_expires_at is None:
            return s.lease_expires_at
        return min(s.lease_expires_at, now + s.lease_ttl)

    def _select(self, conn: sqlite3.Connection, key: str) -> _Session | None:
        found = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE ns=? AND key=?", (self._ns, key)
        ).fetchone()
        return None if found is None else _Session(*found)

    def _session(self, conn: sqlite3.Connection, key: str, now: float) -> _Session | None:
        """The key's session row inside a write transaction; an expired one is purged.

        A row whose times run ahead of the clock (stepped back) is pulled back to now
        first, and stays so: that bounds how long the step keeps a lease held (one lease
        ttl) or a session alive (one session ttl) from the first write that sees it.
        """
        s = self._select(conn, key)
        if s is None:
            return None
        if self._skewed(s, now):
            s = self._unskew(conn, key, s, now)
        if self._expired(s.touched_at, now):
            _purge(conn, self._ns, key)
            return None
        return s

    def _unskew(self, conn: sqlite3.Connection, key: str, s: _Session, now: float) -> _Session:
        expires, touched = self._lease_expiry(s, now), min(s.touched_at, now)
        logger.warning(
            "session %r: its lease or write time is ahead of the clock (stepped back?); "
            "pulled back to now",
            key,
            extra={"key": key, "epoch": s.epoch},
        )
        conn.execute(
            "UPDATE sessions SET lease_expires_at=?, touched_at=? WHERE ns=? AND key=?",
            (expires, touched, self._ns, key),
        )
        return replace(s, lease_expires_at=expires, touched_at=touched)

    def _read_session(self, conn: sqlite3.Connection, key: str) -> tuple[_Session | None, bool]:
        """The key's live session row inside a read transaction, and whether the row needs
        a write once the read is over (expired, or its times run ahead of the clock)."""
        s = self._select(conn, key)
        if s is None:
            return None, False
        now = self._clock()
        if self._expired(s.touched_at, now):
            return None, True
        return s, self._skewed(s, now)

    def _tidy(self, conn: sqlite3.Connection, key: str | None = None) -> None:
        """In its own write transaction, purge expired sessions and pull times that run
        ahead of the clock back to now (one key, or all). A read-only store skips it."""
        if self._read_only:
            return
        with _write(conn):
            now = self._clock()
            where = "ns=:ns" + (" AND key=:key" if key is not None else "")
            args = {"ns": self._ns, "key": key, "now": now, "ttl": self._ttl}
            # Pulled back first (the same rule as `_session`), so the purge below sees it.
            conn.execute(
                "UPDATE sessions SET touched_at=min(touched_at, :now), lease_expires_at=CASE "
                "WHEN lease_expires_at > :now + lease_ttl THEN :now + lease_ttl "
                f"ELSE lease_expires_at END WHERE {where} AND (touched_at > :now OR "
                "lease_expires_at > :now + lease_ttl)",
                args,
            )
            if self._ttl is None:
                return
            gone = conn.execute(
                f"SELECT key FROM sessions WHERE {where} AND touched_at + :ttl <= :now", args
            ).fetchall()
            for (k,) in gone:
                _purge(conn, self._ns, k)

    # -- leases ---------------------------------------------------------------------

    def _lease_ttl(self, ttl: float) -> float:
        return validate_lease_ttl(ttl, self._ttl)

    async def acquire(
        self, key: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL, takeover: bool = False
    ) -> Lease:
        validate_key(key)
        self._lease_ttl(ttl)
        self._writable(f"take the lease of session {key!r}")
        return await self._run(partial(self._acquire, key, owner, ttl, takeover))

    def _acquire(
        self, key: str, owner: str, ttl: float, takeover: bool, conn: sqlite3.Connection
    ) -> Lease:
        with _write(conn):
            now = self._clock()
            s = self._session(conn, key, now)
            epoch = s.epoch if s else epoch_floor(now)
            live = s is not None and lease_is_live(s.lease_expires_at, now)
            if not (live and s is not None and s.owner == owner):
                if live and s is not None and s.owner is not None and not takeover:
                    raise busy_error(key, s.owner, s.epoch)
                epoch += 1
            if s is None:
                conn.execute(
                    "INSERT INTO sessions (ns, key, epoch, owner, lease_expires_at, lease_ttl, "
                    "touched_at, gen, version, log_len) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0)",
                    (self._ns, key, epoch, owner, now + ttl, ttl, now),
                )
            else:
                conn.execute(
                    "UPDATE sessions SET epoch=?, owner=?, lease_expires_at=?, lease_ttl=?, "
                    "touched_at=? WHERE ns=? AND key=?",
                    (epoch, owner, now + ttl, ttl, now, self._ns, key),
                )
            return Lease(key, owner, epoch, now + ttl)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        validate_key(lease.key)
        self._lease_ttl(ttl)
        self._writable(f"renew the lease of session {lease.key!r}")
        return await self._run(partial(self._renew, lease, ttl))

    def _renew(self, lease: Lease, ttl: float, conn: sqlite3.Connection) -> Lease:
        with _write(conn):
            now = self._clock()
            s = self._session(conn, lease.key, now)
            if s is None or s.epoch != lease.epoch or s.owner != lease.owner:
                raise lease_lost_error(lease.key, lease.epoch, s.epoch if s else None)
            conn.execute(
                "UPDATE sessions SET lease_expires_at=?, lease_ttl=?, touched_at=? "
                "WHERE ns=? AND key=?",
                (now + ttl, ttl, now, self._ns, lease.key),
            )
            return Lease(lease.key, lease.owner, lease.epoch, now + ttl)

    async def release(self, lease: Lease) -> None:
        validate_key(lease.key)
        self._writable(f"release the lease of session {lease.key!r}")
        await self._run(partial(self._release, lease))

    def _release(self, lease: Lease, conn: sqlite3.Connection) -> None:
        with _write(conn):
            s = self._session(conn, lease.key, self._clock())
            if s is not None and s.epoch == lease.epoch and s.owner == lease.owner:
                conn.execute(
                    "UPDATE sessions SET owner=NULL, lease_expires_at=NULL, lease_ttl=NULL "
                    "WHERE ns=? AND key=?",
                    (self._ns, lease.key),
                )

    # -- commits --------------------------------------------------------------------

    async def commit(self, commit: Commit) -> int:
        validate_key(commit.key)
        self._writable(f"commit to session {commit.key!r}")
        info = json.dumps(dict(commit.info), separators=(",", ":"))  # before the lock
        return await self._run(partial(self._commit, commit, info))

    def _commit(self, c: Commit, info: str, conn: sqlite3.Connection) -> int:
        key, ns = c.key, self._ns
        with _write(conn):
            now = self._clock()
            s = self._session(conn, key, now)
            if s is None or s.epoch != c.epoch or c.epoch == 0:
                raise lease_lost_error(key, c.epoch, s.epoch if s else None)
            if c.base_version != s.version:
                if c.commit_id and s.version == c.base_version + 1:
                    top = conn.execute(
                        "SELECT commit_id FROM versions WHERE ns=? AND key=? AND version=?",
                        (ns, key, s.version),
                    ).fetchone()
                    if top is not None and top[0] == c.commit_id:
                        return s.version  # a retry of a commit that landed: answer it
                raise head_moved_error(c, s.version)
            # Append only: the records go after the current generation's last one.
            conn.executemany(
                "INSERT INTO log (ns, key, gen, seq, stream, item_id, after, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (ns, key, s.gen, s.log_len + i, r.stream, r.id, r.after, r.data)
                    for i, r in enumerate(c.records)
                ),
            )
            version = s.version + 1
            gen, log_len = s.gen, s.log_len + len(c.records)
            written = len(c.head) + sum(len(r.data or b"") for r in c.records)
            conn.execute(
                "INSERT INTO versions (ns, key, version, epoch, created_at, head, gen, log_end, "
                "size, info, commit_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, key, version, c.epoch, now, c.head, gen, log_len, written, info, c.commit_id),
            )
            if needs_compaction(log_len, c.size):
                gen, log_len = self._compact(conn, key, version, gen, log_len)
            conn.execute(
                "DELETE FROM versions WHERE ns=? AND key=? AND version<=?",
                (ns, key, version - self._keep),
            )
            # Generations grow with versions, so any below the oldest retained one is unused.
            conn.execute(
                "DELETE FROM log WHERE ns=?1 AND key=?2 AND "
                "gen<(SELECT min(gen) FROM versions WHERE ns=?1 AND key=?2)",
                (ns, key),
            )
            conn.execute(
                "UPDATE sessions SET version=?, gen=?, log_len=?, touched_at=? "
                "WHERE ns=? AND key=?",
                (version, gen, log_len, now, ns, key),
            )
            return version

    def _compact(
        self, conn: sqlite3.Connection, key: str, version: int, gen: int, log_end: int
    ) -> tuple[int, int]:
        """Fold generation ``gen`` into a fresh one that only ``version`` uses so far."""
        ns = self._ns
        rows = conn.execute(
            "SELECT stream, item_id, data, after FROM log WHERE ns=? AND key=? AND gen=? "
            "AND seq<? ORDER BY seq",
            (ns, key, gen, log_end),
        )
        fresh = records_from_streams(fold_records((Record(*r) for r in rows), key))
        new_gen = gen + 1
        conn.executemany(
            "INSERT INTO log (ns, key, gen, seq, stream, item_id, after, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (ns, key, new_gen, i, r.stream, r.id, r.after, r.data)
                for i, r in enumerate(fresh)
            ),
        )
        conn.execute(
            "UPDATE versions SET gen=?, log_end=? WHERE ns=? AND key=? AND version=?",
            (new_gen, len(fresh), ns, key, version),
        )
        logger.debug(
            "compacted session %r: %d records folded into %d",
            key,
            log_end,
            len(fresh),
            extra={"key": key, "version": version},
        )
        return new_gen, len(fresh)

    # -- reads ----------------------------------------------------------------------

    async def load(self, key: str, version: int | None = None) -> Stored:
        validate_key(key)
        return await self._run(partial(self._load, key, version))

    def _load(self, key: str, version: int | None, conn: sqlite3.Connection) -> Stored:
        with _read(conn):
            s, untidy = self._read_session(conn, key)
            stored = self._load_in(conn, key, s, version) if s is not None and s.version else None
        if untidy:
            self._tidy(conn, key)
        if stored is None:
            raise not_found_error(key)
        return stored

    def _load_in(
        self, conn: sqlite3.Connection, key: str, s: _Session, version: int | None
    ) -> Stored:
        ns = self._ns
        wanted = s.version if version is None else version
        found = conn.execute(
            "SELECT version, epoch, created_at, head, gen, log_end, info FROM versions "
            "WHERE ns=? AND key=? AND version=?",
            (ns, key, wanted),
        ).fetchone()
        if found is None and version is not None:
            kept = conn.execute(
                "SELECT version FROM versions WHERE ns=? AND key=? ORDER BY version", (ns, key)
            )
            raise not_retained_error(key, version, [r[0] for r in kept])
        if found is None:
            raise SnapshotCorrupt(
                f"session {key!r}: head version {s.version} has no stored row; "
                "the file was altered outside livekit-resume"
            )
        number, epoch, created_at, head, gen, log_end, info = found
        rows = conn.execute(
            "SELECT stream, item_id, data, after FROM log WHERE ns=? AND key=? AND gen=? "
            "AND seq<? ORDER BY seq",
            (ns, key, gen, log_end),
        )
        streams = fold_records((Record(*r) for r in rows), key)
        return Stored(key, number, epoch, created_at, head, streams, _info(info, key))

    async def versions(self, key: str) -> list[SnapshotInfo]:
        validate_key(key)
        return await self._run(partial(self._versions, key))

    def _versions(self, key: str, conn: sqlite3.Connection) -> list[SnapshotInfo]:
        with _read(conn):
            s, untidy = self._read_session(conn, key)
            rows = (
                conn.execute(
                    "SELECT version, epoch, created_at, size, info FROM versions "
                    "WHERE ns=? AND key=? ORDER BY version",
                    (self._ns, key),
                ).fetchall()
                if s is not None
                else []
            )
        if untidy:
            self._tidy(conn, key)
        return [SnapshotInfo(v, e, c, n, _info(i, key)) for v, e, c, n, i in rows]

    async def info(self, key: str) -> SessionInfo | None:
        validate_key(key)
        return await self._run(partial(self._info, key))

    def _info(self, key: str, conn: sqlite3.Connection) -> SessionInfo | None:
        with _read(conn):
            s, untidy = self._read_session(conn, key)
            top = (
                conn.execute(
                    "SELECT info FROM versions WHERE ns=? AND key=? AND version=?",
                    (self._ns, key, s.version),
                ).fetchone()
                if s is not None and s.version
                else None
            )
        if untidy:
            self._tidy(conn, key)
        if s is None:
            return None
        now = self._clock()
        expires = self._lease_expiry(s, now)
        live = lease_is_live(expires, now)
        touched = min(s.touched_at, now)
        return SessionInfo(
            key=key,
            version=s.version,
            epoch=s.epoch,
            owner=s.owner if live else None,
            lease_expires_at=expires if live else None,
            updated_at=touched,
            expires_at=touched + self._ttl if self._ttl is not None else None,
            info=_info(top[0], key) if top is not None else {},
        )

    async def keys(self) -> list[str]:
        return await self._run(self._keys)

    def _keys(self, conn: sqlite3.Connection) -> list[str]:
        with _read(conn):
            rows = conn.execute(
                f"SELECT key, {_SESSION_COLUMNS} FROM sessions WHERE ns=? ORDER BY key",
                (self._ns,),
            ).fetchall()
        now = self._clock()
        sessions = [(k, _Session(*cols)) for k, *cols in rows]
        live = [k for k, s in sessions if not self._expired(s.touched_at, now)]
        if len(live) < len(rows) or any(self._skewed(s, now) for _, s in sessions):
            self._tidy(conn)
        return live

    async def delete(self, key: str) -> bool:
        validate_key(key)
        self._writable(f"delete session {key!r}")
        return await self._run(partial(self._delete, key))

    def _delete(self, key: str, conn: sqlite3.Connection) -> bool:
        with _write(conn):
            if self._session(conn, key, self._clock()) is None:
                return False
            _purge(conn, self._ns, key)
            return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=False)

    def _close_conn(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, holding the database's write lock from its first read.

    A refusal (`LeaseLost`, `SessionBusy`) is raised before anything but the purge of
    an expired session was written, so that purge is kept; any other error rolls back.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except (LeaseLost, SessionBusy):
        conn.execute("COMMIT")
        raise
    except BaseException:
        if conn.in_transaction:
            # The original error is what matters; a failing rollback (the connection may
            # already have rolled back on a disk error) must not replace it.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def _read(conn: sqlite3.Connection) -> Iterator[None]:
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


def _purge(conn: sqlite3.Connection, ns: str, key: str) -> None:
    for table in ("log", "versions", "sessions"):
        conn.execute(f"DELETE FROM {table} WHERE ns=? AND key=?", (ns, key))


def _info(text: str, key: str) -> _InfoDict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SnapshotCorrupt(f"session {key!r}: stored listing info {text[:40]!r} is not a dict")
    return cast(_InfoDict, value)
