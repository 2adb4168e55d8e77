"""Defects hunted in the Redis version layout of commit 44a0608 (a version record of
short fields, its head and info in a body key ``v:<n>:b``), against real redis-server
processes: sessions mixing records of both layouts, an operator getting older versions
back from a session whose latest body is gone, TTLs, ACL users of both lines, eviction.
Complements tests/test_redis_layout.py (not repeated here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from livekit_resume.errors import SnapshotCorrupt, StoreUnavailable
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Commit, Lease, Record, Stored
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.keys import KeyNames
from tests.redis_servers import RedisFactory, RedisServer
from tests.test_cli import _converse, run, run_json, snapshot_of
from tests.test_redis_layout import HEAD, commit
from tests.test_security import earlier_acl_user

KEY = "room-hunt"
OLD_FIELDS = {"epoch", "created", "head", "info", "gen", "end", "size", "cid", "records"}
NEW_FIELDS = OLD_FIELDS - {"head", "info"}


# -- helpers ---------------------------------------------------------------------------


def _sync_client(port: int) -> Any:
    """A plain redis-py client (its replies typed loosely: bytes here)."""
    return redis_sync.Redis(host="127.0.0.1", port=port)


def sync_old_layout(client: Any, prefix: str, n: int) -> None:
    """Version ``n`` rewritten as the releases before the body key wrote it."""
    vk = f"{prefix}v:{n}"
    body = client.get(vk + ":b")
    assert body is not None, vk
    digits, _, rest = body.partition(b":")
    size = int(digits)
    client.hset(vk, mapping={"head": rest[:size], "info": rest[size:]})
    client.delete(vk + ":b")
    assert {k.decode() for k in client.hkeys(vk)} == OLD_FIELDS


def sync_keys(client: Any, prefix: str) -> list[str]:
    pattern = prefix.replace("{", "\\{").replace("}", "\\}") + "*"
    return sorted(k.decode() for k in client.scan_iter(match=pattern))


def dump_all(client: Any, prefix: str) -> dict[str, Any]:
    """Every key of the session with its value, to tell nothing changed."""
    out: dict[str, Any] = {}
    for k in sync_keys(client, prefix):
        t = client.type(k).decode()
        if t == "hash":
            out[k] = client.hgetall(k)
        elif t == "list":
            out[k] = client.lrange(k, 0, -1)
        else:
            out[k] = client.get(k)
    return out


def latest(client: Any, prefix: str) -> int:
    return int(client.hget(prefix + "head", "version"))


class Cli:
    """A namespace of a real server, its sessions written by a real AgentSession."""

    def __init__(self, server: RedisServer, namespace: str) -> None:
        self.url = str(server.url)
        self.namespace = namespace
        self.client = _sync_client(server.port)

    def prefix(self, key: str) -> str:
        return KeyNames(self.namespace).prefix(key)

    def converse(self, key: str, lines: list[str]) -> None:
        asyncio.run(_converse(self.url, key, lines))


@pytest.fixture
def cli(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    namespace = f"hunt{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RESUME_NAMESPACE", namespace)
    c = Cli(redis_server, namespace)
    try:
        yield c
    finally:
        c.client.close()


# -- an operator getting older versions back from a session whose latest body is gone --


def test_show_and_export_of_an_older_version_work_when_the_latest_body_is_corrupt(
    cli: Cli, tmp_path: Path
) -> None:
    key = "room-show"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    prefix = cli.prefix(key)
    top = latest(cli.client, prefix)
    want = snapshot_of(cli.url, key, top - 1)
    cli.client.set(f"{prefix}v:{top}:b", b"999:short")
    shown = run(cli.url, "show", key, "--version", str(top - 1))
    assert shown.exit_code == 0, shown.output
    out = tmp_path / "older.lkrs"
    exported = run(cli.url, "export", key, "--version", str(top - 1), "-o", str(out))
    assert exported.exit_code == 0, exported.output
    assert Codec().decode(out.read_bytes()).history == want.history
    # the latest is refused by name
    latest_show = run(cli.url, "show", key)
    assert latest_show.exit_code == 1 and "SnapshotCorrupt" in latest_show.stderr


def test_an_older_version_exported_comes_back_after_rm_when_the_latest_body_is_missing(
    cli: Cli, tmp_path: Path
) -> None:
    """The way back failure-model.md gives for a session whose latest version is lost:
    export an older version, rm the session, import the export."""
    key = "room-way-back"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    prefix = cli.prefix(key)
    top = latest(cli.client, prefix)
    want = snapshot_of(cli.url, key, top - 1)
    cli.client.delete(f"{prefix}v:{top}:b")
    out = tmp_path / "older.lkrs"
    exported = run(cli.url, "export", key, "--version", str(top - 1), "-o", str(out))
    assert exported.exit_code == 0, exported.output
    assert run(cli.url, "rm", key, "--yes").exit_code == 0
    imported = run(cli.url, "import", str(out))
    assert imported.exit_code == 0, imported.output
    assert snapshot_of(cli.url, key).history == want.history


def test_rm_of_a_session_whose_latest_body_is_missing_leaves_no_key(cli: Cli) -> None:
    key = "room-rm"
    cli.converse(key, ["remember the blue door"])
    prefix = cli.prefix(key)
    cli.client.delete(f"{prefix}v:{latest(cli.client, prefix)}:b")
    listed = [s for s in run_json(cli.url, "ls") if s["key"] == key]
    assert listed and listed[0]["error"] == "SnapshotCorrupt"
    asked = run(cli.url, "rm", key, input="n\n")
    assert asked.exit_code == 1 and "cannot be read" in asked.stderr
    gone = run(cli.url, "rm", key, "--yes")
    assert gone.exit_code == 0, gone.output
    assert sync_keys(cli.client, prefix) == []


# -- a session mixing old-layout and new-layout records, through the CLI --------------


def test_cli_reads_lists_reverts_and_removes_a_session_of_mixed_layouts(
    cli: Cli, tmp_path: Path
) -> None:
    key = "room-mixed"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    prefix = cli.prefix(key)
    top = latest(cli.client, prefix)
    before = {n: snapshot_of(cli.url, key, n) for n in range(1, top + 1)}
    history = run_json(cli.url, "history", key)
    listed = run_json(cli.url, "ls")
    for n in range(1, top + 1):
        sync_old_layout(cli.client, prefix, n)
    assert run_json(cli.url, "history", key) == history
    fields = ("key", "version", "state", "agent", "items")
    assert [{f: r.get(f) for f in fields} for r in run_json(cli.url, "ls")] == [
        {f: r.get(f) for f in fields} for r in listed
    ]
    suspended = run_json(cli.url, "ls", "--state", "suspended")
    assert [r["key"] for r in suspended] == [key]
    diff = run(cli.url, "diff", key, "1", str(top))
    assert diff.exit_code == 0, diff.output
    for n in range(1, top + 1):
        assert snapshot_of(cli.url, key, n).history == before[n].history
        shown = run(cli.url, "show", key, "--version", str(n))
        assert shown.exit_code == 0, shown.output
    # revert to the first, old-layout version: written anew in the new layout
    result = run(cli.url, "--json", "revert", key, "1")
    assert result.exit_code == 0, result.output
    written = int(json.loads(result.stdout)["version"])
    assert {k.decode() for k in cli.client.hkeys(f"{prefix}v:{written}")} == NEW_FIELDS
    assert cli.client.exists(f"{prefix}v:{written}:b") == 1
    assert snapshot_of(cli.url, key).history == before[1].history
    rows = run_json(cli.url, "history", key)
    assert rows[-1]["version"] == written and rows[-1]["source"] == "revert"
    # export / import across the boundary
    frame = tmp_path / "f.lkrs"
    assert run(cli.url, "export", key, "--version", str(top), "-o", str(frame)).exit_code == 0
    assert run(cli.url, "import", str(frame)).exit_code == 0
    assert snapshot_of(cli.url, key).history == before[top].history
    gone = run(cli.url, "rm", key, "--yes")
    assert gone.exit_code == 0, gone.output
    assert sync_keys(cli.client, prefix) == []


# -- store level: compaction, TTL, ACL ---------------------------------------------------


async def test_compaction_keeps_old_layout_versions_readable(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=f"c{uuid.uuid4().hex[:6]}", keep=500)
    client: Any = store._client
    prefix = store._names.prefix(KEY)
    try:
        lease = await store.acquire(KEY, "w")
        await store.commit(
            Commit(
                KEY,
                lease.epoch,
                0,
                HEAD,
                [Record("h", "a", b"a"), Record("h", "b", b"b", "a")],
                2,
                {"t": "x" * 100},
            )
        )
        version = 1
        for n in range(3):
            version = await store.commit(
                Commit(
                    KEY,
                    lease.epoch,
                    version,
                    HEAD + b"%d" % n,
                    [Record("h", "b", b"b%d" % n, "a")],
                    2,
                    {"t": f"{n}"},
                )
            )
        before = {n: await store.load(KEY, n) for n in range(1, version + 1)}
        infos = await store.versions(KEY)
        for n in range(1, version + 1):
            vk = f"{prefix}v:{n}"
            body = await client.get(vk + ":b")
            digits, _, rest = body.partition(b":")
            size = int(digits)
            await client.hset(vk, mapping={"head": rest[:size], "info": rest[size:]})
            await client.delete(vk + ":b")
        for n in range(120):  # superseded records pile up until compaction runs
            version = await store.commit(
                Commit(
                    KEY,
                    lease.epoch,
                    version,
                    HEAD + b"n%d" % n,
                    [Record("h", "b", b"c%d" % n, "a")],
                    2,
                )
            )
            if await client.exists(f"{prefix}log:1"):
                break
        assert await client.exists(f"{prefix}log:1"), "compaction never ran"
        for n, want in before.items():
            got = await store.load(KEY, n)
            assert (got.head, got.info, got.streams) == (want.head, want.info, want.streams)
        assert (await store.versions(KEY))[: len(infos)] == infos
        assert (await store.load(KEY)).streams["h"][-1][0] == "b"
        assert await store.delete(KEY)
        assert [k async for k in client.scan_iter(match=f"{store.namespace}:{{*")] == []
    finally:
        await store.aclose()


async def test_removing_the_ttl_persists_every_key_of_a_mixed_session(
    redis_server: RedisServer,
) -> None:
    ns = f"p{uuid.uuid4().hex[:6]}"
    ttl = RedisStore.from_url(redis_server.url, namespace=ns, ttl=60, keep=5)
    plain = RedisStore.from_url(redis_server.url, namespace=ns, keep=5)
    client = _sync_client(redis_server.port)
    prefix = ttl._names.prefix(KEY)
    try:
        lease = await ttl.acquire(KEY, "w")
        for base in range(2):
            await commit(ttl, lease, base)
        sync_old_layout(client, prefix, 1)
        await commit(ttl, lease, 2)
        for name in sync_keys(client, prefix):
            assert client.pttl(name) > 0, name
        await commit(plain, lease, 3)  # reopened without a TTL
        names = sync_keys(client, prefix)
        assert f"{prefix}v:4:b" in names and f"{prefix}v:1" in names
        assert {n: client.pttl(n) for n in names} == dict.fromkeys(names, -1)
    finally:
        client.close()
        await asyncio.gather(ttl.aclose(), plain.aclose())


@contextlib.asynccontextmanager
async def two_users(
    make_redis: RedisFactory, old_ttl: float | None = None, **options: Any
) -> AsyncIterator[tuple[RedisStore, RedisStore, Any, str]]:
    """One namespace on a new server, as a user of the earlier ACL line (without +get
    +set) and as the full line: (old, full, a plain client, the session's key prefix).
    ``old_ttl``: a session TTL for the earlier line's store only."""
    server = make_redis()
    full = RedisStore.from_url(server.url, namespace="old", **options)
    old_options = options if old_ttl is None else {**options, "ttl": old_ttl}
    old = RedisStore.from_url(earlier_acl_user(server), namespace="old", **old_options)
    client = _sync_client(server.port)
    try:
        yield old, full, client, full._names.prefix(KEY)
    finally:
        client.close()
        await asyncio.gather(old.aclose(), full.aclose())


async def test_an_earlier_acl_user_reading_a_body_gets_store_unavailable_and_changes_nothing(
    make_redis: RedisFactory,
) -> None:
    async with two_users(make_redis, keep=5) as (old, full, client, prefix):
        lease = await full.acquire(KEY, "w")
        await commit(full, lease, 0)
        await full.release(lease)
        before = dump_all(client, prefix)
        for call in (old.load, old.info, old.versions):
            with pytest.raises(StoreUnavailable):
                await call(KEY)
        assert dump_all(client, prefix) == before


async def test_users_of_both_acl_lines_alternate_commits_and_every_version_reads(
    make_redis: RedisFactory,
) -> None:
    async with two_users(make_redis, keep=4) as (old, full, client, prefix):
        version = 0
        for turn in range(6):
            store = old if turn % 2 else full
            lease = await store.acquire(KEY, f"w{turn}", takeover=True)
            version = await commit(store, lease, version)
            await store.release(lease)
        assert [v.version for v in await full.versions(KEY)] == [3, 4, 5, 6]
        for n in (3, 4, 5, 6):
            got = await full.load(KEY, n)
            assert got.head == HEAD + b"%d" % n and got.info == {"title": f"turn {n}"}
            fields = {k.decode() for k in client.hkeys(f"{prefix}v:{n}")}
            assert fields == (OLD_FIELDS if n % 2 == 0 else NEW_FIELDS), n
        # the old user reads its own records, deletes the whole session
        assert (await old.load(KEY, 4)).head == HEAD + b"4"
        assert await old.delete(KEY)
        assert sync_keys(client, prefix) == []


async def test_an_earlier_acl_users_refused_read_names_the_missing_permission(
    make_redis: RedisFactory,
) -> None:
    """security.md: a version another user wrote with SET "cannot be read by it:
    StoreUnavailable (NOPERM)"; the message should say so (or name +get), as the
    store's other refusals of this user name the ACL line to grant."""
    async with two_users(make_redis, keep=5) as (old, full, _, _):
        lease = await full.acquire(KEY, "w")
        await commit(full, lease, 0)
        with pytest.raises(StoreUnavailable, match=r"NOPERM|\+get"):
            await old.load(KEY)


# -- a restore of a session whose latest body was deleted by hand -----------------------


def _rs(store: Any, key: str) -> Any:
    from livekit_resume import ResumableSession
    from tests import _child_agent as child

    _model, session = child.build_session()
    rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
    return rs, session, child


@pytest.mark.parametrize("ttl", [None, 60.0], ids=["no-ttl", "ttl"])
def test_a_restore_of_a_session_whose_body_was_deleted_is_corrupt_and_changes_nothing(
    cli: Cli, ttl: float | None
) -> None:
    from livekit_resume import open_store

    key = "room-restore"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    prefix = cli.prefix(key)
    cli.client.delete(f"{prefix}v:{latest(cli.client, prefix)}:b")
    before = dump_all(cli.client, prefix)

    async def go() -> None:
        store = open_store(cli.url, ttl=ttl) if ttl else open_store(cli.url)
        try:
            rs, session, child = _rs(store, key)
            with pytest.raises(SnapshotCorrupt, match=r"v:3:b"):
                await rs.restore(session, default=child.Scribe)
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())
    after = dump_all(cli.client, prefix)
    head_before = before.pop(prefix + "head")
    head_after = after.pop(prefix + "head")
    assert after == before
    for field in (b"version", b"oldest", b"gen", b"gen_lo"):
        assert head_after[field] == head_before[field]
    # the lease was given back
    info = run_json(cli.url, "ls")
    assert [s for s in info if s["key"] == key] == [] or all(
        not s.get("owner") for s in info if s["key"] == key
    )


