"""Format 4 and the fast restore path: compressed frames, format 3 frames still read,
the Redis log's batches (and its older layout), plain items built without pydantic
exactly as pydantic builds them, references decoded once."""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import json
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from livekit.agents import llm
from pydantic import TypeAdapter

from livekit_resume.agent_hooks.rebuild import _agent_ctx
from livekit_resume.errors import SignatureMismatch, SnapshotCorrupt
from livekit_resume.snapshot.chat import ctx_from_data, item_from_data, item_to_data
from livekit_resume.snapshot.codec import AGENT, HISTORY, ZDICT, Codec
from livekit_resume.snapshot.frame import FLAG_ZDICT, MAGIC, MAX_DEPTH, _may_nest, gc_paused
from livekit_resume.snapshot.model import FORMAT_VERSION, AgentFrame, Snapshot
from livekit_resume.snapshot.seal import SealKey
from livekit_resume.stores.base import Commit, Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.records import (
    BATCH,
    BATCH_BYTES,
    pack_record,
    pack_records,
    unpack_records,
)
from tests.redis_log import split_log
from tests.redis_servers import build_redis_store

FIXTURE = Path(__file__).parent / "fixtures" / "format3_session.json"
T = 1764590000.25


# -- frames -------------------------------------------------------------------------------


def test_the_preset_dictionary_never_changes() -> None:
    # Frames of format 4 are read with exactly these bytes: changing them would make
    # every stored session unreadable. A new dictionary needs a new flag.
    assert hashlib.sha256(ZDICT).hexdigest() == (
        "8e3f10e3fa10ecfc24f00d7b53a000fe114929fa113c4936ab843cd818959aa4"
    )


def _message(n: int, text: str = "Could you move my appointment to Thursday?") -> dict[str, Any]:
    return item_to_data(
        llm.ChatMessage(id=f"item_{n:012x}", role="user", content=[text], created_at=T + n)
    )


def test_a_short_item_compresses_with_the_dictionary_and_reads_back() -> None:
    codec = Codec()
    item = _message(1)
    frame = codec.encode_item("k", HISTORY, item)
    assert frame[5] == FLAG_ZDICT and frame[4] == FORMAT_VERSION == 4
    assert len(frame) < 0.7 * len(msgpack.packb(item, use_bin_type=True))
    assert codec.decode_item("k", HISTORY, item["id"], frame, {}) == item


def _raw_frame(body: bytes, version: int, flags: int) -> bytes:
    header = struct.pack(">4sBBHI", MAGIC, version, flags, 0, len(body))
    return header + body + struct.pack(">I", zlib.crc32(header + body))


def _zdict_body(obj: Any) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    return deflate.compress(msgpack.packb(obj)) + deflate.flush()


def test_the_dictionary_flag_is_refused_before_format_4_and_beside_zlib() -> None:
    body = _zdict_body({"a": 1})
    assert Codec().unpack(_raw_frame(body, 4, FLAG_ZDICT)) == (4, {"a": 1})
    with pytest.raises(SnapshotCorrupt, match="preset dictionary"):
        Codec().unpack(_raw_frame(body, 3, FLAG_ZDICT))
    with pytest.raises(SnapshotCorrupt, match="preset dictionary"):
        Codec().unpack(_raw_frame(body, 4, FLAG_ZDICT | 1))
    with pytest.raises(SnapshotCorrupt, match=r"decompress|truncated"):
        Codec().unpack(_raw_frame(body[:-3], 4, FLAG_ZDICT))


def test_a_nesting_bound_only_skips_bodies_that_cannot_be_too_deep() -> None:
    flat = msgpack.packb({"content": ["x" * 5000], "extra": {}, "metrics": {}})
    assert not _may_nest(flat)
    deep: Any = 1
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    assert _may_nest(msgpack.packb(deep))


@pytest.mark.parametrize("name", ["plain", "signed"])
def test_format_3_frames_written_by_the_previous_release_load(name: str) -> None:
    # Written by main's code at format 3 (tests/fixtures/format3_session.json).
    case = json.loads(FIXTURE.read_text())[name]
    codec = Codec(namespace="fixture", **case["keys"])
    raw = base64.b64decode
    streams = {s: [(i, raw(f)) for i, f in case[s]] for s in (HISTORY, AGENT)}
    assert streams[HISTORY][0][1][4] == 3  # format 3 frames indeed
    snap = codec.decode_parts("room-3", raw(case["head"]), streams, version=5)
    # what format 3 held, with the defaults of fields added since
    expect = Snapshot.model_validate({**case["expect"], "format_version": FORMAT_VERSION})
    want = expect.model_dump(mode="json")
    assert snap.model_dump(mode="json") == {**want, "version": 5}
    whole = codec.decode(raw(case["whole"]))
    assert whole.model_dump(mode="json") == want


