"""Hunt: the job lifecycle of `resumable_job` (job.py) on real AgentSessions and stores.

Jobs run in this process with a real `JobContext` on LiveKit's mock room (the `Job`
helper of tests/test_job_policy_adversarial.py) and a real text `AgentSession` driven by
the scripted LLM. Each test states what the docs promise; a failing one is a defect.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_agent_state_adversarial import store
from tests.test_job_policy_adversarial import (  # noqa: F401  (_sigterm_kept: autouse)
    QUIET,
    REGISTRY,
    Clerk,
    Job,
    _sigterm_kept,
    state_is,
)

__all__ = ["store"]


async def run_job(
    j: Job, session: AgentSession[Any], store: Store, **options: Any
) -> lr.ResumableSession:
    """tests/test_job_policy_adversarial.py's run_job, with ``debounce`` overridable."""
    options.setdefault("leave_grace", None)
    options.setdefault("debounce", 0.01)
    return await lr.resumable_job(
        j.ctx,
        session,
        registry=options.pop("registry", REGISTRY),
        default=options.pop("default", Clerk),
        store=store,
        room_options=QUIET,
        **options,
    )


T = 5.0  # per step


def key_() -> str:
    return f"caller-{uuid.uuid4().hex[:8]}"


async def stored_user_texts(store: Store, key: str) -> list[str]:
    snap = from_stored(Codec(), await store.load(key))
    return [
        " ".join(str(c) for c in i["content"])
        for i in snap.history
        if i["type"] == "message" and i["role"] == "user"
    ]


async def stored_snap(store: Store, key: str) -> lr.Snapshot:
    return from_stored(Codec(), await store.load(key))


def closing(session: AgentSession[Any]) -> asyncio.Event:
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    return closed


def suspend_after(rs: lr.ResumableSession, event: asyncio.Event, mp: pytest.MonkeyPatch) -> None:
    """Hold ``rs``'s suspend (the one its grace makes) until ``event``: under load the
    grace may run out before the newer job has taken the key over, and the older job
    then suspends it unfenced, which is not the case a test of a fenced suspend means."""
    suspend = rs.suspend

    async def held() -> int:
        await event.wait()
        return await suspend()

    mp.setattr(rs, "suspend", held)


def user_texts_of(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in i.content)
        for i in session.history.items
        if i.type == "message" and i.role == "user"
    ]


async def until(pred: Any, what: str, timeout: float = T) -> None:
    async def ok() -> bool:
        return bool(pred())

    await eventually(ok, what, timeout)


# ---------------------------------------------------------------- worker drained while paused


async def test_a_job_shut_down_while_the_caller_was_away_resumes_active_in_the_next_job(
    store: Store,
) -> None:
    """The caller's network dropped (paused by the leave grace) and the worker is shut
    down meanwhile (a deploy). The caller calls back in a new room: docs/lifecycle.md
    "the agent, where it stopped". The next job must resume the conversation active (it
    answers), with every turn, not paused by a pause that belonged to the old room."""
    key = key_()
    j1 = Job("room-a")
    s1 = make_text_session(ScriptedLLM(default="noted"))
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key, leave_grace=10.0), T)
    await asyncio.wait_for(s1.run(user_input="my order is 4711"), T)
    j1.leave()
    await state_is(rs1, "paused")
    await asyncio.wait_for(j1.shut_down(s1), T)
    info = await store.info(key)
    assert info is not None and info.owner is None, "the shut-down job still holds the lease"

    j2 = Job("room-b")
    llm2 = ScriptedLLM(default="welcome back")
    s2 = make_text_session(llm2)
    rs2 = await asyncio.wait_for(run_job(j2, s2, store, key=key, leave_grace=10.0), T)
    try:
        assert rs2.resumed
        assert rs2.state == "active", f"the next job restored the call {rs2.state}"
        await asyncio.wait_for(s2.run(user_input="what was my order?"), T)
        assert llm2.requests, "the restored session never asked the LLM: still silenced"
        assert llm2.requests[-1].texts("user")[-2:] == ["my order is 4711", "what was my order?"]
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)


