"""Many sessions in one worker: the CPU the hooks cost, and checkpoint latency under load.

``--sessions`` live AgentSessions (text mode, ``--sizes`` items of history each) share one
process and one Redis. Each takes a turn (a user message and a reply) every
``--period`` seconds, spread evenly, for ``--duration`` seconds. The same run is done
twice: without the hooks (the turns only) and with them (a `ResumableSession`
checkpoint after each turn). The difference in the process's CPU time, divided by the
duration, is the share of one core spent in livekit-resume; the checkpoint latencies
under that load give the p50 and p99. Redis's own time executing the commands
(``INFO commandstats``, reset before the run) per checkpoint gives how many such
sessions one Redis core serves at half load.

    python bench/scale.py [--sessions 200] [--period 5] [--duration 30] [--sizes 100]

Redis is a ``redis-server`` the script starts on a free loopback port (its own CPU is
not counted). Prints a Markdown table.
"""

from __future__ import annotations

import asyncio
import time

import _common as c
from redis.asyncio import Redis

from livekit_resume.stores.redis import RedisStore


async def run(
    url: str, sessions: int, period: float, duration: float, history: int, hooks: bool
) -> tuple[float, list[float], float]:
    """CPU seconds the process used over ``duration``, each checkpoint's latency, and
    the microseconds Redis spent executing commands meanwhile (``INFO commandstats``)."""
    store = RedisStore.from_url(url)
    live = [await c.live_session(store, history) for _ in range(sessions)]
    latencies: list[float] = []
    client = Redis.from_url(url)
    await client.config_resetstat()

    async def talk(index: int) -> None:
        session, rs = live[index]
        await asyncio.sleep(period * index / sessions)  # spread the turns evenly
        n = history
        while True:
            c.add_turn(session, n, time.time())
            n += 1
            if hooks:
                start = time.perf_counter()
                await rs.checkpoint("turn")
                latencies.append(time.perf_counter() - start)
            await asyncio.sleep(period)

    tasks = [asyncio.create_task(talk(i)) for i in range(sessions)]
    cpu = time.process_time()
    await asyncio.sleep(duration)
    cpu = time.process_time() - cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats = await client.info("commandstats")
    redis_usec = sum(float(v["usec"]) for k, v in stats.items() if k != "cmdstat_config")
    await client.aclose()
    for session, rs in live:
        await c.close(session, rs)
    await store.aclose()
    return cpu, latencies, redis_usec


async def main() -> None:
    ap = c.options(__doc__, "100", 0)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--period", type=float, default=5.0, help="seconds between turns")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    args = ap.parse_args()
    history = args.sizes[0]
    with c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        bare, _, _ = await run(url, args.sessions, args.period, args.duration, history, False)
        hooked, lat, usec = await run(
            url, args.sessions, args.period, args.duration, history, True
        )
    share = (hooked - bare) / args.duration
    per_commit = usec / max(1, len(lat))  # Redis CPU per checkpoint, microseconds
    # sessions one Redis core serves at half load, a turn every ``period`` seconds each
    per_primary = 0.5 * 1e6 / per_commit * args.period if per_commit else float("nan")
    c.section(
        f"{args.sessions} sessions in one worker, a turn every {args.period:g} s each, "
        f"{args.duration:g} s measured, Redis",
        c.table(
            [
                "checkpoints",
                "CPU without hooks",
                "CPU with hooks",
                "livekit-resume share of one core",
                "CPU per checkpoint",
                "checkpoint p50 under load",
                "p99",
                "Redis CPU per checkpoint",
                "sessions per Redis core at 50 % load",
            ],
            [
                [
                    len(lat),
                    f"{bare / args.duration:.1%}",
                    f"{hooked / args.duration:.1%}",
                    f"{share:.1%}",
                    c.fmt_ms((hooked - bare) / max(1, len(lat)) * 1e3),
                    c.fmt_ms(c.ms(lat)) if lat else "—",
                    c.fmt_ms(c.ms(lat, 0.99)) if lat else "—",
                    f"{per_commit:.0f} µs",
                    f"{per_primary:,.0f}",
                ]
            ],
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
