"""The hung-test watchdog (``tests/hang_watch.py``) shows where a stuck task waits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hang_watch
from tests.hang_watch import Watch, dump

ROOT = Path(__file__).resolve().parent.parent


async def _innermost(never: asyncio.Event) -> None:
    await never.wait()


async def _outer(never: asyncio.Event) -> None:
    await _innermost(never)


async def test_the_dump_shows_a_stuck_tasks_await_chain_down_to_its_future() -> None:
    never = asyncio.Event()
    stuck = asyncio.create_task(_outer(never), name="stuck-task")
    await asyncio.sleep(0)
    try:
        text, tasks = await asyncio.to_thread(dump, "probe")
    finally:
        stuck.cancel()
    assert stuck in [t for _, t in tasks]
    block = text.split("stuck-task", 1)[1].split("\n--- ", 1)[0]
    lines = [line.strip() for line in block.splitlines()[1:]]
    assert [line.rsplit(" in ", 1)[-1] for line in lines[:-1]] == ["_outer", "_innermost", "wait"]
    assert lines[-1].startswith("waiting on <Future pending")
    assert "--- thread MainThread" in text


async def test_a_test_past_its_bound_is_dumped_and_its_tasks_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hang_watch, "_terminal", None)  # into the captured stderr
    never = asyncio.Event()
    watch = Watch("tests/probe.py::hung", after=0.2)
    watch.timer.start()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(_outer(never), 30)
    finally:
        watch.stop()
    assert watch.path is not None
    assert "in _innermost" in watch.path.read_text()
    watch.path.unlink()


STUBBORN = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from tests.hang_watch import Watch

async def stubborn() -> None:
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # swallowed: what the watchdog's last resort is for

async def main() -> None:
    Watch("tests/probe.py::stubborn", after=0.2, give_up=0.5).timer.start()
    await stubborn()

asyncio.run(main())
"""


def test_a_test_that_swallows_its_cancellation_ends_the_run_with_a_second_dump() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STUBBORN, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 70, done.stderr
    assert "still running 0.5s after its cancellation" in done.stderr
    assert "in stubborn" in done.stderr
