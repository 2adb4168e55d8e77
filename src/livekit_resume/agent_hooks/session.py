"""`ResumableSession`: the hooks bound to one session key.

Only this module touches `AgentSession`. It reads the live session into a `Snapshot`
(history, current agent, userdata, tool calls in flight, metadata), diffs it against
what the store holds, and commits the difference; `restore` runs the path backwards
through LiveKit's public API (see DESIGN.md, "LiveKit 1.8.9").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from livekit import rtc
from livekit.agents import Agent, AgentSession, AgentTask, get_job_context, llm
from livekit.agents.llm.chat_context import Instructions
from livekit.agents.voice.events import (
    CloseEvent,
    ConversationItemAddedEvent,
    EventTypes,
    FunctionToolsExecutedEvent,
    ToolCallEnded,
    ToolCallStarted,
    ToolExecutionUpdatedEvent,
)
from opentelemetry import trace
from prometheus_client import Counter
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from ..errors import (
    IncompatibleSnapshot,
    LeaseLost,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    SnapshotTooLarge,
    StoreUnavailable,
    UnknownAgent,
    UnsavableValue,
)
from ..snapshot.chat import MediaPolicy, ctx_from_data, item_to_data, repair_tool_calls
from ..snapshot.codec import AGENT, HISTORY, Codec
from ..snapshot.model import (
    AgentFrame,
    ItemData,
    Reason,
    SessionMeta,
    Snapshot,
    ToolCallRecord,
    Writer,
)
from ..snapshot.salvage import salvage_parts
from ..snapshot.values import dump_userdata, plain_extra
from ..stores.base import (
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    Record,
    Store,
    Stored,
    validate_key,
)
from .autosave import Autosave
from .registry import AgentRegistry
from .tracker import Change, StreamTracker, digest

__all__ = ["ResumableSession", "SessionState"]

log = logging.getLogger("livekit_resume")
tracer = trace.get_tracer("livekit_resume")

SessionState = Literal["active", "paused", "suspended", "closed"]

# Participant attributes the room's clients can read; `lk.` belongs to LiveKit.
ATTR_STATE = "resume.state"
ATTR_VERSION = "resume.version"
# A burst of events (user message, tool calls, reply) lands within this; one write.
DEFAULT_DEBOUNCE = 0.2
# Cutting speech takes a few audio frames; a stuck output must not hang pause or suspend.
INTERRUPT_TIMEOUT = 3.0
# aclose() retries its final save through a store blip for this long: well inside the
# ~10 s LiveKit leaves shutdown callbacks, long enough for a Redis failover to finish.
CLOSE_SAVE_BUDGET = 5.0
CLOSE_RETRY_FIRST = 0.1

SALVAGED = Counter(
    "livekit_resume_sessions_salvaged", "Damaged snapshots restored with what was intact"
)
REACQUIRED = Counter(
    "livekit_resume_sessions_reacquired",
    "Sessions that vanished from the store under their holder and were written anew",
)
OVERSIZE = Counter(
    "livekit_resume_items_shrunk", "Chat items saved without media or text: over the frame limit"
)
UNSAVABLE = Counter(
    "livekit_resume_unsavable_userdata",
    "Checkpoints that kept older userdata: a value could not be saved",
)
FINAL_SAVE_FAILURES = Counter(
    "livekit_resume_final_save_failures", "Final saves on close that did not reach the store"
)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A commit sent but not (yet) known to be stored, and what to adopt once it is."""

    commit: Commit
    history: Change
    agent: Change
    agent_obj: Agent | None
    turns: int
    fingerprint: bytes


