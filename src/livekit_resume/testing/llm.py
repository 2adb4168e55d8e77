"""A deterministic ``llm.LLM``: it answers from a script and records every request.

Our tests drive real ``AgentSession``s with it, and so can yours (no network, no keys);
``livekit-resume demo`` runs on it too, with a rule as its script.

A script is a list of turns, consumed one per LLM request:

* ``"text"`` — a plain reply;
* ``[ToolCall("name", {"a": 1}), ...]`` — tool calls; after the tools ran, LiveKit asks again
  and the *next* turn answers that follow-up request;
* ``Reply(text=..., tool_calls=[...], chunk_delay=...)`` — both, or per-turn timing;
* a callable ``(chat_ctx) -> turn`` — a dynamic rule, evaluated at request time.

When the script is exhausted the ``default`` turn answers (``ScriptedLLM.rule_based(fn)`` makes
``fn`` the default); without one, the request fails with :class:`ScriptExhausted`.

Text streams as several ``ChatChunk``s (``chunk_words`` words each, ``chunk_delay`` seconds
apart) so a test can interrupt a reply half way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from livekit.agents import AgentSession, llm
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)

__all__ = [
    "LLMRequest",
    "Reply",
    "ScriptExhausted",
    "ScriptedLLM",
    "ScriptedLLMStream",
    "ToolCall",
    "Turn",
    "make_text_session",
]


class ScriptExhausted(AssertionError):
    """The LLM was asked for more turns than the script holds (and there is no default)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str | dict[str, Any] = "{}"
    call_id: str | None = None
    """Defaults to ``call_<n>``, numbered per ScriptedLLM."""

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    text: str = ""
    tool_calls: Sequence[ToolCall] = ()
    chunk_delay: float | None = None
    """Seconds between text chunks for this reply; ``None`` uses the LLM's default."""


Turn: TypeAlias = "str | Reply | Sequence[ToolCall] | Callable[[llm.ChatContext], Turn]"


@dataclass
class LLMRequest:
    """One recorded ``chat()`` call."""

    chat_ctx: llm.ChatContext
    """A copy of the context the LLM was called with (items are shared, the list is not)."""
    tools: list[str]
    """Names (ids) of the tools offered with the request."""
    tool_choice: Any = None
    reply: Reply | None = None
    """What the script answered (set once the turn is resolved)."""

    @property
    def items(self) -> list[llm.ChatItem]:
        return self.chat_ctx.items

    @property
    def item_ids(self) -> list[str]:
        return [item.id for item in self.chat_ctx.items]

    def messages(self, role: str | None = None) -> list[llm.ChatMessage]:
        return [m for m in self.chat_ctx.messages() if role is None or m.role == role]

    def texts(self, role: str | None = None) -> list[str]:
        return [m.text_content or "" for m in self.messages(role)]

    @property
    def system_messages(self) -> list[llm.ChatMessage]:
        return self.messages("system")

    @property
    def last_user_text(self) -> str | None:
        users = self.texts("user")
        return users[-1] if users else None


