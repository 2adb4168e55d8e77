"""The operator's surface of ``livekit-resume`` under what operators meet on a live
cluster: damaged sessions among healthy ones, odd keys, values JSON cannot carry,
mistyped store paths, prompts beside ``--json``. Run in-process against a real SQLite
file and a real redis-server (the ``url`` and ``key`` fixtures of test_cli)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from livekit_resume import open_store, redact
from livekit_resume.bridge import from_stored
from livekit_resume.cli import app
from livekit_resume.cli.snapshots import Latest, make_codec, write_whole
from livekit_resume.errors import LeaseLost, StoreUnavailable
from livekit_resume.remote import control
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Controllable, Store
from tests.redis_servers import RedisFactory, RedisServer
from tests.test_cli import _converse, _hold, key, run, run_json, started, url

__all__ = ["key", "url"]  # the fixtures, shared with test_cli


def cli(*args: str, **kw: Any) -> Result:
    return CliRunner().invoke(app, list(args), **kw)


def _copy(url: str, key: str, new: str, **update: Any) -> None:
    """Write ``key``'s latest snapshot as session ``new`` (with ``update`` applied)."""

    async def go() -> None:
        store = open_store(url)
        try:
            snap = from_stored(make_codec(store), await store.load(key))

            async def build(_s: Store, _c: Codec, _stored: Latest) -> Snapshot:
                return snap.model_copy(update=update)

            await write_whole(store, new, build, takeover=False, source="import")
        finally:
            await store.aclose()

    asyncio.run(go())


def _damage(url: str, key: str, request: pytest.FixtureRequest) -> None:
    """Break the latest version record of ``key`` as an eviction or a bad hand edit
    would: its listing info is gone (Redis) or not JSON (SQLite)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            db.execute("UPDATE versions SET info='not json' WHERE key=?", (key,))
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    ns = os.environ["RESUME_NAMESPACE"]
    version = run_json(url, "ls")
    latest = next(s["version"] for s in version if s["key"] == key)
    assert server.cli("del", f"{ns}:{{{key}}}:v:{latest}").strip() == "1"


# ------------------------------------------------------------------ ls, damage


def test_ls_lists_the_healthy_sessions_beside_a_damaged_one(
    url: str, key: str, request: pytest.FixtureRequest
) -> None:
    _copy(url, key, "aa-healthy")
    _copy(url, key, "zz-healthy")
    _damage(url, key, request)
    assert run(url, "show", key).exit_code == 1  # it is damaged indeed

    listed = run(url, "--json", "ls")
    assert listed.exit_code == 0, listed.output
    rows = {s["key"]: s for s in json.loads(listed.stdout)}
    assert set(rows) == {"aa-healthy", key, "zz-healthy"}
    assert rows["aa-healthy"]["state"] == "suspended" and "error" not in rows["aa-healthy"]
    assert rows[key]["error"] == "SnapshotCorrupt"

    # a page stops at its limit either way, and --state skips what it cannot read
    page = json.loads(run(url, "--json", "ls", "--limit", "2").stdout)
    assert [s["key"] for s in page["sessions"]] == ["aa-healthy", key]
    suspended = json.loads(run(url, "--json", "ls", "--state", "suspended").stdout)
    assert [s["key"] for s in suspended] == ["aa-healthy", "zz-healthy"]

    table = run(url, "ls")
    assert table.exit_code == 0, table.output
    assert "aa-healthy" in table.stdout and "zz-healthy" in table.stdout
    assert "damaged" in table.stdout
    assert f"{key!r}" in table.stderr and "SnapshotCorrupt" in table.stderr


# ------------------------------------------------------------------ JSON output


def _strict_json(text: str) -> Any:
    """``text`` parsed as RFC 8259 JSON: NaN and Infinity are not JSON (jq and most
    parsers refuse them), though Python's json module reads them."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_stays_json_when_a_snapshot_holds_nan_or_infinity(url: str, key: str) -> None:
    odd = {"score": float("nan"), "limit": float("inf"), "floor": float("-inf"), "n": 1.5}
    _copy(url, key, "odd-numbers", userdata=odd)
    shown = run(url, "--json", "show", "odd-numbers")
    assert shown.exit_code == 0, shown.output
    userdata = _strict_json(shown.stdout)["userdata"]
    assert userdata["n"] == 1.5 and userdata["score"] is None and userdata["limit"] is None
    diffed = run(url, "--json", "diff", "odd-numbers", "1", "1")
    assert diffed.exit_code == 0, diffed.output
    _strict_json(diffed.stdout)


