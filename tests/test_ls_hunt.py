"""Hunt: the operator's view. `livekit-resume ls` (and `history`, `--json`) must show
every session with its true state, owner and lease at every step of its life, on
SQLite, Redis and Redis Cluster (docs/cli.md, docs/multi-worker.md "Operating").

Sessions are written by real `AgentSession`s (scripted LLM) through `ResumableSession`;
stores are real SQLite files and real redis-servers from the shared fixtures."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from livekit_resume import ResumableSession, open_store
from tests import _child_agent as child
from tests.test_cli import run, run_json, started


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    server = request.getfixturevalue("redis_server")
    monkeypatch.setenv("RESUME_NAMESPACE", f"hl{uuid.uuid4().hex[:8]}")
    return str(server.url)


async def ls(url: str, *args: str) -> Any:
    return await asyncio.to_thread(run_json, url, "ls", *args)


def row(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    found = [r for r in rows if r["key"] == key]
    assert len(found) <= 1, f"{key!r} listed twice: {found}"
    return found[0] if found else None


# ----------------------------------------------------------------- resume then ls


async def test_ls_right_after_a_resume_command_shows_the_session_active(url: str) -> None:
    """docs/cli.md: `resume KEY` "resumes a session paused in its worker", and the owner
    "applies it and answers with its version"; `ls` shows "state" = the latest version's
    state. After `livekit-resume resume KEY` returned success, `ls` must say `active`
    (as it says `paused` right after `pause`, and `suspended` right after `suspend`).

    It says `paused`: with autosave on (every real worker, `resumable_job`),
    `ResumableSession.resume` only *triggers* a background save (debounced) and the
    control listener answers at once with the version of the *paused* snapshot."""
    key = "room-resume"
    store = open_store(url)
    try:
        rs, session = await started(store, key, autosave=True)
        await asyncio.wait_for(rs._control.listening.wait(), 10)
        await session.run(user_input="remember the blue door")
        await rs.checkpoint("turn")
        out = await asyncio.to_thread(run_json, url, "pause", key)
        assert (r := row(await ls(url), key)) and r["state"] == "paused", r
        out = await asyncio.to_thread(run_json, url, "resume", key)
        answered = out["version"]
        r = row(await ls(url), key)
        hist = await asyncio.to_thread(run_json, url, "history", key)
        answered_state = next(h["state"] for h in hist if h["version"] == answered)
        await asyncio.sleep(1.0)
        later = row(await ls(url), key)
        try:
            assert r is not None and r["state"] == "active", (
                f"`resume` answered version {answered} (state {answered_state!r}); "
                f"`ls` right after: state {r and r['state']!r}, version {r and r['version']}; "
                f"a second later: {later and later['state']!r} version {later and later['version']}"
            )
        finally:
            await rs.suspend()
    finally:
        await store.aclose()


# ------------------------------------------------------- a new session, not saved yet


async def test_a_live_session_before_its_first_save_is_listed_by_state_active(url: str) -> None:
    """docs/cli.md `ls`: "`--state S` those whose latest version is in state S
    (`active`, ...)"; mission: "sees every session, its state and its owner". A worker
    that restored a new session and started it holds the lease (ls shows its owner and
    countdown) and is talking: it is active. `ls --state active` must list it, and its
    state must not be blank.

    It is listed with `"state": null`, `version 0`, and `ls --state active` (or any
    `--state`) hides it: the state is read only from a version's listing info."""
    key = "room-new"
    store = open_store(url)
    try:
        rs, session = await started(store, key, autosave=False)
        await session.run(user_input="remember the blue door")  # talking, not saved yet
        everything = await ls(url)
        r = row(everything, key)
        assert r is not None and r["owner"] == rs._lease.owner  # type: ignore[union-attr]
        active = [s["key"] for s in await ls(url, "--state", "active")]
        try:
            assert key in active and r["state"] == "active", (
                f"a live, talking session: ls says state {r['state']!r} version "
                f"{r['version']} owner {r['owner']!r}; `ls --state active` lists {active}"
            )
        finally:
            await rs.suspend()
    finally:
        await store.aclose()


