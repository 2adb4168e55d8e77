"""The server's settings that decide whether sessions survive: eviction and persistence.

Read before the store's first operation (`ServerCheck.ensure`), again behind Sentinel
once a failover brought another primary, or on demand (`RedisStore.check`); see the
package docstring for the settings a deployment needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ...errors import StoreUnavailable
from .client import Server, text

__all__ = ["ServerCheck"]

logger = logging.getLogger("livekit_resume")

_SETTINGS = ("maxmemory-policy", "maxmemory", "appendonly", "save")

# On a Cluster, primaries whose settings could not be read (down, unreachable) are asked
# again in the background, at most this often: never on an operation's way.
RECHECK_EVERY = 30.0


class ServerCheck:
    """Judges each primary's eviction policy and persistence for a store with session
    TTL ``ttl``; ``strict`` refuses an evicting one. Each problem is warned once."""

    def __init__(self, server: Server, *, ttl: float | None, strict: bool) -> None:
        self._server = server
        self._ttl = ttl
        self._strict = strict
        self._checked = False  # read and judged: `ensure` has nothing left to do
        self._checked_primary: Any = None  # behind Sentinel, the primary it read
        self._warned: set[str] = set()
        # Whether a primary was seen evicting session keys: then a missing head may
        # have left remains anywhere, not only where the cheap checks look.
        self.evicting = False
        # Whether every primary was read and none evicts: then a session's keys go only
        # by a delete or an expiry, never one at a time under memory pressure.
        self.keeps_keys = False
        # A Cluster's check: its first round (every operation waits for it), a later one
        # in the background and when that is due, and a strict refusal (raised by
        # `ensure` until a round finds the primaries fixed).
        self._first: asyncio.Task[None] | None = None
        self._round: asyncio.Task[None] | None = None
        self._due = 0.0
        self._refused: StoreUnavailable | None = None
        self._asked: set[str] = set()  # the Cluster primaries a round asked

    @property
    def checked(self) -> bool:
        """Whether the primaries that serve the store now were read and judged. A
        failover brings another server, with settings of its own (a replica promoted
        may evict): read again when Sentinel names another primary, or a Cluster's
        slot map has a primary no round asked."""
        if not self._checked:
            return False
        if isinstance(self._server.client, RedisCluster):
            return not self._new_primaries()
        return bool(self._checked_primary == self._primary())

    def _new_primaries(self) -> bool:
        """Whether the Cluster's slot map (redis-py's, kept up to date on MOVED and on
        connection errors) names a primary no round asked: promoted, or added."""
        client = self._server.client
        assert isinstance(client, RedisCluster)
        return any(n.name not in self._asked for n in client.get_primaries())

    def _primary(self) -> Any:
        """The address of the primary Sentinel named last (redis-py's pool asks on each
        new connection); None for a server named by its own address, or a Cluster."""
        return getattr(
            getattr(self._server.client, "connection_pool", None), "master_address", None
        )

    async def check(self) -> list[str]:
        """Read the settings and return what is unsafe (see `RedisStore.check`)."""
        return self._judge(await self._settings())

    async def ensure(self, op: str, key: str | None) -> None:
        """`check` before the store's first operation, ``op`` (of session ``key``).
        A server that does not answer fails ``op`` here, named as the operation would
        name it: the operation would wait out the same timeouts again; the check runs
        again next time.

        On a Cluster the primaries are read at once, and those that answer are judged
        (strict refuses an evicting one). One that does not is left to the operation
        (it may not be the session's node): later operations do not wait for it, it
        is asked again in the background, at most every `RECHECK_EVERY` seconds. It
        was asked again before each operation, which waited out the socket timeout for
        a stopped primary every time (5 s a call, on every node's sessions)."""
        if self.checked:
            return
        if not isinstance(self._server.client, RedisCluster):
            self._judge(await self._settings(op, key))
            return
        if self._first is None or (self._first.done() and self._new_primaries()):
            # the first round, or one for a primary no round asked (a replica promoted):
            # waited for, as the first, so that nothing is written there unjudged
            self._first = asyncio.ensure_future(self._cluster_round(op, key))
        if not self._first.done():
            await asyncio.shield(self._first)  # shared: a caller cancelled stops no other
        elif (self._round is None or self._round.done()) and time.monotonic() >= self._due:
            self._round = asyncio.ensure_future(self._cluster_round(op, key))
        if self._refused is not None:
            raise self._refused

    async def _cluster_round(self, op: str, key: str | None) -> None:
        """Read every primary of the Cluster at once and judge those that answered;
        ``checked`` once all did (and none is refused). When none answered, the next
        operation reads them again first, as on one server (it fails the same way, or
        finds the Cluster back). Raises nothing but a bug."""
        self._due = time.monotonic() + RECHECK_EVERY
        client = self._server.client
        assert isinstance(client, RedisCluster)
        try:
            with self._server.errors(op, key):
                await client.initialize()
                primaries = list(client.get_primaries())
        except StoreUnavailable:
            self._first = None
            return
        self._asked = {n.name for n in primaries}
        where = [f"cluster node {n.name}" for n in primaries]
        got = await asyncio.gather(
            *(self._node_config(w, n, op, key) for w, n in zip(where, primaries, strict=True)),
            return_exceptions=True,
        )
        for answer in got:
            if isinstance(answer, BaseException) and not isinstance(answer, StoreUnavailable):
                raise answer
        read = [(w, c) for w, c in zip(where, got, strict=True) if isinstance(c, dict)]
        if not read:
            self._first = None
            return
        try:
            self._judge(read, complete=len(read) == len(primaries))
            self._refused = None
        except StoreUnavailable as e:
            self._refused = e

    async def _node_config(self, where: str, node: Any, op: str, key: str | None) -> dict[str, str]:
        with self._server.errors(op, key):
            return await self._read_config(where, node)

    async def aclose(self) -> None:
        """Stop a round under way (the store is closing)."""
        rounds = [r for r in (self._first, self._round) if r is not None]
        for r in rounds:
            r.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)

    def _eviction_problem(self, where: str, conf: dict[str, str]) -> str | None:
        policy = conf.get("maxmemory-policy", "")
        if policy.startswith("allkeys-"):
            why = "evicts any key"
        elif policy.startswith("volatile-") and self._ttl is not None:
            why = f"evicts keys with a TTL, and sessions have one (ttl={self._ttl:g} s)"
        else:
            return None
        return (
            f"{where} has maxmemory-policy {policy} (maxmemory "
            f"{conf.get('maxmemory', '?')}), which {why}: under memory pressure a "
            "session loses its head or versions. Set maxmemory-policy noeviction "
            "(or volatile-* with sessions without ttl)"
        )

    def _judge(
        self, settings: list[tuple[str, dict[str, str]]], *, complete: bool = True
    ) -> list[str]:
        """Warn of each problem of ``settings`` once; raise the strict refusal; without
        it, ``checked`` if they were ``complete`` (every primary answered)."""
        problems: list[str] = []
        evicting: list[str] = []
        for where, conf in settings:
            eviction = self._eviction_problem(where, conf)
            if eviction is not None:
                evicting.append(eviction)
            if conf.get("appendonly") == "no" and conf.get("save") == "":
                problems.append(
                    f'{where} persists nothing (appendonly no, save ""): a restart '
                    "loses every session and its lease. Set appendonly yes with "
                    "appendfsync everysec (or always)"
                )
        problems = evicting + problems
        # a partial round keeps what an earlier one saw of the primaries it missed
        self.evicting = bool(evicting) or (self.evicting and not complete)
        read = all("maxmemory-policy" in conf for _, conf in settings)
        self.keeps_keys = complete and bool(settings) and read and not self.evicting
        for problem in problems:
            if problem not in self._warned:
                self._warned.add(problem)
                logger.warning("livekit-resume store: %s", problem)
        if evicting and self._strict:
            raise StoreUnavailable(
                f"refusing to use {self._server.where} (strict=True): " + "; ".join(evicting)
            )
        self._checked, self._checked_primary = complete, self._primary()
        return problems

    async def _settings(
        self, op: str = "check of the server's settings", key: str | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Each primary's name and its eviction and persistence settings (empty for
        a server that does not let us read its CONFIG); an error names ``op``."""
        client = self._server.client
        out: list[tuple[str, dict[str, str]]] = []
        with self._server.errors(op, key):
            if isinstance(client, RedisCluster):
                await client.initialize()
                targets: list[tuple[str, Any]] = [
                    (f"cluster node {n.name}", n) for n in client.get_primaries()
                ]
            else:
                targets = [(self._server.where, None)]
            for where, node in targets:
                # one not read ({}: CONFIG refused) is judged as unknown, not as safe
                out.append((where, await self._read_config(where, node)))
        return out

    async def _read_config(self, where: str, node: Any) -> dict[str, str]:
        nodes = {} if node is None else {"target_nodes": node}
        # All four in one round trip where the server takes several names (Redis 7 and
        # later): this runs before a cold worker's first restore.
        conf = await self._config_get(where, _SETTINGS, nodes)
        if conf is None:
            conf = {}
            for name in _SETTINGS:
                conf.update(await self._config_get(where, (name,), nodes) or {})
        return conf

    async def _config_get(
        self, where: str, names: tuple[str, ...], nodes: dict[str, Any]
    ) -> dict[str, str] | None:
        """``names``' values, or None when the server refused the command."""
        try:
            got = await self._server.client.config_get(*names, **nodes)
        except ResponseError as exc:
            # Several names before Redis 7, or CONFIG renamed, disabled or denied by an
            # ACL (managed services often hide it): not a reason to refuse the store.
            logger.debug("cannot read %s of %s (%s); not checking it", " ".join(names), where, exc)
            return None
        items = cast("dict[bytes | str, bytes | str]", got).items()
        return {text(k): text(v) for k, v in items}