def test_rm_asks_on_stderr_so_that_its_json_stays_json(url: str, key: str) -> None:
    result = run(url, "--json", "rm", key, input="y\n")
    assert result.exit_code == 0, result.output
    typed, printed = result.stdout.split("\n", 1)
    assert typed.strip() == "y"  # the test runner echoes the answer, as a terminal does
    assert _strict_json(printed) == {"key": key, "deleted": True}
    assert "Delete session" in result.stderr


# ------------------------------------------------------------- mistyped paths


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["release", "room-1"], id="release"),
        pytest.param(["revert", "room-1", "1"], id="revert"),
        pytest.param(["repair", "room-1"], id="repair"),
        pytest.param(["pause", "room-1", "--timeout", "0.1"], id="pause"),
        pytest.param(["resume", "room-1", "--timeout", "0.1"], id="resume"),
        pytest.param(["suspend", "room-1", "--timeout", "0.1"], id="suspend"),
        pytest.param(["rm", "room-1", "--yes"], id="rm"),
    ],
)
def test_a_command_on_a_session_never_creates_a_missing_sqlite_file(
    tmp_path: Path, argv: list[str]
) -> None:
    typo = tmp_path / "sesions.db"
    result = run(f"sqlite:///{typo}", *argv)
    assert result.exit_code == 1, result.output
    assert "StoreUnavailable" in result.stderr and "does not exist" in result.stderr
    assert not typo.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- odd keys


def test_the_next_page_cursor_can_be_pasted_back_into_a_shell(url: str, key: str) -> None:
    odd = ["a room {1}", "a room {2}", "a room {3}"]
    for name in odd:
        _copy(url, key, name)
    first = run(url, "ls", "--prefix", "a room", "--limit", "1")
    assert first.exit_code == 0, first.output
    (line,) = [ln for ln in first.stdout.splitlines() if ln.startswith("next page:")]
    words = shlex.split(line.removeprefix("next page:"))
    assert words == [f"--after={odd[0]}"]
    second = run(url, "--json", "ls", "--prefix", "a room", "--limit", "1", *words)
    assert [s["key"] for s in json.loads(second.stdout)["sessions"]] == [odd[1]]


def _as_a_shell_reads(line: str) -> list[str]:
    """The words of ``line`` as bash reads them when an operator pastes it."""
    out = subprocess.run(
        ["bash", "-c", f'printf "%s\\0" {line}'],
        capture_output=True,
        check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    ).stdout
    return out.decode(errors="surrogateescape").split("\0")[:-1]


