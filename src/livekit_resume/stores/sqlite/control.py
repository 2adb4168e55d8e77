"""`SQLiteCommands`: remote commands through a small ``commands`` table of the store's file.

A sender inserts a row; every owner of the key polls for rows past the last it saw
(`POLL_INTERVAL`, only while an inbox is open, that is while it holds the lease), claims
its row and writes the answer into it; the sender polls the row for that answer. A claim
and a withdrawal are the same conditional UPDATE (``status='pending'``), so one wins.

The table is additive: it is created on first use, with ``IF NOT EXISTS``, and a file
without it is still schema 2 (a process of an older version ignores it). Rows are
deleted `KEEP_SECONDS` after their sender stopped waiting, and with their session
(`purge`).

Each row carries ``claim_by``, the moment its sender stops waiting for an owner to take
it, on the machine's monotonic clock (``time.monotonic``: CLOCK_MONOTONIC on Linux, one
clock for every process of the machine, and every process of a WAL file is on one
machine, sharing its -shm). A wall clock stepped either way moves no such moment. An
owner claims a row only before it: after, nobody waits for it (a sender that crashed
never withdrew it). A row without it (a sender of an earlier version) is claimed and
cleaned up as before, by its wall-clock ``sent_at``.

An inbox starts past the newest row. One whose poll failed leaves its place to the
channel, and the next inbox of its key (the owner listening again) starts there: a
command sent in between is heard. Whenever the file's schema changed, an inbox checks
whether the table was dropped and made again (numbering its rows from 1 again, below
the last it saw), and then reads it from its first row.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from ...errors import SnapshotCorrupt
from ..base import Command, CommandReply, InboxBase
from .transactions import read, write

__all__ = ["POLL_INTERVAL", "SQLiteCommands"]

_T = TypeVar("_T")

# An owner looks for new commands this often: a pause lands within a fifth of a second,
# at the cost of one indexed read per session and interval on the store's thread.
POLL_INTERVAL = 0.2
# A command's row outlives any sender's wait (remote.MAX_TIMEOUT, twice); then it is
# only clutter.
KEEP_SECONDS = 300.0
# remote.MAX_TIMEOUT (not imported: remote imports the stores): the longest a sender
# waits for a claim, and so the farthest ahead a ``claim_by`` can be. One farther ahead
# was stamped before the machine restarted (its monotonic clock with it): nobody waits.
_LONGEST_WAIT = 120.0
# The machine's monotonic clock, shared by its processes (see the module's docstring).
_monotonic = time.monotonic

_TABLE = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    verb TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    sent_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    version INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    claim_by REAL
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS commands_by_key ON commands (ns, key, seq)"
# A table made by an earlier version lacks the column; its rows read NULL there.
_ADD_CLAIM_BY = "ALTER TABLE commands ADD COLUMN claim_by REAL"
# A row an owner may take now: still pending and still waited for (see claim_by).
_CLAIMABLE = "status='pending' AND (claim_by IS NULL OR (claim_by > ? AND claim_by <= ?))"
# The places left by inboxes whose poll failed, for the next inbox of their key; past
# this many (keys whose owner never listened again), the oldest are forgotten.
_KEEP_PLACES = 1024


def _valid(id_: object, verb: object, epoch: object) -> bool:
    """Whether a row is a command as `SQLiteCommands.send` writes it. Anyone who can
    write the file can write the table: a row of other types (an epoch of text, of
    1e999, of 2.5) is skipped and the poll goes on past it, as a message that does not
    parse is on Redis. Raising here failed the owner's inbox, which listened again a
    second later from the newest row and so never saw the good commands of that poll."""
    return (
        isinstance(id_, str)
        and isinstance(verb, str)
        and isinstance(epoch, int)
        and not isinstance(epoch, bool)
    )


Run = Callable[[Callable[[sqlite3.Connection], _T]], Awaitable[_T]]


class _Inbox(InboxBase):
    def __init__(self, channel: SQLiteCommands, key: str) -> None:
        self._channel = channel
        self._key = key
        self._after = 0  # the last seq seen
        self._schema: int | None = None  # the file's schema_version when it was seen
        self._ready: list[Command] = []

    async def _activate(self) -> None:
        place = self._channel._places.pop(self._key, None)
        if place is None:
            _, self._after, self._schema = await self._channel._since(self._key, 0, None)
        else:  # where the last inbox of the key failed (see _next)
            self._after, self._schema = place

    async def _next(self) -> Command:
        while not self._ready:
            try:
                self._ready, self._after, self._schema = await self._channel._since(
                    self._key, self._after, self._schema
                )
            except Exception:
                # The owner listens again a second later: started past the newest row
                # then, it skipped every command sent meanwhile, and their senders were
                # told it did not answer.
                self._channel._leave_place(self._key, self._after, self._schema)
                raise
            if not self._ready:
                await asyncio.sleep(POLL_INTERVAL)
        return self._ready.pop(0)

    async def _close(self) -> None:
        self._ready = []


class SQLiteCommands:
    """The `CommandChannel` of one `SQLiteStore`: ``run`` runs one transaction on the
    store's thread, ``ns`` is its namespace, ``clock`` its wall clock."""

    def __init__(self, run: Run[object], ns: str, clock: Callable[[], float]) -> None:
        self._run_any = run
        self._ns = ns
        self._clock = clock
        self._created = False
        self._places: dict[str, tuple[int, int | None]] = {}

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if not self._created:
            await self._run_any(self._create)
            self._created = True
        try:
            return cast(_T, await self._run_any(fn))
        except SnapshotCorrupt:
            # The table dropped since, or made again by an earlier version (no claim_by):
            # made whole again, once. A file damaged otherwise fails the same way again.
            await self._run_any(self._create)
            return cast(_T, await self._run_any(fn))

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        with write(conn):
            conn.execute(_TABLE)
            conn.execute(_INDEX)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(commands)")}
            if "claim_by" not in columns:
                conn.execute(_ADD_CLAIM_BY)

    def inbox(self, key: str) -> _Inbox:
        return _Inbox(self, key)

    def _leave_place(self, key: str, after: int, schema: int | None) -> None:
        self._places.pop(key, None)
        if len(self._places) >= _KEEP_PLACES:
            del self._places[next(iter(self._places))]
        self._places[key] = (after, schema)

    async def _since(
        self, key: str, after: int, schema: int | None
    ) -> tuple[list[Command], int, int]:
        """The commands for ``key`` past row ``after``, the last row seen and the file's
        schema version. ``schema`` None: an inbox starting, no command, the newest row.
        A ``schema`` no longer the file's: the table may have been dropped and made
        again, numbered from 1; below ``after`` again, it is read from its first row
        (every row of it was sent after the inbox started: it was listening then)."""

        def since(conn: sqlite3.Connection) -> tuple[list[Command], int, int]:
            start = after
            with read(conn):
                now = int(conn.execute("PRAGMA schema_version").fetchone()[0])
                if schema is None:
                    newest = conn.execute(
                        "SELECT MAX(seq) FROM commands WHERE ns=? AND key=?", (self._ns, key)
                    ).fetchone()
                    return [], int(newest[0] or 0), now
                if schema != now:
                    issued = conn.execute(
                        "SELECT seq FROM sqlite_sequence WHERE name='commands'"
                    ).fetchone()
                    if issued is None or not isinstance(issued[0], int) or issued[0] < after:
                        start = 0
                rows = conn.execute(
                    "SELECT seq, id, verb, epoch FROM commands WHERE ns=? AND key=? AND seq>? "
                    "ORDER BY seq",
                    (self._ns, key, start),
                ).fetchall()
            found = [
                Command(i, key, verb, epoch) for _, i, verb, epoch in rows if _valid(i, verb, epoch)
            ]
            return found, int(rows[-1][0]) if rows else start, now

        return await self._run(since)

    async def send(self, command: Command) -> int | None:
        wait = min(command.timeout or _LONGEST_WAIT, _LONGEST_WAIT)

        def insert(conn: sqlite3.Connection) -> None:
            with write(conn):
                now, mono = self._clock(), _monotonic()
                # Rows of this version by their claim_by, on the monotonic clock: a wall
                # clock stepped forward while a command waited deleted it here, and its
                # sender was told the owner "may still apply it". Rows of an earlier
                # version by their sent_at, also those stamped more than KEEP_SECONDS
                # ahead (the wall clock stepped back since) or not with a time at all:
                # they were kept until the clock caught up with them, for ever for a
                # stamp of text or 1e999.
                conn.execute(
                    "DELETE FROM commands WHERE CASE WHEN claim_by IS NULL "
                    "THEN NOT (sent_at BETWEEN ? AND ?) "
                    "OR typeof(sent_at) NOT IN ('integer', 'real') "
                    "ELSE NOT (claim_by BETWEEN ? AND ?) "
                    "OR typeof(claim_by) NOT IN ('integer', 'real') END",
                    # any sender's claim_by, however long it waits: up to _LONGEST_WAIT
                    (
                        now - KEEP_SECONDS,
                        now + KEEP_SECONDS,
                        mono - KEEP_SECONDS,
                        mono + _LONGEST_WAIT,
                    ),
                )
                conn.execute(
                    "INSERT INTO commands (ns, key, id, verb, epoch, sent_at, claim_by) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        self._ns,
                        command.key,
                        command.id,
                        command.verb,
                        command.epoch,
                        now,
                        mono + wait,
                    ),
                )

        await self._run(insert)
        return None  # a table cannot tell whether anybody polls it

    async def _move(self, command: Command, reply: CommandReply, only: str) -> bool:
        """Set ``command``'s row to ``reply`` where ``only`` (a condition: "" for any
        state, `_CLAIMABLE` for a claim) holds."""

        def move(conn: sqlite3.Connection) -> bool:
            mono = _monotonic()
            args: tuple[object, ...] = (mono, mono + _LONGEST_WAIT) if "?" in only else ()
            with write(conn):
                cur = conn.execute(
                    "UPDATE commands SET status=?, version=?, reason=? WHERE ns=? AND id=?"
                    + (f" AND {only}" if only else ""),
                    (reply.status, reply.version, reply.reason, self._ns, command.id, *args),
                )
            return cur.rowcount == 1

        return await self._run(move)

    async def claim(self, command: Command) -> bool:
        # Pending and still waited for: the row of a sender that crashed (it never
        # withdrew it) was taken by an owner coming by later, for nobody.
        return await self._move(command, CommandReply("claimed"), _CLAIMABLE)

    async def answer(self, command: Command, reply: CommandReply) -> None:
        await self._move(command, reply, "")

    async def withdraw(self, command: Command) -> bool:
        return await self._move(command, CommandReply("withdrawn"), "status='pending'")

    async def reply(self, command: Command) -> CommandReply:
        def get(conn: sqlite3.Connection) -> CommandReply:
            with read(conn):
                row = conn.execute(
                    "SELECT status, version, reason FROM commands WHERE ns=? AND id=?",
                    (self._ns, command.id),
                ).fetchone()
            if row is None:
                # `send` wrote it in its own transaction: gone since, deleted with its
                # session (`purge`), or the table cleared by hand. Read as pending, the
                # sender waited twice its timeout and was told the owner "may still
                # apply it", which nobody can any more (a claim needs the row).
                return CommandReply(
                    "refused",
                    reason="the store no longer holds the command (its session was "
                    "deleted, or its row removed); nobody can take it now, and whether "
                    "an owner took it before is unknown",
                )
            status, version, reason = row
            if status in ("pending", "claimed", "withdrawn"):
                return CommandReply(status)
            # An answer of other types (a version of text or 1e999, a status of no
            # meaning) reads as a refusal, as on Redis: before, it raised a bare
            # ValueError out of `remote.pause`, or kept the sender waiting for good.
            if (
                status in ("done", "refused")
                and isinstance(version, int)
                and isinstance(reason, str)
            ):
                return CommandReply(status, version, reason)
            return CommandReply("refused", reason=f"unreadable answer {row!r:.80}")

        return await self._run(get)