# -- eviction: hash without body, body without hash -------------------------------------


async def test_a_version_hash_evicted_with_its_body_left_is_refused_and_rm_takes_the_body(
    redis_server: RedisServer,
) -> None:
    store = RedisStore.from_url(redis_server.url, namespace=f"e{uuid.uuid4().hex[:6]}", keep=5)
    client = _sync_client(redis_server.port)
    prefix = store._names.prefix(KEY)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(3):
            await commit(store, lease, base)
        client.delete(f"{prefix}v:2")  # the hash, its body left
        with pytest.raises(SnapshotCorrupt, match="v:2"):
            await store.load(KEY, 2)
        listed = await store.versions(KEY)  # listed damaged, the others as they are
        assert [(v.version, v.damaged is None) for v in listed] == [
            (1, True),
            (2, False),
            (3, True),
        ]
        assert "v:2" in (listed[1].damaged or "")
        assert (await store.load(KEY, 3)).head == HEAD + b"3"
        assert await store.delete(KEY)
        assert sync_keys(client, prefix) == []
    finally:
        client.close()
        await store.aclose()


@pytest.mark.parametrize("policy", ["allkeys-random", "allkeys-lru"])
async def test_under_allkeys_eviction_no_read_returns_a_wrong_head(
    make_redis: RedisFactory, policy: str
) -> None:
    """Sessions written past maxmemory under an allkeys policy: keys of versions
    (records, bodies, logs, heads) evicted one by one. Every version still read has the
    head and info written for it; every other is refused by name; rm leaves no key."""
    server = make_redis("--maxmemory", "3mb", "--maxmemory-policy", policy)
    store = RedisStore.from_url(server.url, namespace="ev", keep=3, retries=1)
    client = _sync_client(server.port)
    from livekit_resume.errors import ResumeError, SnapshotNotFound

    try:
        written: dict[str, dict[int, bytes]] = {}
        for s in range(400):
            key = f"room-{s}"
            try:
                lease = await store.acquire(key, "w")
                version = 0
                for _ in range(4):
                    head = b"%s:%d:" % (key.encode(), version + 1) + bytes(4000)
                    version = await store.commit(
                        Commit(
                            key,
                            lease.epoch,
                            version,
                            head,
                            [Record("h", f"i{version}", b"x" * 500)],
                            1,
                            {"k": key, "pad": "p" * 300},
                        )
                    )
                    written.setdefault(key, {})[version] = head
            except ResumeError:
                continue
        evicted = int(client.info("stats")["evicted_keys"])
        assert evicted > 0, "nothing was evicted: the test proves nothing"
        client.config_set("maxmemory", "0")
        names = {k.decode() for k in client.scan_iter(match="ev:{*", count=1000)}
        records = {k for k in names if k.rsplit(":", 2)[-2] == "v"}
        bodies = {k[: -len(":b")] for k in names if k.endswith(":b")}
        torn = records ^ bodies  # a record without its body, or a body without its record
        assert torn, "no version lost only one of its two keys: the test proves nothing"
        wrong = []
        for key, heads in written.items():
            for n, head in heads.items():
                try:
                    got = await store.load(key, n)
                except (SnapshotCorrupt, SnapshotNotFound):
                    continue
                if got.head != head or got.info.get("k") != key:
                    wrong.append((key, n))
        assert wrong == []
        for key in written:
            await store.delete(key)
        assert [k for k in client.scan_iter(match="ev:{*")] == []
    finally:
        client.close()
        await store.aclose()


