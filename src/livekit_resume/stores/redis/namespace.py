"""What a namespace holds beyond one session's keys: the index of its sessions
(``ns:sessions``, for `RedisStore.keys`) and the scan for the remains of a session that
lost its head.

The index is a key of its own (another slot on a Cluster), so it is written by separate
commands, never inside a session script, and kept a superset of the live sessions: a key
is recorded before the script that creates its session runs (and again after), removed
before the script that deletes it, and re-recorded at least every quarter TTL while it
lives, in the background of its holder's writes (on a Cluster the index's primary may
be down while the session's is not). `Namespace.keys` checks each member against its
head.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from ...errors import SnapshotCorrupt, StoreUnavailable
from ..base import page_of, validate_page
from .client import Server, text
from .health import ServerCheck
from .keys import KeyNames, glob_escape
from .scripts import Scripts, fmt_time

__all__ = ["Namespace"]

log = logging.getLogger("livekit_resume")

# A session with a TTL is re-recorded in the namespace index at least every quarter TTL
# (INDEX_REFRESH); members not recorded for two TTLs (INDEX_HORIZON) are certainly dead
# and are collected. The gap between the two absorbs clock skew between Cluster nodes.
INDEX_REFRESH = 0.25
INDEX_HORIZON = 2.0
# A session without a TTL stays listed without it, unless the index itself lost its entry
# (a failover to a replica that had not received it; on a Cluster the index may live on
# another shard than the session): re-recorded every this many seconds all the same, so
# that `ls` lists a live session again soon after.
INDEX_REFRESH_FOREVER = 300.0
# A refresh of a session's entry that failed is tried again after this many seconds.
INDEX_RETRY = 10.0
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


def _is_live(head: Any, ttl: float | None, now: float) -> bool:
    """Whether an index member whose head (`Namespace._heads`) says it was written at
    ``touched``, its lease running until ``lease``, is a live session: as session.lua
    judges it, never expired while a lease runs."""
    if head is None:
        return False  # deleted or expired
    if isinstance(head, Exception):
        return True  # foreign data at the head: listed, load says corrupt
    touched, lease = head
    try:
        written = float(touched)
        return (
            ttl is None
            or not math.isfinite(written)  # damaged: listed, info says so
            or written + ttl > now
            or float(lease or "-inf") > now
        )
    except ValueError:
        return True


class Namespace:
    """The index of one namespace's sessions, and the remains of lost heads."""

    def __init__(
        self,
        server: Server,
        names: KeyNames,
        scripts: Scripts,
        check: ServerCheck,
        *,
        ttl: float | None,
        clock: Callable[[], float] | None,
    ) -> None:
        self._server = server
        self._names = names
        self._scripts = scripts
        self._check = check
        self._ttl = ttl
        self._clock = clock
        self._elapsed = clock or time.monotonic
        self._indexed: dict[str, float] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def record(self, key: str, op: str) -> bool:
        """Record the key in the namespace index (and collect long-dead members);
        whether it was listed already."""
        what = f"{op} (namespace index)"
        await self._check.ensure(what, key)  # before the first write: strict=True writes nothing
        with self._server.errors(what, key):
            reply = await self._scripts.call("index", self._names.index, self.index_args(key))
        return self.recorded(key, reply)

    def index_args(self, key: str) -> list[str]:
        """The ``index`` script's arguments recording ``key`` (`record`, or a pipeline
        that sends it with other commands, then hands its reply to `recorded`)."""
        horizon = "" if self._ttl is None else fmt_time(INDEX_HORIZON * self._ttl)
        forever = "1" if self._ttl is None else "0"
        return [self._scripts.now_arg(), horizon, key, forever]

    def recorded(self, key: str, reply: Any) -> bool:
        """The ``index`` script recorded ``key`` and answered ``reply``: whether the key
        was listed already."""
        if len(self._indexed) >= INDEX_CACHE_MAX:
            self._indexed.clear()
        self._indexed[key] = self._elapsed()
        return isinstance(reply, list) and len(reply) > 1 and int(reply[1]) == 1

    def keep_recorded(self, key: str, op: str) -> None:
        """At a write of a held session (a commit, a renewal): re-record the key if its
        entry is aging, in the background. The session exists, so the order of the two
        does not matter, and the write must not wait for the index: on a Cluster its
        primary may be down while the session's is up. A refresh that fails is tried
        again after `INDEX_RETRY` seconds."""
        last = self._indexed.get(key)
        if last is None or self._elapsed() - last > self._every():
            self.refresh(key, op)

    def refresh(self, key: str, op: str) -> asyncio.Task[None]:
        """Re-record the key of an existing session now, in the background (see
        `keep_recorded`), unless a refresh of it is under way; that refresh. Awaiting it
        never raises: a refresh that fails is logged and tried again later."""
        under_way = self._refreshing.get(key)
        if under_way is not None:
            return under_way
        self._indexed[key] = self._elapsed()  # not due again while this one runs
        task = asyncio.ensure_future(self._refresh(key, op))
        self._refreshing[key] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key, None))
        return task

    def _every(self) -> float:
        return INDEX_REFRESH_FOREVER if self._ttl is None else INDEX_REFRESH * self._ttl

    async def _refresh(self, key: str, op: str) -> None:
        try:
            await self.record(key, op)
        except (StoreUnavailable, SnapshotCorrupt) as e:
            self._indexed[key] = self._elapsed() - self._every() + INDEX_RETRY
            log.warning(
                "session %r: its entry in the namespace index could not be refreshed (%s); "
                "again in %.0f s",
                key,
                e,
                INDEX_RETRY,
                extra={"key": key},
            )

    async def aclose(self) -> None:
        """Stop the refreshes under way (the store is closing)."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def forget(self, key: str) -> None:
        """Unlist the key (before its session is deleted: a concurrent acquire
        re-records it after). A refresh of its entry under way is stopped first: it
        would list the deleted key again."""
        refreshing = self._refreshing.get(key)
        if refreshing is not None:
            refreshing.cancel()
            await asyncio.gather(refreshing, return_exceptions=True)
        with self._server.errors("delete", key):
            await self._server.client.zrem(self._names.index, key)
        self._indexed.pop(key, None)

    async def listed(self, key: str) -> bool:
        with self._server.errors("load (namespace index)", key):
            return await self._server.client.zscore(self._names.index, key) is not None

    async def keys(self) -> list[str]:
        """Every live session key of the namespace, sorted (see `RedisStore.keys`)."""
        return (await self.page("", None, None))[0]

    async def page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        """`KeyPages` over the index: its member names are read whole (a sorted set
        scored by time has no order by name), but only a page's heads are checked."""
        validate_page(prefix, after, limit)
        client = self._server.client
        with self._server.errors("keys", None):
            indexed = cast("list[bytes]", await client.zrange(self._names.index, 0, -1))
        members = sorted(
            m for m in map(text, indexed) if m.startswith(prefix) and (after is None or m > after)
        )
        live: list[str] = []
        want = None if limit is None else limit + 1  # one more: is there a next page?
        step = KEYS_BATCH if want is None else min(KEYS_BATCH, want)
        for i in range(0, len(members), step):
            live += await self._live(members[i : i + step])
            if want is not None and len(live) >= want:
                break
        return page_of(live, prefix, after, limit)

    async def _live(self, members: Sequence[str]) -> list[str]:
        """Those of ``members`` whose head says they live, in their order, and on a
        Cluster those whose node does not answer (their `info` and `load` raise
        `StoreUnavailable`): one node down hides no session of the others, and none of
        its own."""
        heads = await self._heads_by_node(members)
        headless = [m for m, (head, _) in zip(members, heads, strict=True) if head is None]
        damaged = await self._with_remains(headless)
        return [
            member
            for member, (head, now) in zip(members, heads, strict=True)
            if _is_live(head, self._ttl, now) or member in damaged
        ]

    async def _heads(self, client: Any, members: Sequence[str]) -> list[Any]:
        """Each member's head: its ``touched`` field and its lease's expiry, None without
        an owner (None: no head; an exception: not a hash, or a head without its
        ``touched``, which `info` calls damaged)."""
        pipe = client.pipeline(transaction=False)
        for m in members:
            pipe.hmget(self._names.head(m), "touched", "owner", "expires", "version")
        heads: list[Any] = []
        for got in await pipe.execute(raise_on_error=False):
            if isinstance(got, Exception):
                heads.append(got)
            else:
                touched, owner, expires, version = got
                if touched is not None:
                    heads.append((touched, owner and expires))
                elif version is None and owner is None:
                    heads.append(None)
                else:
                    heads.append(SnapshotCorrupt("a head without its touched field"))
        return heads

    async def _heads_by_node(self, members: Sequence[str]) -> list[tuple[Any, float]]:
        """`_heads` read node by node on a Cluster, at once (`Server.node_by_node`), each
        with the clock of the node that holds it, which wrote its ``touched``: another
        node's may run ahead or behind. A member of a node that does not answer gets its
        `StoreUnavailable` as its head (listed: `_is_live`)."""
        heads = [self._names.head(m) for m in members]

        async def read(at: list[int]) -> list[Any]:
            with self._server.errors("keys", None):
                touched = await self._heads(self._server.client, [members[i] for i in at])
                now = await self._server_now(heads[at[0]])
            return [(t, now) for t in touched]

        got = await self._server.node_by_node(heads, read)
        return [r if isinstance(r, tuple) else (r, 0.0) for r in got]

    async def _with_remains(self, headless: Sequence[str]) -> set[str]:
        """Those of the listed ``headless`` members that lost their head but left keys
        (evicted, or deleted by hand): listed, so that `info` and `load` say so and an
        operator sees them. A member listed without a head is otherwise a session that
        expired (with a ttl) or whose creation was cut short; only where that is not the
        likely answer (no ttl, or a server that evicts) is it looked into, by one SCAN of
        the namespace's session keys per node holding such a member: O(keys in the
        database) then, and nothing while every listed member has its head."""
        if not headless:
            return set()
        if self._ttl is not None:
            await self._check.ensure("keys", None)
            if not self._check.evicting:
                return set()
        prefixes = {self._names.prefix(m): m for m in headless}
        pattern = glob_escape(f"{self._names.namespace}:{{") + "*"
        with self._server.errors("scan for remains", None):
            found = await self._scan(pattern, [self._names.head(m) for m in headless])
        damaged: set[str] = set()
        for name in found:
            end = name.find("}:")
            member = prefixes.get(name[: end + 2]) if end >= 0 else None
            if member is not None and name != self._names.head(member):
                damaged.add(member)
        return damaged

    async def _scan(self, pattern: str, owners_of: Sequence[str] | None) -> list[str]:
        """The keys matching ``pattern``, by SCAN: on a Cluster, of the nodes owning the
        slots of ``owners_of`` (None: every primary), each node once."""
        client = self._server.client
        if not isinstance(client, RedisCluster):
            return [text(k) async for k in client.scan_iter(match=pattern, count=SCAN_COUNT)]
        await client.initialize()
        if owners_of is None:
            nodes = list(client.get_primaries())
        else:
            owners = {n.name: n for n in map(client.get_node_from_key, owners_of) if n is not None}
            nodes = [owners[name] for name in sorted(owners)]
        found: list[str] = []
        for node in nodes:
            found += await _scan_node(client, node, pattern)
        return found

    async def _server_now(self, name: str) -> float:
        """The clock of the server holding ``name``, which just answered (a Cluster
        sends TIME to its default node, which may be the one that is down)."""
        if self._clock is not None:
            return self._clock()
        client = self._server.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(name)
            sec, usec = await client.time(target_nodes=node)
        else:
            sec, usec = await client.time()
        return int(sec) + int(usec) / 1_000_000

    async def remains(self, key: str) -> list[str]:
        """Every key under the session's prefix but its head, found by SCAN (on a
        Cluster, of the node owning the session's slot). O(keys in the database): only
        called when a head is missing and there is reason to look (see the package
        docstring), never on a commit."""
        head = self._names.head(key)
        pattern = glob_escape(self._names.prefix(key)) + "*"
        with self._server.errors("scan for remains", key):
            found = await self._scan(pattern, [head])
        return sorted(set(found) - {head})

    async def reindex(self) -> int:
        """Record in the index every session that has keys, found by a SCAN of every
        primary (O(keys in the database)): what the index lost (its key evicted, a
        failover to a replica without it) is listed again, and a session with a lost
        head shows as damaged. Returns how many sessions were not listed."""
        pattern = glob_escape(f"{self._names.namespace}:{{") + "*"
        with self._server.errors("scan for sessions", None):
            found = await self._scan(pattern, None)
        start = len(self._names.namespace) + 2
        keys = sorted({_untag(name[start : name.find("}", start)]) for name in found})
        what = "reindex (namespace index)"
        await self._check.ensure(what, None)
        added = 0
        # the index is one key: its scripts go in pipelines, not a round trip each
        for i in range(0, len(keys), KEYS_BATCH):
            batch = keys[i : i + KEYS_BATCH]
            calls = [("index", self._names.index, self.index_args(key)) for key in batch]
            with self._server.errors(what, None):
                replies = await self._scripts.trip(calls)
                for key, reply in zip(batch, replies, strict=True):
                    if isinstance(reply, Exception):
                        raise reply
                    added += not self.recorded(key, reply)
        return added

    def headless_error(self, key: str, remains: Sequence[str]) -> SnapshotCorrupt:
        shown = ", ".join(remains[:REMAINS_SHOWN]) + (", …" if len(remains) > REMAINS_SHOWN else "")
        return SnapshotCorrupt(
            f"session {key!r} on {self._server.where} lost its head key "
            f"{self._names.head(key)} but {len(remains)} of its keys remain ({shown}): "
            "evicted by the server (maxmemory-policy allkeys-*, or volatile-* with a "
            "session ttl) or deleted by hand. Its versions cannot be read without the "
            "head, and it is not started afresh over them: delete the session "
            "(`livekit-resume rm KEY` or store.delete) to start it again, and set "
            "maxmemory-policy noeviction"
        )


_UNTAG = {"%25": "%", "%7B": "{", "%7D": "}"}


def _untag(tag: str) -> str:
    """The session key of a hash tag body (`keys._tag` undone)."""
    return re.sub("%25|%7B|%7D", lambda m: _UNTAG[m[0]], tag)


async def _scan_node(client: RedisCluster, node: Any, pattern: str) -> list[str]:
    """SCAN one node of the Cluster (``node``, a ``ClusterNode``) for ``pattern``."""
    found: list[str] = []
    cursor = 0
    while True:
        # A Cluster answers a node's SCAN as ({node name: cursor}, keys).
        cursors, batch = cast(
            "tuple[dict[str, int], list[bytes]]",
            await client.scan(cursor, match=pattern, count=SCAN_COUNT, target_nodes=node),
        )
        found += [text(k) for k in batch]
        cursor = int(next(iter(cursors.values()))) if cursors else 0
        if cursor == 0:
            return found