@settings(max_examples=60, deadline=None)
# a lone surrogate only as an argument's byte that is not UTF-8 (Python's
# surrogateescape): no process argument can carry another one
@given(
    st.text(
        st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
        | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
        max_size=12,
    )
)
def test_a_shell_word_is_printable_and_reads_back_as_itself(text: str) -> None:
    word = redact.shell_word(text)
    assert redact.printable(word) == word
    word.encode("utf-8")  # any terminal can print it
    assert _as_a_shell_reads(word) == [text]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([b"show", b"room-\xff"], id="show-key"),
        pytest.param([b"rm", b"\xffroom"], id="rm-key"),
        pytest.param([b"ls", b"--prefix", b"room-\xff"], id="ls-prefix"),
        pytest.param([b"ls", b"--limit", b"1", b"--after=room-\xc3"], id="ls-after"),
    ],
)
def test_an_argument_whose_bytes_are_not_utf8_is_a_usage_error(
    url: str, key: str, args: list[bytes]
) -> None:
    """A key, prefix or cursor typed with bytes that are not UTF-8 (a Latin-1 terminal):
    a usage error (exit 2) naming it, printable. Before, ``ls`` failed with the
    driver's ``UnicodeEncodeError`` (exit 1) and a key with the encoder's words."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "livekit-resume"), b"--store", url.encode(), *args],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "200"},
        timeout=120,
    )
    err = done.stderr.decode()  # strict: what it printed is valid UTF-8
    assert done.returncode == 2, (done.stdout, err)
    assert "not valid UTF-8" in err
    assert "\\udc" in err  # the byte shown escaped
    listed = run_json(url, "ls")
    assert [s["key"] for s in listed] == [key]


@pytest.mark.parametrize(
    "odd",
    [
        pytest.param(["room \u202e1", "room \u202e2", "room \u202e3"], id="bidi"),
        pytest.param(["room \x9b1", "room \x9b2", "room \x9b3"], id="c1"),
        pytest.param(["room '\\\u200e1", "room '\\\u200e2", "room 3"], id="quote-backslash"),
    ],
)
def test_a_cursor_with_characters_a_terminal_would_act_on_pastes_back_as_itself(
    url: str, key: str, odd: list[str]
) -> None:
    """The cursor is printed escaped, so a terminal shows it rather than acting on it:
    escaped as a shell reads it back (``$'\\u202e'``). It was escaped after quoting
    (``'room \\u202e1'``), which pastes back as another key: the pager went wrong."""
    for name in odd:
        _copy(url, key, name)
    first = run(url, "ls", "--prefix", "room", "--limit", "1")
    assert first.exit_code == 0, first.output
    (line,) = [ln for ln in first.stdout.splitlines() if ln.startswith("next page:")]
    assert redact.printable(line) == line
    words = _as_a_shell_reads(line.removeprefix("next page:"))
    second = run(url, "--json", "ls", "--prefix", "room", "--limit", "1", *words)
    assert second.exit_code == 0, second.output
    assert [s["key"] for s in json.loads(second.stdout)["sessions"]] == [odd[1]]


@pytest.mark.parametrize("cursor", ["--json", "--store=sqlite:///elsewhere.db", "--namespace"])
def test_a_cursor_named_like_a_global_option_is_the_cursor(url: str, key: str, cursor: str) -> None:
    """``--after "$cursor"`` (cli.md's loop) and the pasted line both page on: the
    global options were taken out of the line wherever they stood, the value of
    ``--after`` too, so the cursor was read as ``--json`` or as another store."""
    later = cursor + "~"  # sorts after the cursor
    for name in (cursor, later):
        _copy(url, key, name)
    scripted = run(url, "--json", "ls", "--prefix", "-", "--after", cursor, "--limit", "1")
    assert scripted.exit_code == 0, scripted.output
    assert [s["key"] for s in json.loads(scripted.stdout)["sessions"]] == [later]
    first = run(url, "ls", "--prefix", "-", "--limit", "1")
    (line,) = [ln for ln in first.stdout.splitlines() if ln.startswith("next page:")]
    words = _as_a_shell_reads(line.removeprefix("next page:"))
    second = run(url, "--json", "ls", "--prefix", "-", "--limit", "1", *words)
    assert second.exit_code == 0, second.output
    assert [s["key"] for s in json.loads(second.stdout)["sessions"]] == [later]


def test_rm_of_a_session_a_worker_holds_fences_the_worker_and_stays_deleted(
    url: str, key: str
) -> None:
    """``rm --yes`` while a worker converses in the session (cli.md): the worker is
    refused at its next save, as after a takeover, and the session stays deleted. The
    worker took the delete for a store that lost its data and wrote it all back."""

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await session.run(user_input="remember the green gate")
            await rs.checkpoint("turn")
            removed = await asyncio.to_thread(run, url, "rm", key, "--yes")
            assert removed.exit_code == 0, removed.output
            await session.run(user_input="remember the red roof")
            with pytest.raises(LeaseLost, match="deleted"):
                await rs.checkpoint("turn")
            await rs.aclose()  # its closing save is refused too, quietly
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())
    assert run_json(url, "ls") == []
    assert run(url, "show", key).exit_code == 1


def test_rm_removes_a_damaged_session(url: str, key: str, request: pytest.FixtureRequest) -> None:
    _copy(url, key, "healthy")
    _damage(url, key, request)
    asked = run(url, "rm", key, input="y\n")
    assert asked.exit_code == 0, asked.output
    assert "cannot be read" in asked.stderr
    assert [s["key"] for s in run_json(url, "ls")] == ["healthy"]
    assert run(url, "rm", "healthy", "--yes").exit_code == 0
    assert run_json(url, "ls") == []


def test_rm_confirmed_for_a_free_session_spares_it_once_a_worker_took_it(
    url: str, key: str
) -> None:
    asked: list[str] = []

    def taken_while_asking(question: str, **_kw: Any) -> bool:
        """The operator says yes while a worker restores the session: the worker takes
        its lease between rm's look-up and the answer."""
        asked.append(question)
        _hold(url, key, "w-restoring")
        return True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer, "confirm", taken_while_asking)
        result = run(url, "rm", key)
    assert asked and "held" not in asked[0]  # it was free when asked
    assert result.exit_code == 1, result.output
    assert "SessionBusy" in result.stderr and "w-restoring" in result.stderr
    (session,) = run_json(url, "ls")
    assert session["key"] == key and session["owner"] == "w-restoring"
    assert session["version"] == 3  # every version kept
    # an operator who means it says so again: a held session is deleted when confirmed
    again = run(url, "rm", key, input="y\n")
    assert again.exit_code == 0, again.output
    assert run_json(url, "ls") == []


