"""Operator command-line inputs that are wrong (store URLs and settings, files, keys,
limits, a full stdout): each is a usage error (exit 2), a typed one-line error (exit 1)
or a real result, never a traceback, an untyped exception name or a silent success,
and a refused command changes nothing. Run in-process against a SQLite file and a real
redis-server (test_cli's fixtures), and through a real shell where it matters."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from tests.test_cli import key, run, run_json, store_state, url

__all__ = ["key", "url"]  # the fixtures, shared with test_cli

WIDE = {"COLUMNS": "240"}


def _clean(result: Result) -> None:
    """No traceback, no exception escaped the command."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )


# ------------------------------------------------------------------ ls --limit


def test_ls_limit_past_what_a_store_can_count_is_a_usage_error_or_a_listing(
    url: str, key: str
) -> None:
    before = store_state(url)
    result = run(url, "ls", "--limit", str(2**70), env=WIDE)
    _clean(result)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 0:
        assert key in result.stdout
    assert store_state(url) == before


def test_ls_limit_of_the_largest_sqlite_integer_lists_every_session(url: str, key: str) -> None:
    result = run(url, "--json", "ls", "--limit", str(2**63 - 1))
    _clean(result)
    assert result.exit_code == 0, result.output
    page: Any = json.loads(result.stdout)
    assert [s["key"] for s in page["sessions"]] == [key] and page["next"] is None


# ------------------------------------------------------------------ --store URLs


def cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> Result:
    from typer.testing import CliRunner

    from livekit_resume.cli import app

    return CliRunner().invoke(app, list(args), env=env, **kw)


@pytest.mark.parametrize(
    "store",
    [
        pytest.param("sqlite://", id="sqlite-no-path"),
        pytest.param("sqlite:///", id="sqlite-root-only"),
        pytest.param("sqlite://relative.db", id="sqlite-host"),
        pytest.param("sqlite:////tmp/x.db#frag", id="sqlite-fragment"),
        pytest.param("redis://", id="redis-no-host"),
        pytest.param("redis://127.0.0.1:99999", id="redis-port-out-of-range"),
        pytest.param("redis://127.0.0.1:notaport", id="redis-port-not-a-number"),
        pytest.param("redis://127.0.0.1:1/abc", id="redis-db-not-a-number"),
    ],
)
def test_a_malformed_store_url_is_a_usage_error_not_a_valueerror(store: str) -> None:
    result = cli("--store", store, "ls", env=WIDE)
    _clean(result)
    assert "(ValueError)" not in result.stderr, result.stderr
    assert result.exit_code == 2, result.output
    assert "Invalid value:" in result.stderr  # the message names the URL


def test_a_malformed_store_url_with_json_is_a_bad_parameter_on_stderr() -> None:
    result = cli("--json", "--store", "redis://127.0.0.1:notaport", "ls")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert json.loads(result.stderr)["error"] == "BadParameter"