async def test_a_listed_session_has_a_history(url: str) -> None:
    """docs/cli.md: `ls` lists "sessions"; `history KEY` lists "the retained versions";
    "A key that names no session is refused (exit 1)". What `ls` lists as a session,
    `history` must not call unknown: the operator's next step after `ls` is
    `history`/`show` of a key it printed.

    A worker that restored a new key and closed before `session.start()` (a job whose
    caller never joined; likewise one killed before its first save) leaves a head with
    version 0 and no expiry: `ls` lists it (version 0, state null) while `history`
    and `show` fail with SnapshotNotFound "no snapshot for session"."""
    key = "room-ghost"
    store = open_store(url)
    try:
        # a job whose caller never came: restored, closed before `session.start()`
        _m, session = child.build_session()
        rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
        await rs.restore(session, default=child.Scribe)
        await rs.aclose()
        await session.aclose()
    finally:
        await store.aclose()
    listed = [s["key"] for s in await ls(url)]
    hist = await asyncio.to_thread(run, url, "--json", "history", key)
    assert key not in listed or hist.exit_code == 0, (
        f"ls lists {listed} but `history {key}` exits {hist.exit_code}: {hist.stderr.strip()}"
    )


# ------------------------------------------------------------- paging with --state


def _seed(url: str, names: list[str], states: dict[str, str]) -> None:
    """Sessions ``names``: the first written by a real AgentSession, the others copies,
    each with the state given (default suspended)."""
    from tests.test_cli import _converse
    from tests.test_cli_adversarial import _copy

    asyncio.run(_converse(url, names[0], ["remember the blue door"]))
    for name in names[1:]:
        _copy(url, names[0], name, state=states.get(name, "suspended"))
    if names[0] in states:
        _copy(url, names[0], names[0], state=states[names[0]])


def test_ls_state_limit_prints_no_next_page_when_none_follows(url: str) -> None:
    """docs/cli.md: "`--limit N` prints at most `N` sessions and, when more follow, the
    cursor of the next page"; `--json`: "`next` being `null` on the last page".
    With `--state paused --limit 2`, two paused sessions then only suspended ones: no
    paused session follows, and `ls` has read the rest already (the batch of 100).

    It prints a cursor anyway, whose page is empty."""
    names = ["a1", "a2", "b1", "b2", "b3"]
    _seed(url, names, {"a1": "paused", "a2": "paused"})
    page = run_json(url, "ls", "--state", "paused", "--limit", "2")
    assert [s["key"] for s in page["sessions"]] == ["a1", "a2"]
    nxt = (
        run_json(url, "ls", "--state", "paused", "--limit", "2", "--after", page["next"])
        if page["next"]
        else None
    )
    assert page["next"] is None, f"next {page['next']!r} leads to the page {nxt}"


# ------------------------------------------------------- a damaged head, with a ttl


@pytest.mark.parametrize("damage", [("hdel", "touched"), ("hset", "touched", "nan")])
def test_redis_a_session_whose_head_is_damaged_is_listed_with_a_ttl(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, damage: tuple[str, ...]
) -> None:
    """docs/cli.md `ls`: "A session that cannot be read (its head or a version record
    evicted, damaged listing info) does not stop the listing: it shows as `damaged`";
    docs/multi-worker.md: a restore refused for foreign data at its head lists the key
    "so that `ls` shows the damaged session to an operator after the job that met it
    has exited". The brief: a session whose head is damaged is listed (marked), never
    hidden.

    With a session ttl (`RESUME_TTL`, as a deployment with expiring sessions runs every
    worker and the operator's shell), a head hash whose `touched` field is missing or
    not a number (`info`/`load` say `SnapshotCorrupt`: "session head ... has no valid
    touched") is hidden from `ls`: the index check reads `touched` as "no head" or as
    expired (NaN compares false), and only a headless member without a ttl is looked
    into."""
    from livekit_resume.errors import SnapshotCorrupt
    from tests.test_cli import _converse

    server = request.getfixturevalue("redis_server")
    ns = f"hd{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RESUME_NAMESPACE", ns)
    monkeypatch.setenv("RESUME_TTL", "600")
    url = str(server.url)
    asyncio.run(_converse(url, "room-x", ["remember the blue door"]))
    asyncio.run(_converse(url, "room-y", ["remember the code 4711"]))
    assert {s["key"] for s in run_json(url, "ls")} == {"room-x", "room-y"}
    server.cli(damage[0], f"{ns}:{{room-x}}:head", *damage[1:])

    async def info() -> Any:
        store = open_store(url)
        try:
            return await store.info("room-x")
        except SnapshotCorrupt as e:
            return e
        finally:
            await store.aclose()

    said = asyncio.run(info())
    assert isinstance(said, SnapshotCorrupt), said  # the store itself calls it damaged
    result = run(url, "--json", "ls")
    import json

    listed = {s["key"]: s for s in json.loads(result.stdout)}
    assert "room-x" in listed and listed["room-x"].get("error") == "SnapshotCorrupt", (
        f"head damaged ({' '.join(damage)}), info() says {said}; ls lists {sorted(listed)}"
    )


