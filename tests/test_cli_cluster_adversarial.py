"""The operator's surface of ``livekit-resume`` against a real 3-primary Redis Cluster:
sessions on many slots, keys an eviction took (``maxmemory-policy allkeys-*``) while
others of the session stayed. One cluster for the whole run (the session fixture of
tests/redis_servers.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from livekit_resume import open_store
from livekit_resume.errors import SnapshotCorrupt
from tests.redis_servers import RedisCluster, RedisFactory
from tests.test_cli import _converse, run, run_json
from tests.test_cli_adversarial import _copy
from tests.test_redis_faults import calls, item_commit

pytest.importorskip("livekit_resume.stores.redis")

from redis.cluster import RedisCluster as Client

from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.keys import KeyNames


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> RedisCluster:
    found: RedisCluster = request.getfixturevalue("redis_cluster")
    return found


@pytest.fixture
def ns(monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"clu{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RESUME_NAMESPACE", name)
    return name


@pytest.fixture
def raw(cluster: RedisCluster) -> Iterator[Client]:
    """A plain cluster client, for what an eviction (or a hand) does to keys."""
    client = Client(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        yield client
    finally:
        client.close()


def _session_keys(raw: Client, ns: str, key: str) -> list[str]:
    pattern = f"{ns}:{{{key}}}:*"
    found = {k.decode() for k in raw.scan_iter(match=pattern, target_nodes=Client.ALL_NODES)}
    return sorted(found)


def _seeded(url: str, names: list[str]) -> None:
    asyncio.run(_converse(url, names[0], ["remember the blue door", "remember the code 4711"]))
    for name in names[1:]:
        _copy(url, names[0], name)


def _rows(url: str) -> dict[str, Any]:
    return {s["key"]: s for s in run_json(url, "ls")}


def test_a_session_whose_head_was_evicted_is_listed_as_damaged_and_rm_frees_it(
    cluster: RedisCluster, ns: str, raw: Client
) -> None:
    url = cluster.url
    names = ["aa", "mid", "zz"]
    _seeded(url, names)
    assert set(_rows(url)) == set(names)
    assert raw.delete(f"{ns}:{{mid}}:head") == 1  # the eviction took the head alone
    assert _session_keys(raw, ns, "mid")  # its versions and log remain

    listed = run(url, "--json", "ls")
    assert listed.exit_code == 0, listed.output
    rows = {s["key"]: s for s in json.loads(listed.stdout)}
    assert set(rows) == set(names)
    assert rows["mid"]["error"] == "SnapshotCorrupt"
    assert "error" not in rows["aa"] and "error" not in rows["zz"]
    table = run(url, "ls")
    assert table.exit_code == 0 and "damaged" in table.stdout
    assert "'mid'" in table.stderr and "lost its head" in table.stderr

    shown = run(url, "show", "mid")
    assert shown.exit_code == 1 and "Traceback" not in shown.output
    assert "SnapshotCorrupt" in shown.output and "lost its head" in shown.output

    assert run(url, "rm", "--yes", "mid").exit_code == 0
    assert _session_keys(raw, ns, "mid") == []
    assert set(_rows(url)) == {"aa", "zz"}


def test_a_headless_session_whose_first_keys_went_too_is_still_listed_as_damaged(
    cluster: RedisCluster, ns: str, raw: Client
) -> None:
    """Only its latest version and log generation left (a long-lived session: the first
    version and log generation trimmed long ago, or evicted with the head)."""
    url = cluster.url
    _seeded(url, ["s"])
    keys = _session_keys(raw, ns, "s")
    first = [k for k in keys if k.endswith((":head", ":v:1", ":v:1:b", ":log:0"))]
    assert f"{ns}:{{s}}:head" in first and len(first) < len(keys)
    raw.delete(*first)
    row = _rows(url)["s"]
    assert row["error"] == "SnapshotCorrupt"
    assert run(url, "rm", "--yes", "s").exit_code == 0
    assert _session_keys(raw, ns, "s") == []
    assert _rows(url) == {}


def test_a_session_deleted_whole_by_hand_is_not_listed(
    cluster: RedisCluster, ns: str, raw: Client
) -> None:
    url = cluster.url
    _seeded(url, ["gone", "kept"])
    raw.delete(*_session_keys(raw, ns, "gone"))
    assert set(_rows(url)) == {"kept"}


@pytest.fixture
def half_moved(cluster: RedisCluster, ns: str) -> Iterator[tuple[str, str]]:
    """Session ``s``'s slot half moved to another node, as ``redis-cli --cluster
    reshard`` leaves it between two MIGRATE batches: its first log generation moved,
    the rest not yet. Yields (the session key, the moved key); moved back after."""
    url = cluster.url
    _seeded(url, ["s"])
    head = f"{ns}:{{s}}:head"
    slot = cluster.nodes[0].cli("cluster", "keyslot", head).strip()
    src = next(n for n in cluster.nodes if n.cli("exists", head).strip() == "1")
    dst = next(n for n in cluster.nodes if n is not src)
    ids = {n.port: n.cli("cluster", "myid").strip() for n in (src, dst)}
    moved = f"{ns}:{{s}}:log:0"
    assert dst.cli("cluster", "setslot", slot, "importing", ids[src.port]).strip() == "OK"
    assert src.cli("cluster", "setslot", slot, "migrating", ids[dst.port]).strip() == "OK"
    try:
        assert src.cli("migrate", "127.0.0.1", str(dst.port), moved, "0", "5000").strip() == "OK"
        yield "s", moved
    finally:
        # MIGRATE from the importing node needs no ASKING: the key is there
        dst.cli("migrate", "127.0.0.1", str(src.port), moved, "0", "5000", "replace")
        for node in (src, dst):
            node.cli("cluster", "setslot", slot, "stable")


def test_rm_of_a_session_whose_slot_is_half_moved_deletes_nothing_and_says_retry(
    cluster: RedisCluster, ns: str, half_moved: tuple[str, str]
) -> None:
    key, moved = half_moved
    # the session's keys (its tombstone, laid first, is not one: docs/failure-model.md)
    before = {n.port: n.cli("--scan", "--pattern", f"{ns}:{{*").split() for n in cluster.nodes}
    removed = run(cluster.url, "rm", "--yes", key)
    assert removed.exit_code == 1, removed.output
    assert "StoreUnavailable" in removed.output and "Traceback" not in removed.output
    after = {n.port: n.cli("--scan", "--pattern", f"{ns}:{{*").split() for n in cluster.nodes}
    assert {p: sorted(k) for p, k in after.items()} == {p: sorted(k) for p, k in before.items()}
    assert any(moved in found for found in after.values())


def test_every_command_round_trips_sessions_on_many_slots_and_fails_typed(
    cluster: RedisCluster, ns: str, tmp_path: Any
) -> None:
    """export, import under another key (another slot), revert, release, history, diff,
    repair --dry-run, pause with nobody holding it: exit codes as docs/cli.md says,
    one line and no traceback on failure."""
    url = cluster.url
    names = ["a", "b{x}", "c%7B", "d"]
    _seeded(url, names)
    file = str(tmp_path / "a.lkr")
    assert run(url, "export", "a", "-o", file).exit_code == 0
    for new in ("moved-1", "moved{2}", "ü"):
        imported = run(url, "import", file, "--key", new)
        assert imported.exit_code == 0, imported.output
        assert "remember the blue door" in run(url, "show", new).stdout
    assert run(url, "import", file, "--key", "b{x}").exit_code == 0  # version 2
    assert run(url, "revert", "b{x}", "1").exit_code == 0
    assert [v["source"] for v in run_json(url, "history", "b{x}")][-1] == "revert"
    assert run(url, "release", "c%7B").exit_code == 0
    for argv in (["diff", "a", "1", "2"], ["repair", "a", "--dry-run"]):
        done = run(url, *argv)
        assert done.exit_code == 0, (argv, done.output)
    for argv, kind in (
        (["pause", "d"], "CommandRefused"),
        (["show", "nope"], "SnapshotNotFound"),
        (["show", "d", "--version", "99"], "SnapshotNotFound"),
        (["rm", "--yes", "nope"], "SnapshotNotFound"),
        (["revert", "nope", "1"], "SnapshotNotFound"),
    ):
        failed = run(url, "--json", *argv)
        assert failed.exit_code == 1, (argv, failed.output)
        assert json.loads(failed.stderr.strip().splitlines()[-1])["error"] == kind, argv
    assert set(_rows(url)) == {*names, "moved-1", "moved{2}", "ü"}


@pytest.mark.parametrize(("policy", "listed"), [("allkeys-lru", True), ("noeviction", False)])
async def test_a_ttl_store_lists_a_headless_session_only_where_the_server_evicts(
    make_redis: RedisFactory, policy: str, listed: bool
) -> None:
    """With a ttl, a listed member without its head is a session that expired, unless
    the server evicts keys: ``keys()`` scans for remains only then, and lists the
    session whose head was evicted (`info` says what is left)."""
    server = make_redis("--maxmemory", "64mb", "--maxmemory-policy", policy)
    store = RedisStore.from_url(server.url, namespace="ttl", ttl=3600.0)
    try:
        for key in ("alive", "lost"):
            lease = await store.acquire(key, "worker-a")
            assert await store.commit(item_commit(lease, 0, "a", None)) == 1
        assert server.cli("del", "ttl:{lost}:head").strip() == "1"
        scans = calls(server, "scan")
        assert await store.keys() == (["alive", "lost"] if listed else ["alive"])
        assert (calls(server, "scan") > scans) is listed
        if listed:
            with pytest.raises(SnapshotCorrupt, match="lost its head"):
                await store.info("lost")
    finally:
        await store.aclose()


def test_ls_scan_lists_again_the_sessions_of_a_lost_index_on_a_cluster(
    cluster: RedisCluster, ns: str, raw: Client
) -> None:
    """The index key evicted (or lost in a failover): idle sessions vanish from ``ls``
    until ``ls --scan`` finds them, a headless one among them shown damaged."""
    url = cluster.url
    names = ["a", "b{x}", "100%", "x}{y", "lost"]
    _seeded(url, names)
    assert raw.delete(f"{ns}:{{lost}}:head") == 1
    assert raw.delete(f"{ns}:sessions") == 1
    assert _rows(url) == {}
    scanned = run(url, "--json", "ls", "--scan")
    assert scanned.exit_code == 0, scanned.output
    rows = {s["key"]: s for s in json.loads(scanned.stdout)}
    assert set(rows) == set(names)
    assert rows["lost"]["error"] == "SnapshotCorrupt"
    assert set(_rows(url)) == set(names)  # listed again for good
    assert run(url, "rm", "--yes", "lost").exit_code == 0
    assert set(_rows(url)) == set(names) - {"lost"}


@pytest.fixture
def degradable_cluster(tmp_path: Any) -> Iterator[RedisCluster]:
    """A Cluster of its own, whose primaries a test may stop: it keeps serving the slots
    of the others meanwhile (``cluster-require-full-coverage no``)."""
    found = RedisCluster(tmp_path / "cluster", full_coverage=False).start()
    try:
        yield found
    finally:
        found.stop()


def test_ls_with_a_primary_down_lists_its_sessions_as_unreachable_and_fails(
    degradable_cluster: RedisCluster, ns: str
) -> None:
    """An operator lists sessions during an incident: one primary stopped (SIGSTOP, as
    a hung host). On main `ls` failed whole (StoreUnavailable, no row) once any listed
    session's head was on that node. Now every session is listed: those of the live
    nodes as they are, those of the stopped one as unreachable (also under --state,
    their state being unknown), and the command still exits 1 with a count, so that a
    script never takes the listing for the whole truth. With the node holding the index
    down, nothing can be listed: one StoreUnavailable line, no rows."""
    cluster = degradable_cluster
    url = cluster.url
    names = [f"s{n}" for n in range(8)]
    _seeded(url, names)
    client: Any = Client(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        names_of = KeyNames(ns)
        port_of = {name: client.get_node_from_key(names_of.head(name)).port for name in names}
        index_port = client.get_node_from_key(names_of.index).port
        # redis-py asks its default node (the first primary) for COMMAND before any
        # command: with that node down no client starts at all (docs/failure-model.md)
        default_port = client.get_default_node().port
    finally:
        client.close()
    victim = next(
        n
        for n in cluster.nodes
        if n.port not in (index_port, default_port) and n.port in port_of.values()
    )
    lost = {name for name, port in port_of.items() if port == victim.port}
    assert lost and lost != set(names)
    victim.pause()
    try:
        started = time.monotonic()
        listed = run(url, "--json", "ls", "--state", "suspended")
        took = time.monotonic() - started
        assert listed.exit_code == 1, listed.output
        assert listed.stdout, listed.stderr
        rows = {r["key"]: r for r in json.loads(listed.stdout)}
        assert set(rows) == set(names)  # the unreachable ones too: their state is unknown
        assert {k for k, r in rows.items() if r["state"] == "unreachable"} == lost
        assert all(rows[k]["error"] == "StoreUnavailable" for k in lost)
        assert all(rows[k]["state"] == "suspended" for k in set(names) - lost)
        failure = json.loads(listed.stderr.strip().splitlines()[-1])
        assert failure["error"] == "StoreUnavailable"
        assert f"{len(lost)} listed session" in failure["message"]
        assert took < 60, took  # a hang guard: 7-9 s here (the CLI waits on that node once)
    finally:
        victim.resume()
    index_node = next(n for n in cluster.nodes if n.port == index_port)
    index_node.pause()
    try:
        failed = run(url, "--json", "ls")
        assert failed.exit_code == 1, failed.output
        assert failed.stdout.strip() == ""
        assert json.loads(failed.stderr.strip().splitlines()[-1])["error"] == "StoreUnavailable"
    finally:
        index_node.resume()


def test_an_unreachable_session_reads_unreachable_and_a_damaged_one_damaged() -> None:
    """The table's state column and the JSON row of each kind of unreadable session."""
    from livekit_resume.cli import render
    from livekit_resume.cli.snapshots import Unreadable
    from livekit_resume.errors import StoreUnavailable

    rows = render.session_rows(
        [
            Unreadable("far", StoreUnavailable("node down")),
            Unreadable("torn", SnapshotCorrupt("lost its head")),
        ],
        now=0.0,
    )
    assert [(r["key"], r["state"], r["error"]) for r in rows] == [
        ("far", "unreachable", "StoreUnavailable"),
        ("torn", None, "SnapshotCorrupt"),  # as --json printed it before
    ]
    console = render.console()
    with console.capture() as captured:
        console.print(render.sessions_table(rows, title="sessions"))
    lines = captured.get().splitlines()
    assert any("far" in ln and "unreachable" in ln for ln in lines)
    assert any("torn" in ln and "damaged" in ln for ln in lines)


def test_ls_of_more_sessions_than_a_nodes_pool_lists_every_one(
    cluster: RedisCluster, ns: str
) -> None:
    """A Cluster client holds at most ``pool_size`` (50) connections per node and raises
    at once past it (redis-py's MaxConnectionsError, not a wait). `ls` read every
    listed session's info at the same moment: with more than 50 sessions on a node, most
    of them were listed as unreachable and the command failed, while every node was up.
    Now the store's commands wait for one of ``pool_size`` places, and the infos of a
    page go in pipelines, one per node: each session is listed as it is, and `ls` exits
    0 (either change alone makes this pass)."""
    names = [f"crowd-{n:04d}" for n in range(240)]

    async def seed() -> None:
        store = open_store(cluster.url)  # in the namespace of RESUME_NAMESPACE
        try:
            for name in names:
                await store.release(await store.acquire(name, "seeder"))
        finally:
            await store.aclose()

    asyncio.run(seed())
    listed = run(cluster.url, "--json", "ls")
    assert listed.exit_code == 0, listed.stderr[-500:]
    rows = {r["key"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == set(names)
    unreadable = [r for r in rows.values() if "error" in r]
    assert not unreadable, (len(unreadable), unreadable[:2])
