"""A worker process on a realtime model, for the cross-process test in test_realtime.py.

Run as ``python -m tests._child_realtime --store URL --key KEY --mode save|restore``
from the repository root. One line per fact on stdout::

    SAVED <version> <call_id>   (save) two turns done, the second's tool is running and
                                the checkpoint holding it is stored; waiting to be killed
    REPORT <json>               (restore) what the fake realtime server received: its
                                calls, every item created, and what the first reply saw

The agent and its registry serve test_realtime.py too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from livekit.agents.voice.events import ConversationItemAddedEvent

from livekit_resume import AgentRegistry, ResumableSession, open_store
from livekit_resume.testing.llm import Reply, ToolCall
from tests.lk.fake_realtime import FakeRealtimeModel

INSTRUCTIONS = "You book tables and remember what you are told."


class Concierge(Agent):
    def __init__(self) -> None:
        super().__init__(instructions=INSTRUCTIONS)

    @function_tool
    async def book(self, context: RunContext[dict[str, Any]], what: str) -> str:
        """Book something.

        Args:
            what: what to book
        """
        started, release = context.userdata.get("started"), context.userdata.get("release")
        if isinstance(started, asyncio.Event) and isinstance(release, asyncio.Event):
            started.set()
            await release.wait()  # in the child, never: the process dies first
        return f"booked {what}"


REGISTRY = AgentRegistry()
REGISTRY.register(Concierge)


def describe(item: llm.ChatItem) -> dict[str, Any]:
    """An item as the parent compares it."""
    out: dict[str, Any] = {"id": item.id, "type": item.type}
    if isinstance(item, llm.ChatMessage):
        out.update(role=item.role, text=item.text_content)
    elif isinstance(item, (llm.FunctionCall, llm.FunctionCallOutput)):
        out.update(call_id=item.call_id, name=item.name)
        if isinstance(item, llm.FunctionCallOutput):
            out["output"] = item.output
    return out


async def save(url: str, key: str) -> None:
    model = FakeRealtimeModel(
        ["Hello Ada.", Reply("One moment.", [ToolCall("book", {"what": "a table"})])]
    )
    started = asyncio.Event()
    session: AgentSession[dict[str, Any]] = AgentSession(
        llm=model, userdata={"started": started, "release": asyncio.Event()}
    )
    rs = ResumableSession(open_store(url), key, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    await session.run(user_input="hi, I am Ada")
    # the reply's text is recorded beside the running call; save once both are there
    spoken = asyncio.Event()

    def on_item(ev: ConversationItemAddedEvent) -> None:
        if ev.item.type == "message" and ev.item.text_content == "One moment.":
            spoken.set()

    session.on("conversation_item_added", on_item)
    turn: asyncio.Future[Any] = asyncio.ensure_future(
        session.run(user_input="book a table for two")
    )
    await asyncio.wait_for(asyncio.gather(started.wait(), spoken.wait()), 10)
    version = await rs.checkpoint()
    (call,) = [i for i in session.current_agent.chat_ctx.items if i.type == "function_call"]
    print(f"SAVED {version} {call.call_id}", flush=True)
    await turn  # never returns: the parent kills this process


async def restore(url: str, key: str) -> None:
    model = FakeRealtimeModel(["You are Ada; I could not confirm the table."])
    session: AgentSession[dict[str, Any]] = AgentSession(llm=model, userdata={})
    rs = ResumableSession(open_store(url), key, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge, takeover=True))
    rt = model.active_session
    at_start = list(rt.calls)
    await session.run(user_input="who am I, and is my table booked?")
    report = {
        "resumed": rs.resumed,
        "at_start": at_start,
        "calls": rt.calls,
        "created": rt.created,
        "frames_in": rt.frames_in,
        "instructions": rt.instructions,
        "seen": [[describe(i) for i in r.seen] for r in rt.responses],
    }
    print("REPORT " + json.dumps(report), flush=True)
    await rs.aclose()
    await session.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--mode", choices=["save", "restore"], required=True)
    args = parser.parse_args()
    run = save if args.mode == "save" else restore
    try:
        asyncio.run(run(args.store, args.key))
    except Exception as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
