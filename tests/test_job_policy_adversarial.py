"""An adversarial pass over `resumable_job`'s own path (job.py): the fenced job's
``on_lost``, the room policy's first moments, a long-pause timer firing during a close,
and a job cancelled while it archives a stale conversation.

`resumable_job` runs here in the test's own process, with a real `JobContext` (built as
LiveKit's job process builds it) on LiveKit's own stand-in room
(``ipc.mock_room.create_mock_room()``, with a working event emitter and a caller, as
``tests/lk/jobs.py`` fixes it in a job process) and a real `AgentSession`. Each test was
a defect on the branch that fixed it.

Suspects refuted on the way, from LiveKit 1.8.9's source (no test of ours needed):
``session.interrupt(force=True)`` in ``on_lost`` cannot hang forever (every interrupted
`SpeechHandle` marks itself done after ``speech_handle.INTERRUPTION_TIMEOUT``, 5 s), and
``local_participant.set_attributes`` is bounded by the FFI's own request timeout (5 s).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, JobContext, JobExecutorType, JobProcess, job
from livekit.agents.ipc.mock_room import create_mock_room
from livekit.agents.voice import room_io
from livekit.protocol import agent, models

import livekit_resume as lr
from livekit_resume.stores.base import MAX_KEY_BYTES, Lease, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.testing.poll import eventually
from tests.lk.fake_realtime import FakeRealtimeModel, FakeRealtimeSession
from tests.lk.jobs import remote_participant
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.redis_servers import build_redis_store
from tests.test_hooks import start

DEADLINE = 2.0
GRACE = 0.2
QUIET = room_io.RoomOptions(audio_input=False, audio_output=False, text_output=False)


class Clerk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You remember what the caller says.")


REGISTRY = lr.AgentRegistry()
REGISTRY.register(Clerk)


# ------------------------------------------------------------- a job in this process


class Job:
    """A `JobContext` on LiveKit's mock room, as a job process has it; ``shutdowns``
    holds the reasons ``ctx.shutdown`` was called with."""

    def __init__(
        self,
        room_name: str,
        *,
        caller: bool = True,
        executor: JobExecutorType = JobExecutorType.PROCESS,
    ) -> None:
        # a room of its own: LiveKit's create_mock_room is cached (one room for all jobs,
        # which would also keep every job alive through the listeners on it)
        room = create_mock_room.__wrapped__()
        emitter: rtc.EventEmitter[str] = rtc.EventEmitter()
        room.on, room.off, room.once, room.emit = (
            emitter.on,
            emitter.off,
            emitter.once,
            emitter.emit,
        )
        room.remote_participants = {"PA_caller": remote_participant("caller")} if caller else {}
        room.name = room_name
        self.room: Any = room
        self.shutdowns: list[str] = []
        info = job.RunningJobInfo(
            job=agent.Job(
                id=f"AJ_{uuid.uuid4().hex[:12]}",
                type=agent.JobType.JT_ROOM,
                room=models.Room(name=room_name, sid=f"RM_{uuid.uuid4().hex[:8]}"),
            ),
            url="fake_url",
            token="fake_token",
            accept_arguments=job.JobAcceptArguments(name="", identity="", metadata=""),
            worker_id="test-worker",
            fake_job=True,
        )
        self.ctx = JobContext(
            proc=JobProcess(executor_type=executor, user_arguments=None, http_proxy=None),
            info=info,
            room=room,
            on_connect=lambda: None,
            on_shutdown=self.shutdowns.append,
            inference_executor=None,  # type: ignore[arg-type]
        )

    async def shut_down(self, session: AgentSession[Any]) -> None:
        """What LiveKit does at the end of a job: close its primary session, then run
        the shutdown callbacks."""
        await session.aclose()
        for callback in list(self.ctx._shutdown_callbacks):
            await callback("job ended")

    def leave(self, identity: str = "caller") -> None:
        p = self.room.remote_participants.pop(f"PA_{identity}")
        self.room.emit("participant_disconnected", p)

    def join(self, identity: str = "caller") -> None:
        p = remote_participant(identity)
        self.room.remote_participants[f"PA_{identity}"] = p
        self.room.emit("participant_connected", p)


@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    """`resumable_job` ignores SIGTERM in its (job) process: not in pytest's."""
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.aclose()


