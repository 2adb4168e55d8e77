"""A `RealtimeModel` of our own that records everything LiveKit sends it.

It plays the server of a realtime API (OpenAI Realtime's shape): a conversation of its
own that ``update_chat_ctx`` syncs by item id (creates and deletes, as the OpenAI plugin
computes them with ``compute_chat_ctx_diff``), server-side speech detection on the audio
it is pushed, and replies from a script, spoken as audio with their transcript. Tests
read what reached it: ``created`` (every item id the client created, in order),
``calls`` (every method call), ``responses`` (what the model saw when each reply began)
and ``frames_in`` (audio pushed).

Speech detection needs no model: `FakeAudioInput` frames carry the code of what the user
says (``fake_voice.frame_code``), so a turn ends after ``END_OF_TURN_FRAMES`` silent frames
and its transcript is known.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from livekit import rtc
from livekit.agents import AgentSession, llm, utils
from livekit.agents.llm.tool_context import Tool, ToolChoice, ToolContext
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.voice.generation import remove_instructions
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from livekit_resume.testing.llm import Reply

from .fake_voice import _TRANSCRIPTS, FakeAudioInput, FakeAudioOutput, FakeTextOutput, frame_code

__all__ = [
    "END_OF_TURN_FRAMES",
    "FakeRealtimeModel",
    "FakeRealtimeSession",
    "RealtimeOptions",
    "Response",
    "make_realtime_session",
    "realtime_capabilities",
]

OUTPUT_SAMPLE_RATE = 24000
FRAME_SECONDS = 0.02
# Spoken replies last this long per word, so an interruption lands mid-reply.
SECONDS_PER_WORD = 0.25
# 0.2 s of silence ends a user turn (server VAD), as quick as the tests can afford.
END_OF_TURN_FRAMES = 10


def realtime_capabilities(**overrides: bool) -> llm.RealtimeCapabilities:
    """OpenAI Realtime's capabilities (the most complete family), with ``overrides``."""
    flags: dict[str, bool] = {
        "message_truncation": True,
        "turn_detection": True,
        "user_transcription": True,
        "auto_tool_reply_generation": False,
        "audio_output": True,
        "manual_function_calls": True,
        "mutable_chat_context": True,
        "mutable_instructions": True,
        "mutable_tools": True,
        "per_response_tool_choice": True,
    }
    flags.update(overrides)
    return llm.RealtimeCapabilities(**flags)


@dataclass
class RealtimeOptions:
    """Options the fake keeps beside the conversation, named as its ``update_options``
    parameters (as the OpenAI and Google plugins keep theirs in ``_opts``)."""

    voice: str = "alloy"
    modalities: list[str] = field(default_factory=lambda: ["text", "audio"])
    turn_detection: str | None = "server_vad"
    tool_choice: Any = None
    temperature: float = 0.8


@dataclass
class Response:
    """One reply the fake model produced."""

    id: str
    seen: list[llm.ChatItem]
    """The server's conversation when the reply began: what the model answered from."""
    instructions: str | None
    user_initiated: bool
    reply: Reply
    message_id: str
    interrupted: bool = False


