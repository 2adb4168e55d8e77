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

The agents (a receptionist that hands over to a booking desk) are the ones
``livekit-resume demo`` runs, in ``livekit_resume.cli.demo.agents``: read them there, or
copy that module next to your worker and import it instead.
"""

from __future__ import annotations

import logging

from livekit import rtc
from livekit.agents import AgentServer, AgentSession, JobContext, cli

import livekit_resume as lr
from livekit_resume.cli.demo.agents import Receptionist, Visit, register_agents

log = logging.getLogger("resumable-worker")


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    # One store per job process: RESUME_STORE (sqlite:///resume.db, redis://…), with
    # RESUME_NAMESPACE / RESUME_TTL / RESUME_SIGNING_KEYS / RESUME_ENCRYPTION_KEYS.
    store = lr.open_store()
    registry = lr.AgentRegistry()
    rs = lr.ResumableSession(store, ctx.room.name, registry=registry, userdata_type=Visit)
    # the only classes a snapshot can ever rebuild; built "restored", with these hooks
    register_agents(registry, rs)

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
