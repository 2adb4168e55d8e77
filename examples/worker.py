"""A LiveKit voice agent whose conversations survive restarts, crashes and redeploys.

Each room is one session key (pass ``key=`` to `resumable_job` to follow a caller across
rooms instead). When a job starts for a room, the worker restores the room's
conversation (history, current agent with its context, userdata) if a snapshot exists,
or starts fresh; autosave snapshots every turn; a shutdown saves once more.
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
    session = AgentSession[Visit](
        stt="deepgram/nova-3",
        llm="openai/gpt-4.1-mini",
        tts="cartesia/sonic-3",
        userdata=Visit(),
    )
    await serve_call(ctx, session)


async def serve_call(ctx: JobContext, session: AgentSession[Visit]) -> lr.ResumableSession:
    """Everything but the models: the same code runs with a scripted model in the tests."""
    registry = lr.AgentRegistry()
    register_agents(registry)  # the only classes a snapshot can ever rebuild

    # One call: restore the room's conversation (or start fresh) from RESUME_STORE, take
    # it over from a crashed or replaced job at once (the old one, if alive, is fenced and
    # goes quiet), start the session, pause when the caller drops and suspend after 30 s,
    # save and release on shutdown.
    rs = await lr.resumable_job(
        ctx, session, registry=registry, default=Receptionist, userdata_type=Visit
    )
    log.info(
        "room %s: %s at version %d",
        ctx.job.room.name,
        "resumed" if rs.resumed else "new conversation",
        rs.version,
    )

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
    return rs


if __name__ == "__main__":
    cli.run_app(server)
