"""Hunt: pause and resume (soft pause, long pause, pause then suspend / takeover / outage).

Real `AgentSession`s in text mode driven by ``session.run(user_input=...)`` and the
scripted LLM; real SQLite files. Each test is a defect reproduction that fails on the
current code unless marked "passes: coverage".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession
from pydantic import BaseModel

import livekit_resume as lr
from livekit_resume.stores.base import Store
from livekit_resume.testing.llm import ScriptedLLM, make_text_session
from livekit_resume.testing.poll import eventually
from tests.test_hooks import RoomStandIn

KEY = "hunt-pause"
WAIT = 10.0


class Visit(BaseModel):
    name: str = ""


class Clerk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You take notes.")


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Clerk)
    return reg


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = lr.open_store(f"sqlite:///{tmp_path}/hunt.db")
    yield s
    await s.aclose()


async def started(
    store: Any,
    model: ScriptedLLM | None = None,
    *,
    owner: str = "w1",
    takeover: bool = False,
    autosave: bool = False,
    **kw: Any,
) -> tuple[AgentSession[Any], lr.ResumableSession, ScriptedLLM]:
    model = model or ScriptedLLM(default="ok")
    session = make_text_session(model)
    rs = lr.ResumableSession(
        store, KEY, registry=registry(), owner=owner, autosave=autosave, debounce=0.01, **kw
    )
    agent = await asyncio.wait_for(rs.restore(session, default=Clerk, takeover=takeover), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return session, rs, model


async def finish(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


# ------------------------------------------------------------- audio flags


async def test_resume_leaves_audio_output_off_when_the_app_had_turned_it_off(
    store: Store,
) -> None:
    """A text-only app (``session.output.set_audio_enabled(False)``) pauses and resumes.

    Expected: `resume()` is documented as "Undo `pause`" (session.py: resume's
    docstring); undoing a pause puts the flags back as the pause found them. The
    output was off before the pause, so it is off after the resume.
    Found: `Silencer.unsilence` turns both flags on unconditionally."""
    session, rs, _ = await started(store)
    await session.run(user_input="hi")
    session.output.set_audio_enabled(False)
    session.input.set_audio_enabled(False)
    try:
        await rs.pause()
        await rs.resume()
        out, inp = session.output.audio_enabled, session.input.audio_enabled
    finally:
        await finish(session, rs)
    assert out is False, "resume turned on an audio output the app had off"
    assert inp is False, "resume turned on an audio input the app had off"


# ------------------------------------------------------------- helpers for faults


class DownStore:
    """Wraps a real store; its commits fail (`StoreUnavailable`) while ``down`` is set,
    or take ``slow`` seconds first: the network, not our code."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self.slow = 0.0
        self.commits = 0
        self.failed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, commit: Any) -> int:
        self.commits += 1
        if self.slow:
            await asyncio.sleep(self.slow)
        if self.down:
            self.failed.set()
            raise lr.StoreUnavailable("store is down (test)")
        return await self.inner.commit(commit)


def closing(session: AgentSession[Any]) -> asyncio.Event:
    closed = asyncio.Event()
    session.on("close", lambda _ev: closed.set())
    return closed


# ------------------------------------------------------------- state saved by resume


async def test_resume_saves_the_active_state_without_autosave(store: Store) -> None:
    """docs/strategies.md "What pause does": "`resume()` undoes each step and returns at
    once; the state change is saved in the background". `pause()` saves ``paused``
    itself (with or without autosave), so the store (``ls``, ``info``) says paused.

    Expected: after `resume()` the store comes to say ``active``.
    Found: with ``autosave=False`` `resume` only calls ``Autosave.trigger``, which does
    nothing when autosave never started: the store says ``paused`` for good (until the
    app happens to checkpoint), and ``ls --state paused`` lists a live, talking call."""
    session, rs, _ = await started(store, autosave=False)
    await session.run(user_input="hi")
    await rs.pause()
    await rs.resume()
    await asyncio.sleep(1.0)  # "in the background": give it ample time
    info = await store.info(KEY)
    await finish(session, rs)
    assert info is not None
    assert info.info["state"] == "active", (
        f"resumed session still stored as {info.info['state']!r} (version {info.version})"
    )


# ------------------------------------------------------------- long pause + outage


