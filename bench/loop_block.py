"""How long a checkpoint blocks the event loop: the longest single callback it runs.

A voice agent's audio runs on the same event loop as the hooks: while one callback
runs, nothing else does. Every `asyncio.Handle` run is timed (the loop's callbacks,
task steps included) and the longest during each `ResumableSession.checkpoint()` is
kept. Per history length (a live AgentSession on SQLite, one turn of 2 items per
checkpoint) it prints the median and p99 of that longest callback; then the same for
one turn whose tool output is one large item (``--big`` MB of random hex text), on
SQLite and on Redis, with how late a 1 ms timer fired meanwhile: that also counts the
waits for the GIL while a worker thread encodes the item, which no callback's duration
shows. And both for a restore of each history length (Redis): the other sessions of
a worker share its loop, and wait that long while one is restored; the timer also
counts the cyclic garbage collections the restore's worker thread runs, GIL held.
Redis is a ``redis-server`` the script starts on a free loopback port.

    python bench/loop_block.py [--sizes 10,1000,5000,20000] [--rounds 60] [--big 5,50]
        [--big-rounds 3]

Prints Markdown tables in milliseconds.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import os
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import _common as c
from livekit.agents import AgentSession, llm

import livekit_resume as lr

_longest = [0.0]
_run = asyncio.events.Handle._run


def _timed_run(self: asyncio.events.Handle) -> None:
    start = time.perf_counter()
    _run(self)
    _longest[0] = max(_longest[0], time.perf_counter() - start)


async def longest_block(call: Awaitable[Any]) -> float:
    """The longest callback the loop ran while ``call`` was awaited. The caller's own
    work before it (building a turn, a large item) ends first, in a callback of its own:
    the callback that runs ``call``'s first step would otherwise count it too."""
    await asyncio.sleep(0)
    _longest[0] = 0.0
    await call
    return _longest[0]


async def measure(store: lr.Store, sizes: tuple[int, ...], rounds: int) -> dict[int, list[float]]:
    live = {size: await c.live_session(store, size) for size in sizes}
    out: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for r in range(rounds + 3):
            for size in sizes:
                session, rs = live[size]
                c.add_turn(session, size + r, time.time())
                took = await longest_block(rs.checkpoint("turn"))
                if r >= 3:
                    out[size].append(took)
    finally:
        for session, rs in live.values():
            await c.close(session, rs)
    return out


async def restores(
    store: lr.Store, sizes: tuple[int, ...], rounds: int
) -> dict[int, tuple[list[float], list[float]]]:
    """(longest callback, latest 1 ms timer) of ``rounds`` `ResumableSession.restore`
    calls each of a saved session: what the worker's other sessions, on the same loop,
    wait while one is restored."""
    keys = {}
    for size in sizes:
        session, rs = await c.live_session(store, size)
        keys[size] = rs.key
        await c.close(session, rs)
    out: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in sizes}
    for r in range(rounds + 1):
        for size in sizes:
            for measure_with, samples in zip((longest_block, latest_tick), out[size], strict=True):
                session: AgentSession[None] = AgentSession(llm=c.NoLLM())
                rs = lr.ResumableSession(store, keys[size], registry=c.registry(), autosave=False)
                took = await measure_with(rs.restore(session, default=c.Bench))
                await c.close(session, rs)
                if r >= 1:
                    samples.append(took)
    return out


async def latest_tick(call: Awaitable[Any], every: float = 0.001) -> float:
    """How late, at worst, a timer of ``every`` seconds fired while ``call`` was awaited.
    Unlike the longest callback this also counts waits for the GIL between callbacks
    (a worker thread in a long C call holds it): what an audio task would feel."""
    late = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(every)
            late[0] = max(late[0], time.perf_counter() - start - every)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    try:
        await call
    finally:
        done.set()
        await ticker
    return late[0]


async def big_item(store: lr.Store, megabytes: int, rounds: int) -> tuple[list[float], list[float]]:
    """(longest callback, latest 1 ms timer) of each of ``rounds`` checkpoints of one item
    of ``megabytes`` MB."""
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for measure_with, samples in zip((longest_block, latest_tick), out, strict=True):
            session, rs = await c.live_session(store, 10)
            try:
                text = os.urandom(megabytes * 2**19).hex()  # text that does not compress away
                output = llm.FunctionCallOutput(
                    call_id="big", name="fetch", output=text, is_error=False
                )
                session.current_agent._chat_ctx.items.append(output)
                session.history.items.append(output)
                del text, output
                samples.append(await measure_with(rs.checkpoint("turn")))
            finally:
                await c.close(session, rs)
    return out


async def main() -> None:
    ap = c.options(__doc__, "10,1000,5000,20000", 60)
    ap.add_argument("--big", type=c.parse_sizes, default=(5, 50), help="item sizes in MB")
    ap.add_argument("--big-rounds", type=int, default=3, help="samples per large item")
    args = ap.parse_args()
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    bigs: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lkr-bench-") as tmp, c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        store = lr.open_store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        redis = lr.open_store(url)
        try:
            samples = await measure(store, args.sizes, args.rounds)
            restored = await restores(redis, args.sizes, max(3, args.rounds // 6))
            for mb in args.big:
                for name, where in (("SQLite", store), ("Redis", redis)):
                    bigs[mb, name] = await big_item(where, mb, args.big_rounds)
        finally:
            await store.aclose()
            await redis.aclose()
    rows = [
        [c.fmt_n(size), c.fmt_ms(c.ms(s)), c.fmt_ms(c.ms(s, 0.99))] for size, s in samples.items()
    ]
    c.section(
        "Event loop blocked by one checkpoint (longest callback), SQLite",
        c.table(["history", "p50", "p99"], rows),
    )
    rows = [
        [
            c.fmt_n(size),
            c.fmt_ms(c.ms(took)),
            c.fmt_ms(max(took) * 1e3),
            c.fmt_ms(c.ms(late)),
            c.fmt_ms(max(late) * 1e3),
        ]
        for size, (took, late) in restored.items()
    ]
    c.section(
        "Event loop blocked by one restore, Redis",
        c.table(
            [
                "history",
                "longest callback p50",
                "max",
                "latest 1 ms timer p50 (GIL waits too)",
                "max",
            ],
            rows,
        ),
    )
    rows = [
        [
            f"{mb} MB tool output",
            name,
            c.fmt_ms(c.ms(took)),
            c.fmt_ms(max(took) * 1e3),
            c.fmt_ms(c.ms(late)),
            c.fmt_ms(max(late) * 1e3),
        ]
        for (mb, name), (took, late) in bigs.items()
    ]
    c.section(
        f"Event loop blocked by the checkpoint of one large item ({args.big_rounds} samples)",
        c.table(
            [
                "item",
                "store",
                "longest callback p50",
                "max",
                "latest 1 ms timer p50 (GIL waits too)",
                "max",
            ],
            rows,
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
