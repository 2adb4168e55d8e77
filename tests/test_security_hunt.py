"""Security hunt: key rotation, splices across keys, replays, downgrades, remote control
and redaction, against real stores (memory, SQLite files, a real redis-server) through
the public API and the command line.

Each test states what docs/security.md (or control.md, schema.md) promises. A failing
test is a defect; its docstring says what is expected and what happens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession
from pydantic import BaseModel
from typer.testing import CliRunner

import livekit_resume as lr
from livekit_resume.bridge import codec_for
from livekit_resume.errors import (
    CommandRefused,
    ResumeError,
    SignatureMismatch,
    SnapshotCorrupt,
    TokenRefused,
    UnknownAgent,
)
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Commit, Store, records_from_streams
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_security import PASSWORD, namespace, secret_redis

__all__ = ["namespace", "secret_redis"]

KEY = "room-hunt"
OTHER_KEY = "room-hunt-other"


def _k(kid: str, fill: bytes, n: int = 32) -> str:
    return f"{kid}:" + base64.b64encode(fill * n).decode()


K1 = _k("k1", b"1")
K2 = _k("k2", b"2")
K1_REUSED = _k("k1", b"9")  # a kid reused for another key (the runbook forbids it)
E1 = _k("e1", b"a")
E2 = _k("e2", b"b")
SECRET_PW = "Hunter2SecretPw"


class Account(BaseModel):
    balance: int = 0


class Teller(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are a bank teller.")


def _registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Teller)
    return reg


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    ns = f"h{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        s: Store = lr.open_store("memory://")
    elif request.param == "sqlite":
        s = lr.open_store(f"sqlite:///{tmp_path}/hunt.db", namespace=ns)
    else:
        server = request.getfixturevalue("redis_server")
        s = lr.open_store(server.url, namespace=ns)
    yield s
    await s.aclose()


async def _open(
    store: Store, *, owner: str = "w1", key: str = KEY, **keys: Any
) -> tuple[AgentSession[Account], lr.ResumableSession]:
    session: AgentSession[Account] = make_text_session(
        ScriptedLLM([], default="ok"), userdata=Account()
    )
    rs = lr.ResumableSession(
        store,
        key,
        registry=_registry(),
        userdata_type=Account,
        owner=owner,
        autosave=False,
        **keys,
    )
    agent = await rs.restore(session, default=Teller, takeover=True)
    await session.start(agent)
    return session, rs


async def _close(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


async def _write(store: Store, text: str, balance: int, key: str = KEY, **keys: Any) -> int:
    session, rs = await _open(store, key=key, **keys)
    try:
        session.userdata.balance = balance
        session.history.add_message(role="user", content=text)
        return await rs.checkpoint()
    finally:
        await _close(session, rs)


async def _restored(store: Store, key: str = KEY, **keys: Any) -> tuple[int, list[str], bool]:
    session, rs = await _open(store, owner="w2", key=key, **keys)
    try:
        texts = [i.text_content or "" for i in session.history.items if i.type == "message"]
        return session.userdata.balance, texts, rs.resumed
    finally:
        await _close(session, rs)


async def _raw(store: Store, key: str) -> tuple[Any, ...]:
    """What the store holds of ``key``: its versions and the latest version's bytes."""
    versions = [(v.version, v.epoch) for v in await store.versions(key)]
    try:
        stored = await store.load(key)
    except lr.SnapshotNotFound:
        return (versions, None)
    return (versions, stored.version, stored.head, stored.streams)


async def _splice(store: Store, src_key: str, dst_key: str, *, version: int | None = None) -> int:
    """An attacker with write access and no key: copy ``src_key``'s head and item frames
    (every byte genuine) in as ``dst_key``'s next version."""
    stored = await store.load(src_key, version)
    lease = await store.acquire(dst_key, "mallory", takeover=True)
    info = await store.info(dst_key)
    base = info.version if info is not None else 0
    records = [r for r in records_from_streams(stored.streams)]
    from livekit_resume.stores.base import Record

    clear = [Record("history", "", None), Record("agent", "", None)]
    v = await store.commit(
        Commit(
            key=dst_key,
            epoch=lease.epoch,
            base_version=base,
            head=stored.head,
            records=clear + records,
            size=sum(len(s) for s in stored.streams.values()),
            info=dict(stored.info),
        )
    )
    await store.release(lease)
    return v


