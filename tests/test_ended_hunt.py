"""Hunt (area: ended conversations and calling back): `ResumableSession.end`, the archive
``<key>~v<version>`` that `resumable_job` keeps an ended conversation under, and the
calls that come after it. Each test that FAILS names a defect (docs/lifecycle.md "Ended
conversations and reconnect tokens", its "Known limits" paragraph included); "passes:
coverage" ones guard a promise not tested elsewhere.

Jobs run in this process on LiveKit's mock room (`tests.test_job_policy_adversarial.Job`),
with real `AgentSession`s driven by a scripted LLM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Lease, SessionInfo, Store, Stored
from livekit_resume.testing.poll import eventually
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session
from tests.test_job_policy_adversarial import Clerk, Job, run_job

SIGN = "h1:" + base64.b64encode(b"h" * 32).decode()
T = 5.0


@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    """`resumable_job` ignores SIGTERM in its (job) process: not in pytest's."""
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


# ------------------------------------------------------------------ helpers


class Wrapped:
    """A store passing every call to ``inner``; subclasses change a few."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GatedInfo(Wrapped):
    """The next ``info(key)`` reads the store, says so (``read``), then waits for
    ``go`` before answering: a job that has read the key's state just as something else
    happens to it."""

    def __init__(self, inner: Store, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.read = asyncio.Event()
        self.go = asyncio.Event()
        self.armed = True

    async def info(self, key: str) -> SessionInfo | None:
        found = await self.inner.info(key)
        if self.armed and key == self.key:
            self.armed = False
            self.read.set()
            await self.go.wait()
        return found


class CommitsFail(Wrapped):
    """Commits fail with `StoreUnavailable` while ``down``: the store unreachable."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.down = False

    async def commit(self, commit: Any) -> int:
        if self.down:
            raise lr.StoreUnavailable("the store is down (test)")
        return int(await self.inner.commit(commit))


class ReleaseFailsOnce(Wrapped):
    """The first release of ``key`` fails as a store blip: the lease then expires."""

    def __init__(self, inner: Store, key: str) -> None:
        super().__init__(inner)
        self.key = key
        self.failed = False

    async def release(self, lease: Lease) -> None:
        if lease.key == self.key and not self.failed:
            self.failed = True
            raise lr.StoreUnavailable("the store blinked as the lease was released (test)")
        await self.inner.release(lease)


