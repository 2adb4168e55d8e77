"""The SQLite store under resource faults: a full disk mid-commit, a file made unwritable
while open, its -wal or -shm deleted under it, a write lock held by another process, a
missing directory, more stores than file descriptors.

The promise: a bad condition is a typed error (`StoreUnavailable` for a store that cannot
be reached or written), every version acknowledged before the fault stays loadable and
intact, and the store works again once the fault is gone. Faults that would hit the test
runner itself (file size and descriptor limits, another uid) run in a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from livekit_resume.errors import SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.sqlite import SQLiteStore
from tests import child_env

KEY = "room-f"

# Shared by every child: commit ``n`` appends item ``i{n}`` (``size`` bytes of a pattern
# that names it) on top of version ``n``, with commit id ``c{n}``; ``say`` prints one JSON
# line on stdout, a pipe (a file size limit would refuse a file).
PRELUDE = """
import asyncio, json, os, resource, signal, sys
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.base import Commit, Record

def item(n, size=100):
    return (b"i%d:" % n * (size // 4 + 1))[:size]

async def commit(store, lease, n, size=100):
    record = Record("h", f"i{n}", item(n, size), f"i{n - 1}" if n else None)
    return await store.commit(
        Commit(sys.argv[2], lease.epoch, n, b"head %d" % n, [record], n + 1, commit_id=f"c{n}")
    )

async def outcome(call):
    try:
        return ["ok", await call]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]

def say(**message):
    sys.stdout.write(json.dumps(message, default=str) + "\\n")
    sys.stdout.flush()
"""


async def _child(
    code: str, db: Path, *args: str, exit_code: int = 0, timeout: float = 30
) -> list[dict[str, Any]]:
    """Run ``PRELUDE + code`` in a fresh interpreter (argv: db, KEY, *args); its lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PRELUDE + textwrap.dedent(code),
        str(db),
        KEY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == exit_code, (proc.returncode, err.decode()[-2000:])
    return [json.loads(line) for line in out.decode().splitlines()]


def _item(n: int, size: int = 100) -> bytes:
    return (b"i%d:" % n * (size // 4 + 1))[:size]


async def _commit(store: SQLiteStore, lease: Lease, n: int, size: int = 100) -> int:
    record = Record("h", f"i{n}", _item(n, size), f"i{n - 1}" if n else None)
    return await store.commit(
        Commit(KEY, lease.epoch, n, b"head %d" % n, [record], n + 1, commit_id=f"c{n}")
    )


async def _intact(store: SQLiteStore, versions: int, sizes: dict[int, int] | None = None) -> None:
    """Versions 1..``versions`` load whole, each exactly as `_commit` wrote it."""
    sizes = sizes or {}
    for v in range(1, versions + 1):
        stored = await store.load(KEY, version=v)
        assert stored.head == b"head %d" % (v - 1)
        assert stored.streams["h"] == [(f"i{n}", _item(n, sizes.get(n, 100))) for n in range(v)]
    assert (await store.load(KEY)).version == versions


async def _reopened_intact(db: Path, versions: int, sizes: dict[int, int] | None = None) -> None:
    store = SQLiteStore(db)
    try:
        await _intact(store, versions, sizes)
    finally:
        await store.aclose()


# -- a full disk ------------------------------------------------------------------------------

FULL_DISK = """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
size = int(sys.argv[3])

async def main():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "w")
    for n in range(3):
        await commit(store, lease, n)
    # Every file of the store is now as large as it may grow: the disk is full.
    limit = max(os.path.getsize(sys.argv[1] + s) for s in ("", "-wal", "-shm"))
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    say(full=await outcome(commit(store, lease, 3, size)))
    say(again=await outcome(commit(store, lease, 3, size)))
    say(read=await outcome(store.load(sys.argv[2])))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
    say(room=await outcome(commit(store, lease, 3, size)))
    await store.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("size", [100, 3_000_000], ids=["small", "sliced-blob"])
async def test_a_full_disk_mid_commit_is_unavailable_and_loses_nothing(
    tmp_path: Path, size: int
) -> None:
    db = tmp_path / "full.db"
    full, again, read, room = await _child(FULL_DISK, db, str(size))
    for refused in (full["full"], again["again"]):
        assert refused[0] == "StoreUnavailable", refused
        assert "disk has room" in refused[1]
    assert read["read"][0] == "ok"  # the versions before the fault still read
    assert room["room"] == ["ok", 4]  # the same commit lands once there is room
    await _reopened_intact(db, 4, {3: size})


FULL_AT_OPEN = """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

async def main():
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    store = SQLiteStore(sys.argv[1])
    say(acquire=await outcome(store.acquire(sys.argv[2], "w")))
    say(load=await outcome(store.load(sys.argv[2])))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    lease = await store.acquire(sys.argv[2], "w")
    say(room=await outcome(commit(store, lease, 0)))
    await store.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
async def test_a_full_disk_when_the_store_opens_is_unavailable_until_there_is_room(
    tmp_path: Path, existing: bool
) -> None:
    db = tmp_path / "open.db"
    if existing:  # a store with sessions, closed: its -wal and -shm must be made again
        store = SQLiteStore(db)
        await store.acquire("other", "w")
        await store.aclose()
    acquire, load, room = await _child(FULL_AT_OPEN, db)
    assert acquire["acquire"][0] == "StoreUnavailable", acquire
    assert load["load"][0] == "StoreUnavailable", load
    assert room["room"] == ["ok", 1]
    await _reopened_intact(db, 1)


# -- the file or its directory made unwritable -----------------------------------------------

UNWRITABLE = """
async def main():
    if os.geteuid() == 0:  # root ignores modes: run as nobody, who does not
        os.setgid(65534)
        os.setuid(65534)
    db, directory = sys.argv[1], os.path.dirname(sys.argv[1])
    store = SQLiteStore(db)
    lease = await store.acquire(sys.argv[2], "w")
    for n in range(3):
        await commit(store, lease, n)
    os.chmod(db, 0o400)
    os.chmod(directory, 0o500)
    other = SQLiteStore(db)  # another worker, started after the change
    say(other_load=await outcome(other.load(sys.argv[2])))
    say(other_acquire=await outcome(other.acquire(sys.argv[2], "x", takeover=True)))
    say(open_store=await outcome(commit(store, lease, 3)))
    await other.aclose()
    os.chmod(directory, 0o700)
    os.chmod(db, 0o600)
    await store.aclose()
    fixed = SQLiteStore(db)
    lease = await fixed.acquire(sys.argv[2], "x", takeover=True)
    head = (await fixed.load(sys.argv[2])).version
    say(fixed=await outcome(commit(fixed, lease, head)))
    await fixed.aclose()

asyncio.run(main())
"""


async def test_a_file_made_read_only_while_a_store_is_open(tmp_path: Path) -> None:
    """The open store keeps the descriptors it opened with (the OS lets it write); a
    store opened after the change reads, and is refused writes as `StoreUnavailable`."""
    if os.geteuid() == 0:
        if not hasattr(os, "setuid"):
            pytest.skip("root without setuid: cannot make a file unwritable for this test")
        # tmp_path's parents are root's, mode 0700: nobody could not reach it
        directory = Path(tempfile.mkdtemp(prefix="livekit-resume-ro-"))
        os.chown(directory, 65534, 65534)
    else:
        directory = tmp_path / "ro"
        directory.mkdir()
    db = directory / "ro.db"
    try:
        try:
            other_load, other_acquire, open_store, fixed = await _child(UNWRITABLE, db)
        except AssertionError as exc:
            if "Operation not permitted" in str(exc):
                pytest.skip("cannot switch to uid 65534 here")
            raise
        assert other_load["other_load"][0] == "ok"
        assert other_acquire["other_acquire"][0] == "StoreUnavailable", other_acquire
        assert "readonly" in other_acquire["other_acquire"][1]
        assert open_store["open_store"] == ["ok", 4]
        assert fixed["fixed"] == ["ok", 5]
        await _reopened_intact(db, 5)
    finally:
        if directory != tmp_path / "ro":
            shutil.rmtree(directory)


# -- the -wal or -shm deleted under an open store ---------------------------------------------

OTHER_WRITER = """
async def main():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "child", takeover=True)
    head = (await store.load(sys.argv[2])).version
    say(version=await commit(store, lease, head))
    await store.aclose()

asyncio.run(main())
"""


async def test_a_deleted_shm_file_never_lets_two_processes_overwrite_each_other(
    tmp_path: Path,
) -> None:
    """The -shm holds the WAL's write lock. Deleted under an open store, the next process
    made a new one: both held the write lock at once, each appended at the end of the
    -wal it knew, and the open store's next commit overwrote the other's acknowledged
    version (it did not even see it). Now a store whose -shm (or -wal) was replaced
    reopens before its next operation."""
    db = tmp_path / "shm.db"
    store = SQLiteStore(db)
    try:
        lease = await store.acquire(KEY, "w")
        for n in range(3):
            await _commit(store, lease, n)
        os.unlink(f"{db}-shm")
        assert await _commit(store, lease, 3) == 4
        assert await _child(OTHER_WRITER, db) == [{"version": 5}]
        # this store sees the other process's version, and commits on top of it
        assert (await store.load(KEY)).version == 5
        lease = await store.acquire(KEY, "w", takeover=True)
        assert await _commit(store, lease, 5) == 6
        assert await _child(OTHER_WRITER, db) == [{"version": 7}]
    finally:
        await store.aclose()
    await _reopened_intact(db, 7)  # each process's versions, none overwritten
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


WAL_DELETED = """
async def main():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "w")
    for n in range(3):
        await commit(store, lease, n)
    os.unlink(sys.argv[1] + "-wal")
    for n in range(3, 5):
        await commit(store, lease, n)
    say(acknowledged=5)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint

asyncio.run(main())
"""


async def test_a_deleted_wal_file_loses_no_acknowledged_version_when_the_writer_is_killed(
    tmp_path: Path,
) -> None:
    """Every commit lived in the -wal (the schema too); deleted under the open store, the
    later commits went to a file with no name, and a SIGKILL lost them all, with every
    version before the deletion: the file read as an empty store."""
    db = tmp_path / "wal.db"
    assert await _child(WAL_DELETED, db, exit_code=-signal.SIGKILL) == [{"acknowledged": 5}]
    await _reopened_intact(db, 5)


async def test_two_stores_of_one_process_reopen_together_after_a_deleted_shm(
    tmp_path: Path,
) -> None:
    """SQLite shares one -shm mapping among a process's connections to a file: a store
    that reopened while another still held the deleted one would get that stale mapping
    again. It is refused (`StoreUnavailable`) until the other has let go."""
    db = tmp_path / "two.db"
    a, b = SQLiteStore(db), SQLiteStore(db)
    try:
        lease = await a.acquire(KEY, "w")
        for n in range(3):
            await _commit(a, lease, n)
        assert (await b.load(KEY)).version == 3
        os.unlink(f"{db}-shm")
        with pytest.raises(StoreUnavailable, match="-shm file was deleted"):
            await a.load(KEY)
        assert (await b.load(KEY)).version == 3  # b let go of it, and reopened
        assert await _commit(a, lease, 3) == 4  # then a could too
        assert await _child(OTHER_WRITER, db) == [{"version": 5}]
        assert (await a.load(KEY)).version == (await b.load(KEY)).version == 5
    finally:
        await a.aclose()
        await b.aclose()
    await _reopened_intact(db, 5)


# -- a lock held elsewhere, a missing directory, many stores ---------------------------------

LOCK_HOLDER = """
import sqlite3
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
say(locked=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


async def test_a_write_lock_held_by_another_process_past_the_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "lock.db"
    store = SQLiteStore(db, busy_timeout=0.3)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PRELUDE + LOCK_HOLDER,
        str(db),
        KEY,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        lease = await store.acquire(KEY, "w")
        for n in range(3):
            await _commit(store, lease, n)
        assert holder.stdout is not None and holder.stdin is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 20)
        assert json.loads(line) == {"locked": True}
        for call in (_commit(store, lease, 3), store.acquire(KEY, "w"), store.delete(KEY)):
            with pytest.raises(StoreUnavailable, match=r"locked.*busy_timeout \(0\.3 s\)"):
                await call
        await _intact(store, 3)  # readers are not blocked (WAL)
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        assert await asyncio.wait_for(holder.wait(), 20) == 0
        assert await _commit(store, lease, 3) == 4
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await store.aclose()
    await _reopened_intact(db, 4)


async def test_a_store_in_a_missing_directory_works_once_the_directory_exists(
    tmp_path: Path,
) -> None:
    db = tmp_path / "later" / "resume.db"
    store = SQLiteStore(db)
    try:
        for call in (store.acquire(KEY, "w"), store.load(KEY), store.keys()):
            with pytest.raises(StoreUnavailable, match="later"):
                await call
        assert not db.parent.exists()  # nothing made on the way
        db.parent.mkdir()
        lease = await store.acquire(KEY, "w")
        assert await _commit(store, lease, 0) == 1
    finally:
        await store.aclose()
    await _reopened_intact(db, 1)


MANY_STORES = """
async def main():
    first = SQLiteStore(sys.argv[1])
    lease = await first.acquire(sys.argv[2], "w")
    await commit(first, lease, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    stores = [SQLiteStore(sys.argv[1]) for _ in range(40)]
    loads = await asyncio.gather(*(outcome(s.load(sys.argv[2])) for s in stores))
    say(kinds=sorted({kind for kind, _ in loads}))
    for s in stores[:30]:
        await s.aclose()
    loads = await asyncio.gather(*(outcome(s.load(sys.argv[2])) for s in stores[30:]))
    say(after=sorted({kind for kind, _ in loads}))
    say(commit=await outcome(commit(stores[-1], lease, 1)))
    for s in [first, *stores[30:]]:
        await s.aclose()

asyncio.run(main())
"""


async def test_more_stores_than_file_descriptors_are_unavailable_then_work_again(
    tmp_path: Path,
) -> None:
    db = tmp_path / "many.db"
    kinds, after, commit = await _child(MANY_STORES, db)
    assert kinds["kinds"] == ["StoreUnavailable", "ok"]  # the first ones open, the rest wait
    assert after["after"] == ["ok"]
    assert commit["commit"] == ["ok", 2]
    await _reopened_intact(db, 2)


async def test_many_stores_in_one_process_commit_without_losing_a_version(
    tmp_path: Path,
) -> None:
    db = tmp_path / "crowd.db"
    stores = [SQLiteStore(db, busy_timeout=30) for _ in range(50)]
    try:

        async def writer(i: int, store: SQLiteStore) -> None:
            key = f"k{i}"
            lease = await store.acquire(key, "w")
            for n in range(3):
                await store.commit(Commit(key, lease.epoch, n, b"h%d" % n, [], n + 1))

        await asyncio.gather(*(writer(i, s) for i, s in enumerate(stores)))
        assert sorted(await stores[0].keys()) == sorted(f"k{i}" for i in range(50))
        for i in range(50):
            assert (await stores[-1 - i].load(f"k{i}")).version == 3
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))


async def test_a_store_dropped_without_closing_does_not_hold_the_file_for_the_next(
    tmp_path: Path,
) -> None:
    """The record of open connections kept for a deleted -shm must forget a store that
    was garbage-collected unclosed: SQLite closed its connection and removed the -wal and
    -shm, which a later store on the file would otherwise take for a deletion."""
    db = tmp_path / "dropped.db"
    dropped = SQLiteStore(db)
    lease = await dropped.acquire(KEY, "w")
    await _commit(dropped, lease, 0)
    del dropped
    gc.collect()
    await _reopened_intact(db, 1)


# -- a file that is not the store's ----------------------------------------------------------


@pytest.mark.parametrize("user_version", [1, 7])
async def test_a_tableless_database_stamped_by_another_application_is_refused_untouched(
    tmp_path: Path, user_version: int
) -> None:
    """An application that stamps its schema version before it creates a table leaves a
    file with no tables, no application id and a user_version. Taken for an empty file,
    it was switched to WAL (its header rewritten), then called an altered livekit-resume
    store ("lacks part of its schema"), or with 1 run through the schema-1 migration.
    Every livekit-resume file that has a schema version also has its application id."""
    db = tmp_path / "theirs.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version={user_version}")
        conn.commit()
    before = db.read_bytes()
    store = SQLiteStore(db)
    try:
        for call in (store.acquire(KEY, "w"), store.load(KEY)):
            with pytest.raises(SnapshotCorrupt, match="another application"):
                await call
    finally:
        await store.aclose()
    assert db.read_bytes() == before
