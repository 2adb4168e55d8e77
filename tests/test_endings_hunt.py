"""Hunt (area: endings): how `ResumableSession.end()` (and a `resumable_job`'s end)
stores a conversation as ended, off the happy path.

lifecycle.md: "`await rs.end()` ... saves a last snapshot marked `ended`, releases the
lease and closes the session; `resume.state=ended`. An ended conversation is never
resumed". Here: an end cut by LiveKit's error close at each moment, an end from inside
the session (``on_user_turn_completed``, a tool), an end racing a pause, a suspend, a
second end, a checkpoint after it, an end on a session restored in place, an end
against a store that is down, and what the archive of an ended conversation holds.

Real `AgentSession`s (text mode with the scripted LLM; voice with the fake VAD, STT and
TTS where LiveKit's hook needs audio); a `MemoryStore` whose calls can be held at gates
(`GatedStore` of tests/_gated.py), SQLite and Redis where the store matters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from livekit.agents.voice.events import CloseReason

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from tests._gated import GatedStore, bounded, key_fixture, sigterm_kept, store_fixture, until
from tests.conftest import STORE_FACTORIES
from tests.lk.fake_voice import make_voice_session, voice_fakes
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session
from tests.test_job_policy_adversarial import REGISTRY, Clerk
from tests.test_review14_hunt import (
    begin,
    cleanup,
    closes,
    job_begin,
    llm_fails_for_good,
    said,
    stored_state,
)

__all__ = ["key", "sigterm_kept", "store"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


store = store_fixture(GatedStore)
key = key_fixture("end")


async def latest(store: Store, key: str, version: int | None = None) -> Snapshot:
    return from_stored(codec_for(store), await store.load(key, version=version))


def texts(items: list[dict[str, Any]], role: str = "user") -> list[str]:
    out: list[str] = []
    for item in items:
        if item.get("type", "message") == "message" and item.get("role") == role:
            out.extend(c for c in item.get("content") or [] if isinstance(c, str))
    return out


async def next_call_resumes(store: Store, key: str) -> bool:
    """Whether a later call under ``key`` (a fresh worker, a plain restore) resumes the
    conversation: an ended one never is."""
    fresh = make_text_session(ScriptedLLM(default="hello"))
    rs2 = lr.ResumableSession(store, key, registry=REGISTRY, autosave=False)
    try:
        await bounded(rs2.restore(fresh, default=Clerk, takeover=True), "the next call's restore")
        return rs2.resumed
    finally:
        await bounded(rs2.aclose(), "the next call's aclose")


async def hooks_settled(rs: lr.ResumableSession) -> None:
    await until(
        lambda: rs._finishing is None and (rs._closing is None or rs._closing.done()),
        "the end and the hooks' close are done",
    )


# ------------------------------------------ 1. an end cut by LiveKit's error close


async def test_an_error_close_while_end_cuts_the_speech_still_stores_it_ended(
    store: GatedStore, key: str
) -> None:
    """The app calls ``end()`` (a goodbye); as it cuts the speech (`Silencer.silence`,
    before its final save), LiveKit closes the session on errors (the LLM failing for
    good). Expected: the conversation is stored ``ended`` (the app asked for that), or at
    least never left ``suspended`` for the next call to resume."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    silence = rs._silencer.silence

    async def silence_then_error_close(s: AgentSession[Any]) -> None:
        await silence(s)
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await until(lambda: rs._closing is not None, "the hooks heard the close")

    rs._silencer.silence = silence_then_error_close  # type: ignore[method-assign,assignment]
    ending = asyncio.ensure_future(rs.end())
    try:
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await hooks_settled(rs)
    finally:
        await cleanup(store, ending)
    assert reasons == [CloseReason.ERROR]
    state, owner, _v = await stored_state(store, key)
    assert owner is None
    assert state == "ended", (
        f"end() asked for, LiveKit's error close during its cut of the speech: end() gave "
        f"{outcome[0]!r}, the store says {state!r} and rs.state {rs.state!r}"
    )
    assert not await next_call_resumes(store, key), "the next call resumed an ended call"


