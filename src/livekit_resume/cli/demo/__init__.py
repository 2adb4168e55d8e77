"""``livekit-resume demo``: a conversation suspended in one process and restored in
another. It prints through `livekit_resume.cli.render` and never imports the app."""

from .parts import run_child
from .run import DEFAULT_DEMO_STORE, run_demo

__all__ = ["DEFAULT_DEMO_STORE", "run_child", "run_demo"]
