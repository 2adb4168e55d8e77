"""Hunt: the caller who drops and comes back, and the job's life (`resumable_job`).

Jobs run in this process with a real `JobContext` on LiveKit's mock room (the `Job`
helper of tests/test_job_policy_adversarial.py), a real text `AgentSession` driven by
the scripted LLM, and real stores (memory, SQLite in tmp_path). Each test says what the
docs promise; a failing one is a defect, a "passes: coverage" one guards a promise no
other test checks.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_agent_state_adversarial import store
from tests.test_job_hunt import T, key_, run_job
from tests.test_job_policy_adversarial import (  # noqa: F401  (_sigterm_kept: autouse)
    QUIET,
    REGISTRY,
    Clerk,
    Job,
    _sigterm_kept,
    state_is,
)

__all__ = ["store"]


def closing(session: AgentSession[Any]) -> asyncio.Event:
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    return closed


def user_texts_of(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in i.content)
        for i in session.history.items
        if i.type == "message" and i.role == "user"
    ]


async def stored_snap(store: Store, key: str) -> lr.Snapshot:
    return from_stored(Codec(), await store.load(key))


async def stored_user_texts(store: Store, key: str) -> list[str]:
    snap = await stored_snap(store, key)
    return [
        " ".join(str(c) for c in i["content"])
        for i in snap.history
        if i["type"] == "message" and i["role"] == "user"
    ]


async def reaches(rs: lr.ResumableSession, state: str, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``rs`` to be in ``state``; whether it got there."""
    deadline = asyncio.get_running_loop().time() + timeout
    while rs.state != state:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def until(pred: Any, what: str, timeout: float = T) -> None:
    async def ok() -> bool:
        return bool(pred())

    await eventually(ok, what, timeout)


# ------------------------------------------- the app pauses as the caller drops


async def _app_pause_racing_the_drop(
    store: Store, grace: float
) -> tuple[Job, AgentSession[Any], lr.ResumableSession]:
    """A call with one turn; the app starts a pause (a hold) and, in the same loop turn,
    the caller's network drops: the app's pause is cutting speech when the policy's
    pause for the leave runs."""
    j = Job("room-hold")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, store, key=key_(), leave_grace=grace), T)
    await asyncio.wait_for(s.run(user_input="hold my order 4711"), T)
    app_pause = asyncio.ensure_future(rs.pause())  # the app's hold, started first
    j.leave()  # the caller drops in the same loop turn
    await asyncio.wait_for(app_pause, T)
    assert rs.state == "paused"
    return j, s, rs


async def test_an_app_pause_under_way_as_the_caller_drops_is_still_suspended_after_the_grace(
    store: Store,
) -> None:
    """The app puts the caller on hold (``rs.pause()``) just as their network drops.
    docs/lifecycle.md (Caller drop): "nobody rejoins in time -> suspended: the session
    closed, lease released"; job.py `_next_step` itself says of a session "paused by
    someone else (an operator's hold, the app) as the last caller left: the grace runs
    all the same, or nothing would end a call nobody is on".

    What happens: the policy's `_pause_for_leave` calls ``rs.pause()`` while the app's
    pause is still cutting speech; it raises RuntimeError ("being paused"), its
    ``finally`` arms no grace (the state is still active then), and the exception ends
    `_settle` (only logged). The app's pause then lands: paused, no grace timer, no
    participant event left to come. The abandoned call holds its lease, models and
    session for ever (until the job ends)."""
    j, s, rs = await _app_pause_racing_the_drop(store, grace=0.2)
    try:
        await reaches(rs, "suspended", 3.0)  # 15 graces
        assert rs.state == "suspended", (
            f"the caller dropped 3 s ago (grace 0.2 s) and the session is {rs.state}"
        )

        async def released() -> bool:  # the state says suspended before the release lands
            info = await store.info(rs.key)
            return info is not None and info.owner is None

        await eventually(released, "the abandoned call's lease is released", T)
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


