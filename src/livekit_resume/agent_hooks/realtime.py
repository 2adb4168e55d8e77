"""Realtime models (OpenAI Realtime, Gemini Live, Nova Sonic, xAI): what differs.

The conversation needs nothing of its own: LiveKit creates the realtime session at
``start()`` and sends it the agent's context once (``update_chat_ctx``), which is the
context `rebuild` restored. Two things do:

- **Options** a realtime session keeps beside the conversation (voice, tool choice, ...).
  LiveKit has no getter for them; the OpenAI and Google plugins keep them in ``_opts``,
  named as the parameters of their ``update_options``. A capture keeps those that are
  plain data; a restore hands them to the model's ``update_options`` before ``start()``,
  so the new session opens with them. Anything else (a turn-detection object, the
  modalities, which no plugin changes at run time) comes from the code that builds the
  model, as it did the first time.
- **Pause**: a realtime model answers on its own (server-side turn detection, a reply
  after a tool), not through ``llm_node``. While paused, every reply LiveKit schedules is
  interrupted before it is played or recorded, and the audio the server buffered is
  cleared.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from livekit.agents import Agent, AgentSession, llm
from livekit.agents.voice.events import SpeechCreatedEvent

__all__ = ["RealtimeGate", "capture_options", "realtime_model", "reapply_options"]

log = logging.getLogger("livekit_resume")

# Nesting a plain option may have (a tool choice is a dict holding a dict).
_MAX_DEPTH = 4


def realtime_model(session: AgentSession[Any], agent: Agent) -> llm.RealtimeModel | None:
    """The realtime model ``agent`` runs on in ``session`` (its own or the session's)."""
    model = agent.llm if isinstance(agent.llm, (llm.LLM, llm.RealtimeModel)) else session.llm
    return model if isinstance(model, llm.RealtimeModel) else None


def _live_session(agent: Agent) -> llm.RealtimeSession[Any] | None:
    try:
        return agent.realtime_llm_session
    except RuntimeError:
        return None  # not running (a parent saved while its AgentTask runs), or no session


# update_options parameters per class, read once: a checkpoint's cost stays flat
_SETTABLE: dict[type, tuple[str, ...]] = {}


def _settable(target: Any) -> tuple[str, ...]:
    """The options ``target.update_options`` takes, by name."""
    cls = type(target)
    names = _SETTABLE.get(cls)
    if names is None:
        fn = getattr(cls, "update_options", None)
        params = inspect.signature(fn).parameters.values() if fn is not None else ()
        names = _SETTABLE[cls] = tuple(
            p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
    return names


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if depth >= _MAX_DEPTH:
        return False
    if type(value) in (list, tuple):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return False


def capture_options(session: AgentSession[Any], agent: Agent) -> dict[str, Any] | None:
    """The realtime options to save for ``agent``, or None when it runs no realtime model."""
    model = realtime_model(session, agent)
    if model is None:
        return None
    live = _live_session(agent)
    # the live session's own record first: update_options on a session changes only it
    holder = live if live is not None and hasattr(live, "_opts") else model
    opts = getattr(holder, "_opts", None)
    options: dict[str, Any] = {}
    for name in _settable(holder):
        value = getattr(opts, name, None)
        if value is not None and _plain(value):
            options[name] = list(value) if type(value) is tuple else value
    return {"provider": model.provider, "model": model.model, "options": options}


async def reapply_options(
    session: AgentSession[Any], agent: Agent, saved: dict[str, Any], *, key: str
) -> None:
    """Hand ``saved`` options to the model ``agent`` will run on; call before ``start()``.

    Options of another provider, and options this model no longer takes, are left out
    (logged): the model keeps what its code set."""
    model = realtime_model(session, agent)
    options: Any = saved.get("options") or {}
    if model is None or not options:
        return
    if type(options) is not dict or not all(type(k) is str for k in options):
        # not what a capture writes (an edited import): the model keeps what its code set
        log.warning(
            "session %r: saved realtime options are not a mapping of names (%s); they are "
            "not reapplied",
            key,
            type(options).__name__,
            extra={"key": key},
        )
        return
    if saved.get("provider") != model.provider:
        log.warning(
            "session %r: realtime options were saved for provider %r, the agent now runs on "
            "%r; they are not reapplied",
            key,
            saved.get("provider"),
            model.provider,
            extra={"key": key},
        )
        return
    settable = set(_settable(model))
    given = {k: v for k, v in options.items() if k in settable}
    if left := sorted(set(options) - settable):
        log.warning(
            "session %r: realtime options %s cannot be set on %s; they are not reapplied",
            key,
            left,
            type(model).__qualname__,
            extra={"key": key},
        )
    if not given:
        return
    update: Any = model.update_options  # type: ignore[attr-defined]  # checked by _settable
    try:
        update(**given)
    except Exception:
        # a value this model refuses (a voice it no longer offers) is left out, logged,
        # like an option it does not take: the conversation is restored all the same
        for name, value in given.items():
            try:
                update(**{name: value})
            except Exception as e:
                log.warning(
                    "session %r: realtime option %s=%r was refused by %s (%s); it is not reapplied",
                    key,
                    name,
                    value,
                    type(model).__qualname__,
                    e,
                    extra={"key": key},
                )


class RealtimeGate:
    """While closed, every reply the session schedules is interrupted before it plays:
    a realtime model answers on its own, not through the agent's ``llm_node``."""

    def __init__(self) -> None:
        self._session: AgentSession[Any] | None = None
        self._cut = False  # a reply was cut while closed

    def close(self, session: AgentSession[Any], agent: Agent | None) -> None:
        if agent is None or realtime_model(session, agent) is None or self._session is not None:
            return
        session.on("speech_created", self._on_speech)
        self._session = session
        live = _live_session(agent)
        if live is not None:
            # half a user turn buffered on the server would otherwise end in a reply later
            live.clear_audio()

    def open(self) -> bool:
        """Let replies through again; whether one was cut while closed."""
        if self._session is not None:
            self._session.off("speech_created", self._on_speech)
            self._session = None
        cut, self._cut = self._cut, False
        return cut

    def _on_speech(self, ev: SpeechCreatedEvent) -> None:
        if not ev.speech_handle.interrupted:
            ev.speech_handle.interrupt(force=True)
            self._cut = True
