"""Old home of the demo, now `livekit_resume.cli.demo`: kept so that
``from livekit_resume._demo import WatchedStore`` (the tests' fault scenarios) still works."""

from .cli.demo.watched import WatchedStore

__all__ = ["WatchedStore"]
