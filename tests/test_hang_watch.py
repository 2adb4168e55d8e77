"""The hung-test watchdog (``tests/hang_watch.py``) shows where a stuck task waits."""

from __future__ import annotations

import asyncio

import pytest

from tests.hang_watch import Watch, dump


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


async def test_a_test_past_its_bound_is_dumped_and_its_tasks_cancelled() -> None:
    never = asyncio.Event()
    watch = Watch("tests/probe.py::hung", after=0.2)
    watch.timer.start()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(_outer(never), 30)
    finally:
        watch.timer.cancel()
    assert watch.path is not None
    assert "in _innermost" in watch.path.read_text()
    watch.path.unlink()
