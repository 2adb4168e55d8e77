"""Lifecycle races: interleavings and cancellations of a live ResumableSession.

LiveKit's job shutdown cancels tasks, and an application may bound a save with
``asyncio.wait_for``: a cancellation can land while a commit is on its way to the store.
The store may then have applied it (a Redis command already sent, a SQLite transaction
running on the store's thread) while the caller never learns its version. These tests
hold the session to DESIGN.md: nobody may lose a conversation, and a session whose
call was cancelled must go on saving (or be given up cleanly).

The stores are real (memory, SQLite); a thin wrapper only holds back a reply the store
already gave, which is what a cancellation during a network round trip looks like.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.stores.base import Commit, Lease, Store
from livekit_resume.testing.poll import eventually
from tests.test_hooks import KEY, Receptionist, Visit, registry, start, state_of
from tests.test_session_faults import live_texts, saved, texts

# bounds on a broken store or a hang; not timings
DEADLINE = 20.0


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(
        "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/races.db"
    )
    yield s
    await s.aclose()


class SlowReplies:
    """A store whose answers to ``commit`` (and ``acquire``) reach the caller only once
    ``gate`` opens, while ``hold_*`` is set: the store has applied the call, its reply is
    on the way. A caller cancelled now never learns the outcome."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.hold_commit = False
        self.hold_acquire = False
        self.hold_release = False
        self.hold_reasons = {"manual", "suspend", "pause", "close", "turn", "tool", "handoff"}
        self.applied = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Commit) -> int:
        version = await self.inner.commit(commit)
        if self.hold_commit and commit.info.get("reason") in self.hold_reasons:
            self.applied.set()
            await self.gate.wait()
        return version

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = 30.0,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        lease = await self.inner.acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)
        if self.hold_acquire:
            self.applied.set()
            await self.gate.wait()
        return lease

    async def release(self, lease: Lease) -> None:
        await self.inner.release(lease)
        if self.hold_release:
            self.applied.set()
            await self.gate.wait()


