"""Commands that only read a store (``ls``, ``show``, ``history``, ``export``,
``diff``): they open it read-only and never create or change a file."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, get_args

import typer
import typer.core

from .. import redact
from ..errors import (
    SnapshotNotFound,
    StoreUnavailable,
)
from ..snapshot.model import Snapshot, SnapshotState
from ..snapshot.salvage import validate_restorable
from ..stores.base import SessionInfo, Store, validate_page
from . import render
from .core import (
    MAX_VERSION,
    _done,
    _fail,
    _key,
    _KeyArg,
    _opts,
    _run,
    _VersionOpt,
    app,
    whole,
)
from .snapshots import (
    Unreadable,
    binary,
    diff_snapshots,
    load,
    make_codec,
    page_sessions,
)

# what --state can filter by: the states a snapshot records
STATES = get_args(SnapshotState)


@app.command("ls")
def ls_cmd(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Option("--prefix", help="Only keys starting with P.")] = "",
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only sessions in this state (active, paused, suspended…)"),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", metavar="N", parser=whole(1), help="At most N sessions (a page)."
        ),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option("--after", metavar="CURSOR", help="The page after CURSOR (from a listing)."),
    ] = None,
    scan: Annotated[
        bool,
        typer.Option(
            "--scan",
            help="Redis: first list again sessions the index lost (evicted, a failover);"
            " SCANs the whole keyspace.",
        ),
    ] = False,
) -> None:
    """Sessions in key order: latest version, state, agent, items, lease holder, last
    update. With --limit, a page at a time: it prints the cursor of the next one.

    --json prints a list; with --limit or --after, {"sessions": [...], "next": CURSOR},
    next null on the last page."""
    opts = _opts(ctx)
    try:
        validate_page(prefix, after, limit)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if state is not None and state not in STATES:
        # a typo would list nothing, as if no session were in that state
        raise typer.BadParameter(
            f"{state!r} is not a state: one of {', '.join(STATES)}", param_hint="--state"
        )

    async def go(store: Store) -> tuple[list[SessionInfo | Unreadable], str | None]:
        if scan:
            reindex = getattr(store, "reindex", None)
            if reindex is None:
                raise typer.BadParameter(
                    "is for a Redis store: its index of sessions", param_hint="'--scan'"
                )
            await reindex()
        return await page_sessions(store, prefix=prefix, state=state, limit=limit, after=after)

    infos, cursor = _run(ctx, go, read_only=True)
    rows = render.session_rows(infos, time.time())
    paged = limit is not None or after is not None
    unreachable = [i for i in infos if isinstance(i, Unreadable) and i.unreachable]
    if opts.json:
        listed = [{k: v for k, v in r.items() if k != "updated_ts"} for r in rows]
        render.print_json({"sessions": listed, "next": cursor} if paged else listed)
    else:
        console = render.console()
        where = redact.url(opts.store_url)
        if not rows:
            console.print(redact.printable(f"no sessions in {where}"))
        else:
            table = render.sessions_table(rows, title=f"sessions in {where}")
            console.print(table, soft_wrap=True)  # a session per line, never cut
            render.unreadable_lines(render.err_console(), rows)
        if cursor is not None:
            # one word for a shell (a key may hold spaces, quotes, a bidi override),
            # joined by "=" so that no cursor reads as an option of its own
            console.print(f"next page: --after={redact.shell_word(cursor)}", soft_wrap=True)
    if unreachable:
        # the listing is not the whole truth: a script must not take it for one
        n = len(unreachable)
        _fail(
            StoreUnavailable(
                f"{n} listed session{'s' if n != 1 else ''} could not be read: "
                "the store did not answer for them (listed as unreachable)"
            ),
            as_json=opts.json,
        )


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    version: _VersionOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list the current agent's own context.")
    ] = False,
) -> None:
    """Decode a snapshot: its metadata and the conversation, readably."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> Snapshot:
        return await load(store, key, version)

    snap = _run(ctx, go, read_only=True)
    if opts.json:
        render.print_json(snap.model_dump(mode="python"))
        return
    console = render.console()
    console.print(render.snapshot_table(snap))
    console.print()
    console.print(render.transcript_table(snap.history, title="conversation"))
    if show_all and snap.agent is not None:
        console.print()
        title = f"context of agent {snap.agent.agent_id}"
        console.print(render.transcript_table(snap.agent.chat_ctx, title=title))


