"""Record every event an ``AgentSession`` emits, and wait for one with a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, get_args

from livekit.agents import AgentSession
from livekit.agents.voice.events import EventTypes

__all__ = ["ALL_EVENTS", "EventLog"]

ALL_EVENTS: tuple[str, ...] = get_args(EventTypes)


class EventLog:
    """Subscribes to every event type of a session (``metrics_collected`` excepted: LiveKit
    warns when it is subscribed to) and keeps ``(name, event)`` pairs in order."""

    def __init__(self, session: AgentSession[Any], *, names: tuple[str, ...] = ALL_EVENTS) -> None:
        self.session = session
        self.entries: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        self._subscribed: list[tuple[str, Callable[[Any], None]]] = []
        for name in names:
            if name == "metrics_collected":
                continue

            def _on(ev: Any, name: str = name) -> None:
                self.entries.append((name, ev))
                self._changed.set()

            session.on(name, _on)  # type: ignore[arg-type]
            self._subscribed.append((name, _on))

    def close(self) -> None:
        for name, cb in self._subscribed:
            self.session.off(name, cb)  # type: ignore[arg-type]
        self._subscribed.clear()

    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    def of(self, name: str) -> list[Any]:
        return [ev for n, ev in self.entries if n == name]

    def mark(self) -> int:
        """A position to pass as ``since`` to :meth:`wait_for` / :meth:`since`."""
        return len(self.entries)

    def since(self, mark: int) -> list[tuple[str, Any]]:
        return self.entries[mark:]

    def clear(self) -> None:
        self.entries.clear()

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[Any], bool] = lambda _: True,
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> Any:
        """The first ``name`` event at or after position ``since`` matching ``predicate``."""

        def _find() -> Any:
            for n, ev in self.entries[since:]:
                if n == name and predicate(ev):
                    return ev
            return None

        async def _loop() -> Any:
            while (found := _find()) is None:
                self._changed.clear()
                await self._changed.wait()
            return found

        return await asyncio.wait_for(_loop(), timeout)
