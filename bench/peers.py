"""Ours beside the peers on one Redis: per-turn save and load of the whole history.

- ours: `ResumableSession.checkpoint()` of a live AgentSession after one turn, and
  `ResumableSession.restore` of the session into a new AgentSession;
- OpenAI Agents SDK ``RedisSession`` (package ``openai-agents``): ``add_items`` of the
  turn's two items, ``get_items()`` of all;
- LangGraph ``AsyncRedisSaver`` of ``langgraph-checkpoint-plainredis``: ``aput`` of a
  checkpoint whose ``messages`` channel holds the history (LangChain messages, as a
  ``MessagesState`` graph keeps them), ``aget_tuple`` of the latest.

Every system holds the same texts (a user message and a reply per turn). Sizes are
visited in turn each round. Peers not installed are skipped with a note: install them
with ``pip install -e '.[bench]'``.

    python bench/peers.py [--sizes 10,1000,5000] [--rounds 30]

Redis is a ``redis-server`` the script starts on a free loopback port. Prints Markdown
tables of medians in milliseconds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import _common as c
from restore_cost import restore_once

from livekit_resume.stores.redis import RedisStore

Op = Callable[[], Awaitable[object]]


def _texts(n: int) -> tuple[str, str]:
    return f"{n}: {c.TEXT}", f"reply {n}: {c.TEXT}"


class Ours:
    name = "livekit-resume `checkpoint()` / `restore`"

    def __init__(self, url: str) -> None:
        self.store = RedisStore.from_url(url)
        self.live: dict[int, Any] = {}

    async def prepare(self, size: int) -> None:
        self.live[size] = await c.live_session(self.store, size)

    def save(self, size: int, n: int) -> Op:
        session, rs = self.live[size]
        c.add_turn(session, n, time.time())
        return lambda: rs.checkpoint("turn")

    def load(self, size: int) -> Op:
        return lambda: restore_elsewhere(self, size)

    async def aclose(self) -> None:
        for session, rs in self.live.values():
            await c.close(session, rs)
        await self.store.aclose()


async def restore_elsewhere(ours: Ours, size: int) -> float:
    """Restore needs the lease: the live session lends it, untimed; the time returned is
    the restore's own."""
    _, rs = ours.live[size]
    await rs._holder.release()
    try:
        return (await restore_once(ours.store, rs.key, size))[0]
    finally:
        await rs._holder.acquire(takeover=False)


class OpenAIAgents:
    name = "OpenAI Agents SDK `RedisSession` `add_items` / `get_items`"

    def __init__(self, url: str) -> None:
        from agents.extensions.memory.redis_session import RedisSession

        self.make = lambda sid: RedisSession.from_url(sid, url=url)
        self.sessions: dict[int, Any] = {}

    async def prepare(self, size: int) -> None:
        session = self.make(f"bench-{size}-{uuid.uuid4().hex[:8]}")
        items: list[Any] = []
        for n in range(size // 2):
            user, reply = _texts(n)
            items += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        for i in range(0, len(items), 1000):
            await session.add_items(items[i : i + 1000])
        self.sessions[size] = session

    def save(self, size: int, n: int) -> Op:
        user, reply = _texts(n)
        items = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return lambda: self.sessions[size].add_items(items)

    def load(self, size: int) -> Op:
        return lambda: self.sessions[size].get_items()

    async def aclose(self) -> None:
        for session in self.sessions.values():
            await session.close()


class LangGraph:
    name = "LangGraph plainredis `AsyncRedisSaver` `aput` / `aget_tuple`"

    def __init__(self, url: str) -> None:
        from langgraph_checkpoint_plainredis import AsyncRedisSaver

        self.saver = AsyncRedisSaver(url=url)
        self.threads: dict[int, tuple[str, list[Any]]] = {}

    async def prepare(self, size: int) -> None:
        from langchain_core.messages import AIMessage, HumanMessage

        messages: list[Any] = []
        for n in range(size // 2):
            user, reply = _texts(n)
            messages += [
                HumanMessage(user, id=uuid.uuid4().hex),
                AIMessage(reply, id=uuid.uuid4().hex),
            ]
        self.threads[size] = (f"bench-{size}-{uuid.uuid4().hex[:8]}", messages)
        await self._put(size)

    async def _put(self, size: int) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        thread, messages = self.threads[size]
        checkpoint = empty_checkpoint()
        version = len(messages)
        checkpoint["channel_values"] = {"messages": messages}
        checkpoint["channel_versions"] = {"messages": version}
        config: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        metadata: Any = {"source": "loop", "step": version, "parents": {}}
        await self.saver.aput(config, checkpoint, metadata, {"messages": version})

    def save(self, size: int, n: int) -> Op:
        from langchain_core.messages import AIMessage, HumanMessage

        user, reply = _texts(n)
        self.threads[size][1].extend(
            [HumanMessage(user, id=uuid.uuid4().hex), AIMessage(reply, id=uuid.uuid4().hex)]
        )
        return lambda: self._put(size)

    def load(self, size: int) -> Op:
        config: Any = {"configurable": {"thread_id": self.threads[size][0], "checkpoint_ns": ""}}
        return lambda: self.saver.aget_tuple(config)

    async def aclose(self) -> None:
        await self.saver.aclose()


PEERS: list[tuple[str, str, type[Any]]] = [
    ("agents", "openai-agents", OpenAIAgents),
    ("langgraph_checkpoint_plainredis", "langgraph-checkpoint-plainredis", LangGraph),
]


async def _timed(op: Op) -> float:
    """How long ``op`` took, or the time it returns (when it times itself)."""
    start = time.perf_counter()
    said = await op()
    took = time.perf_counter() - start
    return said if isinstance(said, float) else took


async def measure(
    url: str, sizes: tuple[int, ...], rounds: int
) -> dict[str, dict[int, dict[str, list[float]]]]:
    systems: list[Any] = [Ours(url)]
    for module, package, cls in PEERS:
        if importlib.util.find_spec(module) is None:
            print(f"> {package} is not installed: skipped (`pip install -e '.[bench]'`).\n")
        else:
            systems.append(cls(url))
    out = {s.name: {size: {"save": [], "load": []} for size in sizes} for s in systems}
    try:
        for system in systems:
            for size in sizes:
                await system.prepare(size)
        for r in range(rounds + 2):  # the first two warm caches and code paths
            for size in sizes:
                for system in systems:
                    save = await _timed(system.save(size, size + r))
                    load = await _timed(system.load(size))
                    if r >= 2:
                        out[system.name][size]["save"].append(save)
                        out[system.name][size]["load"].append(load)
    finally:
        for system in systems:
            await system.aclose()
    return out


def report(results: dict[str, dict[int, dict[str, list[float]]]], sizes: tuple[int, ...]) -> None:
    headers = ["system", *(f"@{c.fmt_n(s)}" for s in sizes)]
    for what, title in (
        ("save", "Per-turn save of one turn (2 new items) on Redis, p50"),
        ("load", "Load of the whole history on Redis, p50"),
    ):
        rows = [
            [name, *(c.fmt_ms(c.ms(by_size[s][what])) for s in sizes)]
            for name, by_size in results.items()
        ]
        c.section(title, c.table(headers, rows))


async def main() -> None:
    args = c.options(__doc__, "10,1000,5000", 30).parse_args()
    with c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        report(await measure(url, args.sizes, args.rounds), args.sizes)


if __name__ == "__main__":
    asyncio.run(main())
