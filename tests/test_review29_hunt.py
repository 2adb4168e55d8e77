"""Hunt `review29`: a review of fbbaadd (the delete tombstone also in the session's own
Cluster slot; ``wait_replicas`` waits for a delete as for a commit).

Looks for what tests/test_slottomb_hunt.py does not cover: the WAIT of a delete on a
Cluster (which node, how many, an ``rm`` whose script runs twice), a Sentinel failover
right after an ``rm`` made with ``wait_replicas=1``, an ``rm`` with a lagging replica.
Its case of numbers at a held session's tombstone that tombstone.lua read as an epoch
(``1e300``, hex) is a parameter of tests/test_slottomb_hunt.py's foreign-data case.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as AsyncCluster

from livekit_resume.errors import LeaseLost
from livekit_resume.stores.redis import RedisStore
from tests.faults.cluster import until
from tests.redis_servers import RedisCluster, RedisFactory
from tests.test_auth_hunt import DOC_COMMANDS, NS, _acl
from tests.test_clusterlost_hunt import retried
from tests.test_redis_faults import calls
from tests.test_sentinel_hunt import LaggingDeployment, deployment, open_worker_store
from tests.test_slottomb_hunt import _commit, _held, _outcome

pytestmark = pytest.mark.filterwarnings("ignore")


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# ------------------------------------------------------- 1. Cluster: WAIT after a delete


async def test_cluster_a_delete_waits_on_the_node_of_its_slot_once_per_script_run(
    redis_cluster: RedisCluster,
) -> None:
    """Cluster, primaries without replicas, ``wait_replicas=1``. Sessions of several
    slots and nodes are deleted; then one whose head was removed by hand (remains left:
    the delete script runs twice, ``scan`` then the delete).

    Should (stores/redis/__init__.py: "A delete waits the same way [as a commit], for
    itself and the tombstone in the session's slot before it"; "one pipeline, on the
    node of the session's slot on a Cluster"; multi-worker.md: "fewer is logged and
    counted (store.under_replicated)"): every WAIT of a delete is sent to the node of
    the session's slot (a WAIT elsewhere answers for a connection that wrote nothing);
    each delete that deleted something is counted once in ``under_replicated`` (0 of 1
    replicas), the ``scan`` answer of the headless one not at all."""
    store = RedisStore.from_url(
        redis_cluster.url, namespace=f"r29{time.time_ns()}", wait_replicas=1, wait_timeout=10
    )
    nodes = {n.port: n for n in redis_cluster.nodes}

    def waits() -> dict[int, int]:
        return {port: calls(node, "wait") for port, node in nodes.items()}

    try:
        client = store._client
        assert isinstance(client, AsyncCluster)
        keys = [f"k{n}" for n in range(12)]
        leases = {}
        for key in keys:  # also loads every script on every node the keys reach
            leases[key] = await store.acquire(key, "w", ttl=60.0)
            assert await _commit(store, key, leases[key].epoch, 0, b"hi") == 1
        # warm the delete and tombstone scripts on each node: one throwaway delete each
        warmed: set[int] = set()
        for n in range(2000):
            w = f"warm{n}"
            node = client.get_node_from_key(store._head_key(w))
            assert node is not None
            if int(node.port) in warmed:
                continue
            lease = await store.acquire(w, "w", ttl=60.0)
            assert await _commit(store, w, lease.epoch, 0, b"x") == 1
            assert await store.delete(w) is True
            warmed.add(int(node.port))
            if warmed == set(nodes):
                break
        assert warmed == set(nodes)
        headless = keys[-1]
        await client.delete(store._head_key(headless))  # its version keys remain
        counted_before = store.under_replicated
        before = waits()
        expected = dict.fromkeys(nodes, 0)
        for key in keys[:-1]:
            assert await store.delete(key) is True
            node = client.get_node_from_key(store._head_key(key))
            assert node is not None
            expected[int(node.port)] += 1
        assert store.under_replicated - counted_before == len(keys) - 1
        assert await store.delete(headless) is True
        node = client.get_node_from_key(store._head_key(headless))
        assert node is not None
        expected[int(node.port)] += 2  # the 'scan' trip and the delete trip
        after = waits()
        assert {p: after[p] - before[p] for p in nodes} == expected
        assert len([n for n in expected.values() if n]) > 1
        assert store.under_replicated - counted_before == len(keys)
        for key in keys:
            assert await store.info(key) is None
    finally:
        await store.aclose()


# -------------------------------------------------- 2. Sentinel: rm, then a failover


def _cut_at_once(d: LaggingDeployment) -> None:
    """The replica receives nothing from now on; unlike `LaggingDeployment.cut`, it is
    not let catch up first: it holds what the primary had sent when ``rm`` returned."""
    assert d.primary.cli("acl", "setuser", "repl", "off").strip() == "OK"
    d.primary.cli("client", "kill", "user", "repl")
    until("the replica's link is not down", lambda: d._link(d.replica) == "down")


async def test_sentinel_rm_with_wait_replicas_then_a_failover_keeps_it_and_fences_the_holder(
    tmp_path: Path,
) -> None:
    """Sentinel, a primary and one replica. H holds K and saved v1. An operator's store
    with ``wait_replicas=1`` deletes K; the moment it returns the replica is cut off
    (no catching up), the primary is SIGKILLed and Sentinel promotes the replica.

    Should (multi-worker.md: "wait_replicas=n makes a commit, and a delete, wait ...
    until n replicas have it"; failure-model.md: "With wait_replicas a delete now waits
    for the replicas as a commit does ... and so for the tombstone in the session's
    slot"; row "an operator's rm": the holder's next save or renewal is "refused as
    fenced (LeaseLost, "deleted")"): the rm is not counted under-replicated; on the new
    primary K is gone, and H's commit and renewal are fenced (not vanished), K stays
    deleted, and a new session under K starts above H's epoch."""
    ns = f"s{uuid.uuid4().hex[:8]}"
    key = "room-r29"
    async with deployment(tmp_path) as d:
        h = open_worker_store(d, ns)
        op = open_worker_store(d, ns, wait_replicas=1, wait_timeout=800)
        try:
            lease = await _held(h, key)
            assert await op.delete(key) is True
            assert op.under_replicated == 0  # type: ignore[attr-defined]
            await asyncio.to_thread(_cut_at_once, d)
            await asyncio.to_thread(d.fail_over)
            assert await retried(lambda: op.info(key)) is None, "the rm was lost"
            got = await _outcome(retried(lambda: _commit(h, key, lease.epoch, 1, b"H: back")))
            assert isinstance(got, LeaseLost) and not got.vanished, repr(got)
            renewed = await _outcome(retried(lambda: h.renew(lease, ttl=60.0)))
            assert isinstance(renewed, LeaseLost) and not renewed.vanished, repr(renewed)
            assert await retried(lambda: op.info(key)) is None
            fresh = await retried(lambda: op.acquire(key, "N", ttl=60.0))
            assert fresh.epoch > lease.epoch
        finally:
            await h.aclose()
            await op.aclose()


async def test_sentinel_rm_with_a_lagging_replica_is_warned_and_counted_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sentinel, a primary and one replica that receives nothing any more (cut). An
    operator's store with ``wait_replicas=1`` deletes K (held by H).

    Should (multi-worker.md: a delete waits "until n replicas have it; fewer is logged
    and counted (store.under_replicated), not raised"): ``delete`` returns True, K is
    gone on the primary, ``under_replicated`` is 1 and one warning names the delete of
    K; a second ``rm`` of the now absent K counts nothing more; H is fenced."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    ns = f"s{uuid.uuid4().hex[:8]}"
    key = "room-r29"
    async with deployment(tmp_path) as d:
        h = open_worker_store(d, ns)
        op = open_worker_store(d, ns, wait_replicas=1, wait_timeout=100)
        try:
            lease = await _held(h, key)
            await asyncio.to_thread(d.cut)
            assert await op.delete(key) is True
            assert op.under_replicated == 1  # type: ignore[attr-defined]
            [warning] = _warnings(caplog, "0 of 1 replicas")
            assert warning.startswith(f"delete of session {key!r}"), warning
            assert await op.delete(key) is False
            assert op.under_replicated == 1  # type: ignore[attr-defined]
            got = await _outcome(_commit(h, key, lease.epoch, 1, b"H: back"))
            assert isinstance(got, LeaseLost) and not got.vanished, repr(got)
        finally:
            await h.aclose()
            await op.aclose()


# ------------------------------------- 3. a delete's WAIT and the store's socket timeout


@pytest.mark.parametrize(
    ("wait_timeout", "socket_timeout"), [(0, 0.5), (1500, 0.3)], ids=["wait0", "wait-beyond"]
)
async def test_a_wait_timeout_the_socket_timeout_would_cut_is_refused(
    make_redis: RedisFactory,
    caplog: pytest.LogCaptureFixture,
    wait_timeout: int,
    socket_timeout: float,
) -> None:
    """A store with ``wait_replicas=1`` and a ``wait_timeout`` of 0 (which Redis's
    ``WAIT`` reads as "for ever"), or longer than ``socket_timeout``, deletes K while its
    one replica does not answer (SIGSTOP).

    Should (multi-worker.md, replicas row: a delete waits "until n replicas have it;
    fewer is logged and counted (store.under_replicated), not raised"): never a delete
    that landed reported as failed.

    Failed on fbbaadd, which made deletes wait (commits had, and have, the same
    settings): the WAIT blocked past the socket timeout, the trip was cut
    (StoreUnavailable "Timeout reading") though the delete was applied, so ``rm``
    reported a failure for a session it deleted. Such settings are now refused when the
    store is made, by `from_url` and for a client made by hand, standalone or Cluster;
    a ``wait_timeout`` below the socket timeout deletes, warns and counts."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    primary = make_redis()
    replica = make_redis.replica_of(primary)
    options: dict[str, Any] = {"wait_replicas": 1, "wait_timeout": wait_timeout}
    with pytest.raises(ValueError, match="wait_timeout"):
        RedisStore.from_url(primary.url, socket_timeout=socket_timeout, **options)
    by_hand = Redis.from_url(primary.url, socket_timeout=socket_timeout)
    with pytest.raises(ValueError, match="wait_timeout"):
        RedisStore(by_hand, **options)
    await by_hand.aclose()
    with pytest.raises(ValueError, match="wait_timeout"):
        RedisStore(AsyncCluster(host="127.0.0.1", port=1, socket_timeout=socket_timeout), **options)
    store = RedisStore.from_url(
        primary.url,
        namespace="r29",
        wait_replicas=1,
        wait_timeout=int(socket_timeout * 500),
        socket_timeout=socket_timeout,
        retries=0,
    )
    key = "room-r29"
    try:
        await _held(store, key)
        replica.pause()
        try:
            got = await _outcome(store.delete(key))
        finally:
            replica.resume()
        assert got is True, f"rm of {key!r} -> {got!r}"
        assert store.under_replicated == 1 and _warnings(caplog, "0 of 1 replicas")
        assert await store.info(key) is None
    finally:
        await store.aclose()


async def test_the_documented_acl_user_deletes_with_wait_replicas_without_a_warning(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary and a replica in sync; a user granted exactly docs/security.md's line
    (it grants ``+wait``) opens the store with ``wait_replicas=1``, holds K, and
    deletes it.

    Should (security.md: the line "runs every store operation"; multi-worker.md: a
    delete waits for the replicas): the delete returns True, no warning (no "WAIT
    failed", no "without a tombstone"), ``under_replicated`` 0, and the replica holds
    both tombstones and no head."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    primary = make_redis()
    replica = make_redis.replica_of(primary)
    url = _acl(primary, "tenant", *DOC_COMMANDS)
    store = RedisStore.from_url(url, namespace=NS, wait_replicas=1, wait_timeout=3000)
    key = "room-r29"
    try:
        lease = await _held(store, key)
        caplog.clear()
        assert await store.delete(key) is True
        assert store.under_replicated == 0
        assert not _warnings(caplog, "WAIT failed") and not _warnings(caplog, "tombstone")
        names = store._names
        on_replica = [replica.cli("GET", n).strip() for n in names.tombstones(key)]
        assert all(v.isdigit() and int(v) >= lease.epoch for v in on_replica), on_replica
        assert replica.cli("EXISTS", names.head(key)).strip() == "0"
    finally:
        await store.aclose()