def test_a_sqlite_url_without_slashes_keeps_every_letter_of_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:relative.db`` read ``elative.db``: its first letter was dropped."""
    monkeypatch.chdir(tmp_path)
    result = cli("--store", "sqlite:relative.db", "ls", env=WIDE)
    _clean(result)
    assert result.exit_code in (1, 2), result.output
    assert "elative.db" not in result.stderr.replace("relative.db", ""), result.stderr


def test_an_empty_store_url_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("--store", "", "ls", env=WIDE)
    _clean(result)
    assert result.exit_code == 2, result.output


def test_a_directory_as_the_sqlite_store_is_a_typed_error(tmp_path: Path) -> None:
    for argv in (["ls"], ["show", "room-1"], ["import", str(tmp_path / "nothing.exp")]):
        result = cli("--store", f"sqlite:///{tmp_path}", *argv, env=WIDE)
        _clean(result)
        assert result.exit_code == 1, result.output
        assert "error (StoreUnavailable)" in result.stderr or "error (FileNotFoundError)" in (
            result.stderr
        ), result.stderr


def test_a_file_that_is_not_a_database_is_snapshot_corrupt_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n")
    result = cli("--store", f"sqlite:///{path}", "ls", env=WIDE)
    assert result.exit_code == 1, result.output
    assert "error (SnapshotCorrupt)" in result.stderr
    assert path.read_text() == "not a database\n"


# ------------------------------------------------------------------ demo


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("a\x1b[31mb", id="escape-sequence"),
        pytest.param("a" * 600, id="over-512-bytes"),
    ],
)
def test_demo_key_that_cannot_name_a_session_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    result = cli("--store", f"sqlite:///{tmp_path}/demo.db", "demo", "--key", bad, env=WIDE)
    _clean(result)
    assert result.exit_code == 2, result.output
    assert "\x1b[31m" not in result.stdout  # never sent to the terminal as is


def test_demo_with_an_empty_key_is_a_usage_error_not_a_demo_under_a_new_key(
    tmp_path: Path,
) -> None:
    result = cli("--store", f"sqlite:///{tmp_path}/demo.db", "demo", "--key", "", env=WIDE)
    _clean(result)
    assert result.exit_code == 2, result.output


def test_an_import_through_a_sqlite_url_without_slashes_never_creates_a_misnamed_file(
    url: str, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:relative.db`` named ``elative.db``: an import created that file."""
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("--store", "sqlite:relative.db", "import", str(exported), env=WIDE)
    _clean(result)
    assert not (work / "elative.db").exists(), result.output
    assert sorted(p.name for p in work.iterdir() if p.suffix == ".db") in ([], ["relative.db"])


# ------------------------------------------------------------------ ls --scan


def test_ls_scan_lists_on_redis_and_is_a_typed_refusal_elsewhere(url: str, key: str) -> None:
    """Refused on SQLite, exit 1 (docs/cli.md): as ``error (ValueError)``, Python's name."""
    result = run(url, "ls", "--scan", env=WIDE)
    _clean(result)
    if url.startswith("redis"):
        assert result.exit_code == 0 and key in result.stdout, result.output
        return
    assert result.exit_code in (1, 2), result.output
    assert "(ValueError)" not in result.stderr, result.stderr


# ------------------------------------------------------------------ files


