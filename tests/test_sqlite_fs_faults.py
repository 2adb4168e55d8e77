"""The SQLite store under filesystem faults the earlier passes left: a -shm file
deleted while another process commits before the open store's next operation, a
database path that is a symlink (to a file or to no file yet), one file opened by two
stores of one process under two spellings of its path, a process forked with a store
open, and a read-only store on a path that starts with ``//``.

The contract (docs/failure-model.md): a bad condition is a typed error
(`StoreUnavailable`, `SnapshotCorrupt`, ...), nothing stored is lost or changed, and an
acknowledged commit is never lost. docs/security.md: "SQLite files are created 0600
(owner read and write only, whatever the umask)".

Each test here failed on main before its fix, because of the defect its docstring
names ("What happens").
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from livekit_resume import open_store
from livekit_resume.errors import StoreUnavailable
from livekit_resume.stores.sqlite import SQLiteStore
from tests.test_sqlite_faults import KEY, OTHER_WRITER, _child, _commit, _reopened_intact


async def _other_writer(db: Path) -> int:
    """Another worker commits one version on top of the head it reads; that version."""
    return int((await _child(OTHER_WRITER, db))[0]["version"])


# -- a deleted -shm, and another process's commit before the next operation --------------------


async def test_a_commit_another_process_made_after_the_shm_was_deleted_is_not_lost(
    tmp_path: Path,
) -> None:
    """Contract: an acknowledged commit is never lost; docs/failure-model.md: "A `-wal`
    or `-shm` deleted under an open store is noticed at its next operation: the store
    logs a warning, folds what it holds into the file and reopens".

    What happens: the -shm is deleted under an idle store; another worker (a CLI
    ``import``, a job that then ends) opens the file, which makes a new -shm from the
    whole -wal, and commits version 4, acknowledged, and exits. At the open store's next
    operation `Connection._call` closes its connection to "fold what it holds": as the
    last connection on the file SQLite checkpoints the -wal through the connection's own
    stale -shm index (which ends at version 3) and then deletes the -wal, with version 4
    in it. The store reopens onto a file at version 3: the other worker's acknowledged
    commit is gone for good, silently (the same happens with two stores of one process,
    when the second one lets go). Why it matters: the fold meant to protect commits
    destroys every commit made by another process since the deletion.
    """
    db = tmp_path / "shm.db"
    store = SQLiteStore(db)
    try:
        lease = await store.acquire(KEY, "w")
        for n in range(3):
            await _commit(store, lease, n)
        os.unlink(f"{db}-shm")
        assert await _other_writer(db) == 4  # acknowledged
        with contextlib.suppress(StoreUnavailable):  # refusing is fine, reading stale is not
            assert (await store.load(KEY)).version == 4
    finally:
        await store.aclose()
    await _reopened_intact(db, 4)  # the acknowledged version 4 with them


# -- a database path that is a symlink ---------------------------------------------------------

SYMLINKED = """
async def main():
    link, target, fault = sys.argv[1], os.path.realpath(sys.argv[1]), sys.argv[3]
    store = SQLiteStore(link)
    lease = await store.acquire(sys.argv[2], "w")
    for n in range(3):
        await commit(store, lease, n)
    if fault == "shm-truncated":
        os.truncate(target + "-shm", 0)  # an operator's "> file", a cleanup script
        say(version=await outcome(commit(store, lease, 3)))
        say(loaded=(await store.load(sys.argv[2])).version)
        await store.aclose()
    else:  # wal-deleted
        os.unlink(target + "-wal")
        for n in range(3, 5):
            await commit(store, lease, n)
        say(acknowledged=5)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint

