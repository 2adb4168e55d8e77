"""`Capture`: a live `AgentSession` read into a snapshot and the commit that stores it.

Events are not a log (LiveKit inserts function calls and config updates silently and
edits recent items in place), so a capture reads the session itself: the history and
the current agent's context are diffed against what was last committed (`tracker`),
tool calls in flight come from the ``tool_execution_updated`` events, userdata goes
through its `TypeAdapter`. Everything is read in one synchronous step, so history,
agent and tool state are one moment; what was read is then hashed and encoded, on a
worker thread when it holds more than `OFFLOAD_BYTES` (a large tool output must not
hold the event loop). The store learns of the result only through
`bridge.delta_commit`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from livekit.agents import Agent, AgentSession, AgentTask, llm
from livekit.agents.llm.chat_context import Instructions
from prometheus_client import Counter
from pydantic import TypeAdapter

from ..bridge import dangling_refs, delta_commit, is_twin
from ..errors import SnapshotTooLarge, UnknownAgent, UnsavableValue
from ..snapshot.chat import MediaPolicy, item_to_data, without_media
from ..snapshot.codec import AGENT, HISTORY, Codec
from ..snapshot.model import AgentFrame, ItemData, SessionMeta, Snapshot, ToolCallRecord, Writer
from ..snapshot.seal import Sealed
from ..snapshot.values import dump_userdata, plain_extra
from ..stores.base import Commit
from .realtime import capture_options
from .registry import AgentRegistry
from .silence import current_agent
from .tracker import (
    Change,
    Converter,
    Encoder,
    Index,
    Plan,
    StaleChange,
    StreamTracker,
    digest,
)

__all__ = ["Capture", "Pending", "SavedState", "instructions_from", "task_parent"]

log = logging.getLogger("livekit_resume")

SavedState = Literal["active", "paused", "suspended", "ended"]

OVERSIZE = Counter(
    "livekit_resume_items_shrunk", "Chat items saved without media or text: over the frame limit"
)
UNSAVABLE = Counter(
    "livekit_resume_unsavable_userdata",
    "Checkpoints that kept older userdata: a value could not be saved",
)

_OVERSIZE_NOTE = "[omitted when saved: this item was over the snapshot size limit]"
_OVERSIZE_ARGUMENTS = json.dumps({"omitted": _OVERSIZE_NOTE})
# Items holding more than this many bytes are hashed and encoded on a worker thread:
# below it the hop costs more than the work, above it the work would hold the loop.
OFFLOAD_BYTES = 64 * 1024
_REASONS = {"turn", "tool", "handoff", "pause", "suspend", "close", "manual", "end"}


# a restored snapshot's history and agent streams, indexed (`Capture.index`)
Indexes = tuple[Index, Index | None]


@dataclass(frozen=True, slots=True)
class Pending:
    """A commit sent but not (yet) known to be stored, and what to adopt once it is."""

    commit: Commit
    history: Change
    agent: Change | None
    agent_obj: Agent | None
    turns: int
    snap: Snapshot


@dataclass(frozen=True, slots=True)
class _Read:
    """A session as read in one step: what to encode, and what to adopt after."""

    snap: Snapshot
    history: Plan
    agent: Plan | None
    agent_obj: Agent | None
    turns: int
    weight: int


class Capture:
    """What one session last committed, and how to read what changed since."""

    def __init__(
        self,
        key: str,
        *,
        codec: Codec,
        registry: AgentRegistry,
        media: MediaPolicy,
        userdata_type: Any,
        owner: str,
    ) -> None:
        self._key = key
        self.codec = codec
        self._registry = registry
        self._media: MediaPolicy = media
        self.userdata_type = userdata_type
        self.userdata: TypeAdapter[Any] | None = (
            TypeAdapter(userdata_type) if userdata_type is not None else None
        )
        self._owner = owner
        self._history = StreamTracker(HISTORY, seal_key=codec.seal_key)
        self._agent_ctx = StreamTracker(AGENT, seal_key=codec.seal_key)
        self._tracked_agent: Agent | None = None
        # the last agent frame read, and what it was made of when it may be reused
        self._frame: AgentFrame | None = None
        self._frame_of: tuple[str, str | dict[str, str | None], str | None] | None = None
        self.last_agent: Agent | None = None  # the parent to save while an AgentTask runs
        self._turns = 0
        self._committed: Snapshot | None = None  # None: the next draft is always news
        # the userdata and the agent state (and whose it is) the store holds: what a
        # checkpoint keeps of a value it cannot save this time
        self._saved_userdata: Any = None
        self._saved_state: tuple[Agent, dict[str, Any]] | None = None
        self.running: dict[str, ToolCallRecord] = {}
        self.conversation = uuid.uuid4().hex  # a restore adopts the saved one
        # Commit ids (a retried commit recognises its own earlier success): a random
        # prefix per capture and a counter, unique without a uuid4 per checkpoint.
        self._commit_prefix = os.urandom(8).hex()
        self._commit_count = itertools.count(1)
        self.rewrite = False  # the next commit clears every stream and writes it whole

    # ----------------------------------------------------------------- restore

    def fresh(self) -> None:
        """A new conversation under the key (a restore found none, or one that ended): a
        new id, or the tokens of the one before would resume it (`verify_token`), and
        its turns counted from none."""
        self.conversation = uuid.uuid4().hex
        self._turns = 0
        # nothing of the one before is the store's: a worker without a userdata type,
        # or a value that cannot be saved, would write a removed call's back
        self._saved_userdata = None
        self._saved_state = None
        self._committed = None

    @property
    def stored_state(self) -> SavedState | None:
        """The state the store holds the session in, as this worker last wrote or read
        it (None before either)."""
        return None if self._committed is None else self._committed.state

    def index(self, snap: Snapshot, sealed: Mapping[str, Sealed] | None = None) -> Indexes:
        """What `baseline` keeps of a restored snapshot's streams, made beforehand: it
        reads no live object, so a restore makes it on the thread it decodes on."""
        sealed = sealed or {}
        agent = snap.agent
        return (
            self._history.index(snap.history, sealed.get(HISTORY)),
            self._agent_ctx.index(agent.chat_ctx, sealed.get(AGENT)) if agent else None,
        )

    def baseline(
        self,
        snap: Snapshot,
        history: Sequence[llm.ChatItem],
        agent: Agent,
        agent_items: Sequence[llm.ChatItem] | None,
        sealed: Mapping[str, Sealed] | None = None,
        indexes: Indexes | None = None,
    ) -> None:
        """Adopt a restored snapshot as what the store holds. ``sealed``: what the decode
        computed checking each stream's seal (`Codec.decode_parts`), reused; ``indexes``:
        `index` of the same, made already."""
        h_index, a_index = indexes or self.index(snap, sealed)
        self._history.baseline(history, snap.history, index=h_index)
        self._turns = snap.meta.turn_count
        self.conversation = snap.meta.conversation or self.conversation
        self._saved_userdata = snap.userdata
        self.last_agent = agent
        if snap.agent is not None and snap.agent.state is not None:
            self._saved_state = (agent, snap.agent.state)
        if snap.agent is not None and agent_items is not None:
            self._agent_ctx.baseline(agent_items, snap.agent.chat_ctx, index=a_index)
            self._tracked_agent = agent

    # ----------------------------------------------------------------- capture

    async def draft(
        self,
        session: AgentSession[Any],
        *,
        reason: str,
        state: SavedState,
        epoch: int,
        base_version: int,
        writer: Writer,
        meta: Callable[[int], SessionMeta],
    ) -> Pending | None:
        """The commit that stores the session as it is now, or None if nothing changed
        since the last commit (the time and the trigger alone are no news).

        The session is read in one synchronous step (one moment); the items read are
        then hashed and encoded, on a worker thread when they are large, so a big item
        never holds the event loop."""
        read = self._read(session, reason, state, epoch, writer, meta)
        if read.weight > OFFLOAD_BYTES:
            return await asyncio.to_thread(self._build, read, base_version)
        # The read and the build are each a third of a checkpoint's time on the loop:
        # run as one callback, they hold the other sessions' audio twice as long. What
        # was read stays one moment (the build touches no live item), as on a thread.
        await asyncio.sleep(0)
        return self._build(read, base_version)

    def _read(
        self,
        session: AgentSession[Any],
        reason: str,
        state: SavedState,
        epoch: int,
        writer: Writer,
        meta: Callable[[int], SessionMeta],
    ) -> _Read:
        convert, shaped = self._converter(), dict[int, Any]()
        hist = self._plan(self._history, session.history.items, convert, shaped=shaped)
        turns = self._turns + sum(
            1
            for d in hist.datas
            if d.get("type") == "message"
            and d.get("role") == "user"
            and not self._history.has(d["id"])  # counted once, when it first reaches the store
        )
        agent_obj, frame, agent = self._agent(session, hist, convert, shaped)
        snap = Snapshot(
            key=self._key,
            epoch=epoch,
            reason=reason if reason in _REASONS else "manual",  # type: ignore[arg-type]
            state=state,
            writer=writer,
            meta=meta(turns),
            agent=frame,
            userdata=self._dump_userdata(session),
            tool_calls=list(self.running.values()),
        )
        counted: set[int] = set()  # the agent's items are mostly the history's data
        size = hist.weight(counted) + (agent.weight(counted) if agent is not None else 0)
        return _Read(snap, hist, agent, agent_obj, turns, size)

    def _build(self, read: _Read, base_version: int) -> Pending | None:
        memo: dict[int, tuple[bytes, bytes]] = {}
        hist = read.history.build(self._encoder(HISTORY, None), memo)
        agent = (
            read.agent.build(self._encoder(AGENT, hist), memo) if read.agent is not None else None
        )
        snap, committed = read.snap, self._committed
        items = bool(hist.records or (agent and agent.records))
        if not items and committed is not None and _fingerprint(snap) == _fingerprint(committed):
            return None
        commit_id = f"{self._commit_prefix}-{next(self._commit_count)}"

        def commit_of(snap: Snapshot) -> Commit:
            return delta_commit(
                self.codec,
                snap,
                [*hist.records, *(agent.records if agent else ())],
                {HISTORY: hist.count, AGENT: agent.count if agent else 0},
                seals={HISTORY: hist.seal, AGENT: agent.seal if agent else 0},
                base_version=base_version,
                owner=self._owner,
                commit_id=commit_id,
                whole=hist.whole and (agent is None or agent.whole),
            )

        try:
            commit = commit_of(snap)
        except SnapshotTooLarge as e:
            # the head holds the app's values (agent state, userdata): one too large
            # keeps what the store holds of it, as one that cannot be saved does, so
            # the conversation itself still saves
            for smaller, what in self._smaller_heads(snap, read.agent_obj):
                try:
                    commit = commit_of(smaller)
                except SnapshotTooLarge:
                    continue
                if "userdata" in what:
                    UNSAVABLE.inc()
                log.warning(
                    "session %r: %s not saved this time, the last saved is kept: %s",
                    self._key,
                    what,
                    e,
                    extra={"key": self._key},
                )
                snap = smaller
                break
            else:
                raise
            if (
                not items
                and committed is not None
                and _fingerprint(snap) == _fingerprint(committed)
            ):
                return None  # what the store holds already
        return Pending(commit, hist, agent, read.agent_obj, read.turns, snap)

    def _smaller_heads(
        self, snap: Snapshot, agent_obj: Agent | None
    ) -> Iterator[tuple[Snapshot, str]]:
        """``snap`` with the agent state, the userdata, then both, as the store holds
        them: each that differs from ``snap``."""
        saved = self._saved_state
        state = saved[1] if saved is not None and saved[0] is agent_obj else None
        frame = snap.agent
        kept = (
            {"agent": frame.model_copy(update={"state": state})}
            if frame is not None and frame.state != state
            else {}
        )
        userdata = (
            {"userdata": self._saved_userdata} if snap.userdata != self._saved_userdata else {}
        )
        both = {**kept, **userdata} if kept and userdata else {}
        for update, what in (
            (kept, "agent state"),
            (userdata, "userdata"),
            (both, "agent state and userdata"),
        ):
            if update:
                yield snap.model_copy(update=update), what

    def accept(self, pending: Pending) -> None:
        """``pending`` is stored: it is the new baseline."""
        try:
            self._history.accept(pending.history)
            if pending.agent is not None:
                self._agent_ctx.accept(pending.agent)
            else:
                self._agent_ctx.reset()
            self.rewrite = False
        except StaleChange as e:
            # The store holds the commit, but it was diffed from a state the trackers no
            # longer hold: a diff from here would write records and seals that do not
            # match the store. The next commit writes every stream anew instead.
            log.error(
                "session %r: %s; the next checkpoint writes the session whole",
                self._key,
                e,
                extra={"key": self._key},
            )
            self.rewrite = True
        self._turns = pending.turns
        self._tracked_agent = pending.agent_obj
        self._committed = snap = pending.snap
        self._saved_userdata = snap.userdata
        if (
            pending.agent_obj is not None
            and snap.agent is not None
            and snap.agent.state is not None
        ):
            self._saved_state = (pending.agent_obj, snap.agent.state)

    def _plan(
        self,
        tracker: StreamTracker,
        items: Sequence[llm.ChatItem],
        convert: Converter,
        *,
        whole: bool = False,
        **kw: Any,
    ) -> Plan:
        if self.rewrite or whole:
            return tracker.full(items, convert, shaped=kw.get("shaped"))
        return tracker.diff(items, convert, **kw)

    def _agent(
        self, session: AgentSession[Any], hist: Plan, convert: Converter, shaped: dict[int, Any]
    ) -> tuple[Agent | None, AgentFrame | None, Plan | None]:
        agent_obj = current_agent(session)
        if agent_obj is None:
            return None, None, None
        task: str | None = None
        if isinstance(agent_obj, AgentTask):
            # a task is live code, not data: save the agent that started it, even when
            # the task's class is registered too (restored as itself, it would hold the
            # caller with no parent to return to). One never awaited (made current by
            # update_agent) has no parent: it is the session's agent, saved as any is.
            parent = task_parent(agent_obj)
            if parent is not None:
                task, agent_obj = type(agent_obj).__qualname__, parent
        agent_id = self._registry.id_of(agent_obj)
        if agent_id is None:
            raise UnknownAgent(type(agent_obj).__qualname__, self._registry.ids, saving=True)
        plan = self._plan(
            self._agent_ctx,
            _live_items(agent_obj),
            convert,
            # the new agent's context replaces the old one: cleared, then written whole
            whole=agent_obj is not self._tracked_agent,
            rewrite=dangling_refs(hist.removals) | self._edited(hist),
            shaped=shaped,
        )
        self.last_agent = agent_obj
        instructions = _instructions_to(agent_obj.instructions)
        state, realtime = self._agent_state(agent_obj), capture_options(session, agent_obj)
        # The frame is the last one while what it holds is: its validation is most of
        # its cost. Only for one without state or realtime options, whose values could
        # compare equal yet differ (1 == 1.0 == True): ids and texts compare exactly.
        same = None if state is not None or realtime is not None else (agent_id, instructions, task)
        if same is None or same != self._frame_of or self._frame is None:
            self._frame = AgentFrame(
                agent_id=agent_id,
                instructions=instructions,
                state=state,
                task=task,
                realtime=realtime,
            )
            self._frame_of = same
        return agent_obj, self._frame, plan

    def _edited(self, hist: Plan) -> frozenset[str]:
        """History items committed before and maybe written again now: an agent item
        stored as a reference to one of them is written again too, or it would read the
        new edition (and its seal would not match). An item read again that turns out
        unchanged is rewritten as it was: harmless."""
        return frozenset(
            i for i in hist.written() if self._history.has(i) and self._agent_ctx.has(i)
        )

    def _converter(self) -> Converter:
        """Items as plain data, each object read once per checkpoint: most items are in
        both streams (the agent's context holds the history's objects)."""
        media: MediaPolicy = self._media
        seen: dict[int, ItemData] = {}

        def convert(item: llm.ChatItem) -> ItemData:
            data = seen.get(id(item))  # the objects outlive the checkpoint's read
            if data is None:
                data = seen[id(item)] = item_to_data(item, media=media)
            return data

        return convert

    def _encoder(self, stream: str, history: Change | None) -> Encoder:
        codec, key = self.codec, self._key
        twins = history.digests if history is not None else None
        # a reference reads its twin as stored: one shrunk to fit is not the same data
        shrunk = history.shrunk if history is not None else {}

        def encode(data: ItemData, d: bytes, packed: bytes) -> bytes | tuple[bytes, bytes]:
            item_id = data["id"]
            ref = is_twin(twins, item_id, d) and item_id not in shrunk
            try:
                return codec.encode_item(key, stream, data, ref=ref, packed=packed)
            except SnapshotTooLarge as e:
                return self._encode_smaller(stream, data, e)

        return encode

    def _encode_smaller(
        self, stream: str, data: ItemData, error: SnapshotTooLarge
    ) -> tuple[bytes, bytes]:
        """A stand-in that fits, and the digest of what it holds (for the seal): made of
        the item as read, never of the live item, which may have changed since (the
        build runs after a yield, or on a worker thread)."""
        # decided now, at write time: nothing is stored that a restore would refuse
        for smaller, what in self._smaller(data):
            try:
                frame = self.codec.encode_item(self._key, stream, smaller)
            except SnapshotTooLarge:
                continue
            OVERSIZE.inc()
            log.warning(
                "session %r: %s item %r is too large to save whole (%s); saved %s",
                self._key,
                stream,
                data["id"],
                error,
                what,
                extra={"key": self._key},
            )
            return frame, digest(smaller)
        raise error

    def _smaller(self, data: ItemData) -> Iterator[tuple[ItemData, str]]:
        """Stand-ins for an item over the frame limit, from the least lossy."""
        if self._media == "keep":
            data = without_media(data)
            yield data, "with its media dropped"
        kind = data.get("type")
        if kind == "message":
            data, what = {**data, "content": [_OVERSIZE_NOTE]}, "its text"
        elif kind == "function_call_output":
            data, what = {**data, "output": _OVERSIZE_NOTE}, "its output"
        elif kind == "function_call":  # still JSON, as a provider expects arguments
            data, what = {**data, "arguments": _OVERSIZE_ARGUMENTS}, "its arguments"
        else:
            what = ""
        if what:
            yield data, f"with {what} replaced by a note"
        # the last resort: the app's data on it (``extra``, ``metrics``) left out too
        if data.get("extra") or data.get("metrics"):
            bare: ItemData = {**data}
            for name in ("extra", "metrics"):
                if name in bare:
                    bare[name] = {}
            noted = f"{what} replaced by a note and " if what else ""
            yield bare, f"with {noted}its extra data left out"

    def _agent_state(self, agent: Agent) -> dict[str, Any] | None:
        """What ``agent.snapshot_state()`` returns, as plain data by the rules of ``extra``;
        a value that cannot be saved keeps the agent's last savable state (logged), as
        userdata does, so the rest of the session still saves."""
        try:
            state = _agent_state(agent)
            return None if state is None else plain_extra(state, "state")
        except UnsavableValue as e:
            log.warning(
                "session %r: agent state not saved this time, its last saved state is kept: %s",
                self._key,
                e,
                extra={"key": self._key, "path": e.path},
            )
        except Exception:  # the app's code: its failure must not stop the session saving
            log.exception(
                "session %r: %s.snapshot_state() failed; its last saved state is kept",
                self._key,
                type(agent).__qualname__,
                extra={"key": self._key},
            )
        saved = self._saved_state
        return saved[1] if saved is not None and saved[0] is agent else None

    def _dump_userdata(self, session: AgentSession[Any]) -> Any:
        if self.userdata is None:
            # no type to save it by (a worker deployed without userdata_type): what the
            # store holds is kept, for a worker that has one (`rebuild` warns)
            return self._saved_userdata
        try:
            value = session.userdata
        except ValueError:
            return None  # LiveKit raises when userdata was never set
        try:
            return dump_userdata(self.userdata, value)
        except UnsavableValue as e:
            # the rest of the session keeps saving; this one value waits until it is fixed
            UNSAVABLE.inc()
            log.warning(
                "session %r: userdata not saved this time, the last saved userdata is kept: %s",
                self._key,
                e,
                extra={"key": self._key, "path": e.path},
            )
        return self._saved_userdata


def _fingerprint(snap: Snapshot) -> bytes:
    """What a snapshot says beyond its items, less the time and the trigger (no news);
    computed only when a checkpoint has no item to write."""
    return digest(snap.model_dump(mode="json", exclude={"created_at", "reason"}))


def _instructions_to(value: str | Instructions) -> str | dict[str, str | None]:
    if isinstance(value, str):
        return value
    return {
        "common": value.common,
        "audio": value.audio,
        "text": value.text,
        "dynamic": value.dynamic,
    }


def instructions_from(value: str | dict[str, str | None]) -> str | Instructions:
    """Saved instructions back to what `Agent.update_instructions` takes."""
    if isinstance(value, str):
        return value
    return Instructions(
        value.get("common") or "",
        audio=value.get("audio"),
        text=value.get("text"),
        dynamic=value.get("dynamic"),
    )


def task_parent(task: AgentTask[Any]) -> Agent | None:
    """The agent that started ``task`` (through nested tasks), as LiveKit records it
    when the task is awaited; None for a task that was never awaited."""
    agent: Agent | None = task
    while isinstance(agent, AgentTask):
        agent = getattr(agent, "_old_agent", None)
    return agent


def _live_items(agent: Agent) -> Sequence[llm.ChatItem]:
    """The agent's context items, read where they live: ``Agent.chat_ctx`` hands out a
    read-only copy of the whole list on every call, O(n) per checkpoint."""
    ctx = getattr(agent, "_chat_ctx", None)
    if isinstance(ctx, llm.ChatContext):
        return ctx.items
    return agent.chat_ctx.items


def _agent_state(agent: Agent) -> dict[str, Any] | None:
    fn = getattr(agent, "snapshot_state", None)
    if fn is None:
        return None
    state = fn()
    if not isinstance(state, dict):
        raise TypeError(f"{type(agent).__qualname__}.snapshot_state() must return a dict")
    return state