# -- Cluster: a body key of a slot being migrated ----------------------------------------


@contextlib.asynccontextmanager
async def half_moved(
    tmp_path: Path, namespace: str, moved: Iterable[str]
) -> AsyncIterator[tuple[RedisStore, Lease, Any]]:
    """A new 3-node Cluster holding one session of three versions (keep=3), its slot
    being moved with the keys ``moved`` (names after the session's prefix) on the
    importing node already: (the store, the writer's lease, the `Reshard`)."""
    from tests.redis_servers import RedisCluster, require_redis_server
    from tests.test_cluster_reshard import Reshard, _open, _scripts_known_to

    require_redis_server()
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        store = _open(cluster, namespace, keep=3)
        try:
            lease = await store.acquire(KEY, "w")
            for base in range(3):
                await commit(store, lease, base)
            move = Reshard(cluster, store, KEY)
            _scripts_known_to(move.target)
            move.begin()
            move.move(*(move.prefix + s for s in moved))
            yield store, lease, move
        finally:
            await store.aclose()
    finally:
        cluster.stop()


@pytest.mark.cluster
@pytest.mark.parametrize(
    "moved",
    [("head", "log:0", "v:1", "v:1:b", "v:2", "v:2:b", "v:3"), ("v:3:b",)],
    ids=["body-left-behind", "body-moved-first"],
)
async def test_a_load_of_a_slot_half_moved_at_a_body_is_the_head_or_store_unavailable(
    tmp_path: Path, moved: tuple[str, ...]
) -> None:
    """A session whose slot is half moved, a version's record on one node and its body
    on the other: a load reads the version whole, or is refused as the slot moving
    (StoreUnavailable); never SnapshotCorrupt, which tells the operator to delete a
    healthy session."""
    async with half_moved(tmp_path, "mig", moved) as (store, _, move):
        for call in (store.load, store.info, store.versions):
            try:
                got = await asyncio.wait_for(call(KEY), 20)
            except StoreUnavailable:
                continue
            if call == store.load:
                assert isinstance(got, Stored) and got.head == HEAD + b"3"
        move.finish()
        assert (await store.load(KEY)).head == HEAD + b"3"


