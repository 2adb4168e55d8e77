"""Doc/code mismatches found by walking the user-facing docs literally (README, the
guide, the command line, control, the example worker): each test quotes the doc line it
checks. All six failed on the commit the walk read (e449639); the docs (five) or the
code (the demo's --namespace) were put right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from livekit_resume.cli import app

ROOT = Path(__file__).resolve().parent.parent
DEMO_DEADLINE = 60


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store holding the demo's session under the key ROOM (7 versions)."""
    path = tmp_path_factory.mktemp("hunt") / "s.db"
    url = f"sqlite:///{path}"
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "livekit_resume", "demo", "--store", url, "--key", "ROOM"],
        capture_output=True,
        text=True,
        timeout=DEMO_DEADLINE,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return url


def test_ls_scan_on_sqlite_is_the_usage_error_cli_md_says(seeded: str) -> None:
    """docs/cli.md, `--scan`: "On another store it is a usage error (exit 2)." (It said
    exit 1; the code's usage error is the class the exit codes table gives it.)"""
    said = "On\nanother store it is a usage error (exit 2)."
    assert said in (ROOT / "docs" / "cli.md").read_text()
    result = cli("--store", seeded, "ls", "--scan")
    assert result.exit_code == 2, (result.exit_code, result.output)


def test_demo_honours_the_global_namespace_option(tmp_path: Path) -> None:
    """README.md "Operate it": "Options work before or after the command"; docs/cli.md,
    Global options: "`--namespace NS` | `$RESUME_NAMESPACE` | the store's namespace".

    What happens: `livekit-resume --namespace tenantA demo --store URL` writes the demo's
    session in the default namespace (demo_cmd never passes opts.namespace on), while
    RESUME_NAMESPACE=tenantA is honoured: `--namespace tenantA ls` then finds nothing.
    """
    url = f"sqlite:///{tmp_path / 'ns.db'}"
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("RESUME_NAMESPACE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "livekit_resume",
            "--namespace",
            "tenantA",
            "demo",
            "--store",
            url,
            "--key",
            "NSKEY",
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_DEADLINE,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = cli("--store", url, "--namespace", "tenantA", "--json", "ls")
    assert listed.exit_code == 0, listed.output
    assert [s["key"] for s in json.loads(listed.stdout)] == ["NSKEY"], (
        "the demo wrote outside --namespace; default namespace holds: "
        + cli("--store", url, "ls").stdout
    )


def test_guide_snapshot_state_and_reason_lists_are_complete() -> None:
    """docs/guide.md, "What a snapshot holds": "state | `ResumableSession` | `active`,
    `paused` or `suspended`, and the reason (`turn`, `tool`, `handoff`, `pause`,
    `suspend`, `close`, `manual`)".

    What is true: snapshot.model.SnapshotState also has `ended` and Reason also has `end`
    (what `rs.end()` writes, README's own table mentions it).
    """
    import typing

    from livekit_resume.snapshot.model import Reason, SnapshotState

    guide = (ROOT / "docs" / "guide.md").read_text()
    row = next(line for line in guide.splitlines() if line.startswith("| state |"))
    for word in (*typing.get_args(SnapshotState), *typing.get_args(Reason)):
        assert f"`{word}`" in row, f"{word!r} missing from guide.md's state row: {row}"


def test_examples_readme_table_describes_worker_py() -> None:
    """examples/README.md, "What it does with livekit-resume": every piece of code its
    table shows is in worker.py or the demo's agents it imports. (It showed an earlier
    worker: `ResumableSession(store, ctx.room.name, ...)`, `rs.restore(..., takeover=
    True)`, `ctx.add_shutdown_callback(...)`, none of them in worker.py any more.)"""
    readme = (ROOT / "examples" / "README.md").read_text()
    code = "".join(
        (ROOT / p).read_text()
        for p in ("examples/worker.py", "src/livekit_resume/cli/demo/agents.py")
    )
    flat = "".join(code.split()).replace(",)", ")")
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`" in line]
    assert rows, "no table"
    for row in rows:
        shown = row.rstrip(" |").rsplit(" | ", 1)[-1]
        for span in shown.split("`")[1::2]:
            for piece in span.split("..."):
                piece = "".join(piece.split())
                assert len(piece) < 3 or piece in flat, f"{piece!r} ({row}) is not in worker.py"


LIVE = r"""
import asyncio, sys
import livekit_resume as lr
from livekit.agents import Agent
from livekit_resume.testing.llm import ScriptedLLM, make_text_session
class Receptionist(Agent):
    def __init__(self): super().__init__(instructions="You greet callers.")
async def main():
    store = lr.open_store(sys.argv[1])
    r = lr.AgentRegistry(); r.register(Receptionist)
    session = make_text_session(ScriptedLLM(default="Hello!"))
    rs = lr.ResumableSession(store, "call-42", registry=r)
    await session.start(await rs.restore(session, default=Receptionist))
    await session.run(user_input="hi")
    await rs.checkpoint()
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await rs.aclose(); await session.aclose(); await store.aclose()
asyncio.run(main())
"""


def test_control_cli_json_answer_is_what_control_md_shows(tmp_path: Path) -> None:
    """docs/control.md, the CLI output example of `resume call-42 --json`: the answer as
    it prints, indented over five lines (the doc showed it on one)."""
    example = json.dumps({"key": "call-42", "command": "resume", "version": 7}, indent=2)
    assert example in (ROOT / "docs" / "control.md").read_text()
    url = f"sqlite:///{tmp_path / 'ctl.db'}"
    script = tmp_path / "live.py"
    script.write_text(LIVE)
    owner = subprocess.Popen(
        [sys.executable, str(script), url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "READY"
        proc = subprocess.run(
            [sys.executable, "-m", "livekit_resume", "--store", url, "resume", "call-42", "--json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert set(data) == {"key", "command", "version"}
        assert proc.stdout.strip() == json.dumps(data, indent=2), proc.stdout
    finally:
        if owner.stdin:
            owner.stdin.write("\n")
            owner.stdin.flush()
        try:
            owner.wait(timeout=15)
        except subprocess.TimeoutExpired:
            owner.kill()