# -- decoded once --------------------------------------------------------------------------


def test_an_agent_reference_is_its_history_twin_decoded_once() -> None:
    codec = Codec()
    history = [_message(n) for n in range(3)]
    own = _message(9, "only the agent has this")
    agent = [history[0], own, history[2]]
    snap = Snapshot(key="k", history=history, agent=AgentFrame(agent_id="a", chat_ctx=agent))
    streams = {
        HISTORY: [(i["id"], codec.encode_item("k", HISTORY, i)) for i in history],
        AGENT: [(i["id"], codec.encode_item("k", AGENT, i, ref=i in history)) for i in agent],
    }
    seals = {HISTORY: codec.seal(HISTORY, history), AGENT: codec.seal(AGENT, agent)}
    head = codec.encode_head(snap, version=1, seals=seals)
    got = codec.decode_parts("k", head, streams, version=1)
    assert got.history == history and got.agent is not None and got.agent.chat_ctx == agent
    assert got.agent.chat_ctx[0] is got.history[0] and got.agent.chat_ctx[2] is got.history[2]

    items = ctx_from_data(got.history).items
    ctx = _agent_ctx(got.agent.chat_ctx, got.history, items)
    assert ctx.items[0] is items[0] and ctx.items[2] is items[2]  # as in a live session
    assert ctx.items[1] is not None and ctx.items[1].id == own["id"]
    alone = ctx_from_data(agent).items
    assert [i.model_dump() for i in ctx.items] == [i.model_dump() for i in alone]


def test_a_body_packed_otherwise_is_sealed_by_its_data_as_before() -> None:
    # The reader hashes each verified body for its seal leaf: the writer hashed exactly
    # those bytes. A body another packer wrote (here the id as a str 8, not a fixstr)
    # holds the same data under other bytes: judged by its data packed again, it loads.
    codec = Codec()
    item = _message(1)
    canonical = msgpack.packb(item, use_bin_type=True)
    fixstr = msgpack.packb(item["id"])
    other = canonical.replace(fixstr, b"\xd9" + bytes([len(item["id"])]) + item["id"].encode())
    assert other != canonical and msgpack.unpackb(other) == item
    snap = Snapshot(key="k", history=[item])
    head = codec.encode_head(snap, version=1, seals={HISTORY: codec.seal(HISTORY, [item])})
    streams = {HISTORY: [(item["id"], _raw_frame(other, 4, 0))]}
    assert codec.decode_parts("k", head, streams, version=1).history == [item]
    edited = {**item, "content": ["changed"]}
    streams = {HISTORY: [(item["id"], _raw_frame(msgpack.packb(edited), 4, 0))]}
    with pytest.raises(SnapshotCorrupt, match="seal"):
        codec.decode_parts("k", head, streams, version=1)


def test_a_reference_frame_with_keys_is_still_verified() -> None:
    signed = Codec(signing_keys="k1:" + base64.b64encode(b"s" * 32).decode())
    frame = signed.encode_item("k", AGENT, _message(1), ref=True)
    refs = {"item_000000000001": _message(1)}
    assert signed.decode_item("k", AGENT, "item_000000000001", frame, refs) == _message(1)
    with pytest.raises(Exception, match="signature"):  # moved to another id
        signed.decode_item("k", AGENT, "item_000000000002", frame, refs)