@pytest.mark.cluster
@pytest.mark.parametrize("moved", [("v:3:b",), ("v:1:b", "v:2:b", "v:3:b")], ids=["latest", "all"])
async def test_a_commit_while_bodies_moved_ahead_of_their_records_lands_or_is_unavailable(
    tmp_path: Path, moved: tuple[str, ...]
) -> None:
    """Bodies moved to the importing node before their head: a commit lands, or is
    refused as the slot moving (StoreUnavailable); never LeaseLost nor SnapshotCorrupt,
    and after the move every version reads whole."""
    from livekit_resume.errors import LeaseLost

    async with half_moved(tmp_path, "mig", moved) as (store, lease, move):
        landed = False
        try:
            assert await asyncio.wait_for(commit(store, lease, 3), 20) == 4
            landed = True
        except StoreUnavailable:
            pass
        except (LeaseLost, SnapshotCorrupt) as e:
            pytest.fail(f"{type(e).__name__}: {e}")
        move.finish()
        if not landed:
            assert await commit(store, lease, 3) == 4
        assert [v.version for v in await store.versions(KEY)] == [2, 3, 4]
        for n in (2, 3, 4):
            assert (await store.load(KEY, n)).head == HEAD + b"%d" % n
        keys = move.keys_on(move.target)
        assert move.prefix + "v:1:b" not in keys and move.prefix + "v:1" not in keys


