"""Hunt: a review of the last two commits (resume saving before it returns and going
silent again on LeaseLost, a pause's failed save, a task's own tools, a task made
current by update_agent, ls/history of version-0 sessions, SQLite's -wal truncation).

Real `AgentSession`s in text mode driven by ``session.run(user_input=...)`` and the
scripted LLM; real SQLite files. Each test is a defect reproduction that fails on the
current code unless marked "passes: coverage".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import Agent, AgentTask, RunContext, function_tool

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM as ToolLLM
from tests.lk.scripted_llm import ToolCall
from tests.lk.scripted_llm import make_text_session as make_tool_session
from tests.test_handoff_hunt import in_task
from tests.test_hooks import RoomStandIn
from tests.test_pause_hunt import KEY, WAIT, finish, started, store

__all__ = ["store"]


class SlowStore:
    """Wraps a real store; its commits, renewals and releases take ``slow`` seconds
    first (a congested link): the network, not our code."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.slow = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _wait(self) -> None:
        if self.slow:
            await asyncio.sleep(self.slow)

    async def commit(self, commit: Any) -> int:
        await self._wait()
        return await self.inner.commit(commit)

    async def renew(self, lease: Any, **kw: Any) -> Any:
        await self._wait()
        return await self.inner.renew(lease, **kw)

    async def release(self, lease: Any) -> None:
        await self._wait()
        await self.inner.release(lease)


async def load(store: Store) -> Any:
    stored = await store.load(KEY)
    return Codec().decode_parts(KEY, stored.head, stored.streams)


# ------------------------------------------------------------- resume during a close


async def test_resume_while_a_close_is_under_way_does_not_unsilence_the_session(
    store: Store,
) -> None:
    """session.py `aclose`: "Final save ... Safe to call ... from several places (a
    shutdown callback and the session's own close) at once"; `_finish` refuses a suspend
    while ``_closing`` ("aclose() is final and leaves the AgentSession open"), `pause`
    refuses once closing, and a remote resume is refused while `_busy()` says
    "closing". The app's own `resume()` (a participant back, a hold button) arrives
    while the job's shutdown runs `aclose()` of a paused session (its final save and
    release take a second: a slow link).

    Expected: `resume` is refused (RuntimeError "closing") and the session stays
    silent: its final save says ``paused``, and nothing saves what it would say after.
    Found: `ResumableSession.resume` never looks at ``_closing``: it unsilences the
    session under its final save, shows ``active`` to the room (after the close, the
    room's last word is ``active``), its own `_save` lands under the lease the close
    has not released yet, and it returns as if nothing were wrong: the AgentSession,
    left open by `aclose`, answers turns nobody saves.
    """
    slow = SlowStore(store)
    room = RoomStandIn()
    session, rs, model = await started(slow, autosave=False, room=room)
    await session.run(user_input="hi")
    await rs.pause()
    slow.slow = 1.0
    closing = asyncio.ensure_future(rs.aclose())
    await asyncio.sleep(0.3)  # the close's final save (or release) is under way
    error: BaseException | None = None
    try:
        try:
            await asyncio.wait_for(rs.resume(), WAIT)
        except Exception as e:
            error = e
        await asyncio.wait_for(closing, WAIT)
        slow.slow = 0.0
        asked = len(model.requests)
        await asyncio.wait_for(session.run(user_input="are you there?"), WAIT)
        answered = len(model.requests) - asked
        shown = [p.get("resume.state") for p in room.published]
        info = await store.info(KEY)
        stored = info.info.get("state") if info is not None else None
    finally:
        slow.slow = 0.0
        await finish(session, rs)
    assert isinstance(error, RuntimeError) and "clos" in str(error) and not answered, (
        f"resume during a close: raised {error!r}; the closed session then asked its LLM "
        f"{answered} time(s); the room was shown {shown}; the store says {stored!r}"
    )


# ------------------------------------------------------------- resume whose save fails


class Stranger(Agent):
    """Not registered."""

    def __init__(self) -> None:
        super().__init__(instructions="You are not in the registry.")


