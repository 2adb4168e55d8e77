"""A restore hands the checkpoint tracker what its seal check hashed: every item is
hashed once, and the tracker's state is the one it would have computed itself."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession

import livekit_resume as lr
from livekit_resume.agent_hooks.tracker import StreamTracker
from livekit_resume.snapshot.codec import AGENT, HISTORY, Codec
from livekit_resume.snapshot.seal import SealKey
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM

KEY = "baseline-1"
OLD = "k1:" + base64.b64encode(b"o" * 32).decode()
NEW = "k2:" + base64.b64encode(b"n" * 32).decode()


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Helper)
    return reg


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/baseline.db")
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
    term = SealKey.term

    def counted(self: SealKey, stream: str, *a: Any) -> int:
        terms.append(stream)
        return term(self, stream, *a)

    monkeypatch.setattr(SealKey, "term", counted)
    session, rs = await open_session(store, codec)
    monkeypatch.setattr(SealKey, "term", term)
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
