"""Deleted sessions' tombstones (`Store.delete`, TOMBSTONE_TTL) under what tries to
break them: races, clocks, expiries, new lives over a tombstone, the CLI, jobs.

A delete leaves the deleted session's epoch for a day: a writer at that epoch or older
that finds the session gone is fenced (`LeaseLost`, not ``vanished``) instead of writing
the deleted conversation back. Run against every store (memory, SQLite, real Redis
standalone and Cluster), through real calls, a real `AgentSession` and the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.errors import LeaseLost
from livekit_resume.stores.base import Commit, Lease, Record, Store
from livekit_resume.stores.log import TOMBSTONE_TTL
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.sqlite import SQLiteStore
from tests.conftest import STORE_FACTORIES, StoreFactory
from tests.redis_servers import RedisFactory
from tests.test_hooks import KEY, start

REDIS = ["redis", "redis_cluster"]


class Clock:
    """A clock the test moves: the store's, for leases, session ttls and tombstones."""

    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def make(make_store: StoreFactory) -> StoreFactory:
    """``await make(**opts)``: a fresh store of each kind (conftest's ``make_store``)."""
    return make_store


def commit(lease: Lease, base: int, item: str) -> Commit:
    return Commit(lease.key, lease.epoch, base, item.encode(), [Record("h", item, b"x")], base + 1)


async def held_and_saved(store: Store, owner: str = "worker-a", ttl: float = 10.0) -> Lease:
    lease = await store.acquire(KEY, owner, ttl=ttl)
    assert await store.commit(commit(lease, 0, "m0")) == 1
    return lease


async def assert_fenced_as_deleted(store: Store, lease: Lease, base: int = 1) -> None:
    with pytest.raises(LeaseLost) as lost:
        await store.commit(commit(lease, base, "written-back"))
    assert not lost.value.vanished, repr(lost.value)
    with pytest.raises(LeaseLost) as renewed:
        await store.renew(lease, ttl=5.0)
    assert not renewed.value.vanished, repr(renewed.value)


# ------------------------------------------------------------------ store-level


async def test_delete_recreate_delete_again_still_fences_the_first_holder(make: Any) -> None:
    store = await make()
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    second = await held_and_saved(store, "worker-b")
    assert second.epoch > first.epoch
    assert await store.delete(KEY)
    await assert_fenced_as_deleted(store, first)
    await assert_fenced_as_deleted(store, second)
    assert await store.info(KEY) is None and await store.keys() == []


async def test_a_new_session_over_a_tombstone_starts_above_it_whatever_the_clock_did(
    make: Any,
) -> None:
    """failure-model.md, Known limits: "within that day a new life starts above the
    tombstone's epoch, whatever the clock did". The store's clock steps back 10 s
    (NTP) between the delete and the next acquire."""
    clock = Clock()
    store = await make(clock=clock)
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    clock.t -= 10.0
    fresh = await store.acquire(KEY, "worker-b", ttl=10.0)
    assert fresh.epoch > first.epoch, (fresh.epoch, first.epoch)
    # and the deleted session's holder is refused, never sent to write it back
    with pytest.raises(LeaseLost) as lost:
        await store.commit(commit(first, 1, "written-back"))
    assert not lost.value.vanished, repr(lost.value)


async def test_a_frozen_store_clock_never_hands_the_deleted_epoch_out_again(make: Any) -> None:
    """The clock does not move between two lives (a clock stepped back by exactly the
    time between them): the new life must not reissue the deleted holder's epoch, or
    that holder's commits land in the new conversation."""
    clock = Clock()
    store = await make(clock=clock)
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    fresh = await store.acquire(KEY, "worker-b", ttl=10.0)
    with pytest.raises(LeaseLost):  # the deleted holder writes into the new conversation
        await store.commit(commit(first, 0, "into-the-new-conversation"))
    info = await store.info(KEY)
    assert info is not None and info.version == 0
    assert fresh.epoch != first.epoch


