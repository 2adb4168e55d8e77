"""Hunted: Redis failover and resharding against the rollback of lost versions (whole
commits, damaged listings, a trim passing over a lost version). Real redis-server,
Sentinel and Cluster processes (tests/redis_servers.py). Five of these failed on
7b97cdd, where the scripts were told by the client that the slot's keys were all on
their node (a retry after a refusal found the slot not moving): a client that could
not ask (`CLUSTER NODES` timed out, or not granted) or a resharding starting between
the check and the retry wedged the session or listed an acknowledged version damaged.
Each docstring says what is expected and what happened."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from livekit_resume.errors import LeaseLost, SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Commit, Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.scripts import Scripts
from tests.redis_servers import RedisCluster, require_redis_server
from tests.test_cluster_reshard import Reshard, _open, _scripts_known_to
from tests.test_redis_layout import HEAD, commit

KEY = "room-hunt"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    require_redis_server()
    started = RedisCluster(tmp_path / "cluster").start()
    try:
        yield started
    finally:
        started.stop()


def _blind_cluster_nodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``CLUSTER NODES`` fails as a slow node's would (a timeout), or as a user whose ACL
    lacks ``cluster|nodes`` (docs/security.md's minimal line grants no CLUSTER command):
    `Scripts._slot_moving` then 'cannot say'."""
    asked: list[str] = []
    real = Scripts._slot_moving

    async def blind(self: Scripts, key: str) -> bool:
        asked.append(key)
        client = self._server.client
        orig = client.execute_command

        async def failing(*args: Any, **kw: Any) -> Any:
            if args and str(args[0]).upper() == "CLUSTER NODES":
                raise redis_sync.exceptions.TimeoutError("Timeout reading from socket")
            return await orig(*args, **kw)

        client.execute_command = failing  # type: ignore[method-assign]
        try:
            return await real(self, key)
        finally:
            del client.execute_command

    monkeypatch.setattr(Scripts, "_slot_moving", blind)
    return asked


# -- Cluster resharding: the HERE retry ------------------------------------------------


_DOC = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
_LINES = [
    line.split(None, 3)[3]
    for line in _DOC.splitlines()
    if line.startswith("ACL SETUSER tenant-acme ")
]
# docs/security.md "Redis: the minimal ACL", verbatim: the line, then a Cluster's
MIN_ACL = _LINES[0].replace(">LONG-RANDOM-PASSWORD", ">pw")
CLUSTER_ACL = " " + _LINES[1]


def _acl_store(cluster: RedisCluster, extra: str = "", **opts: Any) -> RedisStore:
    for node in cluster.nodes:
        assert node.cli("acl", "setuser", "acme", *(MIN_ACL + extra).split()).strip() == "OK"
    url = "redis+cluster://acme:pw@" + ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes)
    options: dict[str, Any] = {"retries": 1, "socket_timeout": 2.0, **opts}
    return RedisStore.from_url(url, namespace="acme", **options)


@pytest.mark.cluster
async def test_the_documented_minimal_acl_runs_the_store_on_a_cluster(
    cluster: RedisCluster,
) -> None:
    """Expected (docs/security.md: "On a Cluster the same line applies to every node"):
    a store of a user granted the minimal line acquires and commits on a Cluster.
    Actual: StoreUnavailable "Redis Cluster cannot be connected … Cluster mode is not
    enabled on this node": the line grants no ``CLUSTER SLOTS`` (nor ``COMMAND``,
    ``ASKING``) that redis-py's Cluster client needs. Responsible: docs/security.md:155
    (the line), and the misleading error of stores/redis/client.py's mapping.
    """
    store = _acl_store(cluster, CLUSTER_ACL)
    try:
        lease = await store.acquire(KEY, "w")
        assert await commit(store, lease, 0) == 1
    finally:
        await store.aclose()


