"""The Redis store beyond the shared contract: URLs, key layout, Cluster slots, foreign
data, outages, script cache flushes, events, real TTLs and workers racing in two
processes. Everything runs against real ``redis-server`` processes started by the tests
(``redis_servers.py``); fakeredis only where a test says so.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import ResponseError

import livekit_resume
from livekit_resume.errors import (
    LeaseLost,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreUnavailable,
)
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.redis import RedisStore, RedisURL
from livekit_resume.stores.url import open_store
from livekit_resume.testing.poll import eventually
from tests import ROOT, child_env
from tests.redis_servers import RedisServer, build_redis_store, dead_port

KEY = "room-7"


def raw(store: RedisStore) -> Any:
    """The store's redis-py client, to look at (or damage) the keys underneath."""
    return store._client


async def server_keys(store: RedisStore, pattern: str) -> list[str]:
    return sorted([k.decode() async for k in raw(store).scan_iter(match=pattern)])


async def commit_items(store: RedisStore, lease: Lease, base: int, *ids: str) -> int:
    """Append items ``ids`` (data: the id) after whatever the last commit left."""
    tail = None if base == 0 else (await store.load(lease.key)).streams["h"][-1][0]
    records = []
    for item in ids:
        records.append(Record("h", item, item.encode(), tail))
        tail = item
    return await store.commit(
        Commit(lease.key, lease.epoch, base, f"head {base + 1}".encode(), records, base + len(ids))
    )


