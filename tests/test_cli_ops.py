"""The operator's commands of ``livekit-resume`` (issue 16): global options anywhere,
``ls`` pages, ``diff``, ``revert``, ``release``, exit codes, ``--json`` and completion,
run for real against a SQLite file and a redis-server (the ``url`` and ``key`` fixtures
of test_cli: a suspended two-turn session written by a real ``AgentSession``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from livekit_resume import ResumableSession, open_store
from livekit_resume.bridge import from_stored
from livekit_resume.cli import app
from livekit_resume.cli.snapshots import write_whole
from livekit_resume.errors import LeaseLost
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store, Stored
from livekit_resume.stores.redis.keys import KeyNames
from tests import _child_agent as child
from tests.redis_servers import RedisServer
from tests.test_cli import ROOT, _converse, _hold, key, run, run_json, snapshot_of, started, url

__all__ = ["key", "url"]  # the fixtures, shared with test_cli


def cli(*args: str, **kw: Any) -> Result:
    """The app as a shell runs it, with the arguments exactly as given."""
    return CliRunner().invoke(app, list(args), **kw)


# ----------------------------------------------------------------- global options


def test_global_options_work_before_or_after_the_command(url: str, key: str) -> None:
    expected = [key]
    for argv in (
        ["--store", url, "--json", "ls"],
        ["ls", "--store", url, "--json"],
        ["ls", "--json", f"--store={url}"],
        ["--json", "ls", "--store", url],
    ):
        result = cli(*argv)
        assert result.exit_code == 0, (argv, result.output)
        assert [s["key"] for s in json.loads(result.stdout)] == expected, argv
    shown = cli("show", key, "--store", url, "--json", "--version", "1")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["version"] == 1
    # an error after the command is JSON too
    missing = cli("history", "nope", "--json", "--store", url)
    assert missing.exit_code == 1
    assert json.loads(missing.stderr)["error"] == "SnapshotNotFound"


def test_namespace_before_or_after_the_command(url: str, key: str) -> None:
    other = cli("ls", "--json", "--store", url, "--namespace", "elsewhere")
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout) == []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RESUME_NAMESPACE", "elsewhere")
        asyncio.run(_converse(url, "room-ns", ["remember the red door"]))
    for argv in (
        ["--namespace", "elsewhere", "--store", url, "--json", "ls"],
        ["ls", "--namespace=elsewhere", "--store", url, "--json"],
    ):
        result = cli(*argv)
        assert result.exit_code == 0, result.output
        assert [s["key"] for s in json.loads(result.stdout)] == ["room-ns"]
    assert [s["key"] for s in run_json(url, "ls")] == [key]  # the default one is untouched
    shown = cli("show", "room-ns", "--namespace", "elsewhere", "--store", url)
    assert shown.exit_code == 0, shown.output
    assert "remember the red door" in shown.stdout


def test_the_module_entry_point_takes_options_after_the_command(url: str, key: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "livekit_resume", "ls", "--store", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [s["key"] for s in json.loads(done.stdout)] == [key]


# -------------------------------------------------------------------------- ls


def test_ls_pages_with_a_cursor_prefix_and_state(url: str, key: str) -> None:
    for name in ("room-b", "room-c", "lobby-a"):
        asyncio.run(_converse(url, name, ["remember one"]))
    every = sorted([key, "room-b", "room-c", "lobby-a"])
    assert [s["key"] for s in run_json(url, "ls")] == every

    seen: list[str] = []
    after: list[str] = []
    for _ in range(len(every)):
        page = run_json(url, "ls", "--limit", "3", *after)
        assert len(page["sessions"]) <= 3
        seen += [s["key"] for s in page["sessions"]]
        if page["next"] is None:
            break
        after = ["--after", page["next"]]
    assert seen == every

    rooms = run_json(url, "ls", "--prefix", "room-", "--limit", "10")
    assert [s["key"] for s in rooms["sessions"]] == [k for k in every if k.startswith("room-")]
    assert rooms["next"] is None

    # one session back in its first, active version
    assert run(url, "revert", "room-b", "1").exit_code == 0
    active = run_json(url, "ls", "--state", "active")
    assert [s["key"] for s in active] == ["room-b"]
    suspended = run_json(url, "ls", "--state", "suspended", "--limit", "1")
    assert [s["key"] for s in suspended["sessions"]] == ["lobby-a"]
    rest = run_json(url, "ls", "--state", "suspended", "--after", suspended["next"])
    assert [s["key"] for s in rest["sessions"]] == sorted([key, "room-c"])
    assert rest["next"] is None

    table = run(url, "ls", "--limit", "1")
    assert table.exit_code == 0
    assert "lobby-a" in table.stdout and "next page: --after=lobby-a" in table.stdout


# ------------------------------------------------------------------------ diff


def test_diff_of_two_known_versions(url: str, key: str) -> None:
    one, three = snapshot_of(url, key, 1), snapshot_of(url, key, 3)
    diff = run_json(url, "diff", key, "1", "3")
    assert (diff["key"], diff["from"], diff["to"]) == (key, 1, 3)
    history = diff["streams"]["history"]
    old_ids = {i["id"] for i in one.history}
    assert [i["id"] for i in history["added"]] == [
        i["id"] for i in three.history if i["id"] not in old_ids
    ]
    added = history["added"]
    assert [i["type"] for i in added] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert history["removed"] == [] and history["edited"] == []
    assert diff["userdata"] == {
        "from": {"facts": ["the blue door"]},
        "to": {"facts": ["the blue door", "the code 4711"]},
    }
    assert diff["state"] == {"from": "active", "to": "suspended"}
    assert diff["agent"] is None and diff["instructions"] is None

    text = run(url, "diff", key, "1", "3")
    assert text.exit_code == 0, text.output
    out = text.stdout
    assert f"+ history {added[0]['id']} user: remember the code 4711" in out
    assert "userdata:" in out and "the code 4711" in out
    assert 'state: "active" → "suspended"' in out

    same = run(url, "diff", key, "2", "2")
    assert same.exit_code == 0 and "no changes" in same.stdout


def test_diff_shows_edited_and_removed_items_agent_and_instructions(url: str, key: str) -> None:
    before = snapshot_of(url, key)
    messages = [i["id"] for i in before.history if i["type"] == "message"]
    first, second = messages[0], messages[1]

    async def rewrite(store: Store, codec: Codec, stored: Stored | None) -> Snapshot:
        assert stored is not None
        snap = from_stored(codec, stored)
        history = [
            {**i, "content": ["an edited line"]} if i["id"] == first else dict(i)
            for i in snap.history
            if i["id"] != second
        ]
        assert snap.agent is not None
        agent = snap.agent.model_copy(update={"agent_id": "editor", "instructions": "Be brief."})
        return snap.model_copy(update={"history": history, "agent": agent})

    asyncio.run(_write(url, key, rewrite))
    diff = run_json(url, "diff", key, "3", "4")
    history = diff["streams"]["history"]
    assert [i["id"] for i in history["edited"]] == [first]
    assert history["edited"][0]["content"] == ["an edited line"]
    assert [i["id"] for i in history["removed"]] == [second]
    assert history["added"] == []
    assert diff["agent"] == {"from": "scribe", "to": "editor"}
    assert diff["instructions"]["to"] == "Be brief."
    assert diff["userdata"] is None

    out = run(url, "diff", key, "3", "4").stdout
    assert f"~ history {first} " in out and "an edited line" in out
    assert f"- history {second} " in out
    assert 'agent: "scribe" → "editor"' in out


async def _write(url: str, key: str, build: Any) -> None:
    store = open_store(url)
    try:
        await write_whole(store, key, build, takeover=False, source="test")
    finally:
        await store.aclose()


def test_diff_of_a_version_not_retained_is_a_typed_error(url: str, key: str) -> None:
    result = run(url, "diff", key, "1", "9")
    assert result.exit_code == 1 and "SnapshotNotFound" in result.stderr


# ---------------------------------------------------------------------- revert


def test_revert_then_restore_loads_the_older_conversation(url: str, key: str) -> None:
    older = snapshot_of(url, key, 1)
    result = run(url, "--json", "revert", key, "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "key": key,
        "reverted_to": 1,
        "version": 4,
        "written": True,
    }
    rows = run_json(url, "history", key)
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["source"] == "revert"
    assert snapshot_of(url, key).history == older.history
    asyncio.run(_assert_restores_version_one(url, key, older))


async def _assert_restores_version_one(url: str, key: str, older: Any) -> None:
    store = open_store(url)
    try:
        _model, session = child.build_session()
        rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
        await rs.restore(session, default=child.Scribe)
        assert rs.resumed
        assert [i.id for i in session.history.items] == [i["id"] for i in older.history]
        assert session.userdata.facts == ["the blue door"]  # not "the code 4711"
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()


def test_revert_is_refused_while_a_worker_holds_the_session(url: str, key: str) -> None:
    lease = _hold(url, key)
    busy = run(url, "revert", key, "1")
    assert busy.exit_code == 1
    assert "SessionBusy" in busy.stderr and "--takeover" in busy.stderr
    assert [r["version"] for r in run_json(url, "history", key)] == [1, 2, 3]
    taken = run(url, "revert", key, "1", "--takeover")
    assert taken.exit_code == 0, taken.output
    assert run_json(url, "history", key)[-1]["epoch"] > lease.epoch


def test_a_revert_refused_with_takeover_leaves_the_live_worker_saving(url: str, key: str) -> None:
    """``revert KEY 99 --takeover``, a version not retained (a typo): refused, with
    nothing changed. It took the lease over before looking the version up, so the live
    worker's next checkpoint failed with `LeaseLost`."""

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await session.run(user_input="remember the green door")
            await rs.checkpoint("turn")
            before = await asyncio.to_thread(run_json, url, "history", key)
            done = await asyncio.to_thread(run, url, "revert", key, "99", "--takeover")
            assert done.exit_code == 1 and "SnapshotNotFound" in done.stderr, done.output
            assert await asyncio.to_thread(run_json, url, "history", key) == before
            await session.run(user_input="remember the green gate")
            assert await rs.checkpoint("turn") == before[-1]["version"] + 1
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# --------------------------------------------------------------------- release