async def run_job(
    j: Job, session: AgentSession[Any], store: Store, **options: Any
) -> lr.ResumableSession:
    options.setdefault("leave_grace", None)
    return await lr.resumable_job(
        j.ctx,
        session,
        registry=options.pop("registry", REGISTRY),
        default=options.pop("default", Clerk),
        store=store,
        room_options=QUIET,
        debounce=0.01,
        **options,
    )


async def state_is(rs: lr.ResumableSession, state: str, timeout: float = DEADLINE) -> None:
    async def reached() -> bool:
        return rs.state == state

    await eventually(reached, f"the session is {state} (it is {rs.state})", timeout)


# ------------------------------------------------------- on_lost: the fenced job leaves


class _CloseFails(FakeRealtimeSession):
    async def aclose(self) -> None:
        await super().aclose()
        raise ConnectionResetError("the realtime websocket was reset while closing (test)")


class CloseFailsModel(FakeRealtimeModel):
    """A realtime model whose session's close fails, as a provider's websocket can:
    LiveKit's ``AgentSession.aclose()`` then raises it (agent_activity ``_close_session``)."""

    def session(self, *, turn_detection_disabled: bool = False) -> FakeRealtimeSession:
        s = _CloseFails(self)
        self.sessions.append(s)
        return s


async def test_a_fenced_job_whose_session_fails_to_close_still_shuts_itself_down(
    store: MemoryStore,
) -> None:
    """job.py ``on_lost``: "a newer job took the conversation over: stop speaking, write
    nothing, end". Ending is ``ctx.shutdown``: the fenced job must leave the room even
    when closing its AgentSession fails, or it stays in the room beside the newer job."""
    j = Job("room-fenced")
    session: AgentSession[Any] = AgentSession(
        llm=CloseFailsModel(), vad=None, turn_handling={"turn_detection": None}
    )
    rs = await run_job(j, session, store)
    newer = make_text_session(ScriptedLLM(default="noted"))
    rs2 = lr.ResumableSession(store, "room-fenced", registry=REGISTRY, owner="newer-job")
    await newer.start(await rs2.restore(newer, default=Clerk, takeover=True))
    rs._autosave.trigger("manual")  # the fenced job's next write meets the new epoch

    async def shut_down() -> bool:
        return bool(j.shutdowns)

    await eventually(shut_down, "the fenced job asked LiveKit to shut it down", DEADLINE)
    assert "taken over" in j.shutdowns[0]
    await rs2.aclose()
    await newer.aclose()


# ----------------------------------------- the room policy: a caller gone during start


class LeavesOnEnter(Agent):
    """The caller hangs up while the session starts (``start()`` awaits ``on_enter``)."""

    job: Job

    def __init__(self) -> None:
        super().__init__(instructions="You remember what the caller says.")

    async def on_enter(self) -> None:
        self.job.leave()
        await asyncio.sleep(0)


async def test_a_caller_who_leaves_while_the_session_starts_is_paused_then_suspended(
    store: MemoryStore,
) -> None:
    """docs/lifecycle.md, caller drop: "the last remote participant leaves → the session
    pauses", and "nobody rejoins in time → suspended". A caller gone before the policy
    listened (during the restore or ``session.start()``) was never seen: the session
    waited for nobody, holding its lease and connections, with no grace and no suspend."""
    j = Job("room-early-leave")
    LeavesOnEnter.job = j
    registry = lr.AgentRegistry()
    registry.register(LeavesOnEnter)
    session = make_text_session(ScriptedLLM(default="noted"))
    closed = asyncio.Event()  # a suspend ends there, its lease released before
    session.on("close", lambda _ev: closed.set())
    rs = await run_job(
        j, session, store, registry=registry, default=LeavesOnEnter, leave_grace=GRACE
    )
    assert not j.room.remote_participants
    await asyncio.wait_for(closed.wait(), DEADLINE)
    assert rs.state == "suspended"
    info = await store.info("room-early-leave")
    assert info is not None and info.owner is None, "the lease is still held"
    await rs.aclose()


async def test_a_job_started_before_its_caller_joined_is_not_paused(store: MemoryStore) -> None:
    """The other side of the fix above: an agent dispatched before anyone joined (an
    explicit dispatch) has seen nobody leave, and waits for its caller as before."""
    j = Job("room-early-agent", caller=False)
    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await run_job(j, session, store, leave_grace=GRACE)
    await asyncio.sleep(GRACE * 2)
    assert rs.state == "active"
    await rs.aclose()
    await session.aclose()


