"""What livekit-agents 1.8.9 actually does, proved against the installed package.

Each test is one fact from DESIGN.md ("LiveKit 1.8.9: what its source says"), named after it.
Where the design's wording turned out imprecise, the test asserts what is true and its
docstring says so. Sessions run without a room: text turns through ``session.run()``, voice
turns through the fakes in ``tests.lk``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from livekit.agents import (
    Agent,
    AgentSession,
    RunContext,
    RunResult,
    ToolCallEnded,
    ToolCallStarted,
    function_tool,
    llm,
)
from livekit.agents.llm.chat_context import DYNAMIC_INSTRUCTIONS_MESSAGE_ID, Instructions
from livekit.agents.voice.generation import INSTRUCTIONS_MESSAGE_ID
from livekit.agents.voice.tool_executor import _RunningTasks

from tests.lk import (
    EventLog,
    FakeSTT,
    ScriptedLLM,
    ToolCall,
    VoiceFakes,
    make_text_session,
    make_voice_session,
    voice_fakes,
)

LK_LOGGER = "livekit.agents"


# ------------------------------------------------------------------------------------ helpers


class Greeter(Agent):
    """An agent with one tool, ``lookup``, and an on_enter counter."""

    enters = 0

    def __init__(self, instructions: str = "You are the greeter.") -> None:
        super().__init__(instructions=instructions)

    async def on_enter(self) -> None:
        type(self).enters += 1

    @function_tool
    async def lookup(self, ctx: RunContext[Any], query: str) -> str:
        """Look something up."""
        return f"found {query}"


class Plain(Agent):
    def __init__(self, instructions: str = "You are plain.", **kwargs: Any) -> None:
        super().__init__(instructions=instructions, **kwargs)


def saved_items(t0: float) -> list[llm.ChatItem]:
    """A conversation as a previous session left it, with timestamps well in the past."""
    return [
        llm.AgentHandoff(id="h0", old_agent_id=None, new_agent_id="greeter", created_at=t0),
        llm.AgentConfigUpdate(id="c0", instructions="old instructions", created_at=t0 + 0.1),
        llm.ChatMessage(id="u1", role="user", content=["book a table"], created_at=t0 + 1),
        llm.FunctionCall(
            id="fc1",
            call_id="call_a",
            name="lookup",
            arguments='{"query": "tables"}',
            created_at=t0 + 2,
        ),
        llm.FunctionCallOutput(
            id="fo1",
            call_id="call_a",
            name="lookup",
            output="found tables",
            is_error=False,
            created_at=t0 + 2.5,
        ),
        llm.ChatMessage(id="a1", role="assistant", content=["Which day?"], created_at=t0 + 3),
    ]


def item_ids(items: list[llm.ChatItem]) -> list[str]:
    return [item.id for item in items]


def of_type(items: list[llm.ChatItem], kind: str) -> list[Any]:
    return [item for item in items if item.type == kind]


# ------------------------------------------------------------------------------ history, start


async def test_history_insert_before_start_preloads_history_in_created_at_order(
    sessions: list[AgentSession[Any]],
) -> None:
    """``session.history.insert(saved)`` before ``start()`` pre-loads the history, sorted by
    ``created_at``; ``start()`` then appends exactly an ``AgentHandoff(None -> agent)`` and an
    ``AgentConfigUpdate`` (instructions + tool names), in that order, and nothing else. Only the
    handoff is announced through ``conversation_item_added``."""
    saved = saved_items(time.time() - 3600)
    session = make_text_session(ScriptedLLM())
    sessions.append(session)
    log = EventLog(session)

    session.history.insert(list(reversed(saved)))  # inserted out of order on purpose
    assert item_ids(session.history.items) == item_ids(saved)

    agent = Greeter()
    await session.start(agent)

    items = session.history.items
    assert len(items) == len(saved) + 2
    assert all(a is b for a, b in zip(items, saved, strict=False))  # same objects, untouched
    assert llm.ChatContext(items[: len(saved)]).is_equivalent(llm.ChatContext(list(saved)))

    handoff, config = items[len(saved) :]
    assert isinstance(handoff, llm.AgentHandoff)
    assert (handoff.old_agent_id, handoff.new_agent_id) == (None, agent.id) == (None, "greeter")
    assert isinstance(config, llm.AgentConfigUpdate)
    assert config.instructions == "You are the greeter."
    assert config.tools_added == ["lookup"]
    assert config.tools_removed is None
    assert handoff.created_at <= config.created_at

    added = [ev.item for ev in log.of("conversation_item_added")]
    assert added == [handoff]


async def test_history_insert_uses_created_at_so_future_timestamps_sort_after_start_items(
    sessions: list[AgentSession[Any]],
) -> None:
    """Nuance: ``insert`` places by ``created_at``, and so does ``start()`` for its own items.
    A saved item stamped in the future (a writer whose clock ran ahead) ends up *after* the
    handoff/config items of the new start: the restored prefix is no longer a prefix."""
    session = make_text_session(ScriptedLLM())
    sessions.append(session)
    future_msg = llm.ChatMessage(
        id="future", role="assistant", content=["from a fast clock"], created_at=time.time() + 60
    )
    session.history.insert(future_msg)
    await session.start(Plain())

    kinds = [item.type for item in session.history.items]
    assert kinds == ["agent_handoff", "agent_config_update", "message"]
    assert session.history.items[-1] is future_msg


# ------------------------------------------------------------------------- what the LLM is sent


async def test_llm_sees_agent_chat_ctx_not_session_history(
    sessions: list[AgentSession[Any]],
) -> None:
    """Items inserted into ``session.history`` never reach the LLM: it is sent the agent's own
    ``chat_ctx`` (instructions, start config item, the new user message)."""
    scripted = ScriptedLLM(["Hello."])
    session = make_text_session(scripted)
    sessions.append(session)
    saved = saved_items(time.time() - 3600)
    session.history.insert(saved)
    await session.start(Greeter())

    await session.run(user_input="hi")

    request = scripted.requests[0]
    assert not set(item_ids(saved)) & set(request.item_ids)
    assert [item.type for item in request.items] == ["message", "agent_config_update", "message"]
    assert request.texts() == ["You are the greeter.", "hi"]
    assert request.tools == ["lookup"]


async def test_history_and_agent_chat_ctx_share_item_objects(
    sessions: list[AgentSession[Any]],
) -> None:
    """The session history and the agent's context are two lists over the *same* item
    objects for what a turn adds (user and assistant messages, tool calls and outputs, config
    items): an in-place edit of one is an edit of the other. The agent's instructions message
    is not in the history at all."""
    scripted = ScriptedLLM([[ToolCall("lookup", {"query": "x"})], "Done."])
    session = make_text_session(scripted)
    sessions.append(session)
    agent = Greeter()
    await session.start(agent)
    await session.run(user_input="look x up")

    history = {item.id: item for item in session.history.items}
    shared = [item for item in agent.chat_ctx.items if item.id in history]
    assert [item.type for item in shared] == [
        "agent_config_update",
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert all(history[item.id] is item for item in shared)
    assert INSTRUCTIONS_MESSAGE_ID not in history


@pytest.mark.parametrize("exclude_invalid", [False, True])
async def test_update_chat_ctx_before_start_reaches_llm(
    sessions: list[AgentSession[Any]], exclude_invalid: bool
) -> None:
    """``await agent.update_chat_ctx(ctx, exclude_invalid_function_calls=False)`` before
    ``start()`` puts every saved item in front of the LLM, calls to tools the agent lacks
    included; with the default (``True``) those calls and their outputs are dropped."""
    scripted = ScriptedLLM(["Friday then."])
    session = make_text_session(scripted)
    sessions.append(session)
    saved = saved_items(time.time() - 3600)
    agent = Plain()  # has no `lookup` tool
    await agent.update_chat_ctx(
        llm.ChatContext(list(saved)), exclude_invalid_function_calls=exclude_invalid
    )
    await session.start(agent)

    await session.run(user_input="friday")

    sent = scripted.requests[0].item_ids
    expected = [i for i in item_ids(saved) if not (exclude_invalid and i in ("fc1", "fo1"))]
    assert [i for i in sent if i in item_ids(saved)] == expected
    assert sent[0] == INSTRUCTIONS_MESSAGE_ID  # instructions added in front at start


async def test_agent_chat_ctx_param_filters_foreign_tool_calls_and_keeps_foreign_system_message(
    sessions: list[AgentSession[Any]],
) -> None:
    """``Agent(chat_ctx=ctx)`` copies ``ctx`` filtered to the agent's tools (calls to other
    tools vanish) and keeps a system message of another id beside its own instructions:
    the LLM gets two system messages."""
    scripted = ScriptedLLM(["ok"])
    session = make_text_session(scripted)
    sessions.append(session)
    t0 = time.time() - 3600
    ctx = llm.ChatContext(
        [
            llm.ChatMessage(id="sys_old", role="system", content=["old system"], created_at=t0),
            *saved_items(t0 + 1)[2:],  # u1, fc1 (lookup), fo1, a1
        ]
    )
    agent = Plain(chat_ctx=ctx)
    assert "fc1" not in item_ids(agent.chat_ctx.items)
    await session.start(agent)

    await session.run(user_input="next")

    request = scripted.requests[0]
    assert not of_type(request.items, "function_call")
    assert not of_type(request.items, "function_call_output")
    systems = request.system_messages
    assert [m.id for m in systems] == [INSTRUCTIONS_MESSAGE_ID, "sys_old"]
    assert [m.text_content for m in systems] == ["You are plain.", "old system"]


async def test_update_instructions_before_start_and_instructions_message_rewritten_in_place(
    sessions: list[AgentSession[Any]],
) -> None:
    """The restore path that loses nothing: ``update_instructions(saved)`` and
    ``update_chat_ctx(saved_ctx, exclude_invalid_function_calls=False)`` before ``start()``.
    The saved instructions message (id ``lk.agent_task.instructions``) is rewritten in place
    at start (same position, same ``created_at``): exactly one system message. Before start,
    ``update_instructions`` adds no config item; the start's own config item carries the
    restored instructions."""
    assert INSTRUCTIONS_MESSAGE_ID == "lk.agent_task.instructions"
    t0 = time.time() - 3600

    # what a previous agent's chat_ctx looked like
    old_instructions = llm.ChatMessage(
        id=INSTRUCTIONS_MESSAGE_ID, role="system", content=["stale text"], created_at=t0
    )
    saved_ctx = llm.ChatContext([old_instructions, *saved_items(t0 + 1)[2:]])

    scripted = ScriptedLLM(["Sure."])
    session = make_text_session(scripted)
    sessions.append(session)
    agent = Greeter(instructions="class default")
    await agent.update_instructions("restored instructions")
    await agent.update_chat_ctx(saved_ctx, exclude_invalid_function_calls=False)
    assert not of_type(agent.chat_ctx.items, "agent_config_update")
    await session.start(agent)

    await session.run(user_input="go on")

    request = scripted.requests[0]
    systems = request.system_messages
    assert len(systems) == 1
    assert systems[0].id == INSTRUCTIONS_MESSAGE_ID
    assert systems[0].text_content == "restored instructions"
    assert request.items[0] is systems[0]
    assert systems[0].created_at == t0
    assert [i for i in request.item_ids if i in {"u1", "fc1", "fo1", "a1"}] == [
        "u1",
        "fc1",
        "fo1",
        "a1",
    ]
    configs = of_type(session.history.items, "agent_config_update")
    assert [c.instructions for c in configs] == ["restored instructions"]


# ----------------------------------------------------------------------------------- lifecycle


async def test_on_enter_runs_on_every_start(sessions: list[AgentSession[Any]]) -> None:
    """``on_enter`` runs on every ``start()``: a restored agent greets again unless it checks."""
    Greeter.enters = 0
    first = make_text_session(ScriptedLLM())
    await first.start(Greeter())
    await first.aclose()
    assert Greeter.enters == 1

    second = make_text_session(ScriptedLLM())  # the "restore" in another process
    sessions.append(second)
    await second.start(Greeter())
    assert Greeter.enters == 2


async def test_started_is_true_from_the_end_of_start_until_close() -> None:
    """``AgentSession._started`` (private; the hooks read it to tell a running session
    from one restored and not yet started, or closed by a suspend): False before
    ``start()``, True once it returned, False again after ``aclose()``, and True after a
    second ``start()`` of the closed session (a restore in place)."""
    session = make_text_session(ScriptedLLM())
    assert session._started is False
    await session.start(Greeter())
    assert session._started is True
    await session.aclose()
    assert session._started is False
    await session.start(Greeter())
    assert session._started is True
    await session.aclose()


async def test_update_instructions_and_update_tools_add_config_items_and_emit_no_event(
    sessions: list[AgentSession[Any]],
) -> None:
    """On a running agent, ``update_instructions()`` and ``update_tools()`` (with a visible
    change) each add one ``AgentConfigUpdate`` to both ``session.history`` and the agent's
    ``chat_ctx``, and no session event of any kind is emitted. ``update_tools`` with the same
    tool names adds nothing."""
    session = make_text_session(ScriptedLLM())
    sessions.append(session)
    agent = Greeter()
    await session.start(agent)
    log = EventLog(session)
    before = len(session.history.items)

    await agent.update_instructions("new instructions")

    @function_tool
    async def extra(ctx: RunContext[Any]) -> str:
        """An extra tool."""
        return "x"

    await agent.update_tools([*agent.tools, extra])
    await agent.update_tools(agent.tools)  # no visible change
    await asyncio.sleep(0)  # let any scheduled emit run before looking

    new = session.history.items[before:]
    assert [item.type for item in new] == ["agent_config_update", "agent_config_update"]
    assert isinstance(new[0], llm.AgentConfigUpdate) and isinstance(new[1], llm.AgentConfigUpdate)
    assert new[0].instructions == "new instructions"
    assert (new[1].tools_added, new[1].tools_removed) == (["extra"], None)
    agent_ids = item_ids(agent.chat_ctx.items)
    assert new[0].id in agent_ids and new[1].id in agent_ids
    assert log.entries == []


async def test_start_makes_the_dynamic_instructions_message_anew(
    sessions: list[AgentSession[Any]],
) -> None:
    """An agent with ``Instructions(dynamic=...)`` holds a second system message
    (``lk.agent_task.instructions.dynamic``) after its instructions. `session.start`
    removes any such message from the agent's context and inserts a new one, with a new
    ``created_at``: a restored agent context (rebuild.py) gets LiveKit's, not the one
    saved, so that one timestamp differs after a restore (livekit-1.8.9.md)."""
    saved = llm.ChatMessage(
        id=DYNAMIC_INSTRUCTIONS_MESSAGE_ID, role="system", content=["Caller: +1"], created_at=1.0
    )
    agent = Agent(
        instructions=Instructions("You are the desk.", dynamic="Caller: +1"),
        chat_ctx=llm.ChatContext([saved]),
    )
    session = make_text_session(ScriptedLLM())
    sessions.append(session)
    await session.start(agent)
    made = [m for m in agent.chat_ctx.items if m.id == DYNAMIC_INSTRUCTIONS_MESSAGE_ID]
    assert len(made) == 1 and isinstance(made[0], llm.ChatMessage)
    assert made[0].text_content == "Caller: +1"
    assert made[0].created_at != 1.0


# -------------------------------------------------------------------------------- events, tools


async def test_conversation_item_added_fires_for_messages_and_handoffs_only(
    sessions: list[AgentSession[Any]],
) -> None:
    """``conversation_item_added`` carries messages and handoffs only. Function calls and
    outputs (and config updates) enter ``session.history`` silently; one
    ``function_tools_executed`` reports the whole batch, after the tools ended and before
    the follow-up reply."""
    scripted = ScriptedLLM(
        [
            [ToolCall("lookup", {"query": "a"}), ToolCall("lookup", {"query": "b"})],
            "Found both.",
        ]
    )
    session = make_text_session(scripted)
    sessions.append(session)
    log = EventLog(session)
    await session.start(Greeter())

    await session.run(user_input="find a and b")

    added = [ev.item.type for ev in log.of("conversation_item_added")]
    assert set(added) == {"agent_handoff", "message"}
    kinds = [item.type for item in session.history.items]
    assert kinds.count("function_call") == 2 and kinds.count("function_call_output") == 2

    executed = log.of("function_tools_executed")
    assert len(executed) == 1
    batch = executed[0]
    assert [c.arguments for c in batch.function_calls] == ['{"query": "a"}', '{"query": "b"}']
    assert [o.output for o in batch.function_call_outputs] == ["found a", "found b"]

    names = log.names()
    i_exec = names.index("function_tools_executed")
    ends = [i for i, (n, ev) in enumerate(log.entries) if n == "tool_execution_updated"]
    assert len(ends) == 4 and max(ends) < i_exec  # 2 started + 2 ended, all before the batch
    reply = next(
        i
        for i, (n, ev) in enumerate(log.entries)
        if n == "conversation_item_added" and getattr(ev.item, "role", None) == "assistant"
    )
    assert reply > i_exec


async def test_function_call_reaches_history_only_after_tool_finished(
    sessions: list[AgentSession[Any]],
) -> None:
    """While a tool runs, neither ``session.history`` nor the agent's ``chat_ctx`` holds its
    call. ``tool_execution_updated`` (update ``ToolCallStarted``) reports it in flight with
    ``call_id``, ``name`` and ``arguments``; ``ToolCallEnded`` follows with the same
    ``call_id`` and ``status="done"``; only then are the call and output inserted (the history
    holds a *copy* of the started ``FunctionCall``: same ``id`` and ``call_id``)."""
    gate = asyncio.Event()

    class Slow(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="slow")

        @function_tool
        async def charge(self, ctx: RunContext[Any], amount: int) -> str:
            """Charge a card."""
            await gate.wait()
            return f"charged {amount}"

    scripted = ScriptedLLM([[ToolCall("charge", {"amount": 5}, call_id="call_pay")], "Paid."])
    session = make_text_session(scripted)
    sessions.append(session)
    log = EventLog(session)
    agent = Slow()
    await session.start(agent)

    run: asyncio.Future[RunResult[Any]] = asyncio.ensure_future(session.run(user_input="pay"))
    started = await log.wait_for(
        "tool_execution_updated", lambda ev: isinstance(ev.update, ToolCallStarted)
    )
    call = started.update.function_call
    assert (call.call_id, call.name, call.arguments) == ("call_pay", "charge", '{"amount": 5}')
    assert not of_type(session.history.items, "function_call")
    assert not of_type(agent.chat_ctx.items, "function_call")
    assert log.of("function_tools_executed") == []
    # the only other live record is private: call_id -> running task (with its RunContext)
    running = _RunningTasks.get(session, {})
    assert list(running) == ["call_pay"]
    assert running["call_pay"].ctx.function_call is call

    gate.set()
    await asyncio.wait_for(run, 5)

    assert _RunningTasks.get(session, {}) == {}
    ended = [ev.update for ev in log.of("tool_execution_updated")][-1]
    assert isinstance(ended, ToolCallEnded)
    assert (ended.call_id, ended.status, ended.message) == ("call_pay", "done", "charged 5")
    (in_history,) = of_type(session.history.items, "function_call")
    assert (in_history.id, in_history.call_id) == (call.id, call.call_id)
    assert of_type(session.history.items, "function_call_output")[0].output == "charged 5"


async def test_tool_returning_agent_switches_current_agent_at_once(
    sessions: list[AgentSession[Any]],
) -> None:
    """A tool returning an ``Agent`` switches ``session.current_agent`` right after
    ``function_tools_executed`` is emitted (synchronously, before the new activity starts).
    At ``ToolCallEnded`` it is still the old agent. The new agent's ``chat_ctx`` holds only
    its own instructions and its start config item; the bare handoff asks for no reply."""
    seen: dict[str, str] = {}

    class Second(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="I am second.")

    class First(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="I am first.")

        @function_tool
        async def transfer(self, ctx: RunContext[Any]) -> Agent:
            """Transfer to the second agent."""
            return Second()

    scripted = ScriptedLLM([[ToolCall("transfer")]])
    session = make_text_session(scripted)
    sessions.append(session)

    def on_tool(ev: Any) -> None:
        if isinstance(ev.update, ToolCallEnded):
            seen["tool_ended"] = type(session.current_agent).__name__

    def on_executed(ev: Any) -> None:
        seen["during_emit"] = type(session.current_agent).__name__
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: seen.setdefault("right_after", type(session.current_agent).__name__))

    session.on("tool_execution_updated", on_tool)
    session.on("function_tools_executed", on_executed)
    await session.start(First())

    result: RunResult[Any] = await session.run(user_input="transfer me")

    assert seen == {"tool_ended": "First", "during_emit": "First", "right_after": "Second"}
    assert isinstance(session.current_agent, Second)
    new_ctx = session.current_agent.chat_ctx.items
    assert [item.type for item in new_ctx] == ["message", "agent_config_update"]
    assert isinstance(new_ctx[0], llm.ChatMessage)
    assert new_ctx[0].text_content == "I am second."
    handoffs = of_type(session.history.items, "agent_handoff")
    assert [(h.old_agent_id, h.new_agent_id) for h in handoffs] == [
        (None, "first"),
        ("first", "second"),
    ]
    assert of_type(session.history.items, "function_call_output")[0].reply_required is False
    assert len(scripted.requests) == 1  # no reply generated after the handoff
    assert type(result.events[-1]).__name__ == "AgentHandoffEvent"


async def test_a_tool_task_is_marked_with_its_reply_and_a_task_it_starts_is_not(
    sessions: list[AgentSession[Any]],
) -> None:
    """LiveKit marks the tasks of a session's own work (``agent._set_activity_task_info``):
    a tool's task with the reply (speech) running it, not done while the tool runs;
    ``on_enter``'s task without a speech. A task the tool starts is not marked, though it
    inherits the context variables, ``_SpeechHandleContextVar`` among them. The hooks
    tell a call from inside the session by the mark (silence.py ``_livekit_task``)."""
    from livekit.agents.voice.agent import _get_activity_task_info
    from livekit.agents.voice.agent_activity import _SpeechHandleContextVar

    seen: dict[str, Any] = {}

    def mark() -> Any:
        task = asyncio.current_task()
        return None if task is None else _get_activity_task_info(task)

    class Marked(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="You look things up.")

        async def on_enter(self) -> None:
            info = mark()
            seen["on_enter"] = (info is not None, info and info.speech_handle)

        @function_tool
        async def lookup(self, ctx: RunContext[Any]) -> str:
            """Look something up."""
            info = mark()
            speech = info.speech_handle if info is not None else None
            seen["tool"] = (speech is not None, speech is not None and speech.done())

            async def started() -> None:
                seen["started"] = (mark() is None, _SpeechHandleContextVar.get(None) is speech)

            await asyncio.create_task(started())
            return "found"

    session = make_text_session(ScriptedLLM([[ToolCall("lookup")], "done"]))
    sessions.append(session)
    await session.start(Marked())
    await session.run(user_input="look it up")

    assert seen == {"on_enter": (True, None), "tool": (True, False), "started": (True, True)}


# ------------------------------------------------------------------------------ session basics


async def test_session_userdata_raises_value_error_when_unset() -> None:
    session = make_text_session(ScriptedLLM())
    with pytest.raises(ValueError, match="userdata is not set"):
        _ = session.userdata
    session.userdata = {"k": 1}
    assert session.userdata == {"k": 1}


async def test_run_returns_runresult_awaitable_but_not_coroutine(
    sessions: list[AgentSession[Any]],
) -> None:
    """``run()`` returns a ``RunResult``: awaitable, not a coroutine, so
    ``asyncio.create_task`` rejects it and ``asyncio.ensure_future`` accepts it."""
    session = make_text_session(ScriptedLLM(["one", "two"]))
    sessions.append(session)
    await session.start(Plain())

    result: RunResult[Any] = session.run(user_input="first")
    assert isinstance(result, RunResult)
    assert not asyncio.iscoroutine(result)
    assert inspect.isawaitable(result)
    with pytest.raises(TypeError):
        asyncio.create_task(result)  # type: ignore[arg-type]  # noqa: RUF006
    assert await asyncio.ensure_future(result) is result

    second: RunResult[Any] = await session.run(user_input="second")
    assert second.expect.next_event().is_message(role="assistant")


async def test_pause_primitives_work_without_a_room(
    sessions: list[AgentSession[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Without a room ``session.input.audio`` / ``session.output.audio`` are ``None``.
    ``set_audio_enabled(False)`` switches the flag silently; ``set_audio_enabled(True)``
    switches it back and logs a warning ("Cannot enable audio ... when it's not set").
    ``session.interrupt()`` raises ``RuntimeError`` before ``start()`` and returns a future
    after. The flags gate audio only: a text turn is still answered with both off."""
    session = make_text_session(ScriptedLLM(["still answering"]))
    sessions.append(session)
    with pytest.raises(RuntimeError, match="isn't running"):
        session.interrupt()

    await session.start(Plain())
    assert session.input.audio is None and session.output.audio is None

    with caplog.at_level(logging.WARNING, logger=LK_LOGGER):
        session.input.set_audio_enabled(False)
        session.output.set_audio_enabled(False)
        assert caplog.records == []
        assert (session.input.audio_enabled, session.output.audio_enabled) == (False, False)

        result: RunResult[Any] = await session.run(user_input="are you paused?")
        result.expect.next_event().is_message(role="assistant")
        last = session.history.items[-1]
        assert isinstance(last, llm.ChatMessage)
        assert last.text_content == "still answering"

        fut = session.interrupt()
        assert isinstance(fut, asyncio.Future)
        await asyncio.wait_for(fut, 5)
        assert caplog.records == []

        session.input.set_audio_enabled(True)
        session.output.set_audio_enabled(True)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Cannot enable audio input when it's not set",
        "Cannot enable audio output when it's not set",
    ]
    assert (session.input.audio_enabled, session.output.audio_enabled) == (True, True)