# -- TTL across both layouts and both ACL lines ----------------------------------------


async def test_an_earlier_acl_user_with_a_ttl_moves_the_deadline_of_every_body(
    make_redis: RedisFactory,
) -> None:
    async with two_users(make_redis, old_ttl=30, keep=5) as (old, full, client, prefix):
        lease = await full.acquire(KEY, "w")
        for base in range(2):
            await commit(full, lease, base)
        await commit(old, lease, 2)  # the old line's commit: v:3 in the old layout
        names = sync_keys(client, prefix)
        assert f"{prefix}v:1:b" in names and f"{prefix}v:3:b" not in names
        for name in names:
            assert 25_000 < client.pttl(name) <= 30_000, name
        assert (await full.load(KEY, 3)).head == HEAD + b"3"


async def test_a_session_past_a_shorter_ttl_is_purged_whole_bodies_included(
    redis_server: RedisServer,
) -> None:
    ns = f"x{uuid.uuid4().hex[:6]}"
    long = RedisStore.from_url(redis_server.url, namespace=ns, ttl=60, keep=5)
    short = RedisStore.from_url(redis_server.url, namespace=ns, ttl=1, keep=5)
    client = _sync_client(redis_server.port)
    prefix = long._names.prefix(KEY)
    try:
        lease = await long.acquire(KEY, "w")
        for base in range(3):
            await commit(long, lease, base)
        sync_old_layout(client, prefix, 2)
        await long.release(lease)
        await asyncio.sleep(1.3)
        again = await short.acquire(KEY, "w2", ttl=0.5)  # the old session expired
        assert (await short.info(KEY)).version == 0  # type: ignore[union-attr]
        assert sync_keys(client, prefix) == [prefix + "head"]
        assert await commit(short, again, 0) == 1
        assert (await short.load(KEY)).head == HEAD + b"1"
    finally:
        client.close()
        await asyncio.gather(long.aclose(), short.aclose())


