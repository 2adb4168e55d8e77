"""A store wrapper the scenarios watch: it forwards every call to the real store and
remembers each acknowledged commit, so a test waits on "this item is saved" instead
of guessing how long autosave takes."""

from __future__ import annotations

import asyncio
from typing import Any

from livekit_resume.stores.base import Commit, Store

__all__ = ["WatchStore"]

# A healthy commit lands in milliseconds; this bounds a broken store, not a timing.
SAVE_TIMEOUT = 30.0


class WatchStore:
    """Forwards to ``inner``; records the versions and item ids of acknowledged commits."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.versions_written: list[int] = []
        self.saved_ids: set[str] = set()
        self._changed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        # everything but commit goes straight to the real store (acquire, load, publish...)
        return getattr(self.inner, name)

    async def commit(self, commit: Commit) -> int:
        version = await self.inner.commit(commit)
        self.saved_ids.update(r.id for r in commit.records if r.data is not None)
        self.versions_written.append(version)
        self._changed.set()
        return version

    async def wait_saved(self, item_id: str, *, timeout: float = SAVE_TIMEOUT) -> None:
        """Wait until an acknowledged commit has written ``item_id``."""

        async def wait() -> None:
            while item_id not in self.saved_ids:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)
