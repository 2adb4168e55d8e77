"""`resumable_job`: a resumable LiveKit job in one call.

What the README's entrypoint does by hand (restore, start, save on shutdown), plus the
moments a conversation is lost in production:

- **crash and re-dispatch, or a caller back in another room**: the lease names worker
  and job; a new job for a key another job holds takes it over at once (the newest job
  wins, with fencing), instead of waiting out the lease. The fenced job, if it is still
  alive, stops speaking and ends its session (`on_lost`). The same job restoring a key
  twice is refused (`SessionBusy`).
- **signals**: a job process ignores SIGTERM, as LiveKit intends (its ``forkserver``
  start method forgets to); the worker ends jobs through its own channel;
- **reconnect tokens** (`issue_token`): a client presenting one in a new room resumes
  that conversation and nothing else;
- **ended conversations** (`ResumableSession.end`) are never resumed: kept aside under
  ``<key>~v<version>``, and the call starts afresh;
- **the key** is the dispatched room's name, or a function of the job (dispatch metadata, a
  participant's identity, a SIP caller's number), so a caller who comes back in a new
  room finds their conversation;
- **shutdown and drain**: LiveKit closes the session, then runs shutdown callbacks; the
  session's close saves the final snapshot and releases the lease, well inside the
  ~10 s LiveKit allows;
- **the caller leaves**: with ``leave_grace`` the session pauses when the last remote
  participant leaves (LiveKit's ``close_on_disconnect`` is turned off) and suspends when
  the grace runs out; a participant back within the grace finds it resumed in place;
- **stale conversations**: with ``resume_within`` a conversation last saved longer ago
  is not resumed: it is kept, whole, under ``<key>~v<version>`` for inspection (logged),
  and the call starts afresh under the key (``rs.resumed`` is False);
- **long pauses**: a pause longer than ``suspend_after`` suspends the session (its
  audio pipeline, tasks and stream connections are closed, the lease released; the
  models' pooled connections are LiveKit's to keep, see docs/lifecycle.md); a
  participant joining the room then restores it in this job, into the same
  `AgentSession` (LiveKit restarts a closed session), and a later job for the key, or
  this one with a new `AgentSession` and another `resumable_job` call, restores it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

from livekit import rtc
from livekit.agents import Agent, AgentSession, JobContext
from livekit.agents.voice import room_io

from ..bridge import from_stored, session_codec
from ..errors import LeaseLost, SessionBusy, TokenRefused, UnsavableValue
from ..snapshot.codec import Codec
from ..snapshot.values import dump_userdata
from ..stores.base import SessionInfo, Store
from ..stores.url import open_store
from ..tokens import verify_token
from .archive import ARCHIVE_LEASE_TTL, acquire_for, kept_aside
from .lease import release_lease, to_its_end
from .registry import AgentRegistry
from .room import callers
from .session import LONG_PAUSE_RETRY, LONG_PAUSE_RETRY_CAP, ResumableSession

__all__ = ["DEFAULT_LEAVE_GRACE", "JobPolicy", "archive_stale", "resumable_job"]

log = logging.getLogger("livekit_resume")

# Long enough for a phone to switch networks and rejoin, short enough that an abandoned
# call frees its STT/TTS/LLM connections soon.
DEFAULT_LEAVE_GRACE = 30.0

KeySpec = str | Callable[[JobContext], "str | Awaitable[str]"] | None


def _ignore_sigterm() -> None:
    """Keep a job process alive through a SIGTERM sent to the whole process group.

    LiveKit means job processes to ignore SIGTERM (the worker shuts them down through its
    own channel, with shutdown callbacks), but under the ``forkserver`` start method it
    uses on Linux the ignore is never installed: a ``kill`` of the process group (a
    container's init forwarding the signal) would end every call mid-sentence with no
    final save (tests/test_job_facts.py)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def job_owner(ctx: JobContext) -> str:
    """The lease owner of a job: worker, job and process, so that listings name them."""
    return f"{ctx.worker_id}:{ctx.job.id}:{os.getpid()}"


async def _resolve_key(ctx: JobContext, key: KeySpec) -> str:
    if key is None:
        return ctx.job.room.name  # the dispatched room; ctx.room names it only once connected
    if isinstance(key, str):
        return key
    value = key(ctx)
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str) or not value:
        raise ValueError(f"the key function returned {value!r}, not a non-empty string")
    return value


