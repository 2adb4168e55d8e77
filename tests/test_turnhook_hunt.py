"""Hunt (area: turnhook): a suspend or an end from ``on_user_turn_completed`` (c485ef1).

From the hook the call returns once its first save is written, LiveKit's close started
and the lease still held; a task of its own (`_after_turn_hook`) waits for that close (at
most SUSPEND_CLOSE_WAIT), saves the caller's turn and gives the session up. Here: that
window against a held or failing store, the app's calls and close during it, another
worker's takeover, the hook going on after the call, and real stores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, StopResponse, function_tool, llm

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests._gated import GatedStore, bounded, key_fixture, sigterm_kept, store_fixture, until
from tests.conftest import STORE_FACTORIES
from tests.lk.fake_voice import make_voice_session, voice_fakes
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session
from tests.test_endings_hunt import (
    HOOK,
    HookFinisher,
    done_with,
    finish_from_the_hook,
    latest,
    next_call_resumes,
    texts,
)
from tests.test_review14_hunt import stored_state

__all__ = ["key", "sigterm_kept", "store"]

pytestmark = pytest.mark.filterwarnings("ignore")

store = store_fixture(GatedStore)
key = key_fixture("turnhook")

GOODBYE = ["my order is 4711", "thanks goodbye"]


def problems_logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [
        f"{r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name == "livekit_resume" and r.levelno >= level
    ]


def told_once(lost: list[BaseException], caplog: pytest.LogCaptureFixture) -> None:
    """The first worker's app was told of the takeover once, by on_lost (review19: a
    worker that suspended may still rejoin, and must know another holds the call), and
    nothing else went wrong."""
    assert len(lost) == 1 and isinstance(lost[0], lr.LeaseLost), lost
    others = [e for e in problems_logged(caplog) if "took the session over" not in e]
    assert others == [], others


# ------------------------------------------------ a hook that does more after the call

DO: dict[str, Any] = {}


class Doer(Agent):
    """``on_user_turn_completed`` runs ``DO["do"](rs)`` on a goodbye."""

    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        if "goodbye" in (new_message.text_content or ""):
            try:
                await DO["do"](DO["rs"])
            finally:
                DO["done"] = True


DOER = lr.AgentRegistry()
DOER.register(Doer)


async def hook_does(
    store: Store,
    key: str,
    do: Callable[[lr.ResumableSession], Awaitable[None]],
    wait_for: str = "done",
    **kw: Any,
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    DO.clear()
    DO["do"] = do
    session = make_voice_session(ScriptedLLM([], default="noted"))
    fakes = voice_fakes(session)
    rs = lr.ResumableSession(store, key, registry=DOER, **kw)
    DO["rs"] = rs
    agent = await bounded(rs.restore(session, default=Doer), "restore", 10)
    await bounded(session.start(agent), "start", 10)
    fakes.audio_in.say("my order is 4711")
    await bounded(fakes.audio_out.wait_for_segment(1), "the first reply", 10)
    fakes.audio_in.say("thanks goodbye")
    await until(lambda: wait_for in DO, f"the hook: {wait_for}", 10)
    return session, rs


# ------------------------------------------------------------------ the cases


async def test_end_then_aclose_from_the_hook_returns_promptly(store: GatedStore, key: str) -> None:
    """An app's goodbye path in the hook: ``await rs.end()`` then ``await rs.aclose()``
    (lifecycle.md: aclose is safe to call twice). Expected: both return promptly (an end
    from the hook took 2 s before, a defect fixed); the store says ended, lease free."""

    async def end_then_close(rs: lr.ResumableSession) -> None:
        t0 = time.monotonic()
        await rs.end()
        await rs.aclose()
        DO["took"] = time.monotonic() - t0

    session, rs = await hook_does(store, key, end_then_close)
    try:
        assert "took" in DO, "end or aclose raised"
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert DO["took"] < 1.0, f"end() + aclose() from the hook took {DO['took']:.1f}s"
    finally:
        await done_with(rs, session)


async def test_a_slow_store_at_the_turns_save_then_the_apps_close_stores_it_ended(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store is slow (1 s) at the save of the caller's turn, and the job's shutdown
    closes the hooks meanwhile. Expected: the close returns once that save is done; the
    store says ended with the goodbye, its lease free; nothing logged as an error."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    session, rs = await finish_from_the_hook(store, key, "end", after=0.3)
    store.commit_gate.arm()  # the hook goes on 0.3 s: the turn's save is not sent yet
    try:
        closing = asyncio.ensure_future(rs.aclose())
        await bounded(store.commit_gate.entered.wait(), "the turn's save reaches the store")
        await asyncio.sleep(1.0)
        assert not closing.done()
        store.commit_gate.open()
        await bounded(closing, "aclose once the store answers", 6)
        assert rs.state == "closed"
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert texts((await latest(store, key)).history) == GOODBYE
        assert problems_logged(caplog, logging.WARNING) == []
    finally:
        store.open_gates()
        await done_with(rs, session)


async def test_a_store_frozen_at_the_turns_save_does_not_hold_the_close_past_its_budget(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store freezes at the save of the caller's turn; the job's shutdown closes.
    Expected (lifecycle: the close is bounded, CLOSE_SAVE_BUDGET): aclose returns within
    the budget (+1 s), the session says closed, and once the store is back the lease is
    free and the session is not brought back to life (state stays closed), and the store
    says ended."""
    from livekit_resume.agent_hooks.autosave import CLOSE_SAVE_BUDGET

    caplog.set_level(logging.WARNING, logger="livekit_resume")
    session, rs = await finish_from_the_hook(store, key, "end", after=0.3)
    store.commit_gate.arm()
    try:
        await bounded(store.commit_gate.entered.wait(), "the turn's save reaches the store")
        t0 = time.monotonic()
        await bounded(rs.aclose(), "aclose", CLOSE_SAVE_BUDGET + 5)
        took = time.monotonic() - t0
        assert took < CLOSE_SAVE_BUDGET + 1, f"aclose took {took:.1f}s"
        assert rs.state == "closed"
        store.open_gates()
        await until(lambda: rs._after_hook is not None and rs._after_hook.done(), "rest done", 5)
        await asyncio.sleep(0.2)
        assert rs.state == "closed"
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        # the close's own save met the frozen store: its ERROR is warranted; no other
        errors = [e for e in problems_logged(caplog) if "close budget" not in e]
        assert errors == [], errors
    finally:
        store.open_gates()
        await done_with(rs, session)


