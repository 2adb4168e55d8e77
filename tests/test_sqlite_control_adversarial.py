"""Remote control over the SQLite store, and the store's file, under the faults the
earlier passes left: a wall clock stepped forward while a command waits, a sender that
crashes while it waits, an owner whose poll fails, a ``commands`` table dropped and
made again, a ``timeout`` of True; a -shm file truncated and a database file renamed
over under a live store.

The guarantees are docs/control.md's (a command is applied once or never, and never
after its sender stopped waiting for it) and docs/failure-model.md's (a bad condition
is a typed error, never a dead process or a write that silently goes nowhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.errors import StoreUnavailable
from livekit_resume.remote import MAX_TIMEOUT
from livekit_resume.stores.base import Command
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.sqlite import control as sqlite_control
from livekit_resume.stores.sqlite.control import KEEP_SECONDS
from livekit_resume.testing.poll import eventually
from tests import child_env
from tests.test_control import KEY, live, state
from tests.test_sqlite_faults import KEY as FILE_KEY
from tests.test_sqlite_faults import PRELUDE, _child, _commit, _reopened_intact


def _pending_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as con:
        rows = con.execute("SELECT id FROM commands WHERE status='pending' ORDER BY seq")
        return [str(r[0]) for r in rows]


# -- the clock ------------------------------------------------------------------------------


async def test_a_wall_clock_stepped_forward_while_a_command_waits_leaves_it_claimable(
    tmp_path: Path,
) -> None:
    """Rows were cleaned by their wall-clock stamp: a clock stepped forward past
    `KEEP_SECONDS` (NTP, a VM resumed) while a command waited made the next send delete
    it, and its sender was told the owner "may still apply it", which it never could.
    A command waited for is now kept however the wall clock moves."""
    path = tmp_path / "store.db"
    sender = SQLiteStore(path)
    # another sender, whose wall clock has jumped ahead since
    later = SQLiteStore(path, clock=lambda: time.time() + 2 * KEEP_SECONDS)
    try:
        command = Command(uuid.uuid4().hex, KEY, "pause", 1, timeout=60.0)
        await sender.commands().send(command)
        # a sender in a hurry (its own timeout shorter) does not clean it up either
        await later.commands().send(Command(uuid.uuid4().hex, KEY, "pause", 1, timeout=1.0))
        assert command.id in _pending_ids(path)
        assert await sender.commands().claim(command)  # the owner can still take it
    finally:
        await later.aclose()
        await sender.aclose()


async def test_a_sender_whose_command_row_was_deleted_is_told_so_at_once(
    tmp_path: Path,
) -> None:
    """A row gone while its sender waited (its session deleted, the table cleared) read
    as pending: the sender waited twice its timeout, then was told the owner "may still
    apply it", which nobody could. It is now refused at once, saying what happened."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        await store.acquire(KEY, "w1")
        remote = asyncio.ensure_future(lr.control(store).pause(KEY, timeout=30))

        async def sent() -> bool:
            return bool(await _maybe_pending(path))

        await eventually(sent, "the command was sent")
        with contextlib.closing(sqlite3.connect(path)) as con:
            con.execute("DELETE FROM commands")
            con.commit()
        with pytest.raises(lr.CommandRefused, match="no longer holds the command"):
            await asyncio.wait_for(remote, 10)
    finally:
        await store.aclose()