class JobPolicy:
    """What a job does with its session when participants come and go.

    With ``leave_grace``: pauses the session when the last remote participant leaves,
    resumes it when one comes back within the grace, and suspends it when nobody does.
    With ``rejoin`` (an async callable): a participant joining while the session is
    suspended in this job (the grace ran out, a pause outlasted ``suspend_after``, the app
    suspended it) restores it in place.
    """

    def __init__(
        self,
        rs: ResumableSession,
        room: rtc.Room,
        *,
        leave_grace: float | None,
        rejoin: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._rs = rs
        self._room = room
        self._leave_grace = leave_grace
        self._rejoin = rejoin
        # the session's pause count at the pause the policy made as the caller left: it
        # is lifted on their return only while no one asked for a pause since (a hold)
        self._left_pause: int | None = None
        self._listening = False
        self._started = False
        self._missed = False  # a participant came or went after listen(), before start()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures = 0  # steps failed in a row: the retry after a grace backs off
        # One step at a time (a pause, a resume, a suspend, a restore), each decided on
        # who is in the room once the step before it is done: a participant who joins or
        # leaves while one runs is seen by the next, never lost to a state in transit.
        self._stepping = asyncio.Lock()

    def listen(self) -> None:
        """Hear the room's participant events from now on; nothing is done about them
        before `start` (the session is not running yet), which then takes the steps
        they call for. `resumable_job` listens before its restore: a caller who leaves
        while the session is restored or started is otherwise never seen."""
        if not self._listening:
            self._listening = True
            self._room.on("participant_disconnected", self._on_left)
            self._room.on("participant_connected", self._on_joined)

    def start(self) -> None:
        self.listen()
        self._started = True
        if self._missed:
            self._missed = False
            self._spawn(self._settle())

    def stop(self) -> None:
        self._cancel_timer()
        self._started = False
        self._missed = False
        if self._listening:
            self._listening = False
            self._room.off("participant_disconnected", self._on_left)
            self._room.off("participant_connected", self._on_joined)

    # -- room events (synchronous callbacks: the work runs in tasks) --------------

    def _on_left(self, _participant: rtc.RemoteParticipant) -> None:
        self._heard()

    def _on_joined(self, _participant: rtc.RemoteParticipant) -> None:
        self._heard()

    def _heard(self) -> None:
        if self._started:
            self._spawn(self._settle())
        else:
            self._missed = True  # settled once started, on who is in the room then

    async def _settle(self, *, grace_over: bool = False) -> None:
        """Take the steps the room's participants call for, one after the other, until
        none is left; ``grace_over``: the suspend timer fired."""
        async with self._stepping:
            while self._started:
                step = self._next_step(grace_over)
                if step is None:
                    return
                grace_over = False
                try:
                    await step()
                except Exception:
                    self._failures += 1
                    self._again_after_grace()
                    raise  # logged by `_done`
                self._failures = 0

    def _next_step(self, grace_over: bool) -> Callable[[], Awaitable[None]] | None:
        state = self._rs.state
        closing = self._rs._closing
        if closing is not None:
            if self._rs._closed_on_error and not closing.done():
                # LiveKit closed it on errors: given up as a suspend once saved, and then
                # decided again on who is in the room
                return lambda: asyncio.shield(closing)
            return None  # closed or closing (the job shuts down): the close is final
        finishing = self._rs._finishing
        if finishing is not None:
            # a suspend of the session's own (suspend_after, the app) is under way:
            # decide once it is done, on who is in the room then
            return lambda: asyncio.shield(finishing)
        pausing = self._rs._pausing
        if pausing is not None:
            # a pause of the app's (a hold) or an operator's under way: theirs, not the
            # policy's to lift on a return; decided once it has taken effect
            return lambda: asyncio.shield(pausing)
        if callers(self._room):
            self._cancel_timer()
            if state == "paused" and self._left_pause == self._rs._pauses:
                return self._resume_after_leave
            if state == "suspended" and self._rejoin is not None:
                return self._restore_in_place
            return None
        if self._leave_grace is None:
            return None
        if state == "active":
            return self._pause_for_leave
        if grace_over and state == "paused":
            return lambda: self._suspend("nobody came back within the grace")
        if state == "paused" and self._timer is None:
            # paused by someone else (an operator's hold, the app) as the last caller
            # left: the grace runs all the same, or nothing would end a call nobody is on
            return self._arm_grace
        return None

    async def _arm_grace(self) -> None:
        self._arm(self._leave_grace or 0.0)

    def _again_after_grace(self) -> None:
        """After a step failed (a suspend against a store outage): a call still nobody's
        is suspended after another grace (at least the backoff), or no timer and no room
        event would ever."""
        if (
            self._started
            and self._leave_grace is not None
            and self._timer is None
            and self._rs.state == "paused"
            and self._rs._closing is None
            and not callers(self._room)
        ):
            # a grace of 0 (suspend at once) against a store that refuses at once would
            # retry in a tight loop: at least 2 s, doubling to a minute, as a long pause's
            backoff = LONG_PAUSE_RETRY * 2 ** min(self._failures - 1, 8)
            self._arm(max(self._leave_grace, min(backoff, LONG_PAUSE_RETRY_CAP)))

    async def _pause_for_leave(self) -> None:
        self._left_pause = self._rs._pauses + 1  # what this pause makes it
        try:
            await self._rs.pause()
        except BaseException:
            if self._rs._pauses != self._left_pause:
                self._left_pause = None  # not paused by it: a later pause is not its own
            raise
        finally:
            # paused even when its save failed (a store blip; the next save sends it
            # again): the grace runs all the same, or nothing would ever suspend it
            if self._rs.state == "paused":
                self._arm(self._leave_grace or 0.0)
        log.info(
            "session %r paused: the last participant left (%.0fs grace)",
            self._rs.key,
            self._leave_grace,
            extra={"key": self._rs.key},
        )

    async def _resume_after_leave(self) -> None:
        self._left_pause = None
        await self._rs.resume()
        log.info(
            "session %r resumed: a participant came back",
            self._rs.key,
            extra={"key": self._rs.key},
        )

    async def _restore_in_place(self) -> None:
        assert self._rejoin is not None
        self._left_pause = None
        await self._rejoin()
        log.info(
            "session %r restored in this job at version %d: a participant joined",
            self._rs.key,
            self._rs.version,
            extra={"key": self._rs.key},
        )

    # -- the suspend timer ----------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._grace_over)

    def _grace_over(self) -> None:
        self._timer = None
        self._spawn(self._settle(grace_over=True))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _suspend(self, why: str) -> None:
        log.info("session %r suspended: %s", self._rs.key, why, extra={"key": self._rs.key})
        await self._rs.suspend()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %r: a pause, suspend or restore on a room event failed: %s",
                self._rs.key,
                task.exception(),
                extra={"key": self._rs.key},
            )


