"""A worker dies (SIGKILL) mid-conversation; another process takes the session over.

The dying worker is ``tests/_child_agent.py``: a real ``AgentSession`` with autosave. It
reports every committed version on stdout and says ``KILL_ME <version>`` once nothing
more will be written, so the test knows exactly which version must come back. The
restore runs here, in the test process, with ``takeover=True``: the dead worker's
lease is still live, as it would be after a real crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import llm

from livekit_resume import ResumableSession, SessionBusy, open_store
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT, ctx_from_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from tests import ROOT, child_env
from tests import _child_agent as child

# The child imports livekit-agents (2-3 s) and runs a few turns; this bounds a hang.
CHILD_DEADLINE = 60.0
# Item types an LLM is sent as the conversation.
CONVERSATION = ("message", "function_call", "function_call_output")


@dataclass
class Target:
    url: str
    env: dict[str, str]
    options: dict[str, Any]

    def open(self) -> Store:
        return open_store(self.url, **self.options)


@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "sqlite":
        return Target(f"sqlite:///{tmp_path}/sessions.db", {}, {})
    pytest.importorskip("livekit_resume.stores.redis", reason="RedisStore is not built yet")
    server = request.getfixturevalue("redis_server")  # skips where redis-server is missing
    namespace = f"x{uuid.uuid4().hex[:10]}"
    return Target(server.url, {"RESUME_NAMESPACE": namespace}, {"namespace": namespace})


class Child:
    """The worker process, read line by line with a deadline."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def expect(self, prefix: str) -> list[str]:
        """Read until a line starting with ``prefix``; return its words after the prefix."""

        async def read() -> list[str]:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"child exited before {prefix!r}:\n{self.output}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if line.startswith("ERROR"):
                    raise AssertionError(f"child failed:\n{self.output}")
                if line.startswith(prefix + " "):
                    return line.split()[1:]

        try:
            return await asyncio.wait_for(read(), CHILD_DEADLINE)
        except TimeoutError:
            raise AssertionError(f"no {prefix!r} from the child:\n{self.output}") from None

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def committed(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("COMMIT ")]

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


