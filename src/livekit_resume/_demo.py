"""The pieces of ``livekit-resume demo``: a deterministic LLM, two agents and their tools.

Nothing here talks to a network. `DemoLLM` is a real ``llm.LLM`` whose `DemoLLMStream`
sends ``ChatChunk``s like a provider would; its answers follow a few rules over the
request's chat context (the agent's instructions, the last user message, tool outputs),
so everything it "remembers" is read from what LiveKit sent it. That is what makes the
demo a proof: after a restore in another process, the model can only answer "you booked
Monday, Ada" if the restored context really holds the earlier turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
from livekit.agents import Agent, AgentSession, RunContext, RunResult, function_tool, llm
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .agent_hooks.registry import AgentRegistry
from .agent_hooks.session import ResumableSession
from .cli import add_transcript_rows, render_item, transcript_table
from .errors import SnapshotNotFound, StoreUnavailable
from .snapshot.chat import ctx_from_data, item_to_data
from .snapshot.model import ItemData
from .stores.base import (
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    SessionInfo,
    SnapshotInfo,
    Store,
    Stored,
)
from .stores.url import open_store

__all__ = [
    "DEFAULT_DEMO_STORE",
    "Booking",
    "DemoLLM",
    "DemoLLMStream",
    "Receptionist",
    "Visit",
    "WatchedStore",
    "register_agents",
    "run_child",
    "run_demo",
]

RECEPTIONIST_INSTRUCTIONS = (
    "You are the front desk of the Riverside clinic. Learn the caller's name, "
    "then hand them to the booking desk when they want an appointment."
)
_BOOKING_DESK = "You are the booking desk"  # how the LLM tells which agent is asking
BOOKING_INSTRUCTIONS = (
    f"{_BOOKING_DESK} of the Riverside clinic. Book, move or recall the "
    "caller's visit; the caller's name is in the conversation."
)
GREET = "Greet the caller."

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NAME = re.compile(r"\b(?:i am|i'm|my name is|this is)\s+([A-Z][a-z]+)", re.IGNORECASE)
# Words that turn "a day" into "move my booking to that day".
_MOVE_WORDS = ("move", "change", "instead", "reschedule")
_RECALL_WORDS = ("which day", "what day", "remind", "what did i book", "when is")


class Visit(BaseModel):
    """The session's userdata: what the tools learned about the caller's visit."""

    name: str | None = None
    day: str | None = None
    changes: int = 0


# ----------------------------------------------------------------------------- the LLM


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Answer:
    text: str = ""
    calls: Sequence[_Call] = ()


class DemoLLM(llm.LLM[Any]):
    """A small rule-based LLM: same request, same answer. It records what it was sent
    (``requests``) so the demo can check what the model saw after a restore."""

    def __init__(self, *, chunk_words: int = 3) -> None:
        super().__init__()
        self.chunk_words = max(1, chunk_words)
        self.requests: list[llm.ChatContext] = []

    @property
    def model(self) -> str:
        return "demo-rules"

    @property
    def provider(self) -> str:
        return "livekit-resume"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> DemoLLMStream:
        self.requests.append(chat_ctx.copy())
        return DemoLLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class DemoLLMStream(llm.LLMStream):
    """Streams one `_answer` as a provider would: text in chunks, then tool calls."""

    def __init__(
        self,
        demo: DemoLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(demo, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._demo = demo

    async def _run(self) -> None:
        ctx = self._chat_ctx
        answer = _answer(ctx)
        chunk_id = f"demo_{len(ctx.items)}"
        words = answer.text.split(" ") if answer.text else []
        step = self._demo.chunk_words
        for i in range(0, len(words), step):
            piece = " ".join(words[i : i + step]) + (" " if i + step < len(words) else "")
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", content=piece))
        if answer.calls:
            calls = [
                # unique within a conversation, and the same on every run of the demo
                llm.FunctionToolCall(
                    name=c.name,
                    arguments=json.dumps(c.arguments),
                    call_id=f"call_{c.name}_{len(ctx.items)}",
                )
                for c in answer.calls
            ]
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", tool_calls=calls))

    def _send(self, chunk_id: str, delta: llm.ChoiceDelta) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=chunk_id, delta=delta))


def _answer(ctx: llm.ChatContext) -> _Answer:
    """The rules. The persona comes from the instructions, the rest from the context."""
    items = ctx.items
    system = next((m.text_content or "" for m in ctx.messages() if m.role == "system"), "")
    booking = system.startswith(_BOOKING_DESK)
    last = items[-1] if items else None

    if isinstance(last, llm.FunctionCallOutput):
        return _after_tool(ctx, last)
    if (
        isinstance(last, llm.ChatMessage)
        and last.role == "system"
        and GREET in (last.text_content or "")
    ):
        name = _known_name(ctx)
        if booking:
            who = f", {name}" if name else ""
            return _Answer(f"Booking desk here{who}. Which day suits you?")
        return _Answer("Welcome to the Riverside clinic! Who am I speaking with?")

    user = next((m for m in reversed(ctx.messages()) if m.role == "user"), None)
    text = (user.text_content or "") if user is not None else ""
    lowered = text.lower()
    day = next((d for d in _DAYS if d.lower() in lowered), None)

    if not booking:
        if m := _NAME.search(text):
            return _Answer(calls=[_Call("record_name", {"name": m.group(1).capitalize()})])
        if "book" in lowered or "appointment" in lowered:
            return _Answer(calls=[_Call("transfer_to_booking")])
        return _Answer("How can I help you today?")

    if any(w in lowered for w in _RECALL_WORDS):
        booked = _last_booking(ctx)
        if booked is None:
            return _Answer("I don't see a booking yet. Which day suits you?")
        day_, name = booked
        return _Answer(f"You booked {day_} for {name}: I have it right here.")
    if day is not None and any(w in lowered for w in _MOVE_WORDS):
        return _Answer(calls=[_Call("reschedule", {"day": day})])
    if day is not None:
        return _Answer(calls=[_Call("book_visit", {"day": day})])
    return _Answer("Which day would you like?")


def _after_tool(ctx: llm.ChatContext, out: llm.FunctionCallOutput) -> _Answer:
    if out.is_error:
        return _Answer(f"Sorry, that did not work: {out.output}")
    if out.name == "record_name":
        name = _known_name(ctx) or "there"
        return _Answer(f"Nice to meet you, {name}! What can I do for you?")
    if out.name == "book_visit":
        return _Answer(f"All set: {out.output}.")
    if out.name == "reschedule":
        return _Answer(f"Done: {out.output}.")
    return _Answer("Done.")


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


# What book_visit and reschedule answer: "booked Monday for Ada[ (moved from …)]".
_BOOKED = re.compile(r"booked (\w+) for (\w+)")


def _last_booking(ctx: llm.ChatContext) -> tuple[str, str] | None:
    """(day, name) of the latest booking tool output in the context."""
    for item in reversed(ctx.items):
        if isinstance(item, llm.FunctionCallOutput) and not item.is_error:
            m = _BOOKED.search(item.output)
            if m:
                return m.group(1), m.group(2)
    return None


# ---------------------------------------------------------------------------- the agents


class _DemoAgent(Agent):
    """Greets on entry, except when it was rebuilt from a snapshot: LiveKit runs
    ``on_enter`` on every ``start()``, a restore included, and a caller who is mid-way
    through a conversation must not be welcomed again."""

    def __init__(
        self,
        rs: ResumableSession,
        *,
        instructions: str,
        restored: bool = False,
        chat_ctx: llm.ChatContext | None = None,
    ) -> None:
        super().__init__(instructions=instructions, chat_ctx=chat_ctx)
        self._rs = rs
        self._restored = restored

    async def on_enter(self) -> None:
        if self._restored and self._rs.resumed:
            return
        self.session.generate_reply(instructions=GREET)


class Receptionist(_DemoAgent):
    def __init__(self, rs: ResumableSession, *, restored: bool = False) -> None:
        super().__init__(rs, instructions=RECEPTIONIST_INSTRUCTIONS, restored=restored)

    @function_tool
    async def record_name(self, context: RunContext[Visit], name: str) -> str:
        """Remember the caller's name.

        Args:
            name: the caller's first name
        """
        context.userdata.name = name
        return f"name recorded: {name}"

    @function_tool
    async def transfer_to_booking(self, context: RunContext[Visit]) -> Agent:
        """Hand the caller to the booking desk."""
        # the booking desk hears the conversation so far (messages, not our tool calls)
        return Booking(
            self._rs,
            chat_ctx=self.chat_ctx.copy(
                exclude_instructions=True,
                exclude_function_call=True,
                exclude_handoff=True,
                exclude_config_update=True,
            ),
        )


class Booking(_DemoAgent):
    def __init__(
        self,
        rs: ResumableSession,
        *,
        restored: bool = False,
        chat_ctx: llm.ChatContext | None = None,
    ) -> None:
        super().__init__(
            rs, instructions=BOOKING_INSTRUCTIONS, restored=restored, chat_ctx=chat_ctx
        )

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


def register_agents(registry: AgentRegistry, rs: ResumableSession) -> None:
    """Both agents; the registry rebuilds them marked as restored, with the hooks whose
    ``resumed`` flag they check in ``on_enter``."""
    registry.register(Receptionist, factory=lambda _state: Receptionist(rs, restored=True))
    registry.register(Booking, factory=lambda _state: Booking(rs, restored=True))


# ------------------------------------------------------------------------ the runner

DEFAULT_DEMO_STORE = "sqlite:///resume-demo.db"
"""A file in the working directory, so that ``livekit-resume --store sqlite:///resume-demo.db
show KEY`` can look at the demo's session afterwards."""

