"""The frame codec: round trips, keys, limits, bad bytes, old formats."""

from __future__ import annotations

import base64
import struct
import tracemalloc
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livekit_resume.errors import (
    IncompatibleSnapshot,
    SignatureMismatch,
    SnapshotCorrupt,
    SnapshotTooLarge,
)
from livekit_resume.snapshot.codec import MAGIC, Codec, Keyring
from livekit_resume.snapshot.model import (
    FORMAT_VERSION,
    AgentFrame,
    SessionMeta,
    Snapshot,
    ToolCallRecord,
)

KEY_A = "a:" + base64.b64encode(b"A" * 32).decode()
KEY_B = "b:" + base64.b64encode(b"B" * 32).decode()


def _msg(i: int, text: str = "hello") -> dict[str, object]:
    return {
        "id": f"item_{i}",
        "type": "message",
        "role": "user" if i % 2 else "assistant",
        "content": [f"{text} {i}"],
        "created_at": 1_700_000_000.0 + i / 7,
        "extra": {"n": i},
    }


def _snapshot(n: int = 5) -> Snapshot:
    items = [_msg(i) for i in range(n)]
    return Snapshot(
        key="room-42",
        epoch=3,
        reason="turn",
        meta=SessionMeta(room="room-42", turn_count=n, extra={"plan": "gold"}),
        history=items,
        agent=AgentFrame(agent_id="receptionist", chat_ctx=items[-2:], state={"step": 2}),
        userdata={"name": "Ada", "visits": [1, 2]},
        tool_calls=[ToolCallRecord(call_id="c1", name="book", arguments="{}")],
    )


@pytest.mark.parametrize(
    "codec",
    [
        Codec(),
        Codec(signing_keys=KEY_A),
        Codec(encryption_keys=KEY_A),
        Codec(signing_keys=KEY_A, encryption_keys=KEY_B),
    ],
    ids=["plain", "signed", "encrypted", "signed+encrypted"],
)
def test_snapshot_round_trips_through_every_frame_kind(codec: Codec) -> None:
    snap = _snapshot(200)  # large enough to be compressed
    frame = codec.encode(snap)
    assert frame[:4] == MAGIC
    assert codec.decode(frame) == snap


def test_parts_round_trip_and_agent_refs_resolve_to_history_items() -> None:
    codec = Codec(signing_keys=KEY_A)
    snap = _snapshot(6)
    head = codec.encode_head(snap)
    history = [(i["id"], codec.encode_item(snap.key, "history", i)) for i in snap.history]
    assert snap.agent is not None
    agent = [
        (i["id"], codec.encode_item(snap.key, "agent", i, ref=True)) for i in snap.agent.chat_ctx
    ]
    assert codec.decode_parts(snap.key, head, {"history": history, "agent": agent}) == snap


def test_parts_with_a_missing_item_are_corrupt() -> None:
    codec = Codec()
    snap = _snapshot(4)
    head = codec.encode_head(snap)
    history = [(i["id"], codec.encode_item(snap.key, "history", i)) for i in snap.history[:-1]]
    with pytest.raises(SnapshotCorrupt, match="damaged"):
        codec.decode_parts(snap.key, head, {"history": history})


def test_signed_item_cannot_be_moved_to_another_session() -> None:
    codec = Codec(signing_keys=KEY_A)
    item = _msg(1)
    frame = codec.encode_item("room-1", "history", item)
    codec.unpack(frame, context=codec.item_context("room-1", "history", "item_1"))
    with pytest.raises(SignatureMismatch):
        codec.unpack(frame, context=codec.item_context("room-2", "history", "item_1"))


def test_key_rotation_old_key_still_verifies_new_key_signs() -> None:
    snap = _snapshot()
    old = Codec(signing_keys=KEY_A).encode(snap)
    rotated = Codec(signing_keys=f"{KEY_B},{KEY_A}")
    assert rotated.decode(old) == snap
    new = rotated.encode(snap)
    assert new[-34:-32] == b"\x01b"  # kid "b" signs now
    with pytest.raises(SignatureMismatch):
        Codec(signing_keys=KEY_A).decode(new)


def test_unsigned_frame_is_refused_when_keys_are_configured() -> None:
    with pytest.raises(SignatureMismatch, match="unsigned"):
        Codec(signing_keys=KEY_A).decode(Codec().encode(_snapshot()))


