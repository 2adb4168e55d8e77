"""The redis-py client: opening one from a `RedisURL`, naming it in messages, and turning
its errors into ours."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ClusterError,
    InvalidResponse,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import ResumeError, SnapshotCorrupt, StoreUnavailable
from ..base import StoreClosed
from .url import RedisURL

try:
    from redis.driver_info import DriverInfo
except ImportError:  # an older redis-py, which reads its own version once, at import
    DriverInfo = None  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_SOCKET_TIMEOUT",
    "Client",
    "Server",
    "connect",
    "database",
    "decodes_responses",
    "text",
]

# Connections per store: a worker runs a few dozen sessions, each with at most one write
# and one read in flight; more would only queue inside Redis.
DEFAULT_POOL_SIZE = 50
# A commit is one small script; 5 s means the server is gone, not busy.
DEFAULT_SOCKET_TIMEOUT = 5.0
# Retries of a command that met a dropped connection or a timeout, with exponential
# backoff from RETRY_BASE up to RETRY_CAP seconds: rides out a restart or a failover
# of a few seconds, then gives up with StoreUnavailable.
DEFAULT_RETRIES = 3
RETRY_BASE = 0.05
RETRY_CAP = 2.0
# Connections a Cluster client may open per node beyond ``pool_size``: its commands are
# held to ``pool_size`` at a time (`_GatedCluster`), and a pub/sub subscription (the
# event stream, the command inbox) holds a node connection of its own for its lifetime.
CLUSTER_SUBSCRIBER_MARGIN = 4
# A Cluster node that did not answer a listing's reads (`Server.node_by_node`) is not
# asked again by the next one for this long: `ls` reads a page's heads, then their
# infos, and each read of a stopped node waits out the client's timeouts and retries
# (20 s at the defaults).
NODE_DOWN_FOR = 10.0

Client = Redis | RedisCluster


def text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


@functools.cache
def _driver_info() -> Any:
    """What the store's connections tell the server in ``CLIENT SETINFO`` (``CLIENT
    LIST`` shows ``lib-name=redis-py(livekit-resume_v…)``), made once: a redis-py with
    `DriverInfo` otherwise looks its version up in the installed packages' metadata for
    every connection it makes, 0.6 to 2 ms each (a new worker's first restore makes two)."""
    from ... import __version__

    if DriverInfo is None:
        return None
    return DriverInfo(lib_version=redis.__version__).add_upstream_driver(
        "livekit-resume", __version__
    )


def connect(
    settings: RedisURL,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    sentinel_password: str | None = None,
    **client_options: Any,
) -> Client:
    """A client for what the URL names (see `RedisStore.from_url` for the options)."""
    retry = Retry(ExponentialBackoff(cap=RETRY_CAP, base=RETRY_BASE), retries)
    common: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "max_connections": pool_size,
        "retry": retry,
    }
    if _driver_info() is not None and not {"driver_info", "lib_name", "lib_version"} & set(
        client_options
    ):
        common["driver_info"] = _driver_info()
    if settings.mode == "cluster":
        # Keep the URL's nodes as seeds: redis-py would otherwise replace them with the
        # nodes it discovers and, after two failovers, know no node that still answers.
        client_options.setdefault("dynamic_startup_nodes", False)
        common["max_connections"] = pool_size + CLUSTER_SUBSCRIBER_MARGIN
        return _GatedCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in settings.hosts],
            ssl=settings.tls,
            places=pool_size,
            wait=socket_timeout,
            **common,
            **client_options,
        )
    # A primary demoted to replica behind the same name answers READONLY: reconnect and
    # retry, the name may point at the new primary by then.
    common["retry_on_error"] = [ReadOnlyError]
    if settings.mode == "sentinel":
        timeouts: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        }
        if "driver_info" in common:
            timeouts["driver_info"] = common["driver_info"]
        # No retries of its own for the client that asks a Sentinel (redis-py's default
        # is 10, with backoff): the question goes on to the next Sentinel, and the data
        # connection's `retry` asks them all again. A hung Sentinel otherwise held each
        # command ~130 socket timeouts (10 minutes at the default 5 s), not ~4 as a hung
        # server does.
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
            list(settings.hosts),
            sentinel_kwargs={
                "password": sentinel_password,
                "retry": Retry(NoBackoff(), 0),
                **timeouts,
            },
            **timeouts,
        )
        if "connection_pool_class" not in client_options:
            # a burst beyond pool_size waits for a connection, as on a standalone server
            client_options["connection_pool_class"] = _BlockingSentinelPool
            client_options.setdefault("timeout", socket_timeout)
        primary: Client = sentinel.master_for(
            settings.service or "", db=settings.db, **common, **client_options
        )
        return primary
    host, port = settings.hosts[0]
    pool = BlockingConnectionPool(
        host=host,
        port=port,
        db=settings.db,
        timeout=socket_timeout,
        connection_class=SSLConnection if settings.tls else Connection,
        **common,
        **client_options,
    )
    return Redis.from_pool(pool)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (connections to the primary Sentinel names) that, like
    the standalone store's `BlockingConnectionPool`, waits up to its ``timeout`` for a
    free connection: the plain one raised "Too many connections" (`StoreUnavailable`)
    at once for the operation one past ``pool_size``."""


# Set while a task holds a place of a `_GatedCluster`: a command redis-py sends from
# inside another (a multi-slot command split per slot) must not wait for a second one.
_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("_HOLDING", default=False)


class _GatedCluster(RedisCluster):
    """A Cluster client whose commands and pipelines wait for one of ``places`` (the
    store's ``pool_size``), up to ``wait`` seconds, as the standalone store's blocking
    pool waits for a connection. redis-py's Cluster client holds at most
    ``max_connections`` per node and raised "Too many connections" at once for the
    command one past it: a burst of a worker's sessions (or `ls` of a page) on a healthy
    Cluster failed as `StoreUnavailable`. A command or a pipeline uses at most one
    connection per node, so no node is asked for more than ``places``."""

    def __init__(self, *args: Any, places: int, wait: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._places = asyncio.Semaphore(places)
        self._wait = wait

    async def _enter(self) -> contextvars.Token[bool] | None:
        """Take a place (None: this task holds one already)."""
        if _HOLDING.get():
            return None
        if not self._places.locked():
            await self._places.acquire()  # a free place: taken at once, no task for a wait
        else:
            try:
                await asyncio.wait_for(self._places.acquire(), self._wait)
            except TimeoutError:
                # as the standalone store's pool says it (a StoreUnavailable)
                raise RedisConnectionError("No connection available.") from None
        return _HOLDING.set(True)

    def _leave(self, token: contextvars.Token[bool] | None) -> None:
        if token is not None:
            _HOLDING.reset(token)
            self._places.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        token = await self._enter()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._leave(token)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def gated(*args: Any, **kwargs: Any) -> Any:
            token = await self._enter()
            try:
                return await execute(*args, **kwargs)
            finally:
                self._leave(token)

        # on the instance: the pipeline's class and constructor differ across redis-py
        pipe.execute = gated  # type: ignore[method-assign]
        return pipe


def describe_client(client: Client) -> str:
    """Where a client given by the caller points, for messages."""
    if isinstance(client, RedisCluster):
        return "cluster " + ",".join(client.nodes_manager.startup_nodes)
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service:
        return f"sentinel service {service}"
    kw = pool.connection_kwargs
    return f"redis {kw.get('host', '?')}:{kw.get('port', '?')}/{database(client)}"


def database(client: Client) -> int:
    """The database number the client selects (a Cluster's is 0)."""
    pool = getattr(client, "connection_pool", None)
    return int(getattr(pool, "connection_kwargs", {}).get("db") or 0)


def decodes_responses(client: Any) -> bool:
    try:
        if isinstance(client, RedisCluster):
            return bool(client.get_encoder().decode_responses)
        return bool(client.connection_pool.connection_kwargs.get("decode_responses"))
    except AttributeError:
        return False


class Server:
    """The client and how messages name it (`RedisURL.describe`, or the client's own
    address), shared by the parts of one store."""

    def __init__(self, client: Client, where: str | None = None) -> None:
        self.client = client
        self.where = where if where is not None else describe_client(client)
        # set by the store's aclose: redis-py would connect again on the next command,
        # holding a connection (and granting leases) nobody closes or renews
        self.closed = False
        # Cluster nodes whose listing read failed: when, and the error (`node_by_node`)
        self._down: dict[str, tuple[float, Exception]] = {}

    async def node_by_node(
        self, names: Sequence[str], read: Callable[[list[int]], Awaitable[list[Any]]]
    ) -> list[Any]:
        """One reply per key of ``names``: ``read`` is given the indexes of the names of
        one Cluster node (all of them on a standalone server) and answers for each, the
        nodes read at once. A pipeline over a Cluster fails whole when one of its nodes
        does not answer: a node's `StoreUnavailable` stands in for each of its replies,
        so that one node down hides nothing of the others. A node that failed so within
        `NODE_DOWN_FOR` seconds is not asked: its error stands in at once."""
        if not isinstance(self.client, RedisCluster):
            return await read(list(range(len(names))))
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(self.node_name(name), []).append(i)
        now = time.monotonic()

        async def ask(node: str, at: list[int]) -> list[Any]:
            down = self._down.get(node)
            if down is not None and now - down[0] < NODE_DOWN_FOR:
                return [down[1]] * len(at)
            try:
                got = await read(at)
            except StoreUnavailable as e:
                self._down[node] = (time.monotonic(), e)
                raise
            # a pipeline read without raising puts the node's timeout in every place
            if got and all(isinstance(r, (RedisConnectionError, RedisTimeoutError)) for r in got):
                self._down[node] = (time.monotonic(), got[0])
            else:
                self._down.pop(node, None)
            return got

        got = await asyncio.gather(
            *(ask(node, at) for node, at in groups.items()), return_exceptions=True
        )
        replies: list[Any] = [None] * len(names)
        for at, answer in zip(groups.values(), got, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, StoreUnavailable):
                raise answer
            for n, i in enumerate(at):
                replies[i] = answer[n] if isinstance(answer, list) else answer
        return replies

    def node_name(self, key: str) -> str:
        """The name of the Cluster node serving ``key`` ("" on one server)."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return ""
        node = client.get_node_from_key(key)
        return node.name if node is not None else ""

    @contextmanager
    def errors(self, op: str, key: str | None) -> Iterator[None]:
        """Turn redis-py's errors into ours, naming the server and the operation."""
        what = f"{op} of session {key!r}" if key is not None else op
        if self.closed:
            raise StoreClosed(f"{self.where}: cannot {what}: the store is closed; open a new one")
        cancels = _cancels()
        try:
            yield
            if _cancels() > cancels:
                # redis-py bounds each socket write with asyncio.wait_for (the store sets a
                # socket timeout), which on Python 3.10 and 3.11 returns the write's result
                # when a cancellation arrives as it ends: the caller (a job shutting down,
                # an asyncio.timeout) would go on as if never cancelled
                raise asyncio.CancelledError
        except ResumeError:
            raise
        except MasterNotFoundError as exc:
            # redis-py's message repeats the whole client of every Sentinel it asked
            # (a kilobyte each) and none of their reasons
            unreachable = " : " in str(exc)
            why = (
                "no Sentinel answered (down, unreachable, or refusing this client: its password, "
                "RESUME_SENTINEL_PASSWORD or sentinel_password=)"
                if unreachable
                else "the Sentinels answered but name no live primary for the service "
                "(a wrong service name, or the primary is down and not failed over yet)"
            )
            raise StoreUnavailable(
                f"{self.where} is unavailable for {what}: {why}; check that the Sentinels "
                "are up and the store URL's hosts and service name are right (retried with "
                "backoff before giving up)"
            ) from exc
        except (
            TimeoutError,
            RedisConnectionError,
            RedisTimeoutError,
            TryAgainError,
            ReadOnlyError,
            RedisClusterException,
            ClusterError,  # "TTL exhausted": redirections that never settled (a reshard)
            OSError,
        ) as exc:
            raise StoreUnavailable(
                f"{self.where} is unavailable for {what}: {exc or type(exc).__name__}; "
                f"{_unavailable_hint(exc)} (retried with backoff before giving up)"
            ) from exc
        except InvalidResponse as exc:
            # Not Redis's protocol: another service at that address (an HTTP port, a
            # TLS port spoken to in clear), or a proxy in between answering garbage.
            raise StoreUnavailable(
                f"{self.where} did not answer {what} in the Redis protocol ({exc}); is "
                "the store URL's host and port a Redis server (rediss:// for TLS)?"
            ) from exc
        except OutOfMemoryError as exc:
            # Nothing was written (scripts check before they write) and the data is
            # healthy: the server is full. Never advise deleting the session here.
            raise StoreUnavailable(
                f"{self.where} is out of memory and refused {what} ({exc}); nothing was "
                "written. Raise maxmemory, or free memory; keep maxmemory-policy "
                "noeviction (or volatile-* with sessions without TTL) so that no session "
                "key is evicted"
            ) from exc
        except ResponseError as exc:
            message = str(exc)
            # Only WRONGTYPE means one of our names holds foreign data (our scripts'
            # own findings come back as {'corrupt', …} replies, see `Scripts.run`). Any
            # other error (BUSY, NOPERM, MASTERDOWN, a script error) is the server
            # refusing work now, with the data untouched: deleting the session would be
            # wrong.
            if message.startswith("WRONGTYPE"):
                raise SnapshotCorrupt(
                    f"{what} on {self.where} met foreign data at the session's keys "
                    f"({message}); delete the session or move the other data away"
                ) from exc
            if message.startswith("NOPERM") or "can't run this command" in message:
                # inside a script, Redis 7.0 words a missing permission without NOPERM
                message += (
                    " (NOPERM: the Redis user lacks a command or key the store needs; "
                    "grant it the whole ACL line of docs/security.md, +get and +set too)"
                )
            raise StoreUnavailable(f"{self.where} refused {what}: {message}") from exc


def _unavailable_hint(exc: BaseException) -> str:
    """What to check for a server that could not serve a call: where the server said
    why, that (it is up), else whether it is up at all."""
    text = str(exc)
    if isinstance(exc, ReadOnlyError):
        return "the server is a read-only replica: point the store URL at the primary"
    if "max number of clients" in text:
        return "the server is at its maxclients: raise it, or lower max_connections"
    if "closed by server" in text:
        return (
            "the server closed the connection: restarted, killed (CLIENT KILL), idle past "
            "its timeout, or a reply over its client-output-buffer-limit for normal "
            "clients (a long history: raise it, 0 0 0 is Redis's default)"
        )
    return "check that the server is up and the store URL is right"


def _cancels() -> int:
    """Cancellations requested of the current task and not taken back."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0