# ---------------------------------------------------------------------------------- voice


LONG_REPLY = (
    "One two three four five. Six seven eight nine ten. "
    "Eleven twelve thirteen fourteen fifteen. Sixteen seventeen eighteen nineteen twenty."
)


async def started_voice(
    scripted: ScriptedLLM, sessions: list[AgentSession[Any]]
) -> tuple[AgentSession[Any], VoiceFakes, EventLog]:
    """A voice session on the fakes, with an event log, started with a plain agent."""
    session = make_voice_session(scripted)
    sessions.append(session)
    fakes, log = voice_fakes(session), EventLog(session)
    await session.start(Plain())
    return session, fakes, log


def wait_assistant(log: EventLog, *, since: int = 0) -> Any:
    return log.wait_for(
        "conversation_item_added",
        lambda ev: getattr(ev.item, "role", None) == "assistant",
        since=since,
        timeout=10,
    )


async def test_voice_user_speech_gets_a_spoken_reply(
    sessions: list[AgentSession[Any]],
) -> None:
    """With the voice fakes, user speech goes VAD -> STT -> LLM -> TTS, and the reply's audio
    reaches the audio output (and its transcript the text output)."""
    scripted = ScriptedLLM(["Hello there. Nice to meet you."])
    _, fakes, log = await started_voice(scripted, sessions)

    fakes.audio_in.say("hello agent")
    reply = (await wait_assistant(log)).item
    segment = await fakes.audio_out.wait_for_segment(1)

    assert scripted.requests[0].last_user_text == "hello agent"
    assert fakes.stt.transcripts == ["hello agent"]
    assert reply.text_content == "Hello there. Nice to meet you." and not reply.interrupted
    assert segment.frames > 0 and not segment.interrupted
    assert segment.playback_position == pytest.approx(segment.pushed_duration)
    assert fakes.tts.requests  # synthesized sentence by sentence
    assert fakes.text_out is not None and fakes.text_out.segments[-1] == reply.text_content