async def test_an_app_hold_started_as_the_caller_dropped_is_not_lifted_by_their_return(
    store: Store,
) -> None:
    """Same race (the app's hold under way as the caller's network drops); the caller is
    back within the grace. docs/lifecycle.md (Caller drop, "they rejoin within
    leave_grace"): "a session the app or an operator had paused before they left ...
    stays paused until it is resumed"; JobPolicy's ``_left_pause`` comment: the leave's
    pause "is lifted on their return only while no one asked for a pause since (a hold)".

    What happens: `_pause_for_leave` records ``_left_pause = _pauses + 1`` before its
    ``rs.pause()`` fails ("being paused"); the app's pause then makes ``_pauses`` that very
    number, so the caller's return takes the app's hold for the leave's pause and
    resumes it: the agent talks to a caller the app put on hold."""
    j, s, rs = await _app_pause_racing_the_drop(store, grace=10.0)
    try:
        await asyncio.sleep(0.1)
        j.join()
        await asyncio.sleep(0.5)
        assert rs.state == "paused", "the caller's return lifted the app's hold"
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------------------- after a handoff: rejoin in place, agent, userdata, greeting


def demo_registry() -> lr.AgentRegistry:
    from livekit_resume.cli.demo.agents import register_agents

    registry = lr.AgentRegistry()
    register_agents(registry)
    return registry


def items_of(session: AgentSession[Any]) -> list[tuple[str, str]]:
    """Each history item's type and its text, call or output: to spot one twice."""
    out = []
    for i in session.history.items:
        if i.type == "message":
            out.append((f"message:{i.role}", " ".join(str(c) for c in i.content)))
        elif i.type == "function_call":
            out.append(("function_call", f"{i.name}:{i.call_id}"))
        elif i.type == "function_call_output":
            out.append(("function_call_output", f"{i.name}:{i.call_id}:{i.output}"))
    return out


async def test_a_caller_back_after_the_grace_suspend_finds_the_handed_to_agent_and_no_greeting(
    store: Store,
) -> None:
    """passes: coverage. The demo's agents (greet on entry unless rebuilt from a
    snapshot): a fresh call is greeted, the caller gives their name (a tool writes
    userdata) and is handed to the booking desk; their network drops, the grace
    suspends the call, they come back in the same room (restore in place). docs/lifecycle.md:
    "the agent, where it stopped, without a second greeting", "every item back": the
    booking desk is the agent, userdata kept, no LLM request made by the restart, each
    item once, and the next tool call works on the restored userdata."""
    from livekit_resume.cli.demo.agents import Booking, Receptionist, Visit
    from tests.lk.scripted_llm import ToolCall

    llm = ScriptedLLM(
        ["Hello, Riverside clinic.", [ToolCall("record_name", {"name": "Ada"})], "Noted, Ada."],
        default="ok",
    )
    j = Job("room-clinic")
    s = make_text_session(llm, userdata=Visit())
    closed = closing(s)
    rs = await asyncio.wait_for(
        run_job(
            j,
            s,
            store,
            key=key_(),
            leave_grace=0.2,
            registry=demo_registry(),
            default=Receptionist,
            userdata_type=Visit,
        ),
        T,
    )
    try:
        await llm.wait_for_requests(1)  # the greeting of a fresh call
        await asyncio.wait_for(s.run(user_input="I'm Ada"), T)
        llm.push([ToolCall("transfer_to_booking")])
        await asyncio.wait_for(s.run(user_input="I want an appointment"), T)
        await until(lambda: isinstance(s.current_agent, Booking), "handed to the booking desk")
        await asyncio.sleep(0.3)  # the desk's own greeting, if any, is done
        before = items_of(s)
        asked = len(llm.requests)
        j.leave()
        await asyncio.wait_for(closed.wait(), T)
        assert rs.state == "suspended"
        j.join()
        await state_is(rs, "active", T)
        await asyncio.sleep(0.5)
        assert rs.resumed
        assert len(llm.requests) == asked, "the restart asked the LLM (a second greeting?)"
        assert isinstance(s.current_agent, Booking), f"restored {type(s.current_agent)}"
        assert s.userdata.name == "Ada"
        after = [i for i in items_of(s) if i in before]
        assert after == before, "items lost or reordered by the restore in place"
        calls = [i for i in items_of(s) if i[0].startswith("function_call")]
        assert len(calls) == len(set(calls)), f"a tool call or output twice: {calls}"
        llm.push([ToolCall("book_visit", {"day": "Tuesday"})], "Booked Tuesday.")
        await asyncio.wait_for(s.run(user_input="Tuesday please"), T)
        assert s.userdata.day == "Tuesday" and s.userdata.name == "Ada"
        assert user_texts_of(s) == ["I'm Ada", "I want an appointment", "Tuesday please"]
        await asyncio.wait_for(rs.checkpoint(), T)
        snap = await stored_snap(store, rs.key)
        assert snap.userdata == {"name": "Ada", "day": "Tuesday", "changes": 0}
        assert await stored_user_texts(store, rs.key) == user_texts_of(s)
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------------------------------- the job shut down while the grace suspends