ODD_KEYS = ["{a}", "b c", "ü-é 🎧", "100%", "x}{y", "-dash", "a:b:{c}"]


def test_odd_keys_list_page_show_and_go_on_a_redis_cluster(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("livekit_resume.stores.redis")
    cluster = request.getfixturevalue("redis_cluster")
    monkeypatch.setenv("RESUME_NAMESPACE", f"odd{os.getpid()}")
    url = str(cluster.url)
    asyncio.run(_converse(url, "seed", ["remember the blue door"]))
    for name in ODD_KEYS:
        _copy(url, "seed", name)
    everything = sorted([*ODD_KEYS, "seed"])
    assert [s["key"] for s in run_json(url, "ls")] == everything

    seen: list[str] = []
    cursor: list[str] = []
    while True:
        page = run_json(url, "ls", "--limit", "3", *cursor)
        seen += [s["key"] for s in page["sessions"]]
        if page["next"] is None:
            break
        cursor = ["--after", page["next"]]
    assert seen == everything

    for name in ODD_KEYS:
        shown = run(url, "show", "--", name) if name.startswith("-") else run(url, "show", name)
        assert shown.exit_code == 0, (name, shown.output)
        assert "remember the blue door" in shown.stdout
        assert run(url, "rm", "--yes", "--", name).exit_code == 0, name
    assert [s["key"] for s in run_json(url, "ls")] == ["seed"]


# ------------------------------------------------------------ usage errors, --json


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        pytest.param(["--json", "show", ""], "BadParameter", id="empty-key"),
        pytest.param(["show", "a\x1bb", "--json"], "BadParameter", id="control-key"),
        pytest.param(["ls", "--json", "--limit", "0"], "BadParameter", id="out-of-range"),
        pytest.param(["--json", "ls", "--no-such-option"], "NoSuchOption", id="unknown-option"),
        pytest.param(["--json", "nope"], "UsageError", id="unknown-command"),
        pytest.param(["--json", "diff", "room-1", "1"], "MissingParameter", id="missing"),
        pytest.param(["--json", "--namespace", "a{b}", "ls"], "BadParameter", id="namespace"),
        pytest.param(["--json", "--namespace", "", "ls"], "BadParameter", id="empty-namespace"),
        pytest.param(["--json", "--namespace", "lk:ctl", "ls"], "BadParameter", id="ctl-namespace"),
    ],
)
def test_a_usage_error_with_json_is_one_json_line_exit_2(
    tmp_path: Path, argv: list[str], kind: str
) -> None:
    result = cli(*argv, "--store", f"sqlite:///{tmp_path}/s.db")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    error = _strict_json(line)
    assert error["error"] == kind and error["message"], error
    # without --json it stays click's readable usage message
    plain = cli(*[a for a in argv if a != "--json"], "--store", f"sqlite:///{tmp_path}/s.db")
    assert plain.exit_code == 2 and "Usage:" in plain.stderr


def test_a_store_url_of_no_known_scheme_is_a_usage_error_naming_the_known_ones() -> None:
    result = cli("--json", "--store", "postgres://user:secret@db/x", "ls")
    assert result.exit_code == 2, result.output
    error = _strict_json(result.stderr)
    assert error["error"] == "BadParameter" and "'--store'" in error["message"]
    assert "redis+cluster://" in error["message"] and "secret" not in error["message"]


# ---------------------------------------------------------------- remote control


