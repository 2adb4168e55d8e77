"""Hunt `review28`: a review of 8eb3d5d (Redis: after every reclaim granted at its own
epoch, `RedisStore._fence_reclaim_of_deleted` reads the key's tombstone again; at or
above the epoch, with no version in the session, the session is deleted under the
reclaimer's lease and the reclaim fenced).

Looks for legitimate reclaims now fenced, deleted, or refused: an old tombstone of an
earlier life of the key under a holder at version 0 after a rollback; the new ``info``
read failing after the grant; a Redis Cluster whose node holding the tombstone's slot
is stopped. Reuses tests/test_review26_hunt.py's and tests/test_review27_hunt.py's
helpers (``save``, ``LEASE``, the Redis backend's snapshot / rollback).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import livekit_resume as lr
from livekit_resume.agent_hooks.lease import LeaseHolder
from livekit_resume.errors import StoreUnavailable
from livekit_resume.stores.base import Commit
from livekit_resume.stores.redis.keys import KeyNames
from tests.redis_servers import RedisCluster, RedisServer, require_redis_server
from tests.test_fence_hunt import FakeClock
from tests.test_lost_hunt import bare_redis
from tests.test_review26_hunt import LEASE, RedisBackend, save
from tests.test_review27_hunt import deletes_watched, rm_whose_delete_fails

__all__ = ["bare_redis"]  # a fixture, shared

pytestmark = pytest.mark.filterwarnings("ignore")


def _store(server: RedisServer, clock: FakeClock, ns: str) -> Any:
    return lr.open_store(server.url, namespace=ns, clock=clock)


async def _session_keys_only_rollback(store: Any, snap: list[Any], key: str) -> None:
    """The session's own keys (its hash tag) go back to ``snap``; every other key (the
    tombstone, in a slot of its own: another node on a Cluster) is left as it is now."""
    raw = store._client
    tag = "{" + key + "}"
    for k in await raw.keys("*"):
        if tag in k.decode():
            await raw.delete(k)
    for k, pttl, data in snap:
        if tag in k.decode():
            await raw.restore(k, max(pttl, 0), data, replace=True)


async def _h_at_v2(
    store: Any, b: RedisBackend, clock: FakeClock, key: str
) -> tuple[LeaseHolder, Any]:
    """H holds ``key`` (30 s lease) and commits v1 and v2: H, and the store's keys at v1."""
    h = LeaseHolder(store, key, "H", 30.0)
    await h.acquire(takeover=False)
    assert await save(h, 0, b"H: hello") == 1
    at_v1 = await b.snapshot()
    clock.advance(100)
    assert await save(h, 1, b"H: my name is Ada") == 2
    return h, at_v1


# ------------------------- 1. an old tombstone of an earlier life, the holder at v0


