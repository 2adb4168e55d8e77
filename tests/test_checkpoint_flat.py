"""The flat checkpoint on a real AgentSession: what it relies on in LiveKit 1.8.9, edits
it must still see, and large items encoded off the event loop."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.agent_hooks.capture import OFFLOAD_BYTES
from livekit_resume.agent_hooks.session import OFFLOAD_ITEMS
from livekit_resume.agent_hooks.tracker import StreamTracker
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import ItemData
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM

KEY = "flat-1"


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Helper)
    return reg


class ThreadNotingCodec(Codec):
    """A codec that notes on which thread each item was encoded (the codec is public)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: dict[str, threading.Thread] = {}

    def encode_item(self, key: str, stream: str, item: ItemData, **kw: Any) -> bytes:
        self.threads[item["id"]] = threading.current_thread()
        return super().encode_item(key, stream, item, **kw)

    def decode_parts(self, *args: Any, **kw: Any) -> Any:
        self.threads["decode"] = threading.current_thread()
        return super().decode_parts(*args, **kw)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/flat.db")
    yield s
    await s.aclose()


async def start(
    store: Store, *, takeover: bool = False, **kw: Any
) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, **kw)
    await session.start(await rs.restore(session, default=Helper, takeover=takeover))
    return session, rs


@pytest.fixture
async def live(store: Store) -> AsyncIterator[tuple[AgentSession[None], lr.ResumableSession]]:
    """A started session with its hooks, closed after the test."""
    session, rs = await start(store)
    yield session, rs
    await rs.aclose()
    await session.aclose()


async def talk(session: AgentSession[None], rs: lr.ResumableSession, turns: int) -> None:
    """``turns`` user turns answered by the model, then a checkpoint."""
    for n in range(turns):
        await session.run(user_input=f"turn {n}")
    await rs.checkpoint()


async def restored(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """History and agent context as a fresh worker restores them (taking it over)."""
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False)
    await session.start(await rs.restore(session, default=Helper, takeover=True))
    try:
        history = [i.model_dump(exclude={"created_at"}) for i in session.history.items]
        agent = [i.model_dump(exclude={"created_at"}) for i in session.current_agent.chat_ctx.items]
        return history, agent
    finally:
        await rs.aclose()
        await session.aclose()


def dumped(items: list[llm.ChatItem]) -> list[dict[str, Any]]:
    return [i.model_dump(exclude={"created_at"}) for i in items]


async def test_agent_chat_ctx_is_a_copy_and_its_private_context_the_live_list(
    live: tuple[AgentSession[None], lr.ResumableSession],
) -> None:
    # Why capture reads Agent._chat_ctx: the public property copies the list each call
    # (O(n) per checkpoint), while the private context is the list LiveKit appends to.
    session, _ = live
    agent = session.current_agent
    await session.run(user_input="hello")
    assert agent.chat_ctx.items is not agent.chat_ctx.items
    items = agent._chat_ctx.items
    assert [i.id for i in agent.chat_ctx.items] == [i.id for i in items]
    await session.run(user_input="again")
    assert agent._chat_ctx.items is items  # appended in place, the same list
    assert [i.id for i in agent.chat_ctx.items] == [i.id for i in items]


async def test_edits_in_place_at_any_depth_of_recent_items_reach_the_store(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession]
) -> None:
    session, rs = live
    await talk(session, rs, 2)
    msgs = [i for i in session.history.items if isinstance(i, llm.ChatMessage)]
    user, reply = msgs[-2], msgs[-1]
    # the kinds of edit LiveKit makes to items already added: a field set (metrics), a
    # list grown in place (a realtime transcript), a dict entry set (extra)
    user.metrics = {"started_speaking_at": 1.5}
    reply.content.append(" and more")
    reply.extra["note"] = {"level": 1}
    await rs.checkpoint()
    reply.extra["note"]["level"] = 2  # two levels down
    await rs.checkpoint()
    history, agent = await restored(store)
    assert history[: len(session.history.items)] == dumped(session.history.items)
    live_agent = session.current_agent._chat_ctx.items
    assert agent[: len(live_agent)] == dumped(live_agent)
    assert history[len(session.history.items) - 1]["extra"] == {"note": {"level": 2}}