async def test_an_end_asked_as_livekits_error_close_runs_is_stored_ended(
    store: GatedStore, key: str
) -> None:
    """LiveKit's error close has begun (its final save under way, held at the store), and
    the app then calls ``end()`` (the caller said goodbye as the provider went down).
    Expected: the end is honoured (stored ``ended``), or at least the conversation is
    not stored ``suspended`` to be resumed by the next call."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    session.history.add_message(role="user", content="thanks, goodbye")
    store.commit_gate.arm()
    llm_fails_for_good(model)
    await until(lambda: bool(reasons), "LiveKit closed the session")
    await bounded(store.commit_gate.entered.wait(), "the error close's final save")
    ending = asyncio.ensure_future(rs.end())
    try:
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await hooks_settled(rs)
    finally:
        await cleanup(store, ending)
    state, owner, _v = await stored_state(store, key)
    assert owner is None
    assert state == "ended", (
        f"end() during LiveKit's error close gave {outcome[0]!r}; the store says {state!r}, "
        f"rs.state {rs.state!r}"
    )


async def test_an_error_close_during_a_failing_end_then_the_store_back_stores_it_ended(
    store: GatedStore, key: str
) -> None:
    """failure-model.md: an `end()` whose save fails "is remembered ...: the session's
    later saves (autosave's, the close's) store it `ended`". Here the close is LiveKit's
    error close, which arrives while the end's save is failing; the store is back for
    the close's save."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    store.commit_gate.arm()
    ending = asyncio.ensure_future(rs.end())
    try:
        await bounded(store.commit_gate.entered.wait(), "the end's final save")
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        store.fail_call = store.commit_gate.calls  # this commit, the end's, fails
        store.commit_gate.open()
        with pytest.raises(lr.StoreUnavailable):
            await bounded(ending, "end")
        await hooks_settled(rs)
    finally:
        await cleanup(store, ending)
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None), (state, owner, rs.state)
    assert not await next_call_resumes(store, key)


# ------------------------------------ 2. an end from inside on_user_turn_completed

HOOK: dict[str, Any] = {}


class HookFinisher(Agent):
    """``on_user_turn_completed`` suspends or ends (``HOOK["how"]``) on a goodbye, then
    goes on for ``HOOK["after"]`` seconds (the app posting the call's outcome)."""

    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        if "goodbye" in (new_message.text_content or ""):
            rs = HOOK["rs"]
            HOOK["version"] = await (rs.end() if HOOK["how"] == "end" else rs.suspend())
            HOOK["returned_as"] = rs.state
            await asyncio.sleep(HOOK.get("after", 0.0))


ENDER = lr.AgentRegistry()
ENDER.register(HookFinisher)


async def done_with(rs: lr.ResumableSession, session: AgentSession[Any]) -> None:
    await bounded(rs.aclose(), "aclose", 10)
    await bounded(session.aclose(), "session close", 10)
    HOOK.clear()


