"""Hunt (review of this round's fixes, rev6): an ended conversation kept aside by the
restore that finds it (`ResumableSession._load_into`, agent_hooks/archive.py
`kept_aside`), a failed ``end()`` remembered (`_end_unsaved`), ``own_speech()``
(silence.py), the archive's free name by doubling and halving (`_archive_key`), and the
Redis ``:db<n>`` events channel.

Each test that FAILS names a defect; "passes: coverage" ones guard a promise of this
round not tested elsewhere. Jobs run in this process on LiveKit's mock room
(`tests.test_job_policy_adversarial.Job`), with real `AgentSession`s driven by a
scripted LLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, RunContext, function_tool

import livekit_resume as lr
from livekit_resume.agent_hooks.archive import kept_aside
from livekit_resume.agent_hooks.silence import own_speech
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.redis import RedisStore
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import Reply, ScriptedLLM, ToolCall, make_text_session
from tests.redis_servers import RedisServer
from tests.test_ended_hunt import CommitsFail, _kept_aside, _latest, _start_call, _texts
from tests.test_job_policy_adversarial import Job, run_job

T = 5.0


@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    """`resumable_job` ignores SIGTERM in its (job) process: not in pytest's."""
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


def _snap(store: Store, stored: Any) -> Snapshot:
    return from_stored(codec_for(store), stored)


async def _archives(store: Store, key: str) -> dict[str, Snapshot]:
    """Every archive of ``key`` that holds a version (a name leased and given back
    before any copy holds none: it counts as free)."""
    out: dict[str, Snapshot] = {}
    for name in sorted(await store.keys()):
        info = await store.info(name) if name.startswith(f"{key}~") else None
        if info is not None and info.version > 0:
            out[name] = await _latest(store, name)
    return out


# ----------------------------------------------- 2. a failed end, then an automatic suspend


async def test_a_failed_end_is_not_stored_suspended_by_the_long_pause_timer(
    tmp_path: Path,
) -> None:
    """FAILS. The caller is on hold (``pause()``, with ``suspend_after``); the app ends
    the call (``end()``) and the store is down: `StoreUnavailable`. The store comes
    back; nobody touches the session; the long pause's timer fires. lifecycle.md: an
    end whose save fails "is remembered: the session's later saves (autosave's, the
    close's) store it `ended`, so the next call does not resume it". Expected: the
    store says ``ended``, the next call does not resume it.

    What happens: the failed end leaves the session paused with its long-pause timer
    still armed (`_finish_now` raises before `_give_up`/`_detach_and_release` cancels
    it); the timer's `_suspend_still_paused` calls `suspend()`, and `_finish`
    (session.py, ``self._end_unsaved = False`` at its start) forgets the end: the
    suspend stores ``suspended`` and the next call resumes the conversation the app
    ended."""
    store = lr.open_store(f"sqlite:///{tmp_path}/timer.db")
    key = "caller-+15550601"
    flaky = CommitsFail(store)
    try:
        _ja, sa, first = await _start_call(flaky, key, "my order number is 4711", suspend_after=0.6)
        await asyncio.wait_for(first.checkpoint(), T)
        await asyncio.wait_for(first.pause(), T)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        flaky.down = False

        async def given_up() -> bool:
            return first.state in ("suspended", "ended")

        await eventually(given_up, "the long pause's timer gave the session up", T)
        stored = await _latest(store, key)
        await sa.aclose()
        _jb, sb, second = await _start_call(store, key)
        try:
            assert (stored.state, second.resumed) == ("ended", False), (
                f"the end the app asked for was stored {stored.state!r} by the long "
                f"pause's suspend; the next call resumed it: {second.resumed} "
                f"({_texts(stored)})"
            )
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


