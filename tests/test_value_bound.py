"""A msgpack body that would unpack into far more memory than its bytes is refused, on
every path that reads one (a frame, a Redis batch of log records), and nothing that
would be refused is written (`livekit_resume.msgscan`)."""

from __future__ import annotations

import tracemalloc
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, TypeAdapter

from livekit_resume.errors import SnapshotCorrupt, SnapshotTooLarge, UnsavableValue
from livekit_resume.msgscan import MAX_VALUES, too_many_values
from livekit_resume.snapshot import frame
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import FORMAT_VERSION
from livekit_resume.snapshot.values import _Trail, _Walker, dump_userdata
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.records import BATCH
from tests.test_redis import KEY, commit_items, raw, rstore  # noqa: F401  # fixture


def count_values(obj: Any) -> int:
    """What `too_many_values` counts, counted on the Python object."""
    if isinstance(obj, dict):
        return 1 + sum(count_values(k) + count_values(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return 1 + sum(count_values(v) for v in obj)
    return 1


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=5), inner, max_size=20)
    ),
    max_leaves=100,
)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(plain, st.floats(min_value=0.0, max_value=1.2))
def test_the_count_matches_the_values_msgpack_builds(obj: Any, at: float) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    n = count_values(obj)
    for limit in {0, int(n * at), n - 1, n, n + 1}:
        if limit < 0:
            continue
        assert too_many_values(body, limit) is (n > limit), (limit, n)


def bomb(values: int) -> bytes:
    """A body of about ``values`` empty maps whose lists never declare more than 15
    elements each (the count cannot stop at a header)."""
    inner = b"\x9f" + b"\x80" * 15  # a fixarray of 15 empty maps: 16 values, 16 bytes
    rows = values // 16
    return b"\xdd" + rows.to_bytes(4, "big") + inner * rows


def framed(body: bytes) -> bytes:
    """``body`` in a frame as a writer without the bound would make it (deflated)."""
    deflated = zlib.compress(body, 9)
    header = frame._HEADER.pack(frame.MAGIC, FORMAT_VERSION, frame.FLAG_ZLIB, 0, len(deflated))
    return header + deflated + frame._CRC.pack(zlib.crc32(header + deflated))


def test_a_frame_of_millions_of_empty_maps_is_refused_without_unpacking_them() -> None:
    codec = Codec()
    # one list of 8 million empty maps: 7.8 KB framed, 687 MB once unpacked
    hostile = framed(b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x80" * 8_000_000)
    assert len(hostile) < 16 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotTooLarge, match="values"):
            codec.unpack(hostile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, peak  # the inflated body and little else
    # lists of 15 each: no header announces too many, the count finds them on the way
    with pytest.raises(SnapshotTooLarge, match="values"):
        codec.unpack(framed(bomb(MAX_VALUES + 64)))


def test_a_value_a_reader_would_refuse_is_never_written() -> None:
    codec = Codec()
    with pytest.raises(SnapshotTooLarge, match="values"):
        codec.pack({"userdata": {"scores": [0] * MAX_VALUES}})
    assert codec.unpack(codec.pack({"userdata": {"scores": [0] * (MAX_VALUES - 8)}}))


async def test_a_redis_batch_of_millions_of_values_is_corrupt_and_left_as_it_was(
    rstore: RedisStore,  # noqa: F811  # the fixture imported above
) -> None:
    client = raw(rstore)
    lease = await rstore.acquire(KEY, "worker-a")
    await commit_items(rstore, lease, 0, "a")
    prefix = rstore._head_key(KEY)[: -len("head")]
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    hostile = BATCH + deflate.compress(bomb(MAX_VALUES + 64)) + deflate.flush()
    await client.rpush(prefix + "log:0", hostile)
    await client.hset(prefix + "v:1", "end", 2)
    with pytest.raises(SnapshotCorrupt, match="values"):
        await rstore.load(KEY)
    assert await client.lindex(prefix + "log:0", 1) == hostile  # nothing changed


# -- userdata: refused when saved, the rest of the session saving on ------------------------


@settings(max_examples=100, derandomize=True, deadline=None)
@given(plain)
def test_userdata_is_counted_as_the_reader_counts(obj: Any) -> None:
    walker = _Walker(lenient=True)
    walker.walk(obj, _Trail("userdata"))
    assert walker.values == count_values(obj)


class Ledger(BaseModel):
    name: str = ""
    rows: list[int] = Field(default_factory=list)


async def test_a_session_whose_userdata_outgrows_the_bound_saves_everything_else() -> None:
    from livekit.agents import Agent

    import livekit_resume as lr
    from tests.lk.scripted_llm import ScriptedLLM, make_text_session

    class Clerk(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="You keep ledgers.")

    reg = lr.AgentRegistry()
    reg.register(Clerk)
    store = lr.open_store("memory://")
    session = make_text_session(ScriptedLLM([], default="noted"), userdata=Ledger(name="Ada"))
    rs = lr.ResumableSession(store, "room-ledger", registry=reg, userdata_type=Ledger)
    try:
        await session.start(await rs.restore(session, default=Clerk))
        session.userdata.rows = [1, 2, 3]
        await session.run(user_input="three rows")
        await rs.checkpoint()
        session.userdata.rows = [0] * MAX_VALUES  # a restore would refuse it: not saved
        await session.run(user_input="and a million more")
        await rs.checkpoint()
        stored = await store.load("room-ledger")
        snap = Codec().decode_parts("room-ledger", stored.head, stored.streams)
        assert snap.userdata == {"name": "Ada", "rows": [1, 2, 3]}  # the last savable one
        texts = [d["content"] for d in snap.history if d.get("type") == "message"]
        assert ["and a million more"] in texts
        with pytest.raises(UnsavableValue, match=r"^userdata: holds 2,000,00\d values"):
            dump_userdata(TypeAdapter(Ledger), session.userdata)
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
