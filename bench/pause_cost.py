"""What a paused-but-live voice session costs against a suspended one (issue 19).

N voice sessions (VAD, STT, LLM, TTS, audio in and out, no room) run on model doubles
that hold real loopback connections to a local server this script starts, as provider
plugins do (tests/lk/fake_providers.py): the STT one per recognize stream, the TTS one
in its connection pool, the LLM one kept alive. Each session hears one spoken turn and
answers it, holds ``--items`` items of history, and is paused; ``suspend_after`` then
suspends it. Measured per session, in four states:

- **paused**: live, audio off, everything held;
- **suspended**: ``suspend_after`` fired (final snapshot, lease released, AgentSession
  closed); the session object is still referenced, as a LiveKit job keeps its primary
  session until the job ends;
- **+ models closed**: ``tts.aclose()`` and ``llm.aclose()`` too (LiveKit's session close
  leaves the models' pooled connections open);
- **dropped**: no reference left (the job ended, or the key is restored elsewhere).

Sockets are the process's TCP connections to the provider server (psutil), memory is
Python's (tracemalloc) and the process's RSS, tasks are ``asyncio.all_tasks()``; each is
the difference from before the sessions were built, divided by N. Medians over rounds.

    python bench/pause_cost.py [--sessions 10] [--items 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
from livekit.agents import Agent, AgentSession, llm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' doubles

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests.lk import make_voice_session, voice_fakes
from tests.lk.fake_providers import NetLLM, NetSTT, NetTTS, ProviderServer

STATES = ("paused", "suspended", "models closed", "dropped")
METRICS = ("sockets", "tasks", "python_mib", "rss_mib")
SUSPEND_AFTER = 0.5
TEXT = "Could you move my appointment to Thursday afternoon, around three if possible?"


class Caller(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You answer callers.")


REGISTRY = lr.AgentRegistry()
REGISTRY.register(Caller)


class Call:
    """One voice session on connected model doubles, and what it takes to close it."""

    def __init__(self, server: ProviderServer, store: Store, key: str) -> None:
        self.model = NetLLM(server, ["Hello there."], default="ok")
        self.tts = NetTTS(server)
        self.session: AgentSession[Any] | None = make_voice_session(
            self.model, stt=NetSTT(server), tts=self.tts
        )
        self.rs: lr.ResumableSession | None = lr.ResumableSession(
            store, key, registry=REGISTRY, suspend_after=SUSPEND_AFTER
        )
        self.closed = asyncio.Event()
        self.session.on("close", lambda _ev: self.closed.set())

    async def talk(self, items: int) -> None:
        assert self.session is not None and self.rs is not None
        await self.session.start(await self.rs.restore(self.session, default=Caller))
        fakes = voice_fakes(self.session)
        fakes.audio_in.say("hello")
        await fakes.audio_out.wait_for_segment(1, timeout=30)
        agent_ctx = self.session.current_agent._chat_ctx
        t = time.time() - items
        for n in range(items // 2):
            for role in ("user", "assistant"):
                msg = llm.ChatMessage(role=role, content=[f"{n}: {TEXT}"], created_at=t + n)
                agent_ctx.items.append(msg)
                self.session.history.items.append(msg)
        await self.rs.checkpoint()

    async def close_io(self) -> None:
        """What a room's RoomIO does when its session closes: its input and transcript
        synchronizer go too (the doubles stand in for the room here)."""
        assert self.session is not None
        fakes = voice_fakes(self.session)
        fakes.audio_in.close()
        if fakes.synchronizer is not None:
            await fakes.synchronizer.aclose()

    async def close_models(self) -> None:
        await self.tts.aclose()
        await self.model.aclose()

    def drop(self) -> None:
        self.session = None
        self.rs = None


def _sockets(port: int) -> int:
    conns = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def _sample(port: int) -> dict[str, float]:
    gc.collect()
    return {
        "sockets": _sockets(port),
        "tasks": sum(1 for t in asyncio.all_tasks() if t.get_coro().__name__ != "_serve"),
        "python_mib": tracemalloc.get_traced_memory()[0] / 2**20,
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
    }


async def _settle(server: ProviderServer, open_now: int) -> None:
    """Wait (bounded) until the server has seen closed connections go."""
    for _ in range(200):
        if server.open_count() <= open_now:
            return
        await asyncio.sleep(0.01)


async def _warm_up(server: ProviderServer, store: Store) -> None:
    """One call through every state first: what the first session of a process allocates
    once (imports, caches) is not a cost of each session."""
    call = Call(server, store, "warm-up")
    await call.talk(10)
    assert call.rs is not None
    await call.rs.pause()
    await asyncio.wait_for(call.closed.wait(), 30)
    await call.close_io()
    await call.close_models()
    call.drop()
    await _settle(server, 0)


async def _round(sessions: int, items: int, rnd: int) -> dict[str, dict[str, float]]:
    # SQLite keeps the snapshots outside Python's heap: what stays is the sessions'
    store = lr.open_store(f"sqlite:///{tempfile.mkdtemp()}/pause.db")
    async with ProviderServer() as server:
        await _warm_up(server, store)
        tracemalloc.start()
        base = _sample(server.port)
        calls = [Call(server, store, f"pause-{rnd}-{i}") for i in range(sessions)]
        await asyncio.gather(*(c.talk(items) for c in calls))
        samples: dict[str, dict[str, float]] = {}
        for c in calls:
            assert c.rs is not None
            await c.rs.pause()
        samples["paused"] = _sample(server.port)
        await asyncio.gather(*(asyncio.wait_for(c.closed.wait(), 30) for c in calls))
        await asyncio.gather(*(c.close_io() for c in calls))
        await _settle(server, 2 * sessions)  # each keeps its pooled TTS and LLM connection
        samples["suspended"] = _sample(server.port)
        await asyncio.gather(*(c.close_models() for c in calls))
        await _settle(server, 0)
        samples["models closed"] = _sample(server.port)
        for c in calls:
            c.drop()
        del c
        samples["dropped"] = _sample(server.port)
        tracemalloc.stop()
    await store.aclose()
    return {
        state: {m: (s[m] - base[m]) / sessions for m in METRICS} for state, s in samples.items()
    }


def _ratio(a: float, b: float) -> str:
    if b <= 0:
        return "all freed" if a > 0 else "-"
    return f"{a / b:.1f}x"


async def main(sessions: int, items: int, rounds: int) -> None:
    logging.getLogger("livekit").setLevel(logging.ERROR)
    logging.getLogger("livekit_resume").setLevel(logging.ERROR)
    results = [await _round(sessions, items, r) for r in range(rounds)]
    med = {
        state: {m: statistics.median(r[state][m] for r in results) for m in METRICS}
        for state in STATES
    }
    print(
        f"{sessions} voice sessions, {items} history items each, {rounds} round(s); "
        "per session, medians"
    )
    print()
    print("| state | open sockets | asyncio tasks | Python memory (MiB) | RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for state in STATES:
        m = med[state]
        print(
            f"| {state} | {m['sockets']:.1f} | {m['tasks']:.1f} | {m['python_mib']:.3f} "
            f"| {m['rss_mib']:.2f} |"
        )
    p, s = med["paused"], med["suspended"]
    print()
    print(
        "paused / suspended: "
        + ", ".join(
            f"{name} {_ratio(p[m], s[m])}"
            for name, m in (
                ("sockets", "sockets"),
                ("tasks", "tasks"),
                ("Python memory", "python_mib"),
            )
        )
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.sessions, args.items, args.rounds))