async def test_a_failed_end_is_not_stored_suspended_when_the_caller_then_leaves(
    tmp_path: Path,
) -> None:
    """FAILS. The natural sequence of a goodbye: the app calls ``end()`` (the store
    blips: `StoreUnavailable`), then the caller hangs up. `resumable_job`'s leave policy
    (``leave_grace``) sees a paused session nobody is in, runs the grace, and suspends
    it. Expected (lifecycle.md, as above): the store says ``ended``; the next call does
    not resume the conversation the app ended.

    What happens: `JobPolicy._next_step` (job.py, ``state == "paused" and self._timer
    is None`` -> `_arm_grace`, then ``grace_over`` -> `_suspend`) calls
    ``rs.suspend()``, which clears ``_end_unsaved`` (session.py `_finish`) and stores
    ``suspended``: the next call resumes it (and a reconnect token revoked by the end
    would verify again)."""
    store = lr.open_store(f"sqlite:///{tmp_path}/leave.db")
    key = "caller-+15550602"
    flaky = CommitsFail(store)
    try:
        ja, sa, first = await _start_call(flaky, key, "my order number is 4711", leave_grace=0.2)
        await asyncio.wait_for(first.checkpoint(), T)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        flaky.down = False
        ja.leave()

        async def given_up() -> bool:
            return first.state in ("suspended", "ended", "closed")

        with contextlib.suppress(AssertionError):
            await eventually(given_up, "the leave grace gave the session up", 3.0)
        await asyncio.wait_for(ja.shut_down(sa), 15.0)
        stored = await _latest(store, key)
        _jb, sb, second = await _start_call(store, key)
        try:
            assert (stored.state, second.resumed) == ("ended", False), (
                f"after end() failed and the caller left, the store says "
                f"{stored.state!r} (session {first.state!r}); the next call resumed it: "
                f"{second.resumed}"
            )
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


async def test_a_failed_end_then_a_remote_pause_keeps_it_ended(tmp_path: Path) -> None:
    """passes: coverage. After a failed ``end()`` an operator's remote ``pause`` (the
    session is paused already: answered done, nothing changes) and then the job's close
    store it ``ended``; the next call keeps it aside and starts afresh."""
    store = lr.open_store(f"sqlite:///{tmp_path}/remote.db")
    key = "caller-+15550603"
    flaky = CommitsFail(store)
    try:
        ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), T)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        flaky.down = False
        await asyncio.wait_for(lr.control(store).pause(key), T)
        await asyncio.wait_for(ja.shut_down(sa), 15.0)
        stored = await _latest(store, key)
        assert stored.state == "ended"
        _jb, sb, second = await _start_call(store, key)
        try:
            assert not second.resumed
            kept = await _kept_aside(store, key)
            assert [s.meta.conversation for s in kept.values()] == [stored.meta.conversation]
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


# ------------------------------------------------------- 1. kept aside by the restore


async def test_a_plain_restore_of_an_ended_conversation_keeps_it_aside_once(
    tmp_path: Path,
) -> None:
    """passes: coverage. lifecycle.md: "A plain `ResumableSession.restore` does the
    same" (keeps an ended conversation aside, then starts afresh). Twice: a restore
    whose new conversation never committed (the worker died) and a second restore both
    find the ended one on the key; it is kept aside once, whole, and the key's new
    conversation then starts from nothing."""
    store = lr.open_store(f"sqlite:///{tmp_path}/plain.db", keep=2)
    key = "caller-+15550604"
    try:
        _j, s, rs = await _start_call(store, key, "my order number is 4711")
        await asyncio.wait_for(rs.end(), T)
        ended = await _latest(store, key)
        await s.aclose()
        for _ in range(2):
            fresh = make_text_session(ScriptedLLM(default="hi"))
            again = lr.ResumableSession(
                store, key, registry=_registry(), autosave=False, lease_ttl=5.0
            )
            await asyncio.wait_for(again.restore(fresh, default=_Plain), T)
            assert not again.resumed and fresh.history.items == []
            await again.aclose()  # never started: writes nothing
            await fresh.aclose()
        kept = await _kept_aside(store, key)
        assert [k.meta.conversation for k in kept.values()] == [ended.meta.conversation]
        assert _texts(next(iter(kept.values()))) == _texts(ended)
    finally:
        await store.aclose()


class _Plain(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="plain")


def _registry() -> lr.AgentRegistry:
    from tests.test_job_policy_adversarial import Clerk

    registry = lr.AgentRegistry()
    registry.register(_Plain)
    registry.register(Clerk)
    return registry


# ------------------------------------------------- 4. the archive's free name, with holes


