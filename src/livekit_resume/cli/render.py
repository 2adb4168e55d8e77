"""How the command line shows things: consoles, times, JSON, transcripts and tables.

Nothing here touches a store or runs a command; the app and the demo both print
through it. Keys, userdata and transcripts are data: the consoles have markup off, so
``[bold]`` in a user's words stays text, and every string from a store, a file or an
error goes through `livekit_resume.redact.printable` first, so that an escape sequence
in it (a window title, a screen clear, a bidi override) is shown, never acted on.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import click
from pydantic_core import to_jsonable_python
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from ..redact import printable
from ..snapshot.codec import AGENT, HISTORY
from ..snapshot.model import ItemData, Snapshot
from ..snapshot.salvage import Damage
from ..stores.base import SessionInfo
from .snapshots import Unreadable, listed_state

__all__ = [
    "Aligned",
    "add_transcript_rows",
    "console",
    "dash",
    "diff_report",
    "err_console",
    "error_line",
    "iso",
    "print_json",
    "render_item",
    "repair_report",
    "session_rows",
    "sessions_table",
    "snapshot_table",
    "transcript_table",
    "unreadable_lines",
    "versions_table",
    "when",
]


def console() -> Console:
    """Standard output; built per call, so that it writes to whatever ``sys.stdout``
    is now (tests swap it)."""
    return Console(highlight=False, markup=False)


def err_console() -> Console:
    """Standard error; soft_wrap: an error stays one line, however narrow the terminal,
    for grep and logs."""
    return Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def error_line(exc: BaseException, *, as_json: bool) -> None:
    """Print a failure as one line: the error's type and message (or a JSON object)."""
    kind = type(exc).__name__
    if as_json:
        click.echo(json.dumps({"error": kind, "message": str(exc)}), err=True)
    else:
        err_console().print(Text.assemble(("error", "bold red"), f" ({kind}): {printable(exc)}"))


def when(ts: float | None, *, short: bool = False) -> str:
    """Local time; ``short`` drops the date for today."""
    if ts is None:
        return "—"
    at = _dt.datetime.fromtimestamp(ts)
    if short and at.date() == _dt.date.today():
        return at.strftime("%H:%M:%S")
    return at.strftime("%Y-%m-%d %H:%M:%S")


def iso(ts: float | None) -> str | None:
    """UTC ISO 8601, for JSON output."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat()


def _jsonable(value: Any) -> Any:
    return _finite(to_jsonable_python(value, bytes_mode="base64"))


def _finite(value: Any) -> Any:
    """NaN and infinities (a float in userdata or usage) are not JSON: null, as
    JSON.stringify prints them. (pydantic's ``inf_nan_mode`` is not in every pydantic
    2 we allow: 2.5 has none.)"""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, allow_nan=False))


def dash(value: object) -> str:
    """A table cell: ``—`` for nothing; control characters escaped."""
    return "—" if value is None or value == "" else printable(value)


# ---------------------------------------------------------------------- transcript


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        return ""
    kind = part.get("type")
    if kind == "image_content":
        return f"[image {printable(str(part.get('image', ''))[:60])}]"
    if kind == "audio_content":
        return f"[audio] {part.get('transcript') or ''}".strip()
    if kind == "dropped_media" and part.get("kind") == "audio":
        return f"[audio not kept] {part.get('transcript') or ''}".strip()
    if kind == "dropped_media":
        return "[image not kept]"
    return ""


def _content_text(content: Iterable[Any]) -> str:
    return " ".join(p for p in map(_part_text, content) if p)


def render_item(item: ItemData, *, width: int | None = None) -> tuple[Text, Text] | None:
    """One chat item (plain data) as (who, what); None for an item not worth a line
    (agent config updates)."""

    def cut(s: str) -> str:
        s = printable(s, newlines=True)
        return s if width is None or len(s) <= width else s[: width - 1] + "…"

    kind = item.get("type")
    if kind == "message":
        role = printable(item.get("role"))
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
        name = printable(item.get("name") or item.get("call_id"))
        output = str(item.get("output") or "")
        what = Text(cut(f"{name}: {output}")) if output else Text(f"{name} (no output)")
        return Text("tool error" if err else "tool output", style="red" if err else "magenta"), what
    if kind == "agent_handoff":
        old, new = dash(item.get("old_agent_id")), dash(item.get("new_agent_id"))
        return Text("handoff", style="bold yellow"), Text(f"{old} → {new}")
    return None


def transcript_table(items: Sequence[ItemData], *, title: str | None = None) -> Table:
    """A readable transcript: role and text, tool calls and outputs, handoffs."""
    table = Table(
        title=printable(title) if title is not None else None,
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
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


# -------------------------------------------------------------------------- tables


# The fields of an ``ls`` row; a session that cannot be read has only its key of them.
_ROW_FIELDS = (
    "key",
    "version",
    "epoch",
    "state",
    "agent",
    "items",
    "owner",
    "lease_expires_at",
    "lease_expires_in",
    "updated_at",
    "updated_ts",
)


def session_rows(infos: Iterable[SessionInfo | Unreadable], now: float) -> list[dict[str, Any]]:
    """``ls``: the row of each session (``--json`` prints them without ``updated_ts``);
    a session that cannot be read has its ``error`` and ``message``, and the ``state``
    ``unreachable`` when its store node does not answer, nothing else. A lease counts
    down by the store's clock (`SessionInfo.read_at`), ``now`` where it does not say."""
    rows: list[dict[str, Any]] = []
    for info in infos:
        if isinstance(info, Unreadable):
            row: dict[str, Any] = dict.fromkeys(_ROW_FIELDS)
            row.update(key=info.key, error=type(info.error).__name__, message=str(info.error))
            if info.unreachable:
                row["state"] = "unreachable"
            rows.append(row)
            continue
        # The store says whether the lease is live, by its own clock (Redis: the
        # server's): this host's clock may run ahead of it.
        live = info.owner is not None
        expires = info.lease_expires_at if live else None
        rows.append(
            {
                "key": info.key,
                "version": info.version,
                "epoch": info.epoch,
                "state": listed_state(info),
                "agent": info.info.get("agent"),
                "items": info.info.get("items"),
                "owner": info.owner if live else None,
                "lease_expires_at": iso(expires),
                "lease_expires_in": (
                    max(expires - (now if info.read_at is None else info.read_at), 0.0)
                    if expires is not None
                    else None
                ),
                "updated_at": iso(info.updated_at),
                "updated_ts": info.updated_at,
            }
        )
    return rows