@pytest.mark.cluster
@pytest.mark.parametrize("blind", ["timeout", "acl"])
async def test_a_trim_on_the_importing_node_when_cluster_nodes_cannot_answer_leaves_no_orphan(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch, blind: str
) -> None:
    """Expected: a commit on the importing node of a half-moved slot (head moved, the
    oldest retained version not yet) lands without trimming what has not moved, or is
    StoreUnavailable; after the move every retained version reads, and rm leaves no key.

    `_slot_moving` returns False when it 'cannot say' (CLUSTER NODES timed out, or an
    ACL user without cluster|nodes): `checked` then says SnapshotCorrupt and
    `RedisStore._run_placed` retries the commit with HERE ('h'), which trims v:1 on the
    importing node. Actual: the retry runs there under ASKING, appends to log:0 and
    writes v:4 and v:4:b, then its trim's ``DEL v:1 v:1:b`` (v:1 still on the old node)
    fails the script ("Script attempted to access a non local key"): StoreUnavailable,
    but the writes before the error stay (Redis does not roll a script back). Once the
    slot has moved every commit of the session is SnapshotCorrupt ("log … holds 4
    records where version 3 left 3"): the session is wedged by a resharding.
    Responsible: stores/redis/store.py `_run_placed` (retries with here=True whenever
    `checked` raised SnapshotCorrupt, which it also does when `Scripts._slot_moving`
    could not ask, scripts.py:180 `return False`).
    """
    if blind == "acl":
        # what redis-py's Cluster client needs beyond the documented line; no cluster|nodes
        store = _acl_store(cluster, " +cluster|slots +command +asking", keep=3)
    else:
        store = _open(cluster, "blind", keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(3):
            await commit(store, lease, base)
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)
        move.begin()
        move.move(*(move.prefix + s for s in ("head", "log:0", "v:3", "v:3:b", "v:2", "v:2:b")))
        asked = _blind_cluster_nodes(monkeypatch) if blind == "timeout" else []
        landed = False
        try:
            assert await asyncio.wait_for(commit(store, lease, 3), 20) == 4
            landed = True
        except StoreUnavailable:
            pass
        except SnapshotCorrupt as e:
            pytest.fail(f"a half-moved slot reported as damage: {e}")
        monkeypatch.undo()
        move.finish()
        if not landed:
            assert await commit(store, lease, 3) == 4
        assert [v.version for v in await store.versions(KEY)] == [2, 3, 4]
        for n in (2, 3, 4):
            assert (await store.load(KEY, n)).head == HEAD + b"%d" % n
        keys = move.keys_on(move.target)
        assert move.prefix + "v:1" not in keys and move.prefix + "v:1:b" not in keys, (
            f"trimmed version came back with the slot (asked CLUSTER NODES {len(asked)}x): {keys}"
        )
        assert await store.delete(KEY)
        assert move.keys_on(move.target) == [], "rm left keys behind"
    finally:
        await store.aclose()


@pytest.mark.cluster
async def test_salvage_during_a_half_moved_slot_does_not_roll_back_an_acknowledged_version(
    cluster: RedisCluster,
) -> None:
    """Expected (failure-model.md: a slot being moved is StoreUnavailable, "retried like
    an outage"; restore(salvage=True) is for a latest version that cannot be read): while
    the slot is half moved (head, log and v:1..v:2 moved, v:3 not yet), what salvage would
    restore (`bridge.newest_readable`) is StoreUnavailable, not version 2.
    Actual, for a user whose ACL lacks cluster|nodes (`_slot_moving` 'cannot say'): the
    latest (acknowledged) version 3 is listed damaged and salvage picks version 2, whose
    whole rewrite rolls the conversation back past version 3. Responsible:
    stores/redis/scripts.py:180 (`_slot_moving` False when it cannot ask) feeding
    store.py `_damaged` and bridge.py:214 `newest_readable`.
    """
    from livekit_resume.bridge import newest_readable

    store = _acl_store(cluster, " +cluster|slots +command +asking", keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(3):
            await commit(store, lease, base)
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)
        move.begin()
        move.move(*(move.prefix + s for s in ("head", "log:0", "v:1", "v:1:b", "v:2", "v:2:b")))
        picked: Any = None
        with contextlib.suppress(StoreUnavailable):
            top, stored = await asyncio.wait_for(newest_readable(store, KEY), 20)
            picked = (top, stored.version if stored else None)
        move.finish()
        assert picked is None, f"salvage would restore {picked} while the slot moved"
        assert (await store.load(KEY)).version == 3
    finally:
        await store.aclose()


# -- Sentinel failover ------------------------------------------------------------------


def _edit(key: str, epoch: int, base: int, n_items: int = 1) -> Commit:
    """One edit of the same item: the log grows, the live size stays 1 (compacts every
    ~66 commits)."""
    n = base + 1
    return Commit(key, epoch, base, HEAD + b"%d" % n, [Record("h", "i1", b"item %d" % n)], 1)


async def _until_primary(store: RedisStore, lease: Any, base: int) -> int:
    """Commits (the same one, same id) until the promoted primary answers."""
    c = _edit(lease.key, lease.epoch, base)
    c = Commit(c.key, c.epoch, c.base_version, c.head, c.records, c.size, commit_id=f"c{base}")
    for _ in range(150):
        try:
            return await store.commit(c)
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    raise AssertionError("the promoted primary never answered")


