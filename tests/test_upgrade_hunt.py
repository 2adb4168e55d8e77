"""A rolling deploy between releases of livekit-resume (docs/schema.md "Upgrading workers",
docs/multi-worker.md "Redis layout").

Earlier releases run for real: their ``src`` is taken out of this repository's history
(``git archive``, which writes nothing to the repository) and run in child processes
(``tests/_upgrade_child.py``: a real ``AgentSession`` with the scripted LLM, or the
release's own command line), against a real redis-server and a SQLite file; this release
runs in the test process. The releases:

- ``LAYOUT`` (23cb512): format 4 with the batched Redis log, the version record's head and
  info in its hash (before ``v:<n>:b``);
- ``FORMAT3`` (d242217): format 3, one Redis list element per record.

Promised: this release reads every format and every earlier Redis layout as it is; an
earlier release meeting what this one wrote reports an error (``IncompatibleSnapshot`` or
``SnapshotCorrupt``), "the session is intact", and must not be taken as license to delete.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from livekit_resume import ResumableSession, open_store
from livekit_resume.cli import app
from livekit_resume.stores.base import Store
from tests import ROOT
from tests import _upgrade_child as child

CHILD = Path(child.__file__)
LAYOUT = "23cb512"  # before v:<n>:b (2026-12-05)
FORMAT3 = "d242217"  # before format 4 and the batched Redis log (2026-12-01)
CHILD_DEADLINE = 120.0  # bounds a hang; a run takes about 1.5 s

TURNS = ["remember the blue door", "remember code 4711", "hello there"]
LONG = [f"remember fact {n}" for n in range(8)]  # with 5 whole commits: compacted twice


# ------------------------------------------------------------------------ plumbing


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each earlier release's ``src``, taken out of the history read-only."""
    out = {}
    for commit in (LAYOUT, FORMAT3):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src"],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"release {commit} not in this clone's history: {done.stderr!r}")
        where = tmp_path_factory.mktemp(f"release-{commit}")
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            tar.extractall(where, filter="data")
        out[commit] = where / "src"
    return out


@dataclass
class Target:
    kind: str
    url: str
    namespace: str | None
    server: Any = None

    def open(self, **opts: Any) -> Store:
        if self.namespace:
            opts["namespace"] = self.namespace
        return open_store(self.url, **opts)

    def run(self, src: Path, ops: list[dict[str, Any]], **spec: Any) -> list[dict[str, Any]]:
        """``ops`` in one child process of the release whose ``src`` is given."""
        spec = {"url": self.url, "namespace": self.namespace, "ops": ops, **spec}
        env = {**os.environ, "PYTHONPATH": str(src)}
        env.pop("RESUME_NAMESPACE", None)
        done = subprocess.run(
            [sys.executable, str(CHILD), json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=CHILD_DEADLINE,
            check=False,
        )
        results = [
            json.loads(line[len("RESULT ") :])
            for line in done.stdout.splitlines()
            if line.startswith("RESULT ")
        ]
        assert len(results) == len(ops), done.stdout + done.stderr[-3000:]
        return results

    async def cli(self, *args: str, input: str | None = None) -> Any:
        """This release's command line (in a thread: it runs an event loop of its own)."""
        return await asyncio.to_thread(self._cli, *args, input=input)

    def _cli(self, *args: str, input: str | None = None) -> Any:
        env = {"RESUME_NAMESPACE": self.namespace} if self.namespace else {}
        return CliRunner().invoke(app, ["--store", self.url, *args], input=input, env=env)

    def names(self, key: str | None = None) -> list[str]:
        """Redis: every key of the namespace (of ``key``'s session alone if given)."""
        pattern = f"{self.namespace}:" + (f"\\{{{key}\\}}*" if key else "*")
        with self.raw() as client:
            return sorted(k.decode() for k in client.scan_iter(match=pattern))

    def pttl(self, name: str) -> int:
        with self.raw() as client:
            return int(client.pttl(name))

    def raw(self) -> Any:
        """A plain client of the Redis server (bytes in and out)."""
        import redis

        return redis.Redis(port=self.server.port)


def _target(kind: str, request: pytest.FixtureRequest, tmp: Path) -> Target:
    if kind == "sqlite":
        return Target(kind, f"sqlite:///{tmp}/sessions.db", None)
    server = request.getfixturevalue("redis_server")
    return Target(kind, server.url, f"up{uuid.uuid4().hex[:8]}", server)


@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return _target(request.param, request, tmp_path)


@pytest.fixture
def redis_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return _target("redis", request, tmp_path)


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result
    return result


async def converse(
    store: Store,
    key: str,
    turns: list[str],
    *,
    then: str = "suspend",
    takeover: bool = True,
) -> tuple[ResumableSession, Any, dict[str, Any]]:
    """This release: restore ``key`` (or start it), run ``turns`` (a checkpoint each),
    then suspend (or leave it held: ``then="hold"``)."""
    session = child.make_text_session(
        child.ScriptedLLM.rule_based(child.rules), userdata=child.Notes()
    )
    rs = ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
    )
    agent = await rs.restore(session, default=child.Scribe, takeover=takeover)
    resumed = rs.resumed
    await session.start(agent)
    for line in turns:
        await session.run(user_input=line)
        await rs.checkpoint("turn")
    seen = {
        "resumed": resumed,
        "transcript": child.transcript(session.history.items),
        "agent_ctx": child.transcript(session.current_agent.chat_ctx.items),
        "facts": list(session.userdata.facts),
        "count": getattr(session.current_agent, "count", None),
    }
    if then == "suspend":
        await rs.suspend()
    elif then == "end":
        await rs.end()
    return rs, session, seen


