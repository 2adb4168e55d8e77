"""A real Redis Cluster changing under live sessions: a slot resharded step by step
(``CLUSTER SETSLOT … IMPORTING / MIGRATING``, then ``MIGRATE`` of chosen keys) while a
session commits, renews, is taken over or removed. Each test failed on the code it was
written against, because of the defect its docstring names.

The half-moved state most of these use has the session's **head moved first** and some
of its other keys still on the old node. That is how Redis moves a slot's keys where
``CLUSTER GETKEYSINSLOT`` does not list the newest first: Redis 6 lists them by name
(``…:head`` < ``…:log:0`` < ``…:v:10`` < ``…:v:9``), Redis 7.4+ and Valkey 8 in hash
order, and ``redis-cli --cluster reshard`` moves them in batches of that order. The
tests in test_redis_adversarial.py cover the other half-moved state, the head last.

A script sent for the head there is redirected (ASK) to the importing node, and Redis
runs it there with ``ASKING``: every key the script touches that is still on the old
node reads as absent, and a write or ``DEL`` of it touches nothing. Each test drives its
cluster by hand, one step at a time; nothing races. Every cluster is the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from livekit_resume.errors import SnapshotNotFound, StoreUnavailable
from livekit_resume.stores.base import Commit, Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.scripts import _SESSION_SCRIPTS, script_source
from tests.redis_servers import (
    RedisCluster,
    RedisServer,
    require_redis_server,
)
from tests.test_redis_adversarial import _owner_of

pytestmark = pytest.mark.cluster

KEY = "room-hunt"


# -- driving a reshard by hand -----------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A 3-primary cluster of this test alone: its slots are moved about."""
    require_redis_server()
    started = RedisCluster(tmp_path / "cluster").start()
    try:
        yield started
    finally:
        started.stop()


def _ranges(node: RedisServer) -> list[tuple[int, int]]:
    """The slot ranges ``node`` serves, by its own ``CLUSTER NODES``."""
    for line in node.cli("cluster", "nodes").splitlines():
        parts = line.split()
        if "myself" in parts[2]:
            found = [rng.partition("-") for rng in parts[8:] if not rng.startswith("[")]
            return [(int(lo), int(hi or lo)) for lo, _, hi in found]
    raise AssertionError("no line of the node itself")


class Reshard:
    """One slot moved from its node to another the way ``redis-cli --cluster reshard``
    does it, a step at a time: `begin` (IMPORTING, MIGRATING), `move` (MIGRATE of the
    keys named), `finish` (the rest moved, SETSLOT NODE on every node)."""

    def __init__(self, cluster: RedisCluster, store: RedisStore, key: str) -> None:
        self.cluster = cluster
        self.head = store._head_key(key)
        self.prefix = self.head[: -len("head")]
        self.slot = key_slot(self.head.encode())
        self.source, self.source_id = _owner_of(cluster, self.slot)
        # Not the node of the namespace index, which the store's background refreshes
        # write to: see `test_an_ask_redirect_to_a_node_the_store_has_idle_connections_to_is_typed`
        index_node, _ = _owner_of(cluster, key_slot(store._index_key.encode()))
        self.target = next(n for n in cluster.nodes if n not in (self.source, index_node))
        self.target_id = self.target.cli("cluster", "myid").strip()

    def begin(self) -> Reshard:
        slot = str(self.slot)
        out = self.target.cli("cluster", "setslot", slot, "importing", self.source_id)
        assert out.strip() == "OK", out
        out = self.source.cli("cluster", "setslot", slot, "migrating", self.target_id)
        assert out.strip() == "OK", out
        return self

    def move(self, *names: str) -> None:
        out = self.source.cli(
            "migrate", "127.0.0.1", str(self.target.port), "", "0", "5000", "keys", *names
        )
        assert out.strip() == "OK", out

    def keys_on(self, node: RedisServer) -> list[str]:
        found = node.cli("cluster", "getkeysinslot", str(self.slot), "1000").split()
        return sorted(k for k in found if k.startswith(self.prefix))

    def finish(self) -> None:
        rest = self.source.cli("cluster", "getkeysinslot", str(self.slot), "1000").split()
        if rest:
            self.move(*rest)
        for node in self.cluster.nodes:
            node.cli("cluster", "setslot", str(self.slot), "node", self.target_id)


