"""The agent a restore rebuilds is the agent that was live, or a typed error says why
not; the app's agent state never stops the rest of a session saving. Real
`AgentSession`s (text mode, no room) with the scripted LLM; each test but the two marked
otherwise failed on main before its fix (see its docstring)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool

import livekit_resume as lr
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

KEY = "room-hunt-agent"
WAIT = 5.0


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(
        "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/hunt.db"
    )
    yield s
    await s.aclose()


async def started(
    store: Store, reg: lr.AgentRegistry, model: ScriptedLLM, default: Any, **kw: Any
) -> tuple[AgentSession[Any], lr.ResumableSession]:
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False, **kw)
    agent = await asyncio.wait_for(rs.restore(session, default=default), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs


async def turn(session: AgentSession[Any], text: str) -> None:
    await asyncio.wait_for(asyncio.ensure_future(session.run(user_input=text)), WAIT)


def saved_texts(snap: Any) -> list[str]:
    return [
        str(c) for d in snap.history if d.get("type") == "message" for c in d.get("content", [])
    ]


async def load(store: Store) -> Any:
    stored = await store.load(KEY)
    return Codec().decode_parts(KEY, stored.head, stored.streams)


# ------------------------------------------------------------------ agents


class AskName(AgentTask[str]):
    def __init__(self) -> None:
        super().__init__(instructions="Ask for the caller's name.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="ask for the name")

    @function_tool
    async def record_name(self, ctx: RunContext[Any], name: str) -> None:
        """Record the caller's name."""
        self.complete(name)


class Front(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def identify(self, ctx: RunContext[Any]) -> str:
        """Identify the caller."""
        name = await AskName()
        return f"caller is {name}"

    @function_tool
    async def to_vip(self, ctx: RunContext[Any]) -> tuple[Agent, str]:
        """Hand the caller to the VIP desk."""
        return Vip(), "to the vip desk"


class Vip(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the VIP desk.")

    @function_tool
    async def identify(self, ctx: RunContext[Any]) -> str:
        """Identify the caller."""
        name = await AskName()
        return f"vip caller is {name}"


class Booking(Agent):
    def __init__(self, slot: str | None = None, notes: str = "") -> None:
        super().__init__(instructions="You book visits.")
        self.slot = slot
        self.notes = notes

    def snapshot_state(self) -> dict[str, Any]:
        return {"slot": self.slot, "notes": self.notes}


class VipBooking(Booking):
    pass


async def inside_task(
    session: AgentSession[Any], model: ScriptedLLM, n: int
) -> asyncio.Future[Any]:
    """Start the turn that runs `AskName` and wait until it asked its question."""
    run: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="who am I?"))
    await model.wait_for_requests(n, timeout=WAIT)

    async def in_task() -> bool:
        return isinstance(session.current_agent, AskName)

    await eventually(in_task, "the task runs", timeout=WAIT)
    return run


async def die(
    session: AgentSession[Any], rs: lr.ResumableSession, run: asyncio.Future[Any]
) -> None:
    run.cancel()
    await rs._detach_and_release()  # the process dies here: no final save
    await asyncio.wait_for(session.aclose(), WAIT)


# ------------------------------------------------------------------ defects


async def test_a_registered_agent_task_running_is_restored_as_its_parent_not_as_the_task(
    store: Store,
) -> None:
    """guide.md: "The restored agent is that parent agent, never half a task";
    snapshots.md: "the agent that started the task is restored, never half a task".
    An app that registers every class it has (the task too) gets the task back as the
    session's root agent: its question answered, ``complete()`` resolves nothing and the
    caller is held by the task for good, its one tool and its instructions, the front
    desk never back."""
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(AskName)
    model = ScriptedLLM([[ToolCall("identify", call_id="call_id1")], "Your name?"], default="ok")
    session, rs = await started(store, reg, model, Front)
    run = await inside_task(session, model, 2)
    await rs.checkpoint("tool")
    await die(session, rs, run)

    model2 = ScriptedLLM([[ToolCall("record_name", {"name": "Ada"})], "Thanks.", "Next?"])
    s2, rs2 = await started(store, reg, model2, Front)
    try:
        await turn(s2, "I'm Ada")
        await turn(s2, "what now?")
        restored = type(s2.current_agent).__name__
    finally:
        await rs2._detach_and_release()
        await s2.aclose()
    assert restored == "Front", f"restored as {restored}: half a task, with no parent to return to"


