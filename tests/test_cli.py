"""The ``livekit-resume`` command line, run for real against a SQLite file and a redis-server.

Commands run in-process through typer's ``CliRunner`` (the demo still starts its own
second process); one test goes through the installed console script. Sessions are
written by a real ``AgentSession`` with `ResumableSession`, never by hand.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentServer, AgentSession, RunResult, llm
from typer.testing import CliRunner, Result

from livekit_resume import ResumableSession, open_store
from livekit_resume.cli import app
from livekit_resume.snapshot.chat import ctx_from_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import FORMAT_VERSION
from livekit_resume.stores.base import Store
from tests import _child_agent as child

ROOT = Path(__file__).resolve().parent.parent
# The demo's second process imports livekit-agents; this bounds a hang, not a timing.
DEMO_DEADLINE = 120.0


def run(url: str, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Result:
    return CliRunner().invoke(app, ["--store", url, *args], env=env, **kw)


def run_json(url: str, *args: str) -> Any:
    result = run(url, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def started(
    store: Store, key: str, *, autosave: bool = True
) -> tuple[ResumableSession, AgentSession[Any]]:
    """The child's session for ``key``, restored (or new) and started: it holds the lease."""
    _model, session = child.build_session()
    rs = ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, autosave=autosave
    )
    agent = await rs.restore(session, default=child.Scribe)
    await session.start(agent)
    return rs, session


async def _converse(url: str, key: str, lines: list[str]) -> None:
    store = open_store(url)
    try:
        # the versions the tests count are these checkpoints alone: an autosave racing
        # one on a loaded machine would add a fourth
        rs, session = await started(store, key, autosave=False)
        for line in lines:
            await session.run(user_input=line)
            await rs.checkpoint("turn")
        await rs.suspend()
    finally:
        await store.aclose()


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store: a SQLite file, or a namespace of a real redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    pytest.importorskip("livekit_resume.stores.redis", reason="RedisStore is not built yet")
    server = request.getfixturevalue("redis_server")  # skips where redis-server is missing
    monkeypatch.setenv("RESUME_NAMESPACE", f"cli{uuid.uuid4().hex[:8]}")
    return str(server.url)


@pytest.fixture
def key(url: str) -> str:
    """A suspended session with two turns, each remembering a fact through a tool."""
    name = f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, name, ["remember the blue door", "remember the code 4711"]))
    return name


def snapshot_of(url: str, key: str, version: int | None = None) -> Any:
    async def load() -> Any:
        store = open_store(url)
        try:
            stored = await store.load(key, version)
            return Codec().decode_parts(key, stored.head, stored.streams)
        finally:
            await store.aclose()

    return asyncio.run(load())


def store_state(url: str) -> Any:
    """Everything a listing shows, to tell that a failed command changed nothing."""
    sessions = run_json(url, "ls")
    for s in sessions:
        s.pop("lease_expires_in")  # a countdown, not state
    return sessions, {s["key"]: run_json(url, "history", s["key"]) for s in sessions}


# --------------------------------------------------------------------------- demo


def test_demo_restores_the_conversation_in_a_new_process(tmp_path: Path) -> None:
    demo_url = f"sqlite:///{tmp_path}/demo.db"
    result = run(demo_url, "demo", "--key", "demo-test")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.rstrip().endswith("restored conversation matches: yes")
    pids = {
        line.split("process ")[1].split()[0] for line in out.splitlines() if "· process" in line
    }
    assert len(pids) == 2  # the second half ran in another OS process
    assert "You booked Monday for Ada" in out
    assert "Welcome to the Riverside clinic" in out
    assert out.count("Welcome to the Riverside clinic") == 2  # part 1 and the whole (no re-greet)

    (session,) = run_json(demo_url, "ls")
    assert session["key"] == "demo-test" and session["state"] == "suspended"
    assert session["owner"] is None  # both processes released the lease
    snap = snapshot_of(demo_url, "demo-test")
    assert snap.userdata == {"name": "Ada", "day": "Tuesday", "changes": 1}


