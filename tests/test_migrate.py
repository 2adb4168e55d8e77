"""Snapshot evolution: a new format version that adds a head field needs a head upcaster
and nothing else; frames written at the older version, chat items included, still load.

The scratch version 3 below is what docs/contributing.md walks through: a model field,
``FORMAT_VERSION`` bumped, one head upcaster, and old frames read back.
"""

from __future__ import annotations

from typing import Any

import pytest

from livekit_resume.snapshot import codec as codec_module
from livekit_resume.snapshot import migrate
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import (
    FORMAT_VERSION,
    AgentFrame,
    SessionMeta,
    Snapshot,
)

OLD = FORMAT_VERSION
NEW = FORMAT_VERSION + 1
KEY = "room-42"


class ScratchSnapshot(Snapshot):
    """The model of the scratch version: one field more, and no default for it, so an
    old head loads only through the upcaster."""

    mood: str


def _head_to_new(data: dict[str, Any]) -> dict[str, Any]:
    data["mood"] = "calm"
    return data


def _snapshot() -> Snapshot:
    items = [
        {
            "type": "message",
            "id": f"m{i}",
            "role": "user",
            "content": [f"turn {i}"],
            "created_at": 1_700_000_000.0 + i,
        }
        for i in range(4)
    ]
    return Snapshot(
        key=KEY,
        epoch=2,
        meta=SessionMeta(room=KEY, turn_count=4),
        history=items,
        agent=AgentFrame(agent_id="receptionist", chat_ctx=items[-2:]),
        userdata={"name": "Ada"},
    )


def _old_frames(codec: Codec, snap: Snapshot) -> dict[str, Any]:
    """Every way a snapshot is stored, written by this (the old) version."""
    refs = {i["id"] for i in snap.history}
    assert snap.agent is not None
    return {
        "whole": codec.encode(snap),
        "head": codec.encode_head(snap),
        "history": [(i["id"], codec.encode_item(KEY, "history", i)) for i in snap.history],
        "agent": [
            (i["id"], codec.encode_item(KEY, "agent", i, ref=i["id"] in refs))
            for i in snap.agent.chat_ctx
        ],
    }


@pytest.fixture
def scratch_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Version ``NEW`` in place: the model, the version readers accept, a head upcaster.
    No item upcaster is registered: items did not change."""
    monkeypatch.setattr(codec_module, "Snapshot", ScratchSnapshot)
    monkeypatch.setattr(codec_module, "FORMAT_VERSION", NEW)
    monkeypatch.setattr(migrate, "FORMAT_VERSION", NEW)
    monkeypatch.setitem(migrate._HEAD, OLD, _head_to_new)


@pytest.mark.usefixtures("scratch_version")
@pytest.mark.parametrize("codec", [Codec(), Codec(signing_keys="k1:" + "QUFB" * 11)])
def test_old_frames_load_with_only_a_head_upcaster(codec: Codec) -> None:
    snap = _snapshot()
    frames = _old_frames(codec, snap)  # a frame's version is the one its writer knew
    assert all(f[4] == OLD for f in [frames["whole"], frames["head"]])

    expected = ScratchSnapshot(**{**snap.model_dump(), "format_version": NEW, "mood": "calm"})
    assert codec.decode(frames["whole"]) == expected
    streams = {"history": frames["history"], "agent": frames["agent"]}
    loaded = codec.decode_parts(KEY, frames["head"], streams, version=7)
    assert loaded == expected.model_copy(update={"version": 7})
    assert loaded.history == snap.history and loaded.agent is not None
    assert loaded.agent.chat_ctx == snap.history[-2:]


@pytest.mark.usefixtures("scratch_version")
def test_an_old_head_fails_to_load_without_its_upcaster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The field has no default: without the upcaster the old head is not the new model
    (the check that the test above really exercises the upcaster)."""
    from livekit_resume.errors import SnapshotCorrupt

    frame = Codec().encode(_snapshot())
    monkeypatch.delitem(migrate._HEAD, OLD)
    with pytest.raises(SnapshotCorrupt, match="mood"):
        Codec().decode(frame)


def test_a_missing_upcaster_passes_the_data_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "FORMAT_VERSION", NEW)
    item = {"type": "message", "id": "m1", "created_at": 1.0}
    assert migrate.migrate_item(dict(item), OLD) == item
    head = migrate.migrate_head({"key": KEY, "format_version": OLD, "history": [item]}, OLD)
    assert head == {"key": KEY, "format_version": NEW, "history": [item]}
