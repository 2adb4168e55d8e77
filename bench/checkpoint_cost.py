"""End-to-end checkpoint cost on a live AgentSession: does it stay flat as history grows?

For each history length, a real AgentSession (text mode) holds N items; each round adds
one turn (a user message and an assistant reply, in the history and the agent's
context, as LiveKit does) and times `ResumableSession.checkpoint()`: reading the live
session, diffing it, encoding the new items, committing to the store. The floor is the
store commit alone of the same records, measured in the same run.

    python bench/checkpoint_cost.py [--rounds 200] [--store sqlite|memory]

Prints medians and p90 in milliseconds and the ratios against the 10-item case.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Store

SIZES = (10, 100, 1000, 5000)
TEXT = "Could you move my appointment to Thursday afternoon, around three if possible? " * 3


class Bench(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="benchmark")


class _NoLLM(llm.LLM):
    def chat(self, **_: object) -> llm.LLMStream:  # type: ignore[override]
        raise RuntimeError("the benchmark never asks the LLM")


def _turn(session: AgentSession[None], n: int, t: float) -> None:
    agent_ctx = session.current_agent._chat_ctx  # what LiveKit itself appends to
    for role, text in (("user", f"{n}: {TEXT}"), ("assistant", f"reply {n}: {TEXT}")):
        msg = llm.ChatMessage(role=role, content=[text], created_at=t)
        agent_ctx.items.append(msg)
        session.history.items.append(msg)


async def _measure(store: Store, size: int, rounds: int) -> tuple[list[float], list[float]]:
    reg = lr.AgentRegistry()
    reg.register(Bench)
    session: AgentSession[None] = AgentSession(llm=_NoLLM())
    rs = lr.ResumableSession(
        store, f"bench-{size}-{uuid.uuid4().hex[:6]}", registry=reg, autosave=False
    )
    await session.start(await rs.restore(session, default=Bench))
    t0 = time.time()
    for i in range(size // 2):
        _turn(session, i, t0 + i * 1e-3)
    await rs.checkpoint()  # the base: every item once

    commits: list[Commit] = []
    inner = store.commit

    async def record(c: Commit) -> int:
        commits.append(c)
        return await inner(c)

    store.commit = record  # type: ignore[method-assign]
    totals: list[float] = []
    for r in range(rounds):
        _turn(session, size + r, t0 + size + r)
        start = time.perf_counter()
        await rs.checkpoint("turn")
        totals.append(time.perf_counter() - start)
    store.commit = inner  # type: ignore[method-assign]

    # floor: the store alone committing the same heads and records, replayed on a fresh key
    floor: list[float] = []
    floor_key = f"floor-{size}-{uuid.uuid4().hex[:6]}"
    lease = await store.acquire(floor_key, "bench")
    version = await store.commit(Commit(floor_key, lease.epoch, 0, commits[0].head))
    for c in commits:
        start = time.perf_counter()
        version = await store.commit(
            Commit(floor_key, lease.epoch, version, c.head, c.records, c.size, c.info)
        )
        floor.append(time.perf_counter() - start)
    await rs._detach_and_release()
    await session.aclose()
    return totals, floor


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1e3, xs[int(len(xs) * 0.9)] * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = ap.parse_args()
    logging.getLogger("livekit").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}" if args.store == "sqlite" else "memory://"
        store = lr.open_store(url)
        await _measure(store, 10, 20)  # warm-up: imports, caches, SQLite pages
        rows = []
        for size in SIZES:
            totals, floor = await _measure(store, size, args.rounds)
            rows.append((size, *_stats(totals), *_stats(floor)))
        await store.aclose()
    base = rows[0][1]
    print(f"checkpoint of one turn (2 new items) on {args.store}, {args.rounds} rounds each")
    print(
        f"{'history':>8} {'median ms':>10} {'p90 ms':>8} {'store-only ms':>14} "
        f"{'hooks share':>12} {'vs 10 items':>12}"
    )
    for size, med, p90, fmed, _ in rows:
        print(
            f"{size:>8} {med:>10.3f} {p90:>8.3f} {fmed:>14.3f} {(med - fmed) / med:>11.0%} "
            f"{med / base:>11.2f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
