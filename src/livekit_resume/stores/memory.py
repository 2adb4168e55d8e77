"""In-process store: the reference implementation of the contract, for tests and demos.

Nothing survives the process. Every operation runs without an await point between
its check and its write, so it is atomic on one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ResumeError
from .base import (
    DEFAULT_LEASE_TTL,
    Commit,
    Lease,
    SessionInfo,
    SnapshotInfo,
    StoreClosed,
    Stored,
    acquired_epoch,
    check_lease_key,
    head_moved_error,
    lease_lost_error,
    not_found_error,
    not_retained_error,
    page_of,
    validate_commit,
    validate_key,
    validate_lease_ttl,
    validate_owner,
    validate_reclaim,
    validate_ttl,
    validate_version,
)
from .log import (
    DEFAULT_KEEP,
    TOMBSTONE_TTL,
    Record,
    compacted,
    fold_records,
    lease_is_live,
    needs_compaction,
    tombstone_epoch,
)
from .memory_control import MemoryCommands

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Version:
    version: int
    epoch: int
    created_at: float
    head: bytes
    gen: int
    log_end: int
    size: int
    info: dict[str, str | int | float | bool | None]
    commit_id: str = ""


@dataclass(slots=True)
class _Session:
    epoch: int = 0
    owner: str | None = None
    lease_expires_at: float | None = None
    touched_at: float = 0.0
    versions: list[_Version] = field(default_factory=list)
    logs: dict[int, list[Record]] = field(default_factory=dict)
    gen: int = 0


class MemoryStore:
    """A `Store` held in a dict. ``ttl`` (seconds without writes) expires whole sessions."""

    def __init__(
        self,
        *,
        keep: int = DEFAULT_KEEP,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._keep = keep
        self._ttl = validate_ttl(ttl)
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # key: (epoch, until)
        self._commands = MemoryCommands()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """A new, empty store for ``memory://`` (anything after the scheme is ignored).

        ``namespace`` and ``read_only`` are accepted and ignored: one MemoryStore is a
        world of its own, with nothing to separate and nothing to protect."""
        scheme = url.partition("://")[0].lower()
        if scheme != "memory":
            raise ValueError(f"MemoryStore opens memory:// URLs, not {url!r}")
        options.pop("namespace", None)
        options.pop("read_only", None)
        return cls(**options)

    def _open(self) -> dict[str, _Session]:
        """The sessions; `StoreUnavailable` once closed, as every store: an answer then
        would acknowledge a write nothing keeps."""
        if self._closed:
            raise StoreClosed("MemoryStore is closed; open a new one")
        return self._sessions

    def _get(self, key: str) -> _Session | None:
        validate_key(key)
        s = self._open().get(key)
        now = self._clock()
        if (
            s is not None
            and self._ttl is not None
            and s.touched_at + self._ttl <= now
            and not lease_is_live(s.lease_expires_at if s.owner else None, now)
        ):
            del self._sessions[key]
            return None
        return s

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        validate_owner(owner)
        validate_lease_ttl(ttl, self._ttl)
        validate_reclaim(reclaim)
        now = self._clock()
        s = self._get(key)
        # a new session starts above the tombstone a delete left, which stays: a holder
        # of the deleted session is fenced by it for its day, even once this one is gone
        epoch = acquired_epoch(
            key,
            owner,
            now,
            epoch=s.epoch if s is not None else None,
            holder=s.owner if s is not None else None,
            live=s is not None and lease_is_live(s.lease_expires_at, now),
            takeover=takeover,
            reclaim=reclaim,
            tombstone=self._tombstone(key, now) if s is None else None,
        )
        if s is None:
            s = self._sessions[key] = _Session(epoch=epoch)
        s.epoch = epoch
        s.owner, s.lease_expires_at, s.touched_at = owner, now + ttl, now
        return Lease(key, owner, s.epoch, now + ttl)

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        validate_lease_ttl(ttl, self._ttl)
        now = self._clock()
        s = self._get(lease.key)
        if s is None:
            raise lease_lost_error(
                lease.key, lease.epoch, None, tombstone=self._tombstone(lease.key, now)
            )
        if s.epoch != lease.epoch or s.owner != lease.owner:
            raise lease_lost_error(lease.key, lease.epoch, s.epoch)
        s.lease_expires_at, s.touched_at = now + ttl, now
        version = s.versions[-1].version if s.versions else 0
        return Lease(lease.key, lease.owner, lease.epoch, now + ttl, version)

    async def release(self, lease: Lease) -> None:
        s = self._get(lease.key)
        if s is not None and s.epoch == lease.epoch and s.owner == lease.owner:
            s.owner, s.lease_expires_at = None, None

    async def commit(self, commit: Commit) -> int:
        validate_commit(commit)
        if commit.lease_ttl is not None:
            validate_lease_ttl(commit.lease_ttl, self._ttl)
        now = self._clock()
        s = self._get(commit.key)
        if s is None:
            raise lease_lost_error(
                commit.key, commit.epoch, None, tombstone=self._tombstone(commit.key, now)
            )
        if s.epoch != commit.epoch or commit.epoch == 0:
            raise lease_lost_error(commit.key, commit.epoch, s.epoch)
        head_version = s.versions[-1].version if s.versions else 0
        if commit.base_version != head_version:
            top = s.versions[-1] if s.versions else None
            if (
                commit.commit_id
                and top is not None
                and top.version == commit.base_version + 1
                and top.commit_id == commit.commit_id
            ):
                self._renew_by(s, commit, now)
                return top.version  # a retry of a commit that landed: answer, don't refuse
            raise head_moved_error(commit, head_version)
        # The compaction rule of stores/log.py: append, then fold if the log is too long.
        log = s.logs.setdefault(s.gen, [])
        log.extend(commit.records)
        if needs_compaction(len(log), commit.size):
            try:
                folded = compacted(log, commit.key)  # a damaged log refuses the commit whole
            finally:
                # No version reads them here: the new generation holds them, or none does.
                del log[len(log) - len(commit.records) :]
            s.gen += 1
            s.logs[s.gen] = folded
        gen, log_end = s.gen, len(s.logs[s.gen])
        version = head_version + 1
        written = len(commit.head) + sum(len(r.data or b"") for r in commit.records)
        s.versions.append(
            _Version(
                version,
                commit.epoch,
                now,
                commit.head,
                gen,
                log_end,
                written,
                dict(commit.info),
                commit.commit_id,
            )
        )
        del s.versions[: -self._keep]
        live_gens = {v.gen for v in s.versions}
        for unused in [g for g in s.logs if g not in live_gens]:
            del s.logs[unused]
        s.touched_at = now
        self._renew_by(s, commit, now)
        return version

    def _tombstone(self, key: str, now: float) -> int | None:
        """The epoch a delete of ``key`` left, while its tombstone lasts."""
        epoch, until = self._tombstones.get(key, (0, 0.0))
        return epoch if until > now else None

    @staticmethod
    def _renew_by(s: _Session, commit: Commit, now: float) -> None:
        """A commit that lands, or that a retry finds landed, renews the held lease
        (`Commit.lease_ttl`) as `renew` does: the session's expiry moves too, so that
        the lease never outlives it."""
        if commit.lease_ttl is not None and s.owner is not None:
            s.lease_expires_at, s.touched_at = now + commit.lease_ttl, now

    async def load(self, key: str, version: int | None = None) -> Stored:
        validate_version(version)
        s = self._get(key)
        if s is None or not s.versions:
            raise not_found_error(key)
        if version is None:
            v = s.versions[-1]
        else:
            found = [x for x in s.versions if x.version == version]
            if not found:
                raise not_retained_error(key, version, [x.version for x in s.versions])
            v = found[0]
        streams = fold_records(s.logs[v.gen][: v.log_end], key)
        return Stored(key, v.version, v.epoch, v.created_at, v.head, streams, dict(v.info))

    async def versions(self, key: str) -> list[SnapshotInfo]:
        s = self._get(key)
        if s is None:
            return []
        return [
            SnapshotInfo(v.version, v.epoch, v.created_at, v.size, dict(v.info)) for v in s.versions
        ]

    async def info(self, key: str) -> SessionInfo | None:
        s = self._get(key)
        if s is None:
            return None
        top = s.versions[-1] if s.versions else None
        now = self._clock()
        live = lease_is_live(s.lease_expires_at, now)
        return SessionInfo(
            key=key,
            version=top.version if top else 0,
            epoch=s.epoch,
            owner=s.owner if live else None,
            lease_expires_at=s.lease_expires_at if live else None,
            updated_at=s.touched_at,
            expires_at=s.touched_at + self._ttl if self._ttl is not None else None,
            info=dict(top.info) if top else {},
            read_at=now,
        )

    async def infos(self, keys: Sequence[str]) -> list[SessionInfo | ResumeError | None]:
        """`SessionInfos`: each key's `info` (memory answers them all at once)."""
        for key in keys:
            validate_key(key)
        return [await self.info(key) for key in keys]

    async def keys(self) -> list[str]:
        return sorted(k for k in list(self._open()) if self._get(k) is not None)

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        """`KeyPages` (a copy of the sorted keys: memory holds few sessions)."""
        return page_of(await self.keys(), prefix, after, limit)

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        if lease is not None:
            check_lease_key(key, lease)  # as the other stores: before anything is read
        s = self._get(key)
        if s is None:
            return False
        if lease is not None and (s.epoch != lease.epoch or s.owner != lease.owner):
            raise lease_lost_error(key, lease.epoch, s.epoch)
        now = self._clock()
        for gone in [k for k, (_, until) in self._tombstones.items() if until <= now]:
            del self._tombstones[gone]
        self._tombstones[key] = (tombstone_epoch(s.epoch, now), now + TOMBSTONE_TTL)
        return self._sessions.pop(key, None) is not None

    def commands(self) -> MemoryCommands:
        """The store's remote command channel (`Controllable`), within this process."""
        return self._commands

    async def aclose(self) -> None:
        self._closed = True
        self._sessions.clear()
        self._tombstones.clear()
