"""Hunt: connecting to Redis the way operators deploy it.

Real ``redis-server`` processes on loopback (never 6379): a password (``requirepass``),
ACL users granted exactly the line docs/security.md gives, a non-zero database number,
Sentinel with a password on the Sentinels and another on the data node, a Cluster with
a password. What is checked: every URL form connects, saves, restores and serves the
command line; a wrong password, a missing permission, a wrong database each give a
typed error (`StoreUnavailable`, or `SnapshotCorrupt` for damaged data) and change
nothing; and the password is never shown.

Tests whose docstring says "Passes (coverage)" cover something untested before and
pass on the current code; the others fail on it, their docstring says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from livekit.agents import llm
from typer.testing import CliRunner, Result

from livekit_resume import SnapshotCorrupt, StoreUnavailable, open_store
from livekit_resume.bridge import from_stored
from livekit_resume.cli import app, commit_from_snapshot
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Command, Store
from livekit_resume.stores.redis import RedisStore
from tests.redis_servers import (
    CLUSTER_DEADLINE,
    RedisCluster,
    RedisFactory,
    RedisSentinel,
    RedisServer,
    _cli,
)

PASSWORD = "Zq9-hunt-auth-S3cret"
NS = "acme"
KEY = "room"

_DOC = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
# docs/security.md, "Redis: the minimal ACL", verbatim (the password replaced)
DOC_ACL = next(
    line.split(None, 3)[3] for line in _DOC.splitlines() if line.startswith("ACL SETUSER tenant-")
).replace(">LONG-RANDOM-PASSWORD", f">{PASSWORD}")
DOC_COMMANDS = [w for w in DOC_ACL.split() if w.startswith("+")]


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def shown(result: Result) -> str:
    return result.stdout + result.stderr


def _message(item_id: str, text: str) -> dict[str, Any]:
    return item_to_data(llm.ChatMessage(id=item_id, role="user", content=[text], created_at=1.0))


def _snap(turns: int, key: str = KEY) -> Snapshot:
    return Snapshot(
        key=key,
        history=[_message(f"m{i}", f"turn {i}") for i in range(turns)],
        userdata={"turns": turns},
    )


async def _commit(store: Store, lease: Any, base: int, turns: int, *, ns: str = NS) -> int:
    snap = _snap(turns, lease.key)
    return await store.commit(
        commit_from_snapshot(Codec(namespace=ns), snap, epoch=lease.epoch, base_version=base)
    )


async def _session(store: Store, versions: int = 2, *, ns: str = NS, key: str = KEY) -> None:
    """``versions`` versions of session ``key``, the lease released."""
    lease = await store.acquire(key, "writer")
    base = 0
    for turn in range(versions):
        base = await _commit(store, lease, base, turn + 1, ns=ns)
    await store.release(lease)


async def _turns(store: Store, key: str = KEY, *, ns: str = NS) -> int:
    snap = from_stored(Codec(namespace=ns), await store.load(key))
    return int(snap.userdata["turns"])


def _dump(port: int, pattern: str = f"{NS}:*", password: str | None = None) -> dict[bytes, Any]:
    """Every key of the pattern with its type, value (DUMP) and whether it expires."""
    r = sync_redis.Redis(port=port, password=password)
    try:
        return {k: (r.type(k), r.dump(k), r.pttl(k) > 0) for k in r.scan_iter(pattern)}
    finally:
        r.close()


def _acl(server: RedisServer, user: str, *commands: str, keys: str = f"{NS}:*") -> str:
    """User ``user`` granted ``commands`` on ``keys`` and the namespace's channels; its
    standalone URL."""
    reply = server.cli(
        "ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", f"~{keys}", f"&{NS}:*",
        "-@all", *commands,
    )  # fmt: skip
    assert reply.strip() == "OK", reply
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.fixture
def server(make_redis: RedisFactory) -> RedisServer:
    return make_redis()


# ------------------------------------------- the documented minimal ACL, damaged sessions


@pytest.mark.parametrize("lost", ["v:1", "v:2:b", "log:0"])
async def test_the_documented_acl_user_can_rm_a_session_that_lost_a_key(
    server: RedisServer, lost: str
) -> None:
    """Expected (docs/security.md: "this user runs every store operation"; "rm and
    delete remove every trace of a session ... and on Redis the remains of a session
    whose head was evicted"): a user granted the documented line deletes a session one
    of whose keys was evicted, as a full user does.

    Actual: StoreUnavailable "can't run this command": the scripts' ``settled()``
    (stores/lua/session.lua:146-150) runs ``EXISTS``, which the documented line does not
    grant, whenever a key of the session is missing. The operator is told to "grant the
    whole ACL line", which it did; the damaged session cannot be removed."""
    admin = RedisStore.from_url(server.url, namespace=NS)
    user = RedisStore.from_url(_acl(server, "tenant", *DOC_COMMANDS), namespace=NS)
    try:
        await _session(admin)
        server.cli("DEL", f"{NS}:{{{KEY}}}:{lost}")
        assert await user.delete(KEY) is True
        assert not [k for k in _dump(server.port) if b"{" + KEY.encode() + b"}" in k]
        assert await admin.keys() == []
    finally:
        await user.aclose()
        await admin.aclose()


@pytest.mark.parametrize("lost", ["v:2", "v:2:b"])
async def test_the_documented_acl_user_reads_a_damaged_session_as_corrupt(
    server: RedisServer, lost: str
) -> None:
    """Expected: the same typed error a full user gets, `SnapshotCorrupt` (a damaged
    session: salvage it or delete it), and its history listed (``versions``).

    Actual: `StoreUnavailable` for ``load``, ``info`` and ``versions`` alike, so a
    worker retries a session that will never load and ``history`` cannot show what is
    left. Same root cause: ``EXISTS`` in ``settled()`` (session.lua:146-150, called from
    load.lua:21/31, info.lua:13, versions.lua:8) is not in the documented line."""
    admin = RedisStore.from_url(server.url, namespace=NS)
    user = RedisStore.from_url(_acl(server, "tenant", *DOC_COMMANDS), namespace=NS)
    try:
        await _session(admin)
        server.cli("DEL", f"{NS}:{{{KEY}}}:{lost}")
        with pytest.raises(SnapshotCorrupt):
            await admin.load(KEY)  # what a full user is told
        with pytest.raises(SnapshotCorrupt):
            await user.load(KEY)
        with pytest.raises(SnapshotCorrupt):
            await user.info(KEY)
        assert len(await user.versions(KEY)) == len(await admin.versions(KEY))
    finally:
        await user.aclose()
        await admin.aclose()


def test_the_documented_acl_line_works_with_a_database_number(server: RedisServer) -> None:
    """Expected: the documented line with ``RESUME_STORE=redis://tenant:pw@host/3`` (a
    URL form the docs give, `RedisURL`) runs the store, or the docs say what else to
    grant.

    Actual: every call is StoreUnavailable "this user has no permissions to run the
    'select' command": redis-py selects a non-zero database on every connection and
    ``-@all`` removed SELECT. Fix: add ``+select`` to the line (docs/security.md:158)
    or document that the ACL user must use database 0; the NOPERM hint of
    stores/redis/client.py:410 ("grant it the whole ACL line") misleads here."""
    url = _acl(server, "tenant", *DOC_COMMANDS).replace("/0", "/3")

    async def go() -> int:
        store = open_store(url, namespace=NS)
        try:
            await _session(store)
            return await _turns(store)
        finally:
            await store.aclose()

    assert asyncio.run(go()) == 2
    assert _dump(server.port) == {}  # nothing in database 0


async def test_the_documented_acl_user_runs_the_cli(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passes (coverage): with the documented line, ``ls``, ``show``, ``history``,
    ``release`` and ``rm`` of the command line work for the tenant's user (CONFIG GET
    refused, skipped quietly), and never show its password."""
    admin = RedisStore.from_url(server.url, namespace=NS)
    try:
        await _session(admin, 3)
        await admin.acquire(KEY, "stuck-worker")
    finally:
        await admin.aclose()
    monkeypatch.setenv("RESUME_NAMESPACE", NS)
    url = _acl(server, "tenant", *DOC_COMMANDS)
    runs = [
        ["ls", "--json"],
        ["show", KEY],
        ["history", KEY],
        ["release", KEY],
        ["rm", "--yes", KEY],
    ]
    for args in runs:
        result = await asyncio.to_thread(cli, "--store", url, *args)
        assert result.exit_code == 0, (args, shown(result))
        assert PASSWORD not in shown(result)
    assert _dump(server.port, f"{NS}:{{*") == {}


# --------------------------------------- a missing permission: typed, and nothing changed

# (the command taken out of the documented line, the store's TTL, the call refused)
HALF_WRITES = [
    pytest.param("+del", None, "commit", id="del-trim"),
    pytest.param("+pttl", None, "acquire", id="pttl-acquire"),
    pytest.param("+pexpire", 60.0, "acquire", id="pexpire-acquire-ttl"),
]


@pytest.mark.parametrize(("missing", "ttl", "refused"), HALF_WRITES)
async def test_a_call_refused_for_a_missing_permission_changes_nothing(
    server: RedisServer, missing: str, ttl: float | None, refused: str
) -> None:
    """Expected (stores/lua/session.lua: "Nothing is written before every check has
    passed: a script that stops half-way leaves no half-written snapshot"; the brief:
    a missing permission is a typed error and nothing stored changes): the refused
    call raises StoreUnavailable, every key stays as it was, and once the permission is
    granted the same call succeeds.

    Actual: the scripts run the command the user lacks after their first write, and
    Redis never undoes a script's writes:
    - without +del, the commit that trims (keep=2, third version) has written the new
      version's record and body (commit.lua:82-85) when trim's DEL (session.lua:235) is
      refused: the head still says version 2, and every later commit, even a full
      user's, is SnapshotCorrupt "key …:v:3 exists before its version was written";
      the session is wedged;
    - without +pttl (no TTL) or +pexpire (with one), ``acquire`` has written the head
      with its owner (acquire.lua:37) when refresh_ttl (acquire.lua:39, session.lua:223-226)
      is refused: the caller is told StoreUnavailable but holds the lease, and every other worker
      is SessionBusy for the lease's length.
    Fix: run each command a script may need before its first write (a ``PTTL`` of the
    head, a ``DEL``/``PEXPIRE`` of a key of the slot nobody writes, as live_head already
    does with ``TYPE``), so that a refusal comes before anything is written."""
    url = _acl(server, "tenant", *(c for c in DOC_COMMANDS if c != missing))
    opts: dict[str, Any] = {"keep": 2} if ttl is None else {"keep": 2, "ttl": ttl}
    user = RedisStore.from_url(url, namespace=NS, **opts)
    admin = RedisStore.from_url(server.url, namespace=NS, **opts)
    try:
        if refused == "commit":
            # every writing script is refused without +del now, the acquisition too:
            # the versions before the trimming one are written by a full user
            lease = await admin.acquire(KEY, "worker-1")
            assert await _commit(admin, lease, 0, 1) == 1
            assert await _commit(admin, lease, 1, 2) == 2
            before = _dump(server.port)
            with pytest.raises(StoreUnavailable):
                await _commit(user, lease, 2, 3)
            assert _dump(server.port) == before, "a refused commit wrote keys"
            assert server.cli("ACL", "SETUSER", "tenant", missing).strip() == "OK"
            assert await _commit(admin, lease, 2, 3) == 3  # the session goes on
            assert await _turns(admin) == 3
        else:
            before = _dump(server.port, f"{NS}:{{*")
            with pytest.raises(StoreUnavailable):
                await user.acquire(KEY, "worker-1")
            # the session's keys (the namespace index's entry is written ahead of the
            # lease script, in the same round trip, and names no session by itself)
            assert _dump(server.port, f"{NS}:{{*") == before, "a refused acquire took the lease"
            other = await admin.acquire(KEY, "worker-2")  # nobody holds it
            await admin.release(other)
    finally:
        await user.aclose()
        await admin.aclose()


async def test_a_user_without_the_namespace_keys_is_refused_and_writes_nothing(
    server: RedisServer,
) -> None:
    """Passes (coverage): a user granted the documented commands but the keys of another
    namespace (a wrong ``RESUME_NAMESPACE`` for its ACL) gets StoreUnavailable naming
    the refusal, on every call, and nothing is written anywhere."""
    url = _acl(server, "tenant", *DOC_COMMANDS, keys="other:*")
    store = RedisStore.from_url(url, namespace=NS)
    try:
        for call in (
            lambda: store.acquire(KEY, "w"),
            lambda: store.info(KEY),
            lambda: store.load(KEY),
            lambda: store.keys(),
        ):
            with pytest.raises(StoreUnavailable) as refused:
                await call()
            assert "permission" in str(refused.value).lower() or "can't run" in str(refused.value)
            assert PASSWORD not in str(refused.value)
    finally:
        await store.aclose()
    assert _dump(server.port, "*") == {}


# ---------------------------------------------------------------- database numbers


async def test_a_store_on_database_3_keeps_to_it_through_the_cli(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passes (coverage): ``redis://:pw@host/3`` saves and restores in database 3 only;
    ``ls``, ``show``, ``history`` and ``rm`` of the command line work through it and
    never show the password; database 0 holding a session of the same key and
    namespace is untouched throughout."""
    server.cli("CONFIG", "SET", "requirepass", PASSWORD)
    base = f"redis://:{PASSWORD}@127.0.0.1:{server.port}"
    db0 = RedisStore.from_url(f"{base}/0", namespace=NS)
    db3 = RedisStore.from_url(f"{base}/3", namespace=NS)
    try:
        await _session(db0, 1)
        await _session(db3, 3)
        assert (await _turns(db0), await _turns(db3)) == (1, 3)
    finally:
        await db0.aclose()
        await db3.aclose()
    monkeypatch.setenv("RESUME_NAMESPACE", NS)
    results = {
        args[0]: await asyncio.to_thread(cli, "--store", f"{base}/3", *args)
        for args in (["ls", "--json"], ["show", KEY], ["history", KEY], ["rm", "--yes", KEY])
    }
    for name, result in results.items():
        assert result.exit_code == 0, (name, shown(result))
        assert PASSWORD not in shown(result)
    assert '"version": 3' in results["ls"].stdout
    assert "turn 2" in results["show"].stdout
    r = sync_redis.Redis(port=server.port, password=PASSWORD, db=3)
    assert [k for k in r.scan_iter(f"{NS}:{{*")] == []
    r.close()
    left = RedisStore.from_url(f"{base}/0", namespace=NS)
    try:
        assert await _turns(left) == 1  # database 0's session stands
    finally:
        await left.aclose()


def test_a_database_the_server_does_not_have_is_one_typed_line(server: RedisServer) -> None:
    """Passes (coverage): ``redis://host/99`` on a server of 16 databases: the store
    raises StoreUnavailable naming the database, and the CLI prints one line, exit 1."""

    async def go() -> str:
        store = open_store(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/99", namespace=NS)
        try:
            with pytest.raises(StoreUnavailable) as refused:
                await store.acquire(KEY, "w")
            return str(refused.value)
        finally:
            await store.aclose()

    server.cli("CONFIG", "SET", "requirepass", PASSWORD)
    message = asyncio.run(go())
    assert "/99" in message and PASSWORD not in message
    result = cli("--store", f"redis://:{PASSWORD}@127.0.0.1:{server.port}/99", "ls")
    assert result.exit_code == 1, shown(result)
    assert shown(result).startswith("error (StoreUnavailable)")
    assert shown(result).strip().count("\n") == 0 and PASSWORD not in shown(result)


async def test_events_of_one_database_do_not_reach_a_store_of_another(
    server: RedisServer,
) -> None:
    """Expected: ``store.subscribe()`` yields "a namespace's state changes" (events.py)
    of the sessions of its store. Two deployments on one server separated by database
    number (``/3`` staging, ``/4`` production, the default namespace in both) each
    follow their own sessions.

    Actual: Redis pub/sub ignores the database number, and the channel is
    ``<ns>:events`` (stores/redis/keys.py:26): the store of database 4 hears the commits of
    database 3, for a session it does not hold (``info`` is None). A follower of events
    (multi-worker.md: "Other back-ends can follow sessions on the ns:events channel")
    acts on another deployment's sessions. Fix: put the database number into the
    channel names (events and ``ctl``) when it is not 0, or document that deployments
    sharing a server must use distinct namespaces."""
    staging = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/3")
    production = RedisStore.from_url(f"redis://127.0.0.1:{server.port}/4")
    try:
        async with production.subscribe() as events:
            await _session(staging, 1, ns="lkresume")
            await production.publish("own", "paused")  # a marker of production's own
            got = await asyncio.wait_for(events.__anext__(), 5)
            assert got["key"] == "own", f"database 4 heard database 3's {got}"
        assert await production.info(KEY) is None
    finally:
        await staging.aclose()
        await production.aclose()


# ------------------------------------------------------------- passwords in URLs


@pytest.mark.parametrize("secret", ["p@ss/w:rd#1?", "sp ace%25+plus", "ünï-cødé"])
async def test_a_password_with_reserved_characters_percent_encoded_connects(
    make_redis: RedisFactory, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Passes (coverage): a password holding ``@ / : # ? %`` or non-ASCII, written
    percent-encoded in the URL (`RedisURL`: "Percent-escapes in the user and password
    are decoded"), authenticates; neither its raw nor its encoded form is shown by a
    refusal or logged."""
    from urllib.parse import quote

    caplog.set_level(logging.DEBUG)
    server = make_redis("--requirepass", secret)
    encoded = quote(secret, safe="")
    store = open_store(f"redis://:{encoded}@127.0.0.1:{server.port}/0", namespace=NS)
    wrong = open_store(f"redis://:{encoded}x@127.0.0.1:{server.port}/0", namespace=NS, retries=0)
    try:
        await _session(store)
        assert await _turns(store) == 2
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.info(KEY)
        text = "".join(traceback.format_exception(refused.value))
    finally:
        await store.aclose()
        await wrong.aclose()
    for said in (text, *(r.getMessage() for r in caplog.records)):
        assert secret not in said and encoded not in said, said


async def test_a_wrong_password_is_typed_fast_hidden_and_writes_nothing(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Passes (coverage): with a wrong password every call is StoreUnavailable within
    the retries (no hang), the whole exception chain (what a log with ``exc_info``
    prints) and every log record hide the password, and nothing is written."""
    caplog.set_level(logging.DEBUG)
    server = make_redis("--requirepass", PASSWORD)
    url = f"redis://default:{PASSWORD}-wrong@127.0.0.1:{server.port}/0"
    store = open_store(url, namespace=NS, retries=1, socket_timeout=2.0)
    texts: list[str] = []
    started = time.monotonic()
    try:
        for call in (
            lambda: store.acquire(KEY, "w"),
            lambda: store.load(KEY),
            lambda: store.keys(),
            lambda: store.delete(KEY),
        ):
            with pytest.raises(StoreUnavailable) as refused:
                await call()
            texts.append("".join(traceback.format_exception(refused.value)))
    finally:
        await store.aclose()
    assert time.monotonic() - started < 15
    for said in (*texts, *(r.getMessage() for r in caplog.records)):
        assert PASSWORD not in said, said
    assert _dump(server.port, "*", password=PASSWORD) == {}


def test_a_unix_socket_url_is_refused_as_a_usage_error_without_its_password() -> None:
    """Passes (coverage): docs name no ``unix://`` store; such a URL (an operator's
    ``unixsocket`` Redis) is a usage error naming the known schemes, the password
    hidden, never a raw redis-py error or an attempt at a TCP host."""
    url = f"unix://:{PASSWORD}@/tmp/redis-hunt-nonexistent.sock?db=3"
    with pytest.raises(ValueError, match="redis://") as refused:
        open_store(url)
    assert PASSWORD not in str(refused.value)
    result = cli("--store", url, "ls")
    assert result.exit_code == 2, shown(result)
    assert PASSWORD not in shown(result)


# -------------------------------------------------------- Sentinel, both passwords


@pytest.fixture
def locked_pair(make_redis: RedisFactory, tmp_path: Path) -> Iterator[RedisSentinel]:
    """A primary with ``requirepass``, watched by a Sentinel that has a password of its
    own (``requirepass``) and knows the primary's (``auth-pass``)."""
    primary = make_redis("--requirepass", PASSWORD)
    sentinel = RedisSentinel(tmp_path / "sentinel", primary)
    with sentinel.config.open("a") as config:
        config.write(f"sentinel auth-pass mymaster {PASSWORD}\nrequirepass sentinel-pw\n")
    sentinel.start()
    try:
        yield sentinel
    finally:
        sentinel.stop()


async def test_sentinel_with_a_sentinel_password_and_a_data_password(
    locked_pair: RedisSentinel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passes (coverage): ``redis+sentinel://:datapw@host/mymaster/0`` with
    ``RESUME_SENTINEL_PASSWORD`` saves, restores, carries events and serves ``ls``; a
    wrong data password is StoreUnavailable and changes nothing; neither password is
    ever shown (message, exception chain, logs, CLI)."""
    caplog.set_level(logging.DEBUG)
    port = locked_pair.port
    url = f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/mymaster/0"
    monkeypatch.setenv("RESUME_SENTINEL_PASSWORD", "sentinel-pw")
    monkeypatch.setenv("RESUME_NAMESPACE", NS)
    store = open_store(url)
    try:
        async with store.subscribe() as events:  # type: ignore[attr-defined]
            await _session(store)
            seen = [(await asyncio.wait_for(events.__anext__(), 5))["event"] for _ in range(2)]
        assert seen == ["committed", "committed"]
        assert await _turns(store) == 2
    finally:
        await store.aclose()
    listed = await asyncio.to_thread(cli, "--store", url, "ls", "--json")
    assert listed.exit_code == 0, shown(listed)
    assert f'"key": "{KEY}"' in listed.stdout
    wrong = open_store(url.replace(PASSWORD, "nope"), retries=0, socket_timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.acquire("other", "w")
        chain = "".join(traceback.format_exception(refused.value))
    finally:
        await wrong.aclose()
    bad = await asyncio.to_thread(cli, "--store", url.replace(PASSWORD, "nope" + PASSWORD), "ls")
    assert bad.exit_code == 1, shown(bad)
    for said in (chain, shown(listed), shown(bad), *(r.getMessage() for r in caplog.records)):
        assert PASSWORD not in said and "sentinel-pw" not in said, said
    check = open_store(url)
    try:
        assert await check.info("other") is None  # the refused acquire wrote nothing
    finally:
        await check.aclose()


# ----------------------------------------------------------- Cluster with a password


class _LockedCluster(RedisCluster):
    """Three primaries with ``requirepass`` and ``masterauth``."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        for node in self.nodes:
            node.extra += ["--requirepass", PASSWORD, "--masterauth", PASSWORD]

    def url_with(self, password: str) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://:{password}@{hosts}"

    def start(self) -> _LockedCluster:
        for node in self.nodes:
            node.start()
        out = _cli(
            self.nodes[0].port, "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas", "0", "--cluster-yes", timeout=CLUSTER_DEADLINE,
        )  # fmt: skip
        deadline = time.monotonic() + CLUSTER_DEADLINE
        while time.monotonic() < deadline:
            infos = [
                _cli(n.port, "-a", PASSWORD, "--no-auth-warning", "cluster", "info")
                for n in self.nodes
            ]
            if all("cluster_state:ok" in i and "cluster_known_nodes:3" in i for i in infos):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cluster did not reach cluster_state:ok:\n{out}")


@pytest.fixture
def locked_cluster(tmp_path: Path) -> Iterator[_LockedCluster]:
    cluster = _LockedCluster(tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_cluster_with_a_password(
    locked_cluster: _LockedCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passes (coverage): ``redis+cluster://:pw@a,b,c`` saves and restores sessions on
    every node, carries events and remote-command subscriptions (pub/sub connections
    authenticate too), serves ``ls`` and ``rm``; a wrong password is StoreUnavailable;
    the password is never shown."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RESUME_NAMESPACE", NS)
    url = locked_cluster.url_with(PASSWORD)
    keys = [f"room-{i}" for i in range(6)]  # spread over the nodes' slots
    store = open_store(url)
    assert isinstance(store, RedisStore)
    try:
        async with store.subscribe() as events:
            for key in keys:
                await _session(store, 1, key=key)
            seen = {(await asyncio.wait_for(events.__anext__(), 5))["key"] for _ in keys}
        assert seen == set(keys)
        assert [await _turns(store, key) for key in keys] == [1] * 6
        channel = store.commands()
        async with channel.inbox(keys[0]) as inbox:  # a subscription of its own node
            command = Command("c1", keys[0], "pause", 1)
            assert await channel.send(command) == 1  # heard by its one owner
            assert (await asyncio.wait_for(inbox.__anext__(), 5)).id == "c1"
    finally:
        await store.aclose()
    listed = await asyncio.to_thread(cli, "--store", url, "ls", "--json")
    assert listed.exit_code == 0, shown(listed)
    assert all(f'"key": "{key}"' in listed.stdout for key in keys)
    removed = await asyncio.to_thread(cli, "--store", url, "rm", "--yes", keys[0])
    assert removed.exit_code == 0, shown(removed)
    wrong = open_store(locked_cluster.url_with("nope"), retries=0, socket_timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.info(keys[1])
        chain = "".join(traceback.format_exception(refused.value))
    finally:
        await wrong.aclose()
    bad = await asyncio.to_thread(cli, "--store", locked_cluster.url_with("x" + PASSWORD), "ls")
    assert bad.exit_code == 1, shown(bad)
    for said in (chain, shown(listed), shown(removed), shown(bad)):
        assert PASSWORD not in said, said
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
