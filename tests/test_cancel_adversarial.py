"""Cancellation: every public coroutine of `ResumableSession` cancelled at its
k-th suspension point, for k = 1, 2, ... until it completes, on SQLite and real Redis.

`at_step(coro, k)` runs ``coro`` in a task and cancels that task the k-th time it
suspends (whatever it awaits, however deep): exactly what a job shutdown or a
``wait_for`` landing at that await point does.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.test_hooks import Receptionist, Visit, registry

DEADLINE = 5.0
MAX_STEPS = 400


# ------------------------------------------------------------------ harness


class _Stepper:
    """Awaits ``coro``, cancelling the task that runs it at its ``k``-th suspension."""

    def __init__(self, coro: Awaitable[Any], k: int, repeat: bool = False) -> None:
        self.coro = coro
        self.k = k
        self.repeat = repeat
        self.steps = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        gen = self.coro.__await__()
        send: Any = None
        exc: BaseException | None = None
        while True:
            try:
                y = gen.throw(exc) if exc is not None else gen.send(send)
            except StopIteration as e:
                return e.value
            self.steps += 1
            if self.steps == self.k or (self.repeat and self.steps > self.k):
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # delivered at this very suspension point
            try:
                send, exc = (yield y), None
            except BaseException as e:
                send, exc = None, e


REPEAT = False  # set by a test: cancel again at every suspension after the k-th


async def at_step(coro: Awaitable[Any], k: int) -> tuple[str, Any]:
    """("cancelled", None), ("done", result) or ("raised", exc)."""
    stepper = _Stepper(coro, k, REPEAT)

    async def run() -> Any:
        return await stepper

    task = asyncio.ensure_future(run())
    done, _ = await asyncio.wait({task}, timeout=DEADLINE)
    assert done, f"cancelled at step {k}: still running after {DEADLINE}s"
    if task.cancelled():
        return "cancelled", None
    if task.exception() is not None:
        return "raised", task.exception()
    if stepper.steps >= k:  # cancelled, yet it returned: the cancellation was eaten
        return "swallowed", task.result()
    return "done", task.result()


class LoopErrors:
    """Collects what the loop's exception handler hears (a task exception never
    retrieved, a callback that failed) and RuntimeWarnings (coroutine never awaited)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __enter__(self) -> LoopErrors:
        loop = asyncio.get_running_loop()
        self._old = loop.get_exception_handler()
        loop.set_exception_handler(
            lambda _l, ctx: self.errors.append(
                str(ctx.get("message")) + " " + repr(ctx.get("exception"))
            )
        )
        self._warn = warnings.catch_warnings(record=True)
        self.warned = self._warn.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *a: Any) -> None:
        gc.collect()
        self._warn.__exit__(*a)
        asyncio.get_running_loop().set_exception_handler(self._old)

    def check(self) -> None:
        gc.collect()
        bad = [str(w.message) for w in self.warned if issubclass(w.category, RuntimeWarning)]
        assert not self.errors, self.errors
        assert not bad, bad


@pytest.fixture(params=[False, True], ids=["once", "storm"])
def repeat(request: pytest.FixtureRequest) -> Any:
    global REPEAT
    REPEAT = request.param
    yield request.param
    REPEAT = False


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    repeat: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = lr.open_store(f"sqlite:///{tmp_path}/hunt.db")
    else:
        from tests.redis_servers import build_redis_store

        s = await build_redis_store("redis", request, namespace=f"h{uuid.uuid4().hex[:8]}")
    yield s
    await s.aclose()


def new_key() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


async def begin(
    store: Store,
    key: str,
    script: list[Any] | None = None,
    *,
    owner: str = "w1",
    lease_ttl: float = 30.0,
    start: bool = True,
    **kw: Any,
) -> tuple[AgentSession[Visit], lr.ResumableSession]:
    model = ScriptedLLM(script or [], default="ok")
    session: AgentSession[Visit] = AgentSession(llm=model, userdata=Visit(name="Ada"))
    rs = lr.ResumableSession(
        store,
        key,
        registry=registry(),
        userdata_type=Visit,
        owner=owner,
        autosave=kw.pop("autosave", False),
        debounce=0.01,
        lease_ttl=lease_ttl,
        **kw,
    )
    agent = await rs.restore(session, default=lambda: Receptionist(rs))
    if isinstance(agent, Receptionist):
        agent.rs = rs
    if start:
        await session.start(agent)
    return session, rs


