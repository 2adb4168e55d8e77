"""Model doubles that hold what real provider plugins hold: live network connections.

A real voice session keeps sockets open to its providers, and not all of them the same
way (read in LiveKit's plugins, e.g. deepgram's STT, cartesia's TTS, openai's LLM):

- a streaming **STT** opens a websocket per recognize stream and keeps it for the life of
  the stream (`NetSTT`: a TCP connection per stream, audio frames sent over it);
- a **TTS** keeps its websockets in a ``utils.ConnectionPool`` owned by the TTS object:
  a synthesis borrows one and gives it back, the pool keeps it open until ``tts.aclose()``
  (`NetTTS`);
- an **LLM** client keeps HTTP keep-alive connections in its client's pool, opened by
  ``prewarm`` or the first request and kept until ``llm.aclose()`` (`NetLLM`).

Each connects to `ProviderServer`, a small local server that counts the connections of
each kind it holds open. Everything else is the voice fakes' behaviour (`FakeSTT`,
`FakeTTS`, `ScriptedLLM`), so these run a whole voice pipeline without a room::

    async with ProviderServer() as server:
        session = make_voice_session(NetLLM(server, ["Hi."]), stt=NetSTT(server),
                                     tts=NetTTS(server))
        ...
        server.open_count("stt")     # connections the server holds open right now
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import Iterable
from typing import Any

from livekit import rtc
from livekit.agents import llm, utils
from livekit.agents import tts as lk_tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from livekit_resume.testing.llm import LLMRequest, ScriptedLLM, ScriptedLLMStream, Turn

from .fake_voice import FakeChunkedStream, FakeRecognizeStream, FakeSTT, FakeTTS

__all__ = ["KINDS", "Connection", "NetLLM", "NetSTT", "NetTTS", "ProviderServer"]

KINDS = ("stt", "tts", "llm")


class Connection:
    """One client connection to the `ProviderServer`, as a plugin's websocket would be."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, server: ProviderServer, kind: str) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"HELLO {kind}\n".encode())
        await writer.drain()
        if await reader.readline() != b"READY\n":
            raise ConnectionError(f"the provider server refused a {kind} connection")
        return cls(reader, writer)

    async def request(self, text: str) -> None:
        """A request and its answer (one line each way)."""
        self._writer.write(text.replace("\n", " ").encode() + b"\n")
        await self._writer.drain()
        if not await self._reader.readline():
            raise ConnectionError("the provider server closed the connection")

    def send_audio(self, data: bytes) -> None:
        """One audio frame, length-prefixed, without waiting for an answer."""
        self._writer.write(struct.pack("!I", len(data)) + data)

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class ProviderServer:
    """A local endpoint standing in for the providers: it accepts connections, reads what
    they send, answers each request line, and counts the connections it holds open."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._open: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        """Connections ever accepted, per kind."""
        self.audio_bytes = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return int(self._server.sockets[0].getsockname()[1])

    def open_count(self, kind: str | None = None) -> int:
        """Connections of ``kind`` (all kinds with None) open right now."""
        return sum(self._open.values()) if kind is None else self._open[kind]

    async def start(self) -> ProviderServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # the connection ends: its handler sees EOF and returns
            for _ in range(200):  # bounded: a handler returns within a few loop turns
                if not self._writers:
                    break
                await asyncio.sleep(0.01)
            await self._server.wait_closed()

    async def __aenter__(self) -> ProviderServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        kind = (await reader.readline()).decode().removeprefix("HELLO ").strip()
        if kind not in KINDS:
            writer.close()
            return
        self._open[kind] += 1
        self.opened[kind] += 1
        writer.write(b"READY\n")
        try:
            if kind == "stt":
                while header := await reader.readexactly(4):
                    self.audio_bytes += len(await reader.readexactly(*struct.unpack("!I", header)))
            else:
                while await reader.readline():
                    writer.write(b"OK\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            self._open[kind] -= 1
            self._writers.discard(writer)
            writer.close()


# ----------------------------------------------------------------------------------- STT


class NetSTT(FakeSTT):
    """`FakeSTT` whose every recognize stream holds a connection open for its whole life
    and sends it the audio it hears, as a websocket STT plugin does."""

    def __init__(self, server: ProviderServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = server

    def stream(
        self,
        *,
        language: Any = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> NetRecognizeStream:
        return NetRecognizeStream(self, conn_options=conn_options)


class NetRecognizeStream(FakeRecognizeStream):
    _conn: Connection | None = None

    async def _run(self) -> None:
        stt = self._fake
        assert isinstance(stt, NetSTT)
        self._conn = await Connection.open(stt.server, "stt")
        try:
            await super()._run()
        finally:
            conn, self._conn = self._conn, None
            await conn.aclose()

    def push_frame(self, frame: rtc.AudioFrame) -> None:
        super().push_frame(frame)
        if self._conn is not None:
            self._conn.send_audio(bytes(frame.data))


# ----------------------------------------------------------------------------------- TTS


def _pool(server: ProviderServer, kind: str) -> utils.ConnectionPool[Connection]:
    async def connect(_timeout: float) -> Connection:
        return await Connection.open(server, kind)

    async def close(conn: Connection) -> None:
        await conn.aclose()

    return utils.ConnectionPool[Connection](connect_cb=connect, close_cb=close)


class NetTTS(FakeTTS):
    """`FakeTTS` whose syntheses borrow a pooled connection, kept open by the TTS object
    between syntheses until `aclose` (LiveKit's ``utils.ConnectionPool``, as cartesia,
    elevenlabs, deepgram and LiveKit's inference TTS use)."""

    def __init__(self, server: ProviderServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool = _pool(server, "tts")

    def prewarm(self) -> None:
        self._pool.prewarm()

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> NetChunkedStream:
        return NetChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    async def aclose(self) -> None:
        await self._pool.aclose()


class NetChunkedStream(FakeChunkedStream):
    async def _run(self, output_emitter: lk_tts.AudioEmitter) -> None:
        tts = self._tts
        assert isinstance(tts, NetTTS)
        async with tts._pool.connection(timeout=self._conn_options.timeout) as conn:
            await conn.request(f"SYNTHESIZE {self.input_text}")
        await super()._run(output_emitter)


# ----------------------------------------------------------------------------------- LLM


class NetLLM(ScriptedLLM):
    """`ScriptedLLM` whose requests go over a keep-alive connection from its client's pool,
    opened by ``prewarm`` (LiveKit prewarms the LLM when the session is built) and kept
    until `aclose`, as an HTTP client keeps its connections alive."""

    def __init__(self, server: ProviderServer, script: Iterable[Turn] = (), **kwargs: Any) -> None:
        super().__init__(script, **kwargs)
        self._pool = _pool(server, "llm")

    async def _prewarm_impl(self) -> None:
        async with self._pool.connection(timeout=10.0) as conn:
            await conn.request("MODELS")

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_options: Any,
    ) -> NetLLMStream:
        request = LLMRequest(chat_ctx=chat_ctx.copy(), tools=[t.id for t in tools or []])
        self._record(request)
        return NetLLMStream(
            self, request=request, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )

    async def aclose(self) -> None:
        await super().aclose()
        await self._pool.aclose()


class NetLLMStream(ScriptedLLMStream):
    async def _run(self) -> None:
        model = self._scripted
        assert isinstance(model, NetLLM)
        async with model._pool.connection(timeout=self._conn_options.timeout) as conn:
            await conn.request("CHAT")
            await super()._run()