def test_demo_runs_through_redis(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("livekit_resume.stores.redis", reason="RedisStore is not built yet")
    server = request.getfixturevalue("redis_server")  # skips where redis-server is missing
    env = {"RESUME_NAMESPACE": f"demo{uuid.uuid4().hex[:8]}"}  # the second process inherits it
    result = run(server.url, "demo", "--key", "demo-redis", env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("restored conversation matches: yes")
    listed = run(server.url, "--json", "ls", env=env)
    assert [s["key"] for s in json.loads(listed.stdout)] == ["demo-redis"]


def test_the_demos_resuming_process_warns_on_stderr(make_redis: Any) -> None:
    """A Redis that persists nothing is warned of by the resuming process too: on stderr,
    as the first process's warnings are, never inside the demo's stdout."""
    server = make_redis()  # --save "" --appendonly no
    env = {"RESUME_NAMESPACE": f"demo{uuid.uuid4().hex[:8]}"}
    result = run(server.url, "demo", "--key", "demo-warned", env=env)
    assert result.exit_code == 0, result.output
    assert "persists nothing" not in result.stdout
    assert "persists nothing" in result.stderr
    assert result.stdout.rstrip().endswith("restored conversation matches: yes")


def test_demo_refuses_an_existing_session(tmp_path: Path) -> None:
    demo_url = f"sqlite:///{tmp_path}/demo.db"
    asyncio.run(_converse(demo_url, "taken", ["remember x"]))
    before = store_state(demo_url)
    result = run(demo_url, "demo", "--key", "taken")
    assert result.exit_code == 1
    assert "already exists" in result.stderr
    assert store_state(demo_url) == before


# ---------------------------------------------------------------- reading commands


def test_help_shows_each_commands_summary_as_one_flowing_sentence() -> None:
    # The docstrings' line breaks reached the terminal: "lease holder, last" then
    # "update." on the next line of the command list, in every terminal width.
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "240"}).output
    assert "lease holder, last update. With --limit" in out
    assert "to a file: one frame, or a head frame" in out
    out = CliRunner().invoke(app, ["ls", "--help"], env={"COLUMNS": "240"}).output
    assert '"next": CURSOR}, next null on the last page.' in out


def test_ls_lists_every_session_with_its_version_state_and_agent(url: str, key: str) -> None:
    other = "room-other"
    asyncio.run(_converse(url, other, ["remember one"]))
    sessions = {s["key"]: s for s in run_json(url, "ls")}
    assert set(sessions) == {key, other}
    s = sessions[key]
    assert s["version"] == 3 and s["state"] == "suspended" and s["agent"] == "scribe"
    assert s["items"] == len(snapshot_of(url, key).history)
    assert s["owner"] is None and s["lease_expires_at"] is None
    table = run(url, "ls")
    assert table.exit_code == 0
    assert key in table.stdout and "suspended" in table.stdout and "scribe" in table.stdout


def _hold(url: str, key: str, owner: str = "live-worker") -> Any:
    """``key``'s lease, taken by ``owner`` for 60 s (as a live worker holds it)."""

    async def go() -> Any:
        store = open_store(url)
        try:
            return await store.acquire(key, owner, ttl=60)
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_ls_shows_the_live_lease_holder(url: str, key: str) -> None:
    _hold(url, key, "worker-7")
    (s,) = run_json(url, "ls")
    assert s["owner"] == "worker-7" and 0 < s["lease_expires_in"] <= 60