# ---------------------------------------------------- a newer job while the old one is paused


async def test_an_older_paused_job_whose_grace_runs_out_after_a_takeover_writes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room A: the caller's network dropped (paused, grace running). They call back in
    room B within the grace: the newer job takes the key over. When room A's grace runs
    out, the older job must not write its 'suspended' snapshot over the conversation, nor
    release the newer job's lease ("two workers never write one conversation"); and, as
    docs/lifecycle.md promises for a fenced job ("its next write meets the new epoch
    (LeaseLost) -> the old job stops speaking, closes its session and shuts itself
    down"), it leaves the room (ctx.shutdown).

    What happens: the suspend's final save meets LeaseLost, which is only logged as "a
    pause, suspend or restore on a room event failed"; on_lost is not called (only
    autosave's loop calls it), so the job stays in room A, paused, with autosave running,
    until its next lease renewal (lease_ttl / 3: 10 s by default) finds out."""
    key = key_()
    j1 = Job("room-a")
    s1 = make_text_session(ScriptedLLM(default="noted"))
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key, leave_grace=0.5), T)
    taken = asyncio.Event()
    suspend_after(rs1, taken, monkeypatch)
    await asyncio.wait_for(s1.run(user_input="first"), T)
    j1.leave()
    await state_is(rs1, "paused")

    j2 = Job("room-b")
    s2 = make_text_session(ScriptedLLM(default="welcome back"))
    rs2 = await asyncio.wait_for(run_job(j2, s2, store, key=key), T)
    try:
        await asyncio.wait_for(s2.run(user_input="second"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        versions = await store.versions(key)
        taken.set()
        await asyncio.sleep(1.0)  # room A's grace runs out meanwhile
        await until(lambda: j1.shutdowns, "the older job left its room")
        assert await store.versions(key) == versions, "the older job wrote after the takeover"
        info = await store.info(key)
        assert info is not None and info.owner is not None and info.info["state"] == "active"
        assert rs2.state == "active"
        await asyncio.wait_for(s2.run(user_input="third"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        assert await stored_user_texts(store, key) == ["first", "second", "third"]
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)
        await asyncio.wait_for(j1.shut_down(s1), T)


# ------------------------------------------------------------ suspend / restore in place cycles


async def test_two_cycles_of_suspend_and_restore_in_place_keep_each_turn_once(
    store: Store,
) -> None:
    """docs/lifecycle.md: a participant joining after a suspend restores the call in this
    job, into the same AgentSession, "every item back". Twice over, each turn is in the
    history (and in the LLM's request) exactly once."""
    key = key_()
    j = Job("room-c")
    llm = ScriptedLLM(default="noted")
    s = make_text_session(llm)
    closed = closing(s)
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.1), T)
    try:
        said = []
        for n in range(3):
            text = f"turn {n}"
            said.append(text)
            await asyncio.wait_for(s.run(user_input=text), T)
            if n == 2:
                break
            closed.clear()
            j.leave()
            await asyncio.wait_for(closed.wait(), T)
            assert rs.state == "suspended"
            j.join()
            await state_is(rs, "active")
        assert user_texts_of(s) == said
        assert llm.requests[-1].texts("user") == said
        await asyncio.wait_for(rs.checkpoint(), T)
        assert await stored_user_texts(store, key) == said
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


