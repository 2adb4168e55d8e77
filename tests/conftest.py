"""Shared fixtures. ``make_store`` feeds the conformance suite: one factory per backend.

Redis backends start real servers on free loopback ports (see ``redis_servers.py``);
they skip with a reason only where no ``redis-server`` binary exists.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from livekit_resume.stores.base import Store

pytest_plugins = ["tests.redis_servers"]

StoreFactory = Callable[..., Awaitable[Store]]

STORE_KINDS = ["memory", "sqlite", "fakeredis", "redis", "redis_cluster"]


async def _build(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **opts: Any) -> Store:
    if kind == "memory":
        from livekit_resume.stores.memory import MemoryStore

        return MemoryStore(**opts)
    if kind == "sqlite":
        from livekit_resume.stores.sqlite import SQLiteStore

        return SQLiteStore(tmp_path / f"store-{uuid.uuid4().hex[:8]}.db", **opts)
    # Redis flavours: each store gets its own namespace, so tests never see each other.
    from tests.redis_servers import build_redis_store

    return await build_redis_store(kind, request, namespace=f"t{uuid.uuid4().hex[:10]}", **opts)


@pytest.fixture(params=STORE_KINDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``await make_store(keep=3, ttl=1.0)`` builds a fresh store of the parametrized kind."""
    made: list[Store] = []

    async def factory(**opts: Any) -> Store:
        store = await _build(request.param, request, tmp_path, **opts)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()
