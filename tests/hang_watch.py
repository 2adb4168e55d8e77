"""A watchdog for a hung test: a test still running ``HANG_AFTER`` seconds after it
started gets every thread's stack and every asyncio task's await chain written out
(to the terminal, past pytest's capture, and to a file), and its tasks cancelled, so it
fails with the dump in its report instead of holding CI until the job's deadline. One
that still runs ``GIVE_UP_AFTER`` seconds later (a task that swallows its
cancellation) is dumped again and the run ends there, exit status 70.

An asyncio hang leaves the loop idle in ``select``, where a thread dump (pytest's
``faulthandler_timeout``) shows nothing; what is stuck is the chain of awaits in some
task, which only the tasks' coroutines show.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

# The longest test of the suite takes about two minutes on a loaded 2-core machine.
HANG_AFTER = float(os.environ.get("LIVEKIT_RESUME_TEST_HANG_AFTER", "420"))
GIVE_UP_AFTER = 60.0
# The terminal's stderr, duplicated before any test's output is captured.
_terminal: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _terminal
    _terminal = os.dup(2)


def _await_chain(coro: Any) -> Iterator[FrameType]:
    """The frames of a suspended coroutine and of the coroutines it awaits, outermost
    first."""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def _loops() -> list[asyncio.AbstractEventLoop]:
    loops = (o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop))
    return [loop for loop in loops if not loop.is_closed()]


def dump(title: str) -> tuple[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]]]:
    """Every thread's stack and every task's await chain, as text; and the tasks."""
    out = io.StringIO()
    print(f"===== {title} =====", file=out)
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        print(f"--- thread {thread.name}", file=out)
        if frame is not None:
            traceback.print_stack(frame, file=out)
    tasks = [(loop, task) for loop in _loops() for task in asyncio.all_tasks(loop)]
    for _loop, task in tasks:
        print(f"--- {task!r}", file=out)
        for frame in _await_chain(task.get_coro()):
            code = frame.f_code
            print(f"    {code.co_filename}:{frame.f_lineno} in {code.co_name}", file=out)
        # the future the task is parked on (asyncio's own attribute, read for the dump)
        print(f"    waiting on {getattr(task, '_fut_waiter', None)!r}", file=out)
    return out.getvalue(), tasks


class Watch:
    """After ``after`` seconds: the dump, then every task cancelled; ``give_up`` seconds
    later, if the test has not ended (`stop`), the dump again and the process ends."""

    def __init__(
        self, nodeid: str, after: float = HANG_AFTER, give_up: float = GIVE_UP_AFTER
    ) -> None:
        self.nodeid = nodeid
        self.after = after
        self.give_up = give_up
        self.path: Path | None = None
        self.timer = threading.Timer(after, self.fire)
        self.timer.daemon = True
        self._ended = threading.Event()

    def stop(self) -> None:
        self._ended.set()
        self.timer.cancel()

    def fire(self) -> None:
        text, tasks = dump(f"{self.nodeid} still running after {self.after:g}s")
        self._write(text)
        for loop, task in tasks:
            with contextlib.suppress(RuntimeError):  # its loop closed: that test just ended
                loop.call_soon_threadsafe(task.cancel)
        if self._ended.wait(self.give_up):
            return
        text, _ = dump(f"{self.nodeid} still running {self.give_up:g}s after its cancellation")
        self._write(text)
        os._exit(70)  # a task swallowed its cancellation: nothing else will end the run

    def _write(self, text: str) -> None:
        path = (
            Path(tempfile.gettempdir())
            / "livekit-resume-hangs"
            / (self.nodeid.replace("/", "_").replace("::", "-")[:180] + ".txt")
        )
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:
            f.write(text)
        self.path = path
        out = f"\n{text}(also in {path})\n".encode()
        if _terminal is not None:
            os.write(_terminal, out)
        else:
            sys.stderr.write(out.decode())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    watch = Watch(item.nodeid)
    watch.timer.start()
    try:
        yield
    finally:
        watch.stop()
