"""A long restore pauses cyclic GC over its passes, on its worker threads too: one
collection after each, walking what the restore keeps, never a run of collections that
moves its passing objects into older generations (each such move brings a collection of
the whole heap closer). Counted, not timed: collections follow allocations."""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.agent_hooks import session as session_module
from livekit_resume.stores.redis import RedisStore
from tests.lk.scripted_llm import ScriptedLLM
from tests.redis_servers import RedisServer
from tests.test_checkpoint_flat import Helper, registry

ITEMS = 3000


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(redis_server.url, namespace=f"gc{uuid.uuid4().hex[:8]}")
    yield s
    await s.aclose()


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generation of each cyclic collection that starts from now on."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)


async def long_session(store: RedisStore) -> str:
    """A session of ``ITEMS`` chat items in the history and the agent's context, saved
    in one commit (one compacted-size log: decoded and folded on worker threads)."""
    key = f"gc-{uuid.uuid4().hex[:8]}"
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    await session.start(await rs.restore(session, default=Helper))
    agent_ctx = session.current_agent._chat_ctx
    for n in range(ITEMS // 2):
        for role in ("user", "assistant"):
            msg = llm.ChatMessage(role=role, content=[f"{role} {n}: " + "words " * 20])
            agent_ctx.items.append(msg)
            session.history.items.append(msg)
    await rs.checkpoint()
    await rs.aclose()
    await session.aclose()
    return key


async def test_a_long_log_is_read_with_one_collection_at_most(
    store: RedisStore, collections: list[int]
) -> None:
    # Unpacked and folded on a worker thread without a pause, a 3,000-item log ran a
    # collection every few hundred of its lists and tuples (some of the older
    # generations, which then held them).
    key = await long_session(store)
    gc.collect()
    collections.clear()
    stored = await store.load(key)
    ran = list(collections)
    assert len(stored.streams["history"]) >= ITEMS
    assert len(ran) <= 1, ran


async def test_a_long_restore_decodes_and_builds_with_one_collection_at_most(
    store: RedisStore, collections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decode and the build each ended their own pause on the worker thread: two
    # collections, the first walking the decoded item maps the restore then dropped.
    key = await long_session(store)
    during: list[int] = []
    decode = session_module.ResumableSession._decode

    def counted(self: lr.ResumableSession, *args: Any, **kwargs: Any) -> Any:
        before = len(collections)
        try:
            return decode(self, *args, **kwargs)
        finally:
            during.extend(collections[before:])

    monkeypatch.setattr(session_module.ResumableSession, "_decode", counted)
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    gc.collect()
    await rs.restore(session, default=Helper)
    try:
        assert len(session.history.items) >= ITEMS
        assert len(during) <= 1, during
    finally:
        await rs.aclose()
        await session.aclose()
