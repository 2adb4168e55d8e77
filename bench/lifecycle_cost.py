"""What the job lifecycle costs: suspend time, restore time, and the memory a paused
session keeps against a suspended one (issue 19).

For each history length a real AgentSession (text mode, no room) holds N items of
conversation; the bench times `ResumableSession.suspend()` (final snapshot, lease
released, session closed) and a `restore` of it into a new session, and measures with
tracemalloc the Python memory a *paused* session still holds against what is left once
it is suspended and dropped. The floor is one store commit of a single small record,
measured in the same run.

    python bench/lifecycle_cost.py [--rounds 5] [--store sqlite|memory|redis://…]

A voice session's close also waits up to LiveKit's `session_close_transcript_timeout`
(2 s) for a last transcript; suspend saves before that wait, so the save is what this
measures. Prints medians in milliseconds and MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import _common as c
from _common import Bench, NoLLM, registry
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Record, Store

SIZES = (10, 1000, 5000)
TEXT = c.TEXT


async def _live(
    store: Store, key: str, size: int
) -> tuple[AgentSession[None], lr.ResumableSession]:
    session: AgentSession[None] = AgentSession(llm=NoLLM())
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    await session.start(await rs.restore(session, default=Bench))
    agent_ctx = session.current_agent._chat_ctx
    t = time.time() - size
    for n in range(size // 2):
        for role in ("user", "assistant"):
            msg = llm.ChatMessage(role=role, content=[f"{n}: {TEXT}"], created_at=t + n)
            agent_ctx.items.append(msg)
            session.history.items.append(msg)
    await rs.checkpoint()
    return session, rs


async def _round(store: Store, size: int) -> dict[str, float]:
    key = f"bench-{size}-{uuid.uuid4().hex[:6]}"
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    session, rs = await _live(store, key, size)
    await rs.pause()
    gc.collect()
    paused = tracemalloc.get_traced_memory()[0] - base
    t0 = time.perf_counter()
    await rs.suspend()
    suspend = time.perf_counter() - t0
    del session, rs
    gc.collect()
    suspended = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    session2: AgentSession[None] = AgentSession(llm=NoLLM())
    rs2 = lr.ResumableSession(store, key, registry=registry(), autosave=False)
    t0 = time.perf_counter()
    agent = await rs2.restore(session2, default=Bench)
    restore = time.perf_counter() - t0
    assert rs2.resumed and len(session2.history.items) >= size
    await session2.start(agent)
    await rs2.aclose()
    await session2.aclose()
    return {
        "suspend_ms": suspend * 1000,
        "restore_ms": restore * 1000,
        "paused_mib": paused / 2**20,
        "suspended_mib": suspended / 2**20,
    }


async def _floor(store: Store, rounds: int) -> float:
    lease = await store.acquire(f"floor-{uuid.uuid4().hex[:6]}", "bench")
    times = []
    for v in range(rounds * 10):
        rec = Record("history", f"i{v}", b"x" * 200, f"i{v - 1}" if v else None)
        t0 = time.perf_counter()
        await store.commit(Commit(lease.key, lease.epoch, v, b"head", [rec], v + 1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def main(url: str, rounds: int) -> None:
    logging.getLogger("livekit").setLevel(logging.ERROR)
    store = lr.open_store(url)
    floor = await _floor(store, rounds)
    print(f"store {url.split('@')[-1]}; floor (one small commit): {floor:.3f} ms")
    print(
        f"{'items':>6} {'suspend ms':>11} {'restore ms':>11} {'paused MiB':>11} "
        f"{'suspended MiB':>14} {'suspend/floor':>14}"
    )
    for size in SIZES:
        results = [await _round(store, size) for _ in range(rounds)]
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"{size:>6} {med['suspend_ms']:>11.2f} {med['restore_ms']:>11.2f} "
            f"{med['paused_mib']:>11.2f} {med['suspended_mib']:>14.2f} "
            f"{med['suspend_ms'] / floor:>13.1f}x"
        )
    await store.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--store", default="")
    args = parser.parse_args()
    url = args.store or f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    if url == "memory":
        url = "memory://"
    asyncio.run(main(url, args.rounds))
