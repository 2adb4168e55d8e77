"""Hunt: the operator's remote commands (pause/resume/suspend) against live sessions,
and the operator's rm/import/ls around them.

Real `AgentSession`s in text mode driven by ``session.run(user_input=...)`` with the
test kit's scripted LLM; real SQLite files in tmp_path; the CLI as a real subprocess
where the exit code and message matter. Each test is a defect reproduction that fails
on the current code unless its docstring says "passes: coverage".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent

import livekit_resume as lr
from tests import child_env
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_pause_hunt import KEY, WAIT, Clerk, registry, started

WAITING = 10.0


@pytest.fixture
async def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/hunt.db"


async def _close(*things: Any) -> None:
    for thing in things:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(thing.aclose(), WAIT)


async def cli(url: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``python -m livekit_resume --store URL --json ARGS`` in a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit_resume", "--store", url, "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Stranger(Agent):
    """Not registered: a save of a session whose current agent it is fails."""

    def __init__(self) -> None:
        super().__init__(instructions="You are not in the registry.")


# ------------------------------------------------ a remote pause whose save fails otherwise


async def test_a_remote_pause_whose_save_fails_otherwise_is_answered_done(url: str) -> None:
    """docs/control.md: "A pause whose save fails is a pause all the same, as the owner's
    own `pause()` says: the session is silent, so the command is answered done, and the
    sender logs a warning ... Until then such a pause was refused, which read as nothing
    done." The owner's `pause()` (last round) shows such a pause to the room and hands
    it to autosave whatever made the save fail.

    The app handed off to an agent it did not register, so the pause's save fails with
    `UnknownAgent`, not `StoreUnavailable`. An operator sends ``pause``.
    Expected: answered done (with the warning), as the session is paused and silent; a
    retry of the same command is answered done too, so the two answers agree.
    Found: `ControlListener._apply` answers "done" only for `StoreUnavailable`; any other
    save failure is refused (CommandRefused, exit 1) although the session is now paused;
    the operator's retry is then answered "done" at the old version with no warning."""
    owner_store = lr.open_store(url)
    backend = lr.open_store(url)
    session, rs, _model = await started(owner_store)
    try:
        await session.run(user_input="hi")
        await rs.checkpoint()
        await asyncio.wait_for(rs._control.listening.wait(), WAIT)
        session.update_agent(Stranger())
        await asyncio.sleep(0.2)
        first: Any
        try:
            first = await lr.control(backend).pause(KEY, timeout=5)
        except lr.CommandRefused as e:
            first = e
        state = rs.state
        try:
            second: Any = await lr.control(backend).pause(KEY, timeout=5)
        except lr.CommandRefused as e:
            second = e
        assert state == "paused"
        assert not isinstance(first, lr.CommandRefused), (
            f"the session is {state!r} (silent), yet the remote pause was refused: {first}; "
            f"the same command sent again was answered {second!r}"
        )
    finally:
        session.update_agent(Clerk())
        await asyncio.sleep(0.1)
        await _close(rs, session, backend, owner_store)


# ------------------------------------------------ a paused-before-start session


async def test_a_remote_pause_of_a_session_paused_before_start_is_answered_done(
    url: str,
) -> None:
    """docs/control.md: "Pausing a paused session or resuming an active one changes
    nothing and answers with the current version, so a command whose answer was lost
    (a timeout) can be sent again." The app restores and pauses before
    ``session.start`` (the caller on hold as the job starts: `pause()` accepts it, and
    the agent starts silent). An operator sends ``pause`` before the start.

    Expected: answered done (the session is paused: nothing to change), as for any
    paused session.
    Found: refused with the self-contradicting "cannot pause: the session is paused"
    (exit 1): `ControlListener._apply` takes the "already" shortcut only for a started
    session, then refuses a state not in ``_FROM['pause']``."""
    owner_store = lr.open_store(url)
    backend = lr.open_store(url)
    session = make_text_session(ScriptedLLM(default="ok"))
    rs = lr.ResumableSession(owner_store, KEY, registry=registry(), autosave=False, owner="w1")
    try:
        await asyncio.wait_for(rs.restore(session, default=Clerk), WAIT)
        await asyncio.wait_for(rs._control.listening.wait(), WAIT)
        await rs.pause()
        answer: Any
        try:
            answer = await lr.control(backend).pause(KEY, timeout=5)
        except lr.CommandRefused as e:
            answer = e
        assert rs.state == "paused"
        assert not isinstance(answer, lr.CommandRefused), (
            f"the session is paused (before its start), yet a remote pause was refused: {answer}"
        )
    finally:
        await _close(rs, session, backend, owner_store)


# ------------------------------------------------ a command queued behind a remote suspend