async def test_voice_interrupted_reply_holds_partial_text_and_starts_before_barge_in(
    sessions: list[AgentSession[Any]],
) -> None:
    """User speech during the reply interrupts it: the assistant message has
    ``interrupted=True``, only the text that was played (a strict prefix of the reply), and a
    ``created_at`` from when the reply started, before the user began to barge in (and before
    the barge-in message, which is stamped later still)."""
    scripted = ScriptedLLM([LONG_REPLY, "Sure, stopping."], chunk_delay=0.05)
    session, fakes, log = await started_voice(scripted, sessions)

    fakes.audio_in.say("count to twenty")
    await log.wait_for("agent_state_changed", lambda ev: ev.new_state == "speaking")
    await fakes.audio_out.wait_until_played(0.6)
    mark = log.mark()
    fakes.audio_in.say("wait stop please")

    cut = (await wait_assistant(log, since=mark)).item
    barge_start = await log.wait_for(
        "user_state_changed", lambda ev: ev.new_state == "speaking", since=mark
    )
    barge_msg = (
        await log.wait_for(
            "conversation_item_added",
            lambda ev: getattr(ev.item, "role", None) == "user",
            since=mark,
            timeout=10,
        )
    ).item

    assert cut.interrupted is True
    text = cut.text_content or ""
    assert text and len(text) < len(LONG_REPLY) and LONG_REPLY.startswith(text)
    assert cut.created_at < barge_start.created_at < barge_msg.created_at
    assert barge_msg.text_content == "wait stop please"
    first_segment = await fakes.audio_out.wait_for_segment(1)
    assert first_segment.interrupted and first_segment.playback_position > 0
    history = session.history.items
    assert history.index(cut) < history.index(barge_msg)