# ---------------------------------------------------------------- key rotation


async def test_rotation_new_key_first_reads_old_frames_and_a_checkpoint_keeps_them_readable(
    store: Store,
) -> None:
    """Runbook step 3: with ``k2,k1`` a session written under ``k1`` restores, and a
    checkpoint over it (head sealed with k2, older items still k1) restores again."""
    await _write(store, "deposit 200", 200, signing_keys=K1)
    session, rs = await _open(store, signing_keys=f"{K2},{K1}")
    session.userdata.balance = 300
    session.history.add_message(role="user", content="deposit 100")
    await rs.checkpoint()
    await _close(session, rs)
    balance, texts, resumed = await _restored(store, signing_keys=f"{K2},{K1}")
    assert resumed and balance == 300 and texts[:2] == ["deposit 200", "deposit 100"]


async def test_rotation_old_key_removed_refuses_frames_it_signed(store: Store) -> None:
    """Runbook step 5: once k1 is removed, a version still holding frames signed with it
    is refused with SignatureMismatch naming k1 (never read unchecked), and the refusal
    changes nothing stored."""
    await _write(store, "deposit 200", 200, signing_keys=K1)
    session, rs = await _open(store, signing_keys=f"{K2},{K1}")
    session.history.add_message(role="user", content="deposit 100")
    await rs.checkpoint()
    await _close(session, rs)
    before = await _raw(store, KEY)
    with pytest.raises(SignatureMismatch, match="k1") as e:
        await _restored(store, signing_keys=K2)
    assert e.value.unknown_key == "k1" or "k1" in str(e.value)
    assert await _raw(store, KEY) == before


async def test_a_kid_reused_for_another_key_is_a_signature_mismatch_not_a_read(
    store: Store,
) -> None:
    """A kid given to a different key (against the runbook) must never read frames made
    with the first key: SignatureMismatch, nothing written."""
    await _write(store, "deposit 200", 200, signing_keys=K1)
    before = await _raw(store, KEY)
    with pytest.raises(SignatureMismatch):
        await _restored(store, signing_keys=K1_REUSED)
    assert await _raw(store, KEY) == before


async def test_encryption_rotation_reads_old_and_refuses_once_removed(store: Store) -> None:
    await _write(store, "deposit 200", 200, encryption_keys=E1)
    session, rs = await _open(store, encryption_keys=f"{E2},{E1}")
    session.userdata.balance = 250
    session.history.add_message(role="user", content="deposit 50")
    await rs.checkpoint()
    await _close(session, rs)
    balance, texts, _ = await _restored(store, encryption_keys=f"{E2},{E1}")
    assert balance == 250 and texts[:2] == ["deposit 200", "deposit 50"]
    before = await _raw(store, KEY)
    with pytest.raises(SignatureMismatch, match="e1"):
        await _restored(store, encryption_keys=E2)
    assert await _raw(store, KEY) == before


async def test_encrypted_frames_are_refused_by_a_wrong_key_with_the_same_kid(
    store: Store,
) -> None:
    await _write(store, "deposit 200", 200, encryption_keys=E1)
    before = await _raw(store, KEY)
    with pytest.raises(SignatureMismatch):
        await _restored(store, encryption_keys=_k("e1", b"z"))
    assert await _raw(store, KEY) == before


async def test_signing_turned_on_refuses_sessions_stored_unsigned(store: Store) -> None:
    await _write(store, "deposit 200", 200)
    before = await _raw(store, KEY)
    with pytest.raises(SignatureMismatch):
        await _restored(store, signing_keys=K1)
    assert await _raw(store, KEY) == before


async def test_an_encrypted_session_is_refused_by_a_reader_that_signs_and_does_not_decrypt(
    store: Store,
) -> None:
    """Encrypted-only frames read by a codec with only signing keys: the frame is
    unsigned, so SignatureMismatch (never a decrypt attempt or an untyped error)."""
    await _write(store, "deposit 200", 200, encryption_keys=E1)
    with pytest.raises(ResumeError):
        await _restored(store, signing_keys=K1)


# ---------------------------------------------------------------- splices and replays


