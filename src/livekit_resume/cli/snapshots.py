"""How the command line reads and writes snapshots: its codec, export files, and the
whole-base write of ``import`` and ``repair``.

Every read decodes with the workers' keys (``RESUME_SIGNING_KEYS``,
``RESUME_ENCRYPTION_KEYS``, read through `livekit_resume.settings`); every write holds
the session's lease and clears both streams before writing each item again, so no later
version reads an older record.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import BinaryIO, Literal, cast

from ..bridge import codec_for, from_stored, whole_commit
from ..errors import SessionBusy, SnapshotNotFound
from ..settings import CODEC_SETTINGS, Settings
from ..snapshot.codec import DEFAULT_MAX_FRAME, Codec, read_frames
from ..snapshot.model import Snapshot, Writer
from ..snapshot.salvage import validate_restorable
from ..stores.base import Commit, Store, Stored

__all__ = [
    "IMPORT_LEASE_TTL",
    "PROG",
    "binary",
    "commit_from_snapshot",
    "load",
    "make_codec",
    "read_snapshot",
    "write_whole",
]

# The name shown in help and errors, also under ``python -m livekit_resume``.
PROG = "livekit-resume"
# Lease the CLI holds while it imports or repairs: long enough for one commit on a slow
# store.
IMPORT_LEASE_TTL = 30.0
# The frame limit of the CLI's codec: the workers' default, so that the CLI reads what
# they write and writes nothing they cannot read.
_MAX_FRAME = DEFAULT_MAX_FRAME


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
    return f"{PROG}:{socket.gethostname()}:{os.getpid()}"


async def write_whole(
    store: Store,
    key: str,
    build: Callable[[Store, Codec, Stored | None], Awaitable[Snapshot | None]],
    *,
    takeover: bool,
    source: str,
) -> tuple[Snapshot | None, int | None]:
    """Hold the key's lease and commit a whole base: every stream cleared, every item
    written again (`whole_commit`), so no later version reads an older record.

    ``build(store, codec, stored)`` gets the latest stored version (None for a new key),
    read under the lease, and returns the snapshot to write, or None to write nothing.
    """
    owner = _owner()
    try:
        lease = await store.acquire(key, owner, ttl=IMPORT_LEASE_TTL, takeover=takeover)
    except SessionBusy as e:
        raise SessionBusy(f"{e} (from the command line: --takeover)", holder=e.holder) from e
    try:
        try:
            stored: Stored | None = await store.load(key)
        except SnapshotNotFound:
            stored = None
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
            base_version=stored.version if stored is not None else 0,
            owner=owner,
            source=source,
        )
        return snap, await store.commit(commit)
    finally:
        await store.release(lease)
