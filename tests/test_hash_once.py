"""Every item hashed once: a restore hands the checkpoint tracker what its seal check
hashed (its state is the one it would have computed itself), and a checkpoint packs a
large item once, for its digest and its frame, in pieces that never hold the GIL long.
Frames and seals are the bytes they were: older sessions still verify."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.agent_hooks.tracker import PIECES_OVER, StreamTracker
from livekit_resume.snapshot.codec import AGENT, HISTORY, Codec
from livekit_resume.snapshot.seal import SealKey, item_digest, pack_item, packed_digest
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.test_checkpoint_flat import Helper, registry

KEY = "hash-once-1"
OLD = "k1:" + base64.b64encode(b"o" * 32).decode()
NEW = "k2:" + base64.b64encode(b"n" * 32).decode()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/hash-once.db")
    yield s
    await s.aclose()


async def open_session(
    store: Store, codec: Codec
) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, codec=codec)
    await session.start(await rs.restore(session, default=Helper, takeover=True))
    return session, rs


async def close(session: AgentSession[None], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


async def talk(store: Store, codec: Codec, turns: int) -> None:
    session, rs = await open_session(store, codec)
    for n in range(turns):
        await session.run(user_input=f"turn {n}")
    await rs.checkpoint()
    await close(session, rs)


def state(t: StreamTracker) -> tuple[dict[str, bytes], dict[str, int], int]:
    return dict(t._digests), dict(t._terms), t.seal


def recomputed(t: StreamTracker, snap_items: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The tracker's state as its baseline computes it alone, from the items' data."""
    fresh = StreamTracker(t.stream, seal_key=t.seal_key)
    fresh.baseline(t._objs, snap_items)
    return state(fresh)


