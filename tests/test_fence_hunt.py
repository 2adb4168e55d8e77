"""Hunt `fence`: a stateful model of the fencing rule as 3b29035 and 6b3f9ee left it
(`Store.acquire(..., takeover, reclaim)`, stores/base.py `acquired_epoch`,
`LeaseHolder.acquire/renew/commit/reacquire`), driven by hypothesis against a
`MemoryStore` (and a `SQLiteStore`) that can forget all its data, roll back to an
earlier state, and whose clock can step back.

Up to four workers hold one key through a `LeaseHolder` each (what one
`ResumableSession` uses). A commit is whole (``Commit(..., whole=True)``) and follows
session.py `_commit_or_reacquire`: `LeaseLost.vanished` -> `reacquire(version)` and
commit again (once); any other `LeaseLost` fences the worker for good.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from livekit_resume.agent_hooks.lease import LeaseHolder
from livekit_resume.errors import LeaseLost, SessionBusy
from livekit_resume.stores.base import Commit
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite.store import SQLiteStore

pytestmark = pytest.mark.filterwarnings("ignore")

KEY = "room-fence"
LEASE = 1.0  # seconds
START_US = 1_700_000_000_000_000  # the store clock, in microseconds
TICK_US = 100  # every store operation is a transaction: tens of microseconds at least
WORKERS = 4


class FakeClock:
    """The store's clock in whole microseconds: moves forward by `tick` on every rule,
    by `advance`, and back only by `step_back`."""

    def __init__(self) -> None:
        self.us = START_US

    def __call__(self) -> float:
        return self.us / 1_000_000

    def advance(self, us: int) -> None:
        self.us += us


class ForgetfulMemoryStore(MemoryStore):
    def forget(self) -> None:
        self._sessions.clear()
        self._tombstones.clear()

    def snapshot(self) -> Any:
        return copy.deepcopy((self._sessions, self._tombstones))

    def rollback(self, snap: Any) -> None:
        sessions, tombstones = copy.deepcopy(snap)
        self._sessions.clear()
        self._sessions.update(sessions)
        self._tombstones.clear()
        self._tombstones.update(tombstones)

    def live_tombstone(self, now: float) -> int | None:
        return self._tombstone(KEY, now)

    def store_epoch(self) -> int | None:
        s = self._sessions.get(KEY)
        return s.epoch if s is not None else None


class ForgetfulSQLiteStore(SQLiteStore):
    """A SQLiteStore whose file can lose its rows or go back to rows saved earlier (as
    a restore from a backup), through a connection of the test's own."""

    TABLES = ("sessions", "versions", "log", "tombstones")

    def __init__(self, path: Path, clock: FakeClock) -> None:
        super().__init__(path, clock=clock)
        self._side = sqlite3.connect(path, timeout=5, isolation_level=None)
        self._path_dir = path.parent

    def _tables(self) -> list[str]:
        have = {r[0] for r in self._side.execute("SELECT name FROM sqlite_master")}
        return [t for t in self.TABLES if t in have]

    def forget(self) -> None:
        self._side.execute("BEGIN IMMEDIATE")
        for t in self._tables():
            self._side.execute(f"DELETE FROM {t}")
        self._side.execute("COMMIT")

    def snapshot(self) -> Any:
        return {t: self._side.execute(f"SELECT * FROM {t}").fetchall() for t in self._tables()}

    def rollback(self, snap: Any) -> None:
        self._side.execute("BEGIN IMMEDIATE")
        for t in self._tables():
            self._side.execute(f"DELETE FROM {t}")
            for row in snap.get(t, []):
                marks = ",".join("?" * len(row))
                self._side.execute(f"INSERT INTO {t} VALUES ({marks})", row)
        self._side.execute("COMMIT")

    def store_epoch(self) -> int | None:
        if "sessions" not in self._tables():
            return None
        row = self._side.execute("SELECT epoch FROM sessions WHERE key=?", (KEY,)).fetchone()
        return int(row[0]) if row is not None else None

    def live_tombstone(self, now: float) -> int | None:
        if "tombstones" not in self._tables():
            return None
        row = self._side.execute("SELECT epoch FROM tombstones WHERE until > ?", (now,)).fetchone()
        return int(row[0]) if row is not None else None

    def cleanup(self) -> None:
        self._side.close()
        shutil.rmtree(self._path_dir, ignore_errors=True)