class CountsReads(Wrapped):
    """Counts the reads (``info``, ``load``, ``versions``) sent to the store."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.reads = 0

    async def info(self, key: str) -> SessionInfo | None:
        self.reads += 1
        return await self.inner.info(key)

    async def load(self, key: str, version: int | None = None) -> Stored:
        self.reads += 1
        return await self.inner.load(key, version)

    async def versions(self, key: str) -> Any:
        self.reads += 1
        return await self.inner.versions(key)


def _snap(store: Store, stored: Stored) -> Snapshot:
    return from_stored(codec_for(store), stored)


async def _latest(store: Store, key: str) -> Snapshot:
    return _snap(store, await store.load(key))


def _texts(snap: Snapshot) -> list[str]:
    """The user's words in a snapshot's history."""
    out: list[str] = []
    for item in snap.history:
        if item.get("role") == "user":
            out.extend(c for c in item.get("content") or [] if isinstance(c, str))
    return out


async def _kept_aside(store: Store, key: str) -> dict[str, Snapshot]:
    """Every archive of ``key`` (``<key>~...``), by name."""
    return {
        k: await _latest(store, k) for k in sorted(await store.keys()) if k.startswith(f"{key}~")
    }


async def _start_call(
    store: Store, key: str, said: str = "", **options: Any
) -> tuple[Job, AgentSession[Any], lr.ResumableSession]:
    j = Job(f"room-{os.urandom(3).hex()}")
    session = make_text_session(ScriptedLLM(default="noted"))
    options.setdefault("autosave", False)
    rs = await asyncio.wait_for(run_job(j, session, store, key=key, **options), T)
    if said:
        await asyncio.wait_for(session.run(user_input=said), T)
    return j, session, rs


# ------------------------------------------- known limit 1: ended as the next call reads


async def test_a_conversation_ended_as_the_next_call_reads_the_key_is_still_kept_aside(
    tmp_path: Path,
) -> None:
    """FAILS (known limit 1). The caller says goodbye (the app calls ``rs.end()``) and
    calls straight back; the new call's job reads the key (``store.info``) while the
    first still holds it, and the end lands right after. lifecycle.md: "An ended
    conversation is never resumed: a later call under the key starts a new
    conversation (`resumable_job` first keeps the ended one aside under
    `<key>~v<version>`)". Expected: the ended conversation kept aside, whole.

    What happens: `archive_stale` (job.py, ``info.owner is not None: return None``)
    takes the info read while the old job held the lease as "a worker holds it live" and
    archives nothing; the restore then loads the ended snapshot and
    `ResumableSession._load_into` (session.py, ``if snap.state == "ended"``) starts a new
    conversation on top of it under the same key. The ended one survives only in older
    versions, and once ``keep`` new versions are written it is gone from the store."""
    store = lr.open_store(f"sqlite:///{tmp_path}/race.db", keep=3)
    key = "caller-+15550200"
    gated = GatedInfo(store, key)
    try:
        _ja, sa, first = await _start_call(store, key, "my order number is 4711")
        jb = Job(f"room-{os.urandom(3).hex()}")
        sb = make_text_session(ScriptedLLM(default="hello again"))
        calling_back = asyncio.ensure_future(run_job(jb, sb, gated, key=key, autosave=False))
        await asyncio.wait_for(gated.read.wait(), T)  # B read the key: A holds it, live
        await asyncio.wait_for(first.end(), T)  # the goodbye lands now
        ended = await _latest(store, key)
        assert ended.state == "ended"
        gated.go.set()
        second = await asyncio.wait_for(calling_back, T)
        try:
            assert not second.resumed  # an ended conversation is never resumed: holds
            for n in range(4):  # the new call goes on: more than `keep` versions
                await asyncio.wait_for(sb.run(user_input=f"new call, turn {n}"), T)
                await asyncio.wait_for(second.checkpoint(), T)
            kept = await _kept_aside(store, key)
            convs = {name: s.meta.conversation for name, s in kept.items()}
            retained = [v.version for v in await store.versions(key)]
            assert ended.meta.conversation in convs.values(), (
                f"the ended conversation {ended.meta.conversation} (version "
                f"{first.version}, 'my order number is 4711') was not kept aside: archives "
                f"{convs}; the key now holds versions {retained} of the new call only"
            )
        finally:
            await second.aclose()
            await sb.aclose()
        await sa.aclose()
    finally:
        await store.aclose()


async def test_a_conversation_whose_end_released_nothing_is_still_kept_aside(
    tmp_path: Path,
) -> None:
    """FAILS (known limit 1, a second way in). ``end()`` saves ``ended``, then its lease
    release meets a store blip (logged: "it will expire"), so the ended conversation's
    lease lives on for ``lease_ttl`` (30 s). The caller calls back within it. Expected
    (lifecycle.md, as above): the ended conversation kept aside under
    ``<key>~v<version>`` before the new one starts.

    What happens: `archive_stale` (job.py ``info.owner is not None``) leaves a key whose
    lease is live alone; the job's ``restore(takeover=True)`` fences the (gone) holder
    and `_load_into` starts afresh on top of the ended snapshot, under the same key. No
    archive is made; the ended conversation is lost once ``keep`` versions pass."""
    store = lr.open_store(f"sqlite:///{tmp_path}/blip.db", keep=3)
    key = "caller-+15550201"
    try:
        _ja, sa, first = await _start_call(ReleaseFailsOnce(store, key), key, "order 4711")
        await asyncio.wait_for(first.end(), T)
        await sa.aclose()
        ended = await _latest(store, key)
        info = await store.info(key)
        assert ended.state == "ended" and info is not None and info.owner is not None
        _jb, sb, second = await _start_call(store, key)
        try:
            assert not second.resumed
            for n in range(4):
                await asyncio.wait_for(sb.run(user_input=f"new call, turn {n}"), T)
                await asyncio.wait_for(second.checkpoint(), T)
            kept = await _kept_aside(store, key)
            assert ended.meta.conversation in {s.meta.conversation for s in kept.values()}, (
                f"the ended conversation was not kept aside (archives: {list(kept)}); the "
                f"key holds versions {[v.version for v in await store.versions(key)]} of "
                "the new call only"
            )
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


# -------------------------------------------- known limit 2: an end whose save failed


async def test_an_end_whose_save_failed_is_not_resumed_by_the_next_call(
    tmp_path: Path,
) -> None:
    """FAILS (known limit 2). The caller says goodbye; ``rs.end()`` meets the store down
    and raises `StoreUnavailable`. The store comes back; the job then shuts down (the
    caller is gone). lifecycle.md: "An ended conversation is never resumed"; `end`'s
    docstring: "A later call under the key starts a new conversation instead of resuming
    this one". Expected: the next call under the key does not resume the conversation
    the app ended (the close stores it ``ended``, or it is kept aside).

    What happens: `_finish_now` (session.py, ``version = await self._save(reason,
    state)``) raises before ``self._state = state``: the session stays ``paused`` and
    held, nothing remembers that an end was asked for, and `_aclose`'s `final_save`
    (session.py ``final_save(self.checkpoint, ...)``) saves it ``paused``. The next
    call resumes it as live; a reconnect token issued for it still verifies."""
    store = lr.open_store(f"sqlite:///{tmp_path}/down.db")
    key = "caller-+15550202"
    flaky = CommitsFail(store)
    try:
        ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), T)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        flaky.down = False  # the store is back before the job shuts down
        await asyncio.wait_for(ja.shut_down(sa), 15.0)
        stored = await _latest(store, key)
        _jb, sb, second = await _start_call(store, key)
        try:
            assert not second.resumed, (
                f"the conversation the app ended was resumed (stored as {stored.state!r}, "
                f"{_texts(stored)})"
            )
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


async def test_an_end_retried_once_the_store_is_back_ends_the_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """passes: coverage. As above, but the app retries ``end()`` once the store is back
    (as `suspend`'s docstring says a failed suspend may be): the retry stores
    ``ended``, releases the lease, revokes the conversation's tokens, and the next call
    keeps it aside and starts afresh."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    store = lr.open_store(f"sqlite:///{tmp_path}/retry.db")
    key = "caller-+15550203"
    flaky = CommitsFail(store)
    try:
        _ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), T)
        token = await lr.issue_token(store, key, ttl=600)
        flaky.down = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        assert first.state == "paused"
        flaky.down = False
        await asyncio.wait_for(first.end(), T)
        assert str(first.state) == "ended"  # (str: mypy narrowed it to "paused" above)
        ended = await _latest(store, key)
        info = await store.info(key)
        assert ended.state == "ended" and info is not None and info.owner is None
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, token)
        await sa.aclose()
        _jb, sb, second = await _start_call(store, key)
        try:
            assert not second.resumed
            kept = await _kept_aside(store, key)
            assert [s.meta.conversation for s in kept.values()] == [ended.meta.conversation]
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


