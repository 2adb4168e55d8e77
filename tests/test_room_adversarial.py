"""A room that is slow to take the agent's attributes must not hold back what matters.

The hooks publish the session's state as participant attributes
(``local_participant.set_attributes``). LiveKit answers that through its FFI, which
waits up to its request timeout (5 s) for a signal connection that is up but slow.
Saves, the lease's release and a restore must not wait on it: a caller would wait in
silence, and turns would reach the store late (lost with a crash meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from livekit_resume.errors import SnapshotNotFound
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.jobs import remote_participant
from tests.test_hooks import KEY, start, store

__all__ = ["store"]  # the fixture, parametrized over the memory and SQLite stores


class StuckRoom:
    """An `rtc.Room` stand-in (no LiveKit server here) whose attribute updates are
    answered only once ``answer`` is set: a signal connection up but not answering."""

    def __init__(self) -> None:
        self.name = "room-slow"
        self.remote_participants = {"caller-1": remote_participant("caller-1")}
        self.local_participant = self
        self.answer = asyncio.Event()
        self.asked: list[dict[str, str]] = []
        self.published: list[dict[str, str]] = []

    def isconnected(self) -> bool:
        return True

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.asked.append(dict(attributes))
        await self.answer.wait()
        self.published.append(dict(attributes))


async def test_a_restore_returns_without_waiting_for_the_room(store: Store) -> None:
    room = StuckRoom()
    begun = asyncio.ensure_future(start(store, ["hello"], room=room))
    try:
        session, rs, _ = await asyncio.wait_for(asyncio.shield(begun), 5)
    finally:
        room.answer.set()
    await until(lambda: room.published[-1:] == [{"resume.state": "active", "resume.version": "0"}])
    await rs.aclose()
    await session.aclose()


async def test_autosave_goes_on_while_the_room_does_not_answer(store: Store) -> None:
    room = StuckRoom()
    session, rs, _ = await _started(store, room, ["one", "two", "three"], autosave=True)
    answered = len(room.published)
    try:
        for n, said in enumerate(["a", "b", "c"], 1):
            await session.run(user_input=said)
            await eventually(
                lambda n=n: _turns_stored(store, n),  # type: ignore[misc]
                f"turn {n} is stored while the room has not answered",
                timeout=4,
            )
        assert len(room.asked) > 1, "the states were offered to the room"
        assert len(room.published) == answered, "the room answered none since"
    finally:
        room.answer.set()
    # once it answers, the room has the latest state
    await until(
        lambda: (
            room.published[-1:] == [{"resume.state": "active", "resume.version": str(rs.version)}]
        )
    )
    await rs.aclose()
    await session.aclose()


async def test_a_suspend_saves_and_releases_before_the_room_answers(store: Store) -> None:
    room = StuckRoom()
    session, rs, _ = await _started(store, room, ["one"])
    await session.run(user_input="a")
    suspending = asyncio.ensure_future(rs.suspend())
    try:

        async def saved_and_released() -> bool:
            info = await store.info(KEY)
            return info is not None and info.info.get("state") == "suspended" and info.owner is None

        await eventually(saved_and_released, "the final snapshot is stored, lease released", 4)
    finally:
        room.answer.set()
    version = await asyncio.wait_for(suspending, 5)
    assert room.published[-1] == {"resume.state": "suspended", "resume.version": str(version)}
    # the room heard the states in the order they happened, the last one last
    states = [a["resume.state"] for a in room.published]
    assert states == sorted(states, key=["active", "paused", "suspended"].index), states


async def _started(
    store: Store, room: StuckRoom, script: list[Any], **kw: Any
) -> tuple[Any, Any, Any]:
    """`start` with a room that answers the restore's own update, then gets stuck."""
    room.answer.set()
    started = await start(store, script, room=room, **kw)
    await until(lambda: bool(room.published))
    room.answer.clear()
    return started


async def _turns_stored(store: Store, turns: int) -> bool:
    try:
        stored = await store.load(KEY)
    except SnapshotNotFound:
        return False
    snap = Codec().decode_parts(KEY, stored.head, stored.streams, version=stored.version)
    return snap.meta.turn_count >= turns


async def until(holds: Callable[[], bool]) -> None:
    async def check() -> bool:
        return holds()

    await eventually(check, "the room has the state")
