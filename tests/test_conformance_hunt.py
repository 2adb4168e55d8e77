"""Hunt: does the store conformance kit catch broken stores?

Each variant below is `MemoryStore` with ONE realistic bug. The kit
(`livekit_resume.testing.conformance.StoreConformance`) is run against it exactly as a
third-party backend runs it: a generated test module subclassing `StoreConformance`,
run by pytest (pytest-asyncio in strict mode, no repo conftest) in a child process.

- `test_the_kit_passes_*`: controls; the kit must pass the real memory store and a
  memory store with correct events.
- `test_the_kit_reports_a_broken_store[...]`: FAILS when the kit passes a broken store
  (a store that loses or corrupts conversations gets the kit's blessing), or when the
  kit hangs on it (a kit test cancelled by the guard after HANG_AFTER s: no report).
- `test_the_probe_shows_the_bug[...]`: each variant that once slipped through comes with
  a probe (the check the kit lacked, since added to it), shown to pass on the real
  memory store and to fail on the variant: proof the variant really breaks the
  contract (these tests pass).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import livekit_resume.stores.memory as memory_module
from livekit_resume.errors import LeaseLost, SnapshotNotFound
from livekit_resume.stores.base import (
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    Record,
    Stored,
    validate_key,
    validate_lease_ttl,
    validate_owner,
    validate_page,
)
from livekit_resume.stores.log import DEFAULT_KEEP, lease_is_live
from livekit_resume.stores.memory import MemoryStore
from tests import child_env

KEY = "room-42"

# -- a memory store with events (the control for the event variants) -------------------


class _Subscription:
    """In-process fan-out: active from ``async with`` (or the first ``__anext__``)."""

    def __init__(self, store: EventMemoryStore, *, lazy: bool = False) -> None:
        self._store, self._lazy = store, lazy
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._active = False

    def _activate(self) -> None:
        if not self._active:
            self._store._queues.append(self._queue)
            self._active = True

    async def __aenter__(self) -> _Subscription:
        if not self._lazy:
            self._activate()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        self._activate()
        return await self._queue.get()

    async def aclose(self) -> None:
        if self._active:
            self._store._queues.remove(self._queue)
            self._active = False


class EventMemoryStore(MemoryStore):
    """`MemoryStore` + `EventPublisher` + `EventSource`: commits publish ``committed``,
    takeovers of a live lease ``taken_over`` (as the Redis store does, base.py's
    `EventSource`: "its own commits and takeovers, and what publish sends")."""

    lazy_subscriptions = False
    state_events = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._queues: list[asyncio.Queue[dict[str, Any]]] = []

    def _emit(self, message: dict[str, Any]) -> None:
        for queue in list(self._queues):
            queue.put_nowait(message)

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        validate_key(key)
        self._open()
        self._emit({"event": event, "key": key, **fields})

    def subscribe(self) -> _Subscription:
        return _Subscription(self, lazy=self.lazy_subscriptions)

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        s = self._get(key)
        held = s is not None and lease_is_live(s.lease_expires_at, self._clock())
        previous = s.owner if s is not None and held else None
        lease = await super().acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)
        if self.state_events and previous is not None and previous != owner:
            self._emit(
                {
                    "event": "taken_over",
                    "key": key,
                    "epoch": lease.epoch,
                    "owner": owner,
                    "previous": previous,
                }
            )
        return lease

    async def commit(self, commit: Commit) -> int:
        version = await super().commit(commit)
        if self.state_events:
            self._emit(
                {
                    "event": "committed",
                    "key": commit.key,
                    "version": version,
                    "epoch": commit.epoch,
                    "info": dict(commit.info),
                }
            )
        return version


# -- the broken stores: one bug each ---------------------------------------------------


def _session(store: MemoryStore, key: object) -> Any:
    return store._sessions.get(key) if isinstance(key, str) else None


class CommitIgnoresEpoch(MemoryStore):
    """commit checks the base version only: the epoch fence is gone."""

    async def commit(self, commit: Commit) -> int:
        s = _session(self, commit.key)
        if s is not None and commit.epoch:
            commit = dataclasses.replace(commit, epoch=s.epoch)
        return await super().commit(commit)


class CommitAcceptsOlderEpoch(MemoryStore):
    """commit refuses only an epoch newer than the store's (``<`` for ``!=``): a zombie
    of an older epoch writes."""

    async def commit(self, commit: Commit) -> int:
        s = _session(self, commit.key)
        if s is not None and 0 < commit.epoch < s.epoch:
            commit = dataclasses.replace(commit, epoch=s.epoch)
        return await super().commit(commit)


class RenewChecksOwnerOnly(MemoryStore):
    """renew compares the owner, not the epoch."""

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        s = _session(self, lease.key)
        if s is not None and s.owner == lease.owner:
            lease = dataclasses.replace(lease, epoch=s.epoch)
        return await super().renew(lease, ttl=ttl)


class ReleaseByAnyone(MemoryStore):
    """release frees the lease whoever asks."""

    async def release(self, lease: Lease) -> None:
        s = self._get(lease.key)
        if s is not None:
            s.owner, s.lease_expires_at = None, None


class ReleaseChecksOwnerOnly(MemoryStore):
    """release compares the owner, not the epoch: a stale lease of the same owner (an
    earlier acquisition by the same job) frees the lease it holds now."""

    async def release(self, lease: Lease) -> None:
        s = self._get(lease.key)
        if s is not None and s.owner == lease.owner:
            s.owner, s.lease_expires_at = None, None


class DeleteFenceChecksOwnerOnly(MemoryStore):
    """delete(lease=...) compares the owner, not the epoch."""

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        s = _session(self, key)
        if lease is not None and s is not None and lease.key == key and lease.owner == s.owner:
            lease = dataclasses.replace(lease, epoch=s.epoch)
        return await super().delete(key, lease=lease)


class KeepOneTooFew(MemoryStore):
    """retention off by one: keeps ``keep - 1`` versions."""

    def __init__(self, *, keep: int = DEFAULT_KEEP, **options: Any) -> None:
        super().__init__(keep=max(1, keep - 1), **options)


class TrimDropsTheNewest(MemoryStore):
    """retention trims from the wrong end once over ``keep``."""

    def __init__(self, *, keep: int = DEFAULT_KEEP, **options: Any) -> None:
        super().__init__(keep=10**9, **options)
        self._real_keep = keep

    async def commit(self, commit: Commit) -> int:
        version = await super().commit(commit)
        s = self._sessions[commit.key]
        del s.versions[self._real_keep :]
        return version


class LoadIsOneBehind(MemoryStore):
    """load of the latest answers the version before it (a lagging read)."""

    async def load(self, key: str, version: int | None = None) -> Stored:
        s = _session(self, key)
        if version is None and s is not None and len(s.versions) >= 2:
            return await super().load(key, s.versions[-2].version)
        return await super().load(key, version)


class DeleteLeavesVersionsLoadable(MemoryStore):
    """delete drops the session's listing and lease but load still reads its versions."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ghosts: dict[str, MemoryStore] = {}

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        s = _session(self, key)
        gone = await super().delete(key, lease=lease)
        if gone and s is not None:
            ghost = MemoryStore(keep=self._keep)
            ghost._sessions[key] = s
            self._ghosts[key] = ghost
        return gone

    async def load(self, key: str, version: int | None = None) -> Stored:
        try:
            return await super().load(key, version)
        except SnapshotNotFound:
            if key in self._ghosts:
                return await self._ghosts[key].load(key, version)
            raise