class HeldCommits:
    """A store whose commits of the given reasons wait for ``gate`` before they are sent
    (a slow network: the store has not seen them yet); ``held`` is set when one waits."""

    def __init__(self, inner: Store, reasons: set[str]) -> None:
        self.inner = inner
        self.reasons = reasons
        self.held = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        if commit.info.get("reason") in self.reasons and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await self.inner.commit(commit)


async def test_a_job_shut_down_while_the_grace_suspend_saves_keeps_every_turn_and_no_lease(
    store: Store,
) -> None:
    """passes: coverage. The grace ran out and the suspend's final snapshot is on its way
    (a slow store) when LiveKit shuts the job down (closes the session, then runs the
    shutdown callbacks). docs/lifecycle.md: each step "ends whole or not at all"; the
    shutdown "saves the last changes and releases the lease". Afterwards: no lease held,
    every turn stored, the latest version not 'active' (nobody serves it), and the
    next job resumes it, active."""
    key = key_()
    held = HeldCommits(store, {"suspend"})
    j = Job("room-s")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, held, key=key, leave_grace=0.1), T)
    await asyncio.wait_for(s.run(user_input="one"), T)
    await asyncio.wait_for(s.run(user_input="two"), T)
    j.leave()
    await asyncio.wait_for(held.held.wait(), T)
    shut = asyncio.ensure_future(j.shut_down(s))
    await asyncio.sleep(0.2)
    held.gate.set()
    await asyncio.wait_for(shut, T)
    info = await store.info(key)
    assert info is not None and info.owner is None, f"held by {info and info.owner!r}"
    assert info.info.get("state") in ("suspended", "paused"), info.info
    assert await stored_user_texts(store, key) == ["one", "two"]
    assert rs.state in ("suspended", "closed")
    j2 = Job("room-t")
    s2 = make_text_session(ScriptedLLM(default="back"))
    rs2 = await asyncio.wait_for(run_job(j2, s2, store, key=key), T)
    try:
        assert rs2.resumed and rs2.state == "active" and user_texts_of(s2) == ["one", "two"]
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)


# --------------- a restore in place that starts afresh: nothing of the old call carried over


async def _suspended_clinic_call(
    store: Store, **options: Any
) -> tuple[Job, AgentSession[Any], lr.ResumableSession, ScriptedLLM]:
    """A demo-agent call whose tool recorded the caller's name in userdata, then
    suspended by the leave grace (0.1 s) in its job."""
    from livekit_resume.cli.demo.agents import Receptionist, Visit
    from tests.lk.scripted_llm import ToolCall

    llm = ScriptedLLM(
        ["Hello.", [ToolCall("record_name", {"name": "Ada"})], "Noted, Ada."], default="ok"
    )
    j = Job("room-fresh")
    s = make_text_session(llm, userdata=Visit())
    closed = closing(s)
    rs = await asyncio.wait_for(
        run_job(
            j,
            s,
            store,
            key=key_(),
            leave_grace=0.1,
            registry=demo_registry(),
            default=Receptionist,
            userdata_type=Visit,
            **options,
        ),
        T,
    )
    await llm.wait_for_requests(1)
    await asyncio.wait_for(s.run(user_input="I'm Ada, card 4111"), T)
    assert s.userdata.name == "Ada"
    j.leave()
    await asyncio.wait_for(closed.wait(), T)
    assert rs.state == "suspended"
    return j, s, rs, llm