def _scripts_known_to(node: RedisServer) -> None:
    """The store's scripts cached on ``node``, as on any primary that served the store
    before (another session's slot): isolates a test from the script loading that
    `test_a_session_moved_whole_to_a_node_new_to_the_store_saves_before_its_slot_is_settled`
    is about."""
    client = redis_sync.Redis(host="127.0.0.1", port=node.port)
    try:
        for name in (*_SESSION_SCRIPTS, "index", "publish"):
            client.script_load(script_source(name))
    finally:
        client.close()


def _open(cluster: RedisCluster, namespace: str, **opts: Any) -> RedisStore:
    options: dict[str, Any] = {"retries": 1, "socket_timeout": 2.0, **opts}
    return RedisStore.from_url(cluster.url, namespace=namespace, **options)


def _turn(key: str, epoch: int, base: int) -> Commit:
    n = base + 1
    return Commit(key, epoch, base, b"head %d" % n, [Record("h", f"i{n}", b"item %d" % n)], n)


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("last_moved", ["v:10:b", "v:9"], ids=["record", "body"])
async def test_a_commit_on_the_importing_node_trims_no_version_still_on_the_old_one(
    cluster: RedisCluster, last_moved: str
) -> None:
    """Contract: a commit trims versions beyond ``keep`` in the same script
    (docs/multi-worker.md, "Redis layout": "Old versions beyond `keep` … are trimmed in
    the same script"), and `rm` removes every key of a session; the key is then free for
    a new conversation.

    What happens: ``keep=2``, versions 9 and 10 retained; the slot moves in name order
    (head, log:0, v:10, then v:9). Between the two batches the next commit is sent to
    the importing node (ASK), where v:9 is not yet: its ``trim`` (session.lua) runs
    ``DEL v:9`` there, which deletes nothing, and the head moves ``oldest`` past it.
    The old node's v:9 then moves in, a version record no head names: ``rm`` leaves it
    behind (with the conversation's metadata in it), and a new conversation under the
    same key fails its 9th commit with `SnapshotCorrupt` ("key …:v:9 exists before its
    version was written"), telling the operator to delete a session that `rm` just
    deleted. Compaction's trim of old log generations does the same with ``log:<g>``.
    The same with v:9 moved and its body ``v:9:b`` not yet (``body``): the trim deletes
    the record and leaves the body, which then moves in.
    """
    store = _open(cluster, "trim", keep=2)
    try:
        lease = await store.acquire(KEY, "w1")
        for base in range(10):
            assert await store.commit(_turn(KEY, lease.epoch, base)) == base + 1
        move = Reshard(cluster, store, KEY)
        assert move.keys_on(move.source) == [
            move.prefix + s for s in ("head", "log:0", "v:10", "v:10:b", "v:9", "v:9:b")
        ]
        _scripts_known_to(move.target)
        move.begin()
        # first batch, in name order (a version's body follows its record)
        order = ["head", "log:0", "v:10", "v:10:b", "v:9"]
        move.move(*(move.prefix + s for s in order[: order.index(last_moved) + 1]))

        # refused while the slot is half moved (StoreUnavailable) is as good
        with contextlib.suppress(StoreUnavailable):
            await asyncio.wait_for(store.commit(_turn(KEY, lease.epoch, 10)), 20)
        move.finish()

        latest = (await store.load(KEY)).version
        versions = [v.version for v in await store.versions(KEY)]
        assert versions == [latest - 1, latest]
        kept = [f"v:{n}{body}" for n in versions for body in ("", ":b")]
        want = sorted(move.prefix + s for s in ("head", "log:0", *kept))
        assert move.keys_on(move.target) == want, "a trimmed version came back with the slot"

        assert await store.delete(KEY)
        assert move.keys_on(move.target) == [], "rm left keys of the session behind"
        again = await store.acquire(KEY, "w2")
        for base in range(10):
            assert await store.commit(_turn(KEY, again.epoch, base)) == base + 1
    finally:
        await store.aclose()


