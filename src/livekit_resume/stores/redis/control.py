"""`RedisCommands`: remote commands over Redis pub/sub, answers in short-lived keys.

Layout (``{key}`` is the session's hash tag, so that on a Cluster the channel, its
publisher and every command key live on the node that owns the session's slot):

- ``<ns>:ctl:{key}``: the session's command channel. Its owner subscribes while it holds
  the lease; a sender publishes a JSON command from the slot's node (the ``publish``
  script), whose reply counts the subscribers: 0 means no owner listens, at once. Plain
  pub/sub works on standalone, Sentinel and Cluster alike (Redis 6+, no sharded pub/sub).
- ``<ns>:ctl:{key}:<id>``: one command's state, `ANSWER_TTL` seconds: ``claimed``
  (``SET NX`` by the owner) or ``withdrawn`` (``SET NX`` by a sender that gave up: one
  of the two wins), then the owner's JSON answer.

These keys sit outside the session's prefix (``<ns>:{key}:``), so a session's own
keys, and the search for the remains of a lost head, never see them.
"""

from __future__ import annotations

import json
from types import TracebackType

from ..base import Command, CommandReply
from .client import Server, text
from .events import EventStream
from .keys import KeyNames
from .scripts import Scripts

__all__ = ["ANSWER_TTL", "RedisCommands"]

# A command's state outlives any sender's timeout; then it expires on its own.
ANSWER_TTL = 60
_CLAIMED = b"claimed"
_WITHDRAWN = b"withdrawn"


class _Inbox:
    def __init__(self, events: EventStream, key: str) -> None:
        self._events = events
        self._key = key

    async def __aenter__(self) -> _Inbox:
        await self._events.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Command:
        while True:
            raw = await self._events.__anext__()
            try:
                return Command(str(raw["id"]), self._key, str(raw["verb"]), int(raw["epoch"]))
            except (KeyError, TypeError, ValueError):
                continue  # not a command of ours: a stray publisher on the channel

    async def aclose(self) -> None:
        await self._events.aclose()


class RedisCommands:
    """The `CommandChannel` of one `RedisStore`."""

    def __init__(self, server: Server, names: KeyNames, scripts: Scripts) -> None:
        self._server = server
        self._names = names
        self._scripts = scripts

    def _channel(self, key: str) -> str:
        return self._names.control(key)

    def _state(self, command: Command) -> str:
        return f"{self._channel(command.key)}:{command.id}"

    def inbox(self, key: str) -> _Inbox:
        return _Inbox(EventStream(self._server, self._channel(key)), key)

    async def send(self, command: Command) -> int | None:
        payload = json.dumps({"id": command.id, "verb": command.verb, "epoch": command.epoch})
        with self._server.errors(f"send {command.verb}", command.key):
            # KEYS[1] only routes the script to the slot's node, where the owner listens
            receivers = await self._scripts.call(
                "publish", [self._state(command)], [self._channel(command.key), payload]
            )
        return int(receivers)

    async def _set_once(self, command: Command, value: bytes) -> bool:
        with self._server.errors(f"{value.decode()} {command.verb}", command.key):
            done = await self._server.client.set(
                self._state(command), value, nx=True, ex=ANSWER_TTL
            )
        return bool(done)

    async def claim(self, command: Command) -> bool:
        return await self._set_once(command, _CLAIMED)

    async def withdraw(self, command: Command) -> bool:
        return await self._set_once(command, _WITHDRAWN)

    async def answer(self, command: Command, reply: CommandReply) -> None:
        payload = json.dumps(
            {"status": reply.status, "version": reply.version, "reason": reply.reason}
        )
        with self._server.errors(f"answer {command.verb}", command.key):
            await self._server.client.set(self._state(command), payload, ex=ANSWER_TTL)

    async def reply(self, command: Command) -> CommandReply:
        with self._server.errors(f"read the answer to {command.verb}", command.key):
            raw = await self._server.client.get(self._state(command))
        if raw is None:
            return CommandReply("pending")
        if raw in (_CLAIMED, _WITHDRAWN):
            return CommandReply("claimed" if raw == _CLAIMED else "withdrawn")
        try:
            data = json.loads(raw)
            status = data["status"]
            if status not in ("done", "refused"):
                raise ValueError(status)
            return CommandReply(status, int(data["version"]), str(data["reason"]))
        except (KeyError, TypeError, ValueError):
            return CommandReply("refused", reason=f"unreadable answer {text(raw)[:80]!r}")