asyncio.run(main())
"""


async def test_a_store_whose_path_is_a_symlink_guards_its_wal_and_shm_files(
    tmp_path: Path,
) -> None:
    """Contract (docs/failure-model.md): a -shm cut short between operations is grown
    back ("where before the process died of SIGBUS"), and a -wal deleted under an open
    store is noticed at the next operation and folded in (before, "a deleted -wal lost
    every commit with the next crash").

    What happens when the store's path is a symlink (``/srv/app/resume.db ->
    /data/resume.db``, the usual way to put a file on a volume): SQLite resolves the link
    and keeps its -wal and -shm beside the target, but `Connection` looks for them at
    ``self.path + "-wal"`` / ``"-shm"``, beside the link, where there is nothing. So
    none of those guards ever runs: a truncated -shm kills the whole worker with SIGBUS
    (every session in it), and a deleted -wal followed by a crash loses every
    acknowledged commit (the file reads as an empty store). A deleted -shm likewise
    lets two processes write at once again.
    """
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "resume.db"
    link = tmp_path / "resume.db"
    link.symlink_to(target)

    lines = await _child(SYMLINKED, link, "shm-truncated")  # exit -7 (SIGBUS) before
    assert lines == [{"version": ["ok", 4]}, {"loaded": 4}]
    await _reopened_intact(link, 4)

    other = tmp_path / "other.db"
    other.symlink_to(tmp_path / "data" / "other.db")
    lines = await _child(SYMLINKED, other, "wal-deleted", exit_code=-signal.SIGKILL)
    assert lines == [{"acknowledged": 5}]
    await _reopened_intact(other, 5)


async def test_a_store_on_a_dangling_symlink_creates_its_files_0600(tmp_path: Path) -> None:
    """Contract (docs/security.md): "SQLite files are created 0600 (owner read and write
    only, whatever the umask); SQLite gives the -wal and -shm files it creates beside them
    the same mode. A file that already exists keeps its mode."

    What happens: the path is a symlink to a file that does not exist yet (a deploy that
    links ``resume.db`` into a volume before the first start). `_create_private` opens it
    with ``O_CREAT | O_EXCL``, which refuses any existing link (EEXIST) and is taken for
    "there already"; SQLite then follows the link and creates the database with the
    process's umask: 0644 under the usual 022, and the -wal and -shm likewise. Every
    user of the machine can read the conversations. Why it matters: the file holds
    callers' conversations, and nothing warns that it was created world-readable.
    """
    (tmp_path / "data").mkdir()
    link = tmp_path / "resume.db"
    link.symlink_to(tmp_path / "data" / "resume.db")  # nothing there yet
    old = os.umask(0o022)
    try:
        store = SQLiteStore(link)
        try:
            lease = await store.acquire(KEY, "w")
            await _commit(store, lease, 0)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").iterdir()}
        finally:
            await store.aclose()
    finally:
        os.umask(old)
    assert modes.get("resume.db") == 0o600, modes
    assert all(mode == 0o600 for mode in modes.values()), modes


# -- one file, two spellings of its path, in one process -------------------------------------


async def test_two_stores_on_two_spellings_of_one_path_do_not_overwrite_a_commit(
    tmp_path: Path,
) -> None:
    """Contract (docs/failure-model.md, and
    ``test_sqlite_faults.py::test_two_stores_of_one_process_reopen_together_after_a_deleted_shm``):
    after a deleted -shm, a store reopens only once every other store of its process on
    the file let go of the old -shm mapping ("until every store of that process on the
    file has, operations fail with StoreUnavailable"): SQLite shares one mapping among a
    process's connections to one file, and a stale one lets two processes write at once.

    What happens: the registry of open connections (`connection._open`) is keyed by the
    path string, which is only made absolute (``Path.absolute()`` keeps ``..`` and
    symlinks). A second store on ``dir/../dir/x.db`` (or on a symlink to the file) is
    not seen as the same file: the first store reopens at once onto the stale mapping,
    another worker commits version 4 through the new -shm, and the first store's next
    commit is written over it in the -wal. Version 4 now holds the first store's commit;
    the other worker's acknowledged one is gone.
    """
    (tmp_path / "d").mkdir()
    db = tmp_path / "d" / "x.db"
    alias = tmp_path / "d" / ".." / "d" / "x.db"
    a, b = SQLiteStore(db), SQLiteStore(alias)
    try:
        lease = await a.acquire(KEY, "w")
        for n in range(3):
            await _commit(a, lease, n)
        assert (await b.load(KEY)).version == 3
        os.unlink(f"{db}-shm")
        try:
            await a.load(KEY)
        except StoreUnavailable:
            await b.load(KEY)  # b lets go of the old mapping (as the documented fix asks)
        assert await _other_writer(db) == 4  # acknowledged
        lease = await a.acquire(KEY, "w", takeover=True)
        top = (await a.load(KEY)).version
        assert top == 4, "it reads the other worker's version"
        assert await _commit(a, lease, top) == 5
    finally:
        await a.aclose()
        await b.aclose()
    await _reopened_intact(db, 5)  # written over, version 4 read as a's
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- a process forked with a store open ------------------------------------------------------

FORKED = """
async def opened():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "w")
    await commit(store, lease, 0)
    return store, lease

