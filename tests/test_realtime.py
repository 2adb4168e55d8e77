"""Agents on a realtime model (issue 17), proven on our fake realtime server
(tests/lk/fake_realtime.py), which records everything LiveKit sends it.

- a restore reaches the realtime session through the session's own context sync, once:
  no item is created twice, no user turn is replayed, and the first reply after the
  restore is made from all of it;
- a tool call in flight at a checkpoint (realtime models record calls as they start)
  comes back answered "interrupted";
- an item the realtime session fills in later (a user transcript after the reply) is
  saved in its final form;
- the options the session keeps beside the conversation are saved and reapplied;
- pause: nothing is generated, played or recorded while paused, the cut reply is saved
  as heard.

The first test proves the restore with a worker killed mid-tool and the session restored
in a new OS process (tests/_child_realtime.py), the rest in one process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.chat import INTERRUPTED_OUTPUT
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests import ROOT, child_env
from tests._child_realtime import INSTRUCTIONS, REGISTRY, Concierge
from tests.lk import EventLog, FakeAudioInput, FakeAudioOutput, Reply, ToolCall
from tests.lk.fake_realtime import (
    FakeRealtimeModel,
    FakeRealtimeSession,
    make_realtime_session,
    realtime_capabilities,
)
from tests.test_cross_process import Child

KEY = "rt-room"
CONVERSATION = ("message", "function_call", "function_call_output")
LONG_REPLY = " ".join(f"word{i}" for i in range(40))  # ten seconds of speech


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.aclose()


@dataclass
class Live:
    session: AgentSession[Any]
    rs: lr.ResumableSession
    model: FakeRealtimeModel
    mic: FakeAudioInput | None = None
    speaker: FakeAudioOutput | None = None

    @property
    def rt(self) -> FakeRealtimeSession:
        return self.model.active_session


async def start(
    store: MemoryStore,
    sessions: list[AgentSession[Any]],
    model: FakeRealtimeModel,
    *,
    voice: bool = False,
    **session_kw: Any,
) -> Live:
    """A session on ``model`` with the hooks attached, restored (or fresh) and started."""
    mic: FakeAudioInput | None = None
    speaker: FakeAudioOutput | None = None
    if voice:
        session, mic, speaker = make_realtime_session(model, **session_kw)
    else:
        session = AgentSession(llm=model, **session_kw)
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge, takeover=True))
    return Live(session, rs, model, mic, speaker)


async def latest(store: MemoryStore) -> Snapshot:
    rs = lr.ResumableSession(store, "codec-only", registry=REGISTRY)
    return from_stored(rs._capture.codec, await store.load(KEY))


def conversation(items: list[llm.ChatItem]) -> list[llm.ChatItem]:
    return [i for i in items if i.type in CONVERSATION]


async def spawn(url: str, key: str, mode: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests._child_realtime", "--store", url, "--key", key,
        "--mode", mode,
        cwd=ROOT, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    return Child(proc)


async def test_realtime_agent_killed_mid_tool_is_restored_in_a_new_process(
    tmp_path: Path,
) -> None:
    url, key = f"sqlite:///{tmp_path}/sessions.db", "rt-worker"
    saver = await spawn(url, key, "save")
    try:
        version, call_id = await saver.expect("SAVED")
    finally:
        await saver.kill()  # SIGKILL, the tool still running
    assert version == "1"

    restorer = await spawn(url, key, "restore")
    try:
        await restorer.expect("REPORT")
    finally:
        await restorer.kill()
    report = json.loads(restorer.lines[-1].removeprefix("REPORT "))
    assert report["resumed"] and report["instructions"] == INSTRUCTIONS
    # one sync at start, nothing else: no replayed turn, no audio, no reply of its own
    names = [name for name, _ in report["at_start"]]
    assert names == ["update_instructions", "update_chat_ctx", "update_tools"]
    assert report["frames_in"] == 0
    first_sync = report["at_start"][1][1]
    assert first_sync["delete"] == []
    (seen,) = report["seen"]  # the first reply after the restore...
    assert [i["id"] for i in seen[: len(first_sync["create"])]] == first_sync["create"]
    # ...saw the whole saved conversation, once, then the new question
    shape = [(i["type"], i.get("role") or i.get("name")) for i in seen]
    assert shape == [
        ("message", "user"), ("message", "assistant"), ("message", "user"),
        ("function_call", "book"), ("function_call_output", "book"), ("message", "assistant"),
        ("message", "user"),
    ]  # fmt: skip
    texts = [i.get("text") for i in seen if i["type"] == "message"]
    assert texts == ["hi, I am Ada", "Hello Ada.", "book a table for two", "One moment.",
                     "who am I, and is my table booked?"]  # fmt: skip
    call, out = seen[3], seen[4]
    assert call["call_id"] == out["call_id"] == call_id
    assert out["output"] == INTERRUPTED_OUTPUT  # answered as interrupted, not run again
    assert len(report["created"]) == len(set(report["created"])) == len(seen)
    calls = [name for name, _ in report["calls"]]
    assert calls.count("update_chat_ctx") == 2 and calls.count("generate_reply") == 1


# What differs between the provider families at a session's start (plugins' own flags):
# OpenAI's, and Gemini 3.1's and Nova Sonic's (no context updates after the start, no
# truncation, the server replies to tool results on its own).
FAMILIES = {
    "openai": realtime_capabilities(),
    "history-at-start-only": realtime_capabilities(
        message_truncation=False,
        auto_tool_reply_generation=True,
        manual_function_calls=False,
        mutable_chat_context=False,
        mutable_instructions=False,
        mutable_tools=False,
        per_response_tool_choice=False,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_restore_reaches_the_realtime_session_once_through_its_context_sync(
    store: MemoryStore, sessions: list[AgentSession[Any]], family: str
) -> None:
    first = FakeRealtimeModel(
        ["Hello, what can I do?", Reply("Booking.", [ToolCall("book", {"what": "a table"})]),
         "Done: a table for two."]
    )  # fmt: skip
    live = await start(store, sessions, first)
    session, rs = live.session, live.rs
    await session.run(user_input="hi, I am Ada")
    await session.run(user_input="book a table for two")
    await rs.checkpoint()
    saved = [i.id for i in conversation(session.current_agent.chat_ctx.items)]
    assert len(saved) == 7  # user, assistant, user, call, output, assistant, assistant
    await rs.aclose()

    second = FakeRealtimeModel(
        ["You are Ada, and your table is booked."], capabilities=FAMILIES[family]
    )
    live2 = await start(store, sessions, second)
    session2, rt = live2.session, live2.rt
    assert live2.rs.resumed
    # one sync at start, made of exactly the saved conversation, in order; nothing else
    assert rt.names() == ["update_instructions", "update_chat_ctx", "update_tools"]
    assert rt.calls[1][1] == {"create": saved, "delete": []}
    assert rt.instructions == INSTRUCTIONS
    assert rt.frames_in == 0 and rt.responses == []  # no replayed audio, no reply of its own

    await session2.run(user_input="who am I?")
    (answer,) = rt.responses
    seen = [i.id for i in answer.seen]
    assert seen[: len(saved)] == saved and len(seen) == len(saved) + 1
    assert answer.seen[-1].type == "message" and answer.seen[-1].text_content == "who am I?"
    assert len(rt.created) == len(set(rt.created)) == len(saved) + 1  # each item once
    # the only user item sent after the restore is the new one: no turn was replayed
    assert rt.names().count("generate_reply") == 1 and rt.calls[-1] == ("generate_reply", None)


async def test_tool_call_in_flight_comes_back_interrupted_on_a_realtime_model(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    first = FakeRealtimeModel([Reply("One moment.", [ToolCall("book", {"what": "a taxi"})])])
    started, release = asyncio.Event(), asyncio.Event()
    live = await start(store, sessions, first, userdata={"started": started, "release": release})
    session, rs = live.session, live.rs
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="book a taxi"))
    await asyncio.wait_for(started.wait(), 5)
    # a realtime model records the call as it starts: the checkpoint holds it, unanswered
    calls = [i for i in session.current_agent.chat_ctx.items if i.type == "function_call"]
    assert len(calls) == 1
    await rs.checkpoint()
    snap = await latest(store)
    assert [t.call_id for t in snap.tool_calls] == [calls[0].call_id]
    release.set()  # this process lives on: let the first session close
    await run

    second = FakeRealtimeModel(["Let me check whether the taxi was booked."])
    rt = (await start(store, sessions, second, userdata={})).rt
    sent = {i.id: i for i in rt.remote.items}
    assert calls[0].id in sent
    (out,) = [i for i in rt.remote.items if i.type == "function_call_output"]
    assert out.call_id == calls[0].call_id and out.output == INTERRUPTED_OUTPUT
    assert rt.created.count(calls[0].id) == 1


async def test_transcript_filled_in_after_the_reply_is_saved_in_its_final_form(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    # Gemini Live and Nova Sonic send the user's transcript after their reply: LiveKit
    # first holds an empty placeholder under the item's id, then replaces it
    model = FakeRealtimeModel([LONG_REPLY], late_transcripts=True)
    live = await start(store, sessions, model, voice=True)
    session, rs, mic = live.session, live.rs, live.mic
    assert mic is not None
    log = EventLog(session)
    mic.say("count for me please")

    async def placeholder_added() -> bool:
        return any(_is_empty_user(i) for i in session.current_agent.chat_ctx.items)

    await eventually(placeholder_added, "LiveKit holds a placeholder for the user's turn")
    await rs.checkpoint()
    placeholder = await latest(store)
    assert placeholder.agent is not None
    assert any(
        d["type"] == "message" and d["role"] == "user" and not d["content"]
        for d in placeholder.agent.chat_ctx
    )  # the checkpoint did see the placeholder: the next one must replace it

    live.rt.send_transcripts()
    await log.wait_for("conversation_item_added", lambda ev: ev.item.role == "user", timeout=10)
    await rs.checkpoint()
    snap = await latest(store)
    assert snap.agent is not None
    users = [d for d in snap.agent.chat_ctx if d["type"] == "message" and d["role"] == "user"]
    assert [u["content"] for u in users] == [["count for me please"]]
    assert [d["content"] for d in snap.history if d.get("role") == "user"] == [
        ["count for me please"]
    ]
    await rs.aclose()

    # and the restored realtime session is sent the transcript, not the placeholder
    again = await start(store, sessions, FakeRealtimeModel())
    users_sent = [i for i in again.rt.remote.items if getattr(i, "role", "") == "user"]
    assert [u.text_content for u in users_sent if isinstance(u, llm.ChatMessage)] == [
        "count for me please"
    ]


async def test_realtime_options_are_saved_and_the_new_session_opens_with_them(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    live = await start(store, sessions, FakeRealtimeModel(["hi"], voice="alloy"))
    rs = live.rs
    # the app changed the voice and the tool choice at run time
    live.rt.update_options(voice="echo", tool_choice="none")
    await rs.checkpoint()
    snap = await latest(store)
    assert snap.agent is not None and snap.agent.realtime is not None
    assert snap.agent.realtime["provider"] == "fake"
    assert snap.agent.realtime["options"] == {
        "voice": "echo", "tool_choice": "none", "turn_detection": "server_vad",
        "temperature": 0.8,
    }  # fmt: skip
    await rs.aclose()

    # the code builds the model as it did the first time
    rt = (await start(store, sessions, FakeRealtimeModel(voice="alloy"))).rt
    assert rt.options.voice == "echo" and rt.options.tool_choice == "none"
    assert "update_options" not in rt.names()  # set before the session opened, not after


async def test_options_of_another_provider_are_not_reapplied(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    live = await start(store, sessions, FakeRealtimeModel(["hi"], voice="echo"))
    await live.rs.checkpoint()
    await live.rs.aclose()
    snap = await latest(store)
    assert snap.agent is not None and snap.agent.realtime is not None
    frame = snap.agent.model_copy(update={"realtime": {**snap.agent.realtime, "provider": "other"}})
    from livekit_resume.agent_hooks.realtime import reapply_options

    fresh = FakeRealtimeModel(voice="alloy")
    target: AgentSession[Any] = AgentSession(llm=fresh)
    sessions.append(target)
    assert frame.realtime is not None
    await reapply_options(target, Concierge(), frame.realtime, key=KEY)
    assert fresh._opts.voice == "alloy"


async def test_pipeline_agents_save_no_realtime_options(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    from tests.lk import ScriptedLLM, make_text_session

    session = make_text_session(ScriptedLLM(["hi"]))
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Concierge))
    await session.run(user_input="hello")
    await rs.checkpoint()
    snap = await latest(store)
    assert snap.agent is not None and snap.agent.realtime is None


async def test_pause_silences_a_realtime_model_and_saves_the_cut_reply_as_heard(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    model = FakeRealtimeModel([LONG_REPLY, Reply("Booking.", [ToolCall("book", {"what": "x"})]),
                               "Welcome back."])  # fmt: skip
    live = await start(store, sessions, model, voice=True)
    session, rs, mic, speaker, rt = live.session, live.rs, live.mic, live.speaker, live.rt
    assert mic is not None and speaker is not None
    mic.say("count to forty")
    await speaker.wait_for_frames(1)
    await speaker.wait_until_played(1.0)

    await rs.pause()
    played = len(speaker.frames)
    snap = await latest(store)
    assert snap.state == "paused"
    # the cut reply is saved as heard: partial, interrupted, what the server was told
    (cut,) = [d for d in snap.history if d.get("role") == "assistant"]
    assert cut["interrupted"] is True
    heard = cut["content"][0]
    assert heard and LONG_REPLY.startswith(heard) and heard != LONG_REPLY
    (truncate,) = [args for name, args in rt.calls if name == "truncate"]
    assert truncate["transcript"] == heard
    assert ("clear_audio", None) in rt.calls  # half a user turn on the server is dropped

    # while paused: the user's speech never reaches the model...
    frames_in, responses = rt.voiced_frames_in, len(rt.responses)
    said = mic.say("are you still there?")
    await asyncio.wait_for(said.done, 5)
    assert rt.voiced_frames_in == frames_in and len(rt.responses) == responses
    # ...and a reply the server starts on its own (audio it buffered earlier) is cut
    # before anything is played, recorded, or any tool runs
    log = EventLog(session)
    rt.server_turn("book it anyway")
    created = await log.wait_for("speech_created")
    await asyncio.wait_for(created.speech_handle.wait_for_playout(), 5)
    assert len(speaker.frames) == played
    assert not [i for i in session.history.items if i.type == "function_call"]
    said_by_agent = [m for m in session.history.messages() if m.role == "assistant"]
    assert [i.text_content for i in said_by_agent] == [heard]
    assert created.speech_handle.interrupted and len(rt.responses) == responses + 1

    await rs.resume()
    mic.say("hello again")
    await speaker.wait_for_frames(played + 1)  # it speaks again
    await rs.aclose()


def _is_empty_user(item: llm.ChatItem) -> bool:
    return item.type == "message" and item.role == "user" and not item.content


async def test_text_sent_to_a_paused_realtime_agent_is_dropped_with_its_reply(
    store: MemoryStore, sessions: list[AgentSession[Any]]
) -> None:
    live = await start(store, sessions, FakeRealtimeModel(["hi", "after the pause"]))
    await live.session.run(user_input="hello")
    await live.rs.pause()
    sent = len(live.rt.created)
    handle = live.session.generate_reply(user_input="are you there?")
    await asyncio.wait_for(handle.wait_for_playout(), 5)
    assert handle.interrupted
    assert len(live.rt.created) == sent and len(live.rt.responses) == 1  # never reached it
    texts = [m.text_content for m in live.session.history.messages()]
    assert "are you there?" not in texts

    await live.rs.resume()
    await live.session.run(user_input="back again")
    assert [r.reply.text for r in live.rt.responses] == ["hi", "after the pause"]