PART_1 = ("Hi, I'm Ada.", "I'd like to book a check-up.", "Monday, please.")
PART_2 = ("Sorry, which day did I book?", "Can you move it to Tuesday instead?")
# Autosave coalesces a burst of events for this long; short, so that the demo is quick.
DEMO_DEBOUNCE = 0.05
# A turn's autosave lands within milliseconds; this only bounds a broken store.
SAVE_TIMEOUT = 10.0
# The second process imports livekit-agents (2-3 s) and runs two turns.
CHILD_TIMEOUT = 120.0
# Item types an LLM is sent as the conversation (the others are bookkeeping).
_CONVERSATION = ("message", "function_call", "function_call_output")
# What LiveKit itself adds to the history when a restored session starts.
_START_ITEMS = ("agent_handoff", "agent_config_update")


class WatchedStore:
    """A `Store` that forwards every call and remembers each commit: its version, its
    reason and the items it wrote. The demo waits on it ("is this turn saved yet?")
    instead of sleeping, and shows the autosaves of each turn."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.commits: list[tuple[int, str]] = []  # (version, reason), not yet shown
        self.versions_written: list[int] = []
        self.saved_ids: set[str] = set()
        self._changed = asyncio.Event()

    async def wait_saved(self, item_id: str, *, timeout: float = SAVE_TIMEOUT) -> None:
        """Wait until a commit has written ``item_id`` (autosave runs in the background)."""

        async def wait() -> None:
            while item_id not in self.saved_ids:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(
                f"autosave did not write item {item_id!r} within {timeout:.0f}s"
            ) from None

    def take_commits(self) -> list[tuple[int, str]]:
        out, self.commits = self.commits, []
        return out

    async def commit(self, commit: Commit) -> int:
        version = await self.inner.commit(commit)
        self.saved_ids.update(r.id for r in commit.records if r.data is not None)
        self.commits.append((version, str(commit.info.get("reason"))))
        self.versions_written.append(version)
        self._changed.set()
        return version

    async def acquire(
        self, key: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL, takeover: bool = False
    ) -> Lease:
        return await self.inner.acquire(key, owner, ttl=ttl, takeover=takeover)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        return await self.inner.renew(lease, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await self.inner.release(lease)

    async def load(self, key: str, version: int | None = None) -> Stored:
        return await self.inner.load(key, version)

    async def versions(self, key: str) -> list[SnapshotInfo]:
        return await self.inner.versions(key)

    async def info(self, key: str) -> SessionInfo | None:
        return await self.inner.info(key)

    async def keys(self) -> list[str]:
        return await self.inner.keys()

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # what a backend offers beyond the protocol (RedisStore's publish) stays reachable
        return getattr(self.inner, name)


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


def _text_session(model: DemoLLM) -> AgentSession[Visit]:
    # text turns only: no VAD and no turn detector, which would load models for no audio
    return AgentSession(
        llm=model,
        vad=None,
        turn_handling={"turn_detection": None},
        userdata=Visit(),
    )


@dataclass
class _Part:
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


def _hooks(store: WatchedStore, key: str) -> tuple[ResumableSession, DemoLLM, AgentSession[Visit]]:
    registry = AgentRegistry()
    rs = ResumableSession(
        store, key, registry=registry, userdata_type=Visit, debounce=DEMO_DEBOUNCE
    )
    register_agents(registry, rs)
    model = DemoLLM()
    return rs, model, _text_session(model)


async def _suspend(
    rs: ResumableSession,
    session: AgentSession[Visit],
    store: WatchedStore,
    printer: _Printer,
    console: Console,
    answers: list[str],
) -> _Part:
    """End a part: suspend, and record what the process did."""
    agent_ctx = [item_to_data(i) for i in session.current_agent.chat_ctx.items]
    version = await rs.suspend()
    printer.flush()
    part = _Part(
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


async def _part_one(url: str, key: str, console: Console) -> _Part:
    store = WatchedStore(open_store(url))
    try:
        if await store.info(key) is not None:
            raise ValueError(
                f"session {key!r} already exists in {url}: choose another --key "
                f"or remove it (livekit-resume --store {url} rm {key})"
            )
        rs, _model, session = _hooks(store, key)
        agent = await rs.restore(session, default=lambda: Receptionist(rs))
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


async def _part_two(url: str, key: str, console: Console) -> _Part:
    store = WatchedStore(open_store(url))
    try:
        rs, model, session = _hooks(store, key)
        agent = await rs.restore(session, default=lambda: Receptionist(rs))
        if not rs.resumed:
            raise SnapshotNotFound(f"no snapshot of session {key!r} in {url} to resume")
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


def run_child(url: str, key: str, report: str) -> int:
    """Part 2, in its own process: restore, talk, suspend, and report to the parent."""
    with quiet_logs():
        part = asyncio.run(_part_two(url, key, Console(highlight=False)))
    with open(report, "wb") as f:
        f.write(msgpack.packb(asdict(part), use_bin_type=True))
    return 0


async def _spawn(url: str, key: str, report: str, console: Console) -> int:
    env = dict(os.environ)
    if console.is_terminal:
        env["FORCE_COLOR"] = "1"
        env["COLUMNS"] = str(console.width)
    else:
        env.pop("FORCE_COLOR", None)
    argv = [sys.executable, "-m", "livekit_resume", "demo", "--resume-part"]
    argv += ["--store", url, "--key", key, "--report", report]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    assert proc.stdout is not None
    out = console.file

    async def relay() -> int:
        assert proc.stdout is not None
        async for line in proc.stdout:
            out.write(line.decode(errors="replace"))
            out.flush()
        return await proc.wait()

    try:
        return await asyncio.wait_for(relay(), CHILD_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(
            f"the resuming process did not finish within {CHILD_TIMEOUT:.0f}s"
        ) from None


@dataclass
class _Check:
    ok: bool
    what: str


def _check(one: _Part, two: _Part) -> list[_Check]:
    """Compare what part 1 suspended with what part 2 restored and sent to its LLM."""
    checks: list[_Check] = []
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
    checks.append(
        _Check(
            same,
            f"restored history = suspended history: {n} items, same ids, content and "
            f"timestamps (start added only {' + '.join(added) or 'nothing'})",
        )
    )
    checks.append(
        _Check(
            two.resumed and two.restored_version == one.final_version,
            f"part 2 resumed from version {two.restored_version} "
            f"(part 1 suspended at {one.final_version})",
        )
    )
    checks.append(_Check(not two.greeted, "no second greeting after the restore (on_enter)"))

    want = [_unmarked(i) for i in ctx_from_data(one.agent_ctx).items if i.type in _CONVERSATION]
    ids = {i.id for i in want}
    request = ctx_from_data(two.first_request)
    got = [_unmarked(i) for i in request.items if i.id in ids]
    messages = {i.id for i in saved.items if i.type == "message"}
    in_order = [i.id for i in got] == [i.id for i in want] and llm.ChatContext(got).is_equivalent(
        llm.ChatContext(want)
    )
    n_msg = sum(1 for i in want if i.type == "message")
    n_tool = sum(1 for i in want if i.type == "function_call_output")
    checks.append(
        _Check(
            in_order and messages <= ids,
            f"first LLM request after the restore holds the {n_msg} saved messages and "
            f"{n_tool} tool exchange(s) of the agent, in order, once each",
        )
    )
    day, name = one.userdata.get("day"), one.userdata.get("name")
    answer = two.answers[0] if two.answers else ""
    checks.append(
        _Check(
            bool(day and name) and f"{day}" in answer and f"{name}" in answer,
            f"the model answered from the restored context: {answer!r}",
        )
    )
    checks.append(
        _Check(
            two.restored_userdata == one.userdata and two.userdata.get("changes") == 1,
            f"userdata restored {json.dumps(two.restored_userdata)}, then a tool moved "
            f"the visit: {json.dumps(two.userdata)}",
        )
    )
    return checks


def _unmarked(item: llm.ChatItem) -> llm.ChatItem:
    """``item`` without the cache breakpoint LiveKit adds to each request's instructions."""
    if isinstance(item, llm.ChatMessage):
        kept = [c for c in item.content if not isinstance(c, llm.CacheBreakpoint)]
        return item.model_copy(update={"content": kept})
    return item