async def stored_ids(store: Store, key: str) -> list[str]:
    stored = await store.load(key)
    snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
    return [item["id"] for item in snap.history]


def live_ids(session: AgentSession[Any]) -> list[str]:
    return [i.id for i in session.history.items]


async def restore_elsewhere(
    store: Store, key: str
) -> tuple[AgentSession[Visit], lr.ResumableSession]:
    """A fresh worker restores ``key`` (must not be refused: no lease left behind)."""
    session, rs = await asyncio.wait_for(
        begin(store, key, owner=f"w-{uuid.uuid4().hex[:4]}"), DEADLINE
    )
    return session, rs


async def shut(*pairs: tuple[AgentSession[Any], lr.ResumableSession]) -> None:
    for session, rs in pairs:
        await asyncio.wait_for(rs.aclose(), DEADLINE)
        await asyncio.wait_for(session.aclose(), DEADLINE)


def leftover_tasks() -> list[str]:
    me = asyncio.current_task()
    return [
        t.get_name() + ":" + repr(t.get_coro())
        for t in asyncio.all_tasks()
        if t is not me and not t.done() and "livekit_resume" in repr(t.get_coro()) + t.get_name()
    ]


# ------------------------------------------------------------------ sweeps


async def sweep(
    store: Store,
    setup: Callable[[str], Awaitable[Any]],
    op: Callable[[Any], Awaitable[Any]],
    check: Callable[[str, Any, str, Any, int], Awaitable[None]],
) -> list[str]:
    """For k = 1, 2, ...: a fresh key set up, ``op`` cancelled at step k, ``check``ed;
    until ``op`` completes before its k-th suspension."""
    seen = []
    with LoopErrors() as errs:
        for k in range(1, MAX_STEPS):
            key = new_key()
            ctx = await asyncio.wait_for(setup(key), DEADLINE)
            status, value = await at_step(op(ctx), k)
            seen.append(f"{k}:{status}")
            await check(key, ctx, status, value, k)
            errs.check()
            if status not in ("cancelled", "swallowed"):
                break
        else:
            raise AssertionError("never completed")
    assert not leftover_tasks(), leftover_tasks()
    return seen


async def test_checkpoint_cancelled_at_every_step(store: Store) -> None:
    async def setup(key: str) -> Any:
        session, rs = await begin(store, key, ["Hello", "Hi Ada"])
        await session.run(user_input="Hi, I'm Ada")
        return session, rs

    async def check(key: str, ctx: Any, status: str, value: Any, k: int) -> None:
        session, rs = ctx
        assert status in ("cancelled", "done", "swallowed"), (k, status, value)
        assert rs.state == "active"
        v = await asyncio.wait_for(rs.checkpoint(), DEADLINE)
        assert v == rs.version >= 1
        assert await stored_ids(store, key) == live_ids(session), k
        info = await store.info(key)
        assert info is not None and info.version == v and info.owner == "w1", (k, info)
        saved = live_ids(session)
        await shut(ctx)
        other = await restore_elsewhere(store, key)
        assert live_ids(other[0])[: len(saved)] == saved, k
        await shut(other)

    assert await sweep(store, setup, lambda c: c[1].checkpoint(), check)


async def saved_call(store: Store, key: str) -> list[str]:
    """A call of one turn, suspended: its history ids as saved."""
    session, rs = await begin(store, key, ["Hello", "Hi Ada"])
    await session.run(user_input="Hi, I'm Ada")
    await rs.suspend()
    return live_ids(session)