async def archive_stale(
    store: Store,
    codec: Codec,
    key: str,
    *,
    older_than: float | None,
    owner: str,
    info: SessionInfo | Literal[False] | None = False,
    lease_ttl: float = ARCHIVE_LEASE_TTL,
) -> str | None:
    """If ``key``'s conversation ended (`ResumableSession.end`) or was last saved more
    than ``older_than`` seconds ago, copy its latest version whole to
    ``<key>~v<version>`` (see `archive.kept_aside`), remove ``key`` and return the archive's
    key; else None. A session some worker still holds is left alone. ``info``:
    ``store.info(key)`` when the caller has just read it (not read again). ``lease_ttl``:
    of the lease held meanwhile, at most the store's session ttl (the job's own)."""
    if info is False:
        info = await store.info(key)
    if info is None or info.version == 0 or info.owner is not None:
        return None
    # by the store's clock, which wrote updated_at: this worker's may run ahead or behind
    now = info.read_at if info.read_at is not None else time.time()
    age = now - info.updated_at
    stale = older_than is not None and age > older_than
    if not stale and info.info.get("state") != "ended":
        return None
    # Held from the check to the delete, which it fences: a worker that takes the key
    # over meanwhile (``takeover=True``) keeps it, and with it every turn it wrote.
    try:
        held = await acquire_for(store, key, owner, lease_ttl)
    except SessionBusy:
        return None  # a worker holds it now: it is that worker's
    deleted = False
    try:
        stored = await store.load(key)
        if stored.version != info.version:
            return None  # saved again since it was found stale
        snap = from_stored(codec, stored)
        if not stale and snap.state != "ended":
            # the listing's info is unsigned (anyone who can write the store can set
            # it): the snapshot's own state, checked, decides
            return None
        async with kept_aside(store, codec, key, stored.version, snap, owner, lease_ttl) as (
            archive,
            lease,
        ):
            try:
                deleted = await store.delete(key, lease=held)
            except LeaseLost:
                # taken over while copying: the conversation goes on there, whole
                await store.delete(archive, lease=lease)
                log.info(
                    "session %r was taken over while being archived; left to its holder",
                    key,
                    extra={"key": key},
                )
                return None
    finally:
        if not deleted:
            await to_its_end(release_lease(store, held))
    log.info(
        "session %r %s: kept as %r, starting afresh",
        key,
        "had ended"
        if snap.state == "ended"
        else f"was last saved {age:.0f}s ago, over resume_within",
        archive,
        extra={"key": key, "archived": archive},
    )
    return archive


