"""Hunt `clusterlost`: the reclaim of a holder whose session the store forgot
(`Store.acquire(reclaim=...)`), on a real Redis Cluster whose primary fails over to a
replica that lags behind a takeover; and the delete tombstones: the one of earlier
releases, still laid and read, in a slot of its own (``ns:rm:<sha256>``, no hash tag),
possibly on another primary, and the one in the session's own slot.

The cluster: two shards, each a primary and its replica (four ``redis-server``
processes, slots 0-8191 and 8192-16383). Every node replicates as ACL user ``repl``:
switching that user off on a primary (``ACL SETUSER repl off`` + ``CLIENT KILL USER
repl``) makes its replica lag from then on, deterministically (as
tests/test_sentinel_hunt.py does behind Sentinel). The failover is ``CLUSTER FAILOVER
TAKEOVER`` on the lagging replica, the old primary alive (it then turns replica of the
new one, its data replaced) or SIGKILLed first.

The session key is tests/test_hooks.py's ``KEY``; the namespace is drawn so that the
earlier releases' tombstone is on the other shard than the head's (or the same, where
asked).
Workers are tests/test_sentinel_hunt.py's `Worker` (its own store, real
`AgentSession` driven by the scripted LLM, ``on_lost`` recorded).

Found: the reclaim holds on a Cluster (the newer holder keeps the call whichever writes
first, the primary alive or killed; an ``rm`` after the failover stays deleted, its
tombstone on either shard). Two cases where a failover rolls back the tombstone's shard
or the head's and not the other:
- an ``rm``, then the head's shard failing over to before the takeover: the ``rm`` is
  undone, as on one Redis rolled back, and the newer holder keeps the call;
- an ``rm``, then the tombstone's shard failing over to before the ``rm``: the head's
  shard kept the delete, the holder found neither head nor tombstone, took that for a
  store that lost its data and wrote the deleted conversation back. Fixed by a
  tombstone in the session's slot (`KeyNames.tombstone`), which the head's shard keeps
  with the delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

import livekit_resume as lr
from livekit_resume.stores.base import Store
from livekit_resume.stores.redis.keys import KeyNames
from tests.faults.cluster import cluster_node, until
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_hooks import KEY
from tests.test_sentinel_hunt import Worker, stored

pytestmark = pytest.mark.filterwarnings("ignore")

HALF = 8192
TAKEN_AT = ("my name is Ada", "my code is 4711", "book me on monday")


# ------------------------------------------------------------------ the cluster


def _node(directory: Path, used: list[int]) -> RedisServer:
    # replicas replicate as user ``repl``, which a test switches off to make one lag
    extra = ["--repl-diskless-sync-delay", "0", "--masteruser", "repl", "--masterauth", "replpw"]
    return cluster_node(directory, used, extra)


def _bus(node: RedisServer) -> str:
    return node.extra[node.extra.index("--cluster-port") + 1]


def _field(node: RedisServer, name: str) -> str:
    for line in node.cli("info", "replication").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _repl_user(node: RedisServer) -> None:
    ok = node.cli("acl", "setuser", "repl", "on", ">replpw", "~*", "&*", "+@all")
    assert ok.strip() == "OK", ok


class Shard:
    def __init__(self, primary: RedisServer, replica: RedisServer, lo: int, hi: int) -> None:
        self.primary, self.replica = primary, replica
        self.lo, self.hi = lo, hi
        self.dead: RedisServer | None = None

    def owns(self, slot: int) -> bool:
        return self.lo <= slot <= self.hi


def _says(node: RedisServer, text: str, *command: str) -> bool:
    return text in node.cli(*command)


def _link_up(node: RedisServer) -> bool:
    return _field(node, "master_link_status") == "up"


def _in_sync(shard: Shard) -> bool:
    return (
        _field(shard.replica, "role") == "slave"
        and _link_up(shard.replica)
        and _field(shard.primary, "role") == "master"
    )


class LaggingCluster:
    """Two shards of a primary and a replica each; `cut` makes a shard's replica lag,
    `fail_over` promotes it."""

    def __init__(self, directory: Path) -> None:
        used: list[int] = []
        self.nodes = [_node(directory / f"n{i}", used) for i in range(4)]
        a1, a2, b1, b2 = self.nodes
        self.shards = [Shard(a1, b1, 0, HALF - 1), Shard(a2, b2, HALF, 16383)]
        self.broken = False

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> LaggingCluster:
        for n in self.nodes:
            n.start()
            _repl_user(n)
        first = self.nodes[0]
        for shard in self.shards:
            shard.primary.cli("cluster", "addslotsrange", str(shard.lo), str(shard.hi))
        for n in self.nodes[1:]:
            first.cli("cluster", "meet", "127.0.0.1", str(n.port), _bus(n))
        for shard in self.shards:
            pid = shard.primary.cli("cluster", "myid").strip()
            until(
                "the replica did not learn its primary",
                functools.partial(_says, shard.replica, pid, "cluster", "nodes"),
            )
            until(
                "the replica did not attach",
                functools.partial(_says, shard.replica, "OK", "cluster", "replicate", pid),
            )
        for shard in self.shards:
            until(
                "the replica did not sync",
                functools.partial(_link_up, shard.replica),
            )
        for n in self.nodes:
            until(
                "the cluster is not ok",
                functools.partial(_says, n, "cluster_state:ok", "cluster", "info"),
            )
        for shard in self.shards:
            until(
                "CLUSTER SLOTS does not list the replica",
                functools.partial(_says, first, str(shard.replica.port), "cluster", "slots"),
            )
        return self

    def shard_of(self, name: str) -> Shard:
        slot = key_slot(name.encode())
        return next(s for s in self.shards if s.owns(slot))

    def cut(self, shard: Shard) -> None:
        """From now on ``shard``'s replica receives nothing (it holds all it had)."""
        target = int(_field(shard.primary, "master_repl_offset"))
        until(
            "the replica did not catch up",
            lambda: int(_field(shard.replica, "slave_repl_offset") or -1) >= target,
        )
        assert shard.primary.cli("acl", "setuser", "repl", "off").strip() == "OK"
        shard.primary.cli("client", "kill", "user", "repl")
        until(
            "the replica's link is not down",
            lambda: _field(shard.replica, "master_link_status") == "down",
        )

    def fail_over(self, shard: Shard, *, kill: bool = False) -> None:
        """``CLUSTER FAILOVER TAKEOVER`` on the (lagging) replica; the old primary
        SIGKILLed first, or alive: it then replicates the new one (data replaced)."""
        old, new = shard.primary, shard.replica
        if kill:
            old.kill()
        until(
            "the replica did not take over",
            lambda: "OK" in new.cli("cluster", "failover", "takeover"),
        )
        until("the replica is not primary", lambda: _field(new, "role") == "master")
        shard.primary, shard.replica = new, old
        if kill:
            shard.dead = old
        else:
            self._demoted(old, new)
        for n in self.nodes:
            if n.running:
                until(
                    "the cluster is not ok after the failover",
                    functools.partial(_says, n, "cluster_state:ok", "cluster", "info"),
                )

    @staticmethod
    def _demoted(old: RedisServer, new: RedisServer) -> None:
        """Until the old primary replicates the new one, in sync. Gossip demotes it
        within milliseconds as a rule; now and then (about one run in ten here) it did
        not within 30 s: then it is told to (``CLUSTER REPLICATE``)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _field(old, "role") == "slave" and _link_up(old):
                return
            time.sleep(0.05)
        new_id = new.cli("cluster", "myid").strip()
        said = old.cli("cluster", "replicate", new_id)
        try:
            until(
                "the old primary did not turn replica and sync",
                lambda: _field(old, "role") == "slave" and _link_up(old),
            )
        except RuntimeError:
            print(said, old.cli("info", "replication"), old.cli("cluster", "nodes"))
            print((old.directory / "redis.log").read_text()[-3000:])
            raise

    def heal(self) -> None:
        """Back to two healthy shards after a test: a killed node started again (it
        rejoins as the new primary's replica), every replication user on, every replica
        in sync."""
        for shard in self.shards:
            if shard.dead is not None:
                shard.dead.start()
                shard.dead = None
        for n in self.nodes:
            _repl_user(n)
        for shard in self.shards:
            until(
                "a replica did not sync again",
                functools.partial(_in_sync, shard),
            )

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaggingCluster]:
    """One cluster for the module (starting one takes ~10 s: the replicas' offsets are
    gossiped before CLUSTER SLOTS lists them); healed after each test."""
    require_redis_server()
    c = LaggingCluster(tmp_path_factory.mktemp("clusterlost"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@contextlib.asynccontextmanager
async def lagging_cluster(c: LaggingCluster) -> AsyncIterator[LaggingCluster]:
    if c.broken:
        pytest.fail("the module's cluster could not be healed after an earlier test")
    try:
        yield c
    finally:
        try:
            await asyncio.to_thread(c.heal)
        except BaseException:
            c.broken = True  # the next tests fail at once, not after 30 s waits each
            raise


def namespace_for(c: LaggingCluster, *, tombstone_apart: bool) -> str:
    """A fresh namespace whose tombstone for KEY lies on the other shard than KEY's head
    (or on the same one)."""
    head = c.shard_of(f"x:{{{KEY}}}:head")
    while True:
        ns = f"c{uuid.uuid4().hex[:8]}"
        tomb = KeyNames(ns).legacy_tombstone(KEY)
        if (c.shard_of(tomb) is not head) == tombstone_apart:
            return ns


def open_worker_store(c: LaggingCluster, ns: str) -> Store:
    return lr.open_store(c.url, namespace=ns, socket_timeout=1.0, retries=1)


async def retried(aw_factory: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await aw_factory()
        except lr.StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def exists(store: Store) -> bool:
    return await retried(lambda: store.info(KEY)) is not None


# ------------------------------------------------------------------ the scenarios


async def _taken_over(
    c: LaggingCluster, ns: str, *, cut: bool = True
) -> tuple[Worker, Worker, Shard]:
    """w1 talks and saves; the head's replica is cut (``cut``); w2 takes over, talks
    and saves."""
    w1 = Worker(open_worker_store(c, ns), "w1")
    w2 = Worker(open_worker_store(c, ns), "w2")
    await w1.start()
    await w1.say("my name is Ada")
    assert isinstance(await w1.checkpoint(), int)
    head = c.shard_of(f"{ns}:{{{KEY}}}:head")
    if cut:
        await asyncio.to_thread(c.cut, head)
    await w2.start(takeover=True)
    await w2.say("my code is 4711")
    assert isinstance(await w2.checkpoint(), int)
    return w1, w2, head


@pytest.mark.parametrize(
    ("first", "kill"),
    [("newer", False), ("zombie", False), ("zombie", True)],
    ids=["newer-first", "zombie-first", "zombie-first-killed"],
)
async def test_a_cluster_failover_lagging_behind_a_takeover_keeps_the_newer_holder(
    shared_cluster: LaggingCluster, first: str, kill: bool
) -> None:
    """passes: coverage. w2 takes the call over from w1; the primary of the head's slot
    fails over (``CLUSTER FAILOVER TAKEOVER``, old primary alive or SIGKILLed) to its
    replica, cut before the takeover. Then the newer (w2) or the zombie (w1) writes
    first. Expected (failure-model.md "Redis rolled back"): w2 keeps the call with every
    turn once, w1 is fenced (LeaseLost, not vanished; on_lost), no zombie words stored."""
    async with lagging_cluster(shared_cluster) as c:
        ns = namespace_for(c, tombstone_apart=True)
        w1 = w2 = None
        try:
            w1, w2, head = await _taken_over(c, ns)
            await asyncio.to_thread(c.fail_over, head, kill=kill)
            _, owner, _ = await stored(w2.store)
            assert owner == "w1", f"the replica did not lag: the store says {owner!r} holds it"
            if first == "zombie":
                await w1.say("zombie words")
                await w1.checkpoint()
            await w2.say("book me on monday")
            got2 = await w2.checkpoint()
            await w1.say("more zombie words")
            got1 = await w1.checkpoint()
            texts, owner, _ = await stored(w2.store)
            assert isinstance(got2, int), f"w2 (newer) was refused: {got2!r}; stored {texts!r}"
            assert isinstance(got1, lr.LeaseLost) and not got1.vanished, (
                f"w1 (zombie) was not fenced: {got1!r}; stored {texts!r}"
            )
            assert owner == "w2", owner
            assert texts == w2.texts(), (texts, w2.texts())
            for t in TAKEN_AT:
                assert texts.count(t) == 1, (t, texts)
            assert not any("zombie" in t for t in texts), texts
            await asyncio.sleep(0.05)
            assert w1.lost and not w2.lost, (w1.lost, w2.lost)
        finally:
            for w in (w1, w2):
                if w is not None:
                    await w.close()


@pytest.mark.parametrize(
    ("apart", "first"),
    [(True, "newer"), (False, "newer"), (True, "zombie")],
    ids=["tombstone-apart", "tombstone-same", "tombstone-apart-zombie-first"],
)
async def test_rm_after_a_cluster_failover_lagging_behind_a_takeover_stays_deleted(
    shared_cluster: LaggingCluster, apart: bool, first: str
) -> None:
    """passes: coverage. As above; after the head's failover (the store holds w1's lease
    again, w2's takeover forgotten) an operator deletes the key (`Store.delete`, as
    ``rm``): the tombstone is laid at the clock (above w2's epoch), on the other shard or
    on the same one. Then both holders write, newer (or zombie) first. Expected (failure-model.md,
    "an operator's rm"; "at or below a deleted session's tombstone, is fenced"): both are
    fenced (LeaseLost, not vanished), the session stays deleted."""
    async with lagging_cluster(shared_cluster) as c:
        ns = namespace_for(c, tombstone_apart=apart)
        w1 = w2 = None
        op = open_worker_store(c, ns)
        try:
            w1, w2, head = await _taken_over(c, ns)
            await asyncio.to_thread(c.fail_over, head)
            assert (await stored(w2.store))[1] == "w1", "the replica did not lag"
            assert await retried(lambda: op.delete(KEY)) is True
            if first == "zombie":
                await w1.say("zombie words")
                got1 = await w1.checkpoint()
            await w2.say("book me on monday")
            got2 = await w2.checkpoint()
            if first == "newer":
                await w1.say("zombie words")
                got1 = await w1.checkpoint()
            assert not await exists(op), (
                f"the deleted session was written back: {await stored(op)!r} "
                f"(w2: {got2!r}, w1: {got1!r})"
            )
            assert isinstance(got2, lr.LeaseLost) and not got2.vanished, repr(got2)
            assert isinstance(got1, lr.LeaseLost) and not got1.vanished, repr(got1)
        finally:
            for w in (w1, w2):
                if w is not None:
                    await w.close()
            await op.aclose()


def tombstone_shard(c: LaggingCluster, ns: str) -> Shard:
    return c.shard_of(KeyNames(ns).legacy_tombstone(KEY))


async def test_a_failover_of_the_head_to_before_an_rm_undoes_it_and_the_newer_holder_keeps_the_call(
    shared_cluster: LaggingCluster,
) -> None:
    """w2 takes the call over from w1 (the head's replica cut before the takeover); an
    operator deletes the key (`Store.delete`, as ``rm``): the tombstone lands on the
    other shard, the head is deleted on its shard. Then the head's shard fails over to
    its lagging replica: the head is back at w1's lease, the takeover and the delete
    forgotten. As any rollback that loses an ``rm`` (on one Redis too, which loses the
    tombstone with it): the delete is undone, and of the holders the store forgot the
    latest keeps the call (failure-model.md, "Redis rolled back"): w2 reclaims its
    epoch and writes the whole conversation, w1 is fenced. (The hunt asked for the
    tombstone, which survived on the other shard, to fence w2; w1's commit would land
    then, as commits do not read it.)"""
    async with lagging_cluster(shared_cluster) as c:
        ns = namespace_for(c, tombstone_apart=True)
        w1 = w2 = None
        op = open_worker_store(c, ns)
        try:
            w1, w2, head = await _taken_over(c, ns)
            assert await retried(lambda: op.delete(KEY)) is True
            assert not await exists(op)
            await asyncio.to_thread(c.fail_over, head)
            _, owner, _ = await stored(op)
            assert owner == "w1", f"the head's replica did not lag: {owner!r} holds it"
            await w2.say("book me on monday")
            got2 = await w2.checkpoint()
            await w1.say("zombie words")
            got1 = await w1.checkpoint()
            texts, owner, _ = await stored(op)
            assert isinstance(got2, int), f"w2 (the newer holder): {got2!r}"
            assert isinstance(got1, lr.LeaseLost) and not got1.vanished, repr(got1)
            assert owner == "w2", owner
            assert "book me on monday" in texts and "zombie words" not in texts, texts
        finally:
            for w in (w1, w2):
                if w is not None:
                    await w.close()
            await op.aclose()


async def test_rm_then_the_tombstones_failover_does_not_bring_it_back(
    shared_cluster: LaggingCluster,
) -> None:
    """w2 takes the call over from w1 (no lag on the head's shard). The tombstone's
    shard (the other one; the tombstone of earlier releases) has its replica cut; an
    operator deletes the key: that tombstone lands on that primary only, the head's
    shard deletes the session (and keeps the delete: it does not fail over). Then the
    tombstone's shard fails over to its lagging replica: that tombstone is gone, the
    delete stands, and with it the tombstone laid in the session's slot.

    Expected (failure-model.md, "an operator's rm ... of a session a worker holds
    live": "the worker's next save or lease renewal is refused as fenced (LeaseLost,
    "deleted")"; multi-worker.md "a deleted conversation is never written back"; the
    only exceptions listed are a worker frozen past the tombstone's day and a Redis
    that evicted it): w2's next save is fenced and the key stays deleted."""
    async with lagging_cluster(shared_cluster) as c:
        ns = namespace_for(c, tombstone_apart=True)
        w1 = w2 = None
        op = open_worker_store(c, ns)
        try:
            w1, w2, _ = await _taken_over(c, ns, cut=False)
            tomb = tombstone_shard(c, ns)
            await asyncio.to_thread(c.cut, tomb)
            assert await retried(lambda: op.delete(KEY)) is True
            await asyncio.to_thread(c.fail_over, tomb)
            await w2.say("book me on monday")
            got2 = await w2.checkpoint()
            await w1.say("zombie words")
            got1 = await w1.checkpoint()
            if await exists(op):
                texts, owner, _ = await stored(op)
                pytest.fail(
                    "the deleted session was written back after the tombstone's shard "
                    f"failed over (the head's shard kept the delete): held by {owner!r}, "
                    f"stored {texts!r}; w2 -> {got2!r}, w1 -> {got1!r}"
                )
            assert isinstance(got2, lr.LeaseLost) and not got2.vanished, repr(got2)
        finally:
            for w in (w1, w2):
                if w is not None:
                    await w.close()
            await op.aclose()
