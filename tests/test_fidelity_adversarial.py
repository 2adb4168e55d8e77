"""What a checkpoint accepts must restore, and restore as it was saved.

Each test drives a real `AgentSession` (scripted LLM, no room), checkpoints into a
SQLite file, then restores into a new `AgentSession` through a freshly opened store and
a new `ResumableSession`, and compares the items field by field (types included).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from livekit.agents.llm.chat_context import Instructions

import livekit_resume as lr
from tests.lk import EventLog, make_voice_session, voice_fakes
from tests.lk.fake_voice import FakeSTT
from tests.lk.scripted_llm import ScriptedLLM, ToolCall
from tests.test_fidelity import dumped

KEY = "fidelity"


class Front(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def lookup(self, ctx: RunContext[None], q: str) -> dict[str, Any]:
        """Look something up."""
        return {"q": q, "n": 3, "text": "é\x00"}

    @function_tool
    async def to_back(self, ctx: RunContext[None]) -> tuple[Agent, str]:
        """Hand the caller to the back office."""
        return Back(), "transferring"


class Back(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions=Instructions("You are the back office.", dynamic="Caller: +123")
        )

    @function_tool
    async def invoice(self, ctx: RunContext[None], amount: int) -> str:
        """Send an invoice."""
        return f"invoice of {amount} sent"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(Back)
    return reg


class World:
    """One sqlite file; each `open` is a new store object, session and hooks."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path}/fidelity.db"
        self.open: list[tuple[Any, AgentSession[None], lr.ResumableSession]] = []

    async def start(
        self,
        script: list[Any] | None = None,
        *,
        model: ScriptedLLM | None = None,
        takeover: bool = False,
        **kw: Any,
    ) -> tuple[AgentSession[None], lr.ResumableSession]:
        store = lr.open_store(self.url)
        session: AgentSession[None] = AgentSession(
            llm=model or ScriptedLLM(script or [], default="ok")
        )
        rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, **kw)
        self.open.append((store, session, rs))
        try:
            agent = await rs.restore(session, default=Front, takeover=takeover)
        except BaseException:
            await self.close_last()
            raise
        await session.start(agent)
        return session, rs

    async def close_last(self) -> None:
        store, session, rs = self.open.pop()
        await rs.aclose()
        await session.aclose()
        await store.aclose()

    async def close_all(self) -> None:
        while self.open:
            await self.close_last()


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    await w.close_all()


def live_items(session: AgentSession[None]) -> tuple[list[llm.ChatItem], list[llm.ChatItem]]:
    return list(session.history.items), list(session.current_agent._chat_ctx.items)


