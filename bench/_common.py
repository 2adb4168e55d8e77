"""What the bench scripts share: a throwaway Redis, a live AgentSession of N items,
statistics and Markdown tables.

Not a bench itself. Scripts run as ``python bench/<name>.py`` find it on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.base import Store

TEXT = "Could you move my appointment to Thursday afternoon, around three if possible? " * 3


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"10,1000"`` as ``(10, 1000)``: the ``--sizes`` option of every script."""
    return tuple(int(s) for s in text.split(",") if s.strip())


def options(doc: str | None, sizes: str, rounds: int) -> argparse.ArgumentParser:
    """The options every script takes (``--sizes``, ``--rounds``), logging quietened."""
    logging.getLogger("livekit").setLevel(logging.ERROR)
    logging.getLogger("livekit_resume").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes(sizes), help="history lengths")
    ap.add_argument("--rounds", type=int, default=rounds, help="samples per size")
    return ap


# ------------------------------------------------------------------ Redis


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:  # never the developer's own server
            return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A ``redis-server`` of this run on a free loopback port, without persistence, in a
    temporary directory; yields its URL and stops it at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory(prefix="lkr-bench-redis-") as tmp:
        port = _free_port()
        proc = subprocess.Popen(
            [
                *(binary, "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not _answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"redis-server on port {port} did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(redis_url: str | None = None) -> str:
    """One line on where the figures come from."""
    import os

    parts = [
        f"{os.cpu_count()} cores ({_cpu()})",
        f"Python {platform.python_version()}",
        f"SQLite {sqlite3.sqlite_version}",
    ]
    if redis_url:
        parts.append(f"Redis {redis_version(redis_url)} on loopback")
    try:
        import hiredis  # type: ignore[import-not-found]  # noqa: F401

        parts.append("redis-py with hiredis")
    except ImportError:
        parts.append("redis-py without hiredis")
    return ", ".join(parts)


# ------------------------------------------------------- a live AgentSession


class Bench(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="benchmark")


class NoLLM(llm.LLM):
    def chat(self, **_: object) -> llm.LLMStream:  # type: ignore[override]
        raise RuntimeError("the benchmark never asks the LLM")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Bench)
    return reg


def add_turn(session: AgentSession[None], n: int, t: float) -> None:
    """One turn as LiveKit records it: a user message and a reply, appended to the
    history and to the agent's own context."""
    agent_ctx = session.current_agent._chat_ctx
    for role, text in (("user", f"{n}: {TEXT}"), ("assistant", f"reply {n}: {TEXT}")):
        msg = llm.ChatMessage(role=role, content=[text], created_at=t)
        agent_ctx.items.append(msg)
        session.history.items.append(msg)


async def live_session(
    store: Store, size: int, key: str | None = None, *, autosave: bool = False
) -> tuple[AgentSession[None], lr.ResumableSession]:
    """A started AgentSession holding ``size`` items, checkpointed once. ``autosave``:
    its lease renewed in the background as deployed (the bench's turns, appended
    directly, trigger no save)."""
    session: AgentSession[None] = AgentSession(llm=NoLLM())
    key = key or f"bench-{size}-{uuid.uuid4().hex[:8]}"
    rs = lr.ResumableSession(store, key, registry=registry(), autosave=autosave)
    await session.start(await rs.restore(session, default=Bench))
    fill(session, size)
    await rs.checkpoint()
    return session, rs


async def plain_session(size: int) -> AgentSession[None]:
    """A started AgentSession holding ``size`` items, without livekit-resume."""
    session: AgentSession[None] = AgentSession(llm=NoLLM())
    await session.start(Bench())
    fill(session, size)
    return session


def fill(session: AgentSession[None], size: int) -> None:
    t0 = time.time() - size
    for i in range(size // 2):
        add_turn(session, i, t0 + i)


async def close(session: AgentSession[None], rs: lr.ResumableSession) -> None:
    """Release the lease without a final save, then close the session."""
    await rs._detach_and_release()
    await session.aclose()


# ------------------------------------------------------------- statistics


def ms(samples: Sequence[float], q: float = 0.5) -> float:
    """The ``q`` quantile of samples in seconds, in milliseconds (0.5: the median)."""
    if q == 0.5:
        return statistics.median(samples) * 1e3
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def fmt_ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


def times(value: float, digits: int = 1) -> str:
    """A ratio, with a multiplication sign."""
    return f"{value:.{digits}f}\u00d7"


def fmt_n(n: int) -> str:
    return f"{n:,}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, body: str) -> None:
    """Print one titled table: ``run_all.py`` copies these into docs/performance.md."""
    print(f"### {title}\n\n{body}\n", flush=True)
