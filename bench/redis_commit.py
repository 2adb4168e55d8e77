"""Does a Redis checkpoint cost the same at 10 and at 5,000 items of history?

    python bench/redis_commit.py [--keys 40] [--rounds 8]

Starts its own ``redis-server`` on a free loopback port (never 6379, never a server
you run), in a temporary directory without persistence, and times per-turn commits of
`RedisStore` (3 new records of ~300 bytes plus a ~400-byte head: one Lua script) on
sessions already holding 10, 100, 1,000 and 5,000 items. Each history size gets
``--keys`` sessions; rounds visit them in turn, one session of every size after
another (so drift on a shared machine hits all sizes alike), and a session grows by at
most ``3 * rounds`` items while it is measured.

Next to it, in the same run and on the same connection pool:

- the floor: one raw ``RPUSH`` of the same new bytes, and a ``PING``;
- the full-rewrite baseline: LiveKit's ``ChatContext.to_dict()`` of a history of the
  same size, ``json.dumps``, one ``SET`` (what saving the whole context every turn costs).

Prints medians and p99s in milliseconds with ratios, and whether the median commit at
5,000 items is within 2x of the one at 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from livekit.agents import llm
from redis.asyncio import Redis

from livekit_resume.stores.base import Commit, Record
from livekit_resume.stores.redis import RedisStore

HISTORIES = (10, 100, 1000, 5000)
ITEM_BYTES = 300  # a short chat message or tool call
HEAD_BYTES = 400  # the snapshot without its items
PER_TURN = 3  # user message, assistant reply, a tool output
PRELOAD_BATCH = 1000  # records per commit while filling a history

_rng = random.Random(1)


def _text(n: int) -> str:
    return _rng.randbytes((n + 1) // 2).hex()[:n]


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


class Server:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found on PATH")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 10
        client = Redis(port=self.port)
        try:
            while True:
                try:
                    await client.ping()
                    return
                except OSError:
                    pass
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class Session:
    store: RedisStore
    key: str
    epoch: int
    version: int = 0
    items: int = 0

    def records(self, count: int) -> list[Record]:
        out = []
        for _ in range(count):
            after = f"item-{self.items - 1}" if self.items else None
            out.append(Record("history", f"item-{self.items}", _text(ITEM_BYTES).encode(), after))
            self.items += 1
        return out

    async def commit(self, count: int) -> None:
        records = self.records(count)
        self.version = await self.store.commit(
            Commit(
                self.key,
                self.epoch,
                self.version,
                _text(HEAD_BYTES).encode(),
                records,
                self.items,
                {"state": "active", "reason": "turn"},
            )
        )


def _chat_context(items: int) -> llm.ChatContext:
    ctx = llm.ChatContext()
    for n in range(items):
        ctx.add_message(role="user" if n % 2 else "assistant", content=_text(ITEM_BYTES))
    return ctx


async def _timed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await call()
    return (time.perf_counter() - start) * 1000


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(port: int, keys: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """Sizes are measured interleaved (each round visits one session of every size in
    turn), so a noisy neighbour or a growing server slows them all alike."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", namespace="bench")
    client = Redis(port=port)
    sessions: dict[int, list[Session]] = {h: [] for h in HISTORIES}
    contexts = {h: _chat_context(h) for h in HISTORIES}  # rewritten whole, kept at size
    results: dict[int, dict[str, list[float]]] = {
        h: {"commit": [], "rpush": [], "ping": [], "rewrite": []} for h in HISTORIES
    }
    try:
        for history in HISTORIES:
            for k in range(keys):
                key = f"h{history}-{k}"
                lease = await store.acquire(key, "bench")
                s = Session(store, key, lease.epoch)
                while s.items < history:
                    await s.commit(min(PRELOAD_BATCH, history - s.items))
                sessions[history].append(s)
        for _ in range(rounds):
            for k in range(keys):
                for history in HISTORIES:
                    samples = results[history]
                    s = sessions[history][k]
                    samples["commit"].append(await _timed(partial(s.commit, PER_TURN)))
                    blobs = [_text(ITEM_BYTES).encode() for _ in range(PER_TURN)]

                    async def rpush(blobs: list[bytes] = blobs) -> None:
                        await client.rpush("bench:floor", *blobs)

                    samples["rpush"].append(await _timed(rpush))
                    samples["ping"].append(await _timed(client.ping))
        # The baseline in a pass of its own: a 100 ms rewrite would disturb the next commit.
        for _ in range(rounds):
            for k in range(keys):
                for history in HISTORIES:

                    async def rewrite(history: int = history, key: str = f"{k}") -> None:
                        payload = json.dumps(contexts[history].to_dict())
                        await client.set(f"bench:rewrite:{history}:{key}", payload)

                    results[history]["rewrite"].append(await _timed(rewrite))
        await client.delete("bench:floor")
    finally:
        await store.aclose()
        await client.aclose()
    return results


def report(results: dict[int, dict[str, list[float]]]) -> None:
    head = (
        f"{'history':>8} {'commit p50':>11} {'commit p99':>11} {'rpush p50':>10} "
        f"{'ping p50':>9} {'rewrite p50':>12} {'rewrite p99':>12} "
        f"{'commit/rpush':>13} {'rewrite/commit':>15}"
    )
    print(head)
    print("-" * len(head))
    med: dict[int, float] = {}
    for history, s in results.items():
        c50, r50 = statistics.median(s["commit"]), statistics.median(s["rpush"])
        w50 = statistics.median(s["rewrite"])
        med[history] = c50
        print(
            f"{history:>8} {c50:>11.3f} {_p(s['commit'], 0.99):>11.3f} {r50:>10.3f} "
            f"{statistics.median(s['ping']):>9.3f} {w50:>12.3f} {_p(s['rewrite'], 0.99):>12.3f} "
            f"{c50 / r50:>12.1f}x {w50 / c50:>14.1f}x"
        )
    print("(milliseconds; commit = RedisStore.commit of 3 new ~300-byte records + head)")
    lo, hi = med[HISTORIES[0]], med[HISTORIES[-1]]
    verdict = "within" if hi <= 2 * lo else "NOT within"
    print(
        f"\nmedian commit at {HISTORIES[-1]} items is {hi / lo:.2f}x the one at "
        f"{HISTORIES[0]}: {verdict} 2x"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=40, help="sessions per history size")
    parser.add_argument("--rounds", type=int, default=8, help="turns per session")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            await server.ready()
            print(
                f"redis-server on 127.0.0.1:{server.port}, {args.keys} sessions x "
                f"{args.rounds} turns per history size\n"
            )
            report(await measure(server.port, args.keys, args.rounds))
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
