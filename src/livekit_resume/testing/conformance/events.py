"""Conformance of the optional event capabilities (`EventPublisher`, `EventSource`):
skipped, with the reason, for a store that implements neither."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ...stores.base import Commit, EventPublisher, EventSource
from ._base import StoreTests
from ._model import KEY


class EventTests(StoreTests):
    """What a store that announces state changes must do."""

    async def test_published_events_reach_subscribers(self) -> None:
        store = await self.new_store()
        if not (isinstance(store, EventPublisher) and isinstance(store, EventSource)):
            pytest.skip(f"{type(store).__name__} has no events (EventPublisher, EventSource)")
        async with store.subscribe() as events:
            await store.publish(KEY, "paused", version=1, by="test")
            got = await asyncio.wait_for(events.__anext__(), 5)
        assert got == {"event": "paused", "key": KEY, "version": 1, "by": "test"}
        with pytest.raises(ValueError):
            await store.publish("", "paused")

    async def test_commits_and_takeovers_are_announced_in_order(self) -> None:
        """`EventSource`: a store's own state changes reach its subscribers, ``committed``
        for a commit, then ``taken_over`` for a takeover of the live lease, each with
        ``event`` and ``key`` (and the version, epoch, owner where it names them)."""
        store = await self.new_store()
        if not isinstance(store, EventSource):
            pytest.skip(f"{type(store).__name__} has no events (EventSource)")
        async with store.subscribe() as events:
            a = await store.acquire(KEY, "worker-a")
            assert await store.commit(Commit(KEY, a.epoch, 0, b"h", [], 0, {"n": 1})) == 1
            b = await store.acquire(KEY, "worker-b", takeover=True)
            got: list[dict[str, Any]] = []
            try:
                while len(got) < 2:
                    event = await asyncio.wait_for(events.__anext__(), 5)
                    if event.get("event") in ("committed", "taken_over"):
                        got.append(event)
            except TimeoutError:
                pass
        assert [(e.get("event"), e.get("key")) for e in got] == [
            ("committed", KEY),
            ("taken_over", KEY),
        ], f"the events announced: {got}"
        committed, taken = got
        assert (committed.get("version", 1), committed.get("epoch", a.epoch)) == (1, a.epoch)
        assert (taken.get("epoch", b.epoch), taken.get("owner", "worker-b")) == (
            b.epoch,
            "worker-b",
        )
