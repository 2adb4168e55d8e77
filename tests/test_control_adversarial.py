"""An adversarial pass over remote control (issue 16): hostile rows in SQLite's
``commands`` table, a burst of commands evicting what a memory store remembers of a
withdrawal, epochs that are no whole number, a sender cancelled at every step.

The guarantees under test are docs/control.md's: a command is applied once or never;
withdrawn at its sender's timeout or cancellation, and never applied after; a bad
argument is a `ValueError`, a command not applied a `CommandRefused`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.stores.base import Command, CommandReply, Controllable, Lease, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.memory_control import KEEP_ANSWERS
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis import control as redis_control
from livekit_resume.stores.sqlite import SQLiteStore
from livekit_resume.stores.sqlite.control import KEEP_SECONDS
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_control import KEY, live, state
from tests.test_job_policy_adversarial import (
    GRACE,
    GatedCommits,
    Job,
    _sigterm_kept,
    run_job,
    state_is,
)
from tests.test_redis import rstore

__all__ = ["_sigterm_kept", "rstore"]  # the fixtures, shared with their modules


def _insert(path: Path, ns: str, **row: object) -> None:
    """Write one row into the file's ``commands`` table, as anyone with the file can."""
    values: dict[str, object] = {
        "ns": ns,
        "key": KEY,
        "id": uuid.uuid4().hex,
        "verb": "pause",
        "epoch": 1,
        "sent_at": time.time(),
    }
    values.update(row)
    con = sqlite3.connect(path)
    try:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        con.execute(f"INSERT INTO commands ({columns}) VALUES ({marks})", tuple(values.values()))
        con.commit()
    finally:
        con.close()


def _rows(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT COUNT(*) FROM commands").fetchone()[0])
    finally:
        con.close()


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param({"epoch": "not a number"}, id="epoch-text"),
        pytest.param({"epoch": 1e999}, id="epoch-inf"),
        pytest.param({"epoch": 2.5}, id="epoch-fraction"),
        pytest.param({"epoch": b"\x00\x01"}, id="epoch-blob"),
    ],
)
async def test_a_hostile_sqlite_row_is_skipped_and_the_owner_still_answers(
    tmp_path: Path, sessions: list[AgentSession[Any]], hostile: dict[str, object]
) -> None:
    """A row that is no command of ours (Redis: a message that does not parse) is
    skipped. Before, it raised out of the owner's poll: its inbox failed, listened
    again a second later from the newest row, and the good command sent right after
    the hostile one was never seen; its sender was told the owner did not answer."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        rs = await live(store, sessions)
        _insert(path, store._ns, **hostile)
        assert await lr.control(store).pause(KEY, timeout=2) == rs.version
        assert state(rs) == "paused"
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"status": "done", "version": "zz"}, id="version-text"),
        pytest.param({"status": "done", "version": 1e999}, id="version-inf"),
        pytest.param({"status": "bogus"}, id="status-unknown"),
        pytest.param({"status": "done", "reason": b"\xff"}, id="reason-blob"),
    ],
)
async def test_an_unreadable_sqlite_answer_reads_as_a_refusal(
    tmp_path: Path, answer: dict[str, object]
) -> None:
    """As on Redis, an answer that does not parse is a refusal: before, a version that
    is no number raised a bare ValueError out of ``remote.pause``, and an unknown
    status kept the sender waiting twice its timeout."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        channel = store.commands()
        command = Command(uuid.uuid4().hex, KEY, "pause", 1)
        await channel.send(command)
        con = sqlite3.connect(path)
        sets = ", ".join(f"{column}=?" for column in answer)
        con.execute(f"UPDATE commands SET {sets} WHERE id=?", (*answer.values(), command.id))
        con.commit()
        con.close()
        reply = await channel.reply(command)
        assert reply.status == "refused" and "unreadable answer" in reply.reason
    finally:
        await store.aclose()


