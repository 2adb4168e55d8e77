"""`AgentRegistry`: the only way an agent class is ever rebuilt from a snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from livekit.agents import Agent
from livekit.agents.utils.misc import camel_to_snake_case

from ..errors import UnknownAgent

__all__ = ["AgentFactory", "AgentRegistry"]

AgentFactory = Callable[[dict[str, Any]], Agent]
A = TypeVar("A", bound=type[Agent])


class AgentRegistry:
    """Maps stable ids to agent classes. Snapshots name agents by these ids; nothing
    is ever imported or built by a name found in data unless it is registered here.

    An agent may offer ``snapshot_state() -> dict``; its ``factory(state)`` rebuilds it.
    Without a factory the class is rebuilt with no arguments.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[type[Agent], AgentFactory | None]] = {}
        self._by_cls: dict[type[Agent], str] = {}

    @overload
    def register(
        self, agent_cls: A, *, factory: AgentFactory | None = None, id: str | None = None
    ) -> A: ...

    @overload
    def register(
        self, agent_cls: None = None, *, factory: AgentFactory | None = None, id: str | None = None
    ) -> Callable[[A], A]: ...

    def register(
        self,
        agent_cls: A | None = None,
        *,
        factory: AgentFactory | None = None,
        id: str | None = None,
    ) -> A | Callable[[A], A]:
        """Register ``agent_cls`` under ``id`` (default: LiveKit's own snake_case id of the
        class name). Usable as ``@registry.register`` or ``@registry.register(id=...)``."""

        def add(cls: A) -> A:
            if not (isinstance(cls, type) and issubclass(cls, Agent)):
                raise TypeError(f"{cls!r} is not a livekit.agents.Agent subclass")
            agent_id = id or camel_to_snake_case(cls.__name__)
            known = self._by_id.get(agent_id)
            if known is not None and known[0] is not cls:
                raise ValueError(
                    f"agent id {agent_id!r} is already registered for {known[0].__qualname__}"
                )
            if cls in self._by_cls and self._by_cls[cls] != agent_id:
                raise ValueError(
                    f"{cls.__qualname__} is already registered as {self._by_cls[cls]!r}"
                )
            self._by_id[agent_id] = (cls, factory)
            self._by_cls[cls] = agent_id
            return cls

        return add if agent_cls is None else add(agent_cls)

    @property
    def ids(self) -> list[str]:
        """Registered ids, sorted."""
        return sorted(self._by_id)

    def id_of(self, agent: Agent | type[Agent]) -> str | None:
        """The id ``agent``'s exact class is registered under, or None."""
        cls = agent if isinstance(agent, type) else type(agent)
        return self._by_cls.get(cls)

    def build(self, agent_id: str, state: dict[str, Any] | None = None) -> Agent:
        """A new agent for ``agent_id``; `UnknownAgent` if it is not registered, and
        `TypeError` if its factory builds an agent of a class not registered under it or
        another id."""
        entry = self._by_id.get(agent_id)
        if entry is None:
            raise UnknownAgent(agent_id, list(self._by_id))
        cls, factory = entry
        make: Callable[[], Agent] = cls  # registered classes build with no arguments
        agent = factory(state or {}) if factory is not None else make()
        if not isinstance(agent, cls):
            raise TypeError(
                f"factory for agent id {agent_id!r} returned {type(agent).__qualname__}, "
                f"not a {cls.__qualname__}"
            )
        if self.id_of(agent) is None:  # restored, it could never be saved again
            raise TypeError(
                f"factory for agent id {agent_id!r} returned {type(agent).__qualname__}, "
                "which is not registered: register it too, or no checkpoint could save it"
            )
        return agent
