"""The test suite. `child_env` is the environment of every Python process a test starts."""

from __future__ import annotations

import os
from pathlib import Path

import livekit_resume

ROOT = Path(__file__).resolve().parent.parent
# The src directory of the livekit_resume these tests import (a worktree's, run with its
# own PYTHONPATH, rather than the one installed from another checkout).
SRC = Path(livekit_resume.__file__).resolve().parents[1]


def child_env(*first: Path | str, **extra: str) -> dict[str, str]:
    """This environment for a child process that imports ``tests`` and the same
    livekit_resume as the tests (``first`` ahead of them on its path), plus ``extra``."""
    path = os.pathsep.join(map(str, (*first, ROOT, SRC, os.environ.get("PYTHONPATH", ""))))
    return {**os.environ, **extra, "PYTHONPATH": path.rstrip(os.pathsep)}