async def test_rm_on_the_importing_node_removes_the_whole_session_or_nothing(
    cluster: RedisCluster,
) -> None:
    """Contract: ``rm`` (`store.delete`) of a session whose slot is half moved "deletes
    nothing and says retry" (tests/test_cli_cluster_adversarial.py, with the head
    still on the old node), else every key of the session goes: "`rm` removes every key
    of it" (docs/failure-model.md); session.lua's ``delete_all`` looks at every key
    before the first DEL for exactly this.

    What happens: with the head moved first, the delete is sent to the importing node
    (ASK). There ``TYPE`` of a key still on the old node answers ``none`` instead of
    failing, so ``delete_all`` deletes the head alone and `delete` returns True. The
    versions and the log then move in, headless: the conversation `rm` reported deleted
    is still stored, unlisted (the index entry went first), and the key is unusable:
    the next ``acquire`` of it raises `SnapshotCorrupt` ("lost its head key"), so the
    next caller in that room gets no agent until an operator runs ``rm`` again.
    """
    store = _open(cluster, "rm")
    try:
        lease = await store.acquire(KEY, "w1")
        for base in range(2):
            await store.commit(_turn(KEY, lease.epoch, base))
        await store.release(lease)
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)
        move.begin()
        move.move(move.head)
        before = move.keys_on(move.source) + move.keys_on(move.target)

        try:
            deleted = await asyncio.wait_for(store.delete(KEY), 20)
        except StoreUnavailable:
            deleted = None
        if deleted is None:  # refused: nothing of it may be gone
            assert move.keys_on(move.source) + move.keys_on(move.target) == before
        move.finish()
        if deleted is None:
            assert await store.delete(KEY)

        assert move.keys_on(move.target) == [], "rm left a headless session behind"
        await asyncio.wait_for(store.acquire(KEY, "w2"), 20)
    finally:
        await store.aclose()


async def test_a_renewal_on_the_importing_node_never_outlives_the_conversation(
    cluster: RedisCluster,
) -> None:
    """Contract: "Whole sessions expire together: every write moves the deadline of
    every key" (session.lua), and docs/failure-model.md: a renewal on a half-moved slot
    with a session ``ttl`` is "refused before it writes". A session is either there
    whole or gone whole; never a head whose versions expired.

    What happens: ``ttl=3``; the head moves first, the version and the log not yet.
    The holder's renewals go to the importing node (ASK) and succeed: ``refresh_ttl``
    ``PEXPIRE``s the head there and misses the keys still on the old node, which keep
    the deadline of the last commit. They expire; the renewed head lives on, and once
    the slot has moved the conversation is `SnapshotCorrupt` ("version record … is
    missing"): an acknowledged commit lost under a holder whose lease the store kept
    renewing. With a day's ttl the same happens to a call on hold (renewals only)
    through a reshard that stalls (``redis-cli`` stopped between batches).
    """
    store = _open(cluster, "ttl", ttl=3)
    try:
        lease = await store.acquire(KEY, "w1", ttl=3)
        await store.commit(_turn(KEY, lease.epoch, 0))
        committed = time.monotonic()
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)
        move.begin()
        move.move(move.head)

        await asyncio.sleep(max(0.0, committed + 1.5 - time.monotonic()))
        # refused, as documented (StoreUnavailable): the session expires whole at its ttl
        with contextlib.suppress(StoreUnavailable):
            lease = await asyncio.wait_for(store.renew(lease, ttl=3), 10)
        # past the commit's deadline (3 s), well before a renewed head's (4.5 s)
        await asyncio.sleep(max(0.0, committed + 3.6 - time.monotonic()))
        move.finish()

        try:
            stored = await asyncio.wait_for(store.load(KEY), 10)
        except SnapshotNotFound:
            return  # expired whole: right, as nothing wrote it within its ttl
        assert stored.version == 1
    finally:
        await store.aclose()