async def saved_then_restored(
    world: World, session: AgentSession[None], rs: lr.ResumableSession, **kw: Any
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Checkpoint; close; restore in a fresh store/session: (live history, live agent
    ctx, restored history, restored agent ctx), each dumped with types kept."""
    await rs.checkpoint()
    history, agent = (dumped(x) for x in live_items(session))
    await world.close_last()
    s2, _ = await world.start(takeover=True, **kw)
    h2, a2 = (dumped(x) for x in live_items(s2))
    return history, agent, h2, a2


def append(session: AgentSession[None], item: llm.ChatItem) -> None:
    session.history.items.append(item)
    session.current_agent._chat_ctx.items.append(item)


# -- saved, then refused by every restore ------------------------------------------


class UnnamedProviderSTT(FakeSTT):
    """An STT plugin that does not name its provider (or model): LiveKit copies its
    `metrics_metadata` into each user message's ``metrics["stt_metadata"]``."""

    @property
    def provider(self) -> Any:
        return None


async def test_a_voice_turn_through_an_stt_without_a_provider_name_stays_restorable(
    tmp_path: Path,
) -> None:
    """LiveKit assigns ``user_message.metrics = {"stt_metadata": stt.metrics_metadata, ...}``
    after the message is built (voice/agent_activity.py, `_init_metrics_from_end_of_turn`),
    so nothing validates it: the session runs on and the checkpoint stores the None. Every
    restore then refuses the user's message: SnapshotCorrupt, the whole conversation out
    of reach."""
    url = f"sqlite:///{tmp_path}/voice.db"
    store = lr.open_store(url)
    session = make_voice_session(ScriptedLLM(["Hi there."]), stt=UnnamedProviderSTT())
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False)
    try:
        await session.start(await rs.restore(session, default=Front))
        log = EventLog(session)
        voice_fakes(session).audio_in.say("hello")
        await log.wait_for(
            "conversation_item_added",
            lambda ev: getattr(ev.item, "role", None) == "assistant",
            timeout=10,
        )
        user = next(m for m in session.history.messages() if m.role == "user")
        assert user.metrics["stt_metadata"]["model_provider"] is None
        await rs.checkpoint()
        history = dumped(session.history.items)
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
    store = lr.open_store(url)
    again: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False)
    try:
        try:
            agent = await rs.restore(again, default=Front, takeover=True)
        except lr.SnapshotCorrupt as e:
            pytest.fail(f"a voice turn LiveKit ran cannot be restored: {e}")
        await again.start(agent)
        restored = next(m for m in again.history.messages() if m.role == "user")
        assert restored.id == user.id and restored.text_content == user.text_content
        # the one value a restore refuses is left out; the model's name stays
        meta = dict(user.metrics["stt_metadata"])
        del meta["model_provider"]
        assert restored.metrics["stt_metadata"] == meta
        assert len(dumped(again.history.items)) >= len(history)
    finally:
        await rs.aclose()
        await again.aclose()
        await store.aclose()


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("e2e_latency", None),  # an app's "not measured"
        ("e2e_latency", 2**70),  # saved as its decimal string (values.py), then refused
        ("provider_request_ids", [None]),  # a realtime response without an id
    ],
)
async def test_a_metric_of_another_type_than_declared_does_not_make_the_session_unrestorable(
    world: World, metric: str, value: Any
) -> None:
    """``metrics`` "may hold anything" (snapshot/chat.py) and item fields assigned a value
    the restore refuses are converted at save time (`_restorable`); a *metric* of another
    type than `MetricsReport` declares is stored as it is and every restore fails."""
    session, rs = await world.start()
    await session.run(user_input="hi")
    reply = session.history.items[-1]
    assert isinstance(reply, llm.ChatMessage)
    reply.metrics[metric] = value  # type: ignore[literal-required]
    try:
        await saved_then_restored(world, session, rs)
    except lr.SnapshotCorrupt as e:
        pytest.fail(f"checkpoint accepted a metric every restore refuses: {e}")


@pytest.mark.parametrize(
    "make",
    [
        # validly built: pydantic takes any int there; saved as its decimal string
        lambda: llm.ChatMessage(
            role="user",
            content=[llm.ImageContent(image="https://x.test/a.png", inference_width=2**70)],
        ),
        # assigned after validation, as `_restorable` handles for item fields
        lambda: llm.ChatMessage(
            role="user",
            content=[
                llm.ImageContent(image="https://x.test/a.png").model_copy(
                    update={"inference_detail": "medium"}
                )
            ],
        ),
        lambda: llm.AgentConfigUpdate(instructions="x").model_copy(
            update={"tools_added": ["lookup", None]}
        ),
    ],
    ids=[
        "image-width-beyond-64-bits",
        "image-detail-unknown",
        "config-tool-name-none",
    ],
)
async def test_a_nested_value_the_restore_refuses_is_not_saved_as_it_is(
    world: World, make: Any
) -> None:
    """Inside a content part (or a config update's tool list) a value the restore refuses
    is stored unchanged: the checkpoint succeeds and every restore then raises
    SnapshotCorrupt for the whole session."""
    session, rs = await world.start()
    await session.run(user_input="hi")
    append(session, make())
    try:
        await saved_then_restored(world, session, rs)
    except lr.SnapshotCorrupt as e:
        pytest.fail(f"checkpoint accepted an item every restore refuses: {e}")