def unreadable_lines(out: Console, rows: Iterable[Mapping[str, Any]]) -> None:
    """``ls``: one line per session it could not read, with its error (which says what
    to do: the store's own message)."""
    for r in rows:
        if r.get("error"):
            line = f"session {r['key']!r} cannot be read ({r['error']}): {r['message']}"
            out.print(printable(line), soft_wrap=True)


class Aligned:
    """Rows of one-line cells as aligned text, a row per line, under a bold header.

    For tables that grow with the store (``ls``): rich's `Table` measures, wraps and
    pads every cell, about 0.5 ms a row here (5.5 s for 10,000 sessions); this takes
    15-26 us a row (`bench/listing.py`). Print it with ``soft_wrap=True``: a line
    wider than the terminal is wrapped by the terminal, never folded or cut, so each
    row stays one line (for ``grep`` and ``wc -l``) and no cell loses its end. Cells
    must be printable already (`dash`)."""

    def __init__(
        self,
        title: str,
        columns: Sequence[tuple[str, bool]],
        rows: Sequence[Sequence[str]],
    ) -> None:
        """``columns``: each column's header and whether it is right-aligned."""
        self.title = title
        self.columns = columns
        self.rows = rows

    def lines(self) -> tuple[str, list[str]]:
        """The header line and each row's line."""
        widths = [cell_len(name) for name, _ in self.columns]
        for row in self.rows:
            widths = [max(w, cell_len(cell)) for w, cell in zip(widths, row, strict=True)]
        right = [r for _, r in self.columns]

        def line(cells: Sequence[str]) -> str:
            out = []
            for cell, width, r in zip(cells, widths, right, strict=True):
                pad = " " * (width - cell_len(cell))
                out.append(pad + cell if r else cell + pad)
            return ("  " + "   ".join(out)).rstrip()

        return line([name for name, _ in self.columns]), [line(row) for row in self.rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        header, rows = self.lines()
        width = cell_len(header) - 2
        for row in rows:
            width = max(width, cell_len(row) - 2)
        new_line = Segment.line()
        title = self.title.center(width + 2).rstrip()
        yield Segment(title, console.get_style("table.title"))
        yield new_line
        yield Segment(header, console.get_style("table.header"))
        yield new_line
        yield Segment("  " + "─" * width)
        yield new_line
        for row in rows:
            yield Segment(row)
            yield new_line


_SESSION_COLUMNS = (
    ("key", False),
    ("version", True),
    ("state", False),
    ("agent", False),
    ("items", True),
    ("lease", False),
    ("updated", False),
)


def sessions_table(rows: Sequence[Mapping[str, Any]], *, title: str) -> Aligned:
    """``ls``: one line per session (the rows ``ls --json`` prints, with
    ``updated_ts``). Print it with ``soft_wrap=True`` (`Aligned`)."""
    cells: list[list[str]] = []
    for r in rows:
        expires = r["lease_expires_in"]
        if r.get("error"):
            lease = "—"
        elif expires is None:
            lease = "free"
        else:
            lease = f"{dash(r['owner'])} ({expires:.0f}s left)"
        cells.append(
            [
                printable(r["key"]),
                dash(r["version"]),
                (r["state"] or "damaged") if r.get("error") else dash(r["state"]),
                dash(r["agent"]),
                dash(r["items"]),
                lease,
                when(r["updated_ts"], short=True),
            ]
        )
    return Aligned(printable(title), _SESSION_COLUMNS, cells)


_VERSION_COLUMNS = (
    ("version", True),
    ("epoch", True),
    ("time", False),
    ("reason", False),
    ("state", False),
    ("items", True),
    ("bytes", True),
)


def versions_table(rows: Sequence[Mapping[str, Any]], *, title: str) -> Aligned:
    """``history``: one row per retained version (with ``created_ts``), each cell whole
    (an epoch is what ``--epoch`` takes). Print it with ``soft_wrap=True`` (`Aligned`)."""
    cells = [
        [
            str(r["version"]),
            dash(r["epoch"]),
            when(r["created_ts"], short=True) if r["created_ts"] else "—",
            dash(r["reason"]) + (f" ({dash(r['source'])})" if r["source"] else ""),
            "damaged" if r.get("damaged") else dash(r["state"]),
            dash(r["items"]),
            dash(r["bytes"]),
        ]
        for r in rows
    ]
    return Aligned(printable(title), _VERSION_COLUMNS, cells)


def _snapshot_rows(snap: Snapshot) -> list[tuple[str, str]]:
    w = snap.writer
    rows: list[tuple[str, str]] = [
        ("version", f"{snap.version}  (epoch {snap.epoch}, format {snap.format_version})"),
        ("saved", f"{when(snap.created_at)}  reason: {snap.reason}"),
        ("state", snap.state),
        ("writer", f"{w.host} pid {w.pid}" + (f" worker {w.worker_id}" if w.worker_id else "")),
        ("agent", snap.agent.agent_id if snap.agent else "—"),
        ("room", dash(snap.meta.room)),
        ("participant", dash(snap.meta.participant_identity)),
        ("turns", str(snap.meta.turn_count)),
        ("history", f"{len(snap.history)} items"),
    ]
    if snap.agent is not None:
        rows.append(("agent context", f"{len(snap.agent.chat_ctx)} items"))
        if snap.agent.task:
            rows.append(("task", f"{snap.agent.task} (not restorable, parent agent kept)"))
    if snap.userdata is not None:
        rows.append(("userdata", json.dumps(_jsonable(snap.userdata))))
    for call in snap.tool_calls:
        rows.append(("tool in flight", f"{call.name}({call.arguments}) [{call.status}]"))
    if snap.meta.extra:
        rows.append(("extra", json.dumps(_jsonable(snap.meta.extra))))
    return rows


def snapshot_table(snap: Snapshot) -> Table:
    """``show``: a snapshot's metadata, one field a row."""
    meta = Table(
        show_header=False, box=None, title=printable(f"session {snap.key!r}"), title_justify="left"
    )
    meta.add_column(style="bold")
    meta.add_column()
    for name, value in _snapshot_rows(snap):
        meta.add_row(name, printable(value))
    return meta


def repair_report(
    out: Console,
    key: str,
    version: int,
    damage: Sequence[Damage],
    kept: Mapping[str, int],
    *,
    written: int | None,
) -> None:
    """``repair``: one line per lost item or stream (for grep), then a summary."""
    if not damage:
        out.print(printable(f"session {key!r} version {version} is intact: nothing to repair"))
        return
    for d in damage:
        what = f"{d.stream} item {d.item_id!r}" if d.item_id else d.stream
        out.print(printable(f"lost {what}: {d.reason}"), soft_wrap=True)
    items = sum(1 for d in damage if d.item_id)
    summary = (
        f"session {key!r} version {version}: {items} item(s) lost, "
        f"{kept[HISTORY]} history and {kept[AGENT]} agent items kept; "
    )
    if written is None:
        summary += "nothing written (--dry-run)"
    else:
        summary += f"written whole as version {written}"
    out.print(printable(summary), soft_wrap=True)


def diff_report(out: Console, diff: Mapping[str, Any]) -> None:
    """``diff``: per stream, each item added (+), edited (~) and removed (-), then the
    userdata, agent, instructions and state changes; one line each."""
    out.print(printable(f"session {diff['key']!r}: version {diff['from']} → {diff['to']}"))
    marks = (("added", "+"), ("edited", "~"), ("removed", "-"))
    changed = False
    for stream, parts in diff["streams"].items():
        for part, mark in marks:
            for item in parts[part]:
                changed = True
                row = render_item(item, width=100)
                what = f"{row[0].plain}: {row[1].plain}" if row else str(item.get("type"))
                line = f"{mark} {stream} {printable(item.get('id'))} {what}"
                out.print(printable(line), soft_wrap=True)
    for field in ("userdata", "agent", "instructions", "state"):
        change = diff[field]
        if change is not None:
            changed = True
            old, new = (json.dumps(_jsonable(change[k])) for k in ("from", "to"))
            out.print(printable(f"{field}: {old} → {new}"), soft_wrap=True)
    if not changed:
        out.print("no changes")