def test_release_fences_a_live_holder(url: str, key: str) -> None:
    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key)
            await session.run(user_input="remember the green door")
            await rs.checkpoint("turn")  # it holds the lease and writes
            (listed,) = await asyncio.to_thread(run_json, url, "ls")
            assert listed["owner"] is not None
            released = await asyncio.to_thread(run_json, url, "release", key)
            assert released["released"] is True
            assert released["previous_owner"] == listed["owner"]
            assert released["epoch"] > listed["epoch"]
            await session.run(user_input="remember the green gate")
            with pytest.raises(LeaseLost):
                await rs.checkpoint("turn")
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())
    (s,) = run_json(url, "ls")
    assert s["owner"] is None  # free: any worker may take it


def test_release_of_an_unknown_key_is_a_typed_error(url: str, key: str) -> None:
    result = run(url, "release", "no-such-room")
    assert result.exit_code == 1 and "SnapshotNotFound" in result.stderr


# ------------------------------------------------------ export/import, rm, codes


def test_export_then_import_to_another_store_shows_the_same_transcript(
    url: str, key: str, tmp_path: Path
) -> None:
    other = f"sqlite:///{tmp_path}/other.db"
    frame = tmp_path / "room.lkrs"
    assert run(url, "export", key, "-o", str(frame)).exit_code == 0
    assert run(other, "import", str(frame)).exit_code == 0
    here, there = run(url, "show", key), run(other, "show", key)
    assert here.exit_code == 0 and there.exit_code == 0
    transcript = here.stdout.split("conversation", 1)[1]
    assert transcript == there.stdout.split("conversation", 1)[1]
    assert "remember the code 4711" in transcript


