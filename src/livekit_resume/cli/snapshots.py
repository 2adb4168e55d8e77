"""How the command line reads and writes snapshots: its codec, export files, the
whole-base write of ``import``, ``repair`` and ``revert``, the lease ``release`` frees,
the pages ``ls`` lists and the changes ``diff`` finds.

Every read decodes with the workers' keys (``RESUME_SIGNING_KEYS``,
``RESUME_ENCRYPTION_KEYS``, read through `livekit_resume.settings`); every write holds
the session's lease and clears both streams before writing each item again, so no later
version reads an older record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Literal, cast

from ..bridge import codec_for, from_stored, whole_commit
from ..errors import (
    ResumeError,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreUnavailable,
)
from ..settings import CODEC_SETTINGS, Settings
from ..snapshot.codec import AGENT, DEFAULT_MAX_FRAME, HISTORY, Codec, read_frames
from ..snapshot.model import ItemData, Snapshot, Writer
from ..snapshot.salvage import validate_restorable
from ..stores.base import (
    Commit,
    KeyPages,
    Lease,
    SessionInfo,
    SessionInfos,
    Store,
    Stored,
    offers,
    page_of,
)

__all__ = [
    "IMPORT_LEASE_TTL",
    "PROG",
    "Latest",
    "Unreadable",
    "binary",
    "commit_from_snapshot",
    "delete_unheld",
    "diff_snapshots",
    "latest",
    "load",
    "make_codec",
    "page_sessions",
    "read_snapshot",
    "release_lease",
    "write_whole",
]

# The name shown in help and errors, also under ``python -m livekit_resume``.
PROG = "livekit-resume"
# Lease the CLI holds while it imports or repairs: long enough for one commit on a slow
# store (shorter where the sessions themselves expire sooner: `_lease_ttl`).
IMPORT_LEASE_TTL = 30.0
# The frame limit of the CLI's codec: the workers' default, so that the CLI reads what
# they write and writes nothing they cannot read.
_MAX_FRAME = DEFAULT_MAX_FRAME


def _lease_ttl() -> float:
    """`IMPORT_LEASE_TTL`, or the session ttl (``RESUME_TTL``) the CLI's store was opened
    with if that is shorter: a store refuses a lease that would outlive its sessions."""
    ttl = Settings.only("ttl").ttl
    return IMPORT_LEASE_TTL if ttl is None else min(IMPORT_LEASE_TTL, ttl)


def make_codec(store: Store | None = None) -> Codec:
    """The codec the workers use: their keys and migration flags (`CODEC_SETTINGS`), bound
    to ``store``'s namespace (without a store, ``RESUME_NAMESPACE``'s: export files are
    not bound to one)."""
    if store is not None:
        return codec_for(store, max_frame=_MAX_FRAME)
    return Settings.only(*CODEC_SETTINGS).codec(max_frame=_MAX_FRAME)


async def load(store: Store, key: str, version: int | None) -> Snapshot:
    """A stored version (the latest for None), decoded whole."""
    return from_stored(make_codec(store), await store.load(key, version))


def binary(name: Literal["stdin", "stdout"]) -> BinaryIO:
    """The binary side of a standard stream."""
    # looked up at call time: a test runner may have swapped the streams
    stream = sys.stdin if name == "stdin" else sys.stdout
    return cast(BinaryIO, stream.buffer)


def read_snapshot(path: str) -> Snapshot:
    """An export file (``-`` for stdin), decoded and checked to be restorable: every
    typed error comes before the store is touched."""
    if path == "-":
        frames = read_frames(binary("stdin"), max_frame=_MAX_FRAME)
    else:
        with open(path, "rb") as f:
            frames = read_frames(f, max_frame=_MAX_FRAME)
    snap = make_codec().decode_export(frames)
    validate_restorable(snap)
    return snap


def commit_from_snapshot(
    codec: Codec,
    snapshot: Snapshot,
    *,
    epoch: int,
    base_version: int,
    info: Mapping[str, str | int | float | bool | None] | None = None,
) -> Commit:
    """A commit that makes the store hold exactly ``snapshot`` (as its next version),
    at ``epoch``: `livekit_resume.bridge.whole_commit`, with the listing ``info`` given."""
    commit = whole_commit(
        codec,
        snapshot.model_copy(update={"epoch": epoch}),
        base_version=base_version,
        owner=None,
    )
    return commit if info is None else replace(commit, info=dict(info))


def _owner() -> str:
    # one per lease taken: a store takes a second acquire under the same owner for its
    # holder renewing, so two commands run in one process must not share one
    return f"{PROG}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


Latest = Stored | SnapshotCorrupt | None
"""A session's latest version as `latest` read it: the version, the error reading it
when it cannot be read (lost, damaged), or None when there is none."""


async def latest(store: Store, key: str) -> tuple[Latest, int]:
    """``key``'s latest version (`Latest`) and the version a commit on top of it names
    as its base: a version that cannot be read is written over all the same (a whole
    commit reads nothing of it), which is how an operator rolls back past it."""
    try:
        stored = await store.load(key)
    except SnapshotNotFound:
        return None, 0
    except SnapshotCorrupt as e:
        # its number is the head's, which `versions` lists last, damaged or not
        listed = await store.versions(key)
        if not listed:
            raise
        return e, listed[-1].version
    return stored, stored.version


async def write_whole(
    store: Store,
    key: str,
    build: Callable[[Store, Codec, Latest], Awaitable[Snapshot | None]],
    *,
    takeover: bool,
    source: str,
) -> tuple[Snapshot | None, int | None]:
    """Hold the key's lease and commit a whole base: every stream cleared, every item
    written again (`whole_commit`), so no later version reads an older record.

    ``build(store, codec, latest)`` gets the latest version (`Latest`), read under the
    lease, and returns the snapshot to write, or None to write nothing.
    """
    owner = _owner()
    try:
        lease = await store.acquire(key, owner, ttl=_lease_ttl(), takeover=takeover)
    except SessionBusy as e:
        raise SessionBusy(f"{e} (from the command line: --takeover)", holder=e.holder) from e
    empty = False  # the key held no snapshot: the lease made its record
    try:
        stored, base = await latest(store, key)
        empty = stored is None
        codec = make_codec(store)
        snap = await build(store, codec, stored)
        if snap is None:
            return None, None
        snap = snap.model_copy(
            update={
                "key": key,
                "reason": "manual",
                "writer": Writer(worker_id=f"{PROG}:{socket.gethostname()}"),
            }
        )
        commit = whole_commit(
            codec,
            snap.model_copy(update={"epoch": lease.epoch}),
            base_version=base,
            owner=owner,
            source=source,
        )
        version = await store.commit(commit)
        empty = False
        return snap, version
    finally:
        # Nothing written to a key that held nothing (refused: deleted meanwhile by
        # another operator's rm): the record the lease made goes too, or it stays
        # listed at version 0 that show and history say does not exist.
        try:
            if empty:
                await _delete_or_release(store, key, lease)
            else:
                await store.release(lease)
        except ResumeError as e:
            # the lease expires by itself (its ttl): a failure here must not turn a
            # commit that landed into a failure (the operator would write it again), nor
            # hide the error that stopped the command
            print(
                f"warning: the lease of {key!r} was not given back ({e}); it expires",
                file=sys.stderr,
            )


async def _delete_or_release(store: Store, key: str, lease: Lease) -> None:
    try:
        await store.delete(key, lease=lease)
    except ResumeError:
        await store.release(lease)


async def release_lease(store: Store, key: str) -> tuple[str | None, int, bool]:
    """Free ``key``'s lease whoever holds it: take it over under an operator owner (the
    epoch moves on, so the old holder's next commit is refused) and release it.
    Returns the previous owner (None when the lease was already free), the new epoch,
    and whether the session's latest version could not be read (its owner unknown)."""
    try:
        info: SessionInfo | None = await store.info(key)
    except SnapshotCorrupt:
        # a session whose latest version cannot be read still has a lease to free (its
        # stuck holder fenced), which the operator's revert or import then needs
        info, damaged = None, True
    else:
        damaged = False
        if info is None:
            raise SnapshotNotFound(f"no session {key!r}")
    lease = await store.acquire(key, _owner(), ttl=_lease_ttl(), takeover=True)
    if info is not None and info.version > 0:
        now = await _info_or_release(store, key, lease)
        if now is None or now.version == 0:
            # deleted since it was found (another operator's rm): the lease made the
            # record again, which ls would list at version 0 while show says no session
            await _delete_or_release(store, key, lease)
            raise SnapshotNotFound(f"no session {key!r}: it was deleted meanwhile")
    await store.release(lease)
    return (None if info is None else info.owner), lease.epoch, damaged


