"""A restored conversation is the conversation that was live at the last commit, types
included. Each test drives a real `AgentSession` (scripted LLM, no room), changes its
live items the way an app may, checkpoints, then restores into a new `AgentSession` from
a freshly opened store and compares item by item (``1 == True`` in Python, not in the
JSON an LLM or an app reads back)."""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import llm

import livekit_resume as lr
from tests.test_capture_adversarial import restored
from tests.test_checkpoint_flat import start


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/fidelity.db"


def strict(value: Any) -> Any:
    """A value with the type of every leaf kept: ``1``, ``1.0`` and ``True`` differ."""
    if isinstance(value, dict):
        return ("dict", tuple((strict(k), strict(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, collections.deque)):
        return ("seq", tuple(strict(v) for v in value))
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def dumped(items: list[llm.ChatItem]) -> list[Any]:
    return [strict(i.model_dump()) for i in items]


class Live:
    """A live session on a sqlite store; `restored` reopens the store in a new
    connection and restores into a new AgentSession."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Live:
        self.store = lr.open_store(self.url)
        self.session, self.rs = await start(self.store)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.rs.aclose()
        await self.session.aclose()
        await self.store.aclose()

    @property
    def history(self) -> list[llm.ChatItem]:
        return self.session.history.items

    @property
    def agent_items(self) -> list[llm.ChatItem]:
        return self.session.current_agent._chat_ctx.items

    async def turns(self, n: int) -> None:
        for k in range(n):
            await self.session.run(user_input=f"turn {k}")

    async def commit(self) -> tuple[list[Any], list[Any]]:
        """Checkpoint; what was live at that commit."""
        await self.rs.checkpoint()
        return dumped(self.history), dumped(self.agent_items)

    async def restored(self) -> tuple[list[Any], list[Any]]:
        store = lr.open_store(self.url)
        try:
            history, agent = await restored(store)
            return dumped(history), dumped(agent)
        finally:
            await store.aclose()


async def test_an_extra_value_changed_to_an_equal_value_of_another_type_is_saved(url: str) -> None:
    """A recent item's ``extra`` flag goes from ``1`` to ``True`` (or a score from ``0`` to
    ``0.0``): an edit. The edit window compared the item with its frozen copy by ``==``,
    and ``1 == True``, so it was never written: the restore had ``1`` where the live
    session had ``True`` (JSON ``1`` against ``true``)."""
    async with Live(url) as live:
        await live.turns(2)
        last: Any = live.history[-1]
        last.extra["confirmed"] = 1
        last.extra["score"] = 0
        await live.commit()
        last.extra["confirmed"] = True
        last.extra["score"] = 0.0
        history, agent = await live.commit()
        got_h, got_a = await live.restored()
        n = len(history) - 1
        assert got_h[n] == history[n]
        assert got_a[len(agent) - 1] == agent[-1]


async def test_a_deque_in_a_recent_items_extra_edited_in_place_is_saved(url: str) -> None:
    """A ``collections.deque`` in ``extra`` is a value the library saves (as a list, by
    ``to_jsonable_python``). The edit window's frozen copy held the deque itself, equal
    to itself whatever was appended: an append in place on the most recent item was
    never seen, and the restore held the deque's contents as of the commit before."""
    async with Live(url) as live:
        await live.turns(2)
        last: Any = live.history[-1]
        last.extra["recent"] = collections.deque(["a"], maxlen=5)
        await live.commit()
        last.extra["recent"].append("b")  # in place, on the most recent item
        history, _ = await live.commit()
        got, _ = await live.restored()
        n = len(history) - 1
        assert got[n] == history[n]


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # its model_dump
async def test_a_bytes_key_in_an_items_extra_does_not_make_the_session_unrestorable(
    url: str,
) -> None:
    """``extra`` may hold anything (snapshot/chat.py), and nested bytes keys stay bytes;
    but LiveKit holds ``dict[str, Any]`` there. A checkpoint stored ``{b"sig": ...}`` as
    it was, and the restore, validating ``extra`` strictly, refused the item and so the
    whole session: `SnapshotCorrupt` on every restore. The key is now saved as text, as
    `_restorable` converts a field assigned without validation."""
    async with Live(url) as live:
        await live.turns(2)
        call = llm.FunctionCall(call_id="c1", name="lookup", arguments="{}")
        extra: dict[Any, Any] = call.extra
        extra[b"signature"] = b"\x01\x02"  # e.g. a provider's raw signature
        out = llm.FunctionCallOutput(call_id="c1", name="lookup", output="ok", is_error=False)
        live.history.extend([call, out])
        await live.commit()
        store = lr.open_store(live.url)
        try:
            session, rs = await start(store, takeover=True)
        except lr.SnapshotCorrupt as e:
            pytest.fail(f"a saved session cannot be restored at all: {e}")
        try:
            (restored,) = [i for i in session.history.items if isinstance(i, llm.FunctionCall)]
            assert restored.extra == {"signature": b"\x01\x02"}  # the key as text
        finally:
            await rs.aclose()
            await session.aclose()
            await store.aclose()
