"""`Silencer`: the mechanics of a soft pause on a live `AgentSession`.

LiveKit 1.8.9 has no pause. Its audio flags alone are not one: disabling input only
detaches it, and with output disabled the LLM still runs and its reply is added to the
history as text. So a pause turns input off, shadows the current agent's ``llm_node``
(no reply, by voice or by text), cuts the reply being spoken and waits until LiveKit has
recorded what was heard, and only then turns output off: detaching the output first
would record the reply as fully spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from livekit.agents import Agent, AgentSession
from livekit.agents.voice import SpeechHandle
from livekit.agents.voice.agent import _get_activity_task_info
from livekit.agents.voice.events import SpeechCreatedEvent

from .realtime import RealtimeGate, realtime_model

__all__ = [
    "INTERRUPT_TIMEOUT",
    "Silencer",
    "Timer",
    "current_agent",
    "in_livekit_task",
    "turn_hook_task",
]

log = logging.getLogger("livekit_resume")

# Cutting speech takes a few audio frames; a stuck output must not hang pause or suspend.
INTERRUPT_TIMEOUT = 3.0


def _livekit_task() -> Any:
    """What LiveKit 1.8.9 marks the running task with when it is one of a session's own
    (``agent._set_activity_task_info``): a tool's call (with the reply running it),
    ``on_enter``/``on_exit``, a reply, ``on_user_turn_completed`` (the activity's speech
    tasks). A task the app starts from one is not marked (where contextvars, LiveKit's
    ``_SpeechHandleContextVar`` among them, are copied into it)."""
    task = asyncio.current_task()
    return None if task is None else _get_activity_task_info(task)


def in_livekit_task() -> bool:
    """Whether the caller runs in one of a session's own tasks: LiveKit's close of the
    session waits for them, so a caller waiting for that close waits out its timeout."""
    return _livekit_task() is not None


def turn_hook_task(session: AgentSession[Any]) -> asyncio.Task[Any] | None:
    """The running task, if it is the one LiveKit 1.8.9 runs ``on_user_turn_completed``
    in (agent_activity.py, ``_user_turn_completed_atask``). That task adds the caller's
    turn to the history only after the hook returns: a suspend or an end from the hook
    saves that turn once LiveKit's close, which waits for the hook, is done."""
    task = asyncio.current_task()
    activity = getattr(session, "_activity", None)
    if task is not None and getattr(activity, "_user_turn_completed_atask", None) is task:
        return task
    return None


def own_speech() -> SpeechHandle | None:
    """The reply whose tool calls, if not done (a goodbye tool ending the call, a hold
    tool pausing it). That reply cannot finish before its tool returns: waiting for it
    would wait out every timeout, and interrupting it would drop the handoff its tool
    returns and have LiveKit cancel it 5 s on while the tool still runs."""
    info = _livekit_task()
    speech = None if info is None else info.speech_handle
    return speech if speech is not None and not speech.done() else None


def _cancel_preemptive(session: AgentSession[Any]) -> None:
    """Drop a reply LiveKit drafted before the user's turn ended (preemptive generation),
    as `AgentSession.interrupt` does before it cuts: it would answer a turn the pause
    stopped hearing."""
    cancel = getattr(getattr(session, "_activity", None), "_cancel_preemptive_generation", None)
    if callable(cancel):
        cancel()


def _all_done(speeches: list[SpeechHandle]) -> asyncio.Future[None]:
    """A future done once every one of ``speeches`` is."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def check(_: SpeechHandle) -> None:
        if not done.done() and all(speech.done() for speech in speeches):
            done.set_result(None)

    for speech in speeches:
        speech.add_done_callback(check)
    return done


def current_agent(session: AgentSession[Any]) -> Agent | None:
    """The session's current agent, or None before it started."""
    try:
        return session.current_agent
    except RuntimeError:
        return None


_NO_NODE = object()  # an agent without an ``llm_node`` of its own (the class's answers)


