"""The two halves of the demo, one per process: part 1 talks and suspends, part 2
restores in a new process, talks on and suspends again. Each returns a `Part`, what the
process did, for the parent to print and check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack
from livekit.agents import AgentSession, RunResult, llm
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.rule import Rule

from ... import redact
from ...agent_hooks.registry import AgentRegistry
from ...agent_hooks.session import ResumableSession
from ...errors import SnapshotNotFound
from ...snapshot.chat import item_to_data
from ...snapshot.model import ItemData
from ...stores.url import open_store
from ...testing.llm import ScriptedLLM, make_text_session
from ..render import render_item, transcript_table
from .agents import Receptionist, Visit, register_agents
from .rules import demo_llm
from .watched import WatchedStore

__all__ = ["PART_1", "PART_2", "Part", "part_one", "quiet_logs", "read_report", "run_child"]

PART_1 = ("Hi, I'm Ada.", "I'd like to book a check-up.", "Monday, please.")
PART_2 = ("Sorry, which day did I book?", "Can you move it to Tuesday instead?")
# Autosave coalesces a burst of events for this long; short, so that the demo is quick.
DEMO_DEBOUNCE = 0.05


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """LiveKit logs every turn; during the demo its output is the transcript. Levels are
    put back afterwards (the demo may run inside another program, or a test)."""
    levels = {
        "livekit": logging.ERROR,
        "livekit.agents": logging.ERROR,
        "livekit.plugins": logging.ERROR,
        "livekit_resume": logging.WARNING,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Part:
    """What one process did, to print and to check."""

    pid: int
    versions: list[int]
    final_version: int
    history: list[ItemData]  # the session history when the part ended
    agent_ctx: list[ItemData]  # the current agent's context when the part ended
    userdata: dict[str, Any]
    answers: list[str]
    # only the resuming part:
    resumed: bool = False
    restored_version: int = 0
    restored_history: list[ItemData] = field(default_factory=list)  # after start()
    restored_userdata: dict[str, Any] = field(default_factory=dict)
    greeted: bool = False
    first_request: list[ItemData] = field(default_factory=list)


class _Printer:
    """Prints a session's history as it grows, with the autosaves of each turn."""

    def __init__(self, console: Console, history: llm.ChatContext, store: WatchedStore):
        self.console = console
        self.history = history
        self.store = store
        self.printed = 0

    def skip(self) -> None:
        self.printed = len(self.history.items)

    def flush(self) -> None:
        items = self.history.items[self.printed :]
        self.printed += len(items)
        rows = [item_to_data(i) for i in items]
        if any(render_item(r) is not None for r in rows):
            self.console.print(Padding(transcript_table(rows), (0, 0, 0, 2)))
        commits = self.store.take_commits()
        if commits:
            saved = ", ".join(f"v{v} ({reason})" for v, reason in commits)
            self.console.print(f"      [dim]autosaved {saved}[/dim]")


async def _turns(
    session: AgentSession[Visit], store: WatchedStore, printer: _Printer, lines: Sequence[str]
) -> list[str]:
    """Run text turns; after each, wait until autosave has written it, then print it."""
    answers: list[str] = []
    for text in lines:
        result: RunResult[None] = await session.run(user_input=text)
        await store.wait_saved(session.history.items[-1].id)
        printer.flush()
        answers.append(
            " ".join(
                e.item.text_content or ""
                for e in result.events
                if isinstance(e.item, llm.ChatMessage) and e.item.role == "assistant"
            )
        )
    return answers


def _hooks(
    store: WatchedStore, key: str
) -> tuple[ResumableSession, ScriptedLLM, AgentSession[Visit]]:
    registry = AgentRegistry()
    rs = ResumableSession(
        store, key, registry=registry, userdata_type=Visit, debounce=DEMO_DEBOUNCE
    )
    register_agents(registry)
    model = demo_llm()
    # text turns only: no VAD and no turn detector, which would load models for no audio
    session: AgentSession[Visit] = make_text_session(model, userdata=Visit())
    return rs, model, session