class DeleteLeavesTheLog(MemoryStore):
    """delete removes versions and lease but not the item log: a session created again
    under the key appends to the old log."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._orphans: dict[str, tuple[dict[int, list[Record]], int]] = {}

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        s = _session(self, key)
        gone = await super().delete(key, lease=lease)
        if gone and s is not None:
            self._orphans[key] = (s.logs, s.gen)
        return gone

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        lease = await super().acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)
        s = self._sessions[key]
        if key in self._orphans and not s.versions and not s.logs:
            s.logs, s.gen = self._orphans.pop(key)
        return lease


class DeleteWithoutTombstone(MemoryStore):
    """delete leaves no tombstone: the holder of a deleted session is told it vanished
    (and writes it back)."""

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        gone = await super().delete(key, lease=lease)
        self._tombstones.pop(key, None)
        return gone


class RefusedCommitLeaksRecords(MemoryStore):
    """a commit refused with LeaseLost has already appended its records to the log."""

    async def commit(self, commit: Commit) -> int:
        try:
            return await super().commit(commit)
        except LeaseLost:
            s = _session(self, commit.key)
            if s is not None:
                s.logs.setdefault(s.gen, []).extend(commit.records)
            raise


class InvalidCommitLeaksRecords(MemoryStore):
    """a commit refused with ValueError (a whole commit that writes before it clears, a
    bad lease_ttl) has already appended its records to the log: the next version reads
    them (a backend inserting record rows before it checks the rest, no rollback)."""

    async def commit(self, commit: Commit) -> int:
        try:
            return await super().commit(commit)
        except ValueError:
            s = _session(self, commit.key)
            if s is not None and all(isinstance(r, Record) for r in commit.records):
                s.logs.setdefault(s.gen, []).extend(commit.records)
            raise


class LeaseTtlCheckedAfterTheWrite(MemoryStore):
    """commit writes the version, then refuses its bad ``lease_ttl`` with ValueError:
    the caller is told it failed, and a version it never acknowledged stands."""

    async def commit(self, commit: Commit) -> int:
        if commit.lease_ttl is None:
            return await super().commit(commit)
        await super().commit(dataclasses.replace(commit, lease_ttl=None))
        validate_lease_ttl(commit.lease_ttl, self._ttl)
        s = self._sessions[commit.key]
        if s.owner is not None:
            s.lease_expires_at = self._clock() + commit.lease_ttl
        return s.versions[-1].version


class RenewTtlCheckedAfterTheWrite(MemoryStore):
    """renew extends the lease, then refuses a ttl longer than the session's."""

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        s = _session(self, lease.key)
        if s is not None and s.epoch == lease.epoch and s.owner == lease.owner:
            s.lease_expires_at = self._clock() + ttl
        return await super().renew(lease, ttl=ttl)


