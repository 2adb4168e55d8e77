"""Salvage: one damaged item record no longer makes a whole conversation unreadable.

Unit tests run `salvage_parts` on frames made by the codec; the store tests flip one bit
of an early item record in a real SQLite file (UPDATE of the log row) and in a real
redis-server (LSET of the log record), then run ``livekit-resume repair``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from livekit.agents import llm

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot.chat import ctx_from_data, item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import AgentFrame, ItemData, Snapshot
from livekit_resume.snapshot.salvage import Damage, salvage_parts
from livekit_resume.stores.url import open_store
from tests.redis_log import join_log, split_log
from tests.test_cli import _converse, key, run, run_json, snapshot_of, url

__all__ = ["key", "url"]  # fixtures shared with test_cli

KEY = "room-s"


def _items(n: int) -> list[ItemData]:
    return [
        item_to_data(
            llm.ChatMessage(
                id=f"item_{i}",
                role="user" if i % 2 else "assistant",
                content=[f"line {i}"],
                created_at=1_700_000_000.0 + i,
            )
        )
        for i in range(n)
    ]


def _parts(
    codec: Codec, n: int = 6, agent_refs: tuple[int, ...] = (0, 1, 5)
) -> tuple[Snapshot, bytes, dict[str, list[tuple[str, bytes]]]]:
    items = _items(n)
    refs = [items[i] for i in agent_refs]
    snap = Snapshot(key=KEY, history=items, agent=AgentFrame(agent_id="a", chat_ctx=refs))
    streams = {
        "history": [(i["id"], codec.encode_item(KEY, "history", i)) for i in items],
        "agent": [(i["id"], codec.encode_item(KEY, "agent", i, ref=True)) for i in refs],
    }
    return snap, codec.encode_head(snap), streams


def _flip(frame: bytes, at: int | None = None) -> bytes:
    out = bytearray(frame)
    out[len(out) // 2 if at is None else at] ^= 0x10
    return bytes(out)


@pytest.mark.parametrize("signed", [False, True])
def test_one_flipped_bit_loses_one_item_and_a_note_takes_its_place(signed: bool) -> None:
    codec = Codec(signing_keys="k:" + "a" * 44) if signed else Codec()
    snap, head, streams = _parts(codec)
    streams["history"][1] = ("item_1", _flip(streams["history"][1][1]))
    with pytest.raises(SnapshotCorrupt):
        codec.decode_parts(KEY, head, streams)

    got, damage = salvage_parts(codec, KEY, head, streams, version=7)
    assert [(d.stream, d.item_id) for d in damage] == [("history", "item_1"), ("agent", "item_1")]
    assert got.version == 7
    ids = [i["id"] for i in got.history]
    assert ids == ["item_0", "lkresume_salvage_item_1", "item_2", "item_3", "item_4", "item_5"]
    note = got.history[1]
    assert note["role"] == "system" and "1 item" in note["content"][0]
    assert got.history[0]["created_at"] < note["created_at"] < got.history[2]["created_at"]
    assert [i for i in got.history if i["id"] != note["id"]] == [
        i for i in snap.history if i["id"] != "item_1"
    ]
    # the agent's reference to the lost item goes with it, marked in its context too
    assert got.agent is not None
    assert [i["id"] for i in got.agent.chat_ctx] == [
        "item_0",
        "lkresume_salvage_item_1",
        "item_5",
    ]
    # what comes back is restorable by LiveKit as it is
    assert len(ctx_from_data(got.history).items) == 6


def test_a_run_of_damaged_items_gets_one_note_and_each_item_is_reported() -> None:
    codec = Codec()
    _snap, head, streams = _parts(codec, agent_refs=())
    for n in (2, 3, 4):
        streams["history"][n] = (f"item_{n}", _flip(streams["history"][n][1]))
    got, damage = salvage_parts(codec, KEY, head, streams, version=1)
    assert [d.item_id for d in damage] == ["item_2", "item_3", "item_4"]
    assert [i["id"] for i in got.history] == [
        "item_0",
        "item_1",
        "lkresume_salvage_item_2",
        "item_5",
    ]
    assert "3 items" in got.history[2]["content"][0]


def test_a_damaged_first_item_gets_a_note_just_before_the_next() -> None:
    codec = Codec()
    _snap, head, streams = _parts(codec, agent_refs=())
    streams["history"][0] = ("item_0", _flip(streams["history"][0][1]))
    got, _ = salvage_parts(codec, KEY, head, streams, version=1)
    assert got.history[0]["id"] == "lkresume_salvage_item_0"
    assert got.history[0]["created_at"] == math.nextafter(got.history[1]["created_at"], 0)


def test_a_damaged_head_is_taken_from_an_older_version_and_reported() -> None:
    codec = Codec()
    snap, head, streams = _parts(codec)
    older = codec.encode_head(snap.model_copy(update={"userdata": {"old": True}}))
    bad = _flip(head)
    with pytest.raises(SnapshotCorrupt, match="no snapshot head decodes"):
        salvage_parts(codec, KEY, bad, streams, version=9)
    got, damage = salvage_parts(
        codec, KEY, bad, streams, version=9, fallback_heads=[(8, _flip(older)), (7, older)]
    )
    assert got.userdata == {"old": True} and got.version == 9
    assert got.history == snap.history
    assert len(damage) == 1 and damage[0].stream == "head" and "version 7" in damage[0].reason


def test_counts_mismatch_and_duplicate_ids_are_reported_not_raised() -> None:
    codec = Codec()
    _snap, head, streams = _parts(codec, agent_refs=())
    streams["history"].append(streams["history"][2])
    got, damage = salvage_parts(codec, KEY, head, streams, version=1)
    assert (
        Damage("history", "item_2", "the stream holds this id twice; the later one was dropped")
        in damage
    )
    assert any(d.item_id == "" and "lists 6 items" in d.reason for d in damage)
    assert [i["id"] for i in got.history][:6] == [f"item_{n}" for n in range(6)]


def test_an_intact_version_salvages_to_itself_with_no_damage() -> None:
    codec = Codec()
    _snap, head, streams = _parts(codec)
    got, damage = salvage_parts(codec, KEY, head, streams, version=3)
    assert damage == []
    assert got == codec.decode_parts(KEY, head, streams, version=3)


# ------------------------------------------------------- real stores and the CLI


def _flip_first_history_record(url: str, key: str) -> str:
    """Flip one bit in the middle of the first history item's frame, in place in the
    store; return that item's id."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            seq, item_id, data = conn.execute(
                "SELECT seq, item_id, data FROM log WHERE key=? AND stream='history' "
                "AND data IS NOT NULL ORDER BY gen, seq LIMIT 1",
                (key,),
            ).fetchone()
            conn.execute(
                "UPDATE log SET data=? WHERE key=? AND seq=? AND stream='history'",
                (_flip(data), key, seq),
            )
        return str(item_id)
    import redis

    client = redis.Redis.from_url(url)
    try:
        (log_key,) = client.keys(f"{os.environ['RESUME_NAMESPACE']}:{{{key}}}:log:*")
        elements = split_log(cast("list[bytes]", client.lrange(log_key, 0, -1)), key)
        for records in elements:
            for n, rec in enumerate(records):
                if rec.stream == "history" and rec.data is not None:
                    records[n] = replace(rec, data=_flip(rec.data))
                    client.delete(log_key)
                    client.rpush(log_key, *join_log(elements))
                    return rec.id
    finally:
        client.close()
    raise AssertionError("no history record found")


