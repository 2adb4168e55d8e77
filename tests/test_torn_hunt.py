"""Hunt: a checkpoint that reads a live session while it changes under it.

A checkpoint reads the session in one synchronous step, then yields to the event loop
(before the build, before the store call; a large read is built on a worker thread).
Whatever another task does meanwhile must either be in the snapshot whole or reach the
store with the next checkpoint; the stored snapshot must always restore, and the tracker
must never believe the store holds what it does not.

Real AgentSession (scripted LLM), SQLite and a real redis-server.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm
from pydantic import BaseModel, model_serializer

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM

KEY = "torn-1"
NS: list[str] = []  # the store's namespace, for a codec of the test's own


def small() -> Codec:
    return Codec(max_frame=SMALL_FRAMES, namespace=NS[0])


# what the agent's snapshot_state() runs once, during the checkpoint's read
HOOKS: list[Callable[[], None]] = []


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")

    def snapshot_state(self) -> dict[str, Any]:
        # called inside the checkpoint's synchronous read: what it schedules with
        # call_soon runs during the checkpoint's next yield (another task's doing)
        while HOOKS:
            asyncio.get_running_loop().call_soon(HOOKS.pop(0))
        return {}


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Helper)
    return reg


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    HOOKS.clear()
    NS[:] = [f"t{uuid.uuid4().hex[:10]}"]
    if request.param == "sqlite":
        s: Store = lr.open_store(f"sqlite:///{tmp_path}/torn.db", namespace=NS[0])
    else:
        server = request.getfixturevalue("redis_server")
        s = lr.open_store(server.url, namespace=NS[0])
    yield s
    await s.aclose()
    HOOKS.clear()


async def start(
    store: Store, *, takeover: bool = False, **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session: AgentSession[Any] = AgentSession(llm=ScriptedLLM([], default="ok"))
    kw.setdefault("autosave", False)
    rs = lr.ResumableSession(store, KEY, registry=registry(), **kw)
    await session.start(await rs.restore(session, default=Helper, takeover=takeover))
    return session, rs


async def restored(store: Store, **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    """History (as dicts) and userdata as a fresh worker restores them (taking over)."""
    session, rs = await start(store, takeover=True, **kw)
    try:
        hist = session.history.to_dict(exclude_timestamp=False, exclude_image=False)["items"]
        try:
            ud = session.userdata
        except ValueError:
            ud = None
        return hist, ud
    finally:
        await rs.aclose()
        await session.aclose()


def live_dict(session: AgentSession[Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = session.history.to_dict(
        exclude_timestamp=False, exclude_image=False
    )["items"]
    return items


# ---------------------------------------------------------------- item id renamed


async def test_an_item_renamed_during_the_checkpoints_yield_leaves_a_restorable_store(
    store: Store,
) -> None:
    """The tracker supports an item whose id an app changes in place (it rewrites the
    stream from there). A rename that happens while a checkpoint yields between its read
    and its build must not produce a torn version (a record stored under the new id
    holding the old id's data, the next item chained after an id the store never got):
    every version must restore, and after one more checkpoint the restore must equal the
    live history."""
    session, rs = await start(store)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        await session.run(user_input="second")
        user = next(
            i
            for i in reversed(session.history.items)
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        )

        def rename() -> None:
            user.id = "renamed-" + user.id

        HOOKS.append(rename)
        await rs.checkpoint()  # raced: renamed between its read and its build
        await rs.checkpoint()  # the next one: writes the stream again from the rename
        final = live_dict(session)
        unreadable = []
        for v in await store.versions(KEY):
            try:
                await store.load(KEY, v.version)
            except lr.SnapshotCorrupt:
                unreadable.append(v.version)
    finally:
        await rs.aclose()
        await session.aclose()
    hist, _ = await restored(store)  # SnapshotCorrupt today: nothing restores
    assert hist[: len(final)] == final
    assert unreadable == []


# ------------------------------------------- an oversized item built on a worker thread

BIG = "x" * 200_000  # over the offload threshold (64 KB) and over max_frame below
SMALL_FRAMES = 100_000


class Blocking(BaseModel):
    """A value in an item's ``extra`` whose serializer, when it runs on a worker thread,
    lets the event loop run one callback of another task (``GATE``) before it returns:
    what any other task of the worker may do while a checkpoint's build runs there."""

    n: int = 1

    @model_serializer
    def _ser(self) -> dict[str, int]:
        if threading.current_thread() is not threading.main_thread() and GATE:
            loop, action = GATE.pop()
            done = threading.Event()

            def run() -> None:
                action()
                done.set()

            loop.call_soon_threadsafe(run)
            done.wait(5)
        return {"n": self.n}


GATE: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []


async def test_an_oversized_item_edited_during_its_offloaded_build_and_back_is_saved_as_live(
    store: Store,
) -> None:
    """An item over ``max_frame`` is saved with its text replaced by a note and every other
    field as it was read. A field of it (``extra``) changed by another task while the
    checkpoint's build runs on its worker thread, then changed back before the next
    checkpoint, must not leave the store holding the passing value for good: the tracker
    believes the store holds what it read (its shape), so the store must hold exactly
    that."""
    session, rs = await start(store, codec=small())
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        extra: dict[str, Any] = {"model": Blocking(), "phase": "final"}
        msg = llm.ChatMessage(role="assistant", content=[BIG], extra=extra)
        session.history.items.append(msg)
        session.current_agent._chat_ctx.items.append(msg)

        def edit() -> None:
            msg.extra["phase"] = "passing"

        GATE.append((asyncio.get_running_loop(), edit))
        try:
            await rs.checkpoint()
        finally:
            GATE.clear()
        msg.extra["phase"] = "final"  # back as it was read
        await session.run(user_input="after")
        await rs.checkpoint()
        live_ids = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    hist, _ = await restored(store, codec=small())
    assert [h["id"] for h in hist[: len(live_ids)]] == live_ids
    back = next(h for h in hist if h["id"] == msg.id)
    assert back["extra"]["phase"] == "final"


async def test_an_entry_added_to_an_oversized_items_extra_during_its_build_does_not_fail_it(
    store: Store,
) -> None:
    """The read of a checkpoint is one synchronous moment; what runs on the worker
    thread encodes what was read. Another task adding an entry to an oversized item's
    ``extra`` while that thread runs must not make the checkpoint fail (RuntimeError:
    dictionary changed size during iteration): the item was read already."""
    session, rs = await start(store, codec=small())
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        extra: dict[str, Any] = {"model": Blocking(), "tail": 2}
        msg = llm.ChatMessage(role="assistant", content=[BIG], extra=extra)
        session.history.items.append(msg)
        session.current_agent._chat_ctx.items.append(msg)

        def add() -> None:
            msg.extra["added"] = 1

        GATE.append((asyncio.get_running_loop(), add))
        try:
            await rs.checkpoint()
        finally:
            GATE.clear()
        await rs.checkpoint()
        final = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    hist, _ = await restored(store, codec=small())
    assert [h["id"] for h in hist[: len(final)]] == final


# ------------------------------------------------------- a suspend's final save


@pytest.mark.parametrize("finish", ["suspend", "aclose"])
async def test_an_item_added_during_the_final_save_of_a_suspend_is_not_lost(
    store: Store, finish: str
) -> None:
    """A suspend (or a close) writes the final snapshot, then gives the session up:
    a later restore "continues from here". A tool output that lands in the history while
    that final save is on its way to the store (between its read and its commit) is in
    the session the suspend returned from; the restore must hold it too, or the call
    resumes without a result the tool produced (and a reply the model gave on it)."""
    session, rs = await start(store)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        late = llm.ChatMessage(role="assistant", content=["landed during the final save"])

        def land() -> None:
            session.history.items.append(late)
            session.current_agent._chat_ctx.items.append(late)

        HOOKS.append(land)
        if finish == "suspend":
            await rs.suspend()
        else:
            await rs.aclose()
        assert late in session.history.items
        final = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    hist, _ = await restored(store)
    assert [h["id"] for h in hist[: len(final)]] == final
