"""A session whose latest version is lost (a Redis record or body evicted or deleted by
hand, a SQLite row deleted outside livekit-resume) is rolled back by the operator's
usual commands: ``history`` lists every retained version with the lost one marked,
``revert``, ``import --takeover`` and ``repair`` write a readable version on top of the
damage, and no older version is touched. Real SQLite files and a real redis-server; the
sessions written by real text-mode ``AgentSession``s."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import redis as redis_sync
from livekit.agents import AgentSession

from livekit_resume import ResumableSession, open_store
from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Commit, Lease, Store, validate_commit
from livekit_resume.stores.log import Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.keys import KeyNames
from tests import _child_agent as child
from tests.test_cli import _converse, run, run_json, snapshot_of, started
from tests.test_redis_layout import HEAD, KEY, raw, real_store, session_keys
from tests.test_redis_layout import commit as layout_commit
from tests.test_redis_layout import vkey as layout_vkey

__all__ = ["real_store"]

# what is lost of the latest version: on Redis its body, its record, or both; on SQLite
# its row (the one way a SQLite version is lost)
LOSSES = [("sqlite", "record"), ("redis", "body"), ("redis", "record"), ("redis", "both")]


def _lose_latest(url: str, key: str, what: str) -> int:
    """Remove the latest version of ``key`` as an eviction or a hand would; its number."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///").split("?")[0]
        with sqlite3.connect(path) as db:
            (top,) = db.execute("SELECT MAX(version) FROM versions WHERE key=?", (key,)).fetchone()
            db.execute("DELETE FROM versions WHERE key=? AND version=?", (key, top))
        return int(top)
    client = redis_sync.Redis.from_url(url)
    try:
        prefix = KeyNames(os.environ["RESUME_NAMESPACE"]).prefix(key)
        top = int(cast(bytes, client.hget(prefix + "head", "version")))
        record = f"{prefix}v:{top}"
        gone = {"body": [record + ":b"], "record": [record], "both": [record, record + ":b"]}
        assert client.delete(*gone[what]) == len(gone[what])
        return top
    finally:
        client.close()


def _url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A fresh store: a SQLite file, or a namespace of a real redis-server."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    server = request.getfixturevalue("redis_server")  # skips where redis-server is missing
    monkeypatch.setenv("RESUME_NAMESPACE", f"lost{uuid.uuid4().hex[:8]}")
    return str(server.url)


@pytest.fixture(params=LOSSES, ids=["-".join(p) for p in LOSSES])
def lost(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, int]:
    """The store URL, a session key (two turns and a suspend, each a version) and the
    number of its latest version, lost."""
    backend, what = request.param
    url, key = _url(backend, request, tmp_path, monkeypatch), f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, key, ["remember the blue door", "remember the code 4711"]))
    return url, key, _lose_latest(url, key, what)


def _versions(url: str, key: str) -> list[Any]:
    async def go() -> list[Any]:
        store = open_store(url)
        try:
            return await store.versions(key)
        finally:
            await store.aclose()

    return asyncio.run(go())


def _kept(url: str, key: str, top: int) -> dict[int, Any]:
    return {n: snapshot_of(url, key, n).history for n in range(1, top)}


def test_the_latest_is_refused_as_corrupt(lost: tuple[str, str, int]) -> None:
    """The premise: what the loss does to a plain read of the latest."""
    url, key, _top = lost
    with pytest.raises(SnapshotCorrupt):
        snapshot_of(url, key)