async def test_voice_session_interrupt_cuts_the_reply_with_partial_text(
    sessions: list[AgentSession[Any]],
) -> None:
    """``session.interrupt()`` during a spoken reply stops the audio at once (the segment
    ends ``interrupted``, no frame arrives after) and records the played part with
    ``interrupted=True``: the pause building block."""
    scripted = ScriptedLLM([LONG_REPLY], chunk_delay=0.05)
    session, fakes, log = await started_voice(scripted, sessions)

    fakes.audio_in.say("count to twenty")
    await fakes.audio_out.wait_until_played(0.8)
    await asyncio.wait_for(session.interrupt(), 5)

    # the interrupt future resolves once the speech is done and the history updated
    cut = session.history.messages()[-1]
    assert cut.role == "assistant"
    assert log.of("conversation_item_added")[-1].item is cut
    segment = await fakes.audio_out.wait_for_segment(1)
    assert cut.interrupted is True
    assert cut.text_content and LONG_REPLY.startswith(cut.text_content)
    assert len(cut.text_content) < len(LONG_REPLY)
    assert segment.interrupted and segment.playback_position < fakes.tts.duration_for(LONG_REPLY)
    assert len(fakes.audio_out.segments) == 1
    assert segment.frames == len(fakes.audio_out.frames)
    assert session.current_speech is None or session.current_speech.done()


