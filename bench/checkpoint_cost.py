"""End-to-end checkpoint cost on a live AgentSession, on SQLite and Redis, as history grows.

For each history length a real AgentSession (text mode) holds N items; each round adds
one turn (a user message and a reply, in the history and the agent's context, as
LiveKit does) and times `ResumableSession.checkpoint()`: reading the live session,
diffing it, encoding the new items, committing. Sizes are visited in turn within each
round, so drift on a shared machine weighs on all of them alike.

Floors, measured in the same run right after each checkpoint, with the very bytes that
checkpoint wrote (head and records): on Redis one raw ``RPUSH``; on SQLite one bare
``BEGIN IMMEDIATE`` / ``INSERT`` / ``COMMIT`` through a worker thread (as the store
does), on a file in the same mode (WAL, ``synchronous=NORMAL``). The naive path saves
the whole ``ChatContext.to_dict()`` as JSON each turn (``SET`` on Redis, one row
replaced on SQLite).

Each checkpoint is also split in two, each against the floor: the store's ``commit``
(timed around the call: the fenced write and its round trip) and the rest (reading the
live session, diffing, encoding, the lock), to show which part a target on the whole
asks of each.

    python bench/checkpoint_cost.py [--sizes 10,1000,5000,20000] [--rounds 60]
                                    [--stores sqlite,redis] [--naive-rounds 10]

Redis is a ``redis-server`` the script starts on a free loopback port. Prints Markdown
tables: medians and p99 in milliseconds, ratios against the 10-item case and the floor.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as c
from redis.asyncio import Redis

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Store

Floor = Callable[[list[bytes]], Awaitable[None]]
Samples = dict[int, dict[str, list[float]]]


def _sqlite_floor(path: Path) -> tuple[Floor, Floor, Callable[[], None]]:
    """The raw floor (bare INSERT of the bytes) and the naive rewrite on SQLite."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE floor (seq INTEGER PRIMARY KEY, data BLOB)")
    conn.execute("CREATE TABLE whole (key TEXT PRIMARY KEY, data BLOB)")
    executor = ThreadPoolExecutor(max_workers=1)

    def insert(blobs: list[bytes]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO floor (data) VALUES (?)", [(b,) for b in blobs])
        conn.execute("COMMIT")

    def replace(blobs: list[bytes]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO whole VALUES ('k', ?)", (blobs[0],))
        conn.execute("COMMIT")

    async def floor(blobs: list[bytes]) -> None:
        await asyncio.get_running_loop().run_in_executor(executor, insert, blobs)

    async def naive(blobs: list[bytes]) -> None:
        await asyncio.get_running_loop().run_in_executor(executor, replace, blobs)

    def shut() -> None:
        executor.shutdown()
        conn.close()

    return floor, naive, shut


def _redis_floor(url: str) -> tuple[Floor, Floor, Callable[[], Awaitable[None]]]:
    client = Redis.from_url(url)

    async def floor(blobs: list[bytes]) -> None:
        await client.rpush("bench:floor", *blobs)

    async def naive(blobs: list[bytes]) -> None:
        await client.set("bench:whole", blobs[0])

    async def shut() -> None:
        await client.delete("bench:floor", "bench:whole")
        await client.aclose()

    return floor, naive, shut


async def _timed(call: Awaitable[object]) -> float:
    start = time.perf_counter()
    await call
    return time.perf_counter() - start


async def measure(
    store: Store, floor: Floor, naive: Floor, sizes: tuple[int, ...], rounds: int, naive_rounds: int
) -> Samples:
    live = {size: await c.live_session(store, size) for size in sizes}
    written: list[bytes] = []
    committing: list[float] = []  # the store's commit calls within one checkpoint
    inner = store.commit

    async def record(commit: Commit) -> int:
        written[:] = [commit.head, *(r.data for r in commit.records if r.data is not None)]
        start = time.perf_counter()
        try:
            return await inner(commit)
        finally:
            committing.append(time.perf_counter() - start)

    store.commit = record  # type: ignore[method-assign]
    out: Samples = {
        size: {"checkpoint": [], "commit": [], "floor": [], "naive": []} for size in sizes
    }
    t0 = time.time()
    try:
        for r in range(rounds + 3):  # the first three warm caches and code paths
            for size in sizes:
                session, rs = live[size]
                c.add_turn(session, size + r, t0 + size + r)
                committing.clear()
                took = await _timed(rs.checkpoint("turn"))
                floor_took = await _timed(floor(list(written)))
                if r >= 3:
                    out[size]["checkpoint"].append(took)
                    out[size]["commit"].append(sum(committing))
                    out[size]["floor"].append(floor_took)
        for _ in range(naive_rounds):  # a pass of its own: a 100 ms rewrite disturbs others
            for size in sizes:

                async def rewrite(size: int = size) -> None:
                    history = live[size][0].history.to_dict(exclude_timestamp=False)
                    await naive([json.dumps(history).encode()])

                out[size]["naive"].append(await _timed(rewrite()))
    finally:
        store.commit = inner  # type: ignore[method-assign]
        for session, rs in live.values():
            await c.close(session, rs)
    return out


def report(name: str, floor_name: str, samples: Samples) -> None:
    sizes = list(samples)
    base = c.ms(samples[sizes[0]]["checkpoint"])
    rows = []
    for size, s in samples.items():
        med, floor = c.ms(s["checkpoint"]), c.ms(s["floor"])
        naive = c.ms(s["naive"]) if s["naive"] else float("nan")
        rows.append(
            [
                c.fmt_n(size),
                c.fmt_ms(med),
                c.fmt_ms(c.ms(s["checkpoint"], 0.99)),
                c.times(med / base, 2),
                c.fmt_ms(floor),
                c.times(med / floor),
                c.fmt_ms(naive),
                c.times(naive / med),
            ]
        )
    c.section(
        f"`ResumableSession.checkpoint()` of one turn (2 new items) on {name}",
        c.table(
            [
                "history",
                "checkpoint p50",
                "p99",
                "vs @10",
                f"floor p50 ({floor_name})",
                "checkpoint / floor",
                "naive `to_dict` → JSON → write p50",
                "naive / checkpoint",
            ],
            rows,
        ),
    )
    split = []
    for size, s in samples.items():
        floor = c.ms(s["floor"])
        commit = c.ms(s["commit"])
        rest = c.ms([t - ct for t, ct in zip(s["checkpoint"], s["commit"], strict=True)])
        split.append(
            [
                c.fmt_n(size),
                c.fmt_ms(c.ms(s["checkpoint"])),
                c.fmt_ms(commit),
                c.times(commit / floor),
                c.fmt_ms(rest),
                c.times(rest / floor),
            ]
        )
    c.section(
        f"The same checkpoints split: the store's commit, and the rest, on {name}",
        c.table(
            [
                "history",
                "checkpoint p50",
                "store commit p50",
                "commit / floor",
                "the rest p50 (reading the session, encoding, the lock)",
                "rest / floor",
            ],
            split,
        ),
    )


async def main() -> None:
    ap = c.options(__doc__, "10,1000,5000,20000", 60)
    ap.add_argument("--naive-rounds", type=int, default=10)
    ap.add_argument("--stores", default="sqlite,redis")
    args = ap.parse_args()
    stores = args.stores.split(",")
    with tempfile.TemporaryDirectory(prefix="lkr-bench-") as tmp, c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        if "sqlite" in stores:
            store = lr.open_store(f"sqlite:///{Path(tmp) / 'bench.db'}")
            floor, naive, shut = _sqlite_floor(Path(tmp) / "floor.db")
            try:
                samples = await measure(
                    store, floor, naive, args.sizes, args.rounds, args.naive_rounds
                )
            finally:
                shut()
                await store.aclose()
            report("SQLite", "bare `INSERT` txn", samples)
        if "redis" in stores:
            store = lr.open_store(url)
            rfloor, rnaive, rshut = _redis_floor(url)
            try:
                samples = await measure(
                    store, rfloor, rnaive, args.sizes, args.rounds, args.naive_rounds
                )
            finally:
                await rshut()
                await store.aclose()
            report("Redis", "`RPUSH`", samples)


if __name__ == "__main__":
    asyncio.run(main())
