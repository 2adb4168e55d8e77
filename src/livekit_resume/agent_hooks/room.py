"""`Announcer`: what the room and the other workers learn about a session.

The room's clients read the state in the agent's participant attributes
(`ATTR_STATE`, `ATTR_VERSION`; the ``lk.`` prefix belongs to LiveKit). Other workers
hear state changes on the store's event channel, where the store has one
(`EventPublisher`). The job context, when there is one, names the room, the job and the
worker in every snapshot.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession, get_job_context
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

    def room(self) -> rtc.Room | None:
        """The room given to us, else the running job's (None outside a job)."""
        if self._room is not None:
            return self._room
        ctx = get_job_context(required=False)
        return ctx.room if ctx else None

    async def publish_attributes(self, state: str, version: int) -> None:
        room = self.room()
        if room is None or not room.isconnected():
            return
        try:
            await room.local_participant.set_attributes(
                {ATTR_STATE: state, ATTR_VERSION: str(version)}
            )
        except Exception as e:
            ANNOUNCE_FAILURES.labels(where="room").inc()
            log.warning("could not publish resume state to the room: %s", e)

    async def announce(self, event: str, version: int) -> None:
        """Tell other workers, on the store's event channel where it has one."""
        if not offers(self._store, EventPublisher):
            return
        try:
            await self._store.publish(self._key, event, version=version, owner=self._owner)
        except Exception as e:
            ANNOUNCE_FAILURES.labels(where="store").inc()
            log.warning("could not publish %s event of session %r: %s", event, self._key, e)

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
        identity = next(iter(room.remote_participants), None) if room is not None else None
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
