"""The Riverside clinic: two resumable agents, the ones ``examples/worker.py`` serves
and ``livekit-resume demo`` talks to (one copy, so the demo shows what the example does).

A receptionist records the caller's name in the session's userdata and hands over to a
booking desk, which books and moves the visit. Both greet on entry, except when the
registry rebuilt them from a snapshot: LiveKit runs ``on_enter`` on every
``session.start()``, a restore included, and a caller who is mid-way through a
conversation must not be welcomed again.
"""

from __future__ import annotations

from livekit.agents import Agent, RunContext, function_tool, llm
from pydantic import BaseModel

from ...agent_hooks.registry import AgentRegistry

__all__ = [
    "BOOKING_DESK",
    "BOOKING_INSTRUCTIONS",
    "GREET",
    "RECEPTIONIST_INSTRUCTIONS",
    "Booking",
    "Receptionist",
    "Visit",
    "register_agents",
]

RECEPTIONIST_INSTRUCTIONS = (
    "You are the front desk of the Riverside clinic. Ask for the caller's name and record "
    "it, then hand them to the booking desk when they want an appointment."
)
BOOKING_DESK = "You are the booking desk"
"""How the booking desk's instructions begin (the demo's rules tell the agents apart by it)."""
BOOKING_INSTRUCTIONS = (
    f"{BOOKING_DESK} of the Riverside clinic. Book, move or recall the "
    "caller's visit; the caller's name is in the conversation."
)
GREET = "Greet the caller briefly."
"""The instructions of the reply an agent asks for when it enters."""


class Visit(BaseModel):
    """Session userdata, saved with every snapshot and validated on restore: what the
    tools learned about the caller's visit."""

    name: str | None = None
    day: str | None = None
    changes: int = 0


class _Resumable(Agent):
    """Greets on entry, unless it was rebuilt from a snapshot: the registry builds an
    agent only to restore one, so ``restored=True`` is how it knows."""

    def __init__(
        self,
        *,
        instructions: str,
        restored: bool = False,
        chat_ctx: llm.ChatContext | None = None,
    ) -> None:
        super().__init__(instructions=instructions, chat_ctx=chat_ctx)
        self._restored = restored

    async def on_enter(self) -> None:
        if self._restored:
            return  # the caller is mid-conversation: no second welcome
        self.session.generate_reply(instructions=GREET)


class Receptionist(_Resumable):
    def __init__(self, *, restored: bool = False) -> None:
        super().__init__(instructions=RECEPTIONIST_INSTRUCTIONS, restored=restored)

    @function_tool
    async def record_name(self, context: RunContext[Visit], name: str) -> str:
        """Record the caller's name.

        Args:
            name: the caller's first name
        """
        context.userdata.name = name
        return f"name recorded: {name}"

    @function_tool
    async def transfer_to_booking(self, context: RunContext[Visit]) -> Agent:
        """Hand the caller to the booking desk."""
        # the booking desk hears the conversation so far (messages, not our tool calls)
        heard = self.chat_ctx.copy(
            exclude_instructions=True,
            exclude_function_call=True,
            exclude_handoff=True,
            exclude_config_update=True,
        )
        return Booking(chat_ctx=heard)


class Booking(_Resumable):
    def __init__(self, *, restored: bool = False, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions=BOOKING_INSTRUCTIONS, restored=restored, chat_ctx=chat_ctx)

    @function_tool
    async def book_visit(self, context: RunContext[Visit], day: str) -> str:
        """Book the caller's visit.

        Args:
            day: the weekday of the visit
        """
        visit = context.userdata
        visit.day = day
        return f"booked {day} for {visit.name or 'the caller'}"

    @function_tool
    async def reschedule(self, context: RunContext[Visit], day: str) -> str:
        """Move the caller's booked visit to another day.

        Args:
            day: the new weekday
        """
        visit = context.userdata
        if visit.day is None:
            return "there is no booking to move yet"
        old, visit.day = visit.day, day
        visit.changes += 1
        return f"booked {day} for {visit.name or 'the caller'} (moved from {old})"


def register_agents(registry: AgentRegistry) -> None:
    """The only classes a snapshot can ever rebuild: both agents, built "restored", so
    that they do not greet a caller who is mid-conversation."""
    registry.register(Receptionist, factory=lambda _state: Receptionist(restored=True))
    registry.register(Booking, factory=lambda _state: Booking(restored=True))
