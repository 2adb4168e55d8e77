"""The plumbing every conformance test class shares: stores made through the subclass's
``make_store`` and closed when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from ...stores.base import Store


class StoreTests:
    """Base of the conformance test groups. A subclass provides `make_store`."""

    # Every test is a coroutine: run with pytest-asyncio, in auto or strict mode.
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    _made: list[Store]

    async def make_store(self, **options: Any) -> Store:
        """A new, empty store of the backend under test.

        Options the suite passes (the store must accept each): ``keep`` (versions kept
        loadable) and ``ttl`` (seconds a session lives without writes). A store that
        cannot start here (a server not installed) may call `pytest.skip`.
        """
        raise NotImplementedError(f"{type(self).__name__} must define async make_store()")

    @pytest_asyncio.fixture(autouse=True)
    async def _close_made_stores(self) -> AsyncIterator[None]:
        self._made = []
        yield
        for store in self._made:
            await store.aclose()

    async def new_store(self, **options: Any) -> Store:
        """`make_store`, checked against the protocol, closed when the test ends."""
        store = await self.make_store(**options)
        assert isinstance(store, Store), f"{type(store).__name__} lacks Store methods"
        self._made.append(store)
        return store