@pytest.mark.parametrize(
    "codec",
    [
        Codec(signing_keys="k1:" + base64.b64encode(b"s" * 32).decode()),
        Codec(encryption_keys="e1:" + base64.b64encode(b"e" * 32).decode()),
    ],
    ids=["signed", "encrypted"],
)
def test_keyed_items_of_older_formats_under_a_sealed_head_load_and_stay_bound(
    codec: Codec,
) -> None:
    # A stream may hold frames of older formats (written before an upgrade): before
    # format 3 their context is the key, stream and id alone, and their items are upcast,
    # so their seal leaves come from their data, not their bodies. A reference to one
    # resolves to it, and every frame is still bound to its id.
    items = [_message(n) for n in range(4)]

    def frame(stream: str, item: dict[str, Any], version: int, ref: bool = False) -> bytes:
        ctx = codec._item_ctx("k", stream, item["id"])
        return codec.pack({"ref": True} if ref else item, context=ctx, version=version)

    history = [(i["id"], frame(HISTORY, i, v)) for i, v in zip(items, (1, 2, 3, 4), strict=True)]
    agent = [
        (i["id"], frame(AGENT, i, v, ref=True)) for i, v in zip(items, (2, 4, 1, 3), strict=True)
    ]
    decoded = [codec.decode_item("k", HISTORY, i, f, {}) for i, f in history]
    snap = Snapshot(key="k", history=decoded, agent=AgentFrame(agent_id="a", chat_ctx=decoded))
    seals = {HISTORY: codec.seal(HISTORY, decoded), AGENT: codec.seal(AGENT, decoded)}
    head = codec.encode_head(snap, version=2, seals=seals)
    sealed: dict[str, Any] = {}
    got = codec.decode_parts("k", head, {HISTORY: history, AGENT: agent}, version=2, sealed=sealed)
    assert got.history == decoded and got.agent is not None
    assert all(a is h for a, h in zip(got.agent.chat_ctx, got.history, strict=True))
    assert sealed[HISTORY].seal == seals[HISTORY] and sealed[AGENT].seal == seals[AGENT]
    moved = [history[0], (items[2]["id"], history[1][1])]  # a format 2 frame, moved
    with pytest.raises(SignatureMismatch):
        codec.decode_parts("k", head, {HISTORY: moved}, version=2)
    swapped = [history[1], history[0], *history[2:]]
    with pytest.raises(SignatureMismatch, match="seal"):
        codec.decode_parts("k", head, {HISTORY: swapped, AGENT: agent}, version=2)


def test_signed_frames_verify_one_after_another_and_a_forged_one_among_them_does_not() -> None:
    # each verify copies one HMAC state keyed once per key: none leaks into the next
    keys = (
        "k2:" + base64.b64encode(b"t" * 32).decode() + ",k1:" + base64.b64encode(b"s" * 32).decode()
    )
    old = Codec(signing_keys="k1:" + base64.b64encode(b"s" * 32).decode())
    rotated = Codec(signing_keys=keys)
    frames = [
        (c, c.encode_item("k", HISTORY, _message(n))) for n, c in enumerate([old, rotated] * 2)
    ]
    forged = bytearray(frames[1][1])
    forged[20] ^= 1
    for n, (_, frame) in enumerate(frames):
        assert rotated.decode_item("k", HISTORY, f"item_{n:012x}", frame, {}) == _message(n)
        if n == 1:
            with pytest.raises(SignatureMismatch, match="k2"):
                rotated.decode_item("k", HISTORY, f"item_{n:012x}", bytes(forged), {})


def test_no_cyclic_collection_while_decoding_unless_the_app_has_turned_it_off() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with gc_paused(False):  # not asked for (a decode on a worker thread)
        assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- plain items without pydantic ---------------------------------------------------------

_STRICT: TypeAdapter[llm.ChatItem] = TypeAdapter(llm.ChatItem)

_ITEMS: list[llm.ChatItem] = [
    llm.ChatMessage(id="item_m1", role="user", content=["hi", "there"], created_at=T),
    llm.ChatMessage(
        id="item_m2",
        role="assistant",
        content=["ok"],
        interrupted=True,
        transcript_confidence=0.5,
        extra={"k": [1, {"a": None}]},
        metrics={"e2e_latency": 0.25, "llm_node_ttft": 0.1, "custom": "kept"},  # type: ignore[typeddict-unknown-key]
        created_at=T + 1,
    ),
    llm.FunctionCall(
        id="item_c1", call_id="c1", name="f", arguments="{}", created_at=T, group_id="g"
    ),
    llm.FunctionCallOutput(
        id="item_o1", call_id="c1", name="f", output="x", is_error=True, created_at=T
    ),
    llm.AgentHandoff(id="item_h1", old_agent_id=None, new_agent_id="b", created_at=T),
    llm.AgentConfigUpdate(id="item_u1", instructions="be brief", tools_added=["f"], created_at=T),
    llm.ChatMessage(id="item_m3", role="user", content=[], created_at=T),
]