# -- a lone body left of a session whose other keys were evicted ------------------------


@pytest.mark.parametrize("index", ["listed", "index-evicted"])
async def test_a_lone_later_body_left_of_an_evicted_session_never_blocks_a_new_one(
    make_redis: RedisFactory, index: str
) -> None:
    """On a server that evicts (allkeys-lru), every key of a session evicted but the
    body of its 5th version: a new conversation under the key either is refused at once
    naming the remains (and rm clears them), or saves all its versions; it must not be
    refused at its 5th commit ("exists before its version was written") after saving
    four. (DEL stands in for the eviction.)"""
    server = make_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(server.url, namespace=f"l{uuid.uuid4().hex[:6]}", keep=2)
    client = _sync_client(server.port)
    prefix = store._names.prefix(KEY)
    try:
        lease = await store.acquire(KEY, "w")
        for base in range(5):
            await commit(store, lease, base)
        for name in sync_keys(client, prefix):
            if name != f"{prefix}v:5:b":
                client.delete(name)
        if index == "index-evicted":
            client.delete(store._index_key)
        try:
            again = await store.acquire(KEY, "w2")
        except SnapshotCorrupt as e:
            assert "v:5:b" in str(e)
            assert await store.delete(KEY)
            assert sync_keys(client, prefix) == []
            again = await store.acquire(KEY, "w2")
        version = 0
        for base in range(6):
            version = await commit(store, again, base)
        assert version == 6
    finally:
        client.close()
        await store.aclose()


@pytest.mark.cluster
async def test_rm_while_bodies_are_left_on_the_old_node_removes_all_or_nothing(
    tmp_path: Path,
) -> None:
    """The head and every version record moved, their bodies not yet: rm deletes the
    whole session or nothing (StoreUnavailable); once the slot moved, no body of it is
    left behind, and the key saves a new conversation from version 1."""
    moved = ("head", "log:0", "v:1", "v:2", "v:3")
    async with half_moved(tmp_path, "rmmig", moved) as (store, _, move):
        deleted = False
        with contextlib.suppress(StoreUnavailable):
            deleted = await asyncio.wait_for(store.delete(KEY), 20)
        move.finish()
        if deleted:
            assert move.keys_on(move.target) == [], "rm left bodies behind"
        else:
            assert (await store.load(KEY)).head == HEAD + b"3"
            assert await store.delete(KEY)
            assert move.keys_on(move.target) == []
        again = await store.acquire(KEY, "w2")
        for base in range(4):
            assert await commit(store, again, base) == base + 1


