"""Voice fakes: run a whole VAD -> STT -> LLM -> TTS -> audio-output pipeline without a room.

The user's voice is real audio with a twist: a spoken utterance is a run of 16-bit frames whose
every sample holds the utterance's *code* (silence is zeros). ``FakeVAD`` calls any non-zero frame
speech; ``FakeSTT`` turns a run of one code into that utterance's transcript, emitted once the
run is followed by silence. So whatever the session drops (a detached input, a closed stream)
is never heard, exactly like a real microphone.

    session = make_voice_session(ScriptedLLM(["Hi there."]))
    fakes = voice_fakes(session)
    await session.start(MyAgent())
    fakes.audio_in.say("hello")                        # the user speaks (real time)
    await fakes.audio_out.wait_for_segment(1)           # the reply was played

``FakeAudioInput`` is a real-time microphone (20 ms frames, silence when nobody talks) that drops
frames while detached, as a room input does. ``FakeAudioOutput`` plays frames on a virtual clock,
records what reached it, and reports ``playback_started`` / ``playback_finished`` (with
``interrupted`` and the position reached) the way a room output does, so LiveKit's
``TranscriptSynchronizer`` computes the partial text of an interrupted reply.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession, LanguageCode, utils
from livekit.agents import llm as lk_llm
from livekit.agents import stt as lk_stt
from livekit.agents import tts as lk_tts
from livekit.agents import vad as lk_vad
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions
from livekit.agents.voice import io
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

__all__ = [
    "FakeAudioInput",
    "FakeAudioOutput",
    "FakeSTT",
    "FakeTTS",
    "FakeTextOutput",
    "FakeVAD",
    "PlayedSegment",
    "Utterance",
    "VoiceFakes",
    "make_voice_session",
    "voice_fakes",
]

INPUT_SAMPLE_RATE = 16000
TTS_SAMPLE_RATE = 24000

# utterance code -> transcript, shared by every FakeAudioInput / FakeSTT of the process
_TRANSCRIPTS: dict[int, str] = {}
_codes = itertools.count(1)


def _new_code(text: str) -> int:
    code = next(_codes) % 32000 + 1
    _TRANSCRIPTS[code] = text
    return code


def frame_code(frame: rtc.AudioFrame) -> int:
    """The utterance code a frame carries, 0 for silence."""
    data = frame.data
    return int(data[0]) if len(data) else 0


# --------------------------------------------------------------------------------------- input


@dataclass
class Utterance:
    """One thing the user says into a :class:`FakeAudioInput`."""

    text: str
    code: int
    duration: float
    done: asyncio.Future[None]
    """Resolves once every frame of the utterance left the microphone (sent or dropped)."""
    frames_total: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0

    @property
    def dropped(self) -> bool:
        """Nothing of it reached the session (the input was detached the whole time)."""
        return self.done.done() and self.frames_sent == 0


class FakeAudioInput(io.AudioInput):
    """A real-time microphone: yields one frame per ``frame_duration`` of wall time.

    While detached (``session.input.set_audio_enabled(False)``) it keeps its clock running
    and drops the frames, as LiveKit's room input does.
    """

    def __init__(
        self, *, sample_rate: int = INPUT_SAMPLE_RATE, frame_duration: float = 0.02
    ) -> None:
        super().__init__(label="FakeAudioInput")
        self.sample_rate = sample_rate
        self.frame_duration = frame_duration
        self._samples = round(sample_rate * frame_duration)
        self._silence = self._frame(0)
        self._pending: deque[tuple[Utterance, int]] = deque()
        self._t0: float | None = None
        self._n = 0
        self._closed = False
        self.attached = True
        self.frames_sent = 0
        self.frames_dropped = 0
        self.utterances: list[Utterance] = []

    def _frame(self, value: int) -> rtc.AudioFrame:
        return rtc.AudioFrame(
            data=(array.array("h", [value]) * self._samples).tobytes(),
            sample_rate=self.sample_rate,
            num_channels=1,
            samples_per_channel=self._samples,
        )

    def say(self, text: str, *, duration: float | None = None) -> Utterance:
        """Queue an utterance; it is spoken after any queued before it.

        ``duration`` defaults to 0.15 s per word (at least 0.4 s).
        """
        if duration is None:
            duration = max(0.4, 0.15 * len(text.split()))
        frames = max(1, round(duration / self.frame_duration))
        utt = Utterance(
            text=text,
            code=_new_code(text),
            duration=frames * self.frame_duration,
            done=asyncio.get_running_loop().create_future(),
            frames_total=frames,
        )
        self.utterances.append(utt)
        self._pending.append((utt, frames))
        return utt

    @property
    def speaking(self) -> bool:
        return bool(self._pending)

    def on_attached(self) -> None:
        self.attached = True
        super().on_attached()

    def on_detached(self) -> None:
        self.attached = False
        super().on_detached()

    def close(self) -> None:
        self._closed = True

    def _next_frame(self) -> tuple[rtc.AudioFrame, Utterance | None]:
        if not self._pending:
            return self._silence, None
        utt, left = self._pending[0]
        frame = self._frame(utt.code)
        if left <= 1:
            self._pending.popleft()
        else:
            self._pending[0] = (utt, left - 1)
        return frame, utt

    async def __anext__(self) -> rtc.AudioFrame:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise StopAsyncIteration
            now = loop.time()
            if self._t0 is None or now - (self._t0 + self._n * self.frame_duration) > 0.25:
                # first frame, or the reader stalled: restart the clock rather than burst
                self._t0, self._n = now, 0
            due = self._t0 + self._n * self.frame_duration
            if due > now:
                await asyncio.sleep(due - now)
            self._n += 1
            frame, utt = self._next_frame()
            if utt is not None:
                if self.attached:
                    utt.frames_sent += 1
                else:
                    utt.frames_dropped += 1
                left = utt.frames_total - utt.frames_sent - utt.frames_dropped
                if left <= 0 and not utt.done.done():
                    utt.done.set_result(None)
            if not self.attached:
                self.frames_dropped += 1
                continue
            self.frames_sent += 1
            return frame


# ----------------------------------------------------------------------------------------- VAD


class FakeVAD(lk_vad.VAD):
    """Energy VAD over :class:`FakeAudioInput` frames: non-zero samples are speech."""

    def __init__(
        self, *, min_speech_duration: float = 0.05, min_silence_duration: float = 0.25
    ) -> None:
        super().__init__(capabilities=lk_vad.VADCapabilities(update_interval=0.02))
        self.min_speech_duration = min_speech_duration
        self.min_silence_duration = min_silence_duration
        self.events: list[lk_vad.VADEvent] = []
        """START_OF_SPEECH and END_OF_SPEECH events, in order (INFERENCE_DONE is not kept)."""

    @property
    def speech_starts(self) -> int:
        return sum(1 for e in self.events if e.type == lk_vad.VADEventType.START_OF_SPEECH)

    def stream(self) -> FakeVADStream:
        return FakeVADStream(self)


class FakeVADStream(lk_vad.VADStream):
    def __init__(self, fake: FakeVAD) -> None:
        self._fake = fake
        super().__init__(fake)

    async def _main_task(self) -> None:
        fake = self._fake
        speaking = False
        speech = 0.0  # speech accumulated in the current segment
        silence = 0.0  # silence accumulated since the last speech frame
        pending = 0.0  # speech heard before start_of_speech was declared
        t = 0.0

        def send(kind: lk_vad.VADEventType, *, voiced: bool) -> None:
            ev = lk_vad.VADEvent(
                type=kind,
                samples_index=0,
                timestamp=t,
                speech_duration=speech,
                silence_duration=silence,
                probability=1.0 if voiced else 0.0,
                speaking=speaking,
                raw_accumulated_speech=speech if voiced else 0.0,
                raw_accumulated_silence=0.0 if voiced else silence,
            )
            if kind != lk_vad.VADEventType.INFERENCE_DONE:
                fake.events.append(ev)
            self._event_ch.send_nowait(ev)

        async for item in self._input_ch:
            if isinstance(item, lk_vad.VADStream._FlushSentinel):
                speaking, speech, silence, pending = False, 0.0, 0.0, 0.0
                continue
            dur = item.duration
            t += dur
            voiced = frame_code(item) != 0
            if voiced:
                silence = 0.0
                if speaking:
                    speech += dur
                else:
                    pending += dur
                    if pending >= fake.min_speech_duration:
                        speaking, speech, pending = True, pending, 0.0
                        send(lk_vad.VADEventType.START_OF_SPEECH, voiced=True)
            else:
                pending = 0.0
                silence += dur
                if speaking and silence >= fake.min_silence_duration:
                    speaking = False
                    send(lk_vad.VADEventType.END_OF_SPEECH, voiced=False)
                    speech = 0.0
            send(lk_vad.VADEventType.INFERENCE_DONE, voiced=voiced)


# ----------------------------------------------------------------------------------------- STT


class FakeSTT(lk_stt.STT[Any]):
    """Streaming STT: a run of one utterance code becomes that utterance's final transcript,
    sent once ``final_delay`` seconds of silence (audio time) follow it.

    With ``manual_flush=True`` it also answers LiveKit's flush requests at once (an empty final
    transcript when nothing is pending), which lets a closing session skip its transcript wait.
    """

    def __init__(self, *, final_delay: float = 0.06, manual_flush: bool = False) -> None:
        super().__init__(
            capabilities=lk_stt.STTCapabilities(
                streaming=True, interim_results=False, manual_flush=manual_flush
            )
        )
        self.final_delay = final_delay
        self.transcripts: list[str] = []
        """Every non-empty final transcript sent, in order."""

    @property
    def model(self) -> str:
        return "fake-stt"

    @property
    def provider(self) -> str:
        return "tests"

    async def _recognize_impl(
        self, buffer: Any, *, language: Any = NOT_GIVEN, conn_options: APIConnectOptions
    ) -> lk_stt.SpeechEvent:
        frames = buffer if isinstance(buffer, list) else [buffer]
        codes = [c for c in (frame_code(f) for f in frames) if c]
        text = " ".join(_TRANSCRIPTS.get(c, "") for c in dict.fromkeys(codes))
        return _final(text)

    def stream(
        self,
        *,
        language: Any = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> FakeRecognizeStream:
        return FakeRecognizeStream(self, conn_options=conn_options)


def _final(text: str) -> lk_stt.SpeechEvent:
    return lk_stt.SpeechEvent(
        type=lk_stt.SpeechEventType.FINAL_TRANSCRIPT,
        alternatives=[lk_stt.SpeechData(language=LanguageCode("en"), text=text, confidence=1.0)],
    )


class FakeRecognizeStream(lk_stt.RecognizeStream):
    def __init__(self, fake: FakeSTT, *, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=fake, conn_options=conn_options)
        self._fake = fake

    async def _run(self) -> None:
        current = 0  # code of the utterance being heard
        silence = 0.0

        def finish() -> None:
            nonlocal current
            text = _TRANSCRIPTS.get(current, "")
            current = 0
            if text:
                self._fake.transcripts.append(text)
            self._event_ch.send_nowait(_final(text))

        async for item in self._input_ch:
            if isinstance(item, lk_stt.RecognizeStream._FlushSentinel):
                if current:
                    finish()
                elif self._fake.capabilities.manual_flush:
                    self._event_ch.send_nowait(_final(""))
                continue
            code = frame_code(item)
            if code:
                if current and code != current:
                    finish()
                current, silence = code, 0.0
            elif current:
                silence += item.duration
                if silence >= self._fake.final_delay:
                    finish()


# ----------------------------------------------------------------------------------------- TTS


class FakeTTS(lk_tts.TTS[Any]):
    """Non-streaming TTS (LiveKit wraps it per sentence): a quiet 220 Hz tone of
    ``seconds_per_char * len(text)`` seconds (at least ``min_duration``)."""

    def __init__(
        self,
        *,
        seconds_per_char: float = 0.03,
        min_duration: float = 0.2,
        ttfb: float = 0.0,
        sample_rate: int = TTS_SAMPLE_RATE,
    ) -> None:
        super().__init__(
            capabilities=lk_tts.TTSCapabilities(streaming=False),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self.seconds_per_char = seconds_per_char
        self.min_duration = min_duration
        self.ttfb = ttfb
        self.requests: list[str] = []
        """Every text synthesized, in order."""

    @property
    def model(self) -> str:
        return "fake-tts"

    @property
    def provider(self) -> str:
        return "tests"

    def duration_for(self, text: str) -> float:
        return max(self.min_duration, self.seconds_per_char * len(text))

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> FakeChunkedStream:
        return FakeChunkedStream(tts=self, input_text=text, conn_options=conn_options)


class FakeChunkedStream(lk_tts.ChunkedStream):
    async def _run(self, output_emitter: lk_tts.AudioEmitter) -> None:
        fake = self._tts
        assert isinstance(fake, FakeTTS)
        fake.requests.append(self.input_text)
        output_emitter.initialize(
            request_id=utils.shortuuid("fake_tts_"),
            sample_rate=fake.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            frame_size_ms=50,
        )
        if fake.ttfb > 0:
            await asyncio.sleep(fake.ttfb)
        n = round(fake.sample_rate * fake.duration_for(self.input_text))
        step = 2 * math.pi * 220 / fake.sample_rate
        tone = array.array("h", (int(3000 * math.sin(i * step)) for i in range(n)))
        output_emitter.push(tone.tobytes())
        output_emitter.flush()


# -------------------------------------------------------------------------------------- output


@dataclass
class PlayedSegment:
    """One playback segment (frames between two flushes) as the fake device saw it."""

    frames: int = 0
    pushed_duration: float = 0.0
    started_at: float | None = None
    finished: bool = False
    interrupted: bool = False
    playback_position: float = 0.0


class FakeAudioOutput(io.AudioOutput):
    """An audio device on a virtual clock.

    ``capture_frame`` records the frame and waits while more than ``max_ahead`` seconds are
    queued but not yet played (``None``: never waits), so frames arrive about as fast as they
    play. Playback of a segment starts at its first frame; ``flush()`` ends it after the queued
    audio has played, ``clear_buffer()`` ends it at once as interrupted.
    """

    def __init__(
        self,
        *,
        sample_rate: int | None = None,
        can_pause: bool = False,
        max_ahead: float | None = 0.3,
    ) -> None:
        super().__init__(
            label="FakeAudioOutput",
            capabilities=io.AudioOutputCapabilities(pause=can_pause),
            sample_rate=sample_rate,
        )
        self.max_ahead = max_ahead
        self.frames: list[rtc.AudioFrame] = []
        self.segments: list[PlayedSegment] = []
        self.attached = True
        self._seg: PlayedSegment | None = None  # the segment being played
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._finish_timer: asyncio.TimerHandle | None = None
        self._flushed = False
        self._changed = asyncio.Event()

    # -- what tests read

    @property
    def pushed_duration(self) -> float:
        return sum(f.duration for f in self.frames)

    @property
    def finished_segments(self) -> list[PlayedSegment]:
        return [s for s in self.segments if s.finished]

    async def wait_for_frames(self, n: int = 1, *, timeout: float = 5.0) -> None:
        await self._wait(lambda: len(self.frames) >= n, timeout)

    async def wait_for_segment(self, n: int = 1, *, timeout: float = 10.0) -> PlayedSegment:
        """Wait until ``n`` segments finished playing (or were interrupted); return the n-th."""
        await self._wait(lambda: len(self.finished_segments) >= n, timeout)
        return self.finished_segments[n - 1]

    async def wait_until_played(self, seconds: float, *, timeout: float = 10.0) -> None:
        """Wait until the segment now playing has played ``seconds`` of audio."""

        async def _loop() -> None:
            while True:
                seg = self._seg
                if seg is None or seg.started_at is None:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                remaining = seconds - self._played()
                if remaining <= 0:
                    return
                await asyncio.sleep(min(remaining, 0.05))

        await asyncio.wait_for(_loop(), timeout)

    async def _wait(self, cond: Callable[[], bool], timeout: float) -> None:
        async def _loop() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_loop(), timeout)

    def _notify(self) -> None:
        self._changed.set()

    # -- the virtual clock

    def _played(self) -> float:
        seg = self._seg
        if seg is None or seg.started_at is None:
            return 0.0
        end = self._paused_at if self._paused_at is not None else time.time()
        return min(seg.pushed_duration, max(0.0, end - seg.started_at - self._paused_total))

    def _queued(self) -> float:
        """Seconds captured but not played yet."""
        return 0.0 if self._seg is None else self._seg.pushed_duration - self._played()

    def _finish(self, *, interrupted: bool) -> None:
        seg = self._seg
        if seg is None:
            return
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        seg.playback_position = seg.pushed_duration if not interrupted else self._played()
        seg.interrupted = interrupted
        seg.finished = True
        self._seg, self._flushed = None, False
        self._paused_at, self._paused_total = None, 0.0
        self.on_playback_finished(playback_position=seg.playback_position, interrupted=interrupted)
        self._notify()

    def _schedule_finish(self) -> None:
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        if self._seg is None or self._paused_at is not None:
            return
        delay = max(0.0, self._seg.pushed_duration - self._played())
        self._finish_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._finish(interrupted=False)
        )

    # -- io.AudioOutput

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        while self.max_ahead is not None:
            wait = self._queued() - self.max_ahead
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        await super().capture_frame(frame)
        if self._seg is None:
            self._seg = PlayedSegment()
            self.segments.append(self._seg)
        seg = self._seg
        seg.frames += 1
        seg.pushed_duration += frame.duration
        self.frames.append(frame)
        if seg.started_at is None and self._paused_at is None:
            seg.started_at = time.time()
            self.on_playback_started(created_at=seg.started_at)
        self._notify()

    def flush(self) -> None:
        super().flush()
        if self._seg is None:
            return
        self._flushed = True
        self._schedule_finish()

    def clear_buffer(self) -> None:
        if self._seg is not None:
            self._finish(interrupted=True)

    def pause(self) -> None:
        super().pause()
        if self._paused_at is None:
            self._paused_at = time.time()
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None

    def resume(self) -> None:
        super().resume()
        if self._paused_at is None:
            return
        if self._seg is not None and self._seg.started_at is not None:
            self._paused_total += time.time() - self._paused_at
        self._paused_at = None
        if self._seg is not None and self._seg.started_at is None and self._seg.frames:
            self._seg.started_at = time.time()
            self.on_playback_started(created_at=self._seg.started_at)
        if self._flushed:
            self._schedule_finish()

    def on_attached(self) -> None:
        self.attached = True
        super().on_attached()

    def on_detached(self) -> None:
        self.attached = False
        super().on_detached()


class FakeTextOutput(io.TextOutput):
    """Records the agent transcript as it would reach a room (one string per segment)."""

    def __init__(self) -> None:
        super().__init__(label="FakeTextOutput", next_in_chain=None)
        self._current = ""
        self.segments: list[str] = []

    @property
    def current(self) -> str:
        """The text of the segment in progress, as far as it was forwarded."""
        return self._current

    async def capture_text(self, text: str) -> None:
        self._current += text

    def flush(self) -> None:
        self.segments.append(self._current)
        self._current = ""


# ------------------------------------------------------------------------------------- session


@dataclass
class VoiceFakes:
    """The fakes wired into a session by :func:`make_voice_session` (they hold no
    reference to it: the table below is keyed weakly on the session)."""

    audio_in: FakeAudioInput
    audio_out: FakeAudioOutput
    text_out: FakeTextOutput | None
    vad: FakeVAD
    stt: FakeSTT
    tts: FakeTTS
    synchronizer: TranscriptSynchronizer | None = None


_FAKES: weakref.WeakKeyDictionary[AgentSession[Any], VoiceFakes] = weakref.WeakKeyDictionary()


def make_voice_session(
    llm: lk_llm.LLM[Any],
    *,
    vad: FakeVAD | None = None,
    stt: FakeSTT | None = None,
    tts: FakeTTS | None = None,
    audio_in: FakeAudioInput | None = None,
    audio_out: FakeAudioOutput | None = None,
    sync_transcript: bool = True,
    endpointing_delay: float = 0.2,
    min_interruption_duration: float = 0.2,
    session_close_transcript_timeout: float = 0.3,
    **session_kwargs: Any,
) -> AgentSession[Any]:
    """An ``AgentSession`` with fake VAD/STT/TTS and fake audio in/out set before ``start()``.

    Turn handling is deterministic: VAD turn detection, VAD interruptions (no adaptive model),
    no preemptive generation, no false-interruption resume, no AEC warm-up.
    ``session_close_transcript_timeout`` defaults to 0.3 s here (LiveKit's default is 2.0 s) so
    closing is quick; pass it explicitly to test the real wait. Other keyword arguments go to
    ``AgentSession``. Get the fakes back with :func:`voice_fakes`.
    """
    session_kwargs.setdefault("aec_warmup_duration", None)
    session_kwargs.setdefault("user_away_timeout", None)
    session_kwargs.setdefault(
        "turn_handling",
        {
            "turn_detection": "vad",
            "endpointing": {"min_delay": endpointing_delay, "max_delay": 3.0},
            "interruption": {
                "mode": "vad",
                "min_duration": min_interruption_duration,
                "resume_false_interruption": False,
                "false_interruption_timeout": None,
            },
            "preemptive_generation": {"enabled": False},
        },
    )
    vad = vad or FakeVAD()
    stt = stt or FakeSTT()
    tts = tts or FakeTTS()
    session: AgentSession[Any] = AgentSession(
        llm=llm,
        vad=vad,
        stt=stt,
        tts=tts,
        session_close_transcript_timeout=session_close_transcript_timeout,
        **session_kwargs,
    )
    audio_in = audio_in or FakeAudioInput()
    audio_out = audio_out or FakeAudioOutput()
    session.input.audio = audio_in
    text_out: FakeTextOutput | None = None
    sync: TranscriptSynchronizer | None = None
    if sync_transcript:
        text_out = FakeTextOutput()
        sync = TranscriptSynchronizer(next_in_chain_audio=audio_out, next_in_chain_text=text_out)
        session.output.audio = sync.audio_output
        session.output.transcription = sync.text_output
    else:
        session.output.audio = audio_out
    _FAKES[session] = VoiceFakes(
        audio_in=audio_in,
        audio_out=audio_out,
        text_out=text_out,
        vad=vad,
        stt=stt,
        tts=tts,
        synchronizer=sync,
    )
    return session


def voice_fakes(session: AgentSession[Any]) -> VoiceFakes:
    """The fakes of a session built by :func:`make_voice_session` (also after it closed)."""
    try:
        return _FAKES[session]
    except KeyError:
        raise TypeError("voice_fakes(): the session was not built by make_voice_session") from None
