"""Hostile bytes and files on the decode side: every one raises a typed error of
`livekit_resume.errors` (never a bare AttributeError, TypeError ...), and nothing
tampered is accepted. Each test here failed before the fix it comes with."""

from __future__ import annotations

import base64
import contextlib
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livekit_resume.errors import ResumeError, SnapshotCorrupt
from livekit_resume.snapshot.codec import AGENT, HISTORY, Codec
from livekit_resume.snapshot.migrate import migrate_head
from livekit_resume.snapshot.model import Snapshot, ToolCallRecord

ENCRYPT = "e1:" + base64.b64encode(b"e" * 32).decode()

# -- an old-format head whose agent is not a map -------------------------------------------

_NOT_MAPS: list[Any] = [[1], "x", 7, True, b"x"]


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("agent", _NOT_MAPS)
def test_an_old_head_whose_agent_is_not_a_map_is_corrupt(version: int, agent: Any) -> None:
    codec = Codec()
    whole = codec.pack({"key": "k", "agent": agent}, version=version)
    with pytest.raises(SnapshotCorrupt):
        codec.decode(whole)
    head = codec.pack({"key": "k", "agent": agent}, version=version)
    with pytest.raises(SnapshotCorrupt):
        codec.decode_parts("k", head, {HISTORY: [], AGENT: []})
    migrate_head({"key": "k", "agent": agent}, version)  # left to the model to refuse


# -- an export whose item frame names a stream that is not a string -------------------------


@pytest.mark.parametrize("stream", [[1], {"a": 1}, ["history"]])
def test_an_export_item_naming_an_unhashable_stream_is_corrupt(stream: Any) -> None:
    codec = Codec()
    frames = [
        codec.pack({"key": "k", "lkrs_export": {"id": "a", "items": 1}}),
        codec.pack({"n": 0, "stream": stream, "item": {}}, context=b"export\x00a\x000"),
    ]
    with pytest.raises(SnapshotCorrupt):
        codec.decode_export(frames)


# -- store URLs in messages: no part of a password or secret parameter is shown ------------


@pytest.mark.parametrize(
    ("given", "secret"),
    [
        # a password with a character the URL syntax reads as the end of the host part
        # (generated passwords hold them, unencoded, often)
        ("redis://:pa/ss9word@host:6379/0", "ss9word"),
        ("redis://:pa/ss9word@host:6379/0", "pa"),
        ("redis://:abc#def9word@host/0", "def9word"),
        ("redis://:abc?def9word@host/0", "def9word"),
        ("redis://user:p@ss/w0rd@host/0", "w0rd"),
        ("foo://:pw/s3cr3t@host", "s3cr3t"),
        # a secret query parameter written percent-encoded or with a plus
        ("redis://host/0?password=se%2Fcr3t", "se%2Fcr3t"),
        ("redis://host/0?password=se+cr3t", "se+cr3t"),
        ("redis://host/0?auth%5Ftoken=s3cr3t", "s3cr3t"),
        ("redis+sentinel://:pw@h1:1,h2:2/m?sentinel_password=sec%2Fr3t", "sec%2Fr3t"),
    ],
)
def test_a_url_is_shown_without_any_part_of_its_secrets(given: str, secret: str) -> None:
    from livekit_resume import redact

    shown = redact.url(given)
    assert secret not in shown, shown
    assert redact.HIDDEN in shown


@pytest.mark.parametrize(
    "given",
    [
        "sqlite:////home/a@b/resume.db",
        "sqlite:///resume.db",
        "memory://",
        "redis://127.0.0.1:6379/0",
        "redis+cluster://h1:1,h2:2",
    ],
)
def test_a_url_without_secrets_is_shown_as_it_is(given: str) -> None:
    from livekit_resume import redact

    assert redact.url(given) == given


@pytest.mark.parametrize(
    "given",
    [
        "default:s3cr3tpw@redis:6379",  # the scheme forgotten: "default" reads as one
        "redis:s3cr3tpw@redis:6379/0",
        "redis:/:s3cr3tpw@host",
        ":s3cr3tpw@redis:6379",
        "//:s3cr3tpw@redis:6379",
    ],
)
def test_a_url_without_its_scheme_slashes_is_shown_without_its_password(given: str) -> None:
    import livekit_resume as lr
    from livekit_resume import redact

    assert "s3cr3tpw" not in redact.url(given)
    with pytest.raises(ValueError) as info:
        lr.open_store(given)
    assert "s3cr3tpw" not in str(info.value)


def test_an_open_store_error_never_shows_a_password_holding_a_slash() -> None:
    import livekit_resume as lr

    for url in ("redis://:pa/ss9word@host:6379/0", "redis://:abc#def9word@host/0"):
        with pytest.raises(ValueError) as info:
            lr.open_store(url)
        assert "9word" not in str(info.value)