def test_export_to_a_directory_fails_naming_it_and_writes_nothing(
    url: str, key: str, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    result = run(url, "--json", "export", key, "-o", str(target))
    _clean(result)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert str(target) in error["message"]
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param("empty.exp", b"", "no frame", id="empty"),
        pytest.param(
            "text.exp", b"hello, not an export\n", "not a livekit-resume frame", id="text"
        ),
        pytest.param("zeros.exp", bytes(1 << 20), "not a livekit-resume frame", id="zeros"),
    ],
)
def test_importing_what_is_not_an_export_is_snapshot_corrupt_and_writes_nothing(
    url: str, key: str, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    before = store_state(url)
    path = tmp_path / name
    path.write_bytes(content)
    result = run(url, "import", str(path), "--key", key, env=WIDE)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert "error (SnapshotCorrupt)" in result.stderr and message in result.stderr
    assert store_state(url) == before


def test_importing_a_truncated_export_writes_nothing(url: str, key: str, tmp_path: Path) -> None:
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    whole = exported.read_bytes()
    before = store_state(url)
    for cut in (1, 10, len(whole) // 2, len(whole) - 1):
        exported.write_bytes(whole[:cut])
        result = run(url, "import", str(exported), env=WIDE)
        _clean(result)
        assert result.exit_code == 1, (cut, result.output)
        assert "error (SnapshotCorrupt)" in result.stderr
    exported.write_bytes(whole + b"trailing")
    assert run(url, "import", str(exported)).exit_code == 1
    assert store_state(url) == before


def test_a_huge_sparse_file_is_refused_at_its_first_frame(
    url: str, key: str, tmp_path: Path
) -> None:
    path = tmp_path / "huge.exp"
    with open(path, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB of holes: nothing read past the header
    before = store_state(url)
    result = run(url, "import", str(path), env=WIDE)
    assert result.exit_code == 1, result.output
    assert "error (SnapshotCorrupt)" in result.stderr
    assert store_state(url) == before


def test_import_from_stdin_with_nothing_on_it_is_snapshot_corrupt(url: str, key: str) -> None:
    before = store_state(url)
    result = run(url, "--json", "import", "-", "--key", "from-stdin", input=b"")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stderr)["error"] == "SnapshotCorrupt"
    assert store_state(url) == before


def test_export_to_stdout_then_import_from_stdin_round_trips(url: str, key: str) -> None:
    exported = run(url, "export", key, "-o", "-")
    assert exported.exit_code == 0, exported.output
    imported = run(url, "--json", "import", "-", "--key", "copy", input=exported.stdout_bytes)
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["key"] == "copy"
    assert run_json(url, "show", "copy")["history"] == run_json(url, "show", key)["history"]


# ------------------------------------------------------------------ --json everywhere


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["ls"], id="ls"),
        pytest.param(["ls", "--limit", "1"], id="ls-page"),
        pytest.param(["show", "KEY"], id="show"),
        pytest.param(["show", "KEY", "--all", "--version", "1"], id="show-all"),
        pytest.param(["history", "KEY"], id="history"),
        pytest.param(["diff", "KEY", "1", "3"], id="diff"),
        pytest.param(["diff", "KEY", "3", "3"], id="diff-same"),
        pytest.param(["export", "KEY", "-o", "OUT"], id="export"),
        pytest.param(["repair", "KEY", "--dry-run"], id="repair-dry-run"),
        pytest.param(["repair", "KEY"], id="repair"),
        pytest.param(["revert", "KEY", "1"], id="revert"),
        pytest.param(["release", "KEY"], id="release"),
        pytest.param(["rm", "KEY", "--yes"], id="rm"),
    ],
)
def test_every_command_with_json_prints_one_json_document_and_nothing_on_stderr(
    url: str, key: str, tmp_path: Path, argv: list[str]
) -> None:
    out = str(tmp_path / "out.exp")
    args = [key if a == "KEY" else out if a == "OUT" else a for a in argv]
    result = run(url, *args, "--json")
    _clean(result)
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert result.stderr == ""


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "no-such"], id="show"),
        pytest.param(["history", "no-such"], id="history"),
        pytest.param(["diff", "no-such", "1", "2"], id="diff"),
        pytest.param(["export", "no-such", "-o", "-"], id="export"),
        pytest.param(["revert", "no-such", "1"], id="revert"),
        pytest.param(["release", "no-such"], id="release"),
        pytest.param(["repair", "no-such"], id="repair"),
        pytest.param(["rm", "no-such", "--yes"], id="rm"),
        pytest.param(["pause", "no-such", "--timeout", "0.2"], id="pause"),
        pytest.param(["resume", "no-such", "--timeout", "0.2"], id="resume"),
        pytest.param(["suspend", "no-such", "--timeout", "0.2"], id="suspend"),
    ],
)
def test_a_command_on_a_key_no_session_has_is_a_typed_json_error_and_leaves_no_trace(
    url: str, key: str, argv: list[str]
) -> None:
    before = store_state(url)
    result = run(url, "--json", *argv)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert error["error"] in {"SnapshotNotFound", "CommandRefused"}, error
    assert store_state(url) == before


# ------------------------------------------------------------------ remote commands


@pytest.mark.parametrize("verb", ["pause", "resume", "suspend"])
def test_a_remote_command_to_a_session_no_worker_holds_is_command_refused(
    url: str, key: str, verb: str
) -> None:
    before = store_state(url)
    result = run(url, verb, key, "--timeout", "0.5", env=WIDE)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert "error (CommandRefused)" in result.stderr and "no live owner" in result.stderr
    assert store_state(url) == before


