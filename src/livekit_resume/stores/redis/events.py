"""`EventStream`: a namespace's state changes, read from its Redis pub/sub channel."""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ...errors import StoreUnavailable
from .client import Server

__all__ = ["EventStream"]

logger = logging.getLogger("livekit_resume")


class EventStream:
    """State changes of one namespace, each a dict with at least ``event`` and ``key``.

    ``async with store.subscribe() as events:`` returns once the subscription is active
    (nothing published after that is missed), then ``async for event in events``.
    Iterating without ``async with`` subscribes on the first ``__anext__``. A lost
    connection ends the iteration with `StoreUnavailable`: subscribe again. Delivery is
    Redis pub/sub: at most once, to subscribers connected at the time.
    """

    def __init__(self, server: Server, channel: str) -> None:
        self._server = server
        self._channel = channel
        self._pubsub: PubSub | None = None
        # Set when redis-py reconnected the subscription on its own (its retries; a
        # failover to a replica that Sentinel names at once): what was published in
        # between is gone, so the stream ends with StoreUnavailable as promised.
        self._cut = False

    async def _start(self) -> PubSub:
        if self._pubsub is None:
            with self._server.errors("subscribe", None):
                client = self._server.client
                if isinstance(client, RedisCluster):
                    await client.initialize()  # the pub/sub node is picked from the slot map
                pubsub: PubSub = client.pubsub()
                await pubsub.subscribe(self._channel)
                # Wait for the server's confirmation: from here no event is missed.
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "subscribe":
                        break
            if pubsub.connection is not None:
                pubsub.connection.register_connect_callback(self._reconnected)
            self._pubsub = pubsub
        return self._pubsub

    async def __aenter__(self) -> EventStream:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        pubsub = await self._start()
        while True:
            with self._server.errors("subscribe", None):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if self._cut:
                raise StoreUnavailable(
                    f"{self._server.where}: the connection of the event subscription was "
                    "lost (reconnected since; events published meanwhile are missed): "
                    "subscribe again"
                )
            if msg is None or msg.get("type") != "message":
                continue
            try:
                event = json.loads(msg["data"])
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                logger.warning("ignoring a non-JSON message on %s", self._channel, exc_info=True)
                continue
            # anyone may publish on the channel: only events of ours, each with its
            # event and key (what `EventSubscription` promises), reach the caller
            if (
                isinstance(event, dict)
                and isinstance(event.get("event"), str)
                and isinstance(event.get("key"), str)
            ):
                return event

    def _reconnected(self, connection: object) -> None:
        self._cut = True

    async def aclose(self) -> None:
        """Unsubscribe and close the connection."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            if pubsub.connection is not None:
                pubsub.connection.deregister_connect_callback(self._reconnected)
            try:
                await pubsub.unsubscribe()
            except (RedisError, OSError):
                logger.debug("unsubscribe failed; closing the connection anyway", exc_info=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