class TakeoverKeepsTheEpoch(MemoryStore):
    """a takeover of a live lease keeps the epoch: the old holder is not fenced."""

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        s = self._get(key)
        live_other = (
            s is not None
            and lease_is_live(s.lease_expires_at, self._clock())
            and s.owner not in (None, owner)
        )
        kept = s.epoch if s is not None else 0
        lease = await super().acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)
        if live_other:
            self._sessions[key].epoch = kept
            lease = dataclasses.replace(lease, epoch=kept)
        return lease


class SameOwnerKeepsTheEpochAfterExpiry(MemoryStore):
    """acquire keeps the epoch whenever the recorded owner asks again, live lease or
    not: the contract says only "owner renewing its own live lease" keeps it."""

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        validate_owner(owner)
        validate_lease_ttl(ttl, self._ttl)
        s = self._get(key)
        now = self._clock()
        if s is not None and s.owner == owner and not lease_is_live(s.lease_expires_at, now):
            s.lease_expires_at = now + ttl  # taken as its own live lease
        return await super().acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)


class RenewVersionIsZero(MemoryStore):
    """renew says version 0 whatever the session holds."""

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        return dataclasses.replace(await super().renew(lease, ttl=ttl), version=0)


class RenewVersionCountsRetained(MemoryStore):
    """renew's `Lease.version` is the number of retained versions (a COUNT(*) for a
    MAX(version)): right until ``keep`` is reached, then behind the head, and every
    holder takes it for a store that went back (lease.py: vanished, written whole)."""

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        renewed = await super().renew(lease, ttl=ttl)
        return dataclasses.replace(renewed, version=len(self._sessions[lease.key].versions))