async def test_a_video_frame_that_cannot_be_resized_does_not_stop_every_checkpoint(
    world: World,
) -> None:
    """media="keep": a frame that cannot be encoded is documented to be dropped with a
    marker and a warning (`MediaPolicy`). A 0-pixel-wide frame with an inference size
    raises ZeroDivisionError inside LiveKit's resize; it is not caught
    (chat.py catches only ImportError and ValueError), so this and every later
    checkpoint fail with a bare exception and nothing of the conversation is saved."""
    session, rs = await world.start(media="keep")
    await session.run(user_input="hi")
    frame = rtc.VideoFrame(0, 4, rtc.VideoBufferType.RGBA, b"")
    append(
        session,
        llm.ChatMessage(
            role="user",
            content=[
                "look",
                llm.ImageContent(image=frame, inference_width=64, inference_height=64),
            ],
        ),
    )
    try:
        version = await rs.checkpoint()
    except Exception as e:
        pytest.fail(f"checkpoint failed with a bare {type(e).__name__}: {e}")
    assert version >= 1


async def test_media_dropped_by_the_default_policy_is_dropped_loudly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """media="drop" (the default) replaces an inline image and audio frames; the frames
    and the image bytes are gone for good. Nothing is logged: no warning, not even at
    debug level, names the item that lost its media (a frame that fails to encode
    under "keep" is logged; a deliberate drop is not)."""
    session, rs = await world.start()
    await session.run(user_input="hi")
    msg = llm.ChatMessage(
        role="user",
        content=[
            "look",
            llm.ImageContent(image="data:image/png;base64," + base64.b64encode(b"png").decode()),
            llm.AudioContent(frame=[rtc.AudioFrame(bytes(64), 16000, 1, 32)], transcript="hi"),
        ],
    )
    append(session, msg)
    caplog.set_level(logging.DEBUG, logger="livekit_resume")
    await rs.checkpoint()
    named = [r for r in caplog.records if msg.id in r.getMessage()]
    assert named, "inline image and audio frames dropped from the snapshot without a word"


# -- what held ---------------------------------------------------------------------------


async def test_tools_and_a_handoff_through_the_real_path_restore_field_for_field(
    world: World,
) -> None:
    """Tool calls run by AgentSession (dict output with NUL and non-ASCII), a handoff to
    a second registered agent, edits in place of the last items (text, `interrupted`)
    after a first checkpoint: the history restores exactly, types included."""
    session, rs = await world.start(
        [
            "Hello",
            [ToolCall("lookup", {"q": "x"})],
            "Found it.",
            [ToolCall("to_back")],
            "Back office here.",
            [ToolCall("invoice", {"amount": 40})],
            "Sent.",
        ]
    )
    await session.run(user_input="hi")
    await session.run(user_input="look up x")
    await rs.checkpoint()
    last = session.history.items[-1]
    assert isinstance(last, llm.ChatMessage)
    last.content[0] = "Found it, edited."
    last.interrupted = True
    await session.run(user_input="the back office please")
    await session.run(user_input="invoice 40")
    history, _, restored, _ = await saved_then_restored(world, session, rs)
    assert restored[: len(history)] == history


async def test_edge_values_in_an_item_restore_exactly(world: World) -> None:
    """Empty and NUL text, a cache breakpoint, NaN/inf/-0.0, bytes and nested maps in
    ``extra``, a URL image, a group id: exact through a fresh store."""
    session, rs = await world.start()
    await session.run(user_input="hi")
    append(
        session,
        llm.ChatMessage(
            role="assistant",
            content=["", "a\x00b", llm.CacheBreakpoint(), llm.ImageContent(image="https://x/y")],
            interrupted=True,
            transcript_confidence=-0.0,
            extra={"n": float("nan"), "i": float("-inf"), "b": b"\x00\xff", "d": {"e": [1, 2.5]}},
        ),
    )
    append(session, llm.FunctionCall(call_id="c", name="lookup", arguments="", group_id="g"))
    append(
        session,
        llm.FunctionCallOutput(
            call_id="c", name="lookup", output="", is_error=True, reply_required=False
        ),
    )
    history, agent, h2, a2 = await saved_then_restored(world, session, rs)
    assert h2[: len(history)] == history
    assert a2[: len(agent)] == agent