async def test_a_job_shut_down_while_restoring_in_place_holds_no_lease_and_loses_nothing(
    store: Store,
) -> None:
    """Suspended by the grace, a participant joins (restore in place starts) and the job is
    shut down at once (LiveKit: session close, then shutdown callbacks). Afterwards no
    lease is held (the next job is not kept waiting) and the stored conversation has
    every turn."""
    key = key_()
    j = Job("room-d")
    s = make_text_session(ScriptedLLM(default="noted"))
    closed = closing(s)
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.1), T)
    await asyncio.wait_for(s.run(user_input="remember 4711"), T)
    j.leave()
    await asyncio.wait_for(closed.wait(), T)
    j.join()
    await asyncio.sleep(0)  # the restore in place has begun
    await asyncio.wait_for(j.shut_down(s), T)
    await asyncio.sleep(0.3)

    async def free() -> bool:
        info = await store.info(key)
        return info is not None and info.owner is None

    await eventually(free, "the lease is released", T)
    assert await stored_user_texts(store, key) == ["remember 4711"]
    j2 = Job("room-e")
    s2 = make_text_session(ScriptedLLM(default="back"))
    rs2 = await asyncio.wait_for(run_job(j2, s2, store, key=key), T)
    try:
        assert rs2.resumed and user_texts_of(s2) == ["remember 4711"]
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)
    assert rs.state in ("closed", "suspended")


# ------------------------------------------------------------- bad key from the key function


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 5000])
async def test_a_bad_key_from_the_key_function_is_a_typed_error_and_writes_nothing(
    store: Store, bad: str
) -> None:
    """The key function of the job returns a key that cannot name a session. The brief's
    expectation: a typed error of livekit_resume.errors (or at least a ValueError), the
    store unchanged, and the session not started."""
    j = Job("room-bad")
    s = make_text_session(ScriptedLLM(default="noted"))
    with pytest.raises((lr.ResumeError, ValueError)):
        await asyncio.wait_for(run_job(j, s, store, key=lambda _ctx: bad), T)
    assert await store.keys() == []
    assert not getattr(s, "_started", False)
    await s.aclose()


async def test_an_older_job_whose_suspend_met_the_new_epoch_does_not_answer_the_caller_again(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and then the caller's client in room A reconnects (a participant joins
    room A) while the caller is served in room B. docs/lifecycle.md (crash table): the
    fenced job hears "its next write meets the new epoch (LeaseLost)" and then "nothing
    more from it": it stops speaking and shuts itself down. Its suspend's final save met
    the new epoch, yet it stays paused in room A and, on the join, resumes and answers."""
    key = key_()
    j1 = Job("room-a")
    llm1 = ScriptedLLM(default="old job speaking")
    s1 = make_text_session(llm1)
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key, leave_grace=0.3), T)
    taken = asyncio.Event()
    suspend_after(rs1, taken, monkeypatch)
    await asyncio.wait_for(s1.run(user_input="first"), T)
    j1.leave()
    await state_is(rs1, "paused")
    j2 = Job("room-b")
    s2 = make_text_session(ScriptedLLM(default="new job"))
    await asyncio.wait_for(run_job(j2, s2, store, key=key), T)
    taken.set()
    try:

        async def left() -> bool:
            return bool(j1.shutdowns)

        # room A's grace runs out: its suspend meets the new epoch, and the job leaves
        # (waited for, not slept on: under load the grace's suspend comes late)
        await eventually(left, "the fenced job left room A", T)
        asked = len(llm1.requests)
        j1.join()
        await asyncio.sleep(0.3)
        if rs1.state == "active":
            await asyncio.wait_for(s1.run(user_input="hello? (room A)"), T)
        assert len(llm1.requests) == asked, "the fenced job answered the caller in room A"
        assert j1.shutdowns, "the fenced job never left room A"
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)
        await asyncio.wait_for(j1.shut_down(s1), T)


# ------------------------------------------------------------------- lease held while paused


async def test_a_paused_job_keeps_its_lease_past_its_ttl(store: Store) -> None:
    """A caller away within a long grace: the job is alive, paused, and still serves the
    key (the caller may rejoin). Its lease must stay renewed past ``lease_ttl``, or a
    second worker restoring without takeover gets the key while the first still holds the
    live session (two writers)."""
    key = key_()
    j = Job("room-p")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=10.0, lease_ttl=0.6), T)
    try:
        await asyncio.wait_for(s.run(user_input="hold on"), T)
        j.leave()
        await state_is(rs, "paused")
        await asyncio.sleep(1.5)  # 2.5 lease ttls
        other = make_text_session(ScriptedLLM(default="x"))
        rs2 = lr.ResumableSession(store, key, registry=REGISTRY, owner="w2", lease_ttl=0.6)
        with pytest.raises(lr.SessionBusy):
            await asyncio.wait_for(rs2.restore(other, default=Clerk), T)
        await other.aclose()
        j.join()
        await state_is(rs, "active")
        await asyncio.wait_for(s.run(user_input="back"), T)
        await asyncio.wait_for(rs.checkpoint(), T)
        assert await stored_user_texts(store, key) == ["hold on", "back"]
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# --------------------------------------------------- a job refused on restore fences nobody


async def test_a_newer_job_that_cannot_restore_the_conversation_does_not_fence_the_live_one(
    store: Store,
) -> None:
    """A newer job for the key (a worker running older code: the agent class not
    registered) fails with `UnknownAgent`. docs: "lease released, store unchanged", and a
    live session is "taken over only once it is read and found restorable here": the
    live job goes on saving, nothing stored changed, the newer job's session not started."""
    key = key_()
    j1 = Job("room-a")
    s1 = make_text_session(ScriptedLLM(default="noted"))
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key), T)
    try:
        await asyncio.wait_for(s1.run(user_input="one"), T)
        await asyncio.wait_for(rs1.checkpoint(), T)
        versions = await store.versions(key)
        j2 = Job("room-b")
        s2 = make_text_session(ScriptedLLM(default="x"))
        with pytest.raises(lr.UnknownAgent):
            await asyncio.wait_for(run_job(j2, s2, store, key=key, registry=lr.AgentRegistry()), T)
        assert not getattr(s2, "_started", False)
        assert await store.versions(key) == versions
        info = await store.info(key)
        assert (
            info is not None
            and info.owner is not None
            and info.owner.split(":")[1] == j1.ctx.job.id
        )
        await asyncio.wait_for(s1.run(user_input="two"), T)
        await asyncio.wait_for(rs1.checkpoint(), T)
        assert rs1.state == "active" and not j1.shutdowns
        assert await stored_user_texts(store, key) == ["one", "two"]
        await s2.aclose()
    finally:
        await asyncio.wait_for(j1.shut_down(s1), T)