def _versions(url: str, key: str) -> list[int]:
    async def go() -> list[int]:
        store = open_store(url)
        try:
            return [v.version for v in await store.versions(key)]
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_repair_recovers_every_intact_item_after_one_flipped_bit(url: str, key: str) -> None:
    original = snapshot_of(url, key)
    lost = _flip_first_history_record(url, key)
    versions = _versions(url, key)
    assert len(versions) == 3
    for v in versions:  # one damaged record: every retained version is unreadable
        shown = run(url, "show", key, "--version", str(v))
        assert shown.exit_code == 1 and "SnapshotCorrupt" in shown.stderr

    dry = run_json(url, "repair", key, "--dry-run")
    assert [(d["stream"], d["item_id"]) for d in dry["damage"]] == [("history", lost)]
    assert dry["written"] is None and _versions(url, key) == versions

    result = run(url, "repair", key)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2  # the one lost item, then the summary
    assert lines[0].startswith(f"lost history item '{lost}': frame checksum does not match")
    assert "1 item(s) lost" in lines[-1]
    assert f"written whole as version {versions[-1] + 1}" in lines[-1]

    after = snapshot_of(url, key)  # a plain load decodes again
    assert _versions(url, key)[-1] == versions[-1] + 1
    kept = [i for i in after.history if not i["id"].startswith("lkresume_salvage_")]
    assert kept == [i for i in original.history if i["id"] != lost]
    assert after.userdata == original.userdata
    assert run(url, "show", key).exit_code == 0

    again = run_json(url, "repair", key)
    assert again["damage"] == [] and again["written"] is None