async def test_a_holder_stays_fenced_when_the_session_made_again_over_its_tombstone_expires(
    make: Any,
) -> None:
    """rm of a session A holds; a new conversation is started under the key (its acquire
    once "lifted" the tombstone on memory/SQLite) and ends, released, and expires by the
    store's session ttl (a minute here). A, frozen meanwhile for minutes (far less than
    the tombstone's day), wakes: it must be fenced as deleted, as on Redis, not told
    ``vanished`` and so write the deleted conversation back."""
    clock = Clock()
    store = await make(ttl=60.0, clock=clock)
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    fresh = await store.acquire(KEY, "worker-b", ttl=10.0)
    await store.release(fresh)
    clock.t += 120.0  # the new empty session's ttl ran out
    assert await store.info(KEY) is None
    await assert_fenced_as_deleted(store, first)


async def test_a_holder_frozen_past_the_session_ttl_is_still_fenced(make: Any) -> None:
    clock = Clock()
    store = await make(ttl=60.0, clock=clock)
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    clock.t += 3600.0
    await assert_fenced_as_deleted(store, first)


async def test_a_holder_whose_lease_expired_before_the_delete_is_fenced(make: Any) -> None:
    clock = Clock()
    store = await make(clock=clock)
    first = await held_and_saved(store, ttl=5.0)
    clock.t += 30.0  # its lease ran out: the session looks free
    info = await store.info(KEY)
    assert info is not None and info.owner is None
    assert await store.delete(KEY)
    await assert_fenced_as_deleted(store, first)


