"""What a snapshot is: plain data, validated by pydantic, never a pickled object.

Chat items are kept as plain dicts (see `chat.py` for the exact shape): they carry
every field LiveKit stores, with exact timestamps, and nothing a codec cannot write.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "FORMAT_VERSION",
    "AgentFrame",
    "ItemData",
    "Reason",
    "SessionMeta",
    "Snapshot",
    "SnapshotState",
    "ToolCallRecord",
    "Writer",
    "describe_invalid",
]

# Bumped whenever a stored shape changes; migrate.py upcasts older ones on load.
# 3: frames bind the namespace, heads their version and a seal of their item records
# (codec.py, seal.py); a snapshot may be "ended" and names its conversation. Nothing
# of format 2 changed meaning, so 2 -> 3 is the identity.
# 4: frames may be deflated with a preset dictionary (frame.FLAG_ZDICT); an agent frame
# may hold its realtime model's options (AgentFrame.realtime). 3 -> 4 is the identity.
FORMAT_VERSION = 4

Reason = Literal["turn", "tool", "handoff", "pause", "suspend", "close", "manual", "end"]
SnapshotState = Literal["active", "paused", "suspended", "ended"]
ItemData = dict[str, Any]
"""One chat item as plain data: `chat.item_to_data` makes it, `chat.item_from_data` reads it."""


class _Model(BaseModel):
    # Unknown fields are refused: a snapshot is read exactly, never guessed at. Bytes
    # (any bytes, in userdata or extra) have a JSON form: base64, both ways.
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class Writer(_Model):
    """Who wrote a snapshot."""

    worker_id: str | None = None
    job_id: str | None = None
    pid: int = Field(default_factory=os.getpid)
    host: str = Field(default_factory=socket.gethostname)


class SessionMeta(_Model):
    """What a session is about, beyond its conversation."""

    conversation: str | None = None
    """Random id of this conversation: kept across restores, new when an ended one is
    followed by a new call under the same key. Reconnect tokens name it."""
    room: str | None = None
    participant_identity: str | None = None
    job_id: str | None = None
    agent_name: str | None = None
    language: str | None = None
    turn_count: int = 0
    usage: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class AgentFrame(_Model):
    """The current agent: which registered class, its own context and state."""

    agent_id: str
    chat_ctx: list[ItemData] = Field(default_factory=list)
    instructions: str | dict[str, str | None] | None = None
    """`None` when unchanged since construction; a dict for `llm.Instructions` parts."""
    state: dict[str, Any] | None = None
    """What the agent's optional ``snapshot_state()`` returned."""
    task: str | None = None
    """Set when an `AgentTask` was running: its class name, for the record only."""
    realtime: dict[str, Any] | None = None
    """For an agent on a realtime model: its provider, model and plain options
    (``agent_hooks/realtime.py``)."""


class ToolCallRecord(_Model):
    """A tool call in flight or issued but not answered when the snapshot was taken."""

    call_id: str
    name: str
    arguments: str = ""
    started_at: float | None = None
    item_id: str | None = None
    status: Literal["running", "unanswered"] = "running"


class Snapshot(_Model):
    """One saved state of a session."""

    format_version: int = FORMAT_VERSION
    key: str
    version: int = 0
    """Assigned by the store on commit; 0 before."""
    created_at: float = Field(default_factory=time.time)
    writer: Writer = Field(default_factory=Writer)
    epoch: int = 0
    reason: Reason = "manual"
    state: SnapshotState = "active"
    meta: SessionMeta = Field(default_factory=SessionMeta)
    history: list[ItemData] = Field(default_factory=list)
    agent: AgentFrame | None = None
    userdata: Any = None
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)


def describe_invalid(exc: ValidationError) -> str:
    """What failed validation and why, by field, without the values: they are the
    conversation's own data (decrypted, when the store encrypts), and errors are logged."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)
    )
