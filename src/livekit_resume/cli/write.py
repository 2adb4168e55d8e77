"""Commands that write (``import``, ``repair``, ``rm``, ``revert``, ``release``): each
under the session's lease rules, refusing a live worker's session unless ``--takeover``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import typer.core

from .. import redact
from ..bridge import newest_readable, salvage_stored
from ..errors import (
    ResumeError,
    SignatureMismatch,
    SnapshotCorrupt,
    SnapshotNotFound,
)
from ..snapshot.codec import AGENT, HISTORY, Codec
from ..snapshot.model import ItemData, Snapshot
from ..snapshot.salvage import SALVAGE_ID_PREFIX, Damage
from ..stores.base import Store, validate_key
from . import render
from .core import (
    MAX_VERSION,
    _done,
    _fail,
    _key,
    _KeyArg,
    _opts,
    _run,
    _TakeoverOpt,
    app,
    whole,
)
from .snapshots import (
    Latest,
    delete_unheld,
    latest,
    load,
    make_codec,
    read_snapshot,
    release_lease,
    write_whole,
)


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="A file from 'export', '-' for stdin.")
    ],
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Session key (default: the file's key)")
    ] = None,
    takeover: _TakeoverOpt = False,
) -> None:
    """Commit an exported snapshot as the session's next version (under its lease).

    The file is validated whole first (frames, item ids, item types, restorability):
    a file that is refused writes nothing."""
    opts = _opts(ctx)
    if key is not None:
        key = _key(key)
    try:
        snap = read_snapshot(file)
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)
    if key is None:
        try:
            validate_key(snap.key)
        except ValueError as e:
            _fail(
                SnapshotCorrupt(
                    f"{file}: the export names a key no store can hold: {e}; "
                    "import it under another with --key"
                ),
                as_json=opts.json,
            )
    target = key or snap.key

    async def build(_store: Store, _codec: Codec, _latest: Latest) -> Snapshot:
        return snap

    async def go(store: Store) -> int | None:
        # What the key holds is read with this shell's keys first, before the lease: a
        # shell that lacks its key (staging's keys, a key the workers dropped) would
        # write a newest version the workers cannot read either. A damaged head is
        # no reason to refuse: importing a good export is how it is rolled back.
        try:
            stored = await store.load(target)
            make_codec(store).decode_head(target, stored.head)
        except SnapshotNotFound:
            pass
        except SignatureMismatch as e:
            if e.unknown_key is not None or e.plaintext:
                raise
        except SnapshotCorrupt:
            pass
        return (await write_whole(store, target, build, takeover=takeover, source="import"))[1]

    version = _run(ctx, go, read_only=False)
    _done(
        opts,
        {"key": target, "version": version, "items": len(snap.history)},
        f"imported {file} as {target!r} version {version} ({len(snap.history)} items)",
    )


@app.command("repair")
def repair_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    takeover: _TakeoverOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what is lost; write nothing.")
    ] = False,
) -> None:
    """Salvage a damaged session: keep every intact item, mark and report the lost ones,
    and write the result as a fresh whole version that no longer reads the damage.

    Older versions still read the damaged record: roll back to the repaired version,
    not past it."""
    opts = _opts(ctx)
    key = _key(key)
    found: dict[str, Any] = {}

    async def build(store: Store, codec: Codec, stored: Latest) -> Snapshot | None:
        if stored is None:
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        if isinstance(stored, SnapshotCorrupt):
            version, snap, damage = await _salvage_lost(store, codec, key, stored)
        else:
            version = stored.version
            snap, damage = await salvage_stored(store, codec, stored)
        found.update(version=version, snap=snap, damage=damage)
        return snap if damage and not dry_run else None

    async def go(store: Store) -> tuple[Snapshot | None, int | None]:
        # Read without a lease first (all of --dry-run): a healthy session is left as it
        # was. Taking the lease to find no damage would move the epoch on, so that with
        # --takeover the live worker holding a healthy session was fenced (LeaseLost)
        # for nothing, and without it the command was refused (SessionBusy).
        await build(store, make_codec(store), (await latest(store, key))[0])
        if dry_run or not found["damage"]:
            return None, None
        # damaged: salvaged again under the lease, from what the store holds by then
        return await write_whole(store, key, build, takeover=takeover, source="repair")

    _written, version = _run(ctx, go, read_only=dry_run, session=key)
    damage: list[Damage] = found["damage"]
    snap: Snapshot = found["snap"]
    kept = {
        HISTORY: sum(1 for i in snap.history if not _is_note(i)),
        AGENT: sum(1 for i in snap.agent.chat_ctx if not _is_note(i)) if snap.agent else 0,
    }
    if opts.json:
        render.print_json(
            {
                "key": key,
                "version": found["version"],
                "damage": [
                    {"stream": d.stream, "item_id": d.item_id, "reason": d.reason} for d in damage
                ],
                "kept": kept,
                "written": version,
            }
        )
        return
    render.repair_report(render.console(), key, found["version"], damage, kept, written=version)


async def _salvage_lost(
    store: Store, codec: Codec, key: str, lost: SnapshotCorrupt
) -> tuple[int, Snapshot, list[Damage]]:
    """What is intact of the newest version that can be read, for a session whose
    latest cannot be read at all (its record lost): the turns after it are lost."""
    top, stored = await newest_readable(store, key)
    if stored is None:
        raise lost
    snap, damage = await salvage_stored(store, codec, stored)
    lost_versions = ", ".join(str(n) for n in range(stored.version + 1, top + 1))
    reason = (
        f"version {top} cannot be read ({lost}): rolled back to version {stored.version}, "
        f"the newest that can; what versions {lost_versions} added is lost"
    )
    return top, snap, [Damage("head", "", reason), *damage]


def _is_note(item: ItemData) -> bool:
    return str(item.get("id", "")).startswith(SALVAGE_ID_PREFIX)


@app.command("rm")
def rm_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a session: every version, its log and its lease."""
    opts = _opts(ctx)
    key = _key(key)

    where = redact.url(opts.store_url)

    async def held(store: Store) -> tuple[bool, str | None, str | None]:
        """Whether the session is there, who holds it live, and why it cannot be read.
        No info: no session, or the remains of one whose head was lost (evicted), which
        delete removes too; delete says which. A damaged session is deleted all the same."""
        try:
            info = await store.info(key)
        except SnapshotCorrupt as e:
            return True, None, str(e)
        if info is None:
            return False, None, None
        return True, info.owner, None  # live by the store's clock, not this host's

    # looked up read-only first: a mistyped path is an error, not a new empty file
    found, holder, damage = _run(ctx, held, read_only=True)
    if not yes:
        warn = (
            f" It is held by {holder!r}, a live worker: it stops saving it (a "
            "resumable_job ends its call)."
            if holder
            else ""
        )
        if damage:
            warn += f" It cannot be read ({damage})."
        question = redact.printable(f"Delete session {key!r} and all its versions?{warn}")
        try:
            confirmed = typer.confirm(question, err=True)  # stdout is for the answer (--json)
        except typer.Abort:  # no answer (stdin closed, ^C)
            confirmed = False
        if not confirmed:
            # said as any failure is (a JSON object with --json), not a bare exit 1
            _fail(
                typer.Abort(
                    f"session {key!r} not deleted: not confirmed (--yes deletes it without asking)"
                ),
                as_json=opts.json,
            )
    # Confirmed as free: deleted only while still free, under a lease of its own, so that
    # a worker that took it meanwhile (a caller back) keeps it.
    fenced = not yes and found and holder is None and damage is None

    async def go(store: Store) -> bool:
        if fenced:
            deleted = await delete_unheld(store, key)
        else:
            deleted = await store.delete(key)
        if not deleted:
            raise SnapshotNotFound(f"no session {key!r} in {where}")
        return True

    _run(ctx, go, read_only=False)
    _done(opts, {"key": key, "deleted": True}, f"deleted {key!r}")


