"""A pre-warmed fork server, and the parent's side of it.

Starting a Python process that imports livekit-agents costs about two seconds, so
hundreds of killed workers would take minutes as fresh interpreters. The server imports
everything once (``python -m tests.faults.forkserver``), then forks one child per run;
each child builds its own event loop, opens its own store connections and talks to the
test over a Unix socket (one line per fact, see `Channel`). livekit-agents starts no
thread at import (checked at start-up: the server refuses to fork with threads alive).

Commands and replies are JSON lines on the server's stdin and stdout:

    {"op": "spawn", "worker": NAME, "args": {...}, "sock": PATH, "token": T, "log": PATH}
        -> {"pid": N}
    {"op": "signal", "pid": N, "sig": 9}  -> {"ok": true}  (false: already exited)

The server reaps its children itself and signals only children it has not reaped, so
a pid it signals can never be another process's reused pid. When its stdin closes (the
test process went away) it SIGKILLs every child still alive and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests import ROOT, child_env

# Importing livekit-agents takes ~2 s; a loaded CI box may need several times that.
START_DEADLINE = 120.0
# Every child line arrives within this on a healthy run; it bounds a hang, not a timing.
LINE_DEADLINE = 60.0


# ----------------------------------------------------------------- child side


class Channel:
    """The child's line to the test: ``say("COMMIT", 7)`` sends ``COMMIT 7``."""

    def __init__(self, path: str, token: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self.say("HELLO", token)

    def say(self, *words: object) -> None:
        # A blocking send of one short line on a local socket: done before the next
        # await, so a line is out before anything that follows it can happen.
        self._sock.sendall((" ".join(str(w) for w in words) + "\n").encode())

    def close(self) -> None:
        self._sock.close()


def _child(req: dict[str, Any], wake_r: int, wake_w: int) -> int:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(wake_r)
    os.close(wake_w)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    random.seed(req["args"].get("seed"))
    from tests.faults.workers import WORKERS  # imported by the server already: no cost

    channel = Channel(req["sock"], req["token"])

    async def work() -> None:  # asyncio.run takes a coroutine; a worker returns an awaitable
        await WORKERS[req["worker"]](channel, req["args"])

    try:
        asyncio.run(work())
    except BaseException as e:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            channel.say("ERROR", f"{type(e).__name__}: {e}".replace("\n", " "))
        return 1
    return 0


def serve() -> None:
    """The server's main loop (run as ``python -m tests.faults.forkserver``)."""
    import tests.faults.workers  # noqa: F401  the expensive imports, once

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        raise SystemExit(f"fork server: threads alive after import, fork is unsafe: {alive}")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()

    def reap() -> None:
        while children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)

    def reply(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    reply({"ready": os.getpid()})
    pending = b""
    while True:
        readable, _, _ = select.select([0, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            reap()
        if 0 not in readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            req = json.loads(raw)
            reap()
            if req["op"] == "spawn":
                pid = os.fork()
                if pid == 0:
                    os._exit(_child(req, wake_r, wake_w))
                children.add(pid)
                reply({"pid": pid})
            elif req["op"] == "signal":
                ok = req["pid"] in children
                if ok:
                    os.kill(req["pid"], req["sig"])
                reply({"ok": ok})
            else:
                reply({"error": f"unknown op {req['op']!r}"})
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap()


# ---------------------------------------------------------------- parent side


class ForkServer:
    """The parent's handle on one fork server process (shared by a whole test session)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "forkserver.log"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ForkServer:
        env = child_env()
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.forkserver"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        ready: list[bytes] = []
        reader = threading.Thread(
            target=lambda: ready.append(self._stdout().readline()), daemon=True
        )
        reader.start()
        reader.join(START_DEADLINE)
        if not ready or b"ready" not in ready[0]:
            self.stop()
            raise RuntimeError(f"fork server did not start:\n{self._tail()}")
        return self

    def _stdout(self) -> Any:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        with self._lock:
            self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self._proc.stdin.flush()
            line = self._stdout().readline()
        if not line:
            raise RuntimeError(f"fork server died:\n{self._tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        # The reply comes within milliseconds, but a fork of a big process must not
        # stall the event loop of the test that asked for it.
        return await asyncio.to_thread(self._request, msg)

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # the server kills its children and exits
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


class Child:
    """One forked worker, read line by line; its lines are kept for the assertions."""

    def __init__(self, lab: Lab, pid: int, log: Path) -> None:
        self.lab = lab
        self.pid = pid
        self.log = log
        self.lines: list[str] = []
        self.reader: asyncio.StreamReader | None = None
        # Held while the child lives: from Python 3.13 the stream protocol no longer keeps
        # the server side's writer, and a writer collected closes the socket.
        self.writer: asyncio.StreamWriter | None = None
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.exited = False

    @property
    def output(self) -> str:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return "\n".join(self.lines) + f"\n--- log {self.log} ---\n{tail}"

    async def _line(self) -> str | None:
        await asyncio.wait_for(asyncio.shield(self.connected), LINE_DEADLINE)
        assert self.reader is not None
        raw = await self.reader.readline()
        if not raw:
            self.exited = True
            return None
        line = raw.decode().rstrip("\n")
        self.lines.append(line)
        if line.startswith("ERROR"):
            raise AssertionError(f"worker {self.pid} failed:\n{self.output}")
        return line

    async def expect(self, prefix: str, *, deadline: float = LINE_DEADLINE) -> list[str]:
        """Read until a line ``prefix ...``; return its words after the prefix."""

        async def read() -> list[str]:
            while True:
                line = await self._line()
                if line is None:
                    raise AssertionError(f"worker exited before {prefix!r}:\n{self.output}")
                if line == prefix or line.startswith(prefix + " "):
                    return line.split()[1:]

        try:
            return await asyncio.wait_for(read(), deadline)
        except TimeoutError:
            raise AssertionError(f"no {prefix!r} from worker {self.pid}:\n{self.output}") from None

    async def expect_any(self, *prefixes: str, deadline: float = LINE_DEADLINE) -> list[str]:
        """Read until a line starting with one of ``prefixes``; return all its words."""

        async def read() -> list[str]:
            while True:
                line = await self._line()
                if line is None:
                    raise AssertionError(f"worker exited before {prefixes}:\n{self.output}")
                words = line.split()
                if words and words[0] in prefixes:
                    return words

        try:
            return await asyncio.wait_for(read(), deadline)
        except TimeoutError:
            raise AssertionError(f"none of {prefixes} from {self.pid}:\n{self.output}") from None

    async def drain(self, *, deadline: float = LINE_DEADLINE) -> None:
        """Read every line until the worker's end (after a kill: what it said before)."""

        async def read() -> None:
            while await self._line() is not None:
                pass

        try:
            await asyncio.wait_for(read(), deadline)
        except TimeoutError:
            raise AssertionError(f"worker {self.pid} did not exit:\n{self.output}") from None

    def words(self, prefix: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.startswith(prefix + " ")]

    async def signal(self, sig: int) -> bool:
        return bool(
            (await self.lab.server.request({"op": "signal", "pid": self.pid, "sig": sig}))["ok"]
        )

    async def kill(self) -> None:
        """SIGKILL, then read what the worker said up to its death."""
        await self.signal(signal.SIGKILL)
        await self.drain()


class Lab:
    """Spawns workers through the fork server and routes each one's socket to its `Child`."""

    def __init__(self, server: ForkServer, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        # Unix socket paths are limited to ~108 bytes: pytest's tmp paths can be longer.
        self._sockdir = tempfile.mkdtemp(prefix="faults-")
        self.sock = os.path.join(self._sockdir, "lab.sock")
        self._waiting: dict[str, Child] = {}
        self._server: asyncio.AbstractServer | None = None
        self.children: list[Child] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = (await reader.readline()).decode().split()
        child = self._waiting.pop(hello[1]) if len(hello) == 2 else None
        if child is None:
            writer.close()
            return
        child.reader = reader
        child.writer = writer
        child.connected.set_result(None)

    async def spawn(self, worker: str, **args: Any) -> Child:
        token = uuid.uuid4().hex
        log = self.workdir / f"{worker}-{token[:8]}.log"
        # Register before the fork: the child may connect before the reply reaches us.
        placeholder = Child(self, 0, log)
        self._waiting[token] = placeholder
        answer = await self.server.request(
            {
                "op": "spawn",
                "worker": worker,
                "args": args,
                "sock": self.sock,
                "token": token,
                "log": str(log),
            }
        )
        placeholder.pid = int(answer["pid"])
        self.children.append(placeholder)
        return placeholder

    async def __aenter__(self) -> Lab:
        self._server = await asyncio.start_unix_server(self._accept, path=self.sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for child in self.children:
            if not child.exited:
                with contextlib.suppress(Exception):
                    await child.signal(signal.SIGKILL)
            if child.writer is not None:
                child.writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(OSError):
            os.unlink(self.sock)
            os.rmdir(self._sockdir)


@contextlib.asynccontextmanager
async def lab(server: ForkServer, workdir: Path) -> AsyncIterator[Lab]:
    async with Lab(server, workdir) as opened:
        yield opened


if __name__ == "__main__":
    serve()