# ------------------------------------------------ suspend_after firing during aclose()


class GatedCommits:
    """A store whose commits wait for ``gate`` while ``hold`` is set (``held`` is set
    once one waits): a final save still on its way to a slow store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.hold = False
        self.held = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        if self.hold:
            self.held.set()
            await self.gate.wait()
        return await self.inner.commit(commit)


async def test_suspend_after_firing_during_aclose_does_not_close_the_agent_session(
    store: MemoryStore,
) -> None:
    """`ResumableSession.aclose`: "Does not close the `AgentSession`." A paused session
    whose ``suspend_after`` runs out while ``aclose()`` writes its final save must not be
    suspended by it (a suspend closes the AgentSession and says ``suspended``)."""
    gated = GatedCommits(store)
    session, rs, _ = await start(gated, ["one"], suspend_after=0.1, autosave=True)
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    await session.run(user_input="remember the blue door")
    await rs.pause()
    session.userdata.name = "Grace"  # changed while paused: the final save writes it
    gated.hold = True
    closing = asyncio.ensure_future(rs.aclose())
    await asyncio.wait_for(gated.held.wait(), DEADLINE)
    await asyncio.sleep(0.3)  # suspend_after runs out while the final save is on its way
    gated.hold = False
    gated.gate.set()
    await asyncio.wait_for(closing, DEADLINE)
    for _ in range(20):  # a suspend that started would be done by now
        await asyncio.sleep(0.01)
    assert not closed.is_set(), "aclose() ended with the AgentSession closed"
    assert rs.state == "closed"
    info = await store.info(rs.key)
    assert info is not None and info.info["state"] != "suspended"
    await session.aclose()


# ---------------------------------- resume_within: a job cancelled while it archives


class SlowGrant:
    """A store whose first acquire is granted by the store at once and answered only
    when ``gate`` opens (``granted`` is set then): the reply still on its way back."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.granted = asyncio.Event()
        self.gate = asyncio.Event()
        self.first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire(self, key: str, owner: str, **options: Any) -> Lease:
        lease = await self.inner.acquire(key, owner, **options)
        if self.first:
            self.first = False
            self.granted.set()
            await self.gate.wait()
        return lease


async def test_a_job_cancelled_while_archiving_a_stale_conversation_holds_no_lease() -> None:
    """job.py, ``resume_within``: a stale conversation is copied aside under the key's
    lease. A job cancelled (shut down) while that lease is being granted must not leave
    the key held for ``ARCHIVE_LEASE_TTL`` (30 s): the next job's restore in place, or
    another worker's archive, would be refused (`SessionBusy`) meanwhile."""
    offset = [-3600.0]  # the conversation happened an hour ago
    inner = MemoryStore(clock=lambda: time.time() + offset[0])
    session, rs, _ = await start(inner, ["one"])
    await session.run(user_input="my order number is 4711")
    await rs.suspend()
    offset[0] = 0.0
    slow = SlowGrant(inner)
    j = Job(rs.key)
    fresh = make_text_session(ScriptedLLM(default="noted"))
    job_task = asyncio.ensure_future(run_job(j, fresh, slow, resume_within=60))
    await asyncio.wait_for(slow.granted.wait(), DEADLINE)
    job_task.cancel()  # LiveKit shuts the job down
    await asyncio.sleep(0)
    slow.gate.set()
    await asyncio.gather(job_task, return_exceptions=True)
    assert job_task.cancelled()

    async def free() -> bool:
        info = await inner.info(rs.key)
        return info is not None and info.owner is None

    await eventually(free, "the key's lease is released", DEADLINE)
    await inner.aclose()


# -- the calls after a conversation ended or went stale -------------------------------


async def _one_call(store: Store, key: str, said: str) -> lr.ResumableSession:
    """One call under ``key`` in a job of its own, ended by the app (a goodbye)."""
    j = Job(key)
    session = make_text_session(ScriptedLLM(default="noted"))
    try:
        # without autosave, whose saves raced the end: a call ended at version 1 or 2
        # as the machine was loaded or not, and the tests below need calls of one length
        rs = await asyncio.wait_for(run_job(j, session, store, autosave=False), 5.0)
        await asyncio.wait_for(session.run(user_input=said), 5.0)
        await asyncio.wait_for(rs.end(), 5.0)
        return rs
    finally:
        await session.aclose()