def test_ls_prints_each_session_whole_on_one_line_however_narrow_the_terminal(
    url: str, key: str
) -> None:
    """``ls`` drew a rich table fitted to the terminal: at 60 columns a long key was
    cut short and a lease holder's countdown folded onto a line of its own, so neither
    ``grep KEY`` nor ``wc -l`` could be trusted. Each session is now one whole line
    (the terminal wraps what is wider)."""
    long_key = "tenant-0042/" + "x" * 40 + "/call"
    _hold(url, long_key, "worker-7")
    out = run(url, "ls", env={"COLUMNS": "60"})
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    (held,) = [ln for ln in lines if long_key in ln]
    assert "worker-7 (" in held and "s left)" in held
    (mine,) = [ln for ln in lines if key in ln]
    assert "suspended" in mine and "scribe" in mine and "free" in mine
    assert len(lines) == 3 + 2  # the title, the header and its rule, a line per session


def test_show_prints_metadata_and_a_readable_transcript(url: str, key: str) -> None:
    result = run(url, "show", key)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        f"session '{key}'",
        "suspended",
        "scribe",
        "remember the blue door",  # user
        'remember({"fact": "the blue door"})',  # tool call
        "remembered #2: the code 4711",  # tool output
        "ok: remembered #1: the blue door",  # assistant
        '"facts": ["the blue door", "the code 4711"]',  # userdata
    ):
        assert text in out, text

    first = run(url, "show", key, "--version", "1")
    assert first.exit_code == 0
    assert "the blue door" in first.stdout and "the code 4711" not in first.stdout

    data = run_json(url, "show", key)
    assert data["version"] == 3 and data["key"] == key
    assert [i["type"] for i in data["history"]] == [
        i["type"] for i in snapshot_of(url, key).history
    ]


def test_show_prints_data_literally_not_as_markup(url: str) -> None:
    asyncio.run(_converse(url, "room-[x]", ["remember [bold]the door[/bold]"]))
    result = run(url, "show", "room-[x]")
    assert result.exit_code == 0, result.output
    assert "remember [bold]the door[/bold]" in result.stdout
    assert '"facts": ["[bold]the door[/bold]"]' in result.stdout


def test_history_lists_retained_versions(url: str, key: str) -> None:
    rows = run_json(url, "history", key)
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["reason"] for r in rows] == ["turn", "turn", "suspend"]
    assert rows[-1]["state"] == "suspended"
    assert all(r["bytes"] > 0 for r in rows)
    assert len({r["epoch"] for r in rows}) == 1  # one worker wrote them all
    table = run(url, "history", key)
    assert table.exit_code == 0 and "suspend" in table.stdout


# ------------------------------------------------------------ export, import, rm


def test_export_import_rm_round_trip(url: str, key: str, tmp_path: Path) -> None:
    frame = tmp_path / "room.lkrs"
    result = run(url, "export", key, "-o", str(frame))
    assert result.exit_code == 0, result.output
    original = snapshot_of(url, key)
    exported = Codec().decode(frame.read_bytes())
    assert exported.version == 3
    assert exported.history == original.history and exported.userdata == original.userdata

    # "-o -" writes the frame to stdout, for pipes
    piped = run(url, "export", key, "-o", "-")
    assert piped.exit_code == 0
    assert Codec().decode(piped.stdout_bytes).history == original.history

    # into a new key: one version, the same conversation, restorable by the hooks
    result = run(url, "--json", "import", str(frame), "--key", "copy")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "key": "copy",
        "version": 1,
        "items": len(original.history),
    }
    copy = snapshot_of(url, "copy")
    assert copy.key == "copy"
    assert copy.history == original.history
    assert copy.agent is not None and original.agent is not None
    assert copy.agent.chat_ctx == original.agent.chat_ctx
    assert copy.userdata == original.userdata
    asyncio.run(_assert_restores(url, "copy", original.history))

    # onto the existing key: the next version, marked as an import
    result = run(url, "import", str(frame))
    assert result.exit_code == 0, result.output
    rows = run_json(url, "history", key)
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["source"] == "import"
    assert snapshot_of(url, key).history == original.history

    # rm asks first; "n" keeps the session
    kept = run(url, "rm", "copy", input="n\n")
    assert kept.exit_code == 1
    assert {s["key"] for s in run_json(url, "ls")} == {key, "copy"}
    gone = run(url, "rm", "copy", "--yes")
    assert gone.exit_code == 0, gone.output
    assert {s["key"] for s in run_json(url, "ls")} == {key}
    again = run(url, "rm", "copy", "--yes")
    assert again.exit_code == 1 and "SnapshotNotFound" in again.stderr


