"""The job lifecycle pieces on a real AgentSession (text mode): long pauses suspend,
a fenced session goes quiet, the caller leaving and coming back (issue 19)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.agent_hooks.job import JobPolicy
from livekit_resume.stores.base import Store
from livekit_resume.testing.poll import eventually
from tests.lk.jobs import remote_participant
from tests.test_hooks import KEY, settled, start

DEADLINE = 10.0


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    s: Store = lr.open_store(
        "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/job.db"
    )
    yield s
    await s.aclose()


async def wait_for_state(rs: lr.ResumableSession, state: str) -> None:
    async def reached() -> bool:
        return rs.state == state

    await eventually(reached, f"the session is {state}", DEADLINE)


def closing(session: AgentSession[Any]) -> asyncio.Event:
    """Set once LiveKit closed ``session`` (its ``close`` event): a suspend ends there,
    after its state, its lease and its room attributes changed."""
    closed = asyncio.Event()
    session.on("close", lambda _event: closed.set())
    return closed


async def test_a_pause_longer_than_suspend_after_suspends_and_restores_with_nothing_lost(
    store: Store,
) -> None:
    session, rs, _ = await start(store, ["one", "two"], suspend_after=0.2)
    closed = closing(session)
    await session.run(user_input="remember the blue door")
    await rs.pause()
    await asyncio.wait_for(closed.wait(), DEADLINE)
    assert rs.state == "suspended"
    assert rs._lease is None  # released: any worker may restore it now
    info = await store.info(KEY)
    assert info is not None and info.owner is None and info.info["state"] == "suspended"

    session2, rs2, model = await start(store, ["three"], owner="w2")
    assert rs2.resumed and rs2.version == rs.version
    await session2.run(user_input="what did I say?")
    sent = model.requests[-1].texts("user")
    assert sent[:2] == ["remember the blue door", "what did I say?"][: len(sent[:2])]
    await rs2.aclose()
    await session2.aclose()


async def test_resuming_before_suspend_after_keeps_the_session_in_place(store: Store) -> None:
    session, rs, _ = await start(store, ["one", "two"], suspend_after=0.2)
    await session.run(user_input="a")
    await rs.pause()
    assert rs._long_pause.armed
    await rs.resume()
    assert not rs._long_pause.armed  # the timer is gone: nothing will suspend it
    await session.run(user_input="b")
    assert rs.state == "active"
    await rs.aclose()
    await session.aclose()


async def test_a_session_taken_over_calls_on_lost_once_and_writes_nothing(store: Store) -> None:
    lost: list[lr.LeaseLost] = []
    went_quiet = asyncio.Event()

    async def on_lost(error: lr.LeaseLost) -> None:
        lost.append(error)
        went_quiet.set()

    s1, rs1, _ = await start(
        store, ["hi", "still here"], owner="job-1", autosave=True, on_lost=on_lost
    )
    await s1.run(user_input="hello")
    await settled(rs1)
    s2, rs2, _ = await start(store, [], owner="job-2", takeover=True)
    taken = await store.versions(KEY)
    await s1.run(user_input="are you there?")  # the zombie's autosave meets the new epoch
    await asyncio.wait_for(went_quiet.wait(), DEADLINE)
    assert len(lost) == 1 and not lost[0].vanished
    assert await store.versions(KEY) == taken
    await rs2.aclose()
    await s2.aclose()
    await rs1.aclose()
    await s1.aclose()


class RoomStandIn(rtc.EventEmitter[str]):
    """What the job policy uses of a room: its participants and their events."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "room-job"
        self.remote_participants: dict[str, Any] = {"caller": object()}
        self.local_participant = self
        self.attributes: list[dict[str, str]] = []

    def isconnected(self) -> bool:
        return True

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.attributes.append(dict(attributes))

    def leave(self, identity: str) -> None:
        participant = self.remote_participants.pop(identity)
        self.emit("participant_disconnected", participant)

    def join(self, identity: str) -> None:
        self.remote_participants[identity] = remote_participant(identity)
        self.emit("participant_connected", self.remote_participants[identity])