@app.command("history")
def history_cmd(ctx: typer.Context, key: _KeyArg) -> None:
    """Retained versions of a session: version, epoch, time, reason, state, bytes."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> list[dict[str, Any]]:
        versions = await store.versions(key)
        if not versions and await store.info(key) is None:
            # a session held before its first save has none yet, and is listed by `ls`
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        # what a damaged version's record lost is unknown (0), not 1970 or epoch 0
        return [
            {
                "version": v.version,
                "epoch": v.epoch if v.epoch or v.damaged is None else None,
                "created_at": render.iso(v.created_at) if v.created_at else None,
                "created_ts": v.created_at or None,
                "reason": v.info.get("reason"),
                "source": v.info.get("source"),
                "state": v.info.get("state"),
                "items": v.info.get("items"),
                "bytes": v.size if v.size or v.damaged is None else None,
                "damaged": v.damaged,
            }
            for v in versions
        ]

    rows = _run(ctx, go, read_only=True)
    if opts.json:
        render.print_json([{k: v for k, v in r.items() if k != "created_ts"} for r in rows])
        return
    console = render.console()
    console.print(render.versions_table(rows, title=f"versions of {key!r}"), soft_wrap=True)
    for r in rows:
        if r["damaged"] is not None:
            note = redact.printable(f"version {r['version']} is damaged: {r['damaged']}")
            console.print(note, markup=False, highlight=False)


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="File to write, '-' for stdout.")
    ],
    version: _VersionOpt = None,
) -> None:
    """Write the snapshot (signed/encrypted like the store's) to a file: one frame, or a
    head frame and one frame per item when the session is larger than one frame."""
    opts = _opts(ctx)
    key = _key(key)

    store_files: list[str] = []

    async def go(store: Store) -> tuple[Snapshot, bytes]:
        path = getattr(store, "path", None)  # a SQLite store's file, and its journals
        if isinstance(path, str):
            store_files.extend(path + end for end in ("", "-wal", "-shm", "-journal"))
        snap = await load(store, key, version)
        # what import would refuse is refused here, before a file exists
        validate_restorable(snap)
        return snap, b"".join(make_codec().encode_export(snap))

    snap, frame = _run(ctx, go, read_only=True)
    if output != "-" and any(_same_file(output, f) for f in store_files):
        # opened "wb", the store's own file would be truncated: every session lost
        raise typer.BadParameter(
            f"{output!r} is the store's own file: export to another file",
            param_hint="'--output'",
        )
    if output == "-":
        out = binary("stdout")
        out.write(frame)
        out.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(frame)
    except OSError as e:
        # a failed write (a full disk) carries no file name
        _fail(OSError(e.errno, f"cannot write {output}: {e.strerror or e}"), as_json=opts.json)
    _done(
        opts,
        {"key": key, "version": snap.version, "file": output, "bytes": len(frame)},
        f"exported {key!r} version {snap.version} to {output} ({len(frame)} bytes)",
    )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (or cannot be looked at): not one file
        return False


@app.command("diff")
def diff_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    a: Annotated[
        int, typer.Argument(metavar="A", parser=whole(1, MAX_VERSION), help="The older version.")
    ],
    b: Annotated[
        int, typer.Argument(metavar="B", parser=whole(1, MAX_VERSION), help="The newer version.")
    ],
) -> None:
    """What changed from version A to version B: items added (+), edited (~) and removed
    (-) per stream, by item id; and the userdata, agent, instructions and state."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> dict[str, Any]:
        return diff_snapshots(await load(store, key, a), await load(store, key, b))

    diff = _run(ctx, go, read_only=True)
    if opts.json:
        render.print_json(diff)
        return
    render.diff_report(render.console(), diff)
