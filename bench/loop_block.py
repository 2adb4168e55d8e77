"""How long a checkpoint blocks the event loop: the longest single callback it runs.

A voice agent's audio runs on the same event loop as the hooks: while one callback
runs, nothing else does. Every `asyncio.Handle` run is timed (the loop's callbacks,
task steps included) and the longest during each `ResumableSession.checkpoint()` is
kept. Per history length (a live AgentSession on SQLite, one turn of 2 items per
checkpoint) it prints the median and p99 of that longest callback; then the same for
one turn whose tool output is one large item (``--big`` MB of random hex text).

    python bench/loop_block.py [--sizes 10,5000,20000] [--rounds 60] [--big 5,50]

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
from livekit.agents import llm

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


async def big_item(store: lr.Store, megabytes: int) -> float:
    session, rs = await c.live_session(store, 10)
    try:
        text = os.urandom(megabytes * 2**19).hex()  # text that does not compress away
        output = llm.FunctionCallOutput(call_id="big", name="fetch", output=text, is_error=False)
        session.current_agent._chat_ctx.items.append(output)
        session.history.items.append(output)
        return await longest_block(rs.checkpoint("turn"))
    finally:
        await c.close(session, rs)


async def main() -> None:
    ap = c.options(__doc__, "10,5000,20000", 60)
    ap.add_argument("--big", type=c.parse_sizes, default=(5, 50), help="item sizes in MB")
    args = ap.parse_args()
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="lkr-bench-") as tmp:
        print(f"<!-- {c.machine()} -->\n")
        store = lr.open_store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            samples = await measure(store, args.sizes, args.rounds)
            bigs = {mb: await big_item(store, mb) for mb in args.big}
        finally:
            await store.aclose()
    rows = [
        [c.fmt_n(size), c.fmt_ms(c.ms(s)), c.fmt_ms(c.ms(s, 0.99))] for size, s in samples.items()
    ]
    c.section(
        "Event loop blocked by one checkpoint (longest callback), SQLite",
        c.table(["history", "p50", "p99"], rows),
    )
    rows = [[f"{mb} MB tool output", c.fmt_ms(took * 1e3)] for mb, took in bigs.items()]
    c.section(
        "Event loop blocked by the checkpoint of one large item (longest callback)",
        c.table(["item", "longest callback"], rows),
    )


if __name__ == "__main__":
    asyncio.run(main())