async def test_a_restore_in_place_of_a_stale_call_starts_afresh_without_the_old_userdata(
    store: Store,
) -> None:
    """With ``resume_within``, docs/lifecycle.md: "a conversation last saved longer ago is
    not resumed: it is kept, whole, under <key>~v<version> ... and the call starts
    afresh under the key (rs.resumed is False)". The restore in place (a participant
    joining the suspended job's room) archives the stale call too (job.py `rejoin`
    calls `archive()`), empties the history and starts the default agent: a fresh call.

    What happens: `ResumableSession._load_into`, finding nothing stored, returns
    ``default()`` and leaves ``session.userdata`` as the archived call left it (the same
    AgentSession restarts): the new conversation starts with, and saves under the key,
    the previous caller's userdata (their name), which belongs only to the archive."""
    j, s, rs, _llm = await _suspended_clinic_call(store, resume_within=0.3)
    try:
        await asyncio.sleep(0.6)  # the suspended call is now older than resume_within
        j.join()
        await state_is(rs, "active", T)
        assert not rs.resumed, "the stale call was resumed"
        assert user_texts_of(s) == []
        archives = [k for k in await store.keys() if k.startswith(f"{rs.key}~v")]
        assert archives, "the stale call was not kept aside"
        await asyncio.wait_for(rs.checkpoint(), T)
        snap = await stored_snap(store, rs.key)
        assert s.userdata.name is None, f"the fresh call starts with userdata {s.userdata!r}"
        assert snap.userdata.get("name") is None, f"the fresh call saved {snap.userdata!r}"
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


async def test_a_restore_in_place_after_the_operator_removed_the_call_brings_nothing_back(
    store: Store,
) -> None:
    """An operator removes the suspended conversation (``livekit-resume rm KEY``: "deletes
    a session: every version, its log, its lease"; a deletion request, say). The caller's
    client then reconnects to the room: the restore in place finds nothing stored and
    starts a new call (``rs.resumed`` False, history emptied). Nothing of the removed
    conversation may come back into the store.

    What happens: as above, ``session.userdata`` of the removed conversation stays on the
    restarted AgentSession and is written under the key by the new call's first save:
    `rm` is silently undone for the userdata (the caller's name)."""
    j, s, rs, _llm = await _suspended_clinic_call(store)
    try:
        assert await store.delete(rs.key)
        j.join()
        await state_is(rs, "active", T)
        assert not rs.resumed and user_texts_of(s) == []
        await asyncio.wait_for(rs.checkpoint(), T)
        snap = await stored_snap(store, rs.key)
        assert snap.userdata.get("name") is None, (
            f"the removed call's userdata is back: {snap.userdata!r}"
        )
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ----------------------------------------------------- what `ls` shows at each step


async def test_ls_follows_each_step_of_a_drop_and_a_rejoin_in_place(store: Store) -> None:
    """docs/cli.md: ``ls`` lists each session's state, "its latest version's"; a session
    held by a worker is listed with its holder. Along a drop and a rejoin in place, an
    operator's ``ls`` (`livekit_resume.cli.snapshots.listed_state`) must say: active with a
    holder; paused with a holder once the caller dropped; suspended with no holder once
    the grace ran out; and, once the caller is back and talking to the restored agent,
    not 'suspended' (docs/lifecycle.md: "resume.state=active") with this job holding it."""
    from livekit_resume.cli.snapshots import listed_state

    async def ls() -> tuple[Any, str | None]:
        info = await store.info(key)
        assert info is not None
        return listed_state(info), info.owner

    key = key_()
    j = Job("room-ls")
    s = make_text_session(ScriptedLLM(default="noted"))
    closed = closing(s)
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.3), T)
    try:
        await asyncio.wait_for(s.run(user_input="one"), T)
        await asyncio.wait_for(rs.checkpoint(), T)
        state, owner = await ls()
        assert state == "active" and owner is not None
        j.leave()
        await state_is(rs, "paused")
        state, owner = await ls()
        assert (state, owner is not None) == ("paused", True)
        await asyncio.wait_for(closed.wait(), T)
        state, owner = await ls()
        assert (state, owner) == ("suspended", None)
        j.join()
        await state_is(rs, "active", T)
        await asyncio.sleep(0.5)  # autosave's debounce is 0.01 s
        state, owner = await ls()
        assert owner is not None and owner.split(":")[1] == j.ctx.job.id
        assert state == "active", f"ls says {state!r} of the call restored in place and live"
        await asyncio.wait_for(s.run(user_input="two"), T)
        await asyncio.wait_for(rs.checkpoint(), T)
        assert await ls() == ("active", owner)
        assert await stored_user_texts(store, key) == ["one", "two"]
    finally:
        await asyncio.wait_for(j.shut_down(s), T)
    assert (await ls())[1] is None