async def test_voice_reply_interrupted_before_a_word_was_played_leaves_no_assistant_item(
    sessions: list[AgentSession[Any]],
) -> None:
    """Nuance: an interrupted reply is recorded with what was *played* (the synchronized
    transcript). Interrupted before its first word played, it leaves no assistant message at
    all, although the LLM ran and the user's message is in the history."""
    scripted = ScriptedLLM([LONG_REPLY], chunk_delay=0.05)
    session, fakes, log = await started_voice(scripted, sessions)

    fakes.audio_in.say("count to twenty")
    await fakes.audio_out.wait_for_frames(1)
    await asyncio.wait_for(session.interrupt(), 5)  # resolves once the history is updated

    assert len(scripted.requests) == 1
    roles = [getattr(ev.item, "role", None) for ev in log.of("conversation_item_added")]
    assert roles == [None, "user"]  # the handoff, then the user's message: no assistant item
    assert [m.role for m in session.history.messages()] == ["user"]
    assert (await fakes.audio_out.wait_for_segment(1)).interrupted


async def test_voice_output_disabled_llm_still_runs_and_reply_is_added_as_text(
    sessions: list[AgentSession[Any]],
) -> None:
    """With ``session.output.set_audio_enabled(False)`` no frame reaches the audio output
    and the TTS is not even called, yet the user's speech is still transcribed, the LLM
    still runs, and its reply is added to the history as text (``interrupted=False``)."""
    scripted = ScriptedLLM(["A reply nobody hears."])
    session, fakes, log = await started_voice(scripted, sessions)
    session.output.set_audio_enabled(False)
    assert fakes.audio_out.attached is False

    fakes.audio_in.say("are you there")
    reply = (await wait_assistant(log)).item

    assert reply.text_content == "A reply nobody hears." and reply.interrupted is False
    assert scripted.requests[0].last_user_text == "are you there"
    assert fakes.audio_out.frames == [] and fakes.audio_out.segments == []
    assert fakes.tts.requests == []


