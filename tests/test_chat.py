"""Chat items <-> plain data: exact round trips, media policy, tool-call repair, bad data."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import math
from typing import Any, cast

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from livekit import rtc
from livekit.agents import llm
from livekit.agents.utils import images
from pydantic import BaseModel

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot.chat import (
    INTERRUPTED_OUTPUT,
    ctx_from_data,
    ctx_to_data,
    item_from_data,
    item_to_data,
    repair_tool_calls,
    without_media,
)
from livekit_resume.snapshot.model import ToolCallRecord

DROPPED_IMAGE_TEXT = "[image omitted: this image was not kept when the conversation was saved]"
DATA_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake bytes").decode()


def codec(value: Any) -> Any:
    """Stand-in for the snapshot codec: msgpack there and back."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def assert_plain(value: Any, path: str = "data") -> None:
    """Only dict (str keys), list, str, int, float, bool, None and bytes."""
    if value is None or type(value) in (str, int, float, bool, bytes):
        return
    if type(value) is list:
        for i, v in enumerate(value):
            assert_plain(v, f"{path}[{i}]")
        return
    assert type(value) is dict, f"{path} is a {type(value).__name__}"
    for k, v in value.items():
        assert type(k) is str, f"{path} has key {k!r}"
        assert_plain(v, f"{path}[{k!r}]")


def roundtrip(ctx: llm.ChatContext, media: Any = "drop") -> llm.ChatContext:
    data = ctx_to_data(ctx, media=media)
    assert_plain(data)
    return ctx_from_data(codec(data))


def audio_frame(
    seed: int, samples: int = 160, rate: int = 16000, channels: int = 1
) -> rtc.AudioFrame:
    pcm = bytes((seed + i) % 256 for i in range(samples * channels * 2))
    return rtc.AudioFrame(pcm, rate, channels, samples)


# -- hypothesis strategies ---------------------------------------------------------------

