"""Ordinary production faults of a Redis store (issue 13), each on real ``redis-server``
processes started by the test: a server that stalls past the client's timeout, a
restart that loses every key, an out-of-memory refusal, an eviction policy that
removes some of a session's keys, replicas that acknowledge a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from livekit_resume.errors import (
    LeaseLost,
    ResumeError,
    SnapshotCorrupt,
    StoreUnavailable,
)
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.records import pack_record
from livekit_resume.testing.poll import eventually
from tests.redis_servers import RedisFactory, RedisServer, require_redis_server

KEY = "room-7"


def item_commit(lease: Lease, base: int, item: str, after: str | None, cid: str = "") -> Commit:
    """Version ``base + 1``: one item ``item`` appended after ``after``."""
    return Commit(
        lease.key,
        lease.epoch,
        base,
        f"head {base + 1}".encode(),
        [Record("h", item, item.encode(), after)],
        base + 1,
        commit_id=cid,
    )


def prefix(store: RedisStore, key: str = KEY) -> str:
    return store._head_key(key)[: -len("head")]


async def session_keys(store: RedisStore, key: str = KEY) -> list[str]:
    """Every key of the session on the server, found by a SCAN of the whole keyspace."""
    pattern = prefix(store, key).replace("{", "\\{").replace("}", "\\}") + "*"
    return sorted([k.decode() async for k in store._client.scan_iter(match=pattern)])


def calls(server: RedisServer, command: str) -> int:
    """How many ``command`` (``evalsha``, ``config|get``…) the server has run (its INFO
    commandstats)."""
    for line in server.cli("info", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def script_calls(server: RedisServer) -> int:
    return calls(server, "evalsha")


@pytest.fixture
async def volatile(make_redis: RedisFactory) -> AsyncIterator[tuple[RedisServer, RedisStore]]:
    """A server without persistence and a store with a short timeout on it."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="faults", socket_timeout=0.5, retries=1)
    try:
        yield server, store
    finally:
        server.resume()
        await store.aclose()


# -- defect 1: a stall longer than the client's timeout ---------------------------------


