"""An adversarial pass over the Redis store: hostile values in a session's keys, hostile
messages on its channels. Each test here failed on the code before its fix. Real
``redis-server`` processes of the tests' own (``redis_servers.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.cluster import RedisCluster as SyncCluster
from redis.crc import key_slot

import livekit_resume as lr
from livekit_resume.errors import SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Command, Commit, Lease, Record, SessionInfo
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests.faults.cluster import FailoverPair
from tests.lk.scripted_llm import ScriptedLLM
from tests.redis_servers import (
    RedisCluster,
    RedisFactory,
    RedisServer,
    build_redis_store,
    require_redis_server,
)
from tests.test_autosave_adversarial import live_texts, stored_texts
from tests.test_hooks import KEY as HOOKS_KEY
from tests.test_hooks import Receptionist, Visit, registry, start
from tests.test_redis_faults import calls, item_commit

KEY = "room-adv"


@pytest.fixture(params=["redis", "redis_cluster"])
async def real_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    store = await build_redis_store(request.param, request, namespace=f"a{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


# A head field that no store writes but that Lua's tonumber() reads as a number: loops
# over versions or generations from such a head would never end (a script that has
# written cannot be killed: the server would hang until restarted).
HOSTILE_HEADS = [
    {"version": "inf"},
    {"version": "nan"},
    {"version": "1e12"},
    {"oldest": "-1e12"},
    {"gen": "1e12"},
    {"gen_lo": "-1e12"},
    {"version": "1.5"},
    {"oldest": "5", "version": "2"},
    {"touched": "inf"},
]


@contextlib.asynccontextmanager
async def one_version(make_redis: RedisFactory) -> AsyncIterator[tuple[RedisStore, Lease]]:
    """A store on a server of its own whose scripts are reported busy after 100 ms (a
    hung one is then seen, and the server killed at the end), holding one version of
    KEY under the lease given with it."""
    server = make_redis("--lua-time-limit", "100")
    store = RedisStore.from_url(
        server.url, namespace="adv", ttl=3600, socket_timeout=2.0, retries=0
    )
    try:
        lease = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
        yield store, lease
    finally:
        await store.aclose()
        server.kill()


async def each_raises(
    calls: dict[str, Callable[[], Awaitable[object]]],
    error: type[Exception],
    otherwise: str | None = None,
) -> None:
    """No call raises anything but ``error`` (each within 10 s); with ``otherwise``, each
    must raise it (``otherwise`` says what answering instead would mean)."""
    for name, call in calls.items():
        try:
            await asyncio.wait_for(call(), 10)
        except error:
            continue
        except Exception as exc:
            raise AssertionError(f"{name}: {exc!r}") from exc
        if otherwise is not None:
            raise AssertionError(f"{name} {otherwise}")


@pytest.mark.parametrize(
    "fields", HOSTILE_HEADS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())
)
async def test_a_head_with_hostile_numbers_is_corrupt_and_never_hangs_the_server(
    make_redis: RedisFactory, fields: dict[str, str]
) -> None:
    async with one_version(make_redis) as (store, lease):
        head = store._head_key(KEY)
        await store._client.hset(head, mapping=dict(fields))  # type: ignore[arg-type]
        before = await store._client.hgetall(head)
        second = Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "acquire": lambda: store.acquire(KEY, "worker-b", takeover=True),
            "renew": lambda: store.renew(lease),
            "commit": lambda: store.commit(second),
            "load": lambda: store.load(KEY),
            "versions": lambda: store.versions(KEY),
            "info": lambda: store.info(KEY),
        }
        await each_raises(calls, SnapshotCorrupt, "read a hostile head as valid")
        assert await store._client.hgetall(head) == before  # nothing changed
        # and the advice the error gives works: the session can be deleted
        assert await asyncio.wait_for(store.delete(KEY), 10) is True
        assert await store._client.exists(head) == 0


async def test_hostile_commands_on_the_channel_do_not_stop_the_inbox(
    real_store: RedisStore,
) -> None:
    """A stray publisher on a session's command channel: its messages are skipped, the
    owner's inbox goes on and reads the next real command."""
    channel = real_store._names.control(KEY)
    commands = real_store.commands()
    async with commands.inbox(KEY) as inbox:
        for junk in (
            b'{"id": "x", "verb": "pause", "epoch": 1e999}',
            b'{"id": "x", "verb": "pause", "epoch": -Infinity}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"id": "x", "verb": "pause", "epoch": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b"\xff\xfe",
        ):
            await commands._scripts.call("publish", channel + ":j", [channel, junk])
        await commands.send(Command("real", KEY, "pause", 7))
        got = await asyncio.wait_for(inbox.__anext__(), 10)
        assert (got.id, got.verb, got.epoch) == ("real", "pause", 7)