async def test_the_turns_save_failing_still_gives_the_session_up(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store blinks at the save of the caller's turn (one commit refused). Expected
    (failure-model: a failed settle leaves the final save standing): the end is done all
    the same, the session ended, its lease free, stored ended; no ERROR."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    session, rs = await finish_from_the_hook(store, key, "end", after=0.3)
    store.fail_call = store.commit_gate.calls + 1
    try:
        await until(lambda: rs.state == "ended", f"the end is done ({rs.state})", 5)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert problems_logged(caplog) == []
        assert not await next_call_resumes(store, key)
    finally:
        await done_with(rs, session)


async def test_the_first_save_failing_from_the_hook_leaves_nothing_half_given_up(
    store: GatedStore, key: str
) -> None:
    """The end's own save fails in the hook (the store down): end raises, nothing is
    given up (paused, lease held, no close started); the store back, the app's close
    stores it ended (failure-model: a failed end is remembered) and the next call does
    not resume it."""
    raised: list[BaseException] = []

    async def end_store_down(rs: lr.ResumableSession) -> None:
        store.down = True
        try:
            await rs.end()
        except Exception as e:
            raised.append(e)
        finally:
            store.down = False

    session, rs = await hook_does(store, key, end_store_down)
    try:
        assert raised and isinstance(raised[0], lr.StoreUnavailable), raised
        await asyncio.sleep(0.3)
        assert rs.state == "paused"
        assert rs._after_hook is None
        assert session._started  # LiveKit's close not started
        _state, owner, _v = await stored_state(store, key)
        assert owner is not None
        await bounded(rs.aclose(), "aclose")
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
    finally:
        await done_with(rs, session)
        DO.clear()
    assert not await next_call_resumes(store, key)


@pytest.mark.parametrize("how", ["end", "suspend"])
async def test_calls_during_the_window_are_refused_and_the_turn_is_kept_once(
    store: GatedStore, key: str, how: str
) -> None:
    """While the hook goes on (0.5 s) after its end or suspend, the app's other tasks
    call pause, resume, suspend, end (refused: the finish is under way) and checkpoint
    (saved, or refused clearly). Expected: the finish stands, the lease free once done,
    the goodbye stored exactly once."""
    session, rs = await finish_from_the_hook(store, key, how, after=0.5)
    final = "ended" if how == "end" else "suspended"
    try:
        outcomes: dict[str, str] = {}
        for name in ("pause", "resume", "suspend", "end", "checkpoint"):
            try:
                await bounded(getattr(rs, name)(), name, 3)
                outcomes[name] = "ok"
            except RuntimeError:
                outcomes[name] = "refused"
        assert {k: v for k, v in outcomes.items() if k != "checkpoint"} == {
            "pause": "refused",
            "resume": "refused",
            "suspend": "refused",
            "end": "refused",
        }, outcomes
        await until(lambda: rs.state == final, f"{how} done ({rs.state})", 5)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == (final, None)
        assert texts((await latest(store, key)).history) == GOODBYE
    finally:
        await done_with(rs, session)


async def test_a_takeover_during_the_window_is_not_written_over(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook suspends and goes on (1 s). Another worker restores the key with
    takeover meanwhile (the caller back on another worker). Expected: from the takeover
    on, nothing of the first worker's lands (the store stays at what the second read or
    wrote, the second's lease stands and its checkpoint works); the first worker's app is
    told once, by on_lost (as review19 says of any suspend's settle)."""
    await taken_over_in_the_window(store, key, caplog)


async def taken_over_in_the_window(
    store: Store, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`test_a_takeover_during_the_window_is_not_written_over` on ``store``."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    async def suspend_then_go_on(rs: lr.ResumableSession) -> None:
        await rs.suspend()
        DO["returned"] = True
        await asyncio.sleep(1.0)

    session, rs = await hook_does(
        store, key, suspend_then_go_on, wait_for="returned", on_lost=on_lost
    )
    back = make_text_session(ScriptedLLM(default="welcome back"))
    rs2 = lr.ResumableSession(store, key, registry=DOER, autosave=False)
    try:
        agent2 = await bounded(rs2.restore(back, default=Doer, takeover=True), "takeover")
        await bounded(back.start(agent2), "the second worker's session starts")
        taken_at = rs2.version
        await until(lambda: rs.state == "suspended", f"the first gave up ({rs.state})", 5)
        await until(lambda: "done" in DO, "the hook is done", 5)
        await asyncio.sleep(0.2)
        info = await store.info(key)
        assert info is not None
        assert (info.owner, info.version) == (rs2._holder.owner, taken_at)
        assert rs._holder.lease is None
        await bounded(rs2.checkpoint(), "the second worker saves")
        told_once(lost, caplog)
    finally:
        await bounded(rs2.aclose(), "rs2 close")
        await bounded(back.aclose(), "the second session's close")
        await done_with(rs, session)
        DO.clear()


HOOK_REG = lr.AgentRegistry()
HOOK_REG.register(HookFinisher)


@pytest.mark.parametrize("raised", [StopResponse, ValueError])
async def test_the_hook_raising_after_its_end(
    store: GatedStore, key: str, caplog: pytest.LogCaptureFixture, raised: type[Exception]
) -> None:
    """The hook ends the call and raises StopResponse (no reply wanted) or a bug of the
    app's. Expected: the end done promptly (ended, lease free), nothing logged by the
    library (LiveKit logs the app's error itself)."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")

    async def end_and_stop(rs: lr.ResumableSession) -> None:
        await rs.end()
        raise raised()

    session, rs = await hook_does(store, key, end_and_stop)
    try:
        await until(lambda: rs.state == "ended", f"ended ({rs.state})", 3)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert problems_logged(caplog) == []
    finally:
        await done_with(rs, session)
        DO.clear()


@pytest.fixture(params=["sqlite", "redis"])
async def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await STORE_FACTORIES[request.param](request, tmp_path)
    yield s
    await s.aclose()


@pytest.mark.parametrize("how", ["end", "suspend"])
async def test_on_real_stores_the_turn_is_kept_once_and_the_lease_freed(
    real_store: Store, key: str, how: str
) -> None:
    """SQLite and Redis: an end or a suspend from the hook stores the caller's turn
    exactly once, the lease free, and the app's close right after changes nothing."""
    session, rs = await finish_from_the_hook(real_store, key, how)
    final = "ended" if how == "end" else "suspended"
    try:
        await bounded(rs.aclose(), "aclose right after")
        info = await real_store.info(key)
        assert info is not None
        assert (info.info.get("state"), info.owner) == (final, None)
        snap = await latest(real_store, key)
        assert texts(snap.history) == GOODBYE
        ids = [i["id"] for i in snap.history]
        assert len(ids) == len(set(ids))
    finally:
        await bounded(session.aclose(), "session close", 10)
        HOOK.clear()
    if how == "end":
        assert not await next_call_resumes(real_store, key)


async def test_remote_commands_during_the_window_are_refused(store: GatedStore, key: str) -> None:
    """An operator's pause, resume or suspend (lr.control) reaching the worker while the
    hook goes on after its end: refused (the end under way), never applied; the end
    stands with the goodbye once, the lease free."""
    session, rs = await finish_from_the_hook(store, key, "end", after=0.8)
    remote = lr.control(store)
    try:
        outcomes = {}
        for verb in ("pause", "resume", "suspend"):
            try:
                await bounded(getattr(remote, verb)(key, timeout=2), verb, 3)
                outcomes[verb] = "done"
            except lr.CommandRefused as e:
                outcomes[verb] = f"refused: {e}"
        assert all(v.startswith("refused") for v in outcomes.values()), outcomes
        await until(lambda: rs.state == "ended", f"ended ({rs.state})", 5)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert texts((await latest(store, key)).history) == GOODBYE
    finally:
        await done_with(rs, session)


@pytest.mark.parametrize("how", ["end", "suspend"])
async def test_the_lease_is_free_soon_after_the_hook_returns(
    store: GatedStore, key: str, how: str
) -> None:
    """The hook ends or suspends and returns at once (the common case). The caller calls
    back straight away, on another worker, without takeover: the lease must be free
    within 0.5 s of the call returning (it was free when it returned)."""
    session, rs = await finish_from_the_hook(store, key, how)
    t0 = time.monotonic()
    try:
        while True:
            _s, owner, _v = await stored_state(store, key)
            if owner is None:
                break
            took = time.monotonic() - t0
            assert took < 0.5, f"the lease still held {took:.2f}s after {how}() returned"
            await asyncio.sleep(0.005)
    finally:
        await done_with(rs, session)


async def test_in_a_job_a_suspend_from_the_hook_then_a_rejoin_has_the_goodbye_once(
    store: GatedStore, key: str
) -> None:
    """resumable_job (leave grace 30 s) with a voice agent whose hook suspends on the
    goodbye (the caller asked to be called back). Expected: it stays suspended while
    the caller is still in the room (nothing restores it behind the app's back), the
    lease free, the goodbye stored; the caller leaving and joining again has it
    restored in place with each of their turns exactly once; the job's shutdown stores
    it with the lease free."""
    from tests.test_job_policy_adversarial import QUIET, Job

    HOOK.clear()
    HOOK.update(how="suspend", after=0.0)
    j = Job(key)
    session = make_voice_session(ScriptedLLM([], default="noted"))
    fakes = voice_fakes(session)
    rs = await bounded(
        lr.resumable_job(
            j.ctx,
            session,
            registry=HOOK_REG,
            default=HookFinisher,
            store=store,
            room_options=QUIET,
            leave_grace=30.0,
        ),
        "resumable_job",
        10,
    )
    HOOK["rs"] = rs
    try:
        fakes.audio_in.say("my order is 4711")
        await bounded(fakes.audio_out.wait_for_segment(1), "the first reply", 10)
        fakes.audio_in.say("thanks goodbye")
        await until(lambda: "version" in HOOK, "suspend returned", 10)
        await until(lambda: rs.state == "suspended", f"suspended ({rs.state})", 5)
        await asyncio.sleep(0.5)
        assert rs.state == "suspended"
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        assert texts((await latest(store, key)).history) == GOODBYE
        j.leave()
        await asyncio.sleep(0.05)
        j.join()
        await until(lambda: rs.state == "active", f"restored in place ({rs.state})", 5)
        said = [
            i.text_content
            for i in session.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        assert said == GOODBYE, said
    finally:
        await bounded(j.shut_down(session), "the job's shutdown", 10)
        HOOK.clear()
    _state, owner, _v = await stored_state(store, key)
    assert owner is None


async def test_a_restore_into_a_new_session_during_the_window_takes_the_call_back(
    store: GatedStore, key: str
) -> None:
    """The hook suspends and goes on (0.5 s); the app restores the same ResumableSession
    into a new AgentSession meanwhile (the caller back at once). Expected, as for a
    restore during any suspend's last steps (`restore` waits for it): the restore
    resumes the conversation with each of the caller's turns once, or refuses with an
    error saying the suspend is under way, never 'already restored'."""
    session, rs = await finish_from_the_hook(store, key, "suspend", after=0.5)
    back = make_text_session(ScriptedLLM(default="welcome back"))
    try:
        try:
            await bounded(rs.restore(back, default=HookFinisher), "restore again", 5)
        except RuntimeError as e:
            assert "already restored" not in str(e), str(e)
            return
        assert rs.resumed
        said = [
            i.text_content
            for i in back.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        assert said == GOODBYE, said
    finally:
        await done_with(rs, session)
        await bounded(back.aclose(), "the new session's close")


TOOL: dict[str, Any] = {}


class Fetcher(Agent):
    """An async tool (progress updates, then waits to be released); the hook ends the
    call on a goodbye."""

    def __init__(self) -> None:
        super().__init__(instructions="You fetch reports.")

    @function_tool
    async def fetch_report(self, ctx: RunContext[Any], what: str) -> str:
        """Fetch a report in the background."""
        await ctx.update("started fetching")
        TOOL["updated"].set()
        await TOOL["release"].wait()
        return "report ready"

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        if "goodbye" in (new_message.text_content or ""):
            TOOL["version"] = await TOOL["rs"].end()


FETCHER = lr.AgentRegistry()
FETCHER.register(Fetcher)


async def test_an_end_from_the_hook_while_an_async_tool_runs(store: GatedStore, key: str) -> None:
    """An async tool runs (LiveKit's close waits for it, however long) when the hook
    ends the call. Expected: the end is done within SUSPEND_CLOSE_WAIT (+1 s): stored
    ended with the goodbye once, the lease free; the tool finishing later changes
    nothing in the store."""
    from livekit_resume.agent_hooks.session import SUSPEND_CLOSE_WAIT

    TOOL.clear()
    TOOL.update(updated=asyncio.Event(), release=asyncio.Event())
    model = ScriptedLLM([[ToolCall("fetch_report", {"what": "sales"})]], default="noted")
    session = make_voice_session(model)
    fakes = voice_fakes(session)
    rs = lr.ResumableSession(store, key, registry=FETCHER)
    TOOL["rs"] = rs
    agent = await bounded(rs.restore(session, default=Fetcher), "restore", 10)
    await bounded(session.start(agent), "start", 10)
    try:
        fakes.audio_in.say("get the report")
        await bounded(TOOL["updated"].wait(), "the tool runs", 10)
        await asyncio.sleep(0.5)
        fakes.audio_in.say("thanks goodbye")
        await until(lambda: "version" in TOOL, "end returned", 10)
        t0 = time.monotonic()
        await until(lambda: rs.state == "ended", f"ended ({rs.state})", SUSPEND_CLOSE_WAIT + 3)
        took = time.monotonic() - t0
        assert took < SUSPEND_CLOSE_WAIT + 1, took
        state, owner, v = await stored_state(store, key)
        assert (state, owner) == ("ended", None)
        assert texts((await latest(store, key)).history) == ["get the report", "thanks goodbye"]
        TOOL["release"].set()
        await until(lambda: not session._started, "LiveKit's close done", 5)
        await asyncio.sleep(0.2)
        assert (await stored_state(store, key))[2] == v
    finally:
        TOOL["release"].set()
        await bounded(rs.aclose(), "aclose")
        await bounded(session.aclose(), "session close", 10)
        TOOL.clear()


async def test_in_a_job_an_end_from_the_hook_then_the_shutdown_and_the_next_call(
    store: GatedStore, key: str
) -> None:
    """resumable_job with a voice agent whose hook ends the call; LiveKit's job end comes
    right after (the primary session closed, then the shutdown callbacks). Expected: the
    store says ended with the goodbye, the lease free; the next call for the key (a new
    job) starts afresh, and the ended conversation is kept aside with the goodbye once."""
    from tests.test_job_policy_adversarial import Job, run_job

    HOOK.clear()
    HOOK.update(how="end", after=0.0)
    j = Job(key)
    session = make_voice_session(ScriptedLLM([], default="noted"))
    fakes = voice_fakes(session)
    rs = await bounded(
        run_job(j, session, store, registry=HOOK_REG, default=HookFinisher), "job", 10
    )
    HOOK["rs"] = rs
    try:
        fakes.audio_in.say("my order is 4711")
        await bounded(fakes.audio_out.wait_for_segment(1), "the first reply", 10)
        fakes.audio_in.say("thanks goodbye")
        await until(lambda: "version" in HOOK, "end returned", 10)
    finally:
        await bounded(j.shut_down(session), "the job's shutdown", 10)
    ended_at = HOOK["version"]
    HOOK.clear()
    state, owner, v = await stored_state(store, key)
    assert (state, owner) == ("ended", None)
    assert texts((await latest(store, key)).history) == GOODBYE
    j2 = Job(key)
    s2 = make_text_session(ScriptedLLM(default="hello"))
    rs2 = await bounded(
        run_job(j2, s2, store, registry=HOOK_REG, default=HookFinisher), "the next call", 10
    )
    try:
        assert not rs2.resumed
        assert [i for i in s2.history.items if isinstance(i, llm.ChatMessage)] == []
        aside = [k async for k in _keys(store) if k.startswith(f"{key}~")]
        assert len(aside) == 1, aside
        assert texts((await latest(store, aside[0])).history) == GOODBYE
        assert v >= ended_at
    finally:
        await bounded(j2.shut_down(s2), "the next job's shutdown", 10)


async def _keys(store: Store) -> AsyncIterator[str]:
    for k in await store.keys():
        yield k