def test_rm_leaves_no_key_behind(url: str, key: str, request: pytest.FixtureRequest) -> None:
    def scan() -> list[str]:
        if not url.startswith("redis"):
            return []
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.cli("--scan", "--pattern", f"{os.environ['RESUME_NAMESPACE']}*").split()

    assert url.startswith("sqlite") or scan() != []
    assert run(url, "rm", key, "--yes").exit_code == 0
    assert run_json(url, "ls") == []
    if url.startswith("redis"):
        # checked with SCAN: not a head, a log, a lease or the index; only the tombstone
        # that fences a worker that held it, for a day, named by a hash of the key
        # (and the one an earlier release's workers read, in a slot of its own)
        names = KeyNames(os.environ["RESUME_NAMESPACE"])
        tombstones = sorted(names.tombstones(key))
        assert sorted(scan()) == tombstones and not any(key in t for t in tombstones)
        server: RedisServer = request.getfixturevalue("redis_server")
        for tombstone in tombstones:
            assert 86_000 < int(server.cli("TTL", tombstone)) <= 86_400


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        pytest.param(["ls"], 0, id="ok"),
        pytest.param(["show", "no-such-room"], 1, id="not-found"),
        pytest.param(["diff", "KEY", "1"], 2, id="missing-argument"),
        pytest.param(["ls", "--no-such-option"], 2, id="unknown-option"),
        pytest.param(["nope"], 2, id="unknown-command"),
        pytest.param(["revert", "KEY", "one"], 2, id="not-a-number"),
        pytest.param(["ls", "--limit", "0"], 2, id="out-of-range"),
        pytest.param(["show", ""], 2, id="bad-key"),
    ],
)
def test_exit_codes_are_stable(url: str, key: str, argv: list[str], code: int) -> None:
    result = cli(*[key if a == "KEY" else a for a in argv], "--store", url)
    assert result.exit_code == code, result.output


