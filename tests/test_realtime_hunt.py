"""Hunting defects in the save/restore of sessions on a realtime model.

Each test drives real `AgentSession`s on the fake realtime server of the test kit
(tests/lk/fake_realtime.py) against real stores (memory, SQLite), and asserts what a
LiveKit developer expects from docs/realtime.md: the conversation is intact after a
restore, in order, each item once in the realtime model's context.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests.lk import EventLog, Reply, ScriptedLLM, ToolCall
from tests.lk.fake_realtime import (
    FakeRealtimeModel,
    FakeRealtimeSession,
    make_realtime_session,
)

KEY = "hunt-rt"
CONVERSATION = ("message", "function_call", "function_call_output")
DEADLINE = 15.0
LONG_REPLY = " ".join(f"word{i}" for i in range(40))

FRONT = "You are the front desk."
CLERK = "You are the clerk."
BACK = "You are the back office."

# the LLM a pipeline agent (Clerk) runs on: set by each test before a restore builds it
CLERK_LLM: dict[str, Any] = {}
# the realtime model a realtime agent with its own model (Voice) runs on
VOICE_MODEL: dict[str, Any] = {}


class Front(Agent):
    """A realtime agent (the session's model) that books and hands off."""

    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions=FRONT, chat_ctx=chat_ctx)

    @function_tool
    async def book(self, context: RunContext[dict[str, Any]], what: str) -> str:
        """Book something.

        Args:
            what: what to book
        """
        started, release = context.userdata.get("started"), context.userdata.get("release")
        if isinstance(started, asyncio.Event) and isinstance(release, asyncio.Event):
            started.set()
            await release.wait()
        hook = context.userdata.get("during")
        if hook is not None:
            await hook()
        return f"booked {what}"

    @function_tool
    async def to_clerk(self, context: RunContext[dict[str, Any]]) -> tuple[Agent, str]:
        """Hand the caller to the clerk."""
        return Clerk(chat_ctx=self.chat_ctx), "transferring"

    @function_tool
    async def to_back(self, context: RunContext[dict[str, Any]]) -> tuple[Agent, str]:
        """Hand the caller to the back office."""
        return Back(chat_ctx=self.chat_ctx), "transferring"


class Clerk(Agent):
    """A pipeline agent (an LLM of its own) inside a session on a realtime model."""

    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions=CLERK, chat_ctx=chat_ctx, llm=CLERK_LLM["llm"])

    @function_tool
    async def to_voice(self, context: RunContext[dict[str, Any]]) -> tuple[Agent, str]:
        """Hand the caller to the voice agent."""
        return Voice(chat_ctx=self.chat_ctx), "transferring"


class Voice(Agent):
    """A realtime agent with its own model, in a session on a pipeline LLM."""

    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions=BACK, chat_ctx=chat_ctx, llm=VOICE_MODEL["model"])


class Back(Agent):
    """A second realtime agent on the session's model."""

    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions=BACK, chat_ctx=chat_ctx)


REGISTRY = lr.AgentRegistry()
REGISTRY.register(Front, factory=lambda state: Front())
REGISTRY.register(Clerk, factory=lambda state: Clerk())
REGISTRY.register(Voice, factory=lambda state: Voice())
REGISTRY.register(Back, factory=lambda state: Back())


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        MemoryStore()
        if request.param == "memory"
        else lr.open_store(f"sqlite:///{tmp_path}/hunt.db")
    )
    yield s
    await s.aclose()


async def latest(store: Store) -> Snapshot:
    rs = lr.ResumableSession(store, "codec-only", registry=REGISTRY)
    return from_stored(rs._capture.codec, await store.load(KEY))


def conv(items: list[llm.ChatItem]) -> list[llm.ChatItem]:
    return [i for i in items if i.type in CONVERSATION]


def ids(items: list[llm.ChatItem]) -> list[str]:
    return [i.id for i in conv(items)]