@dataclass
class Worker:
    slot: int
    holder: LeaseHolder | None = None
    life: int = 0  # a new restore (a new job) is a new life
    version: int = 0  # the last version this worker committed or found
    fenced: bool = False
    released: bool = False
    landed: list[int] = field(default_factory=list)


class Fence(RuleBasedStateMachine):
    """The model. Subclasses give `make_store`."""

    def make_store(self, clock: FakeClock) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup

    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = self.make_store(self.clock)
        self.workers = [Worker(i) for i in range(WORKERS)]
        self.lives = 0
        self.snapshots: list[Any] = []
        self.log: list[str] = []
        self.disrupted = False  # a forget or a rollback happened in this run
        self.clock_back = False  # the clock stepped back in this run
        self.emax = 0  # the highest epoch ever granted
        self.known_max = True  # the store's epoch is `emax` (it has not forgotten it)
        self.grants: dict[int, set[str]] = {}  # epoch -> owners granted it
        self.landings: dict[int, set[str]] = {}  # epoch -> owners whose commit landed at it
        self.deleted: list[tuple[int, set[str]]] = []  # (tombstone epoch, lives present)
        self.counter = 0

    def teardown(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            try:
                loop.run_until_complete(self.store.aclose())
            finally:
                loop.close()
        close = getattr(self.store, "cleanup", None) if hasattr(self, "store") else None
        if close is not None:
            close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def tick(self) -> None:
        self.clock.advance(TICK_US)

    def owner(self, w: Worker) -> str:
        return f"w{w.slot}.{w.life}"

    def note(self, text: str) -> None:
        self.log.append(text)

    # ------------------------------------------------------------------ bookkeeping

    def granted(self, w: Worker, epoch: int) -> None:
        owner = self.owner(w)
        assert epoch < 2**53, f"{owner} granted epoch {epoch} >= 2**53"
        for other in self.workers if self.CHECK_DUPLICATES else ():
            if other is w or other.holder is None or other.fenced or other.released:
                continue
            if other.holder.lease is not None and other.holder.epoch == epoch:
                raise AssertionError(
                    f"epoch {epoch} granted to {owner} while {self.owner(other)} holds it "
                    f"and may commit under it; log: {self.log}"
                )
        self.grants.setdefault(epoch, set()).add(owner)
        if epoch >= self.emax:
            self.emax = epoch
            self.known_max = True
        elif not self.disrupted and not self.clock_back:
            raise AssertionError(
                f"{owner} granted epoch {epoch}, below {self.emax} granted before, in a run "
                f"with no forget, rollback nor clock step; log: {self.log}"
            )

    def landed(self, w: Worker, epoch: int, version: int) -> None:
        owner = self.owner(w)
        assert not w.fenced
        if self.known_max and not self.clock_back:
            assert epoch == self.emax, (
                f"{owner}'s commit at epoch {epoch} landed (v{version}) after the holder of "
                f"the highest epoch {self.emax} was known to the store; log: {self.log}"
            )
        if epoch == self.emax:
            self.known_max = True
        for other in self.workers if self.CHECK_DUPLICATES else ():
            if other is w or other.holder is None or other.fenced or other.released:
                continue
            if other.holder.epoch == epoch and self.owner(other) in self.landings.get(epoch, ()):
                raise AssertionError(
                    f"commits of {owner} and {self.owner(other)}, both holding epoch {epoch}, "
                    f"landed; log: {self.log}"
                )
        self.landings.setdefault(epoch, set()).add(owner)
        tomb = self.store.live_tombstone(self.clock())
        if tomb is not None:
            for t_epoch, lives in self.deleted:
                if t_epoch == tomb and owner in lives:
                    raise AssertionError(
                        f"{owner}, a holder of the session deleted at epoch {tomb} (its "
                        f"tombstone live), wrote it back at epoch {epoch}; log: {self.log}"
                    )
        w.landed.append(version)

    def fence(self, w: Worker, e: LeaseLost, where: str) -> None:
        self.note(f"{self.owner(w)} fenced at {where}: {e}")
        if not self.disrupted:
            assert not e.vanished
        w.fenced = True
        assert w.holder is not None
        w.holder.drop()

    # ------------------------------------------------------------------ rules

    @rule(slot=st.integers(0, WORKERS - 1), takeover=st.booleans())
    def restore(self, slot: int, takeover: bool) -> None:
        """A new job on worker `slot` restores the key (a worker still live there keeps
        running as a zombie only if it was not released: a new slot life replaces it
        only when it is idle)."""
        w = self.workers[slot]
        if w.holder is not None and not (w.fenced or w.released):
            return  # that worker's session is live; it is not restored twice
        self.tick()
        self.lives += 1
        w.life = self.lives
        w.fenced = w.released = False
        w.holder = LeaseHolder(self.store, KEY, self.owner(w), LEASE)
        try:
            lease = self.run(w.holder.acquire(takeover=takeover))
        except SessionBusy as e:
            self.note(f"{self.owner(w)} restore takeover={takeover}: busy ({e.holder})")
            w.holder = None
            return
        info = self.run(self.store.info(KEY))
        w.version = info.version if info is not None else 0
        self.note(f"{self.owner(w)} restore takeover={takeover}: epoch {lease.epoch} v{w.version}")
        self.granted(w, lease.epoch)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.holder is not None and not (w.fenced or w.released)]

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        self.commit_as(data.draw(st.sampled_from(self.live())))

    def commit_as(self, w: Worker) -> None:
        h = w.holder
        assert h is not None
        self.tick()
        self.counter += 1
        body = f"{self.owner(w)}#{self.counter}".encode()
        reacquired = False
        if h.vanished:
            if not self.reacquire(w):
                return
            reacquired = True
        while True:
            epoch = h.epoch
            try:
                v = self.run(h.commit(Commit(KEY, epoch, w.version, body, [], 0, whole=True)))
            except LeaseLost as e:
                if not e.vanished or reacquired:
                    self.fence(w, e, f"commit at {epoch} base v{w.version}")
                    return
                self.note(f"{self.owner(w)} commit at {epoch}: vanished ({e})")
                reacquired = True
                self.tick()
                if not self.reacquire(w):
                    return
                continue
            self.note(f"{self.owner(w)} commit at {epoch}: landed v{v}")
            self.landed(w, epoch, v)
            w.version = v
            return

    def reacquire(self, w: Worker) -> bool:
        h = w.holder
        assert h is not None
        before = h.epoch
        stored = self.store.store_epoch()  # the store's epoch as it is asked
        try:
            w.version = self.run(h.reacquire(w.version))
        except LeaseLost as e:
            self.fence(w, e, f"reacquire from {before}")
            return False
        self.note(f"{self.owner(w)} reacquired {before} -> {h.epoch} at v{w.version}")
        if stored is not None and stored > before and not self.clock_back:
            others = self.grants.get(stored, set()) - {self.owner(w)}
            assert not others, (
                f"{self.owner(w)} (epoch {before}) reacquired the key at {h.epoch} although "
                f"the store holds {sorted(others)}'s later epoch {stored}: a holder taken "
                f"over is un-fenced; log: {self.log}"
            )
        self.granted(w, h.epoch)
        return True

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.live()))
        assert w.holder is not None
        self.tick()
        try:
            ok = self.run(w.holder.renew(w.version))
        except LeaseLost as e:
            self.fence(w, e, "renew")
            return
        self.note(f"{self.owner(w)} renew: {'ok' if ok else 'vanished'}")
        if not ok and self.SKIP_KNOWN:
            self.commit_as(w)  # no gap: the checkpoint the renewal triggers runs at once

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.live()))
        assert w.holder is not None
        self.tick()
        self.run(w.holder.release())
        w.released = True
        self.note(f"{self.owner(w)} released")

    SKIP_KNOWN = False
    CHECK_DUPLICATES = True

    @rule()
    def rm(self) -> None:
        if self.SKIP_KNOWN and any(
            w.holder.vanished or w.holder.epoch > (self.store.store_epoch() or 0)  # type: ignore[union-attr]
            for w in self.live()
        ):
            return  # the two rm defects found (tests below): skipped to hunt on
        self.tick()
        epoch = self.store.store_epoch()
        gone = self.run(self.store.delete(KEY))
        lives = {self.owner(w) for w in self.workers if w.holder is not None}
        if gone:
            assert epoch is not None
            self.deleted.append((epoch, lives))
        self.note(f"rm: {gone} (tombstone {epoch}, lives {sorted(lives)})")

    @rule()
    def forget(self) -> None:
        self.tick()
        self.store.forget()
        self.snapshots.clear()
        self.disrupted = True
        self.known_max = False
        self.note("store forgot everything")

    @rule()
    def snapshot(self) -> None:
        if len(self.snapshots) < 3:
            self.snapshots.append(self.store.snapshot())
            self.note(f"snapshot #{len(self.snapshots) - 1} (epoch {self.store.store_epoch()})")

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.snapshots) - 1))
        self.tick()
        self.store.rollback(self.snapshots[i])
        del self.snapshots[i + 1 :]
        self.disrupted = True
        if self.store.store_epoch() != self.emax:
            self.known_max = False
        self.note(f"rolled back to snapshot #{i} (epoch {self.store.store_epoch()})")

    @rule(us=st.integers(1_000, 3_000_000))
    def time_passes(self, us: int) -> None:
        self.clock.advance(us)
        self.note(f"+{us}us")

    CLOCK_BACK = True

    @precondition(lambda self: self.CLOCK_BACK)
    @rule(us=st.integers(1_000, 120_000_000))
    def clock_steps_back(self, us: int) -> None:
        self.clock.advance(-us)
        self.clock_back = True
        self.note(f"clock -{us}us")

    @invariant()
    def epochs_are_bounded(self) -> None:
        if hasattr(self, "store"):
            e = self.store.store_epoch()
            assert e is None or 0 < e < 2**53


