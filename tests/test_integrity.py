"""Issue 15, defects 1-3: an attacker with write access to the store and no key.

Each test writes a session through `ResumableSession`, then edits the store the way an
attacker can (rows with ``sqlite3``, keys of a real Redis copied with DUMP/RESTORE or
rewritten with HSET/LSET) and checks that the restore refuses it:

1. rollback: an older version's head copied in as the newest (old userdata), an edited
   item's newest record replaced by its older edition, item records reordered;
2. downgrade: with only encryption keys, a forged *unencrypted* head;
3. namespace: a Redis session copied into another namespace under the same key.

Compaction rewrites the log without changing any item, so the seal survives it.
"""

from __future__ import annotations

import base64
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm
from pydantic import BaseModel

import livekit_resume as lr
from livekit_resume.errors import SignatureMismatch, SnapshotCorrupt
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Record, Store
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.redis_log import join_log, split_log
from tests.redis_servers import RedisServer

KEY = "room-integrity"
SIGN = "s1:" + base64.b64encode(b"s" * 32).decode()
ENCRYPT = "e1:" + base64.b64encode(b"e" * 32).decode()


class Account(BaseModel):
    balance: int = 0


class Teller(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are a bank teller.")


def _registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Teller)
    return reg


# -- the stores, and what an attacker does to them ----------------------------------------


@dataclass
class Target:
    """A store of one backend, and raw access to its bytes (the attacker's)."""

    kind: str
    store: Store
    namespace: str
    path: Path | None = None
    url: str | None = None

    def codec(self, namespace: str | None = None, **keys: Any) -> Codec:
        return Codec(namespace=namespace or self.namespace, **keys)

    async def head(self, version: int) -> bytes:
        return (await self.store.load(KEY, version)).head

    async def set_head(self, version: int, head: bytes) -> None:
        if self.kind == "sqlite":
            with self._sql() as db:
                db.execute(
                    "UPDATE versions SET head=? WHERE ns=? AND key=? AND version=?",
                    (head, self.namespace, KEY, version),
                )
        else:
            async with self._redis() as r:
                # the version's body (``<len(head)>:<head><info>``, test_redis_layout.py)
                body = f"{self.namespace}:{{{KEY}}}:v:{version}:b"
                digits, _, rest = (await r.get(body)).partition(b":")
                await r.set(body, b"%d:" % len(head) + head + rest[int(digits) :])

    async def log(self) -> list[tuple[Any, list[Any]]]:
        """Every item record of the session: (its address, [stream, id, after, data])."""
        if self.kind == "sqlite":
            with self._sql() as db:
                rows = db.execute(
                    "SELECT gen, seq, stream, item_id, after, data FROM log "
                    "WHERE ns=? AND key=? ORDER BY gen, seq",
                    (self.namespace, KEY),
                ).fetchall()
            return [((g, s), [st, i, a, d]) for g, s, st, i, a, d in rows]
        async with self._redis() as r:
            out = []
            for name in sorted(await r.keys(f"{self.namespace}:{{{KEY}}}:log:*")):
                elements = split_log(await r.lrange(name, 0, -1), KEY)
                for e, recs in enumerate(elements):
                    for n, x in enumerate(recs):
                        out.append(((name, e, n), [x.stream, x.id, x.after, x.data]))
            return out

    async def set_record(self, where: Any, record: list[Any]) -> None:
        stream, item_id, after, data = record
        if self.kind == "sqlite":
            with self._sql() as db:
                db.execute(
                    "UPDATE log SET stream=?, item_id=?, after=?, data=? "
                    "WHERE ns=? AND key=? AND gen=? AND seq=?",
                    (stream, item_id, after, data, self.namespace, KEY, *where),
                )
        else:
            async with self._redis() as r:
                name, e, n = where
                elements = split_log(await r.lrange(name, 0, -1), KEY)
                elements[e][n] = Record(stream, item_id, data, after)
                await r.delete(name)
                await r.rpush(name, *join_log(elements))

    async def drop_last_records(self, version: int) -> None:
        """Make ``version`` read its log only up to before its last commit's records (the
        end it records lowered: by one record on SQLite, one element on Redis)."""
        if self.kind == "sqlite":
            with self._sql() as db:
                db.execute(
                    "UPDATE versions SET log_end=log_end-1 WHERE ns=? AND key=? AND version=?",
                    (self.namespace, KEY, version),
                )
        else:
            async with self._redis() as r:
                await r.hincrby(f"{self.namespace}:{{{KEY}}}:v:{version}", "end", -1)

    async def generation(self) -> int:
        if self.kind == "sqlite":
            with self._sql() as db:
                (gen,) = db.execute(
                    "SELECT gen FROM sessions WHERE ns=? AND key=?", (self.namespace, KEY)
                ).fetchone()
            return int(gen)
        async with self._redis() as r:
            return int(await r.hget(f"{self.namespace}:{{{KEY}}}:head", "gen"))

    def _sql(self) -> sqlite3.Connection:
        assert self.path is not None
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        return _Closing(db)  # type: ignore[return-value]

    def _redis(self) -> Any:
        import redis.asyncio as redis

        return redis.Redis.from_url(self.url or "")


