"""`RedisStore`: the `Store` protocol on Redis, over the parts of this package (the
layout, the scripts and the faults are described in the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError

from ...errors import (
    LeaseLost,
    ResumeError,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreUnavailable,
)
from ..base import (
    DEFAULT_LEASE_TTL,
    INFO_BATCH,
    Commit,
    Lease,
    SessionInfo,
    SnapshotInfo,
    Stored,
    busy_error,
    check_lease_key,
    head_moved_error,
    lease_lost_error,
    not_found_error,
    not_retained_error,
    validate_commit,
    validate_key,
    validate_lease_ttl,
    validate_namespace,
    validate_owner,
    validate_reclaim,
    validate_ttl,
)
from ..log import (
    DEFAULT_KEEP,
    TOMBSTONE_TTL,
    Record,
    fold_rows,
    needs_compaction,
    records_from_streams,
)
from .client import (
    DEFAULT_POOL_SIZE,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT,
    Client,
    Server,
    connect,
    database,
    decodes_responses,
    text,
)
from .control import RedisCommands
from .events import EventStream
from .health import ServerCheck
from .keys import KeyNames
from .namespace import Namespace
from .records import (
    number,
    pack_info,
    pack_records,
    unpack_info,
    unpack_rows,
    unpack_streams,
)
from .scripts import DEFAULT_WAIT_TIMEOUT_MS, Scripts, fmt_time
from .url import RedisURL

__all__ = ["DEFAULT_NAMESPACE", "RedisStore"]

# Records holding more bytes than this are packed on a worker thread.
_OFFLOAD_BYTES = 1 << 20
# What tombstone.lua answers for foreign data at a tombstone's name (not a number; not
# a string: GET's WRONGTYPE), which a delete removes before it lays the tombstone
_FOREIGN_TOMBSTONE = re.compile(r"foreign data|WRONGTYPE")
# A delete reads the session's epoch, lays its tombstone, then deletes only at that
# epoch; a session taken over in between is read again, this many times at most.
_DELETE_TRIES = 5
# A log read holding more bytes than this is unpacked and folded on a worker thread, as
# the loop's other sessions would feel it: about 0.5 ms of the loop at most. Unpacking
# costs ~50 µs per KB of a compacted log (one deflated batch; 8 KB is ~170 items) and
# ~20 µs per KB of turns' small batches. It was 64 KB: a compacted log of 1,000 items
# (48 KB) then held the loop for 2-3 ms in one callback.
_OFFLOAD_UNPACK_BYTES = 8 * 1024
# A log element larger than this is sent ahead of its script in pieces of
# `_STAGE_PIECE` (`RedisStore._stage`), kept at most `_STAGE_TTL_MS` if the script never
# takes it. A piece is one socket send on the event loop: a megabyte took 5-10 ms of it
# on a loaded 2-core machine, a quarter of that well under the ~5 ms a voice loop allows.
_STAGE_ABOVE = 1 << 20
_STAGE_PIECE = 1 << 18
_STAGE_TTL_MS = 120_000

logger = logging.getLogger("livekit_resume")

DEFAULT_NAMESPACE = "lkresume"

# The most versions a session may retain: a head spanning more is refused as corrupt
# (MAX_SPAN in session.lua), before a script loops over them.
MAX_KEEP = 1_000_000

# The events' JSON (what json.dumps(..., default=str) writes), one encoder for all: made
# per call, it costs more than encoding a commit's event.
_EVENTS = json.JSONEncoder(default=str)


def _fold_and_pack(raw: list[bytes], key: str) -> tuple[list[Record], list[bytes]]:
    """A log's elements folded to its live records, and those packed anew."""
    folded = records_from_streams(fold_rows(unpack_rows(raw, key), key))
    return folded, pack_records(folded)


def _plain(reply: Any) -> bool:
    """Whether a script's reply is one `Scripts.run` would return as it is."""
    return isinstance(reply, list) and bool(reply) and reply[0] != b"corrupt"


def _damaged(n: int, epoch: bytes, created: bytes, size: bytes, why: str) -> SnapshotInfo:
    """A version `RedisStore.versions` found unreadable, with what its record still says."""

    def kept(raw: bytes) -> float:
        try:
            found = float(raw)
        except ValueError:
            return 0
        return found if math.isfinite(found) and found >= 0 else 0

    return SnapshotInfo(
        version=n,
        epoch=int(kept(epoch)),
        created_at=kept(created),
        size=int(kept(size)),
        info={},
        damaged=why,
    )


def _validate_options(
    client: Client, namespace: str, keep: int, wait_replicas: int, wait_timeout: int
) -> None:
    if keep < 1:
        raise ValueError("keep must be at least 1")
    if keep > MAX_KEEP:
        raise ValueError(f"keep must be at most {MAX_KEEP:,} on Redis (got {keep:,})")
    validate_namespace(namespace)
    if decodes_responses(client):
        raise ValueError("the Redis client must use decode_responses=False: heads are bytes")
    if wait_replicas < 0 or wait_timeout < 0:
        raise ValueError(
            f"wait_replicas ({wait_replicas!r}) and wait_timeout ({wait_timeout!r} ms) "
            "must not be negative"
        )
    if not wait_replicas:
        return
    # A WAIT the socket timeout cuts fails a write that landed (and rm reports a
    # session it deleted as not deleted); WAIT 0 waits for ever.
    if wait_timeout == 0:
        raise ValueError("wait_timeout must be above 0 ms: WAIT 0 waits for ever")
    timeout = _socket_timeout(client)
    if timeout is not None and wait_timeout >= timeout * 1000:
        raise ValueError(
            f"wait_timeout ({wait_timeout} ms) must be below the client's socket timeout "
            f"({timeout:g} s): a WAIT that outlasts it fails a write that was applied"
        )