async def test_the_archive_search_never_overwrites_and_finds_a_free_name_past_many(
    tmp_path: Path,
) -> None:
    """passes: coverage. Nine conversations ended at the same version are kept aside
    under ``~v<V>``, ``~2`` ... ``~9``, each under a name of its own (the doubling goes
    past 8, the halving comes back to 9), with holes made by ``rm`` in between filled
    without touching a taken name; a key near MAX_KEY_BYTES (512) is cut beside its
    digest and still takes ``~<n>`` names."""
    store = lr.open_store(f"sqlite:///{tmp_path}/many.db")
    codec = codec_for(store)
    try:
        snaps: list[Snapshot] = []
        for n in range(10):
            _j, s, rs = await _start_call(store, f"src-{n}", f"conversation {n}")
            await asyncio.wait_for(rs.end(), T)
            snaps.append(await _latest(store, f"src-{n}"))
            await s.aclose()
        for key in ("caller-+15550606", "k" * 509 + "é"):
            names: list[str] = []
            for snap in snaps[:9]:
                async with kept_aside(store, codec, key, 3, snap, "op", 5.0) as (name, _):
                    names.append(name)
            assert len(set(names)) == 9, names
            await store.delete(names[4])  # a hole at ~5
            async with kept_aside(store, codec, key, 3, snaps[9], "op", 5.0) as (last, _):
                pass
            assert last not in names[:4] + names[5:]
            for kept, snap in zip(names[:4] + names[5:], snaps[:4] + snaps[5:9], strict=True):
                assert (await _latest(store, kept)).meta.conversation == snap.meta.conversation
            assert (await _latest(store, last)).meta.conversation == snaps[9].meta.conversation
            assert all(len(kept.encode()) <= 512 for kept in [*names, last])
    finally:
        await store.aclose()


# --------------------------------------------------------- 3. own_speech and tools

_RS: dict[str, lr.ResumableSession] = {}
_DONE: dict[str, Any] = {}


class Holder(Agent):
    """A tool that puts the caller on hold (``pause()`` from the tool)."""

    def __init__(self) -> None:
        super().__init__(instructions="You put callers on hold when asked.")

    @function_tool
    async def hold(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _RS["rs"].pause()
        _DONE["took"] = loop.time() - started
        return "the caller is on hold"

    @function_tool
    async def hold_soon(self, ctx: RunContext[Any]) -> str:
        """Put the caller on hold in a moment, once this answer is under way."""

        async def later() -> None:
            await asyncio.sleep(0.3)  # the reply after this tool streams meanwhile
            speech = ctx.speech_handle
            _DONE["inherited"] = own_speech() is speech
            await _RS["rs"].pause()
            _DONE["speech_done_at_return"] = speech.done()

        if _DONE.get("fresh_context"):
            # as a task started from outside the tool would be (a timer, a room event)
            _DONE["task"] = contextvars.Context().run(asyncio.create_task, later())
        else:
            _DONE["task"] = asyncio.create_task(later())
        return "hold coming"


HOLDER_REGISTRY = lr.AgentRegistry()
HOLDER_REGISTRY.register(Holder)


async def test_pause_from_a_tool_returns_promptly_and_nothing_replies_while_paused(
    tmp_path: Path,
) -> None:
    """passes: coverage. ``pause()`` from a tool returns at once (lifecycle.md: from a
    tool it does not wait for the reply running the tool); the model is not asked for
    the tool's follow-up reply while paused; the store says paused; a resume lets the
    next turn be answered."""
    store = lr.open_store(f"sqlite:///{tmp_path}/hold.db")
    key = "caller-+15550607"
    _DONE.clear()
    try:
        j = Job(f"room-{os.urandom(3).hex()}")
        llm = ScriptedLLM(["sure", [ToolCall("hold")], "while paused!"], default="welcome back")
        session = make_text_session(llm)
        rs = await asyncio.wait_for(
            run_job(j, session, store, key=key, registry=HOLDER_REGISTRY, default=Holder), T
        )
        _RS["rs"] = rs
        try:
            await asyncio.wait_for(session.run(user_input="my order is 4711"), T)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.run(user_input="hold please"), T)

            async def held() -> bool:
                return "took" in _DONE

            await eventually(held, "pause() returned in the tool", T)
            await asyncio.sleep(0.3)
            assert _DONE["took"] < 1.0, f"pause() from a tool took {_DONE['took']:.1f}s"
            assert rs.state == "paused"
            assert (await _latest(store, key)).state == "paused"
            asked = [r.last_user_text for r in llm.requests]
            assert len(llm.requests) == 2, f"the model was asked while paused: {asked}"
            await asyncio.wait_for(rs.resume(), T)
            await asyncio.wait_for(session.run(user_input="I'm back"), T)
            assert len(llm.requests) == 3
        finally:
            await session.aclose()
            await rs.aclose()
    finally:
        _RS.clear()
        await store.aclose()


