"""The Redis version record's layout. A version is a hash of short fields (epoch, created,
gen, end, size, cid, records) that Redis keeps as a listpack, and a string of its own,
its body ``<prefix>v:<n>:b``, holding its head bytes and info (``<len(head)>:<head><info>``):
a hash with the head or info in it (both over ``hash-max-listpack-value``) is a
hashtable, twice the memory.

Records of earlier releases (head and info as fields of the hash, no body) still load,
list, take new commits, trim and delete. A body missing is a corrupt record. Real
servers (standalone and Cluster); fakeredis where the encoding does not matter.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests.redis_servers import RedisFactory, build_redis_store
from tests.test_redis import _url_of
from tests.test_security import earlier_acl_user

KEY = "room-layout"
HEAD = b"head bytes " * 30  # over 64 bytes, as a real head is (about 275)
# every field of a version record of the releases before the body key
OLD_FIELDS = {"epoch", "created", "head", "info", "gen", "end", "size", "cid", "records"}
NEW_FIELDS = OLD_FIELDS - {"head", "info"}


@pytest.fixture(params=["redis", "redis_cluster"])
async def real_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A store on a real server (standalone and Cluster), ``keep=3``."""
    store = await build_redis_store(
        request.param, request, namespace=f"t{uuid.uuid4().hex[:8]}", keep=3
    )
    yield store
    await store.aclose()


