"""Ending a conversation, and reconnect tokens that resume one conversation and nothing
else (issue 19): on a real AgentSession, against memory and SQLite stores."""

from __future__ import annotations

import base64
import hashlib
import hmac
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.test_hooks import KEY, Receptionist, Visit, start

SIGN = "t1:" + base64.b64encode(b"t" * 32).decode()
OTHER = "t1:" + base64.b64encode(b"o" * 32).decode()


@pytest.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Store]:
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    s: Store = lr.open_store(
        "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/tokens.db"
    )
    yield s
    await s.aclose()


async def conversation(store: Store) -> str:
    return await _talk(store, "remember the blue door")


async def _talk(store: Store, text: str, owner: str = "w1") -> str:
    session, rs, _ = await start(store, ["noted", "noted"], owner=owner)
    await session.run(user_input=text)
    await rs.suspend()
    snap = from_stored(codec_for(store), await store.load(KEY))
    assert snap.meta.conversation
    return snap.meta.conversation


async def test_an_ended_conversation_is_never_resumed_but_stays_readable(store: Store) -> None:
    session, rs, _ = await start(store, ["noted"])
    await session.run(user_input="goodbye")
    version = await rs.end()
    assert rs.state == "ended" and rs._lease is None
    ended = from_stored(Codec(signing_keys=SIGN), await store.load(KEY))
    assert ended.state == "ended" and ended.reason == "end"

    session2, rs2, model = await start(store, ["hello, how can I help?"], owner="w2")
    assert not rs2.resumed
    await session2.run(user_input="a new call")
    sent = model.requests[-1].texts("user")
    assert "goodbye" not in sent  # the model sees only the new conversation
    version2 = await rs2.checkpoint()
    assert version2 > version
    fresh = from_stored(Codec(signing_keys=SIGN), await store.load(KEY))
    assert fresh.meta.conversation != ended.meta.conversation
    texts = [str(c) for i in fresh.history if i["type"] == "message" for c in i["content"]]
    assert "goodbye" not in texts and "a new call" in texts
    old = from_stored(Codec(signing_keys=SIGN), await store.load(KEY, version))
    assert old.state == "ended"  # the ended one is still there to inspect
    await rs2.aclose()
    await session2.aclose()


async def test_a_token_names_its_conversation_and_only_that(store: Store) -> None:
    await conversation(store)
    token = await lr.issue_token(store, KEY, ttl=60)
    assert await lr.verify_token(store, token) == KEY
    assert SIGN.split(":")[1] not in token  # the key is never in the token


async def test_a_forged_or_altered_token_is_refused(store: Store) -> None:
    await conversation(store)
    token = await lr.issue_token(store, KEY, ttl=60)
    forged = await lr.issue_token(store, KEY, ttl=60, signing_keys=OTHER)
    with pytest.raises(lr.TokenRefused, match="does not verify"):
        await lr.verify_token(store, forged)
    head, body, mac = token.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(lr.TokenRefused):
        await lr.verify_token(store, f"{head}.{flipped}.{mac}")
    for junk in ("", "x", "a.b.c", "lkrt1.!!!.???", "lkrt1." + "A" * 5000 + ".x"):
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, junk)


async def test_an_expired_token_is_refused(store: Store) -> None:
    await conversation(store)
    token = await lr.issue_token(store, KEY, ttl=-1)
    with pytest.raises(lr.TokenRefused, match="expired"):
        await lr.verify_token(store, token)


async def test_ending_the_conversation_revokes_its_tokens(store: Store) -> None:
    await conversation(store)
    token = await lr.issue_token(store, KEY, ttl=3600)
    _, rs, _ = await start(store, ["bye"], owner="w2")
    assert rs.resumed
    await rs.end()
    with pytest.raises(lr.TokenRefused, match="ended"):
        await lr.verify_token(store, token)
    with pytest.raises(lr.TokenRefused):
        await lr.issue_token(store, KEY, ttl=60)
    # a new conversation under the key does not revive the old token either
    await _talk(store, "a new call", owner="w3")
    with pytest.raises(lr.TokenRefused, match="ended"):
        await lr.verify_token(store, token)