# -------------------------------------------- a fenced job's shutdown leaves the newer job be


async def test_a_fenced_job_shut_down_before_it_noticed_leaves_the_newer_job_holding(
    store: Store,
) -> None:
    """Job A served the key with an unsaved turn; the caller is back in room B (job B took
    over) and job A is shut down before any write told it. Its close's final save must be
    refused and its release must not free job B's lease; job B goes on saving."""
    key = key_()
    j1 = Job("room-a")
    s1 = make_text_session(ScriptedLLM(default="noted"))
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key, debounce=30.0), T)
    await asyncio.wait_for(rs1.checkpoint(), T)
    await asyncio.wait_for(s1.run(user_input="unsaved in A"), T)
    j2 = Job("room-b")
    s2 = make_text_session(ScriptedLLM(default="x"))
    rs2 = await asyncio.wait_for(run_job(j2, s2, store, key=key), T)
    try:
        await asyncio.wait_for(s2.run(user_input="in B"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        versions = await store.versions(key)
        await asyncio.wait_for(j1.shut_down(s1), T)
        assert await store.versions(key) == versions
        info = await store.info(key)
        assert info is not None and info.owner is not None
        assert info.owner.split(":")[1] == j2.ctx.job.id, f"holder now {info.owner!r}"
        await asyncio.wait_for(s2.run(user_input="more in B"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        assert (await stored_user_texts(store, key))[-2:] == ["in B", "more in B"]
    finally:
        await asyncio.wait_for(j2.shut_down(s2), T)


# ------------------------------------------------------------- ended, then someone joins


async def test_a_participant_joining_after_the_call_ended_restores_nothing(store: Store) -> None:
    """`rs.end()`: "An ended conversation is never resumed". A participant then joining
    the same room must not bring it back in this job: state stays ended, no lease taken,
    nothing written."""
    key = key_()
    j = Job("room-end")
    s = make_text_session(ScriptedLLM(default="bye"))
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.1), T)
    await asyncio.wait_for(s.run(user_input="goodbye"), T)
    await asyncio.wait_for(rs.end(), T)
    versions = await store.versions(key)
    j.leave()
    await asyncio.sleep(0.3)
    j.join()
    await asyncio.sleep(0.3)
    assert rs.state == "ended"
    assert await store.versions(key) == versions
    info = await store.info(key)
    assert info is not None and info.owner is None
    await asyncio.wait_for(j.shut_down(s), T)


# ---------------------------------------------------- two new jobs for one key at once


async def test_two_jobs_for_one_key_started_at_once_leave_one_writer_and_every_turn(
    store: Store,
) -> None:
    """The caller's app reconnects twice in quick succession (two rooms, two jobs at once,
    same key). Exactly one job must end up serving; the other leaves its room (or was
    refused) and writes nothing afterwards; the served one holds the saved turns."""
    key = key_()
    j0 = Job("room-0")
    s0 = make_text_session(ScriptedLLM(default="noted"))
    rs0 = await asyncio.wait_for(run_job(j0, s0, store, key=key), T)
    await asyncio.wait_for(s0.run(user_input="before"), T)
    await asyncio.wait_for(j0.shut_down(s0), T)
    assert rs0.state == "closed"

    ja, jb = Job("room-a"), Job("room-b")
    sa = make_text_session(ScriptedLLM(default="a"))
    sb = make_text_session(ScriptedLLM(default="b"))
    results = await asyncio.wait_for(
        asyncio.gather(
            run_job(ja, sa, store, key=key), run_job(jb, sb, store, key=key), return_exceptions=True
        ),
        T,
    )
    live = [
        (j, s, r)
        for j, s, r in zip((ja, jb), (sa, sb), results, strict=True)
        if isinstance(r, lr.ResumableSession)
    ]
    try:
        for _j, s, r in live:
            assert r.resumed and user_texts_of(s)[:1] == ["before"]
        for _j, s, _r in live:
            with __import__("contextlib").suppress(Exception):
                await asyncio.wait_for(s.run(user_input="after"), T)
        await asyncio.sleep(0.5)
        serving = [r for j, _s, r in live if r.state == "active" and not j.shutdowns]
        assert len(serving) == 1, f"{len(serving)} jobs serve the key"
        await asyncio.wait_for(serving[0].checkpoint(), T)
        info = await store.info(key)
        assert info is not None and info.owner == serving[0]._holder.owner
        assert await stored_user_texts(store, key) == ["before", "after"]
    finally:
        for j, s, _r in live:
            await asyncio.wait_for(j.shut_down(s), T)


# ---------------------------------------------------------- an avatar stays in the room


async def test_the_caller_leaving_a_room_with_an_avatar_pauses_and_then_suspends(
    store: Store,
) -> None:
    """A LiveKit avatar (bey, tavus, hedra...) joins the room as a remote participant of
    kind AGENT publishing on behalf of the agent (``lk.publish_on_behalf``). When the
    caller leaves, docs/lifecycle.md: "the last remote participant leaves → pause ...
    nobody rejoins in time → suspended: the session closed, lease released". The avatar
    is not a caller; LiveKit's RoomIO links only SIP and STANDARD participants. The job
    policy counts every remote participant, so with an avatar in the room an abandoned
    call is never paused nor suspended and holds its lease and models for good."""
    from tests.lk.jobs import remote_participant

    key = key_()
    j = Job("room-avatar")
    avatar = remote_participant(
        "avatar-worker", attributes={"lk.publish_on_behalf": "agent-identity"}
    )
    avatar.kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT  # type: ignore[misc]
    j.room.remote_participants["PA_avatar"] = avatar
    s = make_text_session(ScriptedLLM(default="noted"))
    closed = closing(s)
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.2), T)
    try:
        await asyncio.wait_for(s.run(user_input="hello"), T)
        j.leave()
        with __import__("contextlib").suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), 3.0)  # 15 graces
        assert rs.state == "suspended", (
            f"the caller left 3 s ago (grace 0.2 s); with the avatar in the room the "
            f"session is {rs.state}"
        )
        info = await store.info(key)
        assert info is not None and info.owner is None
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# --------------------------------------------------- lease expired, taken, then shutdown


