"""A worker or operator of ANY release of livekit-resume, for tests/test_hunt_upgrade.py.

Run as ``python tests/_upgrade_child.py SPEC`` with ``PYTHONPATH=<that release's src>``
(an old release from a git worktree, or this one). SPEC is JSON::

    {"url": STORE_URL, "namespace": NS or null, "ops": [OP, ...]}

Each op prints one line ``RESULT <json>``; the process ends with ``os._exit(0)`` so that
a session left live (op "write" with ``then`` "crash", "pause" or "tool") keeps its lease,
as after a crash. Ops:

- ``{"op": "write", "key": K, "turns": [...], "then": "suspend"|"pause"|"end"|"crash"|
  "tool", "whole": N, "takeover": bool}``: restore K (or start it fresh), run each user
  turn (a checkpoint after each), ``whole`` more checkpoints each written whole (a log
  that grows past its compaction threshold), then end as ``then`` says. Reports the
  transcript, the userdata, the agent's state, the version, ``resumed``; or the error.
- ``{"op": "archive", "key": K}``: keep K's ended conversation aside (``archive_stale``).
- ``{"op": "cli", "args": [...], "input": str}``: this release's command line, in process.

Uses only livekit-agents and ``livekit_resume`` (public API and its ``testing.llm``, the
same in every release since the first format).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
import uuid
from typing import Any

from livekit.agents import Agent, RunContext, function_tool, llm
from pydantic import BaseModel

import livekit_resume as lr
from livekit_resume.testing.llm import Reply, ScriptedLLM, ToolCall, make_text_session

__all__ = ["ScriptedLLM", "make_text_session"]

TOOL_RUNNING: asyncio.Event | None = None


class Notes(BaseModel):
    facts: list[str] = []


class Scribe(Agent):
    def __init__(self, count: int = 0) -> None:
        super().__init__(instructions="You remember facts for the user and look things up.")
        self.count = count

    def snapshot_state(self) -> dict[str, Any]:
        return {"count": self.count}

    @function_tool
    async def remember(self, context: RunContext[Notes], fact: str) -> str:
        """Remember a fact.

        Args:
            fact: the fact to remember
        """
        context.userdata.facts.append(fact)
        self.count += 1
        return f"remembered #{len(context.userdata.facts)}: {fact}"

    @function_tool
    async def slow_lookup(self, context: RunContext[Notes], query: str) -> str:
        """Look something up (slowly).

        Args:
            query: what to look up
        """
        assert TOOL_RUNNING is not None
        TOOL_RUNNING.set()
        await asyncio.Event().wait()
        return "never"


def rules(ctx: llm.ChatContext) -> Any:
    last = ctx.items[-1]
    if isinstance(last, llm.FunctionCallOutput):
        return f"ok: {last.output}"
    user = [m.text_content or "" for m in ctx.messages() if m.role == "user"]
    text = user[-1] if user else ""
    call_id = f"call_{uuid.uuid4().hex[:8]}"
    if text.startswith("remember "):
        return Reply(tool_calls=[ToolCall("remember", {"fact": text[9:]}, call_id=call_id)])
    if text.startswith("look up "):
        return Reply(tool_calls=[ToolCall("slow_lookup", {"query": text[8:]}, call_id=call_id)])
    return f"you said {text}"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Scribe, factory=lambda state: Scribe(**state))
    return reg


def transcript(items: list[Any]) -> list[str]:
    """The conversation an LLM is sent, as comparable lines."""
    out = []
    for item in items:
        if item.type == "message":
            out.append(f"{item.role}: {item.text_content}")
        elif item.type == "function_call":
            out.append(f"call {item.name} {item.arguments}")
        elif item.type == "function_call_output":
            out.append(f"output {item.output}")
    return out


def error(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "message": str(e)}


KEEP: list[Any] = []  # live sessions left running until the process exits


async def write(store: Any, op: dict[str, Any]) -> dict[str, Any]:
    global TOOL_RUNNING
    TOOL_RUNNING = asyncio.Event()
    session = make_text_session(ScriptedLLM.rule_based(rules), userdata=Notes())
    rs = lr.ResumableSession(
        store, op["key"], registry=registry(), userdata_type=Notes, autosave=False
    )
    try:
        agent = await rs.restore(session, default=Scribe, takeover=op.get("takeover", False))
    except Exception as e:
        return error(e)
    resumed = rs.resumed
    await session.start(agent)
    versions = []
    for line in op.get("turns", []):
        await session.run(user_input=line)
        versions.append(await rs.checkpoint("turn"))
    for _ in range(op.get("whole", 0)):
        rs._capture.rewrite = True  # the next commit writes every stream whole
        versions.append(await rs.checkpoint("manual"))
    then = op.get("then", "suspend")
    if then == "tool":
        KEEP.append(asyncio.ensure_future(session.run(user_input="look up the weather")))
        await asyncio.wait_for(TOOL_RUNNING.wait(), 20)
        versions.append(await rs.checkpoint("tool"))
    out = {
        "key": op["key"],
        "resumed": resumed,
        "transcript": transcript(session.history.items),
        "facts": session.userdata.facts,
        "count": getattr(session.current_agent, "count", None),
        "versions": versions,
    }
    if then == "pause":
        versions.append(await rs.pause())
    elif then == "suspend":
        versions.append(await rs.suspend())
    elif then == "end":
        versions.append(await rs.end())
    else:
        KEEP.append((rs, session))  # crash/tool: left live, lease held
    out["version"] = rs.version
    return out


async def archive(store: Any, op: dict[str, Any]) -> dict[str, Any]:
    """This release's ``archive_stale`` (what ``resumable_job`` runs before a restore):
    an ended conversation is kept aside under ``<key>~v<version>``."""
    from livekit_resume.agent_hooks.job import archive_stale
    from livekit_resume.bridge import codec_for

    try:
        kept = await archive_stale(store, codec_for(store), op["key"], older_than=None, owner="op")
    except Exception as e:
        return error(e)
    return {"archived": kept}


def cli(op: dict[str, Any], url: str) -> dict[str, Any]:
    from typer.testing import CliRunner

    from livekit_resume.cli import app

    result = CliRunner().invoke(app, ["--store", url, *op["args"]], input=op.get("input"))
    return {
        "exit_code": result.exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "exception": None
        if result.exception is None or isinstance(result.exception, SystemExit)
        else repr(result.exception),
    }


async def main(spec: dict[str, Any]) -> None:
    url = spec["url"]
    if spec.get("namespace"):
        os.environ["RESUME_NAMESPACE"] = spec["namespace"]
    opts: dict[str, Any] = {"namespace": spec["namespace"]} if spec.get("namespace") else {}
    if spec.get("ttl"):
        os.environ["RESUME_TTL"] = str(spec["ttl"])
        opts["ttl"] = spec["ttl"]
    store = lr.open_store(url, **opts)
    try:
        for op in spec["ops"]:
            try:
                if op["op"] == "write":
                    result = await write(store, op)
                elif op["op"] == "archive":
                    result = await archive(store, op)
                elif op["op"] == "cli":
                    result = await asyncio.to_thread(cli, op, url)
                else:
                    raise ValueError(op)
            except BaseException as e:
                result = {**error(e), "traceback": traceback.format_exc()}
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