async def _info_or_release(store: Store, key: str, lease: Lease) -> SessionInfo | None:
    """``key``'s info, read under ``lease``; the lease given back if it cannot be read."""
    try:
        return await store.info(key)
    except BaseException:
        with contextlib.suppress(ResumeError):
            await store.release(lease)
        raise


async def delete_unheld(store: Store, key: str) -> bool:
    """Delete ``key`` unless a worker holds its lease: take the lease (never over) and
    delete under it, so that a worker that took the session since it was seen free
    keeps it (`SessionBusy`) and one taking it now waits for the delete."""
    try:
        lease = await store.acquire(key, _owner(), ttl=_lease_ttl(), takeover=False)
    except SessionBusy as e:
        raise SessionBusy(
            f"session {key!r} was taken by {e.holder!r} since it was shown free: not "
            "deleted (run rm again to delete it all the same)",
            holder=e.holder,
        ) from e
    try:
        return await store.delete(key, lease=lease)
    except BaseException:
        # not deleted: the key is not left busy for the lease's ttl
        with contextlib.suppress(ResumeError):
            await store.release(lease)
        raise


# ---------------------------------------------------------------------- ls pages

# How many keys ``ls`` asks a store for at once when it filters by state: PAGE_BATCH
# first, twice as many each time after, up to PAGE_BATCH_MAX (on Redis every page reads
# the whole namespace index, so a thousand pages of a hundred would read it a thousand
# times).
PAGE_BATCH = 100
PAGE_BATCH_MAX = 10_000
# Sessions whose info ``ls`` reads at once from a store that reads them one at a time.
INFO_CONCURRENCY = 32


