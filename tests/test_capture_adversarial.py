"""An adversarial pass over the checkpoint capture path: each test scripts what an app (or
LiveKit) may do to a live session's items, checkpoints, restores in a new `AgentSession`
and compares the restore with the live session. Each one failed before its fix."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, llm

import livekit_resume as lr
from livekit_resume.agent_hooks.capture import OFFLOAD_BYTES
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.test_checkpoint_flat import (
    KEY,
    Helper,
    ThreadNotingCodec,
    live,
    registry,
    start,
    talk,
)

__all__ = ["live"]  # the fixture, shared with test_checkpoint_flat (on this module's store)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s: Store = lr.open_store("memory://")
    yield s
    await s.aclose()


def dumped(items: list[llm.ChatItem]) -> list[dict[str, Any]]:
    return [i.model_dump(exclude={"created_at"}) for i in items]


async def restored(store: Store) -> tuple[list[llm.ChatItem], list[llm.ChatItem]]:
    """History and agent context as a fresh worker restores them (taking it over)."""
    session, rs = await start(store, takeover=True)
    try:
        return list(session.history.items), list(session.current_agent._chat_ctx.items)
    finally:
        await rs.aclose()
        await session.aclose()


@pytest.mark.parametrize("stream", ["history", "agent"])
async def test_a_duplicated_id_after_a_removal_is_saved_apart_and_leaves_the_store_restorable(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession], stream: str
) -> None:
    # Before: the duplicate check ran only when the committed prefix was intact; after a
    # removal in the middle, a second item under an old id was written over the first
    # and the head counted both, so every restore of that version failed SnapshotCorrupt.
    # Then it was refused, and so was every later checkpoint: saved as ``<id>~2`` now.
    session, rs = live
    await talk(session, rs, 4)
    items = session.history.items if stream == "history" else session.current_agent._chat_ctx.items
    del items[5]
    items.append(items[1].model_copy(update={"content": ["a copy under the same id"]}))
    await rs.checkpoint()
    history, agent_items = await restored(store)
    got = history if stream == "history" else agent_items
    expected = dumped(items)
    expected[-1]["id"] = f"{items[1].id}~2"
    assert dumped(got)[: len(expected)] == expected  # a start adds its handoff after


async def test_a_cycle_in_a_recent_items_extra_does_not_stop_checkpoints(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession]
) -> None:
    # Chat items never refuse (docs/guide.md): the value walk cuts a cycle with None, but
    # the edit check's frozen copy of the item recursed forever (RecursionError on every
    # later checkpoint).
    session, rs = live
    await talk(session, rs, 2)
    loop: dict[str, Any] = {"n": 1}
    loop["self"] = loop
    last = session.history.items[-1]
    assert isinstance(last, llm.ChatMessage)
    last.extra["loop"] = loop
    await rs.checkpoint()
    await session.run(user_input="after the cycle")
    await rs.checkpoint()
    await rs.checkpoint()  # the item, still in the edit window, is checked again
    history, _ = await restored(store)
    live_items = session.history.items
    assert [i.id for i in history[: len(live_items)]] == [i.id for i in live_items]
    assert history[len(live_items) - 1].model_dump() == live_items[-1].model_dump()


@pytest.mark.parametrize("output", [b"\xff\x00raw", {"rows": [1, 2]}, 42, 3.5])
async def test_a_tool_output_that_is_not_text_is_saved_as_text_the_restore_accepts(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession], output: Any
) -> None:
    # An output set after the item was made skips pydantic's validation. It was stored
    # as it was and every restore of the session refused it (SnapshotCorrupt).
    session, rs = live
    await talk(session, rs, 1)
    call = llm.FunctionCall(call_id="c1", name="fetch", arguments="{}")
    out = llm.FunctionCallOutput(call_id="c1", name="fetch", output="", is_error=False)
    out.output = output
    session.history.items += [call, out]
    await rs.checkpoint()
    history, _ = await restored(store)
    live_items = session.history.items
    assert [i.id for i in history[: len(live_items)]] == [i.id for i in live_items]
    back = history[len(live_items) - 1]
    assert isinstance(back, llm.FunctionCallOutput) and isinstance(back.output, str)
    assert back.call_id == "c1"
    if isinstance(output, bytes):
        assert back.output == output.decode("utf-8", "replace")


async def test_a_content_part_of_another_type_is_saved_as_text_not_refused(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession]
) -> None:
    # item_to_data raised TypeError for a part that is not text or media, and every later
    # checkpoint of the session failed with it ("a chat item never fails to convert").
    session, rs = live
    await talk(session, rs, 1)
    msg = llm.ChatMessage(role="user", content=["count:"])
    msg.content.append(5)  # type: ignore[arg-type]  # what an app's mutation can do
    session.history.items.append(msg)
    await rs.checkpoint()
    await session.run(user_input="next")
    await rs.checkpoint()
    history, _ = await restored(store)
    live_items = session.history.items
    assert [i.id for i in history[: len(live_items)]] == [i.id for i in live_items]
    back = next(i for i in history if i.id == msg.id)
    assert isinstance(back, llm.ChatMessage) and back.content == ["count:", "5"]


@dataclasses.dataclass
class Progress:
    step: int
    notes: list[str]


def _progress() -> Any:
    return Progress(1, [])


def _counter() -> Any:
    return defaultdict(int, {"seen": 1})


@pytest.mark.parametrize("make", [_progress, _counter], ids=["dataclass", "defaultdict"])
async def test_an_object_in_a_recent_items_extra_edited_in_place_reaches_the_store(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession], make: Any
) -> None:
    # The edit check's frozen copy compared any object but a plain container or a model
    # by identity: an edit inside a dataclass or a dict subclass held in ``extra`` (well
    # within the edit window) never reached the store.
    session, rs = live
    await talk(session, rs, 2)
    reply = session.history.items[-1]
    assert isinstance(reply, llm.ChatMessage)
    reply.extra["state"] = make()
    await rs.checkpoint()
    state = reply.extra["state"]
    if isinstance(state, Progress):
        state.step = 2
        state.notes.append("booked")
    else:
        state["seen"] += 1
    await rs.checkpoint()
    history, _ = await restored(store)
    back = next(i for i in history if i.id == reply.id)
    assert item_to_data(back)["extra"] == item_to_data(reply)["extra"]


async def test_userdata_nested_past_what_a_frame_holds_is_refused_alone(store: Store) -> None:
    # The value walk allowed 256 levels but a frame holds 200: userdata between the two
    # passed as savable, then the head's encode refused the whole checkpoint
    # (SnapshotTooLarge), so the history stopped saving too, against "only that value is
    # refused" (docs/guide.md).
    session: AgentSession[dict[str, Any]] = AgentSession(
        llm=ScriptedLLM([], default="ok"), userdata={}
    )
    rs = lr.ResumableSession(
        store, KEY, registry=registry(), autosave=False, userdata_type=dict[str, Any]
    )
    await session.start(await rs.restore(session, default=Helper))
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        deep: list[Any] = []
        for _ in range(210):
            deep = [deep]
        session.userdata["deep"] = deep
        await session.run(user_input="after the deep value")
        await rs.checkpoint()
        live_ids = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    history, _ = await restored(store)
    assert [i.id for i in history[: len(live_ids)]] == live_ids


@pytest.mark.parametrize("where", ["recent", "old_then_truncated"])
async def test_an_id_changed_in_place_moves_the_item_to_the_new_id(
    store: Store, live: tuple[AgentSession[None], lr.ResumableSession], where: str
) -> None:
    # Recent: the edit check saw the item (no shape under its new id) and wrote it under
    # the new id, but nothing removed the record under the old one. Old (past the edit
    # window, not seen then): a later truncation removed what it read as the item's id,
    # the new one. Either way the store held one item more than the head counted and
    # every restore failed (SnapshotCorrupt).
    session, rs = live
    await talk(session, rs, 8)
    items = session.history.items
    target = items[-1] if where == "recent" else items[3]
    target.id = "item_renamed"
    await rs.checkpoint()
    if where == "old_then_truncated":
        del items[:2]  # the app's truncation: the oldest items go
    await session.run(user_input="after the rename")
    await rs.checkpoint()
    history, agent = await restored(store)
    assert dumped(history[: len(items)]) == dumped(items)
    live_agent = session.current_agent._chat_ctx.items
    assert dumped(agent[: len(live_agent)]) == dumped(live_agent)


async def test_kept_audio_frames_count_toward_encoding_off_the_event_loop(store: Store) -> None:
    # With media="keep" an audio part's PCM sits five levels down in the item's data,
    # below where `weight` stopped counting: megabytes of audio were hashed, packed and
    # compressed on the event loop every other session of the worker shares.
    codec = ThreadNotingCodec()
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(
        store, KEY, registry=registry(), autosave=False, media="keep", codec=codec
    )
    await session.start(await rs.restore(session, default=Helper))
    try:
        await session.run(user_input="hello")
        samples = OFFLOAD_BYTES  # 16-bit mono: twice OFFLOAD_BYTES of PCM
        frame = rtc.AudioFrame(bytes(2 * samples), 16000, 1, samples)
        heard = llm.ChatMessage(
            role="user", content=[llm.AudioContent(frame=[frame], transcript="hi")]
        )
        session.history.items.append(heard)
        await rs.checkpoint()
        assert codec.threads[heard.id] is not threading.main_thread()
    finally:
        await rs.aclose()
        await session.aclose()
    history, _ = await restored(store)
    back = next(i for i in history if i.id == heard.id)
    assert item_to_data(back, media="keep") == item_to_data(heard, media="keep")


@dataclasses.dataclass
class Day:
    day: str


class Booking(Agent):
    """An agent whose saved state the test sets (``snapshot_state`` returns it)."""

    state: dict[str, Any] = {}  # set per test, read at each checkpoint
    built: list[dict[str, Any]] = []  # each state a restore built it from

    def __init__(self, **state: Any) -> None:
        super().__init__(instructions="You book visits.")
        Booking.built.append(state)

    def snapshot_state(self) -> dict[str, Any]:
        return Booking.state


async def test_agent_state_that_is_not_plain_data_does_not_stop_checkpoints(store: Store) -> None:
    # snapshot_state() went into the head as it was: a datetime, a set or an object made
    # every checkpoint fail (TypeError from the packer), so the whole conversation stopped
    # saving. It now follows the rules of ``extra`` (docs/guide.md): a datetime becomes
    # its ISO string, and a value that cannot be saved is refused (logged) while the
    # agent's last savable state and the rest of the session are saved.
    reg = lr.AgentRegistry()
    reg.register(Booking, factory=lambda state: Booking(**state))
    Booking.state, Booking.built = {"slot": "tue"}, []
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    await session.start(await rs.restore(session, default=Booking))
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        Booking.state = {"slot": "wed", "tags": {"vip"}, "at": Day("wed")}
        await session.run(user_input="wednesday then")
        await rs.checkpoint()
        Booking.state = {"slot": "thu", "handle": object()}  # cannot be saved
        await session.run(user_input="or thursday")
        await rs.checkpoint()
        live_ids = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    session = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=reg, autosave=False)
    await session.start(await rs.restore(session, default=Booking, takeover=True))
    try:
        assert [i.id for i in session.history.items[: len(live_ids)]] == live_ids
        assert Booking.built[-1] == {"slot": "wed", "tags": ["vip"], "at": {"day": "wed"}}
    finally:
        await rs.aclose()
        await session.aclose()


@pytest.mark.parametrize("what", ["call_arguments", "message_extra"])
async def test_an_item_too_large_in_a_field_without_a_stand_in_is_saved_smaller(
    store: Store, what: str
) -> None:
    # Only a message's text and a tool output had a stand-in when an item is over
    # max_frame: a function call's arguments, or a message's ``extra``, over the limit
    # made every later checkpoint fail (SnapshotTooLarge), so nothing more was saved.
    codec = Codec(max_frame=64 * 1024)
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, codec=codec)
    await session.start(await rs.restore(session, default=Helper))
    try:
        await session.run(user_input="hello")
        await rs.checkpoint()
        big = "x" * (128 * 1024)
        if what == "call_arguments":
            call = llm.FunctionCall(call_id="c1", name="draft", arguments=f'{{"text": "{big}"}}')
            out = llm.FunctionCallOutput(call_id="c1", name="draft", output="ok", is_error=False)
            session.history.items += [call, out]
            target: llm.ChatItem = call
        else:
            target = llm.ChatMessage(role="user", content=["see attached"], extra={"blob": big})
            session.history.items.append(target)
        await rs.checkpoint()
        await session.run(user_input="and then")
        await rs.checkpoint()
        live_ids = [i.id for i in session.history.items]
    finally:
        await rs.aclose()
        await session.aclose()
    session = AgentSession(llm=ScriptedLLM([], default="ok"))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False, codec=codec)
    await session.start(await rs.restore(session, default=Helper, takeover=True))
    try:
        history = session.history.items
        assert [i.id for i in history[: len(live_ids)]] == live_ids
        back = next(i for i in history if i.id == target.id)
        if isinstance(back, llm.FunctionCall):
            assert "omitted" in back.arguments and back.call_id == "c1"
        else:
            assert isinstance(back, llm.ChatMessage) and back.extra == {}
    finally:
        await rs.aclose()
        await session.aclose()


@pytest.mark.parametrize(
    ("kind", "field", "value", "saved"),
    [
        ("message", "interrupted", 1, True),
        ("message", "role", "tool", "user"),
        ("message", "transcript_confidence", "0.5", 0.5),
        ("message", "transcript_confidence", "high", None),
        ("message", "extra", ["not", "a", "map"], {}),
        ("output", "is_error", "yes", True),
        ("output", "reply_required", None, True),
        ("call", "created_at", 7, 7.0),
        ("call", "created_at", "2026-12-03", "now"),
    ],
)
async def test_a_field_assigned_a_value_the_restore_refuses_is_saved_as_one_it_accepts(
    store: Store,
    live: tuple[AgentSession[None], lr.ResumableSession],
    kind: str,
    field: str,
    value: Any,
    saved: Any,
) -> None:
    # A value assigned to a chat item after it was made skips pydantic's validation. It
    # was stored as it was and every restore of the session refused it (SnapshotCorrupt):
    # the whole conversation was out of reach for one field of one item.
    session, rs = live
    await talk(session, rs, 1)
    item: llm.ChatItem
    if kind == "message":
        item = llm.ChatMessage(role="assistant", content=["noted"], interrupted=False)
    elif kind == "output":
        item = llm.FunctionCallOutput(call_id="c1", name="fetch", output="ok", is_error=False)
    else:
        item = llm.FunctionCall(call_id="c1", name="fetch", arguments="{}")
    setattr(item, field, value)
    # appended last (LiveKit itself fails to insert before an item whose time is text)
    session.history.items.append(item)
    before = time.time()
    await rs.checkpoint()
    live_ids = [i.id for i in session.history.items]
    history, _ = await restored(store)
    assert [i.id for i in history[: len(live_ids)]] == live_ids
    back = next(i for i in history if i.id == item.id)
    assert type(back) is type(item)
    got = getattr(back, field)
    if saved == "now":
        assert isinstance(got, float) and got >= before
    else:
        assert got == saved and type(got) is type(saved)
    for name, live_value in item.__dict__.items():
        if name != field:
            assert getattr(back, name) == live_value, name