async def test_a_third_call_after_two_ended_conversations_of_the_same_length_starts_afresh(
    tmp_path: Path,
) -> None:
    """An ended conversation is kept aside under ``<key>~v<version>`` and the next call
    starts afresh. Two ended calls of one length end at one version: the second's
    archive name was the first's, and every later call for the key failed (`LeaseLost`,
    "another writer shares this lease"). Both are kept now, the second under ``~2``."""
    store = lr.open_store(f"sqlite:///{tmp_path}/calls.db")
    key = "caller-+15550100"
    try:
        first = await _one_call(store, key, "my order is 4711")
        second = await _one_call(store, key, "my order is 4712")
        assert first.version == second.version  # same length: same last version
        third = await _one_call(store, key, "my order is 4713")  # LeaseLost on main
        assert not third.resumed
        kept = sorted(k for k in await store.keys() if k.startswith(f"{key}~"))
        assert kept == [f"{key}~v{first.version}", f"{key}~v{first.version}~2"]
    finally:
        await store.aclose()


class _DeleteFailsOnce:
    """A store whose first ``delete`` fails as a store blip (or a job killed there would
    leave it): the archive copy is written, the key not yet removed."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete(self, key: str, **options: Any) -> bool:
        if not self.failed:
            self.failed = True
            raise lr.StoreUnavailable("the store blinked as the stale key was removed (test)")
        return bool(await self.inner.delete(key, **options))


async def test_an_archive_interrupted_before_the_key_was_removed_does_not_block_the_key(
    tmp_path: Path,
) -> None:
    """An archive cut short after its copy was written, before the key was removed (a
    store blip; a job killed in between): its job fails, and every later one did too.
    The next finds its copy, finishes the archive and starts afresh."""
    store = lr.open_store(f"sqlite:///{tmp_path}/calls.db")
    key = "caller-+15550101"
    try:
        first = await _one_call(store, key, "my order is 4711")
        with pytest.raises(lr.StoreUnavailable):  # the blip: this job fails, acceptably
            await _one_call(_DeleteFailsOnce(store), key, "hello?")
        again = await _one_call(store, key, "hello again")  # LeaseLost on main, every time
        assert not again.resumed
        # named by the ended call's last version: 1 or 2, as its autosave ran before the
        # end or not (a loaded machine)
        kept = [k for k in await store.keys() if k.startswith(f"{key}~")]
        assert kept == [f"{key}~v{first.version}"]
    finally:
        await store.aclose()


async def test_an_ended_conversation_under_a_long_valid_key_does_not_block_the_next_call(
    tmp_path: Path,
) -> None:
    """A valid key too long for ``<key>~v<version>``: once its conversation ended every
    later call for the key failed (`ValueError`). Its archive's key is cut to fit
    beside a digest of the whole key."""
    store = lr.open_store(f"sqlite:///{tmp_path}/calls.db")
    key = "k" * (MAX_KEY_BYTES - 2)
    try:
        await _one_call(store, key, "my order is 4711")
        again = await _one_call(store, key, "hello again")  # ValueError on main
        assert not again.resumed
        assert [k for k in await store.keys() if k != key and len(k.encode()) <= MAX_KEY_BYTES]
    finally:
        await store.aclose()


# ------------------------------------------- a failed restore in place wipes the history


async def test_a_restore_in_place_refused_because_a_newer_job_holds_the_key_keeps_the_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's grace ran out in room A (suspended), they came back in room B (a newer
    job holds the key), and a participant joins room A. The restore in place is refused
    (`SessionBusy`, logged: docs/lifecycle.md), and must leave the job's AgentSession as it
    was: docs/lifecycle.md promises "a restore ... failing at any point ... leaves the
    history as it found it", and LiveKit keeps this session as the job's primary one for
    its report and for shutdown callbacks, which read its history."""
    store = lr.open_store(f"sqlite:///{tmp_path}/calls.db")
    j = Job("room-a")
    session = make_text_session(ScriptedLLM(default="noted"))
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    newer = make_text_session(ScriptedLLM(default="noted"))
    rs2: lr.ResumableSession | None = None
    try:
        rs = await asyncio.wait_for(run_job(j, session, store, leave_grace=0.1), 5.0)
        await asyncio.wait_for(session.run(user_input="my order is 4711"), 5.0)
        j.leave()
        await asyncio.wait_for(closed.wait(), 5.0)  # the grace ran out: suspended
        assert rs.state == "suspended"
        said = [i.id for i in session.history.items]
        assert said

        # the caller is back in room B: a newer job holds the key
        rs2 = lr.ResumableSession(store, rs.key, registry=rs._registry, owner="job-b")
        await newer.start(await rs2.restore(newer, default=Clerk))

        # a participant joins room A: the restore in place is refused
        p = remote_participant("caller")
        j.room.remote_participants["PA_caller"] = p
        j.room.emit("participant_connected", p)

        async def refused() -> bool:
            return any("is held by 'job-b'" in r.getMessage() for r in caplog.records)

        await eventually(refused, "the restore in place was refused", 5.0)
        assert rs.state == "suspended"
        assert [i.id for i in session.history.items] == said, (
            "the refused restore in place emptied the job's session history"
        )
    finally:
        if rs2 is not None:
            await rs2.aclose()
        await newer.aclose()
        await session.aclose()
        await store.aclose()