async def _keys_page(
    store: Store, prefix: str, after: str | None, limit: int | None
) -> tuple[list[str], str | None]:
    """Keys in order, after ``after``: the store's own pages (`KeyPages`), else its
    sorted ``keys()`` filtered here."""
    if offers(store, KeyPages):
        return await store.keys_page(prefix, after, limit)
    return page_of(await store.keys(), prefix, after, limit)


@dataclass(frozen=True)
class Unreadable:
    """A listed session whose head or latest version cannot be read: damaged (evicted,
    foreign data: `SnapshotCorrupt`), or on a store node that does not answer (a Redis
    Cluster primary down: `StoreUnavailable`). ``ls`` shows it beside the others, so
    that it can be repaired or removed, and no session is left out unsaid."""

    key: str
    error: SnapshotCorrupt | StoreUnavailable

    @property
    def unreachable(self) -> bool:
        return isinstance(self.error, StoreUnavailable)


async def _infos(store: Store, keys: list[str]) -> list[SessionInfo | Unreadable | None]:
    """Each key's `Store.info`, or `Unreadable`: in a few round trips where the store
    reads many at once (`SessionInfos`), else at most `INFO_CONCURRENCY` at a time (a
    namespace of thousands read all at once waited past the pool's timeout, and its
    sessions were listed as unreachable)."""
    if offers(store, SessionInfos):
        got: list[Any] = await store.infos(keys)
    else:
        places = asyncio.Semaphore(INFO_CONCURRENCY)

        async def one(key: str) -> Any:
            async with places:
                try:
                    return await store.info(key)
                except (SnapshotCorrupt, StoreUnavailable) as e:
                    return e

        got = await asyncio.gather(*map(one, keys))
    out: list[SessionInfo | Unreadable | None] = []
    for key, info in zip(keys, got, strict=True):
        if isinstance(info, SnapshotCorrupt | StoreUnavailable):
            out.append(Unreadable(key, info))
        elif isinstance(info, BaseException):
            raise info
        else:
            out.append(info)
    return out