@app.command("revert")
def revert_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    version: Annotated[
        int,
        typer.Argument(metavar="VERSION", parser=whole(1, MAX_VERSION), help="A retained version."),
    ],
    takeover: _TakeoverOpt = False,
) -> None:
    """Make an older version the newest: write it again whole, as a new version, under
    the session's lease (refused while a worker holds it, unless --takeover)."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> int | None:
        # Looked up before the lease: taking a lease creates the session's record, so a
        # revert of a mistyped key left a session of version 0 behind in ``ls``. The
        # version too, and decoded: a refusal once the lease was taken (a version not
        # retained, damaged, signed by a key dropped since) had fenced the live worker
        # with --takeover, for a command that then changed nothing. What is written is
        # what was read here: read again under the lease, a version an autosave trimmed
        # meanwhile refused the command after it had fenced the worker all the same.
        # Listed rather than `info`: a latest version that cannot be read (its record
        # lost) is what a revert rolls back past.
        listed = await store.versions(key)
        if not listed:
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        target = await load(store, key, version)
        if listed[-1].version == version:
            # written again, it would cost the oldest retained version (keep) for nothing
            return None

        async def build(_store: Store, _codec: Codec, stored: Latest) -> Snapshot:
            if stored is None:
                raise SnapshotNotFound(f"no snapshot for session {key!r}")
            return target

        return (await write_whole(store, key, build, takeover=takeover, source="revert"))[1]

    written = _run(ctx, go, read_only=False, session=key)
    if written is None:
        _done(
            opts,
            {"key": key, "reverted_to": version, "version": version, "written": False},
            f"version {version} is already the latest of {key!r}: nothing written",
        )
        return
    _done(
        opts,
        {"key": key, "reverted_to": version, "version": written, "written": True},
        f"reverted {key!r} to version {version}, written as version {written}",
    )


@app.command("release")
def release_cmd(ctx: typer.Context, key: _KeyArg) -> None:
    """Free a stuck lease: the epoch moves on, so the old holder can no longer commit
    (its next checkpoint fails with LeaseLost) and any worker may take the session."""
    opts = _opts(ctx)
    key = _key(key)
    holder, epoch, damaged = _run(
        ctx, lambda store: release_lease(store, key), read_only=False, session=key
    )
    was = (
        "held by an owner its damaged latest version does not tell"
        if damaged
        else f"held by {holder!r}"
        if holder
        else "not held"
    )
    _done(
        opts,
        {
            "key": key,
            "released": True,
            "previous_owner": holder,
            "epoch": epoch,
            "damaged": damaged,
        },
        f"released {key!r} (it was {was}); epoch now {epoch}",
    )
