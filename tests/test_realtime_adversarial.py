"""An adversarial pass over the restore of an agent on a realtime model: the rebuild, the
options reapplied to the model, and the first context sync LiveKit makes at start.

Each test drives a real `AgentSession` on our fake realtime server
(tests/lk/fake_realtime.py); where a test needs a model that misbehaves, it subclasses
the fake *model*, never livekit-agents.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, llm
from typer.testing import CliRunner

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.cli import app
from livekit_resume.snapshot.chat import ctx_from_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests._child_realtime import REGISTRY, Concierge
from tests.lk import Reply, ToolCall
from tests.lk.fake_realtime import FakeRealtimeModel, FakeRealtimeSession

KEY = "rt-adversarial"
CONVERSATION = ("message", "function_call", "function_call_output")
DEADLINE = 20.0  # a bound on a hang, not a timing


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.aclose()


async def latest(store: Store) -> Snapshot:
    rs = lr.ResumableSession(store, "codec-only", registry=REGISTRY)
    return from_stored(rs._capture.codec, await store.load(KEY))


def conversation_ids(items: list[llm.ChatItem]) -> list[str]:
    return [i.id for i in items if i.type in CONVERSATION]


async def saved_conversation(
    store: Store, sessions: list[AgentSession[Any]], **options: Any
) -> list[str]:
    """Two turns on a realtime model, its options changed at run time to ``options``,
    checkpointed and closed; returns the ids of the agent's saved conversation."""
    model = FakeRealtimeModel(["Hello Ada.", "You said hi."])
    session: AgentSession[Any] = AgentSession(llm=model)
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="what did I say?")
    if options:
        model.active_session.update_options(**options)
    await rs.checkpoint()
    saved = conversation_ids(session.current_agent.chat_ctx.items)
    assert len(saved) == 4
    await rs.aclose()
    return saved


async def test_restore_into_a_session_already_started_is_refused_and_loses_nothing(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """`restore` runs before `session.start()`. Into a session already running, the
    agent it rebuilds is never started: the saved items went into the live history, the
    live agent (whose context is empty) stayed current, and its next checkpoint replaced
    the saved agent context with that empty one: the model's conversation was lost for
    every later restore. It must be refused before anything is touched."""
    saved = await saved_conversation(store, sessions)
    running: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel(["fresh"]))
    sessions.append(running)
    await running.start(Concierge())
    before = list(running.history.items)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    with pytest.raises(RuntimeError, match=r"before session\.start\(\)"):
        await rs.restore(running, default=Concierge)
    assert running.history.items == before
    with pytest.raises(RuntimeError):
        await rs.checkpoint()  # nothing attached: nothing can overwrite the snapshot

    # the key is free and the conversation intact: a proper restore gives it back whole
    model = FakeRealtimeModel(["You are Ada."])
    fresh: AgentSession[Any] = AgentSession(llm=model)
    sessions.append(fresh)
    rs2 = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await fresh.start(await rs2.restore(fresh, default=Concierge))
    assert [i.id for i in model.active_session.remote.items] == saved
    await rs2.aclose()


