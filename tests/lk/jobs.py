"""Run an entrypoint in a real LiveKit job process, without a LiveKit server.

The job process is LiveKit's own: a ``ProcJobExecutor`` (the class ``ProcPool`` spawns for
``AgentServer``), built with the arguments ``ProcPool._proc_spawn_task`` gives it, running
``job_proc_lazy_main.proc_main``. The job is a ``RunningJobInfo`` with ``fake_job=True``,
as LiveKit's ``tests/test_ipc.py`` and the console mode make it: the job process then builds
its room from ``ipc.mock_room.create_mock_room()`` (an autospec of ``rtc.Room``) and
``ctx.connect()`` awaits the mock's ``connect`` and returns at once.

The room stand-in is that mock room with three fixes, applied in the job process before the
job starts (``_initialize`` patches the cached mock):

- a working event emitter (``on``/``off``/``once``/``emit``): the mock's are no-ops, so
  LiveKit's own ``room.on("disconnected")`` and RoomIO's participant handlers would never run;
- one remote participant with the identity and attributes the test gives (the mock's is
  ``mock_user``);
- ``room.name`` is the job's room name (the mock's is ``"console"`` whatever the job says;
  a real ``rtc.Room`` reports the job's room name). The ``JOB`` line reports the mock's raw
  value as ``raw_room_name``.

Parent side::

    async with JobHarness() as harness:
        job = await harness.start_job("tests.test_job_facts:_entry_wait", room="r1")
        await job.expect("READY")
        await job.shutdown()          # what AgentServer.aclose() does to each job process
        job.kill()                    # SIGKILL; also stop() / cont() / signal(sig)

Child side (in the entrypoint, one job per process)::

    from tests.lk import jobs
    jobs.report("READY", 1)           # a line the parent reads with job.expect("READY")
    jobs.on_command("say", handler)   # handler(args) for job.send("say hello")

Built-in commands: ``ping`` (answers ``PONG``), ``join <identity>``, ``leave <identity>
<DisconnectReason name>``, ``room_disconnected`` (the server closing the room) and
``shutdown <reason>`` (``ctx.shutdown``). The harness reports ``JOB <json>`` before the
entrypoint runs, ``ENTRYPOINT_RETURNED`` or ``ENTRYPOINT_RAISED <error>`` after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import forkserver
from typing import Any, Literal, cast
from unittest.mock import create_autospec

from livekit import rtc
from livekit.agents import AgentServer, JobContext, JobProcess, job
from livekit.agents.ipc.job_proc_executor import ProcJobExecutor
from livekit.agents.ipc.mock_room import create_mock_room
from livekit.agents.ipc.supervised_proc import _mask_ctrl_c
from livekit.protocol import agent, models

StartMethod = Literal["spawn", "forkserver"]
# What AgentServer preloads in its forkserver when no plugin is registered (worker.py).
_FORKSERVER_PRELOAD = ["livekit.agents.ipc._preload", "livekit.agents.ipc._preload_freeze"]
# WorkerOptions' defaults in 1.8.9: shutdown_process_timeout (the executor's close_timeout),
# initialize_process_timeout (raised here: two cores are shared by parallel test runs) and
# session_end_timeout.
SHUTDOWN_PROCESS_TIMEOUT = 10.0
INITIALIZE_TIMEOUT = 30.0
SESSION_END_TIMEOUT = 300.0
# A job process starts in about 2 s; this bounds a broken one, it is not a timing.
LINE_TIMEOUT = 30.0


@dataclass(frozen=True)
class JobSpec:
    """What the job process needs from the harness; travels as ``user_arguments``."""

    entrypoint: str
    link_path: str
    participant_identity: str
    participant_attributes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- the job process side


class _Link:
    """The job process's line link to the harness: reports out, commands in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.handlers: dict[str, Callable[[list[str]], Any]] = {}

    def report(self, line: str) -> None:
        # A unix socket with an empty buffer sends at once: the line is out even if the
        # process is SIGKILLed right after.
        self._writer.write(line.replace("\n", " ").encode() + b"\n")

    async def serve(self) -> None:
        while line := await self._reader.readline():
            name, *args = line.decode().split()
            handler = self.handlers.get(name)
            if handler is None:
                self.report(f"UNKNOWN_COMMAND {name}")
                continue
            result = handler(args)
            if inspect.isawaitable(result):
                await result


_link: _Link | None = None
_room_participants: dict[str, rtc.RemoteParticipant] = {}


def report(*parts: object) -> None:
    """Send one line (the parts joined by spaces) to the harness."""
    if _link is None:
        raise RuntimeError("report() runs only in a job started by JobHarness")
    _link.report(" ".join(str(p) for p in parts))