@pytest.mark.parametrize(
    "keys",
    [{"signing_keys": K1}, {"encryption_keys": E1}, {"signing_keys": K1, "encryption_keys": E1}],
)
async def test_a_session_copied_under_another_key_is_refused(
    store: Store, keys: dict[str, str]
) -> None:
    """Every genuine frame of session A committed as session B's newest version: the
    HMAC/AES-GCM context binds the key, so B's restore raises SignatureMismatch."""
    await _write(store, "A's secret", 42, **keys)
    await _write(store, "B's own", 7, key=OTHER_KEY, **keys)
    await _splice(store, KEY, OTHER_KEY)
    with pytest.raises(SignatureMismatch):
        await _restored(store, key=OTHER_KEY, **keys)
    balance, texts, _ = await _restored(store, **keys)
    assert balance == 42 and texts[0] == "A's secret"


@pytest.mark.parametrize("keys", [{"signing_keys": K1}, {"encryption_keys": E1}])
async def test_an_older_version_replayed_as_a_new_version_is_refused(
    store: Store, keys: dict[str, str]
) -> None:
    """Version 1's head and records committed again as version 3: bound to version 1,
    refused (SignatureMismatch), not restored with the old balance."""
    await _write(store, "deposit 200", 200, **keys)
    session, rs = await _open(store, **keys)
    session.userdata.balance = 5
    session.history.add_message(role="user", content="withdraw 195")
    await rs.checkpoint()
    await _close(session, rs)
    v = await _splice(store, KEY, KEY, version=1)
    assert v == (await store.info(KEY)).version  # type: ignore[union-attr]
    with pytest.raises(SignatureMismatch, match="version"):
        await _restored(store, **keys)


async def test_an_unbound_head_is_refused_when_allow_unbound_is_off(tmp_path: Path) -> None:
    """RESUME_ALLOW_UNBOUND=0: a signed head without a version binding (format 2 shape)
    is refused with SignatureMismatch."""
    store = lr.open_store(f"sqlite:///{tmp_path}/unbound.db")
    try:
        await _write(store, "deposit 200", 200, signing_keys=K1)
        stored = await store.load(KEY)
        codec = Codec(signing_keys=K1, namespace=codec_for(store).namespace)
        data, counts = codec.decode_head(KEY, stored.head)
        strict = Codec(signing_keys=K1, namespace=codec.namespace, allow_unbound=False)
        # a genuine key-holder's head of format 2 (no binding): what an old release wrote
        old = codec.pack({**data, "counts": counts}, context=KEY.encode(), version=2)
        with pytest.raises(SignatureMismatch, match="binding"):
            strict.decode_head(KEY, old)
        codec.decode_head(KEY, old)  # the default reads it (documented)
    finally:
        await store.aclose()


# ---------------------------------------------------------------- never import by name


async def test_an_agent_id_naming_a_module_is_never_imported(tmp_path: Path) -> None:
    """A forged (unkeyed) head naming ``tests._hunt_marker.Evil`` as its agent: the
    registry alone rebuilds classes, so UnknownAgent and the module is never imported."""
    store = lr.open_store(f"sqlite:///{tmp_path}/names.db")
    try:
        await _write(store, "hello", 1)
        stored = await store.load(KEY)
        codec = codec_for(store)
        raw = codec.unpack(stored.head, context=codec.head_context(KEY))[1]
        raw["agent"]["agent_id"] = "tests._hunt_marker:Evil"
        forged = codec.pack(raw, context=codec.head_context(KEY))
        lease = await store.acquire(KEY, "mallory", takeover=True)
        await store.commit(
            Commit(
                key=KEY,
                epoch=lease.epoch,
                base_version=stored.version,
                head=forged,
                size=1,
                info=dict(stored.info),
            )
        )
        sys.modules.pop("tests._hunt_marker", None)
        with pytest.raises((UnknownAgent, SnapshotCorrupt)):
            await _restored(store)
        assert "tests._hunt_marker" not in sys.modules
    finally:
        await store.aclose()


# ---------------------------------------------------------------- no secret shown


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    from livekit_resume.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def _shown(result: Any) -> str:
    return str(result.stdout + result.stderr) + (repr(result.exception) if result.exception else "")


_EVERY_COMMAND = [
    ["ls"],
    ["ls", "--json"],
    ["show", KEY],
    ["history", KEY],
    ["export", KEY, "-o", "-"],
    ["diff", KEY, "1", "2"],
    ["revert", KEY, "1"],
    ["repair", KEY],
    ["repair", KEY, "--dry-run"],
    ["release", KEY],
    ["rm", "--yes", KEY],
    ["pause", KEY],
    ["resume", KEY],
    ["suspend", KEY],
    ["pause", KEY, "--json"],
]