@pytest.mark.parametrize("epoch", ["0", "-1", str(2**70), "abc"])
def test_a_remote_command_at_an_epoch_a_session_cannot_have_is_refused(
    url: str, key: str, epoch: str
) -> None:
    result = run(url, "pause", key, "--epoch", epoch, "--timeout", "0.5", env=WIDE)
    _clean(result)
    assert result.exit_code in (1, 2), result.output
    if result.exit_code == 1:
        assert "error (CommandRefused)" in result.stderr


# ------------------------------------------------------------------ numbers


# ------------------------------------------------------------------ Redis URLs


@pytest.mark.parametrize("db", ["16", "99999", str(2**70), "-1"])
def test_a_redis_database_the_server_does_not_have_is_a_typed_error(
    request: pytest.FixtureRequest, db: str
) -> None:
    server = request.getfixturevalue("redis_server")
    store = f"redis://127.0.0.1:{server.port}/{db}"
    for argv in (["ls"], ["show", "room-1"], ["rm", "room-1", "--yes"]):
        result = cli("--store", store, "--namespace", "hunt", *argv, env=WIDE)
        _clean(result)
        assert result.exit_code in (1, 2), (argv, result.output)
        assert "(ValueError)" not in result.stderr and "(ResponseError)" not in result.stderr, (
            argv,
            result.stderr,
        )


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("RESUME_STORE", "postgres://db/x", id="store-scheme"),
        pytest.param("RESUME_STORE", "sqlite://", id="store-no-path"),
        pytest.param("RESUME_NAMESPACE", "a{b}", id="namespace-braces"),
        pytest.param("RESUME_NAMESPACE", "a:ctl", id="namespace-ctl"),
        pytest.param("RESUME_TTL", "abc", id="ttl"),
    ],
)
def test_a_bad_setting_in_the_environment_is_a_typed_error_not_a_valueerror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    argv = ["ls"] if name == "RESUME_STORE" else ["--store", f"sqlite:///{tmp_path}/s.db", "ls"]
    result = cli("--json", *argv)
    _clean(result)
    assert result.exit_code in (1, 2), result.output
    error = json.loads(result.stderr)
    assert error["error"] not in {"ValueError", "KeyError", "TypeError"}, error
    assert name in error["message"] or value in error["message"], error


# ------------------------------------------------------------------ a real shell

LIVEKIT_RESUME = str(Path(sys.executable).parent / "livekit-resume")


def _shell(url: str, *args: str, stdout: Any) -> Any:
    import subprocess

    return subprocess.run(
        [LIVEKIT_RESUME, "--store", url, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["ls"], id="ls"),
        pytest.param(["--json", "ls"], id="ls-json"),
        pytest.param(["--json", "show", "KEY"], id="show-json"),
        pytest.param(["history", "KEY"], id="history"),
        pytest.param(["export", "KEY", "-o", "-"], id="export-stdout"),
    ],
)
def test_a_full_stdout_is_a_one_line_error_not_a_traceback(
    url: str, key: str, argv: list[str]
) -> None:
    with open("/dev/full", "w") as full:
        done = _shell(url, *[key if a == "KEY" else a for a in argv], stdout=full)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]  # after a store's own warnings
    assert last.startswith("error (") or last.startswith("{"), done.stderr[-500:]


def test_export_to_a_full_disk_is_an_error_naming_the_file(url: str, key: str) -> None:
    """``export KEY -o /dev/full``: one error naming the file it could not write."""
    result = run(url, "--json", "export", key, "-o", "/dev/full")
    assert result.exit_code == 1, result.output
    error = json.loads(result.stderr)
    assert "/dev/full" in error["message"], error


# ------------------------------------------------------------------ versions


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "KEY", "--version", "MAX"], id="show"),
        pytest.param(["export", "KEY", "-o", "-", "--version", "MAX"], id="export"),
        pytest.param(["diff", "KEY", "1", "MAX"], id="diff"),
        pytest.param(["revert", "KEY", "MAX"], id="revert"),
        pytest.param(["show", "KEY", "--version", "4"], id="show-next"),
        pytest.param(["revert", "KEY", "4"], id="revert-next"),
    ],
)
def test_the_largest_version_a_store_can_hold_is_snapshot_not_found(
    url: str, key: str, argv: list[str]
) -> None:
    before = store_state(url)
    args = [key if a == "KEY" else str(2**63 - 1) if a == "MAX" else a for a in argv]
    result = run(url, "--json", *args)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stderr)["error"] == "SnapshotNotFound", result.stderr
    assert store_state(url) == before


