"""The scripted LLM of our tests: the one ``livekit_resume.testing.llm`` ships.

Kept as an import path for the tests (``from tests.lk.scripted_llm import ScriptedLLM``).
"""

from livekit_resume.testing.llm import (
    LLMRequest,
    Reply,
    ScriptedLLM,
    ScriptedLLMStream,
    ScriptExhausted,
    ToolCall,
    Turn,
    make_text_session,
)

__all__ = [
    "LLMRequest",
    "Reply",
    "ScriptExhausted",
    "ScriptedLLM",
    "ScriptedLLMStream",
    "ToolCall",
    "Turn",
    "make_text_session",
]