async def _assert_restores(url: str, key: str, history: list[dict[str, Any]]) -> None:
    store = open_store(url)
    try:
        model, session = child.build_session()
        rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
        agent = await rs.restore(session, default=child.Scribe)
        assert rs.resumed
        saved = ctx_from_data(history)
        assert [i.id for i in session.history.items] == [i.id for i in saved.items]
        assert llm.ChatContext(list(session.history.items)).is_equivalent(saved)
        assert session.userdata.facts == ["the blue door", "the code 4711"]
        await session.start(agent)
        result: RunResult[None] = await session.run(user_input="what do you have?")
        reply = result.events[-1].item
        assert isinstance(reply, llm.ChatMessage)
        # the model recites the tool outputs it was sent: the imported context reached it
        assert "the blue door" in (reply.text_content or "")
        assert "the code 4711" in (reply.text_content or "")
        assert len(model.requests) == 1
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()


def test_import_needs_takeover_while_a_worker_holds_the_session(
    url: str, key: str, tmp_path: Path
) -> None:
    frame = tmp_path / "room.lkrs"
    assert run(url, "export", key, "-o", str(frame)).exit_code == 0

    async def hold() -> Any:
        store = open_store(url)
        try:
            return await store.acquire(key, "live-worker", ttl=60)
        finally:
            await store.aclose()

    lease = asyncio.run(hold())
    before = store_state(url)
    busy = run(url, "import", str(frame))
    assert busy.exit_code == 1
    assert "SessionBusy" in busy.stderr and "--takeover" in busy.stderr
    assert store_state(url) == before

    taken = run(url, "import", str(frame), "--takeover")
    assert taken.exit_code == 0, taken.output
    assert run_json(url, "history", key)[-1]["epoch"] > lease.epoch