async def test_a_job_whose_lease_expired_and_was_taken_writes_nothing_on_shutdown() -> None:
    """Job A froze past its lease (the store's clock moved on ``lease_ttl``); a worker
    restored the key without takeover (the lease had expired) and saved a turn. When job A
    is then shut down (LiveKit closes its session, then runs the callbacks), its final
    save must be refused and its release must not free the new holder's lease."""
    import time

    from livekit_resume.stores.memory import MemoryStore

    offset = [0.0]
    store = MemoryStore(clock=lambda: time.time() + offset[0])
    key = key_()
    j1 = Job("room-a")
    s1 = make_text_session(ScriptedLLM(default="noted"))
    rs1 = await asyncio.wait_for(run_job(j1, s1, store, key=key, debounce=30.0), T)
    await asyncio.wait_for(s1.run(user_input="A said"), T)
    await asyncio.wait_for(rs1.checkpoint(), T)
    await asyncio.wait_for(s1.run(user_input="A unsaved"), T)
    offset[0] = 120.0  # A's lease (30 s) expired

    s2 = make_text_session(ScriptedLLM(default="x"))
    rs2 = lr.ResumableSession(store, key, registry=REGISTRY, owner="worker-2")
    try:
        await s2.start(await asyncio.wait_for(rs2.restore(s2, default=Clerk), T))
        await asyncio.wait_for(s2.run(user_input="B said"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        versions = await store.versions(key)
        await asyncio.wait_for(j1.shut_down(s1), T)
        assert await store.versions(key) == versions, "job A wrote after its lease was taken"
        info = await store.info(key)
        assert info is not None and info.owner == "worker-2"
        await asyncio.wait_for(s2.run(user_input="B again"), T)
        await asyncio.wait_for(rs2.checkpoint(), T)
        assert await stored_user_texts(store, key) == ["A said", "B said", "B again"]
    finally:
        await asyncio.wait_for(rs2.aclose(), T)
        await s2.aclose()
        await store.aclose()


# ------------------------------------------------- shutdown racing a checkpoint in flight


async def test_a_shutdown_while_a_checkpoint_is_in_flight_saves_every_turn(
    store: Store,
) -> None:
    """LiveKit shuts the job down while an autosave commit is on its way (the store slow
    to answer). The close must wait for it or send it again: the stored conversation has
    every turn, the lease is released, and the next job resumes it all."""
    from tests.test_lifecycle_races import SlowReplies

    key = key_()
    slow = SlowReplies(store)
    j = Job("room-s")
    s = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, s, slow, key=key), T)
    await asyncio.wait_for(s.run(user_input="one"), T)
    await asyncio.wait_for(rs.checkpoint(), T)
    slow.hold_commit = True
    await asyncio.wait_for(s.run(user_input="two"), T)
    await asyncio.wait_for(slow.applied.wait(), T)  # the autosave's commit is applied
    shut = asyncio.ensure_future(j.shut_down(s))
    await asyncio.sleep(0.05)
    if not shut.done() and getattr(s, "_started", False):
        await asyncio.wait_for(s.run(user_input="three"), T)
    slow.hold_commit = False
    slow.gate.set()
    await asyncio.wait_for(shut, T)
    info = await store.info(key)
    assert info is not None and info.owner is None
    said = await stored_user_texts(store, key)
    assert said[:2] == ["one", "two"]
    assert said == user_texts_of(s)


