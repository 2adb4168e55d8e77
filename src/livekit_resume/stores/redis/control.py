"""`RedisCommands`: remote commands over Redis pub/sub, answers in short-lived keys.

Layout (``{key}`` is the session's hash tag, so that on a Cluster the channel, its
publisher and every command key live on the node that owns the session's slot):

- ``<ns>:ctl:{key}``: the session's command channel. Its owner subscribes while it holds
  the lease (the inboxes of one store share one connection per node: `_Hub`); a sender
  publishes a JSON command from the slot's node (the ``publish`` script), whose reply
  counts the subscribers: 0 means no owner listens, at once. Plain pub/sub works on
  standalone, Sentinel and Cluster alike (Redis 6+, no sharded pub/sub). After a Cluster
  moves a slot, its owners subscribe anew when their connection drops; until then a
  command may be refused as unheard. On a database other than 0 the channel is
  ``<ns>:ctl:{key}:db<n>``: pub/sub ignores the database number.
- ``<ns>:ctl:{key}:<id>``: one command's state, `ANSWER_TTL` seconds: ``claimed``
  (``SET NX`` by the owner) or ``withdrawn`` (``SET NX`` by a sender that gave up: one
  of the two wins), then the owner's JSON answer.
- ``<ns>:ctl:{key}:<id>:open``: set by the sender before it publishes (its message then
  says ``"open": 1``), `ANSWER_TTL` seconds; an owner claims such a command only by
  deleting it (then ``SET NX`` as above), so a command sent longer ago than a
  withdrawal lives is never claimed (by an owner frozen since).

These keys sit outside the session's prefix (``<ns>:{key}:``), so a session's own
keys, and the search for the remains of a lost head, never see them.
"""

from __future__ import annotations

import asyncio
import json
import logging

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ...errors import StoreUnavailable
from ..base import Command, CommandReply, InboxBase
from .client import Server, text
from .keys import KeyNames
from .scripts import Scripts

__all__ = ["ANSWER_TTL", "RedisCommands"]

logger = logging.getLogger("livekit_resume")

# Ids of commands heard with a mark, kept until claimed: far more than wait at once.
MARKS_KEPT = 4096
# The server confirms a subscription at once; this bounds a server that never does.
CONFIRM_TIMEOUT = 10.0
# A node's subscriber connection is kept this long once its last inbox left. Closing it
# disconnects a connection of the store's pool, and the next command (the next restore's
# first round trip) made it anew: a worker whose sessions end and start one after
# another (a caller back in a new room) paid a connection and a handshake on each.
LINGER = 30.0
# A command's state outlives any sender's wait (remote.MAX_TIMEOUT, twice); then it
# expires on its own.
ANSWER_TTL = 300
_CLAIMED = b"claimed"
# What a message that is no command of ours raises on its way to a `Command`: an epoch
# of 1e999 (OverflowError), JSON nested past the parser's depth (RecursionError), bytes
# that are not UTF-8 (a ValueError). Skipped: anyone may publish on the channel.
_NOT_A_COMMAND = (KeyError, TypeError, ValueError, OverflowError, RecursionError)
_WITHDRAWN = b"withdrawn"


class _Inbox(InboxBase):
    """One owner's commands for one key, fed by the store's `_Hub`."""

    def __init__(self, hub: _Hub, key: str, channel: str) -> None:
        self._hub = hub
        self._key = key
        self.channel = channel
        self._queue: asyncio.Queue[bytes | StoreUnavailable] = asyncio.Queue()

    def put(self, item: bytes | StoreUnavailable) -> None:
        self._queue.put_nowait(item)

    async def _activate(self) -> None:
        await self._hub.add(self)

    async def _next(self) -> Command:
        while True:
            item = await self._queue.get()
            if isinstance(item, StoreUnavailable):
                raise item  # the connection is lost: listen again
            try:
                raw = json.loads(item)
                command = Command(str(raw["id"]), self._key, str(raw["verb"]), int(raw["epoch"]))
            except _NOT_A_COMMAND:
                continue  # not a command of ours: a stray publisher on the channel
            if raw.get("open") == 1:
                self._hub.marked(command.id)
            return command

    async def _close(self) -> None:
        await self._hub.remove(self)


