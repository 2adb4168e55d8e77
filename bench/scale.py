"""Many sessions in one worker: the CPU the hooks cost, and checkpoint latency under load.

``--sessions`` live AgentSessions (text mode, ``--sizes`` items of history each) share one
process and one Redis. Each takes a turn (a user message and a reply) every
``--period`` seconds, spread evenly, for ``--duration`` seconds. The same run is done
three times: without the hooks (plain AgentSessions, the turns only), with them (a
`ResumableSession` each, autosave on so its lease is renewed in the background as
deployed, and a checkpoint after each turn), and the floor (plain sessions, each turn
followed by one plain redis-py ``RPUSH`` of as many bytes as a checkpoint sent Redis, on
a client with the store's socket timeout: what any Redis write per turn costs). The
difference in the process's
CPU time, divided by the duration, is the share of one core spent in livekit-resume (or
in the floor's writes); the hooked/floor ratio of the CPU per write says how far the
hooks are from that floor. The checkpoint latencies under that load give the p50 and
p99. Each run then does ``--back-to-back`` rounds of one turn (and its write) per
session, one after the other with no pause: the CPU per write there, against the spread
run's, says how much of a spread write is the cost of waking an idle worker. Redis's
own time executing the commands (``INFO commandstats``, reset before the run; lease
renewals included) per checkpoint gives how many such sessions one Redis core serves
at half load.

    python bench/scale.py [--sessions 200] [--period 5] [--duration 30] [--sizes 100]
                          [--back-to-back 5]

Redis is a ``redis-server`` the script starts on a free loopback port (its own CPU is
not counted). Prints a Markdown table.
"""

from __future__ import annotations

import asyncio
import time

import _common as c
from livekit.agents import AgentSession
from redis.asyncio import Redis

import livekit_resume as lr
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.client import DEFAULT_SOCKET_TIMEOUT

# The floor's write when the hooked run made no checkpoint to measure (a tiny run):
# about what a checkpoint of one turn sends (two messages, the head, the arguments).
_FLOOR_BYTES = 700


async def run(
    url: str,
    sessions: int,
    period: float,
    duration: float,
    history: int,
    hooks: bool,
    floor: int = 0,
    back_to_back: int = 0,
) -> tuple[float, list[float], float, int, float]:
    """CPU seconds the process used over ``duration``, each write's latency (a
    checkpoint, or with ``floor`` an ``RPUSH`` of that many bytes), the microseconds
    Redis spent executing commands meanwhile (``INFO commandstats``) and the bytes it
    received (``total_net_input_bytes``); then the CPU seconds of ``back_to_back``
    rounds of a turn (and its write) per session with no pause between them."""
    store = RedisStore.from_url(url)
    live: list[tuple[AgentSession[None], lr.ResumableSession | None]] = []
    for _ in range(sessions):
        if hooks:
            live.append(await c.live_session(store, history, autosave=True))
        else:
            live.append((await c.plain_session(history), None))
    latencies: list[float] = []
    client = Redis.from_url(url)
    # the floor's writes go through a client of their own, configured as the store's
    plain = Redis.from_url(url, socket_timeout=DEFAULT_SOCKET_TIMEOUT)
    payload = b"x" * floor
    await client.config_resetstat()
    received = int((await client.info("stats"))["total_net_input_bytes"])

    turns = [history] * sessions

    async def turn(index: int) -> float:
        """One turn of session ``index`` and its write; the write's latency."""
        session, rs = live[index]
        c.add_turn(session, turns[index], time.time())
        turns[index] += 1
        start = time.perf_counter()
        if floor:
            await plain.rpush(f"floor:{index}", payload)
        elif rs is not None:
            await rs.checkpoint("turn")
        return time.perf_counter() - start

    async def talk(index: int) -> None:
        await asyncio.sleep(period * index / sessions)  # spread the turns evenly
        while True:
            took = await turn(index)
            if floor or hooks:
                latencies.append(took)
            await asyncio.sleep(period)

    tasks = [asyncio.create_task(talk(i)) for i in range(sessions)]
    cpu = time.process_time()
    await asyncio.sleep(duration)
    cpu = time.process_time() - cpu
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    received = int((await client.info("stats"))["total_net_input_bytes"]) - received
    stats = await client.info("commandstats")
    redis_usec = sum(
        float(v["usec"]) for k, v in stats.items() if k not in ("cmdstat_config", "cmdstat_info")
    )
    rounds = time.process_time()
    for _ in range(back_to_back):
        for index in range(sessions):
            await turn(index)
    rounds = time.process_time() - rounds
    await client.aclose()
    await plain.aclose()
    for session, rs in live:
        if rs is None:
            await session.aclose()
        else:
            await c.close(session, rs)
    await store.aclose()
    return cpu, latencies, redis_usec, received, rounds


