"""`SQLiteCommands`: remote commands through a small ``commands`` table of the store's file.

A sender inserts a row; every owner of the key polls for rows past the last it saw
(`POLL_INTERVAL`, only while an inbox is open, that is while it holds the lease), claims
its row and writes the answer into it; the sender polls the row for that answer. A claim
and a withdrawal are the same conditional UPDATE (``status='pending'``), so one wins.

The table is additive: it is created on first use, with ``IF NOT EXISTS``, and a file
without it is still schema 2 (a process of an older version ignores it). Rows are
deleted `KEEP_SECONDS` after they were sent, and with their session (`purge`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

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
    reason TEXT NOT NULL DEFAULT ''
)"""
_INDEX = "CREATE INDEX IF NOT EXISTS commands_by_key ON commands (ns, key, seq)"


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
        self._ready: list[Command] = []

    async def _activate(self) -> None:
        self._after = await self._channel._last_seq(self._key)

    async def _next(self) -> Command:
        while not self._ready:
            self._ready, self._after = await self._channel._since(self._key, self._after)
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

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if not self._created:
            await self._run_any(self._create)
            self._created = True
        return cast(_T, await self._run_any(fn))

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        with write(conn):
            conn.execute(_TABLE)
            conn.execute(_INDEX)

    def inbox(self, key: str) -> _Inbox:
        return _Inbox(self, key)

    async def _last_seq(self, key: str) -> int:
        def last(conn: sqlite3.Connection) -> int:
            with read(conn):
                row = conn.execute(
                    "SELECT MAX(seq) FROM commands WHERE ns=? AND key=?", (self._ns, key)
                ).fetchone()
            return int(row[0] or 0)

        return await self._run(last)

    async def _since(self, key: str, after: int) -> tuple[list[Command], int]:
        def since(conn: sqlite3.Connection) -> tuple[list[Command], int]:
            with read(conn):
                rows = conn.execute(
                    "SELECT seq, id, verb, epoch FROM commands WHERE ns=? AND key=? AND seq>? "
                    "ORDER BY seq",
                    (self._ns, key, after),
                ).fetchall()
            found = [
                Command(i, key, verb, epoch) for _, i, verb, epoch in rows if _valid(i, verb, epoch)
            ]
            return found, int(rows[-1][0]) if rows else after

        return await self._run(since)

    async def send(self, command: Command) -> int | None:
        def insert(conn: sqlite3.Connection) -> None:
            with write(conn):
                now = self._clock()
                # Also rows stamped more than KEEP_SECONDS ahead (the wall clock stepped
                # back since) or not with a time at all: they were kept until the clock
                # caught up with them, for ever for a stamp of text or 1e999.
                conn.execute(
                    "DELETE FROM commands WHERE NOT (sent_at BETWEEN ? AND ?) "
                    "OR typeof(sent_at) NOT IN ('integer', 'real')",
                    (now - KEEP_SECONDS, now + KEEP_SECONDS),
                )
                conn.execute(
                    "INSERT INTO commands (ns, key, id, verb, epoch, sent_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (self._ns, command.key, command.id, command.verb, command.epoch, now),
                )

        await self._run(insert)
        return None  # a table cannot tell whether anybody polls it

    async def _move(self, command: Command, reply: CommandReply, only_pending: bool) -> bool:
        def move(conn: sqlite3.Connection) -> bool:
            with write(conn):
                cur = conn.execute(
                    "UPDATE commands SET status=?, version=?, reason=? WHERE ns=? AND id=?"
                    + (" AND status='pending'" if only_pending else ""),
                    (reply.status, reply.version, reply.reason, self._ns, command.id),
                )
            return cur.rowcount == 1

        return await self._run(move)

    async def claim(self, command: Command) -> bool:
        return await self._move(command, CommandReply("claimed"), only_pending=True)

    async def answer(self, command: Command, reply: CommandReply) -> None:
        await self._move(command, reply, only_pending=False)

    async def withdraw(self, command: Command) -> bool:
        return await self._move(command, CommandReply("withdrawn"), only_pending=True)

    async def reply(self, command: Command) -> CommandReply:
        def get(conn: sqlite3.Connection) -> CommandReply:
            with read(conn):
                row = conn.execute(
                    "SELECT status, version, reason FROM commands WHERE ns=? AND id=?",
                    (self._ns, command.id),
                ).fetchone()
            if row is None:
                return CommandReply("pending")
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
