"""Hunt (review of b252e25): a checkpoint stores the session as it read it; a suspend,
an end or a close saves again what came during its final save (the settle).

Real AgentSession (scripted LLM), SQLite and a real redis-server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM

KEY = "review10-1"
NS: list[str] = []

# what the agent's snapshot_state() schedules, one per read, during that read
HOOKS: list[Callable[[], None]] = []


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You help.")

    def snapshot_state(self) -> dict[str, Any]:
        if HOOKS:
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
        s: Store = lr.open_store(f"sqlite:///{tmp_path}/r10.db", namespace=NS[0])
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


async def states(store: Store) -> list[Any]:
    return [v.info.get("state") for v in await store.versions(KEY)]


# ------------------------------------------------- an autosave racing the settle


@pytest.mark.parametrize("finish", ["end", "suspend"])
async def test_no_version_after_the_final_save_of_an_end_says_paused(
    store: Store, finish: str
) -> None:
    """An end (or a suspend) stores its final snapshot marked ``ended`` (``suspended``);
    from then on the store says so: an operator's ``ls`` or a watcher never sees the
    conversation back as ``paused``, and a save that fails later cannot leave it
    ``paused`` (a conversation ended, resumed by the next call). An autosave triggered
    by an item landing during the final save must store the same state, not the
    session's interim ``paused``."""
    session, rs = await start(store, autosave=True, debounce=0.0)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        await asyncio.sleep(0.05)
        late = llm.ChatMessage(role="assistant", content=["landed during the final save"])

        def land() -> None:
            session._conversation_item_added(late)  # LiveKit's own add: autosave triggered

        HOOKS.append(land)
        await (rs.end() if finish == "end" else rs.suspend())
        seen = await states(store)
    finally:
        await rs.aclose()
        await session.aclose()
    final = "ended" if finish == "end" else "suspended"
    first = seen.index(final)
    assert seen[first:] == [final] * len(seen[first:]), seen


async def test_an_end_whose_settle_fails_after_an_autosave_leaves_the_conversation_ended(
    disposable_redis: Any,
) -> None:
    """`_settled` says a failure "leaves the final save standing": an end
    whose final save stored ``ended`` must leave the conversation ended even when a
    later save of the settle cannot reach the store. An autosave that an item landing
    during the final save triggered, stored between the end's save and its settle,
    must not leave ``paused`` as the store's last word: the next call would resume a
    conversation that ended (and its reconnect tokens would be honoured)."""
    NS[:] = [f"t{uuid.uuid4().hex[:10]}"]
    # no retries: the commit refused at once once the server is gone
    store = lr.open_store(disposable_redis.url, namespace=NS[0], retries=0)
    session, rs = await start(store, autosave=True, debounce=0.0)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        await asyncio.sleep(0.05)
        late = llm.ChatMessage(role="assistant", content=["landed during the final save"])

        def land() -> None:
            session._conversation_item_added(late)

        def nothing() -> None:
            pass

        def crash() -> None:
            disposable_redis.kill()  # during the settle's first save (its read's yield)

        HOOKS.extend([land, nothing, crash])
        await rs.end()
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
    disposable_redis.start()
    store = lr.open_store(disposable_redis.url, namespace=NS[0])
    try:
        state = (await store.versions(KEY))[-1].info.get("state")
        again, rs2 = await start(store, takeover=True)
        resumed = rs2.resumed
        await rs2.aclose()
        await again.aclose()
    finally:
        await store.aclose()
    assert (state, resumed) == ("ended", False)


async def test_a_suspend_cancelled_during_its_settle_is_given_up_as_the_store_says(
    store: Store,
) -> None:
    """Once a suspend's final save has stored ``suspended``, the store tells every
    worker the session is suspended: the suspend then runs to its end even if its caller
    is cancelled (session.py: "From here the store says suspended ... the rest runs to
    its end"). A cancellation arriving during the settle (the job shutting down) must
    not leave the session open, ``paused``, holding its lease and autosaving, while the
    store says ``suspended``."""
    session, rs = await start(store)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        late = llm.ChatMessage(role="assistant", content=["landed during the final save"])
        task: list[asyncio.Task[Any]] = []

        def land() -> None:
            session.history.items.append(late)
            session.current_agent._chat_ctx.items.append(late)

        def cancel() -> None:
            task[0].cancel()  # the settle's save is on its way: the suspend's caller cancelled

        HOOKS.extend([land, cancel])
        task.append(asyncio.ensure_future(rs.suspend()))
        with pytest.raises(asyncio.CancelledError):
            await task[0]
        stored = (await store.versions(KEY))[-1].info.get("state")
        state = rs.state
        # given up: its lease released, so the next call restores it without a takeover
        try:
            again, rs2 = await start(store)
        except lr.SessionBusy:
            released = False
        else:
            released = True
            await rs2.aclose()
            await again.aclose()
    finally:
        await rs.aclose()
        await session.aclose()
    assert (stored, state, released) == ("suspended", "suspended", True)


# ------------------------------------------------- an item whose id is not a str


# ------------------------------------------- a close arriving during a suspend's save


async def test_a_close_during_a_suspends_final_save_leaves_it_suspended(store: Store) -> None:
    """A job shutting down closes its session (``aclose``) while a suspend of it (the
    leave grace, a long pause) is writing its final save. The suspend's ``suspended``
    stands: no version after it says ``paused`` (the close's own save must store what
    the session is by then), and the store's last word is ``suspended``."""
    session, rs = await start(store)
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        late = llm.ChatMessage(role="assistant", content=["landed during the final save"])
        closing: list[asyncio.Future[None]] = []

        def land_and_close() -> None:
            session.history.items.append(late)
            session.current_agent._chat_ctx.items.append(late)
            closing.append(asyncio.ensure_future(rs.aclose()))

        HOOKS.append(land_and_close)
        await rs.suspend()
        await closing[0]
        seen = await states(store)
    finally:
        await rs.aclose()
        await session.aclose()
    first = seen.index("suspended")
    assert seen[first:] == ["suspended"] * len(seen[first:]), str(seen)
