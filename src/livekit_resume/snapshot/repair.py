"""Tool calls left without an answer, answered: what a restore adds so the LLM can go on.

A session saved while a tool ran holds a `FunctionCall` without its output, a context
LLM providers refuse. `repair_tool_calls` gives each such call an explicit
error output saying it was interrupted (and, for an async tool that only reported
progress, the ``_final`` pair LiveKit would have written), in place and idempotently.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable

from livekit.agents import llm

from livekit_resume.snapshot.model import ToolCallRecord

__all__ = ["INTERRUPTED_OUTPUT", "NON_BLOCKING_EXTRA", "repair_tool_calls"]

INTERRUPTED_OUTPUT = (
    "interrupted: the session was restored before this call finished; "
    "it may or may not have taken effect. Check before repeating it."
)
"""The output `repair_tool_calls` gives a tool call that never got an answer."""

NON_BLOCKING_EXTRA = "__livekit_agents_tool_non_blocking"
"""The `FunctionCall.extra` key LiveKit sets on a call whose tool reported progress."""
_FINAL_SUFFIX = "_final"  # LiveKit's call id suffix of an async tool's result
_ASYNC_PART = re.compile(r"(.+)_(?:final|update_\d+)")


def _interrupted_output(
    call: llm.FunctionCall, after: llm.ChatItem | None
) -> llm.FunctionCallOutput:
    created_at = math.nextafter(call.created_at, math.inf)
    if after is not None and after.created_at < created_at:
        # the next item shares the call's timestamp: an equal one still sorts after the call
        created_at = call.created_at
    return llm.FunctionCallOutput(
        id=f"{call.id}_interrupted",
        name=call.name,
        call_id=call.call_id,
        output=INTERRUPTED_OUTPUT,
        is_error=True,
        created_at=created_at,
        reply_required=False,
    )


def _progress_only_calls(
    marked: list[llm.FunctionCall], answered: set[str]
) -> list[llm.FunctionCall]:
    """Async-tool calls that got progress outputs but never their result.

    LiveKit marks a call whose tool reported progress (`RunContext.update`) with
    `NON_BLOCKING_EXTRA`; its own output and the ``<call_id>_update_<n>`` pairs are progress
    reports ("the task is still running"), and the result arrives as a ``<call_id>_final``
    pair (also for an error or a None return; a cancelled tool gets none). The update and
    final pairs carry the mark too: they are parts of their call, not calls to answer.
    ``marked``: the calls with the mark, in order; ``answered``: the call ids with an output.
    """
    call_ids = {c.call_id for c in marked}
    found: list[llm.FunctionCall] = []
    seen: set[str] = set()
    for call in marked:
        part = _ASYNC_PART.fullmatch(call.call_id)
        if part is not None and part.group(1) in call_ids:
            continue
        if call.call_id + _FINAL_SUFFIX in answered or call.call_id in seen:
            continue
        seen.add(call.call_id)
        found.append(call)
    return found


def _interrupted_final(
    call: llm.FunctionCall, after: float
) -> tuple[llm.FunctionCall, llm.FunctionCallOutput]:
    # the shape LiveKit gives an async tool's result (a `_final` pair), so every provider
    # formatter handles it as it handles a real one
    call_id = call.call_id + _FINAL_SUFFIX
    created_at = math.nextafter(after, math.inf)
    final_call = llm.FunctionCall(
        id=f"{call.id}_interrupted_call",
        call_id=call_id,
        name=call.name,
        arguments=call.arguments,
        extra=dict(call.extra),
        created_at=created_at,
    )
    output = llm.FunctionCallOutput(
        id=f"{call.id}_interrupted",
        name=call.name,
        call_id=call_id,
        output=INTERRUPTED_OUTPUT,
        is_error=True,
        created_at=math.nextafter(created_at, math.inf),
        reply_required=False,
    )
    return final_call, output


def repair_tool_calls(
    ctx: llm.ChatContext,
    *,
    pending: Iterable[ToolCallRecord] = (),
    now: float | None = None,
    finals: bool = True,
) -> list[llm.FunctionCallOutput]:
    """Answer every unanswered tool call in `ctx` (in place) with an explicit error output.

    Each `pending` record (a call in flight at snapshot time) whose call is not in `ctx`
    first gets its `FunctionCall` item, placed by its `started_at` (or `now`, or the current
    time). Every call without an output of its `call_id` then gets one, `is_error=True`
    with `INTERRUPTED_OUTPUT`, right after it, timestamped just after it so the order stays
    sorted by `created_at`; its id is the call's id + ``"_interrupted"``, so repairing the
    history and an agent's context gives the same ids. `reply_required` is False: a
    restore alone must not make the agent speak. Returns the added outputs; a second run
    adds nothing. `ctx` must be mutable: copy an agent's read-only context first.

    A progress output of an async tool (LiveKit's ``RunContext.update``: "the task is still
    running") is not an answer. A call that has only progress outputs gets the interrupted
    output the way LiveKit delivers an async result: a ``<call_id>_final`` call and output
    pair (item ids: the call's id + ``"_interrupted_call"`` / ``"_interrupted"``) at the
    end of `ctx`, after the progress the model was told about (not with ``finals``
    False: the session's history, which shows such a call as LiveKit left it).
    """
    answered: set[str] = set()
    called: set[str] = set()
    marked: list[llm.FunctionCall] = []  # see _progress_only_calls
    message = llm.ChatMessage
    for i in ctx.items:  # one pass: a restore runs this over every item of the context
        if type(i) is message:
            continue  # the commonest item, neither call nor output: no `isinstance` (an ABC's)
        if isinstance(i, llm.FunctionCallOutput):
            answered.add(i.call_id)
        elif isinstance(i, llm.FunctionCall):
            called.add(i.call_id)
            if i.extra.get(NON_BLOCKING_EXTRA):
                marked.append(i)
    for record in pending:
        if record.call_id in called or record.call_id in answered:
            continue
        if record.started_at is not None:
            started_at = record.started_at
        else:
            started_at = now if now is not None else time.time()
        ctx.insert(
            llm.FunctionCall(
                id=record.item_id or f"item_{record.call_id}",
                call_id=record.call_id,
                name=record.name,
                arguments=record.arguments,
                created_at=started_at,
            )
        )
        called.add(record.call_id)

    added: list[llm.FunctionCallOutput] = []
    items = ctx.items
    index = len(items) if called <= answered else 0  # every call answered: nothing to find
    while index < len(items):
        item = items[index]
        if isinstance(item, llm.FunctionCall) and item.call_id not in answered:
            after = items[index + 1] if index + 1 < len(items) else None
            output = _interrupted_output(item, after)
            items.insert(index + 1, output)
            answered.add(item.call_id)
            added.append(output)
            index += 1
        index += 1

    just_answered = {o.call_id for o in added}
    for call in _progress_only_calls(marked, answered) if finals else ():
        if call.call_id in just_answered:
            continue  # it had no output at all: answered above, right after it
        last = max((i.created_at for i in items), default=call.created_at)
        final_call, output = _interrupted_final(call, last)
        items.extend((final_call, output))
        added.append(output)
    return added
