"""Remote control of live sessions: pause, resume or suspend a session that another
process runs, through the store (issue 16).

``await lr.control(store).pause(key)`` sends the command to the worker that holds the
session's lease (its `ResumableSession` listens while it holds it), which applies it
through its own `pause`/`resume`/`suspend` and answers with its version. A command
carries the epoch it is aimed at: after a takeover it is refused, never applied to the
worker that took over. See docs/control.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Literal

from .errors import CommandRefused
from .stores.base import Command, CommandChannel, Controllable, Store, offers, validate_key

log = logging.getLogger("livekit_resume")

__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "SessionControl", "Verb", "control"]

Verb = Literal["pause", "resume", "suspend"]

# How long a sender waits for the owner to take a command (and again to apply one it
# took): a pause writes a snapshot, a suspend closes the session, both well within it.
DEFAULT_TIMEOUT = 5.0
# A command's state is kept 300 s by every store (stores/*control.py); a sender waits at
# most twice its timeout, so 120 s leaves a wide margin. More is a mistake, not a need.
MAX_TIMEOUT = 120.0
# How often a sender looks for the answer: first after FIRST_POLL, then twice as long
# each time up to ANSWER_POLL. An owner listening on pub/sub answers within milliseconds;
# a command is a rare, human-paced event, and 50 ms is below what a supervisor notices.
FIRST_POLL = 0.005
ANSWER_POLL = 0.05


def control(store: Store) -> SessionControl:
    """Remote control of the live sessions kept in ``store``, from any process.

    ``await control(store).pause(key)``, ``.resume(key)`` and ``.suspend(key)`` reach the
    worker whose `ResumableSession` holds ``key``'s lease; it applies the command through
    its own method and each call returns the version it wrote. Keywords: ``epoch`` (the
    lease epoch aimed at; default the current one) and ``timeout`` (seconds, default 5).
    A command not applied raises `CommandRefused` naming why. See docs/control.md.
    """
    return SessionControl(store)


class SessionControl:
    """Sends pause, resume and suspend to the live owner of a session, through ``store``.

    Each method aims at ``epoch`` (default: the session's current lease epoch) and
    returns the version the owner wrote (``resume``: the version current after
    resuming). Pausing a paused session, or resuming an active one, changes nothing and
    returns the current version, so a command whose answer was lost can be sent again.
    Everything else raises `CommandRefused` naming why: no live owner (at once), an
    owner that did not answer within ``timeout`` seconds, a command aimed at an epoch
    the session left (taken over), or a state that does not allow it.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def pause(
        self, key: str, *, epoch: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        """Soft-pause the session: its audio and replies stop, the state is saved."""
        return await self._send("pause", key, epoch, timeout)

    async def resume(
        self, key: str, *, epoch: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        """Undo a pause, in the process that runs the session."""
        return await self._send("resume", key, epoch, timeout)

    async def suspend(
        self, key: str, *, epoch: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        """Hard-suspend the session: final snapshot, lease released, session closed."""
        return await self._send("suspend", key, epoch, timeout)

    async def _send(self, verb: Verb, key: str, epoch: int | None, timeout: float) -> int:
        validate_key(key)
        if isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and 0 < timeout <= MAX_TIMEOUT
        ):
            # True is an int to Python: it was taken as 1 s (an epoch of True is refused)
            raise ValueError(f"timeout must be seconds in (0, {MAX_TIMEOUT:g}], not {timeout!r}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            # a bad argument, like the key or the timeout: text reached the comparison
            # with the session's epoch as a bare TypeError, True aimed at epoch 1
            raise ValueError(f"epoch must be a whole number (or None), not {epoch!r}")
        channel = self._channel(verb, key)
        info = await self._store.info(key)
        if info is None:
            raise CommandRefused(key, verb, "no live owner: the store has no such session")
        if info.owner is None:
            state = info.info.get("state")
            was = f" (last saved as {state})" if state else ""
            raise CommandRefused(key, verb, f"no live owner: nobody holds its lease{was}")
        aimed = info.epoch if epoch is None else epoch
        if aimed != info.epoch:
            raise CommandRefused(key, verb, epoch_mismatch(aimed, info.epoch))
        command = Command(uuid.uuid4().hex, key, verb, aimed, timeout=float(timeout))
        try:
            if await channel.send(command) == 0:
                raise CommandRefused(
                    key, verb, f"no live owner: {info.owner!r} holds the lease but is not listening"
                )
            return await _answer(channel, command, info.owner, timeout)
        except BaseException:
            # The sender gave up (Ctrl-C, a cancelled call, or the store failed it while
            # it waited): withdrawn as at its timeout, so that an owner that takes it
            # later skips it. Too late once it was taken (then this changes nothing, as
            # after a refusal). Cancellation alone left a command whose answer could not
            # be read pending, for a busy owner to apply behind the sender's back.
            with contextlib.suppress(Exception):
                await asyncio.shield(channel.withdraw(command))
            raise

    def _channel(self, verb: str, key: str) -> CommandChannel:
        if not offers(self._store, Controllable):
            raise CommandRefused(
                key, verb, f"{type(self._store).__name__} cannot carry commands to workers"
            )
        return self._store.commands()


def epoch_mismatch(aimed: int, current: int) -> str:
    """The refusal of a command aimed at ``aimed`` when the session is at ``current``."""
    why = "taken over" if aimed < current else "no such epoch yet"
    return f"aimed at epoch {aimed}, the session is at epoch {current} ({why})"


async def _answer(channel: CommandChannel, command: Command, owner: str, timeout: float) -> int:
    """Wait for the owner's answer: first for it to take the command (else withdraw it,
    so that it is never applied after we gave up), then for it to apply it."""
    verb, key = command.verb, command.key
    deadline = time.monotonic() + timeout
    extended = False
    pause = FIRST_POLL
    while True:
        reply = await channel.reply(command)
        if reply.status == "done":
            if reply.reason:  # applied, with something the sender must hear (a pause not saved)
                log.warning(
                    "%s of session %r done: %s", verb, key, reply.reason, extra={"key": key}
                )
            return reply.version
        if reply.status == "refused":
            raise CommandRefused(key, verb, reply.reason)
        if time.monotonic() >= deadline:
            if reply.status == "pending" and await channel.withdraw(command):
                raise CommandRefused(
                    key, verb, f"owner {owner!r} did not answer within {timeout:g} s"
                )
            if extended:
                raise CommandRefused(
                    key,
                    verb,
                    f"owner {owner!r} took the command but did not finish it within "
                    f"{2 * timeout:g} s; it may still apply it",
                )
            # it took the command just now, or before: let it finish
            deadline, extended = time.monotonic() + timeout, True
        await asyncio.sleep(pause)
        pause = min(pause * 2, ANSWER_POLL)