@pytest.fixture(params=["fakeredis", "redis", "redis_cluster"])
async def rstore(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    store = await build_redis_store(request.param, request, namespace=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


@pytest.fixture(params=["redis", "redis_cluster"])
async def real_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A store on a real server only (standalone and Cluster)."""
    store = await build_redis_store(request.param, request, namespace=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


# -- URLs (no server needed) -----------------------------------------------------------


def test_url_standalone_with_db_user_and_password() -> None:
    url = RedisURL.parse("redis://app:s%40cret@cache.internal:6380/2")
    assert url == RedisURL("standalone", (("cache.internal", 6380),), 2, "app", "s@cret", False)
    assert RedisURL.parse("redis://localhost").hosts == (("localhost", 6379),)
    assert RedisURL.parse("redis://:pw@h/0").password == "pw"
    assert RedisURL.parse("redis://pw@h/0").password == "pw"  # a lone secret is a password
    assert RedisURL.parse("redis://[::1]:7000/1").hosts == (("::1", 7000),)


def test_url_tls_flag_picks_ssl_connections() -> None:
    url = RedisURL.parse("rediss://:pw@secure.example:6390/1")
    assert (url.tls, url.hosts, url.db) == (True, (("secure.example", 6390),), 1)
    assert not RedisURL.parse("redis://h").tls
    store = RedisStore.from_url("rediss://:pw@secure.example:6390/1", pool_size=7)
    pool = raw(store).connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.max_connections == 7
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["db"] == 1


def test_url_sentinel_with_password_hosts_service_and_db() -> None:
    url = RedisURL.parse("redis+sentinel://s3cret@s1:26380,s2/mymaster/3")
    assert url.mode == "sentinel"
    assert url.hosts == (("s1", 26380), ("s2", 26379))
    assert (url.service, url.db, url.password) == ("mymaster", 3, "s3cret")
    store = RedisStore.from_url("redis+sentinel://s3cret@s1:26380,s2/mymaster/3")
    pool = raw(store).connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "s3cret"
    assert "s3cret" not in store._where and "mymaster" in store._where


def test_url_cluster_with_several_startup_nodes() -> None:
    url = RedisURL.parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node3")
    assert url.mode == "cluster"
    assert url.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("node3", 6379))
    store = RedisStore.from_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001")
    client = raw(store)
    assert isinstance(client, RedisCluster)
    assert sorted(client.nodes_manager.startup_nodes) == ["10.0.0.1:7000", "10.0.0.2:7001"]


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",  # no service
        "redis+cluster://h:7000/3",  # cluster has db 0 only
        "redis://h:port/0",
        "redis://h/notadb",
        "redis://h1,h2/0",  # standalone: one host
        "redis://h/0?ssl_cert_reqs=none",  # options are keywords, not query strings
        "redis://:pw@/0",
        "memcached://h",
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        RedisURL.parse(url)
    assert ":pw@" not in str(caught.value)


def test_open_store_routes_every_redis_scheme() -> None:
    for url in (
        "redis://127.0.0.1:1/0",
        "rediss://127.0.0.1:1/0",
        "redis+sentinel://127.0.0.1:1/svc",
        "redis+cluster://127.0.0.1:1",
    ):
        store = open_store(url, namespace="tenant-a", ttl=60)
        assert isinstance(store, RedisStore)
        assert (store.namespace, store._ttl) == ("tenant-a", 60)


LUA = ROOT / "src" / "livekit_resume" / "stores" / "lua"


def test_every_session_script_starts_from_live_head_and_index_shares_the_clock() -> None:
    """The prologue "read the head, purge it if expired" is written once (session.lua's
    live_head), and the time once (clock.lua, which index.lua runs behind too)."""
    from livekit_resume.stores.redis.scripts import script_source

    session = (LUA / "session.lua").read_text()
    assert session.count("read_head()") == 2  # its definition, and the call in live_head
    for path in sorted(LUA.glob("*.lua")):
        if path.stem in ("session", "clock", "index", "publish", "tombstone"):
            continue
        own = path.read_text()
        assert "live_head" in own and "read_head" not in own, path.name
        assert "TIME" not in own, path.name
        source = script_source(path.stem)
        assert source.index("local NOW") < source.index("local function live_head")
    index = script_source("index")
    assert "TIME" not in (LUA / "index.lua").read_text()
    assert index.count("redis.call('TIME')") == 1 and "live_head" not in index
    assert "NOW" not in script_source("publish")
    assert "NOW" not in script_source("tombstone")  # its key is in a slot of its own


def test_namespace_with_braces_and_decoding_clients_are_refused() -> None:
    with pytest.raises(ValueError):
        RedisStore(Redis(), namespace="a{b}")
    with pytest.raises(ValueError):
        RedisStore(Redis(decode_responses=True))


# -- keys and slots --------------------------------------------------------------------


async def test_every_key_of_a_session_shares_one_hash_tag(rstore: RedisStore) -> None:
    ns = rstore.namespace
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a", "b")
    await commit_items(rstore, lease, 1, "c")
    keys = await server_keys(rstore, f"{ns}:*")
    assert keys == sorted(
        [
            f"{ns}:sessions",
            f"{ns}:{{{KEY}}}:head",
            f"{ns}:{{{KEY}}}:v:1",
            f"{ns}:{{{KEY}}}:v:1:b",  # its head and info (test_redis_layout.py)
            f"{ns}:{{{KEY}}}:v:2",
            f"{ns}:{{{KEY}}}:v:2:b",
            f"{ns}:{{{KEY}}}:log:0",
        ]
    )
    assert len({key_slot(k.encode()) for k in keys if k != f"{ns}:sessions"}) == 1
    assert await raw(rstore).llen(f"{ns}:{{{KEY}}}:log:0") == 2  # one element per commit


async def test_a_tombstone_that_holds_no_epoch_is_reported_not_trusted(
    rstore: RedisStore,
) -> None:
    """Foreign data at a deleted session's tombstone (`KeyNames.tombstone`): its holder
    and a new session under the key are told so, naming the key, rather than fenced,
    sent to write the session back or started at an epoch it may have handed out; an
    ``rm`` of the key, which asks for it to be gone, removes it."""
    lease = await rstore.acquire(KEY, "worker-a")
    await rstore.commit(Commit(KEY, lease.epoch, 0, b"h", [], 0))
    assert await rstore.delete(KEY)
    tombstone = rstore._names.tombstone(KEY)
    assert KEY not in tombstone and int(await raw(rstore).get(tombstone)) >= lease.epoch
    await raw(rstore).set(tombstone, b"soon")
    with pytest.raises(SnapshotCorrupt, match="tombstone"):
        await rstore.renew(lease)
    with pytest.raises(SnapshotCorrupt, match="tombstone"):
        await rstore.commit(Commit(KEY, lease.epoch, 1, b"h2", [], 0))
    with pytest.raises(SnapshotCorrupt, match="tombstone"):
        await rstore.acquire(KEY, "worker-b")
    assert await raw(rstore).get(tombstone) == b"soon"
    assert await rstore.info(KEY) is None
    assert await rstore.delete(KEY) is False  # no session; the foreign data went
    assert await raw(rstore).get(tombstone) is None
    assert (await rstore.acquire(KEY, "worker-b")).epoch > lease.epoch


async def test_a_delete_lays_its_tombstone_for_the_epoch_it_deletes_at(
    rstore: RedisStore,
) -> None:
    """The tombstone goes first, then the delete at that epoch alone: a takeover in
    between is read again, so the tombstone always covers the epoch deleted (the
    holder that took it over is fenced too, not sent to write it back)."""
    first = await rstore.acquire(KEY, "worker-a")
    await rstore.commit(Commit(KEY, first.epoch, 0, b"h", [], 0))
    taken: list[Lease] = []
    lay = rstore._lay_tombstone

    async def taken_over_after(key: str, epoch: int) -> None:
        await lay(key, epoch)
        if not taken:  # between the first tombstone and the delete
            taken.append(await rstore.acquire(KEY, "worker-b", takeover=True))

    rstore._lay_tombstone = taken_over_after  # type: ignore[method-assign]
    assert await rstore.delete(KEY)
    (second,) = taken
    assert second.epoch > first.epoch
    assert int(await raw(rstore).get(rstore._names.tombstone(KEY))) >= second.epoch
    for holder in (first, second):
        with pytest.raises(LeaseLost, match="deleted") as lost:
            await rstore.renew(holder)
        assert not lost.value.vanished


async def test_keys_with_braces_stay_in_one_slot(rstore: RedisStore) -> None:
    for key in ["}x", "a}b{c", "{}", "%7B", "{already-tagged}"]:
        lease = await rstore.acquire(key, "worker-a")
        await commit_items(rstore, lease, 0, "a")
        await commit_items(rstore, lease, 1, "b")
        assert [i for i, _ in (await rstore.load(key)).streams["h"]] == ["a", "b"]
        keys = await server_keys(rstore, f"{rstore.namespace}:{{*")
        mine = [k for k in keys if k.startswith(rstore._head_key(key)[: -len("head")])]
        # head, log:0, v:1, v:2 and the versions' bodies v:1:b, v:2:b
        assert len(mine) == 6 and len({key_slot(k.encode()) for k in mine}) == 1
    assert await rstore.keys() == sorted(["}x", "a}b{c", "{}", "%7B", "{already-tagged}"])


async def test_scripts_run_on_the_cluster_for_keys_in_every_slot(
    request: pytest.FixtureRequest,
) -> None:
    store = await build_redis_store("redis_cluster", request, namespace="slots")
    try:
        names = [f"room-{n}" for n in range(40)]
        slots = {key_slot(store._head_key(n).encode()) for n in names}
        client = raw(store)
        await client.initialize()
        nodes = {client.get_node_from_key(store._head_key(n)).name for n in names}
        assert len(slots) > 30 and len(nodes) == 3  # spread over the three primaries
        for name in names:
            lease = await store.acquire(name, "worker-a")
            await commit_items(store, lease, 0, name)
        for name in names:
            stored = await store.load(name)
            assert stored.streams == {"h": [(name, name.encode())]}
        assert await store.keys() == sorted(names)
        for name in names:
            assert await store.delete(name)
        assert await store.keys() == []
    finally:
        await store.aclose()


async def test_cluster_runs_scripts_on_derived_keys_of_the_declared_slot_only(
    request: pytest.FixtureRequest,
) -> None:
    """What the layout relies on: a script may touch undeclared keys of its declared
    key's slot (our derived version and log keys), never a key of another slot."""
    store = await build_redis_store("redis_cluster", request, namespace="derive")
    try:
        client = raw(store)
        head = store._head_key(KEY)
        same_slot = "return redis.call('SET', string.sub(KEYS[1], 1, -5) .. 'probe', 'x')"
        assert await client.eval(same_slot, 1, head) == b"OK"
        other = "elsewhere" if key_slot(b"elsewhere") != key_slot(head.encode()) else "other"
        with pytest.raises(ResponseError, match=r"non local key|CROSSSLOT"):
            await client.eval(f"return redis.call('GET', '{other}')", 1, head)
        await client.delete(head[: -len("head")] + "probe")
    finally:
        await store.aclose()


# -- foreign data ----------------------------------------------------------------------


async def test_foreign_value_at_the_head_is_snapshot_corrupt(rstore: RedisStore) -> None:
    await raw(rstore).set(rstore._head_key(KEY), b"\x00\xffnot ours")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: rstore.acquire(KEY, "worker-a"),
        lambda: rstore.load(KEY),
        lambda: rstore.versions(KEY),
        lambda: rstore.info(KEY),
        lambda: rstore.commit(Commit(KEY, 1, 0, b"h", [Record("h", "x", b"x")], 1)),
        lambda: rstore.renew(Lease(KEY, "worker-a", 1, 0.0)),
    ]
    for call in calls:
        with pytest.raises(SnapshotCorrupt):
            await call()
    assert await raw(rstore).get(rstore._head_key(KEY)) == b"\x00\xffnot ours"  # untouched
    assert KEY in await rstore.keys()  # listed, so that it can be found and deleted
    assert await rstore.delete(KEY) is True
    assert await raw(rstore).exists(rstore._head_key(KEY)) == 0


async def test_an_acquire_refused_for_foreign_data_at_the_head_lists_the_key(
    rstore: RedisStore,
) -> None:
    # A job whose restore is refused exits: the key must be listed by then, not by a
    # refresh left running, so that an operator finds the session with `ls`.
    await raw(rstore).set(rstore._head_key(KEY), b"\x00\xffnot ours")
    with pytest.raises(SnapshotCorrupt):
        await rstore.acquire(KEY, "worker-a")
    assert await raw(rstore).zscore(rstore._names.index, KEY) is not None
    assert KEY in await rstore.keys()


async def test_garbage_fields_and_records_are_snapshot_corrupt(rstore: RedisStore) -> None:
    client = raw(rstore)
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    prefix = rstore._head_key(KEY)[: -len("head")]

    await client.rpush(prefix + "log:0", b"\xc1garbage")  # not msgpack
    await client.hset(prefix + "v:1", "end", 2)
    with pytest.raises(SnapshotCorrupt):
        await rstore.load(KEY)
    await client.lset(prefix + "log:0", 1, b"\x93\x01\x02\x03")  # msgpack, wrong shape
    with pytest.raises(SnapshotCorrupt):
        await rstore.load(KEY)
    await client.hset(prefix + "v:1", "end", 5)  # reads past the log
    with pytest.raises(SnapshotCorrupt):
        await rstore.load(KEY)

    await client.delete(prefix + "v:1")
    await client.set(prefix + "v:1", "a string")
    with pytest.raises(SnapshotCorrupt):
        await rstore.load(KEY)
    # listed, as damaged: history shows it, and a revert rolls back past it
    (listed,) = await rstore.versions(KEY)
    assert listed.version == 1 and "holds a string" in (listed.damaged or ""), listed

    await client.hset(prefix + "head", "epoch", "NaN-ish")
    with pytest.raises(SnapshotCorrupt):
        await rstore.info(KEY)


async def test_a_renewing_commit_after_release_leaves_the_head_without_a_lease(
    rstore: RedisStore,
) -> None:
    """The head keeps ``owner`` and ``expires`` together: a commit with a lease ttl by a
    released lease's epoch (the final save) writes no expiry for nobody."""
    lease = await rstore.acquire(KEY, "worker-a")
    await rstore.release(lease)
    assert await rstore.commit(Commit(KEY, lease.epoch, 0, b"h", [], 0, lease_ttl=60)) == 1
    head = await raw(rstore).hgetall(rstore._head_key(KEY))
    assert b"owner" not in head and b"expires" not in head


async def test_foreign_key_in_the_way_refuses_the_commit_and_writes_nothing(
    rstore: RedisStore,
) -> None:
    client = raw(rstore)
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    prefix = rstore._head_key(KEY)[: -len("head")]
    await client.set(prefix + "v:2", "squatter")
    before = (await client.llen(prefix + "log:0"), await client.hgetall(prefix + "head"))
    with pytest.raises(SnapshotCorrupt):
        await commit_items(rstore, lease, 1, "b")
    after = (await client.llen(prefix + "log:0"), await client.hgetall(prefix + "head"))
    assert after == before
    assert (await rstore.load(KEY)).version == 1


# -- outages ---------------------------------------------------------------------------


async def test_unreachable_server_is_store_unavailable_naming_host_and_operation() -> None:
    with dead_port() as port:
        await _unreachable_server_is_store_unavailable(port)


async def _unreachable_server_is_store_unavailable(port: int) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retries=1, socket_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.acquire(KEY, "worker-a")
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "acquire" in str(caught.value) and KEY in str(caught.value)
        with pytest.raises(StoreUnavailable, match="load"):
            await store.load(KEY)
        with pytest.raises(StoreUnavailable, match="keys"):
            await store.keys()
    finally:
        await store.aclose()


async def test_unreachable_cluster_is_store_unavailable() -> None:
    with dead_port() as port:
        store = RedisStore.from_url(
            f"redis+cluster://127.0.0.1:{port}", retries=1, socket_timeout=0.5
        )
        try:
            with pytest.raises(StoreUnavailable, match="cluster"):
                await store.load(KEY)
        finally:
            await store.aclose()


async def test_server_killed_mid_use_and_restarted_loses_no_acknowledged_version(
    disposable_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(
        disposable_redis.url, namespace="crash", keep=10_000, retries=1, socket_timeout=1.0
    )
    try:
        lease = await store.acquire(KEY, "worker-a")
        expected: dict[int, list[str]] = {}  # what each version must hold, if it exists
        acked = 0
        items: list[str] = []
        twenty = asyncio.Event()

        async def write() -> None:
            nonlocal acked
            for n in range(100_000):
                item = f"m{n}"
                expected[acked + 1] = [*items, item]
                commit = Commit(
                    KEY,
                    lease.epoch,
                    acked,
                    f"head {acked + 1}".encode(),
                    [Record("h", item, item.encode() * 20, items[-1] if items else None)],
                    len(items) + 1,
                )
                try:
                    acked = await store.commit(commit)
                except StoreUnavailable:
                    return
                items.append(item)
                if acked >= 20:
                    twenty.set()

        writer = asyncio.create_task(write())
        await asyncio.wait_for(twenty.wait(), 30)
        await asyncio.sleep(random.uniform(0, 0.05))  # land the kill anywhere in a commit
        disposable_redis.kill()
        await asyncio.wait_for(writer, 30)  # it stops on StoreUnavailable
        with pytest.raises(StoreUnavailable):
            await store.load(KEY)

        disposable_redis.start()
        latest = await store.load(KEY)  # the same store and pool recover
        assert latest.version in (acked, acked + 1)  # the in-flight commit: all or nothing
        listed = await store.versions(KEY)
        assert [v.version for v in listed] == list(range(1, latest.version + 1))
        for v in listed:
            stored = await store.load(KEY, v.version)
            assert [i for i, _ in stored.streams["h"]] == expected[v.version]
            assert stored.head == f"head {v.version}".encode()
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)
        tail = latest.streams["h"][-1][0]
        record = Record("h", "after", b"after", tail)
        version = await store.commit(
            Commit(KEY, lease.epoch, latest.version, b"after", [record], latest.version + 1)
        )
        assert version == latest.version + 1
    finally:
        await store.aclose()


async def test_script_flush_is_transparent(rstore: RedisStore) -> None:
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    await raw(rstore).script_flush()
    await commit_items(rstore, lease, 1, "b")  # NOSCRIPT, reloaded by redis-py
    await raw(rstore).script_flush()
    assert [i for i, _ in (await rstore.load(KEY)).streams["h"]] == ["a", "b"]
    await raw(rstore).script_flush()
    assert await rstore.keys() == [KEY]


def count_round_trips(monkeypatch: pytest.MonkeyPatch, store: RedisStore) -> list[str]:
    """Every round trip the store's client makes from now on: a command, or a pipeline."""
    trips: list[str] = []
    client = raw(store)
    command, pipeline = client.execute_command, client.pipeline

    async def counted_command(*args: Any, **options: Any) -> Any:
        trips.append(str(args[0]))
        return await command(*args, **options)

    def counted_pipeline(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        async def counted_execute(*a: Any, **k: Any) -> Any:
            trips.append("pipeline")
            return await execute(*a, **k)

        pipe.execute = counted_execute
        return pipe

    monkeypatch.setattr(client, "execute_command", counted_command)
    monkeypatch.setattr(client, "pipeline", counted_pipeline)
    return trips


async def test_a_restore_takes_the_lease_and_reads_in_one_round_trip(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_acquire_load` (what a restore calls) of a session that exists: the index record,
    the lease and the latest version in one pipeline, the same as acquire then load."""
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a", "b")
    await rstore.release(lease)
    await rstore.load(KEY)  # every script known to the server: no SCRIPT LOAD below
    trips = count_round_trips(monkeypatch, rstore)
    taken, stored = await rstore._acquire_load(KEY, "worker-b", ttl=30, takeover=False)
    assert trips == ["pipeline"]
    assert taken.epoch > lease.epoch and taken.owner == "worker-b"
    assert stored is not None and stored.version == 1
    assert [i for i, _ in stored.streams["h"]] == ["a", "b"]
    await raw(rstore).script_flush()  # NOSCRIPT: loaded, and the trip sent again
    _, again = await rstore._acquire_load(KEY, "worker-b", ttl=30, takeover=False)
    assert again is not None and again.version == 1
    with pytest.raises(SessionBusy):
        await rstore._acquire_load(KEY, "worker-c", ttl=30, takeover=False)


async def test_a_restore_of_a_new_key_creates_its_session_after_indexing_it(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipelined acquire creates nothing: a key the index did not list is created by
    the ordinary acquire after the index record (and recorded again after it); the
    session it made has no version to read. On a Cluster the index (another node) is
    asked only once the session's own scripts found no head: one more round trip."""
    await rstore._acquire_load("other", "worker-a", ttl=30, takeover=False)  # settings read
    for code in rstore._scripts._code.values():  # known on every node: no SCRIPT LOAD
        await raw(rstore).script_load(code.script)
    trips = count_round_trips(monkeypatch, rstore)
    lease, stored = await rstore._acquire_load(KEY, "worker-a", ttl=30, takeover=False)
    assert stored is None
    more = ["EVALSHA"] if isinstance(raw(rstore), RedisCluster) else []
    # GET: the tombstones a delete may have left, which a new session starts above (in
    # the session's slot, and the earlier releases' one)
    assert trips == ["pipeline", *more, "GET", "GET", "EVALSHA", "EVALSHA"]
    assert await rstore.keys() == ["other", KEY]
    assert await rstore.keys() == ["other", KEY]
    await commit_items(rstore, lease, 0, "a")


async def test_a_restore_that_reads_damage_releases_the_lease(rstore: RedisStore) -> None:
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    await rstore.release(lease)
    await raw(rstore).hset(f"{rstore.namespace}:{{{KEY}}}:v:1", "epoch", "not a number")
    with pytest.raises(SnapshotCorrupt):
        await rstore._acquire_load(KEY, "worker-b", ttl=30, takeover=False)
    assert (await rstore.acquire(KEY, "worker-c")).owner == "worker-c"  # not busy


async def test_a_retried_commit_recognises_itself(rstore: RedisStore) -> None:
    """A commit whose reply was lost (dropped connection) is retried by redis-py: the
    second run must report the first one's version, not refuse a moved head."""
    lease = await rstore.acquire(KEY, "worker-a")
    args: list[str | bytes | int] = [
        lease.epoch,
        0,
        "commit-id-1",
        b"head",
        b"\x80",
        4,
        10,
        "",
        "",
        1,  # records in the elements
        "",  # no lease ttl: the lease is left as it is
        "",  # not a whole commit
        b"\x94\xa1h\xa1a\xc0\xc4\x01a",
    ]
    first = await rstore._run("commit", KEY, args)
    again = await rstore._run("commit", KEY, args)
    assert first == again == [b"ok", 1, 1, 0, 1]
    other: list[str | bytes | int] = [lease.epoch, 0, "commit-id-2", *args[3:]]
    assert (await rstore._run("commit", KEY, other))[0] == b"moved"
    assert (await rstore.versions(KEY))[0].version == 1


async def test_sentinel_url_reaches_the_primary(redis_sentinel: Any) -> None:
    store = RedisStore.from_url(redis_sentinel.url, namespace="sent")
    try:
        lease = await store.acquire(KEY, "worker-a")
        await commit_items(store, lease, 0, "a")
        assert (await store.load(KEY)).streams == {"h": [("a", b"a")]}
        assert "sentinel" in store._where
    finally:
        await store.aclose()


# -- compaction ------------------------------------------------------------------------


async def test_compaction_moves_the_head_to_a_new_generation(rstore: RedisStore) -> None:
    store = RedisStore(raw(rstore), namespace=rstore.namespace, keep=2)
    client = raw(store)
    prefix = store._head_key(KEY)[: -len("head")]
    lease = await store.acquire(KEY, "worker-a")
    await commit_items(store, lease, 0, "a", "b", "c")
    version = 1
    for n in range(40):  # each commit edits b twice: superseded records pile up
        records = [
            Record("h", "b", f"b{n}".encode(), "a"),
            Record("h", "b", f"b{n}!".encode(), "a"),
        ]
        version = await store.commit(Commit(KEY, lease.epoch, version, b"h", records, 3))
    gens = await server_keys(store, prefix + "log:*")
    assert gens and f"{prefix}log:0" not in gens  # the first generation is gone
    newest = max(gens, key=lambda k: int(k.rsplit(":", 1)[1]))
    assert await client.llen(newest) < 40
    stored = await store.load(KEY)
    assert stored.streams == {"h": [("a", b"a"), ("b", b"b39!"), ("c", b"c")]}
    assert (await store.load(KEY, version - 1)).streams["h"][1] == ("b", b"b38!")


# -- a session created while another worker looks for remains ------------------------


async def test_a_session_created_during_the_scan_for_remains_is_no_lost_head(
    real_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker B finds no head and scans for remains; meanwhile worker A creates the
    session and commits. A's keys are not the remains of a lost head: B's load reads
    A's version and B's acquire takes A's session over (it raced two processes once)."""
    other = RedisStore(raw(real_store), namespace=real_store.namespace)
    await real_store._namespace_index.record(KEY, "test")  # listed: B's script says absent
    scan = real_store._namespace_index.remains
    created: list[int] = []

    async def meanwhile(key: str) -> list[str]:
        if not created:
            a = await other.acquire(key, "worker-a")
            created.append(await commit_items(other, a, 0, "a"))
        return await scan(key)

    monkeypatch.setattr(real_store._namespace_index, "remains", meanwhile)
    assert (await real_store.load(KEY)).version == 1
    created.clear()
    await other.delete(KEY)
    await real_store._namespace_index.record(KEY, "test")
    lease = await real_store.acquire(KEY, "worker-b", takeover=True)
    assert created == [1] and lease.owner == "worker-b"
    assert (await real_store.load(KEY)).version == 1


# -- large records ----------------------------------------------------------------------


async def test_a_large_record_is_staged_in_pieces_and_appended_whole(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record past a megabyte goes to the server ahead of the script, a piece per
    command (never one command of megabytes, which asyncio copies on the loop), and the
    script moves it into the log: exact, with nothing staged left behind, through a
    compaction too."""
    store = RedisStore(raw(rstore), namespace=rstore.namespace, keep=2)
    big = os.urandom((3 << 20) + 5)
    sent: list[int] = []  # the largest argument of each script run
    run = store._scripts.run

    async def spy(script: str, key: str, args: Any) -> list[Any]:
        sent.append(max((len(a) for a in args if isinstance(a, bytes)), default=0))
        return await run(script, key, args)

    monkeypatch.setattr(store._scripts, "run", spy)
    pieces: list[int] = []  # each staging command's payload
    for name in ("set", "append"):
        command = getattr(store._client, name)

        async def staged(key: str, value: Any, *a: Any, _c: Any = command, **kw: Any) -> Any:
            pieces.append(len(value))
            return await _c(key, value, *a, **kw)

        monkeypatch.setattr(store._client, name, staged)
    pipeline = store._client.pipeline

    def piped(*a: Any, **kw: Any) -> Any:  # an APPEND goes with its PEXPIRE
        pipe = pipeline(*a, **kw)
        append = pipe.append

        def staged(key: str, value: Any) -> Any:
            pieces.append(len(value))
            return append(key, value)

        pipe.append = staged  # type: ignore[method-assign,assignment]
        return pipe

    monkeypatch.setattr(store._client, "pipeline", piped)
    lease = await store.acquire(KEY, "w")
    records = [Record("h", "a", b"1"), Record("h", "b", big, "a"), Record("h", "c", b"3", "b")]
    first = Commit(KEY, lease.epoch, 0, b"h", records, 3, commit_id="c1")
    version = await store.commit(first)
    assert await store.commit(first) == version  # sent again: it landed, staged anew
    expected = [("a", b"1"), ("b", big), ("c", b"3")]
    assert (await store.load(KEY)).streams == {"h": expected}
    assert max(sent) < 1 << 20
    # a piece is one socket send on the loop: a quarter megabyte keeps it short
    assert sum(pieces) >= 2 * len(big) and max(pieces) <= 1 << 18
    assert await server_keys(store, f"{store.namespace}:up:*") == []
    for n in range(80):  # superseded records pile up until the log is compacted
        edit = [Record("h", "c", b"c%d" % n, "b")]
        version = await store.commit(Commit(KEY, lease.epoch, version, b"h", edit, 3))
    prefix = store._head_key(KEY)[: -len("head")]
    assert f"{prefix}log:0" not in await server_keys(store, prefix + "log:*")  # compacted
    assert (await store.load(KEY)).streams == {"h": [*expected[:2], ("c", b"c79")]}
    assert max(sent) < 1 << 20
    assert await server_keys(store, f"{store.namespace}:up:*") == []


async def test_a_long_log_is_unpacked_off_the_event_loop(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livekit_resume.stores.redis import store as module
    from livekit_resume.stores.redis.records import unpack_streams

    threads: list[threading.Thread] = []

    def noted(*args: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread())
        return unpack_streams(*args, **kw)

    monkeypatch.setattr(module, "unpack_streams", noted)
    lease = await rstore.acquire(KEY, "w")
    await commit_items(rstore, lease, 0, "a")
    await rstore.load(KEY)
    # records of random bytes: deflating leaves them as long as they are
    data = os.urandom(module._OFFLOAD_UNPACK_BYTES)
    record = Record("h", "b", data, "a")
    await rstore.commit(Commit(KEY, lease.epoch, 1, b"h", [record], 2))
    assert (await rstore.load(KEY)).streams["h"][1] == ("b", data)
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()


async def test_a_staged_record_gone_before_its_script_writes_nothing(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = await rstore.acquire(KEY, "w")
    await commit_items(rstore, lease, 0, "a")
    stage = rstore._stage

    async def evicted(key: str, elements: list[bytes]) -> tuple[list[bytes], list[str]]:
        out, names = await stage(key, elements)
        await raw(rstore).delete(*names)  # evicted between staging and the script
        return out, names

    monkeypatch.setattr(rstore, "_stage", evicted)
    big = Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", os.urandom(3 << 20), "a")], 2)
    with pytest.raises(StoreUnavailable, match="staged"):
        await rstore.commit(big)
    stored = await rstore.load(KEY)
    assert (stored.version, stored.streams) == (1, {"h": [("a", b"a")]})
    monkeypatch.undo()
    assert await rstore.commit(big) == 2  # sent again, it lands
    assert (await rstore.load(KEY)).streams["h"][1] == ("b", big.records[0].data)


# -- events ----------------------------------------------------------------------------


async def test_events_reach_subscribers(rstore: RedisStore) -> None:
    async with rstore.subscribe() as events:
        a = await rstore.acquire(KEY, "worker-a", ttl=60)
        await commit_items(rstore, a, 0, "a")
        b = await rstore.acquire(KEY, "worker-b", ttl=60, takeover=True)
        await rstore.publish(KEY, "paused", version=1, by="test")

        got = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(3)]
    committed, taken, paused = got
    assert committed["event"] == "committed"
    assert (committed["key"], committed["version"], committed["epoch"]) == (KEY, 1, a.epoch)
    assert taken == {
        "event": "taken_over",
        "key": KEY,
        "epoch": b.epoch,
        "owner": "worker-b",
        "previous_owner": "worker-a",
    }
    assert paused == {"event": "paused", "key": KEY, "version": 1, "by": "test"}


# -- TTL -------------------------------------------------------------------------------


async def test_ttl_is_a_real_pexpire_on_every_key(real_store: RedisStore) -> None:
    store = RedisStore.from_url(_url_of(real_store), namespace="ttl" + uuid.uuid4().hex[:6], ttl=30)
    try:
        client = raw(store)
        lease = await store.acquire(KEY, "worker-a")
        await commit_items(store, lease, 0, "a")
        await commit_items(store, lease, 1, "b")
        keys = await server_keys(store, f"{store.namespace}:{{*")
        assert len(keys) == 6  # head, log:0, v:1, v:1:b, v:2, v:2:b
        for k in keys:
            assert 25_000 < await client.pttl(k) <= 30_000

        short = RedisStore.from_url(_url_of(real_store), namespace=store.namespace, ttl=0.3)
        try:
            # Under a 0.3 s TTL the session is expired 0.3 s after it was last touched:
            # `short` connects first (on a Cluster, node discovery and health checks can
            # take longer than that), then the session is touched just before.
            await short.keys()
            await store.renew(lease, ttl=30)
            await short.renew(lease, ttl=0.3)  # moves every key's deadline to 0.3 s

            async def gone() -> bool:
                return not await server_keys(store, f"{store.namespace}:{{*")

            await eventually(gone, "redis expired the session's keys")
            assert await short.keys() == []
        finally:
            await short.aclose()
    finally:
        await store.aclose()


def _url_of(store: RedisStore) -> str:
    client = raw(store)
    if isinstance(client, RedisCluster):
        return "redis+cluster://" + ",".join(client.nodes_manager.startup_nodes)
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


async def test_without_ttl_keys_do_not_expire(real_store: RedisStore) -> None:
    lease = await real_store.acquire(KEY, "worker-a")
    await commit_items(real_store, lease, 0, "a")
    for k in await server_keys(real_store, f"{real_store.namespace}:*"):
        assert await raw(real_store).pttl(k) == -1


async def test_index_forgets_expired_and_vanished_sessions(real_store: RedisStore) -> None:
    ns = real_store.namespace
    # 2 s, not less: the two reads of the index below must see "two" alive, and on a
    # loaded machine a Cluster's round trips can add up to half a second
    store = RedisStore.from_url(_url_of(real_store), namespace=ns, ttl=2.0)
    try:
        for key in ("one", "two"):
            await store.acquire(key, "worker-a", ttl=2.0)
        assert await store.keys() == ["one", "two"]
        await raw(store).delete(store._head_key("one"))  # as if a delete died half-way
        assert await store.keys() == ["two"]

        async def collected() -> bool:
            await store.acquire("three", "worker-a", ttl=2.0)  # every index write collects
            members = await raw(store).zrange(f"{ns}:sessions", 0, -1)
            return sorted(members) == [b"three"]

        await eventually(collected, "dead members left the index")
    finally:
        await store.aclose()


async def test_a_session_without_ttl_lost_from_the_index_is_listed_again(
    real_store: RedisStore,
) -> None:
    """The index lost the entry of a live session without TTL (a failover to a replica
    that had not received it): its holder's writes record it again, within
    `INDEX_REFRESH_FOREVER`, not on every write."""
    from livekit_resume.stores.redis.namespace import INDEX_REFRESH_FOREVER

    now = [time.time()]
    store = RedisStore.from_url(
        _url_of(real_store), namespace=real_store.namespace, clock=lambda: now[0]
    )
    try:
        lease = await store.acquire(KEY, "worker-a")
        version = await commit_items(store, lease, 0, "a")
        await raw(store).zrem(f"{store.namespace}:sessions", KEY)
        version = await commit_items(store, lease, version, "b")
        assert await store.keys() == []  # not re-recorded on every write
        now[0] += INDEX_REFRESH_FOREVER + 1
        await commit_items(store, lease, version, "c")  # refreshes it, in the background

        async def listed() -> bool:
            return await store.keys() == [KEY]

        await eventually(listed, "the commit's refresh listed the session again", 5)
    finally:
        await store.aclose()


# -- two workers racing in two processes -----------------------------------------------

RACE_SECONDS = 3.0
RACE_MAX_LOOPS = 3000


async def _race_worker(url: str, namespace: str, key: str, name: str, seed: int) -> dict[str, Any]:
    """One worker: takes the key over now and then and commits in between, each commit
    one item ``v<version>`` whose data names the worker and epoch, plus edits of a
    status item so the log outgrows the live items and compaction runs."""
    store = RedisStore.from_url(url, namespace=namespace, keep=100_000)
    rng = random.Random(seed)
    accepted: list[tuple[int, int]] = []
    acquired: list[tuple[int, float]] = []  # (epoch, server time it was granted)
    refused = 0
    lease: Lease | None = None
    print("ready", flush=True)
    sys.stdin.readline()  # both start together
    deadline = time.monotonic() + RACE_SECONDS
    loops = 0
    try:
        while time.monotonic() < deadline and loops < RACE_MAX_LOOPS:
            loops += 1
            if lease is None or rng.random() < 0.1:
                lease = await store.acquire(key, name, ttl=30, takeover=True)
                acquired.append((lease.epoch, lease.expires_at - 30))
            try:
                base = await store.load(key)
                version, tail, size = base.version, base.streams["h"][-1][0], len(base.streams["h"])
            except SnapshotNotFound:
                version, tail, size = 0, None, 0
            item = f"v{version + 1}"
            records = [Record("h", item, f"{name}:{lease.epoch}".encode(), tail)]
            records += [Record("s", "status", os.urandom(8)) for _ in range(3)]
            head = json.dumps({"worker": name, "epoch": lease.epoch, "version": version + 1})
            try:
                got = await store.commit(
                    Commit(key, lease.epoch, version, head.encode(), records, size + 2)
                )
            except LeaseLost:
                refused += 1
                lease = None
                await asyncio.sleep(rng.uniform(0.005, 0.03))  # let the other one write
                continue
            accepted.append((got, lease.epoch))
            await asyncio.sleep(rng.uniform(0, 0.002))
    finally:
        await store.aclose()
    return {"accepted": accepted, "acquired": acquired, "refused": refused, "loops": loops}


def _race_main() -> None:  # entry point of a worker process
    url, namespace, key, name, seed = sys.argv[1:6]
    result = asyncio.run(_race_worker(url, namespace, key, name, int(seed)))
    print(json.dumps(result), flush=True)


@pytest.mark.slow
async def test_two_worker_processes_racing_never_accept_a_stale_write(
    real_store: RedisStore,
) -> None:
    url, ns, key = _url_of(real_store), real_store.namespace, "contested-room"
    code = "from tests.test_redis import _race_main; _race_main()"
    env = child_env()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            url,
            ns,
            key,
            name,
            str(seed),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        for seed, name in enumerate(["worker-a", "worker-b"])
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    for p in procs:
        assert p.returncode == 0
    results = dict(
        zip(
            ["worker-a", "worker-b"], [json.loads(o[0].splitlines()[-1]) for o in outs], strict=True
        )
    )

    by_version: dict[int, tuple[str, int]] = {}
    granted: dict[int, float] = {}
    for name, result in results.items():
        assert result["accepted"] and result["refused"]  # both won and lost some rounds
        for version, epoch in result["accepted"]:
            assert version not in by_version, f"version {version} accepted twice"
            by_version[version] = (name, epoch)
    for name, result in results.items():
        other = next(r for n, r in results.items() if n != name)
        theirs = {e for e, _ in other["acquired"]}
        for epoch, at in result["acquired"]:
            assert epoch not in theirs, f"epoch {epoch} granted to both workers"
            granted[epoch] = min(at, granted.get(epoch, at))
        # A worker's accepted commits carry epochs it was granted.
        assert {e for _, e in result["accepted"]} <= {e for e, _ in result["acquired"]}
    assert len(granted) > 4  # takeovers really interleaved

    # The stored history is exactly what the workers were told was accepted.
    listed = await real_store.versions(key)
    assert [(v.version, v.epoch) for v in listed] == [
        (v, by_version[v][1]) for v in sorted(by_version)
    ]
    assert sorted(by_version) == list(range(1, len(by_version) + 1))
    epochs = [v.epoch for v in listed]
    assert epochs == sorted(epochs)  # no stale epoch after a newer one
    for v in listed:
        # Accepted only while its epoch was current: no newer epoch had been granted.
        # (Both times are the server's clock; 5 us absorbs float rounding of expires-ttl.)
        newer = [at for e, at in granted.items() if e > v.epoch]
        assert not newer or min(newer) > v.created_at - 5e-6, f"version {v.version} was stale"

    # Every version loads whole: its own item after everything before it.
    for v in listed:
        stored = await real_store.load(key, v.version)
        name, epoch = by_version[v.version]
        assert json.loads(stored.head) == {"worker": name, "epoch": epoch, "version": v.version}
        assert [i for i, _ in stored.streams["h"]] == [f"v{n}" for n in range(1, v.version + 1)]
        assert [d for _, d in stored.streams["h"]] == [
            f"{by_version[n][0]}:{by_version[n][1]}".encode() for n in range(1, v.version + 1)
        ]


async def test_replica_after_failover_is_store_unavailable(
    disposable_redis: RedisServer,
) -> None:
    """A name still pointing at a demoted primary answers READONLY: retried, then
    StoreUnavailable naming it; reads still work."""
    store = RedisStore.from_url(disposable_redis.url, namespace="ro", retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        await commit_items(store, lease, 0, "a")
        with dead_port() as gone:  # a primary that is gone
            disposable_redis.cli("replicaof", "127.0.0.1", str(gone))
            with pytest.raises(StoreUnavailable, match=r"READONLY|read only"):
                await commit_items(store, lease, 1, "b")
            assert (await store.load(KEY)).version == 1
    finally:
        await store.aclose()


async def test_script_errors_on_foreign_data_surface_as_corrupt(rstore: RedisStore) -> None:
    """A Redis error raised inside a script (here WRONGTYPE, reading a version record
    that is a string) comes back with its code and is reported as SnapshotCorrupt."""
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    prefix = rstore._head_key(KEY)[: -len("head")]
    await raw(rstore).delete(prefix + "v:1")
    await raw(rstore).set(prefix + "v:1", "not a hash")
    stale = Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1)
    with pytest.raises(SnapshotCorrupt, match="WRONGTYPE"):
        await rstore.commit(stale)  # checks whether v:1 is its own earlier attempt


async def test_remains_of_a_lost_head_are_found_and_deleted_on_every_topology(
    rstore: RedisStore,
) -> None:
    """The scan for a session's remains runs where its slot lives (a Cluster node)."""
    key = "room*[weird]?{x}"  # glob characters and braces in the key are literals
    lease = await rstore.acquire(key, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    await commit_items(rstore, lease, 1, "b")
    lookalike = await rstore.acquire("roomZ[weird]?{x}", "worker-a")
    await commit_items(rstore, lookalike, 0, "z")
    await raw(rstore).delete(rstore._head_key(key))

    with pytest.raises(SnapshotCorrupt, match="lost its head"):
        await rstore.load(key)
    with pytest.raises(SnapshotCorrupt, match="lost its head"):
        await rstore.acquire(key, "worker-b")
    assert await rstore.delete(key) is True
    with pytest.raises(SnapshotNotFound):
        await rstore.load(key)
    prefix = rstore._head_key(key)[: -len("head")]
    assert [k for k in await server_keys(rstore, "*") if k.startswith(prefix)] == []
    assert (await rstore.load("roomZ[weird]?{x}")).streams == {"h": [("z", b"z")]}


async def test_rm_of_a_session_that_lost_a_version_removes_every_key_on_every_topology(
    rstore: RedisStore,
) -> None:
    """A delete, a trim or a renewal with a ttl first checks that every key the head names
    is on the node (a Cluster slot half moved: `tests/test_cluster_reshard.py`). A key
    lost otherwise (evicted) is damage, not a slot in motion: the commit that would trim
    it says so, and `rm` still removes the whole session, the key free again."""
    lease = await rstore.acquire(KEY, "worker-a")
    for n in range(3):
        await commit_items(rstore, lease, n, f"i{n}")
    prefix = rstore._head_key(KEY)[: -len("head")]
    await raw(rstore).delete(prefix + "v:1")  # evicted
    assert await rstore.delete(KEY) is True
    assert [k for k in await server_keys(rstore, "*") if k.startswith(prefix)] == []
    again = await rstore.acquire(KEY, "worker-b")
    await commit_items(rstore, again, 0, "new")
    assert (await rstore.load(KEY)).streams == {"h": [("new", b"new")]}


# -- the connections' driver info -------------------------------------------------


@pytest.mark.filterwarnings("ignore:Call to '__init__'.*lib_name:DeprecationWarning")
@pytest.mark.parametrize(
    "url", ["redis://h/0", "redis+sentinel://s1:26380/mymaster/3", "redis+cluster://n1:7000"]
)
def test_every_connection_names_livekit_resume_and_shares_one_driver_info(url: str) -> None:
    client = raw(RedisStore.from_url(url))
    if isinstance(client, RedisCluster):
        kwargs = client.nodes_manager.connection_kwargs
    else:
        kwargs = client.connection_pool.connection_kwargs
    info = kwargs["driver_info"]
    assert info.formatted_name == f"redis-py(livekit-resume_v{livekit_resume.__version__})"
    assert info.lib_version == importlib.metadata.version("redis") == redis.__version__
    if not isinstance(client, RedisCluster) and "service_name" in dir(client.connection_pool):
        [sentinel, *_] = client.connection_pool.sentinel_manager.sentinels
        assert sentinel.connection_pool.connection_kwargs["driver_info"] is info
    # the caller's own identification wins
    mine = raw(RedisStore.from_url(url, lib_name="my-app"))
    kwargs = (
        mine.nodes_manager.connection_kwargs
        if isinstance(mine, RedisCluster)
        else mine.connection_pool.connection_kwargs
    )
    assert getattr(kwargs.get("driver_info"), "formatted_name", None) != info.formatted_name


async def test_a_new_connection_reads_no_package_metadata(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py looked its own version up in the installed packages for every connection
    it made (0.6 to 2 ms each, two in the first restore of a new worker)."""
    store = RedisStore.from_url(redis_server.url, namespace="drv" + uuid.uuid4().hex[:6])
    looked_up: list[str] = []
    version = importlib.metadata.version

    def counting(name: str) -> str:
        looked_up.append(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", counting)
    pool = raw(store).connection_pool
    try:
        conns = [await pool.get_connection() for _ in range(3)]  # three made, none reused
        assert len({id(c) for c in conns}) == 3
        for c in conns:
            await pool.release(c)
        assert looked_up == []
    finally:
        await store.aclose()
