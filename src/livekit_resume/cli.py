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
import datetime as _dt
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Literal, NoReturn, TypeVar, cast

import click
import typer
from pydantic_core import to_jsonable_python
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import (
    IncompatibleSnapshot,
    ResumeError,
    SessionBusy,
    SnapshotCorrupt,
    SnapshotNotFound,
    SnapshotTooLarge,
)
from .snapshot.codec import AGENT, DEFAULT_MAX_FRAME, HISTORY, Codec, read_frames
from .snapshot.model import ItemData, Snapshot, Writer
from .snapshot.salvage import Damage, salvage_parts, validate_restorable
from .stores.base import (
    Commit,
    Record,
    Store,
    Stored,
    lease_is_live,
    records_from_streams,
    validate_key,
)
from .stores.url import DEFAULT_STORE_URL, open_store

__all__ = [
    "add_transcript_rows",
    "app",
    "commit_from_snapshot",
    "main",
    "make_codec",
    "render_item",
    "transcript_table",
]

# The name shown in help and errors, also under ``python -m livekit_resume``.
PROG = "livekit-resume"
# Lease the CLI holds while it imports or repairs: long enough for one commit on a slow
# store.
IMPORT_LEASE_TTL = 30.0
# The frame limit of the CLI's codec: the workers' default, so that the CLI reads what
# they write and writes nothing they cannot read.
_MAX_FRAME = DEFAULT_MAX_FRAME

app = typer.Typer(
    name=PROG,
    help="Inspect, export, import and demo resumable LiveKit agent sessions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


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
        store_url=store or os.environ.get("RESUME_STORE") or DEFAULT_STORE_URL,
        store_explicit=store is not None,
        json=as_json,
    )


# ------------------------------------------------------------------------- helpers


def _console() -> Console:
    # built per call, so that it writes to whatever sys.stdout is now (tests swap it);
    # no markup: keys, userdata and transcripts are data, "[bold]" in them stays text
    return Console(highlight=False, markup=False)


def _err_console() -> Console:
    # soft_wrap: an error stays one line, however narrow the terminal, for grep and logs
    return Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def _fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    kind = type(exc).__name__
    if as_json:
        click.echo(json.dumps({"error": kind, "message": str(exc)}), err=True)
    else:
        _err_console().print(Text.assemble(("error", "bold red"), f" ({kind}): {exc}"))
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
        raise ValueError(f"the store for {url!r} is not available here: {e}") from e


def make_codec() -> Codec:
    """A codec with the workers' keys (``RESUME_SIGNING_KEYS``, ``RESUME_ENCRYPTION_KEYS``)."""
    return Codec(
        signing_keys=os.environ.get("RESUME_SIGNING_KEYS") or None,
        encryption_keys=os.environ.get("RESUME_ENCRYPTION_KEYS") or None,
        max_frame=_MAX_FRAME,
    )


def _key(key: str) -> str:
    try:
        return validate_key(key)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


async def _load(store: Store, key: str, version: int | None) -> Snapshot:
    stored = await store.load(key, version)
    return make_codec().decode_parts(key, stored.head, stored.streams, version=stored.version)


def _when(ts: float | None, *, short: bool = False) -> str:
    """Local time; ``short`` drops the date for today."""
    if ts is None:
        return "—"
    at = _dt.datetime.fromtimestamp(ts)
    if short and at.date() == _dt.date.today():
        return at.strftime("%H:%M:%S")
    return at.strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat()


def _print_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable_python(value, bytes_mode="base64"), indent=2))


def _str(value: object) -> str:
    return "—" if value is None or value == "" else str(value)


# ---------------------------------------------------------------------- transcript


def _content_text(content: Iterable[Any]) -> str:
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind == "image_content":
                parts.append(f"[image {str(part.get('image', ''))[:60]}]")
            elif kind == "audio_content":
                parts.append(f"[audio] {part.get('transcript') or ''}".strip())
            elif kind == "dropped_media" and part.get("kind") == "audio":
                parts.append(f"[audio not kept] {part.get('transcript') or ''}".strip())
            elif kind == "dropped_media":
                parts.append("[image not kept]")
    return " ".join(p for p in parts if p)