@pytest.mark.parametrize("layout", ["old", "new"])
def test_repair_of_a_damaged_head_takes_an_older_head_across_layouts(cli: Cli, layout: str) -> None:
    """The latest version's head bytes damaged (one byte flipped, the record whole):
    repair takes the metadata from the newest older head that decodes, whichever
    layout each of them is stored in (failure-model.md, "a damaged head")."""
    key = f"room-dh-{layout}"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    prefix = cli.prefix(key)
    top = latest(cli.client, prefix)
    whole = snapshot_of(cli.url, key)
    if layout == "old":
        sync_old_layout(cli.client, prefix, top)
        for n in range(1, top):
            if n % 2:
                sync_old_layout(cli.client, prefix, n)
        head = cli.client.hget(f"{prefix}v:{top}", "head")
        assert head is not None
        flipped = head[:40] + bytes([head[40] ^ 0xFF]) + head[41:]
        cli.client.hset(f"{prefix}v:{top}", "head", flipped)
    else:
        for n in range(1, top):
            sync_old_layout(cli.client, prefix, n)
        body = cli.client.get(f"{prefix}v:{top}:b")
        assert body is not None
        at = body.index(b":") + 41
        cli.client.set(f"{prefix}v:{top}:b", body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :])
    show = run(cli.url, "show", key)
    assert show.exit_code == 1, show.output
    result = run(cli.url, "--json", "repair", key)
    assert result.exit_code == 0, result.output
    repaired = snapshot_of(cli.url, key)
    assert [i["id"] for i in repaired.history] == [i["id"] for i in whole.history]
    assert {k.decode() for k in cli.client.hkeys(f"{prefix}v:{top + 1}")} == NEW_FIELDS


# -- a body cut short in its info ----------------------------------------------------------


@pytest.mark.parametrize("cut", ["all", "one"], ids=["info-dropped", "info-short-by-one"])
async def test_a_body_cut_in_its_info_is_refused_by_every_read(
    redis_server: RedisServer, cut: str
) -> None:
    """A body whose head is whole but whose info was cut (a torn write, a partial copy):
    load, versions and info all refuse it as SnapshotCorrupt, none reads it as a
    session without listing info."""
    store = RedisStore.from_url(redis_server.url, namespace=f"i{uuid.uuid4().hex[:6]}", keep=3)
    client = _sync_client(redis_server.port)
    bk = f"{store._names.prefix(KEY)}v:1:b"
    try:
        lease = await store.acquire(KEY, "w")
        await commit(store, lease, 0, note="n" * 40)
        body = client.get(bk)
        assert body is not None
        head = HEAD + b"1"
        framed = b"%d:" % len(head) + head
        assert body.startswith(framed) and len(body) > len(framed) + 1
        client.set(bk, framed if cut == "all" else body[:-1])
        read: dict[str, Any] = {}
        for call in (store.load, store.info):
            try:
                got = await call(KEY)
            except SnapshotCorrupt:
                continue
            read[call.__name__] = getattr(got, "info", got)
        assert read == {}, "read a torn body as a whole one"
        (listed,) = await store.versions(KEY)  # listed, as damaged: no info read of it
        assert listed.damaged is not None and listed.info == {}, listed
    finally:
        client.close()
        await store.aclose()


# -- a worker of the earlier ACL line restoring a conversation the full line saved -------


