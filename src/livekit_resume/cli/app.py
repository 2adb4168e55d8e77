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
damaged session and prints each item it could not recover. ``revert`` writes an older
version again as the newest; ``release`` frees a lease, fencing its holder.

The global options (``--store``, ``--namespace``, ``--json``) work before or after the
command. Exit codes (docs/cli.md): 0 ok, 1 an error (its type on the one line printed),
2 a usage error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import typer.core

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
from ..stores.base import SessionInfo, Store, Stored, lease_is_live, validate_key
from ..stores.url import open_store
from . import render
from .snapshots import (
    PROG,
    binary,
    diff_snapshots,
    load,
    make_codec,
    page_sessions,
    read_snapshot,
    release_lease,
    write_whole,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "app", "main"]

# Exit codes, stable for scripts (docs/cli.md). A usage error is click's own 2.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# The root's options, accepted anywhere on the line: moved before the command.
_GLOBAL_FLAGS = frozenset({"--json"})
_GLOBAL_VALUED = frozenset({"--store", "--namespace"})


def hoist_globals(args: Sequence[str]) -> list[str]:
    """``args`` with every global option (and its value) moved to the front, so that
    ``ls --store URL`` reads as ``--store URL ls``; nothing after ``--`` moves."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in _GLOBAL_FLAGS or (arg.split("=", 1)[0] in _GLOBAL_VALUED and "=" in arg):
            front.append(arg)
        elif arg in _GLOBAL_VALUED and i + 1 < len(args):
            front += args[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


class _Group(typer.core.TyperGroup):
    """The root command: global options before or after the command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_globals(args))


app = typer.Typer(
    name=PROG,
    cls=_Group,
    help="Inspect, export, import, diff, revert and demo resumable LiveKit agent sessions."
    "\n\n--store, --namespace and --json work before or after the command."
    " Exit codes: 0 ok, 1 error, 2 usage (docs/cli.md).",
    no_args_is_help=True,
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
    namespace: str | None = None


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
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            metavar="NS",
            help="Namespace of the store (default: $RESUME_NAMESPACE)",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = _Options(
        store_url=store or Settings.only("store").store,
        store_explicit=store is not None,
        json=as_json,
        namespace=namespace,
    )


# ------------------------------------------------------------------------- helpers


def _fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    render.error_line(exc, as_json=as_json)
    raise typer.Exit(EXIT_ERROR)


def _run(ctx: typer.Context, fn: Callable[[Store], Awaitable[T]], *, read_only: bool) -> T:
    """Open the store, run ``fn`` on one event loop, close the store; typed errors exit 1.
    ``read_only``: a command that only reads never creates or writes a file."""
    opts = _opts(ctx)

    async def go() -> T:
        store = _open(opts.store_url, read_only=read_only, namespace=opts.namespace)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(go())
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)


def _open(url: str, *, read_only: bool, namespace: str | None) -> Store:
    options = {} if namespace is None else {"namespace": namespace}
    try:
        return open_store(url, read_only=read_only, **options)
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
def ls_cmd(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Option("--prefix", help="Only keys starting with P.")] = "",
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only sessions in this state (active, paused, suspended…)"),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="At most N sessions (a page).")
    ] = None,
    after: Annotated[
        str | None,
        typer.Option("--after", metavar="CURSOR", help="The page after CURSOR (from a listing)."),
    ] = None,
) -> None:
    """Sessions in key order: latest version, state, agent, items, lease holder, last
    update. With --limit, a page at a time: it prints the cursor of the next one.

    --json prints a list; with --limit or --after, {"sessions": [...], "next": CURSOR},
    next null on the last page."""
    opts = _opts(ctx)

    async def go(store: Store) -> tuple[list[SessionInfo], str | None]:
        return await page_sessions(store, prefix=prefix, state=state, limit=limit, after=after)

    infos, cursor = _run(ctx, go, read_only=True)
    rows = render.session_rows(infos, time.time())
    paged = limit is not None or after is not None
    if opts.json:
        listed = [{k: v for k, v in r.items() if k != "updated_ts"} for r in rows]
        render.print_json({"sessions": listed, "next": cursor} if paged else listed)
        return
    console = render.console()
    where = redact.url(opts.store_url)
    if not rows:
        console.print(redact.printable(f"no sessions in {where}"))
    else:
        console.print(render.sessions_table(rows, title=f"sessions in {where}"))
    if cursor is not None:
        console.print(redact.printable(f"next page: --after {cursor}"), soft_wrap=True)


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


@app.command("diff")
def diff_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    a: Annotated[int, typer.Argument(metavar="A", help="The older version.")],
    b: Annotated[int, typer.Argument(metavar="B", help="The newer version.")],
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


@app.command("revert")
def revert_cmd(
    ctx: typer.Context,
    key: _KeyArg,
    version: Annotated[int, typer.Argument(metavar="VERSION", help="A retained version.")],
    takeover: _TakeoverOpt = False,
) -> None:
    """Make an older version the newest: write it again whole, as a new version, under
    the session's lease (refused while a worker holds it, unless --takeover)."""
    opts = _opts(ctx)
    key = _key(key)

    async def build(store: Store, codec: Codec, stored: Stored | None) -> Snapshot:
        if stored is None:
            raise SnapshotNotFound(f"no snapshot for session {key!r}")
        return await load(store, key, version)

    async def go(store: Store) -> int | None:
        return (await write_whole(store, key, build, takeover=takeover, source="revert"))[1]

    written = _run(ctx, go, read_only=False)
    _done(
        opts,
        {"key": key, "reverted_to": version, "version": written},
        f"reverted {key!r} to version {version}, written as version {written}",
    )


@app.command("release")
def release_cmd(ctx: typer.Context, key: _KeyArg) -> None:
    """Free a stuck lease: the epoch moves on, so the old holder can no longer commit
    (its next checkpoint fails with LeaseLost) and any worker may take the session."""
    opts = _opts(ctx)
    key = _key(key)
    holder, epoch = _run(ctx, lambda store: release_lease(store, key), read_only=False)
    was = f"held by {holder!r}" if holder else "not held"
    _done(
        opts,
        {"key": key, "released": True, "previous_owner": holder, "epoch": epoch},
        f"released {key!r} (it was {was}); epoch now {epoch}",
    )


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    key: Annotated[
        str | None, typer.Option("--key", help="Session key (default: a new one)")
    ] = None,
    resume_part: Annotated[bool, typer.Option("--resume-part", hidden=True)] = False,
    report: Annotated[str | None, typer.Option("--report", hidden=True)] = None,
) -> None:
    """Run a conversation, suspend it, and restore it in a NEW process: the agent remembers.

    Its store: --store, else sqlite:///resume-demo.db (not $RESUME_STORE)."""
    # imported here: the demo (livekit-agents, its agents) loads only when it runs
    from .demo import DEFAULT_DEMO_STORE, run_child, run_demo

    opts = _opts(ctx)
    url = opts.store_url if opts.store_explicit else DEFAULT_DEMO_STORE
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