def test_history_lists_every_version_with_the_lost_one_marked(lost: tuple[str, str, int]) -> None:
    url, key, top = lost
    rows = run_json(url, "history", key)
    assert [r["version"] for r in rows] == list(range(1, top + 1)), rows
    assert [r["damaged"] is not None for r in rows] == [False] * (top - 1) + [True], rows
    assert f"v:{top}" in rows[-1]["damaged"] or str(top) in rows[-1]["damaged"]
    shown = run(url, "history", key, env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    assert "damaged" in shown.stdout


def test_versions_lists_the_lost_latest_as_damaged(lost: tuple[str, str, int]) -> None:
    url, key, top = lost

    listed = _versions(url, key)
    assert [v.version for v in listed] == list(range(1, top + 1))
    assert [v.damaged for v in listed[:-1]] == [None] * (top - 1)
    assert listed[-1].damaged and listed[-1].info == {}


def test_revert_to_an_older_version_writes_it_on_top(lost: tuple[str, str, int]) -> None:
    url, key, top = lost
    kept = _kept(url, key, top)
    reverted = run_json(url, "revert", key, str(top - 1))
    assert reverted["written"] is True and reverted["version"] == top + 1, reverted
    assert snapshot_of(url, key).history == kept[top - 1]
    # nothing older was touched
    assert {n: snapshot_of(url, key, n).history for n in range(1, top)} == kept


def test_revert_to_the_lost_version_is_refused_and_writes_nothing(
    lost: tuple[str, str, int],
) -> None:
    url, key, top = lost
    before = run_json(url, "history", key)
    refused = run(url, "revert", key, str(top), env={"COLUMNS": "240"})
    assert refused.exit_code == 1 and "SnapshotCorrupt" in refused.stderr, refused.output
    assert run_json(url, "history", key) == before


def test_import_takeover_of_an_older_export_writes_it_on_top(
    lost: tuple[str, str, int], tmp_path: Path
) -> None:
    url, key, top = lost
    out = tmp_path / "older.lkrs"
    exported = run(url, "export", key, "--version", str(top - 1), "-o", str(out))
    assert exported.exit_code == 0, exported.output
    imported = run_json(url, "import", str(out), "--takeover")
    assert imported["version"] == top + 1, imported
    assert snapshot_of(url, key).history == Codec().decode(out.read_bytes()).history


def test_repair_rolls_back_to_the_newest_readable_version(lost: tuple[str, str, int]) -> None:
    url, key, top = lost
    kept = _kept(url, key, top)
    dry = run_json(url, "repair", key, "--dry-run")
    assert dry["written"] is None and dry["damage"], dry
    assert run_json(url, "history", key)[-1]["damaged"] is not None  # nothing written
    repaired = run_json(url, "repair", key)
    assert repaired["written"] == top + 1, repaired
    assert any(str(top) in d["reason"] for d in repaired["damage"]), repaired
    assert snapshot_of(url, key).history == kept[top - 1]
    assert run_json(url, "history", key)[-1]["damaged"] is None


def test_a_session_rolled_back_past_its_lost_latest_goes_on_in_a_worker(
    lost: tuple[str, str, int],
) -> None:
    """After the revert, a worker restores the session, talks and saves as before; every
    version from the revert on reads back."""
    url, key, top = lost
    kept = _kept(url, key, top)
    assert run_json(url, "revert", key, str(top - 1))["written"] is True
    asyncio.run(_converse(url, key, ["remember the green gate"]))
    latest = snapshot_of(url, key)
    texts = [str(i.get("content")) for i in latest.history]
    assert latest.history[: len(kept[top - 1])] == kept[top - 1]
    assert any("green gate" in t for t in texts), texts
    rows = run_json(url, "history", key)
    assert [r["damaged"] is not None for r in rows if r["version"] > top] == [False] * (
        len(rows) - top
    ), rows
    for r in rows:
        if r["version"] != top:
            snapshot_of(url, key, r["version"])  # each reads


def test_a_session_with_a_ttl_is_rolled_back_past_its_lost_latest(
    lost: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis store whose sessions expire (``RESUME_TTL``) moves every key's deadline on
    each write, so every write (lease, commit) first looks at every key of the session:
    a lost one refused them all (last round's known limit, this one's before the scripts
    asked the node whether the slot is settled). The revert lands."""
    url, key, top = lost
    monkeypatch.setenv("RESUME_TTL", "3600")
    kept = _kept(url, key, top)
    reverted = run_json(url, "revert", key, str(top - 1))
    assert reverted["written"] is True, reverted
    assert snapshot_of(url, key).history == kept[top - 1]


# -- the store's part: a whole commit over a base it cannot read ----------------------


def _whole(lease: Lease, base: int, items: list[bytes]) -> Commit:
    records = [Record("h", "", None)]
    records += [
        Record("h", f"w{n}", data, f"w{n - 1}" if n else None) for n, data in enumerate(items)
    ]
    return Commit(lease.key, lease.epoch, base, HEAD + b"whole", records, len(items), whole=True)


async def _three_versions(store: RedisStore) -> Lease:
    lease = await store.acquire(KEY, "w1")
    for base in range(3):
        await layout_commit(store, lease, base)
    return lease


async def test_a_commit_that_is_not_whole_is_refused_over_a_lost_record(
    real_store: RedisStore,
) -> None:
    """Only a commit that reads nothing of its base lands over a base it cannot read: a
    turn's records appended after a version whose log end is unknown would read data
    the writer never saw (or miss some)."""
    lease = await _three_versions(real_store)
    await raw(real_store).delete(layout_vkey(real_store, 3))
    before = await session_keys(real_store)
    with pytest.raises(SnapshotCorrupt, match="v:3"):
        await layout_commit(real_store, lease, 3)
    assert await session_keys(real_store) == before


@pytest.mark.parametrize("damage", ["record", "log cut", "log grown"])
async def test_a_whole_commit_lands_in_a_log_of_its_own_over_a_base_it_cannot_check(
    real_store: RedisStore, damage: str
) -> None:
    lease = await _three_versions(real_store)
    prefix = real_store._names.prefix(KEY)
    head = await raw(real_store).hgetall(prefix + "head")
    log = f"{prefix}log:{int(head[b'gen'])}"
    if damage == "record":
        await raw(real_store).delete(layout_vkey(real_store, 3))
    elif damage == "log cut":
        await raw(real_store).rpop(log)
    else:
        await raw(real_store).rpush(log, b"foreign")
    assert await real_store.commit(_whole(lease, 3, [b"a", b"b"])) == 4
    stored = await real_store.load(KEY)
    assert stored.streams == {"h": [("w0", b"a"), ("w1", b"b")]}
    # the log it checks from now on is its own: the next turn lands on top
    turn = Commit(KEY, lease.epoch, 4, HEAD + b"5", [Record("h", "t5", b"c", "w1")], 3)
    assert await real_store.commit(turn) == 5
    assert [i for i, _ in (await real_store.load(KEY)).streams["h"]] == ["w0", "w1", "t5"]
    if damage == "record":
        listed = await real_store.versions(KEY)  # keep=3: 3 (lost), 4, 5
        assert [(v.version, v.damaged is not None) for v in listed] == [
            (3, True),
            (4, False),
            (5, False),
        ]


@pytest.mark.parametrize(
    "records",
    [
        [Record("h", "a", b"x")],  # no clear first
        [Record("h", "", None), Record("g", "a", b"x")],  # a stream it did not clear
        [Record("h", "a", b"x"), Record("h", "", None)],  # cleared after an item
    ],
)
def test_a_whole_commit_that_does_not_clear_first_is_refused(records: list[Record]) -> None:
    with pytest.raises(ValueError, match="whole commit"):
        validate_commit(Commit(KEY, 1, 0, b"h", records, 1, whole=True))
    with pytest.raises(ValueError, match="whole must be a bool"):
        validate_commit(Commit(KEY, 1, 0, b"h", [], 0, whole=1))  # type: ignore[arg-type]


# -- the live worker's part: it holds the whole conversation --------------------------


@pytest.mark.parametrize("loss", [*LOSSES, ("redis", "log cut")], ids=lambda p: "-".join(p))
def test_a_live_worker_writes_its_session_whole_over_a_lost_latest(
    loss: tuple[str, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker holding the session finds the store cannot append to what it holds
    (the latest version's record or its log lost): it writes the conversation whole,
    every turn kept, rather than failing each save until the call ends unsaved."""
    backend, what = loss
    url, key = _url(backend, request, tmp_path, monkeypatch), f"room-{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await session.run(user_input="remember the blue door")
            top = await rs.checkpoint("turn")
            if what == "log cut":
                _cut_log(url, key)
            else:
                assert _lose_latest(url, key, what) == top
            await session.run(user_input="remember the green gate")
            assert await rs.checkpoint("turn") == top + 1
            await rs.suspend()
        finally:
            await store.aclose()

    asyncio.run(go())
    texts = " ".join(str(i.get("content")) for i in snapshot_of(url, key).history)
    assert "blue door" in texts and "green gate" in texts, texts


def _cut_log(url: str, key: str) -> None:
    client = redis_sync.Redis.from_url(url)
    try:
        prefix = KeyNames(os.environ["RESUME_NAMESPACE"]).prefix(key)
        gen = int(cast(bytes, client.hget(prefix + "head", "gen")))
        assert client.rpop(f"{prefix}log:{gen}") is not None
    finally:
        client.close()


async def _restored(
    url: str, key: str, *, salvage: bool
) -> tuple[Store, ResumableSession, AgentSession[Any]]:
    store = open_store(url)
    _model, session = child.build_session()
    rs = ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
    )
    try:
        agent = await rs.restore(session, default=child.Scribe, salvage=salvage)
    except BaseException:
        await store.aclose()
        raise
    await session.start(agent)
    return store, rs, session


def test_a_salvage_restore_goes_on_from_the_newest_version_that_reads(
    lost: tuple[str, str, int],
) -> None:
    """``restore(salvage=True)`` of a session whose latest version cannot be read at all
    restores the newest that can (the turns after it lost, logged); its first checkpoint
    writes the session whole on top, and every later restore reads it without salvage."""
    url, key, top = lost
    kept = _kept(url, key, top)

    async def go() -> int:
        with pytest.raises(SnapshotCorrupt):
            await _restored(url, key, salvage=False)
        store, rs, session = await _restored(url, key, salvage=True)
        try:
            assert rs.version == top
            await session.run(user_input="remember the green gate")
            written = await rs.checkpoint("turn")
            await rs.suspend()
        finally:
            await store.aclose()
        store, rs, session = await _restored(url, key, salvage=False)  # reads as it is
        try:
            await rs.suspend()
        finally:
            await store.aclose()
        return written

    assert asyncio.run(go()) == top + 1
    history = snapshot_of(url, key).history
    assert history[: len(kept[top - 1])] == kept[top - 1]
    texts = " ".join(str(i.get("content")) for i in history[len(kept[top - 1]) :])
    assert "green gate" in texts, texts


def test_a_version_whose_numbers_do_not_parse_is_listed_damaged_saying_why_once(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis record whose epoch is not a number: the version is listed damaged, and its
    text says what is wrong once (it was wrapped in the store's advice a second time)."""
    url, key = _url("redis", request, tmp_path, monkeypatch), f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, key, ["remember the blue door"]))
    client = redis_sync.Redis.from_url(url)
    try:
        prefix = KeyNames(os.environ["RESUME_NAMESPACE"]).prefix(key)
        client.hset(f"{prefix}v:1", "epoch", "not-a-number")
    finally:
        client.close()

    listed = _versions(url, key)
    assert listed[0].version == 1 and listed[0].damaged, listed
    why = listed[0].damaged
    assert "epoch" in why and why.count(key) == 1 and why.count("not a number") == 1, why
    assert [v.damaged for v in listed[1:]] == [None] * (len(listed) - 1)
