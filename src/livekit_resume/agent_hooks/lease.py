"""`LeaseHolder`: one worker's hold on a session key, kept, renewed and given up.

The holder tells a lease *taken* by another worker (`LeaseLost`: stop writing) from a
session that *vanished* from the store under it (restarted without its data, deleted,
expired, or rolled back to an older version by a failover): nobody else holds that one,
so it is acquired again and the session is written whole (`reacquire`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, runtime_checkable

from prometheus_client import Counter

from ..errors import LeaseLost, SessionBusy, SnapshotNotFound, StoreUnavailable
from ..stores.base import Commit, Lease, Store, Stored

__all__ = ["LeaseHolder"]

_T = TypeVar("_T")

log = logging.getLogger("livekit_resume")

REACQUIRED = Counter(
    "livekit_resume_sessions_reacquired",
    "Sessions that vanished from the store under their holder and were written anew",
)
# How long a failed acquisition waits for the store to say whether it landed (one `info`,
# then a `release`): a store down fails the restore that much later at most.
GIVE_BACK_WAIT = 1.0

RELEASE_FAILURES = Counter(
    "livekit_resume_lease_release_failures", "Lease releases that failed (the lease expires)"
)


@runtime_checkable
class _AcquireLoad(Protocol):
    """A store that takes a lease and reads the latest version under it in one go
    (`RedisStore`: one round trip instead of three)."""

    async def _acquire_load(
        self, key: str, owner: str, *, ttl: float, takeover: bool
    ) -> tuple[Lease, Stored | None]: ...


class LeaseHolder:
    """Holds the lease of ``key`` for ``owner``, ``ttl`` seconds at a time."""

    def __init__(self, store: Store, key: str, owner: str, ttl: float) -> None:
        self._store = store
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.lease: Lease | None = None
        self.vanished = False  # the session is gone from the store: acquire it again
        self.released_epoch: int | None = None  # the epoch of the lease `release` gave up
        # time.monotonic() when the latest acquire, renew or renewing commit was sent: the
        # lease runs at least `ttl` from then
        self.renewed_at = -math.inf

    @property
    def epoch(self) -> int:
        return self.lease.epoch if self.lease is not None else 0

    async def acquire(self, *, takeover: bool) -> Lease:
        sent = time.monotonic()
        self.lease = await self._granted(
            self._store.acquire(self.key, self.owner, ttl=self.ttl, takeover=takeover),
            lambda lease: lease,
        )
        self.vanished = False
        self.renewed_at = sent
        return self.lease

    async def acquire_and_load(self, *, takeover: bool) -> Stored | None:
        """`acquire`, then the latest version read under the lease (None: there is
        none). A failed read releases the lease."""
        if not isinstance(self._store, _AcquireLoad):
            await self.acquire(takeover=takeover)
            try:
                return await self._store.load(self.key)
            except SnapshotNotFound:
                return None
            except BaseException:
                await self.release()
                raise
        sent = time.monotonic()
        lease, stored = await self._granted(
            self._store._acquire_load(self.key, self.owner, ttl=self.ttl, takeover=takeover),
            lambda got: got[0],
        )
        self.lease = lease
        self.vanished = False
        self.renewed_at = sent
        return stored

    async def _granted(self, call: Awaitable[_T], lease_of: Callable[[_T], Lease]) -> _T:
        held = self.lease is not None
        try:
            return await granted(self._store, call, lease_of)
        except StoreUnavailable:
            # The acquisition may have landed all the same: its reply lost with a
            # connection the server closed (a reply over its output buffer limit), or
            # run by a server that woke up after the client gave up. Left, that lease
            # names this owner the holder of a session nobody holds, and every other
            # worker's restore is refused until it expires.
            if not held:
                await to_its_end(self._give_back_unknown())
            raise

    async def _give_back_unknown(self) -> None:
        """Release the lease the store names this owner the holder of, if it answers
        within `GIVE_BACK_WAIT` (a server still frozen keeps it until it expires)."""
        try:
            info = await bounded(self._store.info(self.key), GIVE_BACK_WAIT)
        except Exception:
            return
        if info is not None and info.owner == self.owner:
            expires = info.lease_expires_at if info.lease_expires_at is not None else 0.0
            lease = Lease(self.key, self.owner, info.epoch, expires)
            await release_lease(self._store, lease, within=GIVE_BACK_WAIT)
            log.warning(
                "session %r: an acquisition that failed (the store's answer was lost) had "
                "landed: its lease is given back",
                self.key,
                extra={"key": self.key},
            )

    async def renew(self, version: int | None = None) -> bool:
        """Extend the lease. Returns False when the session vanished (nobody took it:
        the next checkpoint acquires it again), or is behind ``version``, the latest this
        holder committed (the store went back: a failover, a backup restored); raises
        `LeaseLost` when it was taken."""
        lease = self.lease
        if lease is None or self.vanished:
            return not self.vanished
        sent = time.monotonic()
        try:
            renewed = await self._store.renew(lease, ttl=self.ttl)
        except LeaseLost as e:
            if not e.vanished:
                raise
            if self.lease is lease:
                self.vanished = True
            return False
        # Released or acquired anew while the renewal was on its way (a remote command's
        # lease check racing a suspend): its answer must not bring the old lease back.
        if self.lease is lease:
            self.lease = renewed
            self.renewed_at = sent
            if version is not None and renewed.version is not None and renewed.version < version:
                # the lease survived, the versions did not: written whole again, as when
                # a commit finds the head behind (`head_moved_error`)
                self.vanished = True
                return False
        return True

    async def commit(self, commit: Commit) -> int:
        """`Store.commit`, renewing the lease in the same step when ``commit`` is written
        under it (`Commit.lease_ttl`): the renewal loop then skips a renewal."""
        lease = self.lease
        if lease is None or commit.epoch != lease.epoch:
            return await self._store.commit(commit)
        sent = time.monotonic()
        version = await self._store.commit(dataclasses.replace(commit, lease_ttl=self.ttl))
        self.renewed_at = sent
        return version

    async def reacquire(self, version: int) -> int:
        """The store lost the session, or versions of it, while held (last committed as
        ``version``): take it again, reclaiming this holder's epoch (`Store.acquire`).
        A holder the store forgot this one took the session from is fenced; a newer one
        keeps it, and this holder is fenced. Returns the version the store holds now, for
        the whole conversation to be written on top of."""
        # Vanished until both round trips are done: either may fail (a store flapping
        # as it comes back), the acquisition landing all the same. The next checkpoint
        # then acquires again (the same epoch, the lease being live and ours) and asks
        # again before it writes. Left not vanished, it would send a commit drafted
        # under the old epoch, which the store refuses with the newer one: a takeover,
        # read as this holder fenced by its own acquisition.
        self.vanished = True
        try:
            await self._acquire_kept()
            info = await self._store.info(self.key)
            self.vanished = False
        except SessionBusy as e:
            raise LeaseLost(
                f"session {self.key!r} vanished from the store and {e.holder!r} acquired it "
                "before this worker could: this one must stop writing"
            ) from e
        except BaseException:
            self.vanished = True
            raise
        REACQUIRED.inc()
        held = info.version if info is not None else 0
        log.warning(
            "session %r: the store lost it, or versions of it, while held (this writer was "
            "at version %d, the store is at %d); acquired again to write the whole "
            "conversation anew",
            self.key,
            version,
            held,
            extra={"key": self.key, "version": version},
        )
        return held

    async def _acquire_kept(self) -> None:
        """`acquire` (no takeover) for the live session itself: a grant that lands as its
        caller is cancelled is kept, not given back as a restore's is (`granted`). The
        session runs on and releases it when it closes; given back, another worker could
        restore the key under it, and this one would be fenced with its turns unsaved."""
        sent = time.monotonic()
        # this holder's epoch: a store that forgot a takeover by this holder (rolled back
        # to before it, or emptied) gives it back, fencing the holder it was taken from
        reclaim = self.lease.epoch if self.lease is not None else None
        acquire = self._store.acquire
        if reclaim is not None and _takes_reclaim(acquire):
            acquire = functools.partial(acquire, reclaim=reclaim)

        async def take() -> None:
            self.lease = await acquire(self.key, self.owner, ttl=self.ttl)
            self.renewed_at = sent

        await to_its_end(take())

    async def release(self, *, within: float | None = None) -> None:
        """Give the lease up; a failure is logged and counted (the lease then expires).
        ``within``: seconds after which a store that has not answered is given up on
        (a close bounded by `CLOSE_SAVE_BUDGET`), counted as a failure."""
        lease, self.lease = self.lease, None
        if lease is not None:
            self.released_epoch = lease.epoch
            # often called as a cancellation unwinds (a failed or cancelled restore): a
            # second one must not stop the release before it reaches the store
            await to_its_end(release_lease(self._store, lease, within=within))

    def drop(self) -> None:
        """Forget the lease without releasing it: it was lost to another worker."""
        self.lease = None


def _takes_reclaim(acquire: Callable[..., object]) -> bool:
    """Whether a store's ``acquire`` takes ``reclaim`` (added to `Store.acquire` in
    0.1): a store written before it is asked without, as then, rather than failing
    every acquisition of a vanished session with a TypeError."""
    try:
        params = inspect.signature(acquire).parameters.values()
    except (TypeError, ValueError):
        return True  # no signature to read: asked with it, as the protocol says
    return any(p.name == "reclaim" or p.kind is p.VAR_KEYWORD for p in params)


async def granted(store: Store, call: Awaitable[_T], lease_of: Callable[[_T], Lease]) -> _T:
    """Await an acquisition ``call`` on ``store``. A caller cancelled meanwhile (a job shut
    down) may be granted the lease all the same: the acquisition is awaited to its end
    and a lease it granted (``lease_of`` its answer) is released before the cancellation
    goes on, so that nobody is left named the holder of a session nobody holds."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # awaited here directly, a second cancellation would cancel the acquisition
        # (losing its grant) or the release
        await to_its_end(_give_back(store, task, lease_of))
        raise