async def test_rows_stamped_far_ahead_of_the_clock_are_removed(tmp_path: Path) -> None:
    """Rows are kept `KEEP_SECONDS` after they were sent. A row stamped ahead of the
    clock (a wall clock stepped back since it was written, or a stamp that is no time
    at all) was kept until the clock caught up with it: for ever, for a stamp of text."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    try:
        channel = store.commands()
        await channel.send(Command(uuid.uuid4().hex, KEY, "pause", 1))
        ns = store._ns
        _insert(path, ns, sent_at=time.time() + 10 * KEEP_SECONDS)  # clock stepped back
        _insert(path, ns, sent_at="tomorrow")
        _insert(path, ns, sent_at=1e999)
        _insert(path, ns, sent_at=time.time() - 2 * KEEP_SECONDS)  # long expired
        assert _rows(path) == 5
        await channel.send(Command(uuid.uuid4().hex, KEY, "pause", 1))
        assert _rows(path) == 2  # the two sent just now
    finally:
        await store.aclose()


async def test_a_withdrawn_command_stays_withdrawn_after_a_burst_of_commands() -> None:
    """A memory store remembers answers up to `KEEP_ANSWERS`, dropping the oldest. A
    command withdrawn by its sender (told "did not answer") but still waiting in a
    busy owner's line lost its withdrawal to a burst of other commands, and the owner
    then claimed it and applied it."""
    store = MemoryStore()
    channel = store.commands()
    async with channel.inbox(KEY) as inbox:
        late = Command(uuid.uuid4().hex, KEY, "pause", 1)
        assert await channel.send(late) == 1
        assert await channel.withdraw(late)  # the sender gave up, and was told so
        for _ in range(KEEP_ANSWERS + 8):  # other sessions' commands, answered
            other = Command(uuid.uuid4().hex, "other", "resume", 1)
            await channel.send(other)
            await channel.withdraw(other)
        assert await asyncio.wait_for(anext(inbox), 1) == late  # the owner gets to it now
        assert not await channel.claim(late)


async def test_the_commands_a_memory_store_keeps_open_are_bounded() -> None:
    """The bound that comes with the fix above (not a defect before it: nothing was
    kept per open command then): a command neither claimed nor withdrawn (its sender
    died first) stays open among the last `KEEP_ANSWERS`; pushed out, it can no longer
    be claimed, so it is never applied rather than remembered for ever."""
    store = MemoryStore()
    channel = store.commands()
    async with channel.inbox(KEY):
        lost = Command(uuid.uuid4().hex, KEY, "pause", 1)
        await channel.send(lost)
        for _ in range(KEEP_ANSWERS + 8):
            await channel.send(Command(uuid.uuid4().hex, KEY, "resume", 1))
        assert not await channel.claim(lost)
        assert len(channel._open) == KEEP_ANSWERS


@pytest.mark.parametrize("epoch", ["1", 1.5, True, b"1", float("nan")])
async def test_an_epoch_that_is_no_whole_number_is_a_value_error(store: Store, epoch: Any) -> None:
    """Bad arguments are `ValueError`s (test_control's `timeout`, a key). An epoch of
    text reached the comparison with the session's and raised a bare TypeError; a
    fraction or NaN was refused as "no such epoch yet", True aimed at epoch 1."""
    await store.acquire(KEY, "w1")
    with pytest.raises(ValueError, match="epoch"):
        await lr.control(store).pause(KEY, epoch=epoch, timeout=1)


async def _cancel_after(
    rs: lr.ResumableSession, store: Store, turns: int, outcomes: set[str]
) -> None:
    """Send a pause and cancel it after ``turns`` turns of the loop, then check what
    became of it."""
    assert isinstance(store, Controllable)
    channel = store.commands()
    sent: list[Command] = []
    original = channel.send

    async def spy(command: Command) -> int | None:
        sent.append(command)
        return await original(command)

    channel.send = spy  # type: ignore[method-assign]
    try:
        task = asyncio.ensure_future(lr.control(store).pause(KEY, timeout=5))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
            outcomes.add("answered")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
    finally:
        del channel.send
    if not sent:
        assert state(rs) == "active"
        return
    command = sent[0]

    async def settled() -> bool:
        return (await channel.reply(command)).status != "claimed"

    await eventually(settled, "the owner finished the command it took")
    reply = await channel.reply(command)
    # pending, or on SQLite refused as a command the store does not hold: the send
    # never landed (cancelled before its transaction ran); nothing is left to take
    never_landed = reply.status == "pending" or (
        reply.status == "refused" and "no longer holds the command" in reply.reason
    )
    assert reply.status in ("withdrawn", "done") or never_landed, reply
    assert not await channel.withdraw(command) and not await channel.claim(command)
    assert (state(rs) == "paused") == (reply.status == "done")


async def test_a_sender_cancelled_at_any_step_leaves_its_command_applied_once_or_never(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Cancel ``remote.pause`` after 0, 4, 8… turns of the loop, through every await of
    its path: afterwards the command is withdrawn and the session untouched, or the
    owner took it (before the withdrawal) and the session paused once."""
    rs = await live(store, sessions)
    outcomes: set[str] = set()
    for turns in range(0, 40, 4):
        await _cancel_after(rs, store, turns, outcomes)
        if state(rs) == "paused":
            await rs.resume()
    assert "cancelled" in outcomes


async def test_a_sender_whose_store_fails_while_it_waits_withdraws_its_command(
    store: Store,
) -> None:
    """A sender that gives up before an answer withdraws its command: not only when
    cancelled, also when the store fails it while it waits (a Redis connection lost
    while reading the answer). Before, the command stayed pending: a busy owner that
    got to it later applied it, behind the back of a sender told the call failed (and
    perhaps after the resume that sender sent next)."""
    await store.acquire(KEY, "w-busy", ttl=60)
    assert isinstance(store, Controllable)
    channel = store.commands()
    async with channel.inbox(KEY) as inbox:
        original = channel.reply

        async def failing(command: Command) -> CommandReply:
            raise lr.StoreUnavailable("connection lost while reading the answer")

        channel.reply = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(lr.StoreUnavailable):
                await lr.control(store).pause(KEY, timeout=5)
        finally:
            del channel.reply
        command = await asyncio.wait_for(anext(inbox), 5)  # the busy owner gets to it
        assert not await channel.claim(command)
        assert (await original(command)).status == "withdrawn"


async def test_a_command_withdrawn_long_ago_is_skipped_by_an_owner_that_wakes_up_later(
    rstore: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/control.md: a frozen worker that wakes up later skips a command withdrawn at
    its sender's timeout. On Redis the withdrawal is a key that expires (`ANSWER_TTL`,
    here shortened to a second): an owner frozen for longer (a stopped container, a
    suspended VM) read the command from its subscription when it woke, found no mark
    left, claimed it and applied it. A claim now also needs the command's own mark,
    set when it was sent and gone once it expired or was withdrawn."""
    monkeypatch.setattr(redis_control, "ANSWER_TTL", 1)
    channel = rstore.commands()
    async with channel.inbox(KEY) as inbox:
        command = Command(uuid.uuid4().hex, KEY, "pause", 1)
        assert await channel.send(command) == 1
        assert await channel.withdraw(command)  # the sender's timeout
        await asyncio.sleep(1.3)  # the owner is frozen past the state's expiry
        assert await asyncio.wait_for(anext(inbox), 5) == command  # it wakes up
        assert not await channel.claim(command)


async def test_a_command_from_a_sender_that_sets_no_mark_is_still_claimed(
    rstore: RedisStore,
) -> None:
    """A rolling upgrade: a sender of an earlier version publishes a command without a
    mark (and without ``"open": 1``). An owner of this version claims it as before, by
    its state alone, rather than leave it for the sender's timeout."""
    channel = rstore.commands()
    async with channel.inbox(KEY) as inbox:
        command = Command(uuid.uuid4().hex, KEY, "pause", 1)
        old_payload = json.dumps({"id": command.id, "verb": "pause", "epoch": 1})
        name = rstore._names.control(KEY)
        await channel._scripts.call("publish", f"{name}:{command.id}", [name, old_payload])
        assert await asyncio.wait_for(anext(inbox), 5) == command
        assert await channel.claim(command)
        assert not await channel.withdraw(command)  # claimed: too late to withdraw


# -- a command heard while something else is half done ---------------------------------


class RenewFailsOnce:
    """The owner's lease check (a renewal) fails once with `StoreUnavailable` (a blip)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(self, lease: Lease, *, ttl: float = 30.0) -> Lease:
        if self.fail > 0:
            self.fail -= 1
            raise lr.StoreUnavailable("connection reset while renewing (test)")
        return await self.inner.renew(lease, ttl=ttl)


async def test_a_remote_pause_during_a_local_suspend_is_not_answered_done(
    sessions: list[AgentSession[Any]],
) -> None:
    """A remote pause is the owner's ``rs.pause()``, which a suspend under way refuses.
    The suspend says "paused" while it writes its final save, and the listener's
    already-paused shortcut answered ``done``, at an old version, for a session being
    suspended and closed."""
    store = MemoryStore()
    gated = GatedCommits(store)
    rs = await live(gated, sessions)
    suspending: asyncio.Future[int] | None = None
    try:
        gated.hold = True
        suspending = asyncio.ensure_future(rs.suspend())
        await asyncio.wait_for(gated.held.wait(), 10.0)
        assert rs._finishing is not None
        outcome: Any
        try:
            outcome = await asyncio.wait_for(lr.control(store).pause(KEY, timeout=2.0), 10.0)
        except lr.CommandRefused as e:
            outcome = e
        gated.gate.set()
        suspended_at = await asyncio.wait_for(suspending, 10.0)
        assert rs.state == "suspended"
        assert isinstance(outcome, lr.CommandRefused), (
            f"remote pause answered done (version {outcome}) while the session was being "
            f"suspended; it ended suspended at version {suspended_at}"
        )
    finally:
        gated.gate.set()
        if suspending is not None:
            await asyncio.gather(suspending, return_exceptions=True)
        await rs.aclose()


async def test_a_lease_check_that_fails_once_is_answered_at_once_not_as_may_still_apply(
    sessions: list[AgentSession[Any]],
) -> None:
    """The owner claimed the command, then its lease check failed (a store blip): the
    command went unanswered, and after twice its timeout the sender was told the owner
    "may still apply it", which it never would. Refused at once, as control.md says of
    any failure of the owner's own call."""
    store = MemoryStore()
    flaky = RenewFailsOnce(store)
    rs = await live(flaky, sessions)
    try:
        flaky.fail = 1
        started = time.monotonic()
        with pytest.raises(lr.CommandRefused) as e:
            await asyncio.wait_for(lr.control(store).pause(KEY, timeout=1.0), 10.0)
        took = time.monotonic() - started
        assert rs.state == "active"  # nothing was applied
        assert "may still apply" not in str(e.value), (
            f"after {took:.1f}s: {e.value} (the owner had given the command up)"
        )
    finally:
        await rs.aclose()


class CommitsFail:
    """The owner's commits fail with `StoreUnavailable` while ``down`` is set."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        if self.down:
            raise lr.StoreUnavailable("connection reset while committing (test)")
        return await self.inner.commit(commit)


async def _resumed_once_the_store_is_back(flaky: CommitsFail, rs: lr.ResumableSession) -> None:
    """The store back, a remote resume lifts what the failed command left paused."""
    flaky.down = False
    await asyncio.wait_for(lr.control(flaky.inner).resume(KEY, timeout=2.0), 10.0)
    assert state(rs) == "active"


async def test_a_remote_pause_whose_save_fails_is_answered_done_and_says_so(
    sessions: list[AgentSession[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """A pause whose save fails is a pause all the same: the caller hears nothing. The
    operator was told "pause failed: ...", a refusal (`CommandRefused`: "not applied")
    for a session whose audio it had just turned off. Done, with a warning that the
    state is not saved yet."""
    store = MemoryStore()
    flaky = CommitsFail(store)
    rs = await live(flaky, sessions)
    try:
        flaky.down = True
        with caplog.at_level(logging.WARNING, logger="livekit_resume"):
            await asyncio.wait_for(lr.control(store).pause(KEY, timeout=2.0), 10.0)
        assert state(rs) == "paused"
        assert any(
            "not saved" in r.getMessage() and "connection reset" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        await _resumed_once_the_store_is_back(flaky, rs)
    finally:
        flaky.down = False
        await rs.aclose()


async def test_a_remote_suspend_whose_save_fails_says_the_session_is_left_paused(
    sessions: list[AgentSession[Any]],
) -> None:
    """A suspend whose final save fails leaves the session paused, held by its worker
    (`ResumableSession.suspend`). The operator read "suspend failed: ...", as if nothing
    had been done to a call whose audio was now off."""
    store = MemoryStore()
    flaky = CommitsFail(store)
    rs = await live(flaky, sessions)
    try:
        flaky.down = True
        with pytest.raises(lr.CommandRefused) as e:
            await asyncio.wait_for(lr.control(store).suspend(KEY, timeout=2.0), 10.0)
        assert state(rs) == "paused"
        assert "paused" in e.value.reason, f"the session is paused, the operator read: {e.value}"
        await _resumed_once_the_store_is_back(flaky, rs)
    finally:
        flaky.down = False
        await rs.aclose()


async def test_a_caller_who_leaves_a_call_paused_from_afar_is_suspended_after_the_grace(
    _sigterm_kept: None,
) -> None:
    """A call on hold (paused from afar) whose caller hangs up is suspended once the
    grace runs out, as any call nobody comes back to. The policy armed the grace only
    in a pause of its own: the job held the lease and every connection for good
    (the policy turns LiveKit's close_on_disconnect off)."""
    store = MemoryStore()
    j = Job(KEY)
    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await run_job(j, session, store, leave_grace=GRACE)
    try:
        await asyncio.wait_for(rs._control.listening.wait(), 10.0)
        await asyncio.wait_for(lr.control(store).pause(KEY, timeout=2.0), 10.0)
        assert rs.state == "paused"
        j.leave()  # the caller on hold hangs up; nobody comes back

        async def released() -> bool:
            info = await store.info(KEY)
            return state(rs) == "suspended" and info is not None and info.owner is None

        await eventually(released, "the grace ran out: suspended, its lease released", 10 * GRACE)
    finally:
        await rs.aclose()
        await session.aclose()


async def test_a_hold_sent_while_the_caller_is_away_outlasts_the_callers_return(
    _sigterm_kept: None,
) -> None:
    """The caller hangs up, so the policy pauses the call for its grace; an operator then
    puts it on hold (a remote pause, answered done: it is paused). The caller comes back:
    the policy's own pause is lifted, the operator's hold is not. It was: the policy
    resumed any pause it had made, whoever asked for one since."""
    store = MemoryStore()
    j = Job(KEY)
    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await run_job(j, session, store, leave_grace=30.0)
    try:
        await asyncio.wait_for(rs._control.listening.wait(), 10.0)
        j.leave()
        await state_is(rs, "paused")
        await asyncio.wait_for(lr.control(store).pause(KEY, timeout=2.0), 10.0)  # done
        j.join()
        await asyncio.sleep(0.3)  # the policy's steps on the join have run by now
        assert rs.state == "paused", "the caller's return lifted the operator's hold"
        await asyncio.wait_for(lr.control(store).resume(KEY, timeout=2.0), 10.0)
        assert state(rs) == "active"
    finally:
        await rs.aclose()
        await session.aclose()