# ------------------------------------------- many sessions, pages under changes


@pytest.fixture(params=["sqlite", "redis", "cluster"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    monkeypatch.setenv("RESUME_NAMESPACE", f"hm{uuid.uuid4().hex[:8]}")
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("redis_server").url)


async def _copies(url: str, source: str, names: list[str], **update: Any) -> None:
    """``names`` as whole copies of ``source``'s latest snapshot, through one store."""
    from livekit_resume.bridge import from_stored
    from livekit_resume.cli.snapshots import make_codec, write_whole

    store = open_store(url)
    try:
        snap = from_stored(make_codec(store), await store.load(source))

        async def build(*_a: Any) -> Any:
            return snap.model_copy(update=update)

        places = asyncio.Semaphore(16)

        async def one(name: str) -> None:
            async with places:
                await write_whole(store, name, build, takeover=False, source="import")

        await asyncio.gather(*map(one, names))
    finally:
        await store.aclose()


def test_ls_pages_while_sessions_come_and_go_list_each_survivor_once(any_url: str) -> None:
    """passes: coverage. docs/cli.md: pages by cursor (`--limit`, `--after`); the
    brief: no session listed twice or skipped across pages while others are created
    and deleted. 300 sessions paged 37 at a time, between pages: some not yet listed
    deleted, some created, a listed one deleted. Every session that lived through the
    whole paging is listed exactly once; the total of a plain `ls` is right."""
    from tests.test_cli import _converse

    url = any_url
    asyncio.run(_converse(url, "s000", ["remember the blue door"]))
    names = [f"s{i:03d}" for i in range(1, 300)]
    asyncio.run(_copies(url, "s000", names))
    everyone = ["s000", *names]
    assert len(run_json(url, "ls")) == 300
    deleted: set[str] = set()
    seen: list[str] = []
    cursor: str | None = None
    n = 0
    while True:
        page = run_json(url, "ls", "--limit", "37", *(["--after", cursor] if cursor else []))
        seen += [s["key"] for s in page["sessions"]]
        cursor = page["next"]
        if cursor is None:
            break
        n += 1
        # not yet listed: one deleted, one created (after the cursor and before it)
        later = [k for k in everyone if k > cursor and k not in deleted]
        victim = later[len(later) // 2]
        assert run(url, "rm", victim, "--yes").exit_code == 0
        deleted.add(victim)
        asyncio.run(_copies(url, "s000", [f"{cursor}x", f"t{n:03d}"]))
        gone = seen[-1]  # an already listed one (s000 is the copies' source: kept)
        if gone != "s000" and gone not in deleted:
            assert run(url, "rm", gone, "--yes").exit_code == 0
            deleted.add(gone)
    dupes = sorted({k for k in seen if seen.count(k) > 1})
    survivors = [k for k in everyone if k not in deleted]
    missed = [k for k in survivors if k not in seen]
    assert not dupes and not missed, f"listed twice: {dupes}; never listed: {missed}"


def test_history_text_shows_each_versions_epoch_whole(url: str) -> None:
    """docs/cli.md: `history KEY` lists "the retained versions: version, epoch, time,
    reason (source), state, items, bytes"; `pause`/`resume`/`suspend` take `--epoch N`
    ("aims at that lease epoch"), and the text `ls` shows no epoch at all: `history` is
    where an operator at a terminal reads it. On an 80-column terminal each version's
    epoch (a 16-digit number: the clock in microseconds) must be printed whole.

    It is cut to "17965141119…": `render.versions_table` is a rich `Table` fitted to
    the terminal, which truncates the epoch column (and folds "manual (revert)" onto a
    second line), unlike the `ls` table (`Aligned`) that is never cut."""
    from tests.test_cli import _converse

    asyncio.run(_converse(url, "room-h", ["remember the blue door", "remember the code 4711"]))
    assert run(url, "revert", "room-h", "1").exit_code == 0
    epochs = {str(h["epoch"]) for h in run_json(url, "history", "room-h")}
    text = run(url, "history", "room-h", env={"COLUMNS": "80"}).stdout
    missing = sorted(e for e in epochs if e not in text)
    assert not missing, f"epochs {missing} not printed whole by `history`:\n{text}"