@pytest.fixture(params=["fakeredis", "redis", "redis_cluster"])
async def rstore(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    store = await build_redis_store(
        request.param, request, namespace=f"t{uuid.uuid4().hex[:8]}", keep=3
    )
    yield store
    await store.aclose()


async def refused_and_listed_damaged(store: RedisStore, n: int, why: str) -> None:
    """Version ``n``, the latest, cannot be read: ``load`` and ``info`` say why, and
    ``versions`` lists it damaged, saying so too (the others as they are)."""
    for call in (store.load, store.info):
        with pytest.raises(SnapshotCorrupt, match=why):
            await call(KEY)
    listed = await store.versions(KEY)
    assert [v.version for v in listed][-1] == n
    assert [v.damaged is None for v in listed] == [True] * (len(listed) - 1) + [False]
    assert re.search(why, listed[-1].damaged or ""), listed[-1]


def raw(store: RedisStore) -> Any:
    return store._client


def vkey(store: RedisStore, n: int, key: str = KEY) -> str:
    return f"{store._names.prefix(key)}v:{n}"


async def session_keys(store: RedisStore, key: str = KEY) -> list[str]:
    """Every key of the namespace that names the session (its prefix and hash tag)."""
    pattern = store._names.prefix(key).replace("{", "\\{").replace("}", "\\}") + "*"
    return sorted([k.decode() async for k in raw(store).scan_iter(match=pattern)])


async def namespace_keys(store: RedisStore) -> list[str]:
    """Every key of the store's namespace but its index and the tombstones a delete
    lays (named by a hash: no trace of the key)."""
    found = [k.decode() async for k in raw(store).scan_iter(match=f"{store.namespace}:*")]
    assert not [k for k in found if KEY in k and k.startswith(f"{store.namespace}:rm:")]
    return sorted(k for k in found if k != store._index_key and ":rm:" not in k)


async def commit(store: RedisStore, lease: Lease, base: int, **info: Any) -> int:
    n = base + 1
    return await store.commit(
        Commit(
            lease.key,
            lease.epoch,
            base,
            HEAD + b"%d" % n,
            [Record("h", f"i{n}", b"item %d" % n, f"i{base}" if base else None)],
            n,
            {"title": f"turn {n}", **info},
        )
    )


async def to_old_layout(store: RedisStore, n: int, key: str = KEY) -> None:
    """Rewrite version ``n`` as the releases before the body key wrote it (commit.lua's
    ``HSET vk epoch created head info gen end size cid records``): head and info in the
    hash, no body."""
    client = raw(store)
    vk = vkey(store, n, key)
    body = await client.get(vk + ":b")
    digits, _, rest = body.partition(b":")
    size = int(digits)
    await client.hset(vk, mapping={"head": rest[:size], "info": rest[size:]})
    await client.delete(vk + ":b")
    assert set(map(bytes.decode, await client.hkeys(vk))) == OLD_FIELDS


async def encoding(store: RedisStore, name: str) -> str:
    return str((await raw(store).object("encoding", name)).decode())


# -- the new layout -------------------------------------------------------------------


async def test_a_new_version_record_is_a_listpack_and_its_body_holds_head_and_info(
    real_store: RedisStore,
) -> None:
    store = real_store
    lease = await store.acquire(KEY, "w")
    assert await commit(store, lease, 0, note="x" * 200) == 1
    client = raw(store)
    vk = vkey(store, 1)
    assert await encoding(store, vk) == "listpack"
    assert set(map(bytes.decode, await client.hkeys(vk))) == NEW_FIELDS
    body = await client.get(vk + ":b")
    head = HEAD + b"1"
    assert body.startswith(b"%d:" % len(head) + head)
    loaded = await store.load(KEY)
    assert (loaded.head, loaded.info) == (head, {"title": "turn 1", "note": "x" * 200})
    # the info is the rest of the body, as the store packs it
    assert len(body) > len(b"%d:" % len(head) + head)
    [version] = await store.versions(KEY)
    assert version.info == {"title": "turn 1", "note": "x" * 200}
    info = await store.info(KEY)
    assert info is not None and info.info == {"title": "turn 1", "note": "x" * 200}
    # every version written since is one too; the body shares the session's slot
    for base in range(1, 5):
        await commit(store, lease, base)
    for n in (3, 4, 5):
        assert await encoding(store, vkey(store, n)) == "listpack"
    assert await session_keys(store) == sorted(
        [
            store._names.prefix(KEY) + "head",
            store._names.log(KEY, 0),
            *(vkey(store, n) for n in (3, 4, 5)),
            *(vkey(store, n) + ":b" for n in (3, 4, 5)),
        ]
    )
    assert await client.memory_usage(vk, samples=0) is None  # trimmed, with its body


async def test_an_empty_head_and_info_frame_and_read_back(rstore: RedisStore) -> None:
    lease = await rstore.acquire(KEY, "w")
    await rstore.commit(Commit(KEY, lease.epoch, 0, b"", [Record("h", "a", b"a")], 1, {}))
    await rstore.commit(Commit(KEY, lease.epoch, 1, b"1:2:", [], 1, {"k": ":"}))
    assert (await rstore.load(KEY, 1)).head == b""
    got = await rstore.load(KEY)
    assert (got.head, got.info) == (b"1:2:", {"k": ":"})


# -- records of earlier releases ------------------------------------------------------


async def test_a_session_of_the_old_layout_loads_lists_commits_trims_and_deletes(
    rstore: RedisStore,
) -> None:
    store = rstore
    lease = await store.acquire(KEY, "w")
    for base in range(3):
        await commit(store, lease, base)
    before = {n: await store.load(KEY, n) for n in (1, 2, 3)}
    versions, info = await store.versions(KEY), await store.info(KEY)
    for n in (1, 2, 3):
        await to_old_layout(store, n)
    assert not [k for k in await session_keys(store) if k.endswith(":b")]

    for n in (1, 2, 3):
        got = await store.load(KEY, n)
        want = before[n]
        assert (got.version, got.head, got.info, got.streams) == (
            want.version,
            want.head,
            want.info,
            want.streams,
        )
    assert await store.versions(KEY) == versions
    assert await store.info(KEY) == info
    assert await store.keys() == [KEY]

    # a new commit: written in the new layout, trims the oldest old one (keep=3)
    assert await commit(store, lease, 3) == 4
    assert set(map(bytes.decode, await raw(store).hkeys(vkey(store, 4)))) == NEW_FIELDS
    assert [v.version for v in await store.versions(KEY)] == [2, 3, 4]
    assert (await store.load(KEY, 2)).head == before[2].head  # old, still read
    assert (await store.load(KEY)).streams["h"] == [(f"i{n}", b"item %d" % n) for n in (1, 2, 3, 4)]
    names = await session_keys(store)
    assert vkey(store, 1) not in names and vkey(store, 2) in names
    assert vkey(store, 4) + ":b" in names

    # acquired again (a takeover), with the old versions still retained
    other = await store.acquire(KEY, "w2", takeover=True)
    assert await commit(store, other, 4) == 5
    assert [v.version for v in await store.versions(KEY)] == [3, 4, 5]

    assert await store.delete(KEY)
    assert await namespace_keys(store) == []


async def test_an_old_layout_session_with_a_ttl_expires_whole(real_store: RedisStore) -> None:
    """A store with a TTL moves every key's deadline, old records' and new bodies'."""
    url = _url_of(real_store)
    store = RedisStore.from_url(url, namespace=real_store.namespace, ttl=30, keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        await commit(store, lease, 0)
        await commit(store, lease, 1)
        await to_old_layout(store, 1)
        await commit(store, lease, 2)  # live_head(purge) looks at every key first
        names = await session_keys(store)
        assert len(names) == 7  # head, log:0, v:1, v:2, v:2:b, v:3, v:3:b
        for name in names:
            assert 25_000 < await raw(store).pttl(name) <= 30_000, name
        # connected first (a Cluster client's start took longer than the session then had
        # to live on a loaded machine: the renewal found it expired)
        short = RedisStore.from_url(url, namespace=store.namespace, ttl=1.0, keep=3)
        try:
            await short.info(KEY)
            await store.renew(lease, ttl=1.0)
            await short.renew(lease, ttl=1.0)  # every key's deadline to 1 s
        finally:
            await short.aclose()

        async def gone() -> bool:
            return await session_keys(store) == []

        await eventually(gone, "every key of the session expired", timeout=10)
    finally:
        await store.aclose()


# -- damage ----------------------------------------------------------------------------


async def test_a_missing_body_is_a_corrupt_record_and_nothing_else_changes(
    rstore: RedisStore,
) -> None:
    store = rstore
    lease = await store.acquire(KEY, "w")
    for base in range(3):
        await commit(store, lease, base)
    await raw(store).delete(vkey(store, 3) + ":b")  # evicted, deleted by hand
    names = await session_keys(store)
    head = await raw(store).hgetall(store._head_key(KEY))
    await refused_and_listed_damaged(store, 3, r"version record .*v:3 is missing or incomplete")
    assert await session_keys(store) == names
    assert await raw(store).hgetall(store._head_key(KEY)) == head
    assert (await store.load(KEY, 2)).head == HEAD + b"2"  # the others read as they were
    # with a TTL every key's deadline moves on a write: the lost one is passed over (it
    # was refused: the store could not tell it from a key a resharding had not moved)
    if "fake" not in type(raw(store)).__module__:  # fakeredis: no URL reaches its server
        ttl = RedisStore.from_url(_url_of(store), namespace=store.namespace, ttl=60, keep=3)
        try:
            await ttl.renew(lease, ttl=30)
            assert await session_keys(store) == names
            deadlines = [await raw(store).pttl(k) for k in names]
            assert all(0 < ms <= 60_000 for ms in deadlines), dict(
                zip(names, deadlines, strict=True)
            )
        finally:
            await ttl.aclose()
    # and the session deletes whole
    assert await store.delete(KEY)
    assert await namespace_keys(store) == []


@pytest.mark.parametrize(
    "body", [b"", b"garbage", b"999:short", b"-1:x", b"1e3:x", b" 3:abc"], ids=repr
)
async def test_a_body_not_of_the_form_written_is_corrupt(rstore: RedisStore, body: bytes) -> None:
    lease = await rstore.acquire(KEY, "w")
    await commit(rstore, lease, 0)
    await raw(rstore).set(vkey(rstore, 1) + ":b", body)
    await refused_and_listed_damaged(rstore, 1, "missing or incomplete")


async def test_foreign_data_at_a_body_is_corrupt(rstore: RedisStore) -> None:
    lease = await rstore.acquire(KEY, "w")
    await commit(rstore, lease, 0)
    await raw(rstore).delete(vkey(rstore, 1) + ":b")
    await raw(rstore).hset(vkey(rstore, 1) + ":b", "x", "y")
    with pytest.raises(SnapshotCorrupt, match="holds a hash, not a string"):
        await rstore.load(KEY)
    # nor is a body left ahead of its version taken over by a commit
    await raw(rstore).set(vkey(rstore, 2) + ":b", b"1:xy")
    with pytest.raises(SnapshotCorrupt, match="v:2:b exists before its version was written"):
        await commit(rstore, lease, 1)


async def test_an_old_record_missing_one_of_head_and_info_is_corrupt(rstore: RedisStore) -> None:
    lease = await rstore.acquire(KEY, "w")
    await commit(rstore, lease, 0)
    await to_old_layout(rstore, 1)
    await raw(rstore).hdel(vkey(rstore, 1), "info")
    with pytest.raises(SnapshotCorrupt, match="missing or incomplete"):
        await rstore.load(KEY)


# -- delete, trim, remains -------------------------------------------------------------


async def test_delete_trim_and_remains_cover_the_bodies(rstore: RedisStore) -> None:
    store = rstore
    lease = await store.acquire(KEY, "w")
    for base in range(5):
        await commit(store, lease, base)
    names = await session_keys(store)
    assert [n for n in names if n.endswith(":b")] == [vkey(store, n) + ":b" for n in (3, 4, 5)]
    assert await store.delete(KEY)
    assert await namespace_keys(store) == []

    # a session that lost its head: the bodies are among its remains, and rm takes them
    lease = await store.acquire(KEY, "w")
    for base in range(2):
        await commit(store, lease, base)
    await raw(store).delete(store._head_key(KEY))
    with pytest.raises(SnapshotCorrupt, match=r"v:1:b"):
        await store.load(KEY)
    assert await store.delete(KEY)
    assert await namespace_keys(store) == []

    # only a first version's body left: still remains, never written over
    lease = await store.acquire(KEY, "w")
    await commit(store, lease, 0)
    for name in await session_keys(store):
        if not name.endswith(":b"):
            await raw(store).delete(name)
    with pytest.raises(SnapshotCorrupt, match="lost its head"):
        await store.load(KEY)
    assert await store.delete(KEY)
    assert await namespace_keys(store) == []


async def test_a_user_without_set_writes_the_old_layout(make_redis: RedisFactory) -> None:
    """A Redis user granted security.md's line from before staging (no GET, SET) may not
    SET a body: its commits write head and info into the hash, as earlier releases did,
    and every reader reads them."""
    server = make_redis()
    store = RedisStore.from_url(earlier_acl_user(server), namespace="old", keep=3)
    admin = RedisStore.from_url(server.url, namespace="old", keep=3)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(4):
            await commit(store, lease, base)
        assert set(map(bytes.decode, await raw(admin).hkeys(vkey(admin, 4)))) == OLD_FIELDS
        assert [k for k in await session_keys(admin) if k.endswith(":b")] == []
        assert (await store.load(KEY)).head == HEAD + b"4"
        assert [v.version for v in await store.versions(KEY)] == [2, 3, 4]
        assert await store.delete(KEY)
        assert await namespace_keys(admin) == []
    finally:
        await asyncio.gather(store.aclose(), admin.aclose())
