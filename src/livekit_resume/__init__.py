"""livekit-resume: resumable LiveKit voice agents.

Hooks on a live `AgentSession` save its chat context, tool state and metadata as
versioned snapshots in a store (SQLite by default, Redis for clusters), so a paused
session resumes instantly and a suspended, crashed or moved one is restored anywhere.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    CommandRefused,
    IncompatibleSnapshot,
    LeaseLost,
    ResumeError,
    SessionBusy,
    SignatureMismatch,
    SnapshotCorrupt,
    SnapshotNotFound,
    SnapshotTooLarge,
    StoreUnavailable,
    TokenRefused,
    UnknownAgent,
    UnsavableValue,
)
from .snapshot.model import Snapshot
from .stores.base import Commit, Lease, Record, SessionInfo, SnapshotInfo, Store, Stored
from .stores.url import open_store
from .tokens import issue_token, verify_token

if TYPE_CHECKING:
    from .agent_hooks.job import resumable_job
    from .agent_hooks.registry import AgentRegistry
    from .agent_hooks.session import ResumableSession
    from .remote import control

__all__ = [
    "AgentRegistry",
    "CommandRefused",
    "Commit",
    "IncompatibleSnapshot",
    "Lease",
    "LeaseLost",
    "Record",
    "ResumableSession",
    "ResumeError",
    "SessionBusy",
    "SessionInfo",
    "SignatureMismatch",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotInfo",
    "SnapshotNotFound",
    "SnapshotTooLarge",
    "Store",
    "StoreUnavailable",
    "Stored",
    "TokenRefused",
    "UnknownAgent",
    "UnsavableValue",
    "control",
    "issue_token",
    "open_store",
    "resumable_job",
    "verify_token",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The hooks import livekit.agents (over a second of start-up): the command line and
    # code that only reads stores do not pay for it until they touch the hooks.
    if name == "AgentRegistry":
        from .agent_hooks.registry import AgentRegistry

        return AgentRegistry
    if name == "ResumableSession":
        from .agent_hooks.session import ResumableSession

        return ResumableSession
    if name == "resumable_job":
        from .agent_hooks.job import resumable_job

        return resumable_job
    if name == "control":
        from .remote import control

        return control
    raise AttributeError(f"module 'livekit_resume' has no attribute {name!r}")
