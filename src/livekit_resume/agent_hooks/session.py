"""`ResumableSession`: the hooks bound to one session key, a thin facade over its parts.

- `LeaseHolder` (lease.py): the key's lease, renewed, re-acquired when the session
  vanished from the store, released;
- `Capture` (capture.py): the live session read into a snapshot and its commit;
- `rebuild` (rebuild.py): a snapshot put back into a fresh `AgentSession`;
- `Silencer` (silence.py): the mechanics of a soft pause;
- `Announcer` (room.py): participant attributes, store events, the job's metadata;
- `Autosave` (autosave.py): debounced background checkpoints and lease renewal;
- `listen` (listen.py): the session events that trigger them.

This module decides *when* (restore, checkpoint, pause, resume, suspend, close) and in
which state; the parts know *how*. Only `agent_hooks` touches `AgentSession` (see
DESIGN.md, "LiveKit 1.8.9").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Literal, TypeVar

from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.events import CloseEvent, CloseReason, EventTypes
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter

from ..bridge import from_stored, newest_readable, salvage_stored, session_codec
from ..errors import (
    LeaseLost,
    ResumeError,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreUnavailable,
)
from ..snapshot.chat import MediaPolicy
from ..snapshot.codec import Codec
from ..snapshot.frame import gc_paused
from ..snapshot.model import Reason, Snapshot, ToolCallRecord
from ..snapshot.seal import Sealed
from ..snapshot.values import plain_extra
from ..stores.base import DEFAULT_LEASE_TTL, Lease, Store, Stored, lease_lost_error, validate_key
from .archive import ARCHIVE_LEASE_TTL, kept_aside
from .autosave import (
    CHECKPOINT_FAILURES,
    CHECKPOINT_SECONDS,
    CHECKPOINTS,
    Autosave,
    close_deadline,
    final_save,
    release_wait,
)
from .capture import Capture, Indexes, Pending, SavedState
from .control import ControlListener
from .lease import LeaseHolder, OutOfTime, bounded, to_its_end
from .listen import listen
from .rebuild import Built, build_items, check, rebuild
from .registry import AgentRegistry
from .room import ATTR_STATE, ATTR_VERSION, Announcer
from .silence import Silencer, Timer, current_agent, in_livekit_task, turn_hook_task

__all__ = ["ATTR_STATE", "ATTR_VERSION", "ResumableSession", "SessionState"]

_T = TypeVar("_T")

# A restore of more items than this decodes them on a worker thread: past about a
# millisecond of decoding, the other sessions on the loop would feel it.
OFFLOAD_ITEMS = 100

log = logging.getLogger("livekit_resume")
tracer = trace.get_tracer("livekit_resume")

SessionState = Literal["active", "paused", "suspended", "ended", "closed"]

# A burst of events (user message, tool calls, reply) lands within this; one write.
DEFAULT_DEBOUNCE = 0.2

# How long a suspend (or an end), saved and released, waits for LiveKit's close of the
# session: the close waits for every tool that cannot be cancelled (async tools are
# not, by default), however long it runs. Past this the close goes on by itself.
SUSPEND_CLOSE_WAIT = 2.0
# A long pause whose suspend failed (the store down) tries again, this much later at
# first, doubling up to the cap: it holds the lease and the connections the suspend was
# to free, and a resume meets a suspend under way while one is tried.
LONG_PAUSE_RETRY = 2.0
LONG_PAUSE_RETRY_CAP = 60.0
# Saves after a final one, each of what reached the session during the one before.
SETTLE_ROUNDS = 3
# Loop turns a suspend or an end from ``on_user_turn_completed`` gives LiveKit's close to
# mark the session closing (its first step, unless its lock is held) before the hook
# goes on: LiveKit adds the caller's turn to the history only if it is.
CLOSING_TURNS = 20

SALVAGED = Counter(
    "livekit_resume_sessions_salvaged", "Damaged snapshots restored with what was intact"
)


class ResumableSession:
    """Hooks that snapshot one `AgentSession` under ``key`` and restore it anywhere.

    ``userdata_type`` validates and encodes ``session.userdata`` (a pydantic
    ``TypeAdapter``); without it userdata is not saved. ``owner`` names this holder in
    leases, and must be its own: two under one name are one holder to the store, which
    fences neither (default: host, pid and a random suffix; `resumable_job`'s: worker,
    job and process). Keys for signing and encryption default to
    ``RESUME_SIGNING_KEYS`` and ``RESUME_ENCRYPTION_KEYS``; ``codec`` replaces them with
    a `Codec` of your own (keys, ``max_frame``). ``on_lost`` is awaited once
    when a save (autosave's, a pause's or suspend's, a checkpoint) or a lease renewal
    finds the session taken over by another worker (`LeaseLost`): nothing more is
    written from here, so it is the place to stop speaking and end the session.
    ``suspend_after``: a pause longer than this many seconds becomes a suspend, which
    frees the session's connections and its lease.

    An item too large for one frame is never written unreadable: with ``media="keep"``
    its media is dropped for that item, and a message or tool output still too large
    is stored with its text replaced by a note (logged and counted either way).
    """

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        registry: AgentRegistry,
        userdata_type: Any = None,
        autosave: bool = True,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        media: MediaPolicy = "drop",
        signing_keys: str | None = None,
        encryption_keys: str | None = None,
        debounce: float = DEFAULT_DEBOUNCE,
        room: rtc.Room | None = None,
        extra: dict[str, Any] | None = None,
        codec: Codec | None = None,
        on_lost: Callable[[LeaseLost], Awaitable[None]] | None = None,
        suspend_after: float | None = None,
    ) -> None:
        codec = session_codec(
            store, codec, signing_keys=signing_keys, encryption_keys=encryption_keys
        )
        self._store = store
        self._key = validate_key(key)
        self._registry = registry
        self._autosave_enabled = autosave
        owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._owner = owner
        self._extra = plain_extra(extra or {})  # an unsavable value is refused right here
        self._holder = LeaseHolder(store, self._key, owner, lease_ttl)
        self._capture = Capture(
            self._key,
            codec=codec,
            registry=registry,
            media=media,
            userdata_type=userdata_type,
            owner=owner,
        )
        self._silencer = Silencer(self._key)
        self._announcer = Announcer(store, self._key, owner, room)
        self._autosave = Autosave(
            self._autosave_checkpoint,
            self._renew,
            key=self._key,
            debounce=debounce,
            renew_every=lease_ttl / 3,
            renewed_at=lambda: self._holder.renewed_at,
            on_lost=self._lost,
        )
        self._on_lost = on_lost
        self._lost_task: asyncio.Task[None] | None = None
        # the latest version, when a salvage restored an older one (it cannot be read)
        self._rolled_back: int | None = None
        self._salvaged = False  # this restore's snapshot was salvaged (counted once it is)
        self._landed = 0  # commits stored: a save that stored one is timed
        self._close_final = False  # `aclose` was called: nothing restores the session again
        self._close_asked = asyncio.Event()  # set with _close_final: an error close waits no more
        # LiveKit closed it on errors and the hooks are giving it up (`_aclose_on_error`)
        self._closed_on_error = False
        self._suspend_after = suspend_after
        self._long_pause = Timer(self._key)
        # the save of a pause made before the session started, once it starts
        self._state_save = Timer(self._key)
        # a pause is cutting the speech (`pause`): done once it is paused, or not
        self._pausing: asyncio.Future[None] | None = None
        self._pause_unsaved = False  # paused before start: nothing to capture yet
        self._end_unsaved = False  # an end whose save failed: later saves store it ended
        # A suspend's or an end's final save stored: every later save of this life stores
        # that state (the settle's, an autosave queued behind it, a close's)
        self._stored_as: Literal["suspended", "ended"] | None = None
        self._life = 0  # restores made: what waits across a restore sees it came
        self._long_pause_retry = LONG_PAUSE_RETRY

        self._session: AgentSession[Any] | None = None
        self._version = 0
        self._state: SessionState = "active"
        self._resumed = False
        self._lock = asyncio.Lock()
        self._pending: Pending | None = None
        self._listeners: list[tuple[EventTypes, Callable[..., None]]] = []
        self._closing: asyncio.Future[None] | None = None
        # set while a suspend or an end runs (its final save is being written, and the
        # session is closed after it whatever happens meanwhile), done when it returned
        # or failed; ``_finishing_as`` names which
        self._finishing: asyncio.Future[None] | None = None
        self._finishing_as = ""
        self._restoring = False  # a restore is under way: a second one is refused
        # pauses asked of it, a remote one of the session already paused included: the
        # job policy lifts a pause of its own only while no one asked for one since
        self._pauses = 0
        # LiveKit's close of the AgentSession a suspend gave up, while it runs on
        self._session_close: asyncio.Future[None] | None = None
        # a suspend or an end from on_user_turn_completed saving the caller's turn, and
        # giving the session up, after the hook (`_after_turn_hook`)
        self._after_hook: asyncio.Future[None] | None = None
        # remote pause/resume/suspend (control.py), heard while the lease is held
        self._control = ControlListener(
            store,
            self,
            self._held_epoch,
            self._holder.renew,
            started=self._started,
            busy=self._busy,
            paused_again=self._paused_again,
        )

    # ------------------------------------------------------------ properties

    @property
    def key(self) -> str:
        return self._key

    @property
    def version(self) -> int:
        """The last committed version (0 before the first commit)."""
        return self._version

    @property
    def state(self) -> SessionState:
        """``"active"``, ``"paused"``, ``"suspended"``, ``"ended"`` or ``"closed"``."""
        return self._state

    @property
    def resumed(self) -> bool:
        """True when `restore` found a snapshot. LiveKit runs ``on_enter`` on every start,
        so an agent checks this to skip its greeting after a restore."""
        return self._resumed

    @property
    def _lease(self) -> Lease | None:
        return self._holder.lease

    @property
    def _running(self) -> dict[str, ToolCallRecord]:
        return self._capture.running

    # --------------------------------------------------------------- restore

    async def restore(
        self,
        session: AgentSession[Any],
        *,
        default: Callable[[], Agent],
        takeover: bool = False,
        salvage: bool = False,
    ) -> Agent:
        """Take the lease, load the latest snapshot if any, fill ``session.history`` and
        ``session.userdata``, rebuild the current agent with its context, attach autosave.

        Call before ``session.start(agent)``. Returns ``default()`` when no snapshot exists.
        After a `suspend` it may be called again, with a new `AgentSession` or the closed
        one (LiveKit restarts it; empty its ``history`` first, and give it the userdata a
        new conversation starts with: a restore that resumes one sets its own).
        Raises `SessionBusy` when another live worker holds the session (unless
        ``takeover``), `UnknownAgent` for an unregistered agent id, `IncompatibleSnapshot`
        when saved userdata no longer validates or the agent's factory fails on its saved
        state, `SnapshotCorrupt` when stored bytes are damaged, `RuntimeError` when
        `aclose` ran first or meanwhile, or when ``session`` is already running; the
        lease is released on failure. A session another worker holds live is taken over
        (``takeover``) only once it is read and found restorable here. With
        ``salvage`` a damaged snapshot is restored with what is intact: each lost item is
        logged, a system note in the context says what is missing, and the first
        checkpoint writes the whole session anew so later versions no longer depend on
        the damaged record.
        """
        if session is self._session and turn_hook_task(session) is not None:
            # its close, which a restore in place waits for, waits for this hook
            raise RuntimeError(
                f"session {self._key!r}: cannot restore an AgentSession in place from its "
                "own on_user_turn_completed"
            )
        finishing = self._finishing
        after_hook = self._after_hook
        if finishing is not None and after_hook is not None and not after_hook.done():
            # a suspend from on_user_turn_completed saving the caller's turn: it says
            # suspended once that is saved and its lease is free
            await asyncio.wait({after_hook})
        if finishing is not None and self._state == "suspended":
            # A suspend says suspended once its lease is free, and goes on (the store's
            # event, the room, LiveKit's close): a restore in place waits for its end, or
            # that end would close the session restarted. Into a new session, not longer
            # than LiveKit's close is waited for (the old life's close leaves it alone).
            in_place = session is self._session
            await asyncio.wait({finishing}, timeout=None if in_place else SUSPEND_CLOSE_WAIT)
        if self._session is not None and self._state != "suspended":
            raise RuntimeError(f"session {self._key!r} was already restored")
        if self._restoring:
            raise RuntimeError(f"session {self._key!r} is being restored")
        if self._closing is not None:
            raise RuntimeError(f"session {self._key!r} is closed")
        if session is self._session and self._session_close is not None:
            # restored in place: LiveKit restarts the session once its close is done (a
            # failed close is logged where it ends). What that close adds to a history
            # emptied for the restore (a tool's late result) is the closed session's:
            # the snapshot answered the call already.
            emptied = not session.history.items
            await asyncio.wait({self._session_close})
            if emptied:
                session.history.items.clear()
        if _running(session):
            # The agent rebuilt here would never start: the saved items would land in the
            # live history beside a current agent that lacks them, and its next checkpoint
            # would replace the saved agent context with its own.
            raise RuntimeError(
                f"session {self._key!r}: restore() must run before session.start(); "
                "this AgentSession is already running"
            )
        if self._state == "suspended":
            # again after a suspend, maybe into the same AgentSession: its audio back on
            self._silencer.unsilence(session)
        self._restoring = True
        try:
            with tracer.start_as_current_span(
                "livekit_resume.restore", attributes={"livekit_resume.key": self._key}
            ) as span:
                agent = await self._restore(session, default, takeover, salvage)
                span.set_attribute("livekit_resume.version", self._version)
                span.set_attribute("livekit_resume.resumed", self._resumed)
        finally:
            self._restoring = False
        return agent

    async def _restore(
        self,
        session: AgentSession[Any],
        default: Callable[[], Agent],
        takeover: bool,
        salvage: bool,
    ) -> Agent:
        stored = await self._acquire_load(takeover, salvage)
        # What the store holds now is the truth: a commit left pending by the session
        # before (its close's final save met an outage) is in it if it landed, and if
        # not, was made under a lease since lapsed (sent again, it fences this one)
        self._pending = None
        # The command inbox subscribes (a connection, a round trip or two) while the
        # snapshot is decoded and rebuilt. A command it hears before the restore is done
        # is refused: the session is not attached yet.
        with _untraced():
            listening = asyncio.ensure_future(self._control.start())
        # what the history held before: a restore that fails once it filled it takes
        # its items out again, so that a retry into this session has each item once
        kept = list(session.history.items)
        try:
            agent = await self._load_into(session, default, salvage, stored)
            if self._rolled_back is not None:
                # an older version restored over a latest that cannot be read: the next
                # commit names the latest as its base and writes the session whole
                self._version, self._capture.rewrite = self._rolled_back, True
            if self._rolled_back is not None or self._salvaged:
                SALVAGED.inc()  # once restored: a rebuild that failed restored nothing
        except BaseException:
            session.history.items[:] = kept

            async def undo_load() -> None:
                await self._holder.release()
                # The inbox is stopped once its start is done (subscribed, or given up
                # after START_WAIT), as after any restore: stopped mid-subscription, Python
                # 3.11's wait_for can swallow the cancellation and the stop would wait
                # forever.
                await asyncio.gather(listening, return_exceptions=True)
                await self._control.stop()  # after the release, as in _detach_and_release

            # to its end, whatever cancellation arrives meanwhile (a job cancelling twice):
            # stopped half-way, it would leave the inbox listening
            await to_its_end(undo_load())
            raise
        before = self._session, self._state
        self._session = session
        self._state, self._stored_as, self._end_unsaved = "active", None, False
        self._life += 1
        self._finishing = None  # the life before's suspend, still ending (`restore`)
        self._capture.last_agent = agent  # saved should an AgentTask run before a save
        self._attach(session)
        if self._autosave_enabled:
            with _untraced():
                self._autosave.start()
        # the room is not waited for (`Announcer.show`); the store's event is, together
        # with the inbox: restore returns once both are done, the inbox listening (so no
        # command sent after it returned is missed)
        self._show()
        try:
            await asyncio.gather(
                self._announcer.announce("restored" if self._resumed else "started", self._version),
                asyncio.shield(listening),  # its start is let finish, as on a failed load
            )
        except BaseException:
            # Cancelled in this last step (a job shut down): the caller gets no session
            # to close, so none stays attached, renewing the lease and writing under it.

            async def undo_attach() -> None:
                await asyncio.gather(listening, return_exceptions=True)
                await self._detach_and_release()

            try:
                # to its end, whatever cancellation arrives meanwhile (a job cancelling
                # twice): stopped half-way, autosave would renew a lease nobody releases
                await to_its_end(undo_attach())
            finally:
                self._session, self._state = before
                session.history.items[:] = kept
            raise
        if self._closing is not None:
            # closed while restoring (the job shut down before its session started): the
            # close is final, so nothing may go on holding the lease and saving under it
            await to_its_end(self._detach_and_release())
            self._state = "closed"
            session.history.items[:] = kept
            raise RuntimeError(f"session {self._key!r} was closed while it was being restored")
        log.info(
            "session %r %s at version %d",
            self._key,
            "restored" if self._resumed else "started fresh",
            self._version,
            extra={"key": self._key, "version": self._version},
        )
        return agent

    async def _acquire_load(self, takeover: bool, salvage: bool) -> Stored | None:
        """The lease, and the latest version read under it (with ``salvage``, the
        newest that reads when the latest cannot be read at all: `_newest_readable`)."""
        self._rolled_back, self._salvaged = None, False
        try:
            return await self._acquire_latest(takeover, salvage)
        except SnapshotCorrupt as e:
            if not salvage:
                raise
            return await self._newest_readable(takeover, e)

    async def _newest_readable(self, takeover: bool, lost: SnapshotCorrupt) -> Stored:
        """Under the lease, the newest retained version the store can read, for a session
        whose latest cannot be (its record lost): the turns after it are lost, the rest
        is restored; the first checkpoint writes the session whole on top of the damage.
        ``lost`` is raised when no version reads."""
        try:
            await self._holder.acquire(takeover=False)
        except SessionBusy:
            if not takeover:
                raise
            # as a takeover of the latest: what would be restored is read and found
            # restorable here before the live holder is fenced
            _, found = await newest_readable(self._store, self._key)
            if found is None:
                raise lost from None
            await _off_the_loop_if_long(found, partial(self._check, found, True))
            await self._holder.acquire(takeover=True)
        try:
            top, stored = await newest_readable(self._store, self._key)
            if stored is None:
                raise lost
        except BaseException:
            await self._holder.release()
            raise
        self._rolled_back = top
        log.error(
            "session %r: version %d cannot be read (%s); restoring version %d, the newest "
            "that can: what came after it is lost",
            self._key,
            top,
            lost,
            stored.version,
            extra={"key": self._key, "version": stored.version},
        )
        return stored

    async def _acquire_latest(self, takeover: bool, salvage: bool) -> Stored | None:
        """The lease, and the latest version read under it. A session another worker
        holds live is taken over only once what it holds is read and found restorable
        here (`check`): a worker whose keys, registry or userdata type cannot restore it
        (a rolling deploy half done) would fence a holder that saves it fine, for a
        restore that then fails."""
        try:
            return await self._holder.acquire_and_load(takeover=False)
        except SessionBusy:
            if not takeover:
                raise
        try:
            stored: Stored | None = await self._store.load(self._key)
        except SnapshotNotFound:
            stored = None
        if stored is not None:
            await _off_the_loop_if_long(stored, partial(self._check, stored, salvage))
        return await self._holder.acquire_and_load(takeover=True)

    def _check(self, stored: Stored, salvage: bool) -> None:
        try:
            snap = from_stored(self._capture.codec, stored)
        except SnapshotCorrupt:
            if salvage:
                return  # salvaged under the lease
            raise
        check(
            snap,
            registry=self._registry,
            userdata=self._capture.userdata,
            userdata_type=self._capture.userdata_type,
        )

    async def _load_into(
        self,
        session: AgentSession[Any],
        default: Callable[[], Agent],
        salvage: bool,
        stored: Stored | None,
    ) -> Agent:
        # a restore again after a suspend may start a new conversation (none stored, or
        # the stored one ended): only one it goes on with counts as resumed
        self._resumed = False
        # Tool calls the last session left running are the snapshot's to answer now
        # ("interrupted"): one that ended while the suspend closed that session was
        # never heard ending, and would be saved as running into every later snapshot.
        self._capture.running.clear()
        if stored is None:
            if self._version:
                # restored again, the conversation gone (`rm`, archived as stale): a new
                # one from version 0, written whole over what the capture held of the last
                self._version = 0
                self._capture.rewrite = True
            self._capture.fresh()
            return default()
        sealed: dict[str, Sealed] = {}  # what checking the seals hashed: not hashed again
        snap, built, indexes = await _off_the_loop_if_long(
            stored, partial(self._decode, stored, sealed, salvage)
        )
        if snap is None:
            snap = await self._salvage(stored)
        if snap.state == "ended":
            # An ended conversation is never resumed: kept aside whole first (it ended as
            # this call read the key, or its lease outlived a failed release), since the
            # key's older versions lose it once `keep` more are written; then a new one
            # starts under the key, its first commit clearing the streams.
            ttl = min(ARCHIVE_LEASE_TTL, self._holder.ttl)
            codec = self._capture.codec
            async with kept_aside(
                self._store, codec, self._key, stored.version, snap, self._holder.owner, ttl
            ) as (archive, _):
                pass
            log.info(
                "session %r: conversation ended at version %d, kept as %r; starting a new one",
                self._key,
                stored.version,
                archive,
                extra={"key": self._key, "version": stored.version, "archived": archive},
            )
            self._version = stored.version
            self._capture.rewrite = True
            self._capture.fresh()
            return default()
        rebuilt = await rebuild(
            session,
            snap,
            default=default,
            registry=self._registry,
            userdata=self._capture.userdata,
            userdata_type=self._capture.userdata_type,
            built=built,
        )
        self._capture.baseline(
            snap, rebuilt.history, rebuilt.agent, rebuilt.agent_items, sealed, indexes
        )
        self._version, self._resumed = stored.version, True
        return rebuilt.agent

    def _decode(
        self, stored: Stored, sealed: dict[str, Sealed], salvage: bool
    ) -> tuple[Snapshot | None, Built | None, Indexes | None]:
        """The snapshot ``stored`` holds, its chat items built and its streams indexed
        for the tracker (`Capture.index`), or Nones when it is damaged and ``salvage``
        is asked for. Touches no live object.

        One pause of cyclic GC over the decode, the items' build and their index, on the
        loop's thread or a worker's. Once built and indexed, the snapshot lets go of its
        decoded item maps (nothing after reads them: `Capture.baseline` takes the
        index), so they are freed here, inside the pause: the one collection after it
        walks the built items alone, as the build's own pause would end with, and the
        maps are neither walked by it nor kept until the restore ends."""
        with gc_paused():
            try:
                snap = from_stored(self._capture.codec, stored, sealed=sealed)
            except SnapshotCorrupt:
                if not salvage:
                    raise
                return None, None, None
            if snap.state == "ended":
                return snap, None, None
            built, indexes = build_items(snap), self._capture.index(snap, sealed)
            snap.history = []
            if snap.agent is not None:
                snap.agent.chat_ctx = []
            # the frames too (only a salvage reads them, and it runs after a failed
            # decode): freed here rather than when the restore returns, on the loop,
            # which 10,000 frames held ~2 ms
            stored.streams.clear()
            return snap, built, indexes

    async def _salvage(self, stored: Stored) -> Snapshot:
        snap, damage = await salvage_stored(self._store, self._capture.codec, stored)
        self._salvaged = True
        for d in damage:
            log.error(
                "session %r version %d: %s item %r lost in salvage: %s",
                self._key,
                stored.version,
                d.stream,
                d.item_id,
                d.reason,
                extra={"key": self._key, "version": stored.version},
            )
        self._capture.rewrite = True  # leave the damaged record behind
        return snap

    # ------------------------------------------------------------ checkpoint

    async def checkpoint(self, reason: Reason | str = "manual") -> int:
        """Commit a snapshot of the live session now; return its version.

        Raises `LeaseLost` when another worker took the session over (nothing is
        written), `StoreUnavailable` when the store cannot be reached (the attempt is
        sent again, unchanged, before the next one: it is stored at most once).
        """
        version = await self._save(reason, confirm=True)
        self._show()  # not waited for: autosave's next save must not wait on the room
        return version

    async def _autosave_checkpoint(self, reason: str) -> int:
        """`checkpoint` for autosave, which does not ask the store when nothing is new:
        its renewals do, at most ``renew_every`` after the last commit (a trigger that
        changed nothing, an agent state or a metric, sent a renewal each time)."""
        version = await self._save(reason)
        self._show()
        return version

    async def _save(
        self, reason: str, state: SessionState | None = None, *, confirm: bool = False
    ) -> int:
        if not _tracing():
            return await self._checkpoint(reason, state, confirm)
        with tracer.start_as_current_span(
            "livekit_resume.checkpoint",
            attributes={"livekit_resume.key": self._key, "livekit_resume.reason": reason},
        ) as span:
            version = await self._checkpoint(reason, state, confirm)
            span.set_attribute("livekit_resume.version", version)
        return version

    async def _checkpoint(
        self, reason: str, state: SessionState | None, confirm: bool = False
    ) -> int:
        async with self._lock:
            if self._autosave.lost is not None:
                raise self._autosave.lost
            session = self._require()
            if current_agent(session) is None:
                # never started (the job ended first): the store already holds everything
                # this session knows, and a head without its agent would not restore
                return self._version
            started, landed = time.perf_counter(), self._landed
            try:
                version = await self._commit_or_reacquire(session, reason, state, confirm)
            except LeaseLost as e:
                if self._holder.lease is None:
                    released, now = self._holder.released_epoch, e.current_epoch
                    if released is not None and now is not None and now > released:
                        raise  # another worker holds it (on_lost not told: it is closing)
                    # released meanwhile by a close or a suspend of this session's own (the
                    # save sent a pending commit, then drafted under no lease): no takeover
                    raise RuntimeError(
                        f"session {self._key!r} was given up while it was being saved"
                    ) from e
                # Taken over, whichever save found it (a pause's, a suspend's, the app's
                # checkpoint, not only autosave's): nothing more is written, and on_lost
                # is told now, not at the next renewal (a job then ends its call).
                # Counted once, by `Autosave.lose`; one that vanished twice, here.
                if not e.vanished and self._autosave.lost is None:
                    self._autosave.lose(e)
                elif e.vanished:
                    CHECKPOINT_FAILURES.labels(error="LeaseLost").inc()
                raise
            except Exception as e:
                # every save's, whoever asked (autosave's, the app's, a pause's, a close's)
                CHECKPOINT_FAILURES.labels(error=type(e).__name__).inc()
                raise
            if self._landed != landed:  # a commit of its own, or one sent again
                CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
            return version

    async def _commit_or_reacquire(
        self, session: AgentSession[Any], reason: str, state: SessionState | None, confirm: bool
    ) -> int:
        """Commit; the store lost the session (`LeaseLost.vanished`): acquire it again and
        write it whole; the store refuses to append to what it holds (`SnapshotCorrupt`):
        write it whole. Each once, in either order."""
        if self._holder.vanished:
            await self._reacquire()
        reacquired = rewritten = False
        while True:
            try:
                if self._pending is not None:
                    await self._land(self._pending)
                return await self._commit_now(session, reason, state, confirm)
            except LeaseLost as e:
                if not e.vanished or reacquired:
                    raise
                reacquired = True
                await self._reacquire()
            except SnapshotCorrupt as e:
                # The latest version's record or its log lost or altered: this worker
                # holds the whole conversation, so it writes it whole, which reads nothing
                # of the damage, on top of the version the store is at (a commit of ours
                # that landed unheard may be it). Refused again, the damage stands.
                if rewritten or self._capture.rewrite:
                    raise
                rewritten = True
                log.error(
                    "session %r: the store cannot append to version %d (%s); writing the "
                    "session whole",
                    self._key,
                    self._version,
                    e,
                    extra={"key": self._key, "version": self._version},
                )
                self._pending = None
                self._capture.rewrite = True
                listed = await self._store.versions(self._key)
                self._version = listed[-1].version if listed else self._version
            confirm = False

    async def _commit_now(
        self,
        session: AgentSession[Any],
        reason: str,
        state: SessionState | None,
        confirm: bool = False,
    ) -> int:
        pending = await self._capture.draft(
            session,
            reason=reason,
            # an end asked for and not stored is stored by any save (a close's included)
            state=_saved_state(
                "ended" if self._end_unsaved else state or self._stored_as or self._state
            ),
            epoch=self._holder.epoch,
            base_version=self._version,
            writer=self._announcer.writer(),
            meta=lambda turns: self._announcer.meta(
                session, turns, self._extra, self._capture.conversation
            ),
        )
        if pending is None:
            # Nothing new: the store holds it all, if this worker still holds the
            # session. `checkpoint` asks (a renewal): a worker taken over was told its
            # old version had landed, and one without autosave never learnt otherwise.
            if confirm and not await self._holder.renew(self._version):
                raise lease_lost_error(self._key, self._holder.epoch, None)  # vanished
            return self._version
        # the store's part on the loop (its commit packed, the thread or socket handed
        # it) runs in a callback of its own, not after the build's in the same one
        await asyncio.sleep(0)
        try:
            await self._land(pending)
        except BaseException as e:
            # The outcome is unknown unless the store answered with a refusal of its own
            # (`LeaseLost`, `SnapshotTooLarge`, ...): it may have applied it (a caller
            # cancelled mid-commit has sent it all the same; a connection reset while
            # reading the reply, from a store that does not wrap it in StoreUnavailable).
            # The next attempt sends this very commit again (same id) before anything
            # newer, so it lands exactly once and the versions stay in step with the store.
            if not isinstance(e, ResumeError) or isinstance(e, StoreUnavailable):
                self._pending = pending
            raise
        return self._version

    async def _land(self, pending: Pending) -> None:
        """Commit ``pending`` and adopt it as what the store holds."""
        self._version = await self._holder.commit(pending.commit)
        self._pending = None
        self._capture.accept(pending)
        self._landed += 1
        CHECKPOINTS.labels(reason=pending.snap.reason).inc()

    async def _reacquire(self) -> None:
        """The store lost the session, or versions of it, while we held it: take it
        again and write it whole on top of what the store holds."""
        self._version = await self._holder.reacquire(self._version)
        self._pending = None
        self._capture.rewrite = True

    def _lost(self, error: LeaseLost) -> None:
        if self._on_lost is not None and self._lost_task is None:
            self._lost_task = asyncio.ensure_future(self._on_lost(error))
            self._lost_task.add_done_callback(self._on_lost_done)

    def _on_lost_done(self, task: asyncio.Task[None]) -> None:
        # the application's callback, run in a task of ours: what it raises is logged here,
        # never left to the loop as a task exception nobody retrieved
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %r: on_lost failed: %r",
                self._key,
                task.exception(),
                extra={"key": self._key},
            )

    async def _renew(self) -> None:
        if not await self._holder.renew(self._version):
            self._autosave.trigger("manual")  # the next checkpoint acquires it again

    # ----------------------------------------------------- pause and suspend

    async def pause(self) -> int:
        """Soft pause: audio in and out off, speech cut, no replies; state saved.
        The session stays alive in memory and `resume` is instant. Before
        ``session.start()`` the agent starts silent, and the pause is saved as it starts."""
        session = self._require()
        if self._state != "active" or self._finishing is not None:
            raise RuntimeError(f"cannot pause session {self._key!r} in state {self._state!r}")
        if self._pausing is not None:
            raise RuntimeError(f"cannot pause session {self._key!r}: being paused")
        # its waiters wake once this pause has set its state (the callbacks run after
        # this coroutine's next await, its save's)
        pausing = self._pausing = asyncio.get_running_loop().create_future()
        try:
            await self._silencer.silence(session)
        finally:
            self._pausing = None
            pausing.set_result(None)
        if self._state != "active" or self._finishing is not None or self._closing is not None:
            # closed (the job shut down), suspended or ended while the speech was being cut:
            # that state stands, and no long-pause timer is armed on a session given up
            if self._closing is not None:
                what = "closed"
            elif self._finishing is not None:
                what = f"being {self._finishing_as}"
            else:
                what = self._state
            raise RuntimeError(f"cannot pause session {self._key!r}: {what} meanwhile")
        self._state = "paused"
        self._pauses += 1
        # armed before the save: a pause whose save fails is a pause all the same
        if self._suspend_after is not None:
            self._long_pause_retry = LONG_PAUSE_RETRY  # each long pause meets its own outage
            self._long_pause.arm(self._suspend_after, self._suspend_long_pause)
        if not self._started():
            # the agent is not the session's yet: saved once it starts (`_attach`)
            self._pause_unsaved = True
            self._show()
            return self._version
        try:
            version = await self.checkpoint("pause")
        except Exception:
            self._show()  # a pause all the same: the room is told so
            self._autosave.trigger("pause")  # and autosave tries again (the store back)
            raise
        await self._announcer.announce("paused", self._version)
        await self._shown()
        return version

    def _suspend_long_pause(self) -> None:
        if self._state == "paused":
            log.info(
                "session %r paused for over %.0fs: suspended",
                self._key,
                self._suspend_after,
                extra={"key": self._key},
            )
            self._long_pause.run(self._suspend_still_paused(), "suspend after a long pause")

    async def _suspend_still_paused(self) -> int | None:
        """The long pause's suspend, decided when its task runs, not when the timer fired:
        a resume whose step was queued in the same loop turn as the timer has run by then,
        and must not be undone by a suspend of the session it just made active."""
        if self._state != "paused" or self._finishing is not None or self._closing is not None:
            return None  # resumed, being suspended or ended already, or closing: that stands
        try:
            version = await self.suspend()
        except LeaseLost:
            raise
        except Exception:
            if self._state == "paused" and self._finishing is None and self._closing is None:
                self._long_pause.arm(self._long_pause_retry, self._suspend_long_pause)
                self._long_pause_retry = min(self._long_pause_retry * 2, LONG_PAUSE_RETRY_CAP)
            raise  # logged by the timer's task
        return version

    async def resume(self) -> None:
        """Undo `pause`: audio back on and replies allowed, in the same process; the state
        saved before it returns (a failed save is logged, the resume stands)."""
        session = self._require()
        if self._finishing is not None:
            # the session is closed once the final save is written: undoing its silence
            # now would leave the caller talking to a session about to close
            raise RuntimeError(f"cannot resume session {self._key!r}: being {self._finishing_as}")
        if self._state != "paused":
            raise RuntimeError(f"cannot resume session {self._key!r} in state {self._state!r}")
        if self._closing is not None:
            # aclose() is final: its save says paused, and nothing saves after it
            raise RuntimeError(f"cannot resume session {self._key!r}: closing")
        if self._autosave.lost is not None:
            raise self._autosave.lost  # another worker has the call: this one stays silent
        self._long_pause.cancel()
        self._silencer.unsilence(session)
        self._state = "active"
        self._pause_unsaved = self._end_unsaved = False
        self._show()
        await self._silencer.resync(session)
        if self._silencer.owed():
            # the reply to a tool's result that came while paused (the tool, or the
            # AgentTask it awaited, ended meanwhile) was swallowed: asked for now
            with contextlib.suppress(RuntimeError):  # the session closed meanwhile
                session.generate_reply()
        # saved before returning, as a pause is (the caller hears the agent already): an
        # operator's `ls` after a remote resume says active; a resume whose save fails
        # is a resume all the same, one whose save finds the session taken over is not
        try:
            await self._save("manual")
        except LeaseLost:
            if self._state == "active":
                await self._silencer.silence(session)
                self._state = "paused"
                self._show()
            raise
        except Exception as e:  # the store down, an agent not registered: logged
            log.warning(
                "session %r: resumed, its state not saved (%s: %s)",
                self._key,
                type(e).__name__,
                e,
                extra={"key": self._key},
            )
        await self._announcer.announce("resumed", self._version)
        await self._shown()

    async def suspend(self) -> int:
        """Hard suspend: silence, final snapshot, lease released, session closed.
        A later `restore` under the same key, in any process, continues from here.

        If the final snapshot cannot be stored the error is raised and nothing is given
        up: the session stays ``paused`` (silenced) with its lease and autosave, so
        `suspend` can be called again, `resume` undoes the silence, and `aclose`
        still makes the final save. From ``on_user_turn_completed`` it returns once saved,
        and the caller's turn, which LiveKit adds after the hook, is saved before the
        lease is released.
        """
        return await self._finish("suspend", "suspended")

    async def _finish(self, reason: str, state: Literal["suspended", "ended"]) -> int:
        session = self._require()
        if self._state in ("suspended", "ended", "closed"):
            raise RuntimeError(f"session {self._key!r} is already {self._state}")
        if self._finishing is not None:
            raise RuntimeError(f"session {self._key!r} is being {self._finishing_as}")
        if self._closing is not None:
            # aclose() is final and leaves the AgentSession open: a suspend (a timer of
            # suspend_after or of the leave grace) must not close it under its final save
            raise RuntimeError(f"session {self._key!r} is closing")
        if self._end_unsaved:
            # An end asked for and not stored (or stored unheard) is remembered until a
            # resume: a suspend meanwhile (the app's, a long pause's, the caller gone
            # past the leave grace) ends the conversation, which the next call would
            # otherwise resume. Every other save of the session stores it ended too.
            reason, state = "end", "ended"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finishing, self._finishing_as = done, state
        life, earlier = self._life, self._after_hook
        rest: asyncio.Future[None] | None = None

        def finished(_: object = None) -> None:
            # a restore into a new AgentSession may have come during the last steps
            # (`restore`): the session's suspend or end under way is then its own
            if self._finishing is done:
                self._finishing = None
            done.set_result(None)

        try:
            version, rest = await self._finish_now(session, reason, state)
            return version
        except BaseException:
            if self._life == life:
                self._end_unsaved = state == "ended" and self._state == "paused"
            raise
        finally:
            if rest is None and self._after_hook is not earlier:
                rest = self._after_hook  # started, then the hook's task was cancelled
            if rest is None:
                finished()
            else:  # from on_user_turn_completed: finished once its task is
                rest.add_done_callback(finished)

    async def _finish_now(
        self, session: AgentSession[Any], reason: str, state: Literal["suspended", "ended"]
    ) -> tuple[int, asyncio.Future[None] | None]:
        """The final save, then the session given up: before this returns, or, called from
        ``on_user_turn_completed``, in the future returned beside the version."""
        if self._state == "active":
            await self._silencer.silence(session)
            if self._closing is not None and not self._error_close_waits():
                # closed while the speech was being cut (the job shut down): that stands.
                # LiveKit's error close waits for this and leaves the session as stored.
                raise RuntimeError(f"cannot {reason} session {self._key!r}: closed meanwhile")
            self._state = "paused"
            self._show()  # not waited for: the final save must not wait on the room
        # the final snapshot comes before closing: closing a voice session can take seconds
        version = await self._save(reason, state)
        # stored: every later save says so (the settle's, an autosave queued behind the
        # final save, a close's), or one would store the session paused again
        self._stored_as = state
        hook = turn_hook_task(session)
        if hook is not None:
            return version, await self._after_turn_hook(hook, session, reason, state, version)
        wait_close = not in_livekit_task()  # the caller's task: to_its_end runs its own

        async def settle_and_give_up() -> None:
            nonlocal version
            version = await self._settled(reason, state, version)
            await self._give_up(session, state, wait_close=wait_close)

        # From here the store says suspended (or ended): the rest runs to its end even if
        # the caller is cancelled meanwhile (a job shutting down), or the session would
        # say so while open, listening and perhaps holding its lease, and a restore in
        # place would wait for a close that never comes. The cancellation then goes on.
        await to_its_end(settle_and_give_up())
        return version, None

    async def _after_turn_hook(
        self,
        hook: asyncio.Task[Any],
        session: AgentSession[Any],
        reason: str,
        state: Literal["suspended", "ended"],
        version: int,
    ) -> asyncio.Future[None]:
        """A suspend or an end from ``on_user_turn_completed``, its final save stored.
        LiveKit adds the caller's turn (the goodbye) to the history only once the hook
        returns: in the hook's task if the session is closing by then, else in the reply
        it goes on to start (silenced). LiveKit's close, which waits for both, starts now,
        the lease is kept, and the returned task saves what the close left in the history
        once it is done (or after `SUSPEND_CLOSE_WAIT`, should the hook or a tool go on),
        then gives the session up."""
        close = asyncio.ensure_future(session.aclose())

        async def rest() -> None:
            # the settle saves what comes now (autosave's lease renewals are not needed
            # for the few seconds this takes at most)
            await self._autosave.aclose()
            await asyncio.wait({hook, close}, timeout=SUSPEND_CLOSE_WAIT)
            # closed meanwhile (the hook's own aclose): the close's save was the last
            closed = self._state == "closed"
            last = version if closed else await self._settled(reason, state, version)
            await self._give_up(session, state, wait_close=False, close=close)
            log.debug("given up after on_user_turn_completed", extra={"version": last})

        def failed(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "session %r: giving it up %s failed: %s",
                    self._key,
                    state,
                    task.exception(),
                    extra={"key": self._key},
                )

        # started before the wait below: whatever cancels the hook's task meanwhile, the
        # session is still given up (as `to_its_end` sees to for a suspend elsewhere)
        task = asyncio.ensure_future(rest())
        task.add_done_callback(failed)
        self._after_hook = task
        for _ in range(CLOSING_TURNS):
            if getattr(session, "_closing", True) or close.done():
                break
            await asyncio.sleep(0)
        return task

    async def _give_up(
        self,
        session: AgentSession[Any],
        state: Literal["suspended", "ended"],
        wait_close: bool,
        close: asyncio.Future[None] | None = None,
    ) -> None:
        life = self._life
        self._announcer.show(state, self._version)
        # under the save lock: a checkpoint of the app's under way ends first (its commit
        # or renewal meeting the released lease was taken for a takeover: on_lost, and a
        # job then shut down); one after it finds the session given up
        # (autosave's own save is cancelled first: stuck on a frozen store, it would hold
        # the release as long as the store's timeouts; kept pending, a restore drops it)
        await self._autosave.aclose()
        async with self._lock:
            await self._detach_and_release(then=state)
        # the session's state once its lease is free: a caller who sees it may restore
        # the key at once (a second resumable_job call in the job was refused busy);
        # unless an aclose came meanwhile: it is final, and said closed. LiveKit's error
        # close waiting for this (`_aclose_on_error`) is no close: it leaves it so.
        if self._closing is None or self._error_close_waits():
            self._state, self._closing, self._closed_on_error = state, None, False
        if self._life == life:  # not restored into a new AgentSession meanwhile
            await self._announcer.announce(state, self._version)
            await self._shown()
        if close is None:
            close = asyncio.ensure_future(session.aclose())
        if self._life == life:  # a restore in place of a new life waits on its own close
            self._session_close = close
        close.add_done_callback(self._closed_session)
        if not wait_close:
            return  # called from a tool, on_enter...: LiveKit's close waits for the caller
        _, waiting = await asyncio.wait({close}, timeout=SUSPEND_CLOSE_WAIT)
        if waiting:
            # saved and released: the caller, a rejoin or a remote command waits no more
            tools = sorted({call.name for call in self._capture.running.values()})
            log.warning(
                "session %r: %s, but LiveKit's close of the AgentSession still runs after "
                "%.0fs%s; it goes on by itself",
                self._key,
                state,
                SUSPEND_CLOSE_WAIT,
                f", waiting for {', '.join(tools)} (tools it does not cancel)" if tools else "",
                extra={"key": self._key},
            )

    def _closed_session(self, close: asyncio.Future[None]) -> None:
        if self._session_close is close:
            self._session_close = None
        if not close.cancelled() and close.exception() is not None:
            log.warning(
                "session %r: closing the AgentSession failed: %s",
                self._key,
                close.exception(),
                extra={"key": self._key},
            )

    async def end(self) -> int:
        """The conversation is over (a goodbye, a hang-up the app treats as final): a last
        snapshot marked ``ended``, the lease released, the session closed. A later call
        under the key starts a new conversation instead of resuming this one, and
        reconnect tokens issued for it are refused. Refused (`RuntimeError`) before
        ``session.start()``: nothing would be saved then (`aclose` leaves it as stored).
        From ``on_user_turn_completed`` it returns once saved, and the caller's turn,
        which LiveKit adds after the hook, is saved before the lease is released."""
        closing = self._closing
        if closing is not None and self._error_close_waits() and self._finishing is None:
            return await self._end_in_error_close(closing)
        if (
            self._session is not None
            and self._state in ("active", "paused")
            and not self._started()
        ):
            raise RuntimeError(
                f"cannot end session {self._key!r} before session.start(): nothing "
                "would mark it ended; start it first, or aclose() to leave it as stored"
            )
        return await self._finish("end", "ended")

    async def _end_in_error_close(self, closing: asyncio.Future[None]) -> int:
        """`end` during LiveKit's error close, which gives the session up suspended (a
        goodbye said as the provider failed): its saves store it ended instead, and the
        end returns once one did."""
        self._end_unsaved = True
        await asyncio.shield(closing)
        if self._capture.stored_state != "ended":
            # the close gave it up as it stored it (suspended): a restore in place takes
            # that conversation up, and its saves must not store it ended
            self._end_unsaved = False
            raise RuntimeError(
                f"cannot end session {self._key!r}: LiveKit closed it on errors and it was "
                f"given up {self._capture.stored_state or 'unsaved'} first"
            )
        return self._version

    async def aclose(self) -> None:
        """Final save (unless suspended or the lease is lost) and release the lease.
        Does not close the `AgentSession`. Safe to call twice, or from several places
        (a shutdown callback and the session's own close) at once. A store that cannot
        be reached is retried for up to `CLOSE_SAVE_BUDGET` seconds; after that the
        last stored version stands and the failure is logged and counted."""
        self._close_final = True  # an error close under way stays a close (`_aclose_on_error`)
        self._close_asked.set()
        if self._closing is None:
            # from on_user_turn_completed after its suspend or end: the turn that task
            # saves comes only once the hook returns, which waits for this close
            in_hook = self._session is not None and turn_hook_task(self._session) is not None
            self._closing = asyncio.ensure_future(self._aclose(in_hook=in_hook))
        await asyncio.shield(self._closing)

    async def _aclose(
        self, state: Literal["suspended"] | None = None, *, in_hook: bool = False
    ) -> None:
        """The close: final save (stored as ``state`` if given, else as the session
        is), release, ``closed``. ``in_hook``: asked from ``on_user_turn_completed``."""
        self._long_pause.cancel()  # no suspend_after from here: the close is final
        # the whole close is bounded: a frozen store fails each call only after every
        # client timeout and retry (tens of seconds), and LiveKit gives shutdown ~10 s
        deadline = close_deadline()
        after_hook = self._after_hook
        if after_hook is not None and not after_hook.done() and not in_hook:
            # a suspend or an end from on_user_turn_completed is saving the caller's turn
            # (a job's shutdown right after the hook): its save is the final one
            await asyncio.wait({after_hook}, timeout=max(0.0, deadline - time.monotonic()))
        live = self._state in ("active", "paused")
        if self._session is not None and self._lease is not None and live:

            async def save(reason: str) -> int:
                return await self._save(reason, state, confirm=True)

            saved = await final_save(
                self.checkpoint if state is None else save,
                self._key,
                lambda: self._version,
                deadline=deadline,
            )
            if saved:
                with contextlib.suppress(OutOfTime):
                    settled = self._settled("close", state, self._version)
                    await bounded(settled, deadline - time.monotonic())
        await self._detach_and_release(release_within=release_wait(deadline))
        self._state = "closed"

    async def _settled(self, reason: str, state: SessionState | None, version: int) -> int:
        """After a final save: what reached the session while it was on its way (a
        tool's output landing between its read and its commit) saved too, before the
        session is given up, until a save finds nothing new (a read, no store call), at
        most `SETTLE_ROUNDS` times. A failure here leaves the final save standing."""
        for _ in range(SETTLE_ROUNDS):
            try:
                again = await self._save(reason, state)
            except Exception as e:
                log.warning(
                    "session %r: what came during its final save was not saved: %s",
                    self._key,
                    e,
                    extra={"key": self._key, "version": version},
                )
                break
            if again == version:
                break
            version = again
        return version

    async def _aclose_on_error(self) -> None:
        """LiveKit closed the session on errors it could not recover from (a provider
        down), and the job goes on: saved and released as a close does, then given up
        as a suspend, so that a restore may take it up again in this job (the caller
        back in the room: `resumable_job`'s restore in place, once the provider is)."""
        finishing, life = self._finishing, self._life
        if finishing is not None:
            # A suspend or an end under way decides what the session becomes: once it
            # stored its state, the session is given up as it left it (a restore in place
            # may take it up again), not closed for good; if it failed, this close saves.
            # (not longer than the app's aclose allows: a close is bounded, and a final
            # save stuck on a frozen store is not)
            asked: asyncio.Future[Any] = asyncio.ensure_future(self._close_asked.wait())
            try:
                await asyncio.wait({finishing, asked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                asked.cancel()
            if self._life != life:
                return  # given up and restored meanwhile: this close was the life before
            if finishing.done() and self._stored_as is not None:
                if self._close_final:  # the app's (a job's shutdown) aclose came meanwhile
                    self._state = "closed"
                    return
                self._state, self._closing, self._closed_on_error = self._stored_as, None, False
                return
        # a suspend or an end still under way, or an end asked for and not stored,
        # decides what it becomes
        given_up = self._finishing is not None or self._end_unsaved
        await self._aclose(None if given_up else "suspended")
        if self._close_final or given_up or self._holder.lease is not None:
            return  # closed for good: the app's (a job's shutdown) aclose came meanwhile
        if self._capture.stored_state == "ended":
            # an end asked during this close stored it ended: said and told as an end's
            self._state, self._closing, self._closed_on_error = "ended", None, False
            self._announcer.show("ended", self._version)
            await self._announcer.announce("ended", self._version)
            await self._shown()
            return
        self._state, self._closing, self._closed_on_error = "suspended", None, False
        self._show()  # the room the job stays in shows it given up

    async def _unrestore(self) -> None:
        """Undo a restore after a suspend whose session then failed to start (job.py's
        restore in place): nothing runs, so the key goes back to the store as the suspend
        left it, no lease held, and a later `restore` may try again."""
        await self._detach_and_release(then="suspended")
        self._state = "suspended"
        self._show()
        await self._shown()

    # ----------------------------------------------------------- internals

    def _require(self) -> AgentSession[Any]:
        if self._session is not None and self._state not in ("active", "paused"):
            # a restore in place holds the new lease before it has read the conversation
            # (the history emptied for it): a save then would store the emptied session
            # over the conversation, and the restore read that back
            raise RuntimeError(f"session {self._key!r} is {self._state}")
        if self._session is None or self._holder.lease is None:
            if self._stored_as is not None and self._state in ("active", "paused"):
                raise RuntimeError(f"session {self._key!r} is being given up {self._stored_as}")
            raise RuntimeError(
                f"session {self._key!r} is not attached: call restore() first"
                if self._state in ("active", "paused")
                else f"session {self._key!r} is {self._state}"
            )
        return self._session

    def _attach(self, session: AgentSession[Any]) -> None:
        def on_close(ev: CloseEvent) -> None:
            # a suspend or an end whose final save is stored gives the session up and
            # closes it itself: LiveKit's close meanwhile (an error) leaves it as it is
            live = self._state in ("active", "paused") and self._stored_as is None
            if live and self._closing is None:
                self._closed_on_error = ev.reason == CloseReason.ERROR
                close = self._aclose_on_error() if self._closed_on_error else self._aclose()
                self._closing = asyncio.ensure_future(close)

        def on_handoff(agent: Agent | None) -> None:
            if self._state == "paused":  # an agent handed to while paused says nothing
                self._silencer.follow(session, agent)
                if self._pause_unsaved:  # the start of a session paused before it
                    self._pause_unsaved = False
                    self._state_save.run(self._save("pause"), "save of a pause before start")

        self._listeners = listen(
            session, self._capture, self._registry, self._autosave.trigger, on_close, on_handoff
        )
        session.on("speech_created", self._silencer.heard)
        self._listeners.append(("speech_created", self._silencer.heard))

    def _busy(self) -> str | None:
        """What a suspend, an end or a close under way makes of the session, if one is:
        its state then is the one it had before (``paused``, ``active``)."""
        if self._closing is not None and not self._closing.done():
            return "closing"  # once closed, its state says so
        if self._finishing is not None:
            return f"being {self._finishing_as}"
        if self._pausing is not None:
            return "being paused"
        return None

    def _paused_again(self) -> None:
        self._pauses += 1

    def _error_close_waits(self) -> bool:
        """LiveKit's error close is under way and no `aclose` came: it waits for a
        suspend or an end under way and leaves the session as that stores it
        (`_aclose_on_error`)."""
        return self._closed_on_error and not self._close_final

    def _started(self) -> bool:
        """Whether the attached `AgentSession` runs. Not ``current_agent``: a session
        closed by a suspend keeps its last agent, so a restore in place into it would
        pass for started before its ``start()``."""
        return self._session is not None and _running(self._session)

    def _held_epoch(self) -> int | None:
        held = self._holder.lease is not None and self._autosave.lost is None
        return self._holder.epoch if held else None

    async def _detach_and_release(
        self, *, release_within: float | None = None, then: str = "closed"
    ) -> None:
        """Stop autosave and the listeners, give the lease up (``then``: what the session
        is once given up, for a command that waited its turn)."""
        self._long_pause.cancel()
        await self._autosave.aclose()
        if self._session is not None:
            for event, fn in self._listeners:
                self._session.off(event, fn)
        self._listeners.clear()
        if self._autosave.lost is None:
            if self._holder.lease is not None:
                self._control.released(self._holder.lease.epoch, then)
            await self._holder.release(within=release_within)
        else:
            self._holder.drop()  # another worker holds it now
        await self._control.stop()  # after the release: a command since then finds no lease

    def _show(self) -> None:
        """Have the room show the session's state now, without waiting (`Announcer.show`)."""
        state = self._state if self._state != "closed" else "suspended"
        self._announcer.show(state, self._version)

    async def _shown(self) -> None:
        """Wait until the room shows the latest state (or gave up: LiveKit's FFI waits at
        most its request timeout)."""
        await self._announcer.shown()


def _running(session: AgentSession[Any]) -> bool:
    """Whether ``session`` was started and is not closed: LiveKit 1.8.9 keeps ``_started``
    True from the end of ``start()`` until the session is closed."""
    return bool(getattr(session, "_started", False))


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Tasks made inside belong to no trace: the autosave and command loops live as long
    as the session, and made in the restore's span, every checkpoint of the call was its
    child, a trace that grew for hours under a span that took milliseconds."""
    token = otel_context.attach(otel_context.Context())
    try:
        yield
    finally:
        otel_context.detach(token)


def _tracing() -> bool:
    """Whether a tracer provider is set (in code or by ``OTEL_PYTHON_TRACER_PROVIDER``):
    without one a span goes nowhere, yet its no-op context manager still costs a few
    microseconds on every checkpoint. Asked each time: a provider may be set later."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _saved_state(state: SessionState) -> SavedState:
    return "active" if state == "closed" else state


async def _off_the_loop_if_long(stored: Stored, fn: Callable[[], _T]) -> _T:
    """``fn()``, on a worker thread when ``stored`` holds over `OFFLOAD_ITEMS` items: the
    worker's other sessions share the loop, and a long history's decode on a thread
    holds their audio at most a GIL switch interval at a time."""
    if sum(map(len, stored.streams.values())) > OFFLOAD_ITEMS:
        return await asyncio.to_thread(fn)
    return fn()