# ----------------------------------------- known limit 3: many ended calls of one key


async def test_the_reads_of_a_call_after_many_ended_calls_of_its_key_stay_bounded(
    tmp_path: Path,
) -> None:
    """FAILS (known limit 3). A phone-number key whose short calls all end alike (same
    length, same last version): each keeps the ended one before it aside. The n-th call
    reads every earlier archive (`_archive_key`, job.py: ``for n in itertools.count(1)``
    probes ``~v<version>``, ``~2``, ``~3``... with an ``info`` and a ``load`` and a full
    decode each, to tell a free name from a cut-short copy of this conversation). The
    reads a call sends the store grow with the number of calls the number ever made:
    O(n) per call, O(n^2) in all, each a whole conversation decoded. Expected: bounded
    per call (a few more for each doubling of the key's past)."""
    store = lr.open_store(f"sqlite:///{tmp_path}/many.db")
    counting = CountsReads(store)
    key = "caller-+15550204"
    per_call: list[int] = []
    try:
        for _n in range(15):
            before = counting.reads
            _j, s, rs = await _start_call(counting, key, "hello, it's me again")
            per_call.append(counting.reads - before)
            await asyncio.wait_for(rs.end(), T)
            await s.aclose()
        kept = await _kept_aside(store, key)
        assert len(kept) == 14  # every ended call kept: holds
        # n archives: the free name is found by doubling and halving, 2 log2(n) reads
        # over the two the key's own check costs and the one the last archive's
        bound = [per_call[1] + 2 * math.ceil(math.log2(n)) for n in range(2, 15)]
        assert all(r <= b for r, b in zip(per_call[2:], bound, strict=True)), (
            f"store reads per call grow with the key's past: {per_call} (bound {bound})"
        )
    finally:
        await store.aclose()


# ------------------------------------------------------------- further: the hunt


