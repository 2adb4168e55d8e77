"""What the demo proves: it compares what part 1 suspended with what part 2 restored
and sent to its LLM, one `Check` per claim."""

from __future__ import annotations

import json
from dataclasses import dataclass

from livekit.agents import llm

from ...snapshot.chat import ctx_from_data
from .parts import Part

__all__ = ["Check", "checks"]

# Item types an LLM is sent as the conversation (the others are bookkeeping).
_CONVERSATION = ("message", "function_call", "function_call_output")
# What LiveKit itself adds to the history when a restored session starts.
_START_ITEMS = ("agent_handoff", "agent_config_update")


@dataclass
class Check:
    ok: bool
    what: str


def checks(one: Part, two: Part) -> list[Check]:
    """Every claim of the demo, checked."""
    return [
        _same_history(one, two),
        Check(
            two.resumed and two.restored_version == one.final_version,
            f"part 2 resumed from version {two.restored_version} "
            f"(part 1 suspended at {one.final_version})",
        ),
        Check(not two.greeted, "no second greeting after the restore (on_enter)"),
        _first_request(one, two),
        _answered_from_context(one, two),
        Check(
            two.restored_userdata == one.userdata and two.userdata.get("changes") == 1,
            f"userdata restored {json.dumps(two.restored_userdata)}, then a tool moved "
            f"the visit: {json.dumps(two.userdata)}",
        ),
    ]


def _same_history(one: Part, two: Part) -> Check:
    """The restored history begins with the suspended one, exactly; start added only
    LiveKit's own items."""
    saved = ctx_from_data(one.history)
    restored = ctx_from_data(two.restored_history)
    n = len(saved.items)
    prefix = llm.ChatContext(restored.items[:n])
    added = [i.type for i in restored.items[n:]]
    same = (
        [i.id for i in prefix.items] == [i.id for i in saved.items]
        and saved.is_equivalent(prefix)
        and [i.created_at for i in prefix.items] == [i.created_at for i in saved.items]
        and all(t in _START_ITEMS for t in added)
    )
    return Check(
        same,
        f"restored history = suspended history: {n} items, same ids, content and "
        f"timestamps (start added only {' + '.join(added) or 'nothing'})",
    )


def _first_request(one: Part, two: Part) -> Check:
    """The first LLM request after the restore holds the agent's saved conversation."""
    want = [_unmarked(i) for i in ctx_from_data(one.agent_ctx).items if i.type in _CONVERSATION]
    ids = {i.id for i in want}
    request = ctx_from_data(two.first_request)
    got = [_unmarked(i) for i in request.items if i.id in ids]
    messages = {i.id for i in ctx_from_data(one.history).items if i.type == "message"}
    in_order = [i.id for i in got] == [i.id for i in want] and llm.ChatContext(got).is_equivalent(
        llm.ChatContext(want)
    )
    n_msg = sum(1 for i in want if i.type == "message")
    n_tool = sum(1 for i in want if i.type == "function_call_output")
    return Check(
        in_order and messages <= ids,
        f"first LLM request after the restore holds the {n_msg} saved messages and "
        f"{n_tool} tool exchange(s) of the agent, in order, once each",
    )


def _answered_from_context(one: Part, two: Part) -> Check:
    day, name = one.userdata.get("day"), one.userdata.get("name")
    answer = two.answers[0] if two.answers else ""
    return Check(
        bool(day and name) and f"{day}" in answer and f"{name}" in answer,
        f"the model answered from the restored context: {answer!r}",
    )


def _unmarked(item: llm.ChatItem) -> llm.ChatItem:
    """``item`` without the cache breakpoint LiveKit adds to each request's instructions."""
    if isinstance(item, llm.ChatMessage):
        kept = [c for c in item.content if not isinstance(c, llm.CacheBreakpoint)]
        return item.model_copy(update={"content": kept})
    return item
