"""Shared fixtures, and ``STORE_FACTORIES``: how the tests make a store of each backend.

Redis backends start real servers on free loopback ports (see ``redis_servers.py``);
they skip with a reason only where no ``redis-server`` binary exists. The conformance
suite runs every backend of the registry through the public kit
(`livekit_resume.testing.conformance`): see ``test_conformance.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from livekit_resume.stores.base import Store

if TYPE_CHECKING:
    from livekit.agents import AgentSession

pytest_plugins = ["tests.redis_servers", "tests.hang_watch"]

StoreFactory = Callable[..., Awaitable[Store]]
# (request, tmp_path, **options) -> a fresh, empty store of one backend
StoreBuilder = Callable[..., Awaitable[Store]]


async def _memory(request: pytest.FixtureRequest, tmp_path: Path, **opts: Any) -> Store:
    from livekit_resume.stores.memory import MemoryStore

    return MemoryStore(**opts)


async def _sqlite(request: pytest.FixtureRequest, tmp_path: Path, **opts: Any) -> Store:
    from livekit_resume.stores.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / f"store-{uuid.uuid4().hex[:8]}.db", **opts)


def _redis(kind: str) -> StoreBuilder:
    async def build(request: pytest.FixtureRequest, tmp_path: Path, **opts: Any) -> Store:
        # Each store gets its own namespace, so tests never see each other.
        from tests.redis_servers import build_redis_store

        store: Store = await build_redis_store(
            kind, request, namespace=f"t{uuid.uuid4().hex[:10]}", **opts
        )
        return store

    return build


STORE_FACTORIES: dict[str, StoreBuilder] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "fakeredis": _redis("fakeredis"),
    "redis": _redis("redis"),
    "redis_cluster": _redis("redis_cluster"),
}
STORE_KINDS = list(STORE_FACTORIES)


@pytest.fixture(params=STORE_KINDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``await make_store(keep=3, ttl=1.0)`` builds a fresh store of the parametrized kind."""
    made: list[Store] = []

    async def factory(**opts: Any) -> Store:
        store = await STORE_FACTORIES[request.param](request, tmp_path, **opts)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()


@pytest.fixture
async def sessions() -> AsyncIterator[list[AgentSession[Any]]]:
    """Agent sessions appended here are closed after the test."""
    made: list[AgentSession[Any]] = []
    yield made
    for session in made:
        await session.aclose()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: the fault suite's figures a worker measured are printed
    with the controller's summary (a worker's own output is not shown)."""
    from tests.faults.figures import collect_from_worker

    collect_from_worker(node.config, getattr(node, "workeroutput", {}))