def test_import_under_another_key_is_shown_under_that_key(
    url: str, key: str, tmp_path: Path
) -> None:
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    assert run(url, "import", str(exported), "--key", "moved here").exit_code == 0
    shown = run_json(url, "show", "moved here")
    assert shown["key"] == "moved here", shown["key"]
    assert run_json(url, "history", key)[-1]["version"] == 3  # the source is untouched


def test_diff_of_a_version_with_itself_reports_no_change(url: str, key: str) -> None:
    diff = run_json(url, "diff", key, "2", "2")
    assert all(not v for s in diff["streams"].values() for v in s.values())
    assert diff["userdata"] is None and diff["state"] is None


# ------------------------------------------------------------------ ls pages


ODD = ["*", "?", "[", "]", "(", "+", "-", "\\", "%", "_", "r*", "room-?", "[r]"]


def _sessions_named(url: str, key: str, names: list[str]) -> None:
    from tests.test_cli_adversarial import _copy

    for name in names:
        _copy(url, key, name)


@pytest.mark.parametrize("prefix", ODD)
def test_ls_prefix_is_literal_never_a_pattern(url: str, key: str, prefix: str) -> None:
    names = ["*x", "?x", "[x", "(x", "+x", "-x", "\\x", "%x", "_x", "r*x", "room-?x", "[r]x"]
    _sessions_named(url, key, names)
    everything = sorted([key, *names])
    listed = [s["key"] for s in run_json(url, "ls", "--prefix", prefix)]
    assert listed == [k for k in everything if k.startswith(prefix)]


@pytest.mark.parametrize("cursor", ODD)
def test_ls_after_is_a_literal_cursor_never_a_range_marker(url: str, key: str, cursor: str) -> None:
    names = ["*x", "?x", "[x", "(x", "+x", "-x", "\\x", "%x", "_x", "r*x", "room-?x", "[r]x"]
    _sessions_named(url, key, names)
    everything = sorted([key, *names])
    page = run_json(url, "ls", "--after", cursor, "--limit", "100")
    assert [s["key"] for s in page["sessions"]] == [k for k in everything if k > cursor]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_store_path_that_exists_but_is_no_file_is_not_called_missing(
    tmp_path: Path, kind: str
) -> None:
    """``--store sqlite:///DIR ls`` said "the file does not exist" of a directory (and of
    a FIFO) that is there: the operator is sent looking for a typo."""
    import os

    path = tmp_path / "store.db"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    result = cli("--store", f"sqlite:///{path}", "ls", env=WIDE)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert "does not exist" not in result.stderr, result.stderr
    assert str(path) in result.stderr


def test_import_reads_an_export_from_a_fifo(url: str, key: str, tmp_path: Path) -> None:
    import os
    import threading

    exported = run(url, "export", key, "-o", "-").stdout_bytes
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(exported)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = run(url, "--json", "import", str(fifo), "--key", "from-fifo")
    writer.join(10)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["key"] == "from-fifo"


def test_a_write_to_a_memory_store_is_refused_not_reported_done(
    url: str, key: str, tmp_path: Path
) -> None:
    """``--store memory:// import FILE`` printed "imported ... version 1", exit 0: the
    store lives only as long as the command, so nothing was written anywhere (and
    memory:// is not among the schemes docs/cli.md lists)."""
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    result = cli("--store", "memory://", "import", str(exported), env=WIDE)
    _clean(result)
    assert result.exit_code != 0, result.output