texts = st.text(max_size=20)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12).map(
    lambda s: f"item_{s}"
)
exact_floats = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | exact_floats
    | st.text(max_size=10)  # unicode, incl. astral-plane characters
    | st.binary(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
extras = st.dictionaries(texts, json_values, max_size=4)
metadata = st.fixed_dictionaries({}, optional={"model_name": texts, "model_provider": texts})
metrics = st.fixed_dictionaries(
    {},
    optional={
        "started_speaking_at": exact_floats,
        "stopped_speaking_at": exact_floats,
        "transcription_delay": exact_floats,
        "end_of_turn_delay": exact_floats,
        "llm_node_ttft": exact_floats,
        "e2e_latency": exact_floats,
        "provider_request_ids": st.lists(texts, max_size=3),
        "llm_metadata": metadata,
        "tts_metadata": metadata,
    },
)
url_images = st.builds(
    llm.ImageContent,
    id=st.text(min_size=1, max_size=10).map(lambda s: f"img_{s}"),
    image=st.sampled_from(["https://example.com/cat.jpg", "http://x.test/a?b=c#é", "gs://b/o"]),
    inference_width=st.none() | st.integers(1, 4096),
    inference_height=st.none() | st.integers(1, 4096),
    inference_detail=st.sampled_from(["auto", "high", "low"]),
    mime_type=st.none() | st.sampled_from(["image/jpeg", "image/png"]),
)
contents: st.SearchStrategy[list[llm.ChatContent]] = st.lists(
    st.one_of(texts, url_images, st.builds(llm.CacheBreakpoint)), max_size=4
)


@st.composite
def chat_items(draw: st.DrawFn, created_at: st.SearchStrategy[float]) -> llm.ChatItem:
    kind = draw(st.sampled_from(["message", "call", "output", "handoff", "config"]))
    common: dict[str, Any] = {"id": draw(ids), "created_at": draw(created_at)}
    if kind == "message":
        return llm.ChatMessage(
            **common,
            role=draw(st.sampled_from(["developer", "system", "user", "assistant"])),
            content=draw(contents),
            interrupted=draw(st.booleans()),
            transcript_confidence=draw(st.none() | st.floats(0, 1)),
            extra=draw(extras),
            metrics=cast(llm.MetricsReport, draw(metrics)),
        )
    if kind == "call":
        return llm.FunctionCall(
            **common,
            call_id=draw(texts),
            name=draw(texts),
            arguments=draw(texts),
            extra=draw(extras),
            group_id=draw(st.none() | texts),
        )
    if kind == "output":
        return llm.FunctionCallOutput(
            **common,
            name=draw(texts),
            call_id=draw(texts),
            output=draw(texts),
            is_error=draw(st.booleans()),
            reply_required=draw(st.booleans()),
        )
    if kind == "handoff":
        return llm.AgentHandoff(
            **common, old_agent_id=draw(st.none() | texts), new_agent_id=draw(texts)
        )
    tool_lists = st.none() | st.lists(texts, max_size=3)
    return llm.AgentConfigUpdate(
        **common,
        instructions=draw(st.none() | texts),
        tools_added=draw(tool_lists),
        tools_removed=draw(tool_lists),
    )


@st.composite
def chat_contexts(draw: st.DrawFn) -> llm.ChatContext:
    # a small pool of timestamps makes identical created_at values common
    pool = draw(st.lists(exact_floats, min_size=1, max_size=3))
    created_at = st.sampled_from(pool) | exact_floats
    return llm.ChatContext(draw(st.lists(chat_items(created_at), max_size=8)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ctx=chat_contexts(), media=st.sampled_from(["drop", "keep"]))
def test_roundtrip_is_exact(ctx: llm.ChatContext, media: Any) -> None:
    restored = roundtrip(ctx, media)

    assert ctx.is_equivalent(restored)
    assert len(restored.items) == len(ctx.items)
    for before, after in zip(ctx.items, restored.items, strict=True):
        assert type(after) is type(before)
        assert after is not before
        assert (after.id, after.type) == (before.id, before.type)
        assert after.created_at == before.created_at
        assert math.copysign(1, after.created_at) == math.copysign(1, before.created_at)
        if isinstance(before, llm.ChatMessage):
            assert isinstance(after, llm.ChatMessage)
            assert after.role == before.role
            assert after.extra == before.extra
            assert after.metrics == before.metrics
        assert after.model_dump() == before.model_dump()
    # restoring the data again gives the same data: nothing drifts
    assert ctx_to_data(restored, media=media) == codec(ctx_to_data(ctx, media=media))


# -- exact shape and values --------------------------------------------------------------


def test_message_data_has_every_field_exactly() -> None:
    msg = llm.ChatMessage(
        id="item_1",
        role="assistant",
        content=[
            "hello",
            llm.CacheBreakpoint(),
            llm.ImageContent(
                id="img_1",
                image="https://example.com/a.png",
                inference_width=64,
                inference_height=32,
                inference_detail="low",
                mime_type="image/png",
            ),
        ],
        interrupted=True,
        transcript_confidence=0.25,
        extra={"k": ["v", 1, 2.5, None, True, b"\x00"]},
        metrics={"llm_node_ttft": 0.1, "llm_metadata": {"model_name": "m"}},
        created_at=1712345678.1234567,
    )
    assert item_to_data(msg) == {
        "id": "item_1",
        "type": "message",
        "role": "assistant",
        "content": [
            "hello",
            {"type": "cache_breakpoint"},
            {
                "id": "img_1",
                "type": "image_content",
                "image": "https://example.com/a.png",
                "inference_width": 64,
                "inference_height": 32,
                "inference_detail": "low",
                "mime_type": "image/png",
            },
        ],
        "interrupted": True,
        "transcript_confidence": 0.25,
        "extra": {"k": ["v", 1, 2.5, None, True, b"\x00"]},
        "metrics": {"llm_node_ttft": 0.1, "llm_metadata": {"model_name": "m"}},
        "created_at": 1712345678.1234567,
    }


def test_other_item_types_keep_every_field() -> None:
    call = llm.FunctionCall(
        id="item_c",
        call_id="call_1",
        name="book",
        arguments='{"day": "mon"}',
        created_at=1.5,
        extra={"google": {"thought_signature": b"\x01\x02"}},
        group_id="g1",
    )
    out = llm.FunctionCallOutput(
        id="item_o",
        name="book",
        call_id="call_1",
        output="ok",
        is_error=False,
        created_at=2.5,
        reply_required=False,
    )
    handoff = llm.AgentHandoff(id="item_h", old_agent_id=None, new_agent_id="b", created_at=3.0)
    config = llm.AgentConfigUpdate(
        id="item_u", instructions="be brief", tools_added=["x"], tools_removed=[], created_at=4.0
    )
    assert item_to_data(call) == {
        "id": "item_c",
        "type": "function_call",
        "call_id": "call_1",
        "arguments": '{"day": "mon"}',
        "name": "book",
        "created_at": 1.5,
        "extra": {"google": {"thought_signature": b"\x01\x02"}},
        "group_id": "g1",
    }
    assert item_to_data(out) == {
        "id": "item_o",
        "type": "function_call_output",
        "name": "book",
        "call_id": "call_1",
        "output": "ok",
        "is_error": False,
        "created_at": 2.5,
        "reply_required": False,
    }
    assert item_to_data(handoff) == {
        "id": "item_h",
        "type": "agent_handoff",
        "old_agent_id": None,
        "new_agent_id": "b",
        "created_at": 3.0,
    }
    assert item_to_data(config) == {
        "id": "item_u",
        "type": "agent_config_update",
        "instructions": "be brief",
        "tools_added": ["x"],
        "tools_removed": [],
        "created_at": 4.0,
    }
    for item in (call, out, handoff, config):
        restored = item_from_data(codec(item_to_data(item)))
        assert type(restored) is type(item)
        assert restored.model_dump() == item.model_dump()


def test_context_order_is_kept_not_resorted() -> None:
    items: list[llm.ChatItem] = [
        llm.ChatMessage(id="item_late", role="user", content=["b"], created_at=20.0),
        llm.ChatMessage(id="item_early", role="assistant", content=["a"], created_at=10.0),
        llm.AgentHandoff(id="item_same", new_agent_id="x", created_at=10.0),
    ]
    restored = roundtrip(llm.ChatContext(items))
    assert [i.id for i in restored.items] == ["item_late", "item_early", "item_same"]
    assert [i.created_at for i in restored.items] == [20.0, 10.0, 10.0]


def test_deprecated_hash_is_kept_only_when_set() -> None:
    plain = llm.ChatMessage(id="item_a", role="user", content=["x"], created_at=1.0)
    hashed = llm.ChatMessage(id="item_b", role="user", content=["x"], created_at=1.0, hash=b"h")
    assert "hash" not in item_to_data(plain)
    assert item_to_data(hashed)["hash"] == b"h"
    assert item_from_data(codec(item_to_data(hashed))).model_dump()["hash"] == b"h"


class _Point(BaseModel):
    x: int
    y: list[int]


def test_non_plain_extra_values_follow_pydantic_json_rule() -> None:
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    msg = llm.ChatMessage(
        id="item_x",
        role="user",
        content=["x"],
        created_at=1.0,
        extra={
            "tuple": (1, (2, 3)),
            "set": {7},
            "when": when,
            "model": _Point(x=1, y=[2]),
            "int_keys": {1: "one"},
            "buffer": bytearray(b"ab"),
        },
    )
    data = item_to_data(msg)
    assert_plain(data)
    assert data["extra"] == {
        "tuple": [1, [2, 3]],
        "set": [7],
        "when": "2024-05-01T12:30:00Z",
        "model": {"x": 1, "y": [2]},
        "int_keys": {"1": "one"},
        "buffer": b"ab",
    }
    assert item_from_data(codec(data)).extra == data["extra"]  # type: ignore[union-attr]


def test_unconvertible_extra_value_is_saved_as_none_naming_item_and_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    msg = llm.ChatMessage(
        id="item_bad", role="user", content=["x"], extra={"lock": object()}, created_at=1.0
    )
    data = item_to_data(msg)
    assert data["extra"] == {"lock": None}
    assert item_from_data(codec(data)).extra == {"lock": None}  # type: ignore[union-attr]
    assert "item 'item_bad' field 'extra'['lock']: saved None" in caplog.text


def test_lone_surrogate_in_any_text_is_replaced_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not valid Unicode, so no lossless form exists: U+FFFD, and the item still saves."""
    output = llm.FunctionCallOutput(
        id="item_out",
        call_id="c\ud800",
        name="read_file",
        output="caf\udce9 au lait",
        is_error=False,
        created_at=2.0,
    )
    call = llm.FunctionCall(
        id="item_call",
        call_id="c",
        name="read_file",
        arguments='{"path": "\udcff"}',
        created_at=1.0,
        extra={"k\ud800": ["v\udfff"]},
    )
    message = llm.ChatMessage(
        id="item_msg",
        role="assistant",
        content=["ok \ud83d\ude00 pair, lone \ud83d", DATA_URL],
        created_at=3.0,
    )
    ctx = llm.ChatContext([call, output, message])
    data = ctx_to_data(ctx)
    back = ctx_from_data(codec(data))  # msgpack refuses surrogates: this must not raise
    out = back.items[1]
    assert isinstance(out, llm.FunctionCallOutput)
    assert (out.output, out.call_id) == ("caf\ufffd au lait", "c\ufffd")
    fc = back.items[0]
    assert isinstance(fc, llm.FunctionCall)
    assert fc.arguments == '{"path": "\ufffd"}'
    assert fc.extra == {"k\ufffd": ["v\ufffd"]}
    msg = back.items[2]
    assert isinstance(msg, llm.ChatMessage)
    # a valid surrogate pair is joined into its character, a lone one replaced
    assert msg.content[0] == "ok \U0001f600 pair, lone \ufffd"
    assert "item 'item_out' field 'output'" in caplog.text
    assert "item 'item_msg' content[0]" in caplog.text
    assert "U+FFFD" in caplog.text


def test_big_int_in_item_extra_is_saved_as_its_decimal_string(
    caplog: pytest.LogCaptureFixture,
) -> None:
    msg = llm.ChatMessage(
        id="item_n",
        role="user",
        content=["x"],
        extra={"n": 2**70, "ok": 2**64 - 1, "neg": -(2**63)},
        created_at=1.0,
    )
    back = item_from_data(codec(item_to_data(msg)))
    assert back.extra == {"n": str(2**70), "ok": 2**64 - 1, "neg": -(2**63)}  # type: ignore[union-attr]
    assert "item 'item_n' field 'extra'['n']: saved its decimal string" in caplog.text


def test_cyclic_extra_value_still_saves(caplog: pytest.LogCaptureFixture) -> None:
    loop: list[Any] = []
    loop.append(loop)
    msg = llm.ChatMessage(
        id="item_loop", role="user", content=["x"], extra={"loop": loop}, created_at=1.0
    )
    data = item_to_data(msg)
    codec(data)
    assert "item 'item_loop' field 'extra'['loop']" in caplog.text
    assert "deeper than" in caplog.text


def test_metrics_keys_outside_metrics_report_are_kept() -> None:
    msg = llm.ChatMessage(id="item_m", role="assistant", content=["x"], created_at=1.0)
    msg.metrics["e2e_latency"] = 0.5
    msg.metrics["custom_metric"] = 3  # type: ignore[typeddict-unknown-key]
    restored = item_from_data(codec(item_to_data(msg)))
    assert isinstance(restored, llm.ChatMessage)
    assert dict(restored.metrics) == {"e2e_latency": 0.5, "custom_metric": 3}


# -- media policy ------------------------------------------------------------------------


def _image_message(image: str | rtc.VideoFrame, **kwargs: Any) -> llm.ChatMessage:
    return llm.ChatMessage(
        id="item_img",
        role="user",
        content=["look", llm.ImageContent(id="img_7", image=image, **kwargs)],
        created_at=5.0,
    )


def test_data_url_image_dropped_with_marker_by_default() -> None:
    msg = _image_message(DATA_URL, inference_detail="high", mime_type="image/png")
    data = item_to_data(msg)
    assert data["content"][1] == {
        "type": "dropped_media",
        "kind": "image",
        "id": "img_7",
        "source": "data_url",
        "inference_width": None,
        "inference_height": None,
        "inference_detail": "high",
        "mime_type": "image/png",
    }
    assert DATA_URL not in repr(data)
    restored = item_from_data(codec(data))
    assert isinstance(restored, llm.ChatMessage)
    assert restored.content == ["look", DROPPED_IMAGE_TEXT]


def test_data_url_image_kept_with_keep() -> None:
    msg = _image_message(DATA_URL, inference_width=10, inference_height=20, mime_type="image/png")
    data = item_to_data(msg, media="keep")
    assert data["content"][1]["image"] == DATA_URL
    restored = item_from_data(codec(data))
    assert isinstance(restored, llm.ChatMessage)
    assert restored.content == msg.content
    assert restored.model_dump() == msg.model_dump()
    assert llm.ChatContext([msg]).is_equivalent(llm.ChatContext([restored]))


@pytest.mark.parametrize("media", ["drop", "keep"])
def test_url_image_always_kept(media: Any) -> None:
    msg = _image_message("https://example.com/cat.jpg", inference_detail="low")
    restored = item_from_data(codec(item_to_data(msg, media=media)))
    assert isinstance(restored, llm.ChatMessage)
    image = restored.content[1]
    assert isinstance(image, llm.ImageContent)
    assert (image.id, image.image, image.inference_detail) == (
        "img_7",
        "https://example.com/cat.jpg",
        "low",
    )
    assert restored.model_dump() == msg.model_dump()


def _video_frame() -> rtc.VideoFrame:
    return rtc.VideoFrame(4, 2, rtc.VideoBufferType.RGBA, bytes(range(32)))


def test_video_frame_dropped_with_marker_by_default() -> None:
    data = item_to_data(_image_message(_video_frame(), inference_width=2, inference_height=1))
    assert data["content"][1]["type"] == "dropped_media"
    assert data["content"][1]["source"] == "video_frame"
    assert (data["content"][1]["inference_width"], data["content"][1]["inference_height"]) == (2, 1)
    assert_plain(data)
    restored = item_from_data(codec(data))
    assert restored.content == ["look", DROPPED_IMAGE_TEXT]  # type: ignore[union-attr]


def test_video_frame_kept_as_jpeg_data_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[images.EncodeOptions] = []

    def fake_encode(frame: rtc.VideoFrame, options: images.EncodeOptions) -> bytes:
        seen.append(options)
        return b"\xff\xd8JPEG"

    monkeypatch.setattr(images, "encode", fake_encode)
    msg = _image_message(_video_frame(), inference_width=2, inference_height=1)
    data = item_to_data(msg, media="keep")
    expected = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8JPEG").decode()
    assert data["content"][1]["image"] == expected
    assert seen[0].format == "JPEG"
    assert seen[0].resize_options is not None
    assert (seen[0].resize_options.width, seen[0].resize_options.height) == (2, 1)
    restored = item_from_data(codec(data))
    image = restored.content[1]  # type: ignore[union-attr]
    assert isinstance(image, llm.ImageContent)
    assert (image.id, image.image, image.inference_width) == ("img_7", expected, 2)


def test_video_frame_real_jpeg_encoding() -> None:
    pytest.importorskip("PIL")
    data = item_to_data(_image_message(_video_frame()), media="keep")
    url = data["content"][1]["image"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1])[:2] == b"\xff\xd8"


def test_video_frame_that_cannot_be_encoded_falls_back_to_marker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pillow(frame: rtc.VideoFrame, options: images.EncodeOptions) -> bytes:
        raise ImportError("no PIL")

    monkeypatch.setattr(images, "encode", no_pillow)
    data = item_to_data(_image_message(_video_frame()), media="keep")
    assert data["content"][1]["type"] == "dropped_media"
    assert data["content"][1]["kind"] == "image"


def _audio_message(transcript: str | None, frames: list[rtc.AudioFrame]) -> llm.ChatMessage:
    return llm.ChatMessage(
        id="item_aud",
        role="user",
        content=[llm.AudioContent(frame=frames, transcript=transcript), "after"],
        created_at=7.0,
    )


def test_audio_dropped_keeps_transcript() -> None:
    msg = _audio_message("book me for monday", [audio_frame(1), audio_frame(2)])
    data = item_to_data(msg)
    assert data["content"][0] == {
        "type": "dropped_media",
        "kind": "audio",
        "transcript": "book me for monday",
        "duration": pytest.approx(0.02),
    }
    assert not any(isinstance(v, bytes) for v in data["content"][0].values())
    restored = item_from_data(codec(data))
    assert isinstance(restored, llm.ChatMessage)
    assert restored.content == ["book me for monday", "after"]
    # provider formatters accept it: the transcript is now plain text
    messages, _ = llm.ChatContext([restored]).to_provider_format("openai")
    assert "book me for monday" in str(messages)


def test_dropped_audio_without_transcript_leaves_no_part() -> None:
    restored = item_from_data(codec(item_to_data(_audio_message(None, [audio_frame(3)]))))
    assert restored.content == ["after"]  # type: ignore[union-attr]


def test_audio_kept_roundtrips_frame_bytes_exactly() -> None:
    frames = [audio_frame(5), audio_frame(9, samples=80, rate=48000, channels=2)]
    frames[1].userdata["source"] = "mic"
    msg = _audio_message("hi", frames)
    data = item_to_data(msg, media="keep")
    assert_plain(data)
    restored = item_from_data(codec(data))
    assert isinstance(restored, llm.ChatMessage)
    audio = restored.content[0]
    assert isinstance(audio, llm.AudioContent)
    assert audio.transcript == "hi"
    assert len(audio.frame) == 2
    for before, after in zip(frames, audio.frame, strict=True):
        assert isinstance(after, rtc.AudioFrame)
        assert bytes(after.data) == bytes(before.data)
        assert (after.sample_rate, after.num_channels, after.samples_per_channel) == (
            before.sample_rate,
            before.num_channels,
            before.samples_per_channel,
        )
        assert after.userdata == before.userdata
    assert restored.content[1] == "after"


# -- tool-call repair --------------------------------------------------------------------


def _conversation() -> llm.ChatContext:
    return llm.ChatContext(
        [
            llm.ChatMessage(id="item_u", role="user", content=["book it"], created_at=1.0),
            llm.FunctionCall(
                id="item_c1", call_id="c1", name="book", arguments="{}", created_at=2.0
            ),
            llm.FunctionCall(
                id="item_c2", call_id="c2", name="pay", arguments='{"x":1}', created_at=2.0
            ),
            llm.FunctionCallOutput(
                id="item_o2",
                call_id="c2",
                name="pay",
                output="paid",
                is_error=False,
                created_at=3.0,
            ),
            llm.ChatMessage(id="item_a", role="assistant", content=["done"], created_at=4.0),
        ]
    )


def test_dangling_call_answered_once_right_after_it() -> None:
    ctx = _conversation()
    added = repair_tool_calls(ctx)
    assert [i.id for i in ctx.items] == [
        "item_u",
        "item_c1",
        "item_c1_interrupted",
        "item_c2",
        "item_o2",
        "item_a",
    ]
    assert len(added) == 1
    out = added[0]
    assert ctx.items[2] is out
    assert (out.call_id, out.name, out.is_error, out.output) == (
        "c1",
        "book",
        True,
        INTERRUPTED_OUTPUT,
    )
    assert out.output.startswith("interrupted:")
    # the next item shares the call's timestamp, so the output takes that same timestamp
    assert out.created_at == 2.0
    stamps = [i.created_at for i in ctx.items]
    assert stamps == sorted(stamps)

    # idempotent
    assert repair_tool_calls(ctx) == []
    assert len(ctx.items) == 6
    assert [i.call_id for i in ctx.items if isinstance(i, llm.FunctionCallOutput)] == ["c1", "c2"]


def test_duplicate_call_ids_answered_once() -> None:
    ctx = llm.ChatContext(
        [
            llm.FunctionCall(id="item_c", call_id="c", name="f", arguments="", created_at=1.0),
            llm.FunctionCall(id="item_d", call_id="c", name="f", arguments="", created_at=2.0),
        ]
    )
    added = repair_tool_calls(ctx)
    assert [o.id for o in added] == ["item_c_interrupted"]
    assert [i.id for i in ctx.items] == ["item_c", "item_c_interrupted", "item_d"]


def test_output_timestamp_just_after_call() -> None:
    ctx = llm.ChatContext(
        [
            llm.FunctionCall(id="item_c", call_id="c", name="f", arguments="", created_at=10.0),
            llm.ChatMessage(id="item_m", role="assistant", content=["x"], created_at=11.0),
        ]
    )
    (out,) = repair_tool_calls(ctx)
    assert out.created_at == math.nextafter(10.0, math.inf)
    assert [i.id for i in ctx.items] == ["item_c", "item_c_interrupted", "item_m"]
    # inserting the saved items by created_at (as a restore does) keeps the same order
    fresh = llm.ChatContext.empty()
    fresh.insert(list(ctx.items))
    assert [i.id for i in fresh.items] == [i.id for i in ctx.items]


def test_answered_calls_untouched() -> None:
    ctx = _conversation()
    before = ctx_to_data(ctx)
    repair_tool_calls(ctx)
    after = {d["id"]: d for d in ctx_to_data(ctx)}
    for item in before:
        assert after[item["id"]] == item
    assert sum(1 for i in ctx.items if getattr(i, "call_id", None) == "c2") == 2


def test_pending_running_calls_get_call_and_output() -> None:
    ctx = _conversation()
    repair_tool_calls(ctx)
    pending = [
        ToolCallRecord(
            call_id="c3",
            name="send_sms",
            arguments='{"to":"+1"}',
            started_at=3.5,
            item_id="item_c3",
        ),
        ToolCallRecord(call_id="c4", name="lookup", arguments="{}"),
        ToolCallRecord(call_id="c1", name="book", arguments="{}", status="unanswered"),
    ]
    added = repair_tool_calls(ctx, pending=pending, now=99.0)
    assert [o.call_id for o in added] == ["c3", "c4"]
    assert [i.id for i in ctx.items] == [
        "item_u",
        "item_c1",
        "item_c1_interrupted",
        "item_c2",
        "item_o2",
        "item_c3",
        "item_c3_interrupted",
        "item_a",
        "item_c4",
        "item_c4_interrupted",
    ]
    call3 = ctx.get_by_id("item_c3")
    assert isinstance(call3, llm.FunctionCall)
    assert (call3.call_id, call3.name, call3.arguments, call3.created_at) == (
        "c3",
        "send_sms",
        '{"to":"+1"}',
        3.5,
    )
    call4 = ctx.get_by_id("item_c4")
    assert isinstance(call4, llm.FunctionCall)
    assert (call4.name, call4.created_at) == ("lookup", 99.0)
    assert all(o.is_error and o.output == INTERRUPTED_OUTPUT for o in added)
    # c1 already had a call (and now an output): no duplicate
    assert sum(1 for i in ctx.items if getattr(i, "call_id", None) == "c1") == 2

    # idempotent, with the same pending records
    assert repair_tool_calls(ctx, pending=pending, now=100.0) == []
    assert len(ctx.items) == 10
    # the repaired context round-trips and every provider format accepts it
    restored = roundtrip(ctx)
    assert ctx.is_equivalent(restored)
    messages, _ = restored.to_provider_format("openai")
    tool_ids = [m["tool_call_id"] for m in messages if m.get("role") == "tool"]
    assert sorted(tool_ids) == ["c1", "c2", "c3", "c4"]


def _async_tool_conversation(*, finished: bool) -> llm.ChatContext:
    """The items LiveKit 1.8.9 writes for an async tool (see tests/test_async_tools.py)."""
    flag = {"__livekit_agents_tool_non_blocking": True}
    progress = "The tool `fetch` has updated, message: {}\nThe task is still running, ..."
    items: list[llm.ChatItem] = [
        llm.ChatMessage(id="item_u", role="user", content=["get it"], created_at=1.0),
        llm.FunctionCall(
            id="item_c/fnc_0",
            call_id="r",
            name="fetch",
            arguments="{}",
            extra=flag,
            created_at=2.0,
        ),
        llm.FunctionCall(
            id="item_c1",
            call_id="r_update_1",
            name="fetch",
            arguments="{}",
            extra=flag,
            created_at=2.1,
        ),
        llm.FunctionCallOutput(
            id="item_o1",
            call_id="r_update_1",
            name="fetch",
            output=progress.format("half"),
            is_error=False,
            created_at=2.2,
        ),
        llm.FunctionCallOutput(
            id="item_o0",
            call_id="r",
            name="fetch",
            output=progress.format("started"),
            is_error=False,
            created_at=2.3,
        ),
        llm.ChatMessage(id="item_a", role="assistant", content=["on it"], created_at=3.0),
    ]
    if finished:
        items += [
            llm.FunctionCall(
                id="item_cf",
                call_id="r_final",
                name="fetch",
                arguments="{}",
                extra=flag,
                created_at=4.0,
            ),
            llm.FunctionCallOutput(
                id="item_of",
                call_id="r_final",
                name="fetch",
                output="found",
                is_error=False,
                created_at=4.1,
            ),
        ]
    return llm.ChatContext(items)


def test_call_with_only_progress_outputs_is_answered_as_interrupted() -> None:
    ctx = _async_tool_conversation(finished=False)
    running = [ToolCallRecord(call_id="r", name="fetch", started_at=2.0, item_id="item_c/fnc_0")]
    added = repair_tool_calls(ctx, pending=running)
    assert [(o.call_id, o.output, o.is_error, o.reply_required) for o in added] == [
        ("r_final", INTERRUPTED_OUTPUT, True, False)
    ]
    # answered the way LiveKit answers an async tool: a `_final` pair, after what the
    # model was told while the tool ran
    assert [i.id for i in ctx.items] == [
        "item_u",
        "item_c/fnc_0",
        "item_c1",
        "item_o1",
        "item_o0",
        "item_a",
        "item_c/fnc_0_interrupted_call",
        "item_c/fnc_0_interrupted",
    ]
    call = ctx.items[-2]
    assert isinstance(call, llm.FunctionCall)
    assert (call.call_id, call.name, call.arguments) == ("r_final", "fetch", "{}")
    stamps = [i.created_at for i in ctx.items]
    assert stamps == sorted(stamps)
    # idempotent, and every provider sees each call answered exactly once
    assert repair_tool_calls(ctx, pending=running) == []
    restored = roundtrip(ctx)
    assert ctx.is_equivalent(restored)
    messages, _ = restored.to_provider_format("openai")
    tool_ids = [m["tool_call_id"] for m in messages if m.get("role") == "tool"]
    assert sorted(tool_ids) == ["r", "r_final", "r_update_1"]


def test_async_call_with_its_final_output_is_left_alone() -> None:
    ctx = _async_tool_conversation(finished=True)
    before = [i.id for i in ctx.items]
    assert repair_tool_calls(ctx) == []
    assert [i.id for i in ctx.items] == before


# -- bad data ----------------------------------------------------------------------------


def _good() -> dict[str, Any]:
    return item_to_data(llm.ChatMessage(id="item_ok", role="user", content=["x"], created_at=1.0))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(type="telepathy"), "unknown item type 'telepathy'"),
        (lambda d: d.pop("type"), "unknown item type None"),
        (lambda d: d.update(created_at="yesterday"), "created_at"),
        (lambda d: d.update(role="robot"), "role"),
        (lambda d: d.update(interrupted="yes"), "interrupted"),
        (lambda d: d.update(interrupted=1), "interrupted"),
        (lambda d: d.update(content="x"), "'content' is not a list"),
        (lambda d: d.update(content=[42]), "content part is a int"),
        (lambda d: d.update(content=[{"type": "hologram"}]), "unknown type 'hologram'"),
        (lambda d: d.update(content=[{"type": "image_content"}]), "missing field"),
        (
            lambda d: d.update(content=[{"type": "dropped_media", "kind": "smell"}]),
            "unknown kind 'smell'",
        ),
        (lambda d: d.update(extra=["not", "a", "dict"]), "extra"),
        (lambda d: d.pop("created_at"), "missing field(s) created_at"),
        (lambda d: d.update(surprise=1), "unknown field(s) surprise"),
    ],
)
def test_bad_item_raises_snapshot_corrupt_naming_the_item(mutate: Any, needle: str) -> None:
    data = _good()
    mutate(data)
    with pytest.raises(SnapshotCorrupt) as info:
        item_from_data(data)
    assert "'item_ok'" in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize("bad_id", [None, 7, b"item"])
def test_missing_or_bad_id_raises(bad_id: Any) -> None:
    data = _good()
    if bad_id is None:
        del data["id"]
    else:
        data["id"] = bad_id
    with pytest.raises(SnapshotCorrupt, match="missing or non-string 'id'"):
        item_from_data(data)


def test_wrong_field_types_on_other_items() -> None:
    call = item_to_data(
        llm.FunctionCall(id="item_f", call_id="c", name="f", arguments="{}", created_at=1.0)
    )
    call["arguments"] = {"not": "a string"}
    with pytest.raises(SnapshotCorrupt, match=r"'item_f'.*arguments"):
        item_from_data(call)
    output = item_to_data(
        llm.FunctionCallOutput(id="item_g", call_id="c", output="o", is_error=False, created_at=1.0)
    )
    output["is_error"] = "false"
    with pytest.raises(SnapshotCorrupt, match=r"'item_g'.*is_error"):
        item_from_data(output)


def test_bad_audio_frame_raises() -> None:
    data = item_to_data(_audio_message("t", [audio_frame(1)]), media="keep")
    data["content"][0]["frame"][0]["data"] = b"\x00\x01"  # far too short for 160 samples
    with pytest.raises(SnapshotCorrupt, match=r"'item_aud'.*audio frame"):
        item_from_data(data)


@pytest.mark.parametrize("bad", ["text", 3, None, ["list"]])
def test_non_mapping_item_raises(bad: Any) -> None:
    with pytest.raises(SnapshotCorrupt, match="not a mapping"):
        item_from_data(bad)


def test_non_list_items_raise() -> None:
    with pytest.raises(SnapshotCorrupt, match="not a list"):
        ctx_from_data({"items": []})  # type: ignore[arg-type]


# -- through the whole snapshot path: Snapshot -> frames -> Snapshot -> ChatContext ---------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ctx=chat_contexts(), signed=st.booleans(), parts=st.booleans())
def test_snapshot_bytes_roundtrip_restores_an_equivalent_context(
    ctx: llm.ChatContext, signed: bool, parts: bool
) -> None:
    from livekit_resume.snapshot.codec import Codec
    from livekit_resume.snapshot.model import AgentFrame, Snapshot

    # LiveKit gives every item a unique id; the store keys the items of a stream by it
    assume(not parts or len({i.id for i in ctx.items}) == len(ctx.items))
    codec = Codec(signing_keys="k:" + base64.b64encode(b"s" * 32).decode() if signed else None)
    items = ctx_to_data(ctx)
    snap = Snapshot(
        key="room-p", history=items, agent=AgentFrame(agent_id="a", chat_ctx=items[-3:])
    )
    if parts:
        streams = {
            "history": [(i["id"], codec.encode_item("room-p", "history", i)) for i in items],
            "agent": [
                (i["id"], codec.encode_item("room-p", "agent", i, ref=True)) for i in items[-3:]
            ],
        }
        back = codec.decode_parts("room-p", codec.encode_head(snap), streams)
    else:
        back = codec.decode(codec.encode(snap))
    assert back == snap
    restored = ctx_from_data(back.history)
    assert ctx.is_equivalent(restored)
    for before, after in zip(ctx.items, restored.items, strict=True):
        assert (after.id, after.type, after.created_at) == (
            before.id,
            before.type,
            before.created_at,
        )
        assert getattr(after, "role", None) == getattr(before, "role", None)
        assert getattr(after, "extra", None) == getattr(before, "extra", None)
        assert after.model_dump() == before.model_dump()


def test_a_message_saved_with_metrics_a_restore_refuses_restores_without_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Saved before the checkpoint made its metrics restorable: LiveKit assigns a voice
    message's ``metrics`` unvalidated, and an STT that names no provider left a None
    where `MetricsReport` declares text. Every restore of the session refused it."""
    data = item_to_data(llm.ChatMessage(role="user", content=["hello"]))
    data["metrics"] = {
        "stt_metadata": {"model_name": "nova", "model_provider": None},
        "e2e_latency": None,
        "custom": [None],
    }
    with caplog.at_level(logging.WARNING, logger="livekit_resume"):
        item = item_from_data(data)
    assert isinstance(item, llm.ChatMessage) and item.text_content == "hello"
    assert item.metrics == {"stt_metadata": {"model_name": "nova"}, "custom": [None]}
    assert "stt_metadata" in caplog.text and "e2e_latency" in caplog.text
    data["metrics"] = "not a map"
    with pytest.raises(SnapshotCorrupt):
        item_from_data(data)


def test_a_config_update_a_restore_would_refuse_is_saved_as_one_it_takes() -> None:
    """Assigned without validation: tool names that are not all names, an id that is
    not text. Saved as they were, every restore refused the session."""
    update = llm.AgentConfigUpdate(instructions="x").model_copy(
        update={"tools_added": ["lookup", None, "book"], "id": 5}
    )
    data = item_to_data(update)
    item = item_from_data(data)
    assert isinstance(item, llm.AgentConfigUpdate)
    assert (item.id, item.tools_added, item.instructions) == ("5", ["lookup", "book"], "x")


def test_data_kept_with_media_then_without_it_is_what_drop_reads() -> None:
    """An oversized item's first stand-in under media="keep" is its data as read, media
    dropped (never the live item read again: it may have changed since the read): the
    same data media="drop" reads of it. A URL image and the text stay."""
    msg = llm.ChatMessage(
        id="item_mixed",
        role="user",
        content=[
            "look",
            llm.ImageContent(id="img_1", image=DATA_URL, inference_detail="high"),
            llm.ImageContent(id="img_2", image="https://example.com/a.png"),
            llm.AudioContent(frame=[audio_frame(1), audio_frame(2, samples=480)], transcript="hi"),
        ],
        created_at=5.0,
    )
    kept = item_to_data(msg, media="keep")
    assert without_media(kept) == item_to_data(msg, media="drop")
    assert kept == item_to_data(msg, media="keep")  # the data read is not changed
