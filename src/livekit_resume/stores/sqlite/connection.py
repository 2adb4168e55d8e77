"""One SQLite connection on one dedicated thread: opening the file, waiting out busy
answers, and turning SQLite's errors into the library's.

All SQLite work of a store runs on its own thread with its one connection, so no call
ever blocks the event loop. A busy database is waited for by SQLite's own busy handler
(``busy_timeout``), and the immediate SQLITE_BUSY answers it never waits on are retried
here, each operation being one whole transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ...errors import SnapshotCorrupt, StoreUnavailable
from ..base import StoreClosed
from . import schema
from .transactions import is_busy, read

__all__ = ["FILE_MODE", "Connection"]

# Permissions of a database file the store creates (and so of its -wal and -shm).
FILE_MODE = 0o600

logger = logging.getLogger("livekit_resume")

# Primary result codes (the low byte of an extended code) meaning the file's bytes are bad.
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
# The -shm file grows by regions of 32 KiB, each indexing up to 4096 frames of the -wal
# (the first a few less: it holds the header too).
_SHM_REGION = 32768
_SHM_FRAMES = 4096
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
_CORRUPT_WORDS = ("file is not a database", "malformed")
_ALTERED_WORDS = ("no such table", "no such column")

_T = TypeVar("_T")

# A file's identity on this machine, (st_dev, st_ino); None when it does not exist.
_Sidecars = tuple[tuple[int, int] | None, tuple[int, int] | None]

# Every open connection of this process, by database path, with the -wal and -shm files
# it opened. SQLite shares one -shm mapping among all the connections of a process to a
# file, so a connection reopened while another still holds a stale mapping would share
# it: `Connection._call` consults this before it reopens (see `_sidecars_replaced`).
# Weak: a store garbage-collected unclosed had its connection closed by SQLite, which
# removed the files as the last one; remembered, it would block every later store.
_open: dict[str, weakref.WeakKeyDictionary[Connection, _Sidecars]] = {}
_open_lock = threading.Lock()


class Connection:
    """The file at ``path``, opened on first use on the thread every call runs on.

    ``read_only`` opens it with SQLite's ``mode=ro``: nothing is ever created, migrated
    or written. The thread starts on the first operation.
    """

    def __init__(
        self, path: str, *, busy_timeout: float, read_only: bool, named: str | None = None
    ) -> None:
        self.path = path
        # The name the store was given, when ``path`` is what it resolves to (symlinks):
        # a link re-pointed while open is a file replaced, as a file renamed over is.
        self._named = named or path
        self._busy_timeout = busy_timeout
        self._read_only = read_only
        # One thread, one connection: SQLite work is serialized here and never runs on
        # the event loop.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="livekit-resume-sqlite", initializer=_no_preempt
        )
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # A forked child inherits the executor but not its thread: a call would wait for
        # ever, and an SQLite connection must not cross a fork anyway. The process of
        # the first call owns them: a store made but never used before a fork (a module
        # preloaded by LiveKit's forkserver) works in the child.
        self._pid = os.getpid()
        self._used = False
        # The schema version a read-only connection stands in for (None: none needed).
        self._stood_in: int | None = None
        # The -wal and -shm files this connection opened (see `_sidecars_replaced`).
        self._sidecars: _Sidecars = (None, None)
        # The database file it opened (see `_files_changed`), the largest size its -shm
        # file was seen at, and the file's page size (how many bytes a -wal frame holds).
        self._file_id: tuple[int, int] | None = None
        self._shm_size = 0
        self._page_size = 0
        # the connection's busy wait now (ms): shortened for a call that queued behind
        # others on the thread (`_call`)
        self._waits_ms = self._full_ms = _busy_ms(busy_timeout)

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` (one whole transaction) with the connection, on the store's thread."""
        if self._closed:
            raise StoreClosed(f"SQLite store {self.path} is closed; open a new one")
        if os.getpid() != self._pid:
            if self._used:
                raise StoreUnavailable(
                    f"SQLite store {self.path} was opened before this process forked; open "
                    "a new store in the child"
                )
            self._pid = os.getpid()
        self._used = True
        loop = asyncio.get_running_loop()
        # busy_timeout bounds each call from here, not from when the thread takes it up:
        # calls queued behind others waiting on a lock waited out each one's timeout in
        # turn (the tenth of ten sessions ten timeouts, its lease renewal as long)
        deadline = time.monotonic() + self._busy_timeout
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, deadline)
        except RuntimeError as exc:
            if self._closed:  # closed while this call was being scheduled
                raise StoreClosed(f"SQLite store {self.path} is closed") from exc
            raise

    async def aclose(self) -> None:
        """Close the connection on its thread, then stop the thread; later calls are
        `StoreUnavailable`."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # the parent's connection and thread: not this process's to close
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=False)

    def _close_conn(self, *, fold: bool = True) -> None:
        """Close the connection. Without ``fold`` it never checkpoints the -wal into the
        file on the way, as SQLite's last connection does (see `_call`)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with _open_lock:
                mine = _open.get(self.path)
                if mine is not None:
                    mine.pop(self, None)
                    if not mine:
                        _open.pop(self.path, None)
            if not fold and not _no_checkpoint_on_close(conn, self.path):
                logger.warning(
                    "SQLite store %s: cannot close without a checkpoint here; a commit "
                    "another process made since the -shm file was deleted may be lost",
                    self.path,
                    extra={"path": self.path},
                )
            conn.close()

    def _files_changed(self) -> bool:
        """Before each operation, at the cost of three ``stat`` calls: whether the -wal or
        -shm file was replaced (`_sidecars_replaced`: reopen), after refusing a database
        file replaced or deleted (`StoreUnavailable`) and mending a -shm file cut short
        (`_mend_shm`)."""
        try:
            db: tuple[int, int] | None = _identity(os.stat(self._named))
        except FileNotFoundError:
            db = None
        except OSError:
            db = self._file_id  # cannot look (a directory made unsearchable): not a change
        if db != self._file_id:
            # Renamed over (a backup put back with mv) or deleted: every commit went on
            # into the file this connection holds open, which no name reaches any more,
            # and was lost. Not reopened onto the new file: it would take this store's
            # -wal (frames of the old file) for its own. Refused until a store is
            # opened again, after this one closed (which puts its -wal away).
            raise StoreUnavailable(
                f"SQLite store {self.path}: the database file was replaced or deleted "
                "while the store was open; writes would go to a file no name reaches. "
                "Close this store and open it again (stop workers before restoring a "
                "backup over a store's file)"
            )
        wal, shm = _stat(self.path + "-wal"), _stat(self.path + "-shm")
        if self._sidecars_replaced((_identity(wal), _identity(shm))):
            return True
        if shm is not None:
            self._mend_shm(shm.st_size, wal)
        return False

    def _mend_shm(self, size: int, wal: os.stat_result | None) -> None:
        """Put back the length of a -shm file cut short under this connection.

        SQLite maps the -shm file into memory: truncated (``> file``, a cleanup script),
        the next read of a page past its new end killed the whole process with SIGBUS.
        Grown back with zeros before SQLite touches it, the mapping is whole again and
        the zeroed index reads as one to rebuild from the -wal (SQLite's recovery, as
        after a crash). A cut during an operation still meets it there: the check is
        before each operation, not inside SQLite."""
        if size >= self._shm_size:
            self._shm_size = size
            return
        need = self._shm_size
        if wal is not None and self._page_size:
            # SQLite may have mapped more during the last operation than was seen before
            frames = max(0, wal.st_size - _WAL_HEADER) // (self._page_size + _WAL_FRAME_HEADER)
            need = max(need, _SHM_REGION * (frames // _SHM_FRAMES + 1))
        logger.warning(
            "SQLite store %s: its -shm file was cut to %d bytes while open; growing it "
            "back to %d (never truncate a store's -shm)",
            self.path,
            size,
            need,
            extra={"path": self.path},
        )
        try:
            _grow(self.path + "-shm", need)
        except OSError as exc:
            raise StoreUnavailable(
                f"SQLite store {self.path}: its -shm file was cut short while open and "
                f"cannot be grown back ({exc}); close the store and open it again"
            ) from exc
        self._shm_size = need

    def _sidecars_replaced(self, now: _Sidecars) -> bool:
        """Whether the -wal or -shm file this connection opened was deleted or replaced
        on disk while it was open (``now``: their identities on disk now). SQLite never
        does that to a file in use (it deletes them only at the last close, under an
        exclusive lock), an operator's ``rm`` does.

        Kept open, the connection went on writing to the unlinked files: with the -shm
        gone, another process opening the store made a new one, so the two took the
        write lock at once and overwrote each other's acknowledged commits in the -wal;
        with the -wal gone, every commit since lived only in a file with no name, lost
        with the process (a SIGKILL). Closed now while the files are still its own, the
        last connection folds its -wal into the database file, and the reopened one
        shares the new files with every other process."""
        return any(s is not None and n != s for s, n in zip(self._sidecars, now, strict=True))

    def _reopen_allowed(self) -> None:
        """Refuse to open while another connection of this process still holds -wal or
        -shm files since replaced: SQLite would give the new connection the same stale
        mapping. That connection lets go of it at its own next operation (or close)."""
        now = _sidecar_ids(self.path)
        with _open_lock:
            others = list(_open.get(self.path, {}).values())  # self is not there: closed
        for seen in others:
            if any(s is not None and n != s for s, n in zip(seen, now, strict=True)):
                raise StoreUnavailable(
                    f"SQLite store {self.path}: its -wal or -shm file was deleted or "
                    "replaced while the store was open; it reopens once every other store "
                    "of this process on the file has (at its next operation, or closed). "
                    "Never delete a store's -wal or -shm file"
                )

    def _opened(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        self._waits_ms = self._full_ms  # a new connection waits busy_timeout
        self._sidecars = _sidecar_ids(self.path)
        self._file_id = _identity(_stat(self.path))
        shm = _stat(self.path + "-shm")
        self._shm_size = shm.st_size if shm is not None else 0
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        with _open_lock:
            _open.setdefault(self.path, weakref.WeakKeyDictionary())[self] = self._sidecars
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], _T], deadline: float) -> _T:
        """Runs on the store's thread: open the file if needed, run ``fn``, type errors.

        SQLite answers some lock conflicts with an immediate SQLITE_BUSY that its busy
        handler never waits on (switching a fresh file to WAL while other processes open
        it, WAL recovery, a read snapshot gone stale). Every ``fn`` is one whole
        transaction, rolled back on error, so it is simply run again until
        ``deadline`` (``busy_timeout`` after the call was made); SQLite's own busy wait is
        shortened to it.
        """
        pause = _BUSY_FIRST_PAUSE
        while True:
            try:
                if self._conn is not None and self._files_changed():
                    logger.warning(
                        "SQLite store %s: its -wal or -shm file was deleted or replaced "
                        "while open; reopening (never delete a store's -wal or -shm)",
                        self.path,
                        extra={"path": self.path},
                    )
                    # Its -wal gone, the connection folds the frames only it still
                    # reaches into the file. Its -wal still there, it must not: its
                    # index (in the -shm it had) ends before what other processes have
                    # committed since into that -wal, and the fold, as the last
                    # connection, would delete the -wal with their commits in it. The
                    # next open rebuilds the index from the whole -wal.
                    self._close_conn(fold=_sidecar_ids(self.path)[0] != self._sidecars[0])
                if self._conn is None or self._stand_in_stale(self._conn):
                    self._close_conn()
                    self._reopen_allowed()
                    conn = self._open_read_only() if self._read_only else self._open()
                    self._conn = self._opened(conn)
                self._wait_until(self._conn, deadline)
                result = fn(self._conn)
                if self._stand_in_stale(self._conn):
                    continue  # read through stand-ins of a schema gone meanwhile: again
                return result
            except sqlite3.ProgrammingError:
                raise  # a bug in this module, not a state of the file
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() + pause > deadline:
                    raise self._translate(exc) from exc
                time.sleep(pause)  # on the store's own thread, never the event loop
                pause = min(pause * 2, _BUSY_MAX_PAUSE)
            except sqlite3.DatabaseError as exc:
                raise self._translate(exc) from exc

    def _wait_until(self, conn: sqlite3.Connection, deadline: float) -> None:
        """SQLite's busy wait for this call: what is left until ``deadline``, unless
        that is about all of ``busy_timeout`` (the common case: no statement sent)."""
        left = _busy_ms(max(0.0, deadline - time.monotonic()))
        slack = min(100, self._full_ms // 10)  # a short busy_timeout is shortened too
        want = self._full_ms if left >= self._full_ms - slack else left
        if want != self._waits_ms:
            conn.execute(f"PRAGMA busy_timeout={want}")
            self._waits_ms = want

    def _stand_in_stale(self, conn: sqlite3.Connection) -> bool:
        """Whether a read-only connection reads an older schema through stand-ins
        (`schema.stand_in`) and the file has been migrated or created since by a writer.
        The stand-ins would then hide the current tables: an empty file's empty tables
        every session written later, a schema-1 file's views (every row in the default
        namespace) the namespaces, so that one tenant read another's sessions."""
        if self._stood_in is None:
            return False
        return bool(conn.execute("PRAGMA user_version").fetchone()[0] != self._stood_in)

    def _translate(self, exc: sqlite3.Error) -> Exception:
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        text = str(exc)
        corrupt = (code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)) or any(
            word in text for word in _CORRUPT_WORDS
        )
        if corrupt:
            return SnapshotCorrupt(
                f"SQLite store {self.path} is damaged or is not a database ({text}); "
                "restore the file from a backup or point the store at another file"
            )
        if isinstance(exc, sqlite3.OperationalError) and any(w in text for w in _ALTERED_WORDS):
            # the schema is checked at open: a table or column gone since was taken away
            return SnapshotCorrupt(
                f"SQLite store {self.path} lacks part of its schema ({text}); the file was "
                "altered outside livekit-resume: restore it from a backup"
            )
        if isinstance(exc, sqlite3.IntegrityError):
            return SnapshotCorrupt(
                f"SQLite store {self.path} holds rows that contradict each other ({text}); "
                "the file was altered outside livekit-resume"
            )
        return StoreUnavailable(
            f"SQLite store {self.path} is unavailable ({text}); check that the file is "
            "readable and writable, the disk has room, and no process holds the database "
            f"locked for longer than busy_timeout ({self._busy_timeout} s)"
        )

    def _open(self) -> sqlite3.Connection:
        _create_private(self.path)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE / COMMIT
            check_same_thread=False,
        )
        try:
            with read(conn):  # one snapshot: another process may be creating the schema
                schema.check(conn, self.path)  # before any write: a foreign file is untouched
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite store %s runs in %s mode, not WAL: readers will wait for writers",
                    self.path,
                    mode,
                    extra={"path": self.path},
                )
            # WAL + NORMAL: a commit survives a crash of the process (SIGKILL included) and
            # is atomic; only a power loss may drop the last commits. One fsync per
            # checkpoint instead of per commit keeps autosave cheap.
            conn.execute("PRAGMA synchronous=NORMAL")
            # Deleted rows are overwritten, not left in free pages: a session removed
            # (rm, expiry, old versions trimmed) leaves no readable bytes in the file.
            conn.execute("PRAGMA secure_delete=ON")
            # ... and the -wal, which SQLite reuses from its start without clearing it, is
            # cut to nothing each time it starts over: a deleted session's frames do not
            # outlive the next checkpoint (`truncate_wal`: at once, after a delete)
            conn.execute("PRAGMA journal_size_limit=0")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                schema.create(conn, self.path)
            elif version < schema.SCHEMA_VERSION:
                schema.migrate(conn, self.path)
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
        if not os.path.isfile(self.path):
            what = (
                "it is not a regular file (a directory, a pipe, a device)"
                if os.path.lexists(self.path)
                else "the file does not exist (a read-only store never creates one)"
            )
            raise StoreUnavailable(
                f"no store at {self.path}: {what}; check the path or RESUME_STORE"
            )
        # the path's bytes, as the file system has them: a name that is not UTF-8 (its
        # bytes held as surrogates) is quoted byte for byte
        uri = "file:" + urllib.parse.quote(os.fsencode(self.path)) + "?mode=ro"
        try:
            conn = self._connect_uri(uri)
        except sqlite3.OperationalError as exc:
            code = exc.sqlite_errorcode
            if code not in (_SQLITE_READONLY_DIRECTORY, _SQLITE_CANTOPEN):
                raise
            wal = Path(self.path + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                # immutable would ignore the commits still in the -wal file
                raise StoreUnavailable(
                    f"SQLite store {self.path} cannot be read: its directory is not "
                    f"writable and {wal.name} holds commits not yet in the file; open it "
                    "once with write access (or copy the file, its -wal included, elsewhere)"
                ) from exc
            logger.debug(
                "SQLite store %s: directory not writable, reading the file as immutable",
                self.path,
                extra={"path": self.path},
            )
            conn = self._connect_uri(uri + "&immutable=1")
        try:
            with read(conn):
                schema.check(conn, self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            schema.stand_in(conn, version)
            self._stood_in = version if version < schema.SCHEMA_VERSION else None
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


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _identity(st: os.stat_result | None) -> tuple[int, int] | None:
    return None if st is None else (st.st_dev, st.st_ino)


def _grow(path: str, size: int) -> None:
    """Make the file at ``path`` at least ``size`` bytes long, never shorter: another
    process may have grown it further meanwhile, and a cut would kill it (SIGBUS)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)  # only ever adds zeros past the end
        elif os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _sidecar_ids(path: str) -> _Sidecars:
    """The identities of ``path``'s -wal and -shm files as they are on disk now."""
    ids: list[tuple[int, int] | None] = []
    for suffix in ("-wal", "-shm"):
        try:
            st = os.stat(path + suffix)
        except OSError:
            ids.append(None)
        else:
            ids.append((st.st_dev, st.st_ino))
    return ids[0], ids[1]


def _no_preempt() -> None:
    """Runs on the store's thread as it starts: Linux's SCHED_BATCH, for it alone.

    The event loop hands the thread a transaction while it holds the GIL, so the thread
    wakes only to wait for it. Woken as a normal thread it preempted the loop's thread on
    its core in about half of the checkpoints, and on a busy machine the loop then waited
    behind other processes for 1.5-6 ms, inside one callback. A batch thread does not
    preempt on waking: it runs on an idle core, or once the loop's thread sleeps. Its
    nice value is kept; where the policy is missing or refused (another OS, a sandbox)
    the thread stays as it was."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not hasattr(os, "sched_setscheduler"):
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, batch, os.sched_param(0))  # 0: this thread, on Linux


def _no_checkpoint_on_close(conn: sqlite3.Connection, path: str) -> bool:
    """Tell SQLite not to checkpoint when ``conn`` closes (SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE);
    whether it could."""
    op = 1006  # SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, SQLite 3.25+
    if sys.version_info >= (3, 12):
        try:
            conn.setconfig(op, True)
        except sqlite3.Error:
            return False
        return True
    try:  # Python 3.11 has no setconfig: the C call on the connection's own handle
        import _sqlite3
        import ctypes

        lib = ctypes.CDLL(_sqlite3.__file__)  # resolves the SQLite it links
        # CPython's connection object holds its `sqlite3 *` right after the object head
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__)
        lib.sqlite3_db_filename.restype = ctypes.c_char_p
        lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        if lib.sqlite3_db_filename(handle, b"main") != os.fsencode(path):
            return False  # not the handle (another layout): never call through it
        done = ctypes.c_int(0)
        rc = lib.sqlite3_db_config(handle, op, ctypes.c_int(1), ctypes.byref(done))
    except (OSError, AttributeError, ImportError):
        return False
    return rc == 0 and done.value == 1


def _create_private(path: str) -> None:
    """Create the database file readable and writable by its owner only (0600), whatever
    the umask: it holds conversations. SQLite gives the ``-wal`` and ``-shm`` files it
    creates beside it the same permissions. An existing file keeps its mode."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
        return  # there already, or another process created it first
    except OSError:
        return  # a missing directory or no permission: sqlite3.connect says so, typed
    os.close(fd)


def _busy_ms(seconds: float) -> int:
    """``seconds`` as SQLite's busy wait in ms; 0 past what it takes (an infinite
    ``busy_timeout``, which `Connection._call`'s retries wait out instead)."""
    ms = seconds * 1000
    return int(ms) if ms < 2**31 else 0


def truncate_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint the -wal into the file and cut it to nothing, unless another connection
    is reading or writing now (not waited for: the next checkpoint cuts it then). After
    a delete: the deleted session's frames leave the -wal with it."""
    (waits,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.OperationalError:
        pass  # busy: left to the next checkpoint
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(waits)}")
