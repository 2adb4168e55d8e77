"""A long pause on a whole voice pipeline whose models hold real connections (issue 19).

The models are `tests.lk.fake_providers` doubles: the STT holds a loopback connection per
recognize stream, the TTS a pooled one and the LLM a keep-alive one, to a local server
that counts them, as LiveKit's provider plugins do. While paused the session keeps all
of them and its audio pipeline; once ``suspend_after`` fires it is closed: its stream
connection and pipeline are gone. The models' pools are LiveKit's: closing a session
does not close its models, so their pooled connections stay until the models are closed
(the LiveKit fact is proven here too). The same session restarts in place afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests.lk import FakeAudioInput, FakeAudioOutput, make_voice_session, voice_fakes
from tests.lk.fake_providers import NetLLM, NetSTT, NetTTS, ProviderServer
from tests.test_voice import REGISTRY, Counter

KEY = "long-pause"


@pytest.fixture
async def server() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as s:
        yield s


async def open_now(server: ProviderServer, kind: str, want: int) -> None:
    # the server counts a connection closed once it has read the client's end of it
    async def reached() -> bool:
        return server.open_count(kind) == want

    await eventually(reached, f"{want} {kind} connection(s) open", 10.0)


async def voice_call(
    server: ProviderServer, store: MemoryStore
) -> tuple[AgentSession[Any], lr.ResumableSession, NetLLM, asyncio.Event]:
    """A voice session on the connected doubles, one turn spoken and answered."""
    model = NetLLM(server, ["Hello there.", "Yes, I am back."], default="ok")
    session = make_voice_session(model, stt=NetSTT(server), tts=NetTTS(server))
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, suspend_after=0.3, debounce=0.01)
    await session.start(await rs.restore(session, default=Counter))
    fakes = voice_fakes(session)
    fakes.audio_in.say("hello")
    await fakes.audio_out.wait_for_segment(1)
    return session, rs, model, closed


async def close_models(session: AgentSession[Any], model: NetLLM) -> None:
    tts = session.tts
    assert tts is not None
    await tts.aclose()
    await model.aclose()


async def test_paused_the_connections_stay_open_and_suspend_after_closes_the_sessions_own(
    server: ProviderServer,
) -> None:
    store = MemoryStore()
    session, rs, model, closed = await voice_call(server, store)
    await rs.pause()
    # still paused (the timer has not run: nothing was awaited since): everything is held
    assert rs.state == "paused"
    assert [server.open_count(k) for k in ("stt", "tts", "llm")] == [1, 1, 1]
    assert session.input.audio is not None and session.output.audio is not None

    await asyncio.wait_for(closed.wait(), 10)  # suspend_after fired: saved, released, closed
    assert str(rs.state) == "suspended" and rs._lease is None
    await open_now(server, "stt", 0)  # the recognize stream's connection is gone
    assert session.input.audio is None and session.output.audio is None  # no audio pipeline
    # LiveKit's close does not close the models: their pools keep their connections...
    assert server.open_count("tts") == 1 and server.open_count("llm") == 1
    await close_models(session, model)  # ...until the models themselves are closed
    await open_now(server, "tts", 0)
    await open_now(server, "llm", 0)
    info = await store.info(KEY)
    assert info is not None and info.owner is None and info.info["state"] == "suspended"


async def test_a_session_suspended_after_a_long_pause_restarts_in_place_with_nothing_lost(
    server: ProviderServer,
) -> None:
    store = MemoryStore()
    session, rs, model, closed = await voice_call(server, store)
    await rs.pause()
    await asyncio.wait_for(closed.wait(), 10)
    saved = [item.id for item in session.history.items]
    await open_now(server, "stt", 0)

    # the caller is back: the same AgentSession restarts with the stored conversation
    session.history.items.clear()
    audio_in, audio_out = FakeAudioInput(), FakeAudioOutput()
    session.input.audio, session.output.audio = audio_in, audio_out
    agent = await rs.restore(session, default=Counter, takeover=True)
    assert rs.resumed and rs.state == "active"
    await session.start(agent)
    assert [item.id for item in session.history.items][: len(saved)] == saved
    audio_in.say("are you back")
    await audio_out.wait_for_segment(1)
    assert model.requests[-1].texts("user") == ["hello", "are you back"]
    assert server.opened["stt"] == 2 and server.open_count("stt") == 1  # a new stream
    await rs.aclose()
    await session.aclose()
    await close_models(session, model)
