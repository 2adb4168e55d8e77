"""Hunt: what a SIGKILL loses, checked against what the docs promise (docs/strategies.md,
"Autosave and shutdown"; docs/failure-model.md, "worker crash, `SIGKILL`, OOM").

Each test starts this very module as a child process (``python -m
tests.test_window_hunt --scenario ...``): a real ``AgentSession`` (scripted LLM) with
autosave at the default debounce, which makes one change, waits well past what the docs
say is enough, prints ``DONE`` and waits to be SIGKILLed. The test then takes the
session over in its own process and looks for the change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from livekit.agents import llm

from livekit_resume import ResumableSession, StoreUnavailable, open_store
from livekit_resume._demo import WatchedStore
from livekit_resume.stores.base import Commit, Store
from tests import ROOT, child_env
from tests import _child_agent as child
from tests.lk.scripted_llm import Reply, ScriptedLLM, Turn, make_text_session

CHILD_DEADLINE = 60.0
# The documented default: "Bursts are coalesced (`debounce=0.2` s)" (docs/guide.md).
DEBOUNCE = 0.2
# How long the child waits after a change before it says DONE: five debounce windows.
SETTLE = 5 * DEBOUNCE


# ----------------------------------------------------------------------- the child

STORY_PROMPT = "tell me a long story"


def rules(ctx: llm.ChatContext) -> Turn:
    user = [m.text_content or "" for m in ctx.messages() if m.role == "user"]
    if user and user[-1] == STORY_PROMPT:
        return Reply(text=" ".join(f"word{n}" for n in range(400)), chunk_delay=0.05)
    return child.rules(ctx)


def build_session() -> Any:
    return make_text_session(ScriptedLLM.rule_based(rules), userdata=child.Notes())


class _FlakyStore(WatchedStore):
    """Refuses every commit (StoreUnavailable) while ``down`` is set."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.down = False
        self.refused = 0

    async def commit(self, commit: Commit) -> int:
        if self.down:
            self.refused += 1
            raise StoreUnavailable("the store is down (injected)")
        version = await super().commit(commit)
        print(f"COMMIT {version}", flush=True)
        return version


async def _child(store_url: str, key: str, scenario: str) -> None:
    store = _FlakyStore(open_store(store_url))
    session = build_session()
    rs = ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, debounce=DEBOUNCE
    )
    agent = await rs.restore(session, default=child.Scribe)
    await session.start(agent)
    print(f"READY {os.getpid()}", flush=True)
    # one ordinary turn, saved, as a baseline
    await session.run(user_input=child.TURNS[0])
    await store.wait_saved(session.history.items[-1].id, timeout=20.0)
    await asyncio.wait_for(rs._autosave.idle.wait(), 20.0)
    print("BASE", flush=True)

    # a change LiveKit makes without an event is saved with the next turn (strategies.md)
    if scenario == "instructions":
        await agent.update_instructions("NEW-INSTRUCTIONS: speak like a pirate")
        await session.run(user_input=child.TURNS[1])
    elif scenario == "userdata":
        session.userdata.facts.append("APP-SIDE FACT")
        await session.run(user_input=child.TURNS[1])
    elif scenario == "chat_ctx":
        ctx = agent.chat_ctx.copy()
        ctx.add_message(role="system", content="APP-NOTE: the caller is a VIP")
        await agent.update_chat_ctx(ctx)
        await session.run(user_input=child.TURNS[1])
    elif scenario == "interrupted":
        speech = session.generate_reply(user_input=STORY_PROMPT)
        while not any(  # noqa: ASYNC110 (polls the history: no event says it)
            isinstance(i, llm.ChatMessage)
            and i.role == "user"
            and STORY_PROMPT in (i.text_content or "")
            for i in session.history.items
        ):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # a few chunks of the reply out
        speech.interrupt(force=True)
        await speech.wait_for_playout()
    elif scenario == "outage":
        # the store goes down; a turn meets it; autosave backs off 0.2, 0.4, 0.8, 1.6 s
        store.down = True
        await session.run(user_input=child.TURNS[1])
        # attempts at ~0.2, 0.6, 1.2, 2.2, 4.0 s refused; the next one is due 3.4 s later
        while store.refused < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        store.down = False  # the store is back
        print("BACK", flush=True)
        await session.run(user_input=child.TURNS[2])
        await asyncio.sleep(SETTLE)  # five debounce windows after the store came back
        print("DONE", flush=True)
        await asyncio.Event().wait()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    await asyncio.sleep(SETTLE)
    print("DONE", flush=True)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------- the parent


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.times: dict[str, float] = {}

    async def expect(self, word: str) -> None:
        async def read() -> None:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"child exited before {word!r}:\n{self.output}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                self.times.setdefault(line.split(" ")[0], time.monotonic())
                if line.startswith("ERROR") or line.startswith("Traceback"):
                    raise AssertionError(f"child failed:\n{self.output}")
                if line.split(" ")[0] == word:
                    return

        try:
            await asyncio.wait_for(read(), CHILD_DEADLINE)
        except TimeoutError:
            raise AssertionError(f"no {word!r} from the child:\n{self.output}") from None

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


@contextlib.asynccontextmanager
async def spawn(url: str, key: str, scenario: str) -> AsyncIterator[Child]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.test_window_hunt",
        "--store",
        url,
        "--key",
        key,
        "--scenario",
        scenario,
        cwd=ROOT,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    worker = Child(proc)
    try:
        yield worker
    finally:
        await worker.kill()