async def main() -> None:
    ap = c.options(__doc__, "100", 0)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--period", type=float, default=5.0, help="seconds between turns")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    ap.add_argument(
        "--back-to-back", type=int, default=5, help="rounds of turns with no pause, per run"
    )
    args = ap.parse_args()
    history = args.sizes[0]
    spread = (args.sessions, args.period, args.duration, history)
    with c.redis_server() as url:
        print(f"<!-- {c.machine(url)} -->\n")
        bare, _, _, _, bare_b2b = await run(url, *spread, False, 0, args.back_to_back)
        hooked, lat, usec, received, hooked_b2b = await run(
            url, *spread, True, 0, args.back_to_back
        )
        # as many bytes per write as the hooked run sent per checkpoint (renewals too)
        sent = round(received / len(lat)) if lat else _FLOOR_BYTES
        floor, floor_lat, _, _, floor_b2b = await run(url, *spread, False, sent, args.back_to_back)
    share = (hooked - bare) / args.duration
    per_checkpoint = (hooked - bare) / max(1, len(lat))
    per_floor = (floor - bare) / max(1, len(floor_lat))
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
                    c.fmt_ms(per_checkpoint * 1e3),
                    c.fmt_ms(c.ms(lat)) if lat else "—",
                    c.fmt_ms(c.ms(lat, 0.99)) if lat else "—",
                    f"{per_commit:.0f} µs",
                    f"{per_primary:,.0f}",
                ]
            ],
        ),
    )
    c.section(
        f"The floor: the same turns, each followed by one plain redis-py RPUSH of {sent:,} "
        "bytes (what the hooked run sent Redis per checkpoint, lease renewals included) "
        "instead of a checkpoint",
        c.table(
            [
                "writes",
                "CPU share (hooks)",
                "CPU share (floor)",
                "CPU per checkpoint",
                "CPU per RPUSH",
                "hooked / floor, per write",
                "RPUSH p50 under load",
                "p99",
            ],
            [
                [
                    len(floor_lat),
                    f"{share:.1%}",
                    f"{(floor - bare) / args.duration:.1%}",
                    c.fmt_ms(per_checkpoint * 1e3),
                    c.fmt_ms(per_floor * 1e3),
                    c.times(per_checkpoint / per_floor) if per_floor > 0 else "—",
                    c.fmt_ms(c.ms(floor_lat)) if floor_lat else "—",
                    c.fmt_ms(c.ms(floor_lat, 0.99)) if floor_lat else "—",
                ]
            ],
        ),
    )
    writes = args.back_to_back * args.sessions
    if writes:
        b2b_checkpoint = (hooked_b2b - bare_b2b) / writes
        b2b_floor = (floor_b2b - bare_b2b) / writes
        c.section(
            f"The same writes back to back: {args.back_to_back} rounds of a turn and its "
            f"write per session, no pause between them ({writes:,} writes per run; the "
            "turns alone subtracted)",
            c.table(
                [
                    "CPU per checkpoint",
                    "CPU per RPUSH",
                    "hooked / floor, per write",
                    "checkpoint: spread / back to back",
                    "RPUSH: spread / back to back",
                ],
                [
                    [
                        c.fmt_ms(b2b_checkpoint * 1e3),
                        c.fmt_ms(b2b_floor * 1e3),
                        c.times(b2b_checkpoint / b2b_floor) if b2b_floor > 0 else "—",
                        c.times(per_checkpoint / b2b_checkpoint) if b2b_checkpoint > 0 else "—",
                        c.times(per_floor / b2b_floor) if b2b_floor > 0 else "—",
                    ]
                ],
            ),
        )


if __name__ == "__main__":
    asyncio.run(main())