@contextlib.asynccontextmanager
async def spawn(target: Target, key: str, *args: str) -> AsyncIterator[Child]:
    env = child_env(**target.env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests._child_agent",
        "--store",
        target.url,
        "--key",
        key,
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    worker = Child(proc)
    try:
        yield worker
    finally:
        await worker.kill()


async def saved_version(store: Store, key: str, version: int) -> Snapshot:
    stored = await store.load(key, version)
    return Codec().decode_parts(key, stored.head, stored.streams)


def assert_same_items(restored: list[llm.ChatItem], saved: list[llm.ChatItem]) -> None:
    """Same ids, same content (LiveKit's `is_equivalent`), same exact timestamps."""
    assert [i.id for i in restored] == [i.id for i in saved]
    assert llm.ChatContext(restored).is_equivalent(llm.ChatContext(saved))
    assert [i.created_at for i in restored] == [i.created_at for i in saved]


def unmarked(item: llm.ChatItem) -> llm.ChatItem:
    """``item`` without the cache breakpoint LiveKit adds to a request's instructions."""
    if isinstance(item, llm.ChatMessage):
        kept = [c for c in item.content if not isinstance(c, llm.CacheBreakpoint)]
        return item.model_copy(update={"content": kept})
    return item


def assert_request_holds(request: llm.ChatContext, saved: list[llm.ChatItem]) -> None:
    """Every saved conversation item is in the request, in order, exactly once."""
    want = [unmarked(i) for i in saved if i.type in CONVERSATION]
    ids = {i.id for i in want}
    got = [unmarked(i) for i in request.items if i.id in ids]
    assert [i.id for i in got] == [i.id for i in want]
    assert llm.ChatContext(got).is_equivalent(llm.ChatContext(want))


async def take_over(store: Store, key: str) -> tuple[Any, Any, ResumableSession, Any]:
    """Restore the session here, the dead worker's lease notwithstanding."""
    with pytest.raises(SessionBusy):
        await store.acquire(key, "an-impatient-worker")  # the dead worker's lease is live
    model, session = child.build_session()
    rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
    agent = await rs.restore(session, default=child.Scribe, takeover=True)
    return model, session, rs, agent


async def test_killed_worker_resumes_at_its_last_committed_turn(target: Target) -> None:
    key = f"room-{uuid.uuid4().hex[:8]}"
    async with spawn(target, key, "--kill-after", "2") as worker:
        await worker.expect("READY")
        turn_one = int((await worker.expect("TURN"))[1])
        turn_two = int((await worker.expect("TURN"))[1])
        last = int((await worker.expect("KILL_ME"))[0])
        await worker.kill()  # SIGKILL: no shutdown callback, no final save, lease kept
    assert turn_one < turn_two <= last
    assert worker.committed() == list(range(1, last + 1))

    store = target.open()
    try:
        snap = await saved_version(store, key, last)
        assert snap.userdata == {"facts": ["the blue door", "the code 4711"]}
        saved_history = ctx_from_data(snap.history).items
        assert snap.agent is not None
        saved_agent = ctx_from_data(snap.agent.chat_ctx).items

        model, session, rs, agent = await take_over(store, key)
        assert rs.resumed and rs.version == last
        assert_same_items(list(session.history.items), saved_history)
        assert session.userdata == child.Notes(facts=["the blue door", "the code 4711"])

        await session.start(agent)
        n = len(saved_history)
        assert_same_items(session.history.items[:n], saved_history)
        assert {i.type for i in session.history.items[n:]} <= {
            "agent_handoff",
            "agent_config_update",
        }

        result = await session.run(user_input="what do you have?")
        assert len(model.requests) == 1  # no greeting, no replay: one request for one turn
        assert_request_holds(model.requests[0].chat_ctx, saved_agent)
        reply = result.events[-1].item
        assert isinstance(reply, llm.ChatMessage)
        assert "the blue door" in (reply.text_content or "")
        assert "the code 4711" in (reply.text_content or "")

        # the new owner writes on, at a higher epoch than the dead worker's
        version = await rs.checkpoint()
        assert version > last
        info = await store.info(key)
        assert info is not None and info.epoch > snap.epoch
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()


async def test_worker_killed_while_a_tool_runs_restores_it_as_interrupted(
    target: Target,
) -> None:
    key = f"room-{uuid.uuid4().hex[:8]}"
    async with spawn(target, key, "--scenario", "slow-tool") as worker:
        await worker.expect("READY")
        (call_id,) = await worker.expect("TOOL")
        last = int((await worker.expect("KILL_ME"))[0])
        await worker.kill()

    store = target.open()
    try:
        snap = await saved_version(store, key, last)
        # the tool was in flight: the snapshot says so, though the history has no trace
        assert [(c.call_id, c.name, c.status) for c in snap.tool_calls] == [
            (call_id, "slow_lookup", "running")
        ]
        assert all(i.get("call_id") != call_id for i in snap.history)

        model, session, rs, agent = await take_over(store, key)
        assert rs.version == last
        calls = [i for i in agent.chat_ctx.items if getattr(i, "call_id", None) == call_id]
        assert [i.type for i in calls] == ["function_call", "function_call_output"]
        call, output = calls
        assert isinstance(call, llm.FunctionCall) and call.name == "slow_lookup"
        assert call.arguments == '{"query": "the weather in Oslo"}'
        assert isinstance(output, llm.FunctionCallOutput)
        assert output.output == INTERRUPTED_OUTPUT and output.is_error
        restored = list(agent.chat_ctx.items)

        await session.start(agent)
        await session.run(user_input="what do you have?")
        request = model.requests[0].chat_ctx
        assert_request_holds(request, restored)
        in_request = [i for i in request.items if getattr(i, "call_id", None) == call_id]
        assert [i.type for i in in_request] == ["function_call", "function_call_output"]
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()


async def test_live_worker_taken_over_by_another_process_is_fenced(target: Target) -> None:
    """The first worker is alive (a zombie: frozen, partitioned, or it missed the move).
    Another process takes over; the zombie's next autosave gets LeaseLost in its own task,
    logs it, and writes nothing; the new owner carries on."""
    key = f"zombie-{uuid.uuid4().hex[:8]}"
    store = target.open()
    try:
        async with spawn(target, key, "--scenario", "zombie", "--kill-after", "1") as worker:
            await worker.expect("TURN")
            await worker.expect("WAITING")
            _model, session, rs, agent = await take_over(store, key)
            await session.start(agent)
            taken = await store.versions(key)

            assert worker.proc.stdin is not None
            worker.proc.stdin.write(b"GO\n")
            await worker.proc.stdin.drain()
            assert await worker.expect("LOST") == ["True"]
            assert any(line.startswith("LOG ") and "stale" in line for line in worker.lines)
            assert await worker.expect("CHECKPOINT") == ["LeaseLost"]
            assert await store.versions(key) == taken  # the zombie changed nothing
            assert worker.proc.returncode is None or worker.proc.returncode == 0

            await session.run(user_input="remember the new owner")
            version = await rs.checkpoint()
            assert version == taken[-1].version + 1
            await rs.aclose()
            await session.aclose()
    finally:
        await store.aclose()


async def test_a_job_process_counts_its_checkpoints_for_the_workers_metrics(
    tmp_path: Path,
) -> None:
    """LiveKit runs each job in a process of its own, and its worker serves /metrics
    from the main process: what a job's hooks count reaches it through prometheus_client's
    multiprocess mode (LiveKit's ``prometheus_multiproc_dir``, guide.md), whose files the
    job process writes as it goes. Killed after its turns, nothing flushed on exit."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    target = Target(
        f"sqlite:///{tmp_path}/sessions.db", {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}, {}
    )
    key = f"metrics-{uuid.uuid4().hex[:8]}"
    async with spawn(target, key, "--kill-after", "2") as worker:
        await worker.expect("KILL_ME")
        committed = len(worker.committed())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics))  # type: ignore[no-untyped-call]
    counted = sum(
        sample.value
        for family in registry.collect()
        if family.name == "livekit_resume_checkpoints"
        for sample in family.samples
        if sample.name == "livekit_resume_checkpoints_total"
    )
    assert committed >= 2 and counted == committed
