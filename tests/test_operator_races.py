"""Operator commands racing live workers: the ``livekit-resume`` command line run (in
process, through typer's CliRunner, on a thread of its own) against a store that a real
text-mode ``AgentSession`` with autosave keeps writing, a SQLite file or a real
redis-server (the ``url`` fixture of test_cli). Each test is one defect a reviewer found,
and failed on main before its fix."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from livekit_resume import ResumableSession, open_store
from livekit_resume.cli import write as cli_write
from tests import _child_agent as child
from tests import child_env
from tests.test_cli import ROOT, _converse, run, run_json, started, url

__all__ = ["url"]  # the fixture, shared with test_cli

# Every wait of these tests is bounded: a hang is a failure, not a stuck run.
BOUND = 30.0


def _new_key() -> str:
    return f"room-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass
class _Ran:
    """What a command line run in a process of its own did (as CliRunner's result)."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


_running = 0  # commands run in this process now (CliRunner)


async def _cli(url: str, *args: str, input: str | None = None) -> Any:
    """The command run as a shell runs it, off the worker's loop (bounded). One run while
    another waits (an operator's rm landing as the owner applies a command) runs in a
    process of its own: CliRunner swaps the process's sys.stdout and sys.stderr, and two
    at once print into each other's."""
    global _running
    if _running:
        return await asyncio.wait_for(_in_a_process(url, *args, input=input), BOUND)
    _running += 1
    try:
        return await asyncio.wait_for(asyncio.to_thread(run, url, *args, input=input), BOUND)
    finally:
        _running -= 1


async def _in_a_process(url: str, *args: str, input: str | None) -> _Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit_resume", "--store", url, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    out, err = await proc.communicate(input.encode() if input is not None else None)
    assert proc.returncode is not None
    return _Ran(proc.returncode, out.decode(), err.decode())


async def _turn(session: Any, line: str) -> None:
    await asyncio.wait_for(session.run(user_input=line), BOUND)


# ---------------------------------------------------------- revert of the oldest


def _between_check_and_lease(
    monkeypatch: pytest.MonkeyPatch,
    loop: asyncio.AbstractEventLoop,
    meanwhile: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run ``meanwhile`` on the worker's loop once the command has done its checks and
    before it takes the lease (`write_whole`): the moment a live worker's autosave can
    land, made deterministic."""
    real = getattr(cli_write, "write_whole")  # noqa: B009 (imported there, patched there)

    async def hooked(*args: Any, **kw: Any) -> Any:
        fut: Any = asyncio.run_coroutine_threadsafe(meanwhile(), loop)
        await asyncio.wait_for(asyncio.wrap_future(fut), BOUND)
        return await real(*args, **kw)

    monkeypatch.setattr(cli_write, "write_whole", hooked)


def test_a_revert_to_the_oldest_version_refused_meanwhile_does_not_fence_the_worker(
    url: str,
) -> None:
    """``revert KEY N --takeover`` where N is the oldest version ``history`` lists,
    while the caller keeps talking. docs/failure-model.md: "`revert --takeover` refused
    once the lease was taken (a version not retained, ...) | refused before the lease
    is taken: the version is read and decoded first. The live worker was fenced (its
    next checkpoint `LeaseLost`) by a command that then changed nothing."

    The version is read first, but then read *again* under the lease (`build` loads
    it from the store a second time). One autosave landing in between (any turn: the
    store keeps 10 versions) trims version N: the command takes the lease over, fails
    with `SnapshotNotFound` ("has no version N") and writes nothing, yet the live
    worker is fenced and every later turn of the call is unsaved. A refused command
    must change nothing: either the version read (and checked) before the lease is the
    one written, or the worker goes on saving."""

    async def go() -> None:
        key = _new_key()
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            for _ in range(10):  # versions 1..10: version 1 is the oldest retained
                await rs.checkpoint("manual")
                await _turn(session, "what do you have?")
            history = await asyncio.to_thread(run_json, url, "history", key)
            oldest = history[0]["version"]
            assert oldest == 1 and len(history) == 10

            async def a_turn_lands() -> None:
                await _turn(session, "remember the red door")
                await rs.checkpoint("turn")

            with pytest.MonkeyPatch.context() as patch:
                _between_check_and_lease(patch, asyncio.get_running_loop(), a_turn_lands)
                reverted = await _cli(url, "revert", key, str(oldest), "--takeover")
            await _turn(session, "remember the green door")
            if reverted.exit_code != 0:
                # refused: then nothing changed, and the worker still saves its turns
                assert "SnapshotNotFound" in reverted.stderr, reverted.output
                await rs.checkpoint("turn")
            else:
                # or the version checked before the lease is the one written
                shown = await asyncio.to_thread(run_json, url, "show", key)
                assert "red door" not in str(shown["history"])
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ------------------------------------------------------ commands during a restore


def test_a_remote_resume_sent_while_the_session_is_being_restored_is_not_done_at_version_0(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/control.md: "Each method takes the session key and returns the version the
    owner wrote (`resume`: the version current after resuming)"; a command sent before
    the restore is done "is refused: the session is not attached yet" (session.py), and
    the refusal table has "`cannot suspend: the session has not started` | restored,
    its `AgentSession` not started yet".

    A supervisor's ``resume`` reaching a worker that holds the lease and is still
    loading the snapshot (the call restored on another worker) is answered ``done``
    with version 0: the listener takes the fresh `ResumableSession`'s default state
    ("active") for the session's and short-cuts to "already active" before it asks
    whether the session started, while ``pause`` and ``suspend`` sent at the same
    moment are refused "has not started". The CLI prints ``resumed 'KEY' (version 0)``
    for a session stored at version 3 that nothing was applied to: a success that did
    nothing, at a version that does not exist, which a script records as the version
    the call was resumed at."""

    async def go() -> None:
        key = _new_key()
        await _converse(url, key, ["remember the blue door", "remember the code 4711"])
        stored = (await asyncio.to_thread(run_json, url, "history", key))[-1]["version"]
        loading, go_on = asyncio.Event(), asyncio.Event()
        real = ResumableSession._load_into

        async def slow_load(self: Any, *args: Any, **kw: Any) -> Any:
            loading.set()  # the lease is held, the inbox listens: the snapshot loads
            await go_on.wait()
            return await real(self, *args, **kw)

        monkeypatch.setattr(ResumableSession, "_load_into", slow_load)
        store = open_store(url)
        try:
            _model, session = child.build_session()
            rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
            restoring = asyncio.ensure_future(rs.restore(session, default=child.Scribe))
            await asyncio.wait_for(loading.wait(), BOUND)
            await asyncio.wait_for(rs._control.listening.wait(), BOUND)
            sent = await _cli(url, "--json", "resume", key, "--timeout", "5")
            go_on.set()
            agent = await asyncio.wait_for(restoring, BOUND)
            await session.start(agent)
            if sent.exit_code == 0:
                # answered done: then with the version the session is at, not 0
                assert '"version": 0' not in sent.stdout, sent.stdout
                assert f'"version": {stored}' in sent.stdout, sent.stdout
            else:
                assert "CommandRefused" in sent.stderr, sent.output
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ------------------------------------------------------- two operators: revert, rm


def _rm_in_a_shell(url: str, key: str) -> None:
    """Another operator's ``livekit-resume rm KEY --yes``, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "livekit_resume", "--store", url, "rm", key, "--yes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_revert_refused_because_rm_deleted_the_session_meanwhile_leaves_nothing_behind(
    url: str,
) -> None:
    """Two operators at once: one runs ``revert KEY 1 --takeover``, the other
    ``rm KEY --yes``. docs/cli.md, ``revert``: "A key that names no session is refused
    before any lease is taken (nothing is left behind)"; ``rm``: "deletes a session:
    every version, its log, its lease".

    The revert looks the session up first (it is there), the ``rm`` lands, then the
    revert takes the lease, which creates the session's record again, finds no
    snapshot under it and fails with `SnapshotNotFound`, releasing the lease but not
    the record it made. ``rm`` said ``deleted``, the revert was refused, and yet ``ls``
    lists the key, at version 0, with no state, agent or items, where ``show`` and
    ``history`` say there is no such session: a refused command that changed the store,
    and a deleted session that comes back as a ghost (kept for ever on a store without
    a ttl). The same holds for ``repair --takeover`` racing an ``rm``."""
    key = _new_key()
    asyncio.run(_converse(url, key, ["remember the blue door", "remember the code 4711"]))
    real = getattr(cli_write, "write_whole")  # noqa: B009 (imported there, patched there)

    async def after_the_checks(*args: Any, **kw: Any) -> Any:
        await asyncio.to_thread(_rm_in_a_shell, url, key)
        return await real(*args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_write, "write_whole", after_the_checks)
        reverted = run(url, "revert", key, "1", "--takeover")
    assert reverted.exit_code == 1 and "SnapshotNotFound" in reverted.stderr, reverted.output
    assert run_json(url, "ls") == []  # rm's delete stands; the refused revert left nothing