def _socket_timeout(client: Client) -> float | None:
    """The client's socket timeout in seconds, where it has one."""
    if isinstance(client, RedisCluster):
        kwargs = client.connection_kwargs
    else:
        kwargs = client.connection_pool.connection_kwargs
    timeout = kwargs.get("socket_timeout")
    return float(timeout) if isinstance(timeout, int | float) else None


class RedisStore:
    """A `Store` on Redis: standalone, Sentinel or Cluster, through ``redis.asyncio``.

    ``client`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` with
    ``decode_responses=False``; the store owns it and closes it in `aclose`. Most code
    opens one with `from_url` (or ``open_store("redis://…")``). ``namespace`` prefixes
    every key (one per tenant or deployment), ``keep`` versions stay loadable, ``ttl``
    (seconds without writes) expires whole sessions. Times come from the server's clock,
    so workers with skewed clocks agree on lease expiry; ``clock`` replaces it in tests.
    ``strict`` refuses a server whose eviction policy can remove session keys (see
    `check`); ``wait_replicas`` makes each commit (and delete) wait up to ``wait_timeout``
    ms for that many replicas to acknowledge it (see the package docstring): above 0 and
    below the client's socket timeout, else `ValueError` (a WAIT the socket timeout cut
    would report a write that landed as failed).

    Besides `Store`, it can announce and follow state changes: `publish` and `subscribe`
    (the `EventPublisher` and `EventSource` capabilities).
    """

    def __init__(
        self,
        client: Client,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        strict: bool = False,
        wait_replicas: int = 0,
        wait_timeout: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        _validate_options(client, namespace, keep, wait_replicas, wait_timeout)
        self._keep = keep
        self._ttl = validate_ttl(ttl)
        self._server = Server(client)
        self._names = KeyNames(namespace, database(client))
        self._check = ServerCheck(self._server, ttl=self._ttl, strict=strict)
        self._scripts = Scripts(
            self._server,
            self._names,
            self._check,
            ttl=self._ttl,
            clock=clock,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
        )
        self._commands: RedisCommands | None = None
        self._stage_denied = False  # the server's ACL refused staging: send records whole
        self._tombstone_denied = False  # the ACL refused a tombstone: warned once
        self._unheard = False  # an event of a script was refused (warned once)
        self._namespace_index = Namespace(
            self._server, self._names, self._scripts, self._check, ttl=self._ttl, clock=clock
        )

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
        (per node on a Cluster, where commands wait for one of ``pool_size`` places: a
        subscription holds a connection besides); beyond it an operation waits up to
        ``socket_timeout`` for one. A command meeting a dropped connection or a timeout is
        retried ``retries`` times with exponential backoff (redis-py's ``Retry``).
        The URL's password authenticates to Redis; ``sentinel_password`` to the
        Sentinels, when they require one. ``client_options`` go to the redis-py client
        (``ssl_ca_certs=…``, ``client_name=…``)."""
        settings = RedisURL.parse(url)
        client = connect(
            settings,
            pool_size=pool_size,
            socket_timeout=socket_timeout,
            retries=retries,
            sentinel_password=sentinel_password,
            **client_options,
        )
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
        store._server.where = settings.describe()
        return store

    # -- the parts, as the tests and tools look at them ------------------------------

    @property
    def _client(self) -> Client:
        return self._server.client

    @property
    def _where(self) -> str:
        return self._server.where

    @property
    def namespace(self) -> str:
        """The prefix of every key of this store (one per tenant or deployment)."""
        return self._names.namespace

    @property
    def _index_key(self) -> str:
        return self._names.index

    @property
    def _channel(self) -> str:
        return self._names.channel

    def _head_key(self, key: str) -> str:
        return self._names.head(key)

    async def _run(self, script: str, key: str, args: Sequence[str | bytes | int]) -> list[Any]:
        return await self._scripts.run(script, key, args)

    @property
    def under_replicated(self) -> int:
        """Commits and deletes that fewer than ``wait_replicas`` replicas acknowledged in
        time."""
        return self._scripts.under_replicated

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
        return await self._check.check()

    # -- leases ----------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        """Take the lease (see `Store.acquire`). A takeover of a live lease publishes
        ``taken_over`` on the namespace's channel."""
        validate_owner(owner)
        validate_reclaim(reclaim)
        lease, _, _ = await self._take(key, owner, ttl, takeover, read=False, reclaim=reclaim)
        return lease

    async def _acquire_load(
        self, key: str, owner: str, *, ttl: float, takeover: bool
    ) -> tuple[Lease, Stored | None]:
        """`acquire`, then `load` of the latest version under the lease (None: the
        session has none), as a restore does: one round trip for a session that exists.
        A load that fails releases the lease it was read under."""
        lease, loaded, created = await self._take(key, owner, ttl, takeover, read=True)
        if created:
            # a head made just now, under this lease: it holds no version yet (one
            # committed since by a takeover fences this lease's first commit anyway)
            return lease, None
        try:
            if loaded is None:  # not read in the same trip: read now
                return lease, await self.load(key)
            return lease, await self._stored(key, [""], loaded)
        except SnapshotNotFound:
            return lease, None
        except BaseException:
            # what a failed restore does with its lease (the lease expires if this fails)
            with contextlib.suppress(StoreUnavailable):
                await self.release(lease)
            raise

    async def _take(
        self,
        key: str,
        owner: str,
        ttl: float,
        takeover: bool,
        *,
        read: bool,
        reclaim: int | None = None,
    ) -> tuple[Lease, list[Any] | None, bool]:
        """The lease; with ``read`` the ``load`` script's reply for the latest version
        read under it in the same trip (None when it was not); whether the session was
        created."""
        validate_key(key)
        validate_lease_ttl(ttl, self._ttl)
        args: list[str | bytes | int] = [
            owner,
            fmt_time(ttl),
            "1" if takeover else "0",
            self._names.channel,
            key,
            "" if reclaim is None else reclaim,
        ]
        # The first trip records the key in the namespace index and runs the script told
        # the key is listed: it then creates nothing (a missing head is looked into
        # below), so it needs no order with the index record, which a Cluster may hold
        # on another node.
        listed, first, loaded = await self._first_trip(key, [*args, "1"], read)
        # Indexed before the script creates the session, so a crash in between leaves a
        # member without a session (filtered out), never a session without a member.
        # On a server that evicts, every key is checked as if listed (see load).
        listed = listed or self._check.evicting
        reply = first
        if reply[0] in (b"absent", b"remains"):
            # no head: a session the script creates starts above the epoch of the
            # tombstones a delete left (the earlier releases' one in a slot of its
            # own, so both read here)
            tombstone = await self._tombstone(key)
            create = [*args, "0", "" if tombstone is None else tombstone]
            if not listed:
                # a key the index did not list: the script may create its session
                reply = await self._run("acquire", key, create)
        # A key already listed whose head is missing: expired, or evicted with remains
        # left. The script then creates nothing until a scan has ruled remains out.
        if reply[0] in (b"absent", b"remains"):
            remains = await self._namespace_index.remains(key)
            if remains and await self._clear_bodies(key, remains):
                remains = []
            if remains:
                # another worker may have created the session since the script looked:
                # its keys are no remains if it has a head now
                reply = await self._run("acquire", key, [*args, "1"])
                if reply[0] in (b"absent", b"remains"):
                    raise self._namespace_index.headless_error(key, remains)
            else:
                reply = await self._run("acquire", key, create)
                if reply[0] == b"remains":
                    raise self._namespace_index.headless_error(key, [text(reply[1])])
        if reply[0] == b"busy":
            raise busy_error(key, text(reply[1]), int(reply[2]))
        if reply[0] == b"stale":  # a reclaim (only then): someone acquired it since
            raise lease_lost_error(key, int(reclaim or 0), int(reply[1]))
        if reply[0] == b"deleted":  # a reclaim of a key deleted at or after it
            raise lease_lost_error(key, int(reclaim or 0), None, tombstone=int(reply[1]))
        epoch, expires, created = int(reply[1]), float(reply[2]), int(reply[3])
        self._not_published(key, "taken_over", reply[4:])
        lease = Lease(key, owner, epoch, expires)
        if reclaim is not None and epoch == reclaim:
            await self._fence_reclaim_of_deleted(lease)
        if created:
            # again: a concurrent delete may have removed it
            await self._namespace_index.record(key, "acquire")
        return lease, loaded if reply is first else None, bool(created)

    async def _fence_reclaim_of_deleted(self, lease: Lease) -> None:
        """A reclaim that made its session anew read the tombstone before, in a trip
        of its own: the key made again meanwhile by another worker and deleted leaves a
        tombstone the script did not see. Read again, and such a reclaim is fenced, as
        on the other stores, and what it made deleted under its lease (a deleted
        conversation is not written back). Read after every reclaim granted at its
        epoch, not only the one that made the session: that one's reply, or this read,
        may have been lost, and the retry finds the session it made, its own lease. A
        session with a version is not the one it made (a delete refused may leave a
        tombstone at a live session's epoch: see failure-model.md's known limits)."""
        # the session's own node first: a session with a version goes on saving while
        # the tombstone's node (a Cluster's other primary) is down, or holds foreign data
        try:
            info = await self.info(lease.key)
        except SnapshotCorrupt:
            return  # damaged: not one made just now (its save writes it whole)
        if info is not None and info.version > 0:
            return
        tombstone = await self._tombstone(lease.key, lease.epoch)
        if tombstone is None or lease.epoch > tombstone:
            return
        with contextlib.suppress(StoreUnavailable, LeaseLost):
            await self.delete(lease.key, lease=lease)
        raise lease_lost_error(lease.key, lease.epoch, None, tombstone=tombstone)

    async def _first_trip(
        self, key: str, acquire_args: list[str | bytes | int], read: bool
    ) -> tuple[bool, list[Any], list[Any] | None]:
        """The ``index``, ``acquire`` (and with ``read``, ``load``) scripts pipelined in
        one round trip: whether the index listed the key already, and the other two's
        replies. An acquire answer the pipeline does not check (corrupt, malformed) comes
        from the script run again by itself, which raises it; such a load answer is None
        (the caller loads by itself).

        On a Cluster the index is on another node, which may be down while the
        session's is up: the session's scripts go first, and a session that exists (the
        acquire granted or refused it) is re-recorded in the background; the index is
        waited for only when the key has no head, to tell a new session from a lost one,
        or when the node refused the trip (the key is listed before the refusal is
        raised, so that a job that exits on it leaves its session findable)."""
        await self._check.ensure("acquire", key)  # before the first write: strict=True
        head = self._names.head(key)
        calls: list[tuple[str, str, list[Any]]] = [
            ("acquire", head, self._scripts.session_args(acquire_args)),
        ]
        if read:
            calls.append(("load", head, self._scripts.session_args([""])))
        cluster = isinstance(self._client, RedisCluster)
        if not cluster:
            calls.insert(0, ("index", self._names.index, self._namespace_index.index_args(key)))
        with self._server.errors("acquire", key):
            replies = await self._scripts.trip(calls)
        index_reply = None if cluster else replies.pop(0)
        checked = [("acquire (namespace index)", index_reply), ("acquire", replies[0])]
        if read:
            checked.append(("load", replies[1]))
        failed = [(op, r) for op, r in checked if isinstance(r, Exception)]
        if failed:
            await self._give_back(key, acquire_args, replies[0])
            if cluster:
                # the node answered, with foreign data at the head maybe: listed (as the
                # standalone trip lists it) before the caller, refused, exits
                await asyncio.shield(self._namespace_index.refresh(key, "acquire"))
            op, error = failed[0]
            with self._server.errors(op, key):
                raise error
        reply = replies[0]
        if not _plain(reply):
            reply = await self._run("acquire", key, acquire_args)
        loaded = replies[1] if read and reply is replies[0] and _plain(replies[1]) else None
        if not cluster:
            return self._namespace_index.recorded(key, index_reply), reply, loaded
        if reply[0] in (b"absent", b"remains"):
            return await self._namespace_index.record(key, "acquire"), reply, loaded
        self._namespace_index.refresh(key, "acquire")
        return True, reply, loaded

    async def _give_back(self, key: str, acquire_args: list[Any], granted: Any) -> None:
        """The acquire was granted in a trip whose call fails: the lease goes back (as a
        restore whose load fails gives it back)."""
        if _plain(granted) and granted[0] == b"ok":
            lease = Lease(key, str(acquire_args[0]), int(granted[1]), float(granted[2]))
            with contextlib.suppress(StoreUnavailable, SnapshotCorrupt):
                await self.release(lease)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        validate_key(lease.key)
        validate_lease_ttl(ttl, self._ttl)
        self._namespace_index.keep_recorded(lease.key, "renew")
        reply = await self._run("renew", lease.key, [lease.owner, lease.epoch, fmt_time(ttl)])
        if reply[0] == b"lost":
            if not reply[1]:
                tombstone = await self._tombstone(lease.key, lease.epoch)
                raise lease_lost_error(lease.key, lease.epoch, None, tombstone=tombstone)
            raise lease_lost_error(lease.key, lease.epoch, int(reply[1]))
        return Lease(lease.key, lease.owner, lease.epoch, float(reply[1]), int(reply[2]))

    async def _tombstone(self, key: str, fencing: int | None = None) -> int | None:
        """The epoch of the tombstone a delete of ``key`` left (`delete`), or None: the
        higher of the one in the session's slot and the one an earlier release lays
        (`KeyNames.legacy_tombstone`). With ``fencing`` (the epoch of a writer asking
        whether it is fenced), the first at or above it answers alone: the other lies
        on another node on a Cluster, which need not answer for the writer to stop."""
        slotted, legacy = self._names.tombstones(key)
        first = await self._tombstone_at(key, slotted)
        if fencing is not None and first is not None and first >= fencing:
            return first
        # one after the other, on one connection: a new session reads both
        second = await self._tombstone_at(key, legacy)
        return max((epoch for epoch in (first, second) if epoch is not None), default=None)

    async def _tombstone_at(self, key: str, name: str) -> int | None:
        try:
            with self._server.errors("read the tombstone", key):
                raw = await self._client.get(name)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoPermissionError):
                raise
            return None  # a user from before tombstones, whose deletes leave none
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise SnapshotCorrupt(
                f"session {key!r}: its tombstone {name} holds no epoch ({raw[:32]!r}): "
                "foreign data; delete it by hand"
            ) from None

    async def release(self, lease: Lease) -> None:
        validate_key(lease.key)
        await self._run("release", lease.key, [lease.owner, lease.epoch])

    # -- versions --------------------------------------------------------------------

    async def commit(self, commit: Commit) -> int:
        """Append a version in one script (see `Store.commit`), then compact the log if
        superseded records piled up. Publishes ``committed`` on the namespace's channel."""
        key = validate_commit(commit).key
        if commit.lease_ttl is not None:
            validate_lease_ttl(commit.lease_ttl, self._ttl)
        self._namespace_index.keep_recorded(key, "commit")
        info = dict(commit.info)
        written = len(commit.head) + sum(len(r.data or b"") for r in commit.records)
        # Lets a retried commit (reply lost with the connection, or sent again by the
        # caller after a timeout) recognise its own earlier success.
        commit_id = commit.commit_id or os.urandom(12).hex()
        event = _EVENTS.encode(
            {
                "event": "committed",
                "key": key,
                "version": commit.base_version + 1,
                "epoch": commit.epoch,
                "info": info,
            }
        )
        if written > _OFFLOAD_BYTES:  # packing megabytes would hold the event loop
            packed = await asyncio.to_thread(pack_records, commit.records)
        else:
            packed = pack_records(commit.records)
        packed, staged = await self._stage(key, packed)
        try:
            reply = await self._run(
                "commit",
                key,
                [
                    commit.epoch,
                    commit.base_version,
                    commit_id,
                    commit.head,
                    pack_info(info),
                    written,
                    self._keep,
                    self._names.channel,
                    event,
                    len(commit.records),
                    "" if commit.lease_ttl is None else fmt_time(commit.lease_ttl),
                    "1" if commit.whole else "",
                    *packed,
                ],
            )
        finally:
            # Gone if the script ran to its end, left if it did not (or was a retry of a
            # commit that had landed, which answers before looking at them), or if it
            # was refused: a server out of memory would stay full of them for their TTL
            # and refuse every other session's writes. A script still queued behind a
            # timeout then finds them gone and writes nothing; the commit is sent again.
            await self._unstage(key, staged)
        if reply[0] == b"lost":
            if not reply[1]:
                tombstone = await self._tombstone(key, commit.epoch)
                raise lease_lost_error(key, commit.epoch, None, tombstone=tombstone)
            raise lease_lost_error(key, commit.epoch, int(reply[1]))
        if reply[0] == b"moved":
            raise head_moved_error(commit, int(reply[1]))
        if reply[0] == b"unstaged":
            raise StoreUnavailable(
                f"commit to session {key!r}: a large record staged for it was gone when "
                "it ran (evicted, or a server restarted in between); nothing was written, "
                "the commit can be sent again"
            )
        version, log_len, gen, records = (int(r) for r in reply[1:5])
        self._not_published(key, "committed", reply[5:])
        if needs_compaction(records, commit.size):
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

    def _not_published(self, key: str, event: str, why: list[Any]) -> None:
        """A script that wrote all it had to answers ``ok`` with, last, why the server
        refused its event: warned once, as the write stands."""
        if why and not self._unheard:
            self._unheard = True
            logger.warning(
                "the Redis user may not publish on %r (%s): sessions are saved, but their "
                "events (%s, ...) are not announced; grant the channel (&%s) and +publish "
                "(docs/security.md)",
                self._names.channel,
                text(why[0]),
                event,
                self._names.channel,
                extra={"key": key},
            )

    async def _compact(
        self, key: str, version: int, gen: int, log_len: int, commit_id: str
    ) -> None:
        """Fold the version's log here, then write it as a new generation in a script that
        does nothing if the head moved meanwhile (another commit or compaction)."""
        with self._server.errors("compact", key):
            raw: list[bytes] = cast(
                "list[bytes]",
                await self._client.lrange(self._names.log(key, gen), 0, log_len - 1),
            )
        if len(raw) != log_len:
            return  # the session changed under us; the script would skip anyway
        if sum(map(len, raw)) > _OFFLOAD_BYTES:  # folding megabytes would hold the loop
            folded, packed = await asyncio.to_thread(_fold_and_pack, raw, key)
        else:
            folded, packed = _fold_and_pack(raw, key)
        packed, staged = await self._stage(key, packed)
        try:
            reply = await self._run("compact", key, [version, gen, commit_id, len(folded), *packed])
        finally:
            await self._unstage(key, staged)
        if reply[0] == b"ok":
            logger.debug(
                "compacted session %r: %d log elements into %d (%d records)",
                key,
                log_len,
                len(packed),
                len(folded),
                extra={"key": key, "version": version},
            )

    async def _stage(self, key: str, elements: list[bytes]) -> tuple[list[bytes], list[str]]:
        """The elements as a script takes them, and the keys staged: an element larger
        than `_STAGE_ABOVE` is written beforehand to a key of its own, a piece per
        command, and passed by name (see ``staged_keys`` in session.lua). Sent whole,
        asyncio would copy it on the event loop, ~40 ms for 30 MB."""
        out: list[bytes] = []
        names: list[str] = []
        try:
            for element in elements:
                out.append(await self._stage_one(key, element, names))
        except BaseException:
            # what this commit staged goes with it: pieces left for their TTL hold a
            # server out of memory full, and no script would ever take them
            await self._unstage(key, names)
            raise
        return out, names

    async def _stage_one(self, key: str, element: bytes, names: list[str]) -> bytes:
        """``element`` as the script takes it: itself, or the name of the key it was
        staged to, appended to ``names`` before its first piece is sent."""
        if len(element) <= _STAGE_ABOVE or self._stage_denied:
            return element
        name = self._names.staged(key, os.urandom(8).hex())
        names.append(name)
        view = memoryview(element)
        try:
            with self._server.errors("stage a large record", key):
                await self._client.set(name, view[:_STAGE_PIECE], px=_STAGE_TTL_MS)
                for start in range(_STAGE_PIECE, len(element), _STAGE_PIECE):
                    # The TTL renewed with each piece, in the same round trip: set once,
                    # it ran out under a staging slower than it (then APPEND made a key
                    # of the rest without any, the script refused it as not whole, and
                    # so on every retry); and a key APPEND made anew (a restart without
                    # data in between) expires too.
                    pipe = self._client.pipeline(transaction=False)
                    pipe.append(name, view[start : start + _STAGE_PIECE])
                    pipe.pexpire(name, _STAGE_TTL_MS)
                    await pipe.execute()
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoPermissionError):
                raise
            # an ACL from before staging: saved all the same, the loop stalls instead
            self._stage_denied = True
            logger.warning(
                "the Redis user may not SET or APPEND the store's keys, so records "
                "over a megabyte are sent whole with their commit, and the event loop "
                "stalls while asyncio copies them; grant +get +set +append +strlen "
                "(docs/security.md)",
                extra={"key": key},
            )
            names.remove(name)
            await self._unstage(key, [name])  # a first piece SET let through
            return element
        return b"@%d:%s" % (len(element), name.encode())

    async def _unstage(self, key: str, names: list[str]) -> None:
        """Drop what a script did not move into the log (else its TTL will), in one
        command: after a failure, a server that does not answer is waited for once."""
        if names:
            with contextlib.suppress(StoreUnavailable), self._server.errors("unstage", key):
                await self._client.delete(*names)

    async def load(self, key: str, version: int | None = None) -> Stored:
        validate_key(key)
        args = ["" if version is None else str(int(version))]
        return await self._stored(key, args, await self._run("load", key, args))

    async def _stored(self, key: str, args: list[str], reply: list[Any]) -> Stored:
        """The version the ``load`` script, run with ``args``, answered ``reply``."""
        if reply[0] == b"absent":
            reply = await self._headless(key, "load", args, reply)
            if reply[0] == b"absent":
                raise not_found_error(key)
        if reply[0] == b"missing":
            oldest, latest = int(reply[1]), int(reply[2])
            raise not_retained_error(key, int(args[0] or 0), list(range(oldest, latest + 1)))
        _, n, epoch, created, head, info, records = reply
        if sum(map(len, records)) > _OFFLOAD_UNPACK_BYTES:
            streams = await asyncio.to_thread(unpack_streams, records, key)
        else:
            streams = unpack_streams(records, key)
        return Stored(
            key=key,
            version=int(n),
            epoch=int(number(epoch, "a version's epoch", key)),
            created_at=number(created, "a version's created_at", key),
            head=bytes(head),
            streams=streams,
            info=unpack_info(info, key),
        )

    async def _headless(
        self, key: str, script: str, args: list[str], reply: list[Any]
    ) -> list[Any]:
        """The ``absent`` reply of ``script`` (``load`` or ``info``), looked into: with no
        head at all, if the session's first keys remain, or the namespace still lists it,
        or the server evicts keys (any of them may be left), look for what is left. A
        lost head must never read as "no session", which would start the conversation
        afresh (and hide it from ``ls``). Raises `SnapshotCorrupt` over remains; else the
        reply of the script run again (a session created meanwhile) or ``reply``."""
        if reply[1] == b"1" and (
            reply[2] or self._check.evicting or await self._namespace_index.listed(key)
        ):
            remains = await self._namespace_index.remains(key)
            if remains:
                # keys of a session another worker created since the script looked
                # have a head by now: read that one
                reply = await self._run(script, key, args)
                if reply[0] == b"absent":
                    raise self._namespace_index.headless_error(key, remains)
        return reply

    async def versions(self, key: str) -> list[SnapshotInfo]:
        validate_key(key)
        reply = await self._run("versions", key, [])
        listed = []
        for n, epoch, created, size, info, damage in reply[1]:
            if damage:
                why = self._scripts.corrupt(key, text(damage))
            else:
                try:
                    listed.append(
                        SnapshotInfo(
                            version=int(n),
                            epoch=int(number(epoch, "a version's epoch", key)),
                            created_at=number(created, "a version's created_at", key),
                            size=int(number(size, "a version's size", key)),
                            info=unpack_info(info, key),
                        )
                    )
                    continue
                except SnapshotCorrupt as e:
                    why = str(e)
            # a version lost only because a Cluster slot is half moved never gets here:
            # the script's settled() probe fails it first (StoreUnavailable)
            listed.append(_damaged(int(n), epoch, created, size, why))
        return listed

    async def info(self, key: str) -> SessionInfo | None:
        validate_key(key)
        return await self._info_of(key, await self._run("info", key, []))

    async def infos(self, keys: Sequence[str]) -> list[SessionInfo | ResumeError | None]:
        """`SessionInfos`: each key's `info` in order, the sessions' scripts sent in
        pipelines (`INFO_BATCH` sessions each, node by node on a Cluster) rather than a
        round trip each: what ``ls`` reads of a page. A session that cannot be read has
        its `SnapshotCorrupt` or `StoreUnavailable` in its place."""
        for key in keys:
            validate_key(key)
        found: list[SessionInfo | ResumeError | None] = []
        for start in range(0, len(keys), INFO_BATCH):
            found += await self._infos(keys[start : start + INFO_BATCH])
        return found

    async def _infos(self, keys: Sequence[str]) -> list[SessionInfo | ResumeError | None]:
        if not keys:
            return []
        heads = [self._names.head(key) for key in keys]
        args = self._scripts.session_args([])

        async def read(at: list[int]) -> list[Any]:
            with self._server.errors("info", None):
                return await self._scripts.trip([("info", heads[i], args) for i in at])

        try:
            await self._check.ensure("info", None)
            replies = await self._server.node_by_node(heads, read)
        except StoreUnavailable as e:  # one server, which did not answer: each as its info
            replies = [e] * len(keys)
        found: list[SessionInfo | ResumeError | None] = []
        for key, reply in zip(keys, replies, strict=True):
            try:
                checked = await self._scripts.checked("info", key, reply)
                found.append(await self._info_of(key, checked))
            except (SnapshotCorrupt, StoreUnavailable) as e:
                found.append(e)
        return found

    async def _info_of(self, key: str, reply: list[Any]) -> SessionInfo | None:
        """The ``info`` script's (checked) reply for ``key`` as a `SessionInfo`."""
        if reply[0] == b"absent":
            # a lost head with remains is damage (`ls` shows it), not "no session"
            reply = await self._headless(key, "info", [], reply)
            if reply[0] == b"absent":
                return None
        _, version, epoch, touched, info, lease, now = reply
        updated_at = float(touched)
        return SessionInfo(
            key=key,
            version=int(version),
            epoch=int(float(epoch)),
            owner=text(lease[0]) if lease else None,
            lease_expires_at=float(lease[1]) if lease else None,
            updated_at=updated_at,
            expires_at=updated_at + self._ttl if self._ttl is not None else None,
            info=unpack_info(info, key) if info else {},
            read_at=float(now),
        )

    # -- the namespace ---------------------------------------------------------------

    async def keys(self) -> list[str]:
        """Every live session key of the namespace, sorted.

        The index (``ns:sessions``) is a superset of the live sessions: a key is
        recorded before the script that creates its session runs (and again after),
        removed before the script that deletes it, and re-recorded by its holder at
        least every quarter TTL (every 5 minutes without a TTL, so that an entry a
        failover lost comes back). Each member is checked against its head here, so
        deleted and expired sessions never show; members dead for two TTLs are
        collected on every index write. On a Cluster, a member whose head is on a node
        that does not answer is listed unchecked (its `info` and `load` then raise
        `StoreUnavailable`): one node down hides no session.
        """
        return await self._namespace_index.keys()

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        """`KeyPages`: live keys in order, checking the heads of one page only."""
        return await self._namespace_index.page(prefix, after, limit)

    async def reindex(self) -> int:
        """List again every session of the namespace that has keys: SCANs every primary
        (O(keys in the database), for an operator: ``livekit-resume ls --scan``), after
        the index lost entries (its key evicted, a failover). Returns how many sessions
        were not listed."""
        return await self._namespace_index.reindex()

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        validate_key(key)
        if lease is not None:
            check_lease_key(key, lease)
        # Unindexed before the session goes: a concurrent acquire re-records it after.
        await self._namespace_index.forget(key)
        try:
            for _ in range(_DELETE_TRIES):
                reply = await self._delete_at(key, lease)
                if reply[0] != b"lost" or lease is not None:
                    break
                # taken (or acquired anew) since its epoch was read: its tombstone
                # must cover the epoch deleted, so read it again
        except Exception:
            # maybe not deleted: listed again (a listing checks each member's head)
            with contextlib.suppress(StoreUnavailable):
                await self._namespace_index.record(key, "delete")
            raise
        if reply[0] == b"lost":
            # refused: the session lives on under its new holder, so it is listed again
            await self._namespace_index.record(key, "delete")
            if lease is None:
                raise StoreUnavailable(
                    f"{self._server.where}: session {key!r} was taken over {_DELETE_TRIES} "
                    "times while it was being deleted; nothing was deleted: run rm again"
                )
            raise lease_lost_error(key, lease.epoch, int(reply[1]))
        return bool(int(reply[1]))

    async def _delete_at(self, key: str, lease: Lease | None) -> list[Any]:
        """One delete: the tombstone laid for the epoch the session is at (read now),
        then the script, which deletes only at that epoch (and under ``lease``, if
        given), so the tombstone covers every writer the delete leaves without a
        session. A session not there (expired, never made) gets none, and a damaged
        head none either (no epoch can be read of it)."""
        at: int | None = None
        damaged = False
        try:
            info = await self.info(key)
            at = info.epoch if info is not None else None
        except SnapshotCorrupt:
            # a damaged session (a version evicted, say) whose head may still say its
            # epoch: a worker holding it is fenced too; else none can be laid
            damaged, at = True, await self._head_epoch(key)
        if lease is not None and at is not None and at != lease.epoch:
            at = None  # refused by the script: another writer holds it now
        if at is not None:
            await self._lay_tombstone(key, at)
        elif lease is None and not damaged:
            await self._clear_foreign_tombstone(key)
        # Epoch 0 is none a session holds: a session made since `info` found none is
        # not deleted without its tombstone, but read again.
        epoch: int | str = (
            lease.epoch if lease is not None else at if at is not None else "" if damaged else 0
        )
        fence: list[str | int] = [lease.owner if lease else "", epoch]
        try:
            reply = await self._run("delete", key, [*fence, ""])
        except SnapshotCorrupt:
            # a key the head names is gone (evicted; a slot being moved is
            # StoreUnavailable): the scan finds what is left, deleted with the head
            reply = [b"scan"]
        if reply[0] == b"scan":
            # No head, or a damaged one: the scan finds the keys it cannot list
            # (remains of a lost head), and the script deletes them with the head.
            remains = await self._namespace_index.remains(key)
            reply = await self._run("delete", key, [*fence, "1", *remains])
        return reply

    async def _head_epoch(self, key: str) -> int | None:
        """The epoch a damaged session's head holds, if it holds one."""
        with contextlib.suppress(SnapshotCorrupt):  # not a hash: foreign data
            with self._server.errors("read the head", key):
                raw = await self._client.hget(self._names.head(key), "epoch")
            if isinstance(raw, bytes) and raw.isdigit():
                return int(raw)
        return None

    async def _clear_bodies(self, key: str, remains: list[str]) -> bool:
        """Remains that are version bodies alone, on a server that evicts no key: what
        the ``rm`` of an earlier release leaves (it does not know ``v:<n>:b``), which is
        no session and refused every later call under the key. Deleted while the key has
        no head (the delete script at epoch 0); whether they were. On a server that may
        evict (or whose policy could not be read) they may be what an eviction left of a
        conversation: reported, not cleared."""
        if not self._check.keeps_keys:
            return False
        if not all(self._names.is_body(key, name) for name in remains):
            return False
        reply = await self._run("delete", key, ["", 0, "1", *remains])
        if reply[0] != b"ok":
            return False  # a session made under the key since: looked at again
        logger.warning(
            "session %r: %d version bodies were left of it, and nothing else (an earlier "
            "release's delete leaves them); removed, and the key starts anew",
            key,
            len(remains),
            extra={"key": key},
        )
        return True

    async def _clear_foreign_tombstone(self, key: str) -> None:
        """Foreign data at the key's tombstone refuses every new session under it
        (`_tombstone`): ``rm`` of the key, which asks for it to be gone, removes it."""
        for name in self._names.tombstones(key):
            try:
                await self._tombstone_at(key, name)
            except SnapshotCorrupt:
                with self._server.errors("delete the tombstone", key):
                    await self._client.delete(name)

    async def _lay_tombstone(self, key: str, epoch: int) -> None:
        """The tombstone in the session's slot first, which fails over with the session
        (a delete kept is a tombstone kept), then the one of earlier releases. Foreign
        data at either name is removed first (``rm`` asks for the key to be gone, and
        the data would refuse every new session under it), then the tombstone laid."""
        args = [str(epoch), str(int(TOMBSTONE_TTL * 1000)), self._scripts.now_arg()]
        for name in self._names.tombstones(key):
            with self._server.errors("lay the tombstone", key):
                why = await self._scripts.call("tombstone", name, args)
                if why != 1 and _FOREIGN_TOMBSTONE.search(text(why)):
                    await self._client.delete(name)
                    why = await self._scripts.call("tombstone", name, args)
            if why == 1 or self._tombstone_denied:
                continue
            self._tombstone_denied = True
            denied = "NOPERM" in text(why) or "permission" in text(why)
            logger.warning(
                "session %r is deleted without a tombstone (%s): a worker that held it "
                "writes it back at its next save%s",
                key,
                text(why),
                "; grant the Redis user +get +set (docs/security.md)" if denied else "",
                extra={"key": key},
            )

    # -- events ----------------------------------------------------------------------

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        """Announce a state change of session ``key`` (``paused``, ``resumed``,
        ``suspended``, ``restored``, …) on ``<namespace>:events`` as a JSON object
        ``{"event": …, "key": …, **fields}``. Commits and takeovers publish their own.
        Published from the node of the session's keys, so that one session's events
        arrive in order on a Cluster too."""
        validate_key(key)
        payload = _EVENTS.encode({**fields, "event": event, "key": key})
        with self._server.errors(f"publish {event}", key):
            await self._scripts.call(
                "publish", self._names.head(key), [self._names.channel, payload]
            )

    def subscribe(self) -> EventStream:
        """The namespace's events as an async iterator of dicts (see `EventStream`)."""
        return EventStream(self._server, self._names.channel)

    def commands(self) -> RedisCommands:
        """The store's remote command channel (`Controllable`; see stores/redis/control.py)."""
        if self._commands is None:
            self._commands = RedisCommands(self._server, self._names, self._scripts)
        return self._commands

    async def aclose(self) -> None:
        """Close the client and its connection pool; every call after it raises
        `StoreUnavailable`."""
        await self._check.aclose()
        await self._namespace_index.aclose()
        if self._commands is not None:
            await self._commands.aclose()
        await self._client.aclose()
        self._server.closed = True