def test_an_earlier_acl_workers_refused_restore_leaves_the_conversation_to_a_full_one(
    make_redis: RedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose user has the line from before GET and SET restores a conversation
    a worker of the full line saved: StoreUnavailable (security.md), its lease given
    back and nothing of the conversation changed; a full-line worker then restores it
    whole."""
    from livekit_resume import open_store

    server = make_redis()
    monkeypatch.setenv("RESUME_NAMESPACE", "old")
    url = str(server.url)
    key = "room-acl"
    asyncio.run(_converse(url, key, ["remember the blue door", "remember the code 4711"]))
    whole = snapshot_of(url, key)
    client = _sync_client(server.port)
    prefix = KeyNames("old").prefix(key)
    before = dump_all(client, prefix)
    old_url = earlier_acl_user(server)

    async def restore(at: str) -> list[str]:
        store = open_store(at)
        try:
            rs, session, child = _rs(store, key)
            try:
                await rs.restore(session, default=child.Scribe)
                return [i.id for i in session.history.items]
            finally:
                await rs.aclose()
                await session.aclose()
        finally:
            await store.aclose()

    try:
        with pytest.raises(StoreUnavailable):
            asyncio.run(restore(old_url))
        after = dump_all(client, prefix)
        head_before, head_after = before.pop(prefix + "head"), after.pop(prefix + "head")
        assert after == before
        assert head_after.get(b"owner") is None, "the lease was not given back"
        assert head_after[b"version"] == head_before[b"version"]
        ids = asyncio.run(restore(url))
        assert [i["id"] for i in whole.history if i["id"] in ids] == [
            i["id"] for i in whole.history
        ]
    finally:
        client.close()


@pytest.mark.cluster
def test_ls_and_history_of_a_session_whose_body_is_left_on_the_old_node_are_not_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI on a Cluster whose slot is half moved, the latest version's record on the
    new node and its body not yet: `ls` lists the session as it is or as unreachable,
    `history` lists it or fails as StoreUnavailable; neither calls it damaged
    (SnapshotCorrupt), which tells the operator to delete it."""
    from tests.redis_servers import RedisCluster, require_redis_server
    from tests.test_cluster_reshard import Reshard, _open, _scripts_known_to

    require_redis_server()
    monkeypatch.setenv("RESUME_NAMESPACE", "lsmig")
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:

        async def setup() -> Reshard:
            store = _open(cluster, "lsmig", keep=3)
            try:
                lease = await store.acquire(KEY, "w")
                for base in range(3):
                    await commit(store, lease, base)
                await store.release(lease)
                return Reshard(cluster, store, KEY)
            finally:
                await store.aclose()

        move = asyncio.run(setup())
        _scripts_known_to(move.target)
        move.begin()
        move.move(*(move.prefix + s for s in ("head", "log:0", "v:1", "v:1:b", "v:2", "v:2:b")))
        move.move(move.prefix + "v:3")
        listed = run(cluster.url, "--json", "ls")
        assert KEY in listed.stdout and "SnapshotCorrupt" not in listed.output, listed.output
        history = run(cluster.url, "history", KEY)
        assert "SnapshotCorrupt" not in history.output, history.output
        assert history.exit_code == 0 or "StoreUnavailable" in history.stderr, history.output
    finally:
        cluster.stop()


def test_the_version_records_a_real_conversation_and_a_revert_write_are_listpacks(
    cli: Cli,
) -> None:
    """performance.md: a version record is a hash of short fields kept as a listpack,
    its head and info in its body; so for the records a ResumableSession and the
    command line write, not only for hand-made commits."""
    key = "room-encoding"
    cli.converse(key, ["remember the blue door", "remember the code 4711"])
    assert run(cli.url, "revert", key, "1").exit_code == 0
    prefix = cli.prefix(key)
    top = latest(cli.client, prefix)
    for n in range(1, top + 1):
        vk = f"{prefix}v:{n}"
        assert {k.decode() for k in cli.client.hkeys(vk)} == NEW_FIELDS, n
        assert cli.client.object("encoding", vk) == b"listpack", n
        assert cli.client.exists(vk + ":b") == 1


def test_release_frees_the_lease_of_a_session_whose_latest_body_is_missing(cli: Cli) -> None:
    """`release KEY` frees a stuck lease and fences its holder; it writes nothing but the
    head, so a session whose latest version lost its body is no reason to refuse it (the
    operator's next steps, revert or import, need the lease free)."""
    key = "room-release"
    cli.converse(key, ["remember the blue door"])
    prefix = cli.prefix(key)

    async def hold() -> None:
        store = RedisStore.from_url(cli.url, namespace=cli.namespace)
        try:
            await store.acquire(key, "stuck-worker", ttl=600)
        finally:
            await store.aclose()

    asyncio.run(hold())
    cli.client.delete(f"{prefix}v:{latest(cli.client, prefix)}:b")
    result = run(cli.url, "release", key)
    assert result.exit_code == 0, result.output
    assert cli.client.hget(prefix + "head", "owner") is None


async def test_trimming_across_layouts_with_a_ttl_leaves_exactly_the_retained_keys(
    make_redis: RedisFactory,
) -> None:
    """keep=2 and a TTL, users of both ACL lines committing in turn: after each commit
    the session holds exactly its head, its log and its two retained versions (with a
    body where the full line wrote them), every key with the session's deadline."""
    async with two_users(make_redis, ttl=40, keep=2) as (old, full, client, prefix):
        version = 0
        for turn in range(7):
            store = old if turn % 3 == 1 else full
            lease = await store.acquire(KEY, f"w{turn}", takeover=True)
            version = await commit(store, lease, version)
            want = {prefix + "head", prefix + "log:0"}
            for n in (version - 1, version):
                if n >= 1:
                    want.add(f"{prefix}v:{n}")
                    if (n - 1) % 3 != 1:  # written by the full line
                        want.add(f"{prefix}v:{n}:b")
            names = sync_keys(client, prefix)
            assert set(names) == want, (turn, names)
            for name in names:
                assert 35_000 < client.pttl(name) <= 40_000, name
        for n in (version - 1, version):
            assert (await full.load(KEY, n)).head == HEAD + b"%d" % n