async def _give_back(
    store: Store, call: asyncio.Future[_T], lease_of: Callable[[_T], Lease]
) -> None:
    """Release the lease ``call`` grants, if it grants one."""
    try:
        lease = lease_of(await call)
    except Exception:
        return  # refused or failed: nothing to give up
    await release_lease(store, lease)


async def release_lease(store: Store, lease: Lease, *, within: float | None = None) -> None:
    """Give ``lease`` up; a failure is logged and counted (the lease then expires).
    ``within``: how long a store that does not answer is waited for (None: its own
    timeouts and retries, which on a frozen Redis add up to tens of seconds)."""
    try:
        if within is None:
            await store.release(lease)
        else:
            await bounded(store.release(lease), within)
    except Exception as e:
        RELEASE_FAILURES.inc()
        log.warning(
            "session %r: lease release failed (%s); it will expire",
            lease.key,
            e,
            extra={"key": lease.key},
        )


class OutOfTime(Exception):
    """`bounded` work that had not finished in its time (cancelled, and unwound)."""


async def bounded(work: Awaitable[_T], seconds: float) -> _T:
    """``work``'s result, or `OutOfTime` once ``seconds`` have passed: the work is then
    cancelled and awaited until it has unwound (a commit cancelled mid-flight is kept
    pending by its caller). Not `asyncio.wait_for`, which on Python 3.10 and 3.11 can
    swallow a cancellation of the caller that arrives as the work ends."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(seconds, 0.0))
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():  # it ended as it was being cancelled: that stands
            return task.result()
        raise OutOfTime(f"no answer within {seconds:.1f}s")
    return task.result()


async def to_its_end(work: Awaitable[None]) -> None:
    """Run ``work`` to its end in a task of its own, however many cancellations arrive
    meanwhile; once it is done, a cancellation that arrived goes on, else what ``work``
    raised does."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()
