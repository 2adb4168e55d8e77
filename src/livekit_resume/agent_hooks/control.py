"""`ControlListener`: the owner's side of remote control (issue 16).

While a `ResumableSession` holds its lease it listens on the store's command channel
for its key and applies each command through its own ``pause``, ``resume`` and
``suspend``, then answers with its version. A command aimed at an older epoch is
refused (the session was taken over since it was aimed); one aimed at a newer epoch is
for the worker that took this one over, so this one stays silent and lets that one
answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from prometheus_client import Counter

from ..errors import LeaseLost
from ..remote import epoch_mismatch
from ..stores.base import (
    Command,
    CommandChannel,
    CommandReply,
    Controllable,
    Store,
    StoreClosed,
    offers,
)

__all__ = ["ControlListener"]

log = logging.getLogger("livekit_resume")

COMMANDS = Counter(
    "livekit_resume_remote_commands",
    "Remote commands answered by this worker, by command and outcome",
    ["command", "outcome"],
)
# The states each command applies in, and the state where it is already done.
_FROM = {"pause": ("active",), "resume": ("paused",), "suspend": ("active", "paused")}
_ALREADY = {"pause": "paused", "resume": "active"}
# How long a restore waits for the inbox: a subscription or a first read takes a
# round trip; more means a store in trouble, which the restore itself will meet.
START_WAIT = 2.0
# A lost subscription (the store restarted, a failover) is opened again after this.
RELISTEN_DELAY = 1.0
# Commands waiting their turn (they are applied one at a time). Past this, one heard is
# left unclaimed: its sender withdraws it at its timeout and is told so. Whoever can
# publish on the channel could otherwise pile up a task per message without end.
MAX_WAITING = 32


class Controlled(Protocol):
    """What the listener drives: a `ResumableSession`."""

    @property
    def key(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def version(self) -> int: ...

    async def pause(self) -> int: ...

    async def resume(self) -> None: ...

    async def suspend(self) -> int: ...


class ControlListener:
    """Listens for ``session``'s commands while started; ``epoch()`` is the epoch of the
    lease it holds (None once it holds none, or lost it). ``confirm()`` asks the store
    whether that lease is still current, raising `LeaseLost` when another worker took it
    over: a command aimed at the epoch this worker holds is applied only once confirmed
    (a takeover the worker has not yet heard of leaves it believing it still owns it).
    ``started()``: whether the session runs (a command before that is refused);
    ``busy()``: what a suspend, an end or a close under way makes of it, if one is (a
    command then is refused, as the owner's own call would be); ``paused_again()``: a
    pause was asked of the session already paused (answered done, and it now stands as
    that sender's too)."""

    def __init__(
        self,
        store: Store,
        session: Controlled,
        epoch: Callable[[], int | None],
        confirm: Callable[[], Awaitable[object]],
        started: Callable[[], bool] = lambda: True,
        busy: Callable[[], str | None] = lambda: None,
        paused_again: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._session = session
        self._epoch = epoch
        self._confirm = confirm
        self._started = started
        self._busy = busy
        self._paused_again = paused_again
        self._task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()
        # one command at a time: a pause and a suspend sent together must not interleave;
        # one waiting here stays unclaimed, so its sender can still withdraw it
        self._applying = asyncio.Lock()
        self.listening = asyncio.Event()  # set once the inbox is active
        # the epoch this worker gave up itself, and what the session is since
        self._released: tuple[int, str] | None = None

    def released(self, epoch: int, state: str) -> None:
        """This worker gave up the lease of ``epoch`` itself (a suspend, an end, a close),
        the session ``state`` since: a command aimed at it that waited its turn is
        refused saying so, not left to time out as if the owner were frozen."""
        self._released = (epoch, state)

    async def start(self) -> None:
        """Listen from now on; returns once the inbox is active, so that no command sent
        after a restore returned is missed (or after `START_WAIT` s, with a warning: the
        listener keeps trying). A store that carries no commands: nothing to listen to."""
        if not offers(self._store, Controllable) or self._task is not None:
            return
        self._task = asyncio.ensure_future(self._listen(self._store.commands()))
        try:
            await asyncio.wait_for(self.listening.wait(), START_WAIT)
        except TimeoutError:
            log.warning(
                "session %r: not yet listening for remote commands after %.0fs",
                self._session.key,
                START_WAIT,
                extra={"key": self._session.key},
            )

    async def stop(self) -> None:
        """Stop listening. A command being applied finishes and is answered (a suspend
        stops the listener from inside its own command)."""
        task, self._task = self._task, None
        self.listening.clear()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _listen(self, channel: CommandChannel) -> None:
        key = self._session.key
        while True:
            try:
                async with channel.inbox(key) as inbox:
                    self.listening.set()
                    async for command in inbox:
                        if len(self._handling) >= MAX_WAITING:
                            COMMANDS.labels(command="any", outcome="dropped").inc()
                            log.warning(
                                "session %r: remote %s left unanswered: %d commands wait",
                                key,
                                command.verb[:16],
                                len(self._handling),
                                extra={"key": key},
                            )
                            continue
                        task = asyncio.ensure_future(self._handle(channel, command))
                        self._handling.add(task)
                        task.add_done_callback(self._handling.discard)
            except StoreClosed as e:
                self.listening.clear()
                log.warning(
                    "session %r: no longer listening for remote commands: %s",
                    key,
                    e,
                    extra={"key": key},
                )
                return
            except Exception as e:
                # a store's error of its own (not a ResumeError) included: a listener that
                # died of it would leave the owner deaf to every command for good
                self.listening.clear()
                log.warning(
                    "session %r: listening for remote commands failed (%s); again in %.0fs",
                    key,
                    e,
                    RELISTEN_DELAY,
                    extra={"key": key},
                )
                await asyncio.sleep(RELISTEN_DELAY)

    async def _handle(self, channel: CommandChannel, command: Command) -> None:
        key, verb = self._session.key, command.verb
        try:
            async with self._applying:
                await self._claim_and_apply(channel, command)
        except Exception as e:
            # the store failed us (typed or not): the sender hears nothing and reports the
            # timeout; nothing is left to the loop as an unretrieved task exception
            log.warning("session %r: remote %s not answered: %s", key, verb, e, extra={"key": key})

    async def _claim_and_apply(self, channel: CommandChannel, command: Command) -> None:
        key, verb = self._session.key, command.verb
        held = self._epoch()  # read now: the command before this one may have suspended
        released = self._released
        if held is None and released is not None and command.epoch == released[0]:
            if await channel.claim(command):
                reason = f"cannot {verb}: the session is {released[1]}"
                await channel.answer(command, CommandReply("refused", reason=reason))
            return
        if held is None or command.epoch > held:
            return  # aimed at whoever took this session over: theirs to answer
        if not await channel.claim(command):
            return  # the sender gave up on it, or another inbox of ours took it
        if command.epoch < held:
            reply = CommandReply("refused", reason=epoch_mismatch(command.epoch, held))
        else:
            reply = await self._confirm_and_apply(command)
        # anyone who can publish on the channel names the verb: one label for all the
        # unknown ones, or each would add a time series to the worker's metrics
        COMMANDS.labels(command=verb if verb in _FROM else "unknown", outcome=reply.status).inc()
        log.info(
            "session %r: remote %s %s%s",
            key,
            verb if verb in _FROM else repr(verb),
            reply.status,
            f" ({reply.reason})" if reply.reason else "",
            extra={"key": key, "version": reply.version},
        )
        await channel.answer(command, reply)

    async def _confirm_and_apply(self, command: Command) -> CommandReply:
        try:
            await self._confirm()
        except LeaseLost as e:
            # taken over since the command was aimed, before this worker heard of it
            current = e.current_epoch if e.current_epoch is not None else command.epoch + 1
            return CommandReply("refused", reason=epoch_mismatch(command.epoch, current))
        except Exception as e:
            # claimed, so answered now: unanswered, the sender would wait out its timeout
            # and be told the owner "may still apply it", which it never will
            return CommandReply("refused", reason=f"{command.verb} failed: lease check: {e}")
        return await self._apply(command.verb)

    async def _apply(self, verb: str) -> CommandReply:
        s = self._session
        actions: dict[str, Callable[[], Awaitable[object]]] = {
            "pause": s.pause,
            "resume": s.resume,
            "suspend": s.suspend,
        }
        if verb not in actions:
            return CommandReply("refused", reason=f"unknown command {verb!r}")
        busy = self._busy()
        if busy is not None:
            # before the shortcut below: a suspend writing its final save says "paused"
            return CommandReply("refused", reason=f"cannot {verb}: the session is {busy}")
        if s.state == _ALREADY.get(verb) and (self._started() or verb == "pause"):
            # sent again after a lost answer, or a hold on a pause someone else made (the
            # app's before start too); a session still restoring is "active" at version 0
            # too, and not done
            if verb == "pause":
                self._paused_again()
            return CommandReply("done", s.version)
        if s.state == "active" and not self._started():
            return CommandReply("refused", reason=f"cannot {verb}: the session has not started")
        if s.state not in _FROM[verb]:
            return CommandReply("refused", reason=f"cannot {verb}: the session is {s.state}")
        if not self._started():
            # restored, its AgentSession not started yet (resumable_job starts it right
            # after): a suspend now would close a session that then starts and talks with
            # nothing saving it, a pause would silence an agent that is not there yet
            return CommandReply("refused", reason=f"cannot {verb}: the session has not started")
        before = s.state
        try:
            await actions[verb]()
        except Exception as e:
            after = s.state
            if (
                verb == "pause"
                and after == "paused"
                and not isinstance(e, (LeaseLost, RuntimeError))  # RuntimeError: not paused
            ):
                # a pause whose save fails (the store down, an agent not registered) is a
                # pause all the same (`ResumableSession.pause`): refused would tell the
                # sender nothing was done to a session now silent
                return CommandReply("done", s.version, reason=f"paused, its state not saved: {e}")
            # any other failure is refused at once, not left unanswered for the sender's
            # timeout, saying what it left behind: a suspend whose final save failed
            # leaves the session paused, kept by its worker
            left = ""
            if isinstance(e, LeaseLost):
                # fenced (taken over, released, deleted): the worker holds nothing now
                left = f"; its worker no longer holds it (left {after} there)"
            elif after != before:
                left = f"; the session is {after}, still held by its worker"
            return CommandReply("refused", reason=f"{verb} failed: {e}{left}")
        return CommandReply("done", s.version)