async def _suspend(
    rs: ResumableSession,
    session: AgentSession[Visit],
    store: WatchedStore,
    printer: _Printer,
    console: Console,
    answers: list[str],
) -> Part:
    """End a part: suspend, and record what the process did."""
    agent_ctx = [item_to_data(i) for i in session.current_agent.chat_ctx.items]
    version = await rs.suspend()
    printer.flush()
    part = Part(
        pid=os.getpid(),
        versions=list(store.versions_written),
        final_version=version,
        history=[item_to_data(i) for i in session.history.items],
        agent_ctx=agent_ctx,
        userdata=session.userdata.model_dump(mode="json"),
        answers=answers,
    )
    console.print(f"  [bold]suspended at version {version}[/bold] (lease released, session closed)")
    console.print(f"  userdata {escape(json.dumps(part.userdata))}")
    return part


def _store(url: str, namespace: str | None) -> WatchedStore:
    """The demo's store, in ``namespace`` (--namespace) or the environment's."""
    options: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
    return WatchedStore(open_store(url, **options))


async def part_one(url: str, key: str, console: Console, namespace: str | None = None) -> Part:
    store = _store(url, namespace)
    try:
        if await store.info(key) is not None:
            raise ValueError(
                f"session {key!r} already exists in {redact.url(url)}: choose another "
                f"--key or remove it (livekit-resume --store {redact.url(url)} rm {key})"
            )
        rs, _model, session = _hooks(store, key)
        agent = await rs.restore(session, default=Receptionist)
        printer = _Printer(console, session.history, store)
        console.print(
            Rule(f"[bold]part 1[/bold] · process {os.getpid()} · a fresh session", align="left")
        )
        await (await session.start(agent, capture_run=True))
        printer.flush()
        answers = await _turns(session, store, printer, PART_1)
        return await _suspend(rs, session, store, printer, console, answers)
    finally:
        await store.aclose()


async def _part_two(url: str, key: str, console: Console, namespace: str | None) -> Part:
    store = _store(url, namespace)
    try:
        rs, model, session = _hooks(store, key)
        agent = await rs.restore(session, default=Receptionist)
        if not rs.resumed:
            raise SnapshotNotFound(f"no snapshot of session {key!r} in {redact.url(url)} to resume")
        restored_userdata = session.userdata.model_dump(mode="json")
        console.print(
            Rule(
                f"[bold]part 2[/bold] · process {os.getpid()} · restored version {rs.version}",
                align="left",
            )
        )
        console.print(
            f"  restored {len(session.history.items)} history items, agent "
            f"[bold]{type(agent).__name__}[/bold]\n"
            f"  userdata {escape(json.dumps(restored_userdata))}\n"
            f"  rs.resumed is {rs.resumed}: on_enter skips the greeting"
        )
        restored_version = rs.version
        printer = _Printer(console, session.history, store)
        printer.skip()
        await (await session.start(agent, capture_run=True))
        greeted = bool(model.requests)
        restored_history = [item_to_data(i) for i in session.history.items]
        printer.skip()  # LiveKit's own start items (handoff, config update)
        answers = await _turns(session, store, printer, PART_2)
        part = await _suspend(rs, session, store, printer, console, answers)
        return replace(
            part,
            resumed=rs.resumed,
            restored_version=restored_version,
            restored_history=restored_history,
            restored_userdata=restored_userdata,
            greeted=greeted,
            first_request=[item_to_data(i) for i in model.requests[0].items]
            if model.requests
            else [],
        )
    finally:
        await store.aclose()


def run_child(url: str, key: str, report: str, namespace: str | None = None) -> int:
    """Part 2, in its own process: restore, talk, suspend, and report to the parent."""
    with quiet_logs():
        part = asyncio.run(_part_two(url, key, Console(highlight=False), namespace))
    with open(report, "wb") as f:
        f.write(msgpack.packb(asdict(part), use_bin_type=True))
    return 0


def read_report(path: str) -> Part:
    """What `run_child` reported."""
    with open(path, "rb") as f:
        return Part(**msgpack.unpackb(f.read(), raw=False))