async def test_resume_whose_save_fails_either_stands_or_is_refused_not_both(
    store: Store,
) -> None:
    """`ResumableSession.resume` docstring: "the state saved before it returns (a failed
    save is logged, the resume stands)"; docs/strategies.md: a resume whose save fails is
    a resume all the same. While paused, the app hands off to an agent it did not
    register (the handoff is followed: it is silenced too); then it resumes.

    Expected: one answer, whichever: either `resume` returns (the resume stands, the
    failed save logged, as for `StoreUnavailable`), or it raises and the session is
    still paused and silent (so that the app's retry can resume it).
    Found: `resume` raises `UnknownAgent` from its `_save` after it unsilenced the
    session, set it ``active`` and showed it to the room: the caller is told it failed,
    the agent talks, and a second `resume()` is refused ("in state 'active'")."""
    session, rs, model = await started(store, autosave=False)
    await session.run(user_input="hi")
    await rs.pause()
    session.update_agent(Stranger())
    await asyncio.sleep(0.2)
    error: BaseException | None = None
    try:
        try:
            await asyncio.wait_for(rs.resume(), WAIT)
        except Exception as e:
            error = e
        state = rs.state
        asked = len(model.requests)
        await asyncio.wait_for(session.run(user_input="are you there?"), WAIT)
        answered = len(model.requests) - asked
    finally:
        session.update_agent(registry_agent())
        await asyncio.sleep(0.1)
        await finish(session, rs)
    assert error is None or (state == "paused" and not answered), (
        f"resume raised {error!r}, yet the session is {state!r} and asked its LLM "
        f"{answered} time(s)"
    )


def registry_agent() -> Agent:
    from tests.test_pause_hunt import Clerk

    return Clerk()


# ------------------------------------------------------------- a pause's failed save


async def test_a_pause_whose_save_fails_otherwise_is_shown_to_the_room_too(
    store: Store,
) -> None:
    """`pause` (6771e10): "a pause whose save failed is shown to the room" ("a pause all
    the same: the room is told so"), for `StoreUnavailable`. The current agent is one the
    app did not register: the pause's save fails with `UnknownAgent`.

    Expected: the pause stands (the session is ``paused`` and silent, as it is) and the
    room shows ``resume.state=paused`` (an operator, a frontend see what the caller
    hears: nothing). Found: `pause` shows the room only on `StoreUnavailable`; any other
    failure of its save leaves the room showing ``active`` for a silenced session."""
    room = RoomStandIn()
    session, rs, _ = await started(store, autosave=False, room=room)
    await session.run(user_input="hi")
    session.update_agent(Stranger())
    await asyncio.sleep(0.2)
    error: BaseException | None = None
    try:
        try:
            await asyncio.wait_for(rs.pause(), WAIT)
        except Exception as e:
            error = e
        await asyncio.sleep(0.2)
        state = rs.state
        shown = room.published[-1].get("resume.state") if room.published else None
    finally:
        session.update_agent(registry_agent())
        await asyncio.sleep(0.1)
        await finish(session, rs)
    assert error is not None, "premise: the pause's save of an unregistered agent fails"
    assert state != "paused" or shown == "paused", (
        f"pause raised {error!r}; the session is {state!r} (silent) and the room shows {shown!r}"
    )


# ------------------------------------------------------------- a task made current


GATE: list[asyncio.Event] = []