async def _token_key(
    store: Store,
    ctx: JobContext,
    token: str | Callable[[JobContext], str | None] | None,
    signing_keys: str | None,
    encryption_keys: str | None,
) -> str | None:
    """The key a presented reconnect token names, or None (no token, or refused); the
    keys: the job's, when given in code."""
    presented = token(ctx) if callable(token) else token
    if not presented:
        return None
    try:
        return await verify_token(
            store, presented, signing_keys=signing_keys, encryption_keys=encryption_keys
        )
    except (TokenRefused, ValueError) as e:  # ValueError: no signing keys to check it with
        log.warning("%s; starting from the room's own key", e, extra={"job": ctx.job.id})
        return None


def _refuse_same_job(info: SessionInfo | None, key: str, owner: str) -> None:
    """A job that restores a key it already holds is a bug of the caller, not a takeover."""
    if info is None or info.owner is None:  # info names an owner only while its lease is live
        return
    if info.owner.rsplit(":", 1)[0] == owner.rsplit(":", 1)[0]:
        raise SessionBusy(
            f"session {key!r} is already restored by this job ({info.owner!r}); restore "
            "each key once per job",
            holder=info.owner,
        )


# The policy of each job's latest resumable_job call: a later call in the same job (after
# a suspend, with a new AgentSession) retires the earlier one, which would otherwise take
# the key back when a participant joins. Held weakly (the room's listeners keep it while
# it listens): it holds the job's context (its session's on_lost does), so a strong value
# would keep its key, and every job a worker ever ran in its process, alive for good.
_policies: weakref.WeakKeyDictionary[JobContext, weakref.ref[JobPolicy]] = (
    weakref.WeakKeyDictionary()
)


# The keys each job is restoring right now (until its lease is taken and the store shows it):
# a resumable_job call, or a policy's restore in place.
_restoring: weakref.WeakKeyDictionary[JobContext, set[str]] = weakref.WeakKeyDictionary()


def _userdata_again(rs: ResumableSession, session: AgentSession[Any]) -> Callable[[], None]:
    """What sets ``session.userdata`` back to a copy of the one it holds now (tools change
    it in place), through its saved form. Nothing without a userdata type: userdata is
    neither saved nor copied then."""
    adapter = rs._capture.userdata
    if adapter is None or session._userdata is None:
        return lambda: None
    try:
        form = dump_userdata(adapter, session.userdata)
    except UnsavableValue:
        return lambda: None  # every checkpoint says so: the app's to fix

    def again() -> None:
        try:
            session.userdata = adapter.validate_python(form)
        except Exception as e:  # a validator that no longer takes what it gave
            log.error(
                "session %r: the job's first userdata could not be made again (%s); the "
                "new conversation keeps the last one's",
                rs.key,
                e,
                extra={"key": rs.key},
            )

    return again


