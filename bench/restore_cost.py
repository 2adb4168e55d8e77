"""Restore cost against the naive load, stored bytes and Redis memory per session.

For each history length a real AgentSession (text mode) holds N items, is checkpointed
into a Redis store and released. Then, sizes visited in turn each round:

- ``restore``: `ResumableSession.restore` of it into a new `AgentSession` through the
  public API (lease, load, verify and decode every record, rebuild the history, the
  agent and its context), with the time CPython's cyclic garbage collector ran
  meanwhile (on any thread: its collections hold the GIL, and grow with the heap);
- ``naive``: ``GET`` + ``json.loads`` + ``ChatContext.from_dict`` of the same history,
  saved beforehand as ``ChatContext.to_dict(exclude_timestamp=False)`` JSON (what an
  app without this library would keep);
- ``floor``: the least any restore of these LiveKit items costs: ``GET`` of them as one
  msgpack blob, ``msgpack.unpackb`` (C) and each item made as cheaply as Python allows
  (``__new__`` and its pydantic slots set, as our fast path does), with no checksum, no
  check of any value, no lease and no agent: what is left of a restore once everything
  it must do is taken out.

And once per size: the bytes the store holds for the session (head and records, as
``Store.load`` returns them) against the ``to_dict`` JSON, and Redis ``MEMORY USAGE``
summed over the session's keys. The histories above are saved in one checkpoint; a
conversation is saved a turn at a time, so the same is measured again for a history
saved by one checkpoint per turn (two items), with what Redis holds for it: every
retained version's record (its head and fields) and every log element, not only what a
load returns.

Then, for histories up to 1,000 items, a restore as a new worker process makes it after
a crash (``--processes`` of them per size, each started afresh): the store's first call
(``info``, as `resumable_job` makes it: the connection and the server's settings check),
the first restore, and a second restore in the same process (warm: what the tables
above measure).

    python bench/restore_cost.py [--sizes 10,1000,5000,20000] [--rounds 10] [--processes 6]

Redis is a ``redis-server`` the script starts on a free loopback port. Prints Markdown
tables: medians and p99 in milliseconds, ratios.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import typing
from typing import Any

import _common as c
import msgpack
from livekit.agents import AgentSession, llm
from pydantic import BaseModel
from redis.asyncio import Redis

import livekit_resume as lr
from livekit_resume.snapshot.chat import _set_dict, _set_extra, _set_fields_set, _set_private
from livekit_resume.stores.redis import RedisStore


class GCTime:
    """Seconds spent in cyclic garbage collections, on any thread, while counting."""

    def __init__(self) -> None:
        self.total, self._start = 0.0, 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


GC = GCTime()


async def restore_once(store: RedisStore, key: str, size: int) -> tuple[float, float]:
    """The restore's wall time, and the time the cyclic garbage collector ran meanwhile."""
    session: AgentSession[None] = AgentSession(llm=c.NoLLM())
    rs = lr.ResumableSession(store, key, registry=c.registry(), autosave=False)
    collected = GC.total
    start = time.perf_counter()
    await rs.restore(session, default=c.Bench)
    took = time.perf_counter() - start
    collected = GC.total - collected
    if not rs.resumed or len(session.history.items) < size:
        raise AssertionError(f"restore of {key} found {len(session.history.items)} items")
    await c.close(session, rs)
    return took, collected


async def naive_once(client: Redis, key: str, size: int) -> tuple[float, float]:
    """The naive load's wall time, and the collector's time in it (as `restore_once`):
    run in the same process, it pays for collections the restore before it left due."""
    collected = GC.total
    start = time.perf_counter()
    raw = await client.get(key)
    ctx = llm.ChatContext.from_dict(json.loads(raw))
    took = time.perf_counter() - start
    collected = GC.total - collected
    if len(ctx.items) < size:
        raise AssertionError(f"naive load of {key} found {len(ctx.items)} items")
    return took, collected


# LiveKit's chat item classes by their ``type`` field
_ITEM_CLASSES: dict[str, type[BaseModel]] = {
    cls.model_fields["type"].default: cls
    for cls in typing.get_args(typing.get_args(llm.ChatItem)[0])
}


async def floor_once(client: Redis, key: str, size: int) -> float:
    start = time.perf_counter()
    raw = await client.get(key)
    items = []
    for values in msgpack.unpackb(raw, raw=False):
        cls = _ITEM_CLASSES[values["type"]]
        item = cls.__new__(cls)
        # its slots set through their descriptors, as our fast path sets them
        _set_dict(item, values)
        _set_fields_set(item, set(values))
        _set_extra(item, None)
        _set_private(item, None)
        items.append(item)
    ctx = llm.ChatContext(items)
    took = time.perf_counter() - start
    if len(ctx.items) < size:
        raise AssertionError(f"floor load of {key} found {len(ctx.items)} items")
    return took


def _pattern(prefix: str) -> str:
    return prefix.replace("{", "\\{").replace("}", "\\}") + "*"