def on_command(name: str, handler: Callable[[list[str]], Any]) -> None:
    """Call ``handler(args)`` (sync or async) for each ``job.send("<name> args…")``."""
    if _link is None:
        raise RuntimeError("on_command() runs only in a job started by JobHarness")
    _link.handlers[name] = handler


def remote_participant(
    identity: str, attributes: dict[str, str] | None = None
) -> rtc.RemoteParticipant:
    """A stand-in for a caller in a room (``rtc.RemoteParticipant``'s spec)."""
    p = create_autospec(rtc.RemoteParticipant, instance=True)
    p.identity = identity
    p.sid = f"PA_{identity}"
    p.name = identity
    p.kind = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
    p.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    p.attributes = dict(attributes or {})
    p.metadata = ""
    p.disconnect_reason = None
    p.track_publications = {}
    return p  # type: ignore[no-any-return]


def _initialize(proc: JobProcess) -> None:
    """``initialize_process_fnc``: make LiveKit's cached mock room a usable stand-in."""
    spec: JobSpec = cast(JobSpec, proc.user_arguments)
    room = create_mock_room()
    emitter: rtc.EventEmitter[str] = rtc.EventEmitter()
    room.on, room.off, room.once, room.emit = emitter.on, emitter.off, emitter.once, emitter.emit
    first = remote_participant(spec.participant_identity, spec.participant_attributes)
    _room_participants.clear()
    _room_participants[first.sid] = first
    room.remote_participants = _room_participants


def _builtin_commands(ctx: JobContext, spec: JobSpec) -> dict[str, Callable[[list[str]], Any]]:
    room = ctx.room

    def join(args: list[str]) -> None:
        attrs = spec.participant_attributes if args[0] == spec.participant_identity else {}
        p = remote_participant(args[0], attrs)
        _room_participants[p.sid] = p
        room.emit("participant_connected", p)

    def leave(args: list[str]) -> None:
        p = _room_participants.pop(f"PA_{args[0]}")
        p.disconnect_reason = rtc.DisconnectReason.Value(args[1])  # type: ignore[misc]
        room.emit("participant_disconnected", p)

    return {
        "ping": lambda args: report("PONG", *args),
        "join": join,
        "leave": leave,
        "room_disconnected": lambda args: room.emit(
            "disconnected", rtc.DisconnectReason.ROOM_DELETED
        ),
        "shutdown": lambda args: ctx.shutdown(" ".join(args) or "harness"),
    }


def _signal_name(sig: signal.Signals) -> str:
    handler = signal.getsignal(sig)
    if handler == signal.SIG_IGN:
        return "SIG_IGN"
    if handler == signal.SIG_DFL:
        return "SIG_DFL"
    return "handler"


async def _entrypoint(ctx: JobContext) -> None:
    """``job_entrypoint_fnc``: link up, report the job, run the test's entrypoint."""
    global _link
    spec: JobSpec = cast(JobSpec, ctx.proc.user_arguments)
    reader, writer = await asyncio.open_unix_connection(spec.link_path)
    _link = _Link(reader, writer)
    report("HELLO", ctx.job.id)
    raw_room_name = ctx.room.name
    ctx.room.name = ctx.job.room.name  # type: ignore[misc]  # what a real rtc.Room reports
    facts = {
        "job_id": ctx.job.id,
        "raw_room_name": raw_room_name,
        "room_name": ctx.room.name,
        "job_room_name": ctx.job.room.name,
        "metadata": ctx.job.metadata,
        "worker_id": ctx.worker_id,
        "pid": os.getpid(),
        "fake_job": ctx.is_fake_job(),
        "sigterm": _signal_name(signal.SIGTERM),
        "sigint": _signal_name(signal.SIGINT),
        "participants": {
            p.identity: dict(p.attributes) for p in ctx.room.remote_participants.values()
        },
    }
    report("JOB", json.dumps(facts))
    _link.handlers.update(_builtin_commands(ctx, spec))
    serve = asyncio.create_task(_link.serve(), name="job_harness_link")
    ctx.add_shutdown_callback(lambda: _close_link(serve))
    module_name, _, function_name = spec.entrypoint.partition(":")
    user_entrypoint = getattr(importlib.import_module(module_name), function_name)
    try:
        await user_entrypoint(ctx)
    except Exception as e:
        report("ENTRYPOINT_RAISED", repr(e))
        raise
    report("ENTRYPOINT_RETURNED")


async def _close_link(serve: asyncio.Task[None]) -> None:
    # Commands stop at shutdown; reports still go out until the process ends.
    serve.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serve


# ---------------------------------------------------------------- the harness side