async def test_tokens_need_signing_keys(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await conversation(store)
    monkeypatch.delenv("RESUME_SIGNING_KEYS")
    with pytest.raises(ValueError, match="RESUME_SIGNING_KEYS"):
        await lr.issue_token(store, KEY, ttl=60)


async def test_a_token_for_another_namespace_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livekit_resume.stores.sqlite import SQLiteStore

    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    a = SQLiteStore(tmp_path / "t.db", namespace="tenant-a")
    b = SQLiteStore(tmp_path / "t.db", namespace="tenant-b")
    await _talk(a, "tenant a")
    await _talk(b, "tenant b")
    token = await lr.issue_token(a, KEY, ttl=60)
    with pytest.raises(lr.TokenRefused, match="namespace"):
        await lr.verify_token(b, token)
    assert await lr.verify_token(a, token) == KEY
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("ttl", [float("nan"), float("inf")])
async def test_a_token_never_outlives_a_finite_expiry(store: Store, ttl: float) -> None:
    # NaN compares false with every time: a token issued with it never expired
    await conversation(store)
    with pytest.raises(ValueError, match="ttl"):
        await lr.issue_token(store, KEY, ttl=ttl)
    token = await lr.issue_token(store, KEY, ttl=60)
    codec = codec_for(store)
    head, body, _ = token.split(".")
    payload = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload[3] = ttl  # as an older release signed it
    signed = f"{head}.{base64.urlsafe_b64encode(msgpack.packb(payload)).rstrip(b'=').decode()}"
    secret = base64.b64decode(SIGN.split(":")[1])
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    forever = f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert codec.namespace == payload[0]
    with pytest.raises(lr.TokenRefused, match="expired"):
        await lr.verify_token(store, forever)


@pytest.mark.parametrize("how", ["ended", "deleted"])
async def test_a_restore_again_that_starts_a_new_conversation_does_not_revive_old_tokens(
    store: Store, how: str
) -> None:
    """A job keeps its suspended `ResumableSession` (it restores in place when someone
    joins its room). Meanwhile the conversation is ended by another worker (the caller
    came back in another room and said goodbye) or deleted (``livekit-resume rm``): its
    tokens are revoked. Someone joins the first room: that session restores again and
    starts a new conversation. It started it under the old conversation's id, and the
    revoked token resumed the new caller's conversation."""
    session, rs, _ = await start(store, ["noted", "noted"], owner="wx")
    await session.run(user_input="my secret is 4711")
    await rs.suspend()
    token = await lr.issue_token(store, KEY, ttl=600)
    if how == "ended":
        other, rs_other, _ = await start(store, ["bye"], owner="wy")
        await rs_other.end()
        await other.aclose()
    else:
        assert await store.delete(KEY)
    with pytest.raises(lr.TokenRefused):
        await lr.verify_token(store, token)
    again: AgentSession[Visit] = AgentSession(llm=ScriptedLLM([], default="ok"), userdata=Visit())
    await again.start(await rs.restore(again, default=Receptionist))  # someone new joins
    assert not rs.resumed
    await again.run(user_input="hello, I am someone new")
    await rs.checkpoint()
    try:
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, token)
    finally:
        await rs.aclose()
        await again.aclose()
        await session.aclose()


async def test_a_token_naming_a_damaged_conversation_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify_token` promises `TokenRefused` saying why; a token whose conversation's
    head is damaged raised `SnapshotCorrupt`, which `resumable_job` let escape: the
    caller who came back in a new room got no agent at all. Which conversation the store
    holds cannot be told, so the token is refused (the job goes on under the room's own
    key) and the damaged session is left as it is, for `repair`."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    path = tmp_path / "damaged.db"
    store = lr.open_store(f"sqlite:///{path}")
    try:
        await conversation(store)
        token = await lr.issue_token(store, KEY, ttl=600)
        with sqlite3.connect(path) as db:
            (version, head) = db.execute(
                "SELECT version, head FROM versions WHERE key=? ORDER BY version DESC", (KEY,)
            ).fetchone()
            damaged = bytearray(head)
            damaged[len(damaged) // 2] ^= 0x10
            db.execute(
                "UPDATE versions SET head=? WHERE key=? AND version=?",
                (bytes(damaged), KEY, version),
            )
        with pytest.raises(lr.TokenRefused, match="damaged") as refused:
            await lr.verify_token(store, token)
        assert isinstance(refused.value.__cause__, lr.SnapshotCorrupt)
        stored = await store.load(KEY)
        assert (stored.version, stored.head) == (version, bytes(damaged)), "left for repair"
    finally:
        await store.aclose()
