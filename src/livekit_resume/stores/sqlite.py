"""SQLite store: the embedded default. One file, no server, safe for several processes.

The file runs in WAL mode, so readers never wait for a writer. Every mutating operation
is one ``BEGIN IMMEDIATE`` transaction: it takes the database's write lock before it
reads, so its check (epoch, head version, lease) and its write are atomic across every
process on the machine. A busy database is waited for by SQLite's own busy handler
(``busy_timeout``). All SQLite work runs on one dedicated thread per store with one
connection, so no call ever blocks the event loop.

Layout (schema version `SCHEMA_VERSION`, stamped with ``PRAGMA user_version`` and marked
as ours with ``PRAGMA application_id``):

- ``sessions``: one row per key: lease (epoch, owner, expiry), ``touched_at`` for the
  session TTL, the head ``version``, the current log generation ``gen`` and its length.
- ``versions``: one row per retained version: head bytes, listing info, and where its
  items end in the log (``gen``, ``log_end``).
- ``log``: item records, append-only per generation. A commit inserts its records at
  the end of the current generation and one version row; it never reads or rewrites
  the existing log, so its cost does not grow with the conversation. Only compaction,
  which `needs_compaction` makes rare, folds a generation into a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger("livekit_resume")

# Bumped on every change of the tables below; a file stamped with a higher number was
# written by a newer livekit-resume and is refused rather than misread.
SCHEMA_VERSION = 1
# SQLite's slot for "which application's file format is this" ("LKRS"): it tells our
# file apart from any other SQLite database before we touch a single table.
APPLICATION_ID = 0x4C4B5253

# Primary result codes (the low byte of an extended code) meaning the file's bytes are bad.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# Backoff for the SQLITE_BUSY answers SQLite's busy handler does not wait on: short first
# (the conflict is a fresh file's WAL switch or a recovery, over in milliseconds).
_BUSY_FIRST_PAUSE = 0.005
_BUSY_MAX_PAUSE = 0.2
_CORRUPT_WORDS = ("file is not a database", "malformed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    owner TEXT,
    lease_expires_at REAL,
    touched_at REAL NOT NULL,
    gen INTEGER NOT NULL,
    version INTEGER NOT NULL,
    log_len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
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
CREATE TABLE IF NOT EXISTS log (
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
_TABLES = frozenset({"sessions", "versions", "log"})

_T = TypeVar("_T")
_InfoDict = dict[str, "str | int | float | bool | None"]


@dataclass(frozen=True, slots=True)
class _Session:
    epoch: int
    owner: str | None
    lease_expires_at: float | None
    touched_at: float
    gen: int
    version: int
    log_len: int


_SESSION_COLUMNS = "epoch, owner, lease_expires_at, touched_at, gen, version, log_len"


class SQLiteStore:
    """A `Store` in one SQLite file, shared safely by the processes of one machine.

    ``keep`` versions stay loadable; ``ttl`` (seconds without writes) expires whole
    sessions; ``busy_timeout`` is how long an operation waits for another process's
    write lock before `StoreUnavailable`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if busy_timeout < 0:
            raise ValueError("busy_timeout must not be negative")
        raw = os.fspath(path)
        # Resolved now: the file is opened later on the worker thread, and a relative
        # path must mean the working directory of the caller, not of that moment.
        self._path = raw if raw == ":memory:" else str(Path(raw).expanduser().absolute())
        self._keep = keep
        self._ttl = ttl
        self._clock = clock
        self._busy_timeout = busy_timeout
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

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, keep={self._keep}, ttl={self._ttl})"

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
                    self._conn = self._open()
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
            if str(mode).lower() != "wal" and self._path != ":memory:":
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
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                self._create_schema(conn)
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
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _expired(self, touched_at: float, now: float) -> bool:
        return self._ttl is not None and touched_at + self._ttl <= now

    def _session(self, conn: sqlite3.Connection, key: str, now: float) -> _Session | None:
        """The key's session row inside a write transaction; an expired one is purged."""
        row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key=?", (key,))
        found = row.fetchone()
        if found is None:
            return None
        s = _Session(*found)
        if self._expired(s.touched_at, now):
            _purge(conn, key)
            return None
        return s

    def _read_session(self, conn: sqlite3.Connection, key: str) -> tuple[_Session | None, bool]:
        """The key's live session row inside a read transaction, and whether an expired
        row is left for the caller to purge once the read is over."""
        found = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key=?", (key,)
        ).fetchone()
        if found is None:
            return None, False
        s = _Session(*found)
        if self._expired(s.touched_at, self._clock()):
            return None, True
        return s, False

    def _purge_expired(self, conn: sqlite3.Connection, key: str | None = None) -> None:
        """Delete expired sessions (one key, or all) in their own write transaction."""
        if self._ttl is None:
            return
        with _write(conn):
            now = self._clock()
            where = "touched_at + ? <= ?" + (" AND key = ?" if key is not None else "")
            args: tuple[object, ...] = (self._ttl, now) + ((key,) if key is not None else ())
            gone = [r[0] for r in conn.execute(f"SELECT key FROM sessions WHERE {where}", args)]
            for k in gone:
                _purge(conn, k)

    # -- leases ---------------------------------------------------------------------

    async def acquire(
        self, key: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL, takeover: bool = False
    ) -> Lease:
        validate_key(key)
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
                    "INSERT INTO sessions (key, epoch, owner, lease_expires_at, touched_at, "
                    "gen, version, log_len) VALUES (?, ?, ?, ?, ?, 0, 0, 0)",
                    (key, epoch, owner, now + ttl, now),
                )
            else:
                conn.execute(
                    "UPDATE sessions SET epoch=?, owner=?, lease_expires_at=?, touched_at=? "
                    "WHERE key=?",
                    (epoch, owner, now + ttl, now, key),
                )
            return Lease(key, owner, epoch, now + ttl)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        validate_key(lease.key)
        return await self._run(partial(self._renew, lease, ttl))

    def _renew(self, lease: Lease, ttl: float, conn: sqlite3.Connection) -> Lease:
        with _write(conn):
            now = self._clock()
            s = self._session(conn, lease.key, now)
            if s is None or s.epoch != lease.epoch or s.owner != lease.owner:
                raise lease_lost_error(lease.key, lease.epoch, s.epoch if s else None)
            conn.execute(
                "UPDATE sessions SET lease_expires_at=?, touched_at=? WHERE key=?",
                (now + ttl, now, lease.key),
            )
            return Lease(lease.key, lease.owner, lease.epoch, now + ttl)

    async def release(self, lease: Lease) -> None:
        validate_key(lease.key)
        await self._run(partial(self._release, lease))

    def _release(self, lease: Lease, conn: sqlite3.Connection) -> None:
        with _write(conn):
            s = self._session(conn, lease.key, self._clock())
            if s is not None and s.epoch == lease.epoch and s.owner == lease.owner:
                conn.execute(
                    "UPDATE sessions SET owner=NULL, lease_expires_at=NULL WHERE key=?",
                    (lease.key,),
                )

    # -- commits --------------------------------------------------------------------

    async def commit(self, commit: Commit) -> int:
        validate_key(commit.key)
        info = json.dumps(dict(commit.info), separators=(",", ":"))  # before the lock
        return await self._run(partial(self._commit, commit, info))

    def _commit(self, c: Commit, info: str, conn: sqlite3.Connection) -> int:
        key = c.key
        with _write(conn):
            now = self._clock()
            s = self._session(conn, key, now)
            if s is None or s.epoch != c.epoch or c.epoch == 0:
                raise lease_lost_error(key, c.epoch, s.epoch if s else None)
            if c.base_version != s.version:
                raise head_moved_error(c, s.version)
            # Append only: the records go after the current generation's last one.
            conn.executemany(
                "INSERT INTO log (key, gen, seq, stream, item_id, after, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (key, s.gen, s.log_len + i, r.stream, r.id, r.after, r.data)
                    for i, r in enumerate(c.records)
                ),
            )
            version = s.version + 1
            gen, log_len = s.gen, s.log_len + len(c.records)
            written = len(c.head) + sum(len(r.data or b"") for r in c.records)
            conn.execute(
                "INSERT INTO versions (key, version, epoch, created_at, head, gen, log_end, "
                "size, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, version, c.epoch, now, c.head, gen, log_len, written, info),
            )
            if needs_compaction(log_len, c.size):
                gen, log_len = self._compact(conn, key, version, gen, log_len)
            conn.execute(
                "DELETE FROM versions WHERE key=? AND version<=?", (key, version - self._keep)
            )
            # Generations grow with versions, so any below the oldest retained one is unused.
            conn.execute(
                "DELETE FROM log WHERE key=? AND gen<(SELECT min(gen) FROM versions WHERE key=?)",
                (key, key),
            )
            conn.execute(
                "UPDATE sessions SET version=?, gen=?, log_len=?, touched_at=? WHERE key=?",
                (version, gen, log_len, now, key),
            )
            return version

    def _compact(
        self, conn: sqlite3.Connection, key: str, version: int, gen: int, log_end: int
    ) -> tuple[int, int]:
        """Fold generation ``gen`` into a fresh one that only ``version`` uses so far."""
        rows = conn.execute(
            "SELECT stream, item_id, data, after FROM log WHERE key=? AND gen=? AND seq<? "
            "ORDER BY seq",
            (key, gen, log_end),
        )
        fresh = records_from_streams(fold_records((Record(*r) for r in rows), key))
        new_gen = gen + 1
        conn.executemany(
            "INSERT INTO log (key, gen, seq, stream, item_id, after, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((key, new_gen, i, r.stream, r.id, r.after, r.data) for i, r in enumerate(fresh)),
        )
        conn.execute(
            "UPDATE versions SET gen=?, log_end=? WHERE key=? AND version=?",
            (new_gen, len(fresh), key, version),
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
            s, expired = self._read_session(conn, key)
            stored = self._load_in(conn, key, s, version) if s is not None and s.version else None
        if expired:
            self._purge_expired(conn, key)
        if stored is None:
            raise not_found_error(key)
        return stored

    def _load_in(
        self, conn: sqlite3.Connection, key: str, s: _Session, version: int | None
    ) -> Stored:
        wanted = s.version if version is None else version
        found = conn.execute(
            "SELECT version, epoch, created_at, head, gen, log_end, info FROM versions "
            "WHERE key=? AND version=?",
            (key, wanted),
        ).fetchone()
        if found is None and version is not None:
            kept = conn.execute("SELECT version FROM versions WHERE key=? ORDER BY version", (key,))
            raise not_retained_error(key, version, [r[0] for r in kept])
        if found is None:
            raise SnapshotCorrupt(
                f"session {key!r}: head version {s.version} has no stored row; "
                "the file was altered outside livekit-resume"
            )
        number, epoch, created_at, head, gen, log_end, info = found
        rows = conn.execute(
            "SELECT stream, item_id, data, after FROM log WHERE key=? AND gen=? AND seq<? "
            "ORDER BY seq",
            (key, gen, log_end),
        )
        streams = fold_records((Record(*r) for r in rows), key)
        return Stored(key, number, epoch, created_at, head, streams, _info(info, key))

    async def versions(self, key: str) -> list[SnapshotInfo]:
        validate_key(key)
        return await self._run(partial(self._versions, key))

    def _versions(self, key: str, conn: sqlite3.Connection) -> list[SnapshotInfo]:
        with _read(conn):
            s, expired = self._read_session(conn, key)
            rows = (
                conn.execute(
                    "SELECT version, epoch, created_at, size, info FROM versions WHERE key=? "
                    "ORDER BY version",
                    (key,),
                ).fetchall()
                if s is not None
                else []
            )
        if expired:
            self._purge_expired(conn, key)
        return [SnapshotInfo(v, e, c, n, _info(i, key)) for v, e, c, n, i in rows]

    async def info(self, key: str) -> SessionInfo | None:
        validate_key(key)
        return await self._run(partial(self._info, key))

    def _info(self, key: str, conn: sqlite3.Connection) -> SessionInfo | None:
        with _read(conn):
            s, expired = self._read_session(conn, key)
            top = (
                conn.execute(
                    "SELECT info FROM versions WHERE key=? AND version=?", (key, s.version)
                ).fetchone()
                if s is not None and s.version
                else None
            )
        if expired:
            self._purge_expired(conn, key)
        if s is None:
            return None
        live = lease_is_live(s.lease_expires_at, self._clock())
        return SessionInfo(
            key=key,
            version=s.version,
            epoch=s.epoch,
            owner=s.owner if live else None,
            lease_expires_at=s.lease_expires_at if live else None,
            updated_at=s.touched_at,
            expires_at=s.touched_at + self._ttl if self._ttl is not None else None,
            info=_info(top[0], key) if top is not None else {},
        )

    async def keys(self) -> list[str]:
        return await self._run(self._keys)

    def _keys(self, conn: sqlite3.Connection) -> list[str]:
        with _read(conn):
            rows = conn.execute("SELECT key, touched_at FROM sessions ORDER BY key").fetchall()
        now = self._clock()
        live = [k for k, touched in rows if not self._expired(touched, now)]
        if len(live) < len(rows):
            self._purge_expired(conn)
        return live

    async def delete(self, key: str) -> bool:
        validate_key(key)
        return await self._run(partial(self._delete, key))

    def _delete(self, key: str, conn: sqlite3.Connection) -> bool:
        with _write(conn):
            if self._session(conn, key, self._clock()) is None:
                return False
            _purge(conn, key)
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


def _purge(conn: sqlite3.Connection, key: str) -> None:
    for table in ("log", "versions", "sessions"):
        conn.execute(f"DELETE FROM {table} WHERE key=?", (key,))


def _info(text: str, key: str) -> _InfoDict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SnapshotCorrupt(f"session {key!r}: stored listing info {text[:40]!r} is not a dict")
    return cast(_InfoDict, value)
