"""What a remote command costs: pause and resume sent through the store with
`lr.control(store)` against the same calls made in the worker itself (issue 16).

For each store a started AgentSession (text mode, 10 items) listens for commands; the
sender opens its own store object on the same file or server (as another process would;
the memory store can only be reached through its own object). Each round pauses, then
resumes. The local figures are ``rs.pause()`` / ``rs.resume()`` in the same run; the
ratio is what the round trip through the store adds (the owner's SQLite poll interval,
0.2 s, and the sender's answer poll, 50 ms, dominate where they apply).

    python bench/control_latency.py [--rounds 20] [--stores memory,sqlite,redis]

Prints medians in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as c

import livekit_resume as lr
from livekit_resume.stores.base import Store


async def _samples(
    store: Store, sender: Store, rounds: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    session, rs = await c.live_session(store, 10)
    remote = lr.control(sender)
    local_pause: list[float] = []
    local_resume: list[float] = []
    sent_pause: list[float] = []
    sent_resume: list[float] = []
    pairs: list[tuple[Callable[[], object], list[float], Callable[[], object], list[float]]] = [
        (rs.pause, local_pause, rs.resume, local_resume),
        (lambda: remote.pause(rs.key), sent_pause, lambda: remote.resume(rs.key), sent_resume),
    ]
    try:
        for _ in range(rounds):
            for pause, paused, resume, resumed in pairs:
                for call, into in ((pause, paused), (resume, resumed)):
                    t = time.perf_counter()
                    await call()  # type: ignore[misc]
                    into.append(time.perf_counter() - t)
    finally:
        await c.close(session, rs)
    return local_pause, local_resume, sent_pause, sent_resume


async def _run(stores: list[str], rounds: int, redis_url: str | None, tmp: Path) -> None:
    rows = []
    for kind in stores:
        if kind == "memory":
            store = sender = lr.open_store("memory://")
        elif kind == "sqlite":
            url = f"sqlite:///{tmp / 'control.db'}"
            store, sender = lr.open_store(url), lr.open_store(url)
        else:
            assert redis_url is not None
            store, sender = (lr.open_store(redis_url, namespace="bench-ctl") for _ in "ab")
        try:
            lp, lr_, sp, sr = await _samples(store, sender, rounds)
        finally:
            await store.aclose()
            if sender is not store:
                await sender.aclose()
        rows.append(
            [
                kind,
                c.fmt_ms(c.ms(lp)),
                c.fmt_ms(c.ms(sp)),
                c.times(c.ms(sp) / c.ms(lp)),
                c.fmt_ms(c.ms(lr_)),
                c.fmt_ms(c.ms(sr)),
                c.times(c.ms(sr) / c.ms(lr_)),
            ]
        )
    headers = ["store", "pause here", "pause sent", "ratio", "resume here", "resume sent", "ratio"]
    c.section(f"Remote commands ({rounds} rounds, medians)", c.table(headers, rows))


def main() -> None:
    ap = c.options(__doc__, "10", 20)
    ap.add_argument("--stores", default="memory,sqlite,redis", help="comma-separated")
    args = ap.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = stack.enter_context(c.redis_server()) if "redis" in stores else None
        print(c.machine(url))
        asyncio.run(_run(stores, args.rounds, url, tmp))


if __name__ == "__main__":
    main()