def test_a_read_from_a_memory_store_is_not_an_empty_listing() -> None:
    result = cli("--store", "memory://", "--json", "ls")
    _clean(result)
    assert result.exit_code != 0, result.output


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("k" * 512, id="512-bytes"),
        pytest.param("é" * 256, id="512-bytes-of-two-byte-letters"),
        pytest.param("🎧" * 128, id="512-bytes-of-emoji"),
        pytest.param("a 'quoted' \"key\" {with} braces", id="quotes-braces"),
        pytest.param("-", id="dash"),
        pytest.param("--yes", id="like-an-option"),
    ],
)
def test_an_odd_but_valid_key_goes_through_import_show_history_and_rm(
    url: str, key: str, tmp_path: Path, name: str
) -> None:
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    imported = run(url, "import", str(exported), "--key", name, env=WIDE)
    assert imported.exit_code == 0, imported.output
    assert run_json(url, "show", "--", name)["key"] == name
    assert [v["version"] for v in run_json(url, "history", "--", name)] == [1]
    removed = run(url, "--json", "rm", "--yes", "--", name)
    assert removed.exit_code == 0, removed.output
    assert name not in [s["key"] for s in run_json(url, "ls")]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("k" * 513, id="513-bytes"),
        pytest.param("é" * 256 + "a", id="513-bytes-two-byte"),
        pytest.param("a\nb", id="newline"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\x7fb", id="del"),
    ],
)
def test_a_key_no_store_can_hold_is_a_usage_error_for_import(
    url: str, key: str, tmp_path: Path, name: str
) -> None:
    exported = tmp_path / "room.exp"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    before = store_state(url)
    result = run(url, "--json", "import", str(exported), "--key", name)
    _clean(result)
    assert result.exit_code == 2, result.output
    assert json.loads(result.stderr)["error"] == "BadParameter"
    assert store_state(url) == before


@pytest.mark.parametrize("epoch", ["0", "-1", str(2**63), str(2**70), "1e3"])
def test_a_remote_command_at_an_epoch_a_held_session_cannot_have_is_refused_for_its_epoch(
    url: str, key: str, epoch: str
) -> None:
    from tests.test_cli import _hold

    _hold(url, key, "w-live")
    before = store_state(url)
    result = run(url, "--json", "pause", key, "--epoch", epoch, "--timeout", "0.5")
    _clean(result)
    assert result.exit_code in (1, 2), result.output
    error = json.loads(result.stderr)
    if result.exit_code == 1:
        assert error["error"] == "CommandRefused", error
        assert "did not answer" not in error["message"], error  # refused for its epoch
    assert store_state(url) == before


def test_repair_dry_run_with_takeover_leaves_a_live_holder_alone(url: str, key: str) -> None:
    from tests.test_cli import _hold

    lease = _hold(url, key, "w-live")
    result = run(url, "--json", "repair", key, "--dry-run", "--takeover")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] is None
    (row,) = [s for s in run_json(url, "ls") if s["key"] == key]
    assert row["owner"] == "w-live" and row["epoch"] == lease.epoch


def test_export_onto_the_sqlite_store_itself_destroys_no_session(
    url: str, key: str, tmp_path: Path
) -> None:
    """``export KEY -o sessions.db`` (the store's own file, a slip of the tab key)
    truncated the store to one export frame: every session of it was gone and the next
    command read "file is not a database". A command that only reads changes no file."""
    if not url.startswith("sqlite"):
        pytest.skip("the store is a file on SQLite only")
    path = url.removeprefix("sqlite:///")
    before = store_state(url)
    result = run(url, "export", key, "-o", path, env=WIDE)
    _clean(result)
    assert store_state(url) == before, result.output