@pytest.mark.parametrize("spawned", ["from the tool", "fresh context"])
async def test_a_pause_from_a_task_a_tool_spawned_saves_the_reply_it_cut(
    tmp_path: Path, spawned: str
) -> None:
    """FAILS ("from the tool"; "fresh context" passes: the control). A tool spawns a
    task (``asyncio.create_task``, which copies the tool's contextvars) that pauses the
    session a moment later, once the tool has returned and the reply after it is
    streaming. That task is not the tool: the reply does not wait for it. ``pause()``
    ("audio in and out off, speech cut, no replies; state saved") waits for the cut,
    then saves: the paused snapshot holds the cut reply as the session does (as the
    control, the same task in a fresh context, shows). Expected: the same from the
    spawned task.

    What happens: `own_speech()` (silence.py) reads LiveKit's
    ``agent_activity._SpeechHandleContextVar``, which the task inherited from the tool;
    the speech (LiveKit 1.8.9 runs the tool's follow-up reply on the same handle) is
    not done, so `Silencer.silence` skips the wait (``if done is not None and
    own_speech() is None``) and the pause's save is written before LiveKit adds the
    cut reply to the history: the paused snapshot lacks it (with autosave, until the
    next save; a suspend after it, likewise). Fix: tell the tool's own task from others
    (``asyncio.current_task()`` against the task LiveKit runs the tool in, e.g. one
    recorded from ``function_tools_executed``/``RunContext``, or a contextvar the hooks
    set and clear around the tool call), not by a contextvar every spawned task
    inherits."""
    store = lr.open_store(f"sqlite:///{tmp_path}/spawned.db")
    key = "caller-+15550608"
    _DONE.clear()
    _DONE["fresh_context"] = spawned == "fresh context"
    try:
        j = Job(f"room-{os.urandom(3).hex()}")
        long_reply = Reply(" ".join(f"word{n}" for n in range(60)), chunk_delay=0.05)
        llm = ScriptedLLM(["sure", [ToolCall("hold_soon")], long_reply], default="ok")
        session = make_text_session(llm)
        rs = await asyncio.wait_for(
            run_job(
                j, session, store, key=key, registry=HOLDER_REGISTRY, default=Holder,
                autosave=False,
            ),
            T,
        )  # fmt: skip
        _RS["rs"] = rs
        try:
            await asyncio.wait_for(session.run(user_input="my order is 4711"), T)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.run(user_input="hold in a moment"), T)

            async def paused() -> bool:
                return "speech_done_at_return" in _DONE

            await eventually(paused, "the spawned task's pause() returned", T)
            await asyncio.sleep(0.3)
            assert rs.state == "paused"
            stored = await _latest(store, key)
            live = [item.id for item in session.history.items]
            saved = [item.get("id") for item in stored.history]
            assert saved == live, (
                f"the paused snapshot lacks {[i for i in live if i not in saved]} "
                f"(the reply the pause cut); own_speech() in the spawned task was the "
                f"tool's speech: {_DONE['inherited']}"
            )
        finally:
            await session.aclose()
            await rs.aclose()
    finally:
        _RS.clear()
        await store.aclose()


# ----------------------------------------------- 5. the database number on Redis channels