async def test_restore_cancelled_at_every_step(store: Store) -> None:
    autosave = True

    async def setup(key: str) -> Any:
        saved = await saved_call(store, key)
        session: AgentSession[Visit] = AgentSession(
            llm=ScriptedLLM([], default="ok"), userdata=Visit()
        )
        rs = lr.ResumableSession(
            store,
            key,
            registry=registry(),
            userdata_type=Visit,
            owner="w2",
            autosave=autosave,
            debounce=0.01,
        )
        return saved, session, rs

    def op(ctx: Any) -> Awaitable[Any]:
        _, session, rs = ctx
        restore: Awaitable[Any] = rs.restore(session, default=lambda: Receptionist(rs))
        return restore

    async def check(key: str, ctx: Any, status: str, value: Any, k: int) -> None:
        saved, session, rs = ctx
        assert status in ("cancelled", "done", "swallowed"), (k, status, value)
        if status == "cancelled":
            assert session.history.items == [], k
            info = await store.info(key)
            assert info is not None and info.owner is None, (k, info)
            assert rs.state == "suspended" or rs.state == "active", (k, rs.state)
            # the same ResumableSession may try again
            agent = await asyncio.wait_for(
                rs.restore(session, default=lambda: Receptionist(rs)), DEADLINE
            )
        else:
            agent = value  # done (or a cancellation eaten: see the Redis tests)
        assert rs.resumed and rs.state == "active", k
        assert isinstance(agent, Receptionist)
        agent.rs = rs
        await asyncio.wait_for(session.start(agent), DEADLINE)
        assert live_ids(session)[: len(saved)] == saved, k
        await asyncio.wait_for(rs.checkpoint(), DEADLINE)
        assert await stored_ids(store, key) == live_ids(session)
        await shut((session, rs))
        other = await restore_elsewhere(store, key)
        assert live_ids(other[0])[: len(saved)] == saved, k
        await shut(other)

    assert await sweep(store, setup, op, check)


async def stored_state(store: Store, key: str) -> str:
    stored = await store.load(key)
    snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
    return snap.state


async def one_turn(store: Store, key: str, **kw: Any) -> Any:
    session, rs = await begin(store, key, ["Hello", "Hi Ada"], **kw)
    await session.run(user_input="Hi, I'm Ada")
    return session, rs


@pytest.mark.parametrize("how", ["suspend", "end"])
async def test_finish_cancelled_at_every_step(store: Store, how: str) -> None:
    final = {"suspend": "suspended", "end": "ended"}[how]

    async def setup(key: str) -> Any:
        return await one_turn(store, key)

    async def check(key: str, ctx: Any, status: str, value: Any, k: int) -> None:
        session, rs = ctx
        assert status in ("cancelled", "done", "swallowed"), (k, status, value)
        info = await store.info(key)
        if rs.state == final:
            assert info is not None and info.owner is None, (k, info)
            assert await stored_state(store, key) == final, k
        else:
            assert rs.state in ("active", "paused"), (k, rs.state)
            assert info is not None and info.owner == "w1", (k, info)
            await asyncio.wait_for(rs.checkpoint(), DEADLINE)
            assert await stored_ids(store, key) == live_ids(session)
            # the same call again completes
            await asyncio.wait_for(getattr(rs, how)(), DEADLINE)
            assert rs.state == final
        saved = live_ids(session)
        await shut(ctx)
        assert not leftover_tasks(), (k, leftover_tasks())
        other = await restore_elsewhere(store, key)
        if how == "suspend":
            assert live_ids(other[0])[: len(saved)] == saved, k
        await shut(other)

    assert await sweep(store, setup, lambda c: getattr(c[1], how)(), check)


async def busy_turn(store: Store, key: str) -> Any:
    """A turn just ended: autosave is writing it as the call under test starts."""
    session, rs = await begin(store, key, ["Hello", "Hi Ada", "Sure"], autosave=True)
    rs._autosave._debounce = 0.0
    await session.run(user_input="Hi, I'm Ada")
    await session.run(user_input="and again")
    return session, rs


@pytest.mark.parametrize("how", ["checkpoint", "suspend"])
async def test_calls_cancelled_while_autosave_writes(store: Store, how: str) -> None:
    async def check(key: str, ctx: Any, status: str, value: Any, k: int) -> None:
        session, rs = ctx
        assert status in ("cancelled", "done", "swallowed"), (k, status, value)
        assert not (rs._finishing is not None), k
        if how == "aclose":  # goes on shielded
            await asyncio.wait_for(rs.aclose(), DEADLINE)
            assert await stored_ids(store, key) == live_ids(session), k
        if rs.state in ("active", "paused"):
            info = await store.info(key)
            assert info is not None and info.owner == "w1", (k, info)
            await asyncio.wait_for(rs.checkpoint(), DEADLINE)
            assert await stored_ids(store, key) == live_ids(session), k
            assert await stored_state(store, key) == rs.state, k
        elif rs.state in ("suspended", "ended"):
            assert await stored_state(store, key) == rs.state, k
            assert await stored_ids(store, key) == live_ids(session), k
        saved = live_ids(session)
        await shut(ctx)
        info = await store.info(key)
        assert info is not None and info.owner is None, (k, info)
        assert not leftover_tasks(), (k, leftover_tasks())
        other = await restore_elsewhere(store, key)
        if how != "end":
            assert live_ids(other[0])[: len(saved)] == saved, k
        await shut(other)

    assert await sweep(
        store, lambda key: busy_turn(store, key), lambda c: getattr(c[1], how)(), check
    )