class Survey(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Run the survey.")

    @function_tool
    async def record_answer(self, ctx: RunContext[Any], answer: str) -> str:
        """Record the caller's answer."""
        await GATE[-1].wait()
        return "recorded"


class Lobby(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the lobby.")


async def test_a_task_made_current_by_update_agent_keeps_its_own_tool_in_flight(
    tmp_path: Any,
) -> None:
    """069f32c: "an AgentTask made current by update_agent, never awaited, is the
    session's agent" (capture.py: "saved as any is"); failure-model/guide: a tool in
    flight at a crash is answered "interrupted ... check before repeating it" on
    restore. The registered task `Survey`, made current by ``update_agent`` (nobody
    awaits it), runs its own tool ``record_answer`` when the worker dies.

    Expected: the snapshot (saved as Survey, the session's agent) holds that call in its
    tool state, and the restored Survey's context shows the call and its interrupted
    answer, as for any agent's tool. Found: listen.py `on_tool_update` drops every
    ToolCallStarted while the current agent is an `AgentTask` (meant for a task awaited
    by a parent, whose context never holds its calls): the session's own agent's call
    leaves no trace, and the restore cannot tell the model it may have run."""
    GATE.append(asyncio.Event())
    reg = lr.AgentRegistry()
    reg.register(Lobby)
    reg.register(Survey)
    st: Store = lr.open_store(f"sqlite:///{tmp_path}/task.db")
    model = ToolLLM(
        ["Hello", [ToolCall("record_answer", {"answer": "yes"}, call_id="call_rec")]],
        default="ok",
    )
    session = make_tool_session(model)
    rs = lr.ResumableSession(st, KEY, registry=reg, autosave=False)
    run: asyncio.Future[Any] | None = None
    try:
        agent = await asyncio.wait_for(rs.restore(session, default=Lobby), WAIT)
        await asyncio.wait_for(session.start(agent), WAIT)
        await asyncio.wait_for(session.run(user_input="hi"), WAIT)
        session.update_agent(Survey())
        await in_task(session, Survey)
        await asyncio.sleep(0.3)  # its activity started
        started_ev = asyncio.Event()

        def on_update(ev: Any) -> None:
            fc = getattr(ev.update, "function_call", None)
            if fc is not None and fc.call_id == "call_rec":
                started_ev.set()

        session.on("tool_execution_updated", on_update)
        run = asyncio.ensure_future(session.run(user_input="my answer is yes"))
        await asyncio.wait_for(started_ev.wait(), WAIT)
        await rs.checkpoint("tool")
        snap = await load(st)
        saved_agent = snap.agent.agent_id
        tools = repr(snap.model_dump()).count("call_rec")
    finally:
        GATE[-1].set()
        if run is not None:
            run.cancel()
        await rs._detach_and_release()  # the process dies here: no final save
        await asyncio.wait_for(session.aclose(), WAIT)

    model2 = ToolLLM([], default="ok")
    s2 = make_tool_session(model2)
    rs2 = lr.ResumableSession(st, KEY, registry=reg, autosave=False)
    try:
        a2 = await asyncio.wait_for(rs2.restore(s2, default=Lobby), WAIT)
        await asyncio.wait_for(s2.start(a2), WAIT)
        await asyncio.wait_for(s2.run(user_input="hello?"), WAIT)
        req = model2.requests[0]
        restored = type(a2).__name__
    finally:
        await rs2.aclose()
        await s2.aclose()
        await st.aclose()
    calls = [i.call_id for i in req.items if i.type == "function_call"]
    assert saved_agent.lower() == "survey" and restored == "Survey", (
        f"premise: saved as {saved_agent!r}, restored as {restored}"
    )
    assert "call_rec" in calls, (
        f"the session's agent Survey ran record_answer at the crash; the snapshot names "
        f"the call {tools} time(s) and the restored context holds calls {calls}"
    )


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


# ------------------------------------------------------------- resume meets a takeover


async def test_resume_after_a_takeover_with_a_job_like_on_lost_ends_closed(
    store: Store,
) -> None:
    """passes: coverage (no test combines resume's LeaseLost with an ``on_lost`` that
    closes). Autosave off (with it on, a renewal may see the takeover first: the
    session is then closed before `resume` and refuses it, RuntimeError). 069f32c: "a
    resume whose save finds the session taken over silences it again and raises
    LeaseLost"; a `resumable_job`'s ``on_lost`` (job.py) then closes the
    ResumableSession and the AgentSession at once. Worker 1 paused; worker 2 took the
    key over; worker 1's app resumes.

    Expected: `resume` raises `LeaseLost`; once ``on_lost`` has run the session is
    ``closed`` (not ``paused`` or ``active``), the room's last word is not ``active``,
    and nothing hangs.
    A regression would be resume's re-silence (awaited after ``on_lost`` was
    scheduled) writing ``paused`` over the close's ``closed``."""
    room = RoomStandIn()
    done = asyncio.Event()
    holder: dict[str, Any] = {}

    async def on_lost(_e: lr.LeaseLost) -> None:
        try:
            rs_, s_ = holder["rs"], holder["session"]
            await rs_.aclose()
            await s_.aclose()
        finally:
            done.set()

    s1, rs1, _ = await started(store, autosave=False, room=room, on_lost=on_lost)
    holder.update(rs=rs1, session=s1)
    await s1.run(user_input="hi")
    await rs1.pause()
    s2, rs2, _ = await started(store, owner="w2", takeover=True)
    error: BaseException | None = None
    try:
        try:
            await asyncio.wait_for(rs1.resume(), WAIT)
        except Exception as e:
            error = e
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(0.3)
        state = rs1.state
        shown = [p.get("resume.state") for p in room.published]
    finally:
        await finish(s2, rs2)
        await finish(s1, rs1)
    assert isinstance(error, lr.LeaseLost) and state == "closed" and shown[-1] != "active", (
        f"resume after a takeover raised {error!r}; after on_lost the session is "
        f"{state!r}; the room was shown {shown}"
    )
