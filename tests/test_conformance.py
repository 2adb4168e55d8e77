"""The store contract, run over every backend of ``STORE_FACTORIES`` through the public
kit, exactly as a third-party backend runs it (`livekit_resume.testing.conformance`).

The tests themselves live in the kit; this module only says how to make each store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livekit_resume.stores.base import Store
from livekit_resume.testing.conformance import StoreConformance
from tests.conftest import STORE_FACTORIES


class TestStores(StoreConformance):
    """Every conformance test, once per backend (the test id ends with its kind)."""

    kind: str
    request: pytest.FixtureRequest
    tmp_path: Path

    @pytest.fixture(autouse=True, params=list(STORE_FACTORIES))
    def _backend(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind, self.request, self.tmp_path = request.param, request, tmp_path

    async def make_store(self, **options: Any) -> Store:
        return await STORE_FACTORIES[self.kind](self.request, self.tmp_path, **options)
