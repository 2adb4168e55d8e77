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
