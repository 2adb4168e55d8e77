"""The Lua scripts (``stores/lua/``): their sources, their registration with redis-py,
and running one for a session, with its common arguments and its reply checked.

Session scripts run behind two preludes, ``clock.lua`` (``NOW``) and ``session.lua``
(the head, ``live_head()``, keys, TTL, trimming); ``index`` behind ``clock.lua`` only;
``publish`` alone. They are called by SHA (redis-py's ``register_script`` names them)
and, on NOSCRIPT (a restart, a promoted replica), loaded again on the node of the call's
key alone: a Cluster primary that is down fails no call of another's key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from ...errors import SnapshotCorrupt, StoreUnavailable
from .client import Server, text
from .health import ServerCheck
from .keys import KeyNames

__all__ = ["DEFAULT_WAIT_TIMEOUT_MS", "Scripts", "fmt_time", "script_source"]

logger = logging.getLogger("livekit_resume")

# How long a commit waits for replicas to acknowledge it (WAIT's timeout, ms) when
# wait_replicas is set: a healthy replica on the same network answers in about a
# millisecond; a tenth of a second bounds what a lagging one adds to every commit.
DEFAULT_WAIT_TIMEOUT_MS = 100
# The scripts whose writes wait_replicas waits for: a commit, and a delete (a failover
# that lost it would bring the session back; the tombstone in the session's slot, laid
# on the same node before it, replicates ahead of it)
_WAITED = ("commit", "delete")

_SESSION_SCRIPTS = (
    "acquire",
    "renew",
    "release",
    "commit",
    "compact",
    "load",
    "versions",
    "info",
    "delete",
)

# Scripts that do not run behind the session prelude, and the preludes they run behind.
_STANDALONE_SCRIPTS = {"index": ("clock",), "publish": (), "tombstone": ()}

_SESSION_PRELUDES = ("clock", "session")


@cache
def _lua(name: str) -> str:
    folder = resources.files("livekit_resume.stores").joinpath("lua")
    return folder.joinpath(f"{name}.lua").read_text("utf-8")


def script_source(name: str) -> str:
    """A script's source with the preludes it runs behind (Redis has no include)."""
    preludes = _STANDALONE_SCRIPTS.get(name, _SESSION_PRELUDES)
    return "\n".join(_lua(part) for part in (*preludes, name))


def fmt_time(t: float) -> str:
    return repr(float(t))


def _migrating(nodes: Any, slot: str) -> bool:
    """Whether a ``CLUSTER NODES`` answer (raw, or as redis-py parses it: a dict per
    node with its ``migrations``) shows ``slot`` migrating or importing."""
    if isinstance(nodes, (bytes, str)):
        return re.search(rf"\[{slot}-[<>]-", text(nodes)) is not None
    if isinstance(nodes, dict):
        if "migrations" in nodes:
            return any(str(m.get("slot")) == slot for m in nodes["migrations"])
        return any(_migrating(v, slot) for v in nodes.values())
    if isinstance(nodes, list):
        return any(_migrating(v, slot) for v in nodes)
    return False