class _Closing:
    """A sqlite3 connection used as ``with``: closed at the end (sqlite3's own ``with``
    only commits)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.close()


@pytest.fixture(params=["sqlite", "redis"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        from livekit_resume.stores.sqlite import SQLiteStore

        path = tmp_path / "integrity.db"
        t = Target("sqlite", SQLiteStore(path, namespace=ns), ns, path=path)
    else:
        from livekit_resume.stores.redis import RedisStore

        server: RedisServer = request.getfixturevalue("redis_server")
        t = Target("redis", RedisStore.from_url(server.url, namespace=ns), ns, url=server.url)
    yield t
    await t.store.aclose()


# -- sessions ---------------------------------------------------------------------------


async def _open(
    store: Store, codec: Codec, *, owner: str = "w1"
) -> tuple[AgentSession[Account], lr.ResumableSession]:
    session: AgentSession[Account] = make_text_session(
        ScriptedLLM([], default="ok"), userdata=Account()
    )
    rs = lr.ResumableSession(
        store,
        KEY,
        registry=_registry(),
        userdata_type=Account,
        owner=owner,
        autosave=False,
        codec=codec,
    )
    agent = await rs.restore(session, default=Teller, takeover=True)
    await session.start(agent)
    return session, rs


async def _close(session: AgentSession[Any], rs: lr.ResumableSession) -> None:
    await rs.aclose()
    await session.aclose()


async def _restored(store: Store, codec: Codec) -> tuple[Account, list[str]]:
    """Restore the session in a fresh worker; its userdata and its history's texts."""
    session, rs = await _open(store, codec, owner="w2")
    try:
        return session.userdata.model_copy(), [
            i.text_content or "" for i in session.history.items if i.type == "message"
        ]
    finally:
        await _close(session, rs)


async def _balances(target: Target, codec: Codec) -> None:
    """Version 1 holds a balance of 200, version 2 a balance of 500 (same history)."""
    session, rs = await _open(target.store, codec)
    session.userdata.balance = 200
    session.history.add_message(role="user", content="deposit 200")
    assert await rs.checkpoint() == 1
    session.userdata.balance = 500
    assert await rs.checkpoint() == 2
    await _close(session, rs)


# -- 1. rollback --------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [{"signing_keys": SIGN}, {"encryption_keys": ENCRYPT}])
async def test_an_older_head_copied_in_as_the_newest_is_refused(
    target: Target, keys: dict[str, str]
) -> None:
    codec = target.codec(**keys)
    await _balances(target, codec)
    await target.set_head(2, await target.head(1))
    with pytest.raises(SignatureMismatch, match="version"):
        await _restored(target.store, codec)