# ------------------------------------------------ the caller leaves during a restore in place


async def test_a_caller_gone_again_during_the_restore_in_place_is_suspended_again(
    store: Store,
) -> None:
    """docs/lifecycle.md: "a caller gone again while the session resumes or restores is
    suspended after the grace". Suspended, a participant joins and leaves at once: the
    job must end suspended, lease released, every turn stored once."""
    key = key_()
    j = Job("room-g")
    s = make_text_session(ScriptedLLM(default="noted"))
    closed = closing(s)
    rs = await asyncio.wait_for(run_job(j, s, store, key=key, leave_grace=0.2), T)
    try:
        await asyncio.wait_for(s.run(user_input="keep this"), T)
        j.leave()
        await asyncio.wait_for(closed.wait(), T)
        j.join()
        await asyncio.sleep(0)
        j.leave()
        await asyncio.sleep(0.1)
        await state_is(rs, "suspended", 5.0)
        await asyncio.sleep(0.5)
        assert rs.state == "suspended"

        async def free() -> bool:
            info = await store.info(key)
            return info is not None and info.owner is None

        await eventually(free, "the lease is released", T)
        assert await stored_user_texts(store, key) == ["keep this"]
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------------------------------------------------ malformed reconnect tokens


@pytest.mark.parametrize("bad", ["garbage", "a.b.c", "ü" * 40, "x" * 10000])
async def test_a_malformed_reconnect_token_is_refused_and_the_job_goes_on_with_its_key(
    store: Store, bad: str
) -> None:
    """docs/lifecycle.md: "A forged or altered token ... is refused with TokenRefused and a
    log line, and the job" goes on with the room's own key: never a failed job."""
    import base64
    import os

    keys = "k1:" + base64.b64encode(os.urandom(32)).decode()
    key = key_()
    j = Job(key)
    s = make_text_session(ScriptedLLM(default="hi"))
    rs = await asyncio.wait_for(run_job(j, s, store, token=bad, signing_keys=keys), T)
    try:
        assert rs.key == key and not rs.resumed
    finally:
        await asyncio.wait_for(j.shut_down(s), T)