class FakeRealtimeModel(llm.RealtimeModel):
    """Hands out `FakeRealtimeSession`s that answer from ``script`` (shared by all sessions
    of the model, in order); a reply past the end of the script is ``default``."""

    def __init__(
        self,
        script: Sequence[str | Reply] = (),
        *,
        default: str | Reply | None = "ok",
        capabilities: llm.RealtimeCapabilities | None = None,
        late_transcripts: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(capabilities=capabilities or realtime_capabilities())
        self._opts = RealtimeOptions(**options)
        self.script: list[Reply] = [_reply(t) for t in script]
        self.default = _reply(default) if default is not None else None
        self.late_transcripts = late_transcripts
        """Hold each user turn's transcript until the test calls
        `FakeRealtimeSession.send_transcripts` (Gemini and Nova send it after the reply)."""
        self.sessions: list[FakeRealtimeSession] = []
        self._ids = itertools.count(1)
        self.refused_voices: set[str] = set()
        """Voices `update_options` refuses with ValueError (a plugin's offer changed)."""

    @property
    def model(self) -> str:
        return "fake-realtime"

    @property
    def provider(self) -> str:
        return "fake"

    @property
    def active_session(self) -> FakeRealtimeSession:
        return self.sessions[-1]

    def session(self, *, turn_detection_disabled: bool = False) -> FakeRealtimeSession:
        s = FakeRealtimeSession(self)
        self.sessions.append(s)
        return s

    def update_options(
        self,
        *,
        voice: NotGivenOr[str] = NOT_GIVEN,
        turn_detection: NotGivenOr[str | None] = NOT_GIVEN,
        tool_choice: NotGivenOr[ToolChoice | None] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """Set options for new sessions and every live one (as the OpenAI plugin does)."""
        if isinstance(voice, str) and voice in self.refused_voices:
            raise ValueError(f"voice {voice!r} is not offered by this model")
        given = _given(
            voice=voice, turn_detection=turn_detection, tool_choice=tool_choice,
            temperature=temperature,
        )  # fmt: skip
        self._opts = dataclasses.replace(self._opts, **given)
        for s in self.sessions:
            s.update_options(**given)

    def next_id(self, prefix: str) -> str:
        # unique across processes, as a provider's ids are: a restored conversation
        # already holds ids from the model of the process that saved it
        return f"{prefix}_{next(self._ids)}_{uuid.uuid4().hex[:8]}"

    def next_reply(self) -> Reply:
        if self.script:
            return self.script.pop(0)
        if self.default is None:
            raise AssertionError("the fake realtime model ran out of script")
        return self.default

    async def aclose(self) -> None:
        pass


class FakeRealtimeSession(llm.RealtimeSession[Literal["fake"]]):
    """One connection to the fake server; see the module docstring."""

    def __init__(self, model: FakeRealtimeModel) -> None:
        super().__init__(model)
        self._model = model
        self._opts = dataclasses.replace(model._opts)
        self.remote = llm.ChatContext.empty()
        self.instructions: str | None = None
        self._tools = ToolContext.empty()
        self.calls: list[tuple[str, Any]] = []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.responses: list[Response] = []
        self.frames_in = 0
        self.voiced_frames_in = 0
        self.closed = False
        self._speech_code = 0
        self._silent_frames = 0
        self.held_transcripts: list[Callable[[], None]] = []
        """With ``late_transcripts``: the transcripts not sent yet (`send_transcripts`)."""

    # ------------------------------------------------------------ what the client set

    @property
    def chat_ctx(self) -> llm.ChatContext:
        return self.remote.copy()

    @property
    def tools(self) -> ToolContext:
        return self._tools.copy()

    @property
    def options(self) -> RealtimeOptions:
        return self._opts

    def names(self) -> list[str]:
        """The names of the calls received, in order."""
        return [name for name, _ in self.calls]

    async def update_instructions(self, instructions: str) -> None:
        self.calls.append(("update_instructions", instructions))
        self.instructions = instructions

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        # what the OpenAI plugin syncs: no handoffs, config updates or instructions
        ctx = chat_ctx.copy(exclude_handoff=True, exclude_config_update=True)
        remove_instructions(ctx)
        diff = llm.utils.compute_chat_ctx_diff(self.remote, ctx)
        created = [item_id for _, item_id in diff.to_create]
        self.calls.append(("update_chat_ctx", {"create": created, "delete": diff.to_remove}))
        self.created.extend(created)
        self.deleted.extend(diff.to_remove)
        self.remote = llm.ChatContext([item.model_copy() for item in ctx.items])

    async def update_tools(self, tools: list[Tool]) -> None:
        self._tools = ToolContext(tools)
        self.calls.append(("update_tools", sorted(self._tools.function_tools)))

    def update_options(
        self,
        *,
        tool_choice: NotGivenOr[ToolChoice | None] = NOT_GIVEN,
        voice: NotGivenOr[str] = NOT_GIVEN,
        turn_detection: NotGivenOr[str | None] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        given = _given(
            tool_choice=tool_choice, voice=voice, turn_detection=turn_detection,
            temperature=temperature,
        )  # fmt: skip
        self.calls.append(("update_options", given))
        self._opts = dataclasses.replace(self._opts, **given)

    # ------------------------------------------------------------------- audio in

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        self.frames_in += 1
        code = frame_code(frame)
        if code:
            self.voiced_frames_in += 1
            if not self._speech_code:
                self.emit("input_speech_started", llm.InputSpeechStartedEvent())
            self._speech_code, self._silent_frames = code, 0
        elif self._speech_code:
            self._silent_frames += 1
            if self._silent_frames >= END_OF_TURN_FRAMES:
                code, self._speech_code = self._speech_code, 0
                self.server_turn(_TRANSCRIPTS.get(code, ""))

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass

    def commit_audio(self) -> None:
        self.calls.append(("commit_audio", None))

    def clear_audio(self) -> None:
        self.calls.append(("clear_audio", None))
        self._speech_code, self._silent_frames = 0, 0

    def server_turn(self, transcript: str) -> None:
        """The server heard the end of a user turn (its speech detection calls this; a test
        may too, for audio the server buffered earlier): it adds the user's item (its
        transcript comes later), tells the client, and answers on its own."""
        self.emit(
            "input_speech_stopped", llm.InputSpeechStoppedEvent(user_transcription_enabled=True)
        )
        item_id = self._model.next_id("item_user")
        previous = self.remote.items[-1].id if self.remote.items else None
        placeholder = llm.ChatMessage(role="user", content=[], id=item_id)
        self.remote.items.append(placeholder)
        self.emit("remote_item_added", llm.RemoteItemAddedEvent(previous, placeholder))

        def transcribed() -> None:
            self.remote.items[self.remote.index_by_id(item_id) or 0] = llm.ChatMessage(
                role="user", content=[transcript], id=item_id, created_at=placeholder.created_at
            )
            done = llm.InputTranscriptionCompleted(
                item_id=item_id, transcript=transcript, is_final=True,
                turn_started_at=placeholder.created_at,
            )  # fmt: skip
            self.emit("input_audio_transcription_completed", done)

        if self._model.late_transcripts:
            self.held_transcripts.append(transcribed)
        else:
            transcribed()
        ev = self._respond(user_initiated=False, instructions=None)
        self.emit("generation_created", ev)

    def send_transcripts(self) -> None:
        """Send the transcripts held back (``late_transcripts``), as a provider does once
        its reply is done."""
        held, self.held_transcripts = self.held_transcripts, []
        for send in held:
            send()

    # ------------------------------------------------------------------- replies

    def generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[Tool]] = NOT_GIVEN,
    ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        text = instructions if isinstance(instructions, str) else None
        self.calls.append(("generate_reply", text))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self._respond(user_initiated=True, instructions=text))
        return fut

    def _respond(
        self, *, user_initiated: bool, instructions: str | None
    ) -> llm.GenerationCreatedEvent:
        reply = self._model.next_reply()
        response = Response(
            id=self._model.next_id("resp"),
            seen=[item.model_copy() for item in self.remote.items],
            instructions=instructions,
            user_initiated=user_initiated,
            reply=reply,
            message_id=self._model.next_id("item_assistant"),
        )
        self.responses.append(response)

        messages = utils.aio.Chan[llm.MessageGeneration]()
        functions = utils.aio.Chan[llm.FunctionCall]()
        text = utils.aio.Chan[str]()
        audio = utils.aio.Chan[rtc.AudioFrame]()
        modalities: asyncio.Future[list[Literal["text", "audio"]]] = (
            asyncio.get_running_loop().create_future()
        )
        modalities.set_result(["audio", "text"])
        if reply.text:
            messages.send_nowait(
                llm.MessageGeneration(
                    message_id=response.message_id,
                    text_stream=text,
                    audio_stream=audio,
                    modalities=modalities,
                )
            )
            text.send_nowait(reply.text)
            for frame in _speech(reply.text):
                audio.send_nowait(frame)
            # the server's own copy of the reply, in full until the client truncates it
            self.remote.items.append(
                llm.ChatMessage(role="assistant", content=[reply.text], id=response.message_id)
            )
        for call in reply.tool_calls:
            fc = llm.FunctionCall(
                call_id=call.call_id or self._model.next_id("call"),
                name=call.name,
                arguments=call.arguments_json(),
                id=self._model.next_id("item_call"),
            )
            functions.send_nowait(fc)
            self.remote.items.append(fc.model_copy())
        for ch in (text, audio, messages, functions):
            ch.close()  # the whole response is generated at once; playout paces it
        return llm.GenerationCreatedEvent(
            message_stream=messages,
            function_stream=functions,
            user_initiated=user_initiated,
            response_id=response.id,
        )

    def interrupt(self) -> None:
        self.calls.append(("interrupt", None))
        if self.responses:
            self.responses[-1].interrupted = True

    def truncate(
        self,
        *,
        message_id: str,
        modalities: list[Literal["text", "audio"]],
        audio_end_ms: int,
        audio_transcript: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        transcript = audio_transcript if isinstance(audio_transcript, str) else ""
        self.calls.append(("truncate", {"message_id": message_id, "transcript": transcript}))
        idx = self.remote.index_by_id(message_id)
        if idx is not None:
            self.remote.items[idx] = llm.ChatMessage(
                role="assistant", content=[transcript], id=message_id, interrupted=True
            )

    async def aclose(self) -> None:
        self.closed = True


def make_realtime_session(
    model: FakeRealtimeModel, **session_kwargs: Any
) -> tuple[AgentSession[Any], FakeAudioInput, FakeAudioOutput]:
    """An ``AgentSession`` on ``model`` with a fake microphone and speaker (no room), the
    agent's transcript synchronized with its audio as a room plays it. Turn detection is
    the model's own (server-side), as with a real realtime API."""
    session_kwargs.setdefault("aec_warmup_duration", None)
    session_kwargs.setdefault("user_away_timeout", None)
    session_kwargs.setdefault("session_close_transcript_timeout", 0.3)
    session_kwargs.setdefault(
        "turn_handling",
        {
            "turn_detection": "realtime_llm",
            "interruption": {
                "resume_false_interruption": False,
                "false_interruption_timeout": None,
            },
            "preemptive_generation": {"enabled": False},
        },
    )
    session: AgentSession[Any] = AgentSession(llm=model, vad=None, **session_kwargs)
    audio_in, audio_out = FakeAudioInput(), FakeAudioOutput()
    session.input.audio = audio_in
    sync = TranscriptSynchronizer(
        next_in_chain_audio=audio_out, next_in_chain_text=FakeTextOutput()
    )
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    return session, audio_in, audio_out


def _reply(turn: str | Reply) -> Reply:
    return Reply(turn) if isinstance(turn, str) else turn


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not NOT_GIVEN}


def _speech(text: str) -> list[rtc.AudioFrame]:
    """Audio of ``text`` spoken: SECONDS_PER_WORD per word, in 20 ms frames."""
    samples = round(OUTPUT_SAMPLE_RATE * FRAME_SECONDS)
    frames = max(1, round(len(text.split()) * SECONDS_PER_WORD / FRAME_SECONDS))
    data = (array.array("h", [1]) * samples).tobytes()
    return [
        rtc.AudioFrame(
            data=data, sample_rate=OUTPUT_SAMPLE_RATE, num_channels=1, samples_per_channel=samples
        )
        for _ in range(frames)
    ]
