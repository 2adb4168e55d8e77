"""What ``livekit-resume ls`` reads of a large namespace, on Redis and SQLite.

``--sessions`` sessions (each with one small version, released) are written into a
fresh store. Then, in turn each round, three ways of reading them:

- ``keys``: the live keys alone, one page of all of them (`KeyPages`): the floor, what
  any listing reads before a session's own record;
- ``ls``: `page_sessions`, what ``ls`` reads: the keys, then every session's info, in
  pipelines of `INFO_BATCH` sessions on Redis, in one hop to the store's thread per
  batch on SQLite (`SessionInfos`);
- ``one by one``: the same, with the store's `SessionInfos` hidden, as for a store that
  reads one info per call: `INFO_CONCURRENCY` calls in flight at a time.

Then what ``ls`` prints of them: the table drawn (`render.sessions_table`, to a console
in memory), against ``json.dumps`` of the same rows (what ``ls --json`` prints).

    python bench/listing.py [--sessions 10000] [--rounds 5] [--stores redis,sqlite]

Redis is a ``redis-server`` the script starts on a free loopback port. Prints a
Markdown table: medians in milliseconds, ratios.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import _common as c
from rich.console import Console

from livekit_resume import open_store
from livekit_resume.cli import render
from livekit_resume.cli.snapshots import Unreadable, page_sessions
from livekit_resume.stores.base import Commit, Record, Store


class _OneByOne:
    """The store, without its `SessionInfos`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name == "infos":
            raise AttributeError(name)
        return getattr(self._store, name)


async def _fill(store: Store, sessions: int) -> None:
    places = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        key = f"room-{i:06d}"
        async with places:
            lease = await store.acquire(key, "bench")
            record = Record("history", "m1", b"x" * 120, None)
            info = {"state": "suspended", "agent": "Bench", "items": 1}
            await store.commit(Commit(key, lease.epoch, 0, b"head", [record], 1, info))
            await store.release(lease)

    await asyncio.gather(*map(one, range(sessions)))


async def _timed(call: Callable[[], Awaitable[int]], sessions: int) -> float:
    start = time.perf_counter()
    listed = await call()
    took = time.perf_counter() - start
    if listed != sessions:
        raise AssertionError(f"listed {listed} of {sessions} sessions")
    return took


def _table(rows: list[dict[str, Any]]) -> int:
    """Draw ``ls``'s table as the command does; the lines drawn."""
    out = io.StringIO()
    console = Console(file=out, width=100, highlight=False, markup=False)
    console.print(render.sessions_table(rows, title="sessions"), soft_wrap=True)
    return out.getvalue().count("\n")


def _json(rows: list[dict[str, Any]]) -> int:
    """``ls --json``'s text of the same rows; its lines."""
    for row in rows:
        row.pop("updated_ts")
    return json.dumps(rows, indent=2).count('"key":')


async def measure(url: str, sessions: int, rounds: int) -> dict[str, float]:
    store = open_store(url)
    try:
        await _fill(store, sessions)

        async def keys() -> int:
            return len((await store.keys_page("", None, None))[0])  # type: ignore[attr-defined]

        async def ls(over: Store = store) -> int:
            found, _ = await page_sessions(over)
            if any(isinstance(f, Unreadable) for f in found):
                raise AssertionError("a session was listed as unreadable")
            return len(found)

        ways: dict[str, Callable[[], Awaitable[int]]] = {
            "keys": keys,
            "ls": ls,
            "one by one": lambda: ls(cast(Store, _OneByOne(store))),
        }
        times: dict[str, list[float]] = {name: [] for name in (*ways, "table", "json")}
        found, _ = await page_sessions(store)
        for r in range(rounds + 1):  # the first warms caches and code paths
            for name, way in ways.items():
                took = await _timed(way, sessions)
                if r:
                    times[name].append(took)
            for name, draw in (("table", _table), ("json", _json)):
                start = time.perf_counter()
                printed = draw(render.session_rows(found, time.time()))
                if r:
                    times[name].append(time.perf_counter() - start)
                if printed < sessions:
                    raise AssertionError(f"{name}: printed {printed} lines of {sessions}")
        return {name: c.ms(samples) for name, samples in times.items()}
    finally:
        await store.aclose()


def main() -> None:
    ap = c.options(__doc__, "", 5)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--stores", default="redis,sqlite")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lkr-bench-ls-") as tmp:
        for kind in args.stores.split(","):
            if kind == "redis":
                with c.redis_server() as url:
                    r = asyncio.run(measure(url, args.sessions, args.rounds))
            else:
                r = asyncio.run(measure(f"sqlite:///{tmp}/ls.db", args.sessions, args.rounds))
            rows.append(
                [
                    kind,
                    c.fmt_n(args.sessions),
                    c.fmt_ms(r["keys"]),
                    c.fmt_ms(r["ls"]),
                    c.fmt_ms(r["one by one"]),
                    c.times(r["ls"] / r["keys"]),
                    c.times(r["one by one"] / r["ls"]),
                    c.fmt_ms(r["table"]),
                    c.fmt_ms(r["json"]),
                    c.times(r["table"] / r["json"]),
                ]
            )
    headers = [
        "store",
        "sessions",
        "keys alone p50 (floor)",
        "`ls` reads p50",
        "one info per call p50",
        "`ls` / floor",
        "one by one / `ls`",
        "table drawn p50",
        "JSON of it p50",
        "table / JSON",
    ]
    c.section(
        "`ls` of a large namespace: the keys, then every session's info, then the table",
        c.table(headers, rows),
    )


if __name__ == "__main__":
    main()