async def test_hostile_events_on_the_channel_do_not_end_a_subscription(
    real_store: RedisStore,
) -> None:
    async with real_store.subscribe() as events:
        junk_events = (
            b"[" * 100_000 + b"]" * 100_000,
            b"\xff",
            b"1e999",
            b'"str"',
            b'{"x": 1}',  # a dict, but no event of ours: every event has event and key
            b'{"event": 1, "key": "k"}',
            b'{"event": "paused", "key": ["k"]}',
        )
        for junk in junk_events:
            await real_store._scripts.call(
                "publish", real_store._head_key(KEY), [real_store._channel, junk]
            )
        await real_store.publish(KEY, "paused", version=3)
        got = await asyncio.wait_for(events.__anext__(), 10)
        assert got["event"] == "paused" and got["version"] == 3


def test_keep_is_bounded_by_what_a_head_may_span() -> None:
    with pytest.raises(ValueError, match="keep must be at most"):
        RedisStore.from_url("redis://127.0.0.1:1/0", keep=1_000_001)


@pytest.mark.parametrize("gen", ["1e12", "inf", "-3", "0.5"])
async def test_a_hostile_generation_in_the_oldest_version_never_hangs_a_commit(
    make_redis: RedisFactory, gen: str
) -> None:
    """A commit trims log generations up to the one its oldest retained version reads:
    that number comes from a version record, and a hostile one (1e12) looped over a
    trillion DELs after the commit had written, an unkillable script. Nothing retained
    is deleted on its word."""
    async with one_version(make_redis) as (store, lease):
        await store.commit(Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2))
        log_len = await store._client.llen(store._names.log(KEY, 0))
        v2 = await store._client.hget(store._head_key(KEY)[: -len("head")] + "v:2", "cid")
        assert isinstance(v2, bytes)
        await store._compact(KEY, 2, 0, log_len, v2.decode())
        head = await store._client.hgetall(store._head_key(KEY))
        assert (head[b"gen"], head[b"gen_lo"]) == (b"1", b"0")  # v1 still reads log:0
        await store._client.hset(store._head_key(KEY)[: -len("head")] + "v:1", "gen", gen)
        third = Commit(KEY, lease.epoch, 2, b"h3", [Record("h", "c", b"c", "b")], 3)
        assert await asyncio.wait_for(store.commit(third), 10) == 3
        loaded = await asyncio.wait_for(store.load(KEY), 10)
        assert [i for i, _ in loaded.streams["h"]] == ["a", "b", "c"]


@pytest.mark.parametrize("field,value", [("end", "1.5"), ("end", "-1"), ("gen", "0.5")])
async def test_a_version_record_with_hostile_numbers_loads_as_corrupt(
    real_store: RedisStore, field: str, value: str
) -> None:
    """Not `StoreUnavailable` (a server error on LRANGE 0 0.5, retried forever), nor an
    empty conversation (an end of -1 read nothing): `SnapshotCorrupt`."""
    lease = await real_store.acquire(KEY, "worker-a")
    await real_store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
    await real_store._client.hset(real_store._head_key(KEY)[: -len("head")] + "v:1", field, value)
    with pytest.raises(SnapshotCorrupt):
        await real_store.load(KEY)
    await real_store.delete(KEY)


def _owner_of(cluster: RedisCluster, slot: int) -> tuple[RedisServer, str]:
    for node in cluster.nodes:
        for line in node.cli("cluster", "nodes").splitlines():
            parts = line.split()
            if "myself" not in parts[2]:
                continue
            for rng in parts[8:]:
                if rng.startswith("["):
                    continue
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return node, parts[0]
    raise AssertionError(f"no node serves slot {slot}")


