"""``livekit-resume``, the command line: inspect, move and demo resumable sessions.

``app`` holds the typer app and its commands, ``render`` how things are shown,
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
