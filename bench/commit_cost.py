"""Does a checkpoint cost the same at 10 and at 5,000 items of history?

    python bench/commit_cost.py [--keys 20] [--rounds 15]

Times a realistic checkpoint (3 new items of ~300 bytes plus a ~400-byte head) on
sessions that already hold 10 or 5,000 items, on `SQLiteStore` and, for reference,
`MemoryStore`. Each history size gets ``--keys`` sessions (one file per size);
rounds visit them in turn, alternating sizes, so a session's history grows by at
most ``3 * rounds`` items while it is measured, and background load on the machine
weighs on both sizes alike.
A floor measured in the same run shows what SQLite alone costs for the same bytes:
one ``BEGIN IMMEDIATE`` transaction inserting them into a bare table of a file in
the same mode (WAL, synchronous=NORMAL), called directly and through a worker thread
as the store does. Prints medians and p90s in milliseconds, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from livekit_resume.stores.base import Commit, Record, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite import SQLiteStore

HISTORIES = (10, 5000)
ITEM_BYTES = 300  # a short chat message or tool call, msgpack-framed
HEAD_BYTES = 400  # the snapshot without its items: metadata, agent frame, userdata
PER_CHECKPOINT = 3  # e.g. user message, assistant reply, a tool output
PRELOAD_BATCH = 500

_rng = random.Random(1)
_TEXT = (string.ascii_letters + string.digits + " .,'").encode()


def _blob(n: int) -> bytes:
    return bytes(_rng.choice(_TEXT) for _ in range(n))


class _Session:
    def __init__(self, store: Store, key: str, epoch: int) -> None:
        self.store, self.key, self.epoch = store, key, epoch
        self.version = 0
        self.items = 0

    def _records(self, count: int) -> list[Record]:
        out = []
        for _ in range(count):
            after = f"item-{self.items - 1}" if self.items else None
            out.append(Record("history", f"item-{self.items}", _blob(ITEM_BYTES), after))
            self.items += 1
        return out

    def checkpoint(self, count: int) -> Commit:
        return Commit(
            self.key,
            self.epoch,
            self.version,
            _blob(HEAD_BYTES),
            self._records(count),
            self.items + count,
            {"state": "active", "reason": "turn"},
        )

    async def commit(self, commit: Commit) -> None:
        self.version = await self.store.commit(commit)


async def _sessions(store: Store, history: int, keys: int) -> list[_Session]:
    out = []
    for k in range(keys):
        key = f"bench-{history}-{k}"
        lease = await store.acquire(key, "bench", ttl=3600)
        s = _Session(store, key, lease.epoch)
        while s.items < history:
            await s.commit(s.checkpoint(min(PRELOAD_BATCH, history - s.items)))
        out.append(s)
    return out


async def _measure_stores(
    stores: dict[int, Store], keys: int, rounds: int
) -> dict[int, list[float]]:
    """Samples per history size, taken in turn (10, 5000, 10, ...) so that whatever else
    the machine is doing weighs on both sizes alike."""
    sessions = {h: await _sessions(store, h, keys) for h, store in stores.items()}
    for group in sessions.values():  # warm caches and code paths
        for s in group:
            await s.commit(s.checkpoint(PER_CHECKPOINT))
    samples: dict[int, list[float]] = {h: [] for h in stores}
    for _ in range(rounds):
        for k in range(keys):
            for h, group in sessions.items():
                s = group[k]
                commit = s.checkpoint(PER_CHECKPOINT)  # built outside the timed section
                start = time.perf_counter()
                await s.commit(commit)
                samples[h].append(time.perf_counter() - start)
    return samples


def _floor_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE floor (key TEXT, seq INTEGER, data BLOB, PRIMARY KEY (key, seq))")
    return conn


def _floor_insert(conn: sqlite3.Connection, seq: int, blobs: list[bytes]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO floor VALUES ('bench', ?, ?)", [(seq + i, b) for i, b in enumerate(blobs)]
    )
    conn.execute("COMMIT")


async def _measure_floor(tmpdir: Path, samples: int) -> dict[str, list[float]]:
    """The same bytes in one bare transaction, direct and through a worker thread, in turn."""
    conns = {mode: _floor_db(tmpdir / f"floor-{mode}.db") for mode in ("direct", "threaded")}
    executor = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    out: dict[str, list[float]] = {mode: [] for mode in conns}
    try:
        for n in range(samples + 20):
            for mode, conn in conns.items():
                blobs = [_blob(HEAD_BYTES)] + [_blob(ITEM_BYTES) for _ in range(PER_CHECKPOINT)]
                seq = n * len(blobs)
                start = time.perf_counter()
                if mode == "threaded":
                    await loop.run_in_executor(executor, _floor_insert, conn, seq, blobs)
                else:
                    _floor_insert(conn, seq, blobs)
                if n >= 20:  # the first ones warm up
                    out[mode].append(time.perf_counter() - start)
    finally:
        executor.shutdown()
        for conn in conns.values():
            conn.close()
    return out


def _stats(samples: list[float]) -> tuple[float, float]:
    ms = [s * 1000 for s in samples]
    return statistics.median(ms), statistics.quantiles(ms, n=10)[8]


async def main(keys: int, rounds: int) -> None:
    rows: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory(prefix="lkr-bench-") as tmp:
        tmpdir = Path(tmp)
        kinds: dict[str, Callable[[int], Store]] = {
            "memory": lambda h: MemoryStore(keep=10),
            "sqlite": lambda h: SQLiteStore(tmpdir / f"store-{h}.db", keep=10),
        }
        for name, make in kinds.items():
            stores = {h: make(h) for h in HISTORIES}
            try:
                by_history = await _measure_stores(stores, keys, rounds)
            finally:
                for store in stores.values():
                    await store.aclose()
            for h, samples in by_history.items():
                rows[f"{name} @ {h} items"] = (*_stats(samples), len(samples))
        floors = await _measure_floor(tmpdir, keys * rounds)
        for mode, label in (("direct", "direct"), ("threaded", "via worker thread")):
            rows[f"floor: bare INSERT txn, {label}"] = (*_stats(floors[mode]), len(floors[mode]))

    print(
        f"commit cost of a {PER_CHECKPOINT}-item checkpoint ({ITEM_BYTES} B items, "
        f"{HEAD_BYTES} B head); Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        "WAL + synchronous=NORMAL"
    )
    print(f"{'':40} {'median ms':>10} {'p90 ms':>10} {'samples':>8}")
    for label, (median, p90, count) in rows.items():
        print(f"{label:40} {median:10.3f} {p90:10.3f} {count:8d}")

    def ratio(a: str, b: str, col: int = 0) -> float:
        return rows[a][col] / rows[b][col]

    print()
    for name in ("sqlite", "memory"):
        big, small = f"{name} @ 5000 items", f"{name} @ 10 items"
        print(
            f"{name}: 5000/10 = {ratio(big, small):.2f} (median), {ratio(big, small, 1):.2f} (p90)"
        )
    for history in HISTORIES:
        row = f"sqlite @ {history} items"
        print(
            f"sqlite @ {history} / floor: {ratio(row, 'floor: bare INSERT txn, direct'):.2f} x "
            f"direct, {ratio(row, 'floor: bare INSERT txn, via worker thread'):.2f} x threaded "
            "(median)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=20, help="sessions per history size")
    parser.add_argument("--rounds", type=int, default=15, help="checkpoints per session")
    args = parser.parse_args()
    asyncio.run(main(args.keys, args.rounds))