@pytest.mark.parametrize("args", _EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_every_command_hides_a_wrong_store_password(
    secret_redis: str, namespace: str, args: list[str]
) -> None:
    """security.md, *No secret shown*: a store URL's password never appears, in any
    command's output or error (here the server refuses a wrong password)."""
    wrong = secret_redis.replace(PASSWORD, PASSWORD + "Wrong")
    result = _cli("--store", wrong, *args)
    assert result.exit_code in (0, 1, 2), _shown(result)
    assert PASSWORD not in _shown(result), _shown(result)
    assert isinstance(result.exception, (SystemExit, type(None))), _shown(result)


@pytest.mark.parametrize("args", _EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_every_command_hides_the_password_of_an_unreachable_store(args: list[str]) -> None:
    from tests.redis_servers import dead_port

    with dead_port() as port:
        url = f"redis://admin:{SECRET_PW}@127.0.0.1:{port}/0"
        result = _cli("--store", url, *args)
    assert result.exit_code in (1, 2), _shown(result)
    assert SECRET_PW not in _shown(result), _shown(result)
    assert isinstance(result.exception, SystemExit), _shown(result)


def test_import_hides_the_store_password(secret_redis: str, namespace: str, tmp_path: Path) -> None:
    import asyncio

    from livekit_resume.snapshot.model import Snapshot
    from tests.test_security import _write as write_snapshot

    asyncio.run(write_snapshot(secret_redis, Snapshot(key=KEY)))
    out = tmp_path / "x.lkrs"
    exported = _cli("--store", secret_redis, "export", KEY, "-o", str(out))
    assert exported.exit_code == 0, _shown(exported)
    for url in (secret_redis, secret_redis.replace(PASSWORD, PASSWORD + "Wrong")):
        result = _cli("--store", url, "import", str(out), "--key", OTHER_KEY)
        assert PASSWORD not in _shown(result), _shown(result)


def test_settings_repr_never_shows_keys_or_the_store_password() -> None:
    """security.md: keys never appear in repr(Settings); URLs are shown without their
    password everywhere. A Settings object in a log line or a traceback's locals."""
    from livekit_resume.settings import Settings

    s = Settings.load(
        store=f"redis://user:{SECRET_PW}@h:6379/0",
        signing_keys=K1,
        encryption_keys=E1,
        sentinel_password="SentinelSecretPw",
    )
    shown = repr(s) + str(s)
    for secret in (SECRET_PW, K1.partition(":")[2], E1.partition(":")[2], "SentinelSecretPw"):
        assert secret not in shown, shown


def test_store_reprs_never_show_the_password() -> None:
    store = lr.open_store(f"redis://user:{SECRET_PW}@127.0.0.1:1/0")
    try:
        assert SECRET_PW not in repr(store) + str(store)
    finally:
        import asyncio

        asyncio.run(store.aclose())


@pytest.mark.parametrize(
    "spec", [K1 + "," + K1.partition(":")[2], "k1:" + "A" * 10 + "!", "k1:QUJD"]
)
def test_a_bad_signing_key_in_the_environment_is_not_shown_by_show_or_export(
    tmp_path: Path, spec: str
) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path}/k.db"

    async def write() -> None:
        store = lr.open_store(url)
        try:
            await _write(store, "hello", 1)
        finally:
            await store.aclose()

    asyncio.run(write())
    for args in (["show", KEY], ["export", KEY, "-o", "-"], ["history", KEY]):
        result = _cli("--store", url, *args, env={"RESUME_SIGNING_KEYS": spec})
        shown = _shown(result)
        for part in spec.split(","):
            secret = part.partition(":")[2] or part
            assert secret not in shown, (args, shown)
        assert "Traceback" not in shown


async def test_a_refused_restore_logs_no_key(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _write(store, "deposit 200", 200, signing_keys=K1)
    with pytest.raises(SignatureMismatch) as e:
        await _restored(store, signing_keys=K1_REUSED)
    texts = [r.getMessage() for r in caplog.records] + [str(e.value), repr(e.value)]
    for secret in (K1.partition(":")[2], K1_REUSED.partition(":")[2]):
        assert not any(secret in t for t in texts)


# ---------------------------------------------------------------- remote control


async def _live(
    store: Store, owner: str = "w1"
) -> tuple[AgentSession[Account], lr.ResumableSession]:
    session, rs = await _open(store, owner=owner)
    session.history.add_message(role="user", content="hello")
    await rs.checkpoint()
    return session, rs


async def test_a_command_sent_in_another_namespace_of_the_same_sqlite_file_never_reaches_the_owner(
    tmp_path: Path,
) -> None:
    """control.md: commands ride the store's own namespace. A sender on namespace B of
    the same file finds no session (CommandRefused) and A's owner stays active."""
    path = tmp_path / "ns.db"
    a = lr.open_store(f"sqlite:///{path}", namespace="tenanta")
    b = lr.open_store(f"sqlite:///{path}", namespace="tenantb")
    session, rs = await _live(a)
    try:
        with pytest.raises(CommandRefused, match="no such session"):
            await lr.control(b).pause(KEY, timeout=1)
        await asyncio.sleep(0.5)
        assert rs.state == "active"
        assert await lr.control(a).pause(KEY, timeout=5) == rs.version
        assert str(rs.state) == "paused"
    finally:
        await _close(session, rs)
        await a.aclose()
        await b.aclose()


async def test_a_forged_sqlite_row_aimed_at_a_stale_epoch_is_not_applied(tmp_path: Path) -> None:
    """A row written straight into the commands table, aimed at the epoch before a
    takeover: the owner checks the epoch when the command arrives and never applies it."""
    path = tmp_path / "ctl.db"
    store = lr.open_store(f"sqlite:///{path}", namespace="ns1")
    s1, rs1 = await _live(store, owner="w1")
    stale = (await store.info(KEY)).epoch  # type: ignore[union-attr]
    s2, rs2 = await _open(store, owner="w2")  # takeover
    try:
        assert (await store.info(KEY)).epoch > stale  # type: ignore[union-attr]
        # the commands table exists once a command was sent
        await lr.control(store).resume(KEY, timeout=5)
        db = sqlite3.connect(path)
        try:
            db.execute(
                "INSERT INTO commands (ns, key, id, verb, epoch, sent_at, claim_by) "
                "VALUES (?, ?, ?, ?, ?, strftime('%s','now'), NULL)",
                ("ns1", KEY, uuid.uuid4().hex, "pause", stale),
            )
            db.commit()
        finally:
            db.close()
        await asyncio.sleep(0.8)
        assert rs2.state == "active"
    finally:
        await _close(s2, rs2)
        await _close(s1, rs1)
        await store.aclose()


async def test_a_redis_command_replayed_after_it_was_answered_is_not_applied_again(
    redis_server: Any,
) -> None:
    """A pause captured off the channel and published again (same id, marked open) after
    the owner answered it and was resumed: its mark is gone, so it is skipped."""
    import redis.asyncio as redis

    ns = f"c{uuid.uuid4().hex[:8]}"
    store = lr.open_store(redis_server.url, namespace=ns)
    session, rs = await _live(store)
    r = redis.Redis.from_url(redis_server.url)
    pubsub = r.pubsub()
    try:
        channel = f"{ns}:ctl:{{{KEY}}}"
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=1)
        await lr.control(store).pause(KEY)
        captured = None
        for _ in range(20):
            msg = await pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "message":
                captured = msg["data"]
                break
        assert captured is not None and json.loads(captured)["verb"] == "pause"
        await lr.control(store).resume(KEY)
        assert rs.state == "active"
        await r.publish(channel, captured)
        stale = json.loads(captured)
        stale.pop("open")
        stale["id"] = uuid.uuid4().hex
        stale["epoch"] = stale["epoch"] - 1  # aimed before the current lease
        await r.publish(channel, json.dumps(stale))
        await asyncio.sleep(0.6)
        assert rs.state == "active"
    finally:
        await pubsub.aclose()
        await r.aclose()
        await _close(session, rs)
        await store.aclose()


@pytest.mark.parametrize("verb", ["pause", "resume", "suspend"])
async def test_a_command_aimed_at_another_epoch_is_refused_and_changes_nothing(
    store: Store, verb: str
) -> None:
    session, rs = await _live(store)
    try:
        epoch = (await store.info(KEY)).epoch  # type: ignore[union-attr]
        before = await _raw(store, KEY)
        for aimed in (epoch - 1, epoch + 1):
            with pytest.raises(CommandRefused, match="epoch"):
                await getattr(lr.control(store), verb)(KEY, epoch=aimed, timeout=1)
        assert rs.state == "active" and await _raw(store, KEY) == before
    finally:
        await _close(session, rs)


# ---------------------------------------------------------------- reconnect tokens


async def _conversation_store(tmp_path: Path) -> Store:
    store = lr.open_store(f"sqlite:///{tmp_path}/tok.db")
    session, rs = await _open(store, signing_keys=K1)
    session.history.add_message(role="user", content="blue door")
    await rs.checkpoint()
    await rs.suspend()
    await session.aclose()
    return store


async def test_a_token_survives_rotation_and_is_refused_once_its_key_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUME_SIGNING_KEYS", K1)
    store = await _conversation_store(tmp_path)
    try:
        token = await lr.issue_token(store, KEY, ttl=60)
        monkeypatch.setenv("RESUME_SIGNING_KEYS", f"{K2},{K1}")
        assert await lr.verify_token(store, token) == KEY
        monkeypatch.setenv("RESUME_SIGNING_KEYS", K2)
        with pytest.raises(TokenRefused):
            await lr.verify_token(store, token)
    finally:
        await store.aclose()


async def test_a_token_signed_with_a_reused_kid_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUME_SIGNING_KEYS", K1)
    store = await _conversation_store(tmp_path)
    try:
        token = await lr.issue_token(store, KEY, ttl=60)
        with pytest.raises(TokenRefused):
            await lr.verify_token(store, token, signing_keys=K1_REUSED)
    finally:
        await store.aclose()


async def test_a_token_whose_session_was_spliced_from_another_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session B's token, then A's genuine frames committed as B's newest version (same
    conversation id cannot be trusted): verify must raise TokenRefused, not resume."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", K1)
    store = await _conversation_store(tmp_path)
    try:
        await _write(store, "B", 1, key=OTHER_KEY, signing_keys=K1)
        token = await lr.issue_token(store, OTHER_KEY, ttl=60)
        await _splice(store, KEY, OTHER_KEY)
        with pytest.raises(TokenRefused):
            await lr.verify_token(store, token)
    finally:
        await store.aclose()