@pytest.fixture(params=["sqlite", "redis"])
def bare_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """An empty store: a SQLite file, or a namespace of a real redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/control.db"
    server = request.getfixturevalue("redis_server")
    monkeypatch.setenv("RESUME_NAMESPACE", f"ctl{os.getpid()}{request.node.name[-8:-1]}")
    return str(server.url)


def test_a_command_whose_sender_gave_up_is_never_applied_later(bare_url: str) -> None:
    """An operator presses Ctrl-C (or a back end cancels its call) while a frozen worker
    has not taken the command yet: the command is withdrawn, as at its timeout, so the
    worker that wakes up later skips it rather than pausing the call behind their back."""

    async def go() -> None:
        worker, sender = open_store(bare_url), open_store(bare_url)
        try:
            await worker.acquire("call-7", "w-frozen", ttl=60)
            assert isinstance(worker, Controllable)
            channel = worker.commands()
            async with channel.inbox("call-7") as inbox:
                sending = asyncio.create_task(control(sender).pause("call-7", timeout=30))
                command = await asyncio.wait_for(anext(inbox), 10)  # it arrived, unclaimed
                sending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await sending
                # the worker wakes up: the command is no longer its to apply
                assert not await channel.claim(command)
                assert (await channel.reply(command)).status == "withdrawn"
        finally:
            await worker.aclose()
            await sender.aclose()

    asyncio.run(go())


# ------------------------------------------------------------------ odd numbers


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["show", "KEY", "--version", str(2**70)], id="show"),
        pytest.param(["export", "KEY", "-o", "-", "--version", str(2**64)], id="export"),
        pytest.param(["diff", "KEY", "1", str(2**64)], id="diff"),
        pytest.param(["revert", "KEY", str(2**63)], id="revert"),
        pytest.param(["show", "KEY", "--version", "0"], id="zero"),
        pytest.param(["revert", "KEY", "-1"], id="negative"),
    ],
)
def test_a_version_no_store_can_hold_is_a_usage_error(url: str, key: str, argv: list[str]) -> None:
    result = cli(*[key if a == "KEY" else a for a in argv], "--store", url)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert run_json(url, "history", key)[-1]["version"] == 3  # nothing written


# ------------------------------------------------------------------ clock skew


def test_a_live_holder_shows_whatever_the_operators_clock_says(
    url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store tells whether a lease is live, by its own clock (Redis: the server's
    TIME): an operator's host ahead of it by more than the lease has left still sees
    the worker that holds the session."""
    import time

    _hold(url, key, "w-live")  # a 60 s lease
    wall = time.time
    # this host's wall clock 75 s ahead (the SQLite store keeps the clock it was made
    # with: it plays the server)
    monkeypatch.setattr(time, "time", lambda: wall() + 75)
    (session,) = run_json(url, "ls")
    assert session["owner"] == "w-live", session
    assert session["lease_expires_at"] is not None
    asked: list[str] = []

    def no(question: str, **_kw: Any) -> bool:
        asked.append(question)
        return False

    monkeypatch.setattr(typer, "confirm", no)
    assert run(url, "rm", key).exit_code == 1
    assert "held by 'w-live'" in asked[0]


# ------------------------------------------------------------- ls --state pages


class _CountedPages:
    """A store whose key pages are counted: on Redis each page reads the whole index."""

    def __init__(self, store: Store) -> None:
        self._store: Any = store
        self.pages = 0

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        self.pages += 1
        page: tuple[list[str], str | None] = await self._store.keys_page(prefix, after, limit)
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_ls_state_over_many_sessions_reads_few_pages(tmp_path: Path) -> None:
    """``ls --state paused --limit 10`` where nothing is paused looks at every session:
    in pages that grow, not in a thousand pages of a hundred (each of which reads the
    whole namespace index on Redis)."""
    from livekit_resume.cli.snapshots import page_sessions

    async def go() -> None:
        store = open_store(f"sqlite:///{tmp_path}/many.db")
        try:
            for i in range(3000):
                await store.acquire(f"room-{i:05d}", "w", ttl=60)
            counted = _CountedPages(store)
            found, cursor = await page_sessions(counted, state="paused", limit=10)
            assert found == [] and cursor is None
            assert counted.pages <= 6, counted.pages
        finally:
            await store.aclose()

    asyncio.run(go())


