"""Debounced background writer and lease keeper for one `ResumableSession`.

It never blocks the voice loop and never raises into it: event callbacks only mark
the session dirty; a task coalesces bursts and checkpoints. A failing store is retried
with backoff (the newest state is the live session itself, so every retry writes the
latest), logged and counted. A lost lease stops it for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Histogram

from ..errors import LeaseLost, StoreUnavailable, UnknownAgent
from ..stores.base import StoreClosed
from .lease import OutOfTime, bounded

__all__ = ["Autosave"]

log = logging.getLogger("livekit_resume")

# Prometheus metrics of the process, labelled by outcome; scraping them is optional.
# Counted by `ResumableSession` for every save, whoever asks for it.
CHECKPOINTS = Counter("livekit_resume_checkpoints", "Snapshots committed", ["reason"])
CHECKPOINT_FAILURES = Counter(
    "livekit_resume_checkpoint_failures", "Checkpoints that failed", ["error"]
)
CHECKPOINT_SECONDS = Histogram(
    "livekit_resume_checkpoint_seconds", "Time to capture and commit a snapshot"
)

# A final save (aclose) retries through a store blip for this long: well inside the ~10 s
# LiveKit leaves shutdown callbacks, long enough for a Redis failover to finish.
CLOSE_SAVE_BUDGET = 5.0
# After a failed lease renewal, the next try comes this many times sooner than the
# renewal interval (a third of the lease TTL).
RENEW_RETRY_SPLIT = 4
CLOSE_RETRY_FIRST = 0.1
# The lease's release after the final save gets what is left of the budget, and at least
# this: a save that used the whole budget leaves the release a chance. A store that does
# not answer by then leaves the lease to expire (logged and counted).
CLOSE_RELEASE_WAIT = 1.0
RENEWAL_FAILURES = Counter(
    "livekit_resume_lease_renewal_failures",
    "Lease renewals that failed (tried again sooner; the lease lapses after a TTL of them)",
)
FINAL_SAVE_FAILURES = Counter(
    "livekit_resume_final_save_failures", "Final saves on close that did not reach the store"
)

# First retry soon (a blip), then back off to this cap so a dead store is not hammered.
RETRY_FIRST = 0.2
RETRY_CAP = 10.0
# After a failed save, an event (a turn, a tool) brings the retry forward to this long
# after the failure (`Autosave._back_off`).
RETRY_NUDGED = 0.5


class Autosave:
    """Runs ``checkpoint(reason)`` after triggers, and ``renew()`` once ``renew_every``
    has passed since ``renewed_at()`` (the latest renewal, a renewing commit's included)."""

    def __init__(
        self,
        checkpoint: Callable[[str], Awaitable[int]],
        renew: Callable[[], Awaitable[None]],
        *,
        key: str,
        debounce: float,
        renew_every: float,
        renewed_at: Callable[[], float],
        on_lost: Callable[[LeaseLost], None] | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._on_lost = on_lost
        self._renew = renew
        self._key = key
        self._debounce = debounce
        self._renew_every = renew_every
        self._renewed_at = renewed_at
        self._dirty = asyncio.Event()
        # set by every trigger: a retry after a failed save waits for it or its delay
        self._news = asyncio.Event()
        self._reason = "turn"
        self._tasks: list[asyncio.Task[None]] = []
        self.failures = 0
        self.lost: LeaseLost | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(
                    self._save_loop(), name=f"livekit_resume.autosave[{self._key}]"
                ),
                asyncio.create_task(self._renew_loop(), name=f"livekit_resume.lease[{self._key}]"),
            ]

    def trigger(self, reason: str) -> None:
        """Ask for a checkpoint soon. Safe to call from any LiveKit event callback."""
        if self.lost is None and self._tasks:
            self._reason = reason if reason != "turn" or not self._dirty.is_set() else self._reason
            self.idle.clear()
            self._dirty.set()
            self._news.set()

    async def aclose(self) -> None:
        """Stop without a final save (the session takes that itself)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        try:
            # gather holds the loops' own CancelledError as results, while a cancellation
            # of the caller still propagates (suppressing CancelledError around an await
            # of each loop would eat it too, and Task.cancelling() is 3.11+)
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.idle.set()

    async def _save_loop(self) -> None:
        delay = RETRY_FIRST
        while not self._stopped():
            await self._dirty.wait()
            await asyncio.sleep(self._debounce)  # coalesce a burst of events into one write
            self._dirty.clear()
            reason = self._reason
            try:
                version = await self._checkpoint(reason)
            except LeaseLost as e:
                self.lose(e)
                return
            except UnknownAgent as e:
                # nothing to retry until the code registers the agent or hands off
                self.failures += 1
                log.error("autosave skipped: %s", e, extra={"key": self._key})
            except StoreClosed as e:
                self.failures += 1
                log.error(
                    "autosave of session %r stopped: %s", self._key, e, extra={"key": self._key}
                )
                return
            except Exception as e:
                if self._stopped():
                    return
                self.failures += 1
                log.warning(
                    "autosave of session %r failed (%s: %s); retrying in %.1fs",
                    self._key,
                    type(e).__name__,
                    e,
                    delay,
                    extra={"key": self._key},
                )
                self._dirty.set()
                await self._back_off(delay)
                delay = min(delay * 2, RETRY_CAP)
                continue
            else:
                log.debug("autosaved", extra={"key": self._key, "version": version})
            delay = RETRY_FIRST
            if not self._dirty.is_set():
                self.idle.set()

    async def _back_off(self, delay: float) -> None:
        """Wait ``delay`` after a failed save, or less once the conversation goes on: a
        store back after a long outage gets the turn the caller just took within
        RETRY_NUDGED, not up to RETRY_CAP later; a stream of events against a dead store
        gets a try per RETRY_NUDGED, not one per debounce window."""
        failed_at = time.monotonic()
        self._news.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._news.wait(), delay)
            due = min(failed_at + delay, failed_at + RETRY_NUDGED)
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def _renew_loop(self) -> None:
        # due an interval after the latest renewal, the acquisition included: not after
        # this start, which a slow restore (a large snapshot, a loaded loop) can put
        # late in the lease, past the point where it runs out unrenewed
        due = self._renewed_at() + self._renew_every
        while not self._stopped():
            await asyncio.sleep(due - time.monotonic())
            # A commit renews the lease too (Commit.lease_ttl): a session that committed
            # within the interval is renewed an interval after that commit, not now.
            due = self._renewed_at() + self._renew_every
            if due > time.monotonic():
                continue
            due = time.monotonic() + self._renew_every
            try:
                await self._renew()
            except LeaseLost as e:
                self.lose(e)
                return
            except StoreClosed:
                return  # the save loop says so, at the next turn
            except Exception as e:
                if self._stopped():
                    return
                # a missed renewal is not fatal, and is tried again a quarter interval
                # later: a whole interval later, the third try after two misses was due
                # as the lease ran out, and one a little slow came too late
                due = time.monotonic() + self._renew_every / RENEW_RETRY_SPLIT
                RENEWAL_FAILURES.inc()
                log.warning(
                    "lease renewal of session %r failed: %s", self._key, e, extra={"key": self._key}
                )

    def _stopped(self) -> bool:
        """Whether `aclose` stopped the loop that asks: its cancellation can come back as
        another error (a store call whose own timeout swallowed it, as `asyncio.wait_for`
        can on Python 3.10 and 3.11), and the loop, retrying, never ended; `aclose`
        waited for it for ever."""
        return asyncio.current_task() not in self._tasks

    def lose(self, e: LeaseLost) -> None:
        """Stop for good: the session was taken over (``lost``); tell ``on_lost`` once."""
        if self.lost is not None:
            return
        self.lost = e
        if not e.vanished:  # one that vanished twice was counted by the save that met it
            CHECKPOINT_FAILURES.labels(error="LeaseLost").inc()
        log.error("session %r: %s; autosave stopped", self._key, e, extra={"key": self._key})
        self._dirty.clear()
        self.idle.set()
        # the other loop stops too: nothing more may be written under this lease
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if self._on_lost is not None:
            self._on_lost(e)


def close_deadline() -> float:
    """When a close that starts now must have given up on its final save."""
    return time.monotonic() + CLOSE_SAVE_BUDGET


def release_wait(deadline: float) -> float:
    """How long the release of a closing session's lease may wait for the store: what
    is left until ``deadline``, and at least `CLOSE_RELEASE_WAIT`."""
    return max(deadline - time.monotonic(), CLOSE_RELEASE_WAIT)


async def final_save(
    checkpoint: Callable[[str], Awaitable[int]],
    key: str,
    version: Callable[[], int],
    *,
    deadline: float | None = None,
) -> bool:
    """The last checkpoint of a closing session: retried while the store cannot be
    reached, until ``deadline`` (`time.monotonic`; default `CLOSE_SAVE_BUDGET` seconds
    from now); then logged and counted, and the last stored version stands. The deadline
    bounds each attempt too: one attempt on a frozen store waits out every client
    timeout and retry (tens of seconds on Redis), and is cancelled when time is up (its
    commit is kept pending, sent again, same id, by a later save). Never raises: the
    session is going away either way. Whether it was saved."""
    if deadline is None:
        deadline = close_deadline()
    delay = CLOSE_RETRY_FIRST
    while True:
        try:
            await bounded(checkpoint("close"), deadline - time.monotonic())
            return True
        except LeaseLost:
            log.warning("session %r: final save refused, lease lost", key, extra={"key": key})
            return False
        except StoreClosed as e:
            error: Exception = e  # closed by the app (a shutdown callback first): no retry
        except OutOfTime:
            CHECKPOINT_FAILURES.labels(error="OutOfTime").inc()  # a save cut short
            error = StoreUnavailable(
                f"the store did not answer within the close budget ({CLOSE_SAVE_BUDGET:g} s)"
            )
        except (StoreUnavailable, OSError) as e:
            # OSError: a connection reset or timeout that a store let through unwrapped
            # is the same blip (its commit, if it landed, is sent again with its id)
            if time.monotonic() + delay < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            error = e
        except Exception as e:
            error = e
        FINAL_SAVE_FAILURES.inc()
        log.error(
            "session %r: final save failed: %s; version %d stands",
            key,
            error,
            version(),
            extra={"key": key, "version": version()},
        )
        return False
