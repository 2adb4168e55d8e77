"""Every script in bench/ runs on tiny sizes and prints its table (issue 18).

Nothing here asserts a timing: the figures live in docs/performance.md, written by
``python bench/run_all.py``. The peers of bench/peers.py are skipped when not installed.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import child_env

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run_all() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN_ALL = _run_all()
# the scripts run_all.py does not run, with tiny arguments of their own
OTHERS: dict[str, list[str]] = {
    "lifecycle_cost.py": ["--rounds", "1", "--store", "memory"],
    "pause_cost.py": ["--sessions", "2", "--items", "10", "--rounds", "1"],
    "fuzz_decode.py": ["--frames", "200"],
    "control_latency.py": ["--rounds", "1", "--stores", "memory,sqlite"],
}
TINY: dict[str, list[str]] = {script: tiny for script, _, tiny in RUN_ALL.BENCHES} | OTHERS
NEEDS_REDIS = {
    "checkpoint_cost.py",
    "listing.py",
    "loop_block.py",
    "peers.py",
    "redis_commit.py",
    "restore_cost.py",
    "scale.py",
}
# the scripts that print Markdown tables
WITH_TABLES = {
    "checkpoint_cost.py",
    "listing.py",
    "loop_block.py",
    "peers.py",
    "restore_cost.py",
    "scale.py",
}


def test_every_script_is_covered() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - {"_common.py", "run_all.py"}
    assert scripts == set(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_bench_runs_and_prints_its_table(script: str) -> None:
    if script in NEEDS_REDIS and shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found on PATH")
    env = child_env(BENCH)
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *TINY[script]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    if script in WITH_TABLES:
        assert "| --- |" in out, out
        rows = ("| 10 |", "@10", "sessions in one worker", "| sqlite | 20 |")
        assert any(row in out for row in rows), out
    else:
        assert out.strip(), done.stderr[-3000:]


def test_peers_not_installed_are_skipped_with_a_note() -> None:
    missing = [m for m in ("agents", "langgraph_checkpoint_plainredis") if not _installed(m)]
    if not missing:
        pytest.skip("both peers are installed here")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found on PATH")
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--sizes", "10", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is not installed: skipped" in done.stdout


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_run_all_writes_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nprose\n\n{RUN_ALL.BEGIN}\nold\n{RUN_ALL.END}\n\nafter\n")
    out = "<!-- the machine -->\n\n### A table\n\n| a |\n| --- |\n| 1 |\n"
    text = RUN_ALL.measured([out, RUN_ALL.as_markdown("x.py", "plain text\n")])
    RUN_ALL.write(doc, text)
    written = doc.read_text()
    assert "old" not in written
    assert written.startswith("# Performance\n\nprose\n\n")
    assert written.endswith(f"{RUN_ALL.END}\n\nafter\n")
    assert "on: the machine." in written
    assert "### A table" in written and "```text\nplain text\n```" in written