@pytest.mark.parametrize("lost", ["rolled-back-to-v0", "session-keys-emptied"])
async def test_redis_a_holder_at_v0_above_an_earlier_lifes_tombstone_reclaims_and_saves(
    bare_redis: RedisServer, lost: str
) -> None:
    """passes: coverage. The key lived (A, v1) and an operator ``rm``'d it a minute ago
    (tombstone T). H restores it anew (E > T, version 0) and commits v1; the store then
    goes back to H's acquisition, before its first version (``rolled-back-to-v0``: head at
    E, version 0, H's live lease), or loses the session's keys with the tombstone kept
    (``session-keys-emptied``: a Cluster node restarted empty, the tombstone's node
    not). H's next save reclaims E: the tombstone is below E, so it is granted, nothing
    is deleted, and the whole conversation lands (`lease.epoch > tombstone` is enough)."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = _store(bare_redis, clock, ns)
    b = RedisBackend(store, clock)
    key = f"ol-{uuid.uuid4().hex[:6]}"
    try:
        a = await store.acquire(key, "A", ttl=60)
        assert await store.commit(Commit(key, a.epoch, 0, b"A: earlier life", [], 0)) == 1
        clock.advance(100)
        assert await store.delete(key)  # the operator's rm, a minute ago
        tomb = await store._tombstone(key)
        assert tomb is not None
        clock.advance(60_000_000)
        h = LeaseHolder(store, key, "H", 30.0)
        await h.acquire(takeover=False)
        assert h.epoch > tomb, (h.epoch, tomb)
        at_v0 = await b.snapshot()
        clock.advance(100)
        assert await save(h, 0, b"H: hello") == 1
        clock.advance(100)
        if lost == "rolled-back-to-v0":
            await b.rollback(at_v0)
            info = await store.info(key)
            assert info is not None and (info.owner, info.version) == ("H", 0), info
        else:
            await _session_keys_only_rollback(store, [], key)
            assert await store.info(key) is None
        assert await store._tombstone(key) == tomb
        with deletes_watched(store) as deletes:
            clock.advance(100)
            got = await save(h, 1, b"H: hello, whole again")
        assert isinstance(got, int), (
            f"[{lost}] H (epoch {h.epoch}, above the earlier life's tombstone {tomb}) "
            f"reclaiming its own session was refused: {got!r}"
        )
        assert not deletes, deletes
        stored = await store.load(key)
        assert stored.head == b"H: hello, whole again", stored.head
        info = await store.info(key)
        assert info is not None and info.owner == "H" and info.epoch == h.epoch, info
        assert key in await store.keys()
    finally:
        await store.aclose()


# ------------------------------------ 2. the new `info` read fails after the grant


async def test_redis_the_fences_info_read_failing_leaves_the_holder_vanished_then_it_saves(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. H holds the key (E) at v2; an operator's ``rm`` lays its
    tombstone (>= E) and its delete script fails (the known limit "A Redis delete that
    fails may leave its tombstone"); the store then goes back to v1 (head behind, H's
    lease live). H's save reclaims E; the fence's extra `info` (8eb3d5d) fails once
    (`StoreUnavailable`). Should: the holder sees `StoreUnavailable`, stays vanished,
    its lease stays held at E (no other worker gets it, nothing deleted); its next save
    reclaims again, finds v1 (a version: left alone) and writes the whole conversation."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = _store(bare_redis, clock, ns)
    other: Any = _store(bare_redis, clock, ns)  # the operator's
    b = RedisBackend(store, clock)
    key = f"if-{uuid.uuid4().hex[:6]}"
    try:
        h, at_v1 = await _h_at_v2(store, b, clock, key)
        clock.advance(100)
        await rm_whose_delete_fails(other, key)
        tomb = await store._tombstone(key)
        assert tomb is not None and tomb >= h.epoch, (tomb, h.epoch)
        await _session_keys_only_rollback(store, at_v1, key)
        clock.advance(100)
        info_ = store.info
        failed: list[str] = []

        async def info_fails_once(k: str) -> Any:
            if not failed:
                failed.append(k)
                raise StoreUnavailable("connection reset (the fence's info)")
            return await info_(k)

        store.info = info_fails_once
        first: Any
        try:
            first = await save(h, 2, b"H: my name is Ada (whole)")
        except StoreUnavailable as e:
            first = e
        store.info = info_
        assert failed, "the fence's info was not called: the tombstone was not read"
        assert isinstance(first, StoreUnavailable), first
        assert h.vanished
        held = await store.info(key)
        assert held is not None and (held.owner, held.epoch, held.version) == (
            "H",
            h.epoch,
            1,
        ), held
        with pytest.raises(lr.SessionBusy):
            await other.acquire(key, "W", ttl=LEASE)
        clock.advance(100)
        got = await save(h, 2, b"H: my name is Ada (whole)")
        assert got == 2, f"H's save after the failed info read: {got!r}"
        assert (await store.load(key)).head == b"H: my name is Ada (whole)"
    finally:
        await other.aclose()
        await store.aclose()


# ------------------- 2a. foreign data at the tombstone under a session with versions


async def test_redis_foreign_data_at_the_tombstone_does_not_refuse_reclaiming_a_versioned_session(
    bare_redis: RedisServer,
) -> None:
    """FAILS (low severity, same cause as the Cluster case below). H holds the key (E)
    at v2; the store goes back to v1 (head behind, H's live lease); the key's tombstone
    (``ns:rm:<sha256>``) holds foreign data (written by hand, another program). H's
    save reclaims E.

    Should: granted and the whole conversation written, as before 8eb3d5d: the session
    has a version, so `_fence_reclaim_of_deleted` leaves it alone whatever the
    tombstone says (only a *new* session must start above a tombstone, and only that
    one is refused by foreign data there: `_tombstone`, "delete it by hand").

    Does: the tombstone is read first, and its `SnapshotCorrupt` fails every reclaim of
    the live session until someone deletes the key by hand; the holder stays vanished."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = _store(bare_redis, clock, ns)
    b = RedisBackend(store, clock)
    key = f"fd-{uuid.uuid4().hex[:6]}"
    try:
        h, at_v1 = await _h_at_v2(store, b, clock, key)
        await store._client.set(store._names.tombstone(key), b"not-an-epoch")
        await _session_keys_only_rollback(store, at_v1, key)
        clock.advance(100)
        got: Any
        try:
            got = await save(h, 2, b"H: my name is Ada (whole)")
        except lr.ResumeError as e:
            got = e
        assert got == 2, (
            f"H's reclaim of its own live session (a version there) was refused by "
            f"foreign data at its tombstone: {got!r}; before 8eb3d5d it was granted"
        )
    finally:
        await store.aclose()


async def test_redis_a_reclaim_of_a_session_whose_latest_record_is_lost_is_granted(
    bare_redis: RedisServer,
) -> None:
    """(The lead's read of the fix of the case above.) H holds the key (E) at v2, and
    the store loses v2's record (evicted, deleted by hand): the session's `info` is
    `SnapshotCorrupt`. H's reclaim of E (a holder told its session vanished) is
    granted, as before 8eb3d5d: a damaged session is no session the reclaim made just
    now, and its save writes the conversation whole. The fence's `info` raised its
    `SnapshotCorrupt` out of the acquisition."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    store: Any = _store(bare_redis, clock, ns)
    key = f"dm-{uuid.uuid4().hex[:6]}"
    try:
        a = await store.acquire(key, "H", ttl=30.0)
        assert await store.commit(Commit(key, a.epoch, 0, b"h1", [], 0)) == 1
        assert await store.commit(Commit(key, a.epoch, 1, b"h2", [], 0)) == 2
        raw = store._client
        for k in await raw.keys("*"):
            if k.decode().endswith(("}:v:2", "}:v:2:b")):
                await raw.delete(k)
        with pytest.raises(lr.SnapshotCorrupt):
            await store.info(key)
        clock.advance(100)
        got = await store.acquire(key, "H", ttl=30.0, reclaim=a.epoch)
        assert (got.owner, got.epoch) == ("H", a.epoch)
    finally:
        await store.aclose()


# ---------------------------- 2b. a user of the earlier ACL line (no GET on tombstones)


async def test_redis_an_earlier_acl_users_reclaim_is_granted_and_deletes_nothing(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage (docs/security.md: a user "without +get +set +append +strlen"
    saves everything; `_tombstone` reads None on NOPERM). H, such a user, holds the key
    (E) at v1; an operator with the whole line ``rm``s it and its delete script fails,
    leaving a tombstone >= E on the live session (the known limit); the store then
    goes back to H's acquisition (v0). H's reclaim cannot read the tombstone: granted,
    no `info`, no compensating delete, no error from the refused read, and the whole
    conversation lands (what security.md says such a user does: writes it back)."""
    clock = FakeClock()
    ns = f"r{uuid.uuid4().hex[:8]}"
    reply = bare_redis.cli(
        "ACL", "SETUSER", "older", "reset", "on", ">pw-older", "~*", "&*",
        "+@all", "-get", "-set", "-append", "-strlen",
    )  # fmt: skip
    assert reply.strip() == "OK", reply
    url = f"redis://older:pw-older@127.0.0.1:{bare_redis.port}/0"
    store: Any = lr.open_store(url, namespace=ns, clock=clock)
    other: Any = _store(bare_redis, clock, ns)  # the operator's, the whole line
    b = RedisBackend(other, clock)
    key = f"ac-{uuid.uuid4().hex[:6]}"
    try:
        h = LeaseHolder(store, key, "H", 30.0)
        await h.acquire(takeover=False)
        at_v0 = await b.snapshot()
        clock.advance(100)
        assert await save(h, 0, b"H: hello") == 1
        clock.advance(100)
        await rm_whose_delete_fails(other, key)
        tomb = await other._tombstone(key)
        assert tomb is not None and tomb >= h.epoch, (tomb, h.epoch)
        assert await store._tombstone(key) is None  # NOPERM, read as none
        await _session_keys_only_rollback(other, at_v0, key)
        calls: list[str] = []
        info_, delete = store.info, store.delete

        async def info_seen(k: str) -> Any:
            calls.append("info")
            return await info_(k)

        async def delete_seen(k: str, *, lease: Any = None) -> bool:
            calls.append("delete")
            return bool(await delete(k, lease=lease))

        store.info, store.delete = info_seen, delete_seen
        clock.advance(100)
        got = await save(h, 1, b"H: hello (whole)")
        store.info, store.delete = info_, delete
        assert got == 1, got
        assert "delete" not in calls, calls
        assert (await other.load(key)).head == b"H: hello (whole)"
    finally:
        await other.aclose()
        await store.aclose()


# ------------------------------ 3. Redis Cluster: the tombstone's node stopped (FAILS)


@pytest.fixture
def degraded_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Cluster of this test alone that keeps serving the other slots while a primary
    is stopped (``cluster-require-full-coverage no``, as failure-model.md's row "a Redis
    Cluster primary stopped, with no replica to take over" assumes)."""
    require_redis_server()
    found = RedisCluster(tmp_path / "cluster", full_coverage=False).start()
    try:
        yield found
    finally:
        found.stop()  # resumes a node left stopped


def _pick_key(cluster: RedisCluster, ns: str) -> tuple[str, RedisServer, RedisServer]:
    """A key whose session (head) and tombstone are on different primaries, the
    tombstone's being neither redis-py's default node nor the namespace index's."""
    from redis.cluster import RedisCluster as Client

    client: Any = Client(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        names = KeyNames(ns)
        default = client.get_default_node().port
        index = client.get_node_from_key(names.index).port
        for i in range(1000):
            key = f"tn-{i}"
            head = client.get_node_from_key(names.head(key)).port
            tomb = client.get_node_from_key(names.legacy_tombstone(key)).port
            if head != tomb and tomb not in (default, index):
                by_port = {n.port: n for n in cluster.nodes}
                return key, by_port[head], by_port[tomb]
    finally:
        client.close()
    raise AssertionError("no key found")


async def test_cluster_a_reclaim_of_a_session_with_versions_saves_while_its_tombstones_node_is_down(
    degraded_cluster: RedisCluster,
) -> None:
    """FAILS. A Redis Cluster (``cluster-require-full-coverage no``): H holds key K at
    E and commits v1, v2. K's node fails over to a replica that had v1 only (head
    behind: H's next commit says vanished), and the primary holding the slot of K's
    tombstone (``ns:rm:<sha256>``, another node) is stopped meanwhile. H's save reclaims
    its own epoch E on K's node: granted (its own live lease, K has a version).

    Should (failure-model.md, "a Redis Cluster primary stopped, with no replica to take
    over": "every other session goes on saving, renewing and restoring ... a new
    session fails until it is back"; K is no new session and has versions, so the
    tombstone's value cannot change the outcome: `_fence_reclaim_of_deleted` leaves a
    session with a version alone): H's save lands, as it did before 8eb3d5d.

    Does: `_take` now reads the tombstone after every reclaim granted at its epoch,
    before looking at the session's version, so the read on the stopped node fails the
    whole reclaim with `StoreUnavailable`; H stays vanished and every later save fails
    the same way until that node is back (a call ending meanwhile loses the turns since
    the failover). Before 8eb3d5d only a reclaim that *created* the session read it."""
    cluster = degraded_cluster
    ns = f"c{uuid.uuid4().hex[:8]}"
    key, session_node, tomb_node = _pick_key(cluster, ns)
    store: Any = lr.open_store(cluster.url, namespace=ns, socket_timeout=0.5, retries=0)
    node: Any = redis.Redis(host="127.0.0.1", port=session_node.port)
    try:
        h = LeaseHolder(store, key, "H", 60.0)
        await h.acquire(takeover=False)
        assert await save(h, 0, b"H: hello") == 1
        tag = "{" + key + "}"
        at_v1 = [(k, node.pttl(k), node.dump(k)) for k in node.keys("*") if tag in k.decode()]
        assert at_v1
        assert await save(h, 1, b"H: my name is Ada") == 2
        # K's node fails over to a replica that had v1 only
        for k in node.keys("*"):
            if tag in k.decode():
                node.delete(k)
        for k, pttl, data in at_v1:
            node.restore(k, max(pttl, 0), data, replace=True)
        assert (await store.info(key)).version == 1
        tomb_node.pause()
        got: Any
        try:
            try:
                got = await save(h, 2, b"H: my name is Ada (whole)")
            except StoreUnavailable as e:
                got = e
            again: Any
            try:
                again = await save(h, 2, b"H: my name is Ada (whole)")
            except StoreUnavailable as e:
                again = e
        finally:
            tomb_node.resume()
        info = await store.info(key)
        if got != 2 and again != 2:
            # once the node is back, the holder (left vanished, its lease held) saves
            assert h.vanished
            assert info is not None and (info.owner, info.epoch) == ("H", h.epoch), info
            back = await save(h, 2, b"H: my name is Ada (whole)")
            assert back == 2, f"H's save once the tombstone's node was back: {back!r}"
        assert got == 2 or again == 2, (
            f"H's save of key {key!r} (its node up, a version there, H's own live lease) "
            f"failed while only the node of its tombstone's slot was stopped: {got!r}, "
            f"then {again!r}; the store holds {info}: the reclaim reads the tombstone "
            "(8eb3d5d) before it looks at the version that makes the read moot"
        )
    finally:
        node.close()
        await store.aclose()