# ------------------------------------------------ the caller drops while a tool runs


class OrderDesk(Agent):
    """Looks an order up with a tool that waits for the test's word (a slow back end)."""

    go: asyncio.Event
    started: asyncio.Event

    def __init__(self) -> None:
        super().__init__(instructions="You look orders up.")

    @function_tool
    async def lookup_order(self, context: RunContext[Any], order: str) -> str:
        """Look an order up.

        Args:
            order: the order number
        """
        OrderDesk.started.set()
        await OrderDesk.go.wait()
        return f"order {order} shipped on Monday"


ORDER_REGISTRY = lr.AgentRegistry()
ORDER_REGISTRY.register(OrderDesk)


@pytest.mark.parametrize("back", ["within-grace", "after-suspend"])
async def test_a_caller_who_drops_while_a_tool_runs_finds_its_call_answered_once(
    store: Store, back: str
) -> None:
    """The caller asks for their order; the lookup tool runs; their network drops (the
    leave pauses: "A pause cuts the turn under way, a tool's turn too: the tool runs to
    its end", docs/strategies.md) and the tool then finishes. They come back: within the
    grace (resumed in place), or after it (suspended, restored in place). docs/lifecycle.md:
    "nothing lost", "every item back": the user turn once, the tool call answered exactly
    once (its result, or "interrupted" if the suspend came first: failure-model.md), in
    the session, in the store and in the next LLM request; the conversation goes on."""
    from tests.lk.scripted_llm import ToolCall

    OrderDesk.go, OrderDesk.started = asyncio.Event(), asyncio.Event()
    llm = ScriptedLLM([[ToolCall("lookup_order", {"order": "4711"})]], default="ok")
    key = key_()
    j = Job("room-tool")
    s = make_text_session(llm)
    closed = closing(s)
    grace = 10.0 if back == "within-grace" else 0.2
    rs = await asyncio.wait_for(
        run_job(
            j, s, store, key=key, leave_grace=grace, registry=ORDER_REGISTRY, default=OrderDesk
        ),
        T,
    )
    try:
        turn: asyncio.Future[Any] = asyncio.ensure_future(s.run(user_input="where is order 4711?"))
        await asyncio.wait_for(OrderDesk.started.wait(), T)
        j.leave()
        await asyncio.sleep(0.2)  # the pause is cutting the tool's turn (it waits for it)
        OrderDesk.go.set()
        await state_is(rs, "paused", T)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(turn, T)
        if back == "after-suspend":
            await asyncio.wait_for(closed.wait(), T)
            assert rs.state == "suspended"
        await asyncio.sleep(0.3)
        j.join()
        await state_is(rs, "active", T)
        await asyncio.wait_for(s.run(user_input="thanks, anything else?"), T)
        await asyncio.wait_for(rs.checkpoint(), T)
        calls = [i for i in s.history.items if i.type == "function_call"]
        outputs = [i for i in s.history.items if i.type == "function_call_output"]
        assert [c.name for c in calls] == ["lookup_order"], items_of(s)
        assert [o.call_id for o in outputs] == [calls[0].call_id], items_of(s)
        assert user_texts_of(s) == ["where is order 4711?", "thanks, anything else?"]
        last = llm.requests[-1]
        sent = [i for i in last.items if i.type == "function_call_output"]
        assert len(sent) == 1 and sent[0].call_id == calls[0].call_id
        snap = await stored_snap(store, key)
        stored_calls = [i for i in snap.history if i["type"] == "function_call"]
        stored_outputs = [i for i in snap.history if i["type"] == "function_call_output"]
        assert len(stored_calls) == 1 and len(stored_outputs) == 1, snap.history
        assert stored_outputs[0]["call_id"] == stored_calls[0]["call_id"]
        assert not snap.tool_calls, f"a tool still saved as running: {snap.tool_calls}"
        assert await stored_user_texts(store, key) == user_texts_of(s)
    finally:
        OrderDesk.go.set()
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------- back in a new room while the old room's pause is still on its way


