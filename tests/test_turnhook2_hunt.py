"""Hunt (area: turnhook2): 1b83706's three changes to a suspend or an end from
``on_user_turn_completed`` (aclose from the hook not waiting, LeaseLost after the final
save dropping the lease quietly, restore waiting for the turn's save), and what they
touch: restores from or during the window, takeovers during an ordinary suspend's
settle, real stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, llm

import livekit_resume as lr
from livekit_resume.stores.base import Store
from tests._gated import GatedStore, bounded, key_fixture, sigterm_kept, store_fixture, until
from tests.conftest import STORE_FACTORIES
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_endings_hunt import HookFinisher, done_with, finish_from_the_hook, latest, texts
from tests.test_review14_hunt import begin, cleanup, stored_state
from tests.test_turnhook_hunt import (
    DO,
    GOODBYE,
    Doer,
    hook_does,
    taken_over_in_the_window,
    told_once,
)

__all__ = ["key", "sigterm_kept", "store"]

pytestmark = pytest.mark.filterwarnings("ignore")

store = store_fixture(GatedStore)
key = key_fixture("turnhook2")


def user_said(session: AgentSession[Any]) -> list[str]:
    return [
        i.text_content or ""
        for i in session.history.items
        if isinstance(i, llm.ChatMessage) and i.role == "user"
    ]


# ------------------------------------------------ 1. restores from or during the window


async def test_a_restore_in_place_from_the_hook_after_its_suspend_does_not_hang(
    store: GatedStore, key: str
) -> None:
    """The hook suspends, then restores the same ResumableSession into its own
    AgentSession (history emptied, as `restore` asks). Expected: the restore returns or
    is refused within a few seconds; never a wait for ever (LiveKit's close of that
    session waits for the hook, which waits for the restore). It waited for ever."""

    async def suspend_then_restore_in_place(rs: lr.ResumableSession) -> None:
        await rs.suspend()
        session = DO["session"]
        session.history.items.clear()
        try:
            # awaited from the hook's own task: one the hook starts (Python 3.11's
            # asyncio.wait_for makes one) is taken for the app's (lifecycle.md)
            await rs.restore(session, default=Doer)
            DO["restore"] = "restored"
        except Exception as e:
            DO["restore"] = f"refused: {e}"

    DO.clear()
    holder: dict[str, Any] = {}

    async def do(rs: lr.ResumableSession) -> None:
        DO["session"] = holder["session"]
        await suspend_then_restore_in_place(rs)

    # hook_does makes the session: the hook reads it through DO
    from tests.lk import fake_voice

    made = fake_voice.make_voice_session

    def capture(*a: Any, **kw: Any) -> AgentSession[Any]:
        s = made(*a, **kw)
        holder["session"] = s
        return s

    import tests.test_turnhook_hunt as th

    th.make_voice_session = capture  # type: ignore[attr-defined]
    try:
        session, rs = await hook_does(store, key, do, wait_for="done")
    finally:
        th.make_voice_session = made  # type: ignore[attr-defined]
    try:
        assert DO.get("restore", "").startswith(("restored", "refused")), DO.get("restore")
    finally:
        await done_with(rs, session)
        DO.clear()


async def test_a_restore_into_a_new_session_from_the_hook_after_its_suspend(
    store: GatedStore, key: str
) -> None:
    """The hook suspends, then restores the ResumableSession into a new AgentSession (the
    app moving the call on). Expected: it returns or is refused within 3 s (not held
    for ever); restored, the new session has each of the caller's turns at most once."""
    back = make_text_session(ScriptedLLM(default="welcome back"))

    async def suspend_then_restore(rs: lr.ResumableSession) -> None:
        await rs.suspend()
        try:
            await asyncio.wait_for(rs.restore(back, default=Doer), 3)
            DO["restore"] = "restored"
        except TimeoutError:
            DO["restore"] = "hung"
        except Exception as e:
            DO["restore"] = f"refused: {e}"

    session, rs = await hook_does(store, key, suspend_then_restore)
    try:
        assert DO.get("restore", "").startswith(("restored", "refused")), DO.get("restore")
        if DO["restore"] == "restored":
            said = user_said(back)
            assert len(said) == len(set(said)), said
    finally:
        await done_with(rs, session)
        await bounded(back.aclose(), "the new session's close", 10)
        DO.clear()


async def test_a_restore_cancelled_during_the_window_leaves_the_suspend_to_finish(
    store: GatedStore, key: str
) -> None:
    """A restore into a new AgentSession, waiting for the turn's save (the hook goes on
    0.6 s), is cancelled (a job cancelling it). Expected: the suspend finishes as if no
    restore came (suspended with the goodbye, lease free), and a later restore into a
    new session resumes with each of the caller's turns once."""
    session, rs = await finish_from_the_hook(store, key, "suspend", after=0.6)
    back = make_text_session(ScriptedLLM(default="welcome back"))
    back2 = make_text_session(ScriptedLLM(default="welcome back"))
    try:
        restoring = asyncio.ensure_future(rs.restore(back, default=HookFinisher))
        await asyncio.sleep(0.1)
        assert not restoring.done(), restoring
        restoring.cancel()
        await asyncio.gather(restoring, return_exceptions=True)
        await until(lambda: rs.state == "suspended", f"suspended ({rs.state})", 5)
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        assert texts((await latest(store, key)).history) == GOODBYE
        await bounded(rs.restore(back2, default=HookFinisher), "the restore after", 5)
        assert rs.resumed and user_said(back2) == GOODBYE, user_said(back2)
    finally:
        await done_with(rs, session)
        await bounded(back.aclose(), "close", 10)
        await bounded(back2.aclose(), "close", 10)


