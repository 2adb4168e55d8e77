"""Hostile bytes and files on the decode side: every one raises a typed error of
`livekit_resume.errors` (never a bare AttributeError, TypeError ...), and nothing
tampered is accepted. Each test here failed before the fix it comes with."""

from __future__ import annotations

from typing import Any

import pytest

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot.codec import AGENT, HISTORY, Codec
from livekit_resume.snapshot.migrate import migrate_head

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


def test_an_open_store_error_never_shows_a_password_holding_a_slash() -> None:
    import livekit_resume as lr

    for url in ("redis://:pa/ss9word@host:6379/0", "redis://:abc#def9word@host/0"):
        with pytest.raises(ValueError) as info:
            lr.open_store(url)
        assert "9word" not in str(info.value)