def test_wrong_encryption_key_is_refused() -> None:
    frame = Codec(encryption_keys=KEY_A).encode(_snapshot())
    wrong = "a:" + base64.b64encode(b"Z" * 32).decode()
    with pytest.raises(SignatureMismatch, match="decrypt"):
        Codec(encryption_keys=wrong).decode(frame)


def test_encrypted_frame_hides_the_conversation() -> None:
    frame = Codec(encryption_keys=KEY_A).encode(_snapshot())
    assert b"hello" not in frame and b"Ada" not in frame


@pytest.mark.parametrize(
    "spec", ["", "nokey", "a:!!notbase64", "a:" + base64.b64encode(b"x").decode()]
)
def test_bad_key_specs_are_value_errors(spec: str) -> None:
    with pytest.raises(ValueError):
        Keyring.parse(spec)


# ---------------------------------------------------------------- bad bytes


def test_truncated_frames_are_corrupt_at_every_length() -> None:
    frame = Codec().encode(_snapshot(30))
    for n in range(len(frame)):
        with pytest.raises(SnapshotCorrupt):
            Codec().decode(frame[:n])


def test_every_single_bit_flip_is_detected() -> None:
    codec = Codec()
    frame = codec.encode(_snapshot(3))
    for pos in range(len(frame)):
        for bit in (0, 3, 7):
            flipped = bytearray(frame)
            flipped[pos] ^= 1 << bit
            # a flip in the size field may also say "too large"; both are typed refusals
            with pytest.raises((SnapshotCorrupt, SnapshotTooLarge)):
                codec.decode(bytes(flipped))


@given(st.binary(max_size=4096))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_are_refused_with_a_typed_error(data: bytes) -> None:
    with pytest.raises((SnapshotCorrupt, SnapshotTooLarge, IncompatibleSnapshot)):
        Codec().decode(data)


_FUZZ_SNAPSHOT = _snapshot(10)
_FUZZ_FRAME = Codec().encode(_FUZZ_SNAPSHOT)


@given(pos=st.integers(min_value=0), junk=st.binary(min_size=1, max_size=16))
@settings(max_examples=300)
def test_fuzzed_real_frames_never_escape_the_typed_errors(pos: int, junk: bytes) -> None:
    frame = bytearray(_FUZZ_FRAME)
    pos %= len(frame)
    frame[pos : pos + len(junk)] = junk
    try:
        got = Codec().decode(bytes(frame))
    except (SnapshotCorrupt, SnapshotTooLarge, IncompatibleSnapshot):
        return
    # only junk equal to the bytes it overwrote can pass the checksum
    assert bytes(frame) == _FUZZ_FRAME and got == _FUZZ_SNAPSHOT