class Silencer:
    """Turns one session's audio and replies off and on again."""

    def __init__(self, key: str) -> None:
        self._key = key
        # each agent silenced, with the ``llm_node`` it had of its own (or _NO_NODE)
        self._paused_agents: list[tuple[Agent, Any]] = []
        # the session silenced and its audio flags (input, output) as the pause found
        # them: an app that had one off (text only, a muted caller) gets it back off
        self._audio: tuple[AgentSession[Any], bool, bool] | None = None
        self._gate = RealtimeGate()  # a realtime model replies without llm_node
        self._resync = False  # the gate cut a reply: see `resync`
        # every speech the session announced, while it lives (see `heard`)
        self._speeches: weakref.WeakSet[SpeechHandle] = weakref.WeakSet()
        # the agents' node while paused, one bound method (`unsilence` tells it by
        # identity), and whether it swallowed a reply owed to a tool's result
        self._node = self._silent_node
        self._owed = False
        self._pauser: str | None = None  # the call id of the tool that paused, if one did

    async def _silent_node(self, chat_ctx: Any = None, *_args: Any, **_kwargs: Any) -> None:
        """Stands in for an agent's ``llm_node`` while paused: no reply is generated. One
        asked for after the result of a tool other than the one that paused (a reply
        left to run while the `AgentTask` its tool awaited ended meanwhile) is owed:
        `owed` says so at the resume. A hold tool's own result is what it said."""
        for item in reversed(getattr(chat_ctx, "items", None) or []):
            if getattr(item, "type", None) != "function_call_output":
                break
            if getattr(item, "call_id", None) != self._pauser:
                self._owed = True
        return None

    def owed(self) -> bool:
        """Whether a reply to a tool's result was swallowed while paused (once)."""
        owed, self._owed = self._owed, False
        return owed

    def heard(self, ev: SpeechCreatedEvent) -> None:
        """Hears the session's ``speech_created`` while attached. A realtime tool's
        speech, once its tool returned, is neither current, queued nor in the background
        while LiveKit syncs the output to the server, then replies on that same handle
        with no event: `AgentSession.interrupt` misses it, and so does the gate."""
        self._speeches.add(ev.speech_handle)

    async def silence(self, session: AgentSession[Any]) -> None:
        self._owed = False
        call = getattr(_livekit_task(), "function_call", None)
        self._pauser = getattr(call, "call_id", None)
        if self._audio is None:
            self._audio = (session, session.input.audio_enabled, session.output.audio_enabled)
        session.input.set_audio_enabled(False)
        agent = current_agent(session)
        self.follow(session, agent)
        own = own_speech()
        if own not in self._speeches:
            own = None  # a reply of another session's: cut and waited for as any other
        done: asyncio.Future[None] | None = None
        kept = self._uncut(session, agent, own)
        if not kept:
            with contextlib.suppress(RuntimeError):  # not started: nothing is speaking
                done = session.interrupt(force=True)
        cut = [speech for speech in self._speeches if speech not in kept and not speech.done()]
        for speech in cut:
            speech.interrupt(force=True)
        if kept:
            _cancel_preemptive(session)  # what `AgentSession.interrupt` does first
            # what plays now (a notice the tool said) is waited for, so that the pause
            # saves what was heard of it; one queued behind a kept reply cannot end first
            # the caller's own, cut on a realtime model, cannot end first either
            playing = [speech for speech in cut if speech.scheduled and speech is not own]
            done = _all_done(playing) if playing else None
        elif own is not None:
            done = None  # the caller's own reply, cut (a realtime model): it cannot end first
        if done is not None:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for returns the result of a
            # future done as its caller is cancelled and eats the cancellation (here the
            # cut is often done at once: nothing was speaking); wait never cancels ``done``
            try:
                _, pending = await asyncio.wait({done}, timeout=INTERRUPT_TIMEOUT)
            except BaseException:
                # cancelled half-way: undone, so the caller's state ("active") stays true
                # and a later pause can silence it whole (resume refuses an active session)
                self.unsilence(session)
                raise
            if pending:
                log.warning(
                    "session %r: speech did not stop within %.0fs of pause",
                    self._key,
                    INTERRUPT_TIMEOUT,
                    extra={"key": self._key},
                )
        session.output.set_audio_enabled(False)

    def _uncut(
        self, session: AgentSession[Any], agent: Agent | None, own: SpeechHandle | None
    ) -> set[SpeechHandle]:
        """The replies a pause leaves to run, neither cut nor waited for: the caller's
        own (a tool of it pauses), and those awaiting an `AgentTask` (LiveKit holds
        their interruptions while the task runs). None can end before the caller
        returns, or the task completes; cut, LiveKit would drop the agent handoff their
        tool returns, skip the reply to its result and cancel them 5 s on with an ERROR.
        No reply follows them while paused: the agents' nodes are silenced, and one owed
        to their tool's result is asked for at the resume. On a realtime model nothing is
        left: its reply to a tool's result comes on the reply's own handle, bypassing the
        node."""
        if agent is not None and realtime_model(session, agent):
            return set()
        return {
            speech
            for speech in self._speeches
            if not speech.done()
            and (speech is own or getattr(speech, "_interruption_holds", 0) > 0)
        }

    def follow(self, session: AgentSession[Any], agent: Agent | None) -> None:
        """Silence ``agent`` too: the current one at a pause, or one handed to while
        paused (its ``on_enter`` would reply otherwise)."""
        if agent is not None and all(a is not agent for a, _ in self._paused_agents):
            # an instance attribute shadows the class's node: text and voice get no reply
            self._paused_agents.append((agent, agent.__dict__.get("llm_node", _NO_NODE)))
            agent.llm_node = self._node  # type: ignore[method-assign]
        self._gate.close(session, agent)

    def unsilence(self, session: AgentSession[Any]) -> None:
        """Undo `silence`: each agent's ``llm_node`` and the audio flags as they were."""
        for agent, own in self._paused_agents:
            if agent.__dict__.get("llm_node") is not self._node:
                continue  # the app set a node of its own meanwhile: that one stands
            if own is _NO_NODE:
                del agent.__dict__["llm_node"]
            else:
                agent.llm_node = own  # type: ignore[method-assign]
        self._paused_agents.clear()
        self._resync = self._gate.open()
        silenced, self._audio = self._audio, None
        if silenced is not None and silenced[0] is session:
            session.input.set_audio_enabled(silenced[1])
            session.output.set_audio_enabled(silenced[2])

    async def resync(self, session: AgentSession[Any]) -> None:
        """After `unsilence`, when the gate cut a reply: a realtime model's server keeps
        the items of a reply LiveKit cut (agent_activity.py leaves them there), so the
        agent's context is sent again and the server drops them. The model then answers
        from the conversation the session holds, which is what a restore sends it."""
        if not self._resync:
            return
        self._resync = False
        agent = current_agent(session)
        if agent is None or realtime_model(session, agent) is None:
            return
        try:
            await agent.update_chat_ctx(agent.chat_ctx, exclude_invalid_function_calls=False)
        except Exception as e:  # the realtime session gone meanwhile: nothing to drop
            log.warning(
                "session %r: the realtime model's conversation was not synced after the "
                "pause (%s: %s)",
                self._key,
                type(e).__name__,
                e,
                extra={"key": self._key},
            )


class Timer:
    """One pending call (a long pause turning into a suspend): armed, cancelled, and the
    work it starts kept and its failure logged, never lost in a stray task."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self, delay: float, callback: Callable[[], None]) -> None:
        self.cancel()

        def fire() -> None:
            self._handle = None
            callback()

        self._handle = asyncio.get_running_loop().call_later(delay, fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def run(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        self._task = asyncio.ensure_future(work)

        def done(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None:
                # the session stays as it was (paused, with its lease); aclose() still saves
                log.error(
                    "session %r: %s failed: %s",
                    self._key,
                    what,
                    task.exception(),
                    extra={"key": self._key},
                )

        self._task.add_done_callback(done)