async def test_a_long_pause_whose_suspend_met_a_store_outage_still_suspends_later(
    store: Store,
) -> None:
    """``suspend_after``: "a pause longer than this many seconds becomes a suspend, which
    frees the session's connections and its lease" (session.py, ResumableSession
    docstring; docs/lifecycle.md "Long pause"). The store is down just when the timer
    fires and back a moment later.

    Expected: the session still ends up suspended (the suspend is tried again, as a
    pause whose own save failed still suspends: docs/lifecycle.md).
    Found: `Timer.run` logs the failure of the one suspend attempt and nothing re-arms
    it: the session stays paused, holding its lease and connections, for ever."""
    flaky = DownStore(store)
    session, rs, _ = await started(flaky, autosave=True, suspend_after=0.3)
    closed = closing(session)
    await session.run(user_input="hi")
    await rs.pause()
    flaky.down = True
    await asyncio.wait_for(flaky.failed.wait(), WAIT)  # the long pause's suspend failed
    await asyncio.sleep(0.2)
    flaky.down = False  # the store is back
    try:
        await asyncio.wait_for(closed.wait(), 5.0)
    except TimeoutError:
        still = rs.state
        await finish(session, rs)
        pytest.fail(f"store back for 5 s after a failed suspend_after, and still {still!r}")
    assert rs.state == "suspended"
    info = await store.info(KEY)
    assert info is not None and info.owner is None and info.info["state"] == "suspended"
    await finish(session, rs)