async def test_a_slot_half_migrated_is_unavailable_not_corrupt(tmp_path: Path) -> None:
    """A Cluster resharding the session's slot moves its keys one MIGRATE at a time: the
    head may reach the new node before the versions it names. A script sent there
    (ASK) then finds them missing: that is a retryable `StoreUnavailable`, never
    `SnapshotCorrupt`, whose message advises deleting the session. Once the slot has
    moved whole, everything reads and commits."""
    require_redis_server()
    cluster = RedisCluster(tmp_path / "cluster").start()
    store = RedisStore.from_url(cluster.url, namespace="mig", retries=1, socket_timeout=2.0)
    try:
        lease = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
        head = store._head_key(KEY)
        slot = key_slot(head.encode())
        source, source_id = _owner_of(cluster, slot)
        target = next(n for n in cluster.nodes if n is not source)
        target_id = target.cli("cluster", "myid").strip()
        assert target.cli("cluster", "setslot", str(slot), "importing", source_id).strip() == "OK"
        assert source.cli("cluster", "setslot", str(slot), "migrating", target_id).strip() == "OK"
        out = source.cli("migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", head)
        assert out.strip() == "OK", out

        second = Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "load": lambda: store.load(KEY),
            "commit": lambda: store.commit(second),
            "versions": lambda: store.versions(KEY),
            "renew": lambda: store.renew(lease),
        }
        await each_raises(calls, StoreUnavailable)  # or answers: the slot may have settled

        # the rest of the slot moves; the session is whole on its new node
        rest = [k for k in source.cli("cluster", "getkeysinslot", str(slot), "100").split() if k]
        if rest:
            out = source.cli(
                "migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *rest
            )
            assert out.strip() == "OK", out
        for node in cluster.nodes:
            node.cli("cluster", "setslot", str(slot), "node", target_id)
        version = (await store.load(KEY)).version
        assert version in (1, 2)
        if version == 1:
            assert await store.commit(second) == 2
        assert [i for i, _ in (await store.load(KEY)).streams["h"]] == ["a", "b"]
    finally:
        await store.aclose()
        cluster.stop()