async def finish_from_the_hook(
    store: Store, key: str, how: str, after: float = 0.0
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    """A voice call under ``key`` whose hook finishes it (``how``) on the second turn."""
    HOOK.clear()
    HOOK.update(how=how, after=after)
    session = make_voice_session(ScriptedLLM([], default="noted"))
    fakes = voice_fakes(session)
    rs = lr.ResumableSession(store, key, registry=ENDER)
    HOOK["rs"] = rs
    agent = await bounded(rs.restore(session, default=HookFinisher), "restore", 10)
    await bounded(session.start(agent), "start", 10)
    fakes.audio_in.say("my order is 4711")
    await bounded(fakes.audio_out.wait_for_segment(1), "the first reply", 10)
    fakes.audio_in.say("thanks goodbye")
    await until(lambda: "version" in HOOK, f"{how} returned", 10)
    return session, rs


async def test_end_from_on_user_turn_completed_stores_the_goodbye(
    store: GatedStore, key: str
) -> None:
    """A voice call: ``on_user_turn_completed`` ends it when the caller says goodbye.
    Expected: the stored ended conversation holds the caller's last words (the archive
    the next call keeps aside is the record of the call). LiveKit 1.8.9 adds the turn to
    the history only after the hook returns (agent_activity.py,
    ``_user_turn_completed_impl``), in the hook's task if the session is closing by
    then, else in the (silenced) reply it starts: the end saves it once LiveKit's close,
    which waits for both, is done."""
    session, rs = await finish_from_the_hook(store, key, "end")
    try:
        await until(lambda: not session._started, "LiveKit closed the session", 5)
        await until(lambda: rs._finishing is None, "the end is done", 5)
        assert rs.state == "ended"
        snap = await latest(store, key)
        live = [
            i.text_content
            for i in session.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        assert snap.state == "ended"
        assert "thanks goodbye" in live, live  # LiveKit did add it, after the end
        assert texts(snap.history) == ["my order is 4711", "thanks goodbye"], (
            f"the ended conversation stored {texts(snap.history)}; the session's history "
            f"holds {live}"
        )
    finally:
        await done_with(rs, session)


async def test_a_suspend_from_on_user_turn_completed_keeps_the_callers_turn(
    store: GatedStore, key: str
) -> None:
    """The hook suspends (a caller who asked to be called back). The turn that made it
    is the caller's last words: the next restore has them, and so does the store once
    the suspend is done (LiveKit adds the turn after the hook returns)."""
    session, rs = await finish_from_the_hook(store, key, "suspend")
    try:
        await until(lambda: rs.state == "suspended", "the suspend is done", 5)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        assert HOOK["returned_as"] == "paused"  # the lease kept until the hook's turn is saved
    finally:
        await bounded(rs.aclose(), "aclose")
        await bounded(session.aclose(), "session close", 10)
    back = make_text_session(ScriptedLLM(default="welcome back"))
    rs2 = lr.ResumableSession(store, key, registry=ENDER, autosave=False)
    try:
        await bounded(rs2.restore(back, default=HookFinisher), "the next restore")
        said_before = [
            i.text_content
            for i in back.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        assert rs2.resumed
        assert said_before == ["my order is 4711", "thanks goodbye"], said_before
    finally:
        await bounded(rs2.aclose(), "the next call's aclose")
        HOOK.clear()


async def test_an_end_from_a_hook_that_goes_on_gives_the_session_up_all_the_same(
    store: GatedStore, key: str
) -> None:
    """The hook ends the call, then goes on for 5 s (LiveKit's close waits for it): the
    end is done (stored ``ended``, the lease free) after `SUSPEND_CLOSE_WAIT`, not when
    the hook is."""
    from livekit_resume.agent_hooks.session import SUSPEND_CLOSE_WAIT

    session, rs = await finish_from_the_hook(store, key, "end", after=5.0)
    try:
        await until(lambda: rs.state == "ended", "the end is done", SUSPEND_CLOSE_WAIT + 2)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        snap = await latest(store, key)
        assert texts(snap.history)[:1] == ["my order is 4711"]
    finally:
        await done_with(rs, session)


async def test_the_apps_close_right_after_an_end_from_the_hook_stores_it_ended(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The job's shutdown callback closes the hooks as the hook's end returns (before
    the end's last save of the caller's turn): the close waits for that save, the store
    says ``ended`` with the goodbye and its lease free, nothing is logged as lost, and
    the next call does not resume it."""
    session, rs = await finish_from_the_hook(store, key, "end")
    try:
        with caplog.at_level(logging.WARNING, logger="livekit_resume"):
            await bounded(rs.aclose(), "aclose right after the end returned")
            await hooks_settled(rs)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert texts((await latest(store, key)).history) == ["my order is 4711", "thanks goodbye"]
        assert not [r.getMessage() for r in caplog.records if r.name == "livekit_resume"]
        assert rs.state == "closed"
    finally:
        await bounded(session.aclose(), "session close", 10)
        HOOK.clear()
    assert not await next_call_resumes(store, key)


async def test_an_error_close_just_before_end_is_not_left_suspended(
    store: GatedStore, key: str
) -> None:
    """No hook in the way: the provider fails for good, and in the same loop turn the app
    calls ``end()`` (LiveKit's close is a task it has only scheduled). Expected: stored
    ``ended``, or the next call does not resume it."""
    session, rs, model = await begin(store, key)
    reasons = await closes(session)
    llm_fails_for_good(model)
    ending = asyncio.ensure_future(rs.end())
    try:
        outcome = await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await hooks_settled(rs)
    finally:
        await cleanup(store, ending)
    state, owner, _v = await stored_state(store, key)
    assert owner is None
    assert state == "ended", (
        f"end() right after the provider failed gave {outcome[0]!r}; the store says "
        f"{state!r}, rs.state {rs.state!r}"
    )


# ------------------------------------------------------------ 3. other endings


class Goodbye(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You end calls.")

    @function_tool
    async def hang_up(self, ctx: RunContext[Any]) -> str:
        """End the call."""
        HOOK["version"] = await HOOK["rs"].end()
        return "call ended"


GOODBYE = lr.AgentRegistry()
GOODBYE.register(Goodbye)


async def test_end_from_a_goodbye_tool_keeps_every_user_turn_once(
    store: GatedStore, key: str
) -> None:
    """A goodbye tool ends the call while its reply runs: the ended conversation holds
    every user turn exactly once, the last included, and the next call starts afresh."""
    HOOK.clear()
    model = ScriptedLLM(["noted", [ToolCall("hang_up", {})]], default="bye")
    session = make_text_session(model)
    rs = lr.ResumableSession(store, key, registry=GOODBYE, debounce=0.01)
    HOOK["rs"] = rs
    agent = await bounded(rs.restore(session, default=Goodbye), "restore")
    await bounded(session.start(agent), "start")
    try:
        await bounded(session.run(user_input="my order is 4711"), "a turn")
        # the run may end with the session closed under it: its outcome is not the point
        goodbye: asyncio.Future[Any] = asyncio.ensure_future(
            session.run(user_input="that is all, goodbye")
        )
        await bounded(asyncio.gather(goodbye, return_exceptions=True), "the goodbye turn")
        await until(lambda: "version" in HOOK, "end returned")
        await until(lambda: not session._started, "LiveKit closed the session", 5)
        snap = await latest(store, key)
        assert snap.state == "ended"
        assert texts(snap.history) == ["my order is 4711", "that is all, goodbye"], texts(
            snap.history
        )
        # the goodbye tool, still running at the end's save, is kept as tool state
        assert [c.name for c in snap.tool_calls] == ["hang_up"], snap.tool_calls
        assert not await next_call_resumes(store, key)
    finally:
        await bounded(rs.aclose(), "aclose")
        await bounded(session.aclose(), "session close", 5)
        HOOK.clear()


async def test_end_while_a_pause_cuts_the_speech_ends_it(store: GatedStore, key: str) -> None:
    """A pause is cutting the speech (held in `Silencer.silence`) when the app ends the
    call: the pause gives way (RuntimeError), the end stands: stored ``ended``, lease
    free, `rs.state` ``ended``."""
    _session, rs, _ = await begin(store, key)
    silence = rs._silencer.silence
    held = asyncio.Event()
    go = asyncio.Event()
    calls = 0

    async def held_silence(s: AgentSession[Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            held.set()
            await go.wait()
        await silence(s)

    rs._silencer.silence = held_silence  # type: ignore[method-assign,assignment]
    pausing = asyncio.ensure_future(rs.pause())
    ending: asyncio.Future[int] | None = None
    try:
        await bounded(held.wait(), "the pause cuts the speech")
        ending = asyncio.ensure_future(rs.end())
        await asyncio.sleep(0.02)
        go.set()
        pause_outcome = await bounded(asyncio.gather(pausing, return_exceptions=True), "pause")
        await bounded(ending, "end")
    finally:
        go.set()
        await cleanup(store, pausing, *([ending] if ending else []))
    assert isinstance(pause_outcome[0], RuntimeError), pause_outcome
    assert rs.state == "ended"
    assert await stored_state(store, key) == ("ended", None, rs.version)
    assert rs._long_pause.armed is False


@pytest.mark.parametrize("first", ["end", "suspend"])
async def test_end_racing_suspend_one_stands_whole(store: GatedStore, key: str, first: str) -> None:
    """end() and suspend() asked in the same moment, either first: the first stands
    (stored as it says, lease free, `rs.state` so), the second is refused RuntimeError."""
    _session, rs, _ = await begin(store, key)
    calls = {"end": rs.end, "suspend": rs.suspend}
    second = "suspend" if first == "end" else "end"
    a = asyncio.ensure_future(calls[first]())
    b = asyncio.ensure_future(calls[second]())
    try:
        out = await bounded(asyncio.gather(a, b, return_exceptions=True), "both")
    finally:
        await cleanup(store, a, b)
    want = "ended" if first == "end" else "suspended"
    assert isinstance(out[0], int), out
    assert isinstance(out[1], RuntimeError), out
    assert rs.state == want
    assert await stored_state(store, key) == (want, None, rs.version)


async def test_end_while_a_suspend_saves_is_refused_and_the_suspend_stands(
    store: GatedStore, key: str
) -> None:
    _session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    suspending = asyncio.ensure_future(rs.suspend())
    try:
        await bounded(store.commit_gate.entered.wait(), "the suspend's final save")
        with pytest.raises(RuntimeError):
            await bounded(rs.end(), "end")
        store.commit_gate.open()
        await bounded(suspending, "suspend")
    finally:
        await cleanup(store, suspending)
    assert rs.state == "suspended"
    assert await stored_state(store, key) == ("suspended", None, rs.version)


async def test_end_twice_at_once_saves_once(store: GatedStore, key: str) -> None:
    _session, rs, _ = await begin(store, key)
    before = store.commit_gate.calls
    a = asyncio.ensure_future(rs.end())
    b = asyncio.ensure_future(rs.end())
    try:
        out = await bounded(asyncio.gather(a, b, return_exceptions=True), "both ends")
    finally:
        await cleanup(store, a, b)
    assert isinstance(out[0], int) and isinstance(out[1], RuntimeError), out
    assert rs.state == "ended"
    assert await stored_state(store, key) == ("ended", None, out[0])
    assert store.commit_gate.calls - before == 1


async def test_checkpoint_and_calls_after_end_are_refused_and_change_nothing(
    store: GatedStore, key: str
) -> None:
    session, rs, _ = await begin(store, key)
    version = await bounded(rs.end(), "end")
    session.history.add_message(role="user", content="after the end")
    for call in (rs.checkpoint, rs.pause, rs.resume, rs.suspend, rs.end):
        with pytest.raises(RuntimeError):
            await bounded(call(), call.__name__)
    await bounded(rs.aclose(), "aclose")
    assert await stored_state(store, key) == ("ended", None, version)
    assert "after the end" not in texts((await latest(store, key)).history)


async def test_end_on_a_session_restored_in_place_archives_each_turn_once(
    store: GatedStore, key: str
) -> None:
    """Suspend, restore in place into the same AgentSession, a turn, then end: the
    ended conversation holds every turn once, and the next call keeps it aside whole
    under ``<key>~v<version>`` and starts afresh."""
    session, rs, _ = await begin(store, key)
    await bounded(session.run(user_input="second thing"), "a turn")
    await bounded(rs.suspend(), "suspend")
    session.history.items.clear()
    agent = await bounded(rs.restore(session, default=Clerk), "restore in place")
    await bounded(session.start(agent), "restart")
    await bounded(session.run(user_input="third thing"), "a turn")
    version = await bounded(rs.end(), "end")
    assert rs.state == "ended"
    want = ["my name is Ada", "second thing", "third thing"]
    snap = await latest(store, key)
    assert (snap.state, texts(snap.history)) == ("ended", want)
    ids = [i["id"] for i in snap.history]
    assert len(ids) == len(set(ids)), ids
    assert not await next_call_resumes(store, key)
    archived = await latest(store, f"{key}~v{version}")
    assert texts(archived.history) == want, texts(archived.history)
    assert [i["id"] for i in archived.history] == ids
    agent_ids = [i["id"] for i in (archived.agent.chat_ctx if archived.agent else [])]
    assert len(agent_ids) == len(set(agent_ids)), agent_ids


async def test_end_with_the_store_down_raises_and_stays_paused_then_the_close_ends_it(
    store: GatedStore, key: str
) -> None:
    """An end whose save fails (`StoreUnavailable`): raised, the session ``paused`` and
    held; the store keeps its last version (not ended); an `aclose` once the store is
    back stores it ``ended``."""
    _session, rs, _ = await begin(store, key)
    v0 = rs.version
    store.down = True
    with pytest.raises(lr.StoreUnavailable):
        await bounded(rs.end(), "end")
    assert rs.state == "paused"
    state, owner, stored = await stored_state(store, key)
    assert (state, stored) == ("active", v0) and owner is not None
    store.down = False
    await bounded(rs.aclose(), "aclose")
    assert rs.state == "closed"  # type: ignore[comparison-overlap]
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None)
    assert not await next_call_resumes(store, key)


async def test_end_retried_after_the_store_is_back(store: GatedStore, key: str) -> None:
    _session, rs, _ = await begin(store, key)
    store.down = True
    with pytest.raises(lr.StoreUnavailable):
        await bounded(rs.end(), "end")
    store.down = False
    version = await bounded(rs.end(), "end again")
    assert rs.state == "ended"
    assert await stored_state(store, key) == ("ended", None, version)


async def test_end_cancelled_during_its_final_save_then_aclose_stores_it_ended(
    store: GatedStore, key: str
) -> None:
    """A job shutting down cancels the end mid-save; its aclose then stores it ended."""
    _session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    ending = asyncio.ensure_future(rs.end())
    await bounded(store.commit_gate.entered.wait(), "the end's final save")
    ending.cancel()
    await asyncio.sleep(0.02)
    store.commit_gate.open()
    await bounded(asyncio.gather(ending, return_exceptions=True), "end")
    await bounded(rs.aclose(), "aclose")
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None), rs.state
    assert not await next_call_resumes(store, key)


# ------------------------------------------ 4. the archive, on every kind of store


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await STORE_FACTORIES[request.param](request, tmp_path)
    yield s
    await s.aclose()


async def test_the_archive_of_an_ended_conversation_holds_every_turn_once(
    real_store: Store, key: str
) -> None:
    model = ScriptedLLM(default="noted")
    session = make_text_session(model)
    rs = lr.ResumableSession(real_store, key, registry=REGISTRY, debounce=0.01)
    agent = await bounded(rs.restore(session, default=Clerk), "restore")
    await bounded(session.start(agent), "start")
    turns = [f"turn {n}" for n in range(6)]
    for t in turns:
        await bounded(session.run(user_input=t), "a turn")
        await asyncio.sleep(0.02)  # autosaves interleave
    version = await bounded(rs.end(), "end")
    live_ids = [i.id for i in session.history.items]
    assert not await next_call_resumes(real_store, key)
    archived = await latest(real_store, f"{key}~v{version}")
    assert archived.state == "ended"
    assert texts(archived.history) == turns
    assert texts(archived.history, "assistant") == ["noted"] * len(turns)
    ids = [i["id"] for i in archived.history]
    assert len(ids) == len(set(ids))
    assert [i for i in live_ids if i not in ids] == [] or set(ids) <= set(live_ids)
    # the key holds the ended conversation (nothing new committed) or a new one
    fresh = await latest(real_store, key)
    assert fresh.state == "ended" or texts(fresh.history) == [], texts(fresh.history)
    await bounded(session.aclose(), "session close", 5)


async def test_a_jobs_end_is_kept_aside_and_the_caller_back_starts_afresh(
    store: GatedStore, key: str
) -> None:
    """In a job: the app ends the call; a participant joining afterwards is not given the
    ended conversation back in place."""
    j, session, rs, _ = await job_begin(store, key, leave_grace=30.0)
    await bounded(rs.end(), "end")
    assert rs.state == "ended"
    j.leave()
    j.join()
    await asyncio.sleep(0.3)
    assert rs.state == "ended", rs.state
    assert await stored_state(store, key) == ("ended", None, rs.version)
    await j.shut_down(session)
    assert await stored_state(store, key) == ("ended", None, rs.version)


async def test_aclose_during_an_ends_final_save_stores_it_ended(
    store: GatedStore, key: str
) -> None:
    """The app's (a job's shutdown's) aclose while the end's final save is on its way:
    the close is final (``closed``), and what it stores says ended."""
    _session, rs, _ = await begin(store, key)
    store.commit_gate.arm()
    ending = asyncio.ensure_future(rs.end())
    closing: asyncio.Future[None] | None = None
    try:
        await bounded(store.commit_gate.entered.wait(), "the end's final save")
        closing = asyncio.ensure_future(rs.aclose())
        await asyncio.sleep(0.02)
        store.commit_gate.open()
        await bounded(asyncio.gather(ending, closing, return_exceptions=True), "end, aclose")
    finally:
        await cleanup(store, ending, *([closing] if closing else []))
    state, owner, _v = await stored_state(store, key)
    assert (state, owner) == ("ended", None), rs.state
    assert rs.state in ("closed", "ended")
    assert not await next_call_resumes(store, key)


async def test_in_a_job_an_end_cut_by_an_error_close_is_not_restored_on_rejoin(
    store: GatedStore, key: str
) -> None:
    """The impact of the first case in a job: the app ends the call, LiveKit's error
    close lands while the end cuts the speech, and a participant then joins the room:
    `resumable_job`'s policy restores a suspended session in place. Expected: an ended
    conversation is never resumed."""
    j, session, rs, model = await job_begin(store, key, leave_grace=30.0)
    reasons = await closes(session)
    silence = rs._silencer.silence

    async def silence_then_error_close(s: AgentSession[Any]) -> None:
        await silence(s)
        llm_fails_for_good(model)
        await until(lambda: bool(reasons), "LiveKit closed the session")
        await until(lambda: rs._closing is not None, "the hooks heard the close")

    rs._silencer.silence = silence_then_error_close  # type: ignore[method-assign,assignment]
    ending = asyncio.ensure_future(rs.end())
    try:
        await bounded(asyncio.gather(ending, return_exceptions=True), "end")
        await hooks_settled(rs)
        rs._silencer.silence = silence  # type: ignore[method-assign]
        j.leave()
        j.join()
        await asyncio.sleep(0.5)
    finally:
        await cleanup(store, ending)
    resumed = rs.state == "active" and rs.resumed and "my name is Ada" in said(session)
    state = rs.state
    await j.shut_down(session)
    assert not resumed, f"the ended call was restored in place on rejoin (rs.state {state!r})"