def shape(items: list[llm.ChatItem]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i in conv(items):
        if isinstance(i, llm.ChatMessage):
            out.append((i.role, i.text_content or ""))
        elif isinstance(i, llm.FunctionCall):
            out.append(("call", i.name))
        elif isinstance(i, llm.FunctionCallOutput):
            out.append(("output", i.output))
    return out


async def open_rs(
    store: Store,
    sessions: list[AgentSession[Any]],
    session: AgentSession[Any],
    default: Any = Front,
) -> lr.ResumableSession:
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=default, takeover=True))
    return rs


# -- handoffs between a realtime agent and a pipeline agent --------------------------------


async def test_handoff_from_realtime_to_pipeline_agent_is_restored_with_its_context(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A realtime agent (the session's model) hands off to a pipeline agent with its own
    LLM. After a restore the pipeline agent is current, and its first LLM request holds
    the conversation it had, in order, each item once; no realtime options are saved for
    an agent that does not run on the realtime model."""
    CLERK_LLM["llm"] = ScriptedLLM(["The clerk here, Ada."])
    model = FakeRealtimeModel(["Hello Ada.", Reply("", [ToolCall("to_clerk", {})])])
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="let me talk to the clerk")
    await eventually(
        lambda: _true(isinstance(session.current_agent, Clerk)), "the clerk takes over"
    )
    await session.run(user_input="what is my name?")
    await rs.checkpoint()
    before = shape(session.current_agent.chat_ctx.items)
    snap = await latest(store)
    assert snap.agent is not None and snap.agent.agent_id == "clerk"
    assert snap.agent.realtime is None
    await rs.aclose()

    CLERK_LLM["llm"] = second = ScriptedLLM(["You are Ada."])
    again: AgentSession[Any] = AgentSession(llm=FakeRealtimeModel(), userdata={})
    rs2 = await open_rs(store, sessions, again)
    assert rs2.resumed and isinstance(again.current_agent, Clerk)
    assert shape(again.current_agent.chat_ctx.items) == before
    await again.run(user_input="again, who am I?")
    sent = shape(second.requests[0].chat_ctx.items)
    assert sent[: len(before)] == before
    assert sent[len(before) :] == [("user", "again, who am I?")]
    await rs2.aclose()


async def _true(v: bool) -> bool:
    return v


async def test_handoff_from_pipeline_to_realtime_agent_reaches_its_model_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A pipeline session hands off to an agent with a realtime model of its own. After a
    restore the realtime agent's model gets the saved conversation at start through one
    context sync, each item once; the options saved are those of its model."""
    CLERK_LLM["llm"] = pipe = ScriptedLLM(
        ["Hello Ada.", Reply("", [ToolCall("to_voice", {})])], default="ok"
    )
    VOICE_MODEL["model"] = FakeRealtimeModel(["Voice here."], voice="echo")
    session: AgentSession[Any] = AgentSession(llm=pipe, userdata={})
    rs = await open_rs(store, sessions, session, default=Clerk)
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="I want the voice agent")
    await eventually(lambda: _true(isinstance(session.current_agent, Voice)), "voice agent")
    await session.run(user_input="hello voice")
    await rs.checkpoint()
    saved = ids(session.current_agent.chat_ctx.items)
    snap = await latest(store)
    assert snap.agent is not None and snap.agent.agent_id == "voice"
    assert snap.agent.realtime is not None and snap.agent.realtime["options"]["voice"] == "echo"
    await rs.aclose()

    CLERK_LLM["llm"] = ScriptedLLM(default="ok")
    VOICE_MODEL["model"] = model2 = FakeRealtimeModel(["You are Ada."], voice="alloy")
    again: AgentSession[Any] = AgentSession(llm=CLERK_LLM["llm"], userdata={})
    rs2 = await open_rs(store, sessions, again, default=Clerk)
    assert isinstance(again.current_agent, Voice)
    rt = model2.active_session
    assert rt.names().count("update_chat_ctx") == 1
    assert [i.id for i in rt.remote.items] == saved
    assert len(rt.created) == len(set(rt.created))
    assert rt.options.voice == "echo"
    await rs2.aclose()


async def test_handoff_between_two_realtime_agents_restores_the_second_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Front hands off to Back (same realtime model, Back gets Front's context). The
    restored Back's realtime session is sent exactly Back's saved conversation, in
    order, once; the next reply sees it all plus the new turn."""
    model = FakeRealtimeModel(
        ["Hello Ada.", Reply("", [ToolCall("to_back", {})]), "Back office here."]
    )
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="back office please")
    await eventually(lambda: _true(isinstance(session.current_agent, Back)), "back")
    await session.run(user_input="still there?")
    await rs.checkpoint()
    saved = ids(session.current_agent.chat_ctx.items)
    saved_shape = shape(session.current_agent.chat_ctx.items)
    await rs.aclose()

    model2 = FakeRealtimeModel(["You are Ada."])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    rs2 = await open_rs(store, sessions, again)
    assert isinstance(again.current_agent, Back)
    rt = model2.active_session
    assert rt.instructions == BACK
    assert [i.id for i in rt.remote.items] == saved
    await again.run(user_input="who am I?")
    (resp,) = rt.responses
    assert shape(resp.seen) == [*saved_shape, ("user", "who am I?")]
    assert len(rt.created) == len(set(rt.created))
    await rs2.aclose()


# -- tool calls and checkpoints ------------------------------------------------------------


async def test_checkpoint_taken_inside_a_realtime_tool_then_finished_restores_the_real_output(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A tool of the realtime model checkpoints while it runs (the call is in the context,
    unanswered, and recorded as running). It then finishes and a second checkpoint is
    taken. The restore must carry the real output, once, and no "interrupted" one."""
    model = FakeRealtimeModel(
        [Reply("One moment.", [ToolCall("book", {"what": "a table"})]), "Booked."]
    )
    holder: dict[str, Any] = {}

    async def during() -> None:
        holder["v"] = await holder["rs"].checkpoint()

    session: AgentSession[Any] = AgentSession(llm=model, userdata={"during": during})
    rs = await open_rs(store, sessions, session)
    holder["rs"] = rs
    await asyncio.wait_for(session.run(user_input="book a table"), DEADLINE)
    mid = await store.load(KEY)
    assert "v" in holder
    await rs.checkpoint()
    snap = await latest(store)
    assert snap.tool_calls == [] or all(t.call_id is None for t in snap.tool_calls)
    await rs.aclose()
    del mid

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    outs = [i for i in model2.active_session.remote.items if i.type == "function_call_output"]
    assert [o.output for o in outs] == ["booked a table"]
    hist_outs = [i for i in again.history.items if i.type == "function_call_output"]
    assert [o.output for o in hist_outs] == ["booked a table"]


async def test_restored_history_answers_the_realtime_call_that_was_in_flight(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """docs/realtime.md, "Tool calls in flight": a realtime model puts the call into the
    agent's context *and* ``session.history`` as it starts; a checkpoint taken then holds
    the call unanswered, and "a restore answers it with an explicit output". Expected:
    after the restore (and after a second restore), ``session.history`` holds the call
    and exactly one "interrupted" output for it, as the agent's context does. What
    happens: only the agent's context is repaired (rebuild.build_items); the restored
    ``session.history`` holds an orphan function_call with no output at all, which every
    later snapshot, report, and agent built from ``session.history`` inherits."""
    model = FakeRealtimeModel([Reply("One moment.", [ToolCall("book", {"what": "a taxi"})])])
    started, release = asyncio.Event(), asyncio.Event()
    session: AgentSession[Any] = AgentSession(
        llm=model, userdata={"started": started, "release": release}
    )
    rs = await open_rs(store, sessions, session)
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="book a taxi"))
    await asyncio.wait_for(started.wait(), DEADLINE)
    await rs.checkpoint()
    release.set()
    await run
    await _abandon(rs)  # the worker "dies": nothing more is saved from it

    for round_ in range(2):
        m = FakeRealtimeModel(["ok"])
        s: AgentSession[Any] = AgentSession(llm=m, userdata={})
        r = await open_rs(store, sessions, s)
        outs = [i for i in m.active_session.remote.items if i.type == "function_call_output"]
        assert [o.output for o in outs] == [INTERRUPTED_OUTPUT], round_
        calls = [i.call_id for i in s.history.items if i.type == "function_call"]
        answered = [i.call_id for i in s.history.items if i.type == "function_call_output"]
        assert calls == answered, f"round {round_}: history calls {calls}, outputs {answered}"
        await s.run(user_input=f"turn {round_}")
        await r.checkpoint()
        await r.aclose()


async def _abandon(rs: lr.ResumableSession) -> None:
    """Drop a ResumableSession as a killed worker would: no final save."""
    await rs._detach_and_release()


# -- a realtime session whose first context sync fails ------------------------------------


class FailingSyncSession(FakeRealtimeSession):
    """A server that refuses (or times out on) the first ``update_chat_ctx``."""

    def __init__(self, model: FakeRealtimeModel, delay: float) -> None:
        super().__init__(model)
        self.failed = 0
        self.delay = delay

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        if self.failed == 0:
            self.failed += 1
            self.calls.append(("update_chat_ctx_failed", None))
            await asyncio.sleep(self.delay)
            raise llm.RealtimeError("update_chat_ctx timed out")
        await super().update_chat_ctx(chat_ctx)


class FailingSyncModel(FakeRealtimeModel):
    def __init__(self, *a: Any, delay: float = 0.0, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.delay = delay

    def session(self, *, turn_detection_disabled: bool = False) -> FakeRealtimeSession:
        s = FailingSyncSession(self, self.delay)
        self.sessions.append(s)
        return s


@pytest.mark.parametrize("delay", [0.0, 0.5])
async def test_a_failed_context_sync_at_restore_loses_nothing_from_the_store(
    store: Store, sessions: list[AgentSession[Any]], delay: float
) -> None:
    """docs/realtime.md: if the provider refuses or times out the sync at start, LiveKit
    logs it and goes on; ``session.history`` still holds the conversation. The restore
    must still succeed (resumed) and the next checkpoints must keep the whole saved
    conversation plus the new turn, in order, in both the history and the agent's saved
    context (the store is not overwritten with what the model happened to receive)."""
    model = FakeRealtimeModel(["Hello Ada.", "You said hi."])
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="what did I say?")
    await rs.checkpoint()
    saved_agent = shape(session.current_agent.chat_ctx.items)
    saved_hist = shape(session.history.items)
    await rs.aclose()

    model2 = FailingSyncModel(["I do not know."], delay=delay)
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    rs2 = await asyncio.wait_for(open_rs(store, sessions, again), DEADLINE)
    assert rs2.resumed
    assert shape(again.history.items) == saved_hist
    await again.run(user_input="who am I?")
    await rs2.checkpoint()
    snap = await latest(store)
    assert snap.agent is not None
    from livekit_resume.snapshot.chat import ctx_from_data

    agent_now = shape(ctx_from_data(snap.agent.chat_ctx).items)
    hist_now = shape(ctx_from_data(snap.history).items)
    assert agent_now[: len(saved_agent)] == saved_agent
    assert agent_now[len(saved_agent) :] == [("user", "who am I?"), ("assistant", "I do not know.")]
    assert hist_now[: len(saved_hist)] == saved_hist
    await rs2.aclose()


# -- an app trimming the realtime agent's context -----------------------------------------


async def test_items_the_app_removed_from_a_realtime_context_do_not_come_back(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A realtime app keeps its context short: it drops old turns with
    ``agent.update_chat_ctx`` (LiveKit deletes them server-side). After a checkpoint and
    a restore the model must get only what was kept, in order."""
    model = FakeRealtimeModel(["one", "two", "three"])
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    for t in ("a", "b", "c"):
        await session.run(user_input=t)
    await rs.checkpoint()
    agent = session.current_agent
    ctx = agent.chat_ctx.copy()
    keep = conv(ctx.items)[-2:]
    ctx.items[:] = [i for i in ctx.items if i.type not in CONVERSATION or i in keep]
    await agent.update_chat_ctx(ctx)
    assert model.active_session.deleted  # gone from the server too
    await rs.checkpoint()
    kept = ids(agent.chat_ctx.items)
    await rs.aclose()

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    assert [i.id for i in model2.active_session.remote.items] == kept


# -- interrupted generation ----------------------------------------------------------------


async def test_reply_interrupted_mid_generation_is_restored_as_heard_before_the_barge_in(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """The caller cuts a long realtime reply (``session.interrupt()``), then says
    something. After a checkpoint and a restore the model gets the cut reply as heard
    (interrupted, partial text, the same text the server was truncated to), before the
    caller's next turn, each once."""
    model = FakeRealtimeModel([LONG_REPLY, "Sure."])
    session, mic, speaker = make_realtime_session(model, userdata={})
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Front))
    log = EventLog(session)
    mic.say("count to forty")
    await speaker.wait_for_frames(1)
    await speaker.wait_until_played(1.0)
    await asyncio.wait_for(session.interrupt(force=True), DEADLINE)
    mic.say("stop please")
    await log.wait_for(
        "conversation_item_added",
        lambda ev: (
            getattr(ev.item, "role", None) == "assistant" and ev.item.text_content == "Sure."
        ),
        timeout=DEADLINE,
    )
    await rs.checkpoint()
    live_shape = shape(session.current_agent.chat_ctx.items)
    rt = model.active_session
    (trunc,) = [a for n, a in rt.calls if n == "truncate"]
    await rs.aclose()

    heard = trunc["transcript"]
    assert heard and heard != LONG_REPLY
    assert live_shape[:3] == [
        ("user", "count to forty"),
        ("assistant", heard),
        ("user", "stop please"),
    ]

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    remote = model2.active_session.remote.items
    assert shape(remote) == live_shape
    cut = next(i for i in remote if isinstance(i, llm.ChatMessage) and i.role == "assistant")
    assert cut.interrupted