@pytest.mark.parametrize("item", _ITEMS, ids=lambda i: i.id)
def test_a_plain_item_is_built_exactly_as_strict_validation_builds_it(item: llm.ChatItem) -> None:
    data = msgpack.unpackb(msgpack.packb(item_to_data(item), use_bin_type=True), raw=False)
    fast = item_from_data(data)
    slow = _STRICT.validate_python(dict(data), strict=True)
    if isinstance(slow, llm.ChatMessage):
        slow.metrics.update({k: v for k, v in data["metrics"].items() if k not in slow.metrics})  # type: ignore[typeddict-item]
    assert type(fast) is type(slow)
    assert list(fast.__dict__) == list(slow.__dict__)
    assert fast.__dict__ == slow.__dict__
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump() == slow.model_dump() and fast == slow
    for name in ("content", "extra", "metrics"):  # containers of its own
        if name in data:
            assert getattr(fast, name) is not data[name]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("role", "robot"),
        ("content", [1]),
        ("content", "text"),
        ("metrics", "slow"),
        ("extra", {1: "x"}),
        ("interrupted", 1),
        ("transcript_confidence", "high"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_by_name(field: str, value: Any) -> None:
    data = item_to_data(_ITEMS[0])
    data[field] = value
    with pytest.raises(SnapshotCorrupt, match="item_m1"):
        item_from_data(data)


def test_an_item_of_a_shape_already_seen_is_still_checked_value_by_value() -> None:
    good = item_to_data(_ITEMS[0])
    assert item_from_data(dict(good)) == _ITEMS[0]  # its shape (keys, value types) is known now
    for field, value in [
        ("role", "robot"),
        ("content", [1]),
        ("metrics", "slow"),
        ("extra", {1: "x"}),
    ]:
        with pytest.raises(SnapshotCorrupt, match="item_m1"):
            item_from_data({**good, field: value})
    # a declared metric of another type is telemetry, not the conversation: left out
    # (`chat._restorable_metrics`), as the checkpoint leaves it out now
    item = item_from_data({**good, "metrics": {"e2e_latency": "slow", "llm_node_ttft": 0.5}})
    assert isinstance(item, llm.ChatMessage) and item.metrics == {"llm_node_ttft": 0.5}


def test_an_item_with_its_fields_in_another_order_is_built_in_the_model_order() -> None:
    data = item_to_data(_ITEMS[1])
    shuffled = dict(reversed(list(data.items())))
    for _ in range(2):  # its shape unknown, then known
        item = item_from_data(shuffled)
        assert list(item.__dict__) == list(llm.ChatMessage.model_fields)
        assert item == item_from_data(data) == _ITEMS[1]


@pytest.mark.parametrize("key", [None, b"s" * 32])
def test_a_seal_term_is_the_keyed_blake2b_of_its_place_and_leaf(key: bytes | None) -> None:
    # the seal's definition (snapshot/seal.py), computed from scratch: a term made from
    # a copy of the keyed state is the same, every time it is asked for
    sealer = SealKey("k1" if key else "", key)
    label = b"livekit-resume item seal v1"
    seal_key = hmac.new(key, label, hashlib.sha256).digest() if key else b""
    for after in (None, "item_a"):
        record = msgpack.packb([HISTORY, "item_b", after, b"l" * 32], use_bin_type=True)
        want = hashlib.blake2b(record, key=seal_key, digest_size=32).digest()
        assert sealer.term(HISTORY, "item_b", after, b"l" * 32) == int.from_bytes(want, "big")
        assert sealer.term(HISTORY, "item_b", after, b"l" * 32) == int.from_bytes(want, "big")
    # a whole stream's terms, hashed in one loop, are these terms
    ids, leaves = ["item_a", "item_b", "item_c"], [b"a" * 32, b"b" * 32, b"c" * 32]
    got = sealer.sealed_leaves(AGENT, ids, leaves)
    afters = [None, *ids[:-1]]
    terms = [sealer.term(AGENT, i, a, leaf) for i, a, leaf in zip(ids, afters, leaves, strict=True)]
    assert got.terms == terms and got.leaves == leaves and got.seal == sum(terms) % (1 << 256)


# -- the Redis log ------------------------------------------------------------------------


def test_records_pack_into_one_batch_and_back_with_implied_afters() -> None:
    records = [
        Record(HISTORY, "", None),
        Record(HISTORY, "a", b"1", None),
        Record(HISTORY, "b", b"2", "a"),
        Record(AGENT, "a", b"r", None),
        Record(HISTORY, "c", b"3", "b"),
        Record(HISTORY, "a", None),
        Record("other", "x", b"4", "c"),
    ]
    (element,) = pack_records(records)
    assert element[:1] == BATCH
    assert unpack_records([element], "k") == records
    # the older layout, one long record per element, reads the same
    assert unpack_records([pack_record(r) for r in records], "k") == records


def test_a_record_past_a_batch_is_an_element_of_its_own_not_deflated_again() -> None:
    big = os.urandom(BATCH_BYTES + 1)  # a frame: deflated already
    records = [
        Record(HISTORY, "a", b"1", None),
        Record(HISTORY, "b", big, "a"),
        Record(HISTORY, "c", b"3", "b"),  # its after implied by the big one
    ]
    first, lone, last = pack_records(records)
    assert first[:1] == last[:1] == BATCH
    assert lone == msgpack.packb([HISTORY, "b", "a", big], use_bin_type=True)
    assert unpack_records([first, lone, last], "k") == records


def test_a_turns_small_batch_is_stored_and_a_larger_one_deflated() -> None:
    # a turn's batch: Huffman trees would cost more CPU than the bytes they save
    small = [Record(HISTORY, "a", b"1" * 100, None), Record(AGENT, "a", b"r", None)]
    (element,) = pack_records(small)
    assert element[:1] == BATCH
    body = msgpack.packb([[0, "a", None, b"1" * 100], [1, "a", None, b"r"]])
    assert body in element  # stored: its bytes as they are
    assert unpack_records([element], "k") == small
    large = [Record(HISTORY, f"i{n}", b"1" * 100, None) for n in range(20)]
    (element,) = pack_records(large)
    assert len(element) < sum(len(r.data or b"") for r in large) // 4  # deflated
    assert unpack_records([element], "k") == large


@pytest.mark.parametrize(
    "element",
    [BATCH + b"\x00garbage", BATCH + zlib.compress(msgpack.packb([[0, "a", b"x"]]))[2:-9]],
)
def test_a_damaged_batch_is_snapshot_corrupt(element: bytes) -> None:
    with pytest.raises(SnapshotCorrupt, match="batch"):
        unpack_records([element], "k")


def test_an_implied_after_with_nothing_before_it_is_snapshot_corrupt() -> None:
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    element = BATCH + deflate.compress(msgpack.packb([[0, "a", b"x"]])) + deflate.flush()
    with pytest.raises(SnapshotCorrupt, match="log record"):
        unpack_records([element], "k")


@pytest.fixture(params=["fakeredis", "redis"])
async def rstore(request: pytest.FixtureRequest) -> Any:
    store = await build_redis_store(request.param, request, namespace=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.aclose()


async def test_a_log_of_the_previous_layout_loads_and_keeps_growing(rstore: RedisStore) -> None:
    key = "room-1"
    lease = await rstore.acquire(key, "w")
    items = [Record("h", f"i{n}", f"d{n}".encode(), f"i{n - 1}" if n else None) for n in range(5)]
    assert await rstore.commit(Commit(key, lease.epoch, 0, b"h1", items, 5)) == 1
    # Rewrite it as the previous release stored it: a long record per element, and a
    # version record without a record count.
    client: Any = rstore._client
    log = rstore._names.log(key, 0)
    records = [r for element in split_log(await client.lrange(log, 0, -1), key) for r in element]
    await client.delete(log)
    await client.rpush(log, *(pack_record(r) for r in records))
    version = rstore._names.prefix(key) + "v:1"
    await client.hset(version, "end", len(records))
    await client.hdel(version, "records")
    assert (await rstore.load(key)).streams == {"h": [(r.id, r.data) for r in items]}

    edit = [Record("h", "i2", b"edited", "i1")]
    assert await rstore.commit(Commit(key, lease.epoch, 1, b"h2", edit, 5)) == 2
    assert int(await client.hget(rstore._names.prefix(key) + "v:2", "records")) == 6
    assert await client.llen(log) == 6  # five old elements and one batch
    want = [(r.id, b"edited" if r.id == "i2" else r.data) for r in items]
    assert (await rstore.load(key)).streams == {"h": want}
    assert (await rstore.load(key, 1)).streams == {"h": [(r.id, r.data) for r in items]}