async def test_a_session_moved_whole_to_a_node_new_to_the_store_saves_before_its_slot_is_settled(
    cluster: RedisCluster,
) -> None:
    """Contract (docs/failure-model.md): a Redis Cluster primary that lost its scripts
    (or never had them) gets "the script … loaded again on the node of the call's key";
    only a session met *half* moved is `StoreUnavailable` ("retry once the slot has
    moved").

    What happens: every key of the session has moved to the importing node (a node
    added to scale out, which never ran the store's scripts); the slot stays MIGRATING
    while ``redis-cli --cluster reshard`` moves its other keys. Every script of the
    session is redirected there (ASK) and answered NOSCRIPT; `Scripts._evalsha` loads
    the script on ``get_node_from_key`` (the old node, which still owns the slot in the
    slot map) and sends it again: NOSCRIPT again, raised as `StoreUnavailable`
    ("refused commit …: No matching script"). Commit, load and renew of a session
    whole on a healthy node all fail until the operator settles the slot: autosave
    stalls and restores fail for every session of every slot moved to the new node.
    """
    store = _open(cluster, "noscript")
    try:
        lease = await store.acquire(KEY, "w1")
        await store.commit(_turn(KEY, lease.epoch, 0))
        move = Reshard(cluster, store, KEY).begin()
        move.move(*move.keys_on(move.source))  # the whole session; the slot still moving
        assert move.keys_on(move.source) == []

        assert await asyncio.wait_for(store.commit(_turn(KEY, lease.epoch, 1)), 20) == 2
        assert (await asyncio.wait_for(store.load(KEY), 20)).version == 2
        await asyncio.wait_for(store.renew(lease), 20)
        move.finish()
    finally:
        await store.aclose()


async def test_an_ask_redirect_to_a_node_the_store_has_idle_connections_to_is_typed(
    cluster: RedisCluster,
) -> None:
    """Contract: "an unreachable store is `StoreUnavailable` (typed)", and a slot being
    moved is `StoreUnavailable`, "retried like an outage" (docs/failure-model.md); a
    session whole on the importing node saves there (ASK).

    What happens: redis-py follows an ASK by sending ``ASKING`` as a command of its own
    through the node's pool, then the script through the pool again
    (``RedisCluster._execute_command``). The pool hands out its free connections first
    in, first out: with two or more idle connections to the importing node (a worker
    whose other sessions live there), ``ASKING`` goes on one and the script on another,
    which the importing node answers MOVED (back to the old node), which answers ASK
    again… until redis-py gives up with ``ClusterError("TTL exhausted.")``. That error
    is neither a ``ResponseError`` nor a ``RedisClusterException``, so
    `Server.errors` lets it through raw: every commit, load and renewal of every
    session met mid-reshard raises an untyped redis-py error (an app's ``except
    ResumeError`` misses it; the CLI prints a traceback) instead of saving or raising
    `StoreUnavailable`.
    """
    store = _open(cluster, "ask")
    try:
        lease = await store.acquire(KEY, "w1")
        await store.commit(_turn(KEY, lease.epoch, 0))
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)

        # other sessions of this worker on the importing node, read at once: the store
        # keeps two (or more) idle connections to it
        served = _ranges(move.target)
        neighbours = [
            f"n{i}"
            for i in range(2000)
            if any(lo <= key_slot(store._head_key(f"n{i}").encode()) <= hi for lo, hi in served)
        ][:4]
        assert len(neighbours) == 4
        await asyncio.gather(*(store.info(k) for k in neighbours))
        client = store._client
        assert isinstance(client, RedisClusterClient)
        node = client.get_node(host="127.0.0.1", port=move.target.port)
        assert node is not None and len(node._free) >= 2, "set-up: idle connections"

        move.begin()
        move.move(*move.keys_on(move.source))  # the whole session; the slot still moving
        try:
            version = await asyncio.wait_for(store.commit(_turn(KEY, lease.epoch, 1)), 20)
        except StoreUnavailable:
            version = None  # typed: autosave retries it
        move.finish()
        if version is None:
            version = await store.commit(_turn(KEY, lease.epoch, 1))
        assert version == 2
        assert (await store.load(KEY)).version == 2
    finally:
        await store.aclose()
