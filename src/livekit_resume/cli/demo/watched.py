"""`WatchedStore`: a `Store` that remembers each commit, so that a caller waits for a
turn to be saved instead of sleeping. The demo shows the autosaves of each turn with it;
the tests' fault scenarios use it too."""

from __future__ import annotations

import asyncio
from typing import Any

from ...errors import StoreUnavailable
from ...stores.base import (
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    SessionInfo,
    SnapshotInfo,
    Store,
    Stored,
)

__all__ = ["SAVE_TIMEOUT", "WatchedStore"]

# A turn's autosave lands within milliseconds; this only bounds a broken store.
SAVE_TIMEOUT = 10.0


class WatchedStore:
    """A `Store` that forwards every call and remembers each commit: its version, its
    reason and the items it wrote. The demo waits on it ("is this turn saved yet?")
    instead of sleeping, and shows the autosaves of each turn."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.commits: list[tuple[int, str]] = []  # (version, reason), not yet shown
        self.versions_written: list[int] = []
        self.saved_ids: set[str] = set()
        self._changed = asyncio.Event()

    async def wait_saved(self, item_id: str, *, timeout: float = SAVE_TIMEOUT) -> None:
        """Wait until a commit has written ``item_id`` (autosave runs in the background)."""

        async def wait() -> None:
            while item_id not in self.saved_ids:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise StoreUnavailable(
                f"autosave did not write item {item_id!r} within {timeout:.0f}s"
            ) from None

    def take_commits(self) -> list[tuple[int, str]]:
        out, self.commits = self.commits, []
        return out

    async def commit(self, commit: Commit) -> int:
        version = await self.inner.commit(commit)
        self.saved_ids.update(r.id for r in commit.records if r.data is not None)
        self.commits.append((version, str(commit.info.get("reason"))))
        self.versions_written.append(version)
        self._changed.set()
        return version

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        return await self.inner.acquire(key, owner, ttl=ttl, takeover=takeover, reclaim=reclaim)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        return await self.inner.renew(lease, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        await self.inner.release(lease)

    async def load(self, key: str, version: int | None = None) -> Stored:
        return await self.inner.load(key, version)

    async def versions(self, key: str) -> list[SnapshotInfo]:
        return await self.inner.versions(key)

    async def info(self, key: str) -> SessionInfo | None:
        return await self.inner.info(key)

    async def keys(self) -> list[str]:
        return await self.inner.keys()

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        return await self.inner.delete(key, lease=lease)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # what a backend offers beyond the protocol (RedisStore's publish) stays reachable
        return getattr(self.inner, name)