class _Node:
    """One subscriber connection (to one Cluster node, or the server) and its reader."""

    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub
        self.inboxes: dict[str, set[_Inbox]] = {}
        self.confirmed: dict[str, asyncio.Event] = {}
        self.reader: asyncio.Task[None] | None = None
        self.idle: asyncio.TimerHandle | None = None  # its close, once no inbox is left


class _Hub:
    """Every inbox of one store over one subscriber connection per node (a connection per
    session would take the store's whole pool with a few dozen live sessions). On a
    Cluster the node is the one that owns the channel's slot, where its sender publishes:
    the count of receivers PUBLISH returns is then exact."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._nodes: dict[str, _Node] = {}
        self._lock = asyncio.Lock()
        # Commands heard whose sender set their mark (`RedisCommands.claim`), oldest first.
        self.with_mark: dict[str, None] = {}
        # A node's connection failed: the next subscription asks the Cluster who serves
        # its slot now. The client's own map is refreshed only when one of its commands
        # fails, and an owner with nothing else to send would subscribe to the node that
        # failed over again and again.
        self._remap = False
        self._expiring: set[asyncio.Task[None]] = set()  # referenced while they run

    def marked(self, command_id: str) -> None:
        if len(self.with_mark) >= MARKS_KEPT:
            del self.with_mark[next(iter(self.with_mark))]
        self.with_mark[command_id] = None

    async def _node_for(self, channel: str) -> tuple[str, _Node]:
        client = self._server.client
        name, node_of_slot = "", None
        if isinstance(client, RedisCluster):
            if self._remap:
                await client.nodes_manager.initialize()
                self._remap = False
            else:
                await client.initialize()
            node_of_slot = client.get_node_from_key(channel)
            if node_of_slot is None:
                raise StoreUnavailable(f"no Redis Cluster node serves the slot of {channel}")
            name = node_of_slot.name
        node = self._nodes.get(name)
        if node is None:
            pubsub: PubSub = (
                client.pubsub(node=node_of_slot)
                if isinstance(client, RedisCluster)
                else client.pubsub()
            )
            node = self._nodes[name] = _Node(pubsub)
        return name, node

    async def add(self, inbox: _Inbox) -> None:
        """Subscribe ``inbox``; returns once the server confirmed its channel."""
        try:
            with self._server.errors("listen for commands", None):
                await self._subscribe(inbox)
        except BaseException as e:
            self._remap = self._remap or isinstance(e, StoreUnavailable)
            await self.remove(inbox)
            raise

    async def _subscribe(self, inbox: _Inbox) -> None:
        async with self._lock:
            name, node = await self._node_for(inbox.channel)
            first = inbox.channel not in node.inboxes
            node.inboxes.setdefault(inbox.channel, set()).add(inbox)
            if node.idle is not None:
                node.idle.cancel()
                node.idle = None
            confirmed = node.confirmed.setdefault(inbox.channel, asyncio.Event())
            if first:
                await node.pubsub.subscribe(inbox.channel)
            if node.reader is None:
                node.reader = asyncio.ensure_future(self._read(name, node))
        await asyncio.wait_for(confirmed.wait(), CONFIRM_TIMEOUT)

    async def remove(self, inbox: _Inbox) -> None:
        async with self._lock:
            for name, node in list(self._nodes.items()):
                inboxes = node.inboxes.get(inbox.channel)
                if inboxes is None or inbox not in inboxes:
                    continue
                inboxes.discard(inbox)
                if inboxes:
                    return
                del node.inboxes[inbox.channel]
                node.confirmed.pop(inbox.channel, None)
                last = not node.inboxes
                connection = node.pubsub.connection
                lost = connection is None or not connection.is_connected
                if not (last and lost):
                    try:
                        await node.pubsub.unsubscribe(inbox.channel)
                    except (RedisError, OSError):
                        logger.debug("unsubscribe failed", exc_info=True)
                        lost = True
                if last and lost:
                    await self._close(name, node)  # nothing worth keeping
                elif last:
                    # nobody listens here any more: closed unless an inbox comes first
                    node.idle = asyncio.get_running_loop().call_later(
                        LINGER, self._expire, name, node
                    )
                return

    def _expire(self, name: str, node: _Node) -> None:
        node.idle = None
        task = asyncio.ensure_future(self._close_idle(name, node))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _close_idle(self, name: str, node: _Node) -> None:
        async with self._lock:
            if not node.inboxes and node.idle is None and self._nodes.get(name) is node:
                await self._close(name, node)

    async def aclose(self) -> None:
        """Close every node's subscriber connection (the store closes)."""
        async with self._lock:
            for name, node in list(self._nodes.items()):
                await self._close(name, node)

    async def _close(self, name: str, node: _Node) -> None:
        if node.idle is not None:
            node.idle.cancel()
            node.idle = None
        self._nodes.pop(name, None)
        if node.reader is not None and node.reader is not asyncio.current_task():
            node.reader.cancel()
        await node.pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2

    async def _read(self, name: str, node: _Node) -> None:
        try:
            while True:
                with self._server.errors("listen for commands", None):
                    msg = await node.pubsub.get_message(timeout=None)
                if msg is None:
                    continue
                channel = text(msg["channel"])
                if msg["type"] == "subscribe" and channel in node.confirmed:
                    node.confirmed[channel].set()
                elif msg["type"] == "message":
                    for inbox in node.inboxes.get(channel, ()):
                        inbox.put(msg["data"])
        except Exception as exc:
            # Every inbox of the node hears of it and its owner subscribes anew. Any
            # error, not only a lost connection: a reader that ended on another one
            # (redis-py's pubsub raising RuntimeError or the like) would leave its
            # inboxes waiting for good, their owners never to hear a command again.
            if isinstance(exc, StoreUnavailable):
                e = exc
            else:
                logger.warning("command reader of %s failed", name or "the server", exc_info=True)
                e = StoreUnavailable(f"{self._server.where}: listening for commands: {exc!r}")
            self._remap = True
            async with self._lock:
                if self._nodes.get(name) is node:
                    for inboxes in node.inboxes.values():
                        for inbox in inboxes:
                            inbox.put(e)
                    node.inboxes.clear()
                    await self._close(name, node)