# ------------------------------------------------------------------ findings


@pytest.mark.parametrize("how", ["end", "stale"])
async def test_archive_stale_cancelled_at_any_step_leaves_no_lease_held(
    store: Store, how: str
) -> None:
    """`archive_stale` (resumable_job's archiving of an ended or stale conversation)
    holds the key's lease, then the archive's, and releases them in ``finally`` with a
    bare ``await store.release(...)``. A cancellation landing on that release (SQLite:
    the release still queued for the store's thread is cancelled with it), or a second
    cancellation as it unwinds, skips it: the key, or its archive, stays leased to the
    job for `ARCHIVE_LEASE_TTL` (30 s). Everywhere else a release runs `to_its_end`."""
    from livekit_resume.agent_hooks.job import archive_stale

    older_than = None if how == "end" else -1.0

    async def setup(key: str) -> Any:
        session, rs = await one_turn(store, key)
        saved = live_ids(session)
        await (rs.end() if how == "end" else rs.suspend())
        await session.aclose()
        return key, saved

    def op(ctx: Any) -> Awaitable[Any]:
        return archive_stale(store, Codec(), ctx[0], older_than=older_than, owner="job-1")

    async def check(key: str, ctx: Any, status: str, value: Any, k: int) -> None:
        _, saved = ctx
        assert status in ("cancelled", "done", "swallowed"), (k, status, value)
        for name in [n for n in await store.keys() if n.startswith(key)] + [key]:
            info = await store.info(name)
            assert info is None or info.owner is None, (
                f"cancelled at step {k}: {name!r} is still leased to {info.owner!r}"
            )
        if status == "cancelled":  # done again (or done already: the key is gone)
            await asyncio.wait_for(
                archive_stale(store, Codec(), key, older_than=older_than, owner="job-2"), DEADLINE
            )
        archives = [n for n in await store.keys() if n.startswith(key + "~")]
        assert len(archives) == 1, (k, archives)
        assert await stored_ids(store, archives[0]) == saved, k
        info = await store.info(key)
        assert info is None or info.version == 0, (k, info)

    assert await sweep(store, setup, op, check)


@pytest.fixture
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    from tests.redis_servers import build_redis_store

    s: Store = await build_redis_store("redis", request, namespace=f"h{uuid.uuid4().hex[:8]}")
    yield s
    await s.aclose()


@pytest.mark.parametrize("how", ["checkpoint", "pause", "suspend", "end"])
async def test_a_call_cancelled_while_it_sends_to_redis_ends_cancelled(
    redis_store: Store, how: str
) -> None:
    """A caller cancelled (a job shutting down, ``asyncio.timeout`` around the call) must
    end cancelled, as tests/test_lifecycle_races.py holds `pause` and `Autosave.aclose`
    to. On the Redis store every round trip goes through redis-py's
    ``send_packed_command``, which wraps the socket write in ``asyncio.wait_for(...,
    socket_timeout)``: on Python 3.10/3.11 that returns the write's result when the
    caller's cancellation lands as the write is done, and eats it. The call then runs
    on and returns as if nobody had cancelled it."""
    store = redis_store
    eaten: list[str] = []
    for k in range(1, 30):
        key = new_key()
        session, rs = await asyncio.wait_for(one_turn(store, key), DEADLINE)
        session.history.add_message(role="user", content="news")
        call = getattr(rs, how)()
        status, _ = await at_step(call, k)
        if status == "swallowed":
            eaten.append(f"step {k}")
        if rs.state in ("active", "paused"):
            await asyncio.wait_for(rs.aclose(), DEADLINE)
        await asyncio.wait_for(session.aclose(), DEADLINE)
        if status == "done":
            break
    assert not eaten, f"{how}() cancelled at {eaten} returned normally: the cancellation was eaten"
