"""Test kit for agent-hook tests: a scripted LLM, voice fakes and an event recorder.

Text turns::

    llm = ScriptedLLM(["Hi!", [ToolCall("lookup", {"q": "x"})], "Found it."])
    session = make_text_session(llm)
    await session.start(MyAgent())
    await session.run(user_input="hello")
    llm.requests[0].chat_ctx            # what the LLM was sent

Voice turns (no room)::

    session = make_voice_session(llm)
    fakes = voice_fakes(session)
    await session.start(MyAgent())
    fakes.audio_in.say("hello")
    await fakes.audio_out.wait_for_segment(1)
"""

from .events import ALL_EVENTS, EventLog
from .fake_voice import (
    FakeAudioInput,
    FakeAudioOutput,
    FakeSTT,
    FakeTextOutput,
    FakeTTS,
    FakeVAD,
    PlayedSegment,
    Utterance,
    VoiceFakes,
    make_voice_session,
    voice_fakes,
)
from .scripted_llm import (
    LLMRequest,
    Reply,
    ScriptedLLM,
    ScriptExhausted,
    ToolCall,
    Turn,
    make_text_session,
)

__all__ = [
    "ALL_EVENTS",
    "EventLog",
    "FakeAudioInput",
    "FakeAudioOutput",
    "FakeSTT",
    "FakeTTS",
    "FakeTextOutput",
    "FakeVAD",
    "LLMRequest",
    "PlayedSegment",
    "Reply",
    "ScriptExhausted",
    "ScriptedLLM",
    "ToolCall",
    "Turn",
    "Utterance",
    "VoiceFakes",
    "make_text_session",
    "make_voice_session",
    "voice_fakes",
]