async def restored(store: Store, key: str, turns: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    _rs, _s, seen = await converse(store, key, list(turns))
    return seen


def turn_lines(text: str) -> list[str]:
    """What one user line of the scripted agent adds to the transcript (less tool ids)."""
    if text.startswith("remember "):
        fact = text[9:]
        return [f"user: {text}", f"call remember {json.dumps({'fact': fact})}"]
    return [f"user: {text}", f"assistant: you said {text}"]


# ---------------------------------------------- sessions an earlier release wrote


OLD_SESSIONS: list[dict[str, Any]] = [
    {"op": "write", "key": "multi", "turns": TURNS, "then": "suspend"},
    {"op": "write", "key": "paused", "turns": TURNS[:1], "then": "pause"},
    {"op": "write", "key": "long", "turns": LONG, "whole": 5, "then": "suspend"},
    {"op": "write", "key": "tool", "turns": TURNS[:1], "then": "tool"},
    {"op": "write", "key": "ended", "turns": TURNS[:2], "then": "end"},
    # an ended conversation kept aside, twice at the same version: arch~v2, arch~v2~2
    {"op": "write", "key": "arch", "turns": ["remember first"], "then": "end"},
    {"op": "archive", "key": "arch"},
    {"op": "write", "key": "arch", "turns": ["remember second"], "then": "end"},
    {"op": "archive", "key": "arch"},
    {"op": "write", "key": "cli", "turns": TURNS, "then": "suspend"},
    {"op": "write", "key": "gone", "turns": TURNS[:2], "then": "suspend"},
]


@dataclass
class OldStore:
    target: Target
    written: dict[str, dict[str, Any]]  # key -> what the old worker had (the last write)
    archived: list[Any]


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def old_store(
    request: pytest.FixtureRequest,
    releases: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> OldStore:
    """The sessions of ``OLD_SESSIONS``, written by release ``LAYOUT`` in one process."""
    target = _target(request.param, request, tmp_path_factory.mktemp("old"))
    results = target.run(releases[LAYOUT], OLD_SESSIONS)
    written: dict[str, dict[str, Any]] = {}
    archived = []
    for op, result in zip(OLD_SESSIONS, results, strict=True):
        ok(result)
        if op["op"] == "archive":
            archived.append(result["archived"])
        else:
            written[op["key"]] = result
    assert archived == ["arch~v2", "arch~v2~2"], archived
    if target.kind == "redis":  # the old layout: no body keys; the long log compacted
        assert not [k for k in target.names() if k.endswith(":b")]
        assert f"{target.namespace}:{{long}}:log:2" in target.names("long")
    return OldStore(target, written, archived)


async def test_sessions_an_earlier_release_wrote_are_restored_and_continued(
    old_store: OldStore,
) -> None:
    """Several checkpoints, a pause left held (a crash), a log compacted twice, a tool
    left running: each comes back with its conversation, userdata and agent state, takes
    a new turn, and is read again with it (docs/schema.md: "Reading old sessions needs
    nothing")."""
    store = old_store.target.open()
    try:
        for key in ("multi", "paused", "long", "tool"):
            old = old_store.written[key]
            seen = await restored(store, key, ["remember after upgrade"])
            assert seen["resumed"], key
            want = old["transcript"]
            assert seen["transcript"][: len(want)] == want, key
            if key == "tool":  # the call left running is answered as interrupted
                calls = [line for line in seen["agent_ctx"] if "slow_lookup" in line]
                outputs = [line for line in seen["agent_ctx"] if "interrupted" in line]
                assert calls and outputs, seen["agent_ctx"]
            assert seen["facts"] == [*old["facts"], "after upgrade"], key
            assert seen["count"] == old["count"] + 1, key
            again = await restored(store, key)
            assert again["transcript"] == seen["transcript"], key
            assert again["facts"] == seen["facts"], key
    finally:
        await store.aclose()


async def test_ended_conversations_and_archives_of_an_earlier_release(
    old_store: OldStore,
) -> None:
    """An ended conversation is not resumed: this release keeps it aside (``~v<n>``) and
    starts afresh; the earlier release's archives ``arch~v2`` and ``arch~v2~2`` read
    whole, and a third ended one at the same version takes the next free name."""
    target = old_store.target
    store = target.open()
    try:
        seen = await restored(store, "ended", ["hello"])
        assert not seen["resumed"] and seen["facts"] == []
        shown = await target.cli(
            "--json", "show", f"ended~v{old_store.written['ended']['version']}"
        )
        assert shown.exit_code == 0, shown.output
        assert "the blue door" in shown.stdout and "code 4711" in shown.stdout
        for name, fact in (("arch~v2", "first"), ("arch~v2~2", "second")):
            shown = await target.cli("--json", "show", name)
            assert shown.exit_code == 0, shown.output
            assert json.loads(shown.stdout)["state"] == "ended" and fact in shown.stdout
        # this release ends the key's next conversation at version 2 too
        await converse(store, "arch", ["remember third"], then="end")
        seen = await restored(store, "arch")
        assert not seen["resumed"]
        listed = {s["key"] for s in json.loads((await target.cli("--json", "ls")).stdout)}
        assert {"arch~v2", "arch~v2~2", "arch~v2~3"} <= listed, listed
        assert "third" in (await target.cli("show", "arch~v2~3")).stdout
    finally:
        await store.aclose()


async def test_the_command_line_handles_sessions_an_earlier_release_wrote(
    old_store: OldStore, tmp_path: Path
) -> None:
    """ls, show, history, export, import, revert and repair of this release on sessions
    the earlier release wrote (the compacted one included)."""
    target = old_store.target
    listed = json.loads((await target.cli("--json", "ls")).stdout)
    assert not [s for s in listed if s.get("error")], listed
    for key in ("cli", "long"):
        for args in (["show", key], ["history", key], ["repair", key, "--dry-run"]):
            done = await target.cli("--json", *args)
            assert done.exit_code == 0, (args, done.output)
        assert (await target.cli("export", key, "-o", str(tmp_path / f"{key}.lkr"))).exit_code == 0
    assert json.loads((await target.cli("--json", "repair", "cli")).stdout)["written"] is None
    latest = json.loads((await target.cli("--json", "history", "cli")).stdout)[-1]["version"]
    done = await target.cli("--json", "revert", "cli", "1")
    assert done.exit_code == 0, done.output
    oldest = json.loads((await target.cli("--json", "history", "long")).stdout)[0]["version"]
    done = await target.cli("--json", "revert", "long", str(oldest))
    assert done.exit_code == 0, done.output
    store = target.open()
    try:
        seen = await restored(store, "cli")  # version 1: the first turn done
        assert seen["facts"] == ["the blue door"]
        info = await store.info("cli")
        assert info is not None and info.version == latest + 2  # revert + suspend
        seen = await restored(store, "long")  # an early version of the compacted log, whole
        assert seen["facts"] and LONG[: len(seen["facts"])] == [
            "remember " + fact for fact in seen["facts"]
        ]
    finally:
        await store.aclose()
    done = await target.cli("import", str(tmp_path / "cli.lkr"), "--key", "cli")
    assert done.exit_code == 0, done.output
    store = target.open()
    try:
        assert (await restored(store, "cli"))["facts"] == ["the blue door", "code 4711"]
    finally:
        await store.aclose()


async def test_rm_of_a_session_an_earlier_release_wrote_leaves_nothing(
    old_store: OldStore,
) -> None:
    """After ``rm`` by this release, no key (Redis) and no row (SQLite) of the session
    is left, continued here first (old and new records side by side) or not."""
    target = old_store.target
    store = target.open()
    try:
        await restored(store, "gone", ["remember one more"])  # a v:<n>:b beside old records
        if target.kind == "redis":
            names = target.names("gone")
            assert [n for n in names if n.endswith(":b")] and [
                n for n in names if n.endswith(":v:1")
            ], names
    finally:
        await store.aclose()
    for key in ("gone", "long"):
        done = await target.cli("rm", key, "--yes")
        assert done.exit_code == 0, done.output
    if target.kind == "redis":
        assert target.names("gone") == [] and target.names("long") == []
    else:
        import sqlite3

        db = sqlite3.connect(target.url[len("sqlite:///") :])
        for table in ("sessions", "versions", "log"):
            rows = db.execute(
                f"SELECT count(*) FROM {table} WHERE key IN ('gone', 'long')"
            ).fetchone()[0]
            assert rows == 0, table
        db.close()


# ------------------------------------------------ format 3 (one element a record)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_format_3_sessions_are_restored_continued_and_removed_whole(
    kind: str, releases: dict[str, Path], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A session of a format-3 release (on Redis one list element per record, the log
    compacted once) is restored, continued (a batched element appended to the older
    elements), read again, and removed without a trace."""
    target = _target(kind, request, tmp_path)
    old = {
        r["key"]: ok(r)
        for r in target.run(
            releases[FORMAT3],
            [
                {"op": "write", "key": "f3", "turns": TURNS, "then": "suspend"},
                {"op": "write", "key": "f3long", "turns": LONG, "whole": 5, "then": "pause"},
            ],
        )
    }
    store = target.open()
    try:
        for key in ("f3", "f3long"):
            seen = await restored(store, key, ["remember later"])
            want = old[key]["transcript"]
            assert seen["transcript"][: len(want)] == want, key
            assert seen["facts"] == [*old[key]["facts"], "later"]
            again = await restored(store, key, ["remember latest"])
            assert again["facts"] == [*old[key]["facts"], "later", "latest"]
    finally:
        await store.aclose()
    for key in ("f3", "f3long"):
        assert (await target.cli("rm", key, "--yes")).exit_code == 0
    if kind == "redis":  # the index and the tombstones ``rm`` lays (named by a hash) aside
        left = [k for k in target.names() if not k.startswith(f"{target.namespace}:rm:")]
        assert left in ([], [f"{target.namespace}:sessions"]), left


# ------------------------------------------ a session moving back and forth


async def test_a_session_moving_between_releases_keeps_every_acknowledged_turn(
    target: Target, releases: dict[str, Path]
) -> None:
    """old → new → old → new: every turn a checkpoint acknowledged is in the last
    restore. On Redis the earlier release cannot read what this one wrote (documented:
    SnapshotCorrupt, "version record … is missing or incomplete"), writes nothing, and
    this release goes on from its own last version."""
    src = releases[LAYOUT]
    [first] = target.run(src, [{"op": "write", "key": "pp", "turns": ["remember one"]}])
    ok(first)
    store = target.open()
    try:
        await restored(store, "pp", ["remember two"])
        [back] = target.run(src, [{"op": "write", "key": "pp", "turns": ["remember three"]}])
        acknowledged = ["one", "two"]
        if target.kind == "sqlite":
            ok(back)
            assert back["facts"] == ["one", "two", "three"]
            acknowledged.append("three")
        else:
            assert back["error"] == "SnapshotCorrupt", back
            assert "is missing or incomplete" in back["message"], back
        seen = await restored(store, "pp", ["remember four"])
        assert seen["facts"] == [*acknowledged, "four"]
        for fact in seen["facts"]:
            assert f"user: remember {fact}" in seen["transcript"]
    finally:
        await store.aclose()


# ------------------------------------ what an earlier release does with new sessions


async def test_an_earlier_release_reading_new_redis_sessions_changes_nothing(
    redis_target: Target, releases: dict[str, Path], tmp_path: Path
) -> None:
    """docs/schema.md: an earlier release reading a version this one wrote reports
    ``SnapshotCorrupt`` ("version record … is missing or incomplete"); the session is
    intact. Its worker's restore (one held live by a worker of this release too, with
    ``takeover``), its archiving of an ended conversation, and its command line's reads
    and writes (show, history, export, repair, revert) leave every key as it was, fence
    no live holder, and this release reads each session as it wrote it."""
    target = redis_target
    store = target.open()
    live = None
    try:
        await converse(store, "multi", TURNS)
        await converse(store, "ended", TURNS[:1], then="end")
        live, live_session, _ = await converse(store, "live", TURNS[:1], then="hold")
        with target.raw() as client:
            before = {k: client.dump(k) for k in target.names()}
        ops: list[dict[str, Any]] = [
            {"op": "write", "key": "multi", "turns": ["remember old"]},
            {"op": "write", "key": "live", "turns": ["remember old"], "takeover": True},
            {"op": "archive", "key": "ended"},
            *(
                {"op": "cli", "args": args}
                for args in (
                    ["show", "multi"],
                    ["history", "multi"],
                    ["export", "multi", "-o", str(tmp_path / "x.lkr")],
                    ["repair", "multi"],
                    ["revert", "multi", "2"],
                )
            ),
        ]
        results = target.run(releases[LAYOUT], ops)
        for op, result in zip(ops, results, strict=True):
            if op["op"] == "cli":
                assert result["exit_code"] == 1, (op, result)
                assert "SnapshotCorrupt" in result["stderr"], (op, result)
                assert "is missing" in result["stderr"]
            else:
                assert result.get("error") == "SnapshotCorrupt", (op, result)
                assert "is missing" in result["message"], (op, result)
        # heads may carry a lease taken and released (epoch, owner); nothing else moved
        with target.raw() as client:
            after = {k: client.dump(k) for k in target.names()}
        assert sorted(after) == sorted(before)
        changed = [k for k in before if before[k] != after[k] and not k.endswith(":head")]
        assert changed == [], changed
        # the live holder was not fenced, and every session reads as written
        await live_session.run(user_input="remember still live")
        await live.checkpoint("turn")
        await live.suspend()
        live = None
        seen = await restored(store, "live")
        assert seen["facts"] == ["the blue door", "still live"]
        seen = await restored(store, "multi")
        assert seen["facts"] == ["the blue door", "code 4711"]
    finally:
        if live is not None:
            await live.suspend()
        await store.aclose()


async def test_rm_by_an_earlier_release_does_not_block_the_key(
    redis_target: Target, releases: dict[str, Path]
) -> None:
    """An operator's ``rm`` with the earlier command line (docs/schema.md: it "leaves
    behind" the version bodies ``v:<n>:b`` it does not know) removed the session: the
    next call under the key starts a new conversation. Found: every later call under
    the key fails with ``SnapshotCorrupt`` ("lost its head key … evicted by the server …
    or deleted by hand"; the failed call lists the key again, so ``ls`` then shows it
    damaged), until this release's ``rm`` runs too."""
    target = redis_target
    store = target.open()
    try:
        await converse(store, "caller", TURNS[:2])
        [done] = target.run(releases[LAYOUT], [{"op": "cli", "args": ["rm", "caller", "--yes"]}])
        assert done["exit_code"] == 0 and "deleted" in done["stdout"], done
        left = target.names("caller")
        listed = json.loads((await target.cli("--json", "ls")).stdout)
        assert [s for s in listed if s["key"] == "caller"] == [], (listed, left)
        seen = await restored(store, "caller", ["hello"])  # the caller calls back
        assert not seen["resumed"] and seen["facts"] == []
    finally:
        await store.aclose()


async def test_an_earlier_releases_failed_restore_leaves_bodies_to_expire_first_until_touched(
    redis_target: Target, releases: dict[str, Path]
) -> None:
    """With a session ``ttl``, a worker of the earlier release asked to restore a session
    this release wrote fails (documented, "the session is intact"), but its lease
    acquisition moves the deadline of every key it knows (head, records, log) and not of
    the version bodies, which would expire first (schema.md says so: finish the deploy
    within one ttl). Any restore by this release before then gives every key of the
    session the head's deadline again, and the conversation comes back whole."""
    target = redis_target
    store = target.open(ttl=120)
    try:
        await converse(store, "t", TURNS[:2])
        with target.raw() as client:  # a minute passed since this release wrote it
            for name in target.names("t"):
                client.pexpire(name, 60_000)
        [done] = target.run(
            releases[LAYOUT], [{"op": "write", "key": "t", "turns": ["hello"]}], ttl=120
        )
        assert done.get("error") == "SnapshotCorrupt", done

        def early() -> dict[str, int]:
            head = target.pttl(f"{target.namespace}:{{t}}:head")
            assert head > 100_000  # the earlier release moved it
            ttls = {name: target.pttl(name) for name in target.names("t")}
            return {name: ms for name, ms in ttls.items() if ms < head - 30_000}

        assert early() and all(name.endswith(":b") for name in early())  # the limit
        seen = await restored(store, "t")
        assert seen["resumed"] and seen["facts"] == ["the blue door", "code 4711"]
        assert early() == {}
    finally:
        await store.aclose()


@pytest.mark.parametrize("old_store", ["redis"], indirect=True)  # a Redis layout matter
async def test_a_ttl_refresh_of_this_release_covers_every_key_of_an_old_session(
    old_store: OldStore,
) -> None:
    """A store with a ``ttl`` restoring a session of the earlier layout, continuing it
    (a new body beside old records) and renewing its lease: every key of the session
    has a deadline (none left to live forever)."""
    target = old_store.target
    store = target.open(ttl=300)
    try:
        rs, _session, _seen = await converse(store, "paused", ["hello"], then="hold")
        assert rs._lease is not None
        await store.renew(rs._lease, ttl=30)
        names = target.names("paused")
        assert [n for n in names if n.endswith(":b")] and [n for n in names if ":v:" in n]
        forever = [n for n in names if target.pttl(n) < 0]
        assert forever == [], forever
        await rs.suspend()
    finally:
        await store.aclose()