async def test_a_task_started_by_an_unregistered_agent_is_not_saved_as_an_earlier_agent(
    store: Store,
) -> None:
    """guide.md: "The current agent must be registered when a checkpoint runs (else the
    checkpoint fails with `UnknownAgent`, logged by autosave)" and "A snapshot taken while
    one runs saves the agent that started it". A checkpoint while `Vip` (unregistered) is
    current fails with UnknownAgent; once `Vip` starts a task, the checkpoint succeeds and
    saves `Front` (the last registered agent the hooks saw), with Front's stale context
    and Vip's call answered "interrupted" in it: a restore puts the caller back at the
    front desk, silently."""
    reg = lr.AgentRegistry()
    reg.register(Front)
    model = ScriptedLLM(
        [[ToolCall("to_vip")], "VIP desk.", [ToolCall("identify", call_id="c1")], "Name?"],
        default="ok",
    )
    session, rs = await started(store, reg, model, Front)
    run: asyncio.Future[Any] | None = None
    try:
        await turn(session, "VIP please")
        assert isinstance(session.current_agent, Vip)
        with pytest.raises(lr.UnknownAgent):
            await rs.checkpoint()
        run = await inside_task(session, model, 4)
        saved: str | None = None
        try:
            await rs.checkpoint("tool")
            snap = await load(store)
            saved = snap.agent.agent_id
        except lr.UnknownAgent:
            pass
    finally:
        await die(session, rs, run or asyncio.ensure_future(asyncio.sleep(0)))
    assert saved is None, f"saved as {saved!r} while the task's parent was the unregistered Vip"


async def suspended_as(store: Store, reg: lr.AgentRegistry, slot: str) -> None:
    """A `Booking` session for ``slot``, one turn long, suspended."""
    session, rs = await started(store, reg, ScriptedLLM(["one"]), Booking)
    session.current_agent.slot = slot  # type: ignore[attr-defined]
    await turn(session, "hi")
    await rs.suspend()


def vip_factory(st: dict[str, Any]) -> Booking:
    return (VipBooking if st.get("slot") == "vip" else Booking)(**st)


async def test_a_factory_that_builds_an_unregistered_class_is_refused_at_restore(
    store: Store,
) -> None:
    """`AgentRegistry.build` accepted a factory's instance of a subclass of the
    registered class (`isinstance`), but `id_of` (what every checkpoint uses) knows exact
    classes only: the restore succeeded and every later checkpoint, the suspend's too,
    failed with UnknownAgent. Nothing of the restored conversation was ever saved again.
    Now the restore refuses it, before anything, naming the class."""
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=vip_factory)
    await suspended_as(store, reg, "vip")
    before = await store.load(KEY)

    s2 = make_text_session(ScriptedLLM(["two"]))
    rs2 = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    with pytest.raises(lr.IncompatibleSnapshot, match="VipBooking, which is not registered"):
        await asyncio.wait_for(rs2.restore(s2, default=Booking), WAIT)
    after = await store.load(KEY)
    assert (after.version, after.head) == (before.version, before.head)
    info = await store.info(KEY)
    assert info is not None and info.owner is None, "the lease is released on failure"


async def test_a_factory_may_build_a_subclass_registered_under_its_own_id(store: Store) -> None:
    """The fix above refuses only what could not be saved again: a factory that builds
    a subclass registered too is restored, and its next checkpoint saves it by its id."""
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=vip_factory)
    reg.register(VipBooking, factory=lambda st: VipBooking(**st))
    await suspended_as(store, reg, "vip")

    s2 = make_text_session(ScriptedLLM(["two"]))
    rs2 = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    agent = await asyncio.wait_for(rs2.restore(s2, default=Booking), WAIT)
    assert type(agent) is VipBooking
    await s2.start(agent)
    try:
        await turn(s2, "again")
        await rs2.checkpoint()
    finally:
        await rs2._detach_and_release()
        await s2.aclose()
    snap = await load(store)
    assert snap.agent.agent_id == "vip_booking"
    assert "again" in saved_texts(snap)


async def test_a_factory_that_no_longer_fits_the_saved_state_raises_a_typed_error(
    store: Store,
) -> None:
    """The agent-state analogue of "code changed: userdata no longer validates ->
    IncompatibleSnapshot naming the field" (failure-model.md): a deploy renames a state
    key, and the restore raises the factory's bare ``KeyError: 'slot_id'`` (no session,
    version or agent id in it; not a `ResumeError`, so an app's ``except
    lr.ResumeError`` fallback to a fresh start does not catch it)."""
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=lambda st: Booking(**st))
    session, rs = await started(store, reg, ScriptedLLM(["one"]), Booking)
    session.current_agent.slot = "tue-09:00"  # type: ignore[attr-defined]
    await turn(session, "Tuesday at nine")
    await rs.suspend()

    deployed = lr.AgentRegistry()
    deployed.register(Booking, factory=lambda st: Booking(slot=st["slot_id"]))
    s2 = make_text_session(ScriptedLLM([]))
    rs2 = lr.ResumableSession(store, KEY, registry=deployed, autosave=False)
    with pytest.raises(lr.ResumeError, match="booking"):
        await asyncio.wait_for(rs2.restore(s2, default=Booking), WAIT)