async def test_an_item_replaced_by_id_far_from_the_tail_reaches_the_store(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession]
) -> None:
    session, rs = live
    await talk(session, rs, 12)  # past the window of recent items re-checked each time
    items = session.history.items
    target = next(i for i in items if isinstance(i, llm.ChatMessage) and i.role == "user")
    # LiveKit's own replace-by-id (ChatContext._upsert_item): a new object, same place
    session.history._upsert_item(target.model_copy(update={"content": ["rewritten"]}))
    await rs.checkpoint()
    history, _ = await restored(store)
    assert history[: len(items)] == dumped(items)
    assert any(h.get("content") == ["rewritten"] for h in history)


async def test_a_large_item_is_encoded_off_the_event_loop_and_small_ones_on_it(
    store: Store,
) -> None:
    codec = ThreadNotingCodec()
    session, rs = await start(store, codec=codec)
    await session.run(user_input="small talk")
    await rs.checkpoint()
    small = session.history.items[-1].id
    big = llm.FunctionCallOutput(
        call_id="c1", name="fetch", output="x" * (2 * OFFLOAD_BYTES), is_error=False
    )
    session.history.items.append(big)
    session.current_agent._chat_ctx.items.append(big)
    version = await rs.checkpoint()
    assert codec.threads[small] is threading.main_thread()
    assert codec.threads[big.id] is not threading.main_thread()
    assert version == rs.version
    history, agent = await restored(store)
    assert history[: len(session.history.items)] == dumped(session.history.items)
    assert [a["output"] for a in agent if a["id"] == big.id] == [big.output]
    await rs.aclose()
    await session.aclose()


@pytest.mark.parametrize(
    ("items", "on_loop"), [(OFFLOAD_ITEMS // 2, True), (2 * OFFLOAD_ITEMS, False)]
)
async def test_a_long_history_is_decoded_off_the_event_loop_and_a_short_one_on_it(
    store: Store, items: int, on_loop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other sessions of a worker share its loop: a restore decodes a long history
    (its items counted in both streams) on a worker thread, a short one in place; the
    checkpoint tracker's maps of the restored items by id are made with the decode."""
    indexed: list[threading.Thread] = []
    index = StreamTracker.index

    def noting(self: StreamTracker, *args: Any, **kw: Any) -> Any:
        indexed.append(threading.current_thread())
        return index(self, *args, **kw)

    monkeypatch.setattr(StreamTracker, "index", noting)
    session, rs = await start(store)
    for n in range(items // 4):  # a turn is two items, in the history and the agent's
        await session.run(user_input=f"turn {n}")
    await rs.checkpoint()
    await rs.aclose()
    await session.aclose()
    codec = ThreadNotingCodec()
    session, rs = await start(store, codec=codec)
    assert (codec.threads["decode"] is threading.main_thread()) is on_loop
    assert len(indexed) == 2  # the history and the agent's context, once each
    assert all((t is threading.main_thread()) is on_loop for t in indexed)
    assert len(session.history.items) >= items // 2
    await rs.aclose()
    await session.aclose()


async def test_an_item_inserted_before_the_last_one_and_a_truncation_reach_the_store(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession]
) -> None:
    session, rs = live
    await talk(session, rs, 3)
    items = session.history.items
    last = items[-1]
    # an interrupted reply lands before the barge-in that cut it: ChatContext.insert
    # places it by created_at, so the committed tail moves one place on
    cut = llm.ChatMessage(
        role="assistant",
        content=["I was say-"],
        interrupted=True,
        created_at=last.created_at - 1e-3,
    )
    session.history.insert(cut)
    assert items[-2] is cut
    await rs.checkpoint()
    del items[:4]  # app-side truncation: the oldest items go
    await rs.checkpoint()
    history, _ = await restored(store)
    assert history[: len(items)] == dumped(items)
