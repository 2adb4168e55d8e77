"""A worker whose calls survive the job lifecycle: `resumable_job` with every option.

docs/lifecycle.md shows this file; tests/test_resumable_job.py runs `serve_call` in real
LiveKit job processes, with the demo's scripted model for the models and shorter times.

    RESUME_STORE=sqlite:///resume.db python examples/lifecycle.py dev
"""

from __future__ import annotations

import json

from livekit.agents import AgentServer, AgentSession, JobContext, cli

import livekit_resume as lr
from livekit_resume.cli.demo.agents import Receptionist, Visit, register_agents

server = AgentServer()


def reconnect_token(ctx: JobContext) -> str | None:
    """The reconnect token a client passed in the dispatch metadata, if any."""
    token = json.loads(ctx.job.metadata or "{}").get("token")
    return token if isinstance(token, str) else None


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession[Visit](
        stt="deepgram/nova-3", llm="openai/gpt-4.1-mini", tts="cartesia/sonic-3", userdata=Visit()
    )
    await serve_call(ctx, session)


async def serve_call(
    ctx: JobContext,
    session: AgentSession[Visit],
    *,
    leave_grace: float = 30.0,
    suspend_after: float = 120.0,
) -> lr.ResumableSession:
    """Everything but the models: restore (or start) the call and run it in the room."""
    registry = lr.AgentRegistry()
    register_agents(registry)  # the only classes a snapshot can ever rebuild
    return await lr.resumable_job(
        ctx,
        session,
        registry=registry,
        default=Receptionist,
        userdata_type=Visit,
        key=None,  # the dispatched room's name; or a str; or a function of ctx
        token=reconnect_token,  # a valid reconnect token names the key to resume instead
        leave_grace=leave_grace,  # pause when the last caller leaves, suspend after this
        suspend_after=suspend_after,  # a pause longer than this becomes a suspend
        resume_within=24 * 3600.0,  # a call saved longer ago starts afresh (kept aside)
    )


if __name__ == "__main__":
    cli.run_app(server)
