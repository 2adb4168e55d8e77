"""Redis store: the workers of one deployment share sessions through one Redis.

Plain Redis 6+ or Valkey, standalone, behind Sentinel, or a Redis Cluster; no modules.
Every operation on a session is one Lua script (``stores/lua/``) run on the server, so
it is atomic: a commit checks the fencing epoch and the expected base version, appends
only its new records, writes the version record, moves the head, trims old versions and
refreshes the session's TTL, all or nothing.

Key layout, for namespace ``ns`` and session key ``k`` (``{``, ``}`` and ``%`` in ``k``
are percent-escaped so the hash tag is always exactly the key):

- ``ns:{k}:head``      hash: fencing epoch, lease (owner, expires), latest and oldest
  retained version, current log generation, last write time
- ``ns:{k}:v:<n>``     hash: version ``n`` (epoch, created, head bytes, info, log
  generation and length it reads, bytes written, commit id)
- ``ns:{k}:log:<g>``   list: msgpack records ``[stream, id, after, data]`` of generation ``g``
- ``ns:sessions``      sorted set: the namespace's session keys, for `keys()`
- ``ns:events``        pub/sub channel of state changes (JSON objects)

All keys of one session share the hash tag ``{k}``, hence one Cluster slot: the scripts
declare the head key and derive the others from its prefix, which Redis Cluster accepts
for keys of the declared slot (it refuses keys of another slot, checked by the tests on
a real cluster). The namespace index is a key of its own (another slot on a Cluster),
so it is written by separate commands, never inside a session script; see
`RedisStore.keys` for how it stays a superset of the live sessions.

Scripts (each file runs behind ``clock.lua`` and ``session.lua``, the shared preludes;
``index`` behind ``clock.lua`` only, ``publish`` alone):
``acquire``, ``renew``, ``release``, ``commit``, ``compact``, ``load``, ``versions``,
``info``, ``delete``, ``index`` and ``publish``. redis-py's ``register_script`` calls
them by SHA and reloads them on NOSCRIPT. Times come from the server's ``TIME`` inside
the scripts.

Compaction: after a commit whose log outgrew `needs_compaction`, the client reads the
version's records, folds them with `fold_records` and hands the result to ``compact``,
which writes it as the next log generation only if the head is still at that commit
(same version, generation and commit id); otherwise it does nothing and a later commit
tries again. Reads (``load``) are one script, so a compaction never tears them.

Faults, and what the store does about them (tests: ``tests/test_redis_faults.py``):

- **A stall or a lost reply.** A commit carries its id (`Commit.commit_id`, or a random
  one) into its version record. A server that stalls past ``socket_timeout`` may still
  run the commit later: the bytes of the first attempt, and of redis-py's retries, wait
  in its socket buffers. The caller gets `StoreUnavailable`; sending the *same* commit
  again returns the version that landed, whichever of the copies ran first, and writes
  nothing twice. A different commit on the old base is refused.
- **A restart without data** (no persistence, a failover to an empty replica): commit
  and renew raise `LeaseLost` with ``vanished=True`` (the head is gone, nobody holds
  it; acquire again and write the whole snapshot). If another worker acquired first,
  it is a takeover: ``vanished=False`` with the new epoch.
- **Server settings.** Before its first operation the store reads each primary's
  ``maxmemory-policy`` and persistence (`RedisStore.check`). ``allkeys-*`` (and
  ``volatile-*`` when sessions have a ``ttl``) can evict session keys: warned once,
  refused with `StoreUnavailable` when ``strict=True``. No persistence at all is
  warned once. A server hiding CONFIG (renamed, ACL) is used unchecked.
  Required for a deployment: ``maxmemory-policy noeviction`` (or ``volatile-*`` with
  ``ttl=None``), ``appendonly yes`` with ``appendfsync everysec`` or ``always``, and
  replicas with ``wait_replicas`` where a failover must not lose acknowledged commits.
- **Out of memory** (``noeviction`` at ``maxmemory``): `StoreUnavailable` saying so,
  nothing written. Only WRONGTYPE and the scripts' own ``corrupt`` findings are
  `SnapshotCorrupt`; no other server error is taken for damaged data.
- **A lost head** (evicted, or deleted by hand, while ``v:*`` / ``log:*`` keys remain):
  never read as "no snapshot", which would start the conversation afresh. When the
  head is missing and there is reason to look (the session's first log or version key
  exists, or the namespace index lists the key), the store SCANs the session's prefix
  (on a Cluster, on the node of its slot; O(keys in the database), never on a commit).
  The rule: ``load`` and ``acquire`` raise `SnapshotCorrupt` naming the head and what
  remains, and ``acquire`` creates nothing over the remains, until the session is
  deleted (``delete`` / ``livekit-resume rm``), which removes the remains too; the
  versions cannot be read without the head, so no automatic repair is attempted. If
  the index was evicted as well, remains that are not the session's first keys go
  unnoticed until a commit would collide with one: a commit checks that the log it
  appends to holds exactly what its latest version read, so it never adopts a former
  life's records (`SnapshotCorrupt` naming the key). A missing version or log under a
  present head is `SnapshotCorrupt` naming the key.
- **Replication.** With ``wait_replicas=n`` a commit is followed, on the same
  connection (one pipeline, on the node of the session's slot on a Cluster), by
  ``WAIT n wait_timeout``: when it returns, the commit is on ``n`` replicas. Fewer is
  logged as a warning and counted in ``under_replicated``, not raised: the commit is
  applied on the primary and only a failover in that window can lose it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import ResumeError, SnapshotCorrupt, StoreUnavailable
from .base import (
    DEFAULT_KEEP,
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    Record,
    SessionInfo,
    SnapshotInfo,
    Stored,
    busy_error,
    fold_records,
    head_moved_error,
    lease_lost_error,
    needs_compaction,
    not_found_error,
    not_retained_error,
    records_from_streams,
    validate_key,
    validate_lease_ttl,
    validate_ttl,
)

__all__ = ["EventStream", "RedisStore", "RedisURL"]

logger = logging.getLogger("livekit_resume")

DEFAULT_NAMESPACE = "lkresume"
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
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
# A session with a TTL is re-recorded in the namespace index at least every quarter TTL
# (INDEX_REFRESH); members not recorded for two TTLs (INDEX_HORIZON) are certainly dead
# and are collected. The gap between the two absorbs clock skew between Cluster nodes.
INDEX_REFRESH = 0.25
INDEX_HORIZON = 2.0
# Sessions this store remembers having indexed; past this the memory starts over (which
# only costs a few extra index writes).
INDEX_CACHE_MAX = 10_000
# keys() checks the index's members in pipelines of this many commands.
KEYS_BATCH = 1000
# SCAN COUNT when looking for the remains of a session: large enough that a database of
# a million keys takes a thousand round trips, small enough that each stays short.
SCAN_COUNT = 1000
# Remains named in an error message; the count says how many more there are.
REMAINS_SHOWN = 5
# How long a commit waits for replicas to acknowledge it (WAIT's timeout, ms) when
# wait_replicas is set: a healthy replica on the same network answers in about a
# millisecond; a tenth of a second bounds what a lagging one adds to every commit.
DEFAULT_WAIT_TIMEOUT_MS = 100

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
_STANDALONE_SCRIPTS = {"index": ("clock",), "publish": ()}

_Client = Redis | RedisCluster


@cache
def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


def _script_source(name: str) -> str:
    """Session scripts run behind the clock and session preludes; the index script
    behind the clock only, publish alone."""
    preludes = _STANDALONE_SCRIPTS.get(name, ("clock", "session"))
    return "\n".join(_lua(part) for part in (*preludes, name))


def _tag(key: str) -> str:
    """The key as a hash tag body: no brace may end (or empty) the tag early."""
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _fmt_time(t: float) -> str:
    return repr(float(t))


# -- record and info packing ---------------------------------------------------------


def _pack_record(rec: Record) -> bytes:
    packed: bytes = msgpack.packb([rec.stream, rec.id, rec.after, rec.data], use_bin_type=True)
    return packed


def _unpack(raw: bytes, what: str, key: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SnapshotCorrupt(
            f"session {key!r}: {what} is not valid msgpack ({exc}); foreign data or a "
            "damaged key: delete the session or restore it from a backup"
        ) from None


def _unpack_record(raw: bytes, key: str) -> Record:
    v = _unpack(raw, "a log record", key)
    if (
        isinstance(v, list)
        and len(v) == 4
        and isinstance(v[0], str)
        and isinstance(v[1], str)
        and (v[2] is None or isinstance(v[2], str))
        and (v[3] is None or isinstance(v[3], bytes))
    ):
        return Record(v[0], v[1], v[3], v[2])
    raise SnapshotCorrupt(
        f"session {key!r}: a log record is not [stream, id, after, data]; foreign data "
        "or a damaged key: delete the session or restore it from a backup"
    )


def _unpack_info(raw: bytes, key: str) -> dict[str, str | int | float | bool | None]:
    v = _unpack(raw, "a version's info", key)
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return v
    raise SnapshotCorrupt(f"session {key!r}: a version's info is not a mapping")


def _number(raw: Any, what: str, key: str) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise SnapshotCorrupt(f"session {key!r}: {what} is not a number ({raw!r})") from None


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


# -- URLs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisURL:
    """What a Redis store URL says.

    - ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS)
    - ``redis+sentinel://[password@]host[:port][,host[:port]…]/service_name[/db]``
    - ``redis+cluster://[password@]host[:port][,host[:port]…]``

    A lone ``secret@`` is taken as a password (Redis' ``AUTH secret``). Percent-escapes
    in the user and password are decoded. Extra client settings (certificates, …) are
    keyword options of `RedisStore.from_url`, not query parameters.
    """

    mode: Literal["standalone", "sentinel", "cluster"]
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    service: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        modes: dict[str, Literal["standalone", "sentinel", "cluster"]] = {
            "redis": "standalone",
            "rediss": "standalone",
            "redis+sentinel": "sentinel",
            "redis+cluster": "cluster",
        }
        mode = modes.get(scheme)
        if mode is None:
            raise ValueError(f"{url!r} is not a Redis URL (redis://, rediss://, …)")
        if parts.query or parts.fragment:
            raise ValueError(
                f"Redis URL {_redact(url)!r} has a query or fragment: pass client settings "
                "as keyword options of open_store() instead"
            )
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        username: str | None = None
        password: str | None = None
        if userinfo:
            user, colon, secret = userinfo.partition(":")
            if colon:
                username, password = unquote(user) or None, unquote(secret) or None
            else:
                password = unquote(user)
        default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
        hosts = tuple(_host_port(h, default_port, url) for h in hostlist.split(","))
        if mode == "standalone" and len(hosts) != 1:
            raise ValueError(f"Redis URL {_redact(url)!r} names several hosts: use one")
        path = [p for p in parts.path.split("/") if p]
        db, service = 0, None
        if mode == "sentinel":
            if not path:
                raise ValueError(
                    f"Sentinel URL {_redact(url)!r} names no service: "
                    "redis+sentinel://host:26379/mymaster[/db]"
                )
            service, path = unquote(path[0]), path[1:]
        if len(path) > 1:
            raise ValueError(f"Redis URL {_redact(url)!r} has a path beyond the database")
        if path:
            try:
                db = int(path[0])
            except ValueError:
                raise ValueError(
                    f"Redis URL {_redact(url)!r}: database {path[0]!r} is not a number"
                ) from None
        if mode == "cluster" and db != 0:
            raise ValueError(f"Redis Cluster has only database 0 ({_redact(url)!r})")
        return cls(mode, hosts, db, username, password, scheme == "rediss", service)

    def describe(self) -> str:
        """Where the store lives, for messages (never the password)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        if self.mode == "sentinel":
            return f"sentinel {hosts} service {self.service}/{self.db}"
        if self.mode == "cluster":
            return f"cluster {hosts}"
        return f"{'rediss' if self.tls else 'redis'} {hosts}/{self.db}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)


def _host_port(text: str, default: int, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"Redis URL {_redact(url)!r} has an empty host")
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise ValueError(
            f"Redis URL {_redact(url)!r}: port {port_text!r} is not a number"
        ) from None
    return host, port


def _describe_client(client: _Client) -> str:
    if isinstance(client, RedisCluster):
        return "cluster " + ",".join(client.nodes_manager.startup_nodes)
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service:
        return f"sentinel service {service}"
    kw = pool.connection_kwargs
    return f"redis {kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


# -- events --------------------------------------------------------------------------


class EventStream:
    """State changes of one namespace, each a dict with at least ``event`` and ``key``.

    ``async with store.subscribe() as events:`` returns once the subscription is active
    (nothing published after that is missed), then ``async for event in events``.
    Iterating without ``async with`` subscribes on the first ``__anext__``. A lost
    connection ends the iteration with `StoreUnavailable`: subscribe again. Delivery is
    Redis pub/sub: at most once, to subscribers connected at the time.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pubsub: PubSub | None = None

    async def _start(self) -> PubSub:
        if self._pubsub is None:
            with self._store._errors("subscribe", None):
                client = self._store._client
                if isinstance(client, RedisCluster):
                    await client.initialize()  # the pub/sub node is picked from the slot map
                pubsub: PubSub = client.pubsub()
                await pubsub.subscribe(self._store._channel)
                # Wait for the server's confirmation: from here no event is missed.
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "subscribe":
                        break
            self._pubsub = pubsub
        return self._pubsub

    async def __aenter__(self) -> EventStream:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        pubsub = await self._start()
        while True:
            with self._store._errors("subscribe", None):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is None or msg.get("type") != "message":
                continue
            try:
                event = json.loads(msg["data"])
            except ValueError:
                logger.warning(
                    "ignoring a non-JSON message on %s", self._store._channel, exc_info=True
                )
                continue
            if isinstance(event, dict):
                return event

    async def aclose(self) -> None:
        """Unsubscribe and close the connection."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.unsubscribe()
            except (RedisError, OSError):
                logger.debug("unsubscribe failed; closing the connection anyway", exc_info=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- the store -----------------------------------------------------------------------


class RedisStore:
    """A `Store` on Redis: standalone, Sentinel or Cluster, through ``redis.asyncio``.

    ``client`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` with
    ``decode_responses=False``; the store owns it and closes it in `aclose`. Most code
    opens one with `from_url` (or ``open_store("redis://…")``). ``namespace`` prefixes
    every key (one per tenant or deployment), ``keep`` versions stay loadable, ``ttl``
    (seconds without writes) expires whole sessions. Times come from the server's clock,
    so workers with skewed clocks agree on lease expiry; ``clock`` replaces it in tests.
    ``strict`` refuses a server whose eviction policy can remove session keys (see
    `check`); ``wait_replicas`` makes each commit wait up to ``wait_timeout`` ms for that
    many replicas to acknowledge it (see the module docstring).
    """

    def __init__(
        self,
        client: _Client,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        strict: bool = False,
        wait_replicas: int = 0,
        wait_timeout: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if not namespace or any(c in namespace for c in "{}") or not namespace.isprintable():
            raise ValueError(
                f"namespace {namespace!r} must be non-empty, printable and without braces "
                "(braces would change the hash tag of every key)"
            )
        if _decodes_responses(client):
            raise ValueError("the Redis client must use decode_responses=False: heads are bytes")
        if wait_replicas < 0 or wait_timeout < 0:
            raise ValueError(
                f"wait_replicas ({wait_replicas!r}) and wait_timeout ({wait_timeout!r} ms) "
                "must not be negative"
            )
        self._client = client
        self._namespace = namespace
        self._keep = keep
        self._ttl = validate_ttl(ttl)
        self._clock = clock
        self._elapsed = clock or time.monotonic
        self._where = _describe_client(client)
        self._index_key = f"{namespace}:sessions"
        self._channel = f"{namespace}:events"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_script_source(name))
            for name in (*_SESSION_SCRIPTS, *_STANDALONE_SCRIPTS)
        }
        self._indexed: dict[str, float] = {}
        self._strict = strict
        self._checked = False
        self._warned: set[str] = set()
        self._wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout
        self.under_replicated = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        strict: bool = False,
        wait_replicas: int = 0,
        wait_timeout: int = DEFAULT_WAIT_TIMEOUT_MS,
        pool_size: int = DEFAULT_POOL_SIZE,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        sentinel_password: str | None = None,
        **client_options: Any,
    ) -> RedisStore:
        """Open a store from a URL (see `RedisURL`). ``pool_size`` caps the connections
        (per node on a Cluster); a command meeting a dropped connection or a timeout is
        retried ``retries`` times with exponential backoff (redis-py's ``Retry``).
        The URL's password authenticates to Redis; ``sentinel_password`` to the
        Sentinels, when they require one. ``client_options`` go to the redis-py client
        (``ssl_ca_certs=…``, ``client_name=…``)."""
        settings = RedisURL.parse(url)
        retry = Retry(ExponentialBackoff(cap=RETRY_CAP, base=RETRY_BASE), retries)
        auth: dict[str, Any] = {"username": settings.username, "password": settings.password}
        timeouts: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        }
        client: _Client
        if settings.mode == "cluster":
            client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in settings.hosts],
                ssl=settings.tls,
                max_connections=pool_size,
                retry=retry,
                **auth,
                **timeouts,
                **client_options,
            )
        elif settings.mode == "sentinel":
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(settings.hosts),
                sentinel_kwargs={"password": sentinel_password, **timeouts},
                **timeouts,
            )
            client = sentinel.master_for(
                settings.service or "",
                db=settings.db,
                max_connections=pool_size,
                retry=retry,
                retry_on_error=[ReadOnlyError],
                **auth,
                **timeouts,
                **client_options,
            )
        else:
            host, port = settings.hosts[0]
            pool = BlockingConnectionPool(
                host=host,
                port=port,
                db=settings.db,
                max_connections=pool_size,
                timeout=socket_timeout,
                connection_class=SSLConnection if settings.tls else Connection,
                retry=retry,
                # A primary demoted to replica behind the same name answers READONLY:
                # reconnect and retry, the name may point at the new primary by then.
                retry_on_error=[ReadOnlyError],
                **auth,
                **timeouts,
                **client_options,
            )
            client = Redis.from_pool(pool)
        store = cls(
            client,
            namespace=namespace,
            keep=keep,
            ttl=ttl,
            clock=clock,
            strict=strict,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
        )
        store._where = settings.describe()
        return store

    # -- plumbing --------------------------------------------------------------------

    def _head_key(self, key: str) -> str:
        return f"{self._namespace}:{{{_tag(key)}}}:head"

    def _log_key(self, key: str, gen: int) -> str:
        return f"{self._namespace}:{{{_tag(key)}}}:log:{gen}"

    def _now_arg(self) -> str:
        return "" if self._clock is None else _fmt_time(self._clock())

    @contextmanager
    def _errors(self, op: str, key: str | None) -> Iterator[None]:
        """Turn redis-py's errors into ours, naming the server and the operation."""
        what = f"{op} of session {key!r}" if key is not None else op
        try:
            yield
        except ResumeError:
            raise
        except (
            RedisConnectionError,
            RedisTimeoutError,
            TryAgainError,
            ReadOnlyError,
            RedisClusterException,
            asyncio.TimeoutError,
            OSError,
        ) as exc:
            raise StoreUnavailable(
                f"{self._where} is unavailable for {what}: {exc or type(exc).__name__}; "
                "check that the server is up and the store URL is right (retried with "
                "backoff before giving up)"
            ) from exc
        except OutOfMemoryError as exc:
            # Nothing was written (scripts check before they write) and the data is
            # healthy: the server is full. Never advise deleting the session here.
            raise StoreUnavailable(
                f"{self._where} is out of memory and refused {what} ({exc}); nothing was "
                "written. Raise maxmemory, or free memory; keep maxmemory-policy "
                "noeviction (or volatile-* with sessions without TTL) so that no session "
                "key is evicted"
            ) from exc
        except ResponseError as exc:
            text = str(exc)
            # Only WRONGTYPE means one of our names holds foreign data (our scripts'
            # own findings come back as {'corrupt', …} replies, see `_run`). Any other
            # error (BUSY, NOPERM, MASTERDOWN, a script error) is the server refusing
            # work now, with the data untouched: deleting the session would be wrong.
            if text.startswith("WRONGTYPE"):
                raise SnapshotCorrupt(
                    f"{what} on {self._where} met foreign data at the session's keys "
                    f"({text}); delete the session or move the other data away"
                ) from exc
            raise StoreUnavailable(f"{self._where} refused {what}: {text}") from exc

    async def _run(self, script: str, key: str, args: Sequence[str | bytes | int]) -> list[Any]:
        await self._ensure_checked()
        ttl = "" if self._ttl is None else _fmt_time(self._ttl)
        ttl_ms = "" if self._ttl is None else str(max(1, math.ceil(self._ttl * 1000)))
        full = [self._now_arg(), ttl, ttl_ms, *args]
        with self._errors(script, key):
            if script == "commit" and self._wait_replicas:
                reply = await self._run_and_wait(script, key, full)
            else:
                reply = await self._scripts[script](keys=[self._head_key(key)], args=full)
        if not isinstance(reply, list) or not reply:
            raise SnapshotCorrupt(f"{script} of session {key!r} got a malformed reply {reply!r}")
        if reply[0] == b"corrupt":
            raise SnapshotCorrupt(
                f"session {key!r} on {self._where}: {_text(reply[1])}; a key evicted by "
                "the server (maxmemory-policy), removed or written by hand, or foreign "
                "data: delete the session or restore it from a backup"
            )
        return reply

    async def _run_and_wait(
        self, script: str, key: str, args: Sequence[str | bytes | int]
    ) -> Any:
        """Run a script, then WAIT on the same connection (WAIT counts the replicas
        that acknowledged this connection's writes): one pipeline, sent to the node of
        the session's slot on a Cluster. Fewer replicas than asked is logged and
        counted in `under_replicated`, not raised: the commit stands on the primary."""
        head = self._head_key(key)
        code = self._scripts[script]
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            # As a raw command: a Cluster pipeline refuses its evalsha() method, but
            # routes a raw EVALSHA by its key.
            pipe.execute_command("EVALSHA", code.sha, 1, head, *args)
            wait: tuple[Any, ...] = ("WAIT", self._wait_replicas, self._wait_timeout)
            if isinstance(self._client, RedisCluster):
                await self._client.initialize()
                node = self._client.get_node_from_key(head)
                pipe.execute_command(*wait, target_nodes=node)
            else:
                pipe.execute_command(*wait)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:
                # Flushed or never loaded there: load it and send the pair again (the
                # script did not run, nothing was written). A Cluster loads it on
                # every primary.
                await self._client.script_load(code.script)
                continue
            break
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            # WAIT refused (a replica itself, or ACL): the commit is applied; say so.
            logger.warning(
                "commit of session %r applied, but WAIT failed: %s",
                key,
                acked,
                extra={"key": key},
            )
            self.under_replicated += 1
        elif (
            isinstance(reply, list)
            and reply[:1] == [b"ok"]
            and int(acked) < self._wait_replicas
        ):
            self.under_replicated += 1
            logger.warning(
                "commit of session %r (version %s) reached %d of %d replicas within "
                "%d ms; it is applied on the primary and may be lost if it fails over "
                "now",
                key,
                reply[1],
                int(acked),
                self._wait_replicas,
                self._wait_timeout,
                extra={"key": key, "version": reply[1]},
            )
        return reply

    # -- server settings -------------------------------------------------------------

    async def check(self) -> list[str]:
        """Read the server's eviction policy and persistence; return what is unsafe.

        Runs once by itself on the store's first operation. ``maxmemory-policy``
        ``allkeys-*`` evicts session keys under memory pressure (a head lost, versions
        gone), and so does ``volatile-*`` when sessions have a ``ttl``: each problem is
        logged as a warning once, and with ``strict=True`` refused with
        `StoreUnavailable` (checked again on the next operation, so fixing the server's
        setting is enough). No persistence (``appendonly no`` and ``save ""``) is
        warned about: a restart loses every session. A server that hides CONFIG
        (renamed, disabled, or denied by ACL) is not checked (logged at debug level).
        On a Cluster every primary is checked.
        """
        return self._judge(await self._server_settings())

    async def _ensure_checked(self) -> None:
        """`check` before the store's first operation. An unreachable server is left
        to the operation itself to report (naming what it was doing); the check runs
        again next time."""
        if self._checked:
            return
        try:
            settings = await self._server_settings()
        except StoreUnavailable:
            return
        self._judge(settings)

    def _judge(self, settings: list[tuple[str, dict[str, str]]]) -> list[str]:
        problems: list[str] = []
        evicting: list[str] = []
        for where, conf in settings:
            policy = conf.get("maxmemory-policy", "")
            if policy.startswith("allkeys-") or (
                policy.startswith("volatile-") and self._ttl is not None
            ):
                why = (
                    "evicts any key"
                    if policy.startswith("allkeys-")
                    else "evicts keys with a TTL, and sessions have one (ttl="
                    f"{self._ttl:g} s)"
                )
                evicting.append(
                    f"{where} has maxmemory-policy {policy} (maxmemory "
                    f"{conf.get('maxmemory', '?')}), which {why}: under memory pressure a "
                    "session loses its head or versions. Set maxmemory-policy noeviction "
                    "(or volatile-* with sessions without ttl)"
                )
            if conf.get("appendonly") == "no" and conf.get("save") == "":
                problems.append(
                    f"{where} persists nothing (appendonly no, save \"\"): a restart "
                    "loses every session and its lease. Set appendonly yes with "
                    "appendfsync everysec (or always)"
                )
        problems = evicting + problems
        for problem in problems:
            if problem not in self._warned:
                self._warned.add(problem)
                logger.warning("livekit-resume store: %s", problem)
        if evicting and self._strict:
            raise StoreUnavailable(
                f"refusing to use {self._where} (strict=True): " + "; ".join(evicting)
            )
        self._checked = True
        return problems

    async def _server_settings(self) -> list[tuple[str, dict[str, str]]]:
        """Each primary's name and its eviction and persistence settings (empty for
        a server that does not let us read its CONFIG)."""
        client = self._client
        out: list[tuple[str, dict[str, str]]] = []
        with self._errors("check of the server's settings", None):
            if isinstance(client, RedisCluster):
                await client.initialize()
                targets: list[tuple[str, Any]] = [
                    (f"cluster node {n.name}", n) for n in client.get_primaries()
                ]
            else:
                targets = [(self._where, None)]
            for where, node in targets:
                conf: dict[str, str] = {}
                for name in ("maxmemory-policy", "maxmemory", "appendonly", "save"):
                    try:
                        if node is None:
                            got = await client.config_get(name)
                        else:
                            got = await client.config_get(name, target_nodes=node)
                    except ResponseError as exc:
                        # CONFIG renamed or disabled, or denied by an ACL: managed
                        # services often hide it. Not a reason to refuse the store.
                        logger.debug(
                            "cannot read %s of %s (%s); not checking it", name, where, exc
                        )
                        continue
                    items = cast("dict[bytes | str, bytes | str]", got).items()
                    conf.update({_text(k): _text(v) for k, v in items})
                if conf:
                    out.append((where, conf))
        return out

    async def _index(self, key: str, op: str) -> bool:
        """Record the key in the namespace index (and collect long-dead members);
        whether it was listed already."""
        await self._ensure_checked()  # before the first write: strict=True writes nothing
        horizon = "" if self._ttl is None else _fmt_time(INDEX_HORIZON * self._ttl)
        forever = "1" if self._ttl is None else "0"
        with self._errors(f"{op} (namespace index)", key):
            reply = await self._scripts["index"](
                keys=[self._index_key], args=[self._now_arg(), horizon, key, forever]
            )
        if len(self._indexed) >= INDEX_CACHE_MAX:
            self._indexed.clear()
        self._indexed[key] = self._elapsed()
        return isinstance(reply, list) and len(reply) > 1 and int(reply[1]) == 1

    async def _remains(self, key: str) -> list[str]:
        """Every key under the session's prefix but its head, found by SCAN (on a
        Cluster, of the node owning the session's slot). O(keys in the database): only
        called when a head is missing and there is reason to look (see the module
        docstring), never on a commit."""
        head = self._head_key(key)
        pattern = _glob_escape(head[: -len("head")]) + "*"
        found: list[str] = []
        with self._errors("scan for remains", key):
            client = self._client
            if isinstance(client, RedisCluster):
                await client.initialize()
                node = client.get_node_from_key(head)
                cursor = 0
                while True:
                    # A Cluster answers a node's SCAN as ({node name: cursor}, keys).
                    cursors, batch = cast(
                        "tuple[dict[str, int], list[bytes]]",
                        await client.scan(
                            cursor, match=pattern, count=SCAN_COUNT, target_nodes=node
                        ),
                    )
                    found += [_text(k) for k in batch]
                    cursor = int(next(iter(cursors.values()))) if cursors else 0
                    if cursor == 0:
                        break
            else:
                found = [_text(k) async for k in client.scan_iter(match=pattern, count=SCAN_COUNT)]
        return sorted(set(found) - {head})

    def _headless_error(self, key: str, remains: Sequence[str]) -> SnapshotCorrupt:
        shown = ", ".join(remains[:REMAINS_SHOWN]) + (", …" if len(remains) > REMAINS_SHOWN else "")
        return SnapshotCorrupt(
            f"session {key!r} on {self._where} lost its head key {self._head_key(key)} but "
            f"{len(remains)} of its keys remain ({shown}): evicted by the server "
            "(maxmemory-policy allkeys-*, or volatile-* with a session ttl) or deleted by "
            "hand. Its versions cannot be read without the head, and it is not started "
            "afresh over them: delete the session (`livekit-resume rm KEY` or "
            "store.delete) to start it again, and set maxmemory-policy noeviction"
        )

    async def _keep_indexed(self, key: str, op: str) -> None:
        """Before a write that refreshes a TTL: re-record the key if its entry is aging."""
        if self._ttl is None:
            return
        last = self._indexed.get(key)
        if last is None or self._elapsed() - last > INDEX_REFRESH * self._ttl:
            await self._index(key, op)

    # -- leases ----------------------------------------------------------------------

    async def acquire(
        self, key: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL, takeover: bool = False
    ) -> Lease:
        """Take the lease (see `Store.acquire`). A takeover of a live lease publishes
        ``taken_over`` on the namespace's channel."""
        validate_key(key)
        validate_lease_ttl(ttl, self._ttl)
        # Indexed before the script creates the session, so a crash in between leaves a
        # member without a session (filtered out), never a session without a member.
        listed = await self._index(key, "acquire")
        args: list[str | bytes | int] = [
            owner,
            _fmt_time(ttl),
            "1" if takeover else "0",
            self._channel,
            key,
        ]
        # A key already listed whose head is missing: expired, or evicted with remains
        # left. The script then creates nothing until a scan has ruled remains out.
        reply = await self._run("acquire", key, [*args, "1" if listed else "0"])
        if reply[0] in (b"absent", b"remains"):
            remains = await self._remains(key)
            if remains:
                raise self._headless_error(key, remains)
            reply = await self._run("acquire", key, [*args, "0"])
            if reply[0] == b"remains":
                raise self._headless_error(key, [_text(reply[1])])
        if reply[0] == b"busy":
            raise busy_error(key, _text(reply[1]), int(reply[2]))
        epoch, expires, created = int(reply[1]), float(reply[2]), int(reply[3])
        if created:
            await self._index(key, "acquire")  # again: a concurrent delete may have removed it
        return Lease(key, owner, epoch, expires)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        validate_key(lease.key)
        validate_lease_ttl(ttl, self._ttl)
        await self._keep_indexed(lease.key, "renew")
        reply = await self._run("renew", lease.key, [lease.owner, lease.epoch, _fmt_time(ttl)])
        if reply[0] == b"lost":
            current = int(reply[1]) if reply[1] else None
            raise lease_lost_error(lease.key, lease.epoch, current)
        return Lease(lease.key, lease.owner, lease.epoch, float(reply[1]))

    async def release(self, lease: Lease) -> None:
        validate_key(lease.key)
        await self._run("release", lease.key, [lease.owner, lease.epoch])

    # -- versions --------------------------------------------------------------------

    async def commit(self, commit: Commit) -> int:
        """Append a version in one script (see `Store.commit`), then compact the log if
        superseded records piled up. Publishes ``committed`` on the namespace's channel."""
        key = validate_key(commit.key)
        await self._keep_indexed(key, "commit")
        info = dict(commit.info)
        written = len(commit.head) + sum(len(r.data or b"") for r in commit.records)
        # Lets a retried commit (reply lost with the connection, or sent again by the
        # caller after a timeout) recognise its own earlier success.
        commit_id = commit.commit_id or os.urandom(12).hex()
        event = json.dumps(
            {
                "event": "committed",
                "key": key,
                "version": commit.base_version + 1,
                "epoch": commit.epoch,
                "info": info,
            },
            default=str,
        )
        reply = await self._run(
            "commit",
            key,
            [
                commit.epoch,
                commit.base_version,
                commit_id,
                commit.head,
                msgpack.packb(info, use_bin_type=True),
                written,
                self._keep,
                self._channel,
                event,
                *(_pack_record(r) for r in commit.records),
            ],
        )
        if reply[0] == b"lost":
            current = int(reply[1]) if reply[1] else None
            raise lease_lost_error(key, commit.epoch, current)
        if reply[0] == b"moved":
            raise head_moved_error(commit, int(reply[1]))
        version, log_len, gen = int(reply[1]), int(reply[2]), int(reply[3])
        if needs_compaction(log_len, commit.size):
            try:
                await self._compact(key, version, gen, log_len, commit_id)
            except (StoreUnavailable, SnapshotCorrupt):
                # The commit stands; the next one will find the log long and try again.
                logger.warning(
                    "compaction of session %r failed after commit; it will be retried",
                    key,
                    extra={"key": key, "version": version},
                    exc_info=True,
                )
        return version

    async def _compact(
        self, key: str, version: int, gen: int, log_len: int, commit_id: str
    ) -> None:
        """Fold the version's log here, then write it as a new generation in a script that
        does nothing if the head moved meanwhile (another commit or compaction)."""
        with self._errors("compact", key):
            raw: list[bytes] = cast(
                "list[bytes]", await self._client.lrange(self._log_key(key, gen), 0, log_len - 1)
            )
        if len(raw) != log_len:
            return  # the session changed under us; the script would skip anyway
        folded = fold_records((_unpack_record(r, key) for r in raw), key)
        packed = [_pack_record(r) for r in records_from_streams(folded)]
        reply = await self._run("compact", key, [version, gen, commit_id, *packed])
        if reply[0] == b"ok":
            logger.debug(
                "compacted session %r: %d records into %d",
                key,
                log_len,
                len(packed),
                extra={"key": key, "version": version},
            )

    async def load(self, key: str, version: int | None = None) -> Stored:
        validate_key(key)
        reply = await self._run("load", key, ["" if version is None else str(int(version))])
        if reply[0] == b"absent":
            # No head at all: if the session's first keys remain, or the namespace still
            # lists it, look for what is left. A lost head must never read as "no
            # snapshot", which would start the conversation afresh.
            if reply[1] == b"1" and (reply[2] or await self._listed(key)):
                remains = await self._remains(key)
                if remains:
                    raise self._headless_error(key, remains)
            raise not_found_error(key)
        if reply[0] == b"missing":
            oldest, latest = int(reply[1]), int(reply[2])
            raise not_retained_error(key, int(version or 0), list(range(oldest, latest + 1)))
        _, number, epoch, created, head, info, records = reply
        streams = fold_records((_unpack_record(r, key) for r in records), key)
        return Stored(
            key=key,
            version=int(number),
            epoch=int(_number(epoch, "a version's epoch", key)),
            created_at=_number(created, "a version's created_at", key),
            head=bytes(head),
            streams=streams,
            info=_unpack_info(info, key),
        )

    async def versions(self, key: str) -> list[SnapshotInfo]:
        validate_key(key)
        reply = await self._run("versions", key, [])
        return [
            SnapshotInfo(
                version=int(number),
                epoch=int(_number(epoch, "a version's epoch", key)),
                created_at=_number(created, "a version's created_at", key),
                size=int(_number(size, "a version's size", key)),
                info=_unpack_info(info, key),
            )
            for number, epoch, created, size, info in reply[1]
        ]

    async def info(self, key: str) -> SessionInfo | None:
        validate_key(key)
        reply = await self._run("info", key, [])
        if reply[0] == b"absent":
            return None
        _, version, epoch, touched, info, lease = reply
        updated_at = float(touched)
        return SessionInfo(
            key=key,
            version=int(version),
            epoch=int(float(epoch)),
            owner=_text(lease[0]) if lease else None,
            lease_expires_at=float(lease[1]) if lease else None,
            updated_at=updated_at,
            expires_at=updated_at + self._ttl if self._ttl is not None else None,
            info=_unpack_info(info, key) if info else {},
        )

    # -- the namespace ---------------------------------------------------------------

    async def keys(self) -> list[str]:
        """Every live session key of the namespace, sorted.

        The index (``ns:sessions``) is a superset of the live sessions: a key is
        recorded before the script that creates its session runs (and again after),
        removed before the script that deletes it, and re-recorded at least every
        quarter TTL while it lives. Each member is checked against its head here, so
        deleted and expired sessions never show; members dead for two TTLs are
        collected on every index write.
        """
        with self._errors("keys", None):
            indexed = cast("list[bytes]", await self._client.zrange(self._index_key, 0, -1))
            members = [_text(m) for m in indexed]
            heads: list[Any] = []
            for i in range(0, len(members), KEYS_BATCH):
                pipe = self._client.pipeline(transaction=False)
                for m in members[i : i + KEYS_BATCH]:
                    pipe.hget(self._head_key(m), "touched")
                heads += await pipe.execute(raise_on_error=False)
            now = await self._server_now()
        live = []
        for member, touched in zip(members, heads, strict=True):
            if touched is None:
                continue  # deleted or expired
            if isinstance(touched, Exception):
                live.append(member)  # foreign data at the head: listed, load says corrupt
                continue
            try:
                stamp = float(touched)
            except ValueError:
                live.append(member)
                continue
            if self._ttl is None or stamp + self._ttl > now:
                live.append(member)
        return sorted(live)

    async def _server_now(self) -> float:
        if self._clock is not None:
            return self._clock()
        sec, usec = await self._client.time()
        return int(sec) + int(usec) / 1_000_000

    async def delete(self, key: str) -> bool:
        validate_key(key)
        # Unindexed before the session goes: a concurrent acquire re-records it after.
        with self._errors("delete", key):
            await self._client.zrem(self._index_key, key)
        self._indexed.pop(key, None)
        # The scan finds keys the head cannot list (remains of a lost head); the script
        # deletes them with the ones it knows, in one step.
        remains = await self._remains(key)
        reply = await self._run("delete", key, remains)
        return bool(int(reply[1]))

    async def _listed(self, key: str) -> bool:
        with self._errors("load (namespace index)", key):
            return await self._client.zscore(self._index_key, key) is not None

    # -- events ----------------------------------------------------------------------

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        """Announce a state change of session ``key`` (``paused``, ``resumed``,
        ``suspended``, ``restored``, …) on ``<namespace>:events`` as a JSON object
        ``{"event": …, "key": …, **fields}``. Commits and takeovers publish their own.
        Published from the node of the session's keys, so that one session's events
        arrive in order on a Cluster too."""
        validate_key(key)
        payload = json.dumps({**fields, "event": event, "key": key}, default=str)
        with self._errors(f"publish {event}", key):
            await self._scripts["publish"](
                keys=[self._head_key(key)], args=[self._channel, payload]
            )

    def subscribe(self) -> EventStream:
        """The namespace's events as an async iterator of dicts (see `EventStream`)."""
        return EventStream(self)

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        await self._client.aclose()


def _decodes_responses(client: Any) -> bool:
    try:
        if isinstance(client, RedisCluster):
            return bool(client.get_encoder().decode_responses)
        return bool(client.connection_pool.connection_kwargs.get("decode_responses"))
    except AttributeError:
        return False
