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
