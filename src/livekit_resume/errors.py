"""Typed errors. Every error of livekit-resume derives from `ResumeError`.

Messages name the key, version, epoch or agent id involved and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CommandRefused",
    "IncompatibleSnapshot",
    "LeaseLost",
    "ResumeError",
    "SessionBusy",
    "SignatureMismatch",
    "SnapshotCorrupt",
    "SnapshotNotFound",
    "SnapshotTooLarge",
    "StoreUnavailable",
    "TokenRefused",
    "UnknownAgent",
    "UnsavableValue",
]


class ResumeError(Exception):
    """Base class of every livekit-resume error."""


class SnapshotNotFound(ResumeError, LookupError):
    """No snapshot exists for the key (or not at the requested version)."""


class SnapshotCorrupt(ResumeError):
    """Stored bytes are not a valid snapshot: truncated, altered or foreign data."""


class IncompatibleSnapshot(ResumeError):
    """The snapshot was written by a newer format version than this library reads."""


class SnapshotTooLarge(ResumeError):
    """A frame (or a value declared inside it) exceeds the configured size limit."""


class SignatureMismatch(SnapshotCorrupt):
    """The frame's HMAC does not verify with any configured key, or a key is missing.

    ``unknown_key`` is the key id when the frame names a key this process was not given;
    ``plaintext`` is True when an unencrypted frame was refused because encryption keys
    are set (no ``RESUME_ALLOW_PLAINTEXT``). Either way the frame may well be intact: it
    is this process's configuration that cannot read it, and salvage must not drop it."""

    def __init__(
        self, message: str, *, unknown_key: str | None = None, plaintext: bool = False
    ) -> None:
        super().__init__(message)
        self.unknown_key = unknown_key
        self.plaintext = plaintext


class SessionBusy(ResumeError):
    """Another live worker holds the session's lease."""

    def __init__(self, message: str, *, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(ResumeError):
    """This writer's lease was taken over (its fencing epoch is stale): stop writing.

    ``current_epoch`` is the epoch the store holds now, when known. ``vanished`` is True
    when the session's record is gone (deleted, expired, or a store restarted without
    its data), or the store went back to an older state under this writer (versions it
    had acknowledged, or its acquisition, lost to a failover with asynchronous
    replication): nobody else took it then, and the writer may acquire it again and write
    the conversation whole.
    """

    def __init__(
        self, message: str, *, current_epoch: int | None = None, vanished: bool = False
    ) -> None:
        super().__init__(message)
        self.current_epoch = current_epoch
        self.vanished = vanished


class StoreUnavailable(ResumeError, ConnectionError):
    """The store could not be reached or did not answer in time."""


class UnknownAgent(ResumeError, LookupError):
    """A snapshot names an agent id that is not registered."""

    def __init__(self, agent_id: str, registered: list[str], *, saving: bool = False) -> None:
        known = ", ".join(sorted(registered)) or "none"
        super().__init__(
            f"the current agent {agent_id} is not registered (registered: {known}); "
            "register its class with AgentRegistry.register() so that it can be saved"
            if saving
            else f"snapshot names agent id {agent_id!r}, which is not registered "
            f"(registered: {known}); register the class with AgentRegistry.register() "
            "before restoring"
        )
        self.agent_id = agent_id
        self.registered = sorted(registered)


class UnsavableValue(ResumeError, ValueError):
    """One value of the session (in userdata, ``extra`` ...) cannot be saved as it is.

    ``path`` names it (``userdata.prefs['x']``); the message says its type and what to
    do. Only that value is refused: the rest of the session keeps saving.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class TokenRefused(ResumeError, PermissionError):
    """A reconnect token did not verify, expired, or names a conversation that ended."""


class CommandRefused(ResumeError):
    """A remote command (pause, resume, suspend) was not applied to a session.

    The message names the key, the command and why: no live owner, an owner that did
    not answer in time, a command aimed at an epoch the session left (taken over), or
    one the session's state does not allow. ``reason`` is that why, on its own.
    """

    def __init__(self, key: str, command: str, reason: str) -> None:
        super().__init__(f"{command} of session {key!r} refused: {reason}")
        self.key = key
        self.command = command
        self.reason = reason
