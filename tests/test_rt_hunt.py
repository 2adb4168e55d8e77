"""Hunt: sessions on a realtime model after this round's changes to the hooks (tool
state in listen.py, pause/resume in silence.py and session.py, autosave's triggers).

Real `AgentSession`s on the test kit's scripted realtime server
(tests/lk/fake_realtime.py, a `RealtimeModel` implementation written for the tests),
real stores (memory, SQLite). Each test is a defect reproduction that fails on the
current code unless its docstring says "passes: coverage".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests._child_realtime import REGISTRY, Concierge
from tests.lk import EventLog, Reply, ToolCall
from tests.lk.fake_realtime import (
    FakeRealtimeModel,
    make_realtime_session,
)

KEY = "hunt-rt2"
WAIT = 8.0
CONVERSATION = ("message", "function_call", "function_call_output")
LONG_REPLY = " ".join(f"word{i}" for i in range(40))  # ten seconds of speech


# the realtime agent of the cross-process tests: a tool that can be held open
Desk = Concierge


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        MemoryStore() if request.param == "memory" else lr.open_store(f"sqlite:///{tmp_path}/h.db")
    )
    yield s
    await s.aclose()


async def latest(store: Store) -> Snapshot:
    rs = lr.ResumableSession(store, "codec-only", registry=REGISTRY)
    return from_stored(rs._capture.codec, await store.load(KEY))


def conv(items: list[llm.ChatItem]) -> list[llm.ChatItem]:
    return [i for i in items if i.type in CONVERSATION]


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


async def abandon(rs: lr.ResumableSession) -> None:
    """Drop a ResumableSession as a SIGKILLed worker would: no final save."""
    await rs._detach_and_release()


async def restore_fresh(
    store: Store, sessions: list[AgentSession[Any]], model: FakeRealtimeModel
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    again: AgentSession[Any] = AgentSession(llm=model, userdata={})
    sessions.append(again)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await again.start(await rs.restore(again, default=Desk, takeover=True))
    return again, rs


# -- a reply the gate cut while paused -----------------------------------------------------


async def test_a_reply_cut_by_the_pause_gate_does_not_stay_in_the_models_conversation(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """While paused, the server ends a user turn it buffered before the pause (its VAD
    event was already in flight when ``clear_audio`` went out) and answers on its own:
    a reply that says "Booking it." and calls ``book``. The RealtimeGate interrupts it
    before anything plays or any tool runs (docs/realtime.md, Pause: "every reply
    LiveKit schedules while paused is interrupted before anything of it is played,
    recorded, or any of its tools runs"), but LiveKit leaves the generated items in the
    server's conversation (agent_activity.py ``_realtime_generation_task_impl``: "TODO:
    remove the message from the serverside history").

    Expected: once resumed, the model answers the caller's next turn from the
    conversation the session holds (the one a restore would send it): no assistant
    message the caller never heard, and no ``book`` call that never ran and has no
    output (the model believes it booked). `resume` can sync the agent's context to the
    realtime session (``update_chat_ctx`` deletes what the server added on its own)."""
    model = FakeRealtimeModel(
        [
            "Hello, how can I help?",
            Reply("Booking it.", [ToolCall("book", {"what": "a table"})]),
            "Yes?",
        ]
    )
    session, mic, speaker = make_realtime_session(model, userdata={})
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, autosave=False)
    await session.start(await rs.restore(session, default=Desk))
    rt = model.active_session
    mic.say("hi there")
    await speaker.wait_for_frames(1)
    await asyncio.wait_for(speaker.wait_until_played(0.2), WAIT)
    await asyncio.sleep(1.5)  # the greeting played out

    await asyncio.wait_for(rs.pause(), WAIT)
    log = EventLog(session)
    rt.server_turn("book a table")  # a turn the server had buffered: answered on its own
    created = await log.wait_for("speech_created", timeout=WAIT)
    await asyncio.wait_for(created.speech_handle.wait_for_playout(), WAIT)
    assert created.speech_handle.interrupted
    assert not [i for i in session.history.items if i.type == "function_call"]

    await asyncio.wait_for(rs.resume(), WAIT)
    before = len(rt.responses)
    mic.say("are you there")

    async def answered() -> bool:
        return len(rt.responses) > before

    await eventually(answered, "the model answers the caller after resume", timeout=WAIT)
    seen = shape(rt.responses[-1].seen)
    agent_now = shape(session.current_agent.chat_ctx.items)
    try:
        assert ("assistant", "Booking it.") not in seen and ("call", "book") not in seen, (
            f"after resume the model answered from a conversation holding the reply the "
            f"pause cut (never heard, its tool never run): {seen}; the session holds "
            f"{agent_now}"
        )
    finally:
        await rs.aclose()


# -- a turn-scoped tool choice saved as the session's own -----------------------------------


async def test_a_realtime_tool_ending_while_paused_survives_a_crash_answered_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """passes: coverage. A realtime tool runs as the pause lands (its call is in the
    history from its start) and returns while paused; nothing else happens (no reply:
    paused). Autosave's ``ToolCallEnded`` trigger must store the result; after a crash a
    second later the restore holds the call once with its real output once, no
    "interrupted" one, in the model's context and in the history alike. (It runs ~4 s:
    its pause stalls 3 s on the running tool, see the last test.)"""
    model = FakeRealtimeModel(
        [Reply("One moment.", [ToolCall("book", {"what": "a cab"})]), "Your cab is booked."]
    )
    started, release = asyncio.Event(), asyncio.Event()
    session: AgentSession[Any] = AgentSession(
        llm=model, userdata={"started": started, "release": release}
    )
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, debounce=0.05)
    await session.start(await rs.restore(session, default=Desk))
    session.generate_reply(user_input="book a cab")
    await asyncio.wait_for(started.wait(), WAIT)
    await asyncio.wait_for(rs.pause(), WAIT)
    release.set()

    async def answered() -> bool:
        return any(i.type == "function_call_output" for i in session.history.items)

    await eventually(answered, "the tool's output reaches the history", timeout=WAIT)
    await asyncio.sleep(1.0)
    await abandon(rs)

    model2 = FakeRealtimeModel(["ok"])
    again, rs2 = await restore_fresh(store, sessions, model2)
    try:
        remote = shape(model2.active_session.remote.items)
        hist = shape(again.history.items)
        for where, got in (("model", remote), ("history", hist)):
            assert got.count(("call", "book")) == 1, (where, got)
            outs = [o for k, o in got if k == "output"]
            assert outs == ["booked a cab"], (where, got)
    finally:
        await rs2.aclose()


# -- a pause while a realtime tool runs under the reply being spoken ------------------------