# ------------------------------------ back and forth between two rooms, restores in place


async def test_a_restore_in_place_after_a_newer_job_suspended_gets_its_turns_once(
    store: Store,
) -> None:
    """Room A suspended (grace); the caller continues in room B (job B); B's grace runs out
    too (suspended, lease free); the caller's client reconnects to room A: the restore in
    place there must bring B's turns, each once, in the history and the LLM request."""
    key = key_()
    ja = Job("room-a")
    llm_a = ScriptedLLM(default="a")
    sa = make_text_session(llm_a)
    closed_a = closing(sa)
    rsa = await asyncio.wait_for(run_job(ja, sa, store, key=key, leave_grace=0.1), T)
    jb = Job("room-b")
    sb = make_text_session(ScriptedLLM(default="b"))
    closed_b = closing(sb)
    try:
        await asyncio.wait_for(sa.run(user_input="in A"), T)
        ja.leave()
        await asyncio.wait_for(closed_a.wait(), T)
        rsb = await asyncio.wait_for(run_job(jb, sb, store, key=key, leave_grace=0.1), T)
        await asyncio.wait_for(sb.run(user_input="in B"), T)
        jb.leave()
        await asyncio.wait_for(closed_b.wait(), T)
        assert rsb.state == "suspended"
        ja.join()
        await state_is(rsa, "active")
        await asyncio.wait_for(sa.run(user_input="in A again"), T)
        want = ["in A", "in B", "in A again"]
        assert user_texts_of(sa) == want
        assert llm_a.requests[-1].texts("user") == want
        await asyncio.wait_for(rsa.checkpoint(), T)
        assert await stored_user_texts(store, key) == want
    finally:
        await asyncio.wait_for(jb.shut_down(sb), T)
        await asyncio.wait_for(ja.shut_down(sa), T)
