"""Conformance of the optional event capabilities (`EventPublisher`, `EventSource`):
skipped, with the reason, for a store that implements neither."""

from __future__ import annotations

import asyncio

import pytest

from ...stores.base import EventPublisher, EventSource
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