class ScriptedLLM(llm.LLM[Any]):
    """An ``llm.LLM`` that answers each request with the next turn of its script.

    ``model`` and ``provider`` are the names LiveKit reports for it (in metrics)."""

    def __init__(
        self,
        script: Iterable[Turn] = (),
        *,
        default: Turn | None = None,
        chunk_words: int = 2,
        chunk_delay: float = 0.0,
        first_chunk_delay: float = 0.0,
        model: str = "scripted",
        provider: str = "tests",
    ) -> None:
        super().__init__()
        self._model = model
        self._provider = provider
        self._script: list[Turn] = list(script)
        self._default = default
        self.chunk_words = max(1, chunk_words)
        self.chunk_delay = chunk_delay
        self.first_chunk_delay = first_chunk_delay
        self.requests: list[LLMRequest] = []
        self._call_ids = itertools.count(1)
        self._changed = asyncio.Event()

    @classmethod
    def rule_based(cls, fn: Callable[[llm.ChatContext], Turn], **kwargs: Any) -> ScriptedLLM:
        """Every request is answered by ``fn(chat_ctx)``."""
        return cls((), default=fn, **kwargs)

    @property
    def model(self) -> str:
        return self._model

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def remaining(self) -> int:
        """Turns left in the script (the default is not counted)."""
        return len(self._script)

    def push(self, *turns: Turn) -> None:
        """Append turns to the script."""
        self._script.extend(turns)

    async def wait_for_requests(self, n: int, *, timeout: float = 5.0) -> LLMRequest:
        """Wait until at least ``n`` requests were made; return the ``n``-th."""

        async def _wait() -> None:
            while len(self.requests) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.requests[n - 1]

    def _record(self, request: LLMRequest) -> None:
        self.requests.append(request)
        self._changed.set()

    def _next_turn(self) -> Turn:
        if self._script:
            return self._script.pop(0)
        if self._default is not None:
            return self._default
        raise ScriptExhausted(f"ScriptedLLM: no turn left for request #{len(self.requests)}")

    def _resolve(self, turn: Turn, chat_ctx: llm.ChatContext) -> Reply:
        # a callable may return another callable, a string, tool calls or a Reply
        for _ in range(8):
            if callable(turn) and not isinstance(turn, Reply):
                turn = turn(chat_ctx)
                continue
            if isinstance(turn, Reply):
                return turn
            if isinstance(turn, str):
                return Reply(text=turn)
            calls = list(turn)
            if not all(isinstance(c, ToolCall) for c in calls):
                raise TypeError(f"ScriptedLLM: a turn list must hold ToolCall items, got {calls!r}")
            return Reply(tool_calls=calls)
        raise TypeError("ScriptedLLM: a rule kept returning callables")

    def _call_id(self, call: ToolCall) -> str:
        return call.call_id or f"call_{next(self._call_ids)}"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> ScriptedLLMStream:
        tools = tools or []
        request = LLMRequest(
            chat_ctx=chat_ctx.copy(),
            tools=[tool.id for tool in tools],
            tool_choice=tool_choice if tool_choice is not NOT_GIVEN else None,
        )
        self._record(request)
        return ScriptedLLMStream(
            self, request=request, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options
        )


class ScriptedLLMStream(llm.LLMStream):
    """Streams one resolved turn as a provider would: text in chunks, then tool calls."""

    def __init__(
        self,
        scripted: ScriptedLLM,
        *,
        request: LLMRequest,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(scripted, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._scripted = scripted
        self._request = request

    async def _run(self) -> None:
        s = self._scripted
        # a retry would consume a second turn; resolve once per stream
        if self._request.reply is None:
            self._request.reply = s._resolve(s._next_turn(), self._request.chat_ctx)
        reply = self._request.reply
        delay = s.chunk_delay if reply.chunk_delay is None else reply.chunk_delay
        chunk_id = f"scripted_{len(s.requests)}"

        if s.first_chunk_delay > 0:
            await asyncio.sleep(s.first_chunk_delay)

        words = reply.text.split(" ") if reply.text else []
        for i in range(0, len(words), s.chunk_words):
            piece = " ".join(words[i : i + s.chunk_words])
            if i + s.chunk_words < len(words):
                piece += " "
            if i > 0 and delay > 0:
                await asyncio.sleep(delay)
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", content=piece))

        if reply.tool_calls:
            calls = [
                llm.FunctionToolCall(
                    name=c.name, arguments=c.arguments_json(), call_id=s._call_id(c)
                )
                for c in reply.tool_calls
            ]
            self._send(chunk_id, llm.ChoiceDelta(role="assistant", tool_calls=calls))

    def _send(self, chunk_id: str, delta: llm.ChoiceDelta) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=chunk_id, delta=delta))


def make_text_session(llm_: llm.LLM[Any], **session_kwargs: Any) -> AgentSession[Any]:
    """An ``AgentSession`` for text turns (``session.run(user_input=...)``), no room needed.

    It passes ``vad=None`` and no turn-detector model: LiveKit's defaults would load Silero and
    the turn-detector model (about half a second per session) for audio a text test never has.
    """
    session_kwargs.setdefault("vad", None)
    session_kwargs.setdefault("turn_handling", {"turn_detection": None})
    return AgentSession(llm=llm_, **session_kwargs)