async def test_a_large_record_staged_slower_than_its_ttl_still_commits(
    make_redis: RedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged record's key had its TTL set once, by the first piece: staging that took
    longer (a slow link, a busy server) let it expire halfway, the next APPEND made a key
    of the rest without any TTL, and the commit was refused as unstaged, again on every
    retry, never landing. Each piece now renews the TTL."""
    import livekit_resume.stores.redis.store as store_module

    # 16 pieces, each behind a 0.1 s sleep of the server: well over a second in all, so
    # over the ttl; each piece well within it, a loaded machine's scheduling included
    monkeypatch.setattr(store_module, "_STAGE_TTL_MS", 1000)
    monkeypatch.setattr(store_module, "_STAGE_PIECE", 128 * 1024)
    server = make_redis("--enable-debug-command", "yes")
    store = RedisStore.from_url(server.url, namespace="adv")
    busy = RedisStore.from_url(server.url, namespace="adv")
    stop = asyncio.Event()

    async def slow_server() -> None:  # the server busy 0.1 s at a time, again and again
        while not stop.is_set():
            await busy._client.execute_command("DEBUG", "SLEEP", "0.1")
            await asyncio.sleep(0)

    try:
        lease = await store.acquire(KEY, "worker-a")
        big = bytes(range(256)) * (8 * 1024)  # 2 MiB, staged in 16 pieces
        task = asyncio.ensure_future(slow_server())
        try:
            commit = Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", big)], 1)
            assert await asyncio.wait_for(store.commit(commit), 15) == 1
        finally:
            stop.set()
            await task
        assert (await store.load(KEY)).streams["h"] == [("a", big)]
        assert [k async for k in store._client.scan_iter(match="adv:up:*")] == []
    finally:
        await store.aclose()
        await busy.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b'{"status": "done", "version": 1e999, "reason": ""}',
        b'{"status": "done", "version": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"\xff\xfe",
    ],
    ids=["huge-version", "deep", "not-utf8"],
)
async def test_a_hostile_answer_to_a_command_reads_as_refused(
    real_store: RedisStore, answer: bytes
) -> None:
    """The sender reads the owner's answer from a key anyone with access may write: one
    that is no answer of ours is `refused` as unreadable, never an exception."""
    commands = real_store.commands()
    command = Command("cmd-1", KEY, "pause", 7)
    await real_store._client.set(commands._state(command), answer, ex=60)
    reply = await commands.reply(command)
    assert reply.status == "refused" and "unreadable" in reply.reason


@pytest.mark.parametrize("field", ["end", "gen"])
async def test_a_commit_sent_again_over_a_damaged_version_record_is_corrupt(
    real_store: RedisStore, field: str
) -> None:
    """A commit sent again after its reply was lost finds itself by its id in the
    version record; a record missing its ``end`` or ``gen`` made the script's reply
    short (Lua ends a table at its first nil) and the store raised a bare ValueError."""
    lease = await real_store.acquire(KEY, "worker-a")
    commit = Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1, commit_id="c1")
    assert await real_store.commit(commit) == 1
    await real_store._client.hdel(real_store._head_key(KEY)[: -len("head")] + "v:1", field)
    with pytest.raises(SnapshotCorrupt):
        await real_store.commit(commit)


async def test_a_server_that_speaks_no_redis_is_store_unavailable() -> None:
    """A store URL pointing at another service (an HTTP port, a proxy answering
    garbage): redis-py's InvalidResponse came out untyped; it is `StoreUnavailable`."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read(100)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retries=0, socket_timeout=2.0)
    try:
        for call in (lambda: store.load(KEY), lambda: store.acquire(KEY, "w"), store.keys):
            with pytest.raises(StoreUnavailable, match="Redis"):
                await asyncio.wait_for(call(), 10)
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()


async def test_a_restore_whose_index_record_fails_keeps_no_lease(real_store: RedisStore) -> None:
    """A restore sends the index record, the acquire and the load in one pipeline. When
    the index record fails but the acquire was granted, the restore raised and left the
    lease held by nobody who knew of it: another worker was then busy-refused until it
    expired. It is released. (On a Cluster the index, on another node, is not needed
    to restore a session that exists: the restore goes on, and the entry's refresh
    fails in the background, logged.)"""
    lease = await real_store.acquire(KEY, "worker-a")
    await real_store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
    await real_store.release(lease)
    fresh = RedisStore.from_url(_url_of(real_store), namespace=real_store.namespace)
    try:
        await real_store._client.delete(real_store._index_key)
        await real_store._client.set(real_store._index_key, b"not a sorted set")
        if hasattr(real_store._client, "nodes_manager"):
            granted, stored = await fresh._acquire_load(KEY, "worker-b", ttl=30, takeover=False)
            assert stored is not None and stored.version == 1
            await fresh.release(granted)
        else:
            with pytest.raises((SnapshotCorrupt, StoreUnavailable)):
                await fresh._acquire_load(KEY, "worker-b", ttl=30, takeover=False)
        info = await real_store.info(KEY)
        assert info is not None and info.owner is None
    finally:
        await fresh.aclose()
        await real_store._client.delete(real_store._index_key)


def _url_of(store: RedisStore) -> str:
    client: Any = store._client
    if hasattr(client, "nodes_manager"):
        return "redis+cluster://" + ",".join(client.nodes_manager.startup_nodes)
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


def _partial_cluster(tmp_path: Path, namespace: str, **kw: Any) -> tuple[RedisCluster, RedisStore]:
    """A Cluster that serves the slots of its live primaries while one is stopped (no
    replica to fail over to, ``cluster-require-full-coverage no``), and a store on it
    that gives up on a stopped node quickly."""
    require_redis_server()
    cluster = RedisCluster(tmp_path / "cluster").start()
    for node in cluster.nodes:
        node.cli("config", "set", "cluster-require-full-coverage", "no")
    store = RedisStore.from_url(
        cluster.url, namespace=namespace, retries=0, socket_timeout=0.5, **kw
    )
    return cluster, store


def _bystander(cluster: RedisCluster, store: RedisStore) -> RedisServer:
    """A primary to stop that neither holds the namespace index nor is the node a new
    client asks first (redis-py's default node: with it down no client starts)."""
    index_node, _ = _owner_of(cluster, key_slot(store._index_key.encode()))
    client: Any = SyncCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        default = client.get_default_node().port
    finally:
        client.close()
    return next(n for n in cluster.nodes if n is not index_node and n.port != default)


async def test_a_stopped_cluster_primary_is_not_asked_for_its_settings_before_every_call(
    tmp_path: Path,
) -> None:
    """A store reads each primary's eviction and persistence settings before its
    first call. With a Cluster primary stopped that read never completed, so it was
    made again before every call, each waiting out the socket timeout for the stopped
    node (5 s by default), on every node's sessions: a new worker's restore took 20 s
    and each of its saves 5 s. Now the first call waits for that one read; the stopped
    primary is asked again in the background, and the others are not asked again."""
    cluster, store = _partial_cluster(tmp_path, "chk")
    try:
        stopped = _bystander(cluster, store)
        key = _key_on(cluster, store, "room", lambda node: node is not stopped)
        live = [n for n in cluster.nodes if n is not stopped]
        for node in live:
            node.cli("config", "resetstat")
        stopped.pause()
        try:
            lease = await store.acquire(key, "worker-a")
            for n in range(3):
                assert await store.commit(item_commit(lease, n, f"i{n}", None)) == n + 1
            assert (await store.load(key)).version == 3
            assert [calls(n, "config|get") for n in live] == [1] * len(live)  # 8 each on main
        finally:
            stopped.resume()
    finally:
        await store.aclose()
        cluster.stop()


async def test_a_listing_does_not_wait_twice_for_a_stopped_cluster_primary(
    tmp_path: Path,
) -> None:
    """``ls`` reads a page's heads, node by node, then the same sessions' infos. Each
    read of a stopped primary waits out the client's timeouts and retries (20 s at the
    defaults): the infos of its sessions are now answered with the error its heads'
    read just got, without asking it again (about 51 s for ``ls`` at the defaults with
    one primary stopped on main, 26 s now). The other nodes' sessions are read."""
    cluster, store = _partial_cluster(tmp_path, "down")
    try:
        stopped = _bystander(cluster, store)
        names = [f"room-{i}" for i in range(30)]
        for name in names:
            await store.release(await store.acquire(name, "worker-a"))
        on_stopped = {
            n
            for n in names
            if _owner_of(cluster, key_slot(store._head_key(n).encode()))[0] is stopped
        }
        assert on_stopped and on_stopped != set(names)
        sent: list[str] = []
        trip = store._scripts.trip

        async def counted(calls: Any, **kw: Any) -> list[Any]:
            sent.extend(routed_by for _, routed_by, _ in calls)
            return await trip(calls, **kw)

        store._scripts.trip = counted  # type: ignore[method-assign,assignment]
        stopped.pause()
        try:
            listed = await store.keys()
            assert set(listed) == set(names)  # a stopped node's sessions stay listed
            infos = await store.infos(listed)
        finally:
            stopped.resume()
        for name, info in zip(listed, infos, strict=True):
            if name in on_stopped:
                assert isinstance(info, StoreUnavailable), (name, info)
            else:
                assert isinstance(info, SessionInfo) and info.key == name
        heads = {store._head_key(n) for n in on_stopped}
        assert not heads.intersection(sent)  # the stopped node was not asked for the infos
    finally:
        await store.aclose()
        cluster.stop()


async def test_a_strict_store_refuses_an_evicting_primary_while_another_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``strict=True`` refuses a server that evicts keys. On a Cluster with a primary
    stopped the settings read failed whole and the call went on unchecked: a session
    was written to a primary evicting session keys. The primaries that answer are now
    judged; the refusal holds until a later read finds the setting fixed."""
    from livekit_resume.stores.redis import health

    monkeypatch.setattr(health, "RECHECK_EVERY", 0.1)
    cluster, store = _partial_cluster(tmp_path, "strict", strict=True)
    try:
        stopped = _bystander(cluster, store)
        index_node, _ = _owner_of(cluster, key_slot(store._index_key.encode()))
        key = _key_on(cluster, store, "room", lambda node: node is index_node)
        index_node.cli("config", "set", "maxmemory-policy", "allkeys-lru")
        stopped.pause()
        try:
            with pytest.raises(StoreUnavailable, match=r"strict=True.*allkeys-lru"):
                await store.acquire(key, "worker-a")
            assert index_node.cli("exists", store._head_key(key)).strip() == "0"
            index_node.cli("config", "set", "maxmemory-policy", "noeviction")

            async def accepted() -> bool:
                await asyncio.sleep(0.15)  # a read is due again: started by the next call
                try:
                    await store.acquire(key, "worker-a")
                except StoreUnavailable:
                    return False
                return True

            await eventually(accepted, "the store is used once the primary stops evicting")
        finally:
            stopped.resume()
    finally:
        await store.aclose()
        cluster.stop()


def _key_on(
    cluster: RedisCluster, store: RedisStore, prefix: str, where: Callable[[RedisServer], bool]
) -> str:
    """The first key ``prefix-N`` whose session lives on a node ``where`` accepts."""
    return next(
        k
        for k in (f"{prefix}-{i}" for i in range(100))
        if where(_owner_of(cluster, key_slot(store._head_key(k).encode()))[0])
    )


async def test_sessions_go_on_saving_while_the_primary_holding_the_index_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Cluster the namespace index lives in a slot of its own, on one primary. With
    that primary stopped (no replica to fail over to, `cluster-require-full-coverage
    no`), the sessions on the other primaries must go on committing, renewing and being
    restored: the index entry's refresh is not theirs to wait for. (It was done before
    each commit and renewal, and failed them all once due; a restore sent it in its
    first round trip and failed.) Only a new session waits for the index."""
    from livekit_resume.stores.redis import namespace

    monkeypatch.setattr(namespace, "INDEX_REFRESH_FOREVER", 0.2)
    cluster, store = _partial_cluster(tmp_path, "idx")
    try:
        index_node, _ = _owner_of(cluster, key_slot(store._index_key.encode()))
        key = _key_on(cluster, store, "room", lambda node: node is not index_node)
        lease = await store.acquire(key, "worker-a")
        version = await store.commit(
            Commit(key, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1)
        )
        index_node.pause()
        try:
            await asyncio.sleep(0.3)  # the index entry is due for its refresh
            for n in range(2, 5):
                item = Record("h", f"i{n}", b"x", "a" if n == 2 else f"i{n - 1}")
                version = await store.commit(Commit(key, lease.epoch, version, b"h", [item], n))
                lease = await store.renew(lease)
            assert version == 4
            # another worker restores it meanwhile: it exists, so the index is not needed
            await store.release(lease)
            lease = await store.acquire(key, "worker-b")
            assert (await store.load(key)).version == 4
            # a new session cannot start: the index tells a new key from a lost session
            fresh = _key_on(cluster, store, "new", lambda node: node is not index_node)
            with pytest.raises(StoreUnavailable, match="namespace index"):
                await store.acquire(fresh, "worker-b")
        finally:
            index_node.resume()

        async def listed() -> bool:
            await asyncio.sleep(0.2)
            version_now = (await store.info(key)).version  # type: ignore[union-attr]
            await store.renew(lease)  # a write of the holder refreshes its entry
            return version_now == 4 and await store.keys() == [key]

        await eventually(listed, "the session is listed again once the primary is back")
    finally:
        await store.aclose()
        cluster.stop()


async def test_a_script_the_server_lost_is_loaded_on_its_node_alone_while_another_is_stopped(
    tmp_path: Path,
) -> None:
    """A primary forgets its scripts when it restarts, and a replica promoted by a
    failover never had them (SCRIPT LOAD is not replicated): the next call gets
    NOSCRIPT and loads the script again. The namespace index's script and the events'
    one were loaded by redis-py's `Script` on every primary of a Cluster: with another
    primary stopped, no new session could start on the live ones, and no event be
    published (`StoreUnavailable`, a timeout of the stopped node). They are loaded on
    the node the call goes to, as the session scripts are."""
    cluster, store = _partial_cluster(tmp_path, "nos")
    try:
        index_node, _ = _owner_of(cluster, key_slot(store._index_key.encode()))
        # sessions on the index's node: every call of this test goes there
        first = _key_on(cluster, store, "room", lambda node: node is index_node)
        fresh = _key_on(cluster, store, "new", lambda node: node is index_node)
        await store.release(await store.acquire(first, "worker-a"))  # the client is set up
        client = store._server.client
        assert isinstance(client, RedisClusterClient)
        default = client.get_default_node().port  # asked before any command
        stopped = next(n for n in cluster.nodes if n is not index_node and n.port != default)
        stopped.pause()
        try:
            assert index_node.cli("script", "flush").strip() == "OK"  # as a restart does
            lease = await store.acquire(fresh, "worker-a")
            assert await store.keys() == sorted([first, fresh])
            assert index_node.cli("script", "flush").strip() == "OK"
            await store.publish(fresh, "paused")
            await store.release(lease)
        finally:
            stopped.resume()
    finally:
        await store.aclose()
        cluster.stop()


@pytest.mark.parametrize("kind", ["redis", "redis_cluster"])
async def test_a_burst_beyond_the_pool_waits_for_a_connection(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A worker's sessions may all write at once (after a stall, on a deploy's restores).
    A Cluster client holds at most ``pool_size`` connections per node and, unlike the
    standalone store's blocking pool, raised "Too many connections" at once for the
    operation one past it: `StoreUnavailable` for a healthy server. Every operation of
    such a burst now waits for a connection, on both."""
    store = await build_redis_store(
        kind, request, namespace=f"b{uuid.uuid4().hex[:8]}", pool_size=2
    )
    try:
        keys = [f"burst-{i}" for i in range(40)]
        leases = await asyncio.wait_for(
            asyncio.gather(*(store.acquire(k, "worker-a") for k in keys)), 30
        )
        assert [lease.key for lease in leases] == keys
        infos = await asyncio.wait_for(asyncio.gather(*(store.info(k) for k in keys)), 30)
        assert [i.owner if i else None for i in infos] == ["worker-a"] * len(keys)
    finally:
        await store.aclose()


async def test_infos_put_each_unreadable_session_in_its_place(real_store: RedisStore) -> None:
    """`RedisStore.infos` (a page of ``ls``, pipelined): foreign data at one head and a
    head lost with its versions left are each the `SnapshotCorrupt` that session's own
    `info` raises, in its place; the sessions around them read as they are."""
    store = real_store
    names = ["fine-a", "foreign", "headless", "fine-b"]
    for name in names:
        lease = await store.acquire(name, "worker-a")
        await store.commit(item_commit(lease, 0, "m1", None))
        await store.release(lease)
    client: Any = store._client
    await client.delete(store._head_key("foreign"))
    await client.set(store._head_key("foreign"), b"not ours")
    await client.delete(store._head_key("headless"))
    got = await store.infos([*names, "never-made"])
    for name, info in zip(names[::3], got[::3], strict=True):
        assert isinstance(info, SessionInfo) and (info.key, info.version) == (name, 1)
    assert got[4] is None
    for name, info in zip(names[1:3], got[1:3], strict=True):
        assert isinstance(info, SnapshotCorrupt), (name, info)
        with pytest.raises(SnapshotCorrupt) as raised:
            await store.info(name)
        assert type(raised.value) is type(info) and str(raised.value) == str(info)


async def test_infos_load_a_flushed_script_once_not_once_per_session(
    make_redis: RedisFactory,
) -> None:
    """A pipeline whose script the server lost (SCRIPT FLUSH, a restart, a new node)
    loads it again and is sent again: once per script and node, not once per session
    of the page (``SCRIPT LOAD`` of the info script 300 times for a page of 300)."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="flush")
    client: Any = store._client
    try:
        names = [f"s{i:03d}" for i in range(300)]
        for name in names:
            await store.release(await store.acquire(name, "worker-a"))
        await client.script_flush()
        await client.config_resetstat()
        got = await store.infos(names)
        assert [i.key if isinstance(i, SessionInfo) else i for i in got] == names
        stats = await client.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] == 1, stats.get("cmdstat_script|load")
    finally:
        await store.aclose()


