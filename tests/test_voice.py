"""Pause, resume and restore on a whole voice pipeline (VAD, STT, LLM, TTS, audio out), no room."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests.lk import EventLog, ScriptedLLM, VoiceFakes, make_voice_session, voice_fakes
from tests.lk.scripted_llm import ScriptExhausted

KEY = "voice-room"
LONG_REPLY = (
    "One two three four five. Six seven eight nine ten. "
    "Eleven twelve thirteen fourteen fifteen. Sixteen seventeen eighteen nineteen twenty."
)


class Counter(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You count when asked.")


REGISTRY = lr.AgentRegistry()
REGISTRY.register(Counter)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.aclose()


@dataclass
class Voice:
    model: ScriptedLLM
    session: AgentSession[Any]
    fakes: VoiceFakes
    log: EventLog
    rs: lr.ResumableSession


async def voice(
    store: MemoryStore, sessions: list[AgentSession[Any]], script: list[str], **llm_kw: Any
) -> Voice:
    """A voice session with the hooks attached, restored (or fresh) and started."""
    model = ScriptedLLM(script, **llm_kw)
    session = make_voice_session(model)
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    v = Voice(model, session, voice_fakes(session), EventLog(session), rs)
    await session.start(await rs.restore(session, default=Counter))
    return v


def wait_message(log: EventLog, role: str, *, since: int = 0) -> Any:
    return log.wait_for(
        "conversation_item_added",
        lambda ev: getattr(ev.item, "role", None) == role,
        since=since,
        timeout=10,
    )


async def test_pause_cuts_the_reply_and_nothing_is_heard_or_spoken_until_resume(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    v = await voice(store, sessions, [LONG_REPLY, "Welcome back."], chunk_delay=0.05)
    model, session, fakes, log, rs = v.model, v.session, v.fakes, v.log, v.rs

    fakes.audio_in.say("count to twenty")
    await fakes.audio_out.wait_until_played(0.6)

    # and its first words reached the transcript (on a loaded machine the synchronized
    # text may lag the audio: a cut before any word was forwarded keeps no reply at all)
    async def forwarded() -> bool:
        return fakes.text_out is not None and len(fakes.text_out.current.split()) >= 2

    await eventually(forwarded, "the reply's first words were forwarded")
    version = await rs.pause()

    # the reply was cut where it was heard, and the snapshot holds exactly that
    cut = session.history.messages()[-1]
    assert cut.role == "assistant" and cut.interrupted is True
    assert cut.text_content and LONG_REPLY.startswith(cut.text_content)
    assert len(cut.text_content) < len(LONG_REPLY)
    stored = await store.load(KEY, version)
    assert stored.info["state"] == "paused"
    assert cut.id in [i for i, _ in stored.streams["history"]]
    assert (await fakes.audio_out.wait_for_segment(1)).interrupted

    # while paused: the user speaks, nobody hears, nothing is asked or said
    frames, tts_calls, asked = (
        len(fakes.audio_out.frames),
        len(fakes.tts.requests),
        len(model.requests),
    )
    items = len(session.history.items)
    utterance = fakes.audio_in.say("hello, are you still there?")
    await asyncio.wait_for(utterance.done, 10)
    assert utterance.dropped
    await asyncio.sleep(0.5)  # give a (wrongly) live pipeline the time to answer
    assert len(fakes.audio_out.frames) == frames
    assert len(fakes.tts.requests) == tts_calls
    assert len(model.requests) == asked
    assert len(session.history.items) == items

    # resume: the conversation continues with nothing lost
    await rs.resume()
    mark = log.mark()
    fakes.audio_in.say("okay I am back")
    reply = (await wait_message(log, "assistant", since=mark)).item
    assert reply.text_content == "Welcome back."
    request = model.requests[-1]
    assert request.last_user_text == "okay I am back"
    assert cut.id in request.item_ids  # the model knows what it had said before the pause
    segment = await fakes.audio_out.wait_for_segment(2)
    assert segment.frames > 0
    await rs.aclose()


async def test_pause_blocks_typed_input_too(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    v = await voice(store, sessions, ["Hi."])
    model, session, fakes, rs = v.model, v.session, v.fakes, v.rs
    await rs.pause()
    await asyncio.wait_for(session.run(user_input="typed while paused"), 5)
    assert model.requests == []  # ScriptExhausted would have been raised had it been asked
    assert fakes.audio_out.frames == [] and fakes.tts.requests == []
    assert not [m for m in session.history.messages() if m.role == "assistant"]
    await rs.resume()
    await session.run(user_input="now answer")
    assert model.requests[-1].last_user_text == "now answer"
    with pytest.raises(ScriptExhausted):
        await session.run(user_input="one more")
    await rs.aclose()


async def test_barged_in_reply_restores_field_for_field_in_a_new_session(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    v = await voice(store, sessions, [LONG_REPLY, "Sure, stopping."], chunk_delay=0.05)
    session, fakes, log, rs = v.session, v.fakes, v.log, v.rs

    fakes.audio_in.say("count to twenty")
    await fakes.audio_out.wait_until_played(0.6)
    mark = log.mark()
    fakes.audio_in.say("wait stop please")
    cut = (await wait_message(log, "assistant", since=mark)).item
    await log.wait_for(
        "conversation_item_added",
        lambda ev: getattr(ev.item, "text_content", None) == "Sure, stopping.",
        since=mark,
        timeout=10,
    )
    assert cut.interrupted
    await rs.suspend()
    saved = [i.model_dump() for i in session.history.items]

    # a new process would do exactly this: a fresh session, restored from the store
    v2 = await voice(store, sessions, ["Where were we?"])
    model2, session2, rs2 = v2.model, v2.session, v2.rs
    assert rs2.resumed
    restored = [i.model_dump() for i in session2.history.items[: len(saved)]]
    assert restored == saved  # interrupted=True, the partial text, exact created_at
    back = next(i for i in session2.history.items if i.id == cut.id)
    assert isinstance(back, llm.ChatMessage) and back.interrupted
    assert back.text_content == cut.text_content and back.created_at == cut.created_at

    await session2.run(user_input="continue please")
    ids = model2.requests[0].item_ids
    barge = next(m for m in session.history.messages() if m.text_content == "wait stop please")
    assert ids.index(cut.id) < ids.index(barge.id)  # the cut reply before the barge-in
    await rs2.aclose()
