"""Security, tried as an operator reading terminals and logs and as a writer without the
keys (issue 15, defects 4, 5 and 6): no secret is ever printed, nothing a store holds
reaches a terminal raw, and what an encrypted store leaves in clear is exactly what
docs/security.md says.

Real servers and files throughout: a password-protected ``redis-server`` on loopback,
SQLite files created under umask 022.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import stat
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import llm
from typer.testing import CliRunner, Result

from livekit_resume import StoreUnavailable, open_store
from livekit_resume.cli import app, commit_from_snapshot
from livekit_resume.settings import Settings
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import AgentFrame, SessionMeta, Snapshot, ToolCallRecord, Writer
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.sqlite.connection import FILE_MODE
from tests.redis_servers import RedisFactory, RedisServer, RedisTLSServer, TLSFiles

PASSWORD = "hunter2-Sup3rS3cret"
# A key given without its "kid:" prefix: the value is the secret itself.
BARE_KEY = base64.b64encode(b"the-signing-secret-32-bytes-long").decode()

# What a terminal acts on: C0 (but the newline), DEL, C1, bidi overrides and isolates.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE = (
    "hello \x1b]0;pwned-title\x07 \x1b[2J\x1b[H \x9b31m \u202eevil\u202c "
    "\u2066iso\u2069 \r\x08 [bold]literal[/bold]"
)


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def everything(result: Result) -> str:
    """All a command showed, on either stream."""
    return result.stdout + result.stderr


@pytest.fixture
def secret_redis(make_redis: RedisFactory) -> str:
    """A redis-server that wants a password; its URL carries it."""
    server = make_redis("--requirepass", PASSWORD)
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> str:
    ns = f"sec{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RESUME_NAMESPACE", ns)
    return ns


async def _write(url: str, snap: Snapshot, **codec: Any) -> None:
    """Commit ``snap`` whole, as any writer of the store could."""
    store = open_store(url)
    try:
        lease = await store.acquire(snap.key, "writer")
        await store.commit(
            commit_from_snapshot(Codec(**codec), snap, epoch=lease.epoch, base_version=0)
        )
        await store.release(lease)
    finally:
        await store.aclose()


def _message(item_id: str, role: str, text: str) -> dict[str, Any]:
    return item_to_data(llm.ChatMessage(id=item_id, role=role, content=[text], created_at=1.0))  # type: ignore[arg-type]


# ----------------------------------------------------------- defect 4: no secret shown


def test_a_key_without_its_kid_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError) as refused:
        Settings.only("signing_keys", signing_keys=BARE_KEY).codec()
    assert BARE_KEY not in str(refused.value)
    assert "RESUME_SIGNING_KEYS" in str(refused.value)
    monkeypatch.setenv("RESUME_ENCRYPTION_KEYS", f"k1:{BARE_KEY},{BARE_KEY}")
    with pytest.raises(ValueError) as refused:
        Settings.only("encryption_keys").codec()
    assert BARE_KEY not in str(refused.value)
    assert "RESUME_ENCRYPTION_KEYS" in str(refused.value)


@pytest.mark.parametrize("command", ["import", "show", "export"])
def test_a_malformed_key_is_one_line_without_a_traceback_or_the_key(
    tmp_path: Path, command: str
) -> None:
    db = f"sqlite:///{tmp_path}/s.db"
    asyncio.run(_write(db, Snapshot(key="room")))
    (tmp_path / "f.lkrs").write_bytes(b"")
    args = {
        "import": ["import", str(tmp_path / "f.lkrs")],
        "show": ["show", "room"],
        "export": ["export", "room", "-o", str(tmp_path / "out")],
    }[command]
    result = cli("--store", db, *args, env={"RESUME_SIGNING_KEYS": BARE_KEY})
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    shown = everything(result)
    assert BARE_KEY not in shown and "Traceback" not in shown
    assert shown.strip().count("\n") == 0, shown
    assert shown.startswith("error (ValueError): RESUME_SIGNING_KEYS")


def test_ls_rm_and_errors_never_show_the_store_password(secret_redis: str, namespace: str) -> None:
    empty = cli("--store", secret_redis, "ls")
    assert empty.exit_code == 0, everything(empty)
    assert "no sessions in redis://***@127.0.0.1" in empty.stdout
    asyncio.run(_write(secret_redis, Snapshot(key="room")))
    results = [
        cli("--store", secret_redis, "ls"),  # the table's title
        cli("--store", secret_redis, "rm", "--yes", "nobody"),
        cli("--store", secret_redis, "show", "nobody"),
        cli("--store", secret_redis.replace("redis://", "nosuch://"), "ls"),
        cli("--store", secret_redis.replace(PASSWORD, PASSWORD + "-wrong"), "ls"),
        cli("--store", secret_redis + "?x=1", "ls"),
    ]
    assert "sessions in redis://***@127.0.0.1" in results[0].stdout
    # 2, usage: no such scheme, and a URL the store refuses (an unknown query)
    assert [r.exit_code for r in results] == [0, 1, 1, 2, 1, 2]
    for result in results:
        assert PASSWORD not in everything(result), everything(result)
        assert isinstance(result.exception, (SystemExit, type(None)))


def test_store_logs_and_errors_never_show_the_store_password(
    secret_redis: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def go() -> list[str]:
        messages = []
        for url in (secret_redis, secret_redis.replace(PASSWORD, "wrong-" + PASSWORD)):
            store = open_store(url)
            assert isinstance(store, RedisStore)
            try:
                await store.check()
                await store.keys()
            except Exception as exc:
                messages.append(f"{type(exc).__name__}: {exc} {exc.__cause__}")
            finally:
                await store.aclose()
        for bad in ("nosuch://", "redis+cluster://", "redis+sentinel://"):
            try:
                open_store(secret_redis.replace("redis://", bad) + "/x/y/z")
            except ValueError as exc:
                messages.append(str(exc))
        return messages

    messages = asyncio.run(go())
    assert len(messages) == 4  # the wrong password, and three refused URLs
    for text in [*messages, *(r.getMessage() for r in caplog.records)]:
        assert PASSWORD not in text, text


# --------------------------------------------------- defect 5: no terminal injection


def _hostile_snapshot(key: str) -> Snapshot:
    return Snapshot(
        key=key,
        writer=Writer(host="host\x1b]0;w\x07", worker_id="w\u202e1"),
        meta=SessionMeta(
            room="room\x1b[2J", participant_identity="caller\x9b1m", extra={"x": HOSTILE}
        ),
        history=[
            _message("m1", "user", HOSTILE),
            _message("m2", "assistant", "multi\nline " + HOSTILE),
            item_to_data(llm.FunctionCall(call_id="c1", name="tool\x1b[2J", arguments=HOSTILE)),
            item_to_data(
                llm.FunctionCallOutput(
                    call_id="c1", name="tool\x07", output=HOSTILE, is_error=False
                )
            ),
        ],
        agent=AgentFrame(
            agent_id="agent\x1b]0;a\x07", chat_ctx=[_message("m3", "system", HOSTILE)]
        ),
        userdata={"note": HOSTILE},
        tool_calls=[ToolCallRecord(call_id="c2", name="t\u202e", arguments=HOSTILE)],
    )


def test_nothing_the_store_holds_reaches_the_terminal_raw(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/s.db"
    key = "room-\u202e\x9b2J-\u2066x"
    asyncio.run(_write(db, _hostile_snapshot(key)))
    for args in (["ls"], ["show", "--all", key], ["history", key], ["repair", "--dry-run", key]):
        result = cli("--store", db, *args)
        assert result.exit_code == 0, everything(result)
        shown = everything(result)
        assert not RAW_CONTROL.findall(shown), (args, RAW_CONTROL.findall(shown))
    shown = cli("--store", db, "show", "--all", key).stdout
    assert "[bold]literal[/bold]" in shown  # not taken as markup either
    assert "\\x1b]0;pwned-title\\x07" in shown  # shown, escaped
    assert "\\u202eevil" in shown
    assert re.search(r"multi *\n *line", shown)  # a paragraph stays a paragraph
    deleted = cli("--store", db, "rm", "--yes", key)
    assert deleted.exit_code == 0 and not RAW_CONTROL.findall(everything(deleted))


def test_error_messages_reach_the_terminal_escaped_and_on_one_line(tmp_path: Path) -> None:
    result = cli("--store", f"sqlite:///{tmp_path}/s.db", "show", "room\u202e\x9b")
    assert result.exit_code == 1
    assert not RAW_CONTROL.findall(everything(result))
    missing = cli("--store", f"sqlite:///{tmp_path}/no\x1b]0;t\x07\nsuch.db", "ls")
    assert missing.exit_code == 1
    assert not RAW_CONTROL.findall(everything(missing))
    assert everything(missing).strip().count("\n") == 0


# ------------------------------------------- defect 6: files 0600, metadata documented


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_sqlite_store_creates_its_files_0600(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "sessions.db"
    asyncio.run(_write(f"sqlite:///{path}", Snapshot(key="room")))

    async def hold_open() -> None:  # the -wal and -shm exist while a connection is open
        store = open_store(f"sqlite:///{path}")
        try:
            await store.acquire("other", "w")
            files = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in os.scandir(tmp_path)}
            assert files == {
                "sessions.db": FILE_MODE,
                "sessions.db-wal": FILE_MODE,
                "sessions.db-shm": FILE_MODE,
            }
        finally:
            await store.aclose()

    asyncio.run(hold_open())
    assert FILE_MODE == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_file_keeps_the_mode_its_owner_gave_it(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    asyncio.run(_write(f"sqlite:///{path}", Snapshot(key="room")))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


ENC = "k1:" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
# What docs/security.md lists as clear in an encrypted store's version info.
DOCUMENTED_CLEAR_INFO = {"state", "reason", "agent", "items", "owner", "source"}


def test_an_encrypted_sqlite_file_holds_only_the_documented_metadata_in_clear(
    tmp_path: Path,
) -> None:
    path = tmp_path / "enc.db"
    words = "the caller's secret balance is 4711"
    snap = Snapshot(
        key="room",
        history=[_message("m1", "user", words)],
        agent=AgentFrame(agent_id="Receptionist", instructions="never tell the balance"),
        userdata={"balance": "four-seven-one-one"},
    )
    asyncio.run(_write(f"sqlite:///{path}", snap, encryption_keys=ENC))
    raw = path.read_bytes() + (
        Path(f"{path}-wal").read_bytes() if Path(f"{path}-wal").exists() else b""
    )
    for private in (words, "never tell the balance", "four-seven-one-one"):
        assert private.encode() not in raw
    listing = cli("--store", f"sqlite:///{path}", "--json", "ls")
    assert listing.exit_code == 0, everything(listing)
    assert '"agent": "Receptionist"' in listing.stdout  # readable without the keys

    async def stored_info() -> set[str]:
        store = open_store(f"sqlite:///{path}")
        try:
            return set((await store.versions("room"))[0].info)
        finally:
            await store.aclose()

    assert asyncio.run(stored_info()) <= DOCUMENTED_CLEAR_INFO


# ------------------------------------------------- transport: rediss:// on a real server


async def _exercise(url: str, key: str = "room", **options: Any) -> list[str]:
    """Every kind of store operation once (scripts, listing, pub/sub, delete); the
    events seen, in order."""
    store = open_store(url, **options)
    assert isinstance(store, RedisStore)
    try:
        await store.check()
        async with store.subscribe() as events:
            lease = await store.acquire(key, "worker")
            # a record over a megabyte: staged ahead of the commit script
            big = os.urandom(3 << 19).hex()
            snap = Snapshot(key=key, history=[_message("m1", "user", big)])
            commit = commit_from_snapshot(Codec(), snap, epoch=lease.epoch, base_version=0)
            assert max(len(r.data or b"") for r in commit.records) > 1 << 20
            assert await store.commit(commit) == 1
            assert (await store.load(key)).version == 1
            assert [v.version for v in await store.versions(key)] == [1]
            assert key in await store.keys()
            assert (await store.info(key)) is not None
            await store.publish(key, "paused")
            await store.release(lease)
            seen = [(await asyncio.wait_for(events.__anext__(), 5))["event"] for _ in range(2)]
        assert await store.delete(key)
        assert await store.keys() == []
        return seen
    finally:
        await store.aclose()


def test_rediss_verifies_the_server_certificate_by_default(
    tls_redis: RedisTLSServer, namespace: str
) -> None:
    with pytest.raises(StoreUnavailable, match="certificate verify failed"):
        asyncio.run(_exercise(tls_redis.url))


def test_rediss_with_the_servers_ca_runs_every_operation(
    tls_redis: RedisTLSServer, tls_files: TLSFiles, namespace: str
) -> None:
    seen = asyncio.run(_exercise(tls_redis.url, ssl_ca_certs=str(tls_files.ca)))
    assert seen == ["committed", "paused"]


def test_rediss_refuses_a_server_signed_by_another_ca(
    tls_redis: RedisTLSServer, tls_files: TLSFiles, namespace: str
) -> None:
    with pytest.raises(StoreUnavailable) as refused:
        asyncio.run(_exercise(tls_redis.url, ssl_ca_certs=str(tls_files.other_ca)))
    message = str(refused.value)
    assert "certificate verify failed" in message
    assert f"rediss 127.0.0.1:{tls_redis.port}/0 is unavailable" in message


def test_rediss_presents_a_client_certificate_when_the_server_requires_one(
    mtls_redis: RedisTLSServer, tls_files: TLSFiles, namespace: str
) -> None:
    with pytest.raises(StoreUnavailable):
        asyncio.run(_exercise(mtls_redis.url, ssl_ca_certs=str(tls_files.ca)))
    seen = asyncio.run(
        _exercise(
            mtls_redis.url,
            ssl_ca_certs=str(tls_files.ca),
            ssl_certfile=str(tls_files.client_cert),
            ssl_keyfile=str(tls_files.client_key),
        )
    )
    assert seen == ["committed", "paused"]


def test_the_cli_trusts_the_ca_named_by_ssl_cert_file(
    tls_redis: RedisTLSServer, tls_files: TLSFiles, namespace: str
) -> None:
    refused = cli("--store", tls_redis.url, "ls")
    assert refused.exit_code == 1 and "certificate verify failed" in refused.stderr
    trusted = cli("--store", tls_redis.url, "ls", env={"SSL_CERT_FILE": str(tls_files.ca)})
    assert trusted.exit_code == 0, everything(trusted)


# ------------------------------------------------------ access control: a Redis ACL user

# The commands a store needs (docs/security.md gives this line): its scripts' own
# commands, loading them, the namespace index, SCAN for remains, staging a record over
# a megabyte (SET, APPEND; the scripts' STRLEN, GET), pub/sub and WAIT.
# CONFIG GET is not among them: the store's server check skips quietly without it.
ACL_RULES = (
    "+evalsha +script|load +time +scan +ping "
    "+zadd +zrem +zscore +zrange +zremrangebyscore "
    "+hget +hgetall +hmget +hset +hdel +del +type +exists +llen +lrange +rpush "
    "+get +set +append +strlen "
    "+persist +pexpire +pttl +publish +subscribe +unsubscribe +wait +select"
)
ACL_COMMANDS = ACL_RULES.split()


def test_the_documented_acl_line_grants_exactly_what_is_tested() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "security.md"
    line = next(s for s in doc.read_text().splitlines() if s.startswith("ACL SETUSER"))
    assert [word for word in line.split() if word.startswith("+")] == ACL_COMMANDS


@pytest.fixture
def acl_redis(make_redis: RedisFactory) -> tuple[Any, str]:
    """A server with a user ``acme`` allowed only the ``acme:`` keys and channels."""
    server = make_redis()
    reply = server.cli(
        "ACL", "SETUSER", "acme", "reset", "on", ">acme-pw", "~acme:*", "&acme:*", "-@all",
        *ACL_COMMANDS,
    )  # fmt: skip
    assert reply.strip() == "OK", reply
    return server, f"redis://acme:acme-pw@127.0.0.1:{server.port}/0"


def test_an_acl_user_of_one_namespace_runs_every_store_operation(
    acl_redis: tuple[Any, str], caplog: pytest.LogCaptureFixture
) -> None:
    _server, url = acl_redis
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    for options in ({}, {"ttl": 60.0}, {"wait_replicas": 1, "wait_timeout": 10}):
        seen = asyncio.run(_exercise(url, namespace="acme", **options))
        assert seen == ["committed", "paused"]
    # CONFIG GET denied: the check skipped quietly; only WAIT's missing replica is said
    assert all("WAIT" in r.getMessage() or "replicas" in r.getMessage() for r in caplog.records)


def earlier_acl_user(server: RedisServer) -> str:
    """The URL of user ``old`` of namespace ``old``, granted security.md's line as it was
    before staging and tombstones: no GET, SET, APPEND, STRLEN."""
    earlier = [c for c in ACL_COMMANDS if c not in ("+get", "+set", "+append", "+strlen")]
    reply = server.cli(
        "ACL", "SETUSER", "old", "reset", "on", ">old-pw", "~old:*", "&old:*", "-@all", *earlier
    )
    assert reply.strip() == "OK", reply
    return f"redis://old:old-pw@127.0.0.1:{server.port}/0"


def test_an_acl_user_from_before_staging_still_saves_large_records(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A user granted the earlier line (no GET, SET, APPEND, STRLEN): a record over a
    megabyte is sent whole with its commit, with a warning, never left unsaved; a
    delete deletes, without its tombstone, with a warning."""
    url = earlier_acl_user(make_redis())
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    assert asyncio.run(_exercise(url, namespace="old")) == ["committed", "paused"]
    assert [r for r in caplog.records if "+get +set +append +strlen" in r.getMessage()]
    # and deletes, without the tombstone that fences a worker holding the session
    assert [r for r in caplog.records if "without a tombstone" in r.getMessage()]