async def test_stalled_commit_resent_with_its_id_reports_the_version_that_landed(
    volatile: tuple[RedisServer, RedisStore],
) -> None:
    server, store = volatile
    lease = await store.acquire(KEY, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    second = item_commit(lease, 1, "b", "a", cid="turn-2")

    server.pause()
    try:
        with pytest.raises(StoreUnavailable):
            await store.commit(second)
    finally:
        server.resume()
    # The attempt's bytes sat in the paused server's socket buffers and ran on SIGCONT.
    await eventually(lambda: _version_is(store, 2), "the stalled commit landed")

    assert await store.commit(second) == 2  # the same commit again: its own version
    assert await store.commit(second) == 2
    stored = await store.load(KEY)
    assert stored.streams == {"h": [("a", b"a"), ("b", b"b")]}
    assert [v.version for v in await store.versions(KEY)] == [1, 2]
    assert await store._client.llen(prefix(store) + "log:0") == 2  # nothing written twice

    # Another commit on the old base is refused, and writes nothing.
    with pytest.raises(ResumeError) as caught:
        await store.commit(dataclasses.replace(second, commit_id="turn-2-other"))
    assert not isinstance(caught.value, StoreUnavailable)
    assert await store._client.llen(prefix(store) + "log:0") == 2
    assert (await store.load(KEY)).version == 2


async def test_commit_resent_before_the_stalled_attempt_ran_lands_exactly_once(
    volatile: tuple[RedisServer, RedisStore],
) -> None:
    """The resend reaches the server while the first attempt still waits in a socket
    buffer: whichever runs first writes, the other recognises it by its id."""
    server, store = volatile
    lease = await store.acquire(KEY, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    second = item_commit(lease, 1, "b", "a", cid="turn-2")
    before = await script_calls(server)

    server.pause()
    try:
        with pytest.raises(StoreUnavailable):
            await store.commit(second)
        resend = asyncio.ensure_future(store.commit(second))
        # The resend is on the wire (or queued in the kernel) before the server runs.
        await asyncio.sleep(0)
    finally:
        server.resume()
    try:
        assert await asyncio.wait_for(resend, 10) == 2
    except StoreUnavailable:
        assert await store.commit(second) == 2  # the resend itself timed out: once more
    # Both copies of the one commit ran (the first attempt from its socket buffer, and
    # the resend; redis-py's retry too when it got past the handshake): the second to
    # run found its id and wrote nothing.
    assert await script_calls(server) - before >= 2
    assert [v.version for v in await store.versions(KEY)] == [1, 2]
    assert (await store.load(KEY)).streams == {"h": [("a", b"a"), ("b", b"b")]}
    assert await store._client.llen(prefix(store) + "log:0") == 2


async def test_a_commit_cancelled_before_its_reply_leaves_no_reply_for_the_next(
    volatile: tuple[RedisServer, RedisStore],
) -> None:
    """A command cancelled between its send and its reply must not hand its connection
    on with that reply unread: the next command would read it as its own."""
    server, store = volatile
    lease = await store.acquire(KEY, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    second = item_commit(lease, 1, "b", "a", cid="turn-2")
    server.pause()
    try:
        attempt = asyncio.ensure_future(store.commit(second))
        await asyncio.sleep(0.1)  # sent, waiting for the stopped server's reply
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attempt
    finally:
        server.resume()
    # whether the cancelled attempt ran or not, each reply below is its own command's
    await eventually(lambda: _version_is(store, 2), "the cancelled attempt landed")
    assert [v.version for v in await store.versions(KEY)] == [1, 2]
    assert await store.commit(second) == 2
    assert await store.commit(item_commit(lease, 2, "c", "b")) == 3
    assert [i for i, _ in (await store.load(KEY)).streams["h"]] == ["a", "b", "c"]


async def _version_is(store: RedisStore, version: int) -> bool:
    try:
        return (await store.load(KEY)).version == version
    except StoreUnavailable:
        return False


# -- defect 2: a restart without data -------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "shutdown"])
async def test_restart_without_data_reports_the_lease_vanished(
    volatile: tuple[RedisServer, RedisStore], how: str
) -> None:
    server, store = volatile
    lease = await store.acquire(KEY, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    if how == "kill":
        server.kill()
    else:
        server.stop()  # SIGTERM: a clean shutdown, but nothing is configured to save
    server.start()

    with pytest.raises(LeaseLost) as caught:
        await store.commit(item_commit(lease, 1, "b", "a"))
    assert caught.value.vanished is True
    with pytest.raises(LeaseLost) as caught:
        await store.renew(lease)
    assert caught.value.vanished is True
    assert await session_keys(store) == []  # refused without writing anything

    again = await store.acquire(KEY, "worker-a")  # what the session does next
    assert again.epoch > lease.epoch
    assert await store.commit(item_commit(again, 0, "a", None)) == 1


async def test_restart_then_another_worker_first_reports_a_takeover(
    volatile: tuple[RedisServer, RedisStore],
) -> None:
    server, store = volatile
    lease = await store.acquire(KEY, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    server.kill()
    server.start()
    other = await store.acquire(KEY, "worker-b")
    assert await store.commit(item_commit(other, 0, "x", None)) == 1

    with pytest.raises(LeaseLost) as caught:
        await store.commit(item_commit(lease, 1, "b", "a"))
    assert caught.value.vanished is False
    assert caught.value.current_epoch == other.epoch
    with pytest.raises(LeaseLost) as caught:
        await store.renew(lease)
    assert caught.value.vanished is False
    assert (await store.load(KEY)).streams == {"h": [("x", b"x")]}


# -- defect 8: out of memory, eviction and server settings -----------------------------


async def fill_until_oom(store: RedisStore) -> None:
    """Write filler keys (outside the namespace) until the server refuses writes."""
    client = store._client
    for n in range(100_000):
        try:
            await client.set(f"filler:{n}", b"x" * 4096)
        except Exception as exc:  # redis-py's OutOfMemoryError
            assert "maxmemory" in str(exc)
            return
    pytest.fail("the server never ran out of memory")


async def test_out_of_memory_is_store_unavailable_with_advice_not_corruption(
    make_redis: RedisFactory,
) -> None:
    server = make_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    store = RedisStore.from_url(server.url, namespace="oom", retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        await fill_until_oom(store)
        # held over the limit: freed buffers brought it back under it between the refused
        # SET and the commit, now and then (the commit landed, a flaky test)
        server.cli("config", "set", "maxmemory", str(used_memory(server) - 512 * 1024))
        before = await session_keys(store)

        with pytest.raises(StoreUnavailable) as caught:
            await store.commit(item_commit(lease, 1, "b", "a", cid="turn-2"))
        message = str(caught.value)
        assert "out of memory" in message and "maxmemory" in message
        assert "delete the session" not in message
        assert await session_keys(store) == before
        assert (await store.load(KEY)).streams == {"h": [("a", b"a")]}  # reads still work

        await store._client.flushdb()  # memory back; the session with it, in this test
        server.cli("config", "set", "maxmemory", "0")
        again = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(again, 0, "a", None)) == 1
    finally:
        await store.aclose()


def used_memory(server: RedisServer) -> int:
    for line in server.cli("INFO", "memory").splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise AssertionError("no used_memory in INFO")


@pytest.mark.parametrize("refused", ["while staged", "by the script"])
async def test_a_large_record_refused_for_memory_leaves_no_staged_piece_filling_the_server(
    make_redis: RedisFactory, refused: str
) -> None:
    """A record over a megabyte is staged in pieces before its commit's script. Refused
    for memory, while staged or by the script after, the pieces stayed for their TTL (two
    minutes), the server stayed full, and every other session's commit was refused."""
    server = make_redis("--maxmemory-policy", "noeviction")
    store = RedisStore.from_url(server.url, namespace="oom", retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        other = await store.acquire("room-other", "worker-b")
        large = dataclasses.replace(
            item_commit(lease, 1, "b", "a"), records=[Record("h", "b", os.urandom(3 << 20), "a")]
        )
        if refused == "while staged":
            server.cli("CONFIG", "SET", "maxmemory", str(used_memory(server) + (2 << 20)))
        else:
            stage = store._stage

            async def staged_then_full(key: str, elements: list[bytes]) -> Any:
                store._stage = stage  # type: ignore[method-assign]
                out = await stage(key, elements)
                server.cli("CONFIG", "SET", "maxmemory", str(used_memory(server) - (1 << 20)))
                return out

            store._stage = staged_then_full  # type: ignore[method-assign]

        with pytest.raises(StoreUnavailable, match="out of memory"):
            await store.commit(large)

        assert [k for k in await session_keys(store) if ":up:" in k] == []
        assert await store.commit(item_commit(other, 0, "x", None)) == 1
        assert (await store.load(KEY)).version == 1
    finally:
        await store.aclose()


@pytest.fixture
async def evicted(make_redis: RedisFactory) -> AsyncIterator[tuple[RedisServer, RedisStore]]:
    """A session of three versions whose head key was evicted (DEL stands in for the
    server's eviction); its versions, logs and namespace entry remain."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="evict", keep=2, retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        after = None
        for n, item in enumerate("abc"):
            assert await store.commit(item_commit(lease, n, item, after)) == n + 1
            after = item
        await store._client.delete(store._head_key(KEY))
        yield server, store
    finally:
        await store.aclose()


async def test_load_of_a_session_missing_its_head_is_corrupt_naming_what_remains(
    evicted: tuple[RedisServer, RedisStore],
) -> None:
    _, store = evicted
    remains = await session_keys(store)
    # the versions with their bodies (test_redis_layout.py)
    assert remains == [prefix(store) + k for k in ("log:0", "v:2", "v:2:b", "v:3", "v:3:b")]
    with pytest.raises(SnapshotCorrupt) as caught:
        await store.load(KEY)
    message = str(caught.value)
    assert store._head_key(KEY) in message and prefix(store) + "v:3" in message
    assert "maxmemory-policy" in message and "delete" in message
    assert await session_keys(store) == remains  # a read changes nothing


async def test_acquire_refuses_a_session_whose_head_was_evicted_until_it_is_deleted(
    evicted: tuple[RedisServer, RedisStore],
) -> None:
    _, store = evicted
    remains = await session_keys(store)
    for owner in ("worker-a", "worker-b"):
        with pytest.raises(SnapshotCorrupt, match="head"):
            await store.acquire(KEY, owner)
    assert await session_keys(store) == remains  # refused without writing anything

    assert await store.delete(KEY) is True
    assert await session_keys(store) == []
    lease = await store.acquire(KEY, "worker-a")  # deleted: a fresh start is asked for
    assert await store.commit(item_commit(lease, 0, "x", None)) == 1
    assert (await store.load(KEY)).streams == {"h": [("x", b"x")]}


async def test_remains_are_found_without_the_namespace_index_too(
    evicted: tuple[RedisServer, RedisStore],
) -> None:
    """The index key can be evicted as well: the log a new session would append to is
    still in the way, and still reported."""
    _, store = evicted
    await store._client.delete(store._index_key)
    with pytest.raises(SnapshotCorrupt, match="log:0"):
        await store.load(KEY)
    with pytest.raises(SnapshotCorrupt, match="log:0"):
        await store.acquire(KEY, "worker-a")


async def test_delete_removes_every_key_of_a_partially_evicted_session(
    evicted: tuple[RedisServer, RedisStore],
) -> None:
    _, store = evicted
    neighbour = await store.acquire("room-8", "worker-a")
    assert await store.commit(item_commit(neighbour, 0, "n", None)) == 1
    await store._client.set("unrelated", "kept")

    assert await store.delete(KEY) is True
    everything = sorted([k.decode() async for k in store._client.scan_iter()])
    assert not [k for k in everything if k.startswith(prefix(store))]
    assert "unrelated" in everything
    assert (await store.load("room-8")).streams == {"h": [("n", b"n")]}
    assert await store.delete(KEY) is False


async def test_a_delete_of_a_whole_session_scans_nothing(make_redis: RedisFactory) -> None:
    """Only a session that lost its head needs the SCAN for its remains (O(keys in the
    database)); a whole one lists its keys in its head. `resumable_job` deletes an
    ended or stale conversation at the start of the next call under its key
    (`archive_stale`), while the caller waits: it scanned the whole keyspace there."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="del")
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        await store.release(lease)
        scans = calls(server, "scan")
        assert await store.delete(KEY) is True
        assert calls(server, "scan") == scans
        assert await session_keys(store) == []  # (a SCAN of its own)
        lease = await store.acquire(KEY, "worker-b")  # and fenced by a lease
        assert await store.commit(item_commit(lease, 0, "b", None)) == 1
        scans = calls(server, "scan")
        assert await store.delete(KEY, lease=lease) is True
        assert calls(server, "scan") == scans
        assert await session_keys(store) == [] and await store.keys() == []
        # a key with no head at all is looked for (its remains may be there)
        scans = calls(server, "scan")
        assert await store.delete(KEY) is False
        assert calls(server, "scan") == scans + 1
    finally:
        await store.aclose()


async def test_a_refresh_of_the_index_under_way_does_not_list_a_deleted_session_again(
    make_redis: RedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's index entry is refreshed in the background of its holder's writes. A
    delete meanwhile unlisted the key, then the refresh listed it again: a dead entry,
    which on a store without a TTL was never collected, and which made the next session
    under that key look for a lost head's remains (a SCAN of the keyspace) first."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="race")
    index = store._namespace_index
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        gate = asyncio.Event()
        record = index.record

        async def slow_record(key: str, op: str) -> bool:
            await gate.wait()  # the index's primary answering late
            return await record(key, op)

        monkeypatch.setattr(index, "record", slow_record)
        index.refresh(KEY, "commit")
        await asyncio.sleep(0)  # the refresh is under way
        assert await store.delete(KEY, lease=lease) is True
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert not index._refreshing
        assert await store._client.zscore(store._index_key, KEY) is None
        scans = calls(server, "scan")
        await store.acquire(KEY, "worker-b")  # a new session, without a SCAN
        assert calls(server, "scan") == scans
    finally:
        await store.aclose()


async def test_missing_version_or_log_under_a_present_head_is_corrupt_naming_the_key(
    make_redis: RedisFactory,
) -> None:
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="evict", retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        assert await store.commit(item_commit(lease, 1, "b", "a")) == 2
        client = store._client
        log = await client.lrange(prefix(store) + "log:0", 0, -1)

        await client.delete(prefix(store) + "log:0")
        with pytest.raises(SnapshotCorrupt, match=r"log:0"):
            await store.load(KEY)
        with pytest.raises(SnapshotCorrupt, match=r"log:0"):
            await store.commit(item_commit(lease, 2, "c", "b"))
        await client.rpush(prefix(store) + "log:0", *log)

        version: dict[Any, Any] = await client.hgetall(prefix(store) + "v:2")
        await client.delete(prefix(store) + "v:2")
        for call in (store.load, store.info):
            with pytest.raises(SnapshotCorrupt, match=r"v:2"):
                await call(KEY)
        listed = await store.versions(KEY)  # listed, damaged: a revert rolls back past it
        assert "v:2" in (listed[-1].damaged or ""), listed
        with pytest.raises(SnapshotCorrupt, match=r"v:2"):
            await store.commit(item_commit(lease, 2, "c", "b"))
        await client.hset(prefix(store) + "v:2", mapping=version)
        assert await store.commit(item_commit(lease, 2, "c", "b")) == 3
    finally:
        await store.aclose()


async def test_commit_refuses_to_append_to_a_log_it_did_not_write(
    make_redis: RedisFactory,
) -> None:
    """A new session's first log already holding records (a former life's, after its
    head was lost): appending would make them part of the new conversation."""
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="evict", retries=1)
    try:
        lease = await store.acquire(KEY, "worker-a")
        stray = Record("h", "old", b"old conversation")
        await store._client.rpush(prefix(store) + "log:0", pack_record(stray))
        with pytest.raises(SnapshotCorrupt, match="log:0"):
            await store.commit(item_commit(lease, 0, "a", None))
        assert await store._client.llen(prefix(store) + "log:0") == 1
        assert await store.versions(KEY) == []
    finally:
        await store.aclose()


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "livekit_resume" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def use(store: RedisStore, key: str = KEY) -> None:
    """What a worker does first: take the lease, commit, read back."""
    lease = await store.acquire(key, "worker-a")
    assert await store.commit(item_commit(lease, 0, "a", None)) == 1
    assert (await store.load(key)).version == 1


async def test_allkeys_eviction_policy_is_warned_once_naming_the_policy_and_the_fix(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    server = make_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(server.url, namespace="settings")
    try:
        await use(store)
        await use(store, "room-8")
        [warning] = warnings_of(caplog, "maxmemory-policy allkeys-lru")
        assert "noeviction" in warning and f"127.0.0.1:{server.port}" in warning
        [persistence] = warnings_of(caplog, "persists nothing")
        assert "appendonly yes" in persistence
        problems = await store.check()  # explicit: the same findings, not logged again
        assert len(problems) == 2
        assert len(warnings_of(caplog, "maxmemory-policy allkeys-lru")) == 1
    finally:
        await store.aclose()


async def test_strict_store_refuses_an_evicting_server_and_writes_nothing(
    make_redis: RedisFactory,
) -> None:
    server = make_redis("--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(server.url, namespace="settings", strict=True)
    try:
        with pytest.raises(StoreUnavailable, match=r"strict.*allkeys-lru.*noeviction"):
            await store.acquire(KEY, "worker-a")
        assert [k async for k in store._client.scan_iter()] == []
        server.cli("config", "set", "maxmemory-policy", "noeviction")
        await use(store)  # fixed on the server: checked again, accepted
    finally:
        await store.aclose()


@pytest.mark.parametrize(("ttl", "warned"), [(None, False), (3600.0, True)])
async def test_volatile_policy_is_safe_only_for_sessions_without_ttl(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture, ttl: float | None, warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    server = make_redis("--maxmemory-policy", "volatile-lru", "--appendonly", "yes")
    store = RedisStore.from_url(server.url, namespace="settings", ttl=ttl, strict=not warned)
    try:
        await use(store)
        assert bool(warnings_of(caplog, "volatile-lru")) is warned
        assert warnings_of(caplog, "persists nothing") == []  # AOF is on
        with pytest.raises(StoreUnavailable) if warned else contextlib.nullcontext():
            await RedisStore.from_url(server.url, ttl=ttl, strict=True).check()
    finally:
        await store.aclose()


@pytest.mark.parametrize("hidden", ["renamed", "acl"])
async def test_a_server_that_hides_config_is_used_unchecked(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture, hidden: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    if hidden == "renamed":
        server = make_redis("--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "")
        url = server.url
    else:
        server = make_redis("--maxmemory-policy", "allkeys-lru")
        server.cli("acl", "setuser", "app", "on", ">pw", "~*", "&*", "+@all", "-config")
        url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    store = RedisStore.from_url(url, namespace="settings", strict=True)
    try:
        await use(store)
        assert await store.check() == []
        assert warnings_of(caplog, "maxmemory-policy") == []
        assert any("not checking" in r.getMessage() for r in caplog.records)
    finally:
        await store.aclose()


def config_gets(server: RedisServer) -> int:
    return calls(server, "config|get")


async def test_the_server_check_reads_its_four_settings_in_one_round_trip(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """It runs before a new worker's first restore."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    server = make_redis("--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(server.url, namespace="settings")
    try:
        await use(store)
        assert config_gets(server) == 1
        assert warnings_of(caplog, "allkeys-lru") and warnings_of(caplog, "persists nothing")
    finally:
        await store.aclose()


class OneNameAtATime(Redis):
    """A client for a server before Redis 7, whose CONFIG GET takes one name."""

    async def config_get(self, *names: Any, **kwargs: Any) -> Any:
        if len(names) > 1:
            raise ResponseError("ERR wrong number of arguments for 'config|get' command")
        return await super().config_get(*names, **kwargs)


async def test_a_server_that_takes_one_config_name_at_a_time_is_still_checked(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    server = make_redis("--maxmemory-policy", "allkeys-lru")
    store = RedisStore(OneNameAtATime.from_url(server.url), namespace="settings")
    strict = RedisStore(OneNameAtATime.from_url(server.url), namespace="settings", strict=True)
    try:
        await use(store)
        assert config_gets(server) == 4  # one name each
        assert warnings_of(caplog, "allkeys-lru") and warnings_of(caplog, "persists nothing")
        with pytest.raises(StoreUnavailable, match=r"strict.*allkeys-lru"):
            await strict.acquire("room-8", "worker-a")
    finally:
        await store.aclose()
        await strict.aclose()


# -- wait_replicas ------------------------------------------------------------------


async def test_wait_replicas_confirms_a_commit_on_the_replica(make_redis: RedisFactory) -> None:
    primary = make_redis()
    replica = make_redis.replica_of(primary)
    store = RedisStore.from_url(primary.url, namespace="repl", wait_replicas=1, wait_timeout=2000)
    on_replica = RedisStore.from_url(replica.url, namespace="repl")
    try:
        lease = await store.acquire(KEY, "worker-a")
        for n, item in enumerate("abc"):
            after = None if n == 0 else "abc"[n - 1]
            assert await store.commit(item_commit(lease, n, item, after)) == n + 1
            # Acknowledged by the replica before the commit returned: readable there now.
            assert (await on_replica.load(KEY)).version == n + 1
        assert store.under_replicated == 0
        await store._client.script_flush()  # NOSCRIPT inside the pipeline: loaded, sent again
        assert await store.commit(item_commit(lease, 3, "d", "c")) == 4
        assert (await on_replica.load(KEY)).version == 4
    finally:
        await store.aclose()
        await on_replica.aclose()


async def test_too_few_replicas_is_warned_and_counted_but_the_commit_stands(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    primary = make_redis()
    replica = make_redis.replica_of(primary)
    store = RedisStore.from_url(primary.url, namespace="repl", wait_replicas=2, wait_timeout=50)
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        assert store.under_replicated == 1
        [warning] = warnings_of(caplog, "1 of 2 replicas")
        assert KEY in warning
        replica.pause()  # the one replica stops acknowledging
        try:
            assert await store.commit(item_commit(lease, 1, "b", "a")) == 2
        finally:
            replica.resume()
        assert store.under_replicated == 2
        assert warnings_of(caplog, "0 of 2 replicas")
        assert (await store.load(KEY)).version == 2
    finally:
        await store.aclose()


async def test_wait_replicas_waits_for_a_delete_and_its_tombstone(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``rm`` a failover loses brings the session back (failure-model.md, "A failover
    that loses an rm undoes it"): with ``wait_replicas`` the delete waits for the
    replicas as a commit does, and with them for the tombstone in the session's slot,
    laid on the same node before it. A replica that does not answer: the delete stands
    on the primary, warned and counted in ``under_replicated``; a delete that found
    nothing counts nothing."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    primary = make_redis()
    replica = make_redis.replica_of(primary)
    store = RedisStore.from_url(primary.url, namespace="repl", wait_replicas=1, wait_timeout=300)
    on_replica = Redis.from_url(replica.url)
    try:
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        assert await store.delete(KEY) is True
        assert store.under_replicated == 0
        assert not await on_replica.exists(store._names.head(KEY))
        laid = await on_replica.get(store._names.tombstone(KEY))
        assert laid is not None and int(laid) >= lease.epoch
        lease = await store.acquire(KEY, "worker-a")
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        replica.pause()  # the one replica stops acknowledging
        try:
            assert await store.delete(KEY) is True
            assert store.under_replicated == 1
            [warning] = warnings_of(caplog, "0 of 1 replicas")
            assert warning.startswith(f"delete of session {KEY!r}"), warning
            assert await store.delete(KEY) is False
            assert store.under_replicated == 1
        finally:
            replica.resume()
        assert await store.info(KEY) is None
    finally:
        await store.aclose()
        await on_replica.aclose()


async def test_wait_replicas_on_a_cluster_waits_on_the_node_of_the_slot(
    redis_cluster: Any,
) -> None:
    """Primaries without replicas: WAIT reaches the session's node (not another one,
    which would answer for a connection that wrote nothing) and reports 0."""
    store = RedisStore.from_url(
        redis_cluster.url, namespace=f"repl{time.time_ns()}", wait_replicas=1, wait_timeout=10
    )
    nodes = {n.port: n for n in redis_cluster.nodes}

    def waits() -> dict[int, int]:
        out = {}
        for port, node in nodes.items():
            out[port] = calls(node, "wait")
        return out

    try:
        client = store._client
        assert isinstance(client, RedisCluster)
        # A script a node does not know yet is loaded there and its trip, WAIT included,
        # sent again: warm every node first (a key of each), so that only WAITs count.
        warmed: set[int] = set()
        assert await store.info("warm0") is None  # the client learns the slots
        for n in range(1000):
            node = client.get_node_from_key(store._head_key(f"warm{n}"))
            if node is not None and int(node.port) not in warmed:
                warm = await store.acquire(f"warm{n}", "worker-a")
                assert await store.commit(item_commit(warm, 0, "x", None)) == 1
                warmed.add(int(node.port))
        assert warmed == set(nodes)
        before = waits()
        expected = dict.fromkeys(nodes, 0)
        for key in ("a", "b", "c", "d", "e", "f"):  # keys of several slots and nodes
            lease = await store.acquire(key, "worker-a")
            assert await store.commit(item_commit(lease, 0, "x", None)) == 1
            node = client.get_node_from_key(store._head_key(key))
            assert node is not None
            expected[int(node.port)] += 1
        assert store.under_replicated == len(warmed) + 6
        after = waits()
        assert {p: after[p] - before[p] for p in nodes} == expected
        assert len([n for n in expected.values() if n]) > 1
    finally:
        await store.aclose()


@pytest.mark.cluster
async def test_an_owner_listening_for_commands_finds_the_new_primary_after_a_failover(
    tmp_path: Path,
) -> None:
    """After a Cluster failover, an owner with nothing else to send (no commit, no
    renewal due) listens again on the node that now serves its slot: a command sent
    after the failover is heard. Its subscriber's map of the slots was refreshed only
    when another command of the client failed, so it subscribed to the dead primary
    again and again."""
    from livekit_resume.stores.base import Command
    from tests.faults.cluster import FailoverPair

    require_redis_server()
    pair = FailoverPair(tmp_path / "cluster").start()
    owner = RedisStore.from_url(pair.url)
    sender = RedisStore.from_url(pair.url)
    heard: asyncio.Queue[Command] = asyncio.Queue()
    listening = asyncio.Event()

    task = asyncio.ensure_future(listen_again(owner, heard, listening))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        await asyncio.to_thread(pair.fail_over)

        async def delivered() -> bool:  # 0 receivers: nobody listens on the slot's node yet
            try:
                return bool(await sender.commands().send(Command("c-1", KEY, "pause", 1)))
            except StoreUnavailable:
                return False

        await eventually(delivered, "a command after the failover reaches its owner", 20.0)
        assert (await asyncio.wait_for(heard.get(), 5)).id == "c-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await owner.aclose()
        await sender.aclose()
        pair.stop()


async def test_a_first_operation_on_a_stalled_server_waits_out_its_timeouts_once(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The settings check before a store's first operation fails that operation, named
    as it would name itself, rather than give up quietly and let the operation wait out
    the same timeouts again (twice the wait: 42 s for a CLI command, with the defaults)."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    server = make_redis()
    store = RedisStore.from_url(server.url, namespace="settings", socket_timeout=0.5, retries=0)
    try:
        server.pause()
        try:
            with pytest.raises(StoreUnavailable, match=r"unavailable for load of session 'room-7'"):
                await store.load(KEY)
        finally:
            server.resume()

        async def greeted() -> bool:
            return calls(server, "hello") >= 1

        # Each attempt opened a connection whose greeting (HELLO) the paused server
        # left in its socket buffer, and ran now: one attempt, one greeting.
        await eventually(greeted, "the greeting sent to the paused server ran")
        await asyncio.sleep(0.2)
        assert calls(server, "hello") == 1
        assert warnings_of(caplog, "persists nothing") == []  # nothing judged yet

        await use(store)  # the server is back: checked now, and used
        assert config_gets(server) == 1
        assert warnings_of(caplog, "persists nothing")
    finally:
        await store.aclose()


async def test_a_key_whose_session_expired_two_ttls_ago_starts_anew_without_a_scan(
    make_redis: RedisFactory,
) -> None:
    """Its index entry outlived it (entries are collected by the next index write): the
    dead entry is collected before the key is looked up, so the key starts a new session
    rather than a SCAN of the whole keyspace for remains of an evicted head (a thousand
    round trips on a database of a million keys, while a returning caller waits)."""
    server = make_redis()
    now = [time.time()]
    store = RedisStore.from_url(server.url, namespace="ttl", ttl=60.0, clock=lambda: now[0])
    try:
        lease = await store.acquire(KEY, "worker-a", ttl=30.0)
        assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        # expired: the server removed every key of the session; its index entry stayed
        await store._client.delete(*await session_keys(store))
        now[0] += 2 * 60.0 + 1
        scans = calls(server, "scan")
        await store.acquire(KEY, "worker-b", ttl=30.0)
        assert calls(server, "scan") == scans
        assert await store.versions(KEY) == []  # a new session under the key
    finally:
        await store.aclose()


async def test_an_owner_whose_command_reader_fails_unexpectedly_listens_again(
    make_redis: RedisFactory,
) -> None:
    """The hub's reader ends on an error that is no lost connection (here a RuntimeError
    from redis-py's pubsub): its inboxes hear of it and their owner subscribes anew. The
    reader used to catch StoreUnavailable only: it ended alone, the subscription stayed
    open on the server (a sender counted a receiver) and the owner heard nothing again."""
    from livekit_resume.stores.base import Command

    server = make_redis()
    owner = RedisStore.from_url(server.url, namespace="reader")
    sender = RedisStore.from_url(server.url, namespace="reader")
    heard: asyncio.Queue[Command] = asyncio.Queue()
    listening = asyncio.Event()

    task = asyncio.ensure_future(listen_again(owner, heard, listening))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        pubsub = owner.commands()._hub._nodes[""].pubsub
        read = pubsub.get_message

        async def fail_once(*args: Any, **kwargs: Any) -> Any:
            pubsub.get_message = read  # type: ignore[method-assign]
            raise RuntimeError("pubsub connection not set")

        pubsub.get_message = fail_once  # type: ignore[method-assign]
        # the reader is waiting inside the real get_message: a command wakes it, and its
        # next read fails
        assert await sender.commands().send(Command("c-0", KEY, "pause", 1)) == 1
        assert (await asyncio.wait_for(heard.get(), 5)).id == "c-0"

        async def delivered() -> bool:  # 0 receivers while the owner subscribes anew
            return bool(await sender.commands().send(Command("c-1", KEY, "pause", 1)))

        await eventually(delivered, "a command after the failed read reaches its owner", 10.0)
        assert (await asyncio.wait_for(heard.get(), 5)).id == "c-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await owner.aclose()
        await sender.aclose()


async def listen_again(
    owner: RedisStore, heard: asyncio.Queue[Any], listening: asyncio.Event
) -> None:
    """Put every command ``owner`` hears for KEY into ``heard``; as `ControlListener`
    does, listen again `RELISTEN_DELAY` after a failure (``listening`` is set meanwhile)."""
    from livekit_resume.agent_hooks.control import RELISTEN_DELAY

    while True:
        try:
            async with owner.commands().inbox(KEY) as inbox:
                listening.set()
                async for command in inbox:
                    heard.put_nowait(command)
        except StoreUnavailable:
            listening.clear()
            await asyncio.sleep(RELISTEN_DELAY)