def render_item(item: ItemData, *, width: int | None = None) -> tuple[Text, Text] | None:
    """One chat item (plain data) as (who, what); None for an item not worth a line
    (agent config updates)."""

    def cut(s: str) -> str:
        return s if width is None or len(s) <= width else s[: width - 1] + "…"

    kind = item.get("type")
    if kind == "message":
        role = str(item.get("role"))
        text = cut(_content_text(item.get("content") or []))
        style = {"user": "bold cyan", "assistant": "bold green"}.get(role, "dim")
        what = Text(text, style="dim" if role in ("system", "developer") else "")
        if item.get("interrupted"):
            what.append(" (interrupted)", style="yellow")
        return Text(role, style=style), what
    if kind == "function_call":
        return Text("tool call", style="magenta"), Text(
            cut(f"{item.get('name')}({item.get('arguments') or ''})")
        )
    if kind == "function_call_output":
        err = bool(item.get("is_error"))
        name = item.get("name") or item.get("call_id")
        output = str(item.get("output") or "")
        what = Text(cut(f"{name}: {output}")) if output else Text(f"{name} (no output)")
        return Text("tool error" if err else "tool output", style="red" if err else "magenta"), what
    if kind == "agent_handoff":
        old = item.get("old_agent_id") or "—"
        return Text("handoff", style="bold yellow"), Text(f"{old} → {item.get('new_agent_id')}")
    return None


def transcript_table(items: Sequence[ItemData], *, title: str | None = None) -> Table:
    """A readable transcript: role and text, tool calls and outputs, handoffs."""
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column("who", no_wrap=True, min_width=11)
    table.add_column("what", overflow="fold")
    add_transcript_rows(table, items)
    return table


