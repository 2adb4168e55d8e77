"""Sanity checks of the test kit itself (the LiveKit facts live in tests/test_livekit_facts.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import Agent, RunContext, RunResult, function_tool, llm

from tests.lk import (
    EventLog,
    FakeAudioInput,
    Reply,
    ScriptedLLM,
    ScriptExhausted,
    ToolCall,
    make_text_session,
    make_voice_session,
    voice_fakes,
)


class Helper(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="help")

    @function_tool
    async def add(self, ctx: RunContext[Any], a: int, b: int) -> int:
        """Add two numbers."""
        return a + b


async def test_scripted_llm_follows_script_and_records_requests() -> None:
    def echo(ctx: llm.ChatContext) -> str:
        return f"you said {ctx.messages()[-1].text_content}"

    scripted = ScriptedLLM(
        [
            Reply(text="Let me add.", tool_calls=[ToolCall("add", {"a": 1, "b": 2}, "c1")]),
            "It is 3.",
            echo,
        ]
    )
    session = make_text_session(scripted)
    await session.start(Helper())
    try:
        await session.run(user_input="1+2?")
        await session.run(user_input="thanks")
    finally:
        await session.aclose()

    assert scripted.remaining == 0
    assert [r.tools for r in scripted.requests] == [["add"]] * 3
    assert scripted.requests[1].items[-1].type == "function_call_output"
    assert scripted.requests[1].items[-1].output == "3"
    assert scripted.requests[0].reply == Reply(
        text="Let me add.", tool_calls=[ToolCall("add", {"a": 1, "b": 2}, "c1")]
    )
    texts = [m.text_content for m in session.history.messages() if m.role == "assistant"]
    assert texts == ["Let me add.", "It is 3.", "you said thanks"]
    # requests hold copies: later turns do not grow an earlier request
    assert len(scripted.requests[0].items) < len(scripted.requests[2].items)


async def test_rule_based_llm_and_wait_for_requests() -> None:
    scripted = ScriptedLLM.rule_based(lambda ctx: f"#{len(ctx.messages())}")
    session = make_text_session(scripted)
    await session.start(Helper())
    try:
        run: asyncio.Future[RunResult[Any]] = asyncio.ensure_future(session.run(user_input="hi"))
        request = await scripted.wait_for_requests(1)
        assert request.last_user_text == "hi"
        await run
    finally:
        await session.aclose()
    assert session.history.messages()[-1].text_content == "#2"


async def test_exhausted_script_fails_the_run() -> None:
    session = make_text_session(ScriptedLLM([]))
    await session.start(Helper())
    try:
        with pytest.raises(ScriptExhausted):
            await session.run(user_input="anything")
    finally:
        await session.aclose()


async def test_text_streams_in_chunks() -> None:
    scripted = ScriptedLLM(["a b c d e"], chunk_words=2)
    chunks = [
        c.delta.content
        async for c in scripted.chat(chat_ctx=llm.ChatContext.empty())
        if c.delta and c.delta.content
    ]
    assert chunks == ["a b ", "c d ", "e"]


async def test_fake_input_drops_frames_while_detached() -> None:
    mic = FakeAudioInput()
    mic.on_detached()
    utt = mic.say("lost words", duration=0.1)
    reader = asyncio.ensure_future(mic.__anext__())
    await asyncio.wait_for(utt.done, 2)
    assert utt.dropped and utt.frames_dropped == utt.frames_total
    mic.on_attached()
    frame = await asyncio.wait_for(reader, 2)
    assert frame.data[0] == 0  # silence
    mic.close()


async def test_voice_session_round_trip() -> None:
    session = make_voice_session(ScriptedLLM(["Hi, how are you?"]))
    fakes = voice_fakes(session)
    log = EventLog(session)
    await session.start(Helper())
    try:
        fakes.audio_in.say("hello")
        segment = await fakes.audio_out.wait_for_segment(1)
        await log.wait_for(
            "conversation_item_added", lambda ev: getattr(ev.item, "role", "") == "assistant"
        )
    finally:
        await session.aclose()
    assert segment.pushed_duration == pytest.approx(sum(f.duration for f in fakes.audio_out.frames))
    assert [e.type.value for e in fakes.vad.events] == ["start_of_speech", "end_of_speech"]
    assert voice_fakes(session) is fakes