async def test_a_later_long_pause_starts_its_suspend_retries_afresh(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long pause's failed suspend is retried, its delay doubling (session.py,
    ``LONG_PAUSE_RETRY``). A resume ends that pause: the next long pause of the same
    session meets its own outage.

    Expected: the next long pause retries after the first delay again.
    Found: only a successful suspend reset the delay, so the next pause waited as long
    as the last outage had made it (up to a minute), holding its lease."""
    from livekit_resume.agent_hooks import session as session_module

    monkeypatch.setattr(session_module, "LONG_PAUSE_RETRY", 0.2)
    flaky = DownStore(store)
    session, rs, _ = await started(flaky, autosave=False, suspend_after=0.2)
    closed = closing(session)
    await session.run(user_input="hi")
    await rs.pause()
    flaky.down, flaky.commits = True, 0

    async def failed(times: int) -> bool:
        return flaky.commits >= times

    # the suspend fails at 0.2 s, then 0.2, 0.4 and 0.8 later: the next delay is 1.6 s
    await eventually(lambda: failed(4), "four suspends failed", WAIT)
    flaky.down = False
    await rs.resume()
    await rs.pause()
    flaky.down, flaky.commits = True, 0
    await eventually(lambda: failed(1), "the second pause's suspend failed", WAIT)
    flaky.down = False
    try:
        await asyncio.wait_for(closed.wait(), 2.0)  # retried 0.2 s later, not 1.6 s
    except TimeoutError:
        still = rs.state
        await finish(session, rs)
        pytest.fail(f"a second long pause still {still!r} 2 s after its suspend failed")
    assert rs.state == "suspended"
    await finish(session, rs)


# ------------------------------------------------------------- takeover during a pause


async def test_resume_after_the_session_was_taken_over_is_refused(store: Store) -> None:
    """Worker 1 pauses (a hold); worker 2 takes the key over (``takeover=True``) and worker
    1 learns it (``on_lost`` was called: "nothing more is written from here, so it is the
    place to stop speaking", session.py). Then worker 1's app calls `resume()`.

    Expected: `resume` refuses with the typed `LeaseLost` (as `pause`, `checkpoint` and
    `suspend` do there: they all raise it) and the session stays silent: its state
    change can never be saved, and another worker now answers this caller.
    Found: `resume` returns normally, unsilences the zombie session, and it answers
    the next turn (the LLM is asked) while worker 2 owns the conversation."""
    lost = asyncio.Event()

    async def on_lost(_e: lr.LeaseLost) -> None:
        lost.set()

    s1, rs1, model1 = await started(store, autosave=True, lease_ttl=0.6, on_lost=on_lost)
    await s1.run(user_input="hi")
    await rs1.pause()
    s2, rs2, _ = await started(store, owner="w2", takeover=True)
    await asyncio.wait_for(lost.wait(), WAIT)  # worker 1's renewal met the new epoch
    asked = len(model1.requests)
    try:
        try:
            await rs1.resume()
        except lr.LeaseLost:
            raised = True
        else:
            raised = False
        await asyncio.wait_for(s1.run(user_input="are you there?"), WAIT)
        answered = len(model1.requests) - asked
    finally:
        await finish(s2, rs2)
        await finish(s1, rs1)
    assert raised and not answered, (
        f"resume of a taken-over session raised LeaseLost: {raised}; "
        f"the zombie then asked its LLM {answered} time(s)"
    )


# ------------------------------------------------------------- pause before start


class Greeter(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You greet callers.")

    async def on_enter(self) -> None:
        self.session.generate_reply(instructions="greet the caller")


async def test_a_pause_before_the_session_started_keeps_the_agent_silent_at_start(
    store: Store,
) -> None:
    """passes: coverage. The app restores, then pauses before ``session.start`` (the
    caller put on hold as the job starts); no existing test pauses before start.

    Expected (docs/strategies.md, "What pause does": no answer while paused; an agent
    handed to while paused "says nothing until resumed": failure-model.md): the agent's
    ``on_enter`` greeting at start does not reach the LLM. It holds: the start's handoff
    is followed by the silencer."""
    reg = registry()
    reg.register(Greeter)
    model = ScriptedLLM(default="Hello there!")
    session = make_text_session(model)
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    agent = await rs.restore(session, default=Greeter)
    await rs.pause()
    assert rs.state == "paused"
    await session.start(agent)
    await asyncio.sleep(0.5)
    spoken = [i for i in session.history.items if i.type == "message" and i.role == "assistant"]
    assert not model.requests and not spoken, (
        f"paused, yet the LLM was asked {len(model.requests)} time(s): {spoken}"
    )
    await finish(session, rs)


# ------------------------------------------------------------- the app's own llm_node


async def _app_node(*_args: Any, **_kwargs: Any) -> Any:
    return "from the app's own node"


class Routed(Agent):
    """An agent whose app plugs its LLM node per instance (a router, an A/B switch)."""

    def __init__(self) -> None:
        super().__init__(instructions="You route.")
        self.llm_node = _app_node  # type: ignore[method-assign]


async def test_resume_gives_back_an_llm_node_the_app_set_on_the_agent(store: Store) -> None:
    """`resume()`: "Undo `pause`" (session.py). The pause shadows the agent's
    ``llm_node`` with an instance attribute (silence.py, `Silencer.follow`).

    Expected: after resume the agent's ``llm_node`` is the one it had before the pause.
    Found: `Silencer.follow` overwrites the app's instance attribute and
    `Silencer.unsilence` pops it (``agent.__dict__.pop("llm_node")``): the app's node is
    gone for good and the class's default node answers from then on."""
    reg = registry()
    reg.register(Routed)
    session = make_text_session(ScriptedLLM(default="from the default node"))
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    agent = await rs.restore(session, default=Routed)
    await session.start(agent)
    await session.run(user_input="hi")
    try:
        await rs.pause()
        await rs.resume()
        node = agent.llm_node
    finally:
        await finish(session, rs)
    assert node is _app_node, f"the app's llm_node was replaced by {node!r}"


# ------------------------------------------------------------- a pause whose save failed


async def test_a_pause_whose_save_failed_is_still_shown_paused_in_the_room(
    store: Store,
) -> None:
    """docs/control.md: "A pause whose save fails is a pause all the same, as the owner's
    own `pause()` says"; DESIGN.md, Hooks: `pause()` publishes the state "so the room's
    other participants can show it" (``resume.state``).

    Expected: the session is paused (silent), so the room shows ``resume.state=paused``.
    Found: `ResumableSession.pause` shows the state only inside ``checkpoint()`` (after a
    successful commit) and after it: a `StoreUnavailable` from the save skips both, and
    the room keeps showing ``active`` for a session that no longer hears or answers."""
    room = RoomStandIn()
    flaky = DownStore(store)
    session, rs, _ = await started(flaky, room=room)
    await session.run(user_input="hi")
    await rs.checkpoint()
    await asyncio.sleep(0.1)
    flaky.down = True
    with pytest.raises(lr.StoreUnavailable):
        await rs.pause()
    assert rs.state == "paused"
    await asyncio.sleep(0.2)
    shown = room.published[-1]["resume.state"] if room.published else None
    flaky.down = False
    await finish(session, rs)
    assert shown == "paused", f"paused session shown to the room as {shown!r}"


# ------------------------------------------------------------- remote resume vs local pause


def _slow_stop_output() -> Any:
    """A `FakeAudioOutput` whose device takes ``0.8`` s to stop after ``clear_buffer`` (a
    real output drains its jitter buffer, a SIP leg its packets)."""
    from tests.lk import FakeAudioOutput

    class SlowStopOutput(FakeAudioOutput):
        def clear_buffer(self) -> None:
            if self._seg is not None:
                asyncio.get_running_loop().call_later(0.8, lambda: self._finish(interrupted=True))

    return SlowStopOutput()


async def test_a_remote_resume_during_a_local_pause_is_not_answered_done_then_undone(
    tmp_path: Path,
) -> None:
    """The app pauses (a hold) while the agent speaks; the pause waits for the speech to
    stop. Meanwhile an operator sends ``resume`` (docs/control.md: `remote.resume` is
    "`rs.resume()`: audio and replies back on"; "resuming an active one changes nothing
    and answers with the current version").

    Expected: the operator's ``done`` is true when the pause is over: either the command
    waits for the pause under way (as commands wait for each other), or it is refused
    ("cannot resume: the session is being paused"), or the session ends active.
    Found: `ControlListener._apply` sees ``state == "active"`` (the pause sets
    ``paused`` only after the speech cut) and answers ``done``; the pause then completes
    and the session stays paused although the operator was told it was resumed."""
    from tests.lk import make_voice_session, voice_fakes

    owner_store = lr.open_store(f"sqlite:///{tmp_path}/ctl.db")
    backend = lr.open_store(f"sqlite:///{tmp_path}/ctl.db")
    long_reply = " ".join(["word"] * 80)
    model = ScriptedLLM([long_reply], default="ok")
    session = make_voice_session(model, audio_out=_slow_stop_output())
    rs = lr.ResumableSession(owner_store, KEY, registry=registry(), autosave=False)
    await session.start(await rs.restore(session, default=Clerk))
    fakes = voice_fakes(session)
    try:
        fakes.audio_in.say("hello")
        await fakes.audio_out.wait_for_frames(3, timeout=WAIT)  # the reply is being spoken
        pausing = asyncio.ensure_future(rs.pause())
        await asyncio.sleep(0.05)
        assert not pausing.done() and rs.state == "active", "the pause is not cutting speech"
        answer: int | str
        try:
            answer = await lr.control(backend).resume(KEY, timeout=5)
        except lr.CommandRefused as e:
            answer = str(e)  # refused: true, and the operator knows
        await asyncio.wait_for(pausing, WAIT)
        assert rs.state == "active" or "being paused" in str(answer), (
            f"operator's resume answered done (version {answer}) during the pause, "
            f"and the session is now {rs.state!r}"
        )
    finally:
        await rs.aclose()
        await session.aclose()
        await backend.aclose()
        await owner_store.aclose()


async def test_a_pause_before_the_session_started_is_saved_as_paused(store: Store) -> None:
    """`pause()`: "Soft pause: audio in and out off, speech cut, no replies; state saved"
    (session.py); docs/strategies.md: the pause ends with "a snapshot with
    ``state="paused"``". A worker restores a suspended call and pauses it before
    ``session.start`` (the caller put on hold as the job starts; `pause` accepts it).

    Expected: the store says ``paused`` once the session started (``ls --state paused``):
    before it, the agent is not the session's and there is nothing to capture.
    Found: `ResumableSession._checkpoint` returns the old version without writing when
    ``current_agent`` is None (not started), so the store keeps saying ``suspended``,
    and `pause` returns that old version as if it were the pause's."""
    s1, rs1, _ = await started(store)
    await s1.run(user_input="hi")
    suspended_at = await rs1.suspend()

    session = make_text_session(ScriptedLLM(default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, owner="w2")
    agent = await rs.restore(session, default=Clerk)
    try:
        version = await rs.pause()
        assert version == suspended_at  # nothing written before the start
        await session.start(agent)

        async def saved_paused() -> bool:
            info = await store.info(KEY)
            return info is not None and info.info["state"] == "paused"

        await eventually(saved_paused, "the pause saved once the session started", timeout=5)
        assert rs.state == "paused" and rs.version == suspended_at + 1
    finally:
        await finish(session, rs)
