"""The `AgentSession` events the hooks listen to. Events only *trigger* checkpoints
(they are not a log: function calls and config updates arrive silently); the one state
they carry is which tool calls are in flight or ended unrecorded, which the history does
not show until a tool's batch has finished."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from livekit.agents import Agent, AgentSession, AgentTask
from livekit.agents.voice.agent_activity import _AgentActivityContextVar
from livekit.agents.voice.events import (
    CloseEvent,
    ConversationItemAddedEvent,
    EventTypes,
    FunctionToolsExecutedEvent,
    ToolCallEnded,
    ToolCallStarted,
    ToolExecutionUpdatedEvent,
)

from ..snapshot.model import ToolCallRecord
from .capture import Capture, task_parent
from .registry import AgentRegistry
from .silence import current_agent

__all__ = ["listen"]

Listeners = list[tuple[EventTypes, Callable[..., None]]]


def listen(
    session: AgentSession[Any],
    capture: Capture,
    registry: AgentRegistry,
    trigger: Callable[[str], None],
    on_close: Callable[[CloseEvent], None],
    on_handoff: Callable[[Agent | None], None],
) -> Listeners:
    """Subscribe to ``session``; returns the (event, callback) pairs to unsubscribe."""

    def on_item(ev: ConversationItemAddedEvent) -> None:
        if ev.item.type == "agent_handoff":
            agent = current_agent(session)
            if agent is not None and registry.id_of(agent) is not None:
                capture.last_agent = agent
            on_handoff(agent)  # before the new agent's on_enter runs
            trigger("handoff")
        else:
            trigger("turn")

    # A call leaves the tool state once it has ended and its output is in the history,
    # which LiveKit reports in either order: a batch's outputs with the batch
    # (function_tools_executed, right before it writes them to the history, no capture
    # in between), which can be an async tool's first progress, the tool running on.
    ended: set[str] = set()  # ended (done, error), its output not reported yet
    reported: set[str] = set()  # output reported, the tool still running

    def settle(call_id: str) -> None:
        capture.running.pop(call_id, None)
        ended.discard(call_id)
        reported.discard(call_id)

    def on_tools(ev: FunctionToolsExecutedEvent) -> None:
        for fc in ev.function_calls:
            if fc.call_id in ended:
                settle(fc.call_id)
            elif fc.call_id in capture.running:
                reported.add(fc.call_id)
        trigger("tool")

    def on_tool_update(ev: ToolExecutionUpdatedEvent) -> None:
        up = ev.update
        if isinstance(up, ToolCallStarted):
            agent = running_agent(session)
            if isinstance(agent, AgentTask) and task_parent(agent) is not None:
                # a task's own tool: a snapshot saves the task's parent, whose context
                # never holds the task's calls (AgentTask merges back without them); the
                # parent's call awaiting the task is the trace a crash leaves
                return
            fc = up.function_call
            capture.running[fc.call_id] = ToolCallRecord(
                call_id=fc.call_id,
                name=fc.name,
                arguments=fc.arguments,
                started_at=fc.created_at,
                item_id=fc.id,
                status="running",
            )
            trigger("tool")  # a crash mid-tool must leave a trace
        elif isinstance(up, ToolCallEnded):
            call_id = up.call_id
            # an async tool's result (its ``<call_id>_final`` pair, in the history already:
            # tool_executor.py `_execute_tool`), or a call cancelled, which LiveKit leaves
            # out of the history
            if up.id != call_id or up.status == "cancelled" or call_id in reported:
                settle(call_id)
            elif call_id in capture.running:
                # a call of a batch not done yet: LiveKit writes its call and output only
                # with the batch (`on_tools`); until then this is the one trace of a call
                # that has taken effect
                ended.add(call_id)
            trigger("tool")  # a result that lands with no other event (paused, no reply)

    handlers: Listeners = [
        ("conversation_item_added", on_item),
        ("function_tools_executed", on_tools),
        ("tool_execution_updated", on_tool_update),
        ("close", on_close),
    ]
    for event, fn in handlers:
        session.on(event, fn)
    return handlers


def running_agent(session: AgentSession[Any]) -> Agent | None:
    """The agent whose activity runs the code emitting an event now, else the current
    one. LiveKit 1.8.9 runs a reply's tools in its activity's speech task, whose context
    names that activity (`_AgentActivityContextVar`), and emits `ToolCallStarted` there:
    the session's current agent is another while a sibling awaits an `AgentTask` (the
    task) or once a task completed mid-batch (its parent)."""
    activity = _AgentActivityContextVar.get(None)
    return activity.agent if activity is not None else current_agent(session)
