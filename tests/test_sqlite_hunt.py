"""Hunt: the embedded SQLite store shared by several processes on one machine.

Each test is a defect reproduction (it fails on the code as it stands) unless marked
"passes: coverage". Real files in tmp_path, real processes; sqlite3 is never mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

from livekit_resume.stores.base import Commit, Record
from livekit_resume.stores.sqlite import SQLiteStore
from tests import child_env

KEY = "room-h"


def _commit(key: str, epoch: int, base: int, data: bytes, cid: str = "") -> Commit:
    n = base + 1
    rec = Record("h", f"i{n}", data, f"i{base}" if base else None)
    return Commit(key, epoch, base, b"head %d" % n, [rec], n, commit_id=cid or f"c{n}")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def test_rm_leaves_the_deleted_conversation_readable_in_the_wal(tmp_path: Path) -> None:
    """docs/security.md "Deletion overwrites": rows removed by ``rm`` "are overwritten
    with zeros, not left in free pages", and "``rm`` and ``delete`` remove every trace of
    a session". failure-model.md: "A SQLite -wal file is part of the store".

    Expected: after ``delete`` (the store still open, as every worker's is), the
    deleted conversation's bytes are nowhere in the store's files. Found: the -wal keeps
    the frames of every earlier commit, the conversation in clear, after the delete and
    after a checkpoint (SQLite resets the -wal without truncating it: no
    ``journal_size_limit``, no ``wal_checkpoint(TRUNCATE)``)."""
    db = tmp_path / "s.db"
    secret = b"CARD-4111-1111-1111-1111-SECRET" * 4
    store = SQLiteStore(db)
    other = SQLiteStore(db)  # a second worker keeps the file open, as workers do
    try:
        lease = await store.acquire(KEY, "w1")
        await store.commit(_commit(KEY, lease.epoch, 0, secret))
        await other.keys()
        assert await store.delete(KEY, lease=lease)
        # a checkpoint folds the -wal into the file, as SQLite's auto-checkpoint does
        with contextlib.closing(sqlite3.connect(db)) as raw:  # as `sqlite3 s.db` would
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        # more work by the workers after the delete
        lease2 = await other.acquire("other-key", "w2")
        await other.commit(_commit("other-key", lease2.epoch, 0, b"unrelated"))
        found = [s for s in ("", "-wal") if secret in _read(f"{db}{s}")]
        assert not found, f"the deleted conversation is still readable in {found} after rm"
    finally:
        await store.aclose()
        await other.aclose()


async def _child(code: str, *args: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Run ``code`` in a fresh interpreter (argv: *args); its JSON lines on stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(code),
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
    assert proc.returncode == 0, (proc.returncode, err.decode()[-2000:])
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_a_read_only_store_on_a_path_that_is_not_utf8_is_a_typed_answer(
    tmp_path: Path,
) -> None:
    """A directory name with a byte that is not UTF-8 (a Latin-1 name, an old mount):
    the workers' writable store opens it (sqlite3 takes the path through
    ``os.fsencode``), but a read-only store (``?mode=ro``, what ``ls``, ``history``,
    ``show`` and ``export`` open) builds a ``file:`` URI with ``urllib.parse.quote``
    of the str path, which raises a bare ``UnicodeEncodeError`` (surrogates not
    allowed). docs/failure-model.md (malformed store URL row): an untyped
    ``error (ValueError)`` from the command line was a defect; the contract is a typed
    error or a correct answer.

    Expected: the read-only store lists the session the writer stored."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9 store"))
    os.mkdir(odd)
    db = odd / "s.db"
    writer = SQLiteStore(db)
    try:
        lease = await writer.acquire(KEY, "w")
        await writer.commit(_commit(KEY, lease.epoch, 0, b"hello"))
        assert await writer.keys() == [KEY]
        reader = SQLiteStore(db, read_only=True)
        try:
            try:
                keys: Any = await reader.keys()
            except Exception as exc:  # the kind is what is checked
                keys = f"{type(exc).__name__}: {exc}"
            assert keys == [KEY], f"read-only store on a non-UTF-8 path: {keys}"
        finally:
            await reader.aclose()
    finally:
        await writer.aclose()


