"""Hunt: the last commit's changes (tool state kept until end and output are both seen,
ToolCallEnded autosaving, autosave's retry cut short by the next trigger, resume giving
back audio flags and llm_node, resume raising LeaseLost, saving without autosave, a pause
before start, a long pause's retry).

Real `AgentSession`s in text mode driven by ``session.run(user_input=...)`` and the
scripted LLM; real SQLite files. Each test is a defect reproduction that fails on the
current code unless marked "passes: coverage".
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from livekit.agents import RunResult

import livekit_resume as lr
from livekit_resume.agent_hooks.autosave import RETRY_FIRST, RETRY_NUDGED, Autosave
from livekit_resume.stores.base import Store
from tests.test_hooks import RoomStandIn
from tests.test_pause_hunt import KEY, WAIT, DownStore, finish, started, store

__all__ = ["store"]

# ------------------------------------------------------------- resume after a takeover


async def test_resume_without_autosave_after_a_takeover_raises_and_stays_silent(
    store: Store,
) -> None:
    """docs/strategies.md "What pause does": "A resume after another worker took the
    session over raises `LeaseLost` and the session stays silent." Worker 1 runs without
    autosave (``autosave=False``, a documented mode), pauses; worker 2 takes the key
    over; worker 1's app then calls `resume()`.

    Expected: `resume` raises `LeaseLost` and worker 1 stays paused and silent (it
    learns of the takeover in that very call: its own save is refused as fenced).
    Found: `ResumableSession.resume` checks ``self._autosave.lost`` (never set without
    autosave), unsilences, then its own `_save` raises `LeaseLost`, which it catches and
    logs as "resumed, its state not saved": the zombie is active and answers the next
    turn while worker 2 owns the conversation."""
    s1, rs1, model1 = await started(store, autosave=False)
    await s1.run(user_input="hi")
    await rs1.pause()
    s2, rs2, _ = await started(store, owner="w2", takeover=True)
    asked = len(model1.requests)
    try:
        try:
            await rs1.resume()
        except lr.LeaseLost:
            raised = True
        else:
            raised = False
        state = rs1.state
        await asyncio.wait_for(s1.run(user_input="are you there?"), WAIT)
        answered = len(model1.requests) - asked
    finally:
        await finish(s2, rs2)
        await finish(s1, rs1)
    assert raised and not answered, (
        f"resume of a taken-over session (autosave off) raised LeaseLost: {raised}; "
        f"state after it {state!r}; the zombie then asked its LLM {answered} time(s)"
    )


# ------------------------------------------------------------- resume returns at once


async def test_resume_on_a_slow_store_talks_and_shows_active_before_its_save_lands(
    store: Store,
) -> None:
    """docs/strategies.md: `resume()` undoes each step, "then it saves the state (a few
    ms, the caller already hears the agent ...)". The store is slow (each commit takes
    3 s: a Redis failover, a congested link).

    Expected: while the save is under way the room already shows
    ``resume.state=active`` and the agent answers a turn; `resume()` returns once the
    save landed, and the store then says ``active``.
    Found (as first written): the room showed ``paused`` for the whole commit, for a
    session that already talked."""
    room = RoomStandIn()
    slow = DownStore(store)
    session, rs, _ = await started(slow, autosave=False, room=room)
    await session.run(user_input="hi")
    await rs.pause()
    slow.slow = 3.0
    resuming = asyncio.ensure_future(rs.resume())
    try:
        await asyncio.wait({resuming}, timeout=1.0)
        shown = room.published[-1]["resume.state"] if room.published else None
        saving = not resuming.done()
        answered: RunResult[Any] = await asyncio.wait_for(
            session.run(user_input="still there?"), WAIT
        )
        await asyncio.wait_for(resuming, WAIT)
        info = await store.info(KEY)
    finally:
        slow.slow = 0.0
        await finish(session, rs)
    assert saving and shown == "active", (
        f"the room showed {shown!r} while resume's save was under way (saving: {saving})"
    )
    assert any(getattr(e, "type", "") == "message" for e in answered.events)
    assert info is not None and info.info["state"] == "active"


# ------------------------------------------------------------- a pause whose save failed


async def test_a_pause_whose_save_failed_is_saved_once_the_store_is_back(store: Store) -> None:
    """docs/failure-model.md: a pause whose save fails (the store down) is a pause all the
    same, and "the session stays held and saves once the store is back"; docs/control.md
    "A pause whose save fails is a pause all the same". Autosave is on.

    Expected: within a few seconds of the store coming back, the store says ``paused``
    (``ls --state paused``, an operator's ``info``).
    Found: `ResumableSession.pause` raises `StoreUnavailable` and keeps the commit
    pending, but nothing triggers autosave (a paused session produces no events), so
    the store keeps saying ``active`` for as long as the pause lasts."""
    flaky = DownStore(store)
    session, rs, _ = await started(flaky, autosave=True)
    await session.run(user_input="hi")
    await asyncio.sleep(0.3)  # autosaved
    flaky.down = True
    with pytest.raises(lr.StoreUnavailable):
        await rs.pause()
    assert rs.state == "paused"
    flaky.down = False
    await asyncio.sleep(3.0)
    info = await store.info(KEY)
    await finish(session, rs)
    assert info is not None and info.info["state"] == "paused", (
        f"3 s after the store came back the paused session is stored as "
        f"{info.info['state'] if info else None!r}"
    )


# ------------------------------------------------------------- autosave backoff


async def test_autosave_backs_off_against_a_dead_store_under_a_stream_of_events() -> None:
    """autosave.py: "First retry soon (a blip), then back off to this cap so a dead store
    is not hammered" (RETRY_FIRST 0.2 s doubling to RETRY_CAP 10 s). The last commit made
    every trigger cut the backoff wait short. A session keeps producing events (a
    conversation going on, a tool reporting progress) every 50 ms while its store is down.

    Expected (docs/failure-model.md, "store unreachable"): events bring a retry forward,
    to no sooner than ``RETRY_NUDGED`` (0.5 s) after the failure (or its backoff, when
    shorter): at most about 9 attempts in 4 s.
    Found (as first written): each event ended the wait, so the store got one attempt
    per debounce window (0.2 s) for as long as events came, whatever the failure count:
    the backoff was gone (x100 sessions of a worker: hundreds of failing commits a
    second against a store that is down)."""
    attempts: list[float] = []

    async def checkpoint(_reason: str) -> int:
        attempts.append(time.monotonic())
        raise lr.StoreUnavailable("down (test)")

    async def renew() -> None:
        return None

    auto = Autosave(
        checkpoint,
        renew,
        key=KEY,
        debounce=0.2,
        renew_every=1000.0,
        renewed_at=time.monotonic,
    )
    auto.start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:
            auto.trigger("turn")
            await asyncio.sleep(0.05)
    finally:
        await auto.aclose()
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
    # the n-th retry waits its backoff (RETRY_FIRST doubling), or RETRY_NUDGED if shorter
    floors = [min(RETRY_FIRST * 2**n, RETRY_NUDGED) - 0.05 for n in range(len(gaps))]
    assert len(attempts) <= 4.0 / RETRY_NUDGED + 1, gaps
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), (
        f"{len(attempts)} failing saves in 4 s against a dead store (gaps {gaps})"
    )