class KeysSkipUnsavedSessions(MemoryStore):
    """keys lists only sessions with a version."""

    async def keys(self) -> list[str]:
        return [k for k in await super().keys() if self._sessions[k].versions]


class KeysStopAtOnePage(MemoryStore):
    """keys returns the first 1000 only (one ListObjects/Scan page, no continuation)."""

    async def keys(self) -> list[str]:
        return (await super().keys())[:1000]


class KeysPageTreatsThePrefixAsAPattern(MemoryStore):
    """keys_page matches the prefix with SQL LIKE unescaped: ``_`` and ``%`` are wildcards."""

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        validate_page(prefix, after, limit)
        pattern = re.compile(
            "".join("." if c == "_" else ".*" if c == "%" else re.escape(c) for c in prefix),
            re.S,
        )
        found = [k for k in await self.keys() if pattern.match(k) and (after is None or k > after)]
        if limit is None or len(found) <= limit:
            return found, None
        return found[:limit], found[limit - 1]


class LoadCacheSurvivesExpiry(MemoryStore):
    """load is served from a read cache that commit and delete invalidate, but a session
    expiring (its TTL) does not."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._cache: dict[str, Stored] = {}

    async def load(self, key: str, version: int | None = None) -> Stored:
        if version is None and key in self._cache:
            return self._cache[key]
        stored = await super().load(key, version)
        if version is None:
            self._cache[key] = stored
        return stored

    async def commit(self, commit: Commit) -> int:
        self._cache.pop(commit.key, None)
        return await super().commit(commit)

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        self._cache.pop(key, None)
        return await super().delete(key, lease=lease)


class AcquireRevivesAnExpiredSession(MemoryStore):
    """acquire does not apply the session TTL (reads do): acquiring an expired session
    brings its versions back (a SQL backend's INSERT .. ON CONFLICT on the lease row,
    the version rows filtered by age only in SELECTs)."""

    _raw = False

    def _get(self, key: str) -> Any:
        if self._raw:
            validate_key(key)
            return self._open().get(key)
        return super()._get(key)

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        self._raw = True
        try:
            return await super().acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)
        finally:
            self._raw = False


def _whole_rule_only(commit: Commit) -> Commit:
    """A backend's own check of a commit: the whole rule only, no field types."""
    if commit.whole:
        cleared: set[str] = set()
        for r in commit.records:
            if not r.id and r.data is None:
                cleared.add(r.stream)
            elif r.stream not in cleared:
                raise ValueError("a whole commit must clear each stream before it writes")
    validate_key(commit.key)
    return commit


class CommitSkipsTypeChecks(MemoryStore):
    """commit checks the whole rule but not the field types (`validate_commit`): it keeps
    a str head, a str item, an unsigned nested info, and gives them back as such."""

    async def commit(self, commit: Commit) -> int:
        saved = vars(memory_module)["validate_commit"]
        setattr(memory_module, "validate_commit", _whole_rule_only)  # noqa: B010
        try:
            return await super().commit(commit)  # no await point inside: patched briefly
        finally:
            setattr(memory_module, "validate_commit", saved)  # noqa: B010


class EmptyCommitIdsMatch(MemoryStore):
    """the idempotency check forgets that an empty commit_id names nothing: two commits
    without an id on one base are taken for a retry."""

    async def commit(self, commit: Commit) -> int:
        s = _session(self, commit.key)
        if (
            s is not None
            and not commit.commit_id
            and s.versions
            and s.epoch == commit.epoch
            and s.versions[-1].version == commit.base_version + 1
            and not s.versions[-1].commit_id
        ):
            top: int = s.versions[-1].version
            return top
        return await super().commit(commit)


class EventsWithoutStateEvents(EventMemoryStore):
    """publish/subscribe work, but commits and takeovers announce nothing."""

    state_events = False