async def test_restore_hashes_each_item_once_and_the_tracker_holds_its_own_state(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = Codec(signing_keys=OLD)
    await talk(store, codec, 4)
    terms: list[str] = []
    term, sealed_leaves = SealKey.term, SealKey.sealed_leaves

    def counted(self: SealKey, stream: str, *a: Any) -> int:
        terms.append(stream)
        return term(self, stream, *a)

    def counted_all(self: SealKey, stream: str, ids: list[str], leaves: list[bytes]) -> Any:
        terms.extend([stream] * len(ids))  # one term per item (its loop hashes inline)
        return sealed_leaves(self, stream, ids, leaves)

    monkeypatch.setattr(SealKey, "term", counted)
    monkeypatch.setattr(SealKey, "sealed_leaves", counted_all)
    session, rs = await open_session(store, codec)
    monkeypatch.setattr(SealKey, "term", term)
    monkeypatch.setattr(SealKey, "sealed_leaves", sealed_leaves)
    cap = rs._capture
    history = cap._history
    agent = cap._agent_ctx
    n_history, n_agent = len(history), len(agent)
    assert n_history >= 8 and n_agent >= 8
    # one term per item, in the seal check; none again in the tracker's baseline
    assert terms.count(HISTORY) == n_history
    assert terms.count(AGENT) == n_agent
    loaded = await store.load(KEY)
    snap = codec.decode_parts(KEY, loaded.head, loaded.streams, version=loaded.version)
    assert snap.agent is not None
    assert state(history) == recomputed(history, snap.history)
    assert state(agent) == recomputed(agent, snap.agent.chat_ctx)
    # and the state is right: the next checkpoint's head seals what the store holds
    await session.run(user_input="after")
    await rs.checkpoint()
    await close(session, rs)
    session, rs = await open_session(store, codec)
    ids = [i.id for i in session.history.items]
    assert ids[:n_history] == [i["id"] for i in snap.history] and len(ids) >= n_history + 2
    await close(session, rs)


async def test_after_a_key_rotation_the_tracker_seals_under_the_new_key(store: Store) -> None:
    await talk(store, Codec(signing_keys=OLD), 3)
    rotated = Codec(signing_keys=f"{NEW},{OLD}")  # k2 writes, k1 still reads
    session, rs = await open_session(store, rotated)
    history = rs._capture._history
    loaded = await store.load(KEY)
    snap = rotated.decode_parts(KEY, loaded.head, loaded.streams, version=loaded.version)
    # the head was sealed under k1: its terms are not the tracker's, which uses k2
    assert history.seal_key.kid == "k2"
    assert state(history) == recomputed(history, snap.history)
    await session.run(user_input="after")
    await rs.checkpoint()
    await close(session, rs)
    # the new head is sealed under k2 over every record, the ones restored included
    loaded = await store.load(KEY)
    assert rotated._head(KEY, loaded.head)[2].kid == "k2"
    session, rs = await open_session(store, rotated)
    ids = [i.id for i in session.history.items]
    assert ids[: len(snap.history)] == [i["id"] for i in snap.history]
    assert len(ids) >= len(snap.history) + 2
    await close(session, rs)


async def test_a_large_item_is_packed_once_and_restores(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, rs = await open_session(store, Codec(signing_keys=OLD))
    await session.run(user_input="fetch it")
    await rs.checkpoint()
    text = os.urandom(PIECES_OVER).hex()  # built off the loop, packed in pieces
    big = llm.FunctionCallOutput(call_id="c1", name="fetch", output=text, is_error=False)
    session.history.items.append(big)
    session.current_agent._chat_ctx.items.append(big)  # in both streams, as LiveKit does
    packs: list[bool] = []  # each packing of the big item, in pieces or not
    packb = msgpack.packb

    def counted_packb(obj: Any, **kw: Any) -> Any:
        if obj == text or (isinstance(obj, dict) and obj.get("output") == text):
            packs.append(False)
        return packb(obj, **kw)

    def counted_pack_item(data: Any, *, pieces: bool = False) -> bytes:
        if isinstance(data, dict) and data.get("output") == text:
            packs.append(pieces)
        return pack_item(data, pieces=pieces)

    monkeypatch.setattr(msgpack, "packb", counted_packb)
    monkeypatch.setattr("livekit_resume.agent_hooks.tracker.pack_item", counted_pack_item)
    await rs.checkpoint()
    monkeypatch.undo()
    # once for both streams, its digest and its frame; in pieces (no single long step)
    assert packs == [True]
    await close(session, rs)
    session, rs = await open_session(store, Codec(signing_keys=OLD))
    assert any(getattr(i, "output", None) == text for i in session.history.items)
    await close(session, rs)


@pytest.mark.parametrize("keys", [{}, {"signing_keys": OLD}])
def test_a_frame_of_a_packed_item_is_the_frame_it_was(keys: dict[str, Any]) -> None:
    codec = Codec(**keys)
    # plain, deflated with the dictionary, large, and past a megabyte (deflated in slices)
    for size in (10, 5_000, 200_000, (3 << 20) + 7):
        item = {"id": "item_1", "type": "message", "content": ["é" + "x" * size]}
        packed = pack_item(item)
        assert packed_digest(packed) == item_digest(item)  # the digest's definition
        assert codec.encode_item("k", HISTORY, item, packed=packed) == codec.encode_item(
            "k", HISTORY, item
        )
        frame = codec.encode_item("k", HISTORY, item, packed=packed)
        assert codec.decode_item("k", HISTORY, "item_1", frame, {}) == item


def test_an_encrypted_item_past_a_megabyte_round_trips() -> None:
    # deflated in slices, then the pieces joined for AES-GCM: one sealed body
    codec = Codec(encryption_keys="e1:" + base64.b64encode(b"e" * 32).decode())
    item = {"id": "item_1", "type": "message", "content": [os.urandom(3 << 19).hex()]}
    frame = codec.encode_item("k", HISTORY, item, packed=pack_item(item, pieces=True))
    assert codec.decode_item("k", HISTORY, "item_1", frame, {}) == item
    with pytest.raises(lr.SnapshotCorrupt):
        codec.decode_item("k", HISTORY, "item_1", frame[:-1] + bytes([frame[-1] ^ 1]), {})


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=20),
    max_leaves=60,
)


@settings(max_examples=200, deadline=None)
@given(value=plain, big=st.sampled_from(["", "a", "é", "😀"]))
def test_packing_in_pieces_gives_msgpack_s_own_bytes(value: Any, big: str) -> None:
    # a long string (past the chunk size) next to anything plain data holds
    data = {"id": "item_1", "value": value, "big": [big * (3 << 19)] if big else []}
    assert pack_item(data, pieces=True) == msgpack.packb(data, use_bin_type=True)


def test_a_failed_packing_leaves_nothing_behind_for_the_next() -> None:
    # the packer is kept per thread: a value it refused must not prefix the next one
    with pytest.raises(TypeError):
        pack_item({"id": "item_1", "bad": [1, "x" * 100, object()]})
    assert pack_item({"id": "item_2"}) == msgpack.packb({"id": "item_2"}, use_bin_type=True)