@pytest.mark.parametrize("wait", [1, 0], ids=["wait_replicas", "async"])
async def test_a_sentinel_failover_under_trims_and_compactions_keeps_every_version(
    tmp_path: Path, wait: int
) -> None:
    """Expected (failure-model.md, multi-worker.md): with wait_replicas=1 every
    acknowledged version survives the primary's SIGKILL; with or without it, every
    retained version the promoted primary lists loads (none damaged: a failover is not
    damage), the session goes on committing, trimming and compacting, and rm leaves no
    key."""
    from tests.faults.sentinel import SentinelPair

    require_redis_server()
    pair = SentinelPair(tmp_path / "s").start()
    store = RedisStore.from_url(
        pair.url, namespace="sfo", keep=3, socket_timeout=1.0, retries=0, wait_replicas=wait
    )
    try:
        lease = await store.acquire(KEY, "w")
        base = 0
        for _ in range(140):  # two compactions
            base = await store.commit(_edit(KEY, lease.epoch, base))
        acked = base
        await asyncio.to_thread(pair.fail_over)
        try:
            got = await _until_primary(store, lease, base)
        except LeaseLost as e:
            assert wait == 0 and e.vanished, e
            return
        assert got == acked + 1
        listed = await store.versions(KEY)
        assert [v.damaged for v in listed] == [None] * len(listed)
        assert [v.version for v in listed] == [got - 2, got - 1, got]
        for v in listed:
            assert (await store.load(KEY, v.version)).head == HEAD + b"%d" % v.version
        base = got
        for _ in range(70):
            base = await store.commit(_edit(KEY, lease.epoch, base))
        assert (await store.load(KEY)).streams["h"][0][1] == b"item %d" % base
        assert await store.delete(KEY)
        client = redis_sync.Redis(port=pair.replica.port)
        try:
            assert [k for k in client.scan_iter("sfo:{*")] == []
        finally:
            client.close()
    finally:
        await store.aclose()
        pair.stop()


@pytest.mark.cluster
async def test_a_commit_trimming_a_lost_version_while_its_slot_is_half_moved_wedges_nothing(
    cluster: RedisCluster,
) -> None:
    """A session whose oldest retained version v:1 was lost (removed by hand) commits,
    its trim dropping v:1, while a resharding of its slot is half done (head, log, v:2
    and v:3 moved). Expected: StoreUnavailable with nothing written, or landed whole;
    once the slot has moved the session commits again and every retained version loads.
    (Found on 3b5860c: a retry told the slot's keys were all here ran on the importing
    node, wrote, then failed on the trim's DEL of a key not moved: every later commit
    was SnapshotCorrupt. The scripts now ask the node whether the slot is settled, in
    the same script, before their first write.)"""
    store = _open(cluster, "race", keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(3):
            await commit(store, lease, base)
        move = Reshard(cluster, store, KEY)
        _scripts_known_to(move.target)
        move.source.cli("del", move.prefix + "v:1", move.prefix + "v:1:b")  # lost
        move.begin()
        move.move(*(move.prefix + s for s in ("head", "log:0", "v:2", "v:2:b", "v:3", "v:3:b")))
        with contextlib.suppress(StoreUnavailable):
            assert await asyncio.wait_for(commit(store, lease, 3), 20) == 4
        move.finish()
        latest = (await store.load(KEY)).version
        assert await commit(store, lease, latest) == latest + 1
        listed = await store.versions(KEY)
        assert [v.damaged for v in listed] == [None] * 3
        for v in listed:
            assert (await store.load(KEY, v.version)).head == HEAD + b"%d" % v.version
    finally:
        await store.aclose()


@pytest.mark.cluster
@pytest.mark.parametrize("reshard", [False, True], ids=["settled", "moved-after"])
async def test_a_lost_oldest_version_on_a_cluster_is_trimmed_and_the_slot_moves_clean(
    cluster: RedisCluster, reshard: bool
) -> None:
    """Control for the HERE retry: v:1 lost on a settled slot, the next commits trim past
    it and compact (the log grows by one record a commit); a later full reshard moves the
    session whole: every retained version loads and rm leaves no key."""
    store = _open(cluster, "lost", keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        base = 0
        for _ in range(3):
            base = await store.commit(_edit(KEY, lease.epoch, base))
        move = Reshard(cluster, store, KEY)
        move.source.cli("del", move.prefix + "v:1")
        for _ in range(70):
            base = await store.commit(_edit(KEY, lease.epoch, base))
        if reshard:
            _scripts_known_to(move.target)
            move.begin()
            move.finish()
        listed = await store.versions(KEY)
        assert [(v.version, v.damaged) for v in listed] == [
            (n, None) for n in range(base - 2, base + 1)
        ]
        for v in listed:
            assert (await store.load(KEY, v.version)).head == HEAD + b"%d" % v.version
        assert await store.delete(KEY)
        node = move.target if reshard else move.source
        assert move.keys_on(node) == []
    finally:
        await store.aclose()