SETTINGS = settings(
    max_examples=int(os.environ.get("FENCE_EXAMPLES", "200")),
    deadline=None,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class MemoryFenceForward(Fence):
    """The store's clock only moves forward; forgets, rollbacks and deletes."""

    SKIP_KNOWN = False  # the three defects it found are fixed
    CLOCK_BACK = False

    def make_store(self, clock: FakeClock) -> Any:
        return ForgetfulMemoryStore(clock=clock)


class MemoryFenceClockBack(MemoryFenceForward):
    """The same with the clock stepping back: only the 'always' invariants (the
    duplicated epoch left to its test below)."""

    CLOCK_BACK = True
    CHECK_DUPLICATES = False


class SQLiteFenceForward(MemoryFenceForward):
    def make_store(self, clock: FakeClock) -> Any:
        return ForgetfulSQLiteStore(Path(tempfile.mkdtemp(prefix="fence-")) / "f.db", clock)


class TestMemoryFenceForward(MemoryFenceForward.TestCase):  # type: ignore[valid-type,misc]
    """passes: coverage. 200 runs of up to 30 steps: restore (with and without
    takeover), whole commits through `_commit_or_reacquire`'s rule, renewals, releases,
    `rm`, forgets, rollbacks and time passing, on a MemoryStore whose clock only moves
    forward. Checked: no untyped error; without forget/rollback, classic fencing (every
    grant above the last, only the latest epoch's commits land); with them, once the
    highest epoch granted is back in the store only its commits land; never one epoch
    held by two live owners; epochs below 2**53; a deleted session not written back
    by a holder of its former life. (The three defects below are kept out of it:
    `rm` while a holder is vanished or above the store's epoch, and the renewal's
    vanished flag left standing between steps.)"""

    settings = SETTINGS


class TestMemoryFenceClockBack(MemoryFenceClockBack.TestCase):  # type: ignore[valid-type,misc]
    """passes: coverage. The same machine with the store's clock stepping back (1 ms to
    2 min): no untyped error, epochs below 2**53, a deleted session not written back."""

    settings = SETTINGS


class TestSQLiteFenceForward(SQLiteFenceForward.TestCase):  # type: ignore[valid-type,misc]
    """passes: coverage. `TestMemoryFenceForward`'s machine on a SQLiteStore file (forget
    and rollback done on its tables through a connection of the test's own)."""

    settings = settings(SETTINGS, max_examples=int(os.environ.get("FENCE_SQLITE_EXAMPLES", "60")))


# ------------------------------------------------------------------ the defects found
# Each is a minimized counterexample of the machine above (MemoryFenceForward with
# SKIP_KNOWN = False found the first three within a few hundred runs, failing on
# 6b3f9ee and fixed in the commit that added this file; CHECK_DUPLICATES with the clock
# stepping back the fourth, a known limit), written out step by step.


@pytest.fixture(params=["memory", "sqlite"])
def forgetful(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def make(clock: FakeClock) -> Any:
        if request.param == "memory":
            return ForgetfulMemoryStore(clock=clock)
        return ForgetfulSQLiteStore(tmp_path / "f.db", clock)

    return make


async def _commit(h: LeaseHolder, base: int, data: bytes) -> int:
    return await h.commit(Commit(KEY, h.epoch, base, data, [], 0, whole=True))


async def _held_at_v1(store: Any, clock: FakeClock, owner: str) -> tuple[LeaseHolder, int]:
    """``owner`` acquires the key and commits v1 a tick later."""
    holder = LeaseHolder(store, KEY, owner, 30.0)
    await holder.acquire(takeover=False)
    clock.advance(TICK_US)
    return holder, await _commit(holder, 0, f"{owner}: hello".encode())


SAME_EPOCH = (
    "known limit (failure-model.md, 'clock stepped back'): while the store's clock is behind"
    " its epochs, a takeover repeated after a rollback gets the same epoch"
)
SAME_EPOCH_XFAIL = pytest.mark.xfail(strict=True, reason=SAME_EPOCH)


async def _acquired_across_a_rollback(
    store: Any, clock: FakeClock, *, takeover: bool
) -> tuple[LeaseHolder, LeaseHolder]:
    """w1 acquires the key, the store is rolled back to before that, and w2 acquires it
    a tick later."""
    before = store.snapshot()
    w1 = LeaseHolder(store, KEY, "w1", 30.0)
    await w1.acquire(takeover=takeover)
    store.rollback(before)
    clock.advance(TICK_US)
    w2 = LeaseHolder(store, KEY, "w2", 30.0)
    await w2.acquire(takeover=takeover)
    return w1, w2


async def _outcome(coro: Any) -> Any:
    try:
        return await coro
    except (LeaseLost, SessionBusy) as e:
        return e


async def _save(h: LeaseHolder, version: int, data: bytes) -> Any:
    """session.py `_commit_or_reacquire` for a whole commit: reacquire first if the
    holder is vanished; on a vanished `LeaseLost`, reacquire and commit again once.
    Returns the version that landed, or the `LeaseLost` that fenced the holder."""
    try:
        if h.vanished:
            version = await h.reacquire(version)
        try:
            return await _commit(h, version, data)
        except LeaseLost as e:
            if not e.vanished:
                raise
            version = await h.reacquire(version)
            return await _commit(h, version, data)
    except LeaseLost as e:
        return e


async def _close(store: Any) -> None:
    await store.aclose()
    cleanup = getattr(store, "cleanup", None)
    if cleanup is not None:
        cleanup()


async def test_a_session_deleted_while_its_holder_is_vanished_is_not_written_back(
    forgetful: Any,
) -> None:
    """One worker, w1, holds the key and has committed v1 and v2. The store is rolled
    back to v1 (a failover to a lagging replica). w1's lease renewal finds the store
    behind its version: `LeaseHolder.renew` returns False and sets ``vanished`` (the
    renewal loop then triggers a checkpoint, session.py `_renew`). Before that
    checkpoint runs, an operator runs `rm` on the session: the store deletes it and
    leaves a tombstone at w1's epoch. Then w1's checkpoint runs (`_commit_or_reacquire`:
    the holder is vanished, so `reacquire` first).

    Should: w1 is fenced (`LeaseLost`, "deleted") and the deleted conversation is not
    written back: docs/failure-model.md (row "an operator's rm ... of a session a worker
    holds live": "the worker's next save or lease renewal is refused as fenced"),
    docs/cli.md ("The deleted conversation is never written back"), multi-worker.md.
    A commit sent straight away would be: `lease_lost_error` sees the tombstone at w1's
    epoch.

    Does: `reacquire` skips the commit that would have read the tombstone and acquires
    without looking at it: `Store.acquire(reclaim=E1)` with the session gone and a
    tombstone at E1 is a plain acquisition (stores/base.py:746-751, `acquired_epoch`:
    the reclaim is not above the tombstone, so ``floor + 1``), granted above the
    tombstone, and w1 writes the whole deleted conversation back as v1.

    Cause: agent_hooks/lease.py:176-192 and 214-229 (`reacquire` -> `_acquire_kept`) and
    stores/base.py:746-751, which treat a reclaim at or below a live tombstone as a
    plain acquisition. Fix: in `acquired_epoch`, a ``reclaim`` at or below a live
    tombstone (``tombstone`` passed whether or not a session exists) raises the
    deleted `lease_lost_error(key, reclaim, None, tombstone=...)` (not vanished); the
    same in acquire.lua; `LeaseHolder.reacquire` lets that `LeaseLost` through."""
    clock = FakeClock()
    store = forgetful(clock)
    try:
        w1 = LeaseHolder(store, KEY, "w1", 30.0)
        await w1.acquire(takeover=False)
        clock.advance(TICK_US)
        v1 = await _commit(w1, 0, b"w1: hello")
        before = store.snapshot()
        clock.advance(TICK_US)
        v2 = await _commit(w1, v1, b"w1: my card number is ...")
        store.rollback(before)  # a failover to a replica that lagged at v1
        clock.advance(TICK_US)
        assert await w1.renew(v2) is False and w1.vanished
        clock.advance(TICK_US)
        assert await store.delete(KEY) is True  # the operator's rm
        clock.advance(TICK_US)
        got = await _save(w1, v2, b"w1: the whole conversation")
        info = await store.info(KEY)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"w1's save after the rm: {got!r}; the store now holds {info!r}"
        )
        assert info is None
    finally:
        await _close(store)


async def test_a_holder_taken_over_while_vanished_does_not_overwrite_the_newer(
    forgetful: Any,
) -> None:
    """w1 holds the key (E1) and has committed v1, v2. The store is rolled back to v1;
    w1's renewal finds it behind (`renew` -> False, ``vanished``). Before w1's
    triggered checkpoint runs (w1 frozen, or its reacquisition failing with
    `StoreUnavailable` while the store flaps, which leaves ``vanished`` set), a new job
    w2 restores the call with ``takeover=True`` (E2 > E1), commits its conversation and
    suspends (its lease released). Then w1's checkpoint runs.

    Should: w1 is fenced (`LeaseLost`, not vanished) and w2's conversation stays: DESIGN.md
    "a zombie worker can never overwrite the conversation of the worker that took over";
    without the vanished flag w1's commit would be refused as stale (the store's epoch
    E2 is above E1). The same with the store emptied and w2 restoring the empty key
    (failure-model.md, 'Redis restarted without its data': "If another worker acquired
    the empty key first, that worker keeps it and this one is fenced").

    Does: `reacquire` calls `Store.acquire(reclaim=E1)` without takeover; the store's
    epoch E2 is above E1, so the reclaim "changes nothing" and it is a plain acquisition
    of a free lease (stores/base.py:752-758 `acquired_epoch`): granted at a new epoch,
    and w1 writes its whole conversation over w2's.

    Cause: stores/base.py:746-758 and agent_hooks/lease.py:214-229 (`_acquire_kept`): a
    reclaim below the store's epoch means another owner acquired the key after this holder,
    yet it is granted whenever the lease is free. Fix: in `acquired_epoch`, a ``reclaim``
    below the store's epoch raises the stale `lease_lost_error(key, reclaim, epoch)` (not
    vanished) instead of acquiring (acquire.lua the same); `reacquire` lets it through."""
    clock = FakeClock()
    store = forgetful(clock)
    try:
        w1 = LeaseHolder(store, KEY, "w1", 30.0)
        await w1.acquire(takeover=False)
        clock.advance(TICK_US)
        v1 = await _commit(w1, 0, b"w1: hello")
        before = store.snapshot()
        clock.advance(TICK_US)
        v2 = await _commit(w1, v1, b"w1: more")
        store.rollback(before)
        clock.advance(TICK_US)
        assert await w1.renew(v2) is False and w1.vanished
        clock.advance(1_000_000)
        w2 = LeaseHolder(store, KEY, "w2", 30.0)
        await w2.acquire(takeover=True)  # a new job takes the call over
        info = await store.info(KEY)
        assert info is not None and w2.epoch > w1.epoch
        clock.advance(TICK_US)
        w2v = await _commit(w2, info.version, b"w2: the caller, on the new job")
        e2 = w2.epoch
        await w2.release()  # suspended
        clock.advance(TICK_US)
        got = await _save(w1, v2, b"w1: zombie conversation")
        stored = await store.load(KEY)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"the zombie w1's save: {got!r}; the store holds {stored.head!r} at "
            f"v{stored.version}, epoch {stored.epoch} (w2's was v{w2v}, epoch {e2})"
        )
        assert stored.head == b"w2: the caller, on the new job"
    finally:
        await _close(store)