class Scripts:
    """The scripts registered on one client, run with the store's common arguments:
    ``ARGV[1]`` now (``''``: the server's clock), ``[2]`` and ``[3]`` the session TTL in
    seconds and milliseconds (``''``: none)."""

    def __init__(
        self,
        server: Server,
        names: KeyNames,
        check: ServerCheck,
        *,
        ttl: float | None,
        clock: Callable[[], float] | None,
        wait_replicas: int,
        wait_timeout: int,
    ) -> None:
        self._server = server
        self._names = names
        self._check = check
        self._ttl = ttl
        self._clock = clock
        self._wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout
        self._code: dict[str, AsyncScript] = {
            name: server.client.register_script(script_source(name))
            for name in (*_SESSION_SCRIPTS, *_STANDALONE_SCRIPTS)
        }
        self.under_replicated = 0
        # ARGV[2] and [3]: the session TTL in seconds and in milliseconds ('': none)
        self._ttl_args = (
            ("", "") if ttl is None else (fmt_time(ttl), str(max(1, math.ceil(ttl * 1000))))
        )

    def now_arg(self) -> str:
        return "" if self._clock is None else fmt_time(self._clock())

    async def call(self, name: str, key: str, args: Sequence[str | bytes]) -> Any:
        """A standalone script (``index``, ``publish``, ``tombstone``) of one ``key``,
        raw: the caller maps errors. Loaded again on the key's node alone when it lost
        it (`_evalsha`)."""
        return await self._evalsha(self._code[name], key, args)

    async def run(self, script: str, key: str, args: Sequence[str | bytes | int]) -> list[Any]:
        """Run a session script for session ``key`` (after the server check); its
        ``corrupt`` findings raise `SnapshotCorrupt`, other replies are returned."""
        if not self._check.checked:
            await self._check.ensure(script, key)
        full = self.session_args(args)
        with self._server.errors(script, key):
            if script in _WAITED and self._wait_replicas:
                reply = await self._run_and_wait(script, key, full)
            else:
                reply = await self._evalsha(self._code[script], self._names.head(key), full)
        return await self.checked(script, key, reply)

    async def checked(self, script: str, key: str, reply: Any) -> list[Any]:
        """A session script's ``reply`` (`run`), or one taken from a `trip`: its
        ``corrupt`` findings raise `SnapshotCorrupt`, an error in its place is raised
        as ours; other replies are returned."""
        if isinstance(reply, Exception):
            with self._server.errors(script, key):
                raise reply
        if not isinstance(reply, list) or not reply:
            raise SnapshotCorrupt(f"{script} of session {key!r} got a malformed reply {reply!r}")
        if reply[0] == b"corrupt":
            if isinstance(self._server.client, RedisCluster) and await self._slot_moving(key):
                raise StoreUnavailable(
                    f"{script} of session {key!r} on {self._server.where}: the Cluster is "
                    "moving the session's slot to another node and the script met it "
                    f"half moved ({text(reply[1])}); retry once the slot has moved"
                )
            raise SnapshotCorrupt(self.corrupt(key, text(reply[1])))
        return reply

    def corrupt(self, key: str, found: str) -> str:
        """What a session script's ``corrupt`` finding says, with its likely causes."""
        return (
            f"session {key!r} on {self._server.where}: {found}; a key evicted by the server "
            "(maxmemory-policy), removed or written by hand, or foreign data: delete the "
            "session or restore it from a backup"
        )

    async def _slot_moving(self, key: str) -> bool:
        """Whether the Cluster is migrating the session's slot: MIGRATE moves its keys
        one command at a time, so a script sent to the new node (ASK) can find the head
        there and the versions it names not yet. Asked of the node that serves the slot
        (its ``CLUSTER NODES`` line shows ``[slot->-target]``); False if it cannot say."""
        client = self._server.client
        assert isinstance(client, RedisCluster)
        head = self._names.head(key)
        slot = str(key_slot(head.encode()))
        try:
            node = client.get_node_from_key(head)
            nodes = await client.execute_command("CLUSTER NODES", target_nodes=node)
        except (TimeoutError, RedisError, OSError):
            return False
        return _migrating(nodes, slot)

    async def _evalsha(self, code: AsyncScript, key: str, args: Sequence[str | bytes | int]) -> Any:
        """One EVALSHA of a script of one ``key``, loading the script on NOSCRIPT
        (flushed, a restart, a promoted replica) and sending it again: nothing ran.
        What `AsyncScript.__call__` does, without copying the arguments into two tuples
        on every commit, and loading it on ``key``'s node only (`_load`)."""
        client = self._server.client
        try:
            return await client.evalsha(code.sha, 1, key, *args)
        except NoScriptError:
            await self._load(code, key)
        try:
            return await client.evalsha(code.sha, 1, key, *args)
        except NoScriptError:
            await self._load_on_primaries(code)
            return await client.evalsha(code.sha, 1, key, *args)

    async def _load(self, code: AsyncScript, routed_by: str) -> None:
        """Load a script where a key's commands go: on a Cluster the node of its slot
        only, not every primary (one that is down would fail the call of a session
        whose node is up; another node asks for it by its own NOSCRIPT)."""
        client = self._server.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(routed_by)
            await client.execute_command("SCRIPT LOAD", code.script, target_nodes=node)
        else:
            await client.script_load(code.script)

    async def _load_on_primaries(self, code: AsyncScript) -> None:
        """Load a script on every primary that answers: one still NOSCRIPT once loaded
        on the node of its slot ran elsewhere, on a node importing the slot (ASK) that
        never ran the store's scripts (added to scale out)."""
        client = self._server.client
        if not isinstance(client, RedisCluster):
            await client.script_load(code.script)
            return
        await asyncio.gather(
            *(
                client.execute_command("SCRIPT LOAD", code.script, target_nodes=node)
                for node in client.get_primaries()
            ),
            return_exceptions=True,  # a primary down fails no call of another's slot
        )

    def session_args(self, args: Sequence[str | bytes | int]) -> list[str | bytes | int]:
        """A session script's arguments: the common ones (see the class), then ``args``."""
        return [self.now_arg(), *self._ttl_args, *args]

    async def trip(
        self,
        scripts: Sequence[tuple[str, str, Sequence[str | bytes | int]]],
        *,
        wait_on: str | None = None,
    ) -> list[Any]:
        """Scripts, each ``(name, the one key routing it, its arguments)``, in one
        pipeline, and with ``wait_on`` (a key) a WAIT after them on the node of that
        key's slot: their replies, an error in place of a reply. A script the server did
        not know (NOSCRIPT: flushed, a new node; it did not run) is loaded and the whole
        trip sent again, so every command of a trip must be safe to send twice."""
        client = self._server.client
        for attempt in (1, 2, 3):
            pipe = client.pipeline(transaction=False)
            for name, routed_by, args in scripts:
                # As a raw command: a Cluster pipeline refuses its evalsha() method, but
                # routes a raw EVALSHA by its key.
                pipe.execute_command("EVALSHA", self._code[name].sha, 1, routed_by, *args)
            if wait_on is not None:
                wait = ("WAIT", self._wait_replicas, self._wait_timeout)
                if isinstance(client, RedisCluster):
                    # looked up on every attempt: a failover since the last one moves it
                    await client.initialize()
                    pipe.execute_command(*wait, target_nodes=client.get_node_from_key(wait_on))
                else:
                    pipe.execute_command(*wait)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            # one load per script and node: a trip may hold a page of sessions
            unknown: dict[tuple[str, str], str] = {}
            for (name, routed_by, _), reply in zip(scripts, replies, strict=False):
                if isinstance(reply, NoScriptError):
                    unknown.setdefault((name, self._server.node_name(routed_by)), routed_by)
            if not unknown or attempt == 3:
                break
            for (name, _), routed_by in unknown.items():
                if attempt == 1:
                    await self._load(self._code[name], routed_by)
                else:  # ran on a node importing the slot: see `_load_on_primaries`
                    await self._load_on_primaries(self._code[name])
        return replies

    async def _run_and_wait(self, script: str, key: str, args: Sequence[str | bytes | int]) -> Any:
        """Run a script, then WAIT on the same connection (WAIT counts the replicas
        that acknowledged this connection's writes): one pipeline, sent to the node of
        the session's slot on a Cluster. Fewer replicas than asked is logged and
        counted in `under_replicated`, not raised: the write stands on the primary."""
        head = self._names.head(key)
        reply, acked = await self.trip([(script, head, args)], wait_on=head)
        if isinstance(reply, Exception):
            raise reply
        self._count_replicas(script, key, reply, acked)
        return reply

    def _count_replicas(self, script: str, key: str, reply: Any, acked: Any) -> None:
        written = isinstance(reply, list) and reply[:1] == [b"ok"]
        if script == "delete" and not (written and reply[1:2] == [1]):
            return  # refused, or nothing there to delete: nothing to lose
        if isinstance(acked, Exception):
            # WAIT refused (a replica itself, or ACL): the write is applied; say so.
            what, extra = _what(script, key, reply if written else None)
            logger.warning("%s applied, but WAIT failed: %s", what, acked, extra=extra)
            self.under_replicated += 1
        elif written and int(acked) < self._wait_replicas:
            self.under_replicated += 1
            what, extra = _what(script, key, reply)
            logger.warning(
                "%s reached %d of %d replicas within %d ms; it is applied on the primary "
                "and may be lost if it fails over now",
                what,
                int(acked),
                self._wait_replicas,
                self._wait_timeout,
                extra=extra,
            )


def _what(script: str, key: str, written: list[Any] | None) -> tuple[str, dict[str, Any]]:
    """A waited write as a warning names it, and the log record's fields: a commit that
    landed with its version."""
    if script == "commit" and written is not None:
        version = int(written[1])
        return f"commit of session {key!r} (version {version})", {"key": key, "version": version}
    return f"{script} of session {key!r}", {"key": key}
