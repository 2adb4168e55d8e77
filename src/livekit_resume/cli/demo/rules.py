"""The demo's model: `livekit_resume.testing.llm.ScriptedLLM` answering by rules.

Same request, same answer. The persona comes from the agent's instructions, the rest
from the request's chat context (the last user message, tool outputs), so everything
the model "remembers" is read from what LiveKit sent it. That is what makes the demo a
proof: after a restore in another process, the model can only answer "you booked
Monday, Ada" if the restored context really holds the earlier turns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from livekit.agents import llm

from ...testing.llm import ScriptedLLM, ToolCall, Turn
from .agents import BOOKING_DESK, GREET

__all__ = ["answer", "demo_llm"]

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NAME = re.compile(r"\b(?:i am|i'm|my name is|this is)\s+([A-Z][a-z]+)", re.IGNORECASE)
# Words that turn "a day" into "move my booking to that day".
_MOVE_WORDS = ("move", "change", "instead", "reschedule")
_RECALL_WORDS = ("which day", "what day", "remind", "what did i book", "when is")
# What book_visit and reschedule answer: "booked Monday for Ada[ (moved from …)]".
_BOOKED = re.compile(r"booked (\w+) for (\w+)")
# Words per streamed chunk: a reply arrives in pieces, as from a provider.
_CHUNK_WORDS = 3


def demo_llm() -> ScriptedLLM:
    """A fresh model for one process of the demo; ``requests`` records what it was sent."""
    return ScriptedLLM.rule_based(
        answer, chunk_words=_CHUNK_WORDS, model="demo-rules", provider="livekit-resume"
    )


def answer(ctx: llm.ChatContext) -> Turn:
    """The rules: one answer for one request."""
    last = ctx.items[-1] if ctx.items else None
    if isinstance(last, llm.FunctionCallOutput):
        return _after_tool(ctx, last)
    booking = _instructions(ctx).startswith(BOOKING_DESK)
    if _asks_for_greeting(last):
        return _greeting(ctx, booking=booking)
    user = next((m for m in reversed(ctx.messages()) if m.role == "user"), None)
    text = (user.text_content or "") if user is not None else ""
    return _booking_desk(ctx, text) if booking else _front_desk(ctx, text)


def _call(ctx: llm.ChatContext, tool: str, /, **arguments: Any) -> list[ToolCall]:
    # the call id is unique within a conversation, and the same on every run of the demo
    return [ToolCall(tool, arguments, call_id=f"call_{tool}_{len(ctx.items)}")]


def _instructions(ctx: llm.ChatContext) -> str:
    return next((m.text_content or "" for m in ctx.messages() if m.role == "system"), "")


def _asks_for_greeting(item: llm.ChatItem | None) -> bool:
    return (
        isinstance(item, llm.ChatMessage)
        and item.role == "system"
        and GREET in (item.text_content or "")
    )


def _greeting(ctx: llm.ChatContext, *, booking: bool) -> Turn:
    if not booking:
        return "Welcome to the Riverside clinic! Who am I speaking with?"
    name = _known_name(ctx)
    who = f", {name}" if name else ""
    return f"Booking desk here{who}. Which day suits you?"


def _front_desk(ctx: llm.ChatContext, text: str) -> Turn:
    lowered = text.lower()
    if m := _NAME.search(text):
        return _call(ctx, "record_name", name=m.group(1).capitalize())
    if "book" in lowered or "appointment" in lowered:
        return _call(ctx, "transfer_to_booking")
    return "How can I help you today?"


def _booking_desk(ctx: llm.ChatContext, text: str) -> Turn:
    lowered = text.lower()
    day = next((d for d in _DAYS if d.lower() in lowered), None)
    if any(w in lowered for w in _RECALL_WORDS):
        booked = _last_booking(ctx)
        if booked is None:
            return "I don't see a booking yet. Which day suits you?"
        day_, name = booked
        return f"You booked {day_} for {name}: I have it right here."
    if day is not None and any(w in lowered for w in _MOVE_WORDS):
        return _call(ctx, "reschedule", day=day)
    if day is not None:
        return _call(ctx, "book_visit", day=day)
    return "Which day would you like?"


def _after_tool(ctx: llm.ChatContext, out: llm.FunctionCallOutput) -> Turn:
    if out.is_error:
        return f"Sorry, that did not work: {out.output}"
    if out.name == "record_name":
        name = _known_name(ctx) or "there"
        return f"Nice to meet you, {name}! What can I do for you?"
    if out.name == "book_visit":
        return f"All set: {out.output}."
    if out.name == "reschedule":
        return f"Done: {out.output}."
    return "Done."


def _known_name(ctx: llm.ChatContext) -> str | None:
    """The caller's name, from a record_name call or a user message in the context."""
    for item in reversed(ctx.items):
        if isinstance(item, llm.FunctionCall) and item.name == "record_name":
            name = json.loads(item.arguments or "{}").get("name")
            if isinstance(name, str):
                return name
        if isinstance(item, llm.ChatMessage) and item.role == "user":
            m = _NAME.search(item.text_content or "")
            if m:
                return m.group(1).capitalize()
    return None


def _last_booking(ctx: llm.ChatContext) -> tuple[str, str] | None:
    """(day, name) of the latest booking tool output in the context."""
    for item in reversed(ctx.items):
        if isinstance(item, llm.FunctionCallOutput) and not item.is_error:
            m = _BOOKED.search(item.output)
            if m:
                return m.group(1), m.group(2)
    return None
