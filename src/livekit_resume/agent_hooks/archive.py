"""Keeping a conversation aside under ``<key>~v<version>`` before the key starts anew:
an ended one (`ResumableSession.end`) or, in a job, a stale one (``resume_within``)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

from ..bridge import from_stored, whole_commit
from ..errors import ResumeError
from ..snapshot.codec import Codec
from ..snapshot.model import Snapshot
from ..stores.base import MAX_KEY_BYTES, Lease, Store, validate_key
from .lease import granted, release_lease, to_its_end

__all__ = ["ARCHIVE_LEASE_TTL", "acquire_for", "kept_aside"]

# Copying a conversation aside takes one commit.
ARCHIVE_LEASE_TTL = 30.0
# Kept free at the end of an archive's key for a ``~<n>`` of a name taken already.
_SUFFIX_BYTES = 8


@contextlib.asynccontextmanager
async def kept_aside(
    store: Store, codec: Codec, key: str, version: int, snap: Snapshot, owner: str, ttl: float
) -> AsyncIterator[tuple[str, Lease]]:
    """``snap``, ``key``'s conversation at ``version``, copied whole to a free archive
    name (`_archive_key`), or found there already; yields the name and the archive's
    lease, held until the block ends (released however many cancellations arrive)."""
    archive, kept = await _archive_key(store, codec, key, version, snap)
    # Taken over if another worker holds the name: only a writer fenced on ``key`` since
    # (its restore keeping this conversation aside as this worker took the key over), or
    # one gone with the lease left (a cancelled job), can; either would refuse it busy.
    lease = await acquire_for(store, archive, owner, ttl, takeover=True)
    try:
        if not kept:
            copy = snap.model_copy(update={"key": archive, "epoch": lease.epoch})
            await store.commit(whole_commit(codec, copy, base_version=0, owner=owner))
        yield archive, lease
    finally:
        # a release cut short (a job shutting down cancels twice) left it leased for its ttl
        await to_its_end(release_lease(store, lease))


async def _archive_key(
    store: Store, codec: Codec, key: str, version: int, snap: Snapshot
) -> tuple[str, bool]:
    """Where `kept_aside` keeps ``snap``: ``<key>~v<version>``, then ``~2``, ``~3``...
    while another conversation holds the name (the key's next conversation ended at the
    same version), its key part cut to fit beside a digest of the whole key when it
    would be too long. And whether the name holds this very conversation already: an
    archive cut short before ``key`` was removed, which is then finished, not copied
    again. A name that held any of these made every later call for the key fail.

    The names are taken in turn, so the first free one is found by doubling and halving
    (a few reads however many calls the key had: one at a time, the n-th call read n-1
    archives), and a cut-short copy is the last one taken."""
    stem = f"{key}~v{version}"
    if len(stem.encode()) > MAX_KEY_BYTES - _SUFFIX_BYTES:
        tail = f"~{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}~v{version}"
        room = MAX_KEY_BYTES - _SUFFIX_BYTES - len(tail.encode())
        stem = key.encode()[:room].decode("utf-8", "ignore") + tail

    def name(n: int) -> str:
        return validate_key(stem if n == 1 else f"{stem}~{n}")

    async def taken(n: int) -> bool:
        info = await store.info(name(n))
        return info is not None and info.version != 0

    if not await taken(1):
        return name(1), False
    last, free = 1, 2
    while await taken(free):
        last, free = free, free * 2
    while free - last > 1:
        middle = (last + free) // 2
        if await taken(middle):
            last = middle
        else:
            free = middle
    with contextlib.suppress(ResumeError):  # unreadable: not this conversation
        there = from_stored(codec, await store.load(name(last)))
        if (there.history, there.agent, there.userdata) == (
            snap.history,
            snap.agent,
            snap.userdata,
        ):
            return name(last), True
    return name(free), False


async def acquire_for(
    store: Store, key: str, owner: str, ttl: float, *, takeover: bool = False
) -> Lease:
    """``store.acquire`` for keeping aside: a lease granted to a caller cancelled
    meanwhile (the job shut down) is released, not left to refuse the next restore for
    its ttl (`lease.granted`, as for a restore's lease)."""
    acquired = store.acquire(key, owner, ttl=ttl, takeover=takeover)
    return await granted(store, acquired, lambda lease: lease)