class EventsSubscribeLazily(EventMemoryStore):
    """a subscription starts listening at its first ``__anext__``, not at ``async with``."""

    lazy_subscriptions = True


# -- probes: the checks the kit lacked (each passes on MemoryStore) --------------------


async def _probe_same_owner_after_expiry(make: Callable[..., Any]) -> None:
    store = make()
    a = await store.acquire(KEY, "job-1", ttl=0.05)
    await asyncio.sleep(0.1)
    again = await store.acquire(KEY, "job-1", ttl=5)
    assert again.epoch > a.epoch, "an acquisition after the lease expired kept its epoch"


async def _probe_renew_version_past_keep(make: Callable[..., Any]) -> None:
    store = make(keep=3)
    lease = await store.acquire(KEY, "w")
    for v in range(5):
        await store.commit(Commit(KEY, lease.epoch, v, b"h", [], 0))
    renewed = await store.renew(lease)
    assert renewed.version in (None, 5), f"renew says version {renewed.version}, head is 5"


async def _probe_stale_release_of_same_owner(make: Callable[..., Any]) -> None:
    store = make()
    old = await store.acquire(KEY, "job-1", ttl=5)
    await store.release(old)
    new = await store.acquire(KEY, "job-1", ttl=60)
    assert new.epoch > old.epoch
    await store.release(old)  # the stale one: must be ignored
    info = await store.info(KEY)
    assert info is not None and info.owner == "job-1", "a stale release freed the new lease"


async def _probe_stale_delete_of_same_owner(make: Callable[..., Any]) -> None:
    store = make()
    old = await store.acquire(KEY, "job-1", ttl=5)
    await store.commit(Commit(KEY, old.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
    await store.release(old)
    new = await store.acquire(KEY, "job-1", ttl=60)
    with pytest.raises(LeaseLost):
        await store.delete(KEY, lease=old)
    assert (await store.load(KEY)).version == 1 and new.epoch > old.epoch


async def _probe_bad_lease_ttl_writes_nothing(make: Callable[..., Any]) -> None:
    store = make()
    lease = await store.acquire(KEY, "w")
    await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "x", b"x")], 1))
    with pytest.raises(ValueError):
        await store.commit(
            Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "y", b"y", "x")], 2, lease_ttl=0)
        )
    assert [v.version for v in await store.versions(KEY)] == [1], "a refused commit landed"
    assert (await store.load(KEY)).head == b"h1"


async def _probe_refused_renew_changes_nothing(make: Callable[..., Any]) -> None:
    store = make(ttl=60)
    lease = await store.acquire(KEY, "w", ttl=10)
    with pytest.raises(ValueError):
        await store.renew(lease, ttl=61)
    info = await store.info(KEY)
    assert info is not None and info.lease_expires_at is not None
    assert info.lease_expires_at == pytest.approx(lease.expires_at, abs=0.5), (
        "a refused renewal extended the lease past the session's ttl"
    )


async def _probe_invalid_commit_leaves_no_records(make: Callable[..., Any]) -> None:
    store = make()
    lease = await store.acquire(KEY, "w")
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "m0", b"x")], 1))
    bad = [Record("h", "ghost", b"GHOST", "m0")]
    with pytest.raises(ValueError):
        await store.commit(Commit(KEY, lease.epoch, 1, b"h", bad, 2, whole=True))
    await store.commit(Commit(KEY, lease.epoch, 1, b"h", [Record("h", "m1", b"y", "m0")], 2))
    assert (await store.load(KEY)).streams == {"h": [("m0", b"x"), ("m1", b"y")]}


async def _probe_keys_past_one_page(make: Callable[..., Any]) -> None:
    store = make()
    names = [f"k{i:05d}" for i in range(1100)]
    for name in names:
        await store.acquire(name, "w")
    assert await store.keys() == names, "keys() lost sessions past the first 1000"