async def test_a_saved_option_the_model_refuses_does_not_fail_the_restore(
    store: MemoryStore, sessions: list[AgentSession[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """docs/realtime.md: options are reapplied as a courtesy, and those the model does not
    take are logged and left out. A value the model's ``update_options`` refuses raised
    out of `restore` (an untyped ValueError): the whole conversation could not be
    restored over a voice. The refused option is logged, the others are set, and the
    conversation reaches the model."""
    saved = await saved_conversation(store, sessions, voice="echo", tool_choice="none")
    model = FakeRealtimeModel(["You are Ada."], voice="alloy")
    model.refused_voices.add("echo")  # a voice this version of the plugin no longer offers
    session: AgentSession[Any] = AgentSession(llm=model)
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    assert rs.resumed
    rt = model.active_session
    assert [i.id for i in rt.remote.items] == saved
    assert rt.options.voice == "alloy" and rt.options.tool_choice == "none"
    assert "voice" in caplog.text and "not offered" in caplog.text
    await rs.aclose()


class SlowToListen:
    """A store (a `MemoryStore` underneath) whose command inbox opens, and whose events
    go out, only once ``gate`` opens: a restore's last round trips (subscribing to remote
    commands, telling the other workers) on a slow network."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.announcing = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        self.announcing.set()
        await self.gate.wait()

    def commands(self) -> Any:
        return _SlowChannel(self.inner.commands(), self.gate)


class _SlowChannel:
    def __init__(self, inner: Any, gate: asyncio.Event) -> None:
        self.inner, self.gate = inner, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextlib.asynccontextmanager
    async def inbox(self, key: str) -> AsyncIterator[Any]:
        await self.gate.wait()
        async with self.inner.inbox(key) as inbox:
            yield inbox


async def test_a_restore_cancelled_twice_in_its_last_step_leaves_no_lease_behind(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """`restore`: "the lease is released on failure". A restore cancelled in its last
    step (subscribing to commands, announcing) undoes itself; cancelled again while it
    did so (a job's shutdown cancelling twice), the undo stopped half-way: autosave
    went on renewing the lease, nobody released it, and the caller's next job was
    refused (`SessionBusy`) until the lease expired."""
    await saved_conversation(store, sessions)
    slow = SlowToListen(store)
    session: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel())
    sessions.append(session)
    rs = lr.ResumableSession(slow, KEY, registry=REGISTRY, owner="w2")
    restore = asyncio.ensure_future(rs.restore(session, default=Concierge))
    await asyncio.wait_for(slow.announcing.wait(), DEADLINE)
    restore.cancel()
    # the undo waits for the inbox's subscription (up to control.START_WAIT) ...
    for _ in range(20):
        await asyncio.sleep(0)
    restore.cancel()  # ... and is cancelled again meanwhile
    slow.gate.set()
    await asyncio.wait({restore}, timeout=DEADLINE)
    assert restore.cancelled()
    info = await store.info(KEY)
    assert info is not None and info.owner is None, f"the cancelled restore holds {info}"
    assert not rs._autosave._tasks, "autosave runs on for a session nobody has"
    assert session.history.items == []


async def test_a_failed_restore_cancelled_while_it_gives_up_leaves_no_inbox_listening(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """A restore that fails (here the registry's factory raises) gives its lease back and
    stops the command inbox it opened. Cancelled while it waited for that inbox to finish
    subscribing, it never stopped it: a task listening for a session nobody holds, for
    the life of the process, one per such restore."""
    await saved_conversation(store, sessions)

    def broken(state: dict[str, Any]) -> Concierge:
        raise KeyError("slot")  # the agent's saved state no longer fits its factory

    registry = lr.AgentRegistry()
    registry.register(Concierge, factory=broken)
    slow = SlowToListen(store)
    session: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel())
    sessions.append(session)
    rs = lr.ResumableSession(slow, KEY, registry=registry, owner="w2")
    restore = asyncio.ensure_future(rs.restore(session, default=Concierge))

    async def released() -> bool:
        if rs._control._task is None:
            return False  # not yet acquired and subscribing
        info = await store.info(KEY)
        return info is not None and info.owner is None

    await eventually(released, "the failed restore gives its lease back")
    restore.cancel()  # while it waits for the inbox to subscribe
    slow.gate.set()
    await asyncio.wait({restore}, timeout=DEADLINE)
    assert restore.done()
    await asyncio.sleep(0)
    assert rs._control._task is None, "the inbox of a failed restore listens on"
    assert session.history.items == []


async def test_a_remote_suspend_between_a_restore_in_place_and_its_start_is_refused(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """`restore` returns with the command inbox listening, before ``session.start()``;
    a command in between is refused ("has not started"). After a suspend, `restore` may
    put the conversation back into the same, closed `AgentSession` (resumable_job's
    rejoin does). LiveKit keeps a closed session's last agent as ``current_agent``, so
    that session passed for started: a remote suspend in the window was "done", nothing
    saved, the lease released, then the session started and ran unsaved while the store
    said it was free. It is refused like the first one, and the session runs saved."""
    await saved_conversation(store, sessions)
    model = FakeRealtimeModel(["Hello again.", "Still here."])
    session: AgentSession[Any] = AgentSession(llm=model)
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    await rs.suspend()  # closes the session

    session.history.items.clear()
    agent = await rs.restore(session, default=Concierge)  # in place
    for send in (lr.control(store).suspend, lr.control(store).pause):
        with pytest.raises(lr.CommandRefused, match="not started"):
            await send(KEY, timeout=2)
    assert rs.state == "active" and rs._lease is not None

    await session.start(agent)
    await session.run(user_input="one more thing")
    await rs.checkpoint()
    snap = await latest(store)
    assert "one more thing" in [d["content"][0] for d in snap.history if d.get("role") == "user"]
    assert await lr.control(store).suspend(KEY, timeout=2) == rs.version  # now it applies
    state: str = rs.state  # changed by the command, behind mypy's back
    assert state == "suspended"


def test_an_imported_frame_with_malformed_realtime_options_still_restores(
    tmp_path: Path,
) -> None:
    """`livekit-resume import` accepts any frame the snapshot model accepts, and
    ``AgentFrame.realtime`` is a free dict: an edited export whose ``options`` is not a
    mapping imported fine, then every restore failed with an untyped AttributeError out
    of the options' reapplication, leaving a conversation no worker could resume. The
    options are left out (logged) and the conversation comes back."""
    url = f"sqlite:///{tmp_path}/sessions.db"

    async def save() -> Snapshot:
        store = lr.open_store(url)
        sessions: list[AgentSession[Any]] = []
        try:
            await saved_conversation(store, sessions, voice="echo")
            return await latest(store)
        finally:
            for s in sessions:
                await s.aclose()
            await store.aclose()

    snap = asyncio.run(save())
    assert snap.agent is not None and snap.agent.realtime is not None
    frame = snap.agent.model_copy(update={"realtime": {**snap.agent.realtime, "options": "voice"}})
    edited = tmp_path / "edited.lkrs"
    edited.write_bytes(Codec().pack(snap.model_copy(update={"agent": frame}).model_dump()))
    result = CliRunner().invoke(app, ["--store", url, "import", str(edited), "--key", "copy"])
    assert result.exit_code == 0, result.output

    async def restore() -> list[str]:
        store = lr.open_store(url)
        model = FakeRealtimeModel(voice="alloy")
        session: AgentSession[Any] = AgentSession(llm=model)
        rs = lr.ResumableSession(store, "copy", registry=REGISTRY, autosave=False)
        try:
            await session.start(await rs.restore(session, default=Concierge))
            assert rs.resumed and model.active_session.options.voice == "alloy"
            return [i.id for i in model.active_session.remote.items]
        finally:
            await rs.aclose()
            await session.aclose()
            await store.aclose()

    assert asyncio.run(restore()) == conversation_ids(ctx_from_data(snap.agent.chat_ctx).items)


async def test_a_second_restore_that_starts_a_new_conversation_is_not_resumed(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """`rs.resumed` is "True when `restore` found a snapshot" to go on with; after a
    suspend, `restore` may be called again. When that second restore finds the
    conversation ended meanwhile (another worker resumed and ended it), it starts a new
    one with ``default()``, yet ``resumed`` stayed True from the first: the new caller's
    agent skipped its greeting and the call began in silence."""
    await saved_conversation(store, sessions)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    first: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel())
    sessions.append(first)
    await first.start(await rs.restore(first, default=Concierge))
    assert rs.resumed
    await rs.suspend()

    other = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    elsewhere: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel())
    sessions.append(elsewhere)
    await elsewhere.start(await other.restore(elsewhere, default=Concierge))
    await other.end()  # the call is over

    again: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel())
    sessions.append(again)
    await again.start(await rs.restore(again, default=Concierge))
    assert conversation_ids(again.history.items) == []  # a new conversation...
    assert not rs.resumed  # ...which the agent greets
    await rs.aclose()


# -- a tool reply in flight as the pause lands -------------------------------------------


class SlowAckSession(FakeRealtimeSession):
    """A server whose acknowledgement of a tool's output takes a while (the OpenAI plugin
    awaits ``conversation.item.created`` for every item it creates, up to 5 s): the sync
    of a tool output waits until the test lets it through."""

    def __init__(self, model: FakeRealtimeModel) -> None:
        super().__init__(model)
        self.output_syncing = asyncio.Event()
        self.ack = asyncio.Event()

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        known = {i.id for i in self.remote.items}
        if any(i.type == "function_call_output" and i.id not in known for i in chat_ctx.items):
            self.output_syncing.set()
            await self.ack.wait()
        await super().update_chat_ctx(chat_ctx)


class SlowAckModel(FakeRealtimeModel):
    def session(self, *, turn_detection_disabled: bool = False) -> FakeRealtimeSession:
        s = SlowAckSession(self)
        self.sessions.append(s)
        return s


async def test_a_tool_reply_whose_output_sync_straddles_the_pause_is_not_generated_while_paused(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    """A realtime tool returned just before the pause, and LiveKit is syncing its output
    to the server (an ack round trip) when `pause()` runs. Its speech is then neither
    current, queued nor in the background, and LiveKit replies on that same handle after
    the sync, with no ``speech_created``: `session.interrupt()` and the RealtimeGate
    both missed it, and the model's reply was generated and recorded while paused."""
    model = SlowAckModel(
        [Reply("One moment.", [ToolCall("book", {"what": "a table"})]), "Your table is booked."]
    )
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    rt = model.active_session
    assert isinstance(rt, SlowAckSession)

    session.generate_reply(user_input="book a table")
    await asyncio.wait_for(rt.output_syncing.wait(), DEADLINE)  # the tool ran and returned

    await asyncio.wait_for(rs.pause(), DEADLINE)
    assert rs.state == "paused"
    responses = len(rt.responses)
    rt.ack.set()  # the server acknowledges the tool output while the session is paused

    # LiveKit's tool reply would follow the ack within a few loop turns: a second gives
    # it every chance (a bound, not a timing the test relies on to pass)
    await asyncio.sleep(1.0)
    said = [m.text_content for m in session.history.messages() if m.role == "assistant"]
    assert "Your table is booked." not in said, f"answered while paused: {said}"
    assert len(rt.responses) == responses, (
        f"the model was asked for a reply while paused: {rt.names()[-4:]}"
    )
    await rs.aclose()