# -- checkpoints racing the realtime model's own edits -------------------------------------


async def test_checkpoints_racing_realtime_turns_and_tools_store_exactly_the_live_context(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Checkpoints taken while the realtime model replies and its tools run (calls
    upserted as they start, outputs after, messages filled in) must end in a snapshot
    that restores exactly the live conversation: each item once, in order."""
    script: list[str | Reply] = []
    for n in range(4):
        script += [Reply(f"Booking {n}.", [ToolCall("book", {"what": f"t{n}"})]), f"Done {n}."]
    model = FakeRealtimeModel(script)
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    for n in range(4):
        run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input=f"book t{n}"))
        for _ in range(6):
            await rs.checkpoint()
            await asyncio.sleep(0)
        await asyncio.wait_for(run, DEADLINE)
        await rs.checkpoint()
    live = shape(session.current_agent.chat_ctx.items)
    live_hist = shape(session.history.items)
    await _abandon(rs)

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    assert shape(model2.active_session.remote.items) == live
    assert shape(again.history.items) == live_hist


async def test_autosave_alone_keeps_a_realtime_tool_turn(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """With autosave on (the default), a realtime turn with a tool call (calls and outputs
    are inserted silently, not through conversation_item_added) is saved without any
    explicit checkpoint: a worker dying afterwards loses none of it."""
    model = FakeRealtimeModel(
        [Reply("One moment.", [ToolCall("book", {"what": "x"})]), "Booked x."]
    )
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY)
    await session.start(await rs.restore(session, default=Front))
    await asyncio.wait_for(session.run(user_input="book x"), DEADLINE)
    live = shape(session.current_agent.chat_ctx.items)
    assert ("output", "booked x") in live

    async def saved_all() -> bool:
        try:
            snap = await latest(store)
        except Exception:
            return False
        from livekit_resume.snapshot.chat import ctx_from_data

        return snap.agent is not None and shape(ctx_from_data(snap.agent.chat_ctx).items) == live

    await eventually(saved_all, "autosave stores the whole realtime turn", timeout=10)
    await _abandon(rs)


# -- pause, suspend and restore ------------------------------------------------------------


async def test_suspend_of_a_paused_realtime_session_restores_silent_with_the_cut_reply(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Pause a realtime agent mid-reply, suspend, restore in a new session: the model is
    sent the cut reply as heard (once, interrupted), is not asked to reply, and answers
    the caller's next turn from the whole conversation."""
    model = FakeRealtimeModel([LONG_REPLY])
    session, mic, speaker = make_realtime_session(model, userdata={})
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Front))
    mic.say("count to forty")
    await speaker.wait_for_frames(1)
    await speaker.wait_until_played(1.0)
    await rs.pause()
    await rs.suspend()
    snap = await latest(store)
    assert snap.state == "suspended"
    (cut,) = [d for d in snap.history if d.get("role") == "assistant"]
    heard = cut["content"][0]

    model2 = FakeRealtimeModel(["You asked me to count."])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    rs2 = await open_rs(store, sessions, again)
    rt = model2.active_session
    assert rs2.state == "active" and rt.responses == []
    assert shape(rt.remote.items) == [("user", "count to forty"), ("assistant", heard)]
    await again.run(user_input="what did I ask?")
    (resp,) = rt.responses
    assert shape(resp.seen) == [
        ("user", "count to forty"),
        ("assistant", heard),
        ("user", "what did I ask?"),
    ]
    await rs2.aclose()