async def _probe_prefix_is_literal(make: Callable[..., Any]) -> None:
    store = make()
    for name in ("a_1", "ab1", "a%z", "abz"):
        await store.acquire(name, "w")
    assert await store.keys_page("a_", None, None) == (["a_1"], None)
    assert await store.keys_page("a%", None, None) == (["a%z"], None)


async def _probe_expired_session_stays_gone_after_a_load(make: Callable[..., Any]) -> None:
    store = make(ttl=0.2)
    lease = await store.acquire(KEY, "w", ttl=0.1)
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
    assert (await store.load(KEY)).version == 1
    await asyncio.sleep(0.4)
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY)


async def _probe_acquire_does_not_revive(make: Callable[..., Any]) -> None:
    store = make(ttl=0.2)
    lease = await store.acquire(KEY, "w", ttl=0.1)
    await store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1))
    await asyncio.sleep(0.4)
    await store.acquire(KEY, "w2", ttl=0.2)  # the first call after expiry
    assert await store.versions(KEY) == [], "an expired session came back on acquire"
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY)


async def _probe_commit_types_are_checked(make: Callable[..., Any]) -> None:
    store = make()
    lease = await store.acquire(KEY, "w")
    bad: list[Commit] = [
        Commit(KEY, lease.epoch, 0, "text head", []),  # type: ignore[arg-type]
        Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", "text item")], 1),  # type: ignore[arg-type]
        Commit(KEY, lease.epoch, 0, b"h", [], 0, {"nested": {"a": 1}}),  # type: ignore[dict-item]
    ]
    for commit in bad:
        with pytest.raises(ValueError):
            await store.commit(commit)
    assert await store.versions(KEY) == []


async def _probe_state_events(make: Callable[..., Any]) -> None:
    store = make()
    async with store.subscribe() as events:
        a = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, a.epoch, 0, b"h", [], 0))
        await store.acquire(KEY, "worker-b", takeover=True)
        got: list[str] = []
        try:
            for _ in range(2):
                got.append((await asyncio.wait_for(events.__anext__(), 1))["event"])
        except TimeoutError:
            pass
    assert got == ["committed", "taken_over"], f"the events announced: {got}"


# -- the variants ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    store: type[MemoryStore]
    # the check the kit lacked, for the variants that slipped through it (None: the kit
    # caught it from the start)
    probe: Callable[[Callable[..., Any]], Awaitable[None]] | None = None
    reference: type[MemoryStore] = MemoryStore