FORKED_UNOPENED = """
import asyncio, json, os, sys
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.base import Commit, Record

# Built at import, never used: what DESIGN.md's example does at module level, and what
# LiveKit's forkserver then holds once the module is in WorkerOptions.preload_modules.
store = SQLiteStore(sys.argv[1])
pid = os.fork()
if pid == 0:
    async def child():
        try:
            lease = await asyncio.wait_for(store.acquire("k", "job"), 5)
            rec = Record("h", "i1", b"x", None)
            v = await asyncio.wait_for(
                store.commit(Commit("k", lease.epoch, 0, b"h", [rec], 1)), 5
            )
            out = ["ok", v]
        except Exception as exc:
            out = [type(exc).__name__, str(exc)]
        try:
            await asyncio.wait_for(store.aclose(), 5)
        except Exception:
            pass
        sys.stdout.write(json.dumps({"child": out}) + "\\n")
        sys.stdout.flush()
    asyncio.run(child())
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.stdout.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\\n")
"""


async def test_a_store_made_but_never_opened_before_a_fork_works_in_the_child(
    tmp_path: Path,
) -> None:
    """The connection docstring: "The file at ``path``, opened on first use ... The
    thread starts on the first operation"; docs/failure-model.md: "A store used in a
    process forked after it *opened* raises ``StoreUnavailable``".

    A store constructed (nothing opened, no thread started) and then forked is what
    DESIGN.md's module-level ``store = lr.open_store(...)`` becomes when that module is
    in LiveKit's ``preload_modules`` (imported once in the forkserver, every job process
    forked from it). Expected: the child's first call opens the file and works. Found:
    every call of every job process is refused "opened before this process forked"
    (`Connection.__init__` records the pid at construction)."""
    db = tmp_path / "f.db"
    lines = await _child(FORKED_UNOPENED, str(db))
    said = {k: v for line in lines for k, v in line.items()}
    assert said.get("exit") == 0, said
    assert said["child"] == ["ok", 1], f"a store never opened before the fork: {said['child']}"


BIG_WRITER = """
import asyncio, json, os, sys
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.base import Commit, Record

def say(**m):
    sys.stdout.write(json.dumps(m) + "\\n")
    sys.stdout.flush()

async def main():
    store = SQLiteStore(sys.argv[1], busy_timeout=30)
    lease = await store.acquire("big", "w")
    first = Record("h", "i1", b"A" * (3 << 20), None)
    await store.commit(Commit("big", lease.epoch, 0, b"head 1", [first], 1, commit_id="c1"))
    say(v=1)
    # a commit far larger than the page cache: its pages spill into the -wal before
    # COMMIT (the kill lands among them), written through blobopen in 1 MiB slices
    n = 2
    while True:
        rec = Record("h", f"i{n}", bytes([65 + n % 26]) * (48 << 20), f"i{n - 1}")
        await store.commit(Commit("big", lease.epoch, n - 1, b"head %d" % n, [rec], n))
        n += 1

asyncio.run(main())
"""


async def test_a_writer_killed_inside_a_multi_megabyte_commit_leaves_the_last_version(
    tmp_path: Path,
) -> None:
    """passes: coverage (the existing kill test commits 10-byte items; none kills a
    commit inside SQLite's incremental blob writes, with pages spilled to the -wal).

    docs/failure-model.md, worker crash: "last autosave survives"; DESIGN.md "a reader
    never sees half a snapshot". Expected: after SIGKILL inside the 48 MB commit the
    file passes ``integrity_check``, version 1 loads whole, the dead writer's lease is
    taken over and a new commit lands as version 2."""
    db = tmp_path / "big.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(BIG_WRITER),
        str(db),
        stdout=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line) == {"v": 1}
        wal = f"{db}-wal"
        base = os.stat(wal).st_size
        # killed once the big commit's pages are reaching the -wal
        for _ in range(2000):
            if os.stat(wal).st_size > base + (8 << 20):
                break
            await asyncio.sleep(0.005)
        proc.kill()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    store = SQLiteStore(db)
    try:
        top = await store.load("big")
        assert top.version == 1 and top.streams["h"] == [("i1", b"A" * (3 << 20))]
        lease = await store.acquire("big", "b", takeover=True)
        rec = Record("h", "b", b"b", "i1")
        assert await store.commit(Commit("big", lease.epoch, 1, b"b", [rec], 2)) == 2
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
