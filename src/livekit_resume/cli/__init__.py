"""``livekit-resume``, the command line: inspect, move and demo resumable sessions.

``core`` holds the typer app and its global options, ``read`` and ``write`` the commands,
``app`` puts them together with ``main``, ``render`` says how things are shown,
``snapshots`` how the CLI reads and writes them, and ``demo`` the two-process demo,
which prints through ``render`` and never imports ``app`` (the app loads the demo only
when ``demo`` runs).
"""

from .app import app, main
from .render import add_transcript_rows, render_item, transcript_table
from .snapshots import commit_from_snapshot, make_codec

__all__ = [
    "add_transcript_rows",
    "app",
    "commit_from_snapshot",
    "main",
    "make_codec",
    "render_item",
    "transcript_table",
]