class ReplyLost(Wrapped):
    """The next commit lands, and its reply is lost (a connection reset as the store
    answered): the caller gets `StoreUnavailable` for a commit the store applied."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.lose_next = False

    async def commit(self, commit: Any) -> int:
        version = int(await self.inner.commit(commit))
        if self.lose_next:
            self.lose_next = False
            raise lr.StoreUnavailable("connection reset while reading the reply (test)")
        return version


async def test_an_end_that_landed_unheard_is_not_undone_by_the_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS (known limit 2's worse case). The caller says goodbye; ``end()``'s commit
    lands but its reply is lost: the app gets `StoreUnavailable`, while the store holds
    the conversation ``ended`` and every token issued for it is refused ("ending revokes
    every token issued for it"). Then the job shuts down. Expected: the conversation
    stays ended; a revoked token stays revoked; the next call does not resume it.

    What happens: `_commit_now` keeps the unheard commit pending (right: "sent again,
    unchanged, before the next one") but `_finish_now` leaves ``self._state`` at
    ``paused``; the close's `final_save` sends the pending ``ended`` commit again, then
    a new one saying ``paused`` on top of it (session.py `_commit_now`:
    ``state=_saved_state(state or self._state)``). The store un-ends the conversation:
    the token refused a moment ago verifies again, and the next call resumes it."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    store = lr.open_store(f"sqlite:///{tmp_path}/lost.db")
    key = "caller-+15550205"
    flaky = ReplyLost(store)
    try:
        ja, sa, first = await _start_call(flaky, key, "my order number is 4711")
        await asyncio.wait_for(first.checkpoint(), T)
        token = await lr.issue_token(store, key, ttl=600)
        flaky.lose_next = True
        with pytest.raises(lr.StoreUnavailable):
            await asyncio.wait_for(first.end(), T)
        assert (await _latest(store, key)).state == "ended"  # it landed
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, token)  # revoked, as promised
        await asyncio.wait_for(ja.shut_down(sa), 15.0)
        after = await _latest(store, key)
        try:
            await lr.verify_token(store, token)
            revived = True
        except lr.TokenRefused:
            revived = False
        _jb, sb, second = await _start_call(store, key)
        try:
            assert (after.state, revived, second.resumed) == ("ended", False, False), (
                f"after the close the store says {after.state!r}; the revoked token "
                f"verifies again: {revived}; the next call resumed it: {second.resumed}"
            )
        finally:
            await second.aclose()
            await sb.aclose()
    finally:
        await store.aclose()


_CLOSER: dict[str, lr.ResumableSession] = {}
_ENDED: dict[str, float] = {}


class Closer(Agent):
    """An agent with a goodbye tool that ends the conversation: where an app ends it."""

    def __init__(self) -> None:
        super().__init__(instructions="You end calls when the caller says goodbye.")

    @function_tool
    async def end_call(self, ctx: RunContext[Any]) -> str:
        """End the call: the caller said goodbye."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _CLOSER["rs"].end()
        _ENDED["took"] = loop.time() - started
        return "the call is over"


CLOSER_REGISTRY = lr.AgentRegistry()
CLOSER_REGISTRY.register(Closer)


async def test_end_called_from_a_goodbye_tool_returns_promptly(tmp_path: Path) -> None:
    """FAILS. The natural place for ``rs.end()`` is a goodbye tool the LLM calls
    (lifecycle.md: "a goodbye, a hang-up the app treats as final"). lifecycle.md
    measures a suspend (final save, release, close) at ~5 ms; ``end`` is the same path.

    What happens: ``end()`` from inside the tool takes 5 s, and LiveKit logs an ERROR
    ("speech not done in time after interruption, cancelling the speech arbitrarily"):
    `Silencer.silence` (silence.py, ``asyncio.wait({done}, timeout=INTERRUPT_TIMEOUT)``)
    waits for the current speech to be done, but that speech is the one running the
    tool that awaits ``end()``: it cannot finish before ``end()`` returns, so the wait
    runs out its 3 s; then `_give_up` (session.py, ``asyncio.wait({close},
    timeout=SUSPEND_CLOSE_WAIT)``) waits 2 s for LiveKit's close, which waits for the
    same tool. The ended snapshot also records ``end_call`` as a tool still running.
    Fix: don't wait for the speech the caller runs in (LiveKit's
    ``agent_activity._SpeechHandleContextVar.get(None)``, as its own `AgentTask` does),
    and don't wait for the close when called from the session's own tool."""
    store = lr.open_store(f"sqlite:///{tmp_path}/tool.db")
    key = "caller-+15550206"
    _ENDED.clear()
    try:
        j = Job(f"room-{os.urandom(3).hex()}")
        llm = ScriptedLLM(["sure", [ToolCall("end_call")], "goodbye"], default="ok")
        session = make_text_session(llm)
        rs = await asyncio.wait_for(
            run_job(j, session, store, key=key, registry=CLOSER_REGISTRY, default=Closer), T
        )
        _CLOSER["rs"] = rs
        try:
            await asyncio.wait_for(session.run(user_input="my order is 4711"), T)
            with contextlib.suppress(Exception):  # the run's own outcome: not the point
                await asyncio.wait_for(session.run(user_input="thanks, goodbye"), 15.0)

            async def ended() -> bool:
                return "took" in _ENDED

            await eventually(ended, "end() returned in the goodbye tool", 15.0)
            stored = await _latest(store, key)
            assert stored.state == "ended"
            assert _ENDED["took"] < 1.0, (
                f"end() called from a goodbye tool took {_ENDED['took']:.1f}s; the ended "
                f"snapshot's tool calls: {[(c.name, c.status) for c in stored.tool_calls]}"
            )
        finally:
            await session.aclose()
    finally:
        _CLOSER.clear()
        await store.aclose()