async def test_a_commands_table_of_an_earlier_version_still_carries_commands(
    tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    """A file whose ``commands`` table an earlier version made (no ``claim_by``) gains
    the column at first use; a command of an earlier sender (no ``claim_by``) is still
    claimed, and this version's commands are applied."""
    path = tmp_path / "store.db"
    seed = SQLiteStore(path)
    await seed.acquire("seed", "w0")  # the file and its schema
    await seed.aclose()
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(
            "CREATE TABLE commands (seq INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, "
            "key TEXT NOT NULL, id TEXT NOT NULL UNIQUE, verb TEXT NOT NULL, "
            "epoch INTEGER NOT NULL, sent_at REAL NOT NULL, "
            "status TEXT NOT NULL DEFAULT 'pending', version INTEGER NOT NULL DEFAULT 0, "
            "reason TEXT NOT NULL DEFAULT '')"
        )
        con.commit()
    store = SQLiteStore(path)
    try:
        rs = await live(store, sessions)
        assert await lr.control(store).pause(KEY, timeout=5) == rs.version
        old = Command(uuid.uuid4().hex, KEY, "resume", rs._holder.epoch)
        with contextlib.closing(sqlite3.connect(path)) as con:
            con.execute(
                "INSERT INTO commands (ns, key, id, verb, epoch, sent_at) VALUES (?,?,?,?,?,?)",
                (store._ns, KEY, old.id, old.verb, old.epoch, time.time()),
            )
            con.commit()

        async def answered() -> bool:
            return (await store.commands().reply(old)).status == "done"

        await eventually(answered, "the owner applied the earlier sender's command")
        assert state(rs) == "active"
    finally:
        await store.aclose()


# -- the sender crashes ---------------------------------------------------------------------

CRASHING_SENDER = """
import livekit_resume as lr

async def main():
    store = SQLiteStore(sys.argv[1])
    await lr.control(store).pause(sys.argv[2], timeout=float(sys.argv[3]))

asyncio.run(main())
"""


async def test_a_command_of_a_crashed_sender_is_not_claimed_after_its_timeout(
    tmp_path: Path,
) -> None:
    """A sender withdraws its command at its timeout; one that crashed (SIGKILL) left it
    pending, and an owner that came by later (a frozen worker waking up, a poll that
    failed meanwhile) applied a command nobody waited for any more. It is now claimable
    only within its sender's timeout."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        lease = await store.acquire(KEY, "w1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PRELUDE + CRASHING_SENDER,
            str(path),
            KEY,
            "1.0",
            env=child_env(),
        )
        try:

            async def sent() -> bool:
                return path.exists() and bool(await _maybe_pending(path))

            await eventually(sent, "the sender sent its command", timeout=20)
            proc.send_signal(signal.SIGKILL)
        finally:
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        (command_id,) = await _maybe_pending(path)
        await asyncio.sleep(1.5)  # past the dead sender's timeout: nobody waits for it now
        command = Command(command_id, KEY, "pause", lease.epoch)
        assert not await store.commands().claim(command)
        assert (await store.commands().reply(command)).status == "pending"
    finally:
        await store.aclose()


async def _maybe_pending(path: Path) -> list[str]:
    try:
        return _pending_ids(path)
    except sqlite3.OperationalError:  # no table yet
        return []


# -- the owner's poll fails -----------------------------------------------------------------


async def test_a_command_sent_while_the_owners_poll_had_failed_is_still_applied(
    tmp_path: Path, sessions: list[AgentSession[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner whose poll failed listened again a second later from the newest row: a
    command sent in that second was skipped, and its sender told the owner did not
    answer. A command still waited for is now found by the inbox that listens again."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        rs = await live(store, sessions)
        channel = store.commands()
        since = channel._since
        failed = asyncio.Event()

        async def fails_once(*args: Any) -> Any:  # the owner's poll
            if not failed.is_set():
                failed.set()
                raise StoreUnavailable("SQLite store: disk I/O error (injected)")
            return await since(*args)

        monkeypatch.setattr(channel, "_since", fails_once)
        await asyncio.wait_for(failed.wait(), 10)

        async def between_inboxes() -> bool:
            return not rs._control.listening.is_set()

        # sent while the owner waits RELISTEN_DELAY (1 s) to listen again
        await eventually(between_inboxes, "the owner's inbox failed", timeout=0.5)
        assert await lr.control(store).pause(KEY, timeout=4) == rs.version
        assert state(rs) == "paused"
    finally:
        await store.aclose()


# -- the table dropped and made again -------------------------------------------------------


async def test_an_owner_hears_commands_after_the_table_is_dropped_and_made_again(
    tmp_path: Path, sessions: list[AgentSession[Any]]
) -> None:
    """Dropped and created again (by hand, or by a tool that resets the table), the
    table numbers its rows from 1 again: the listening owner looked only past the last
    number it had seen, and ignored every new command."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        rs = await live(store, sessions)
        remote = lr.control(store)
        for _ in range(2):
            await remote.pause(KEY, timeout=5)
            await remote.resume(KEY, timeout=5)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
            ddl = [
                str(r[0])
                for r in con.execute(
                    "SELECT sql FROM sqlite_master WHERE tbl_name='commands' AND sql IS NOT NULL "
                    "ORDER BY type='index'"
                )
            ]
            con.execute("BEGIN IMMEDIATE")
            con.execute("DROP TABLE commands")
            for statement in ddl:
                con.execute(statement)
            con.execute("COMMIT")
        assert await remote.pause(KEY, timeout=4) == rs.version
        assert state(rs) == "paused"
    finally:
        await store.aclose()


# -- arguments ------------------------------------------------------------------------------


async def test_a_timeout_of_true_is_a_value_error(tmp_path: Path) -> None:
    """True is an int to Python: it was taken as a timeout of 1 s, where every other
    timeout that is no number is a ValueError (as an epoch of True is)."""
    store = SQLiteStore(tmp_path / "store.db")
    try:
        await store.acquire(KEY, "w1")
        with pytest.raises(ValueError, match="timeout"):
            await lr.control(store).pause(KEY, timeout=True)
        assert not (await _maybe_pending(tmp_path / "store.db"))  # nothing was sent
    finally:
        await store.aclose()


# -- the file -------------------------------------------------------------------------------

SHM_TRUNCATED = """
async def main():
    store = SQLiteStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "w")
    for n in range(3):
        await commit(store, lease, n)
    os.truncate(sys.argv[1] + "-shm", 0)  # an operator's "> file", a cleanup script
    say(version=await outcome(commit(store, lease, 3)))
    say(loaded=(await store.load(sys.argv[2])).version)
    await store.aclose()

asyncio.run(main())
"""


async def test_a_truncated_shm_file_does_not_kill_the_process(tmp_path: Path) -> None:
    """SQLite maps the -shm file into memory: truncated under an open store, the next
    operation touched pages past the file's end and the process died of SIGBUS, every
    session of the worker with it. The store now puts the file's length back first
    (zeros, which SQLite reads as an index to rebuild from the -wal)."""
    db = tmp_path / "shm.db"
    lines = await _child(SHM_TRUNCATED, db)
    assert lines == [{"version": ["ok", 4]}, {"loaded": 4}]
    await _reopened_intact(db, 4)


async def test_a_database_file_renamed_over_is_refused_not_written_to_a_lost_file(
    tmp_path: Path,
) -> None:
    """A file renamed over the open store's (a backup restored with ``mv``): the store
    went on committing to the file it had open, which no name reaches any more, and
    every commit it acknowledged was lost. It is now a `StoreUnavailable`, and the file
    that took the name is left as it was."""
    db = tmp_path / "store.db"
    store = SQLiteStore(db)
    try:
        lease = await store.acquire(FILE_KEY, "w")
        for n in range(2):
            await _commit(store, lease, n)
        backup = tmp_path / "backup.db"
        with (
            contextlib.closing(sqlite3.connect(db)) as src,
            contextlib.closing(sqlite3.connect(backup)) as dst,
        ):
            src.backup(dst)
        os.replace(backup, db)
        with pytest.raises(StoreUnavailable, match="replaced"):
            await _commit(store, lease, 2)
        with pytest.raises(StoreUnavailable, match="replaced"):
            await store.load(FILE_KEY)
    finally:
        await store.aclose()
    await _reopened_intact(db, 2)  # the restored file, as it was restored


def test_a_commands_timeout_takes_no_part_in_comparing_it() -> None:
    """An inbox rebuilds a command from what the store carries, without its sender's
    timeout: it is still the same command."""
    assert Command("a", KEY, "pause", 1, timeout=3.0) == Command("a", KEY, "pause", 1)


def test_no_sender_waits_longer_than_a_claim_by_can_reach() -> None:
    """A claim_by farther ahead than the longest wait is taken for one stamped before
    the machine restarted: the two bounds must stay one."""
    assert sqlite_control._LONGEST_WAIT == MAX_TIMEOUT
