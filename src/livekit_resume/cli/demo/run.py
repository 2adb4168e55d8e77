"""``livekit-resume demo``: a conversation in this process, suspended, then restored in
a NEW process (``python -m livekit_resume demo --resume-part``), which talks on; then
the whole conversation, what each process wrote, and the checks of what was restored.

Nothing here talks to a network: the model is a rule-based `ScriptedLLM` (`rules`), the
agents are the example worker's (`agents`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ... import redact
from ..render import add_transcript_rows, transcript_table
from .check import Check, checks
from .parts import Part, part_one, quiet_logs, read_report

__all__ = ["CHILD_TIMEOUT", "DEFAULT_DEMO_STORE", "run_demo"]

DEFAULT_DEMO_STORE = "sqlite:///resume-demo.db"
"""A file in the working directory, so that ``livekit-resume --store sqlite:///resume-demo.db
show KEY`` can look at the demo's session afterwards."""

# The second process imports livekit-agents (2-3 s) and runs two turns.
CHILD_TIMEOUT = 120.0


def run_demo(url: str, key: str | None = None, namespace: str | None = None) -> int:
    """The whole demo. Returns the exit code: 0 when the restore matched, else 1."""
    with quiet_logs():
        return _run_demo(url, key, namespace)


def _run_demo(url: str, key: str | None, namespace: str | None) -> int:
    console = Console(highlight=False)
    key = key or f"demo-{uuid.uuid4().hex[:8]}"
    console.print(Rule("[bold]livekit-resume demo[/bold]"))
    console.print(f"store  {escape(redact.url(url))}\nkey    {escape(key)}\n")
    one = asyncio.run(part_one(url, key, console, namespace))

    console.print()
    console.print(
        f"[dim]starting a new process: {Path(sys.executable).name} -m livekit_resume demo "
        f"--resume-part --store {escape(redact.url(url))} --key {escape(key)}[/dim]"
    )
    with tempfile.TemporaryDirectory(prefix="livekit-resume-demo-") as tmp:
        report = os.path.join(tmp, "part2.msgpack")
        code = asyncio.run(_spawn(url, key, report, console, namespace))
        if code != 0 or not os.path.exists(report):
            console.print(f"[red]the resuming process failed (exit code {code})[/red]")
            console.print("restored conversation matches: no")
            return 1
        two = read_report(report)

    _print_summary(console, one, two)
    results = checks(one, two)
    _print_checks(console, results)
    ok = all(c.ok for c in results)
    console.print()
    where = escape(redact.url(url))
    console.print(f"[dim]inspect it: livekit-resume --store {where} show {escape(key)}[/dim]")
    console.print(f"restored conversation matches: {'yes' if ok else 'no'}")
    return 0 if ok else 1


def _print_summary(console: Console, one: Part, two: Part) -> None:
    """The whole conversation across both processes, and what each one wrote."""
    console.print()
    console.print(Rule("[bold]the whole conversation[/bold]"))
    whole = transcript_table(one.history)
    whole.add_row(
        "", Text(f"── process {two.pid} restored v{two.restored_version} ──", style="dim")
    )
    add_transcript_rows(whole, two.history[len(one.history) :])
    console.print(Padding(whole, (0, 0, 0, 2)))
    console.print()
    summary = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("part", "pid", "versions written", "ended at"):
        summary.add_column(col)
    summary.add_row("1", str(one.pid), _span(one.versions), f"v{one.final_version}, suspended")
    summary.add_row(
        "2",
        str(two.pid),
        f"restored v{two.restored_version}, wrote {_span(two.versions)}",
        f"v{two.final_version}, suspended",
    )
    console.print(Padding(summary, (0, 0, 0, 2)))
    console.print()


def _print_checks(console: Console, results: Sequence[Check]) -> None:
    marks = Table(show_header=False, box=None, pad_edge=False)
    marks.add_column(no_wrap=True)
    marks.add_column(overflow="fold")
    for c in results:
        mark = Text("✓", style="green") if c.ok else Text("✗", style="bold red")
        marks.add_row(mark, Text(c.what))
    console.print(Padding(marks, (0, 0, 0, 2)))


async def _spawn(url: str, key: str, report: str, console: Console, namespace: str | None) -> int:
    env = dict(os.environ)
    if console.is_terminal:
        env["FORCE_COLOR"] = "1"
        env["COLUMNS"] = str(console.width)
    else:
        env.pop("FORCE_COLOR", None)
    argv = [sys.executable, "-m", "livekit_resume", "demo", "--resume-part"]
    argv += ["--store", url, "--key", key, "--report", report]
    if namespace is not None:
        argv += ["--namespace", namespace]
    # its warnings (a store's) stay on stderr, as this process's do: stdout is the demo's
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )

    async def relay(lines: asyncio.StreamReader | None, out: IO[str]) -> None:
        assert lines is not None
        async for line in lines:
            out.write(line.decode(errors="replace"))
            out.flush()

    async def finish() -> int:
        await asyncio.gather(relay(proc.stdout, console.file), relay(proc.stderr, sys.stderr))
        return await proc.wait()

    try:
        return await asyncio.wait_for(finish(), CHILD_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(
            f"the resuming process did not finish within {CHILD_TIMEOUT:.0f}s"
        ) from None


def _span(versions: Sequence[int]) -> str:
    if not versions:
        return "none"
    return f"v{versions[0]}" if len(versions) == 1 else f"v{versions[0]}-v{versions[-1]}"