class RunningJob:
    """One job process: its lines, its commands, its shutdown and its signals."""

    def __init__(self, executor: ProcJobExecutor, info: job.RunningJobInfo) -> None:
        self.executor = executor
        self.info = info
        self.lines: list[str] = []  # every line, in order, with its arrival in ``times``
        self.times: list[float] = []
        self._next = 0  # lines before this index were consumed by expect()
        self._arrived = asyncio.Condition()
        self._writer: asyncio.StreamWriter | None = None
        self._linked = asyncio.Event()

    @property
    def job_id(self) -> str:
        return self.info.job.id

    @property
    def pid(self) -> int:
        assert self.executor.pid is not None
        return self.executor.pid

    @property
    def exitcode(self) -> int | None:
        return self.executor.exitcode

    async def _add(self, line: str) -> None:
        async with self._arrived:
            self.lines.append(line)
            self.times.append(time.monotonic())
            self._arrived.notify_all()

    async def expect(self, prefix: str, *, timeout: float = LINE_TIMEOUT) -> str:
        """The next unread line starting with ``prefix`` (lines skipped on the way stay in
        ``lines``); fails after ``timeout`` seconds."""

        def find() -> int | None:
            for i in range(self._next, len(self.lines)):
                if self.lines[i].split(" ", 1)[0] == prefix:
                    return i
            return None

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: find() is not None), timeout)
            index = find()
            assert index is not None
            self._next = index + 1
            return self.lines[index]

    async def expect_json(self, prefix: str, *, timeout: float = LINE_TIMEOUT) -> Any:
        """The JSON after ``prefix`` on the next such line."""
        return json.loads((await self.expect(prefix, timeout=timeout)).split(" ", 1)[1])

    def arrival(self, line: str) -> float:
        """When (``time.monotonic()``) a line returned by ``expect`` arrived."""
        return self.times[self.lines.index(line)]

    async def send(self, command: str) -> None:
        """Send a command line to the job process (see the module docstring)."""
        await asyncio.wait_for(self._linked.wait(), LINE_TIMEOUT)
        assert self._writer is not None
        self._writer.write(command.encode() + b"\n")
        await self._writer.drain()

    async def shutdown(self) -> None:
        """Shut the job down as ``AgentServer.aclose()`` does after a drain: its ProcPool
        calls ``aclose()`` on each process (ShutdownRequest over ipc, then up to
        ``close_timeout`` for the ack and again for the exit after ``ShuttingDown``, then
        SIGUSR1, 0.5 s, SIGKILL). Returns when the process has exited."""
        await self.executor.aclose()

    async def wait_exit(self, *, timeout: float = LINE_TIMEOUT) -> int | None:
        """Wait for the process to end; its exit code (negative: killed by that signal)."""
        await asyncio.wait_for(self.executor.join(), timeout)
        return self.executor.exitcode

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)


