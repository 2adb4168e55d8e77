"""A snapshot rebuilt into a live `AgentSession`, through LiveKit's public API.

LiveKit 1.8.9 has no public way to pre-load a session: the saved history goes into
``session.history`` before ``start()`` (in saved order: timestamps are kept exactly),
and the current agent gets its saved instructions and context through
``update_instructions`` and ``update_chat_ctx(..., exclude_invalid_function_calls=False)``
(``Agent(chat_ctx=...)`` would filter it). Tool calls without an answer are answered
"interrupted" so that every provider accepts the context. Everything that can fail runs
before the session is touched: a refused restore leaves it as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from livekit.agents import Agent, AgentSession, llm
from pydantic import TypeAdapter, ValidationError

from ..errors import IncompatibleSnapshot, ResumeError, UnsavableValue
from ..snapshot.chat import ctx_from_data, repair_tool_calls
from ..snapshot.model import AgentFrame, ItemData, Snapshot, describe_invalid
from ..snapshot.values import dump_userdata
from .capture import instructions_from
from .realtime import reapply_options
from .registry import AgentRegistry

__all__ = ["Built", "Rebuilt", "build_items", "rebuild"]

log = logging.getLogger("livekit_resume")


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The agent to start, and the items now in the session (what the store holds)."""

    agent: Agent
    history: list[llm.ChatItem]
    agent_items: list[llm.ChatItem] | None


@dataclass(frozen=True, slots=True)
class Built:
    """A snapshot's chat items as LiveKit items, before anything touches the session:
    the history, and the agent's context (None without an agent)."""

    history: list[llm.ChatItem]  # one per saved item: what the store holds
    agent: llm.ChatContext | None
    repaired: llm.ChatContext | None  # the agent's, its unanswered tool calls answered
    answered: list[llm.ChatItem]  # the history, its unanswered tool calls answered


def build_items(snap: Snapshot) -> Built:
    """The chat items of ``snap`` (`SnapshotCorrupt` naming a bad one). Synchronous, and
    touching no live object: a restore builds them right after their decode, inside its
    cyclic-GC pause or on its worker thread."""
    history = ctx_from_data(snap.history).items
    # A realtime model puts a call into the history as it starts: one in flight when
    # saved is answered there too, not left for every later snapshot to carry unanswered.
    # (A pipeline's calls reach the history only once answered: none to repair there.)
    answered = llm.ChatContext(list(history))
    in_history = {o.id: o for o in repair_tool_calls(answered, finals=False)}
    frame = snap.agent
    if frame is None:
        return Built(history, None, None, answered.items)
    agent = _agent_ctx(frame.chat_ctx, snap.history, history)
    # a context of its own to repair (the saved one is what the store holds):
    # `ChatContext.copy()` with no filter is this list copy, less a loop over every item
    repaired = llm.ChatContext(list(agent.items))
    added = {o.id for o in repair_tool_calls(repaired, pending=snap.tool_calls)}
    if in_history and added:
        # one object in both contexts, as a live session holds its items
        repaired.items[:] = [
            in_history.get(i.id, i) if i.id in added else i for i in repaired.items
        ]
    return Built(history, agent, repaired, answered.items)


def _agent_ctx(
    datas: list[ItemData], history_datas: list[ItemData], history: list[llm.ChatItem]
) -> llm.ChatContext:
    """The agent's context. An agent item stored as a reference to its history twin is
    decoded as the twin's very map (`Codec.decode_item`): it becomes the twin's very
    item, as in a live session, where both contexts hold the same objects."""
    twins = {id(d): item for d, item in zip(history_datas, history, strict=True)}
    built = [twins.get(id(d)) for d in datas]
    if None not in built:
        return llm.ChatContext(built)  # type: ignore[arg-type]  # no None in it
    rest = iter(ctx_from_data([d for d, b in zip(datas, built, strict=True) if b is None]).items)
    return llm.ChatContext([b if b is not None else next(rest) for b in built])


def check(
    snap: Snapshot,
    *,
    registry: AgentRegistry,
    userdata: TypeAdapter[Any] | None,
    userdata_type: Any = None,
) -> None:
    """Raise what `rebuild` would raise of ``snap`` (its userdata no longer validates,
    its agent unknown or not rebuilt by its factory), touching no session: a takeover
    is taken only once this worker can restore what the store holds."""
    if snap.state == "ended":
        return  # not restored: a new conversation starts
    _userdata(snap, userdata, userdata_type)
    if snap.agent is not None:
        _build_agent(registry, snap, snap.agent)