def add_transcript_rows(table: Table, items: Iterable[ItemData]) -> None:
    """Append the readable rows of ``items`` to a `transcript_table`."""
    for item in items:
        row = render_item(item)
        if row is not None:
            table.add_row(*row)


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
                    "lease_expires_at": _iso(info.lease_expires_at) if live else None,
                    "lease_expires_in": info.lease_expires_at - now
                    if live and info.lease_expires_at is not None
                    else None,
                    "updated_at": _iso(info.updated_at),
                    "updated_ts": info.updated_at,
                }
            )
        return rows

    rows = _run(ctx, go, read_only=True)
    if opts.json:
        _print_json([{k: v for k, v in r.items() if k != "updated_ts"} for r in rows])
        return
    console = _console()
    if not rows:
        console.print(f"no sessions in {opts.store_url}")
        return
    table = Table(title=f"sessions in {opts.store_url}", box=box.SIMPLE_HEAD)
    table.add_column("key", no_wrap=True)
    table.add_column("version", justify="right", min_width=7)
    table.add_column("state", no_wrap=True)
    table.add_column("agent", no_wrap=True)
    table.add_column("items", justify="right", min_width=5)
    table.add_column("lease", overflow="fold")
    table.add_column("updated", no_wrap=True)
    for r in rows:
        expires = r["lease_expires_in"]
        table.add_row(
            r["key"],
            str(r["version"]),
            _str(r["state"]),
            _str(r["agent"]),
            _str(r["items"]),
            "free" if expires is None else f"{r['owner']} ({expires:.0f}s left)",
            _when(r["updated_ts"], short=True),
        )
    console.print(table)


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Session key.")],
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="A retained version (default: latest)")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list the current agent's own context.")
    ] = False,
) -> None:
    """Decode a snapshot: its metadata and the conversation, readably."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> Snapshot:
        return await _load(store, key, version)

    snap = _run(ctx, go, read_only=True)
    if opts.json:
        _print_json(snap.model_dump(mode="python"))
        return
    console = _console()
    meta = Table(show_header=False, box=None, title=f"session {snap.key!r}", title_justify="left")
    meta.add_column(style="bold")
    meta.add_column()
    w = snap.writer
    rows: list[tuple[str, str]] = [
        ("version", f"{snap.version}  (epoch {snap.epoch}, format {snap.format_version})"),
        ("saved", f"{_when(snap.created_at)}  reason: {snap.reason}"),
        ("state", snap.state),
        ("writer", f"{w.host} pid {w.pid}" + (f" worker {w.worker_id}" if w.worker_id else "")),
        ("agent", snap.agent.agent_id if snap.agent else "—"),
        ("room", _str(snap.meta.room)),
        ("participant", _str(snap.meta.participant_identity)),
        ("turns", str(snap.meta.turn_count)),
        ("history", f"{len(snap.history)} items"),
    ]
    if snap.agent is not None:
        rows.append(("agent context", f"{len(snap.agent.chat_ctx)} items"))
        if snap.agent.task:
            rows.append(("task", f"{snap.agent.task} (not restorable, parent agent kept)"))
    if snap.userdata is not None:
        rows.append(
            ("userdata", json.dumps(to_jsonable_python(snap.userdata, bytes_mode="base64")))
        )
    for call in snap.tool_calls:
        rows.append(("tool in flight", f"{call.name}({call.arguments}) [{call.status}]"))
    if snap.meta.extra:
        rows.append(("extra", json.dumps(to_jsonable_python(snap.meta.extra, bytes_mode="base64"))))
    for name, value in rows:
        meta.add_row(name, value)
    console.print(meta)
    console.print()
    console.print(transcript_table(snap.history, title="conversation"))
    if show_all and snap.agent is not None:
        console.print()
        console.print(
            transcript_table(snap.agent.chat_ctx, title=f"context of agent {snap.agent.agent_id}")
        )


@app.command("history")
def history_cmd(
    ctx: typer.Context, key: Annotated[str, typer.Argument(help="Session key.")]
) -> None:
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
                "created_at": _iso(v.created_at),
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
        _print_json([{k: v for k, v in r.items() if k != "created_ts"} for r in rows])
        return
    table = Table(title=f"versions of {key!r}", box=box.SIMPLE_HEAD)
    for col in ("version", "epoch", "time", "reason", "state", "items", "bytes"):
        table.add_column(
            col, justify="right" if col in ("version", "epoch", "items", "bytes") else "left"
        )
    for r in rows:
        reason = _str(r["reason"]) + (f" ({r['source']})" if r["source"] else "")
        table.add_row(
            str(r["version"]),
            str(r["epoch"]),
            _when(r["created_ts"], short=True),
            reason,
            _str(r["state"]),
            _str(r["items"]),
            str(r["bytes"]),
        )
    _console().print(table)


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Session key.")],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="File to write, '-' for stdout.")
    ],
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="A retained version (default: latest)")
    ] = None,
) -> None:
    """Write the snapshot (signed/encrypted like the store's) to a file: one frame, or a
    head frame and one frame per item when the session is larger than one frame."""
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> tuple[Snapshot, bytes]:
        snap = await _load(store, key, version)
        # what import would refuse is refused here, before a file exists
        validate_restorable(snap)
        return snap, b"".join(make_codec().encode_export(snap))

    snap, frame = _run(ctx, go, read_only=True)
    if output == "-":
        out = _binary("stdout")
        out.write(frame)
        out.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(frame)
    except OSError as e:
        _fail(e, as_json=opts.json)
    if opts.json:
        _print_json({"key": key, "version": snap.version, "file": output, "bytes": len(frame)})
    else:
        _console().print(
            f"exported {key!r} version {snap.version} to {output} ({len(frame)} bytes)"
        )


def commit_from_snapshot(
    codec: Codec,
    snapshot: Snapshot,
    *,
    epoch: int,
    base_version: int,
    info: Mapping[str, str | int | float | bool | None] | None = None,
) -> Commit:
    """A commit that makes the store hold exactly ``snapshot`` (as its next version).

    Both streams are cleared, then every item is appended in order, each ``after`` its
    predecessor; agent items are written whole (no references to history twins), which
    is always valid. The head is the snapshot without its items, at ``epoch``.
    """
    key = snapshot.key
    snap = snapshot.model_copy(update={"epoch": epoch, "version": 0})
    streams: dict[str, list[tuple[str, bytes]]] = {
        HISTORY: [(i["id"], codec.encode_item(key, HISTORY, i)) for i in snap.history]
    }
    if snap.agent is not None:
        streams[AGENT] = [(i["id"], codec.encode_item(key, AGENT, i)) for i in snap.agent.chat_ctx]
    # clear what the key held, then append every item after its predecessor
    records = [Record(HISTORY, "", None), Record(AGENT, "", None)]
    records += records_from_streams(streams)
    n_agent = len(snap.agent.chat_ctx) if snap.agent is not None else 0
    return Commit(
        key=key,
        epoch=epoch,
        base_version=base_version,
        head=codec.encode_head(snap),
        records=records,
        size=len(snap.history) + n_agent,
        info=dict(
            info
            or {
                "state": snap.state,
                "reason": snap.reason,
                "agent": snap.agent.agent_id if snap.agent else None,
                "items": len(snap.history),
            }
        ),
    )


def _binary(name: Literal["stdin", "stdout"]) -> BinaryIO:
    # looked up at call time: a test runner may have swapped the streams
    stream = sys.stdin if name == "stdin" else sys.stdout
    return cast(BinaryIO, stream.buffer)


def _read_snapshot(path: str) -> Snapshot:
    """An export file, decoded and checked to be restorable: every typed error comes
    before the store is touched."""
    if path == "-":
        frames = read_frames(_binary("stdin"), max_frame=_MAX_FRAME)
    else:
        with open(path, "rb") as f:
            frames = read_frames(f, max_frame=_MAX_FRAME)
    snap = make_codec().decode_export(frames)
    validate_restorable(snap)
    return snap


def _owner() -> str:
    return f"{PROG}:{socket.gethostname()}:{os.getpid()}"


async def _write_whole(
    store: Store,
    key: str,
    build: Callable[[Store, Codec, Stored | None], Awaitable[Snapshot | None]],
    *,
    takeover: bool,
    source: str,
) -> tuple[Snapshot | None, int | None]:
    """Hold the key's lease and commit a whole base: every stream cleared, every item
    written again (`commit_from_snapshot`), so no later version reads an older record.

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
        codec = make_codec()
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
        commit = commit_from_snapshot(
            codec,
            snap,
            epoch=lease.epoch,
            base_version=stored.version if stored is not None else 0,
            info={
                "state": snap.state,
                "reason": "manual",
                "source": source,
                "agent": snap.agent.agent_id if snap.agent else None,
                "items": len(snap.history),
                "owner": owner,
            },
        )
        return snap, await store.commit(commit)
    finally:
        await store.release(lease)


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="A file from 'export', '-' for stdin.")
    ],
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Session key (default: the file's key)")
    ] = None,
    takeover: Annotated[
        bool, typer.Option("--takeover", help="Take the lease over from a live worker.")
    ] = False,
) -> None:
    """Commit an exported snapshot as the session's next version (under its lease).

    The file is validated whole first (frames, item ids, item types, restorability):
    a file that is refused writes nothing."""
    opts = _opts(ctx)
    if key is not None:
        key = _key(key)
    try:
        snap = _read_snapshot(file)
    except (ResumeError, OSError) as e:
        _fail(e, as_json=opts.json)
    target = key or snap.key

    async def build(_store: Store, _codec: Codec, _stored: Stored | None) -> Snapshot:
        return snap

    async def go(store: Store) -> int | None:
        return (await _write_whole(store, target, build, takeover=takeover, source="import"))[1]

    version = _run(ctx, go, read_only=False)
    if opts.json:
        _print_json({"key": target, "version": version, "items": len(snap.history)})
    else:
        _console().print(
            f"imported {file} as {target!r} version {version} ({len(snap.history)} items)"
        )