VARIANTS: dict[str, Variant] = {
    # expected to be caught by the kit as it stands
    "commit_ignores_epoch": Variant(CommitIgnoresEpoch),
    "commit_accepts_older_epoch": Variant(CommitAcceptsOlderEpoch),
    "renew_checks_owner_only": Variant(RenewChecksOwnerOnly),
    "release_by_anyone": Variant(ReleaseByAnyone),
    "keep_one_too_few": Variant(KeepOneTooFew),
    "trim_drops_the_newest": Variant(TrimDropsTheNewest),
    "load_is_one_behind": Variant(LoadIsOneBehind),
    "delete_leaves_versions_loadable": Variant(DeleteLeavesVersionsLoadable),
    "delete_leaves_the_log": Variant(DeleteLeavesTheLog),
    "delete_without_tombstone": Variant(DeleteWithoutTombstone),
    "refused_commit_leaks_records": Variant(RefusedCommitLeaksRecords),
    "takeover_keeps_the_epoch": Variant(TakeoverKeepsTheEpoch),
    "renew_version_is_zero": Variant(RenewVersionIsZero),
    "keys_skip_unsaved_sessions": Variant(KeysSkipUnsavedSessions),
    "empty_commit_ids_match": Variant(EmptyCommitIdsMatch),
    "events_subscribe_lazily": Variant(EventsSubscribeLazily, reference=EventMemoryStore),
    # slipped through until the kit gained the check its probe shows
    "same_owner_keeps_the_epoch_after_expiry": Variant(
        SameOwnerKeepsTheEpochAfterExpiry, _probe_same_owner_after_expiry
    ),
    "renew_version_counts_retained": Variant(
        RenewVersionCountsRetained, _probe_renew_version_past_keep
    ),
    "release_checks_owner_only": Variant(
        ReleaseChecksOwnerOnly, _probe_stale_release_of_same_owner
    ),
    "delete_fence_checks_owner_only": Variant(
        DeleteFenceChecksOwnerOnly, _probe_stale_delete_of_same_owner
    ),
    "lease_ttl_checked_after_the_write": Variant(
        LeaseTtlCheckedAfterTheWrite, _probe_bad_lease_ttl_writes_nothing
    ),
    "renew_ttl_checked_after_the_write": Variant(
        RenewTtlCheckedAfterTheWrite, _probe_refused_renew_changes_nothing
    ),
    "invalid_commit_leaks_records": Variant(
        InvalidCommitLeaksRecords, _probe_invalid_commit_leaves_no_records
    ),
    "keys_stop_at_one_page": Variant(KeysStopAtOnePage, _probe_keys_past_one_page),
    "keys_page_treats_the_prefix_as_a_pattern": Variant(
        KeysPageTreatsThePrefixAsAPattern, _probe_prefix_is_literal
    ),
    "load_cache_survives_expiry": Variant(
        LoadCacheSurvivesExpiry, _probe_expired_session_stays_gone_after_a_load
    ),
    "acquire_revives_an_expired_session": Variant(
        AcquireRevivesAnExpiredSession, _probe_acquire_does_not_revive
    ),
    "commit_skips_type_checks": Variant(CommitSkipsTypeChecks, _probe_commit_types_are_checked),
    "events_without_state_events": Variant(
        EventsWithoutStateEvents, _probe_state_events, reference=EventMemoryStore
    ),
}

CONTROLS: dict[str, type[MemoryStore]] = {
    "memory": MemoryStore,
    "memory_with_events": EventMemoryStore,
}


def store_class(name: str) -> type[MemoryStore]:
    """What the generated kit module imports (in the child process)."""
    return CONTROLS[name] if name in CONTROLS else VARIANTS[name].store


# -- running the kit in a child process ------------------------------------------------

# A kit test still running after this long is taken for a hang: the guard cancels it
# (the kit has no timeout of its own, and neither has a third party's CI, usually).
HANG_AFTER = 15.0

_KIT_MODULE = """\
import asyncio
import contextlib
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livekit_resume.testing.conformance import StoreConformance
from tests.test_conformance_hunt import store_class


@pytest.fixture(autouse=True)
def _hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    def fire() -> None:
        with Path(__file__).with_name("hung.txt").open("a") as f:
            f.write(request.node.name + "\\n")
        loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
        for loop in loops:
            if not loop.is_closed():
                for task in list(asyncio.all_tasks(loop)):
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(task.cancel)

    timer = threading.Timer({hang!r}, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


class TestKit(StoreConformance):
    async def make_store(self, **options: Any) -> Any:
        return store_class({name!r})(**options)
"""


@dataclasses.dataclass(frozen=True)
class KitRun:
    passed: list[str]
    failed: dict[str, str]
    skipped: list[str]
    hung: list[str]  # kit tests cancelled by the guard after HANG_AFTER seconds
    output: str
    seconds: float