def test_ls_of_more_sessions_than_the_pool_serves_in_its_wait_lists_every_one(
    make_redis: RedisFactory,
) -> None:
    """`ls` read the info of every session of a page at the same moment: beyond what
    the store's pool serves within its wait (``pool_size`` connections, the socket
    timeout; about 5,000 sessions at the defaults on this machine) the rest failed with
    "No connection available" and were listed as unreachable, on a healthy server. A
    small pool and a short wait show it with 1,000 sessions. Now a page's infos go in
    pipelines (`SessionInfos`)."""
    from livekit_resume.cli.snapshots import Unreadable, page_sessions
    from livekit_resume.stores.redis import RedisStore

    server = make_redis()

    async def go() -> None:
        store = RedisStore.from_url(server.url, pool_size=1, socket_timeout=0.1)
        try:
            names = [f"room-{i:04d}" for i in range(1000)]
            for name in names:
                await store.release(await store.acquire(name, "w"))
            found, cursor = await page_sessions(store)
            unreadable = [f for f in found if isinstance(f, Unreadable)]
            assert not unreadable, (len(unreadable), unreadable[0].error)
            assert [f.key for f in found] == names and cursor is None
        finally:
            await store.aclose()

    asyncio.run(go())


class _OneByOne:
    """A store without `SessionInfos` (its ``infos`` hidden) that counts the ``info``
    calls in flight at once."""

    def __init__(self, store: Store) -> None:
        self._store, self.running, self.most = store, 0, 0

    async def info(self, key: str) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)  # a round trip: the others start meanwhile
            return await self._store.info(key)
        finally:
            self.running -= 1

    def __getattr__(self, name: str) -> Any:
        if name == "infos":
            raise AttributeError(name)
        return getattr(self._store, name)