async def memory_usage(client: Redis, prefix: str) -> int:
    total = 0
    async for name in client.scan_iter(match=_pattern(prefix)):
        total += int(await client.memory_usage(name, samples=0) or 0)
    return total


async def value_bytes(client: Redis, prefix: str) -> int:
    """The bytes of every value the session's keys hold (a hash's fields and values, a
    list's elements, a string): what Redis keeps before its own overhead."""
    total = 0
    async for name in client.scan_iter(match=_pattern(prefix)):
        kind = await client.type(name)
        if kind == b"hash":
            total += sum(len(k) + len(v) for k, v in (await client.hgetall(name)).items())
        elif kind == b"list":
            total += sum(map(len, await client.lrange(name, 0, -1)))
        elif kind == b"string":
            total += len(await client.get(name) or b"")
    return total


async def turn_by_turn(store: RedisStore, client: Redis, size: int) -> dict[str, float]:
    """A history of ``size`` items saved as a conversation is: a checkpoint per turn."""
    session, rs = await c.live_session(store, 0)
    for n in range(size // 2):
        c.add_turn(session, n, time.time())
        await rs.checkpoint()
    whole = json.dumps(session.history.to_dict(exclude_timestamp=False)).encode()
    await c.close(session, rs)
    prefix = store._names.prefix(rs.key)
    return {
        "checkpoints": size // 2,
        "stored": _stored_bytes(await store.load(rs.key)),
        "values": await value_bytes(client, prefix),
        "json": len(whole),
        "memory": await memory_usage(client, prefix),
    }


def _stored_bytes(stored: lr.Stored) -> int:
    return len(stored.head) + sum(
        len(data) for items in stored.streams.values() for _, data in items
    )


async def measure(url: str, sizes: tuple[int, ...], rounds: int) -> dict[int, dict[str, float]]:
    store = RedisStore.from_url(url)
    client = Redis.from_url(url)
    keys: dict[int, str] = {}
    out: dict[int, dict[str, float]] = {}
    try:
        for size in sizes:
            session, rs = await c.live_session(store, size)
            keys[size] = rs.key
            whole = json.dumps(session.history.to_dict(exclude_timestamp=False)).encode()
            await client.set(f"naive:{rs.key}", whole)
            dumped = [item.model_dump() for item in session.history.items]
            await client.set(f"floor:{rs.key}", msgpack.packb(dumped, use_bin_type=True))
            await c.close(session, rs)
            out[size] = {
                "stored": _stored_bytes(await store.load(rs.key)),
                "json": len(whole),
                "memory": await memory_usage(client, store._names.prefix(rs.key)),
            }
            turns = await turn_by_turn(store, client, size)
            out[size].update({f"turns_{name}": value for name, value in turns.items()})
        times: dict[int, dict[str, list[float]]] = {
            s: {"restore": [], "gc": [], "naive": [], "naive_gc": [], "floor": []} for s in sizes
        }
        for r in range(rounds + 1):  # the first warms caches and code paths
            for size in sizes:
                took, collected = await restore_once(store, keys[size], size)
                naive, naive_gc = await naive_once(client, f"naive:{keys[size]}", size)
                floor = await floor_once(client, f"floor:{keys[size]}", size)
                if r:
                    times[size]["floor"].append(floor)
                    times[size]["restore"].append(took)
                    times[size]["gc"].append(collected)
                    times[size]["naive"].append(naive)
                    times[size]["naive_gc"].append(naive_gc)
        for size, t in times.items():
            out[size].update(
                restore=c.ms(t["restore"]),
                restore_p99=c.ms(t["restore"], 0.99),
                gc=c.ms(t["gc"]),
                naive=c.ms(t["naive"]),
                naive_p99=c.ms(t["naive"], 0.99),
                naive_gc=c.ms(t["naive_gc"]),
                floor=c.ms(t["floor"]),
            )
    finally:
        await client.aclose()
        await store.aclose()
    return out


def report(results: dict[int, dict[str, float]]) -> None:
    rows = []
    prev: tuple[int, float] | None = None
    for size, r in results.items():
        ratio = r["restore"] / r["naive"]
        verdict = f"{c.times(ratio)} slower" if ratio >= 1 else f"{c.times(1 / ratio)} faster"
        growth = "—"
        if prev is not None:
            growth = f"{c.times(r['restore'] / prev[1])} for {c.times(size / prev[0], 0)} items"
        prev = (size, r["restore"])
        rows.append(
            [
                c.fmt_n(size),
                c.fmt_ms(r["restore"]),
                c.fmt_ms(r["restore_p99"]),
                c.fmt_ms(r["gc"]),
                c.fmt_ms(r["naive"]),
                c.fmt_ms(r["naive_p99"]),
                c.fmt_ms(r["naive_gc"]),
                f"ours {verdict}",
                growth,
                c.fmt_ms(r["floor"]),
                c.times(r["restore"] / r["floor"]),
                c.times(r["naive"] / r["floor"]),
            ]
        )
    c.section(
        "Restore on Redis: `ResumableSession.restore` vs `GET` + `json.loads` + `from_dict`, "
        "and the floor (`GET` + `msgpack` + bare build)",
        c.table(
            [
                "history",
                "restore p50",
                "p99",
                "cyclic GC in it p50",
                "naive p50",
                "p99",
                "cyclic GC in it p50",
                "ours / naive",
                "growth",
                "floor p50",
                "ours / floor",
                "naive / floor",
            ],
            rows,
        ),
    )
    rows = [
        [
            c.fmt_n(size),
            f"{r['stored']:,.0f} B",
            f"{r['json']:,.0f} B",
            c.times(r["stored"] / r["json"], 2),
            f"{r['memory']:,.0f} B",
            c.times(r["memory"] / r["stored"], 2),
        ]
        for size, r in results.items()
    ]
    c.section(
        "Stored bytes and Redis memory per session, the history saved in one checkpoint",
        c.table(
            [
                "history",
                "stored (head + records)",
                "`to_dict` JSON",
                "stored / JSON",
                "Redis `MEMORY USAGE` (session keys)",
                "memory / stored",
            ],
            rows,
        ),
    )


def report_turns(results: dict[int, dict[str, float]]) -> None:
    rows = []
    for size, r in results.items():
        memory = r["turns_memory"]
        rows.append(
            [
                c.fmt_n(size),
                f"{r['turns_checkpoints']:,.0f}",
                f"{r['turns_stored']:,.0f} B",
                f"{r['turns_values']:,.0f} B",
                f"{r['turns_json']:,.0f} B",
                f"{memory:,.0f} B",
                c.times(memory / r["turns_stored"], 2),
                c.times(memory / r["turns_values"], 2),
                c.times(r["turns_values"] / r["turns_json"], 2),
                c.times(memory / r["turns_json"], 2),
            ]
        )
    c.section(
        "Stored bytes and Redis memory per session, the history saved a turn (two items) "
        "at a time, as a conversation is, with the store's default `keep`",
        c.table(
            [
                "history",
                "checkpoints",
                "stored (head + records)",
                "values Redis holds (every retained version, the log)",
                "`to_dict` JSON",
                "Redis `MEMORY USAGE` (session keys)",
                "memory / stored",
                "memory / values",
                "values / JSON",
                "memory / JSON",
            ],
            rows,
        ),
    )


NEW_PROCESS_UP_TO = 1000


async def in_new_process(url: str, key: str, size: int) -> None:
    """Run in a child: print the seconds of the first store call, the first restore and a
    second one, as JSON."""
    store = RedisStore.from_url(url)
    start = time.perf_counter()
    await store.info(key)
    took = [time.perf_counter() - start]
    for _ in range(2):
        took.append((await restore_once(store, key, size))[0])
    await store.aclose()
    print(json.dumps(took))


async def new_processes(url: str, sizes: tuple[int, ...], processes: int) -> dict[int, list[float]]:
    """Per size: the medians of `in_new_process` over ``processes`` fresh children."""
    store = RedisStore.from_url(url)
    out: dict[int, list[float]] = {}
    try:
        for size in (s for s in sizes if s <= NEW_PROCESS_UP_TO):
            session, rs = await c.live_session(store, size)
            await c.close(session, rs)
            samples = []
            for _ in range(processes):
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--child",
                    url,
                    rs.key,
                    str(size),
                    stdout=asyncio.subprocess.PIPE,
                )
                out_bytes, _ = await child.communicate()
                if child.returncode:
                    raise RuntimeError(f"the restore in a new process exited {child.returncode}")
                samples.append(json.loads(out_bytes.decode().strip().splitlines()[-1]))
            out[size] = [c.ms([s[i] for s in samples]) for i in range(3)]
    finally:
        await store.aclose()
    return out


def report_new_processes(results: dict[int, list[float]], processes: int) -> None:
    rows = [
        [c.fmt_n(size), c.fmt_ms(info), c.fmt_ms(first), c.fmt_ms(second), c.times(first / second)]
        for size, (info, first, second) in results.items()
    ]
    c.section(
        f"Restore in a new worker process, Redis ({processes} processes per size, p50)",
        c.table(
            [
                "history",
                "first store call (`info`: connection, settings check)",
                "first restore",
                "second restore, same process",
                "first / second",
            ],
            rows,
        ),
    )


async def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        c.options(None, "10", 1)  # logging quietened as in the parent
        await in_new_process(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = c.options(__doc__, "10,1000,5000,20000", 10)
    ap.add_argument("--processes", type=int, default=6, help="new processes per size")
    args = ap.parse_args()
    with c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        results = await measure(url, args.sizes, args.rounds)
        report(results)
        report_turns(results)
        if args.processes > 0:
            fresh = await new_processes(url, args.sizes, args.processes)
            report_new_processes(fresh, args.processes)


if __name__ == "__main__":
    asyncio.run(main())