# -- encryption only: the header is outside the AES-GCM tag --------------------------------


def _relabel(frame: bytes, version: int) -> bytes:
    """``frame`` (CRC-framed: encrypted, not signed) with another format version in its
    header, the CRC made again: what a writer of the store without the key can do."""
    header_body = bytearray(frame[:-4])
    header_body[4] = version
    return bytes(header_body) + struct.pack(">I", zlib.crc32(bytes(header_body)))


def test_an_encrypted_format_2_head_relabelled_format_1_does_not_lose_its_tool_calls() -> None:
    # Format 1 and 2 frames bind the same context, and with encryption alone the header
    # is covered by a CRC only: a format 2 head relabelled as format 1 decrypts, and the
    # 1 -> 2 upcast would replace its tool calls by the (absent) pending_tools: the calls
    # in flight silently vanish from the restore.
    codec = Codec(encryption_keys=ENCRYPT)
    snap = Snapshot(key="k", tool_calls=[ToolCallRecord(call_id="c1", name="pay")])
    head = snap.model_dump(mode="python")
    head["counts"] = {HISTORY: 0, AGENT: 0}
    frame = codec.pack(head, version=2, context=b"k")
    assert codec.decode_parts("k", frame, {}).tool_calls == snap.tool_calls
    with pytest.raises(SnapshotCorrupt):
        codec.decode_parts("k", _relabel(frame, 1), {})
    whole = codec.pack(snap.model_dump(mode="python"), version=2)
    assert codec.decode(whole).tool_calls == snap.tool_calls
    with pytest.raises(SnapshotCorrupt):
        codec.decode(_relabel(whole, 1))


def test_a_format_1_head_with_format_2_tool_calls_is_corrupt() -> None:
    with pytest.raises(SnapshotCorrupt):
        migrate_head({"key": "k", "tool_calls": [], "pending_tools": []}, 1)
    upcast = migrate_head({"key": "k", "pending_tools": [{"call_id": "c", "name": "f"}]}, 1)
    assert upcast["tool_calls"][0]["status"] == "unanswered"


# -- a property: plain data of any shape, framed in any readable format, decodes to a
# snapshot or a typed error -------------------------------------------------------------

_WORDS = [
    "key", "version", "agent", "agent_id", "chat_ctx", "history", "meta", "extra",
    "tool_calls", "pending_tools", "call_id", "name", "counts", "bound", "seals", "kid",
    "id", "type", "content", "role", "created_at", "timestamp", "metrics", "lkrs_export",
    "items", "n", "stream", "item", "ref", "message", "user", "k",
]  # fmt: skip
_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(_WORDS)
    | st.binary(max_size=33),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_WORDS), inner, max_size=4)
    ),
    max_leaves=12,
)
_HEADS = st.dictionaries(st.sampled_from(_WORDS), _PLAIN, max_size=6).map(
    lambda d: {"key": "k", **d}
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(head=_HEADS, part=_PLAIN, version=st.integers(1, 4))
def test_any_plain_data_in_any_format_decodes_or_raises_a_typed_error(
    head: dict[str, Any], part: Any, version: int
) -> None:
    codec = Codec()
    attempts: list[Callable[[], object]] = [
        lambda: codec.decode(codec.pack(head, version=version)),
        lambda: codec.decode_parts(
            "k",
            codec.pack(head, version=version),
            {HISTORY: [("item_1", codec.pack(part, version=version))]},
        ),
        lambda: codec.decode_export(
            [
                codec.pack({"key": "k", "lkrs_export": {"id": "a", "items": 1}}),
                codec.pack(part, context=b"export\x00a\x000", version=version),
            ]
        ),
        lambda: codec.decode_export(
            [
                codec.pack({**head, "lkrs_export": {"id": "a", "items": 1}}, version=version),
                codec.pack({"n": 0, "stream": part, "item": {}}, context=b"export\x00a\x000"),
            ]
        ),
    ]
    for attempt in attempts:
        with contextlib.suppress(ResumeError):
            attempt()


# -- validation errors name the field, never its value --------------------------------------


def test_a_head_that_does_not_validate_is_refused_without_showing_its_values() -> None:
    """The values are the conversation's own data (decrypted, when the store encrypts),
    and the error is logged."""
    codec = Codec()
    frame = codec.pack({"key": "k", "state": "card 4111-1111-1111-1111"})
    with pytest.raises(SnapshotCorrupt, match="state") as refused:
        codec.decode(frame)
    assert "4111" not in str(refused.value)