def _raw_frame(body: bytes, *, version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    header = struct.pack(">4sBBHI", MAGIC, version, flags, 0, len(body))
    return header + body + struct.pack(">I", zlib.crc32(header + body))


def test_frame_from_a_newer_format_is_incompatible() -> None:
    body = msgpack.packb(_snapshot().model_dump(), use_bin_type=True)
    with pytest.raises(IncompatibleSnapshot, match="upgrade"):
        Codec().decode(_raw_frame(body, version=FORMAT_VERSION + 1))


def test_frame_over_the_size_limit_is_too_large_before_reading_it() -> None:
    body = b"x" * 2000
    with pytest.raises(SnapshotTooLarge):
        Codec(max_frame=1000).unpack(_raw_frame(body))
    # the declared size alone is enough: no body needs to be present
    header = struct.pack(">4sBBHI", MAGIC, FORMAT_VERSION, 0, 0, 2**32 - 1)
    with pytest.raises(SnapshotTooLarge):
        Codec().unpack(header + b"\0" * 8)


def test_writing_a_frame_over_the_limit_is_refused() -> None:
    with pytest.raises(SnapshotTooLarge):
        Codec(max_frame=100).pack({"blob": bytes(range(256)) * 8})


def test_a_head_over_the_limit_names_what_makes_a_head_smaller() -> None:
    """A head holds no media: its error once told to drop inline media (media='drop'),
    which cannot shrink it."""
    snap = _snapshot().model_copy(update={"userdata": {"blob": "x" * 5000}})
    with pytest.raises(SnapshotTooLarge, match="userdata, agent state") as caught:
        Codec(max_frame=4000).encode_head(snap)
    assert "media" not in str(caught.value)


def test_zip_bomb_is_stopped_at_the_limit_with_bounded_memory() -> None:
    bomb = zlib.compress(b"\0" * (64 * 1024 * 1024), 9)  # 64 MiB of zeros in ~64 KiB
    tracemalloc.start()
    with pytest.raises(SnapshotTooLarge):
        Codec(max_frame=1024 * 1024).unpack(_raw_frame(bomb, flags=1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize(
    "body",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 declaring 4 GiB
        b"\xc6\xff\xff\xff\xf0abc",  # bin32 declaring ~4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 of 4G elements
        b"\xdf\xff\xff\xff\xff",  # map32 of 4G pairs
        b"\xc7\x05\x01abcde",  # ext type: never accepted
        b"\x81\x01\x02",  # map with an int key
    ],
)
def test_msgpack_with_absurd_or_foreign_declarations_is_corrupt(body: bytes) -> None:
    tracemalloc.start()
    with pytest.raises(SnapshotCorrupt):
        Codec().unpack(_raw_frame(body))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_valid_msgpack_of_the_wrong_shape_is_corrupt() -> None:
    with pytest.raises(SnapshotCorrupt, match="format"):
        Codec().decode(_raw_frame(msgpack.packb({"key": 5, "surprise": True})))


def test_values_that_are_not_plain_data_cannot_be_written() -> None:
    with pytest.raises(TypeError, match="plain data"):
        Codec().pack({"obj": object()})


# ------------------------------------------------------------ migrations


def test_format_1_snapshot_is_upcast_on_load() -> None:
    v1 = _snapshot(3).model_dump()
    v1["format_version"] = 1
    del v1["tool_calls"]
    v1["pending_tools"] = [{"call_id": "c9", "name": "pay", "arguments": '{"eur": 5}'}]
    for item in v1["history"]:
        item["timestamp"] = item.pop("created_at")
    codec = Codec()
    snap = codec.decode(codec.pack(v1, version=1))
    assert snap.format_version == FORMAT_VERSION
    assert snap.tool_calls == [
        ToolCallRecord(call_id="c9", name="pay", arguments='{"eur": 5}', status="unanswered")
    ]
    assert [i["created_at"] for i in snap.history] == [
        i["created_at"] for i in _snapshot(3).history
    ]


def test_format_1_item_frames_are_upcast_one_by_one() -> None:
    codec = Codec()
    snap = _snapshot(2)
    old_item = dict(snap.history[0])
    old_item["timestamp"] = old_item.pop("created_at")
    frames = [
        ("item_0", codec.pack(old_item, context=b"room-42\x00history\x00item_0", version=1)),
        ("item_1", codec.encode_item(snap.key, "history", snap.history[1])),
    ]
    plain = snap.model_copy(update={"agent": None})
    got = codec.decode_parts(snap.key, codec.encode_head(plain), {"history": frames})
    assert got.history == snap.history


def test_a_format_version_that_never_existed_is_incompatible() -> None:
    with pytest.raises(IncompatibleSnapshot):
        Codec().decode(_raw_frame(msgpack.packb({}), version=0))


# ------------------------------------------------- one limit on both sides


def _audio_item(seconds: float, *, rate: int = 24_000) -> dict[str, object]:
    """A user turn with its audio kept (media="keep"), made by the real chat converter."""
    from livekit import rtc
    from livekit.agents import llm

    from livekit_resume.snapshot.chat import item_to_data

    samples = int(rate * 0.02)  # 20 ms frames, as LiveKit's audio input delivers them
    frames = [
        rtc.AudioFrame(b"\0\0" * samples, rate, 1, samples)  # silence compresses ~1000:1
        for _ in range(int(seconds / 0.02))
    ]
    audio = llm.AudioContent(frame=frames, transcript="a long monologue")
    return item_to_data(
        llm.ChatMessage(id="item_audio", role="user", content=[audio]), media="keep"
    )


def test_a_frame_whose_body_inflates_past_the_limit_is_refused_at_write_time() -> None:
    # 12 minutes at 24 kHz is ~35 MB of PCM; scaled down here: 6 s (~290 KB) against a
    # 128 KiB limit. Compressed it fits the limit, uncompressed it does not.
    codec = Codec(max_frame=128 * 1024)
    item = _audio_item(6.0)
    with pytest.raises(SnapshotTooLarge) as err:
        codec.encode_item("room-42", "history", item)
    message = str(err.value)
    for part in ("room-42", "history", "item_audio", str(128 * 1024), "media='drop'"):
        assert part in message, part
    with pytest.raises(SnapshotTooLarge):
        codec.pack(item)


def test_whatever_pack_accepts_unpack_reads_at_the_limit() -> None:
    for codec in (Codec(max_frame=4096), Codec(max_frame=4096, encryption_keys=KEY_A)):
        for n in range(3000, 5000, 97):
            for blob in (b"\0" * n, bytes(range(256)) * (n // 256)):
                try:
                    frame = codec.pack({"b": blob})
                except SnapshotTooLarge:
                    continue
                assert codec.unpack(frame)[1] == {"b": blob}


def test_parts_with_two_items_of_one_id_are_corrupt_naming_the_id() -> None:
    codec = Codec()
    snap = _snapshot(3)
    plain = snap.model_copy(update={"agent": None})
    history = [(i["id"], codec.encode_item(snap.key, "history", i)) for i in snap.history]
    history.append(history[1])
    head = codec.encode_head(plain, counts={"history": 4, "agent": 0})
    with pytest.raises(SnapshotCorrupt, match="item_1"):
        codec.decode_parts(snap.key, head, {"history": history})


def _nested(depth: int) -> list[object]:
    out: list[object] = []
    inner = out
    for _ in range(depth - 1):
        nxt: list[object] = []
        inner.append(nxt)
        inner = nxt
    return out


def test_values_nested_past_the_depth_limit_are_refused_on_both_sides() -> None:
    from livekit_resume.snapshot.codec import MAX_DEPTH

    codec = Codec()
    codec.unpack(codec.pack({"u": _nested(MAX_DEPTH - 1)}))  # at the limit: fine
    with pytest.raises(SnapshotTooLarge, match="deep"):
        codec.pack({"u": _nested(MAX_DEPTH)})
    # a frame made by another packer (msgpack nests up to 1024) is refused when read
    with pytest.raises(SnapshotTooLarge, match="deep"):
        codec.unpack(_raw_frame(msgpack.packb({"u": _nested(600)})))


def _big_snapshot(n: int, size: int) -> Snapshot:
    """``n`` messages of ``size`` incompressible characters each."""
    import random

    rng = random.Random(7)
    items = [
        {**_msg(i), "content": ["".join(rng.choices("abcdefghij0123456789", k=size))]}
        for i in range(n)
    ]
    return _snapshot(0).model_copy(
        update={"history": items, "agent": AgentFrame(agent_id="r", chat_ctx=items[-3:])}
    )


@pytest.mark.parametrize(
    "codec",
    [Codec(max_frame=64 * 1024), Codec(max_frame=64 * 1024, signing_keys=KEY_A)],
    ids=["plain", "signed"],
)
def test_a_session_larger_than_one_frame_exports_as_frames_that_import(codec: Codec) -> None:
    import io

    from livekit_resume.snapshot.codec import read_frames

    snap = _big_snapshot(12, 20_000)  # ~300 KB: five times the limit, each item within it
    with pytest.raises(SnapshotTooLarge):
        codec.encode(snap)
    frames = codec.encode_export(snap)
    assert len(frames) == 1 + 12 + 3
    data = b"".join(frames)
    assert codec.decode_export(read_frames(io.BytesIO(data), max_frame=64 * 1024)) == snap
    # a small session is still one whole-snapshot frame, readable by `decode`
    small = _snapshot(3)
    (frame,) = codec.encode_export(small)
    assert codec.decode(frame) == small
    # a file cut short or with frames swapped is refused (signed: the HMAC context
    # binds each frame to its place; unsigned: the place is inside the body)
    with pytest.raises(SnapshotCorrupt):
        codec.decode_export(frames[:-1])
    with pytest.raises(SnapshotCorrupt):
        codec.decode_export([frames[0], frames[2], frames[1], *frames[3:]])


def test_a_truncated_export_stream_is_corrupt() -> None:
    import io

    from livekit_resume.snapshot.codec import read_frames

    data = b"".join(Codec(max_frame=64 * 1024).encode_export(_big_snapshot(4, 20_000)))
    for cut in (5, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotCorrupt):
            read_frames(io.BytesIO(data[:cut]), max_frame=64 * 1024)


def test_a_key_without_its_id_is_refused_without_echoing_the_secret() -> None:
    """Issue 15 defect 4, at the codec: ``Codec(signing_keys=...)`` called directly."""
    secret = base64.b64encode(b"k" * 32).decode()
    with pytest.raises(ValueError) as e:
        Codec(signing_keys=secret)
    assert secret not in str(e.value) and "kid:base64key" in str(e.value)


@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_a_key_written_before_its_id_is_refused_without_echoing_the_secret(size: int) -> None:
    """``base64key:kid`` (kid and key swapped), or ``base64key:`` : the part before the
    colon is the secret, and the message used to name it as the key's id."""
    secret = base64.b64encode(bytes(range(1, size + 1))).decode()
    for spec in (f"{secret}:k2025a", f"{secret}:", f"{secret}:!!"):
        for build in (
            Keyring.parse,
            lambda s: Codec(signing_keys=s),
            lambda s: Codec(encryption_keys=s),
        ):
            with pytest.raises(ValueError) as e:
                build(spec)
            assert secret not in str(e.value) and secret[:16] not in str(e.value)
    with pytest.raises(ValueError, match="'k2025a'"):  # a kid that is no key is named
        Keyring.parse("k2025a:" + base64.b64encode(b"x").decode())


def test_a_frames_context_is_made_only_for_a_key_that_binds_it() -> None:
    made: list[int] = []

    def context(version: int) -> bytes:
        made.append(version)
        return b"bound"

    plain = Codec()
    assert plain.unpack(plain.pack({"a": 1}, context=context))[1] == {"a": 1}
    assert made == []  # a CRC binds nothing: never made
    for codec in (Codec(signing_keys=KEY_A), Codec(encryption_keys=KEY_A)):
        frame = codec.pack({"a": 1}, context=context)
        assert made.pop() == FORMAT_VERSION
        assert codec.unpack(frame, context=b"bound")[1] == {"a": 1}
        with pytest.raises(SignatureMismatch):
            codec.unpack(frame, context=b"other")


def test_an_encrypted_item_cannot_be_moved_to_another_session() -> None:
    codec = Codec(encryption_keys=KEY_A)
    for _ in range(2):  # the second one seals with the cipher kept from the first
        frame = codec.encode_item("room-1", "history", _msg(1))
        codec.unpack(frame, context=codec.item_context("room-1", "history", "item_1"))
        with pytest.raises(SignatureMismatch):
            codec.unpack(frame, context=codec.item_context("room-2", "history", "item_1"))


def test_frames_deflated_from_the_kept_dictionary_state_do_not_affect_each_other() -> None:
    # each frame starts from a copy of one deflate state with the dictionary loaded
    codec = Codec()
    first = [codec.encode_item("k", "history", _msg(i, "hello " * i)) for i in range(1, 6)]
    again = [codec.encode_item("k", "history", _msg(i, "hello " * i)) for i in range(1, 6)]
    assert first == again
    assert [codec.unpack(f)[1] for f in first] == [_msg(i, "hello " * i) for i in range(1, 6)]


def test_an_item_body_is_deflated_at_level_1_with_the_preset_dictionary() -> None:
    # level 1: half the CPU of level 6 for a turn's small items, about 1 % more bytes
    from livekit_resume.snapshot.codec import ZDICT
    from livekit_resume.snapshot.frame import FLAG_ZDICT

    text = "Could you move my appointment to Thursday afternoon, around three? " * 3
    item = {"id": "m1", "type": "message", "role": "user", "content": [text], "extra": {}}
    codec = Codec()
    frame = codec.encode_item("s", "history", item)
    magic, _version, flags, _reserved, size = struct.unpack(">4sBBHI", frame[:12])
    assert magic == MAGIC and flags == FLAG_ZDICT
    body = msgpack.packb(item, use_bin_type=True)
    bits = max(9, min(15, (len(body) + len(ZDICT)).bit_length()))
    deflate = zlib.compressobj(
        1, zlib.DEFLATED, -bits, max(3, min(9, bits - 6)), zlib.Z_DEFAULT_STRATEGY, ZDICT
    )
    assert frame[12 : 12 + size] == deflate.compress(body) + deflate.flush()
    assert codec.decode_item("s", "history", "m1", frame, {}) == item
