"""`SQLiteStore`: the `Store` contract on one SQLite file (see the package docstring).

Every mutating operation is one ``BEGIN IMMEDIATE`` transaction: it takes the database's
write lock before it reads, so its check (epoch, head version, lease) and its write are
atomic across every process on the machine. A commit inserts its records at the end of
the current generation and one version row; it never reads or rewrites the existing log,
so its cost does not grow with the conversation. Compaction follows stores/log.py's rule,
inside the commit's transaction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from ... import redact
from ...errors import ResumeError, SnapshotCorrupt, StoreUnavailable
from ..base import (
    DEFAULT_LEASE_TTL,
    INFO_BATCH,
    Commit,
    Lease,
    SessionInfo,
    SnapshotInfo,
    Stored,
    acquired_epoch,
    check_lease_key,
    head_moved_error,
    lease_lost_error,
    not_found_error,
    not_retained_error,
    validate_commit,
    validate_key,
    validate_lease_ttl,
    validate_namespace,
    validate_owner,
    validate_page,
    validate_reclaim,
    validate_ttl,
    validate_version,
)
from ..log import (
    DEFAULT_KEEP,
    Record,
    compacted,
    fold_rows,
    lease_is_live,
    needs_compaction,
)
from . import tombstones
from .connection import Connection, truncate_wal
from .control import SQLiteCommands
from .schema import DEFAULT_NAMESPACE
from .sessions import SESSION_COLUMNS, Session, SessionRows, altered, is_counter
from .transactions import purge, read, write

__all__ = ["SQLiteStore"]

# A version's info as compact JSON (json.dumps(..., separators=(",", ":"))), one encoder
# for all: made per call, it costs more than encoding the info.
_INFO = json.JSONEncoder(separators=(",", ":"))

logger = logging.getLogger("livekit_resume")

_T = TypeVar("_T")

# The longest database path SQLite opens: its unix VFS holds file names in 512 bytes,
# the "-journal" beside the file included.
_MAX_PATH_BYTES = 512 - len("-journal")
_InfoDict = dict[str, "str | int | float | bool | None"]


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
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number of versions >= 1, not {keep!r}")
        # not >= 0: NaN too (its deadline never passes, so a locked file was waited on
        # for ever); inf is allowed, and waits for ever by request
        if isinstance(busy_timeout, bool) or not (
            isinstance(busy_timeout, (int, float)) and busy_timeout >= 0
        ):
            raise ValueError(f"busy_timeout must be a number of seconds >= 0, not {busy_timeout!r}")
        # The same rule as RedisStore's, so that a namespace valid for one is for both.
        validate_namespace(namespace)
        raw = os.fspath(path)
        if raw in ("", ":memory:"):
            # SQLite would give each connection a private database gone at close.
            raise ValueError(
                f"SQLite path {raw!r} persists nothing; use memory:// (MemoryStore) for a "
                "store that lives in the process, or name a file"
            )
        if "\x00" in raw:
            # Refused now: else every operation would meet it on the store's thread.
            raise ValueError(f"SQLite path {raw!r} contains a NUL character")
        # Resolved now: the file is opened later on the worker thread, and a relative
        # path must mean the working directory of the caller, not of that moment. Real:
        # SQLite keeps the -wal and -shm beside a symlink's target, where the guards of
        # `Connection` look for them; two spellings of one file (``..``, a link) must be
        # one file to them; and ``//`` would be a URI's host to a read-only open.
        named = str(Path(raw).expanduser().absolute())
        self._path = os.path.realpath(named)
        if len(os.fsencode(self._path)) > _MAX_PATH_BYTES:
            # Refused now: SQLite would refuse every operation as "unable to open", after
            # leaving an empty file behind.
            raise ValueError(
                f"SQLite path {self._path!r} is {len(os.fsencode(self._path))} bytes, over "
                f"the {_MAX_PATH_BYTES} SQLite opens (with '-journal' it must fit in 512)"
            )
        self._ns = namespace
        self._keep = keep
        self._ttl = validate_ttl(ttl)
        self._clock = clock
        self._read_only = read_only
        self._conn = Connection(
            self._path, busy_timeout=busy_timeout, read_only=read_only, named=named
        )
        self._rows = SessionRows(namespace, ttl=self._ttl, clock=clock, read_only=read_only)
        self._commands: SQLiteCommands | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """Open the file a ``sqlite:`` URL names, SQLAlchemy's convention:
        ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``; ``?mode=ro`` opens it
        read-only. ``options`` are the constructor's keywords."""
        # The query and fragment are split off before unquoting: %3F in a name is a real "?".
        parts = urlsplit(url)
        shown = redact.url(url)  # what messages show: never a password
        if parts.scheme.lower() != "sqlite":
            raise ValueError(f"SQLiteStore opens sqlite:/// URLs, not {shown!r}")
        if parts.netloc:
            raise ValueError(
                f"store URL {shown!r} names a host; SQLite files are local: "
                "use sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        if not parts.path.startswith("/"):
            # sqlite:relative.db: no slash to cut before the path, which [1:] would cut
            raise ValueError(
                f"store URL {shown!r} names no path after 'sqlite:///': "
                "use sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        if parts.fragment:
            raise ValueError(f"store URL {shown!r} has a fragment (#{parts.fragment}); remove it")
        path = unquote(parts.path[1:])
        if not path:
            raise ValueError(f"store URL {shown!r} names no file: use sqlite:///resume.db")
        if path == ":memory:":
            raise ValueError(
                f"store URL {shown!r} persists nothing (each connection gets its own empty "
                "database); use memory:// for a store that lives in the process"
            )
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if (name, value) != ("mode", "ro"):
                raise ValueError(
                    f"store URL {shown!r}: unsupported query {name}=… "
                    "(supported: ?mode=ro, to open the file read-only)"
                )
            options["read_only"] = True
        return cls(path, **options)

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

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` (one whole transaction) on the store's thread and connection."""
        return await self._conn.run(fn)

    def _writable(self, what: str) -> None:
        if self._read_only:
            raise StoreUnavailable(
                f"SQLite store {self._path} is open read-only, so it cannot {what}; "
                "open it without read_only=True (or ?mode=ro) to write"
            )

    # -- leases ---------------------------------------------------------------------

    def _lease_ttl(self, ttl: float) -> float:
        return validate_lease_ttl(ttl, self._ttl)

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        validate_key(key)
        validate_owner(owner)
        validate_reclaim(reclaim)
        self._lease_ttl(ttl)
        self._writable(f"take the lease of session {key!r}")
        return await self._run(partial(self._acquire, key, owner, ttl, takeover, reclaim))

    def _acquire(
        self,
        key: str,
        owner: str,
        ttl: float,
        takeover: bool,
        reclaim: int | None,
        conn: sqlite3.Connection,
    ) -> Lease:
        with write(conn):
            now = self._clock()
            s = self._rows.session(conn, key, now)
            # a new session starts above the tombstone a delete left, which stays: a
            # holder of the deleted one is fenced by it for its day, whatever happens
            epoch = acquired_epoch(
                key,
                owner,
                now,
                epoch=s.epoch if s is not None else None,
                holder=s.owner if s is not None else None,
                live=s is not None and lease_is_live(s.lease_expires_at, now),
                takeover=takeover,
                reclaim=reclaim,
                tombstone=tombstones.tombstone(conn, self._ns, key, now) if s is None else None,
            )
            if s is None:
                self._no_remains(conn, key)  # a lease on top of them would hide them
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
        with write(conn):
            now = self._clock()
            s = self._rows.session(conn, lease.key, now)
            if s is None:
                tombstone = tombstones.tombstone(conn, self._ns, lease.key, now)
                raise lease_lost_error(lease.key, lease.epoch, None, tombstone=tombstone)
            if s.epoch != lease.epoch or s.owner != lease.owner:
                raise lease_lost_error(lease.key, lease.epoch, s.epoch)
            conn.execute(
                "UPDATE sessions SET lease_expires_at=?, lease_ttl=?, touched_at=? "
                "WHERE ns=? AND key=?",
                (now + ttl, ttl, now, self._ns, lease.key),
            )
            return Lease(lease.key, lease.owner, lease.epoch, now + ttl, s.version)

    async def release(self, lease: Lease) -> None:
        validate_key(lease.key)
        self._writable(f"release the lease of session {lease.key!r}")
        await self._run(partial(self._release, lease))

    def _release(self, lease: Lease, conn: sqlite3.Connection) -> None:
        with write(conn):
            s = self._rows.session(conn, lease.key, self._clock())
            if s is not None and s.epoch == lease.epoch and s.owner == lease.owner:
                conn.execute(
                    "UPDATE sessions SET owner=NULL, lease_expires_at=NULL, lease_ttl=NULL "
                    "WHERE ns=? AND key=?",
                    (self._ns, lease.key),
                )

    # -- commits --------------------------------------------------------------------

    async def commit(self, commit: Commit) -> int:
        validate_commit(commit)
        self._writable(f"commit to session {commit.key!r}")
        if commit.lease_ttl is not None:
            self._lease_ttl(commit.lease_ttl)
        info = _INFO.encode(dict(commit.info))  # before the lock
        return await self._run(partial(self._commit, commit, info))

    def _commit(self, c: Commit, info: str, conn: sqlite3.Connection) -> int:
        key, ns = c.key, self._ns
        with write(conn):
            now = self._clock()
            s = self._rows.session(conn, key, now)
            if s is None:
                tombstone = tombstones.tombstone(conn, ns, key, now)
                raise lease_lost_error(key, c.epoch, None, tombstone=tombstone)
            if s.epoch != c.epoch or c.epoch == 0:
                raise lease_lost_error(key, c.epoch, s.epoch)
            if c.base_version != s.version:
                if c.commit_id and s.version == c.base_version + 1:
                    top = conn.execute(
                        "SELECT commit_id FROM versions WHERE ns=? AND key=? AND version=?",
                        (ns, key, s.version),
                    ).fetchone()
                    if top is None:
                        # this very commit landed unheard, or another one: no row to tell
                        raise altered(key, _no_row(s.version))
                    if top[0] == c.commit_id:
                        # A renewal (as `_renew`) moves the session's expiry too.
                        renews = c.lease_ttl is not None and s.owner is not None
                        conn.execute(
                            "UPDATE sessions SET lease_expires_at=?, lease_ttl=?, "
                            "touched_at=? WHERE ns=? AND key=?",
                            (*_lease_after(c, s, now), now if renews else s.touched_at, ns, key),
                        )
                        return s.version  # a retry of a commit that landed: answer it
                raise head_moved_error(c, s.version)
            # Append only: the records go after the current generation's last one. A
            # whole commit, which reads nothing of its base, starts a generation of its
            # own: a base whose log rows were lost or altered is not read into it.
            gen, start = (s.gen + 1, 0) if c.whole else (s.gen, s.log_len)
            _insert_log(
                conn,
                [
                    (ns, key, gen, start + i, r.stream, r.id, r.after, r.data)
                    for i, r in enumerate(c.records)
                ],
            )
            version = s.version + 1
            log_len = start + len(c.records)
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
                # plain ? (Python 3.12.0-3.12.3 warn of ?NNN as named parameters)
                "DELETE FROM log WHERE ns=? AND key=? AND "
                "gen<(SELECT min(gen) FROM versions WHERE ns=? AND key=?)",
                (ns, key, ns, key),
            )
            conn.execute(
                "UPDATE sessions SET version=?, gen=?, log_len=?, touched_at=?, "
                "lease_expires_at=?, lease_ttl=? WHERE ns=? AND key=?",
                (version, gen, log_len, now, *_lease_after(c, s, now), ns, key),
            )
            return version

    def _remains(self, conn: sqlite3.Connection, key: str) -> str | None:
        """What is stored of ``key`` besides its session row, said in words; None: nothing.
        Every operation writes or purges the row with the rest, so remains without it
        mean the file was altered (a row deleted by hand, a partial restore)."""
        ns = self._ns
        top = conn.execute(
            "SELECT max(version), count(*) FROM versions WHERE ns=? AND key=?", (ns, key)
        ).fetchone()
        if top[1]:
            return f"{top[1]} stored version(s), up to version {top[0]}"
        if conn.execute("SELECT 1 FROM log WHERE ns=? AND key=? LIMIT 1", (ns, key)).fetchone():
            return "item records"
        return None

    def _no_remains(self, conn: sqlite3.Connection, key: str) -> None:
        remains = self._remains(conn, key)
        if remains is not None:
            raise altered(key, f"its session row is missing but {remains} remain")

    def _compact(
        self, conn: sqlite3.Connection, key: str, version: int, gen: int, log_end: int
    ) -> tuple[int, int]:
        """Fold generation ``gen`` into a fresh one that only ``version`` uses so far."""
        ns = self._ns
        # A log missing a record refuses the commit whole: folded, it would be written
        # back as the whole conversation, and the loss hidden from every later read.
        fresh = compacted(
            (Record(*r) for r in _log_rows(conn, ns, key, version, gen, log_end)), key
        )
        new_gen = gen + 1
        _insert_log(
            conn,
            [(ns, key, new_gen, i, r.stream, r.id, r.after, r.data) for i, r in enumerate(fresh)],
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
        validate_version(version)
        return await self._run(partial(self._load, key, version))

    def _load(self, key: str, version: int | None, conn: sqlite3.Connection) -> Stored:
        with read(conn):
            s, untidy = self._rows.read_session(conn, key)
            if s is None and not untidy:
                self._no_remains(conn, key)  # else a lost row reads as a fresh start
            stored = self._load_in(conn, key, s, version) if s is not None and s.version else None
        if untidy:
            self._rows.tidy(conn, key)
        if stored is None:
            raise not_found_error(key)
        return stored

    def _load_in(
        self, conn: sqlite3.Connection, key: str, s: Session, version: int | None
    ) -> Stored:
        ns = self._ns
        wanted = s.version if version is None else version
        found = None
        if 0 < wanted <= s.version:  # nothing else is stored (nor fits SQLite's INTEGER)
            found = conn.execute(
                "SELECT version, epoch, created_at, head, gen, log_end, info FROM versions "
                "WHERE ns=? AND key=? AND version=?",
                (ns, key, wanted),
            ).fetchone()
        if found is None and version is not None:
            kept = [
                r[0]
                for r in conn.execute(
                    "SELECT version FROM versions WHERE ns=? AND key=? ORDER BY version", (ns, key)
                )
            ]
            # one between the oldest kept and the head was deleted by hand (a trim only
            # deletes the oldest), as `versions` lists it
            if kept and kept[0] < version <= s.version:
                raise altered(key, _no_row(version))
            raise not_retained_error(key, version, kept)
        if found is None:
            raise altered(key, _no_row(wanted))
        number, epoch, created_at, head, gen, log_end, info = found
        _check_version_row(key, found)
        streams = fold_rows(_log_rows(conn, ns, key, number, gen, log_end), key)
        return Stored(key, number, epoch, created_at, head, streams, _info(info, key))

    async def versions(self, key: str) -> list[SnapshotInfo]:
        validate_key(key)
        return await self._run(partial(self._versions, key))

    def _versions(self, key: str, conn: sqlite3.Connection) -> list[SnapshotInfo]:
        with read(conn):
            s, untidy = self._rows.read_session(conn, key)
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
            self._rows.tidy(conn, key)
        # a row whose number is no version's is none (its version, lost, is listed below)
        listed = {v: _listed(key, v, e, c, n, i) for v, e, c, n, i in rows if is_counter(v)}
        if s is None or not s.version:
            return list(listed.values())
        # a row lost between the oldest kept and the head (deleted by hand: a trim only
        # deletes the oldest) is listed, damaged, as `load` of it finds it
        oldest = min(listed, default=s.version)
        return [
            listed.get(n) or SnapshotInfo(n, 0, 0.0, 0, {}, damaged=str(altered(key, _no_row(n))))
            for n in range(oldest, s.version + 1)
        ]

    async def info(self, key: str) -> SessionInfo | None:
        validate_key(key)
        return await self._run(partial(self._info, key))

    async def infos(self, keys: Sequence[str]) -> list[SessionInfo | ResumeError | None]:
        """`SessionInfos`: each key's `info` in order, `INFO_BATCH` sessions per hop to
        the store's thread rather than one hop each (what ``ls`` reads of a page). A
        damaged session has its `SnapshotCorrupt` in its place, a store that cannot be
        read its `StoreUnavailable` in every place."""
        for key in keys:
            validate_key(key)
        found: list[SessionInfo | ResumeError | None] = []
        for start in range(0, len(keys), INFO_BATCH):
            batch = list(keys[start : start + INFO_BATCH])
            try:
                found += await self._run(partial(self._infos, batch))
            except StoreUnavailable as e:
                found += [e] * len(batch)
        return found

    def _infos(
        self, keys: list[str], conn: sqlite3.Connection
    ) -> list[SessionInfo | ResumeError | None]:
        found: list[SessionInfo | ResumeError | None] = []
        for key in keys:
            try:
                found.append(self._info(key, conn))
            except SnapshotCorrupt as e:
                found.append(e)
        return found

    def _info(self, key: str, conn: sqlite3.Connection) -> SessionInfo | None:
        with read(conn):
            s, untidy = self._rows.read_session(conn, key)
            top = (
                conn.execute(
                    "SELECT info FROM versions WHERE ns=? AND key=? AND version=?",
                    (self._ns, key, s.version),
                ).fetchone()
                if s is not None and s.version
                else None
            )
        if untidy:
            self._rows.tidy(conn, key)
        if s is None:
            return None
        if s.version and top is None:
            raise altered(key, _no_row(s.version))  # as Redis says of a lost record
        now = self._clock()
        expires = self._rows.lease_expiry(s, now)
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
            read_at=now,
        )

    async def keys(self) -> list[str]:
        return await self._run(self._keys)

    def _keys(self, conn: sqlite3.Connection) -> list[str]:
        with read(conn):
            rows = conn.execute(
                f"SELECT key, {SESSION_COLUMNS} FROM sessions WHERE ns=? ORDER BY key",
                (self._ns,),
            ).fetchall()
        now = self._clock()
        seen = [(k, *self._rows.listed(k, tuple(cols), now)) for k, *cols in rows]
        live = [k for k, listed, _ in seen if listed]
        if len(live) < len(rows) or any(skewed for _, _, skewed in seen):
            self._rows.tidy(conn)
        return live

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        """`KeyPages`: live keys in order from the (ns, key) index, one page at a time."""
        validate_page(prefix, after, limit)
        return await self._run(partial(self._keys_page, prefix, after, limit))

    def _keys_page(
        self, prefix: str, after: str | None, limit: int | None, conn: sqlite3.Connection
    ) -> tuple[list[str], str | None]:
        live: list[str] = []
        # one more: is there a next? (a limit past SQLite's integers is no limit at all)
        cursor, want = after, None if limit is None or limit >= 1 << 62 else limit + 1
        while want is None or len(live) < want:
            with read(conn):
                rows = conn.execute(
                    f"SELECT key, {SESSION_COLUMNS} FROM sessions WHERE ns=? AND key>=? "
                    "AND (? IS NULL OR key>?) AND substr(key, 1, ?)=? ORDER BY key LIMIT ?",
                    (self._ns, prefix, cursor, cursor, len(prefix), prefix, want or -1),
                ).fetchall()
            now = self._clock()
            live += [k for k, *c in rows if self._rows.listed(k, tuple(c), now)[0]]
            if want is None or len(rows) < want:
                break
            cursor = rows[-1][0]
        if limit is None or len(live) <= limit:
            return live, None
        return live[:limit], live[limit - 1]

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        validate_key(key)
        if lease is not None:
            check_lease_key(key, lease)
        self._writable(f"delete session {key!r}")
        deleted = await self._run(partial(self._delete, key, lease))
        if deleted:
            await self._run(truncate_wal)
        return deleted

    def _delete(self, key: str, lease: Lease | None, conn: sqlite3.Connection) -> bool:
        with write(conn):
            try:
                s = self._rows.session(conn, key, self._clock())
            except SnapshotCorrupt:
                if lease is not None:  # its epoch cannot be read: the fence cannot hold
                    raise
                purge(conn, self._ns, key)  # an operator's rm of a damaged session
                return True
            if s is None:
                if self._remains(conn, key) is None:
                    return False
                purge(conn, self._ns, key)  # what a lost session row left
                return True
            if lease is not None and (s.epoch != lease.epoch or s.owner != lease.owner):
                raise lease_lost_error(key, lease.epoch, s.epoch)
            purge(conn, self._ns, key)
            tombstones.lay(conn, self._ns, key, s.epoch, self._clock())
            return True

    def commands(self) -> SQLiteCommands:
        """The store's remote command channel (`Controllable`): a table polled by owners."""
        self._writable("carry remote commands")
        if self._commands is None:
            self._commands = SQLiteCommands(self._run, self._ns, self._clock)
        return self._commands

    async def aclose(self) -> None:
        await self._conn.aclose()


_INSERT_LOG = (
    "INSERT INTO log (ns, key, gen, seq, stream, item_id, after, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EMPTY_LOG = _INSERT_LOG.replace("?)", "zeroblob(?))")  # data: that many zero bytes
_LogRow = tuple[str, str, int, int, str, str, "str | None", "bytes | None"]
# A record larger than this is written through SQLite's incremental blob I/O, in slices
# of this size: binding it whole copies it while holding the GIL (about 20 ms for 30 MB,
# during which the event loop and its audio stall); each slice's write lets go of it.
_BLOB_SLICE = 1 << 20


def _lease_after(c: Commit, s: Session, now: float) -> tuple[float | None, float | None]:
    """The lease's expiry and ttl once commit ``c`` landed (or a retry found it landed):
    renewed as `SQLiteStore._renew` would while an owner holds it (`Commit.lease_ttl`),
    else as they are."""
    if c.lease_ttl is not None and s.owner is not None:
        return now + c.lease_ttl, c.lease_ttl
    return s.lease_expires_at, s.lease_ttl


def _insert_log(conn: sqlite3.Connection, rows: list[_LogRow]) -> None:
    """Insert log rows; large ``data`` in slices (``blobopen``)."""
    conn.executemany(_INSERT_LOG, [r for r in rows if r[7] is None or len(r[7]) <= _BLOB_SLICE])
    for row in rows:
        data = row[7]
        if data is None or len(data) <= _BLOB_SLICE:
            continue
        rowid = conn.execute(_INSERT_EMPTY_LOG, (*row[:7], len(data))).lastrowid
        assert rowid is not None  # an INSERT's
        view = memoryview(data)
        with conn.blobopen("log", "data", rowid) as blob:
            for start in range(0, len(data), _BLOB_SLICE):
                blob.write(view[start : start + _BLOB_SLICE])


def _check_version_row(key: str, row: tuple[Any, ...]) -> None:
    """Refuse a version row (as `SQLiteStore._load_in` selects it) whose values no
    commit writes: read as they are, they would not be a version."""
    number, epoch, created_at, head, gen, log_end, _ = row
    for name, value in (("epoch", epoch), ("gen", gen), ("log_end", log_end)):
        if not is_counter(value):
            raise altered(key, f"version {number} has {name} {value!r}")
    if not isinstance(created_at, (int, float)):
        raise altered(key, f"version {number} has created_at {created_at!r}")
    if not isinstance(head, bytes):
        raise altered(key, f"version {number} has a head of {type(head).__name__}, not bytes")


def _log_rows(
    conn: sqlite3.Connection, ns: str, key: str, version: int, gen: int, log_end: int
) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """The first ``log_end`` records of generation ``gen``, as ``(stream, id, data,
    after)``: every one of them, in order, of the types a commit writes. A log is only
    ever appended to, so a record missing (the tail, or the whole generation) means the
    file was altered: read short, it would be a shorter conversation."""
    rows = conn.execute(
        "SELECT seq, stream, item_id, data, after FROM log WHERE ns=? AND key=? AND gen=? "
        "AND seq<? ORDER BY seq",
        (ns, key, gen, log_end),
    )
    count = 0
    for seq, stream, item_id, data, after in rows:
        if seq != count:
            break
        if not (
            isinstance(stream, str)
            and isinstance(item_id, str)
            and (data is None or isinstance(data, bytes))
            and (after is None or isinstance(after, str))
        ):
            raise altered(
                key, f"item record {seq} of generation {gen} has values of the wrong type"
            )
        count += 1
        yield stream, item_id, data, after
    if count != log_end:
        raise altered(
            key,
            f"version {version} reads {log_end} item records of generation {gen}, but "
            f"record {count} is missing",
        )


def _listed(key: str, v: int, e: object, c: object, n: object, info: object) -> SnapshotInfo:
    """A row of `versions` as listed: damaged (why, and 0 for what is not a number) if a
    value is one no commit writes, as a `load` of it finds it."""
    epoch = e if isinstance(e, int) and is_counter(e) else None
    size = n if isinstance(n, int) and is_counter(n) else None
    created = float(c) if isinstance(c, (int, float)) else None
    why = None
    if epoch is None or size is None or created is None:
        why = f"version {v} is listed as epoch {e!r}, size {n!r}, made {c!r}"
    try:
        found = _info(info, key) if isinstance(info, str) else None
    except SnapshotCorrupt:
        found = None
    if found is None:
        why = why or f"version {v} has listing info {str(info)[:40]!r}, not a mapping"
    if why is not None:
        return SnapshotInfo(v, epoch or 0, created or 0.0, size or 0, {}, str(altered(key, why)))
    return SnapshotInfo(v, epoch or 0, created or 0.0, size or 0, found or {})


def _no_row(version: int) -> str:
    return f"version {version} has no stored row"


def _info(text: str, key: str) -> _InfoDict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SnapshotCorrupt(f"session {key!r}: stored listing info {text[:40]!r} is not a dict")
    return cast(_InfoDict, value)
