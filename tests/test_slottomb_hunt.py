"""Hunt `slottomb`: the Redis delete tombstone moved into the session's own Cluster slot
(`KeyNames.tombstone` = ``ns:rm:<sha256(key)>{<4-letter slot tag>}``), the tombstone
of earlier releases (`KeyNames.legacy_tombstone` = ``ns:rm:<sha256(key)>``) still laid
and read beside it (`RedisStore._tombstone`, `_lay_tombstone`,
`_clear_foreign_tombstone`).

Looks for: a rolling deploy (a worker of an earlier release, which lays and reads the
legacy name only, beside one of this release, both ways); foreign data at one of the two
names; the right to be forgotten (security.md: "rm leaves no trace of the key"); a real
Redis Cluster with the legacy tombstone's node stopped; the documented minimal ACL.

A worker "of an earlier release" is this release's `RedisStore` whose `KeyNames.tombstones`
answers the legacy name (`_as_earlier_release`): the new `_tombstone` then reads, and
`_lay_tombstone` lays, only that name, as 823aee1's code did (the only code the change
touched).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

import livekit_resume as lr
from livekit_resume.errors import LeaseLost, SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Commit, Lease
from livekit_resume.stores.redis.keys import KeyNames, slot_tags
from tests.redis_servers import RedisCluster, RedisServer
from tests.test_auth_hunt import DOC_COMMANDS, _acl, server
from tests.test_lost_hunt import bare_redis
from tests.test_review28_hunt import _pick_key, degraded_cluster
from tests.test_security import _all_redis_keys, _busy_session, cli, everything, namespace

__all__ = ["bare_redis", "degraded_cluster", "namespace", "server"]  # fixtures, shared

pytestmark = pytest.mark.filterwarnings("ignore")


def _as_earlier_release(store: Any) -> Any:
    """``store`` as a worker of the release before the session-slot tombstone: it lays
    and reads ``ns:rm:<sha256>`` only (both of its names are that one)."""
    legacy = store._names.legacy_tombstone
    store._names.tombstone = legacy
    store._names.tombstones = lambda key: (legacy(key), legacy(key))
    return store


def _open(server: RedisServer, ns: str, *, earlier: bool = False) -> Any:
    store = lr.open_store(server.url, namespace=ns)
    return _as_earlier_release(store) if earlier else store


async def _commit(store: Any, key: str, epoch: int, base: int, data: bytes) -> int:
    return int(await store.commit(Commit(key, epoch, base, data, [], 0, whole=True)))


async def _held(store: Any, key: str) -> Lease:
    """``key`` held by "H" on ``store`` and saved once (v1): its lease."""
    lease: Lease = await store.acquire(key, "H", ttl=60.0)
    assert await _commit(store, key, lease.epoch, 0, b"H: hello") == 1
    return lease


async def _outcome(aw: Any) -> Any:
    try:
        return await aw
    except lr.ResumeError as e:
        return e


def _fenced(got: Any) -> bool:
    return isinstance(got, LeaseLost) and not got.vanished


# ------------------------------------------------------------- 1. a rolling deploy


@pytest.mark.parametrize(
    ("rm_by", "holder"), [("earlier", "this"), ("this", "earlier"), ("this", "this")]
)
async def test_rolling_deploy_the_holder_of_a_deleted_session_is_fenced_not_told_to_write_it_back(
    bare_redis: RedisServer, rm_by: str, holder: str
) -> None:
    """A worker holds key K (v1); an operator's ``rm`` (a CLI of either release) deletes
    it; the holder (of either release) commits and renews.

    Should (failure-model.md, row "an operator's rm": "the worker's next save or lease
    renewal is refused as fenced (LeaseLost, "deleted")"; multi-worker.md key table: the
    legacy tombstone is "laid beside the one above and read with it, so that their
    workers are fenced too during a rolling deploy"): LeaseLost, not vanished, on both
    commit and renew, and nothing written back."""
    ns = f"rd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    h = _open(bare_redis, ns, earlier=holder == "earlier")
    op = _open(bare_redis, ns, earlier=rm_by == "earlier")
    try:
        lease = await _held(h, key)
        assert await op.delete(key) is True
        got = await _outcome(_commit(h, key, lease.epoch, 1, b"H: hello again"))
        assert _fenced(got), f"holder ({holder}) after an rm ({rm_by}): commit -> {got!r}"
        renewed = await _outcome(h.renew(lease, ttl=60.0))
        assert _fenced(renewed), f"holder ({holder}) after an rm ({rm_by}): renew -> {renewed!r}"
        assert await op.info(key) is None
    finally:
        await h.aclose()
        await op.aclose()


@pytest.mark.parametrize(("rm_by", "acquirer"), [("earlier", "this"), ("this", "earlier")])
async def test_rolling_deploy_a_new_session_after_an_rm_starts_above_the_deleted_epoch(
    bare_redis: RedisServer, rm_by: str, acquirer: str
) -> None:
    """K is held (epoch E) and deleted by a worker of one release; a worker of the other
    acquires K anew, and the old holder then tries to commit.

    Should (failure-model.md, "an operator's rm": "the key is free at once, and a new
    session under it starts above that epoch"): the new session's epoch is above E, and
    the old holder's commit is refused (not written over the new session)."""
    ns = f"rd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    a = _open(bare_redis, ns, earlier=rm_by == "earlier")
    b = _open(bare_redis, ns, earlier=acquirer == "earlier")
    try:
        lease = await _held(a, key)
        assert await a.delete(key) is True
        fresh = await b.acquire(key, "N", ttl=60.0)
        assert fresh.epoch > lease.epoch, (fresh.epoch, lease.epoch)
        got = await _outcome(_commit(a, key, lease.epoch, 1, b"H: back"))
        assert isinstance(got, LeaseLost), got
        info = await b.info(key)
        assert info is not None and info.owner == "N" and info.version == 0, info
    finally:
        await a.aclose()
        await b.aclose()


async def test_rolling_deploy_a_legacy_tombstone_alone_fences_a_reclaim_of_the_deleted_epoch(
    bare_redis: RedisServer,
) -> None:
    """An earlier release's ``rm`` leaves only ``ns:rm:<sha256>`` at E. A holder of this
    release at E then finds its session gone and reclaims it (`Store.acquire(reclaim=E)`,
    what `LeaseHolder.reacquire` does after a vanished answer).

    Should (failure-model.md, "an operator's rm": a reclaim is fenced "as on the other
    stores", the deleted conversation not written back): LeaseLost, not vanished, and no
    session left under K."""
    ns = f"rd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    h = _open(bare_redis, ns)
    old = _open(bare_redis, ns, earlier=True)
    try:
        lease = await h.acquire(key, "H", ttl=60.0)
        assert await old.delete(key) is True
        names = KeyNames(ns)
        assert await h._client.get(names.tombstone(key)) is None
        assert await h._client.get(names.legacy_tombstone(key)) is not None
        got = await _outcome(h.acquire(key, "H", ttl=60.0, reclaim=lease.epoch))
        assert _fenced(got), got
        assert await h.info(key) is None
    finally:
        await h.aclose()
        await old.aclose()


# --------------------------------------------------- 2. foreign data at one of the names


@pytest.mark.parametrize("which", ["slotted", "legacy"])
@pytest.mark.parametrize("foreign", ["string", "hash"])
async def test_foreign_data_at_one_tombstone_is_reported_and_rm_clears_it(
    bare_redis: RedisServer, which: str, foreign: str
) -> None:
    """Another program wrote at one of K's two tombstone names (no session under K).

    Should (RedisStore._tombstone_at: "holds no epoch ... foreign data; delete it by
    hand", and `_clear_foreign_tombstone`: "rm of the key, which asks for it to be gone,
    removes it"): a new acquire of K is refused as SnapshotCorrupt naming the tombstone;
    ``rm`` K clears it; K is then acquired."""
    ns = f"fd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    store = _open(bare_redis, ns)
    names = KeyNames(ns)
    name = names.tombstone(key) if which == "slotted" else names.legacy_tombstone(key)
    try:
        if foreign == "string":
            await store._client.set(name, b"not-an-epoch")
        else:
            await store._client.hset(name, "f", "v")
        got = await _outcome(store.acquire(key, "N", ttl=60.0))
        # a string's message names it; a hash's is the WRONGTYPE of "the tombstone"
        assert isinstance(got, SnapshotCorrupt) and "tombstone" in str(got), got
        await store.delete(key)
        assert await store._client.exists(name) == 0
        lease = await store.acquire(key, "N", ttl=60.0)
        assert await _commit(store, key, lease.epoch, 0, b"N: hi") == 1
    finally:
        await store.aclose()


@pytest.mark.parametrize("which", ["slotted", "legacy"])
@pytest.mark.parametrize("foreign", [b"not-an-epoch", b"1e300", b"0x7fffffffffffffff"])
async def test_foreign_data_at_one_tombstone_of_a_held_session_rm_then_the_key_is_free(
    bare_redis: RedisServer, which: str, foreign: bytes
) -> None:
    """H holds K (v1); one of K's tombstone names holds foreign data (a string that is
    no epoch: not a number, or one that Lua's ``tonumber`` reads and the client's
    ``int`` does not). An operator runs ``rm`` K once. Then H commits, and another
    worker acquires K.

    Should (failure-model.md, "an operator's rm": "the key is free at once, and a new
    session under it starts above that epoch"; `_clear_foreign_tombstone`: rm "asks for
    it to be gone"): H is not told to write the session back (LeaseLost fenced, or
    SnapshotCorrupt naming the tombstone: never vanished), and the new worker's acquire
    after that one ``rm`` is granted above H's epoch.

    Failed for both names, and on 823aee1 for its one name: `_delete_at` cleared foreign
    data at a tombstone only when no session was there (`_clear_foreign_tombstone`); for
    a live session `_lay_tombstone` kept it ("foreign data, kept") and the delete went
    on, so the key stayed refused (SnapshotCorrupt) until a second ``rm``. Now
    `_lay_tombstone` removes it and lays the tombstone. The numbers failed on fbbaadd
    (found by tests/test_review29_hunt.py): tombstone.lua took them for an epoch at or
    above the one laid and kept them; it now takes digits only, as the client does."""
    ns = f"fd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    store = _open(bare_redis, ns)
    other = _open(bare_redis, ns)
    names = KeyNames(ns)
    name = names.tombstone(key) if which == "slotted" else names.legacy_tombstone(key)
    try:
        lease = await _held(store, key)
        await store._client.set(name, foreign)
        assert await other.delete(key) is True
        got = await _outcome(_commit(store, key, lease.epoch, 1, b"H: back"))
        assert not (isinstance(got, LeaseLost) and got.vanished), got
        assert not isinstance(got, int), got
        fresh = await _outcome(other.acquire(key, "N", ttl=60.0))
        assert not isinstance(fresh, Exception), (
            f"one rm of {key!r} (foreign data {foreign!r} at its {which} tombstone "
            f"{name}) left the key refused: {fresh!r}"
        )
        assert fresh.epoch > lease.epoch
    finally:
        await store.aclose()
        await other.aclose()


@pytest.mark.parametrize("which", ["slotted", "legacy"])
async def test_foreign_data_at_one_tombstone_a_session_with_versions_keeps_saving(
    bare_redis: RedisServer, which: str
) -> None:
    """H holds K and saves; foreign data appears at one of K's tombstone names.

    Should (failure-model.md, "an operator's rm": "a session with one [a version] goes
    on saving while ... the tombstone holds foreign data"): commits and renewals go on."""
    ns = f"fd{uuid.uuid4().hex[:8]}"
    key = f"k-{uuid.uuid4().hex[:6]}"
    store = _open(bare_redis, ns)
    names = KeyNames(ns)
    name = names.tombstone(key) if which == "slotted" else names.legacy_tombstone(key)
    try:
        lease = await store.acquire(key, "H", ttl=60.0)
        assert await _commit(store, key, lease.epoch, 0, b"H: one") == 1
        await store._client.hset(name, "x", "y")
        assert await _commit(store, key, lease.epoch, 1, b"H: two") == 2
        await store.renew(lease, ttl=60.0)
        again = await store.acquire(key, "H", ttl=60.0)
        assert again.epoch == lease.epoch
        assert await _commit(store, key, lease.epoch, 2, b"H: three") == 3
    finally:
        await store.aclose()


# ---------------------------------------------------------- 3. the right to be forgotten


@pytest.mark.parametrize("key", ["EMMA", "OLGA", "ANNA"])
def test_rm_leaves_no_trace_of_a_key_whose_slot_tag_spells_it(
    redis_server: Any, namespace: str, key: str
) -> None:
    """A session under a short upper-case key (a name), deleted by ``rm``.

    Should (security.md, "rm and delete remove every trace of a session": the tombstone
    is "a SHA-256 of the key and the session's last epoch"; the slot tag is "four letters
    naming the key's Cluster slot"; multi-worker.md: "Named by a hash, not the key, so
    rm leaves no trace of the key"): no key name left on the server contains the key (as
    tests/test_security.py::test_rm_leaves_no_trace_of_a_session_in_redis checks for
    "forget-me").

    Failed on the first cut of the change: the tag was the first solution of a 14-bit
    slot over 16 bits of letters ``@``-``O``, and of the 65,536 four-letter keys over
    that alphabet, 16,384 ("EMMA", "OLGA", "ANNA", "LENA", "ABBA" among them) were their
    own tag. Now the first of the slot's four tags that does not spell the key
    (`KeyNames.tombstone`)."""
    assert slot_tags(key)[0] == key  # the premise
    url = redis_server.url
    _busy_session(url, key)
    result = cli("--store", url, "rm", "--yes", key)
    assert result.exit_code == 0, everything(result)
    left = [n for n in _all_redis_keys(redis_server) if n.startswith(namespace) and key in n]
    assert left == [], f"rm of {key!r} left key names that spell it: {left}"


# ------------------------- 4. a real Redis Cluster: the legacy tombstone's node stopped


async def _held_then_deleted(cluster: RedisCluster) -> tuple[Any, Any, str, Any, RedisServer]:
    ns = f"c{uuid.uuid4().hex[:8]}"
    key, _, legacy_node = _pick_key(cluster, ns)  # the legacy one on another node
    h: Any = lr.open_store(cluster.url, namespace=ns, socket_timeout=0.5, retries=0)
    op: Any = lr.open_store(cluster.url, namespace=ns, socket_timeout=0.5, retries=0)
    lease = await _held(h, key)
    return h, op, key, lease, legacy_node


@pytest.mark.parametrize("call", ["commit", "renew"])
async def test_cluster_the_holder_of_a_deleted_session_is_fenced_while_the_old_tombstone_is_down(
    degraded_cluster: RedisCluster, call: str
) -> None:
    """Cluster (`cluster-require-full-coverage no`). H holds K (v1); ``rm`` K completes
    (both tombstones laid, the session deleted); then the primary of the legacy
    tombstone's slot (not K's) stops. H commits (or renews).

    Should (failure-model.md, "an operator's rm": "the worker's next save or lease
    renewal is refused as fenced (LeaseLost, "deleted")"; the session-slot tombstone on
    K's own node, which answers, is at H's epoch): LeaseLost, not vanished.

    Failed (on 823aee1 too, whose one tombstone was the legacy one): `_tombstone` waited
    for both names, so the stopped node's read failed the whole answer with
    StoreUnavailable, for as long as that node was down (nothing written back). Now a
    tombstone that answers at or above the writer's epoch fences it (`_tombstone`'s
    ``fencing``)."""
    h, op, key, lease, legacy_node = await _held_then_deleted(degraded_cluster)
    try:
        assert await op.delete(key) is True
        legacy_node.pause()
        try:
            if call == "commit":
                got = await _outcome(_commit(h, key, lease.epoch, 1, b"H: back"))
            else:
                got = await _outcome(h.renew(lease, ttl=60.0))
        finally:
            legacy_node.resume()
        assert _fenced(got), (
            f"H's {call} of deleted {key!r}, its own node up with the session-slot "
            f"tombstone, the legacy tombstone's node stopped: {got!r}"
        )
    finally:
        await h.aclose()
        await op.aclose()


async def test_cluster_rm_while_the_legacy_tombstones_node_is_down_fails_and_the_holder_saves_on(
    degraded_cluster: RedisCluster,
) -> None:
    """Cluster. H holds K (v1); the legacy tombstone's primary (not K's) is stopped; an
    operator runs ``rm`` K. Then the node comes back and H saves.

    Should (failure-model.md, "a Redis Cluster primary stopped": StoreUnavailable, an
    outage; known limit "A Redis delete that fails may leave its tombstone", "rm again
    completes the delete"): the rm fails as StoreUnavailable, K's session is whole and
    H's saves land; ``rm`` again, once the node is back, deletes K and fences H.

    Records (not asserted) whether a session-slot tombstone was left at K's live epoch:
    before the change the failed rm laid nothing."""
    h, op, key, lease, legacy_node = await _held_then_deleted(degraded_cluster)
    try:
        legacy_node.pause()
        try:
            got = await _outcome(op.delete(key))
        finally:
            legacy_node.resume()
        assert isinstance(got, StoreUnavailable), got
        info = await op.info(key)
        assert info is not None and info.version == 1 and info.epoch == lease.epoch, info
        assert await _commit(h, key, lease.epoch, 1, b"H: two") == 2
        names = KeyNames(ns := op.namespace)
        left = await op._client.get(names.tombstone(key))
        print(f"ns={ns} session-slot tombstone left by the failed rm: {left!r}")
        assert await op.delete(key) is True
        fenced = await _outcome(_commit(h, key, lease.epoch, 2, b"H: three"))
        assert _fenced(fenced), fenced
    finally:
        await h.aclose()
        await op.aclose()


async def test_cluster_a_new_session_after_an_rm_while_the_legacy_tombstones_node_is_down(
    degraded_cluster: RedisCluster,
) -> None:
    """Cluster. K held at E and deleted; the legacy tombstone's node stops; another
    worker acquires K.

    Should (failure-model.md, "a Redis Cluster primary stopped": "a new session fails
    until it is back"; "an operator's rm": "a new session under it starts above that
    epoch"): StoreUnavailable while the node is down, then granted above E."""
    h, op, key, lease, legacy_node = await _held_then_deleted(degraded_cluster)
    try:
        assert await op.delete(key) is True
        legacy_node.pause()
        try:
            got = await _outcome(op.acquire(key, "N", ttl=60.0))
        finally:
            legacy_node.resume()
        assert isinstance(got, StoreUnavailable) or got.epoch > lease.epoch, got
        if isinstance(got, StoreUnavailable):
            fresh = await op.acquire(key, "N", ttl=60.0)
            assert fresh.epoch > lease.epoch
    finally:
        await h.aclose()
        await op.aclose()


# ------------------------------------------------------------ 5. the documented ACL


async def test_the_documented_acl_user_lays_both_tombstones_and_fences_the_holder(
    server: RedisServer,
) -> None:
    """A Redis user granted exactly docs/security.md's line ("Redis: the minimal ACL",
    ``~acme:*``) holds K in namespace ``acme`` and saves; the same user deletes K; the
    holder commits and renews; another worker of that user acquires K.

    Should (security.md: the line runs every store operation; failure-model.md "an
    operator's rm": fenced, "LeaseLost, deleted", and "a new session under it starts
    above that epoch"; multi-worker.md: both tombstone names laid): both tombstones
    present, the holder fenced (not vanished) on commit and renew, the new session
    above the deleted epoch."""
    from livekit_resume.stores.redis import RedisStore

    url = _acl(server, "tenant", *DOC_COMMANDS)
    key = f"k-{uuid.uuid4().hex[:6]}"
    h = RedisStore.from_url(url, namespace="acme")
    op = RedisStore.from_url(url, namespace="acme")
    admin = redis.Redis(port=server.port)
    try:
        lease = await _held(h, key)
        assert await op.delete(key) is True
        names = KeyNames("acme")
        laid = [admin.get(names.tombstone(key)), admin.get(names.legacy_tombstone(key))]
        assert all(v is not None and int(v) >= lease.epoch for v in laid), laid
        got = await _outcome(_commit(h, key, lease.epoch, 1, b"H: back"))
        assert _fenced(got), got
        assert _fenced(await _outcome(h.renew(lease, ttl=60.0)))
        fresh = await op.acquire(key, "N", ttl=60.0)
        assert fresh.epoch > lease.epoch
    finally:
        admin.close()
        await h.aclose()
        await op.aclose()