async def test_a_command_queued_behind_a_suspend_is_refused_not_timed_out(url: str) -> None:
    """docs/control.md, "When a command is refused": "owner 'w-3' did not answer within
    5 s" is for "the lease is live but nobody took the command: a frozen or dead
    worker"; a suspended session's command is refused at once ("no live owner: nobody
    holds its lease (last saved as suspended)"), and a command meeting a suspend under
    way is refused "cannot pause: the session is being suspended".

    An operator suspends a live session whose final save takes a second (a congested
    link); a second operator sends ``pause`` while the suspend is under way. The owner
    hears it and queues it behind the suspend (commands are applied one at a time).
    Expected: the pause is refused by the owner, promptly, saying the session is
    suspended (or being suspended): the owner is alive and knows.
    Found: once the suspend released the lease, `ControlListener._claim_and_apply` reads
    ``held is None`` and stays silent, as for a takeover; nobody else can answer, so the
    sender waits out its whole timeout and is told the owner "did not answer", which
    reads as a frozen or dead worker."""
    from tests.test_review2_hunt import SlowStore

    inner = lr.open_store(url)
    owner_store = SlowStore(inner)
    backend = lr.open_store(url)
    session = make_text_session(ScriptedLLM(default="ok"))
    rs = lr.ResumableSession(
        owner_store,
        KEY, registry=registry(), autosave=False, owner="w1",
    )  # fmt: skip
    try:
        await session.start(await asyncio.wait_for(rs.restore(session, default=Clerk), WAIT))
        await asyncio.wait_for(rs._control.listening.wait(), WAIT)
        await session.run(user_input="hi")
        await rs.checkpoint()
        owner_store.slow = 1.5
        suspending = asyncio.ensure_future(lr.control(backend).suspend(KEY, timeout=10))
        deadline = asyncio.get_running_loop().time() + WAIT
        while rs._busy() is None:  # the suspend is being applied
            assert asyncio.get_running_loop().time() < deadline, "the suspend never began"
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        answer: Any
        try:
            answer = await lr.control(backend).pause(KEY, timeout=4)
        except lr.CommandRefused as e:
            answer = e
        took = loop.time() - sent
        await asyncio.wait_for(suspending, WAIT)
        assert rs.state == "suspended"
        assert isinstance(answer, lr.CommandRefused)
        assert "did not answer" not in answer.reason and took < 3.5, (
            f"the owner, alive, suspended the session and left the queued pause unanswered: "
            f"after {took:.1f} s the sender was told {answer.reason!r}"
        )
        assert "suspended" in answer.reason, answer.reason
    finally:
        owner_store.slow = 0.0
        await _close(rs, session, backend, inner)


# ------------------------------------------------ a real worker process, the real CLI


async def test_cli_against_a_worker_process_pause_then_frozen_resume_times_out(
    tmp_path: Path,
) -> None:
    """passes: coverage. A worker process (tests/_child_agent.py, a real AgentSession with
    autosave) holds the session; the operator runs the CLI as a real process (existing
    cross-process tests drive the frozen owner through the API, not the CLI's exit
    code). docs/cli.md: a refusal is one line ``{"error": "CommandRefused", ...}``, exit
    1; docs/control.md: a command nobody took within ``--timeout`` is withdrawn, and a
    frozen worker that wakes up later skips it.

    Expected: ``pause`` exits 0 and ``ls`` says paused; with the worker frozen (SIGSTOP)
    ``resume --timeout 1`` exits 1 within a few seconds, saying it did not answer; once
    the worker runs again it never applies that resume (``ls`` still says paused), and
    a ``resume`` sent then is applied (exit 0)."""
    import os
    import signal

    from tests.test_cross_process import Target, spawn

    target = Target(f"sqlite:///{tmp_path}/sessions.db", {}, {})
    key = "cx-1"

    async def ls_state() -> str:
        code, out, err = await cli(target.url, "ls")
        assert code == 0, err
        rows = {row["key"]: row for row in json.loads(out)}
        return str(rows[key]["state"])

    async with spawn(target, key, "--scenario", "zombie") as child:
        await child.expect("WAITING")
        code, out, err = await cli(target.url, "pause", key)
        assert code == 0, err
        assert json.loads(out)["command"] == "pause"
        assert await ls_state() == "paused"

        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            code, out, err = await cli(target.url, "resume", key, "--timeout", "1")
            took = loop.time() - began
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
        refusal = json.loads(err.strip().splitlines()[-1])
        assert code == 1 and refusal["error"] == "CommandRefused", (code, out, err)
        assert "did not answer within 1 s" in refusal["message"], refusal
        assert took < 8, f"the CLI took {took:.1f} s for --timeout 1"
        await asyncio.sleep(0.6)  # the worker's poll (0.2 s) reads the withdrawn row
        assert await ls_state() == "paused", "a withdrawn resume was applied after all"

        code, out, err = await cli(target.url, "resume", key)
        assert code == 0, err
        assert json.loads(out)["command"] == "resume"