async def test_voice_disabling_output_mid_reply_does_not_stop_the_current_reply(
    sessions: list[AgentSession[Any]],
) -> None:
    """Nuance for pause: the audio output of a reply is chosen when the reply starts, so
    ``set_audio_enabled(False)`` while speaking does not silence it; frames keep reaching
    the (detached) output until the reply ends. A pause must also ``interrupt()``."""
    scripted = ScriptedLLM([LONG_REPLY], chunk_delay=0.05)
    session, fakes, log = await started_voice(scripted, sessions)

    fakes.audio_in.say("count to twenty")
    await fakes.audio_out.wait_for_frames(4)
    session.output.set_audio_enabled(False)
    at_disable = len(fakes.audio_out.frames)

    reply = (await wait_assistant(log)).item
    assert len(fakes.audio_out.frames) > at_disable
    assert reply.interrupted is False and reply.text_content == LONG_REPLY


async def test_voice_input_disabled_drops_user_speech(
    sessions: list[AgentSession[Any]],
) -> None:
    """``session.input.set_audio_enabled(False)`` detaches the input: a room-like input (our
    fake, like RoomIO's) drops its frames, so speech during that time is never heard (no VAD
    event, no transcript, no LLM call). Re-enabled, the next utterance is answered."""
    scripted = ScriptedLLM(["Now I hear you."])
    session, fakes, log = await started_voice(scripted, sessions)

    session.input.set_audio_enabled(False)
    assert fakes.audio_in.attached is False
    lost = fakes.audio_in.say("can you hear me")
    await asyncio.wait_for(lost.done, 5)
    assert lost.dropped

    session.input.set_audio_enabled(True)
    fakes.audio_in.say("and now")
    await wait_assistant(log)

    assert fakes.vad.speech_starts == 1
    assert fakes.stt.transcripts == ["and now"]
    assert [r.last_user_text for r in scripted.requests] == ["and now"]