class RedisCommands:
    """The `CommandChannel` of one `RedisStore`."""

    def __init__(self, server: Server, names: KeyNames, scripts: Scripts) -> None:
        self._server = server
        self._names = names
        self._scripts = scripts
        self._hub = _Hub(server)

    def _channel(self, key: str) -> str:
        return self._names.control_channel(key)

    def _state(self, command: Command) -> str:
        return f"{self._names.control(command.key)}:{command.id}"

    def _open(self, command: Command) -> str:
        return f"{self._state(command)}:open"

    def inbox(self, key: str) -> _Inbox:
        return _Inbox(self._hub, key, self._channel(key))

    async def aclose(self) -> None:
        """Close the subscriber connections (the store closes)."""
        await self._hub.aclose()

    async def send(self, command: Command) -> int | None:
        payload = json.dumps(
            {"id": command.id, "verb": command.verb, "epoch": command.epoch, "open": 1}
        )
        with self._server.errors(f"send {command.verb}", command.key):
            # the command's mark, before anybody can hear it: a claim needs it (`claim`)
            await self._server.client.set(self._open(command), b"1", ex=ANSWER_TTL)
            # KEYS[1] only routes the script to the slot's node, where the owner listens
            receivers = await self._scripts.call(
                "publish", self._state(command), [self._channel(command.key), payload]
            )
        return int(receivers)

    async def _set_once(self, command: Command, value: bytes) -> bool:
        with self._server.errors(f"{value.decode()} {command.verb}", command.key):
            done = await self._server.client.set(
                self._state(command), value, nx=True, ex=ANSWER_TTL
            )
        return bool(done)

    async def claim(self, command: Command) -> bool:
        # The state key decides between claim and withdrawal (SET NX), but it expires:
        # an owner frozen past ANSWER_TTL woke up, found no withdrawal left and applied
        # a command its sender was told was withdrawn. The command's mark, set when it
        # was sent, expires before a withdrawal's state: a claim needs it (and then
        # wins the state as before), so a command too old is never taken. A command
        # that says it has no mark (``open`` missing: a sender of an earlier version,
        # during a rolling upgrade) is claimed as before, by the state alone.
        if self._hub.with_mark.pop(command.id, False) is None:
            with self._server.errors(f"claim {command.verb}", command.key):
                if not await self._server.client.delete(self._open(command)):
                    return False
        return await self._set_once(command, _CLAIMED)

    async def withdraw(self, command: Command) -> bool:
        # the mark stays: set before the withdrawal, it expires before it
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
        except _NOT_A_COMMAND:  # the same failures as a stray command's
            return CommandReply("refused", reason=f"unreadable answer {text(raw)[:80]!r}")