async def test_a_remote_command_for_database_3_is_not_heard_in_database_0(
    redis_server: RedisServer,
) -> None:
    """FAILS. Two deployments on one Redis separated by database number (this round
    made the events channel ``<ns>:events:db<n>`` for that: "pub/sub ignores the
    number"). A session of database 3 is held by a worker that has stopped listening
    (it froze); a worker of database 0 holds the same key (a phone number) and listens.
    ``livekit-resume pause KEY`` against database 3: remote.py refuses "no live owner
    ... is not listening" at once when the command's PUBLISH reaches nobody
    (control.md: "0 means no owner listens, at once"). Expected: refused at once, and
    database 0's worker hears nothing.

    What happens: the command channel is still ``<ns>:ctl:{key}``
    (stores/redis/keys.py `KeyNames.control`, no database part): database 0's worker
    hears database 3's command, PUBLISH counts it as a receiver, and the sender waits
    out its whole timeout ("did not answer within"). Fix: the same ``:db<n>`` suffix
    on the command channel as on the events channel."""
    ns = f"rev6{uuid.uuid4().hex[:6]}"
    key = "caller-+15550609"
    base = f"redis://127.0.0.1:{redis_server.port}"
    db0 = RedisStore.from_url(f"{base}/0", namespace=ns)
    db3 = RedisStore.from_url(f"{base}/3", namespace=ns)
    try:
        await db0.acquire(key, "worker-db0", ttl=30)
        await db3.acquire(key, "frozen-db3", ttl=30)
        async with db0.commands().inbox(key) as inbox:
            started = time.monotonic()
            with pytest.raises(lr.CommandRefused) as refused:
                await lr.control(db3).pause(key, timeout=2.0)
            took = time.monotonic() - started
            heard: list[Any] = []
            with contextlib.suppress(asyncio.TimeoutError):
                heard.append(await asyncio.wait_for(inbox.__anext__(), 0.2))
        assert "not listening" in str(refused.value) and took < 1.0 and not heard, (
            f"database 3's pause: {refused.value} after {took:.1f}s; database 0's worker "
            f"heard {heard}"
        )
    finally:
        await db0.delete(key)
        await db3.delete(key)
        await db0.aclose()
        await db3.aclose()


async def test_events_of_a_session_on_database_3_reach_its_own_subscriber(
    redis_server: RedisServer,
) -> None:
    """passes: coverage. The ``:db3`` events channel is the one the store of database 3
    both publishes a session's state changes on and subscribes to: a restore, a pause
    and an end of a session in database 3 are heard by ``subscribe()`` on database 3,
    none by database 0's."""
    ns = f"rev6{uuid.uuid4().hex[:6]}"
    key = "caller-+15550610"
    base = f"redis://127.0.0.1:{redis_server.port}"
    db0 = RedisStore.from_url(f"{base}/0", namespace=ns)
    db3 = RedisStore.from_url(f"{base}/3", namespace=ns)
    try:
        async with db3.subscribe() as events3, db0.subscribe() as events0:
            _j, s, rs = await _start_call(db3, key, "hello")
            await asyncio.wait_for(rs.pause(), T)
            await asyncio.wait_for(rs.end(), T)
            await s.aclose()
            seen: list[str] = []
            while "ended" not in seen:
                got = await asyncio.wait_for(events3.__anext__(), T)
                if got.get("key") == key:
                    seen.append(str(got.get("event")))
            assert {"paused", "ended"} <= set(seen), seen
            leaked: list[Any] = []
            with contextlib.suppress(asyncio.TimeoutError):
                leaked.append(await asyncio.wait_for(events0.__anext__(), 0.3))
            assert leaked == []
    finally:
        with contextlib.suppress(Exception):
            await db3.delete(key)
        await db0.aclose()
        await db3.aclose()


# ------------------------------------- 1. kept aside, racing another worker's takeover


class GatedArchive:
    """Passes every call to ``inner``; the first acquisition of an archive name
    (``<key>~v...``) is granted, said (``held``), then waits for ``go``: a restore
    keeping an ended conversation aside, between the archive's lease and its copy."""

    def __init__(self, inner: Store, key: str) -> None:
        self.inner = inner
        self.key = key
        self.held = asyncio.Event()
        self.go = asyncio.Event()
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire(self, key: str, owner: str, **kw: Any) -> Any:
        lease = await self.inner.acquire(key, owner, **kw)
        if self.armed and key.startswith(f"{self.key}~v"):
            self.armed = False
            self.held.set()
            await self.go.wait()
        return lease