async def test_a_takeover_while_the_drops_pause_is_saving_silences_the_old_job_for_good(
    store: Store,
) -> None:
    """The caller's network drops in room A: job A's pause snapshot is on its way (a slow
    store). Within that moment they call back in room B (key=): job B takes the key over
    and talks. Job A's pause then reaches the store. docs/lifecycle.md (crash table):
    whichever write of the old job meets the new epoch ("the pause or suspend of a caller
    who left"), "nothing more from it": it shuts itself down. Job A writes nothing, never
    releases B's lease, and does not answer if the caller's old tab reconnects to room A;
    job B keeps every turn."""
    key = key_()
    held = HeldCommits(store, {"pause"})
    ja = Job("room-a")
    llm_a = ScriptedLLM(default="job A speaking")
    sa = make_text_session(llm_a)
    rsa = await asyncio.wait_for(run_job(ja, sa, held, key=key, leave_grace=0.3), T)
    jb = Job("room-b")
    sb = make_text_session(ScriptedLLM(default="job B speaking"))
    try:
        await asyncio.wait_for(sa.run(user_input="in A"), T)
        await asyncio.wait_for(rsa.checkpoint(), T)
        ja.leave()
        await asyncio.wait_for(held.held.wait(), T)
        rsb = await asyncio.wait_for(run_job(jb, sb, store, key=key), T)
        assert rsb.resumed and user_texts_of(sb) == ["in A"]
        await asyncio.wait_for(sb.run(user_input="in B"), T)
        await asyncio.wait_for(rsb.checkpoint(), T)
        versions = await store.versions(key)
        held.gate.set()
        await until(lambda: ja.shutdowns, "job A left room A")
        await asyncio.sleep(0.6)  # two of room A's graces
        asked = len(llm_a.requests)
        ja.join()
        await asyncio.sleep(0.3)
        if rsa.state == "active":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sa.run(user_input="hello? (room A)"), T)
        assert len(llm_a.requests) == asked, "job A answered after it was taken over"
        assert await store.versions(key) == versions, "job A wrote after the takeover"
        info = await store.info(key)
        assert info is not None and info.owner is not None
        assert info.owner.split(":")[1] == jb.ctx.job.id
        await asyncio.wait_for(sb.run(user_input="still B"), T)
        await asyncio.wait_for(rsb.checkpoint(), T)
        assert await stored_user_texts(store, key) == ["in A", "in B", "still B"]
    finally:
        held.gate.set()
        await asyncio.wait_for(jb.shut_down(sb), T)
        await asyncio.wait_for(ja.shut_down(sa), T)


class FailingCommits:
    """A store whose commits of the given reasons fail (`StoreUnavailable`) while
    ``down`` is set: an outage, not our code."""

    def __init__(self, inner: Store, reasons: set[str]) -> None:
        self.inner = inner
        self.reasons = reasons
        self.down = False
        self.failed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        if self.down and commit.info.get("reason") in self.reasons:
            self.failed.set()
            raise lr.StoreUnavailable("store is down (test)")
        return await self.inner.commit(commit)


async def test_a_grace_suspend_that_met_a_store_outage_is_tried_again(store: Store) -> None:
    """The caller left and nobody came back; as the grace runs out the store is down, so
    the suspend fails (the session stays paused with its lease: `suspend`'s docstring).

    Expected: docs/lifecycle.md (Caller drop), "nobody rejoins in time -> suspended": the
    suspend is tried again once the store is back.
    Found: the failed step ended the policy's settling, and with the grace timer spent
    and no room event to come nothing tried again: the abandoned call held its lease,
    its session and its models until the job ended."""
    key = key_()
    flaky = FailingCommits(store, {"suspend"})
    j = Job("room-outage")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, flaky, key=key, leave_grace=0.3), T)
    try:
        await asyncio.wait_for(s.run(user_input="one thing"), T)
        flaky.down = True
        j.leave()
        await asyncio.wait_for(flaky.failed.wait(), T)  # the grace's suspend failed
        await asyncio.sleep(0.1)
        flaky.down = False  # the store is back
        assert await reaches(rs, "suspended", 3.0), f"store back 3 s, session {rs.state}"

        async def released() -> bool:
            info = await store.info(key)
            return info is not None and info.owner is None

        await eventually(released, "the lease of the abandoned call is released", T)
        assert await stored_user_texts(store, key) == ["one thing"]
    finally:
        await asyncio.wait_for(j.shut_down(s), T)