async def test_infos_of_a_server_that_stopped_answering_are_each_unavailable(
    make_redis: RedisFactory,
) -> None:
    """The server gone between `ls`'s listing and its infos: each session is the
    `StoreUnavailable` its own `info` raises, in its place (listed as unreachable), not
    one error for the page."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="gone", socket_timeout=0.3, retries=0)
    try:
        names = ["a", "b", "c"]
        for name in names:
            await store.release(await store.acquire(name, "worker-a"))
        server.kill()
        got = await asyncio.wait_for(store.infos(names), 10)
        assert [type(i) for i in got] == [StoreUnavailable] * 3, got
    finally:
        await store.aclose()


# -- a live session while the Cluster changes under it ---------------------------------


def _half_move(
    cluster: RedisCluster, store: RedisStore, key: str
) -> tuple[RedisServer, RedisServer, str, int]:
    """Start resharding ``key``'s slot the way ``redis-cli --cluster reshard`` does:
    IMPORTING on the target, MIGRATING on the source, then MIGRATE of the keys in
    ``CLUSTER GETKEYSINSLOT`` order, which lists the newest keys first and the head,
    the session's first key, last. Stops with every key moved but the head."""
    head = store._head_key(key)
    slot = key_slot(head.encode())
    source, source_id = _owner_of(cluster, slot)
    target = next(n for n in cluster.nodes if n is not source)
    target_id = target.cli("cluster", "myid").strip()
    keys = source.cli("cluster", "getkeysinslot", str(slot), "100").split()
    assert keys[-1] == head, keys  # the order redis-cli moves them in
    assert target.cli("cluster", "setslot", str(slot), "importing", source_id).strip() == "OK"
    assert source.cli("cluster", "setslot", str(slot), "migrating", target_id).strip() == "OK"
    out = source.cli("migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys[:-1])
    assert out.strip() == "OK", out
    return source, target, target_id, slot


def _finish_move(
    cluster: RedisCluster, source: RedisServer, target: RedisServer, target_id: str, slot: int
) -> None:
    rest = source.cli("cluster", "getkeysinslot", str(slot), "100").split()
    if rest:
        out = source.cli("migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *rest)
        assert out.strip() == "OK", out
    for node in cluster.nodes:
        node.cli("cluster", "setslot", str(slot), "node", target_id)


@pytest.mark.cluster
async def test_a_takeover_refused_mid_migration_does_not_fence_the_live_holder(
    tmp_path: Path,
) -> None:
    """A live session (autosave, a session ttl) on a Cluster resharding its slot: every
    key but the head moved (the head, the session's oldest key, moves last). A second
    worker's ``restore(takeover=True)`` fails with `StoreUnavailable` and gives up, and
    must have taken nothing. The acquire script wrote the new epoch and owner, then
    failed on a moved key (its TTL refresh): the holder was fenced by a takeover that
    reported failure, and every later turn of the live call went unsaved."""
    require_redis_server()
    cluster = RedisCluster(tmp_path / "cluster").start()
    url = cluster.url
    ns = f"h{os.urandom(4).hex()}"
    store = lr.open_store(url, namespace=ns, ttl=600, retries=1, socket_timeout=2.0)
    other = lr.open_store(url, namespace=ns, ttl=600, retries=1, socket_timeout=2.0)
    session = None
    try:
        assert isinstance(store, RedisStore)
        session, rs, _ = await start(store, ["one", "two", "three", "four"], autosave=True)
        for text in ("a", "b"):
            await session.run(user_input=text)
            await asyncio.wait_for(rs._autosave.idle.wait(), 10)
        assert await stored_texts(store) == live_texts(session)

        source, target, target_id, slot = _half_move(cluster, store, HOOKS_KEY)

        # a second worker (a re-dispatch) takes over meanwhile; refused, it gives up
        intruder: AgentSession[Visit] = AgentSession(llm=ScriptedLLM([]), userdata=Visit())
        rs2 = lr.ResumableSession(
            other, HOOKS_KEY, registry=registry(), userdata_type=Visit, owner="w2", autosave=False
        )
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(
                rs2.restore(intruder, default=lambda: Receptionist(rs2), takeover=True), 20
            )

        _finish_move(cluster, source, target, target_id, slot)

        # the holder's call goes on; its turns are saved as before
        await session.run(user_input="c")
        await asyncio.wait_for(rs._autosave.idle.wait(), 20)
        assert rs._autosave.lost is None, rs._autosave.lost
        assert await stored_texts(store) == live_texts(session)
    finally:
        if session is not None:
            await asyncio.wait_for(session.aclose(), 20)
        await other.aclose()
        await store.aclose()
        cluster.stop()


@pytest.mark.cluster
async def test_a_strict_store_refuses_an_evicting_replica_a_cluster_failover_promoted(
    tmp_path: Path,
) -> None:
    """A failover promotes a replica configured on its own (``allkeys-lru``): its
    settings are read before a session is written there, and ``strict=True`` refuses it.
    The check was done once, for the primaries of the first round: new sessions were
    created on the evicting primary."""
    require_redis_server()
    pair = FailoverPair(tmp_path / "pair").start()
    store = RedisStore.from_url(
        pair.url, namespace="strict", strict=True, retries=1, socket_timeout=1.0
    )
    try:
        lease = await store.acquire("room-a", "worker-a")
        await store.release(lease)
        pair.replica.cli("config", "set", "maxmemory-policy", "allkeys-lru")
        await asyncio.to_thread(pair.fail_over)

        async def answers() -> bool:  # the client has found the new primary
            try:
                await store.info("room-a")
            except StoreUnavailable as e:
                return "strict=True" in str(e)
            return True

        await eventually(answers, "the store reaches the promoted replica", 20.0)
        with pytest.raises(StoreUnavailable, match=r"strict=True.*allkeys-lru"):
            await store.acquire("room-b", "worker-b")
        assert pair.replica.cli("exists", store._head_key("room-b")).strip() == "0"
    finally:
        await store.aclose()
        pair.stop()
