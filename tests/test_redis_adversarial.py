"""An adversarial pass over the Redis store: hostile values in a session's keys, hostile
messages on its channels. Each test here failed on the code before its fix. Real
``redis-server`` processes of the tests' own (``redis_servers.py``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.stores.base import Command, Commit, Record
from livekit_resume.stores.redis import RedisStore
from tests.redis_servers import RedisFactory, build_redis_store

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


@pytest.mark.parametrize(
    "fields", HOSTILE_HEADS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())
)
async def test_a_head_with_hostile_numbers_is_corrupt_and_never_hangs_the_server(
    make_redis: RedisFactory, fields: dict[str, str]
) -> None:
    server = make_redis("--lua-time-limit", "100")
    store = RedisStore.from_url(
        server.url, namespace="adv", ttl=3600, socket_timeout=2.0, retries=0
    )
    try:
        lease = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
        head = store._head_key(KEY)
        await store._client.hset(head, mapping=fields)
        before = await store._client.hgetall(head)
        second = Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2)
        calls = {
            "acquire": lambda: store.acquire(KEY, "worker-b", takeover=True),
            "renew": lambda: store.renew(lease),
            "commit": lambda: store.commit(second),
            "load": lambda: store.load(KEY),
            "versions": lambda: store.versions(KEY),
            "info": lambda: store.info(KEY),
        }
        for name, call in calls.items():
            try:
                await asyncio.wait_for(call(), 10)
            except SnapshotCorrupt:
                continue
            except Exception as exc:
                raise AssertionError(f"{name}: {exc!r}") from exc
            raise AssertionError(f"{name} read a hostile head as valid")
        assert await store._client.hgetall(head) == before  # nothing changed
        # and the advice the error gives works: the session can be deleted
        assert await asyncio.wait_for(store.delete(KEY), 10) is True
        assert await store._client.exists(head) == 0
    finally:
        await store.aclose()
        server.kill()


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
            await commands._scripts.call("publish", [channel + ":j"], [channel, junk])
        await commands.send(Command("real", KEY, "pause", 7))
        got = await asyncio.wait_for(inbox.__anext__(), 10)
        assert (got.id, got.verb, got.epoch) == ("real", "pause", 7)


async def test_hostile_events_on_the_channel_do_not_end_a_subscription(
    real_store: RedisStore,
) -> None:
    async with real_store.subscribe() as events:
        for junk in (b"[" * 100_000 + b"]" * 100_000, b"\xff", b"1e999", b'"str"'):
            await real_store._scripts.call(
                "publish", [real_store._head_key(KEY)], [real_store._channel, junk]
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
    server = make_redis("--lua-time-limit", "100")
    store = RedisStore.from_url(
        server.url, namespace="adv", ttl=3600, socket_timeout=2.0, retries=0
    )
    try:
        lease = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1))
        await store.commit(Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2))
        log_len = await store._client.llen(store._names.log(KEY, 0))
        v2 = await store._client.hget(store._head_key(KEY)[: -len("head")] + "v:2", "cid")
        await store._compact(KEY, 2, 0, log_len, v2.decode())
        head = await store._client.hgetall(store._head_key(KEY))
        assert (head[b"gen"], head[b"gen_lo"]) == (b"1", b"0")  # v1 still reads log:0
        await store._client.hset(store._head_key(KEY)[: -len("head")] + "v:1", "gen", gen)
        third = Commit(KEY, lease.epoch, 2, b"h3", [Record("h", "c", b"c", "b")], 3)
        assert await asyncio.wait_for(store.commit(third), 10) == 3
        loaded = await asyncio.wait_for(store.load(KEY), 10)
        assert [i for i, _ in loaded.streams["h"]] == ["a", "b", "c"]
    finally:
        await store.aclose()
        server.kill()


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
