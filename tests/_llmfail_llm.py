"""A scripted LLM whose turns can fail like a provider does (hunt: llmfail)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from livekit.agents import APIConnectionError, llm
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)

from livekit_resume.testing.llm import LLMRequest, Reply, ScriptedLLM, ScriptedLLMStream, ToolCall

FAST = APIConnectOptions(max_retry=0, retry_interval=0, timeout=5)


@dataclass(frozen=True)
class Fail:
    """A turn that streams ``text`` (and ``tool_calls``), then raises ``error`` (an
    `APIConnectionError` by default), on every attempt."""

    text: str = ""
    tool_calls: Sequence[ToolCall] = ()
    error: BaseException | None = None


class FailingLLM(ScriptedLLM):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.attempts = 0

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
        request = LLMRequest(chat_ctx=chat_ctx.copy(), tools=[t.id for t in tools])
        self._record(request)
        return FailingStream(
            self, request=request, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options
        )


class FailingStream(ScriptedLLMStream):
    _fail: Fail | None = None

    async def _run(self) -> None:
        s = self._scripted
        assert isinstance(s, FailingLLM)
        s.attempts += 1
        if self._request.reply is None:
            turn = s._next_turn()
            if isinstance(turn, Fail):
                self._fail = turn
                self._request.reply = Reply(text=turn.text, tool_calls=turn.tool_calls)
            else:
                self._request.reply = s._resolve(turn, self._request.chat_ctx)
        await super()._run()
        if self._fail is not None:
            raise self._fail.error or APIConnectionError("the provider dropped the stream")
