"""Adversarial Sentinel cases: real redis-server processes, a real Sentinel, and
Sentinels that hang (a socket that takes connections and never answers)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import livekit_resume as lr
from livekit_resume.cli import app
from livekit_resume.errors import LeaseLost, StoreUnavailable
from livekit_resume.settings import Settings
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.url import RedisURL
from tests.faults.cluster import until
from tests.faults.sentinel import SERVICE, SentinelPair
from tests.redis_servers import (
    RedisSentinel,
    RedisServer,
    dead_port,
    require_redis_server,
)
from tests.test_autosave_adversarial import live_texts, stored_texts
from tests.test_redis_degraded import live_session

# Each test below takes well under this; a store that hangs on Sentinel fails it instead.
CAP = 8.0
TIMEOUT = 0.1


@pytest.fixture
def hung_sentinel() -> Iterator[int]:
    """The port of a "Sentinel" that accepts connections and never answers: a frozen
    Sentinel process, or one behind a black-holing network."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def _store(url: str) -> RedisStore:
    return RedisStore.from_url(url, socket_timeout=TIMEOUT, retries=1, namespace="adv")


async def _unavailable_after(store: RedisStore) -> float:
    """Seconds until ``info`` raised `StoreUnavailable` (at most `CAP`)."""
    start = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.info("room"), CAP)
    finally:
        await store.aclose()
    return time.monotonic() - start


async def test_a_hung_sentinel_is_store_unavailable_as_soon_as_a_hung_server_is(
    hung_sentinel: int,
) -> None:
    # The same retries and timeout against a hung server give the bound; Sentinel
    # lookups must not multiply it (redis-py's own 10 retries per Sentinel question,
    # nested in the connection's and the command's retries: ~130 timeouts, 10 minutes
    # per command at the default socket timeout).
    server_took = await _unavailable_after(_store(f"redis://127.0.0.1:{hung_sentinel}/0"))
    url = f"redis+sentinel://127.0.0.1:{hung_sentinel}/mymaster/0"
    sentinel_took = await _unavailable_after(_store(url))
    assert sentinel_took < max(2.0, 3 * server_took), (sentinel_took, server_took)


async def test_a_hung_sentinel_before_a_live_one_costs_one_timeout(
    hung_sentinel: int, redis_sentinel: RedisSentinel
) -> None:
    live = redis_sentinel.url.removeprefix("redis+sentinel://")
    url = f"redis+sentinel://127.0.0.1:{hung_sentinel},{live}"
    store = _store(url)
    try:
        assert await asyncio.wait_for(store.info("room"), CAP) is None
    finally:
        await store.aclose()


async def test_more_concurrent_operations_than_the_pool_holds_wait_for_a_connection(
    redis_sentinel: RedisSentinel,
) -> None:
    # As on a standalone server (a blocking pool): a burst of sessions beyond
    # pool_size queues for a connection instead of failing with "Too many connections".
    store = RedisStore.from_url(redis_sentinel.url, pool_size=2, namespace="adv")
    try:
        infos = await asyncio.wait_for(
            asyncio.gather(*(store.info(f"room{i}") for i in range(20))), CAP
        )
        assert infos == [None] * 20
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1,s2/mymaster/-1",
        "redis+sentinel://s1/mymaster/+1",
        "redis+sentinel://s1/mymaster/1_0",
        "redis://h/-1",
    ],
)
def test_a_database_that_is_not_plain_digits_is_a_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        RedisURL.parse(url)


async def test_no_sentinel_answering_is_a_short_message_naming_the_service() -> None:
    with dead_port() as one, dead_port() as two:
        url = f"redis+sentinel://:datapw@127.0.0.1:{one},127.0.0.1:{two}/my%20master/0"
        store = RedisStore.from_url(url, sentinel_password="sentpw", retries=0)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(store.info("room"), CAP)
        finally:
            await store.aclose()
    message = str(caught.value)
    assert "service my master" in message and str(two) in message
    assert "no Sentinel answered" in message
    # redis-py's own text repeated each Sentinel's whole client, a kilobyte each
    assert len(message) < 400 and "redis.asyncio" not in message
    assert "datapw" not in message and "sentpw" not in message


async def test_sentinels_that_know_no_such_service_say_so(
    redis_sentinel: RedisSentinel,
) -> None:
    url = redis_sentinel.url.replace("/mymaster/", "/nosuch/")
    store = RedisStore.from_url(url, retries=0)
    try:
        with pytest.raises(StoreUnavailable, match="name no live primary"):
            await asyncio.wait_for(store.info("room"), CAP)
    finally:
        await store.aclose()


async def test_an_event_stream_whose_connection_was_cut_says_so(
    redis_sentinel: RedisSentinel, disposable_redis: RedisServer
) -> None:
    # What a failover does to a subscriber of the old primary (Sentinel promotes the
    # replica at once, so redis-py's reconnect finds the new one): the events published
    # in between are gone. EventStream promises StoreUnavailable on a lost connection
    # ("subscribe again"), so a follower knows to read the state afresh; redis-py
    # reconnected and resubscribed behind its back, and the stream went on silently.
    store = RedisStore.from_url(redis_sentinel.url, namespace="adv")
    try:
        async with store.subscribe() as events:
            await store.publish("room", "paused")
            assert (await asyncio.wait_for(events.__anext__(), CAP))["event"] == "paused"
            disposable_redis.cli("client", "kill", "type", "pubsub")
            await store.publish("room", "resumed")
            with pytest.raises(StoreUnavailable, match="subscribe again"):
                await asyncio.wait_for(events.__anext__(), CAP)
    finally:
        await store.aclose()