async def test_a_release_of_the_deleted_lease_creates_nothing(make: Any) -> None:
    store = await make()
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    await store.release(first)
    assert await store.info(KEY) is None and await store.keys() == []
    await assert_fenced_as_deleted(store, first)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_past_the_tombstone_ttl_the_holder_is_told_vanished_again(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Documented: a worker frozen for longer than the tombstone's day is back to the old
    behaviour; and a new session then starts from the clock."""
    clock = Clock()
    store = await STORE_FACTORIES[kind](request, tmp_path, clock=clock)
    try:
        first = await held_and_saved(store)
        assert await store.delete(KEY)
        clock.t += TOMBSTONE_TTL - 1
        await assert_fenced_as_deleted(store, first)
        clock.t += 2
        with pytest.raises(LeaseLost) as lost:
            await store.commit(commit(first, 1, "x"))
        assert lost.value.vanished
        fresh = await store.acquire(KEY, "worker-b")
        assert fresh.epoch > first.epoch
    finally:
        await store.aclose()


async def test_a_delete_racing_acquires_and_commits_leaves_every_holder_fenced(
    make: Any,
) -> None:
    """A delete gathered with a takeover, a commit and a renewal of the first holder:
    whoever held an epoch the delete removed is fenced, and a session still there after
    the race has a holder that may go on writing."""
    for _ in range(5):
        store = await make()
        first = await held_and_saved(store)
        results = await asyncio.gather(
            store.delete(KEY),
            store.acquire(KEY, "worker-b", ttl=10.0, takeover=True),
            store.commit(commit(first, 1, "m1")),
            store.renew(first, ttl=10.0),
            return_exceptions=True,
        )
        deleted, taken = results[0], results[1]
        assert deleted is True, results
        assert isinstance(taken, Lease), results
        info = await store.info(KEY)
        if info is None:
            # the takeover landed before the delete: it too is fenced
            await assert_fenced_as_deleted(store, first, base=2 if results[2] == 2 else 1)
            with pytest.raises(LeaseLost) as lost:
                await store.renew(taken, ttl=5.0)
            assert not lost.value.vanished, repr(lost.value)
        else:
            # the takeover made a new session after the delete: it is its holder's
            assert info.epoch == taken.epoch and taken.epoch > first.epoch
            assert await store.commit(commit(taken, info.version, "new")) == info.version + 1
        await store.delete(KEY)


@pytest.mark.parametrize("kind", REDIS)
async def test_a_redis_delete_that_found_no_session_but_deleted_one_leaves_its_tombstone(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """RedisStore.delete reads the session's epoch (`info`), lays the tombstone, then runs
    the delete script. A worker that creates the session between the read (nothing
    there) and the script: the script deletes it (unfenced: no epoch to delete at), the
    delete answers True, and leaves no tombstone. That worker is then told its session
    vanished, and writes it back: a delete that said it deleted a session, undone."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    from tests.redis_servers import build_redis_store

    deleter: RedisStore = await build_redis_store(kind, request, namespace=ns)
    worker: RedisStore = await build_redis_store(kind, request, namespace=ns)
    held: list[Lease] = []
    read = deleter.info

    async def info_then_a_worker_starts(key: str) -> Any:
        found = await read(key)
        if not held:
            lease = await worker.acquire(key, "worker-a")
            await worker.commit(commit(lease, 0, "m0"))
            held.append(lease)
        return found

    deleter.info = info_then_a_worker_starts  # type: ignore[method-assign]
    try:
        deleted = await deleter.delete(KEY)
        (lease,) = held
        if deleted:
            assert await worker.info(KEY) is None
            # it deleted a session: the holder must be fenced, not sent to write it back
            await assert_fenced_as_deleted(worker, lease)
        else:
            assert (await worker.info(KEY)) is not None  # left alone: fine
    finally:
        await deleter.aclose()
        await worker.aclose()


# ------------------------------------------------------------------ SQLite: two stores, files


async def test_two_sqlite_stores_on_one_file_see_each_others_tombstones(tmp_path: Path) -> None:
    """The worker's connection was opened (and its statements prepared) before the
    tombstones table existed; another store object deletes, creating it."""
    path = tmp_path / "shared.db"
    worker = SQLiteStore(path)
    operator = SQLiteStore(path)
    try:
        lease = await held_and_saved(worker)
        await worker.renew(lease)
        assert await operator.delete(KEY)
        await assert_fenced_as_deleted(worker, lease)
        fresh = await worker.acquire(KEY, "worker-b")
        assert fresh.epoch > lease.epoch
        assert await operator.delete(KEY)
        await assert_fenced_as_deleted(worker, fresh, base=0)
        await assert_fenced_as_deleted(operator, lease)
    finally:
        await worker.aclose()
        await operator.aclose()


async def test_sqlite_tombstones_are_per_namespace(tmp_path: Path) -> None:
    path = tmp_path / "ns.db"
    a = SQLiteStore(path, namespace="a")
    b = SQLiteStore(path, namespace="b")
    try:
        la = await held_and_saved(a)
        lb = await held_and_saved(b)
        assert await a.delete(KEY)
        await assert_fenced_as_deleted(a, la)
        assert await b.commit(commit(lb, 1, "m1")) == 2  # b's session is untouched
        assert await b.delete(KEY)
        await assert_fenced_as_deleted(b, lb, base=2)
        # a fresh session in a does not lift b's tombstone
        await a.acquire(KEY, "worker-c")
        await assert_fenced_as_deleted(b, lb, base=2)
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_read_only_store_reads_a_file_with_and_without_tombstones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ro.db"
    writer = SQLiteStore(path)
    try:
        await held_and_saved(writer)
        reader = SQLiteStore(path, read_only=True)
        try:
            assert await reader.keys() == [KEY]
            assert await writer.delete(KEY)
            assert await reader.keys() == [] and await reader.info(KEY) is None
        finally:
            await reader.aclose()
    finally:
        await writer.aclose()
    tables = {
        r[0]
        for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert "tombstones" in tables
    rows = sqlite3.connect(path).execute("SELECT * FROM tombstones").fetchall()
    assert len(rows) == 1 and KEY not in repr(rows)  # only a hash of the key


def _sqlite_process_delete(path: str, key: str) -> bool:
    async def go() -> bool:
        store = SQLiteStore(path)
        try:
            return await store.delete(key)
        finally:
            await store.aclose()

    return asyncio.run(go())


async def test_a_delete_from_another_process_fences_the_holder(tmp_path: Path) -> None:
    import concurrent.futures
    import multiprocessing

    path = tmp_path / "proc.db"
    worker = SQLiteStore(path)
    try:
        lease = await held_and_saved(worker)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            deleted = await asyncio.get_running_loop().run_in_executor(
                pool, _sqlite_process_delete, str(path), KEY
            )
        assert deleted is True
        await assert_fenced_as_deleted(worker, lease)
    finally:
        await worker.aclose()


# ------------------------------------------------------------------ memory internals


async def test_memory_tombstones_do_not_outlive_a_delete_of_another_key() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    first = await held_and_saved(store)
    assert await store.delete(KEY)
    clock.t += TOMBSTONE_TTL + 1
    other = await store.acquire("other", "w")
    assert await store.delete("other", lease=other)
    assert KEY not in store._tombstones  # swept: no leak
    with pytest.raises(LeaseLost) as lost:
        await store.renew(first)
    assert lost.value.vanished


# ------------------------------------------------------------------ ResumableSession


async def test_a_deleted_autosaving_session_restored_elsewhere_starts_a_new_conversation(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    lost: list[LeaseLost] = []

    async def on_lost(error: LeaseLost) -> None:
        lost.append(error)

    session, rs, _ = await start(store, ["one", "two", "three"], autosave=True, on_lost=on_lost)
    await session.run(user_input="the secret is plugh")
    await asyncio.wait_for(rs._autosave.idle.wait(), 5)
    assert await store.delete(KEY)
    # another worker restores the key at once: a new conversation
    other, other_rs, _ = await start(store, ["hello"], owner="w2")
    assert not other_rs.resumed
    await other.run(user_input="fresh start")
    assert await other_rs.checkpoint() >= 1
    # the first worker talks on: its saves are refused, never written over the new one
    await session.run(user_input="more of the deleted one")
    with pytest.raises(LeaseLost):
        await rs.checkpoint()
    await asyncio.sleep(0.1)
    assert lost and not lost[0].vanished
    await rs.aclose()
    await session.aclose()
    stored = await store.load(KEY)
    assert b"plugh" not in stored.head and all(
        b"plugh" not in r for items in stored.streams.values() for _, r in items
    )
    info = await store.info(KEY)
    assert info is not None and info.owner == "w2"
    await other_rs.aclose()
    await other.aclose()


async def test_a_deleted_session_restored_by_the_same_worker_is_new(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    session, rs, _ = await start(store, ["one", "two"], autosave=False)
    await session.run(user_input="the secret is plugh")
    assert await rs.checkpoint() == 1
    assert await store.delete(KEY)
    await session.run(user_input="still talking")
    with pytest.raises(LeaseLost, match="deleted"):
        await rs.checkpoint()
    await rs.aclose()
    await session.aclose()
    assert await store.info(KEY) is None
    again, again_rs, _ = await start(store, ["hello"])  # same owner "w1"
    assert not again_rs.resumed
    await again.run(user_input="new")
    assert await again_rs.checkpoint() == 1
    stored = await store.load(KEY)
    assert all(b"plugh" not in r for items in stored.streams.values() for _, r in items)
    await again_rs.aclose()
    await again.aclose()


# ------------------------------------------------------------------ Redis ACL


def test_an_acl_user_without_get_set_is_told_vanished_not_stuck(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/security.md: a user without +get +set deletes without a tombstone (warned),
    and its holder then writes the session back; its commit must not fail as an
    outage (retried for ever) when it reads the tombstone it may not GET."""
    from tests.test_security import earlier_acl_user

    url = earlier_acl_user(make_redis())
    caplog.set_level(logging.WARNING, logger="livekit_resume")

    async def go() -> None:
        store = RedisStore.from_url(url, namespace="old")
        try:
            lease = await held_and_saved(store)
            assert await store.delete(KEY)
            with pytest.raises(LeaseLost) as lost:
                await store.commit(commit(lease, 1, "m1"))
            assert lost.value.vanished
        finally:
            await store.aclose()

    asyncio.run(go())
    assert [r for r in caplog.records if "without a tombstone" in r.getMessage()]


async def test_a_resumable_session_frozen_through_rm_and_a_short_new_life_writes_nothing_back(
    make: Any,
) -> None:
    """End to end, against a tombstone lifted by a new session's acquire (as memory and
    SQLite once did): a worker's conversation is rm'd; another conversation under the
    key starts, ends (released) and expires by the store's session ttl (a minute); the
    first worker's next save must be refused, not write the deleted conversation back."""
    clock = Clock()
    store = await make(ttl=60.0, clock=clock)
    session, rs, _ = await start(store, ["one", "two"], autosave=False, lease_ttl=10.0)
    await session.run(user_input="the secret is plugh")
    assert await rs.checkpoint() == 1
    assert await store.delete(KEY)
    other = await store.acquire(KEY, "w2", ttl=10.0)
    await store.release(other)
    clock.t += 120.0
    await session.run(user_input="still talking")
    try:
        with pytest.raises(LeaseLost):
            await rs.checkpoint()
        assert await store.info(KEY) is None, "the deleted conversation was written back"
    finally:
        await rs.aclose()
        await session.aclose()


# ------------------------------------------------------------------ archive_stale


async def test_archive_stale_fences_the_conversations_previous_holder(
    make_store: StoreFactory,
) -> None:
    from livekit_resume.agent_hooks.job import archive_stale
    from livekit_resume.snapshot.codec import Codec

    store = await make_store()
    session, rs, _ = await start(store, ["one", "two"], autosave=False)
    await session.run(user_input="the secret is plugh")
    assert await rs.checkpoint() == 1
    old = rs._holder.lease
    assert old is not None
    await rs.suspend()
    archived = await archive_stale(store, Codec(), KEY, older_than=0.0, owner="job-2")
    assert archived is not None and await store.info(KEY) is None
    await session.aclose()
    with pytest.raises(LeaseLost) as lost:
        await store.commit(commit(old, 1, "written-back"))
    assert not lost.value.vanished, repr(lost.value)
    # a new conversation under the key: nothing of the archived one in it
    fresh, fresh_rs, _ = await start(store, ["hello"], owner="w3")
    assert not fresh_rs.resumed
    await fresh.run(user_input="new")
    assert await fresh_rs.checkpoint() == 1
    stored = await store.load(KEY)
    assert all(b"plugh" not in r for items in stored.streams.values() for _, r in items)
    assert (await store.info(archived)) is not None
    await fresh_rs.aclose()
    await fresh.aclose()


# ------------------------------------------------------------------ the command line


def _cli_worker_then(url: str, key: str, *commands: tuple[str, ...]) -> list[Any]:
    """A worker holds ``key`` (restored, one more turn saved); the commands run while it
    does; then it talks on and saves. Returns the commands' results and what its save
    raised (None: it saved)."""
    from livekit_resume import open_store
    from tests.test_cli import run, started

    async def go() -> list[Any]:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await session.run(user_input="remember the green gate")
            await rs.checkpoint("turn")
            out: list[Any] = []
            for args in commands:
                extra: dict[str, Any] = {}
                if args and args[-1] == "<y>":
                    args, extra = args[:-1], {"input": "y\n"}
                out.append(await asyncio.to_thread(run, url, *args, **extra))
            await session.run(user_input="remember the red roof")
            try:
                await rs.checkpoint("turn")
                out.append(None)
            except LeaseLost as e:
                out.append(e)
            await rs.aclose()
            await session.aclose()
            return out
        finally:
            await store.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(("release", "{key}"), id="release"),
        pytest.param(("revert", "{key}", "1", "--takeover"), id="revert-takeover"),
    ],
)
@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
def test_rm_after_the_worker_was_fenced_keeps_it_deleted(
    store_kind: str,
    before: tuple[str, ...],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cli.md rm: a worker fenced by ``release`` or ``revert --takeover`` that has not
    noticed yet, then ``rm`` of the now free session (asked, so under a lease of its
    own): the worker's next save is refused as fenced, and the session stays deleted."""
    from tests.test_cli import _converse, run, run_json

    if store_kind == "sqlite":
        url = f"sqlite:///{tmp_path}/sessions.db"
    else:
        server = request.getfixturevalue("redis_server")
        monkeypatch.setenv("RESUME_NAMESPACE", f"cli{uuid.uuid4().hex[:8]}")
        url = str(server.url)
    key = f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, key, ["remember the blue door"]))
    *results, saved = _cli_worker_then(
        url, key, tuple(a.format(key=key) for a in before), ("rm", key, "<y>")
    )
    for r in results:
        assert r.exit_code == 0, r.output
    assert isinstance(saved, LeaseLost) and not saved.vanished, saved
    assert run_json(url, "ls") == []
    assert run(url, "show", key).exit_code == 1


# ------------------------------------------------------------------ races, separate clients


async def _race(worker: Store, operator: Store, taker: Store, rounds: int) -> None:
    """Each round: A holds and saves; an rm, B's takeover, A's commit and renewal all at
    once, each from its own client. After it, whoever holds no session is fenced
    (never ``vanished``), and a session left is B's, who may write it."""
    for n in range(rounds):
        key = f"race-{n}-{uuid.uuid4().hex[:6]}"
        a = await worker.acquire(key, "worker-a", ttl=10.0)
        assert await worker.commit(commit(a, 0, "m0")) == 1
        deleted, b, *_ = await asyncio.gather(
            operator.delete(key),
            taker.acquire(key, "worker-b", ttl=10.0, takeover=True),
            worker.commit(commit(a, 1, "m1")),
            worker.renew(a, ttl=10.0),
            return_exceptions=True,
        )
        assert deleted is True and isinstance(b, Lease), (deleted, b)
        info = await operator.info(key)
        for lease in (a, b) if info is None else (a,):
            for base in (1, 2):
                with pytest.raises(LeaseLost) as lost:
                    await worker.commit(
                        Commit(key, lease.epoch, base, b"back", [Record("h", "back", b"x")], 1)
                    )
                assert not lost.value.vanished, (n, lease, repr(lost.value))
        if info is not None:
            assert info.epoch == b.epoch and info.owner == "worker-b"
            assert await taker.commit(commit(b, info.version, "new")) == info.version + 1
            assert await operator.delete(key)


async def test_races_of_rm_from_separate_sqlite_store_objects(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    stores = [SQLiteStore(path) for _ in range(3)]
    try:
        await _race(stores[0], stores[1], stores[2], rounds=15)
    finally:
        for s in stores:
            await s.aclose()


@pytest.mark.parametrize("kind", REDIS)
async def test_races_of_rm_from_separate_redis_clients(
    kind: str, request: pytest.FixtureRequest
) -> None:
    from tests.redis_servers import build_redis_store

    ns = f"t{uuid.uuid4().hex[:10]}"
    stores = [await build_redis_store(kind, request, namespace=ns) for _ in range(3)]
    try:
        await _race(stores[0], stores[1], stores[2], rounds=15)
    finally:
        for s in stores:
            await s.aclose()


async def test_a_quiet_autosaving_holder_learns_of_the_rm_from_its_renewals(
    make_store: StoreFactory,
) -> None:
    """No turn after the rm: the renewal loop (every third of the lease) is what meets
    the deleted session. It must stop the holder (``on_lost``) and create nothing."""
    store = await make_store()
    lost: list[LeaseLost] = []

    async def on_lost(error: LeaseLost) -> None:
        lost.append(error)

    session, rs, _ = await start(store, ["one"], autosave=True, on_lost=on_lost, lease_ttl=0.6)
    await session.run(user_input="a")
    await asyncio.wait_for(rs._autosave.idle.wait(), 5)
    assert await store.delete(KEY)
    for _ in range(40):
        if lost:
            break
        await asyncio.sleep(0.05)
    try:
        assert lost and not lost[0].vanished, lost
        assert "deleted" in str(lost[0])
        assert await store.info(KEY) is None
    finally:
        await rs.aclose()
        await session.aclose()
    assert await store.info(KEY) is None and await store.keys() == []


def _cli_url(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path, mp: Any) -> str:
    if store_kind == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    server = request.getfixturevalue("redis_server")
    mp.setenv("RESUME_NAMESPACE", f"cli{uuid.uuid4().hex[:8]}")
    return str(server.url)


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
def test_commands_around_a_deleted_key_never_revive_it_for_its_old_worker(
    store_kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rm --yes of a held session; then release and revert --takeover of the deleted
    key (refused: nothing to act on, nothing created); then an import of an export
    taken before the rm (a new session). The old worker's save is refused throughout,
    and what the key holds is the import, nothing the worker said after."""
    from tests.test_cli import _converse, run, run_json, snapshot_of

    url = _cli_url(store_kind, request, tmp_path, monkeypatch)
    key = f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, key, ["remember the blue door"]))
    exported = tmp_path / "before.lkr"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    rm, release, revert, ls, imported, saved = _cli_worker_then(
        url,
        key,
        ("rm", key, "--yes"),
        ("release", key),
        ("revert", key, "1", "--takeover"),
        ("--json", "ls"),
        ("import", str(exported), "--key", key),
    )
    assert rm.exit_code == 0, rm.output
    assert release.exit_code != 0 and revert.exit_code != 0, (release.output, revert.output)
    assert ls.exit_code == 0 and ls.stdout.strip() == "[]", ls.output
    assert imported.exit_code == 0, imported.output
    assert isinstance(saved, LeaseLost) and not saved.vanished, saved
    (listed,) = run_json(url, "ls")
    assert listed["key"] == key and listed["owner"] is None
    texts = repr(snapshot_of(url, key).history)
    assert "blue door" in texts and "red roof" not in texts and "green gate" not in texts


# ------------------------------------------------------------------ resumable_job


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_a_resumable_job_whose_key_is_rm_d_ends_its_call_and_writes_nothing(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """cli.md: rm of a session a worker holds: "a resumable_job ends its call"; the
    deleted conversation is never written back, on its next turn nor as it closes."""
    import json

    from tests.lk.jobs import JobHarness
    from tests.test_resumable_job import ENTRY, ready, turn

    if store_kind == "sqlite":
        target: dict[str, Any] = {"store": f"sqlite:///{tmp_path}/jobs.db"}
    else:
        server = request.getfixturevalue("redis_server")
        ns = f"j{uuid.uuid4().hex[:8]}"
        target = {"store": server.url, "store_options": {"namespace": ns}}
    room = f"call-rm-{uuid.uuid4().hex[:6]}"
    store = lr.open_store(target["store"], **target.get("store_options", {}))
    try:
        async with JobHarness() as harness:
            job = await harness.start_job(ENTRY, room=room, metadata=json.dumps(target))
            await ready(job)
            assert await turn(job, "remember the blue door") >= 1
            assert await store.delete(room)
            await job.send("turn remember the red roof")
            closed = await job.expect("CLOSED")
            assert closed.split()[1] in ("user_initiated", "job_shutdown"), closed
            assert await job.wait_exit() == 0
        assert await store.info(room) is None and await store.keys() == []
    finally:
        await store.aclose()


async def test_a_sqlite_file_whose_tombstones_table_went_away_still_works(
    tmp_path: Path,
) -> None:
    """The table dropped under an open store (a file put back from before tombstones,
    an older tool's VACUUM INTO copy): the store's statements meet "no such table", a
    lost session is ``vanished`` as before, and the next delete makes the table again."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    try:
        first = await held_and_saved(store)
        assert await store.delete(KEY)
        await assert_fenced_as_deleted(store, first)  # statements on the table prepared
        raw = sqlite3.connect(path)
        raw.execute("DROP TABLE tombstones")
        raw.commit()
        raw.close()
        with pytest.raises(LeaseLost) as lost:
            await store.commit(commit(first, 1, "m1"))
        assert lost.value.vanished
        second = await held_and_saved(store, "worker-b")
        assert second.epoch > first.epoch
        assert await store.delete(KEY)
        await assert_fenced_as_deleted(store, second)
    finally:
        await store.aclose()