async def test_a_user_who_may_not_publish_has_its_commits_and_takeovers_stand_as_written(
    make_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user with the keys but not the events channel (Redis 7's default
    ``acl-pubsub-default resetchannels``, or the line above without ``&acme:*``). The
    scripts publish after they write, and a script is never undone: a refused event
    failed a commit that had landed, and a takeover that had fenced the holder."""
    server = make_redis()
    reply = server.cli(
        "ACL", "SETUSER", "mute", "reset", "on", ">pw", "~mute:*", "-@all", *ACL_COMMANDS
    )
    assert reply.strip() == "OK", reply
    caplog.set_level(logging.WARNING, logger="livekit_resume")
    mute = RedisStore.from_url(f"redis://mute:pw@127.0.0.1:{server.port}/0", namespace="mute")
    admin = RedisStore.from_url(server.url, namespace="mute")
    snap = Snapshot(key="room", history=[_message("m1", "user", "hello")])
    try:
        holder = await admin.acquire("room", "worker-a")
        assert (
            await admin.commit(
                commit_from_snapshot(Codec(), snap, epoch=holder.epoch, base_version=0)
            )
            == 1
        )

        taken = await mute.acquire("room", "worker-b", takeover=True)  # raised, yet stood
        assert taken.epoch > holder.epoch
        commit = commit_from_snapshot(Codec(), snap, epoch=taken.epoch, base_version=1)
        assert await mute.commit(commit) == 2  # raised, yet landed
        assert (await admin.info("room")) is not None
        assert (await admin.info("room")).version == 2  # type: ignore[union-attr]
        warned = [r.getMessage() for r in caplog.records if "may not publish" in r.getMessage()]
        assert len(warned) == 1 and "mute:events" in warned[0], warned
    finally:
        await mute.aclose()
        await admin.aclose()


def test_an_acl_user_cannot_read_or_write_another_namespace(acl_redis: tuple[Any, str]) -> None:
    server, url = acl_redis
    admin = f"redis://127.0.0.1:{server.port}/0"
    asyncio.run(_write(admin, Snapshot(key="room", history=[_message("m1", "user", "private")])))

    async def trespass() -> list[str]:
        refused = []
        store = open_store(url, namespace="lkresume")  # the other tenant's (default) namespace
        assert isinstance(store, RedisStore)
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: store.load("room"),
            lambda: store.info("room"),
            lambda: store.versions("room"),
            lambda: store.keys(),
            lambda: store.acquire("room", "intruder", takeover=True),
            lambda: store.delete("room"),
            lambda: store.publish("room", "paused"),
            lambda: store.subscribe().__anext__(),
        ]
        try:
            for attempt in attempts:
                with pytest.raises(StoreUnavailable) as denied:
                    await attempt()
                refused.append(str(denied.value))
        finally:
            await store.aclose()
        return refused

    refused = asyncio.run(trespass())
    assert len(refused) == 8
    assert all("permissions" in r.lower() or "can't run" in r for r in refused), refused
    assert snapshot_text(admin, "room") == "private"  # untouched, still readable by its owner


def snapshot_text(url: str, key: str) -> str:
    async def go() -> str:
        store = open_store(url)
        try:
            from livekit_resume.bridge import from_stored

            snap = from_stored(Codec(), await store.load(key))
            return str(snap.history[0]["content"][0])
        finally:
            await store.aclose()

    return asyncio.run(go())


# ------------------------------------------------ the right to be forgotten: rm removes all


def _all_redis_keys(server: Any) -> list[str]:
    return [k for k in server.cli("--scan", "--pattern", "*").split("\n") if k]


def _busy_session(url: str, key: str) -> None:
    """A session with several versions, edited items, a compaction or two, a live lease
    and events: every kind of trace a session leaves."""

    async def go() -> None:
        store = open_store(url, keep=3)
        try:
            lease = await store.acquire(key, "worker")
            base = 0
            for turn in range(8):
                history = [_message(f"m{i}", "user", f"{key} turn {i}") for i in range(turn + 1)]
                snap = Snapshot(key=key, history=history, userdata={"who": key})
                commit = commit_from_snapshot(Codec(), snap, epoch=lease.epoch, base_version=base)
                base = await store.commit(commit)
            if hasattr(store, "publish"):
                await store.publish(key, "paused")
            # the lease stays held: rm must take it too
        finally:
            await store.aclose()

    asyncio.run(go())


def test_rm_leaves_no_trace_of_a_session_in_redis(redis_server: Any, namespace: str) -> None:
    url = redis_server.url
    _busy_session(url, "forget-me")
    _busy_session(url, "keep-me")
    before = [k for k in _all_redis_keys(redis_server) if "forget-me" in k]
    assert len(before) >= 3  # head, versions, log
    result = cli("--store", url, "rm", "--yes", "forget-me")
    assert result.exit_code == 0, everything(result)
    for name in _all_redis_keys(redis_server):
        assert "forget-me" not in name, name
        if name.startswith(namespace):
            assert "forget-me" not in redis_server.cli("--no-raw", "DUMP", name), name
    assert "keep-me" in cli("--store", url, "ls").stdout


def test_rm_removes_the_remains_of_a_partially_evicted_session(
    redis_server: Any, namespace: str
) -> None:
    url = redis_server.url
    _busy_session(url, "evicted")
    head = next(k for k in _all_redis_keys(redis_server) if "evicted" in k and k.endswith("head"))
    redis_server.cli("DEL", head)  # as maxmemory-policy allkeys-* would
    assert cli("--store", url, "show", "evicted").exit_code == 1  # SnapshotCorrupt, not "new"
    result = cli("--store", url, "rm", "--yes", "evicted")
    assert result.exit_code == 0, everything(result)
    assert not [k for k in _all_redis_keys(redis_server) if "evicted" in k]


def test_rm_leaves_no_row_about_a_session_in_sqlite(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    _busy_session(url, "forget-me")
    _busy_session(url, "keep-me")
    result = cli("--store", url, "rm", "--yes", "forget-me")
    assert result.exit_code == 0, everything(result)
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        kept = 0
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # our own table names
                cells = [c if isinstance(c, bytes) else str(c).encode() for c in row]
                assert not any(b"forget-me" in c for c in cells), (table, row)
                kept += any(b"keep-me" in c for c in cells)
    assert kept
    # secure_delete: the deleted rows' bytes are overwritten, not left in free pages
    assert not Path(f"{path}-wal").exists()  # the last connection folded it in
    assert b"forget-me" not in path.read_bytes()
    assert b"keep-me" in path.read_bytes()


# --------------------------------------------------------- fuzz: only typed errors


def test_decoding_mutated_real_frames_raises_only_typed_errors() -> None:
    """A slice of bench/fuzz_decode.py (the full run's counts are in docs/security.md):
    2,000 mutated frames, signed, encrypted, both and neither."""
    fuzz = _bench("fuzz_decode")
    report = fuzz.fuzz(2_000, seed=15)
    assert report.findings == []
    assert report.frames == 2_000
    assert sum(report.outcomes.values()) == 2_000
    assert report.max_seconds < 1.0  # a bound, not a timing: no frame makes it work hard
    assert report.max_peak_bytes < 8 * 1024 * 1024  # never more than the limit justifies


def _bench(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