async def test_close_waits_for_session_close_transcript_timeout(
    sessions: list[AgentSession[Any]],
) -> None:
    """``AgentSession(session_close_transcript_timeout=2.0)`` by default. Closing a session
    with an STT waits up to that long for a last final transcript, unless one arrived in the
    last 0.5 s or the STT supports ``manual_flush`` and answers the flush. A text session (no
    STT) never waits. (Measured loosely: only a lower bound and a generous upper bound.)"""
    param = inspect.signature(AgentSession.__init__).parameters["session_close_transcript_timeout"]
    assert param.default == 2.0
    assert make_text_session(ScriptedLLM()).options.session_close_transcript_timeout == 2.0

    async def close_after_a_turn(make: Callable[[], AgentSession[Any]]) -> float:
        session = make()
        fakes = voice_fakes(session)
        log = EventLog(session)
        await session.start(Plain())
        fakes.audio_in.say("hello")
        await wait_assistant(log)
        await fakes.audio_out.wait_for_segment(1)
        await asyncio.sleep(0.6)  # setup, not an assertion: the last transcript is > 0.5 s old
        started = time.perf_counter()
        await session.aclose()
        return time.perf_counter() - started

    waited = await close_after_a_turn(
        lambda: make_voice_session(ScriptedLLM(["Hi."]), session_close_transcript_timeout=1.5)
    )
    assert waited >= 1.4

    flushed = await close_after_a_turn(
        lambda: make_voice_session(
            ScriptedLLM(["Hi."]),
            stt=FakeSTT(manual_flush=True),
            session_close_transcript_timeout=1.5,
        )
    )
    assert flushed < 1.4