def test_shell_completion_comes_from_typer() -> None:
    helped = cli("--help")
    assert helped.exit_code == 0
    assert "--install-completion" in helped.stdout and "--show-completion" in helped.stdout
    for command in ("diff", "revert", "release"):
        assert command in helped.stdout
    script = cli("--show-completion", "bash")
    assert script.exit_code == 0, script.output
    assert "complete" in script.stdout and "livekit-resume" in script.stdout.replace("_", "-")


def test_sqlite_pages_its_keys_from_the_index_skipping_expired_ones(tmp_path: Path) -> None:
    from livekit_resume.stores.base import KeyPages
    from livekit_resume.stores.sqlite import SQLiteStore

    now = [1000.0]

    async def go() -> None:
        store = SQLiteStore(tmp_path / "pages.db", ttl=100, clock=lambda: now[0])
        assert isinstance(store, KeyPages)
        try:
            for k in ("a1", "a2", "a3", "b1", "old"):
                await store.acquire(k, "w", ttl=10)
                now[0] += 1 if k != "b1" else 200  # 200 s pass before "old" is written
            assert await store.keys_page("", None, None) == (["old"], None)  # ttl 100 s
            now[0] = 1000.0 + 3.5  # back then, every key was live
            assert await store.keys_page("a", None, 2) == (["a1", "a2"], "a2")
            assert await store.keys_page("a", "a2", 2) == (["a3"], None)
            assert await store.keys_page("", "a3", None) == (["b1", "old"], None)
        finally:
            await store.aclose()

    asyncio.run(go())


def test_the_reference_documents_every_command_and_exit_code() -> None:
    from livekit_resume.cli.app import EXIT_ERROR, EXIT_OK, EXIT_USAGE

    doc = (ROOT / "docs" / "cli.md").read_text()
    names = [c.name for c in app.registered_commands]
    assert names and all(f"| `{name}" in doc for name in names), names
    for code in (EXIT_OK, EXIT_ERROR, EXIT_USAGE):
        assert f"| `{code}` |" in doc


def test_a_command_that_opens_its_store_twice_warns_once(
    make_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``rm`` reads the store read-only, then opens it to delete: a Redis that persists
    nothing was warned of by each store, twice per command (and the demo's resuming
    process printed it on stdout). Once per command; the next command warns again."""
    server = make_redis()  # --save "" --appendonly no
    caplog.set_level(logging.WARNING, logger="livekit_resume")

    def warned() -> int:
        return sum("persists nothing" in r.getMessage() for r in caplog.records)

    assert run(server.url, "rm", "nothere", "--yes").exit_code == 1
    assert warned() == 1
    assert run(server.url, "rm", "nothere", "--yes").exit_code == 1
    assert warned() == 2