def _userdata(snap: Snapshot, adapter: TypeAdapter[Any] | None, userdata_type: Any) -> Any:
    """The saved userdata, validated (None: none saved, or no type to validate it)."""
    if adapter is None or snap.userdata is None:
        return None
    try:
        return adapter.validate_python(snap.userdata)
    except ValidationError as e:
        raise IncompatibleSnapshot(
            f"session {snap.key!r} version {snap.version}: saved userdata no longer "
            f"validates against {userdata_type!r}: {describe_invalid(e)}"
        ) from None
    except Exception as e:
        # the app's validator (a migration of the old shape) raised past pydantic: a
        # KeyError or TypeError is no ValidationError, but says the same
        raise IncompatibleSnapshot(
            f"session {snap.key!r} version {snap.version}: a validator of "
            f"{userdata_type!r} failed on the saved userdata ({type(e).__name__}: {e})"
        ) from e


def _warn_dropped(
    snap: Snapshot, adapter: TypeAdapter[Any], value: Any, userdata_type: Any
) -> None:
    """Name each saved userdata field the type no longer has (pydantic ignores them, and
    the next checkpoint saves the userdata without them); never their values."""
    try:
        now = dump_userdata(adapter, value)
    except UnsavableValue:
        return  # its next checkpoint says why, by the path
    dropped = list(_missing(snap.userdata, now, "userdata"))
    if dropped:
        log.warning(
            "session %r version %d: saved userdata the code no longer has is dropped "
            "(%s no longer in %r); it is gone from the next checkpoint",
            snap.key,
            snap.version,
            ", ".join(dropped[:10])
            + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""),
            userdata_type,
            extra={"key": snap.key},
        )


def _missing(saved: Any, now: Any, path: str) -> Iterator[str]:
    """Paths of the maps' keys in ``saved`` that ``now`` lacks (lists of one length
    compared item by item)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key, value in saved.items():
            at = f"{path}.{key}"
            if key not in now:
                yield at
            else:
                yield from _missing(value, now[key], at)
    elif isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (was, new) in enumerate(zip(saved, now, strict=True)):
            yield from _missing(was, new, f"{path}[{i}]")


def _build_agent(registry: AgentRegistry, snap: Snapshot, frame: AgentFrame) -> Agent:
    """The saved agent, built by its factory from its saved state. A factory that fails
    on that state is code that no longer fits the snapshot, like userdata that no longer
    validates: a typed error naming the agent, not the factory's own bare one."""
    try:
        return registry.build(frame.agent_id, frame.state)
    except ResumeError:
        raise
    except Exception as e:
        raise IncompatibleSnapshot(
            f"session {snap.key!r} version {snap.version}: agent {frame.agent_id!r} could "
            f"not be rebuilt from its saved state: {type(e).__name__}: {e}"
        ) from e


async def rebuild(
    session: AgentSession[Any],
    snap: Snapshot,
    *,
    default: Callable[[], Agent],
    registry: AgentRegistry,
    userdata: TypeAdapter[Any] | None,
    userdata_type: Any = None,
    built: Built | None = None,
) -> Rebuilt:
    """Fill ``session`` from ``snap`` and build its current agent; call before start.
    ``built``: ``build_items(snap)``, when the caller made it already."""
    if built is None:
        built = build_items(snap)
    history = built.history
    value = _userdata(snap, userdata, userdata_type)
    if value is not None:
        assert userdata is not None  # a value only comes of it
        _warn_dropped(snap, userdata, value, userdata_type)
    elif userdata is None and snap.userdata is not None:
        log.warning(
            "session %r: its saved userdata is not restored into session.userdata: this "
            "worker has no userdata_type; the store keeps it as saved",
            snap.key,
            extra={"key": snap.key},
        )
    frame = snap.agent
    agent = default() if frame is None else _build_agent(registry, snap, frame)
    saved = built.agent

    if session.history.items:
        session.history.insert(built.answered)
    else:
        # kept in saved order, which is exact even where created_at is not sorted
        session.history.items.extend(built.answered)
    if value is not None:
        session.userdata = value
    if frame is None or saved is None:
        return Rebuilt(agent, history, None)
    if frame.instructions is not None:
        await agent.update_instructions(instructions_from(frame.instructions))  # type: ignore[arg-type]  # LiveKit accepts Instructions too
    if frame.realtime is not None:
        await reapply_options(session, agent, frame.realtime, key=snap.key)
    assert built.repaired is not None  # made with the agent's context
    await agent.update_chat_ctx(built.repaired, exclude_invalid_function_calls=False)
    if frame.task:
        log.warning(
            "session %r was inside task %s when saved; restored %s without it",
            snap.key,
            frame.task,
            frame.agent_id,
            extra={"key": snap.key},
        )
    return Rebuilt(agent, history, saved.items)