def _run_kit(name: str, where: Path) -> KitRun:
    where.mkdir(parents=True, exist_ok=True)
    # a third party's setup: its own rootdir, pytest-asyncio in strict mode, no conftest
    (where / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    module = where / f"test_kit_{name}.py"
    module.write_text(_KIT_MODULE.format(name=name, hang=HANG_AFTER))
    report = where / "report.xml"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-p",
            "no:randomly",
            f"--rootdir={where}",
            f"--junitxml={report}",
            # a broken store needs one failure to be reported: the rest of the kit is
            # not run (a control runs it whole)
            *(["-x"] if name in VARIANTS else []),
            str(module),
        ],
        cwd=where,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - started
    output = done.stdout[-6000:] + done.stderr[-3000:]
    assert report.exists(), f"the kit did not run for {name}:\n{output}"
    passed: list[str] = []
    failed: dict[str, str] = {}
    skipped: list[str] = []
    for case in ET.parse(report).getroot().iter("testcase"):
        test = case.get("name", "?")
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed[test] = (bad.get("message") or "")[:300]
        elif case.find("skipped") is not None:
            skipped.append(test)
        else:
            passed.append(test)
    assert passed or failed, f"the kit collected nothing for {name}:\n{output}"
    hung_file = where / "hung.txt"
    hung = hung_file.read_text().split() if hung_file.exists() else []
    for test in hung:
        failed.pop(test, None)  # failed by the guard, not by the kit
    return KitRun(passed, failed, skipped, hung, output, seconds)


def _selected_names(session: pytest.Session) -> list[str]:
    names: list[str] = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and callspec:
            name = callspec.params.get("kit_name")
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


@pytest.fixture(scope="module")
def kit_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], KitRun]]:
    """Kit runs of every selected store, four child processes at a time, started at
    once so that the module takes a minute or two rather than 30 runs in a row."""
    root = tmp_path_factory.mktemp("kit")
    pool = ThreadPoolExecutor(max_workers=4)
    futures: dict[str, Future[KitRun]] = {}

    def get(name: str) -> KitRun:
        if name not in futures:
            futures[name] = pool.submit(_run_kit, name, root / name)
        return futures[name].result()

    for name in _selected_names(request.session):
        futures[name] = pool.submit(_run_kit, name, root / name)
    yield get
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def kit_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("kit_name", list(CONTROLS), indirect=True)
def test_the_kit_passes_a_correct_store(kit_name: str, kit_runs: Callable[[str], KitRun]) -> None:
    """Control: a correct store passes the whole kit (events skip on plain memory)."""
    run = kit_runs(kit_name)
    assert not run.hung, f"the kit hangs on a correct store in {run.hung}"
    assert not run.failed, f"the kit fails a correct store: {run.failed}\n{run.output}"
    assert len(run.passed) >= 40
    if kit_name == "memory_with_events":
        assert "test_published_events_reach_subscribers" in run.passed


@pytest.mark.parametrize("kit_name", list(VARIANTS), indirect=True)
def test_the_kit_reports_a_broken_store(kit_name: str, kit_runs: Callable[[str], KitRun]) -> None:
    """FAILS when the kit passes a store with the variant's bug."""
    run = kit_runs(kit_name)
    bug = (VARIANTS[kit_name].store.__doc__ or "").strip().replace("\n    ", " ")
    print(f"{kit_name}: kit failed {sorted(run.failed)}, hung in {run.hung}, {run.seconds:.1f} s")
    assert not run.hung, (
        f"the kit hangs (no end, no report: a CI job held to its deadline) in {run.hung} on "
        f"a store whose {bug!r}; it failed {sorted(run.failed)} before that"
    )
    assert run.failed, (
        f"the conformance kit passes a store whose {bug!r} "
        f"({len(run.passed)} passed, {len(run.skipped)} skipped)"
    )


_PROBED = [name for name, v in VARIANTS.items() if v.probe is not None]


@pytest.mark.parametrize("name", _PROBED)
async def test_the_probe_shows_the_bug(name: str) -> None:
    """Passes: the probe (the check the kit lacked) holds on the reference store and
    catches the variant, so the variant really breaks the contract."""
    variant = VARIANTS[name]
    assert variant.probe is not None
    made: list[MemoryStore] = []

    def maker(cls: type[MemoryStore]) -> Callable[..., MemoryStore]:
        def make(**options: Any) -> MemoryStore:
            store = cls(**options)
            made.append(store)
            return store

        return make

    try:
        await variant.probe(maker(variant.reference))
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            await variant.probe(maker(variant.store))
    finally:
        for store in made:
            await store.aclose()