async def cancel_once_applied(slow: SlowReplies, task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` once the store has applied its call, then let replies flow."""
    await asyncio.wait_for(slow.applied.wait(), DEADLINE)
    task.cancel()  # delivered at the task's next step, whatever arrives meanwhile
    slow.hold_commit = slow.hold_acquire = slow.hold_release = False
    slow.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)


async def fresh_restore(
    store: Store, owner: str
) -> tuple[AgentSession[Visit], lr.ResumableSession]:
    session, rs, _ = await start(store, [], owner=owner)
    return session, rs


async def suspended_call(store: Store) -> AgentSession[Visit]:
    """A call of one turn, suspended by its worker: saved, and its lease free."""
    first, rs1, _ = await start(store, ["one"])
    await first.run(user_input="a")
    await rs1.suspend()
    return first


def second_worker(store: Store) -> tuple[AgentSession[Visit], lr.ResumableSession]:
    """Worker ``w2``'s new session and `ResumableSession` for the key, not yet restored
    (`restoring` restores one into the other)."""
    rs = lr.ResumableSession(store, KEY, registry=registry(), userdata_type=Visit, owner="w2")
    return AgentSession(userdata=Visit()), rs


def restoring(session: AgentSession[Visit], rs: lr.ResumableSession) -> asyncio.Future[Any]:
    return asyncio.ensure_future(rs.restore(session, default=lambda: Receptionist(rs)))


async def assert_no_holder(store: Store) -> None:
    info = await store.info(KEY)
    assert info is not None and info.owner is None, f"the cancelled restore holds {info}"


# -- a checkpoint cancelled after its commit reached the store ---------------------------


async def test_a_checkpoint_cancelled_after_its_commit_landed_does_not_stop_later_saves(
    store: Store,
) -> None:
    """`checkpoint` (session.py): a commit whose outcome is unknown "is sent again,
    unchanged, before the next one: it is stored at most once". A cancellation is such an
    outcome (the store applied it, the caller never heard). The next checkpoint must
    store the later turns, not refuse them as if another writer shared the lease."""
    slow = SlowReplies(store)
    session, rs, _ = await start(slow, ["one", "two", "three"])
    await session.run(user_input="a")
    await rs.checkpoint()
    await session.run(user_input="b")
    slow.hold_commit = True
    await cancel_once_applied(slow, asyncio.ensure_future(rs.checkpoint()))

    await session.run(user_input="c")
    version = await rs.checkpoint()  # LeaseLost here: "another writer shares this lease"
    assert version == (await store.load(KEY)).version
    assert texts(await saved(store)) == live_texts(session)
    await rs.aclose()
    await session.aclose()


async def test_autosave_goes_on_after_a_cancelled_checkpoint_landed(store: Store) -> None:
    """DESIGN.md, Hooks: autosave "never raises into" the voice loop, a failing store is
    retried, and only a takeover by another worker stops it (`on_lost`: "the place to
    stop speaking and end the session"). Nobody took this session over: a checkpoint
    the application cancelled must not make autosave give the session up."""
    slow = SlowReplies(store)
    lost: list[lr.LeaseLost] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    session, rs, _ = await start(slow, ["one", "two", "three"], on_lost=on_lost)
    await session.run(user_input="a")
    await rs.checkpoint()
    slow.hold_commit = True
    await session.run(user_input="b")
    await cancel_once_applied(slow, asyncio.ensure_future(rs.checkpoint()))
    rs._autosave.start()  # autosave from here on (started by restore when enabled)
    await session.run(user_input="c")
    await asyncio.wait_for(rs._autosave.idle.wait(), DEADLINE)
    assert rs._autosave.lost is None and not lost, "autosave gave a live session up"
    assert texts(await saved(store)) == live_texts(session)
    await rs.aclose()
    await session.aclose()


async def test_close_after_a_cancelled_suspend_still_saves_every_turn(store: Store) -> None:
    """`suspend`: if the final snapshot cannot be stored "nothing is given up ... `aclose`
    still makes the final save". A suspend cancelled by the job's shutdown after its
    commit reached the store leaves the session paused with its lease; turns heard since
    (a text turn still arrives) and the close's final save must reach the store, and a
    later restore must find every one of them."""
    slow = SlowReplies(store)
    session, rs, _ = await start(slow, ["one", "two"])
    await session.run(user_input="a")
    slow.hold_commit = True
    await cancel_once_applied(slow, asyncio.ensure_future(rs.suspend()))
    assert state_of(rs) == "paused"
    await session.run(user_input="a last word")  # a text turn while paused: kept, unanswered
    await rs.aclose()
    assert texts(await saved(store)) == live_texts(session)
    await session.aclose()
    s2, rs2 = await fresh_restore(store, "w2")
    assert live_texts(s2)[: len(live_texts(session))] == live_texts(session)
    await rs2.aclose()
    await s2.aclose()


async def test_a_suspend_cancelled_after_its_final_save_still_closes_the_session(
    store: Store,
) -> None:
    """`suspend`: "final snapshot, lease released, session closed"; once the final save
    is written "the session is closed after it whatever happens meanwhile". A suspend
    cancelled after that save (the job shut down while it released the lease) must not
    leave the session half-suspended: its state says ``suspended`` (the store's too), so
    it is closed and holds nothing, and nothing waits on a close that never comes (a
    policy's restore in place waits for it)."""
    from tests.test_job import closing

    slow = SlowReplies(store)
    session, rs, _ = await start(slow, ["one", "two"])
    closed = closing(session)
    await session.run(user_input="a")
    slow.hold_release = True
    await cancel_once_applied(slow, asyncio.ensure_future(rs.suspend()))
    assert state_of(rs) == "suspended"
    try:
        await asyncio.wait_for(closed.wait(), 5.0)
    except TimeoutError:
        pytest.fail("the session says suspended but was never closed")
    assert rs._lease is None
    info = await store.info(KEY)
    assert info is not None and info.owner is None and info.info["state"] == "suspended"
    await rs.aclose()
    await session.aclose()


# -- a restore cancelled while it takes the lease ----------------------------------------


async def test_a_restore_cancelled_while_taking_the_lease_leaves_no_lease_behind(
    store: Store,
) -> None:
    """`restore`: "the lease is released on failure"; `SessionBusy` means "another live
    worker holds the session". A job cancelled during its restore (the caller hung up at
    once, the worker shut down) holds nothing afterwards; the store must not go on naming
    it the holder, or the caller's next job is refused until the lease expires (30 s)."""
    first = await suspended_call(store)
    slow = SlowReplies(store)
    slow.hold_acquire = True
    await cancel_once_applied(slow, restoring(*second_worker(slow)))

    async def released() -> bool:
        info = await store.info(KEY)
        return info is not None and info.owner is None

    await eventually(released, "the cancelled restore's lease is released", 5.0)
    s3, rs3 = await fresh_restore(store, "w3")  # SessionBusy: held by 'w2'
    assert rs3.resumed and live_texts(s3)[: len(live_texts(first))] == live_texts(first)
    await rs3.aclose()
    await s3.aclose()


async def test_a_restore_cancelled_twice_while_taking_the_lease_leaves_no_lease_behind(
    store: Store,
) -> None:
    """`restore`: "the lease is released on failure". A restore cancelled while the
    store grants its lease waits for that grant and gives it back; a second
    cancellation during that wait (a job's shutdown cancelling again, a task group
    tearing down) must not abandon the grant: the store would name a holder that does
    not exist, and refuse the caller's next job until the lease expires."""
    await suspended_call(store)
    slow = SlowReplies(store)
    slow.hold_acquire = True
    restore = restoring(*second_worker(slow))
    await asyncio.wait_for(slow.applied.wait(), DEADLINE)  # granted, the reply on its way
    restore.cancel()
    for _ in range(3):  # the restore takes the cancellation and waits for the grant
        await asyncio.sleep(0)
    assert not restore.done()
    restore.cancel()
    slow.hold_acquire = False
    slow.gate.set()
    await asyncio.wait({restore}, timeout=DEADLINE)
    assert restore.cancelled()
    await assert_no_holder(store)
    s3, rs3 = await fresh_restore(store, "w3")  # SessionBusy: held by 'w2'
    assert rs3.resumed
    await rs3.aclose()
    await s3.aclose()


class SlowAnnounce(SlowReplies):
    """A store with an event channel (`EventPublisher`) whose answer to ``publish``
    comes once ``gate`` opens: the last round trip of a restore."""

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        self.applied.set()
        await self.gate.wait()


async def test_a_restore_cancelled_while_it_announces_leaves_no_lease_behind(
    store: Store,
) -> None:
    """`restore`: "the lease is released on failure"; a job cancelled during its restore
    holds nothing afterwards. Cancelled in its last step (telling the room and the other
    workers), after it took the lease: the cancelled caller never got a session to close,
    so nothing may keep the lease, renew it and write under it, and the caller's next
    job must not be refused for it."""
    await suspended_call(store)
    slow = SlowAnnounce(store)
    session, rs = second_worker(slow)
    await cancel_once_applied(slow, restoring(session, rs))
    await assert_no_holder(store)
    assert rs._autosave.idle.is_set() and not rs._autosave._tasks, "autosave runs on"
    s3, rs3 = await fresh_restore(store, "w3")  # SessionBusy: held by 'w2'
    assert rs3.resumed
    await rs3.aclose()
    await s3.aclose()


# -- resume while a suspend is under way -------------------------------------------------


async def test_a_resume_that_returned_during_a_suspend_is_not_undone_by_it(store: Store) -> None:
    """`resume`: "Undo `pause`: audio back on and replies allowed, in the same process".
    A resume that returns without error while a suspend is saving (the caller came back
    as the grace ran out: `JobPolicy` resumes a session it sees ``paused``) must leave
    the session active; the suspend under way must not then close it behind the
    caller's back, or the caller who came back talks to a closed session."""
    slow = SlowReplies(store)
    session, rs, _ = await start(slow, ["one", "two"])
    await session.run(user_input="a")
    await rs.pause()
    slow.hold_commit = True
    await session.run(user_input="b")  # heard while paused: the suspend has news to save
    suspending = asyncio.ensure_future(rs.suspend())
    await asyncio.wait_for(slow.applied.wait(), DEADLINE)
    try:
        await rs.resume()
        resumed = True
    except RuntimeError:
        resumed = False  # refused: a suspend is under way (also keeps the promise)
    slow.hold_commit = False
    slow.gate.set()
    await asyncio.wait_for(asyncio.gather(suspending, return_exceptions=True), DEADLINE)
    if resumed:
        assert state_of(rs) == "active", "resume() returned, then the session was suspended"
        assert rs._lease is not None
    await rs.aclose()
    await session.aclose()


# -- restore called twice at once --------------------------------------------------------


async def test_two_restores_at_once_put_each_saved_item_in_the_history_exactly_once(
    store: Store,
) -> None:
    """DESIGN.md, Snapshot: "the restored `session.history` begins with the saved items,
    each exactly once". `restore` refuses a second call on a restored session
    (``RuntimeError``: "was already restored"); two calls at once (a retry racing the
    first, two room events) must not both fill the same history."""
    first = await suspended_call(store)
    saved_ids = [i.id for i in first.history.items]
    session, rs = second_worker(store)
    results = await asyncio.gather(
        restoring(session, rs), restoring(session, rs), return_exceptions=True
    )
    restored = [i.id for i in session.history.items]
    assert restored == saved_ids, "saved items restored more than once"
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    await rs.aclose()


# -- a caller back while the leave grace's suspend is saving -----------------------------


async def test_a_caller_back_while_the_grace_suspend_is_saving_gets_the_conversation_back(
    store: Store,
) -> None:
    """`resumable_job` (job.py): "a participant back within the grace finds it resumed in
    place", and "once the session is suspended in this job ..., a participant joining
    the room restores it in place". A caller who joins while the grace's suspend is
    writing its final snapshot is one or the other: the session must end up active, not
    closed with the caller in the room and nothing to restore it."""
    from livekit_resume.agent_hooks.job import JobPolicy
    from livekit_resume.testing.poll import eventually
    from tests.test_job import RoomStandIn, closing

    slow = SlowReplies(store)
    slow.hold_reasons = {"suspend"}
    slow.hold_commit = True
    room = RoomStandIn()
    session, rs, _ = await start(slow, ["one", "two"], room=room)
    closed = closing(session)

    async def rejoin() -> None:  # what resumable_job passes
        await closed.wait()
        closed.clear()
        session.history.items.clear()
        agent = await rs.restore(session, default=lambda: Receptionist(rs), takeover=True)
        await session.start(agent)

    policy = JobPolicy(rs, room, leave_grace=0.2, rejoin=rejoin)  # type: ignore[arg-type]
    policy.start()
    await session.run(user_input="a")
    room.leave("caller")
    await asyncio.wait_for(slow.applied.wait(), DEADLINE)  # the grace ran out: suspending
    room.join("caller")
    slow.hold_commit = False
    slow.gate.set()

    async def active() -> bool:
        return rs.state == "active" and rs._lease is not None

    await eventually(active, "the caller who came back has the session active", 10.0)
    policy.stop()
    await rs.aclose()
    await session.aclose()


# -- a caller cancelled while autosave stops ---------------------------------------------


async def test_a_caller_cancelled_while_autosave_stops_is_cancelled() -> None:
    """`Autosave.aclose` cancels its loops and waits for them. A caller cancelled during
    that wait (a job shut down while a suspend or close detaches) must end cancelled: a
    cancellation eaten there lets a shut-down job carry on releasing, announcing and
    closing as if nobody had asked it to stop."""
    from livekit_resume.agent_hooks.autosave import Autosave

    entered, stopping, replied = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def checkpoint(_reason: str) -> int:
        entered.set()
        try:
            await asyncio.Event().wait()  # a commit on its way to the store
        except asyncio.CancelledError:
            stopping.set()
            await replied.wait()  # its reply arrives before the save loop ends
            raise
        return 1

    async def renew() -> None:
        pass

    autosave = Autosave(
        checkpoint, renew, key=KEY, debounce=0.0, renew_every=DEADLINE, renewed_at=lambda: 0.0
    )
    autosave.start()
    autosave.trigger("turn")
    await asyncio.wait_for(entered.wait(), DEADLINE)
    closer = asyncio.ensure_future(autosave.aclose())
    await asyncio.wait_for(stopping.wait(), DEADLINE)  # aclose cancelled the save, awaits it
    closer.cancel()
    replied.set()
    await asyncio.wait({closer}, timeout=DEADLINE)
    assert closer.done()
    assert closer.cancelled(), "aclose() returned: its caller's own cancellation was eaten"


# -- a pause cancelled while it cuts speech ----------------------------------------------


async def test_a_pause_cancelled_while_it_cuts_speech_ends_cancelled(store: Store) -> None:
    """A caller cancelled (a job shutting down, an ``asyncio.wait_for`` around the call)
    must end cancelled. `pause` waits for LiveKit to have cut the speech; with nothing
    speaking that wait is already over when the cancellation lands, which is the race
    where Python 3.11's ``asyncio.wait_for`` returns the result and eats the
    cancellation: the pause then carries on as if nobody had asked it to stop."""
    session, rs, _ = await start(store, ["one"])
    await session.run(user_input="a")
    pausing = asyncio.ensure_future(rs.pause())
    await asyncio.sleep(0)  # the pause runs to its first wait: the speech cut
    assert not session.input.audio_enabled, "the pause is not cutting speech yet"
    pausing.cancel()
    await asyncio.wait({pausing}, timeout=DEADLINE)
    assert pausing.done()
    assert pausing.cancelled(), "pause() returned: its caller's cancellation was eaten"
    await rs.aclose()
    await session.aclose()


async def test_a_pause_cancelled_while_it_cuts_speech_leaves_state_and_audio_agreeing(
    store: Store,
) -> None:
    """`pause`: "audio in and out off, speech cut, no replies"; `resume` undoes it. A
    pause cancelled while the reply being spoken is cut must leave the session either
    paused (and silent) or active (hearing and answering), never deaf while it says
    ``active``: `resume` refuses an active session, so nothing could give it its
    audio back, and a later pause or resume must work."""
    session, rs, model = await start(store, ["one", "two"])
    await session.run(user_input="a")
    model.first_chunk_delay = DEADLINE  # the next reply is on its way while the pause cuts it
    replying: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="b"))

    async def speaking() -> bool:
        return session.current_speech is not None

    await eventually(speaking, "a reply is being spoken", DEADLINE)
    pausing = asyncio.ensure_future(rs.pause())
    await asyncio.sleep(0)  # the pause runs to its first wait: the speech cut
    assert not session.input.audio_enabled, "the pause is not cutting speech yet"
    pausing.cancel()
    await asyncio.wait({pausing}, timeout=DEADLINE)
    assert pausing.cancelled()
    await asyncio.wait({replying}, timeout=DEADLINE)
    if state_of(rs) == "active":
        assert session.input.audio_enabled and session.output.audio_enabled, (
            "the session says active with its audio off"
        )
        assert "llm_node" not in vars(session.current_agent), "replies stay silenced"
        await rs.pause()
    assert state_of(rs) == "paused" and not session.input.audio_enabled
    await rs.resume()
    assert state_of(rs) == "active" and session.input.audio_enabled
    assert session.output.audio_enabled
    await rs.aclose()
    await session.aclose()


class BlinkOnce(SlowReplies):
    """A store that fails its next commit once ``blink`` is set (`StoreUnavailable`,
    before it reaches the store), as a store does while it fails over."""

    blink = False

    async def commit(self, commit: Commit) -> int:
        if self.blink:
            self.blink = False
            raise lr.StoreUnavailable("the store did not answer in time")
        return await super().commit(commit)


async def test_a_pause_whose_save_failed_still_suspends_after_suspend_after(
    store: Store,
) -> None:
    """``suspend_after``: "a pause longer than this many seconds becomes a suspend". A
    pause whose save failed (a store blip: raised, and sent again before the next save)
    has silenced the session all the same and says ``paused``: left alone, it must
    still become a suspend, not stay paused with its lease and connections for good."""
    from tests.test_job import closing

    blinking = BlinkOnce(store)
    session, rs, _ = await start(blinking, ["one"], suspend_after=0.2)
    closed = closing(session)
    await session.run(user_input="a")
    blinking.blink = True
    with pytest.raises(lr.StoreUnavailable):
        await rs.pause()
    assert state_of(rs) == "paused"
    try:
        await asyncio.wait_for(closed.wait(), 5.0)
    except TimeoutError:
        pytest.fail(f"paused past suspend_after and still {rs.state}")
    assert state_of(rs) == "suspended" and rs._lease is None
    assert texts(await saved(store)) == live_texts(session)
    await rs.aclose()
    await session.aclose()


class HeldSends(SlowReplies):
    """A store whose ``load`` and ``release`` go out only once their gate opens (a
    network round trip not yet sent: a caller cancelled now has the call not applied)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.loading, self.load_gate = asyncio.Event(), asyncio.Event()
        self.releasing, self.release_gate = asyncio.Event(), asyncio.Event()

    async def load(self, key: str, version: int | None = None) -> Any:
        self.loading.set()
        await self.load_gate.wait()
        return await self.inner.load(key, version)

    async def release(self, lease: Lease) -> None:
        self.releasing.set()
        await self.release_gate.wait()
        await self.inner.release(lease)


async def test_a_restore_cancelled_again_while_it_gives_its_lease_back_leaves_no_lease_behind(
    store: Store,
) -> None:
    """`restore`: "the lease is released on failure". A restore cancelled while it reads
    the snapshot gives its lease back; a second cancellation while that release is on its
    way (a job's shutdown cancelling again) must not stop it half-way: the store would
    name a holder that does not exist and refuse the caller's next job until the lease
    expires."""
    await suspended_call(store)
    held = HeldSends(store)
    restore = restoring(*second_worker(held))
    await asyncio.wait_for(held.loading.wait(), DEADLINE)  # the lease is taken
    restore.cancel()
    await asyncio.wait_for(held.releasing.wait(), DEADLINE)  # it gives the lease back
    restore.cancel()
    held.release_gate.set()
    await asyncio.wait({restore}, timeout=DEADLINE)
    assert restore.cancelled()
    await assert_no_holder(store)


async def test_a_restore_failing_after_it_filled_the_history_leaves_it_as_it_was(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ResumableSession.restore`: "the lease is released on failure", and a retry into
    the same `AgentSession` must give the saved items "each exactly once" (DESIGN.md).
    A restore that fails (or is cancelled) once it put the saved items in the history,
    here in the agent's context update, takes them out again."""
    first = await suspended_call(store)
    saved_ids = [i.id for i in first.history.items]

    async def refused(self: Receptionist, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the agent's context could not be updated")

    monkeypatch.setattr(Receptionist, "update_chat_ctx", refused)
    session, rs = second_worker(store)
    with pytest.raises(RuntimeError, match="could not be updated"):
        await restoring(session, rs)
    assert session.history.items == []
    await assert_no_holder(store)  # the lease went back too
    monkeypatch.undo()
    await restoring(session, rs)
    assert [i.id for i in session.history.items] == saved_ids
    await rs.aclose()