def _fork_server_without_settings() -> None:
    """Start this process's one fork server now, if it is not running, with no
    ``RESUME_*`` setting in its environment: every job is forked from it, and a setting a
    test monkeypatched when the server happened to start would reach the jobs of every
    later test (which test starts it first depends on how pytest-xdist shares them out)."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("RESUME_")}
    try:
        # as LiveKit starts it (`supervised_proc._mask_ctrl_c`, around the first job's
        # Process.start): SIGINT ignored, which the server and every job inherit
        with _mask_ctrl_c():
            forkserver.ensure_running()
    finally:
        os.environ.update(saved)


class JobHarness:
    """Starts entrypoints in LiveKit job processes and talks to them over a unix socket.

    ``start_method`` is the multiprocessing start method: ``"forkserver"`` is what
    ``AgentServer`` uses on Linux (with the same preload), ``"spawn"`` what it uses
    elsewhere. ``shutdown_process_timeout`` is ``WorkerOptions.shutdown_process_timeout``.
    """

    def __init__(
        self,
        *,
        start_method: StartMethod = "forkserver",
        shutdown_process_timeout: float = SHUTDOWN_PROCESS_TIMEOUT,
    ) -> None:
        self._mp_ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._mp_ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
            _fork_server_without_settings()
        self._close_timeout = shutdown_process_timeout
        self._dir = tempfile.mkdtemp(prefix="lkjob")  # short: unix socket paths are limited
        self._link_path = os.path.join(self._dir, "link.sock")
        self._server: asyncio.AbstractServer | None = None
        self.jobs: dict[str, RunningJob] = {}
        self._adopted: asyncio.Queue[RunningJob] = asyncio.Queue()
        self._unknown: dict[str, asyncio.Future[RunningJob]] = {}

    async def __aenter__(self) -> JobHarness:
        self._server = await asyncio.start_unix_server(self._on_link, path=self._link_path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down every job still running (as a worker's aclose does), then the link."""
        running = [j for j in self.jobs.values() if j.exitcode is None]
        await asyncio.gather(*(j.shutdown() for j in running), return_exceptions=True)
        for j in self.jobs.values():
            if j._writer is not None:
                j._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def start_job(
        self,
        entrypoint: str,
        *,
        job_id: str | None = None,
        room: str = "room-1",
        metadata: str = "",
        participant_identity: str = "caller",
        participant_attributes: dict[str, str] | None = None,
        worker_id: str = "harness-worker",
    ) -> RunningJob:
        """Start a job process running ``entrypoint`` (``"module:function"``) and return once
        the job is launched and its link is up (the ``JOB`` line is then in ``lines``)."""
        spec = JobSpec(
            entrypoint=entrypoint,
            link_path=self._link_path,
            participant_identity=participant_identity,
            participant_attributes=dict(participant_attributes or {}),
        )
        info = job.RunningJobInfo(
            job=agent.Job(
                id=job_id or f"AJ_{uuid.uuid4().hex[:12]}",
                type=agent.JobType.JT_ROOM,
                room=models.Room(name=room, sid=f"RM_{uuid.uuid4().hex[:8]}"),
                metadata=metadata,
            ),
            url="fake_url",
            token="fake_token",
            accept_arguments=job.JobAcceptArguments(name="", identity="", metadata=""),
            worker_id=worker_id,
            fake_job=True,
        )
        # The arguments ProcPool._proc_spawn_task passes in 1.8.9.
        executor = ProcJobExecutor(
            initialize_process_fnc=_initialize,
            job_entrypoint_fnc=_entrypoint,
            session_end_fnc=None,
            simulation_end_fnc=None,
            inference_executor=None,
            initialize_timeout=INITIALIZE_TIMEOUT,
            close_timeout=self._close_timeout,
            session_end_timeout=SESSION_END_TIMEOUT,
            memory_warn_mb=0,
            memory_limit_mb=0,
            ping_interval=2.5,
            ping_timeout=60,
            high_ping_threshold=0.5,
            http_proxy=None,
            mp_ctx=self._mp_ctx,
            loop=asyncio.get_running_loop(),
        )
        executor.user_arguments = spec
        running = RunningJob(executor, info)
        self._register(running)
        await executor.start()
        await executor.initialize()
        await executor.launch_job(info)
        await asyncio.wait_for(running._linked.wait(), LINE_TIMEOUT)
        await running.expect("JOB")
        running._next = 0  # leave JOB readable by the test
        return running

    def serve(
        self,
        server: AgentServer,
        entrypoint: str,
        *,
        participant_identity: str = "caller",
        participant_attributes: dict[str, str] | None = None,
    ) -> None:
        """Make the jobs of an ``AgentServer`` run ``entrypoint`` through this harness.

        Run the server with ``run(unregistered=True)`` (no LiveKit server) and give it jobs
        with ``simulate_job(room, fake_job=True)``, as LiveKit's console mode does; each job
        then shows up in ``await harness.next_job()``. Its ``drain()`` and ``aclose()`` are
        the real ones.
        """
        spec = JobSpec(
            entrypoint=entrypoint,
            link_path=self._link_path,
            participant_identity=participant_identity,
            participant_attributes=dict(participant_attributes or {}),
        )
        server.setup_fnc = _initialize
        server.rtc_session(_entrypoint)

        def on_started() -> None:
            # The pool exists once the server runs; each process gets the spec before start.
            pool = server._proc_pool
            pool.on("process_created", lambda proc: setattr(proc, "user_arguments", spec))
            pool.on("process_job_launched", self._adopt)

        server.once("worker_started", on_started)

    def _adopt(self, executor: ProcJobExecutor) -> None:
        assert executor.running_job is not None
        running = RunningJob(executor, executor.running_job)
        self._register(running)
        self._adopted.put_nowait(running)

    def _register(self, running: RunningJob) -> None:
        self.jobs[running.job_id] = running
        waiter = self._unknown.pop(running.job_id, None)
        if waiter is not None:
            waiter.set_result(running)

    async def next_job(self, *, timeout: float = LINE_TIMEOUT) -> RunningJob:
        """The next job an ``AgentServer`` given to ``serve`` launched, once linked."""
        running = await asyncio.wait_for(self._adopted.get(), timeout)
        await asyncio.wait_for(running._linked.wait(), timeout)
        return running

    async def _on_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = (await reader.readline()).decode().split()
        if hello[1] in self.jobs:
            running = self.jobs[hello[1]]
        else:  # an AgentServer's job may link before process_job_launched reaches us
            waiter = self._unknown.setdefault(hello[1], asyncio.get_running_loop().create_future())
            running = await asyncio.wait_for(waiter, LINE_TIMEOUT)
        running._writer = writer
        running._linked.set()
        while line := await reader.readline():
            await running._add(line.decode().rstrip("\n"))
