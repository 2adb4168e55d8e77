"""`Capture`: a live `AgentSession` read into a snapshot and the commit that stores it.

Events are not a log (LiveKit inserts function calls and config updates silently and
edits recent items in place), so a capture reads the session itself: the history and
the current agent's context are diffed against what was last committed (`tracker`),
tool calls in flight come from the ``tool_execution_updated`` events, userdata goes
through its `TypeAdapter`. Everything is read in one synchronous step, so history,
agent and tool state are one moment. The store learns of the result only through
`bridge.delta_commit`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from livekit.agents import Agent, AgentSession, AgentTask, llm
from livekit.agents.llm.chat_context import Instructions
from prometheus_client import Counter
from pydantic import TypeAdapter

from ..bridge import dangling_refs, delta_commit, is_twin
from ..errors import SnapshotTooLarge, UnknownAgent, UnsavableValue
from ..snapshot.chat import MediaPolicy, item_to_data
from ..snapshot.codec import AGENT, HISTORY, Codec
from ..snapshot.model import AgentFrame, ItemData, SessionMeta, Snapshot, ToolCallRecord, Writer
from ..snapshot.values import dump_userdata
from ..stores.base import Commit, Record
from .realtime import capture_options
from .registry import AgentRegistry
from .silence import current_agent
from .tracker import Change, Encoder, StreamTracker, digest

__all__ = ["Capture", "Pending", "SavedState", "instructions_from"]

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
_REASONS = {"turn", "tool", "handoff", "pause", "suspend", "close", "manual", "end"}


@dataclass(frozen=True, slots=True)
class Pending:
    """A commit sent but not (yet) known to be stored, and what to adopt once it is."""

    commit: Commit
    history: Change
    agent: Change
    agent_obj: Agent | None
    turns: int
    fingerprint: bytes


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
        self.last_agent: Agent | None = None  # the parent to save while an AgentTask runs
        self._turns = 0
        self._fingerprint = b""
        self._saved_userdata: Any = None  # the last userdata that could be saved
        self.running: dict[str, ToolCallRecord] = {}
        self.conversation = uuid.uuid4().hex  # a restore adopts the saved one
        self.rewrite = False  # the next commit clears every stream and writes it whole

    # ----------------------------------------------------------------- restore

    def baseline(
        self,
        snap: Snapshot,
        history: Sequence[llm.ChatItem],
        agent: Agent,
        agent_items: Sequence[llm.ChatItem] | None,
    ) -> None:
        """Adopt a restored snapshot as what the store holds."""
        self._history.baseline(history, snap.history)
        self._turns = snap.meta.turn_count
        self.conversation = snap.meta.conversation or self.conversation
        self._saved_userdata = snap.userdata
        self.last_agent = agent
        if snap.agent is not None and agent_items is not None:
            self._agent_ctx.baseline(agent_items, snap.agent.chat_ctx)
            self._tracked_agent = agent

    # ----------------------------------------------------------------- capture

    def draft(
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
        since the last commit (the time and the trigger alone are no news)."""
        hist = self._diff(self._history, session.history.items, self._encoder(HISTORY, None))
        turns = self._turns + sum(
            1
            for d in hist.datas.values()
            if d.get("type") == "message"
            and d.get("role") == "user"
            and not self._history.has(d["id"])  # counted once, when it first reaches the store
        )
        agent_obj, frame, agent = self._agent(session, hist)
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
        fingerprint = digest(snap.model_dump(mode="json", exclude={"created_at", "reason"}))
        if not hist.records and not agent.records and fingerprint == self._fingerprint:
            return None
        commit = delta_commit(
            self.codec,
            snap,
            [*hist.records, *agent.records],
            {HISTORY: len(hist.objs), AGENT: len(agent.objs)},
            seals={HISTORY: hist.seal, AGENT: agent.seal},
            base_version=base_version,
            owner=self._owner,
            commit_id=uuid.uuid4().hex,
        )
        return Pending(commit, hist, agent, agent_obj, turns, fingerprint)

    def accept(self, pending: Pending) -> None:
        """``pending`` is stored: it is the new baseline."""
        self._history.accept(pending.history)
        self._agent_ctx.accept(pending.agent)
        self._turns = pending.turns
        self._tracked_agent = pending.agent_obj
        self._fingerprint = pending.fingerprint
        self.rewrite = False

    def _diff(
        self, tracker: StreamTracker, items: Sequence[llm.ChatItem], encode: Encoder, **kw: Any
    ) -> Change:
        if self.rewrite:
            return tracker.full(items, self._convert, encode)
        return tracker.diff(items, self._convert, encode, **kw)

    def _agent(
        self, session: AgentSession[Any], hist: Change
    ) -> tuple[Agent | None, AgentFrame | None, Change]:
        agent_obj = current_agent(session)
        if agent_obj is None:
            return None, None, Change([], [], {})
        agent_id = self._registry.id_of(agent_obj)
        task: str | None = None
        if agent_id is None and isinstance(agent_obj, AgentTask) and self.last_agent:
            task = type(agent_obj).__qualname__
            agent_obj = self.last_agent  # a task is live code, not data: save its parent
            agent_id = self._registry.id_of(agent_obj)
        if agent_id is None:
            raise UnknownAgent(type(agent_obj).__qualname__, self._registry.ids, saving=True)
        handoff = agent_obj is not self._tracked_agent and not self.rewrite
        if handoff:
            self._agent_ctx.reset()  # the new agent's context replaces the old one
        change = self._diff(
            self._agent_ctx,
            agent_obj.chat_ctx.items,
            self._encoder(AGENT, hist),
            rewrite=dangling_refs(hist.records) | self._edited(hist),
        )
        if handoff:
            change.records.insert(0, Record(AGENT, "", None))
        self.last_agent = agent_obj
        frame = AgentFrame(
            agent_id=agent_id,
            instructions=_instructions_to(agent_obj.instructions),
            state=_agent_state(agent_obj),
            task=task,
            realtime=capture_options(session, agent_obj),
        )
        return agent_obj, frame, change

    def _edited(self, hist: Change) -> frozenset[str]:
        """History items committed before and written again now: an agent item stored
        as a reference to one of them is written again too, or it would read the new
        edition (and its seal would not match)."""
        return frozenset(
            r.id
            for r in hist.records
            if r.data is not None and self._history.has(r.id) and self._agent_ctx.has(r.id)
        )

    def _convert(self, item: llm.ChatItem) -> ItemData:
        return item_to_data(item, media=self._media)

    def _encoder(self, stream: str, history: Change | None) -> Encoder:
        codec, key = self.codec, self._key
        twins = history.digests if history is not None else None
        # a reference reads its twin as stored: one shrunk to fit is not the same data
        shrunk = history.shrunk if history is not None else {}

        def encode(item: llm.ChatItem, data: ItemData, d: bytes) -> bytes | tuple[bytes, bytes]:
            ref = is_twin(twins, item.id, d) and item.id not in shrunk
            try:
                return codec.encode_item(key, stream, data, ref=ref)
            except SnapshotTooLarge as e:
                return self._encode_smaller(stream, item, e)

        return encode

    def _encode_smaller(
        self, stream: str, item: llm.ChatItem, error: SnapshotTooLarge
    ) -> tuple[bytes, bytes]:
        """A stand-in that fits, and the digest of what it holds (for the seal)."""
        # decided now, at write time: nothing is stored that a restore would refuse
        for smaller, what in self._smaller(item):
            try:
                frame = self.codec.encode_item(self._key, stream, smaller)
            except SnapshotTooLarge:
                continue
            OVERSIZE.inc()
            log.warning(
                "session %r: %s item %r is too large to save whole (%s); saved %s",
                self._key,
                stream,
                item.id,
                error,
                what,
                extra={"key": self._key},
            )
            return frame, digest(smaller)
        raise error

    def _smaller(self, item: llm.ChatItem) -> Iterator[tuple[ItemData, str]]:
        """Stand-ins for an item over the frame limit, from the least lossy."""
        data = item_to_data(item, media="drop")
        if self._media == "keep":
            yield data, "with its media dropped"
        if data.get("type") == "message":
            yield {**data, "content": [_OVERSIZE_NOTE]}, "with its text replaced by a note"
        elif data.get("type") == "function_call_output":
            yield {**data, "output": _OVERSIZE_NOTE}, "with its output replaced by a note"

    def _dump_userdata(self, session: AgentSession[Any]) -> Any:
        if self.userdata is None:
            return None
        try:
            value = session.userdata
        except ValueError:
            return None  # LiveKit raises when userdata was never set
        try:
            self._saved_userdata = dump_userdata(self.userdata, value)
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


def _agent_state(agent: Agent) -> dict[str, Any] | None:
    fn = getattr(agent, "snapshot_state", None)
    if fn is None:
        return None
    state = fn()
    if not isinstance(state, dict):
        raise TypeError(f"{type(agent).__qualname__}.snapshot_state() must return a dict")
    return state