@contextlib.contextmanager
def _restoring_key(ctx: JobContext, key: str, owner: str) -> Iterator[None]:
    """Mark ``key`` as being restored by this job, or refuse (`SessionBusy`) when it
    already is. Two restores of one job would both pass the store's check (the lease is
    not yet taken, or taken under this job's own owner, which the store grants again) and
    both hold it at one epoch. Entered with no await before it, so the check and the mark
    are one step."""
    restoring = _restoring.setdefault(ctx, set())
    if key in restoring:
        raise SessionBusy(
            f"session {key!r} is being restored by this job already ({owner!r}); restore "
            "each key once per job",
            holder=owner,
        )
    restoring.add(key)
    try:
        yield
    finally:
        restoring.discard(key)


async def resumable_job(
    ctx: JobContext,
    session: AgentSession[Any],
    *,
    registry: AgentRegistry,
    default: Callable[[], Agent],
    key: KeySpec = None,
    store: Store | None = None,
    leave_grace: float | None = DEFAULT_LEAVE_GRACE,
    suspend_after: float | None = None,
    resume_within: float | None = None,
    token: str | Callable[[JobContext], str | None] | None = None,
    room_options: room_io.RoomOptions | None = None,
    **options: Any,
) -> ResumableSession:
    """Restore (or start) the conversation of this job and start ``session`` in its room.

    ``key`` is the room name by default, or a string, or a function of the job context
    (sync or async) returning the key. ``token`` is a reconnect token (or a function of
    the job finding one, e.g. in the dispatch metadata or a participant attribute): a
    valid one names the key to resume; a forged, expired or revoked one is refused with
    a log line and the job goes on with ``key``. ``resume_within`` (seconds) starts afresh when
    the conversation was last saved longer ago, keeping the old one aside (see
    `archive_stale`). ``store`` defaults to `open_store()`
    (``RESUME_STORE``). ``options`` go to `ResumableSession` (``userdata_type``,
    ``media``, ``codec``, …). The job's shutdown saves and releases the session; a
    newer job for the same key takes it over and this one goes quiet. Once the session
    is suspended in this job (the leave grace ran out, a pause outlasted
    ``suspend_after``), a participant joining the room restores it in place: the same
    ``session`` restarts with the stored conversation, and the returned `ResumableSession`
    is active again. Returns the `ResumableSession` (``rs.resumed`` says whether a
    conversation was found).
    """
    _ignore_sigterm()
    opened = store is None
    store = store or open_store()
    try:
        keys = options.get("signing_keys"), options.get("encryption_keys")
        name = await _token_key(store, ctx, token, *keys) or (await _resolve_key(ctx, key))
        owner = job_owner(ctx)
        # another call of this job, or the restore in place of an earlier one, racing for
        # the key: refused here
        with _restoring_key(ctx, name, owner):
            info = await store.info(name)
            _refuse_same_job(info, name, owner)
            # one codec for the archive and the session: the keys given, if any
            codec: Codec = session_codec(
                store,
                options.pop("codec", None),
                signing_keys=options.pop("signing_keys", None),
                encryption_keys=options.pop("encryption_keys", None),
            )
            # the session's own lease ttl when shorter: a store with a short session ttl
            # refuses a lease that outlives its sessions
            archive = functools.partial(
                archive_stale,
                store,
                codec,
                name,
                older_than=resume_within,
                owner=owner,
                lease_ttl=min(ARCHIVE_LEASE_TTL, options.get("lease_ttl", ARCHIVE_LEASE_TTL)),
            )
            await archive(info=info)

            async def on_lost(error: LeaseLost) -> None:
                # a newer job took the conversation over: stop speaking, write nothing, end
                log.warning(
                    "session %r was taken over by another job, or deleted; this job stops: %s",
                    name,
                    error,
                    extra={"key": name},
                )
                try:
                    policy.stop()
                    # not bounded here: LiveKit marks every interrupted speech done within
                    # speech_handle.INTERRUPTION_TIMEOUT (5 s in 1.8.9)
                    with contextlib.suppress(RuntimeError):  # not started yet: nothing speaks
                        await session.interrupt(force=True)
                    session.output.set_audio_enabled(False)
                    session.input.set_audio_enabled(False)
                    await rs.aclose()
                    await session.aclose()  # raises what a model's close raised (a reset socket)
                finally:
                    # whatever failed above, this job leaves the room: the newer one serves it
                    ctx.shutdown(
                        reason=f"session {name!r} was taken over by another job, or deleted"
                    )

            rs = ResumableSession(
                store,
                name,
                registry=registry,
                owner=owner,
                room=ctx.room,
                on_lost=on_lost,
                suspend_after=suspend_after,
                codec=codec,
                **options,
            )
            opts = room_options or room_io.RoomOptions()
            if leave_grace is not None:
                opts = dataclasses.replace(opts, close_on_disconnect=False)  # the grace decides

            closed = asyncio.Event()  # a suspend closes the session last, after the lease is freed
            session.on("close", lambda _ev: closed.set())

            async def rejoin() -> None:
                # Suspended in this job and a participant joined: the store holds the conversation,
                # the closed AgentSession restarts with it (LiveKit restarts a closed session and
                # it stays the job's primary one: its report, recording and shutdown close).
                # LiveKit's restart logs "Failed to detach context" from opentelemetry: start()
                # detaches the token its first start attached in the entrypoint's task; harmless.
                # No takeover: a newer job serving the key (the caller back in another room)
                # keeps it; this older one stays suspended (SessionBusy, logged) and may try
                # again on the next join, so ``closed`` is cleared only once it restored.
                # A later resumable_job call for the key racing this restore is refused, and
                # this one is refused while such a call runs.
                await closed.wait()
                with _restoring_key(ctx, name, owner):
                    # the history as the session closed with it, back if the restore fails
                    # (refused: a newer job holds the key): the job's report and shutdown
                    # callbacks read this session's history
                    kept = list(session.history.items)
                    kept_userdata = session._userdata
                    try:
                        await archive()
                        session.history.items.clear()
                        restored = await rs.restore(session, default=default)
                        if not rs.resumed:
                            # a new conversation (none stored, the stored one stale, ended
                            # or removed by rm): the job's userdata, not the last call's
                            first_userdata()
                    except BaseException:
                        session.history.items[:] = kept
                        session.userdata = kept_userdata
                        raise
                    closed.clear()
                    try:
                        await session.start(restored, room=ctx.room, room_options=opts)
                    except BaseException:
                        # Nothing runs: suspended again, the lease freed (held, nobody else
                        # could take the call and autosave would renew it), and ``closed``
                        # set again (a session that never started never closes), so the
                        # next join tries again.
                        await rs._unrestore()
                        closed.set()
                        raise

            first_userdata = _userdata_again(rs, session)
            policy = JobPolicy(rs, ctx.room, leave_grace=leave_grace, rejoin=rejoin)
            held = _policies.get(ctx)
            earlier = held() if held is not None else None
            if earlier is not None:
                earlier.stop()
            _policies[ctx] = weakref.ref(policy)
            # listening from here: a caller gone during the restore or session.start() is
            # heard, and acted on once the policy starts
            policy.listen()
            try:
                agent = await rs.restore(session, default=default, takeover=True)
            except BaseException:
                policy.stop()
                raise
    except BaseException:
        # nothing holds the store it opened now (the shutdown callback that closes it
        # is not registered yet): a worker would keep one per failed job
        if opened:
            await store.aclose()
        raise

    async def on_shutdown(_reason: str) -> None:
        policy.stop()  # nothing restores it in this job from here
        await rs.aclose()  # usually done already: the session's close saved it
        if opened:
            await store.aclose()

    ctx.add_shutdown_callback(on_shutdown)
    try:
        await session.start(agent, room=ctx.room, room_options=opts)
    except BaseException:
        policy.stop()
        raise
    policy.start()
    return rs