async def test_an_ended_call_under_a_short_session_ttl_does_not_fail_every_later_call(
    request: pytest.FixtureRequest,
) -> None:
    """docs/lifecycle.md: "An ended conversation is never resumed: a later call under the
    key starts a new conversation (`resumable_job` first keeps the ended one aside under
    `<key>~v<version>`)"; docs/multi-worker.md: "with a session `ttl`, `lease_ttl` must be
    at most that long". A deployment with a short session ``ttl`` (10 s here) passes a
    ``lease_ttl`` that fits (3 s), and its calls run. But `archive_stale` takes the key's
    lease for a fixed ``ARCHIVE_LEASE_TTL`` (30 s), which the store refuses
    (``ValueError``: "lease ttl 30.0 s is longer than the store's session ttl"): once a
    conversation ended, every later call for the key fails, for as long as the ended
    conversation is kept (the CLI clamps its own lease to the session ttl:
    ``cli/snapshots.py`` ``_lease_ttl``)."""
    store = await build_redis_store(
        "redis", request, namespace=f"ttl{uuid.uuid4().hex[:10]}", ttl=10
    )
    key = f"caller-{uuid.uuid4().hex[:6]}"
    try:
        for said in ("my order is 4711", "hello again"):
            j = Job(key)
            session = make_text_session(ScriptedLLM(default="noted"))
            try:
                rs = await asyncio.wait_for(run_job(j, session, store, lease_ttl=3), 5.0)
                assert not rs.resumed
                await asyncio.wait_for(session.run(user_input=said), 5.0)
                await asyncio.wait_for(rs.end(), 5.0)
            finally:
                await session.aclose()
    finally:
        await store.aclose()


async def test_a_listing_that_says_ended_over_a_conversation_that_did_not_does_not_end_it(
    tmp_path: Path,
) -> None:
    """A version's listing info (what ``ls`` shows: its state, agent, items) is not
    signed: anyone who can write the store can change it. A conversation the job closed
    as its caller left, its listing rewritten to say "ended": the caller's next call
    must resume it, as its signed snapshot says it did not end. It was kept aside under
    ``<key>~v<version>`` and the caller was greeted as a stranger."""
    path = tmp_path / "calls.db"
    store = lr.open_store(f"sqlite:///{path}")
    key = "caller-7"
    try:
        j = Job(key)
        session = make_text_session(ScriptedLLM(default="noted"))
        rs = await asyncio.wait_for(run_job(j, session, store), 5.0)
        await asyncio.wait_for(session.run(user_input="my order is 4711"), 5.0)
        await asyncio.wait_for(rs.aclose(), 5.0)
        await session.aclose()
        with sqlite3.connect(path) as db:
            (info,) = db.execute(
                "SELECT info FROM versions WHERE key = ? ORDER BY version DESC LIMIT 1", (key,)
            ).fetchone()
            forged = json.dumps({**json.loads(info), "state": "ended"})
            db.execute("UPDATE versions SET info = ? WHERE key = ?", (forged, key))
        listed = await store.info(key)
        assert listed is not None and listed.info["state"] == "ended"

        j2 = Job(key)
        again = make_text_session(ScriptedLLM(default="noted"))
        rs2 = await asyncio.wait_for(run_job(j2, again, store), 5.0)
        try:
            assert rs2.resumed, "a conversation whose listing was rewritten was set aside"
            assert await store.keys() == [key]
        finally:
            await rs2.aclose()
            await again.aclose()
    finally:
        await store.aclose()