@pytest.fixture
def locked_sentinel(disposable_redis: RedisServer, tmp_path: Path) -> Iterator[RedisSentinel]:
    """A Sentinel that requires a password (``requirepass sentpw``)."""
    sentinel = RedisSentinel(tmp_path / "locked-sentinel", disposable_redis)
    with sentinel.config.open("a") as config:
        config.write("requirepass sentpw\n")
    sentinel.start()
    try:
        yield sentinel
    finally:
        sentinel.stop()


async def test_the_sentinel_password_comes_from_the_environment_for_workers_and_the_cli(
    locked_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a keyword of RedisStore.from_url only: a worker opening RESUME_STORE, and
    # every command of the command line, could not reach Sentinels that require one.
    monkeypatch.setenv("RESUME_STORE", locked_sentinel.url)
    monkeypatch.setenv("RESUME_NAMESPACE", "adv")
    monkeypatch.delenv("RESUME_SENTINEL_PASSWORD", raising=False)
    refused = lr.open_store(retries=0, socket_timeout=TIMEOUT)
    try:
        with pytest.raises(StoreUnavailable, match="no Sentinel answered"):
            await asyncio.wait_for(refused.info("room"), CAP)
    finally:
        await refused.aclose()

    monkeypatch.setenv("RESUME_SENTINEL_PASSWORD", "sentpw")
    store = lr.open_store()
    try:
        lease = await store.acquire("room", "w1")
        await store.release(lease)
        assert (await store.info("room")) is not None
    finally:
        await store.aclose()
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["ls", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [s["key"] for s in json.loads(listed.output)] == ["room"]
    assert "sentpw" not in repr(Settings.load())


# -- failovers: the server changes under a store --------------------------------------


class EvictingReplicaPair(SentinelPair):
    """A Sentinel pair whose replica evicts any key (``allkeys-lru``); the primary does
    not (a runtime ``CONFIG SET`` on one node, or replicas with other defaults)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.replica.extra += ["--maxmemory-policy", "allkeys-lru"]


async def test_strict_store_refuses_an_evicting_primary_a_sentinel_failover_promoted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """multi-worker.md: ``strict=True`` refuses an evicting server, and the store warns
    of one. Behind Sentinel a failover brings another server, but the settings were
    read once, of the first primary: a strict store went on creating sessions on an
    ``allkeys-lru`` primary, unwarned, and ``evicting`` (a lost head is then looked into
    rather than read as "no session") stayed False."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    require_redis_server()
    pair = EvictingReplicaPair(tmp_path / "s").start()
    store = RedisStore.from_url(pair.url, namespace="strict", strict=True, socket_timeout=1.0)
    try:
        lease = await store.acquire("room", "w1")  # checked: this primary does not evict
        await asyncio.to_thread(pair.fail_over)
        assert "allkeys-lru" in pair.replica.cli("config", "get", "maxmemory-policy")
        for _ in range(20):  # until the store has found the new primary through Sentinel
            try:
                await store.renew(lease)
                break
            except LeaseLost:
                break  # found it: the lease had not reached the replica (a loaded machine)
            except StoreUnavailable as e:
                if "strict=True" in str(e):
                    break
                await asyncio.sleep(0.2)
        with pytest.raises(StoreUnavailable, match="strict=True"):
            await store.acquire("other-room", "w1")
    finally:
        await store.aclose()
        pair.stop()
    assert any("allkeys-lru" in r.getMessage() for r in caplog.records)


def _graceful_failover(pair: SentinelPair) -> None:
    """``SENTINEL FAILOVER`` with the primary alive: promoted replica, and the old
    primary keeps taking writes until Sentinel demotes it (a split-brain window)."""
    sentinel = pair._watch()
    until(
        "Sentinel refused the failover",
        lambda: "OK" in sentinel.cli("sentinel", "failover", SERVICE),
    )
    until("Sentinel does not name the replica", pair._names_replica_primary)
    until(
        "the old primary was not demoted",
        lambda: "role:slave" in pair.primary.cli("info", "replication"),
    )


async def test_a_graceful_sentinel_failover_under_a_talking_session_loses_no_turn(
    tmp_path: Path,
) -> None:
    """failure-model.md "Redis rolled back under a live holder": the commits the old
    primary took after the promotion are discarded when it is demoted (hundreds of
    versions here); the holder notices, acquires again and writes the whole
    conversation: the store ends up holding the live history."""
    require_redis_server()
    pair = SentinelPair(tmp_path / "s").start()
    try:
        async with live_session(
            pair.url, [f"reply {i}" for i in range(400)], socket_timeout=1.0
        ) as (store, session, rs):
            stop = asyncio.Event()

            async def talk() -> None:
                n = 0
                while not stop.is_set():
                    await session.run(user_input=f"turn {n}")
                    n += 1
                    await asyncio.sleep(0.05)

            talker = asyncio.ensure_future(talk())
            try:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(_graceful_failover, pair)
                await asyncio.sleep(2.0)
                stop.set()
                await talker
                await asyncio.wait_for(rs._autosave.idle.wait(), 30)
                assert rs._autosave.lost is None
                assert await stored_texts(store) == live_texts(session)
            finally:
                stop.set()
                await asyncio.gather(talker, return_exceptions=True)
    finally:
        pair.stop()