async def test_a_token_is_bound_to_its_key_not_only_its_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapping the key inside a token breaks its MAC: TokenRefused."""
    import msgpack

    monkeypatch.setenv("RESUME_SIGNING_KEYS", K1)
    store = await _conversation_store(tmp_path)
    try:
        token = await lr.issue_token(store, KEY, ttl=60)
        prefix, body, mac = token.split(".")
        payload = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload[1] = OTHER_KEY
        nb = base64.urlsafe_b64encode(msgpack.packb(payload)).rstrip(b"=").decode()
        with pytest.raises(TokenRefused):
            await lr.verify_token(store, f"{prefix}.{nb}.{mac}")
    finally:
        await store.aclose()


# ---------------------------------------------------------------- mistyped URLs


@pytest.mark.parametrize(
    "url",
    [
        f"redis:///:{SECRET_PW}@localhost:6379/0",  # one slash too many
        f"rediss:///user:{SECRET_PW}@localhost:6380/0",
        f"redis+cluster:///:{SECRET_PW}@h1:7000,h2:7001",
    ],
)
def test_a_redis_url_with_a_slash_too_many_never_shows_its_password(url: str) -> None:
    """security.md: "a URL whose :// is missing or mistyped … hidden too: everything up to
    the last @ of the URL is". ``redis:///:pw@host`` (three slashes) is refused with the
    password in the message, by open_store and on the command line: redact.url exempts
    every ``scheme:///…`` as if it were a SQLite path."""
    shown = []
    try:
        lr.open_store(url)
    except ValueError as e:
        shown.append(str(e))
    result = _cli("--store", url, "ls")
    shown.append(_shown(result))
    for text in shown:
        assert SECRET_PW not in text, text


def test_a_query_secret_named_pwd_is_hidden() -> None:
    """security.md: query parameters named like a secret read ``***``; ``pwd=`` (the
    common short form of password) is shown as it is."""
    url = f"redis://h:6379/0?pwd={SECRET_PW}"
    try:
        lr.open_store(url)
    except ValueError as e:
        assert SECRET_PW not in str(e), str(e)