def test_ls_reads_a_store_without_many_infos_a_few_at_a_time(tmp_path: Path) -> None:
    """A store that reads one info per call is asked a bounded number at a time, not a
    page's thousands at once (each waiting for the pool, the first past its timeout
    listed as unreachable)."""
    from livekit_resume.cli.snapshots import INFO_CONCURRENCY, Unreadable, page_sessions

    async def go() -> None:
        store = open_store(f"sqlite:///{tmp_path}/many.db")
        try:
            names = [f"room-{i:04d}" for i in range(300)]
            for name in names:
                await store.acquire(name, "w", ttl=60)
            counted = _OneByOne(store)
            found, _ = await page_sessions(cast(Store, counted))
            assert [f.key for f in found if not isinstance(f, Unreadable)] == names
            assert 1 < counted.most <= INFO_CONCURRENCY, counted.most
        finally:
            await store.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("seconds", ["nan", "NaN", "inf", "-1", "0"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_a_usage_error(url: str, seconds: str) -> None:
    done = run(url, "pause", "room-1", "--timeout", seconds)
    assert done.exit_code == 2, done.output
    assert "--timeout" in done.output


def test_commands_that_hold_a_lease_work_where_sessions_expire_sooner_than_it(
    url: str, key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CLI held a 30 s lease, which a store whose sessions expire sooner refuses
    (ValueError: the lease would outlive its session)."""
    monkeypatch.setenv("RESUME_TTL", "10")
    exported = tmp_path / "s.lkrs"
    assert run(url, "export", key, "-o", str(exported)).exit_code == 0
    for argv in (["release", key], ["revert", key, "1"], ["import", str(exported), "--key", key]):
        done = run(url, *argv)
        assert done.exit_code == 0, (argv, done.output)
    assert run(url, "rm", key, input="y\n").exit_code == 0


def test_a_command_against_a_stalled_redis_gives_up_within_seconds(
    make_redis: RedisFactory,
) -> None:
    """An operator's command waits about 4 s a call for a server that does not answer
    (one retry of a 2 s wait), not the 21 s a call a worker's store rides out: ``show``
    took 42 s before (two calls: the server check, then the load)."""
    server = make_redis()
    server.pause()
    try:
        start = time.monotonic()
        result = run(server.url, "show", "room-1")
        took = time.monotonic() - start
    finally:
        server.resume()
    assert result.exit_code == 1, result.output
    assert "StoreUnavailable" in result.output and "load of session 'room-1'" in result.output
    assert took < 15  # bounds a hang, not a timing: about 5 s here


def test_ls_table_aligns_wide_characters_by_the_cells_they_take() -> None:
    """A key in CJK takes two terminal cells a character: ``ls`` pads its lines by
    cells, not characters, so every column still starts at one place on screen."""
    from rich.cells import cell_len

    from livekit_resume.cli import render

    rows = [
        {
            "key": k,
            "version": v,
            "state": "suspended",
            "agent": "Bench",
            "items": 4,
            "owner": None,
            "lease_expires_in": None,
            "updated_ts": None,
        }
        for k, v in (("会議室-7", 12), ("room-1", 3), ("x", 1234))
    ]
    header, lines = render.sessions_table(rows, title="t").lines()
    versions = (str(r["version"]) for r in rows)
    ends = {cell_len(ln[: ln.index(v) + len(v)]) for ln, v in zip(lines, versions, strict=True)}
    assert len(ends) == 1  # the version column, right-aligned, ends in one cell for all
    starts = {cell_len(ln[: ln.index("suspended")]) for ln in lines}
    assert starts == {cell_len(header[: header.index("state")])}


def test_ls_scan_lists_again_every_session_of_a_lost_index_past_one_pipeline(
    make_redis: RedisFactory,
) -> None:
    """``ls --scan`` records the sessions it finds in pipelines of `KEYS_BATCH` (one
    round trip each used to be 3 s for 10,000 sessions here): past one pipeline, with
    the server's scripts flushed meanwhile (the index script is loaded again, once),
    every session is listed again, a headless one among them, and counted once."""
    from livekit_resume.errors import SnapshotCorrupt
    from livekit_resume.stores.base import Commit, Record
    from livekit_resume.stores.redis import RedisStore
    from livekit_resume.stores.redis.namespace import KEYS_BATCH

    server = make_redis()
    names = [f"room-{i:05d}" for i in range(KEYS_BATCH + 50)]

    async def go() -> None:
        store = RedisStore.from_url(server.url, namespace="lost")
        try:
            for name in names:
                await store.release(await store.acquire(name, "w"))
            lease = await store.acquire("room-00007", "w")
            record = Record("history", "m1", b"x" * 10, None)
            await store.commit(Commit("room-00007", lease.epoch, 0, b"head", [record], 1, {}))
            assert server.cli("del", "lost:{room-00007}:head").strip() == "1"  # remains stay
            assert server.cli("del", "lost:sessions").strip() == "1"
            assert server.cli("script", "flush").strip() == "OK"
            assert await store.keys() == []
            assert await store.reindex() == len(names)
            assert await store.keys() == names  # the headless one listed: info says damaged
            with pytest.raises(SnapshotCorrupt, match="lost its head"):
                await store.info("room-00007")
            assert await store.reindex() == 0
        finally:
            await store.aclose()

    asyncio.run(go())


class _ReleaseFails:
    """A store whose ``release`` fails (a blip just after the commit landed)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def release(self, lease: Any) -> None:
        raise StoreUnavailable("the store blinked as the lease was given back (test)")


def test_a_write_whose_release_fails_after_its_commit_landed_reports_the_version(
    url: str, key: str
) -> None:
    """`revert`, `repair` and `import` commit, then give the lease back. A release that
    failed turned a commit that landed into a failure: the operator was told nothing
    was written, and ran it again, writing a second version. The lease expires by
    itself (its ttl); the command reports what it wrote."""

    async def go() -> int | None:
        store = open_store(url)
        try:
            snap = from_stored(make_codec(store), await store.load(key))

            async def build(_s: Store, _c: Codec, _stored: Latest) -> Snapshot:
                return snap

            flaky = cast(Store, _ReleaseFails(store))
            written = await write_whole(flaky, key, build, takeover=False, source="import")
            assert (await store.load(key)).version == written[1]
            return written[1]
        finally:
            await store.aclose()

    assert asyncio.run(go()) is not None


def test_ls_of_a_state_that_does_not_exist_is_a_usage_error(url: str, key: str) -> None:
    """``--state activ`` (a typo) listed nothing, exit 0, as if no session were in that
    state: now a usage error naming the states."""
    result = run(url, "ls", "--state", "activ", env={"COLUMNS": "240"})
    assert result.exit_code == 2, result.output
    assert "'activ' is not a state: one of active, paused, suspended, ended" in result.output
    assert [s["key"] for s in run_json(url, "ls", "--state", "suspended")] == [key]