async def test_an_older_head_in_an_unkeyed_store_is_corrupt_not_restored(
    target: Target,
) -> None:
    codec = target.codec()
    await _balances(target, codec)
    await target.set_head(2, await target.head(1))
    with pytest.raises(SnapshotCorrupt, match="version"):
        await _restored(target.store, codec)


async def test_the_untouched_session_restores(target: Target) -> None:
    codec = target.codec(signing_keys=SIGN)
    await _balances(target, codec)
    account, texts = await _restored(target.store, codec)
    assert account.balance == 500 and texts[0] == "deposit 200"


async def _edited(target: Target, codec: Codec) -> str:
    """An item saved in one edition, edited in place and saved again: its id."""
    session, rs = await _open(target.store, codec)
    session.history.add_message(role="user", content="pay 10 to Bob")
    item = session.history.items[-1]
    assert isinstance(item, llm.ChatMessage)
    await rs.checkpoint()
    item.content = ["pay 10000 to Bob"]  # LiveKit edits recent items in place
    await rs.checkpoint()
    await _close(session, rs)
    return item.id


async def test_an_item_replaced_by_its_older_edition_is_refused(target: Target) -> None:
    codec = target.codec(signing_keys=SIGN)
    item_id = await _edited(target, codec)
    editions = [(w, r) for w, r in await target.log() if r[0] == "history" and r[1] == item_id]
    assert len(editions) == 2
    (_, older), (newest, _) = editions
    await target.set_record(newest, older)  # a transcript mixing versions
    with pytest.raises(SignatureMismatch, match="seal"):
        await _restored(target.store, codec)


async def test_reordered_item_records_are_refused(target: Target) -> None:
    codec = target.codec(signing_keys=SIGN)
    session, rs = await _open(target.store, codec)
    for text in ("one", "two", "three"):
        session.history.add_message(role="user", content=text)
    await rs.checkpoint()
    await _close(session, rs)
    log = await target.log()
    history = [(w, r) for w, r in log if r[0] == "history"]
    (wa, a), (wb, b) = history[-3], history[-2]  # "one" after X, "two" after "one"
    # now "two" follows X and "one" follows "two": every frame is genuine, the order is not
    await target.set_record(wa, [b[0], b[1], a[2], b[3]])
    await target.set_record(wb, [a[0], a[1], b[1], a[3]])
    with pytest.raises(SignatureMismatch, match="seal"):
        await _restored(target.store, codec)


@pytest.mark.parametrize("keys", [{"signing_keys": SIGN}, {}])
async def test_a_version_made_to_read_fewer_records_is_refused(
    target: Target, keys: dict[str, str]
) -> None:
    """Every record left is genuine and in order; the version just ends early, as if its
    last turn had never been said. The head (authenticated with keys) lists how many
    items each stream holds, and its seal covers the set of records read."""
    codec = target.codec(**keys)
    session, rs = await _open(target.store, codec)
    for text in ("one", "two", "three"):
        session.history.add_message(role="user", content=text)
        await rs.checkpoint()
    version = rs.version
    await _close(session, rs)
    await target.drop_last_records(version)
    with pytest.raises(SnapshotCorrupt, match=r"items|seal"):
        await _restored(target.store, codec)