async def test_rm_after_a_rollback_is_not_undone_by_the_holder_the_store_forgot(
    forgetful: Any,
) -> None:
    """w1 holds the key (E1, v1). w2 takes it over (E2) and commits v2. The store is
    rolled back to before the takeover (w1's lease live at E1 again). An operator runs
    `rm`: the tombstone is laid at the store's epoch, E1. w2, the live holder of the
    call, saves: its commit finds the session gone with a tombstone *below* its epoch
    (vanished), and its reclaim of E2 is granted (above the tombstone, at or below the
    clock): w2 writes the deleted conversation back whole.

    Should: the deleted conversation is not written back (docs/cli.md: "`rm` of a
    session a worker still holds ... fences that worker ... The deleted conversation
    is never written back"; failure-model.md's rm row lists only a worker frozen past
    the tombstone's day, or an evicted tombstone, as exceptions).

    Does: written back as v1 under E2 (stores/base.py:746-749: a reclaim above the
    tombstone is granted; lease_lost_error, base.py:775, calls the session vanished
    because E2 > tombstone). The tombstone records only the epoch the (rolled back)
    store knew, not when the delete happened.

    Fix: lay the tombstone at ``max(session epoch, epoch_floor(now))`` (memory.py:322,
    sqlite/tombstones.py:51 `lay`, the Redis tombstone alike): every epoch handed out before
    the delete is at or below the store's clock in microseconds then, so every holder of the
    deleted life is at or below the tombstone and fenced, while a new life still starts
    above it; with the fix of the first test, its reclaim is refused as deleted."""
    clock = FakeClock()
    store = forgetful(clock)
    try:
        w1 = LeaseHolder(store, KEY, "w1", 30.0)
        await w1.acquire(takeover=False)
        clock.advance(TICK_US)
        v1 = await _commit(w1, 0, b"w1: hello")
        before = store.snapshot()
        clock.advance(TICK_US)
        w2 = LeaseHolder(store, KEY, "w2", 30.0)
        await w2.acquire(takeover=True)
        clock.advance(TICK_US)
        v2 = await _commit(w2, v1, b"w2: the conversation")
        store.rollback(before)  # forgot the takeover
        clock.advance(TICK_US)
        assert await store.delete(KEY) is True  # the operator's rm
        clock.advance(TICK_US)
        got = await _save(w2, v2, b"w2: the whole conversation")
        info = await store.info(KEY)
        assert isinstance(got, LeaseLost) and not got.vanished, (
            f"w2's save after the rm: {got!r}; the store now holds {info!r}"
        )
        assert info is None
    finally:
        await _close(store)