async def test_a_nested_tool_choice_set_at_run_time_is_reapplied(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A tool choice naming a function (a dict holding a dict) set on the live realtime
    session is saved and the new session opens with it."""
    choice = {"type": "function", "function": {"name": "book"}}
    model = FakeRealtimeModel(["hi"])
    session: AgentSession[Any] = AgentSession(llm=model, userdata={})
    rs = await open_rs(store, sessions, session)
    model.active_session.update_options(tool_choice=cast(Any, choice))
    await rs.checkpoint()
    await rs.aclose()
    model2 = FakeRealtimeModel()
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    assert model2.active_session.options.tool_choice == choice


async def test_a_realtime_tool_that_finishes_while_paused_is_restored_with_its_real_output(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A realtime tool runs as the pause lands and returns while paused. The model must
    not reply while paused; after a suspend and a restore the call carries its real
    output, once, and no "interrupted" one (it did finish)."""
    model = FakeRealtimeModel(
        [Reply("One moment.", [ToolCall("book", {"what": "a cab"})]), "Your cab is booked."]
    )
    started, release = asyncio.Event(), asyncio.Event()
    session: AgentSession[Any] = AgentSession(
        llm=model, userdata={"started": started, "release": release}
    )
    rs = await open_rs(store, sessions, session)
    session.generate_reply(user_input="book a cab")
    await asyncio.wait_for(started.wait(), DEADLINE)
    await asyncio.wait_for(rs.pause(), DEADLINE)
    release.set()

    async def answered() -> bool:
        return any(i.type == "function_call_output" for i in session.current_agent.chat_ctx.items)

    await eventually(answered, "the tool's output reaches the context", timeout=10)
    await asyncio.sleep(0.3)
    said = [m.text_content for m in session.history.messages() if m.role == "assistant"]
    assert "Your cab is booked." not in said
    await asyncio.wait_for(rs.suspend(), DEADLINE)

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    outs = [
        i.output for i in model2.active_session.remote.items if i.type == "function_call_output"
    ]
    assert outs == ["booked a cab"]


async def test_suspend_while_a_realtime_tool_still_runs_answers_it_interrupted_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Suspended while a realtime tool is still running (it never returns): the restore
    sends the model the call and one "interrupted" output for it, right after the call,
    and the history agrees with the model on which calls are answered."""
    model = FakeRealtimeModel([Reply("One moment.", [ToolCall("book", {"what": "a cab"})])])
    started, release = asyncio.Event(), asyncio.Event()
    session: AgentSession[Any] = AgentSession(
        llm=model, userdata={"started": started, "release": release}
    )
    rs = await open_rs(store, sessions, session)
    session.generate_reply(user_input="book a cab")
    await asyncio.wait_for(started.wait(), DEADLINE)
    susp = asyncio.ensure_future(rs.suspend())
    await asyncio.wait({susp}, timeout=DEADLINE)
    release.set()
    assert susp.done()

    model2 = FakeRealtimeModel(["ok"])
    again: AgentSession[Any] = AgentSession(llm=model2, userdata={})
    await open_rs(store, sessions, again)
    remote = conv(model2.active_session.remote.items)
    kinds = [(i.type, getattr(i, "output", None)) for i in remote]
    call_at = [k for k, _ in kinds].index("function_call")
    assert kinds[call_at + 1] == ("function_call_output", INTERRUPTED_OUTPUT)
    assert [k for k, _ in kinds].count("function_call_output") == 1