@pytest.mark.parametrize(
    ("content", "error"),
    [
        pytest.param(b"", "SnapshotCorrupt", id="empty"),
        pytest.param(b"not a snapshot at all, just text\n", "SnapshotCorrupt", id="garbage"),
        pytest.param("truncated", "SnapshotCorrupt", id="truncated"),
        pytest.param("flipped", "SnapshotCorrupt", id="flipped-byte"),
        pytest.param("newer", "IncompatibleSnapshot", id="newer-format"),
    ],
)
def test_import_of_a_bad_file_fails_with_a_typed_error_and_changes_nothing(
    url: str, key: str, tmp_path: Path, content: bytes | str, error: str
) -> None:
    good = tmp_path / "good.lkrs"
    assert run(url, "export", key, "-o", str(good)).exit_code == 0
    frame = good.read_bytes()
    if content == "truncated":
        data = frame[: len(frame) // 2]
    elif content == "flipped":
        flipped = bytearray(frame)
        flipped[len(flipped) // 2] ^= 0xFF
        data = bytes(flipped)
    elif content == "newer":
        data = Codec().pack(snapshot_of(url, key).model_dump(), version=FORMAT_VERSION + 1)
    else:
        assert isinstance(content, bytes)
        data = content
    bad = tmp_path / "bad.lkrs"
    bad.write_bytes(data)

    before = store_state(url)
    result = run(url, "import", str(bad), "--key", "target")
    assert result.exit_code == 1
    assert f"error ({error})" in result.stderr
    if error == "IncompatibleSnapshot":
        assert f"format version {FORMAT_VERSION + 1}" in result.stderr
        assert "upgrade livekit-resume" in result.stderr
    assert store_state(url) == before

    as_json = run(url, "--json", "import", str(bad))
    assert as_json.exit_code == 1
    assert json.loads(as_json.stderr)["error"] == error


def _keyspec(kid: str) -> str:
    return f"{kid}:{base64.b64encode(kid.encode() * 32).decode()}"


def test_import_of_a_frame_signed_with_an_unknown_key_is_refused(
    url: str, key: str, tmp_path: Path
) -> None:
    signed = tmp_path / "signed.lkrs"
    # the store's snapshots are unsigned; exporting with a signing key signs the frame
    signing = {"RESUME_SIGNING_KEYS": _keyspec("a")}
    result = run(url, "export", key, "-o", str(signed), env=signing)
    assert result.exit_code == 1  # the store's unsigned frames are refused once keys are set
    assert "SignatureMismatch" in result.stderr

    frame = Codec(signing_keys=_keyspec("a")).encode(snapshot_of(url, key))
    signed.write_bytes(frame)
    before = store_state(url)
    wrong = run(url, "import", str(signed), env={"RESUME_SIGNING_KEYS": _keyspec("b")})
    assert wrong.exit_code == 1
    assert "error (SignatureMismatch)" in wrong.stderr and "'a'" in wrong.stderr
    unsigned = run(url, "import", str(signed), env={"RESUME_SIGNING_KEYS": ""})
    assert unsigned.exit_code == 1 and "SignatureMismatch" in unsigned.stderr
    assert store_state(url) == before


@pytest.mark.parametrize("command", ["show", "history", "export", "rm"])
def test_unknown_session_key_is_a_typed_error(url: str, key: str, command: str) -> None:
    extra = {"export": ["-o", "-"], "rm": ["--yes"]}.get(command, [])
    before = store_state(url)
    result = run(url, command, "no-such-room", *extra)
    assert result.exit_code == 1
    assert "error (SnapshotNotFound)" in result.stderr and "no-such-room" in result.stderr
    assert store_state(url) == before


def test_unknown_store_scheme_is_a_clear_usage_error() -> None:
    result = run("ftp://nowhere", "ls")
    assert result.exit_code == 2
    assert "unknown store URL scheme 'ftp'" in result.stderr


# -------------------------------------------------------------- entry points


@pytest.mark.skipif(shutil.which("livekit-resume") is None, reason="console script not installed")
def test_console_script_and_module_entry_points(url: str, key: str) -> None:
    for argv in (["livekit-resume"], [sys.executable, "-m", "livekit_resume"]):
        done = subprocess.run(
            [*argv, "--store", url, "--json", "ls"],
            capture_output=True,
            text=True,
            timeout=DEMO_DEADLINE,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert [s["key"] for s in json.loads(done.stdout)] == [key]


def test_example_worker_imports_and_registers_its_entrypoint() -> None:
    spec = importlib.util.spec_from_file_location("example_worker", ROOT / "examples" / "worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the server; running it needs a LiveKit server
    assert isinstance(module.server, AgentServer)
    assert module.server._entrypoint_fnc is module.entrypoint


# ------------------------------------------------------- import validates first


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    inner = out
    for _ in range(depth - 1):
        nxt: list[Any] = []
        inner.append(nxt)
        inner = nxt
    return out


def _foreign_frame(data: Any) -> bytes:
    """A frame as another tool would write it: right format, none of our checks."""
    import struct
    import zlib

    import msgpack

    body: bytes = msgpack.packb(data, use_bin_type=True)
    header = struct.pack(">4sBBHI", b"LKRS", FORMAT_VERSION, 0, 0, len(body))
    return header + body + struct.pack(">I", zlib.crc32(header + body))


def _poison(data: dict[str, Any], kind: str) -> None:
    history = data["history"]
    if kind == "duplicate-id":
        history.append(dict(history[1]))
    elif kind == "missing-id":
        del history[1]["id"]
    elif kind == "non-string-id":
        history[1]["id"] = 12
    elif kind == "unknown-type":
        history[1]["type"] = "telepathy"
    elif kind == "deep-userdata":
        data["userdata"] = {"facts": _nested(600)}
    elif kind == "nan-created-at":
        history[1]["created_at"] = float("nan")
    elif kind == "nan-snapshot-time":
        data["created_at"] = float("inf")
    elif kind == "bad-agent-item":
        data["agent"]["chat_ctx"][0]["role"] = 42


@pytest.mark.parametrize(
    "kind",
    [
        "duplicate-id",
        "missing-id",
        "non-string-id",
        "unknown-type",
        "deep-userdata",
        "nan-created-at",
        "nan-snapshot-time",
        "bad-agent-item",
    ],
)
def test_a_refused_import_writes_nothing_and_a_good_import_still_rolls_back(
    url: str, key: str, tmp_path: Path, kind: str
) -> None:
    good = tmp_path / "good.lkrs"
    assert run(url, "export", key, "-o", str(good)).exit_code == 0
    data = snapshot_of(url, key).model_dump()
    _poison(data, kind)
    bad = tmp_path / "bad.lkrs"
    bad.write_bytes(_foreign_frame(data))

    before = store_state(url)
    result = run(url, "import", str(bad), "--takeover")
    assert result.exit_code == 1
    assert result.stderr.startswith("error (") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert store_state(url) == before
    as_json = run(url, "--json", "import", str(bad))
    assert as_json.exit_code == 1 and "error" in json.loads(as_json.stderr)

    # the documented rollback still works, and the session still loads
    rollback = run(url, "import", str(good), "--takeover")
    assert rollback.exit_code == 0, rollback.output
    assert run(url, "show", key).exit_code == 0
    assert snapshot_of(url, key).history == Codec().decode(good.read_bytes()).history


def test_a_session_larger_than_one_frame_exports_and_imports(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An ~80 MB session against the 64 MiB limit, scaled down: ~600 KB against 256 KiB.
    # Every item is within the limit, the whole snapshot is not.
    import livekit_resume.cli.snapshots as cli_snapshots

    monkeypatch.setattr(cli_snapshots, "_MAX_FRAME", 256 * 1024)
    name = f"room-{uuid.uuid4().hex[:6]}"
    facts = [f"the fact {n}: " + "abcdefghij" * 4_000 for n in range(4)]
    asyncio.run(_converse(url, name, [f"remember {f}" for f in facts]))
    original = snapshot_of(url, name)
    import msgpack

    assert len(msgpack.packb(original.model_dump(), use_bin_type=True)) > 256 * 1024

    out = tmp_path / "big.lkrs"
    exported = run(url, "export", name, "-o", str(out))
    assert exported.exit_code == 0, exported.output
    result = run(url, "--json", "import", str(out), "--key", "big-copy")
    assert result.exit_code == 0, result.output
    copy = snapshot_of(url, "big-copy")
    assert copy.history == original.history and copy.userdata == original.userdata
    assert copy.agent is not None and original.agent is not None
    assert copy.agent.chat_ctx == original.agent.chat_ctx
    # through a pipe too
    piped = run(url, "export", name, "-o", "-")
    assert piped.exit_code == 0
    again = run(url, "import", "-", "--key", "big-piped", input=piped.stdout_bytes)
    assert again.exit_code == 0, again.output
    assert snapshot_of(url, "big-piped").history == original.history


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["show", "room"],
        ["history", "room"],
        ["export", "room", "-o", "-"],
        ["rm", "room", "--yes"],
        ["repair", "room", "--dry-run"],
    ],
    ids=lambda c: c[0],
)
def test_reading_a_mistyped_path_fails_and_creates_no_file(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "sesions.db"  # the user meant sessions.db
    result = run(f"sqlite:///{missing}", *command)
    assert result.exit_code == 1
    assert result.stderr.startswith("error (") and result.stderr.count("\n") == 1
    assert str(missing) in result.stderr
    assert not missing.exists() and list(tmp_path.iterdir()) == []