def run_demo(url: str, key: str | None = None) -> int:
    """The whole demo. Returns the exit code: 0 when the restore matched, else 1."""
    with quiet_logs():
        return _run_demo(url, key)


def _run_demo(url: str, key: str | None) -> int:
    console = Console(highlight=False)
    key = key or f"demo-{uuid.uuid4().hex[:8]}"
    console.print(Rule("[bold]livekit-resume demo[/bold]"))
    console.print(f"store  {escape(url)}\nkey    {escape(key)}\n")
    one = asyncio.run(_part_one(url, key, console))

    console.print()
    console.print(
        f"[dim]starting a new process: {Path(sys.executable).name} -m livekit_resume demo "
        f"--resume-part --store {escape(url)} --key {escape(key)}[/dim]"
    )
    with tempfile.TemporaryDirectory(prefix="livekit-resume-demo-") as tmp:
        report = os.path.join(tmp, "part2.msgpack")
        code = asyncio.run(_spawn(url, key, report, console))
        if code != 0 or not os.path.exists(report):
            console.print(f"[red]the resuming process failed (exit code {code})[/red]")
            console.print("restored conversation matches: no")
            return 1
        with open(report, "rb") as f:
            two = _Part(**msgpack.unpackb(f.read(), raw=False))

    console.print()
    console.print(Rule("[bold]the whole conversation[/bold]"))
    whole = transcript_table(one.history)
    whole.add_row(
        "", Text(f"── process {two.pid} restored v{two.restored_version} ──", style="dim")
    )
    add_transcript_rows(whole, two.history[len(one.history) :])
    console.print(Padding(whole, (0, 0, 0, 2)))
    console.print()
    summary = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("part", "pid", "versions written", "ended at"):
        summary.add_column(col)
    summary.add_row("1", str(one.pid), _span(one.versions), f"v{one.final_version}, suspended")
    summary.add_row(
        "2",
        str(two.pid),
        f"restored v{two.restored_version}, wrote {_span(two.versions)}",
        f"v{two.final_version}, suspended",
    )
    console.print(Padding(summary, (0, 0, 0, 2)))
    console.print()
    checks = _check(one, two)
    marks = Table(show_header=False, box=None, pad_edge=False)
    marks.add_column(no_wrap=True)
    marks.add_column(overflow="fold")
    for c in checks:
        mark = Text("✓", style="green") if c.ok else Text("✗", style="bold red")
        marks.add_row(mark, Text(c.what))
    console.print(Padding(marks, (0, 0, 0, 2)))
    ok = all(c.ok for c in checks)
    console.print()
    console.print(f"[dim]inspect it: livekit-resume --store {escape(url)} show {escape(key)}[/dim]")
    console.print(f"restored conversation matches: {'yes' if ok else 'no'}")
    return 0 if ok else 1


def _span(versions: Sequence[int]) -> str:
    if not versions:
        return "none"
    return f"v{versions[0]}" if len(versions) == 1 else f"v{versions[0]}-v{versions[-1]}"