async def test_end_on_a_paused_session_and_end_twice(tmp_path: Path) -> None:
    """passes: coverage. ``end()`` of a session paused (on hold) ends it: stored
    ``ended`` with every turn, the lease released; a second ``end()``, at once or
    after, is refused with `RuntimeError` and writes nothing; a ``restore`` of the same
    object afterwards is refused too (`RuntimeError`), and the next call keeps the
    conversation aside and starts afresh."""
    store = lr.open_store(f"sqlite:///{tmp_path}/paused.db")
    key = "caller-+15550207"
    try:
        _j, s, rs = await _start_call(store, key, "my order number is 4711")
        await asyncio.wait_for(rs.pause(), T)
        both = await asyncio.gather(rs.end(), rs.end(), return_exceptions=True)
        assert sum(isinstance(r, int) for r in both) == 1, both
        assert sum(isinstance(r, RuntimeError) for r in both) == 1, both
        with pytest.raises(RuntimeError):
            await rs.end()
        versions = [v.version for v in await store.versions(key)]
        ended = await _latest(store, key)
        info = await store.info(key)
        assert ended.state == "ended" and info is not None and info.owner is None
        assert "my order number is 4711" in _texts(ended)
        fresh = make_text_session(ScriptedLLM(default="hi"))
        with pytest.raises(RuntimeError):
            await rs.restore(fresh, default=Clerk)
        assert [v.version for v in await store.versions(key)] == versions
        await s.aclose()
        await fresh.aclose()
        _j2, s2, second = await _start_call(store, key)
        try:
            assert not second.resumed
            kept = await _kept_aside(store, key)
            assert [k.meta.conversation for k in kept.values()] == [ended.meta.conversation]
        finally:
            await second.aclose()
            await s2.aclose()
    finally:
        await store.aclose()


@pytest.mark.parametrize("grace", [0.0, 0.05])
async def test_an_end_as_the_caller_leaves_is_stored_ended_whatever_the_grace_does(
    tmp_path: Path, grace: float
) -> None:
    """passes: coverage. The caller hangs up: the room's ``participant_disconnected``
    makes the job's policy pause the session (and suspend it after ``leave_grace``),
    while the app, on the same hang-up, calls ``end()``. Whichever step runs first,
    ``end()`` either returns (and then the store says ``ended``, released, and nothing
    the policy does afterwards writes over it) or is refused with `RuntimeError`
    (being suspended: the session is then suspended, not left paused and held)."""
    store = lr.open_store(f"sqlite:///{tmp_path}/leave.db")
    key = "caller-+15550208"
    try:
        j, s, rs = await _start_call(store, key, "my order number is 4711", leave_grace=grace)
        j.leave()
        try:
            await asyncio.wait_for(rs.end(), T)
            ended = True
        except RuntimeError:
            ended = False
        await asyncio.sleep(max(grace, 0.05) * 4)  # the grace, had it been armed, ran out
        info = await store.info(key)
        snap = await _latest(store, key)
        assert info is not None and info.owner is None, info
        if ended:
            assert (rs.state, snap.state) == ("ended", "ended")
        else:
            assert (rs.state, snap.state) == ("suspended", "suspended")
        assert "my order number is 4711" in _texts(snap)
        await s.aclose()
    finally:
        await store.aclose()