async def _older_heads(store: Store, key: str, below: int) -> list[tuple[int, bytes]]:
    """Heads of the retained versions before ``below``, newest first, for salvage."""
    heads = []
    for info in reversed(await store.versions(key)):
        if info.version >= below:
            continue
        try:
            heads.append((info.version, (await store.load(key, info.version)).head))
        except (SnapshotCorrupt, SnapshotNotFound):
            continue  # its log is damaged too, or it expired meanwhile
    return heads


@app.command("repair")
def repair_cmd(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Session key.")],
    takeover: Annotated[
        bool, typer.Option("--takeover", help="Take the lease over from a live worker.")
    ] = False,
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
        args = (codec, key, stored.head, stored.streams)
        try:
            codec.decode_head(key, stored.head)
            fallbacks: list[tuple[int, bytes]] = []
        except IncompatibleSnapshot:
            raise
        except (SnapshotCorrupt, SnapshotTooLarge):
            fallbacks = await _older_heads(store, key, stored.version)
        snap, damage = salvage_parts(*args, version=stored.version, fallback_heads=fallbacks)
        found.update(version=stored.version, snap=snap, damage=damage)
        return snap if damage and not dry_run else None

    async def go(store: Store) -> tuple[Snapshot | None, int | None]:
        if dry_run:  # read only: no lease, nothing written, a live worker undisturbed
            try:
                stored: Stored | None = await store.load(key)
            except SnapshotNotFound:
                stored = None
            await build(store, make_codec(), stored)
            return None, None
        return await _write_whole(store, key, build, takeover=takeover, source="repair")

    _written, version = _run(ctx, go, read_only=dry_run)
    damage: list[Damage] = found["damage"]
    snap: Snapshot = found["snap"]
    kept = {
        HISTORY: sum(1 for i in snap.history if not _is_note(i)),
        AGENT: sum(1 for i in snap.agent.chat_ctx if not _is_note(i)) if snap.agent else 0,
    }
    if opts.json:
        _print_json(
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
    console = _console()
    if not damage:
        console.print(f"session {key!r} version {found['version']} is intact: nothing to repair")
        return
    for d in damage:
        what = f"{d.stream} item {d.item_id!r}" if d.item_id else d.stream
        console.print(f"lost {what}: {d.reason}", soft_wrap=True)  # one line each, for grep
    items = sum(1 for d in damage if d.item_id)
    summary = (
        f"session {key!r} version {found['version']}: {items} item(s) lost, "
        f"{kept[HISTORY]} history and {kept[AGENT]} agent items kept; "
    )
    console.print(
        summary
        + (
            "nothing written (--dry-run)"
            if version is None
            else f"written whole as version {version}"
        ),
        soft_wrap=True,
    )


def _is_note(item: ItemData) -> bool:
    from .snapshot.salvage import SALVAGE_ID_PREFIX

    return str(item.get("id", "")).startswith(SALVAGE_ID_PREFIX)


@app.command("rm")
def rm_cmd(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Session key.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a session: every version, its log and its lease."""
    opts = _opts(ctx)
    key = _key(key)

    async def held(store: Store) -> str | None:
        info = await store.info(key)
        if info is None:
            raise SnapshotNotFound(f"no session {key!r} in {opts.store_url}")
        return info.owner if lease_is_live(info.lease_expires_at, time.time()) else None

    # looked up read-only first: a mistyped path is an error, not a new empty file
    holder = _run(ctx, held, read_only=True)
    if not yes:
        warn = f" It is held by {holder!r}, a live worker." if holder else ""
        if not typer.confirm(f"Delete session {key!r} and all its versions?{warn}"):
            raise typer.Exit(1)

    async def go(store: Store) -> bool:
        if not await store.delete(key):
            raise SnapshotNotFound(f"no session {key!r} in {opts.store_url}")
        return True

    _run(ctx, go, read_only=False)
    if opts.json:
        _print_json({"key": key, "deleted": True})
    else:
        _console().print(f"deleted {key!r}")


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
    from . import _demo

    opts = _opts(ctx)
    url = store or (opts.store_url if opts.store_explicit else _demo.DEFAULT_DEMO_STORE)
    try:
        if resume_part:
            if key is None or report is None:
                raise ValueError("--resume-part needs --key and --report")
            code = _demo.run_child(url, key, report)
        else:
            code = _demo.run_demo(url, key)
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)
    raise typer.Exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``livekit-resume`` and ``python -m livekit_resume``)."""
    app(args=list(argv) if argv is not None else None, prog_name=PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
