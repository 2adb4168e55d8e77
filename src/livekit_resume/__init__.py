"""livekit-resume: resumable LiveKit voice agents.

Hooks on a live `AgentSession` save its chat context, tool state and metadata as
versioned snapshots in a store (SQLite by default, Redis for clusters), so a paused
session resumes instantly and a suspended, crashed or moved one is restored anywhere.
"""

from .agent_hooks.registry import AgentRegistry
from .agent_hooks.session import ResumableSession
from .errors import (
    IncompatibleSnapshot,
    LeaseLost,
    ResumeError,
    SessionBusy,
    SignatureMismatch,
    SnapshotCorrupt,
    SnapshotNotFound,
    SnapshotTooLarge,
    StoreUnavailable,
    UnknownAgent,
)
from .snapshot.model import Snapshot
from .stores.base import Store
from .stores.url import open_store

__all__ = [
    "AgentRegistry",
    "IncompatibleSnapshot",
    "LeaseLost",
    "ResumableSession",
    "ResumeError",
    "SessionBusy",
    "SignatureMismatch",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotNotFound",
    "SnapshotTooLarge",
    "Store",
    "StoreUnavailable",
    "UnknownAgent",
    "open_store",
]

__version__ = "0.1.0"
