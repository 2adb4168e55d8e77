"""A LiveKit voice agent whose conversations survive restarts, crashes and redeploys.

Each room is one session key. When a job starts for a room, the worker restores the
room's conversation (history, current agent with its context, userdata) if a snapshot
exists, or starts fresh; autosave snapshots every turn; a shutdown saves once more.
Kill the worker mid-call, start it again (or another one, on another machine sharing the
Redis store), and the agent picks up where it stopped, without greeting twice.

    RESUME_STORE=sqlite:///resume.db python examples/worker.py dev

Clients can pause, resume or suspend the agent with RPC calls (``resume.pause``,
``resume.resume``, ``resume.suspend``) and read its state from the agent participant's
``resume.state`` / ``resume.version`` attributes. See examples/README.md.
"""

from __future__ import annotations

import logging

from livekit import rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    RunContext,
    cli,
    function_tool,
    llm,
)
from pydantic import BaseModel

import livekit_resume as lr

log = logging.getLogger("resumable-worker")


class Visit(BaseModel):
    """Session userdata, saved with every snapshot and validated on restore."""

    name: str | None = None
    day: str | None = None


class _Resumable(Agent):
    """Greets on entry, unless it was rebuilt from a snapshot: LiveKit runs ``on_enter``
    on every ``session.start()``, a restore included."""

    def __init__(
        self,
        rs: lr.ResumableSession,
        *,
        instructions: str,
        restored: bool = False,
        chat_ctx: llm.ChatContext | None = None,
    ) -> None:
        super().__init__(instructions=instructions, chat_ctx=chat_ctx)
        self._rs = rs
        self._restored = restored

    async def on_enter(self) -> None:
        if self._restored and self._rs.resumed:
            return  # the caller is mid-conversation: no second welcome
        self.session.generate_reply(instructions="Greet the caller briefly.")


class Receptionist(_Resumable):
    def __init__(self, rs: lr.ResumableSession, *, restored: bool = False) -> None:
        super().__init__(
            rs,
            restored=restored,
            instructions=(
                "You are the front desk of the Riverside clinic. Ask for the caller's name "
                "and record it, then hand them to the booking desk for appointments."
            ),
        )

    @function_tool
    async def record_name(self, context: RunContext[Visit], name: str) -> str:
        """Record the caller's name.

        Args:
            name: the caller's first name
        """
        context.userdata.name = name
        return f"name recorded: {name}"

    @function_tool
    async def transfer_to_booking(self, context: RunContext[Visit]) -> Agent:
        """Hand the caller to the booking desk."""
        # the booking desk hears the conversation so far (messages, not our tool calls)
        heard = self.chat_ctx.copy(
            exclude_instructions=True,
            exclude_function_call=True,
            exclude_handoff=True,
            exclude_config_update=True,
        )
        return Booking(self._rs, chat_ctx=heard)


class Booking(_Resumable):
    def __init__(
        self,
        rs: lr.ResumableSession,
        *,
        restored: bool = False,
        chat_ctx: llm.ChatContext | None = None,
    ) -> None:
        super().__init__(
            rs,
            restored=restored,
            chat_ctx=chat_ctx,
            instructions="You are the booking desk of the Riverside clinic. Book visits.",
        )

    @function_tool
    async def book_visit(self, context: RunContext[Visit], day: str) -> str:
        """Book the caller's visit.

        Args:
            day: the weekday of the visit
        """
        context.userdata.day = day
        return f"booked {day} for {context.userdata.name or 'the caller'}"


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    # One store per job process: RESUME_STORE (sqlite:///resume.db, redis://…), with
    # RESUME_NAMESPACE / RESUME_TTL / RESUME_SIGNING_KEYS / RESUME_ENCRYPTION_KEYS.
    store = lr.open_store()
    registry = lr.AgentRegistry()
    rs = lr.ResumableSession(store, ctx.room.name, registry=registry, userdata_type=Visit)
    # the only classes a snapshot can ever rebuild; built "restored", with these hooks
    registry.register(Receptionist, factory=lambda _state: Receptionist(rs, restored=True))
    registry.register(Booking, factory=lambda _state: Booking(rs, restored=True))

    async def final_save() -> None:
        # LiveKit closes the session first, then runs this with ~10 s left: one small
        # last write (autosave already has every turn), then the lease is released.
        try:
            await rs.aclose()
        finally:
            await store.aclose()

    ctx.add_shutdown_callback(final_save)

    session = AgentSession[Visit](
        stt="deepgram/nova-3",
        llm="openai/gpt-4.1-mini",
        tts="cartesia/sonic-3",
        userdata=Visit(),
    )
    # LiveKit dispatches one job per room: a new job for a room whose lease is still live
    # means the previous worker died or is being replaced. Take over; the fencing epoch
    # stops the old one if it is in fact still running.
    agent = await rs.restore(session, default=lambda: Receptionist(rs), takeover=True)
    log.info(
        "room %s: %s at version %d",
        ctx.room.name,
        "resumed" if rs.resumed else "new conversation",
        rs.version,
    )
    await session.start(agent, room=ctx.room)

    # Let clients pause, resume and suspend the agent.
    async def pause(_: rtc.RpcInvocationData) -> str:
        return str(await rs.pause())

    async def resume(_: rtc.RpcInvocationData) -> str:
        await rs.resume()
        return str(rs.version)

    async def suspend(_: rtc.RpcInvocationData) -> str:
        version = await rs.suspend()  # final snapshot, lease released, session closed
        ctx.shutdown(reason="suspended")
        return str(version)

    participant = ctx.room.local_participant
    participant.register_rpc_method("resume.pause", pause)
    participant.register_rpc_method("resume.resume", resume)
    participant.register_rpc_method("resume.suspend", suspend)


if __name__ == "__main__":
    cli.run_app(server)