async def test_agent_state_over_the_frame_limit_keeps_the_rest_of_the_session_saving(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """guide.md: "An agent's snapshot_state() follows the rules of extra; a value it
    cannot save keeps the agent's last savable state (logged)" (capture.py: "so the rest
    of the session still saves"). A state too large for the head's frame failed the
    whole checkpoint with SnapshotTooLarge: the turn after it was never saved, by any
    later checkpoint or the suspend, and the error told to drop inline media. Now the
    last saved state is kept (logged) and the turn saved; a state that fits again is
    saved again."""
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=lambda st: Booking(**st))
    session, rs = await started(
        store, reg, ScriptedLLM(["one", "two", "three"]), Booking, codec=Codec(max_frame=200_000)
    )
    agent = session.current_agent
    assert isinstance(agent, Booking)
    try:
        agent.slot = "tue-09:00"
        await turn(session, "first turn")
        await rs.checkpoint()
        agent.notes = "x" * 300_000
        await turn(session, "second turn")
        await rs.checkpoint()
        kept = await load(store)
        agent.notes = "short"
        await turn(session, "third turn")
        await rs.checkpoint()
        again = await load(store)
    finally:
        await rs._detach_and_release()
        await session.aclose()
    assert "second turn" in saved_texts(kept), "the state's size stopped the history saving"
    assert kept.agent.state == {"slot": "tue-09:00", "notes": ""}, "the last saved state"
    assert "agent state not saved this time" in caplog.text
    assert again.agent.state == {"slot": "tue-09:00", "notes": "short"}
    assert "third turn" in saved_texts(again)


async def test_userdata_over_the_frame_limit_keeps_the_rest_of_the_session_saving(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for userdata: too large for the head, it failed every checkpoint with
    SnapshotTooLarge. Now the last saved userdata is kept (logged) beside the agent's new
    state, and the history saves."""
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=lambda st: Booking(**st))
    session = make_text_session(ScriptedLLM(["one", "two"]), userdata={"name": "Ada"})
    rs = lr.ResumableSession(
        store,
        KEY,
        registry=reg,
        autosave=False,
        userdata_type=dict[str, Any],
        codec=Codec(max_frame=200_000),
    )
    agent = await asyncio.wait_for(rs.restore(session, default=Booking), WAIT)
    assert isinstance(agent, Booking)
    await asyncio.wait_for(session.start(agent), WAIT)
    try:
        await turn(session, "first turn")
        await rs.checkpoint()
        session.userdata["transcript"] = "x" * 300_000
        agent.slot = "wed-10:00"
        await turn(session, "second turn")
        await rs.checkpoint()
        snap = await load(store)
    finally:
        await rs._detach_and_release()
        await session.aclose()
    assert "second turn" in saved_texts(snap)
    assert snap.userdata == {"name": "Ada"}
    assert snap.agent.state == {"slot": "wed-10:00", "notes": ""}, "the state that fits is saved"
    assert "userdata not saved this time" in caplog.text


class Flaky(Booking):
    """An agent whose ``snapshot_state`` fails while ``broken`` is set."""

    broken = False

    def snapshot_state(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("the booking system is down")
        return super().snapshot_state()


async def test_a_snapshot_state_that_raises_keeps_the_rest_of_the_session_saving(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's ``snapshot_state()`` that raised failed every checkpoint (and the
    suspend's) with its error: nothing of the conversation saved while it did. Now its
    last saved state is kept, the failure is logged with its traceback, and the rest
    saves."""
    reg = lr.AgentRegistry()
    reg.register(Flaky, factory=lambda st: Flaky(**st))
    session, rs = await started(store, reg, ScriptedLLM(["one", "two"]), Flaky)
    agent = session.current_agent
    assert isinstance(agent, Flaky)
    agent.slot = "thu-11:00"
    await turn(session, "first turn")
    await rs.checkpoint()
    agent.broken, agent.slot = True, "fri-12:00"
    await turn(session, "second turn")
    await rs.suspend()
    snap = await load(store)
    assert "second turn" in saved_texts(snap)
    assert snap.agent.state == {"slot": "thu-11:00", "notes": ""}
    assert "the booking system is down" in caplog.text


async def test_livekit_records_the_agent_that_started_a_task(store: Store) -> None:
    """LiveKit 1.8.9 fact the task fix stands on: while an awaited `AgentTask` runs it
    is the session's ``current_agent``, and its private ``_old_agent`` is the agent whose
    tool awaited it."""
    reg = lr.AgentRegistry()
    reg.register(Front)
    model = ScriptedLLM([[ToolCall("identify", call_id="c1")], "Your name?"], default="ok")
    session, rs = await started(store, reg, model, Front)
    front = session.current_agent
    run = await inside_task(session, model, 2)
    try:
        task = session.current_agent
        assert isinstance(task, AskName)
        assert task._old_agent is front
    finally:
        await die(session, rs, run)
