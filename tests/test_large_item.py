"""A large item is packed once per checkpoint: its msgpack is its digest's input and its
frame's body. Frames and seals are the bytes they were (older sessions still verify)."""

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
from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.agent_hooks import tracker
from livekit_resume.agent_hooks.tracker import PIECES_OVER
from livekit_resume.snapshot.codec import HISTORY, Codec
from livekit_resume.snapshot.seal import item_digest, pack_item, packed_digest
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM

KEY = "large-1"
SIGN = "s1:" + base64.b64encode(b"s" * 32).decode()


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Helper)
    return reg


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/large.db")
    yield s
    await s.aclose()


async def open_session(store: Store) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(
        store, KEY, registry=registry(), autosave=False, codec=Codec(signing_keys=SIGN)
    )
    await session.start(await rs.restore(session, default=Helper, takeover=True))
    return session, rs


async def test_a_large_item_is_packed_once_and_restores(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, rs = await open_session(store)
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
    monkeypatch.setattr(tracker, "pack_item", counted_pack_item)
    await rs.checkpoint()
    monkeypatch.undo()
    # once for both streams, its digest and its frame; in pieces (no single long step)
    assert packs == [True]
    await rs.aclose()
    await session.aclose()
    session, rs = await open_session(store)
    assert any(getattr(i, "output", None) == text for i in session.history.items)
    await rs.aclose()
    await session.aclose()


@pytest.mark.parametrize("keys", [{}, {"signing_keys": SIGN}])
def test_a_frame_of_a_packed_item_is_the_frame_it_was(keys: dict[str, Any]) -> None:
    codec = Codec(**keys)
    for size in (10, 5_000, 200_000):  # plain, deflated with the dictionary, large
        item = {"id": "item_1", "type": "message", "content": ["é" + "x" * size]}
        packed = pack_item(item)
        assert packed_digest(packed) == item_digest(item)  # the digest's definition
        assert codec.encode_item("k", HISTORY, item, packed=packed) == codec.encode_item(
            "k", HISTORY, item
        )
        frame = codec.encode_item("k", HISTORY, item, packed=packed)
        assert codec.decode_item("k", HISTORY, "item_1", frame, {}) == item


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
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