store, lease = asyncio.run(opened())
pid = os.fork()
if pid == 0:  # the child: a pre-fork server's worker, a multiprocessing "fork" task
    async def child():
        try:
            stored = await asyncio.wait_for(store.load(sys.argv[2]), 5)
            say(load=["ok", stored.version])
        except asyncio.TimeoutError:
            say(load=["hang"])
        except Exception as exc:
            say(load=[type(exc).__name__, str(exc)])
        try:
            await asyncio.wait_for(store.aclose(), 5)
            say(close="ok")
        except asyncio.TimeoutError:
            say(close="hang")
    asyncio.run(child())
    os._exit(0)
_, status = os.waitpid(pid, 0)
say(child_exit=os.waitstatus_to_exitcode(status))

async def after():
    say(parent=await outcome(commit(store, lease, 1)))
    await store.aclose()

asyncio.run(after())
"""


async def test_a_store_used_in_a_forked_child_answers_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """Contract: a broken environment is a typed error, never a hang (docs/failure-model.md;
    every wait of the store is bounded by ``busy_timeout``).

    What happens: a process opens a store, then forks (a pre-fork server, a
    ``multiprocessing`` pool with Linux's default ``fork``). In the child every call of
    the inherited store, ``aclose()`` included, waits for ever: `Connection.run` hands
    the work to the store's `ThreadPoolExecutor`, whose one thread did not survive the
    fork, and the executor believes it still has an idle thread, so it never starts
    another. No error, no timeout: the child's job hangs until killed. The child should
    get `StoreUnavailable` (open a new store after a fork; an SQLite connection must not
    cross a fork) or a correct answer, and close at once; the parent's store goes on.
    """
    db = tmp_path / "fork.db"
    lines = await _child(FORKED, db)
    said = {k: v for line in lines for k, v in line.items()}
    assert said["load"][0] == "StoreUnavailable" and "forked" in said["load"][1], said
    assert said["close"] == "ok", said
    assert said["child_exit"] == 0, said
    assert said["parent"] == ["ok", 2], said
    await _reopened_intact(db, 2)


# -- a read-only store on a path that starts with // -----------------------------------------


async def test_a_read_only_store_opens_a_path_that_starts_with_two_slashes(
    tmp_path: Path,
) -> None:
    """Contract: ``?mode=ro`` / ``read_only=True`` opens "an existing file without ever
    writing to it" (SQLiteStore), for "listings and exports"; a path the writable store
    opens is the same file for the read-only one.

    What happens: ``sqlite:////`` + an absolute path (the form the docs give for
    absolute paths, with a path that already starts with "/"), or ``SQLiteStore`` given
    ``//data/resume.db``, keeps the leading ``//`` (POSIX: the same file as
    ``/data/resume.db``). The writable store opens it. The read-only one builds
    ``"file:" + quote(path)``, and SQLite reads ``file://tmp/...`` as a URI with the
    authority ``tmp``: every read is `StoreUnavailable` ("invalid uri authority"),
    telling the operator to check permissions and locks, for a file that is fine.
    """
    db = tmp_path / "resume.db"
    writer = SQLiteStore(db)
    try:
        lease = await writer.acquire(KEY, "w")
        await _commit(writer, lease, 0)
    finally:
        await writer.aclose()
    url = f"sqlite:////{db}?mode=ro"  # sqlite://///tmp/...: the path //tmp/...
    reader = open_store(url)
    try:
        assert isinstance(reader, SQLiteStore) and reader.read_only
        assert await reader.keys() == [KEY]
        assert (await reader.load(KEY)).version == 1
    finally:
        await reader.aclose()


async def test_a_symlink_re_pointed_under_an_open_store_is_a_file_replaced(
    tmp_path: Path,
) -> None:
    """The other side of resolving the path: a store keeps the file it opened, so a link
    re-pointed while it is open (a deploy's ``current -> release-N`` flipped) must be
    refused as a file renamed over is, or the old worker would go on writing one file
    while new workers open the other, each holding the same conversation's lease."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "resume.db"
    link.symlink_to(tmp_path / "a" / "resume.db")
    store = SQLiteStore(link)
    try:
        lease = await store.acquire(KEY, "w")
        await _commit(store, lease, 0)
        link.unlink()
        link.symlink_to(tmp_path / "b" / "resume.db")
        with pytest.raises(StoreUnavailable, match="replaced or deleted"):
            await _commit(store, lease, 1)
    finally:
        await store.aclose()
    await _reopened_intact(tmp_path / "a" / "resume.db", 1)