@SAME_EPOCH_XFAIL
async def test_with_the_clock_behind_a_rollback_hands_one_epoch_to_two_owners(
    forgetful: Any,
) -> None:
    """w0 holds the key (E0, v1). The store's clock steps back by a second (a failover
    to a host whose clock is behind, a VM restored). w1 takes over: the clock is below
    E0, so w1 gets E0 + 1 (`acquired_epoch`: ``max(epoch + 1, floor)``). The store is
    then rolled back to before that takeover (another failover to a replica that had
    not received it; its clock behind too), and a newer job w2 takes over from w0: it
    gets E0 + 1 again. w1, not having heard of w2, commits: it lands, in w2's lease
    (the epoch matches); w2's next commit is refused ("another writer shares this
    lease"), so the zombie keeps the call and the newest holder is fenced.

    Should: a store never hands one epoch to two owners that can both commit (DESIGN.md:
    the epoch "grows on every takeover"; "a zombie worker can never overwrite the
    conversation of the worker that took over"). failure-model.md's known limit covers
    a clock stepped back *across an expiry* or a delete whose tombstone is gone, not a
    rollback.

    Does: both w1 and w2 hold E0 + 1 (stores/base.py:758). Severity: low (a clock behind
    the store's epochs and a rollback between two takeovers).

    Fix: when the clock is below the store's epoch (``floor <= epoch``), the store
    cannot rule out having handed ``epoch + 1`` out before it went back: step by a
    random amount instead (``epoch + 1 + secrets.randbelow(2**20)``, kept below 2**53),
    or have commits carry the owner and refuse one whose owner is not the lease's."""
    clock = FakeClock()
    store = forgetful(clock)
    try:
        _w0, v1 = await _held_at_v1(store, clock, "w0")
        clock.advance(-1_000_000)  # the clock steps back a second
        w1, w2 = await _acquired_across_a_rollback(store, clock, takeover=True)
        clock.advance(TICK_US)
        zombie = await _outcome(_commit(w1, v1, b"w1: zombie words"))
        newest = await _outcome(_commit(w2, v1, b"w2: the caller"))
        assert w1.epoch != w2.epoch, (
            f"w1 and w2 both hold epoch {w2.epoch}: the zombie w1's commit -> {zombie!r}, "
            f"the newest holder w2's -> {newest!r}"
        )
        assert isinstance(zombie, LeaseLost) and newest == v1 + 1, (zombie, newest)
    finally:
        await _close(store)