async def killed_then_restored(
    tmp_path: Path, scenario: str
) -> tuple[Store, Any, ResumableSession, Any, Child]:
    url = f"sqlite:///{tmp_path}/sessions.db"
    key = f"room-{uuid.uuid4().hex[:8]}"
    async with spawn(url, key, scenario) as worker:
        await worker.expect("READY")
        await worker.expect("BASE")
        await worker.expect("DONE")
        await worker.kill()  # SIGKILL: no close, no final save
    store = open_store(url)
    session = build_session()
    rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
    agent = await rs.restore(session, default=child.Scribe, takeover=True)
    return store, session, rs, agent, worker


def _texts(items: list[llm.ChatItem]) -> list[str]:
    return [i.text_content or "" for i in items if isinstance(i, llm.ChatMessage)]


# ----------------------------------------------------------------------- the tests


async def test_instructions_changed_then_a_turn_then_sigkill_are_restored(
    tmp_path: Path,
) -> None:
    """passes: coverage of the documented limit. ``agent.update_instructions`` (LiveKit
    1.8.9 inserts an ``agent_config_update`` into the history and the agent's context,
    firing no event), a turn, 1 s, SIGKILL: the change is saved with the next turn
    (docs/strategies.md). Without the turn it was lost however long the session idled,
    against the docs of the time (a hunt's finding, documented since)."""
    store, session, rs, agent, worker = await killed_then_restored(tmp_path, "instructions")
    try:
        assert "NEW-INSTRUCTIONS" in str(agent.instructions), (
            f"instructions changed before a turn were lost: restored "
            f"{agent.instructions!r} at version {rs.version}; child:\n{worker.output}"
        )
        updates = [i for i in session.history.items if i.type == "agent_config_update"]
        assert any("NEW-INSTRUCTIONS" in str(getattr(i, "instructions", "")) for i in updates), (
            "the agent_config_update item is not in the restored history"
        )
    finally:
        await rs.aclose()
        await store.aclose()


async def test_userdata_changed_by_the_app_then_a_turn_then_sigkill_is_restored(
    tmp_path: Path,
) -> None:
    """passes: coverage of the documented limit. The application mutates
    ``session.userdata`` outside a tool (no LiveKit event), a turn, 1 s, SIGKILL: the
    change is saved with the next turn (docs/strategies.md)."""
    store, session, rs, _agent, worker = await killed_then_restored(tmp_path, "userdata")
    try:
        assert "APP-SIDE FACT" in session.userdata.facts, (
            f"userdata changed before a turn was lost: restored "
            f"{session.userdata!r} at version {rs.version}; child:\n{worker.output}"
        )
    finally:
        await rs.aclose()
        await store.aclose()


async def test_agent_chat_ctx_edited_by_the_app_then_a_turn_then_sigkill_is_restored(
    tmp_path: Path,
) -> None:
    """passes: coverage of the documented limit. The application adds a system note to
    the agent's context (``agent.update_chat_ctx``, no LiveKit event), a turn, 1 s,
    SIGKILL: the note is saved with the next turn (docs/strategies.md)."""
    store, _session, rs, agent, worker = await killed_then_restored(tmp_path, "chat_ctx")
    try:
        assert any("APP-NOTE" in t for t in _texts(agent.chat_ctx.items)), (
            f"an app edit of the agent's chat_ctx before a turn was lost: "
            f"restored context {_texts(agent.chat_ctx.items)!r} at version {rs.version}; "
            f"child:\n{worker.output}"
        )
    finally:
        await rs.aclose()
        await store.aclose()


async def test_a_turn_made_after_the_store_came_back_survives_a_sigkill_five_debounces_later(
    tmp_path: Path,
) -> None:
    """The store refuses commits for about 4 s (autosave backs off 0.2, 0.4, 0.8, 1.6,
    3.2 s), then answers again; a turn is taken right after, and the worker is SIGKILLed 1 s
    (five debounce windows) after that turn, the store up all that second.

    Expected: both turns are restored. docs/failure-model.md, "store unreachable":
    "the latest state is written when the store is back" / lost: "nothing, unless the
    worker also dies before the store returns"; and a SIGKILL loses only "the last
    debounce window (0.2 s)".
    """
    store, session, rs, _agent, worker = await killed_then_restored(tmp_path, "outage")
    try:
        users = _texts(session.history.items)
        assert child.TURNS[2] in users and child.TURNS[1] in users, (
            f"a turn taken once the store was back, 1 s before the SIGKILL, was lost "
            f"(restored version {rs.version}, history {users!r}); "
            f"child:\n{worker.output}"
        )
    finally:
        await rs.aclose()
        await store.aclose()


async def test_an_interrupted_reply_survives_a_sigkill_a_second_later(tmp_path: Path) -> None:
    """A reply streaming word by word is interrupted (``SpeechHandle.interrupt``);
    LiveKit adds the partial assistant message (``interrupted=True``); SIGKILL 1 s later.

    Expected: the partial reply is restored, marked interrupted. docs/snapshots.md:
    "what the caller actually heard is in the history (an interrupted message holds the
    partial text)"; docs/failure-model.md: lost is "the last debounce window (0.2 s)
    and a reply still streaming" (this one had stopped a second before).
    passes: coverage (no existing test kills a worker after an interrupted reply).
    """
    store, session, rs, _agent, worker = await killed_then_restored(tmp_path, "interrupted")
    try:
        replies = [
            i
            for i in session.history.items
            if isinstance(i, llm.ChatMessage)
            and i.role == "assistant"
            and (i.text_content or "").startswith("word0")
        ]
        assert replies and replies[-1].interrupted, (
            f"the interrupted reply was lost (restored version {rs.version}: "
            f"{_texts(session.history.items)!r}); child:\n{worker.output}"
        )
    finally:
        await rs.aclose()
        await store.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--scenario", required=True)
    args = parser.parse_args()
    try:
        asyncio.run(_child(args.store, args.key, args.scenario))
    except BaseException as e:
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