def _export_keyed(url: str, key: str, path: Path, inner: str) -> None:
    """``key``'s latest snapshot exported to ``path`` as though it were session ``inner``
    (a hand-edited or foreign export: nothing in the frame checks the name)."""
    import asyncio

    from livekit_resume import open_store
    from livekit_resume.bridge import from_stored
    from livekit_resume.cli.snapshots import make_codec

    async def go() -> bytes:
        store = open_store(url)
        try:
            snap = from_stored(make_codec(store), await store.load(key))
        finally:
            await store.aclose()
        return b"".join(make_codec().encode_export(snap.model_copy(update={"key": inner})))

    path.write_bytes(asyncio.run(go()))


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param("a\x1b[31mb", id="control"),
        pytest.param("", id="empty"),
        pytest.param("k" * 600, id="over-512-bytes"),
    ],
)
def test_an_export_naming_a_key_no_store_can_hold_is_a_typed_data_error(
    url: str, key: str, tmp_path: Path, inner: str
) -> None:
    """``import FILE`` of such an export printed ``error (ValueError): session key ...``:
    the file is at fault, a data problem with a type of the reference's."""
    path = tmp_path / "odd.exp"
    _export_keyed(url, key, path, inner)
    before = store_state(url)
    result = run(url, "--json", "import", str(path))
    _clean(result)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stderr)["error"] != "ValueError", result.stderr
    assert store_state(url) == before


def test_an_export_naming_an_odd_key_imports_under_the_key_given(
    url: str, key: str, tmp_path: Path
) -> None:
    path = tmp_path / "odd.exp"
    _export_keyed(url, key, path, "a\x1b[31mb")
    result = run(url, "--json", "import", str(path), "--key", "renamed")
    assert result.exit_code == 0, result.output
    assert run_json(url, "show", "renamed")["key"] == "renamed"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "KEY", "--version", "1_0"], id="show-underscore"),
        pytest.param(["show", "KEY", "--version", "\u0661"], id="show-arabic-digit"),
        pytest.param(["diff", "KEY", "1", "0_2"], id="diff-underscore"),
        pytest.param(["export", "KEY", "-o", "-", "--version", "+1"], id="export-plus"),
        pytest.param(["revert", "KEY", "0_1"], id="revert-underscore"),
        pytest.param(["ls", "--limit", "1_0"], id="ls-limit-underscore"),
        pytest.param(["ls", "--limit", "0"], id="ls-limit-zero"),
        pytest.param(["pause", "KEY", "--epoch", "1_0"], id="pause-epoch-underscore"),
        pytest.param(["diff", "KEY", "1", str(2**63)], id="diff-past-the-last-version"),
    ],
)
def test_a_number_not_written_in_plain_digits_or_out_of_range_is_a_usage_error(
    url: str, key: str, argv: list[str]
) -> None:
    """``int()`` read ``1_0`` as 10, ``+1`` as 1 and an Arabic-Indic one as 1: a typo named another
    version (``diff KEY 1 0_2`` diffed version 2). Each is a usage error now, and
    nothing changes."""
    before = run_json(url, "history", key)
    result = run(url, *[key if a == "KEY" else a for a in argv], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output
    assert run_json(url, "history", key) == before


@pytest.mark.parametrize("answer", ["n\n", ""], ids=["answered-no", "no-answer"])
def test_rm_not_confirmed_says_so_as_json_and_deletes_nothing(
    url: str, key: str, answer: str
) -> None:
    """``--json rm KEY`` answered no, or with stdin closed: exit 1 with a JSON error on
    stderr (it printed nothing, or ``Aborted.``), and the session is still there."""
    result = run(url, "--json", "rm", key, input=answer)
    assert result.exit_code == 1, result.output
    last = result.stderr.splitlines()[-1]  # after the question (no newline: no terminal)
    error = json.loads(last[last.index("{") :])
    assert "not deleted" in error["message"], error
    assert [s["key"] for s in run_json(url, "ls")] == [key]


def test_a_revert_to_the_latest_version_writes_nothing(
    url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``revert KEY N`` with N the latest wrote N again as N+1, and with ``keep``
    versions retained the oldest was dropped: a rollback point lost for nothing."""
    monkeypatch.setenv("RESUME_KEEP", "3")
    before = run_json(url, "history", key)
    latest = max(v["version"] for v in before)
    reverted = run_json(url, "revert", key, str(latest))
    assert reverted == {"key": key, "reverted_to": latest, "version": latest, "written": False}
    assert run_json(url, "history", key) == before
