"""The server's settings that decide whether sessions survive: eviction and persistence.

Read once before the store's first operation (`ServerCheck.ensure`), or on demand
(`RedisStore.check`); see the package docstring for the settings a deployment needs.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ...errors import StoreUnavailable
from .client import Server, text

__all__ = ["ServerCheck"]

logger = logging.getLogger("livekit_resume")

_SETTINGS = ("maxmemory-policy", "maxmemory", "appendonly", "save")


class ServerCheck:
    """Judges each primary's eviction policy and persistence for a store with session
    TTL ``ttl``; ``strict`` refuses an evicting one. Each problem is warned once."""

    def __init__(self, server: Server, *, ttl: float | None, strict: bool) -> None:
        self._server = server
        self._ttl = ttl
        self._strict = strict
        self.checked = False  # read and judged once: `ensure` has nothing left to do
        self._warned: set[str] = set()
        # Whether a primary was seen evicting session keys: then a missing head may
        # have left remains anywhere, not only where the cheap checks look.
        self.evicting = False

    async def check(self) -> list[str]:
        """Read the settings and return what is unsafe (see `RedisStore.check`)."""
        return self._judge(await self._settings())

    async def ensure(self, op: str, key: str | None) -> None:
        """`check` before the store's first operation, ``op`` (of session ``key``).
        A server that does not answer fails ``op`` here, named as the operation would
        name it: the operation would wait out the same timeouts again. On a Cluster
        it is left to the operation (the node down may not be the session's). The check
        runs again next time."""
        if self.checked:
            return
        try:
            settings = await self._settings(op, key)
        except StoreUnavailable:
            if isinstance(self._server.client, RedisCluster):
                return
            raise
        self._judge(settings)

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

    def _judge(self, settings: list[tuple[str, dict[str, str]]]) -> list[str]:
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
        self.evicting = bool(evicting)
        for problem in problems:
            if problem not in self._warned:
                self._warned.add(problem)
                logger.warning("livekit-resume store: %s", problem)
        if evicting and self._strict:
            raise StoreUnavailable(
                f"refusing to use {self._server.where} (strict=True): " + "; ".join(evicting)
            )
        self.checked = True
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
                conf = await self._read_config(where, node)
                if conf:
                    out.append((where, conf))
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