def test_repair_needs_takeover_while_a_worker_holds_the_session(url: str, key: str) -> None:
    _flip_first_history_record(url, key)

    async def hold() -> None:
        store = open_store(url)
        try:
            await store.acquire(key, "live-worker", ttl=60)
        finally:
            await store.aclose()

    asyncio.run(hold())
    busy = run(url, "repair", key)
    assert busy.exit_code == 1 and "SessionBusy" in busy.stderr and "--takeover" in busy.stderr
    taken = run(url, "--json", "repair", key, "--takeover")
    assert taken.exit_code == 0, taken.output
    assert json.loads(taken.stdout)["written"] == 4


def test_repair_of_an_unknown_session_is_a_typed_error(url: str, key: str) -> None:
    result = run(url, "repair", "no-such-room")
    assert result.exit_code == 1 and "SnapshotNotFound" in result.stderr


def test_repair_takes_a_damaged_head_from_the_newest_older_version(tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/heads.db"
    name = "room-head"
    asyncio.run(_converse(sqlite_url, name, ["remember the blue door", "remember 4711"]))
    original = snapshot_of(sqlite_url, name)
    with sqlite3.connect(tmp_path / "heads.db") as conn:
        (head,) = conn.execute(
            "SELECT head FROM versions WHERE key=? AND version=3", (name,)
        ).fetchone()
        conn.execute("UPDATE versions SET head=? WHERE key=? AND version=3", (_flip(head), name))
    assert run(sqlite_url, "show", name).exit_code == 1
    assert run(sqlite_url, "show", name, "--version", "2").exit_code == 0  # only v3 is hit

    report = run_json(sqlite_url, "repair", name)
    assert [(d["stream"], d["item_id"]) for d in report["damage"]] == [("head", "")]
    assert "version 2" in report["damage"][0]["reason"]
    repaired = snapshot_of(sqlite_url, name)
    assert repaired.history == original.history  # every item intact
    assert repaired.state == "active"  # version 2's state: the suspend record was lost


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h: h.append(dict(h[1])), id="duplicate-id"),
        pytest.param(lambda h: h[1].pop("id"), id="missing-id"),
        pytest.param(lambda h: h[1].update(id=7), id="non-string-id"),
    ],
)
def test_a_whole_snapshot_with_bad_item_ids_is_not_restorable(mutate: Any) -> None:
    from livekit_resume.snapshot.salvage import validate_restorable

    history = _items(3)
    mutate(history)
    snap = Codec().decode(Codec().encode(Snapshot(key=KEY, history=history)))
    with pytest.raises(SnapshotCorrupt, match="item"):
        validate_restorable(snap)


def test_an_id_lost_twice_gets_two_notes_of_distinct_ids_and_the_rest_is_salvaged() -> None:
    # item_1 damaged, and its id again later in the log (a record torn twice): each run
    # of losses gets a note, and two notes named after item_1 must not share an id (a
    # restore refuses a stream holding one id twice: nothing would be salvaged)
    codec = Codec()
    _snap, head, streams = _parts(codec, agent_refs=())
    damaged = ("item_1", _flip(streams["history"][1][1]))
    streams["history"][1] = damaged
    streams["history"].append(damaged)
    got, damage = salvage_parts(codec, KEY, head, streams, version=1)
    assert [d.item_id for d in damage if d.item_id] == ["item_1", "item_1"]
    ids = [i["id"] for i in got.history]
    assert len(set(ids)) == len(ids)
    assert [i for i in ids if not i.startswith("lkresume_salvage_")] == [
        "item_0",
        "item_2",
        "item_3",
        "item_4",
        "item_5",
    ]
    assert sum(i.startswith("lkresume_salvage_") for i in ids) == 2
