"""``livekit-resume``: inspect, move and demo resumable sessions from a shell.

Every command takes the store from ``--store URL`` (default: ``RESUME_STORE``, else
``sqlite:///resume.db``) and prints a readable table, or plain JSON with ``--json``.
Snapshots are decoded with ``RESUME_SIGNING_KEYS`` / ``RESUME_ENCRYPTION_KEYS``, the
same keys the workers use. A failure prints the error's type and message on one line
and exits 1.

Commands that only read (``ls``, ``show``, ``history``, ``export``) open the store
read-only: they never create or change a file. ``import`` and ``repair`` write a whole
base version (every stream cleared and written again) under the session's lease;
``import`` validates the whole file first, ``repair`` salvages what is intact of a
damaged session and prints each item it could not recover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from .. import redact
from ..bridge import salvage_stored
from ..errors import (
    ResumeError,
    SnapshotNotFound,
)
from ..settings import DEFAULT_STORE_URL, Settings
from ..snapshot.codec import AGENT, HISTORY, Codec
from ..snapshot.model import ItemData, Snapshot
from ..snapshot.salvage import SALVAGE_ID_PREFIX, Damage, validate_restorable
from ..stores.base import Store, Stored, lease_is_live, validate_key
from ..stores.url import open_store
from . import render
from .snapshots import PROG, binary, load, make_codec, read_snapshot, write_whole

__all__ = ["app", "main"]

app = typer.Typer(
    name=PROG,
    help="Inspect, export, import and demo resumable LiveKit agent sessions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

# Parameters several commands share.
_KeyArg = Annotated[str, typer.Argument(help="Session key.")]
_VersionOpt = Annotated[
    int | None, typer.Option("--version", "-v", help="A retained version (default: latest)")
]
_TakeoverOpt = Annotated[
    bool, typer.Option("--takeover", help="Take the lease over from a live worker.")
]


@dataclass(frozen=True)
class _Options:
    store_url: str
    store_explicit: bool
    json: bool


def _opts(ctx: typer.Context) -> _Options:
    obj = ctx.find_root().obj
    assert isinstance(obj, _Options)
    return obj


@app.callback()
def _root(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help=f"Store URL (default: $RESUME_STORE, else {DEFAULT_STORE_URL})",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables (for scripts).")
    ] = False,
) -> None:
    ctx.obj = _Options(
        store_url=store or Settings.only("store").store,
        store_explicit=store is not None,
        json=as_json,
    )


# ------------------------------------------------------------------------- helpers


def _fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    render.error_line(exc, as_json=as_json)
    raise typer.Exit(1)


def _run(ctx: typer.Context, fn: Callable[[Store], Awaitable[T]], *, read_only: bool) -> T:
    """Open the store, run ``fn`` on one event loop, close the store; typed errors exit 1.
    ``read_only``: a command that only reads never creates or writes a file."""
    opts = _opts(ctx)

    async def go() -> T:
        store = _open(opts.store_url, read_only=read_only)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(go())
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)


def _open(url: str, *, read_only: bool) -> Store:
    try:
        return open_store(url, read_only=read_only)
    except ImportError as e:
        raise ValueError(f"the store for {redact.url(url)!r} is not available here: {e}") from e


def _done(opts: _Options, data: Any, text: str) -> None:
    """What a command that wrote something says: ``data`` with --json, else ``text``."""
    if opts.json:
        render.print_json(data)
    else:
        render.console().print(redact.printable(text))


def _key(key: str) -> str:
    try:
        return validate_key(key)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


# ------------------------------------------------------------------------ commands


@app.command("ls")
def ls_cmd(ctx: typer.Context) -> None:
    """Every session: latest version, state, agent, items, lease holder, last update."""
    opts = _opts(ctx)

    async def go(store: Store) -> list[dict[str, Any]]:
        keys = await store.keys()
        infos = await asyncio.gather(*(store.info(k) for k in keys))
        now = time.time()
        rows = []
        for info in infos:
            if info is None:
                continue  # deleted or expired between keys() and info()
            live = lease_is_live(info.lease_expires_at, now)
            rows.append(
                {
                    "key": info.key,
                    "version": info.version,
                    "epoch": info.epoch,
                    "state": info.info.get("state"),
                    "agent": info.info.get("agent"),
                    "items": info.info.get("items"),
                    "owner": info.owner if live else None,
                    "lease_expires_at": render.iso(info.lease_expires_at) if live else None,
                    "lease_expires_in": info.lease_expires_at - now
                    if live and info.lease_expires_at is not None
                    else None,
                    "updated_at": render.iso(info.updated_at),
                    "updated_ts": info.updated_at,
                }
            )
        return rows

    rows = _run(ctx, go, read_only=True)
    if opts.json:
        render.print_json([{k: v for k, v in r.items() if k != "updated_ts"} for r in rows])
        return
    console = render.console()
    where = redact.url(opts.store_url)
    if not rows:
        console.print(redact.printable(f"no sessions in {where}"))
        return
    console.print(render.sessions_table(rows, title=f"sessions in {where}"))


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
        if not versions:
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        return [
            {
                "version": v.version,
                "epoch": v.epoch,
                "created_at": render.iso(v.created_at),
                "created_ts": v.created_at,
                "reason": v.info.get("reason"),
                "source": v.info.get("source"),
                "state": v.info.get("state"),
                "items": v.info.get("items"),
                "bytes": v.size,
            }
            for v in versions
        ]

    rows = _run(ctx, go, read_only=True)
    if opts.json:
        render.print_json([{k: v for k, v in r.items() if k != "created_ts"} for r in rows])
        return
    render.console().print(render.versions_table(rows, title=f"versions of {key!r}"))


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

    async def go(store: Store) -> tuple[Snapshot, bytes]:
        snap = await load(store, key, version)
        # what import would refuse is refused here, before a file exists
        validate_restorable(snap)
        return snap, b"".join(make_codec().encode_export(snap))

    snap, frame = _run(ctx, go, read_only=True)
    if output == "-":
        out = binary("stdout")
        out.write(frame)
        out.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(frame)
    except OSError as e:
        _fail(e, as_json=opts.json)
    _done(
        opts,
        {"key": key, "version": snap.version, "file": output, "bytes": len(frame)},
        f"exported {key!r} version {snap.version} to {output} ({len(frame)} bytes)",
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
    target = key or snap.key

    async def build(_store: Store, _codec: Codec, _stored: Stored | None) -> Snapshot:
        return snap

    async def go(store: Store) -> int | None:
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

    async def build(store: Store, codec: Codec, stored: Stored | None) -> Snapshot | None:
        if stored is None:
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        snap, damage = await salvage_stored(store, codec, stored)
        found.update(version=stored.version, snap=snap, damage=damage)
        return snap if damage and not dry_run else None

    async def go(store: Store) -> tuple[Snapshot | None, int | None]:
        if dry_run:  # read only: no lease, nothing written, a live worker undisturbed
            try:
                stored: Stored | None = await store.load(key)
            except SnapshotNotFound:
                stored = None
            await build(store, make_codec(store), stored)
            return None, None
        return await write_whole(store, key, build, takeover=takeover, source="repair")

    _written, version = _run(ctx, go, read_only=dry_run)
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

    async def held(store: Store) -> str | None:
        # No info: no session, or the remains of one whose head was lost (evicted),
        # which delete removes too; delete says which.
        info = await store.info(key)
        if info is None:
            return None
        return info.owner if lease_is_live(info.lease_expires_at, time.time()) else None

    # looked up read-only first: a mistyped path is an error, not a new empty file
    holder = _run(ctx, held, read_only=True)
    if not yes:
        warn = f" It is held by {holder!r}, a live worker." if holder else ""
        question = redact.printable(f"Delete session {key!r} and all its versions?{warn}")
        if not typer.confirm(question):
            raise typer.Exit(1)

    async def go(store: Store) -> bool:
        if not await store.delete(key):
            raise SnapshotNotFound(f"no session {key!r} in {where}")
        return True

    _run(ctx, go, read_only=False)
    _done(opts, {"key": key, "deleted": True}, f"deleted {key!r}")


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Store for the demo (default: the global --store, else sqlite:///resume-demo.db)",
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Session key (default: a new one)")
    ] = None,
    resume_part: Annotated[bool, typer.Option("--resume-part", hidden=True)] = False,
    report: Annotated[str | None, typer.Option("--report", hidden=True)] = None,
) -> None:
    """Run a conversation, suspend it, and restore it in a NEW process: the agent remembers."""
    # imported here: the demo (livekit-agents, its agents) loads only when it runs
    from .demo import DEFAULT_DEMO_STORE, run_child, run_demo

    opts = _opts(ctx)
    url = store or (opts.store_url if opts.store_explicit else DEFAULT_DEMO_STORE)
    try:
        if resume_part:
            if key is None or report is None:
                raise ValueError("--resume-part needs --key and --report")
            code = run_child(url, key, report)
        else:
            code = run_demo(url, key)
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)
    raise typer.Exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``livekit-resume`` and ``python -m livekit_resume``)."""
    app(args=list(argv) if argv is not None else None, prog_name=PROG)
