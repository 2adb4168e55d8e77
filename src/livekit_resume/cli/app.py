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
version again as the newest; ``release`` frees a lease, fencing its holder. ``pause``,
``resume`` and ``suspend`` reach the worker that runs a live session (cli/control.py).

The global options (``--store``, ``--namespace``, ``--json``) work before or after the
command. Exit codes (docs/cli.md): 0 ok, 1 an error (its type on the one line printed),
2 a usage error.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Annotated

import typer
import typer.core

from ..errors import (
    ResumeError,
)
from . import control, read, render, write  # noqa: F401  (their commands register on `app`)
from .core import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    _fail,
    _key,
    _opts,
    app,
)
from .snapshots import (
    PROG,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "app", "main"]


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
    if key is not None:
        key = _key(key)  # before the banner prints it
    try:
        if resume_part:
            if key is None or report is None:
                raise ValueError("--resume-part needs --key and --report")
            code = run_child(url, key, report, opts.namespace)
        else:
            code = run_demo(url, key, opts.namespace)
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)
    raise typer.Exit(code)


def _reflowed(doc: str) -> str:
    """A docstring with each paragraph on one line: typer's help keeps the source's line
    breaks, and a command's summary then broke mid-sentence in the command list."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = _reflowed(_info.callback.__doc__)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``livekit-resume`` and ``python -m livekit_resume``)."""
    app(args=list(argv) if argv is not None else None, prog_name=PROG)