def listed_state(info: SessionInfo) -> Any:
    """A session's state as ``ls`` shows and filters it: its latest version's, or
    ``active`` for a session held before its first save (version 0, a live lease)."""
    state = info.info.get("state")
    if state is None and info.version == 0 and info.owner is not None:
        return "active"
    return state


async def page_sessions(
    store: Store,
    *,
    prefix: str = "",
    state: str | None = None,
    limit: int | None = None,
    after: str | None = None,
) -> tuple[list[SessionInfo | Unreadable], str | None]:
    """One page of sessions (keys in order, after the cursor ``after``): at most
    ``limit``, only those whose key starts with ``prefix`` and, given ``state``, whose
    latest version is in that state. Returns them and the cursor of the next page (the
    last key looked at), None after the last page. A session that cannot be read comes
    as `Unreadable`: one damaged or unreachable session hides no other. A damaged one is
    left out when ``state`` is given; an unreachable one is not (its state is unknown)."""
    found: list[SessionInfo | Unreadable] = []
    cursor = after
    grow = PAGE_BATCH
    while True:
        want = None if limit is None else limit - len(found)
        batch = want if state is None or want is None else max(want, grow)
        grow = min(grow * 2, PAGE_BATCH_MAX)
        keys, more = await _keys_page(store, prefix, cursor, batch)
        infos = await _infos(store, keys)

        def wanted(info: SessionInfo | Unreadable | None) -> bool:
            # None: deleted or expired between the listing and info()
            if isinstance(info, Unreadable):
                return state is None or info.unreachable
            return info is not None and (state is None or listed_state(info) == state)

        for n, (k, info) in enumerate(zip(keys, infos, strict=True)):
            cursor = k
            if wanted(info):
                assert info is not None
                found.append(info)
                if limit is not None and len(found) == limit:
                    # no cursor when none follows: none of the batch's rest is wanted
                    # and it was the last batch
                    rest = any(wanted(i) for i in infos[n + 1 :])
                    return found, (None if more is None and not rest else k)
        if more is None:
            return found, None
        cursor = more


# -------------------------------------------------------------------------- diff


def _stream_diff(old: Sequence[ItemData], new: Sequence[ItemData]) -> dict[str, list[Any]]:
    """Items added, edited and removed between two versions of a stream, by item id;
    ``added`` and ``edited`` hold the new items, ``removed`` the old ones, in order."""
    before = {str(i.get("id")): i for i in old}
    after = {str(i.get("id")): i for i in new}
    return {
        "added": [i for i in new if str(i.get("id")) not in before],
        "edited": [i for i in new if str(i.get("id")) in before and before[str(i.get("id"))] != i],
        "removed": [i for i in old if str(i.get("id")) not in after],
    }


def _change(old: Any, new: Any) -> dict[str, Any] | None:
    return None if old == new else {"from": old, "to": new}


def diff_snapshots(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """What changed from version ``a`` to version ``b`` of a session: per stream (the
    conversation, the current agent's own context) the items added, edited and removed;
    and the userdata, agent, instructions and state, each None when unchanged."""
    return {
        "key": b.key,
        "from": a.version,
        "to": b.version,
        "streams": {
            HISTORY: _stream_diff(a.history, b.history),
            AGENT: _stream_diff(
                a.agent.chat_ctx if a.agent else [], b.agent.chat_ctx if b.agent else []
            ),
        },
        "userdata": _change(a.userdata, b.userdata),
        "agent": _change(a.agent and a.agent.agent_id, b.agent and b.agent.agent_id),
        "instructions": _change(a.agent and a.agent.instructions, b.agent and b.agent.instructions),
        "state": _change(a.state, b.state),
    }
