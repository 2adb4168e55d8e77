"""`Announcer`: what the room and the other workers learn about a session.

The room's clients read the state in the agent's participant attributes
(`ATTR_STATE`, `ATTR_VERSION`; the ``lk.`` prefix belongs to LiveKit). Other workers
hear state changes on the store's event channel, where the store has one
(`EventPublisher`). The job context, when there is one, names the room, the job and the
worker in every snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession, get_job_context
from livekit.agents.job import DEFAULT_PARTICIPANT_KINDS
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from prometheus_client import Counter
from pydantic_core import to_jsonable_python

from ..snapshot.model import SessionMeta, Writer
from ..stores.base import EventPublisher, Store, offers
from .silence import current_agent

__all__ = ["ATTR_STATE", "ATTR_VERSION", "Announcer"]

log = logging.getLogger("livekit_resume")

ATTR_STATE = "resume.state"
ATTR_VERSION = "resume.version"

ANNOUNCE_FAILURES = Counter(
    "livekit_resume_announce_failures",
    "State changes that could not be published to the room or the store",
    ["where"],
)


class Announcer:
    """Publishes one session's state; describes the job it runs in."""

    def __init__(self, store: Store, key: str, owner: str, room: rtc.Room | None) -> None:
        self._store = store
        self._key = key
        self._owner = owner
        self._room = room
        self._writer: Writer | None = None
        # The room is shown the latest state by one task at a time (`show`): requests
        # are numbered, and each waiter is told once its request or a later one is done.
        self._asked = 0
        self._shown = 0
        self._latest: tuple[str, int] = ("", 0)
        self._showing: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def room(self) -> rtc.Room | None:
        """The room given to us, else the running job's (None outside a job)."""
        if self._room is not None:
            return self._room
        ctx = get_job_context(required=False)
        return ctx.room if ctx else None

    def show(self, state: str, version: int) -> None:
        """Have the room show ``state`` and ``version`` as the agent's participant
        attributes, without waiting for it (`shown` waits).

        LiveKit answers an attribute update through its FFI, which waits up to its request
        timeout (5 s) on a signal connection that is up but slow: a save, a release or a
        restore that waited for it would keep a caller in silence and turns unsaved.
        States asked meanwhile are not queued: the room is then shown the latest."""
        room = self.room()
        if room is None or not room.isconnected():
            return
        self._asked += 1
        self._latest = (state, version)
        if self._showing is None or self._showing.done():
            self._showing = asyncio.ensure_future(self._show_latest(room))

    async def shown(self) -> None:
        """Wait until the room has the state last asked for by `show`, or gave up."""
        if self._shown >= self._asked or self._showing is None or self._showing.done():
            return
        done = asyncio.get_running_loop().create_future()
        self._waiters.append((self._asked, done))
        await asyncio.shield(done)

    async def _show_latest(self, room: rtc.Room) -> None:
        try:
            while self._shown < self._asked:
                asked, (state, version) = self._asked, self._latest
                try:
                    await room.local_participant.set_attributes(
                        {ATTR_STATE: state, ATTR_VERSION: str(version)}
                    )
                except Exception as e:
                    ANNOUNCE_FAILURES.labels(where="room").inc()
                    log.warning(
                        "could not publish the state of session %r to the room: %s",
                        self._key,
                        e,
                        extra={"key": self._key},
                    )
                self._shown = asked
                self._wake(asked)
        finally:
            self._wake(self._asked)  # cancelled (the loop closing): nobody waits for ever

    def _wake(self, upto: int) -> None:
        waiting = []
        for asked, done in self._waiters:
            if asked > upto:
                waiting.append((asked, done))
            elif not done.done():
                done.set_result(None)
        self._waiters = waiting

    async def announce(self, event: str, version: int) -> None:
        """Tell other workers, on the store's event channel where it has one."""
        if not offers(self._store, EventPublisher):
            return
        try:
            await self._store.publish(self._key, event, version=version, owner=self._owner)
        except Exception as e:
            ANNOUNCE_FAILURES.labels(where="store").inc()
            log.warning(
                "could not publish %s event of session %r: %s",
                event,
                self._key,
                e,
                extra={"key": self._key},
            )

    def writer(self) -> Writer:
        """Who writes: the job and worker (if any) and this process. Made once per job
        and process (a model validated on every checkpoint for the same values)."""
        ctx = get_job_context(required=False)
        worker_id = getattr(ctx, "worker_id", None) if ctx else None
        job_id = ctx.job.id if ctx else None
        pid = os.getpid()
        last = self._writer
        if last is None or (last.worker_id, last.job_id, last.pid) != (worker_id, job_id, pid):
            last = self._writer = Writer(worker_id=worker_id, job_id=job_id, pid=pid)
        return last

    def meta(
        self, session: AgentSession[Any], turns: int, extra: dict[str, Any], conversation: str
    ) -> SessionMeta:
        ctx = get_job_context(required=False)
        room = self.room()
        caller = next(iter(callers(room)), None) if room is not None else None
        identity = caller.identity if caller is not None else None
        agent = current_agent(session)
        try:
            usage = to_jsonable_python(session.usage, fallback=str)
        except Exception as e:
            log.debug("session usage not saved: %s", e)  # a nicety: never fail a checkpoint
            usage = {}
        return SessionMeta(
            conversation=conversation,
            room=room.name if room is not None else None,
            participant_identity=identity,
            job_id=ctx.job.id if ctx else None,
            agent_name=agent.id if agent is not None else None,
            turn_count=turns,
            usage=usage if isinstance(usage, dict) else {"value": usage},
            extra=extra,
        )


def callers(room: rtc.Room) -> list[rtc.RemoteParticipant]:
    """The room's remote participants a session talks with: those of the kinds LiveKit's
    RoomIO links by default (standard, SIP, connector), less any that publishes on this
    agent's behalf. An avatar (kind agent, publishing on its behalf) or another agent in
    the room is no caller: with only those left, the caller has gone."""
    try:
        me: str | None = room.local_participant.identity
    except Exception:  # a room not connected yet has no local participant
        me = None
    return [
        p
        for p in room.remote_participants.values()
        if p.kind in DEFAULT_PARTICIPANT_KINDS
        and (me is None or p.attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF) != me)
    ]
