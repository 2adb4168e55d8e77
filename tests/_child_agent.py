"""A worker process for the cross-process tests: a real ``AgentSession`` with autosave.

Run as ``python -m tests._child_agent --store URL --key KEY --scenario turns|slow-tool``
from the repository root. It talks to its parent through stdout, one line per fact::

    READY <pid>            restored (or started fresh) and running
    COMMIT <version>       a snapshot was committed (every autosave, as it happens)
    TURN <n> <version>     turn n is committed, up to its last item
    TOOL <call_id>         the slow tool is running (it never finishes)
    KILL_ME <version>      nothing more will be written: version is the last one
    WAITING <pid>          (scenario zombie) alive, waiting for GO on stdin
    LOG <message>          (scenario zombie) an error livekit_resume logged
    LOST <bool>            (scenario zombie) whether autosave stopped on a lost lease
    CHECKPOINT <result>    (scenario zombie) what an explicit checkpoint did

After ``KILL_ME`` the store refuses to go further (commits hang), so the parent can
SIGKILL the process at leisure and still know exactly which version is the last.

The same agent, LLM and userdata serve the parent's restore (``build_session``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from typing import Any

from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from pydantic import BaseModel

from livekit_resume import AgentRegistry, LeaseLost, ResumableSession, open_store
from livekit_resume._demo import WatchedStore
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Commit, Store
from tests.lk.scripted_llm import Reply, ScriptedLLM, ToolCall, Turn, make_text_session

TURNS = (
    "remember the blue door",
    "remember the code 4711",
    "remember the cat is called Tom",
    "remember the train leaves at nine",
)
SLOW_TOOL_PROMPT = "look up the weather in Oslo"
# A commit lands in milliseconds; this bounds a broken store, it is not a timing.
SAVE_TIMEOUT = 20.0
# Fast autosave, so that the tests are quick.
DEBOUNCE = 0.02


class Notes(BaseModel):
    """Userdata: what the user asked to remember."""

    facts: list[str] = []


class Scribe(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You remember facts for the user and look things up.")

    @function_tool
    async def remember(self, context: RunContext[Notes], fact: str) -> str:
        """Remember a fact.

        Args:
            fact: the fact to remember
        """
        context.userdata.facts.append(fact)
        return f"remembered #{len(context.userdata.facts)}: {fact}"

    @function_tool
    async def slow_lookup(self, context: RunContext[Notes], query: str) -> str:
        """Look something up (slowly).

        Args:
            query: what to look up
        """
        print(f"TOOL {context.function_call.call_id}", flush=True)
        await asyncio.Event().wait()  # runs until the process is killed
        return "never"


def rules(ctx: llm.ChatContext) -> Turn:
    """Remember facts, look things up, and otherwise recite what the context holds."""
    last = ctx.items[-1]
    if isinstance(last, llm.FunctionCallOutput):
        return f"ok: {last.output}"
    user = [m.text_content or "" for m in ctx.messages() if m.role == "user"]
    text = user[-1] if user else ""
    call_id = f"call_{uuid.uuid4().hex[:8]}"  # unique across processes
    if text.startswith("remember "):
        return Reply(tool_calls=[ToolCall("remember", {"fact": text[9:]}, call_id=call_id)])
    if text.startswith("look up "):
        return Reply(tool_calls=[ToolCall("slow_lookup", {"query": text[8:]}, call_id=call_id)])
    outputs = [i.output for i in ctx.items if isinstance(i, llm.FunctionCallOutput)]
    return "I have: " + "; ".join(outputs)


def registry() -> AgentRegistry:
    reg = AgentRegistry()
    reg.register(Scribe)
    return reg


def build_session() -> tuple[ScriptedLLM, AgentSession[Any]]:
    model = ScriptedLLM.rule_based(rules)
    return model, make_text_session(model, userdata=Notes())


class _ReportingStore(WatchedStore):
    """Prints every commit; once frozen, hangs every further commit forever."""

    def __init__(self, inner: Store, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.frozen = False
        self.inflight = 0
        self.tool_call_versions: dict[str, int] = {}
        self._codec = Codec(
            signing_keys=os.environ.get("RESUME_SIGNING_KEYS") or None,
            encryption_keys=os.environ.get("RESUME_ENCRYPTION_KEYS") or None,
        )

    async def commit(self, commit: Commit) -> int:
        if self.frozen:
            await asyncio.Event().wait()  # the parent is about to kill us
        self.inflight += 1
        try:
            version = await super().commit(commit)
            _, head = self._codec.unpack(commit.head, context=self.key.encode())
            for call in head.get("tool_calls") or []:
                self.tool_call_versions.setdefault(call["call_id"], version)
            print(f"COMMIT {version}", flush=True)  # before freeze() can report the last one
            return version
        finally:
            self.inflight -= 1
            self._changed.set()

    async def wait_for_tool(self, call_id: str) -> int:
        async def wait() -> int:
            while call_id not in self.tool_call_versions:
                self._changed.clear()
                await self._changed.wait()
            return self.tool_call_versions[call_id]

        return await asyncio.wait_for(wait(), SAVE_TIMEOUT)

    async def freeze(self) -> int:
        """Refuse every further commit, let the one in flight land; the last version."""
        self.frozen = True

        async def drained() -> None:
            while self.inflight:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(drained(), SAVE_TIMEOUT)
        return self.versions_written[-1]


class _Echo(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"LOG {record.getMessage()}", flush=True)


async def zombie(session: AgentSession[Any], rs: ResumableSession) -> None:
    """Stay alive while another process takes the session over, then keep talking."""
    logging.getLogger("livekit_resume").addHandler(_Echo(level=logging.ERROR))
    print(f"WAITING {os.getpid()}", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "GO", line
    await session.run(user_input="remember the zombie was here")
    await asyncio.wait_for(rs._autosave.idle.wait(), SAVE_TIMEOUT)
    print(f"LOST {rs._autosave.lost is not None}", flush=True)
    try:
        version = await rs.checkpoint()
    except LeaseLost:
        print("CHECKPOINT LeaseLost", flush=True)
    else:
        print(f"CHECKPOINT committed {version}", flush=True)


async def main(store_url: str, key: str, scenario: str, kill_after: int) -> None:
    store = _ReportingStore(open_store(store_url), key)
    _model, session = build_session()
    rs = ResumableSession(store, key, registry=registry(), userdata_type=Notes, debounce=DEBOUNCE)
    agent = await rs.restore(session, default=Scribe)
    await session.start(agent)
    print(f"READY {os.getpid()}", flush=True)

    turns = TURNS[:kill_after] if scenario == "turns" else TURNS[:1]
    for n, text in enumerate(turns, 1):
        await session.run(user_input=text)
        await store.wait_saved(session.history.items[-1].id, timeout=SAVE_TIMEOUT)
        print(f"TURN {n} {store.versions_written[-1]}", flush=True)

    if scenario == "zombie":
        await zombie(session, rs)
        return

    if scenario == "slow-tool":
        tool_started = asyncio.Event()
        call_ids: list[str] = []

        def on_update(ev: Any) -> None:
            if ev.update.type == "tool_call_started":
                call_ids.append(ev.update.function_call.call_id)
                tool_started.set()

        session.on("tool_execution_updated", on_update)
        # run() returns an awaitable RunResult, not a coroutine: ensure_future, not create_task
        run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input=SLOW_TOOL_PROMPT))
        await asyncio.wait_for(tool_started.wait(), SAVE_TIMEOUT)
        await store.wait_for_tool(call_ids[0])
        assert not run.done()

    print(f"KILL_ME {await store.freeze()}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--scenario", choices=("turns", "slow-tool", "zombie"), default="turns")
    parser.add_argument("--kill-after", type=int, default=2)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.store, args.key, args.scenario, args.kill_after))
    except BaseException as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