async def test_a_takeover_racing_a_restore_that_keeps_aside_is_not_refused_busy(
    tmp_path: Path,
) -> None:
    """FAILS. Worker A restores a key whose conversation ended (the caller's first dial
    after the goodbye) and is keeping it aside: it holds the archive name's lease and
    is about to copy. The caller redials; worker B restores the key with
    ``takeover=True`` (`restore`: "A session another worker holds live is taken over
    (takeover) only once it is read and found restorable here"). Expected: B takes the
    key over (A is fenced), the ended conversation is kept aside once, B starts
    afresh.

    What happens: B's `kept_aside` (archive.py) finds the archive name at version 0
    (A's lease, no copy yet: "free"), and `acquire_for` is refused by A's lease:
    B's restore raises `SessionBusy` naming ``<key>~v<N>``, a key the caller never
    asked for, though B was told to take over. Fix: acquire the archive with
    ``takeover=True`` (the key's lease, held, already fences every writer of this
    conversation), or treat an archive name leased but empty as taken by this same
    conversation and look at the next one."""
    store = lr.open_store(f"sqlite:///{tmp_path}/race.db")
    key = "caller-+15550611"
    try:
        _j, s, rs = await _start_call(store, key, "my order number is 4711")
        await asyncio.wait_for(rs.end(), T)
        ended = await _latest(store, key)
        await s.aclose()
        gated = GatedArchive(store, key)
        sa = make_text_session(ScriptedLLM(default="hi"))
        a = lr.ResumableSession(gated, key, registry=_registry(), autosave=False)
        restoring = asyncio.ensure_future(a.restore(sa, default=_Plain))
        await asyncio.wait_for(gated.held.wait(), T)
        sb = make_text_session(ScriptedLLM(default="hi"))
        b = lr.ResumableSession(store, key, registry=_registry(), autosave=False)
        try:
            try:
                await asyncio.wait_for(b.restore(sb, default=_Plain, takeover=True), T)
                outcome = "restored"
            except lr.SessionBusy as e:
                outcome = f"SessionBusy: {e}"
            gated.go.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(restoring, T)
            kept = await _archives(store, key)
            assert outcome == "restored", (
                f"the takeover of {key!r} failed with {outcome} (archives now: {list(kept)})"
            )
            assert not b.resumed
            assert [k.meta.conversation for k in kept.values()] == [ended.meta.conversation]
        finally:
            gated.go.set()
            with contextlib.suppress(Exception):
                await a.aclose()
            await b.aclose()
            await sa.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


async def test_a_restore_cancelled_while_keeping_aside_leaves_nothing_held(
    tmp_path: Path,
) -> None:
    """passes: coverage. A restore cancelled (the job shut down) while it holds the
    archive's lease, before the copy: the key's lease and the archive's are given
    back, and the next restore (another worker, no takeover) keeps the ended
    conversation aside once and starts afresh."""
    store = lr.open_store(f"sqlite:///{tmp_path}/cancel.db")
    key = "caller-+15550612"
    try:
        _j, s, rs = await _start_call(store, key, "my order number is 4711")
        await asyncio.wait_for(rs.end(), T)
        ended = await _latest(store, key)
        ended_version = rs.version
        await s.aclose()
        gated = GatedArchive(store, key)
        sa = make_text_session(ScriptedLLM(default="hi"))
        a = lr.ResumableSession(gated, key, registry=_registry(), autosave=False)
        restoring = asyncio.ensure_future(a.restore(sa, default=_Plain))
        await asyncio.wait_for(gated.held.wait(), T)
        restoring.cancel()
        gated.go.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(restoring, T)
        for name in [key, f"{key}~v{ended_version}"]:
            info = await store.info(name)
            assert info is None or info.owner is None, (name, info)
        sb = make_text_session(ScriptedLLM(default="hi"))
        b = lr.ResumableSession(store, key, registry=_registry(), autosave=False)
        try:
            await asyncio.wait_for(b.restore(sb, default=_Plain), T)
            assert not b.resumed
            kept = await _archives(store, key)
            assert [k.meta.conversation for k in kept.values()] == [ended.meta.conversation]
        finally:
            await b.aclose()
            await a.aclose()
            await sa.aclose()
            await sb.aclose()
    finally:
        await store.aclose()