async def test_the_caller_leaving_pauses_and_coming_back_within_the_grace_resumes(
    store: Store,
) -> None:
    room = RoomStandIn()
    session, rs, _ = await start(store, ["one", "two"], room=room)
    policy = JobPolicy(rs, room, leave_grace=5.0)  # type: ignore[arg-type]
    policy.start()
    await session.run(user_input="a")
    room.leave("caller")
    await wait_for_state(rs, "paused")
    assert room.attributes[-1]["resume.state"] == "paused"
    room.join("caller")
    await wait_for_state(rs, "active")
    await session.run(user_input="b")  # answered: resumed in place
    assert [m.role for m in session.history.items if m.type == "message"][-2:] == [
        "user",
        "assistant",
    ]
    policy.stop()
    await rs.aclose()
    await session.aclose()


async def test_nobody_coming_back_within_the_grace_suspends_and_releases(store: Store) -> None:
    room = RoomStandIn()
    session, rs, _ = await start(store, ["one"], room=room)
    policy = JobPolicy(rs, room, leave_grace=0.2)  # type: ignore[arg-type]
    policy.start()
    closed = closing(session)
    await session.run(user_input="a")
    room.leave("caller")
    await asyncio.wait_for(closed.wait(), DEADLINE)
    assert rs.state == "suspended"
    assert rs._lease is None and room.attributes[-1]["resume.state"] == "suspended"
    info = await store.info(KEY)
    assert info is not None and info.owner is None
    policy.stop()


async def test_one_of_two_participants_leaving_changes_nothing(store: Store) -> None:
    room = RoomStandIn()
    room.remote_participants["supervisor"] = remote_participant("supervisor")
    session, rs, _ = await start(store, ["one"], room=room)
    policy = JobPolicy(rs, room, leave_grace=0.2)  # type: ignore[arg-type]
    policy.start()
    room.leave("supervisor")
    await asyncio.sleep(0.3)  # longer than the grace: nothing may happen meanwhile
    assert rs.state == "active"
    policy.stop()
    await rs.aclose()
    await session.aclose()


async def test_a_conversation_older_than_resume_within_is_kept_aside_and_not_resumed() -> None:
    from livekit_resume.agent_hooks.job import archive_stale
    from livekit_resume.bridge import from_stored
    from livekit_resume.snapshot.codec import Codec
    from livekit_resume.stores.memory import MemoryStore

    offset = [-3600.0]  # the conversation happened an hour ago
    store = MemoryStore(clock=lambda: time.time() + offset[0])
    session, rs, _ = await start(store, ["one", "two"])
    await session.run(user_input="my order number is 4711")
    version = await rs.suspend()
    before = from_stored(Codec(), await store.load(KEY))
    offset[0] = 0.0

    assert await archive_stale(store, Codec(), KEY, older_than=7200, owner="job") is None
    archived = await archive_stale(store, Codec(), KEY, older_than=60, owner="job")
    assert archived == f"{KEY}~v{version}"
    with pytest.raises(lr.SnapshotNotFound):
        await store.load(KEY)  # the key starts afresh
    kept = from_stored(Codec(), await store.load(archived))
    assert kept.history == before.history and kept.userdata == before.userdata

    session2, rs2, _ = await start(store, ["hello again"], owner="w2")
    assert not rs2.resumed and rs2.version == 0
    await rs2.aclose()
    await session2.aclose()


async def test_a_held_or_recent_conversation_is_never_archived(store: Store) -> None:
    from livekit_resume.agent_hooks.job import archive_stale
    from livekit_resume.snapshot.codec import Codec

    session, rs, _ = await start(store, ["one"])
    await session.run(user_input="a")
    await rs.checkpoint()
    # held by a live worker: left alone however old the limit says it is
    assert await archive_stale(store, Codec(), KEY, older_than=-1, owner="job") is None
    await rs.suspend()
    assert await archive_stale(store, Codec(), KEY, older_than=3600, owner="job") is None
    assert (await store.load(KEY)).version == rs.version
