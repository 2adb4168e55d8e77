"""MkDocs hook: the CLI reference, generated from the typer app when the site is built.

`mkdocs-typer2` cannot read typer >= 0.22 (which carries its own copy of click), so the
reference comes from typer's own Markdown generator (`typer ... utils docs`), in
process: the page says ``<!-- cli-reference -->`` and the hook puts the docs there.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.main
from typer.cli import get_docs_for_click

MARKER = "<!-- cli-reference -->"
PROG = "livekit-resume"


def cli_reference() -> str:
    """Every command, argument and option of the installed ``livekit-resume``, as Markdown
    whose headings sit one level below the page's title."""
    from livekit_resume.cli import app

    command = typer.main.get_command(app)
    return get_docs_for_click(obj=command, ctx=typer.Context(command), name=PROG, indent=1)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
