"""Hunted in the rollback of a session whose latest (or an older) version is lost
(commit e449639): real SQLite files, a real redis-server and Redis Cluster, real
AgentSessions. Eleven of these failed on that commit (a Redis trim or compaction refused
by the lost version it would drop, a SQLite whole commit appended after a cut log, a
SQLite row with altered values refusing the whole listing); each docstring says what is
expected and what happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid
from pathlib import Path

import pytest
import redis as redis_sync

from livekit_resume import open_store
from livekit_resume.errors import SnapshotCorrupt, StoreUnavailable
from livekit_resume.stores.base import Commit, Lease
from livekit_resume.stores.log import Record
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.keys import KeyNames
from tests.test_cli import _converse, run, run_json, snapshot_of, started
from tests.test_lost_latest import _url
from tests.test_redis_layout import HEAD, KEY, raw, real_store, session_keys
from tests.test_redis_layout import commit as layout_commit
from tests.test_redis_layout import vkey as layout_vkey

__all__ = ["real_store"]


# -- helpers ---------------------------------------------------------------------------


def _whole(lease: Lease, base: int, items: list[bytes], cid: str = "") -> Commit:
    records = [Record("h", "", None)]
    records += [
        Record("h", f"w{n}", data, f"w{n - 1}" if n else None) for n, data in enumerate(items)
    ]
    return Commit(
        lease.key,
        lease.epoch,
        base,
        HEAD + b"whole",
        records,
        len(items),
        commit_id=cid,
        whole=True,
    )


def _turn(lease: Lease, base: int, after: str) -> Commit:
    n = base + 1
    return Commit(
        lease.key, lease.epoch, base, HEAD + b"%d" % n, [Record("h", f"t{n}", b"x%d" % n, after)], n
    )


async def _three(store: RedisStore) -> Lease:
    lease = await store.acquire(KEY, "w1")
    for base in range(3):
        await layout_commit(store, lease, base)
    return lease


def _lose(url: str, key: str, n: int, what: str = "record") -> None:
    """Remove version ``n`` (not necessarily the latest) as an eviction or a hand would."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///").split("?")[0]
        with sqlite3.connect(path) as db:
            assert (
                db.execute("DELETE FROM versions WHERE key=? AND version=?", (key, n)).rowcount == 1
            )
        return
    client = redis_sync.Redis.from_url(url)
    try:
        prefix = KeyNames(os.environ["RESUME_NAMESPACE"]).prefix(key)
        record = f"{prefix}v:{n}"
        gone = {"body": [record + ":b"], "record": [record], "both": [record, record + ":b"]}
        assert client.delete(*gone[what]) == len(gone[what])
    finally:
        client.close()


def _redis_keys(url: str, key: str) -> list[str]:
    client = redis_sync.Redis.from_url(url)
    try:
        prefix = KeyNames(os.environ["RESUME_NAMESPACE"]).prefix(key)
        pattern = prefix.replace("{", "\\{").replace("}", "\\}") + "*"
        return sorted(k.decode() for k in client.scan_iter(match=pattern))
    finally:
        client.close()


BACKENDS = [("sqlite", "record"), ("redis", "record"), ("redis", "body")]


