"""Conformance: how long sessions live, deletion, keys and listings."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from ...errors import LeaseLost, SnapshotNotFound, StoreUnavailable
from ...stores.base import (
    INFO_BATCH,
    MAX_KEY_BYTES,
    Commit,
    KeyPages,
    Lease,
    Record,
    SessionInfo,
    SessionInfos,
)
from ..poll import eventually
from ._base import StoreTests
from ._model import KEY, InfoDict, Writer, writer

BAD_KEYS = ["", "a\x00b", "line\nbreak", "tab\there", "del\x7f", "x" * (MAX_KEY_BYTES + 1)]
BAD_KEYS.append("\u00e9" * (MAX_KEY_BYTES // 2 + 1))  # few characters, too many bytes


class LifetimeTests(StoreTests):
    """TTLs, delete, keys, info and versions listings."""

    async def test_session_expires_after_ttl_without_writes(self) -> None:
        # 1 s: the five sessions are written and listed before the first expires, even
        # where each write is a few round trips to a loaded Cluster
        store = await self.new_store(ttl=1.0)
        # Written in this order: when the last one has expired, so have the others. Each is
        # then looked at through one method first, so every method must hide an expired key
        # (acquire too: it starts a new session, it does not bring the old one back).
        names = ["via-load", "via-acquire", "via-versions", "via-delete", "via-keys", "via-info"]
        for name in names:
            w = await writer(store, name, ttl=1.0)
            w.append("h", "m", b"x")
            await w.commit()
            if name == "via-load":  # read while it lives: no cache may answer once it expired
                assert (await store.load(name)).version == 1
        assert await store.keys() == sorted(names)

        async def gone() -> bool:
            return await store.info("via-info") is None

        await eventually(gone, "the session outlived its 1 s ttl")
        with pytest.raises(SnapshotNotFound):
            await store.load("via-load")
        revived = await store.acquire("via-acquire", "worker-b", ttl=1.0)
        assert revived.owner == "worker-b"
        assert await store.versions("via-acquire") == [], "acquire revived an expired session"
        with pytest.raises(SnapshotNotFound):
            await store.load("via-acquire")
        assert await store.versions("via-versions") == []
        assert await store.delete("via-delete") is False
        assert await store.keys() == ["via-acquire"]  # acquired again, at version 0
        # Its lease went with it: another worker starts afresh without a takeover.
        lease = await store.acquire("via-info", "worker-b", ttl=1.0)
        assert lease.owner == "worker-b"
        with pytest.raises(SnapshotNotFound):
            await store.load("via-info")

    async def test_writes_keep_a_session_alive_past_its_ttl(self) -> None:
        ttl = 1.0
        store = await self.new_store(ttl=ttl)
        w = await writer(store, ttl=ttl)
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * ttl:  # several ttls, a write every 0.3 ttl
            w.append("h", f"m{w.version}", b"x")
            await w.commit()
            assert KEY in await store.keys()
            await w.check(w.version)
            await asyncio.sleep(0.3 * ttl)
        info = await store.info(KEY)
        assert info is not None and info.version == w.version
        assert info.expires_at == pytest.approx(info.updated_at + ttl, abs=0.01)

    async def test_delete_removes_every_trace(self) -> None:
        store = await self.new_store()
        w = await writer(store)
        other = await writer(store, "room-other", "worker-o")
        for n in range(3):
            w.append("h", f"m{n}", b"x")
            await w.commit()
        other.append("h", "o", b"o")
        await other.commit()

        assert await store.delete(KEY) is True
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY)
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY, 1)
        assert await store.keys() == ["room-other"]
        assert await store.versions(KEY) == []
        assert await store.info(KEY) is None
        assert await store.delete(KEY) is False
        await other.check(1)

        # The lease went too: anyone acquires, and versions start over.
        fresh = Writer(store, await store.acquire(KEY, "worker-b"))
        fresh.append("h", "new", b"new")
        assert await fresh.commit() == 1
        await fresh.check(1)

    async def test_a_closed_store_refuses_every_call(self) -> None:
        # An answer after `aclose` would acknowledge a write nothing keeps, or read a
        # store the caller let go of: `StoreUnavailable`, and closing again is nothing.
        store = await self.new_store()
        w = await writer(store)
        w.append("h", "m0", b"x")
        await w.commit()
        await store.aclose()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.load(KEY),
            lambda: store.info(KEY),
            lambda: store.versions(KEY),
            lambda: store.keys(),
            lambda: store.acquire("room-new", "worker-b"),
            lambda: store.renew(w.lease),
            lambda: store.commit(
                Commit(KEY, w.lease.epoch, 1, b"head", [Record("h", "m1", b"y", "m0")], 2)
            ),
            lambda: store.release(w.lease),
            lambda: store.delete(KEY),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call()
        await store.aclose()

    async def test_the_holder_of_a_deleted_session_is_fenced_not_told_to_write_it_back(
        self,
    ) -> None:
        """An operator's ``rm`` of a session a worker holds: the worker's next commit or
        renewal is refused as fenced (`LeaseLost`, not ``vanished``), where a session
        the store lost is ``vanished`` (acquire it again and write it whole). Told
        ``vanished``, the worker wrote the deleted conversation back."""
        store = await self.new_store()
        held = await writer(store)
        held.append("h", "m0", b"x")
        await held.commit()
        assert await store.delete(KEY) is True
        held.append("h", "m1", b"y")
        with pytest.raises(LeaseLost) as commit:
            await held.commit()
        assert not commit.value.vanished and "deleted" in str(commit.value), repr(commit.value)
        with pytest.raises(LeaseLost) as renew:
            await store.renew(held.lease)
        assert not renew.value.vanished and "deleted" in str(renew.value), repr(renew.value)
        assert await store.info(KEY) is None and await store.keys() == []
        # the key is free: a new session starts above every epoch of the deleted one
        fresh = await writer(store, KEY, "worker-b")
        assert fresh.lease.epoch > held.lease.epoch
        fresh.append("h", "new", b"new")
        assert await fresh.commit() == 1
        with pytest.raises(LeaseLost) as stale:
            await store.commit(Commit(KEY, held.lease.epoch, 1, b"old", [], 0))
        assert not stale.value.vanished and stale.value.current_epoch == fresh.lease.epoch
        await fresh.check(1)

    async def test_a_delete_under_a_lease_fences_the_holder_it_took_the_session_from(
        self,
    ) -> None:
        """``rm`` of a free session runs under a lease of its own, and so may a tool
        deleting what a fenced worker still believes it holds: that worker is refused
        as fenced too, and a delete of a session that does not exist leaves nothing."""
        store = await self.new_store()
        held = await writer(store)
        held.append("h", "m0", b"x")
        await held.commit()
        deleter = await store.acquire(KEY, "operator", takeover=True)
        assert await store.delete(KEY, lease=deleter) is True
        with pytest.raises(LeaseLost) as lost:
            await store.renew(held.lease)
        assert not lost.value.vanished
        assert (lost.value.current_epoch or 0) >= deleter.epoch  # the tombstone's
        assert await store.delete("never-made") is False
        with pytest.raises(LeaseLost) as vanished:  # no tombstone: a store that lost it
            await store.renew(Lease("never-made", "worker-a", held.lease.epoch, 0.0))
        assert vanished.value.vanished

    async def test_a_worker_of_a_deleted_session_stays_fenced_when_it_is_created_again(
        self,
    ) -> None:
        store = await self.new_store()
        zombie = await writer(store, KEY, "worker-z")
        zombie.append("h", "z1", b"z")
        await zombie.commit()
        assert await store.delete(KEY) is True  # an operator's rm, or the session's TTL
        # epochs of a new life start from the clock (the shipped stores: in microseconds); a
        # real former life ended far longer ago than the one tick this waits for
        await asyncio.sleep(0.01)
        again = await writer(store, KEY, "worker-b")
        assert again.lease.epoch > zombie.lease.epoch  # epochs are never handed out twice
        # even with a base version that happens to match, the old epoch is refused
        with pytest.raises(LeaseLost):
            await store.commit(Commit(KEY, zombie.lease.epoch, 0, b"zombie", [], 0))
        again.append("h", "b1", b"b")
        assert await again.commit() == 1
        await again.check(1)

    async def test_many_keys_are_listed_sorted(self) -> None:
        store = await self.new_store()
        rng = random.Random(3)
        alphabet = "abcXYZ019-_:./ \u00e9\u00df\u4e2d\u0416\U0001f600\U0001f30d~"
        names = {
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(260)
        }
        names = set(sorted(names)[:200])
        for name in rng.sample(sorted(names), len(names)):
            lease = await store.acquire(name, "worker")
            await store.commit(Commit(name, lease.epoch, 0, name.encode(), [], 0))
        assert len(names) == 200
        assert await store.keys() == sorted(names)

    async def test_more_keys_than_a_backend_page_are_all_listed(self) -> None:
        """`Store.keys` (and `KeyPages` without a limit): every live key, however many, not
        the first page of a backend's listing (1000 keys of an S3 ListObjects, a SCAN
        batch, a query's default limit)."""
        store = await self.new_store()
        names = [f"k{i:05d}" for i in range(1100)]
        shuffled = random.Random(11).sample(names, len(names))
        for start in range(0, len(shuffled), 100):  # 100 at a time: a few seconds at most
            chunk = shuffled[start : start + 100]
            await asyncio.gather(*(store.acquire(name, "worker") for name in chunk))
        listed = await store.keys()
        assert len(listed) == len(names) and listed == names
        if isinstance(store, KeyPages):
            assert await store.keys_page("", None, None) == (names, None)
            assert await store.keys_page("k0", None, None) == (names, None)
            first, cursor = await store.keys_page("", None, 1000)
            assert (first, cursor) == (names[:1000], names[999])
            assert await store.keys_page("", cursor, 1000) == (names[1000:], None)

    async def test_a_key_prefix_is_matched_literally(self) -> None:
        """`KeyPages.keys_page`: keys *starting with* the prefix, each character itself:
        not a pattern of SQL LIKE (``%``, ``_``), a glob (``*``, ``?``, ``[``) or a regex."""
        store = await self.new_store()
        if not isinstance(store, KeyPages):
            pytest.skip(f"{type(store).__name__} has no KeyPages: the CLI pages its keys()")
        names = ["a_1", "ab1", "a%z", "abz", "a*1", "a?1", "a[1]", "a]1", "a\\1", "a.1", "a^1"]
        names += ["a1", "a$", "a|b", "a(1)", "a+1", "a!1", "a'1", 'a"1', "%", "_", "*", "\\"]
        names.sort()
        for name in names:
            await store.acquire(name, "worker")
        assert await store.keys() == names
        prefixes = ["a_", "a%", "a*", "a?", "a[", "a[1", "a]", "a\\", "a.", "a^", "a$", "a|"]
        prefixes += ["a(", "a+", "a!", "a'", 'a"', "%", "_", "*", "\\", "a", ""]
        for prefix in prefixes:
            want = [k for k in names if k.startswith(prefix)]
            assert await store.keys_page(prefix, None, None) == (want, None), prefix
            if want:  # a page of one, then the rest after it
                cursor = want[0] if len(want) > 1 else None
                assert await store.keys_page(prefix, None, 1) == (want[:1], cursor), prefix
                assert await store.keys_page(prefix, want[0], None) == (want[1:], None), prefix

    async def test_keys_come_in_pages_by_prefix_after_a_cursor(self) -> None:
        store = await self.new_store()
        if not isinstance(store, KeyPages):
            pytest.skip(f"{type(store).__name__} has no KeyPages: the CLI pages its keys()")
        names = ["a1", "a2", "a3", "ab", "b1", "bé", "c"]
        for name in reversed(names):
            await store.acquire(name, "worker")
        await store.delete("a3")
        names.remove("a3")
        assert await store.keys_page("", None, None) == (names, None)
        assert await store.keys_page("a", None, 2) == (["a1", "a2"], "a2")
        assert await store.keys_page("a", "a2", 2) == (["ab"], None)
        assert await store.keys_page("b", None, 2) == (["b1", "bé"], None)
        assert await store.keys_page("", "b1", 1) == (["bé"], "bé")
        assert await store.keys_page("", "c", 5) == ([], None)
        assert await store.keys_page("x", None, 5) == ([], None)

    async def test_a_key_prefix_or_cursor_that_is_not_text_is_refused(self) -> None:
        """A lone surrogate (a shell argument's bytes that are not UTF-8) as a session
        key, a key prefix or a page cursor: `ValueError` saying so, not the encoder's
        error of whichever driver met it first; nothing stored changes."""
        store = await self.new_store()
        await store.acquire("a1", "worker")
        for call in (
            lambda: store.acquire("a\udcff", "worker"),
            lambda: store.info("\udcff"),
            lambda: store.delete("\udcff"),
        ):
            with pytest.raises(ValueError, match="not valid UTF-8") as caught:
                await call()
            assert type(caught.value) is ValueError
        if isinstance(store, KeyPages):
            for prefix, after in (("\udcff", None), ("", "a\udcff"), ("a", "\ud800")):
                with pytest.raises(ValueError, match="not valid UTF-8") as caught:
                    await store.keys_page(prefix, after, 5)
                assert type(caught.value) is ValueError
        assert await store.keys() == ["a1"]

    async def test_infos_of_many_sessions_read_as_info_reads_each(self) -> None:
        """`SessionInfos` (what ``ls`` reads a page with): in the order asked, more
        sessions than one batch, held or free, with or without a version, one deleted,
        one never made, one asked twice."""
        store = await self.new_store()
        if not isinstance(store, SessionInfos):
            pytest.skip(f"{type(store).__name__} has no SessionInfos: ls reads info() by info()")
        names = [f"s{i:04d}" for i in range(INFO_BATCH + 20)]
        for i, name in enumerate(names):
            lease = await store.acquire(name, f"worker-{i % 3}")
            if i % 2:
                await store.commit(Commit(name, lease.epoch, 0, b"h", [], 0, {"n": i}))
            if i % 5:
                await store.release(lease)
        await store.delete(names[1])
        asked = [*reversed(names), "never-made", names[7]]
        got = await store.infos(asked)
        assert got == [await store.info(key) for key in asked]
        assert got[asked.index(names[1])] is None and got[asked.index("never-made")] is None
        held = got[asked.index(names[10])]
        assert isinstance(held, SessionInfo) and (held.owner, held.version) == ("worker-1", 0)
        shown = got[asked.index(names[7])]
        assert isinstance(shown, SessionInfo)
        assert (shown.version, shown.info, shown.owner) == (1, {"n": 7}, None)
        assert await store.infos([]) == []
        with pytest.raises(ValueError):
            await store.infos(["fine", BAD_KEYS[1]])

    async def test_acquired_key_without_snapshot_is_listed_at_version_zero(self) -> None:
        store = await self.new_store()
        lease = await store.acquire(KEY, "worker-a")
        assert await store.keys() == [KEY]
        info = await store.info(KEY)
        assert info is not None
        assert (info.version, info.epoch, info.owner, info.info) == (0, lease.epoch, "worker-a", {})
        assert await store.versions(KEY) == []
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY)

    BAD_KEYS = ["", "a\x00b", "line\nbreak", "tab\there", "del\x7f", "x" * (MAX_KEY_BYTES + 1)]
    BAD_KEYS.append("\u00e9" * (MAX_KEY_BYTES // 2 + 1))  # few characters, too many bytes

    @pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda k: repr(k[:12]) + f"[{len(k)}]")
    async def test_invalid_keys_are_rejected_by_every_method(self, bad: str) -> None:
        store = await self.new_store()
        lease = Lease(bad, "worker-a", 1, time.time() + 60)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.acquire(bad, "worker-a"),
            lambda: store.renew(lease),
            lambda: store.release(lease),
            lambda: store.commit(Commit(bad, 1, 0, b"h", [Record("h", "x", b"x")], 1)),
            lambda: store.load(bad),
            lambda: store.load(bad, 1),
            lambda: store.versions(bad),
            lambda: store.info(bad),
            lambda: store.delete(bad),
        ]
        for call in calls:
            with pytest.raises(ValueError):
                await call()
        assert await store.keys() == []

    async def test_longest_valid_key_works(self) -> None:
        store = await self.new_store()
        key = "k" * (MAX_KEY_BYTES - 2) + "\u00e9"  # exactly MAX_KEY_BYTES bytes
        assert len(key.encode()) == MAX_KEY_BYTES
        w = await writer(store, key)
        w.append("h", "x", b"x")
        await w.commit()
        await w.check(1)
        assert await store.keys() == [key]

    async def test_unknown_key_has_no_snapshot(self) -> None:
        store = await self.new_store()
        with pytest.raises(SnapshotNotFound):
            await store.load("nobody")
        with pytest.raises(SnapshotNotFound):
            await store.load("nobody", 1)
        assert await store.versions("nobody") == []
        assert await store.info("nobody") is None
        assert await store.delete("nobody") is False
        await store.release(Lease("nobody", "worker-a", 1, 0.0))
        assert await store.keys() == []

    async def test_info_reports_latest_commit_and_lease(self) -> None:
        store = await self.new_store(ttl=3600)
        lease = await store.acquire(KEY, "worker-a", ttl=60)
        first: InfoDict = {"state": "active", "reason": "turn", "turns": 1}
        latest: InfoDict = {"state": "paused", "reason": "pause", "turns": 3, "cost": 0.25}
        latest |= {"muted": False, "note": None}
        await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1, first))
        before = time.time()
        await store.commit(
            Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2, latest)
        )
        after = time.time()

        info = await store.info(KEY)
        assert info is not None
        assert (info.key, info.version, info.epoch, info.owner) == (KEY, 2, lease.epoch, "worker-a")
        assert info.lease_expires_at == pytest.approx(lease.expires_at, abs=0.01)
        assert before - 1 <= info.updated_at <= after + 1
        # the store's clock as it read the info (optional: None where a store cannot say)
        assert info.read_at is None or info.updated_at <= info.read_at <= time.time() + 1
        assert info.expires_at == pytest.approx(info.updated_at + 3600, abs=0.01)
        assert info.info == latest
        assert info.info["muted"] is False and isinstance(info.info["turns"], int)
        assert (await store.load(KEY)).info == latest
        assert [v.info for v in await store.versions(KEY)] == [first, latest]

    async def test_info_without_session_ttl_has_no_expiry(self) -> None:
        store = await self.new_store()
        await store.acquire(KEY, "worker-a")
        info = await store.info(KEY)
        assert info is not None and info.expires_at is None
