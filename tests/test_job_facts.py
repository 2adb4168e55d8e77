"""LiveKit 1.8.9's job machinery, proven on real job processes (see docs/livekit-1.8.9.md,
"Jobs and shutdown"). Each test runs entrypoints in LiveKit job processes through
``tests.lk.jobs`` (no LiveKit server); the ``_entry_*`` functions below run in those
processes and report what they see as lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from livekit.agents import Agent, AgentServer, JobContext, WorkerOptions
from livekit.agents.ipc import job_proc_lazy_main
from livekit.agents.voice import room_io

from tests.lk import jobs
from tests.lk.jobs import JobHarness, RunningJob
from tests.lk.scripted_llm import ScriptedLLM, make_text_session

ENTRY = "tests.test_job_facts:"


# ------------------------------------------------------------ entrypoints (job process side)


def _options(ctx: JobContext) -> dict[str, Any]:
    options: dict[str, Any] = json.loads(ctx.job.metadata or "{}")
    return options


async def _report_shutdown(reason: str) -> None:
    jobs.report("CALLBACK", reason.replace(" ", "_"))


async def _entry_ready(ctx: JobContext) -> None:
    """Returns at once, as a real entrypoint does after ``session.start``."""
    ctx.add_shutdown_callback(_report_shutdown)
    jobs.report("READY")


async def _entry_slow_callback(ctx: JobContext) -> None:
    async def slow(reason: str) -> None:
        jobs.report("CB_START")
        await asyncio.sleep(120)
        jobs.report("CB_END")

    ctx.add_shutdown_callback(slow)
    jobs.report("READY")


class _Echo(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You answer briefly.")


async def _entry_session(ctx: JobContext) -> None:
    """A text session on the room stand-in; reports the room's and the session's events."""
    options = _options(ctx)
    session = make_text_session(ScriptedLLM(default="noted"))
    room = ctx.room

    room.on("participant_connected", lambda p: jobs.report("JOINED", p.identity))
    room.on(
        "participant_disconnected", lambda p: jobs.report("LEFT", p.identity, p.disconnect_reason)
    )
    session.on(
        "close", lambda ev: jobs.report("CLOSE", ev.reason.value, len(session.history.items))
    )

    async def on_shutdown(reason: str) -> None:
        items = session.history.items
        last = items[-1].text_content if items and items[-1].type == "message" else None
        jobs.report("CALLBACK", reason.replace(" ", "_"), len(items), json.dumps(last))

    ctx.add_shutdown_callback(on_shutdown)

    def linked(args: list[str]) -> None:
        participant = session.room_io.linked_participant
        jobs.report("LINKED", participant.identity if participant else None)

    jobs.on_command("linked", linked)
    await session.start(
        _Echo(),
        room=room,
        room_options=room_io.RoomOptions(
            audio_input=False,
            audio_output=False,
            text_output=False,
            close_on_disconnect=options.get("close_on_disconnect", True),
        ),
    )
    await session.room_io.wait_for_ready()
    await session.run(user_input="remember the blue door")
    jobs.report("READY", len(session.history.items))


# ------------------------------------------------------------------- helpers (test side)


async def _ping(job: RunningJob, tag: str) -> None:
    """A round trip: every line the job sent before answering is in ``job.lines``."""
    await job.send(f"ping {tag}")
    assert await job.expect("PONG") == f"PONG {tag}"


def _first(job: RunningJob, prefix: str) -> int:
    return next(i for i, line in enumerate(job.lines) if line.split(" ", 1)[0] == prefix)


def _has(job: RunningJob, prefix: str) -> bool:
    return any(line.split(" ", 1)[0] == prefix for line in job.lines)


@contextlib.asynccontextmanager
async def _worker_with_a_job(
    harness: JobHarness,
) -> AsyncIterator[tuple[AgentServer, RunningJob]]:
    """A real AgentServer, unregistered (no LiveKit server), running one fake job."""
    server = AgentServer(num_idle_processes=0, port=0, initialize_process_timeout=30.0)
    harness.serve(server, ENTRY + "_entry_ready")
    started = asyncio.Event()
    server.once("worker_started", started.set)
    run = asyncio.create_task(server.run(devmode=False, unregistered=True))
    await asyncio.wait_for(started.wait(), 30)
    await server.simulate_job("drain-room", fake_job=True)
    job = await harness.next_job()
    await job.expect("READY")
    yield server, job
    await server.aclose()  # a no-op when the test closed it already
    await asyncio.wait_for(run, 30)


# ---------------------------------------------------------------------------------- tests


async def test_job_context_identity_in_a_fake_job() -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            ENTRY + "_entry_ready",
            job_id="AJ_first",
            room="room-a",
            metadata='{"caller": "+4712345678"}',
            participant_identity="sip_+4712345678",
            participant_attributes={"sip.phoneNumber": "+4712345678"},
            worker_id="AW_one",
        )
        facts = await job.expect_json("JOB")
        await job.expect("READY")

    assert facts["job_id"] == "AJ_first"  # ctx.job.id: the dispatch's job id
    assert facts["job_room_name"] == "room-a"  # ctx.job.room.name
    # LiveKit's mock room says "console" whatever the job's room; the harness's stand-in
    # (like a real rtc.Room) reports the job's room name.
    assert facts["raw_room_name"] == "console"
    assert facts["room_name"] == "room-a"
    assert facts["metadata"] == '{"caller": "+4712345678"}'  # ctx.job.metadata, verbatim
    assert facts["worker_id"] == "AW_one"  # ctx.worker_id: RunningJobInfo.worker_id
    assert facts["fake_job"] is True
    assert facts["participants"] == {"sip_+4712345678": {"sip.phoneNumber": "+4712345678"}}
    assert facts["pid"] == job.pid


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_job_process_ignores_sigint(start_method: jobs.StartMethod) -> None:
    async with JobHarness(start_method=start_method) as harness:
        job = await harness.start_job(ENTRY + "_entry_ready")
        facts = await job.expect_json("JOB")
        await job.expect("READY")
        assert facts["sigint"] == "SIG_IGN"
        job.signal(signal.SIGINT)
        await _ping(job, "after-sigint")
        assert job.exitcode is None
        assert not _has(job, "CALLBACK")


async def test_job_process_ignores_sigterm_only_under_spawn() -> None:
    async with JobHarness(start_method="spawn") as harness:
        job = await harness.start_job(ENTRY + "_entry_ready")
        facts = await job.expect_json("JOB")
        await job.expect("READY")
        assert facts["sigterm"] == "SIG_IGN"
        job.signal(signal.SIGTERM)
        await _ping(job, "after-sigterm")
        assert job.exitcode is None


async def test_sigterm_kills_a_forkserver_job_process_without_shutdown_callbacks() -> None:
    # AgentServer's default start method on Linux. job_proc_lazy_main ignores SIGTERM only
    # when it is imported in the job process; the forkserver imported it already (preload).
    async with JobHarness(start_method="forkserver") as harness:
        job = await harness.start_job(ENTRY + "_entry_ready")
        facts = await job.expect_json("JOB")
        await job.expect("READY")
        assert facts["sigterm"] == "SIG_DFL"
        job.signal(signal.SIGTERM)
        assert await job.wait_exit() == -signal.SIGTERM
        assert not _has(job, "CALLBACK")


async def test_shutdown_request_closes_the_session_then_runs_callbacks_with_history() -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(ENTRY + "_entry_session")
        ready = await job.expect("READY")
        items = int(ready.split()[1])
        await job.shutdown()  # what AgentServer.aclose() does to each job process
        close = await job.expect("CLOSE")
        callback = await job.expect("CALLBACK")

    assert job.exitcode == 0
    # The job closes the session with aclose(): the close reason is user_initiated.
    assert close.split()[1:] == ["user_initiated", str(items)]
    assert _first(job, "CLOSE") < _first(job, "CALLBACK")
    _, reason, seen, last = callback.split(" ", 3)
    assert reason == "parent_process_shutdown"
    assert int(seen) == items  # the closed session's history is still readable
    assert json.loads(last) == "noted"


async def test_shutdown_callback_is_killed_after_shutdown_process_timeout() -> None:
    for options in (WorkerOptions, AgentServer):
        parameters = inspect.signature(options).parameters
        assert parameters["shutdown_process_timeout"].default == 10.0
    assert job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT == 60.0

    async with JobHarness() as harness:  # the default 10 s
        job = await harness.start_job(ENTRY + "_entry_slow_callback")
        await job.expect("READY")
        shutdown = asyncio.create_task(job.shutdown())
        started = job.arrival(await job.expect("CB_START"))
        await asyncio.wait_for(shutdown, 30)
        ended = asyncio.get_running_loop().time()

    # After close_timeout the supervisor sends SIGUSR1 ("dump stacks"), waits 0.5 s, then
    # SIGKILL. Under the forkserver the job process has no SIGUSR1 handler (the same import
    # effect as SIGTERM), so SIGUSR1 itself ends it.
    assert job.exitcode == -signal.SIGUSR1
    assert not _has(job, "CB_END")
    assert 9.0 <= ended - started <= 10.5 + 3.0


async def test_room_disconnect_shuts_the_job_down() -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(ENTRY + "_entry_session")
        await job.expect("READY")
        await job.send("room_disconnected")
        await job.expect("CLOSE")
        callback = await job.expect("CALLBACK")
        assert await job.wait_exit() == 0
    assert callback.split()[1] == "room_disconnected"


async def test_linked_participant_hanging_up_closes_the_session_but_not_the_job() -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(ENTRY + "_entry_session", participant_identity="alice")
        await job.expect("READY")
        await job.send("leave alice CLIENT_INITIATED")
        left = await job.expect("LEFT")
        close = await job.expect("CLOSE")
        await _ping(job, "after-close")
        assert job.exitcode is None  # the job lives on until the room closes
        assert not _has(job, "CALLBACK")
    assert left.split()[1] == "alice"
    assert close.split()[1] == "participant_disconnected"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ("{}", "CONNECTION_TIMEOUT"),  # a dropped network: not a close reason
        ('{"close_on_disconnect": false}', "CLIENT_INITIATED"),
    ],
)
async def test_participant_leaving_without_close_keeps_the_session_and_relinks_on_rejoin(
    metadata: str, reason: str
) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            ENTRY + "_entry_session", metadata=metadata, participant_identity="alice"
        )
        await job.expect("READY")
        await job.send("linked")
        assert (await job.expect("LINKED")).split()[1] == "alice"
        await job.send(f"leave alice {reason}")
        await job.expect("LEFT")
        await job.send("linked")
        assert (await job.expect("LINKED")).split()[1] == "None"
        await job.send("join alice")
        await job.expect("JOINED")
        await job.send("linked")
        assert (await job.expect("LINKED")).split()[1] == "alice"
        assert not _has(job, "CLOSE")


async def test_worker_drain_waits_for_jobs_and_tells_them_nothing() -> None:
    async with JobHarness() as harness, _worker_with_a_job(harness) as (server, job):
        with pytest.raises(asyncio.TimeoutError):
            await server.drain(timeout=1)  # the job does not end: drain times out
        await _ping(job, "after-drain")
        assert job.exitcode is None and not _has(job, "CALLBACK")
        await asyncio.wait_for(server.drain(timeout=1), 1)  # already draining: returns

        await server.aclose()  # after the drain: ShutdownRequest to every job process
        callback = await job.expect("CALLBACK")
    assert callback.split()[1] == "parent_process_shutdown"
    assert job.exitcode == 0


async def test_worker_drain_returns_when_the_jobs_end() -> None:
    async with JobHarness() as harness, _worker_with_a_job(harness) as (server, job):
        drain = asyncio.create_task(server.drain(timeout=60))
        await _ping(job, "while-draining")
        assert not drain.done()
        await job.send("shutdown call_ended")  # the job ends itself (ctx.shutdown)
        await asyncio.wait_for(drain, 30)
    assert (await job.expect("CALLBACK")).split()[1] == "call_ended"
    assert job.exitcode == 0


async def test_worker_death_cancels_the_job_without_shutdown_callbacks() -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(ENTRY + "_entry_ready")
        await job.expect("READY")
        # What the kernel does when the worker process dies: its end of the ipc socket closes.
        await job.executor._pch.aclose()
        assert await job.wait_exit() == 0
        assert not _has(job, "CALLBACK")
