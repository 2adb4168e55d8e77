"""`MemoryCommands`: remote commands within one process, for a `MemoryStore`.

Every inbox of a key gets each command on its own queue; claims and answers live in a
dict, so a claim and a withdrawal never interleave (no await point between check and
write, as in the store itself).
"""

from __future__ import annotations

import asyncio

from .base import Command, CommandReply, InboxBase

__all__ = ["MemoryCommands"]

# Answers are kept this many, oldest dropped first: a sender reads its own within its
# timeout, so only a burst of thousands of commands could drop one still awaited.
KEEP_ANSWERS = 1024


class _Inbox(InboxBase):
    def __init__(self, owner: MemoryCommands, key: str) -> None:
        self._owner = owner
        self._key = key
        self._queue: asyncio.Queue[Command] = asyncio.Queue()

    def put(self, command: Command) -> None:
        self._queue.put_nowait(command)

    async def _activate(self) -> None:
        self._owner._inboxes.setdefault(self._key, set()).add(self)

    async def _next(self) -> Command:
        return await self._queue.get()

    async def _close(self) -> None:
        inboxes = self._owner._inboxes
        here = inboxes.get(self._key, set())
        here.discard(self)
        if not here:
            inboxes.pop(self._key, None)  # else one entry per key ever listened on


class MemoryCommands:
    """The `CommandChannel` of one `MemoryStore`: only its own process can reach it."""

    def __init__(self) -> None:
        self._inboxes: dict[str, set[_Inbox]] = {}
        self._replies: dict[str, CommandReply] = {}
        # The commands delivered and neither claimed nor withdrawn yet, oldest first: a
        # claim or a withdrawal takes one from here, so one of the two wins. Deciding it
        # from `_replies` instead let a burst of other commands evict a withdrawal, and
        # the owner then claimed and applied a command its sender was told was withdrawn.
        self._open: dict[str, None] = {}

    def inbox(self, key: str) -> _Inbox:
        return _Inbox(self, key)

    async def send(self, command: Command) -> int | None:
        receivers = list(self._inboxes.get(command.key, ()))
        self._open[command.id] = None
        while len(self._open) > KEEP_ANSWERS:
            # forgotten: never applied (its sender, gone, did not withdraw it)
            del self._open[next(iter(self._open))]
        for inbox in receivers:
            inbox.put(command)
        return len(receivers)

    def _take(self, command: Command) -> bool:
        if command.id not in self._open:
            return False
        del self._open[command.id]
        return True

    def _set(self, command: Command, reply: CommandReply) -> None:
        self._replies[command.id] = reply
        while len(self._replies) > KEEP_ANSWERS:
            del self._replies[next(iter(self._replies))]

    async def claim(self, command: Command) -> bool:
        if not self._take(command):
            return False
        self._set(command, CommandReply("claimed"))
        return True

    async def answer(self, command: Command, reply: CommandReply) -> None:
        self._set(command, reply)

    async def withdraw(self, command: Command) -> bool:
        if not self._take(command):
            return False
        self._set(command, CommandReply("withdrawn"))
        return True

    async def reply(self, command: Command) -> CommandReply:
        return self._replies.get(command.id, CommandReply("pending"))