@pytest.fixture(params=BACKENDS, ids=["-".join(p) for p in BACKENDS])
def loss(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    backend, what = request.param
    return _url(backend, request, tmp_path, monkeypatch), what


def _session(url: str, turns: int) -> str:
    key = f"room-{uuid.uuid4().hex[:6]}"
    asyncio.run(_converse(url, key, [f"remember the number {n}" for n in range(turns)]))
    return key


# -- trim past a damaged version -----------------------------------------------------


async def test_turns_after_a_whole_commit_over_a_lost_latest_go_on_past_keep(
    real_store: RedisStore,
) -> None:
    """Expected (docs/cli.md: "the next turns append to it as usual"): after a whole
    commit over a lost v:3 (keep=3), every later turn lands. Actual: once the lost v:3 is
    the version a commit trims, commit.lua's assert_trim_here (session.lua
    assert_version_here) refuses it with SnapshotCorrupt: the session can never be
    written again (trim is what would drop the damaged version)."""
    lease = await _three(real_store)
    await raw(real_store).delete(layout_vkey(real_store, 3))
    assert await real_store.commit(_whole(lease, 3, [b"a"])) == 4
    after = "w0"
    for base in range(4, 8):
        assert await real_store.commit(_turn(lease, base, after)) == base + 1
        after = f"t{base + 1}"
    assert [i for i, _ in (await real_store.load(KEY)).streams["h"]] == [
        "w0",
        "t5",
        "t6",
        "t7",
        "t8",
    ]
    assert [v.damaged for v in await real_store.versions(KEY)] == [None] * 3


async def test_an_older_lost_version_does_not_block_turns_once_it_is_trimmed(
    real_store: RedisStore,
) -> None:
    """Expected: an older version lost (v:2, not the latest) leaves the latest readable
    and appendable; turns go on and trim it away. Actual: the commit that would trim
    the lost v:2 is refused (session.lua assert_trim_here -> assert_version_here)."""
    lease = await _three(real_store)
    await raw(real_store).delete(layout_vkey(real_store, 2))
    assert [v.damaged is not None for v in await real_store.versions(KEY)] == [False, True, False]
    after = "i3"
    for base in range(3, 7):
        assert await real_store.commit(_turn(lease, base, after)) == base + 1
        after = f"t{base + 1}"
    assert [v.damaged for v in await real_store.versions(KEY)] == [None] * 3


def test_a_worker_goes_on_saving_past_keep_after_a_revert_over_a_lost_latest(
    loss: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expected: after `revert` over a lost latest, a worker saves every turn as usual
    (docs/cli.md). Actual on Redis: once the lost version reaches the trim window the
    worker's checkpoint, and its whole rewrite, are refused with SnapshotCorrupt
    (session.lua assert_trim_here), the turns unsaved."""
    url, what = loss
    monkeypatch.setenv("RESUME_KEEP", "3")
    key = _session(url, 2)  # versions 1, 2, 3 (suspend)
    _lose(url, key, 3, what)
    assert run_json(url, "revert", key, "2")["written"] is True  # v4
    asyncio.run(_converse(url, key, [f"remember the colour {c}" for c in ("red", "green", "blue")]))
    texts = " ".join(str(i.get("content")) for i in snapshot_of(url, key).history)
    assert "colour blue" in texts, texts
    rows = run_json(url, "history", key)
    assert all(r["damaged"] is None for r in rows), rows


# -- several damaged versions, an older one, the oldest ---------------------------------


def test_repair_over_two_lost_versions_rolls_back_to_the_newest_that_reads(
    loss: tuple[str, str],
) -> None:
    """Two versions lost (the latest and the one before): `repair` rolls back to the
    newest that reads and says which versions are lost; no older one is touched."""
    url, what = loss
    key = _session(url, 3)  # 1..4
    kept = {n: snapshot_of(url, key, n).history for n in (1, 2)}
    _lose(url, key, 4, what)
    _lose(url, key, 3, what)
    rows = run_json(url, "history", key)
    assert [r["damaged"] is not None for r in rows] == [False, False, True, True], rows
    repaired = run_json(url, "repair", key)
    assert repaired["written"] == 5, repaired
    reasons = " ".join(d["reason"] for d in repaired["damage"])
    assert "3, 4" in reasons, reasons
    assert snapshot_of(url, key).history == kept[2]
    assert {n: snapshot_of(url, key, n).history for n in (1, 2)} == kept


def test_salvage_restore_over_two_lost_versions_restores_the_newest_that_reads(
    loss: tuple[str, str],
) -> None:
    url, what = loss
    key = _session(url, 3)
    kept = snapshot_of(url, key, 2).history
    _lose(url, key, 4, what)
    _lose(url, key, 3, what)

    async def go() -> int:
        store = open_store(url)
        try:
            from tests.test_lost_latest import _restored

            await store.aclose()
            store, rs, session = await _restored(url, key, salvage=True)
            await session.run(user_input="remember the green gate")
            written = await rs.checkpoint("turn")
            await rs.suspend()
            return written
        finally:
            await store.aclose()

    assert asyncio.run(go()) == 5
    history = snapshot_of(url, key).history
    assert history[: len(kept)] == kept
    assert "green gate" in " ".join(str(i.get("content")) for i in history)


def test_an_older_lost_version_is_listed_damaged_and_the_latest_still_reads(
    loss: tuple[str, str],
) -> None:
    url, what = loss
    key = _session(url, 2)  # 1..3
    latest = snapshot_of(url, key).history
    _lose(url, key, 2, what)
    rows = run_json(url, "history", key)
    assert [r["damaged"] is not None for r in rows] == [False, True, False], rows
    assert snapshot_of(url, key).history == latest
    repaired = run_json(url, "repair", key)  # the latest reads: nothing to repair
    assert repaired["written"] is None, repaired
    refused = run(url, "revert", key, "2")
    assert refused.exit_code == 1 and "SnapshotCorrupt" in refused.stderr, refused.output
    assert run_json(url, "history", key) == rows


def test_a_lost_oldest_version_is_listed_or_trimmed_never_a_refusal(
    loss: tuple[str, str],
) -> None:
    """The oldest retained version lost: history still answers, the rest reads, and the
    session takes turns."""
    url, what = loss
    key = _session(url, 2)  # 1..3
    _lose(url, key, 1, what)
    rows = run_json(url, "history", key)
    assert [r["version"] for r in rows][-2:] == [2, 3], rows
    for n in (2, 3):
        snapshot_of(url, key, n)
    asyncio.run(_converse(url, key, ["remember the red roof"]))
    assert "red roof" in " ".join(str(i.get("content")) for i in snapshot_of(url, key).history)


# -- diff, ls, history JSON ------------------------------------------------------------


def test_diff_with_a_lost_version_is_a_typed_error_and_changes_nothing(
    loss: tuple[str, str],
) -> None:
    url, what = loss
    key = _session(url, 2)
    _lose(url, key, 3, what)
    before = run_json(url, "history", key)
    for a, b in (("2", "3"), ("3", "2")):
        got = run(url, "diff", key, a, b)
        assert got.exit_code == 1 and "SnapshotCorrupt" in got.output, got.output
    assert run_json(url, "diff", key, "1", "2") is not None
    assert run_json(url, "history", key) == before


def test_ls_lists_the_healthy_sessions_beside_a_damaged_one(loss: tuple[str, str]) -> None:
    """Expected: `ls` of a store with one session whose latest is lost still lists the
    other sessions (exit 0); the damaged one listed or reported, not the whole listing
    refused."""
    url, what = loss
    healthy = _session(url, 1)
    damaged = _session(url, 1)
    _lose(url, damaged, 2, what)
    got = run(url, "--json", "ls")
    assert got.exit_code == 0, got.output
    import json

    keys = [s["key"] for s in json.loads(got.stdout)]
    assert healthy in keys, keys


def test_history_json_of_a_lost_record_holds_nulls_not_zeros(loss: tuple[str, str]) -> None:
    url, what = loss
    key = _session(url, 1)
    _lose(url, key, 2, what)
    rows = run_json(url, "history", key)
    last = rows[-1]
    assert isinstance(last["damaged"], str) and last["damaged"], last
    assert last["reason"] is None and last["items"] is None and last["state"] is None
    if what == "record":
        assert last["epoch"] is None and last["created_at"] is None and last["bytes"] is None, last
    else:  # the record holds them still
        assert last["epoch"] == rows[0]["epoch"] and last["bytes"], last
    assert all(r["damaged"] is None for r in rows[:-1])


# -- whole commits: retries, rm, TTL ---------------------------------------------------


async def test_a_whole_commit_retried_with_its_commit_id_lands_once(
    real_store: RedisStore,
) -> None:
    lease = await _three(real_store)
    await raw(real_store).delete(layout_vkey(real_store, 3))
    assert await real_store.commit(_whole(lease, 3, [b"a", b"b"], cid="c1")) == 4
    keys = await session_keys(real_store)
    assert await real_store.commit(_whole(lease, 3, [b"a", b"b"], cid="c1")) == 4
    assert await session_keys(real_store) == keys
    assert (await real_store.load(KEY)).streams == {"h": [("w0", b"a"), ("w1", b"b")]}
    # a different commit over the same base is refused (moved), nothing written
    with pytest.raises(Exception) as refused:
        await real_store.commit(_whole(lease, 3, [b"c"], cid="c2"))
    assert type(refused.value).__module__ == "livekit_resume.errors", refused.value
    assert await session_keys(real_store) == keys


@pytest.mark.parametrize("damage", ["record", "body", "log cut", "log grown"])
async def test_rm_after_a_new_generation_leaves_no_key(real_store: RedisStore, damage: str) -> None:
    lease = await _three(real_store)
    prefix = real_store._names.prefix(KEY)
    log0 = f"{prefix}log:0"
    if damage == "record":
        await raw(real_store).delete(layout_vkey(real_store, 3))
    elif damage == "body":
        await raw(real_store).delete(layout_vkey(real_store, 3) + ":b")
    elif damage == "log cut":
        await raw(real_store).rpop(log0)
    else:
        await raw(real_store).rpush(log0, b"foreign")
    assert await real_store.commit(_whole(lease, 3, [b"a"])) == 4
    assert await real_store.commit(_turn(lease, 4, "w0")) == 5
    assert await real_store.delete(KEY)
    assert await session_keys(real_store) == []


async def test_generations_below_a_trimmed_damaged_version_are_deleted(
    real_store: RedisStore,
) -> None:
    """After a log cut (v:3 intact, log:0 short) and a whole commit (log:1), once v:1..3
    are trimmed log:0 is deleted: no generation is left behind."""
    lease = await _three(real_store)
    prefix = real_store._names.prefix(KEY)
    await raw(real_store).rpop(f"{prefix}log:0")
    assert await real_store.commit(_whole(lease, 3, [b"a"])) == 4
    after = "w0"
    for base in range(4, 7):
        assert await real_store.commit(_turn(lease, base, after)) == base + 1
        after = f"t{base + 1}"
    keys = [k.removeprefix(prefix) for k in await session_keys(real_store)]
    assert "log:0" not in keys, keys
    assert sorted(keys) == sorted(
        ["head", "log:1", "v:5", "v:5:b", "v:6", "v:6:b", "v:7", "v:7:b"]
    ), keys


# -- SQLite: a log cut, a row altered --------------------------------------------------


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/sessions.db"


def test_sqlite_revert_over_a_cut_log_writes_a_version_that_reads(tmp_path: Path) -> None:
    """Expected (failure-model: "the latest version's record lost ... or the log it ends
    cut or grown": revert writes a whole version on top, readable): after the last log
    row of the latest version is deleted, `revert KEY 1` writes v4 and v4 reads.
    Actual: SQLite appends the whole commit to the same generation after the hole
    (sqlite/store.py `_commit`, `_insert_log` at s.log_len, no new generation), so the
    written version reads the hole and is SnapshotCorrupt (or the revert is refused)."""
    url = _sqlite_url(tmp_path)
    key = _session(url, 2)  # 1..3
    kept = snapshot_of(url, key, 1).history
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        (gen, end) = db.execute(
            "SELECT gen, log_end FROM versions WHERE key=? AND version=3", (key,)
        ).fetchone()
        (end1,) = db.execute(
            "SELECT log_end FROM versions WHERE key=? AND version=1", (key,)
        ).fetchone()
        assert end > end1  # the cut row is read by versions 2 and 3, not by 1
        assert (
            db.execute(
                "DELETE FROM log WHERE key=? AND gen=? AND seq=?", (key, gen, end - 1)
            ).rowcount
            == 1
        )
    with pytest.raises(SnapshotCorrupt):
        snapshot_of(url, key)
    reverted = run(url, "--json", "revert", key, "1")
    assert reverted.exit_code == 0, reverted.output
    assert snapshot_of(url, key).history == kept
    asyncio.run(_converse(url, key, ["remember the red roof"]))
    assert "red roof" in " ".join(str(i.get("content")) for i in snapshot_of(url, key).history)


@pytest.mark.parametrize(
    "column,value", [("info", "not json"), ("epoch", "x"), ("head", "text, not bytes")]
)
def test_sqlite_latest_row_altered_is_listed_damaged_and_repaired(
    tmp_path: Path, column: str, value: str
) -> None:
    """Expected (SnapshotInfo.damaged: "its record lost or altered"): the latest row with
    a value no commit writes is listed `damaged` by history, older versions listed, and
    `repair` rolls back past it. Actual (for info/epoch): `versions` refuses the whole
    listing with SnapshotCorrupt (sqlite/store.py `versions`: `altered(...)` raised for
    one bad row, `_info` raising), so history, revert and repair are all refused."""
    url = _sqlite_url(tmp_path)
    key = _session(url, 2)  # 1..3
    kept = snapshot_of(url, key, 2).history
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.execute(f"UPDATE versions SET {column}=? WHERE key=? AND version=3", (value, key))
    with pytest.raises(SnapshotCorrupt):
        snapshot_of(url, key)
    rows = run(url, "--json", "history", key)
    assert rows.exit_code == 0, rows.output
    repaired = run_json(url, "repair", key)
    assert repaired["written"] == 4, repaired
    assert snapshot_of(url, key).history == kept


# -- a live worker and an operator racing over the damage -------------------------------


def test_a_worker_fenced_by_a_revert_over_its_lost_latest_writes_nothing(
    loss: tuple[str, str],
) -> None:
    """The worker holds the session; its latest version is lost; an operator's
    `revert --takeover` rolls back. The worker's next save is LeaseLost (it does not
    write its conversation whole over the operator's revert)."""
    from livekit_resume.errors import LeaseLost

    url, what = loss
    key = f"room-{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await session.run(user_input="remember the blue door")
            await rs.checkpoint("turn")  # 1
            await session.run(user_input="remember the code 4711")
            top = await rs.checkpoint("turn")  # 2
            _lose(url, key, top, what)
            reverted = await asyncio.to_thread(run_json, url, "revert", key, "1", "--takeover")
            assert reverted["written"] is True and reverted["version"] == top + 1
            await session.run(user_input="remember the green gate")
            with pytest.raises(LeaseLost):
                await rs.checkpoint("turn")
            with pytest.raises(LeaseLost):
                await rs.checkpoint("turn")
        finally:
            await store.aclose()

    asyncio.run(go())
    texts = " ".join(str(i.get("content")) for i in snapshot_of(url, key).history)
    assert "blue door" in texts and "code 4711" not in texts and "green gate" not in texts, texts
    assert run_json(url, "history", key)[-1]["version"] == 3


def test_two_reverts_over_the_same_lost_latest_both_read(loss: tuple[str, str]) -> None:
    url, what = loss
    key = _session(url, 2)
    kept = {n: snapshot_of(url, key, n).history for n in (1, 2)}
    _lose(url, key, 3, what)
    assert run_json(url, "revert", key, "1")["version"] == 4
    assert run_json(url, "revert", key, "2")["version"] == 5
    assert snapshot_of(url, key, 4).history == kept[1]
    assert snapshot_of(url, key).history == kept[2]
    assert run_json(url, "revert", key, "5").get("written") is False


# -- Redis Cluster: a slot half moved --------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize(
    "left", [("v:3",), ("v:3", "v:3:b", "log:0")], ids=["record", "record-log"]
)
async def test_versions_of_a_half_moved_slot_is_unavailable_not_damaged(
    tmp_path: Path, left: tuple[str, ...]
) -> None:
    """A slot half moved (head on the importing node, the latest record not yet):
    `versions` is StoreUnavailable or lists nothing damaged; a whole commit lands or is
    StoreUnavailable, and after the move every version reads."""
    from tests.test_redis_layout_adversarial import KEY as AKEY
    from tests.test_redis_layout_adversarial import half_moved

    everything = ("head", "log:0", "v:1", "v:1:b", "v:2", "v:2:b", "v:3", "v:3:b")
    moved = tuple(k for k in everything if k not in left)
    async with half_moved(tmp_path, "hl", moved) as (store, lease, move):
        with contextlib.suppress(StoreUnavailable):
            listed = await asyncio.wait_for(store.versions(AKEY), 20)
            assert [v.damaged for v in listed] == [None] * len(listed), listed
        landed = False
        with contextlib.suppress(StoreUnavailable):
            landed = await asyncio.wait_for(store.commit(_whole(lease, 3, [b"a"])), 20) == 4
        move.finish()
        if not landed:
            assert await store.commit(_whole(lease, 3, [b"a"])) == 4
        listed = await store.versions(AKEY)
        assert [(v.version, v.damaged) for v in listed] == [(2, None), (3, None), (4, None)]
        for n in (2, 3):
            assert (await store.load(AKEY, n)).head == HEAD + b"%d" % n
        assert (await store.load(AKEY)).streams == {"h": [("w0", b"a")]}
        assert await store.delete(AKEY)
        assert move.keys_on(move.target) == [] and move.keys_on(move.source) == []


# -- compaction, mixed layouts, salvage with nothing readable --------------------------


async def test_a_long_log_is_compacted_after_a_whole_commit_over_a_lost_latest(
    real_store: RedisStore,
) -> None:
    """Expected: after the whole commit over the lost v:3 (log:1), a commit whose log
    needs compaction is compacted (a new generation, the version reading the same).
    Actual: compact.lua's assert_whole refuses while the damaged v:3 is retained (and a
    commit past keep cannot trim it, see above): the log is never folded."""
    lease = await _three(real_store)
    await raw(real_store).delete(layout_vkey(real_store, 3))
    assert await real_store.commit(_whole(lease, 3, [b"a"])) == 4
    records = [Record("h", "", None)] + [Record("h", f"e{n}", b"e", None) for n in range(80)]
    records += [Record("h", "", None), Record("h", "z", b"z", None)]
    assert await real_store.commit(Commit(KEY, lease.epoch, 4, HEAD + b"5", records, 1)) == 5
    head = await raw(real_store).hgetall(real_store._names.prefix(KEY) + "head")
    assert (await real_store.load(KEY)).streams == {"h": [("z", b"z")]}
    assert int(head[b"gen"]) == 2, head


async def test_an_old_layout_version_under_a_lost_latest_is_reverted_to(
    real_store: RedisStore,
) -> None:
    """Mixed layouts: v:2 written as earlier releases did (head and info in its hash),
    v:3 lost. versions lists v:2 readable, a whole commit of its streams lands on top,
    and the old-layout version still reads."""
    from tests.test_redis_layout import to_old_layout

    lease = await _three(real_store)
    await to_old_layout(real_store, 2)
    before = await real_store.load(KEY, 2)
    await raw(real_store).delete(layout_vkey(real_store, 3), layout_vkey(real_store, 3) + ":b")
    listed = await real_store.versions(KEY)
    assert [(v.version, v.damaged is None) for v in listed] == [(1, True), (2, True), (3, False)]
    assert listed[1].info.get("title") == "turn 2"
    assert await real_store.commit(_whole(lease, 3, [b"x"])) == 4
    assert (await real_store.load(KEY, 2)) == before
    assert await real_store.delete(KEY)
    assert await session_keys(real_store) == []


def test_a_salvage_restore_with_no_version_readable_releases_the_lease(
    loss: tuple[str, str],
) -> None:
    """Every retained version lost: restore(salvage=True) raises SnapshotCorrupt, writes
    nothing, and leaves no lease behind (another worker takes the key without takeover)."""
    url, what = loss
    key = _session(url, 1)  # 1, 2
    _lose(url, key, 2, what)
    _lose(url, key, 1, what)
    before = run(url, "--json", "history", key).output

    async def go() -> None:
        from tests.test_lost_latest import _restored

        with pytest.raises(SnapshotCorrupt):
            await _restored(url, key, salvage=True)
        store = open_store(url)
        try:
            lease = await store.acquire(key, "other")  # SessionBusy if the lease was left
            await store.release(lease)
        finally:
            await store.aclose()

    asyncio.run(go())
    after = run(url, "--json", "history", key).output
    assert after == before


def test_show_and_export_of_the_lost_version_are_refused_and_write_no_file(
    loss: tuple[str, str], tmp_path: Path
) -> None:
    url, what = loss
    key = _session(url, 1)
    _lose(url, key, 2, what)
    shown = run(url, "show", key, "--version", "2")
    assert shown.exit_code == 1 and "SnapshotCorrupt" in shown.output, shown.output
    out = tmp_path / "x.lkrs"
    exported = run(url, "export", key, "--version", "2", "-o", str(out))
    assert exported.exit_code == 1 and "SnapshotCorrupt" in exported.output, exported.output
    assert not out.exists()
    assert run(url, "show", key, "--version", "1").exit_code == 0