async def test_the_seal_survives_compaction_and_many_edits(target: Target) -> None:
    codec = target.codec(signing_keys=SIGN)
    session, rs = await _open(target.store, codec)
    for n in range(5):
        session.history.add_message(role="user", content=f"line {n}")
    await rs.checkpoint()
    for n in range(80):  # edits append records: the log outgrows the compaction rule
        item = session.history.items[-1]
        assert isinstance(item, llm.ChatMessage)
        item.content = [f"edit {n}"]  # LiveKit edits recent items in place
        await rs.checkpoint()
        session.history.add_message(role="assistant", content=f"noted {n}")
        if n % 7 == 3:  # and now and then an item leaves the middle of the history
            session.history.items.pop(len(session.history.items) // 2)
        await rs.checkpoint()
    await _close(session, rs)
    assert await target.generation() > 0  # compacted
    _, texts = await _restored(target.store, codec)
    assert texts[-1] == "noted 79" and "edit 79" in texts


# -- 2. downgrade -------------------------------------------------------------------------


async def test_a_forged_plaintext_head_is_refused_when_encryption_is_on(target: Target) -> None:
    codec = target.codec(encryption_keys=ENCRYPT)
    await _balances(target, codec)
    # the attacker has no key: they write a head of their own, unencrypted
    stored = await target.store.load(KEY)
    forger = target.codec()
    data, counts = forger.decode_head(KEY, _plain_copy(stored.head, codec, forger))
    data["userdata"] = {"balance": 10**9}
    forged = forger.pack({**data, "counts": counts}, context=KEY.encode())
    await target.set_head(2, forged)
    with pytest.raises(SignatureMismatch, match="not encrypted"):
        await _restored(target.store, codec)
    # a migration from plaintext may allow it, explicitly
    lax = target.codec(encryption_keys=ENCRYPT, allow_plaintext=True)
    account, _ = await _restored(target.store, lax)
    assert account.balance == 10**9


def _is_message(codec: Codec, record: list[Any]) -> bool:
    context = codec.item_context(KEY, record[0], record[1])
    return bool(codec.unpack(record[3], context=context)[1].get("type") == "message")


def _plain_copy(head: bytes, codec: Codec, plain: Codec) -> bytes:
    """What the attacker knows of the head (its shape), re-framed without a key."""
    _version, data = codec.unpack(head, context=codec.head_context(KEY))
    data.pop("bound", None)
    return plain.pack(data, context=KEY.encode())


async def test_forged_plaintext_items_are_refused_when_encryption_is_on(target: Target) -> None:
    codec = target.codec(encryption_keys=ENCRYPT)
    await _balances(target, codec)
    where, record, item = next(
        (w, r, codec.unpack(r[3], context=codec.item_context(KEY, "history", r[1]))[1])
        for w, r in await target.log()
        if r[0] == "history"
        and r[1].startswith("item_")
        and r[3] is not None
        and _is_message(codec, r)
    )
    item["content"] = ["transfer everything to Mallory"]
    await target.set_record(where, [*record[:3], Codec().pack(item)])
    with pytest.raises(SignatureMismatch, match="not encrypted"):
        await _restored(target.store, codec)


# -- 3. namespace -------------------------------------------------------------------------


async def test_a_redis_session_copied_into_another_namespace_is_refused(
    redis_server: RedisServer,
) -> None:
    import redis.asyncio as redis

    from livekit_resume.stores.redis import RedisStore

    tenant_a, tenant_b = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    store_a = RedisStore.from_url(redis_server.url, namespace=tenant_a)
    store_b = RedisStore.from_url(redis_server.url, namespace=tenant_b)
    codec_a = Codec(namespace=tenant_a, signing_keys=SIGN)
    codec_b = Codec(namespace=tenant_b, signing_keys=SIGN)
    try:
        session, rs = await _open(store_a, codec_a)
        session.userdata.balance = 42
        session.history.add_message(role="user", content="tenant A's secret")
        await rs.checkpoint()
        await _close(session, rs)
        r = redis.Redis.from_url(redis_server.url)
        try:
            for name in await r.keys(f"{tenant_a}:{{{KEY}}}:*"):
                assert isinstance(name, bytes)
                copy = tenant_b + name[len(tenant_a) :].decode()
                dumped = await r.dump(name)
                assert isinstance(dumped, bytes)
                await r.restore(copy, 0, dumped, replace=True)
            score = await r.zscore(f"{tenant_a}:sessions", KEY)
            assert score is not None
            await r.zadd(f"{tenant_b}:sessions", {KEY: score})
        finally:
            await r.aclose()
        assert KEY in await store_b.keys()
        with pytest.raises(SignatureMismatch):
            await _restored(store_b, codec_b)
        # where it belongs, it still restores
        account, _ = await _restored(store_a, codec_a)
        assert account.balance == 42
    finally:
        await store_a.aclose()
        await store_b.aclose()
