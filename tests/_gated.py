"""A `MemoryStore` whose calls a test holds at gates, with the fixtures and waits the
review hunts share (`tests/test_review14_hunt.py` and after): each window of a suspend,
an end or a close (final save, settle, release) is entered deterministically."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Lease
from livekit_resume.stores.memory import MemoryStore

WAIT = 3.0


class Gate:
    """A store call held until `open`; ``entered`` is set once a call waits at it."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        self.calls = 0

    def arm(self) -> None:
        self.armed = True
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self.armed = False
        self._open.set()

    async def passing(self) -> None:
        self.calls += 1
        if self.armed:
            self.entered.set()
            await self._open.wait()


class GatedStore(MemoryStore):
    """A `MemoryStore` whose commit, renew and release can each be held at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.commit_gate = Gate()
        self.renew_gate = Gate()
        self.release_gate = Gate()
        self.fail_call: int | None = None  # the commit of this number (1-based) fails
        self.down = False  # every commit fails

    async def commit(self, commit: Commit) -> int:
        await self.commit_gate.passing()
        if self.down or self.commit_gate.calls == self.fail_call:
            raise lr.StoreUnavailable("the store is down (test)")
        return await super().commit(commit)

    async def renew(self, lease: Lease, *, ttl: float = 15.0) -> Lease:
        await self.renew_gate.passing()
        return await super().renew(lease, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await self.release_gate.passing()
        await super().release(lease)

    def open_gates(self) -> None:
        self.commit_gate.open()
        self.renew_gate.open()
        self.release_gate.open()


class CountedStore(GatedStore):
    """`GatedStore`, plus: ``fail_next`` makes the next commit that passes the gate fail
    (`StoreUnavailable`), ``reasons`` lists each commit's reason as it reaches the gate,
    ``landed`` counts commits that landed and ``renew_errors`` keeps what renewals
    raised."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False
        self.reasons: list[Any] = []  # each commit's reason, as it reaches the gate
        self.landed = 0
        self.renew_errors: list[BaseException] = []

    async def commit(self, commit: Commit) -> int:
        self.reasons.append(commit.info.get("reason"))
        await self.commit_gate.passing()
        if self.fail_next:
            self.fail_next = False
            raise lr.StoreUnavailable("the store blinked (test)")
        v = await super(GatedStore, self).commit(commit)
        self.landed += 1
        return v

    async def renew(self, lease: Lease, *, ttl: float = 15.0) -> Lease:
        await self.renew_gate.passing()
        try:
            return await super(GatedStore, self).renew(lease, ttl=ttl)
        except BaseException as e:
            self.renew_errors.append(e)
            raise


class LoadGatedStore(CountedStore):
    """`CountedStore`, plus a gate on ``load`` (a restore's read, after its acquire)."""

    def __init__(self) -> None:
        super().__init__()
        self.load_gate = Gate()

    async def load(self, key: str, version: int | None = None) -> Any:
        await self.load_gate.passing()
        return await super().load(key, version)

    def open_gates(self) -> None:
        super().open_gates()
        self.load_gate.open()


S = TypeVar("S", bound=GatedStore)


def store_fixture(cls: type[S]) -> Any:
    """A module's ``store`` fixture: a new ``cls``, its gates opened and closed after."""

    @pytest.fixture
    async def store() -> AsyncIterator[S]:
        s = cls()
        yield s
        s.open_gates()
        await s.aclose()

    return store


def key_fixture(tag: str) -> Any:
    """A module's ``key`` fixture: a new session key per test, named after ``tag``."""

    @pytest.fixture
    def key() -> str:
        return f"room-{tag}-{uuid.uuid4().hex[:8]}"

    return key


@pytest.fixture(autouse=True)
def sigterm_kept() -> Iterator[None]:
    """`resumable_job` installs a SIGTERM handler: put the test process's back."""
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` every loop turn (a millisecond at most): some windows are short."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.001)


async def bounded(aw: Awaitable[Any], what: str = "", timeout: float = WAIT) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s: {what}")