async def test_an_aclose_racing_a_restore_waiting_in_the_window(
    store: GatedStore, key: str
) -> None:
    """A restore into a new AgentSession waits for the turn's save (the hook goes on
    0.5 s); the job's shutdown closes the hooks meanwhile. Expected: the restore is
    refused (RuntimeError: closed), the close returns, the store says suspended with
    the goodbye, the lease free, nothing attached to the new session."""
    session, rs = await finish_from_the_hook(store, key, "suspend", after=0.5)
    back = make_text_session(ScriptedLLM(default="welcome back"))
    try:
        restoring = asyncio.ensure_future(rs.restore(back, default=HookFinisher))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(rs.aclose())
        outcome = await bounded(asyncio.gather(restoring, return_exceptions=True), "restore", 5)
        await bounded(closing, "aclose", 5)
        assert isinstance(outcome[0], RuntimeError), outcome
        assert rs.state == "closed"
        state, owner, _v = await stored_state(store, key)
        assert (state, owner) == ("suspended", None)
        assert texts((await latest(store, key)).history) == GOODBYE
        assert user_said(back) == []
    finally:
        await done_with(rs, session)
        await bounded(back.aclose(), "close", 10)


# ------------------------------------- 2. a takeover after an ordinary suspend's save


@pytest.mark.parametrize("how", ["suspend", "end"])
async def test_a_takeover_during_an_ordinary_settle_is_not_written_over(
    store: GatedStore, key: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's suspend (or end) from its own task, past its final save, its settle's
    commit held at the store: autosave's save, queued behind the final save, with a turn
    that came during it; another worker takes the key over meanwhile. Expected: the
    suspend returns, the taker's lease and version stand (nothing of the first worker's
    lands after), its checkpoint works, the first worker says suspended/ended and holds
    no lease, its later restore without takeover is refused busy (never duplicating the
    call), and its app is told once, by on_lost, whichever save met the takeover."""
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    lost: list[BaseException] = []

    async def on_lost(e: BaseException) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    store.commit_gate.arm()
    finishing = asyncio.ensure_future(getattr(rs, how)())
    await bounded(store.commit_gate.entered.wait(), "the final save's commit")
    rs._autosave.trigger("turn")  # an event during the final save (a turn, a state)
    await until(lambda: bool(rs._lock._waiters), "autosave's save waits behind the final save")
    session.history.add_message(role="user", content="one more thing")  # for the settle
    store.commit_gate.open()
    store.commit_gate.arm()  # the final save goes on; the settle's commit is held
    await bounded(store.commit_gate.entered.wait(), "the settle's commit")
    back2 = make_text_session(ScriptedLLM(default="again"))
    try:
        from tests.test_job_policy_adversarial import Clerk

        # another worker takes the key over (its restore's acquisition)
        lease2 = await bounded(store.acquire(key, "other-worker", ttl=15, takeover=True), "take")
        taken_at = (await stored_state(store, key))[2]
        store.commit_gate.open()
        version = await bounded(finishing, how)
        await asyncio.sleep(0.2)
        final = "suspended" if how == "suspend" else "ended"
        assert rs.state == final, rs.state
        assert version >= 1
        assert rs._holder.lease is None
        _s, owner, v = await stored_state(store, key)
        assert (owner, v) == ("other-worker", taken_at)
        renewed = await bounded(store.renew(lease2, ttl=15), "the taker renews")
        assert renewed.epoch == lease2.epoch
        if how == "suspend":
            with pytest.raises(lr.SessionBusy):
                await bounded(rs.restore(back2, default=Clerk), "restore again")
        told_once(lost, caplog)
    finally:
        await cleanup(store, finishing)
        await bounded(rs.aclose(), "rs close")
        await bounded(session.aclose(), "close", 10)
        await bounded(back2.aclose(), "close", 10)


# ------------------------------------------------------------ 3. real stores


@pytest.fixture(params=["sqlite", "redis"])
async def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await STORE_FACTORIES[request.param](request, tmp_path)
    yield s
    await s.aclose()


async def test_on_real_stores_a_takeover_during_the_window_is_not_written_over(
    real_store: Store, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite and Redis: the hook suspends and goes on (1 s); another worker takes the
    key over meanwhile. Expected: the taker's lease and version stand, its checkpoint
    works, the first worker gives up without on_lost or an ERROR, its lease gone."""
    await taken_over_in_the_window(real_store, key, caplog)