async def _silent_llm_node(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for an agent's llm_node while paused: no reply is generated."""
    return None


class ResumableSession:
    """Hooks that snapshot one `AgentSession` under ``key`` and restore it anywhere.

    ``userdata_type`` validates and encodes ``session.userdata`` (a pydantic
    ``TypeAdapter``); without it userdata is not saved. ``owner`` names this worker in
    leases (default: host, pid and a random suffix). Keys for signing and encryption
    default to ``RESUME_SIGNING_KEYS`` and ``RESUME_ENCRYPTION_KEYS``; ``codec`` replaces
    them with a `Codec` of your own (keys, ``max_frame``).

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
    ) -> None:
        if codec is not None and (signing_keys or encryption_keys):
            raise ValueError("pass the keys to the Codec, or keys without a codec, not both")
        self._store = store
        self._key = validate_key(key)
        self._registry = registry
        self._userdata = TypeAdapter(userdata_type) if userdata_type is not None else None
        self._userdata_type = userdata_type
        self._autosave_enabled = autosave
        self._owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._lease_ttl = lease_ttl
        self._media: MediaPolicy = media
        self._codec = codec or Codec(
            signing_keys=signing_keys or os.environ.get("RESUME_SIGNING_KEYS") or None,
            encryption_keys=encryption_keys or os.environ.get("RESUME_ENCRYPTION_KEYS") or None,
        )
        self._room = room
        self._extra = plain_extra(extra or {})  # an unsavable value is refused right here
        self._saved_userdata: Any = None  # the last userdata that could be saved

        self._session: AgentSession[Any] | None = None
        self._lease: Lease | None = None
        self._version = 0
        self._state: SessionState = "active"
        self._resumed = False
        self._lock = asyncio.Lock()
        self._history = StreamTracker(HISTORY)
        self._agent_ctx = StreamTracker(AGENT)
        self._tracked_agent: Agent | None = None
        self._last_agent: Agent | None = None
        self._turns = 0
        self._running: dict[str, ToolCallRecord] = {}
        self._paused_agent: Agent | None = None
        self._autosave = Autosave(
            self.checkpoint,
            self._renew,
            key=self._key,
            debounce=debounce,
            renew_every=lease_ttl / 3,
        )
        self._listeners: list[tuple[EventTypes, Callable[..., None]]] = []
        self._closing: asyncio.Future[None] | None = None
        self._fingerprint = b""
        self._pending: _Pending | None = None
        self._vanished = False
        self._rewrite = False  # the next commit clears every stream and writes it whole

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
        """``"active"``, ``"paused"``, ``"suspended"`` or ``"closed"``."""
        return self._state

    @property
    def resumed(self) -> bool:
        """True when `restore` found a snapshot. LiveKit runs ``on_enter`` on every start,
        so an agent checks this to skip its greeting after a restore."""
        return self._resumed

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
        Raises `SessionBusy` when another live worker holds the session (unless
        ``takeover``), `UnknownAgent` for an unregistered agent id, `IncompatibleSnapshot`
        when saved userdata no longer validates, `SnapshotCorrupt` when stored bytes are
        damaged; the lease is released on failure. With ``salvage`` a damaged snapshot
        is restored with what is intact: each lost item is logged, a system note in the
        context says what is missing, and the first checkpoint writes the whole session
        anew so later versions no longer depend on the damaged record.
        """
        if self._session is not None:
            raise RuntimeError(f"session {self._key!r} was already restored")
        with tracer.start_as_current_span(
            "livekit_resume.restore", attributes={"livekit_resume.key": self._key}
        ) as span:
            agent = await self._restore(session, default, takeover, salvage)
            span.set_attribute("livekit_resume.version", self._version)
            span.set_attribute("livekit_resume.resumed", self._resumed)
        return agent

    async def _restore(
        self,
        session: AgentSession[Any],
        default: Callable[[], Agent],
        takeover: bool,
        salvage: bool,
    ) -> Agent:
        self._lease = await self._store.acquire(
            self._key, self._owner, ttl=self._lease_ttl, takeover=takeover
        )
        try:
            try:
                stored = await self._store.load(self._key)
            except SnapshotNotFound:
                agent = default()
            else:
                try:
                    snap = self._codec.decode_parts(
                        self._key, stored.head, stored.streams, version=stored.version
                    )
                except SnapshotCorrupt:
                    if not salvage:
                        raise
                    snap = await self._salvage(stored)
                agent = await self._rebuild(session, snap, default)
                self._version, self._resumed = stored.version, True
        except BaseException:
            with contextlib.suppress(Exception):
                await self._store.release(self._lease)
            self._lease = None
            raise
        self._session = session
        self._state = "active"
        self._last_agent = agent  # the parent to save should an AgentTask run before a save
        self._attach(session)
        if self._autosave_enabled:
            self._autosave.start()
        await self._publish_attributes()
        await self._announce("restored" if self._resumed else "started")
        log.info(
            "session %r %s at version %d",
            self._key,
            "restored" if self._resumed else "started fresh",
            self._version,
            extra={"key": self._key, "version": self._version},
        )
        return agent

    async def _salvage(self, stored: Stored) -> Snapshot:
        """What is intact of a damaged version; older versions lend their head if its
        own does not decode. Marks the session for a whole rewrite."""
        async def older_heads() -> list[tuple[int, bytes]]:
            heads = []
            for info in reversed(await self._store.versions(self._key)):
                if info.version >= stored.version:
                    continue
                try:
                    old = await self._store.load(self._key, info.version)
                except SnapshotCorrupt:
                    continue
                heads.append((info.version, old.head))
            return heads

        args = (self._codec, self._key, stored.head, stored.streams)
        try:
            snap, damage = salvage_parts(*args, version=stored.version)
        except SnapshotCorrupt:
            snap, damage = salvage_parts(
                *args, version=stored.version, fallback_heads=await older_heads()
            )
        SALVAGED.inc()
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
        self._rewrite = True
        return snap

    async def _rebuild(
        self, session: AgentSession[Any], snap: Snapshot, default: Callable[[], Agent]
    ) -> Agent:
        # Everything that can fail runs before the session is touched: a refused restore
        # leaves both the store and the caller's AgentSession as they were.
        history = ctx_from_data(snap.history).items
        userdata: Any = None
        if self._userdata is not None and snap.userdata is not None:
            try:
                userdata = self._userdata.validate_python(snap.userdata)
            except ValidationError as e:
                raise IncompatibleSnapshot(
                    f"session {self._key!r} version {snap.version}: saved userdata no longer "
                    f"validates against {self._userdata_type!r}: {e}"
                ) from None
        frame = snap.agent
        agent = default() if frame is None else self._registry.build(frame.agent_id, frame.state)
        saved = ctx_from_data(frame.chat_ctx) if frame is not None else None

        if session.history.items:
            session.history.insert(history)
        else:
            # kept in saved order, which is exact even where created_at is not sorted
            session.history.items.extend(history)
        self._history.baseline(history, snap.history)
        self._turns = snap.meta.turn_count
        self._saved_userdata = snap.userdata
        if userdata is not None:
            session.userdata = userdata
        if frame is None or saved is None:
            return agent
        if frame.instructions is not None:
            await agent.update_instructions(_instructions_from(frame.instructions))  # type: ignore[arg-type]  # LiveKit accepts Instructions too
        self._agent_ctx.baseline(saved.items, frame.chat_ctx)
        repaired = saved.copy()
        repair_tool_calls(repaired, pending=snap.tool_calls)
        await agent.update_chat_ctx(repaired, exclude_invalid_function_calls=False)
        self._tracked_agent = self._last_agent = agent
        if frame.task:
            log.warning(
                "session %r was inside task %s when saved; restored %s without it",
                self._key,
                frame.task,
                frame.agent_id,
                extra={"key": self._key},
            )
        return agent

    # ------------------------------------------------------------ checkpoint

    async def checkpoint(self, reason: Reason | str = "manual") -> int:
        """Commit a snapshot of the live session now; return its version.

        Raises `LeaseLost` when another worker took the session over (nothing is
        written), `StoreUnavailable` when the store cannot be reached (the attempt is
        sent again, unchanged, before the next one: it is stored at most once).
        """
        version = await self._save(reason)
        await self._publish_attributes()
        return version

    async def _save(self, reason: str, state: SessionState | None = None) -> int:
        with tracer.start_as_current_span(
            "livekit_resume.checkpoint",
            attributes={"livekit_resume.key": self._key, "livekit_resume.reason": reason},
        ) as span:
            version = await self._checkpoint(reason, state)
            span.set_attribute("livekit_resume.version", version)
        return version

    async def _checkpoint(self, reason: str, state: SessionState | None = None) -> int:
        async with self._lock:
            if self._autosave.lost is not None:
                raise self._autosave.lost
            _, session = self._require()
            if self._current_agent(session) is None:
                # never started (the job ended first): the store already holds everything
                # this session knows, and a head without its agent would not restore
                return self._version
            if self._vanished:
                await self._reacquire()
            try:
                if self._pending is not None:
                    await self._land(self._pending)
                return await self._commit_now(session, reason, state)
            except LeaseLost as e:
                if not e.vanished:
                    raise
                self._vanished = True
                await self._reacquire()
                return await self._commit_now(session, reason, state)

    async def _commit_now(
        self, session: AgentSession[Any], reason: str, state: SessionState | None
    ) -> int:
        lease = self._lease
        assert lease is not None
        snap, hist, agent, agent_obj = self._capture(session, reason, state)
        # the time and the trigger alone are no news: an unchanged session is not
        # committed again (the retained versions stay useful rollback points)
        fingerprint = digest(snap.model_dump(mode="json", exclude={"created_at", "reason"}))
        if not hist.records and not agent.records and fingerprint == self._fingerprint:
            return self._version
        commit = Commit(
            key=self._key,
            epoch=lease.epoch,
            base_version=self._version,
            head=self._codec.encode_head(
                snap, counts={HISTORY: len(hist.objs), AGENT: len(agent.objs)}
            ),
            records=[*hist.records, *agent.records],
            size=len(hist.objs) + len(agent.objs),
            info={
                "state": snap.state,
                "reason": snap.reason,
                "agent": snap.agent.agent_id if snap.agent else None,
                "items": len(hist.objs),
                "owner": self._owner,
            },
            commit_id=uuid.uuid4().hex,
        )
        pending = _Pending(commit, hist, agent, agent_obj, snap.meta.turn_count, fingerprint)
        try:
            await self._land(pending)
        except StoreUnavailable:
            # The outcome is unknown: the store may have applied it. The next attempt
            # sends this very commit again (same id) before anything newer, so it lands
            # exactly once and the versions stay in step with the store.
            self._pending = pending
            raise
        return self._version

    async def _land(self, pending: _Pending) -> None:
        """Commit ``pending`` and adopt it as what the store holds."""
        self._version = await self._store.commit(pending.commit)
        self._pending = None
        self._history.accept(pending.history)
        self._agent_ctx.accept(pending.agent)
        self._turns = pending.turns
        self._tracked_agent = pending.agent_obj
        self._fingerprint = pending.fingerprint
        self._rewrite = False

    async def _reacquire(self) -> None:
        """The store lost the session while we held it (restarted without its data,
        deleted, expired): take it again under a new epoch and write it whole. Someone
        who got there first keeps it, and this writer is fenced."""
        REACQUIRED.inc()
        log.warning(
            "session %r vanished from the store while held (version %d); acquired again "
            "to write the whole conversation anew",
            self._key,
            self._version,
            extra={"key": self._key, "version": self._version},
        )
        try:
            lease = await self._store.acquire(self._key, self._owner, ttl=self._lease_ttl)
        except SessionBusy as e:
            raise LeaseLost(
                f"session {self._key!r} vanished from the store and {e.holder!r} acquired it "
                "before this worker could: this one must stop writing",
                current_epoch=None,
            ) from e
        self._lease = lease
        self._vanished = False
        self._pending = None
        self._version = 0
        self._rewrite = True

    def _capture(
        self, session: AgentSession[Any], reason: str, state: SessionState | None = None
    ) -> tuple[Snapshot, Change, Change, Agent | None]:
        # No await in here: history, agent and tool state are read as one moment.
        convert = self._convert
        rewrite = self._rewrite
        items = session.history.items
        hist_encoder = self._encoder(HISTORY, None)
        hist = (
            self._history.full(items, convert, hist_encoder)
            if rewrite
            else self._history.diff(items, convert, hist_encoder)
        )
        turns = self._turns + sum(
            1
            for d in hist.datas.values()
            if d.get("type") == "message"
            and d.get("role") == "user"
            and not self._history.has(d["id"])  # counted once, when it first reaches the store
        )
        agent_obj = self._current_agent(session)
        frame: AgentFrame | None = None
        agent_change = Change([], [], {})
        if agent_obj is not None:
            agent_id = self._registry.id_of(agent_obj)
            task: str | None = None
            if agent_id is None and isinstance(agent_obj, AgentTask) and self._last_agent:
                task = type(agent_obj).__qualname__
                agent_obj = self._last_agent  # a task is live code, not data: save its parent
                agent_id = self._registry.id_of(agent_obj)
            if agent_id is None:
                raise UnknownAgent(type(agent_obj).__qualname__, self._registry.ids, saving=True)
            agent_items = agent_obj.chat_ctx.items
            agent_encoder = self._encoder(AGENT, hist)
            if rewrite:
                agent_change = self._agent_ctx.full(agent_items, convert, agent_encoder)
            else:
                if agent_obj is not self._tracked_agent:
                    self._agent_ctx.reset()  # a handoff: its context replaces the old one
                # an agent item stored as a reference to a history item that is now gone
                # from the history must be stored whole, or it would dangle
                gone = frozenset(r.id for r in hist.records if r.data is None and r.id)
                agent_change = self._agent_ctx.diff(
                    agent_items, convert, agent_encoder, rewrite=gone
                )
                if agent_obj is not self._tracked_agent:
                    agent_change.records.insert(0, Record(AGENT, "", None))
            self._last_agent = agent_obj
            frame = AgentFrame(
                agent_id=agent_id,
                instructions=_instructions_to(agent_obj.instructions),
                state=_agent_state(agent_obj),
                task=task,
            )
        snap = Snapshot(
            key=self._key,
            epoch=self._lease.epoch if self._lease else 0,
            reason=reason if reason in _REASONS else "manual",  # type: ignore[arg-type]
            state=_saved_state(state or self._state),
            writer=self._writer(),
            meta=self._meta(session, turns),
            agent=frame,
            userdata=self._dump_userdata(session),
            tool_calls=list(self._running.values()),
        )
        return snap, hist, agent_change, agent_obj

    def _convert(self, item: llm.ChatItem) -> ItemData:
        return item_to_data(item, media=self._media)

    def _encoder(self, stream: str, history: Change | None) -> Any:
        codec, key = self._codec, self._key

        def encode(item: llm.ChatItem, data: ItemData, d: bytes) -> bytes:
            # an agent item equal to its history twin is stored once, as a reference
            ref = history is not None and history.digests.get(item.id) == d
            try:
                return codec.encode_item(key, stream, data, ref=ref)
            except SnapshotTooLarge as e:
                # decided now, at write time: nothing is stored that a restore would refuse
                for smaller, what in self._smaller(item):
                    try:
                        frame = codec.encode_item(key, stream, smaller)
                    except SnapshotTooLarge:
                        continue
                    OVERSIZE.inc()
                    log.warning(
                        "session %r: %s item %r is too large to save whole (%s); saved %s",
                        self._key,
                        stream,
                        item.id,
                        e,
                        what,
                        extra={"key": self._key},
                    )
                    return frame
                raise

        return encode

    def _smaller(self, item: llm.ChatItem) -> Iterator[tuple[ItemData, str]]:
        """Stand-ins for an item over the frame limit, from the least lossy."""
        data = item_to_data(item, media="drop")
        if self._media == "keep":
            yield data, "with its media dropped"
        if data.get("type") == "message":
            yield {**data, "content": [_OVERSIZE_NOTE]}, "with its text replaced by a note"
        elif data.get("type") == "function_call_output":
            yield {**data, "output": _OVERSIZE_NOTE}, "with its output replaced by a note"

    # ----------------------------------------------------- pause and suspend

    async def pause(self) -> int:
        """Soft pause: audio in and out off, speech cut, no replies; state saved.
        The session stays alive in memory and `resume` is instant."""
        _, session = self._require()
        if self._state != "active":
            raise RuntimeError(f"cannot pause session {self._key!r} in state {self._state!r}")
        await self._silence(session)
        self._state = "paused"
        version = await self.checkpoint("pause")
        await self._announce("paused")
        return version

    async def resume(self) -> None:
        """Undo `pause`: audio back on and replies allowed, in the same process."""
        _, session = self._require()
        if self._state != "paused":
            raise RuntimeError(f"cannot resume session {self._key!r} in state {self._state!r}")
        self._unsilence(session)
        self._state = "active"
        self._autosave.trigger("manual")  # persist the state change without waiting
        await self._publish_attributes()
        await self._announce("resumed")

    async def suspend(self) -> int:
        """Hard suspend: silence, final snapshot, lease released, session closed.
        A later `restore` under the same key, in any process, continues from here.

        If the final snapshot cannot be stored the error is raised and nothing is given
        up: the session stays ``paused`` (silenced) with its lease and autosave, so
        `suspend` can be called again, `resume` undoes the silence, and `aclose`
        still makes the final save.
        """
        _, session = self._require()
        if self._state in ("suspended", "closed"):
            raise RuntimeError(f"session {self._key!r} is already {self._state}")
        if self._state == "active":
            await self._silence(session)
            self._state = "paused"
            await self._publish_attributes()
        # the final snapshot comes before closing: closing a voice session can take seconds
        version = await self._save("suspend", "suspended")
        self._state = "suspended"
        await self._publish_attributes()
        await self._detach_and_release()
        await self._announce("suspended")
        try:
            await session.aclose()
        except Exception as e:
            log.warning("session %r: closing the AgentSession failed: %s", self._key, e)
        return version

    async def aclose(self) -> None:
        """Final save (unless suspended or the lease is lost) and release the lease.
        Does not close the `AgentSession`. Safe to call twice, or from several places
        (a shutdown callback and the session's own close) at once. A store that cannot
        be reached is retried for up to `CLOSE_SAVE_BUDGET` seconds; after that the
        last stored version stands and the failure is logged and counted."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._aclose())
        await asyncio.shield(self._closing)

    async def _aclose(self) -> None:
        if self._session is not None and self._lease is not None and self._state != "suspended":
            await self._final_save()
        await self._detach_and_release()
        self._state = "closed"

    async def _final_save(self) -> None:
        deadline = time.monotonic() + CLOSE_SAVE_BUDGET
        delay = CLOSE_RETRY_FIRST
        while True:
            try:
                await self.checkpoint("close")
                return
            except LeaseLost:
                log.warning("session %r: final save refused, lease lost", self._key)
                return
            except StoreUnavailable as e:
                if time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                error: Exception = e
            except Exception as e:
                error = e
            FINAL_SAVE_FAILURES.inc()
            # the session is going away: the last stored version is what a restore gets
            log.error(
                "session %r: final save failed: %s; version %d stands",
                self._key,
                error,
                self._version,
                extra={"key": self._key, "version": self._version},
            )
            return

    async def _silence(self, session: AgentSession[Any]) -> None:
        session.input.set_audio_enabled(False)
        agent = self._current_agent(session)
        if agent is not None:
            # an instance attribute shadows the class's node: text and voice alike get no reply
            agent.llm_node = _silent_llm_node  # type: ignore[method-assign]
            self._paused_agent = agent
        # Cut the reply before turning output off: detaching the output first would leave
        # the reply recorded as fully spoken. Wait until LiveKit has recorded what was
        # heard (interrupted=True, the partial text) in the history.
        try:
            done: asyncio.Future[None] | None = session.interrupt(force=True)
        except RuntimeError:
            done = None  # not started: nothing is speaking
        if done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(done), INTERRUPT_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning(
                    "session %r: speech did not stop within %.0fs of pause",
                    self._key,
                    INTERRUPT_TIMEOUT,
                )
        session.output.set_audio_enabled(False)

    def _unsilence(self, session: AgentSession[Any]) -> None:
        if self._paused_agent is not None:
            self._paused_agent.__dict__.pop("llm_node", None)
            self._paused_agent = None
        session.input.set_audio_enabled(True)
        session.output.set_audio_enabled(True)

    # ----------------------------------------------------------- internals

    def _require(self) -> tuple[Lease, AgentSession[Any]]:
        if self._session is None or self._lease is None:
            raise RuntimeError(
                f"session {self._key!r} is not attached: call restore() first"
                if self._state != "closed" and self._state != "suspended"
                else f"session {self._key!r} is {self._state}"
            )
        return self._lease, self._session

    @staticmethod
    def _current_agent(session: AgentSession[Any]) -> Agent | None:
        try:
            return session.current_agent
        except RuntimeError:
            return None  # not started yet

    async def _renew(self) -> None:
        if self._lease is None or self._vanished:
            return
        try:
            self._lease = await self._store.renew(self._lease, ttl=self._lease_ttl)
        except LeaseLost as e:
            if not e.vanished:
                raise
            # nobody took it: the next checkpoint acquires it again and writes it whole
            self._vanished = True
            self._autosave.trigger("manual")

    def _attach(self, session: AgentSession[Any]) -> None:
        def on_item(ev: ConversationItemAddedEvent) -> None:
            if ev.item.type == "agent_handoff":
                agent = self._current_agent(session)
                if agent is not None and self._registry.id_of(agent) is not None:
                    self._last_agent = agent
                self._autosave.trigger("handoff")
            else:
                self._autosave.trigger("turn")

        def on_tools(_: FunctionToolsExecutedEvent) -> None:
            self._autosave.trigger("tool")

        def on_tool_update(ev: ToolExecutionUpdatedEvent) -> None:
            up = ev.update
            if isinstance(up, ToolCallStarted):
                fc = up.function_call
                self._running[fc.call_id] = ToolCallRecord(
                    call_id=fc.call_id,
                    name=fc.name,
                    arguments=fc.arguments,
                    started_at=fc.created_at,
                    item_id=fc.id,
                    status="running",
                )
                self._autosave.trigger("tool")  # a crash mid-tool must leave a trace
            elif isinstance(up, ToolCallEnded):
                self._running.pop(up.call_id, None)

        def on_close(_: CloseEvent) -> None:
            if self._state in ("active", "paused") and self._closing is None:
                self._closing = asyncio.ensure_future(self._aclose())

        handlers: list[tuple[EventTypes, Callable[..., None]]] = [
            ("conversation_item_added", on_item),
            ("function_tools_executed", on_tools),
            ("tool_execution_updated", on_tool_update),
            ("close", on_close),
        ]
        for event, fn in handlers:
            session.on(event, fn)
            self._listeners.append((event, fn))

    async def _detach_and_release(self) -> None:
        await self._autosave.aclose()
        if self._session is not None:
            for event, fn in self._listeners:
                with contextlib.suppress(Exception):
                    self._session.off(event, fn)
        self._listeners.clear()
        if self._lease is not None and self._autosave.lost is None:
            try:
                await self._store.release(self._lease)
            except Exception as e:
                log.warning("session %r: lease release failed (%s); it will expire", self._key, e)
        self._lease = None

    def _writer(self) -> Writer:
        ctx = get_job_context(required=False)
        return Writer(
            worker_id=getattr(ctx, "worker_id", None) if ctx else None,
            job_id=ctx.job.id if ctx else None,
        )

    def _room_now(self) -> rtc.Room | None:
        """The room given to us, else the running job's (None outside a job)."""
        if self._room is not None:
            return self._room
        ctx = get_job_context(required=False)
        return ctx.room if ctx else None

    def _meta(self, session: AgentSession[Any], turns: int) -> SessionMeta:
        ctx = get_job_context(required=False)
        room = self._room_now()
        identity = None
        if room is not None:
            identity = next(iter(room.remote_participants), None)
        agent = self._current_agent(session)
        try:
            usage = to_jsonable_python(session.usage, fallback=str)
        except Exception:
            usage = {}
        return SessionMeta(
            room=room.name if room is not None else None,
            participant_identity=identity,
            job_id=ctx.job.id if ctx else None,
            agent_name=agent.id if agent is not None else None,
            turn_count=turns,
            usage=usage if isinstance(usage, dict) else {"value": usage},
            extra=self._extra,
        )

    def _dump_userdata(self, session: AgentSession[Any]) -> Any:
        if self._userdata is None:
            return None
        try:
            value = session.userdata
        except ValueError:
            return None  # LiveKit raises when userdata was never set
        try:
            self._saved_userdata = dump_userdata(self._userdata, value)
        except UnsavableValue as e:
            # the rest of the session keeps saving; this one value waits until it is fixed
            UNSAVABLE.inc()
            log.warning(
                "session %r: userdata not saved this time, the last savable userdata is "
                "kept: %s",
                self._key,
                e,
                extra={"key": self._key, "path": e.path},
            )
        return self._saved_userdata

    async def _publish_attributes(self) -> None:
        room = self._room_now()
        if room is None or not room.isconnected():
            return
        try:
            await room.local_participant.set_attributes(
                {
                    ATTR_STATE: self._state if self._state != "closed" else "suspended",
                    ATTR_VERSION: str(self._version),
                }
            )
        except Exception as e:
            log.warning("could not publish resume state to the room: %s", e)

    async def _announce(self, event: str) -> None:
        """Tell other workers (the store's event channel, where it has one)."""
        publish = getattr(self._store, "publish", None)
        if publish is not None:
            try:
                await publish(self._key, event, version=self._version, owner=self._owner)
            except Exception as e:
                log.warning("could not publish %s event of session %r: %s", event, self._key, e)


_OVERSIZE_NOTE = "[omitted when saved: this item was over the snapshot size limit]"

_REASONS = {"turn", "tool", "handoff", "pause", "suspend", "close", "manual"}


def _saved_state(state: SessionState) -> Literal["active", "paused", "suspended"]:
    return "active" if state == "closed" else state


def _instructions_to(value: str | Instructions) -> str | dict[str, str | None]:
    if isinstance(value, str):
        return value
    return {
        "common": value.common,
        "audio": value.audio,
        "text": value.text,
        "dynamic": value.dynamic,
    }


def _instructions_from(value: str | dict[str, str | None]) -> str | Instructions:
    if isinstance(value, str):
        return value
    return Instructions(
        value.get("common") or "",
        audio=value.get("audio"),
        text=value.get("text"),
        dynamic=value.get("dynamic"),
    )


def _agent_state(agent: Agent) -> dict[str, Any] | None:
    fn = getattr(agent, "snapshot_state", None)
    if fn is None:
        return None
    state = fn()
    if not isinstance(state, dict):
        raise TypeError(f"{type(agent).__qualname__}.snapshot_state() must return a dict")
    return state