@SAME_EPOCH_XFAIL
async def test_with_the_clock_behind_a_tombstone_a_rollback_hands_no_epoch_to_two_owners(
    forgetful: Any,
) -> None:
    """The same for a session created again after a delete: the clock a second behind the
    tombstone's epoch, w1 creates the key, the store is rolled back to before that, and
    w2 creates it. Both get the tombstone's epoch + 1."""
    clock = FakeClock()
    store = forgetful(clock)
    try:
        w0, _v1 = await _held_at_v1(store, clock, "w0")
        assert await store.delete(KEY)
        clock.advance(-1_000_000)
        w1, w2 = await _acquired_across_a_rollback(store, clock, takeover=False)
        assert w0.epoch < w1.epoch and w0.epoch < w2.epoch
        assert w1.epoch != w2.epoch, f"w1 and w2 both hold epoch {w2.epoch}"
    finally:
        await _close(store)


@SAME_EPOCH_XFAIL
async def test_redis_with_its_clock_behind_a_rollback_hands_no_epoch_to_two_owners(
    redis_server: Any,
) -> None:
    """The case above on a real Redis, whose clock acquire.lua reads with ``TIME``: the
    key's epoch a minute ahead of it (written by a primary whose clock was ahead, before
    a failover), w1 takes over, the head is rolled back to before (a failover to a
    replica that missed it), w2 takes over. Both get epoch + 1: w1's commit lands in
    w2's lease and w2's is refused."""
    import redis

    from livekit_resume.stores.redis import RedisStore
    from livekit_resume.stores.redis.keys import KeyNames

    ns = f"fence{os.getpid()}{id(redis_server) % 10_000}"
    store = RedisStore.from_url(str(redis_server.url), namespace=ns)
    client = redis.Redis.from_url(str(redis_server.url))
    head = KeyNames(ns).head(KEY)
    try:
        await store.acquire(KEY, "w0", ttl=30)
        ahead = (int(client.time()[0]) + 60) * 1_000_000
        client.hset(head, "epoch", ahead)
        before = client.dump(head)
        assert isinstance(before, bytes)
        w1 = await store.acquire(KEY, "w1", ttl=30, takeover=True)
        client.restore(head, 0, before, replace=True)
        w2 = await store.acquire(KEY, "w2", ttl=30, takeover=True)
        assert ahead < w1.epoch and ahead < w2.epoch
        assert w1.epoch != w2.epoch, f"w1 and w2 both hold epoch {w2.epoch}"
        with pytest.raises(LeaseLost):
            await store.commit(Commit(KEY, w1.epoch, 0, b"w1: zombie words", [], 0, whole=True))
        assert await store.commit(Commit(KEY, w2.epoch, 0, b"w2: the caller", [], 0, whole=True))
    finally:
        client.close()
        await store.aclose()
