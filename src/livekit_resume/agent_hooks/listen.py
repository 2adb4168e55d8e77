"""The `AgentSession` events the hooks listen to. Events only *trigger* checkpoints
(they are not a log: function calls and config updates arrive silently); the one state
they carry is which tool calls are in flight, which the history does not show until a
tool has finished."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from livekit.agents import Agent, AgentSession
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
from .capture import Capture
from .registry import AgentRegistry
from .silence import current_agent

__all__ = ["listen"]

Listeners = list[tuple[EventTypes, Callable[..., None]]]


def listen(
    session: AgentSession[Any],
    capture: Capture,
    registry: AgentRegistry,
    trigger: Callable[[str], None],
    on_close: Callable[[], None],
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

    def on_tools(_: FunctionToolsExecutedEvent) -> None:
        trigger("tool")

    def on_tool_update(ev: ToolExecutionUpdatedEvent) -> None:
        up = ev.update
        if isinstance(up, ToolCallStarted):
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
            capture.running.pop(up.call_id, None)

    def on_closed(_: CloseEvent) -> None:
        on_close()

    handlers: Listeners = [
        ("conversation_item_added", on_item),
        ("function_tools_executed", on_tools),
        ("tool_execution_updated", on_tool_update),
        ("close", on_closed),
    ]
    for event, fn in handlers:
        session.on(event, fn)
    return handlers
