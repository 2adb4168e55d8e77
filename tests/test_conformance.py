"""The store contract, run unchanged over every backend (``make_store`` in conftest).

These tests use only the `Store` protocol: a new backend is done when they pass on it.
Expected contents come from a small model written here (not from `fold_records`), so a
bug shared by the stores and the fold would still show. A stream left without items
may or may not be listed by a load (compaction drops it), so comparisons ignore empty
streams.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from livekit_resume.errors import LeaseLost, SessionBusy, SnapshotNotFound
from livekit_resume.stores.base import (
    MAX_KEY_BYTES,
    Commit,
    Lease,
    Record,
    Store,
    Stored,
    needs_compaction,
)
from tests.conftest import StoreFactory

KEY = "room-42"
Items = dict[str, list[tuple[str, bytes]]]
InfoDict = dict[str, str | int | float | bool | None]


def live(stored: Stored) -> Items:
    """A load's streams without the empty ones."""
    return {name: list(items) for name, items in stored.streams.items() if items}


def _apply(model: Items, rec: Record) -> None:
    """The meaning of a record, written plainly: remove the id, then place it after ``after``."""
    items = model.setdefault(rec.stream, [])
    if rec.data is None and rec.id == "":
        items.clear()
        return
    items[:] = [(i, d) for i, d in items if i != rec.id]
    if rec.data is not None:
        pos = 0 if rec.after is None else [i for i, _ in items].index(rec.after) + 1
        items.insert(pos, (rec.id, rec.data))


def _nonempty(model: Items) -> Items:
    return {name: list(items) for name, items in model.items() if items}


class Writer:
    """One worker's view of a key: builds records against a model and commits them."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store, self.lease = store, lease
        self.version = 0
        self.model: Items = {}
        self.pending: list[Record] = []
        self.expected: dict[int, tuple[bytes, Items, InfoDict]] = {}

    def _add(self, rec: Record) -> None:
        _apply(self.model, rec)
        self.pending.append(rec)

    def ids(self, stream: str) -> list[str]:
        return [i for i, _ in self.model.get(stream, [])]

    def append(self, stream: str, item_id: str, data: bytes) -> None:
        ids = self.ids(stream)
        self._add(Record(stream, item_id, data, ids[-1] if ids else None))

    def edit(self, stream: str, item_id: str, data: bytes) -> None:
        ids = self.ids(stream)
        idx = ids.index(item_id)
        self._add(Record(stream, item_id, data, ids[idx - 1] if idx else None))

    def move(self, stream: str, item_id: str, after: str | None) -> None:
        data = dict(self.model[stream])[item_id]
        self._add(Record(stream, item_id, data, after))

    def remove(self, stream: str, item_id: str) -> None:
        self._add(Record(stream, item_id, None))

    def clear(self, stream: str) -> None:
        self._add(Record(stream, "", None))

    @property
    def size(self) -> int:
        return sum(len(items) for items in self.model.values())

    async def commit(self, info: InfoDict | None = None) -> int:
        head = f"head of {self.lease.key} v{self.version + 1}".encode() + b"\x00\xff"
        info = info if info is not None else {"n": self.version + 1}
        version = await self.store.commit(
            Commit(
                self.lease.key,
                self.lease.epoch,
                self.version,
                head,
                tuple(self.pending),
                self.size,
                info,
            )
        )
        assert version == self.version + 1
        self.version, self.pending = version, []
        self.expected[version] = (head, _nonempty(self.model), dict(info))
        return version

    async def check(self, version: int) -> None:
        head, streams, info = self.expected[version]
        stored = await self.store.load(self.lease.key, version)
        assert (stored.version, stored.head, live(stored), stored.info) == (
            version,
            head,
            streams,
            info,
        )


async def writer(
    store: Store, key: str = KEY, owner: str = "worker-a", *, ttl: float | None = None
) -> Writer:
    """A writer holding the key's lease (for ``ttl`` seconds: at most the store's own)."""
    lease = await (store.acquire(key, owner) if ttl is None else store.acquire(key, owner, ttl=ttl))
    return Writer(store, lease)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.05)


async def snapshot_of(store: Store, key: str = KEY) -> tuple[object, ...]:
    """Everything a reader can see of a key, to compare before and after a refusal."""
    info = await store.info(key)
    return (await store.load(key), await store.versions(key), info and info.version, info)


# -- contents ---------------------------------------------------------------------------


async def test_head_and_streams_round_trip_exactly(make_store: StoreFactory) -> None:
    store = await make_store()
    lease = await store.acquire(KEY, "worker-a")
    big = os.urandom(256 * 1024)
    streams: Items = {
        "history": [
            ("msg-1", b"hello"),
            ("msg-\u00e9\u4e2d\U0001f600", b"\x00\x00\x01\x00"),
            ("empty", b""),
            ("big", big),
            ("nul-tail", b"abc\x00"),
        ],
        "agent": [("sys", "instructions: be kind \u2764".encode()), ("a\u0301", b"\xff" * 3)],
        "\u00e9tat": [("only", b"\x00")],
    }
    records = []
    for name, items in streams.items():
        prev = None
        for item_id, data in items:
            records.append(Record(name, item_id, data, prev))
            prev = item_id
    head = b"\x00head\x00\xff\xfe" + bytes(range(256))
    info: InfoDict = {"state": "active", "reason": "turn", "turns": 7}
    version = await store.commit(Commit(KEY, lease.epoch, 0, head, records, 8, info))

    stored = await store.load(KEY)
    assert (stored.key, stored.version, stored.epoch) == (KEY, version, lease.epoch)
    assert stored.head == head
    assert stored.streams == streams
    assert stored.streams["history"][2] == ("empty", b"")
    assert isinstance(stored.streams["history"][2][1], bytes)
    assert stored.info == info
    assert abs(stored.created_at - time.time()) < 60


async def test_versions_are_numbered_one_two_three(make_store: StoreFactory) -> None:
    w = await writer(await make_store())
    numbers = []
    for n in range(3):
        w.append("history", f"m{n}", b"x")
        numbers.append(await w.commit())
    assert numbers == [1, 2, 3]
    assert [v.version for v in await w.store.versions(KEY)] == [1, 2, 3]
    assert (await w.store.load(KEY)).version == 3
    for v in (1, 2, 3):
        await w.check(v)


async def test_only_the_last_keep_versions_stay_loadable(make_store: StoreFactory) -> None:
    store = await make_store(keep=3)
    w = await writer(store)
    for n in range(1, 6):
        w.append("history", f"m{n}", f"item {n}".encode() * n)
        await w.commit(info={"n": n, "state": "active"})

    listed = await store.versions(KEY)
    assert [v.version for v in listed] == [3, 4, 5]
    for v in listed:
        head, streams, info = w.expected[v.version]
        assert v.epoch == w.lease.epoch
        assert v.info == info
        # Bytes the commit wrote: its head plus the one record it carried.
        assert v.size == len(head) + len(streams["history"][-1][1])
        await w.check(v.version)
    for gone in (1, 2):
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY, gone)
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY, 6)


async def test_old_version_loads_its_own_items_after_later_edits(make_store: StoreFactory) -> None:
    w = await writer(await make_store(keep=10))
    for i in "abc":
        w.append("history", i, f"{i} v1".encode())
    w.append("agent", "x", b"x v1")
    await w.commit()  # 1: history a b c, agent x
    w.edit("history", "b", b"b v2")
    await w.commit()  # 2: b edited in place
    w.remove("history", "a")
    w.append("history", "d", b"d v1")
    await w.commit()  # 3: a removed, d appended
    w.move("history", "d", None)
    await w.commit()  # 4: d moved first
    w.clear("history")
    w.append("history", "e", b"e v1")
    await w.commit()  # 5: history cleared, e added
    w.clear("agent")
    w.move("history", "e", None)
    await w.commit()  # 6: agent cleared, e re-placed where it stands

    assert w.expected[4][1]["history"] == [
        ("d", b"d v1"),
        ("b", b"b v2"),
        ("c", b"c v1"),
    ]
    for version in range(1, 7):
        await w.check(version)
    assert live(await w.store.load(KEY)) == {"history": [("e", b"e v1")]}


async def test_incremental_commits_read_back_like_a_full_rewrite(make_store: StoreFactory) -> None:
    store = await make_store(keep=10)
    w = await writer(store)
    rng = random.Random(20240611)
    counter = 0
    for _ in range(60):
        for _ in range(rng.randint(1, 6)):
            stream = rng.choice(["history", "history", "agent"])
            ids = w.ids(stream)
            op = rng.random()
            if not ids or op < 0.45:
                counter += 1
                w.append(stream, f"{stream}-{counter}", os.urandom(rng.randint(0, 40)))
            elif op < 0.65:
                w.edit(stream, rng.choice(ids), os.urandom(rng.randint(0, 40)))
            elif op < 0.8:
                item = rng.choice(ids)
                others = [i for i in ids if i != item]
                w.move(stream, item, rng.choice([None, *others]))
            elif op < 0.97:
                w.remove(stream, rng.choice(ids))
            else:
                w.clear(stream)
        await w.commit()
        assert live(await store.load(KEY)) == _nonempty(w.model)

    for version in range(w.version - 9, w.version + 1):
        await w.check(version)

    # The same final state written at once, as a first commit on a fresh key.
    fresh = await store.acquire("room-rewrite", "worker-b")
    records = []
    for name, items in w.model.items():
        prev = None
        for item_id, data in items:
            records.append(Record(name, item_id, data, prev))
            prev = item_id
    await store.commit(Commit("room-rewrite", fresh.epoch, 0, b"h", records, len(records)))
    assert live(await store.load("room-rewrite")) == live(await store.load(KEY))


async def test_compaction_keeps_every_retained_version_identical(make_store: StoreFactory) -> None:
    store = await make_store(keep=5)
    w = await writer(store)
    for n in range(10):
        w.append("history", f"m{n}", f"message {n}".encode())
    for n in range(3):
        w.append("agent", f"a{n}", f"agent {n}".encode())
    await w.commit()
    rng = random.Random(7)
    counter = 10
    commits = 200
    records = 13
    for step in range(commits):
        ids = w.ids("history")
        kind = step % 4
        if kind == 0:
            w.edit("history", rng.choice(ids), os.urandom(30))
        elif kind == 1:
            item = rng.choice(ids)
            w.move("history", item, rng.choice([None, *(i for i in ids if i != item)]))
        elif kind == 2:
            counter += 1
            w.remove("history", rng.choice(ids))
            w.append("history", f"m{counter}", os.urandom(30))
            records += 1
        elif step % 40 == 3:
            w.clear("agent")
            w.append("agent", f"a{step}", b"fresh agent context")
            records += 1
        else:
            w.edit("agent", rng.choice(w.ids("agent")), os.urandom(10))
        records += 1
        await w.commit()
        for version in range(max(1, w.version - 4), w.version + 1):
            await w.check(version)
    # The edits above outgrow the threshold more than once, whatever the store does.
    assert needs_compaction(records // 2, w.size)
    assert [v.version for v in await store.versions(KEY)] == list(
        range(w.version - 4, w.version + 1)
    )


# -- writers racing ----------------------------------------------------------------------


async def test_concurrent_committers_on_one_lease_get_contiguous_versions(
    make_store: StoreFactory,
) -> None:
    store = await make_store(keep=100)
    lease = await store.acquire(KEY, "worker-a")
    await store.commit(Commit(KEY, lease.epoch, 0, b"start", [Record("h", "start", b"s")], 1))
    accepted: dict[int, str] = {}
    conflicts = 0

    async def task(t: int) -> None:
        nonlocal conflicts
        for n in range(5):
            item = f"t{t}-{n}"
            while True:
                base = await store.load(KEY)
                await asyncio.sleep(0)  # let the other tasks read the same head
                tail = base.streams["h"][-1][0]
                commit = Commit(
                    KEY,
                    lease.epoch,
                    base.version,
                    item.encode(),
                    [Record("h", item, item.encode(), tail)],
                    len(base.streams["h"]) + 1,
                    {"item": item},
                )
                try:
                    version = await store.commit(commit)
                except LeaseLost:
                    info = await store.info(KEY)
                    assert info is not None and info.epoch == lease.epoch  # the head moved
                    conflicts += 1
                    continue
                accepted[version] = item
                break

    await asyncio.gather(*(task(t) for t in range(8)))

    assert conflicts > 0  # the race did happen
    assert sorted(accepted) == list(range(2, 42))
    assert [v.version for v in await store.versions(KEY)] == list(range(1, 42))
    previous = (await store.load(KEY, 1)).streams["h"]
    for version in range(2, 42):
        stored = await store.load(KEY, version)
        item = accepted[version]
        assert stored.head == item.encode()
        assert stored.info == {"item": item}
        assert stored.streams["h"] == [*previous, (item, item.encode())]
        previous = stored.streams["h"]


async def test_stale_worker_cannot_overwrite_takeover(make_store: StoreFactory) -> None:
    store = await make_store()
    old = await store.acquire(KEY, "worker-a")
    await store.commit(Commit(KEY, old.epoch, 0, b"a1", [Record("h", "1", b"from a")], 1))
    new = await store.acquire(KEY, "worker-b", takeover=True)
    assert new.epoch > old.epoch

    before = await snapshot_of(store)
    for base in (1, 0, 2):
        zombie = Commit(KEY, old.epoch, base, b"zombie", [Record("h", "1", b"ZOMBIE")], 1)
        with pytest.raises(LeaseLost):
            await store.commit(zombie)
    with pytest.raises(LeaseLost):
        await store.renew(old)
    await store.release(old)  # a stale release is ignored
    assert await snapshot_of(store) == before

    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == ("worker-b", new.epoch)
    record = Record("h", "2", b"from b", "1")
    assert await store.commit(Commit(KEY, new.epoch, 1, b"b2", [record], 2)) == 2
    stored = await store.load(KEY)
    assert (stored.head, stored.epoch) == (b"b2", new.epoch)
    assert stored.streams == {"h": [("1", b"from a"), ("2", b"from b")]}
    assert [v.epoch for v in await store.versions(KEY)] == [old.epoch, new.epoch]


async def test_commit_on_a_moved_head_is_refused_and_changes_nothing(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    w = await writer(store)
    for n in range(2):
        w.append("h", f"m{n}", b"x")
        await w.commit()
    before = await snapshot_of(store)
    for base in (0, 1, 3, 10):
        stale = Commit(KEY, w.lease.epoch, base, b"stale", [Record("h", "m0", b"STALE")], 2)
        with pytest.raises(LeaseLost):
            await store.commit(stale)
    assert await snapshot_of(store) == before
    w.append("h", "m2", b"y")
    assert await w.commit() == 3


async def test_commit_without_the_lease_is_refused(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(LeaseLost):
        await store.commit(Commit(KEY, 1, 0, b"h", [Record("h", "x", b"x")], 1))
    assert await store.keys() == []
    assert await store.info(KEY) is None

    lease = await store.acquire(KEY, "worker-a")
    for epoch in (0, lease.epoch + 1, lease.epoch - 1):
        with pytest.raises(LeaseLost):
            await store.commit(Commit(KEY, epoch, 0, b"h", [Record("h", "x", b"x")], 1))
    assert await store.versions(KEY) == []
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY)


# -- leases -----------------------------------------------------------------------------


async def test_same_owner_reacquires_with_the_same_epoch(make_store: StoreFactory) -> None:
    store = await make_store()
    first = await store.acquire(KEY, "worker-a", ttl=30)
    again = await store.acquire(KEY, "worker-a", ttl=60)
    forced = await store.acquire(KEY, "worker-a", ttl=60, takeover=True)
    assert first.epoch == again.epoch == forced.epoch
    assert again.expires_at > first.expires_at
    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == ("worker-a", first.epoch)


async def test_live_lease_of_another_owner_is_busy(make_store: StoreFactory) -> None:
    store = await make_store()
    lease = await store.acquire(KEY, "worker-a", ttl=60)
    with pytest.raises(SessionBusy) as caught:
        await store.acquire(KEY, "worker-b", ttl=60)
    assert caught.value.holder == "worker-a"
    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)


async def test_takeover_grants_a_new_epoch(make_store: StoreFactory) -> None:
    store = await make_store()
    a = await store.acquire(KEY, "worker-a", ttl=60)
    b = await store.acquire(KEY, "worker-b", ttl=60, takeover=True)
    c = await store.acquire(KEY, "worker-c", ttl=60, takeover=True)
    assert a.epoch < b.epoch < c.epoch
    assert (b.owner, c.owner) == ("worker-b", "worker-c")
    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == ("worker-c", c.epoch)


async def test_expired_lease_is_free_with_a_new_epoch(make_store: StoreFactory) -> None:
    store = await make_store()
    short = await store.acquire(KEY, "worker-a", ttl=0.3)

    async def lease_expired() -> bool:
        info = await store.info(KEY)
        assert info is not None
        return info.owner is None and info.lease_expires_at is None

    await eventually(lease_expired, "the 0.3 s lease has expired")
    info = await store.info(KEY)
    assert info is not None and info.epoch == short.epoch
    fresh = await store.acquire(KEY, "worker-b", ttl=60)  # no takeover needed
    assert fresh.epoch == short.epoch + 1


async def test_release_frees_the_lease_but_keeps_the_epoch_counter(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    a = await store.acquire(KEY, "worker-a", ttl=60)
    await store.release(a)
    info = await store.info(KEY)
    assert info is not None
    assert (info.owner, info.lease_expires_at, info.epoch) == (None, None, a.epoch)
    b = await store.acquire(KEY, "worker-b", ttl=60)  # free: no SessionBusy
    assert b.epoch == a.epoch + 1
    with pytest.raises(LeaseLost):
        await store.commit(Commit(KEY, a.epoch, 0, b"h", [], 0))
    await store.release(b)
    again = await store.acquire(KEY, "worker-b", ttl=60)
    assert again.epoch == b.epoch + 1


async def test_renew_extends_a_current_lease(make_store: StoreFactory) -> None:
    store = await make_store()
    lease = await store.acquire(KEY, "worker-a", ttl=5)
    renewed = await store.renew(lease, ttl=120)
    assert (renewed.key, renewed.owner, renewed.epoch) == (KEY, "worker-a", lease.epoch)
    assert renewed.expires_at > lease.expires_at + 60
    info = await store.info(KEY)
    assert info is not None and info.lease_expires_at == pytest.approx(renewed.expires_at, abs=0.01)


async def test_renew_of_a_stale_lease_is_lease_lost(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(LeaseLost):
        await store.renew(Lease(KEY, "worker-a", 1, 0.0))  # unknown key
    a = await store.acquire(KEY, "worker-a", ttl=60)
    with pytest.raises(LeaseLost):
        await store.renew(Lease(KEY, "worker-x", a.epoch, a.expires_at))  # wrong owner
    b = await store.acquire(KEY, "worker-b", ttl=60, takeover=True)
    with pytest.raises(LeaseLost):
        await store.renew(a)
    await store.release(b)
    with pytest.raises(LeaseLost):
        await store.renew(b)  # released
    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == (None, b.epoch)


# -- session lifetime --------------------------------------------------------------------


async def test_session_expires_after_ttl_without_writes(make_store: StoreFactory) -> None:
    store = await make_store(ttl=0.5)
    # Written in this order: when the last one has expired, so have the others. Each is
    # then looked at through one method first, so every method must hide an expired key.
    names = ["via-load", "via-versions", "via-delete", "via-keys", "via-info"]
    for name in names:
        w = await writer(store, name, ttl=0.5)
        w.append("h", "m", b"x")
        await w.commit()
    assert await store.keys() == sorted(names)

    async def gone() -> bool:
        return await store.info("via-info") is None

    await eventually(gone, "the session outlived its 0.5 s ttl")
    with pytest.raises(SnapshotNotFound):
        await store.load("via-load")
    assert await store.versions("via-versions") == []
    assert await store.delete("via-delete") is False
    assert await store.keys() == []
    # Its lease went with it: another worker starts afresh without a takeover.
    lease = await store.acquire("via-info", "worker-b", ttl=0.5)
    assert lease.owner == "worker-b"
    with pytest.raises(SnapshotNotFound):
        await store.load("via-info")


async def test_writes_keep_a_session_alive_past_its_ttl(make_store: StoreFactory) -> None:
    ttl = 1.0
    store = await make_store(ttl=ttl)
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


async def test_delete_removes_every_trace(make_store: StoreFactory) -> None:
    store = await make_store()
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


async def test_a_worker_of_a_deleted_session_stays_fenced_when_it_is_created_again(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    zombie = await writer(store, KEY, "worker-z")
    zombie.append("h", "z1", b"z")
    await zombie.commit()
    assert await store.delete(KEY) is True  # an operator's rm, or the session's TTL
    # epochs of a new life start from the clock in milliseconds; a real former life ended
    # far longer ago than the one tick this waits for
    await asyncio.sleep(0.01)
    again = await writer(store, KEY, "worker-b")
    assert again.lease.epoch > zombie.lease.epoch  # epochs are never handed out twice
    # even with a base version that happens to match, the old epoch is refused
    with pytest.raises(LeaseLost):
        await store.commit(Commit(KEY, zombie.lease.epoch, 0, b"zombie", [], 0))
    again.append("h", "b1", b"b")
    assert await again.commit() == 1
    await again.check(1)


async def test_many_keys_are_listed_sorted(make_store: StoreFactory) -> None:
    store = await make_store()
    rng = random.Random(3)
    alphabet = "abcXYZ019-_:./ \u00e9\u00df\u4e2d\u0416\U0001f600\U0001f30d~"
    names = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(260)}
    names = set(sorted(names)[:200])
    for name in rng.sample(sorted(names), len(names)):
        lease = await store.acquire(name, "worker")
        await store.commit(Commit(name, lease.epoch, 0, name.encode(), [], 0))
    assert len(names) == 200
    assert await store.keys() == sorted(names)


async def test_acquired_key_without_snapshot_is_listed_at_version_zero(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    lease = await store.acquire(KEY, "worker-a")
    assert await store.keys() == [KEY]
    info = await store.info(KEY)
    assert info is not None
    assert (info.version, info.epoch, info.owner, info.info) == (0, lease.epoch, "worker-a", {})
    assert await store.versions(KEY) == []
    with pytest.raises(SnapshotNotFound):
        await store.load(KEY)


# -- keys and listings -------------------------------------------------------------------

BAD_KEYS = ["", "a\x00b", "line\nbreak", "tab\there", "del\x7f", "x" * (MAX_KEY_BYTES + 1)]
BAD_KEYS.append("\u00e9" * (MAX_KEY_BYTES // 2 + 1))  # few characters, too many bytes


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda k: repr(k[:12]) + f"[{len(k)}]")
async def test_invalid_keys_are_rejected_by_every_method(
    make_store: StoreFactory, bad: str
) -> None:
    store = await make_store()
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


async def test_longest_valid_key_works(make_store: StoreFactory) -> None:
    store = await make_store()
    key = "k" * (MAX_KEY_BYTES - 2) + "\u00e9"  # exactly MAX_KEY_BYTES bytes
    assert len(key.encode()) == MAX_KEY_BYTES
    w = await writer(store, key)
    w.append("h", "x", b"x")
    await w.commit()
    await w.check(1)
    assert await store.keys() == [key]


async def test_unknown_key_has_no_snapshot(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(SnapshotNotFound):
        await store.load("nobody")
    with pytest.raises(SnapshotNotFound):
        await store.load("nobody", 1)
    assert await store.versions("nobody") == []
    assert await store.info("nobody") is None
    assert await store.delete("nobody") is False
    await store.release(Lease("nobody", "worker-a", 1, 0.0))
    assert await store.keys() == []


async def test_info_reports_latest_commit_and_lease(make_store: StoreFactory) -> None:
    store = await make_store(ttl=3600)
    lease = await store.acquire(KEY, "worker-a", ttl=60)
    first: InfoDict = {"state": "active", "reason": "turn", "turns": 1}
    latest: InfoDict = {"state": "paused", "reason": "pause", "turns": 3, "cost": 0.25}
    latest |= {"muted": False, "note": None}
    await store.commit(Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "a", b"a")], 1, first))
    before = time.time()
    await store.commit(Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "b", b"b", "a")], 2, latest))
    after = time.time()

    info = await store.info(KEY)
    assert info is not None
    assert (info.key, info.version, info.epoch, info.owner) == (KEY, 2, lease.epoch, "worker-a")
    assert info.lease_expires_at == pytest.approx(lease.expires_at, abs=0.01)
    assert before - 1 <= info.updated_at <= after + 1
    assert info.expires_at == pytest.approx(info.updated_at + 3600, abs=0.01)
    assert info.info == latest
    assert info.info["muted"] is False and isinstance(info.info["turns"], int)
    assert (await store.load(KEY)).info == latest
    assert [v.info for v in await store.versions(KEY)] == [first, latest]


async def test_info_without_session_ttl_has_no_expiry(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.acquire(KEY, "worker-a")
    info = await store.info(KEY)
    assert info is not None and info.expires_at is None


async def test_a_retried_commit_with_the_same_id_gets_its_landed_version(
    make_store: StoreFactory,
) -> None:
    """Issue 13 defect 1: a commit whose reply was lost is sent again with the same id;
    the store answers with the version it already wrote instead of refusing a moved head."""
    store = await make_store()
    lease = await store.acquire(KEY, "worker-a")
    first = Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "m0", b"x")], 1, commit_id="c-1")
    assert await store.commit(first) == 1
    before = await snapshot_of(store)
    assert await store.commit(first) == 1  # the ambiguous retry: same id, same base
    assert await snapshot_of(store) == before  # written once
    other = Commit(KEY, lease.epoch, 0, b"h1", [Record("h", "m0", b"x")], 1, commit_id="c-2")
    with pytest.raises(LeaseLost) as moved:
        await store.commit(other)  # another id on the old base is still a moved head
    assert not moved.value.vanished
    nxt = Commit(KEY, lease.epoch, 1, b"h2", [Record("h", "m1", b"y", "m0")], 2, commit_id="c-3")
    assert await store.commit(nxt) == 2
    with pytest.raises(LeaseLost):
        await store.commit(first)  # an id two versions back is not a retry any more
    assert (await store.load(KEY)).streams == {"h": [("m0", b"x"), ("m1", b"y")]}


async def test_lease_lost_says_whether_the_session_vanished_or_was_taken(
    make_store: StoreFactory,
) -> None:
    """Issue 13 defect 2: a holder must tell "my session is gone" from "someone took it"."""
    store = await make_store()
    a = await store.acquire(KEY, "worker-a")
    assert await store.commit(Commit(KEY, a.epoch, 0, b"h", [Record("h", "x", b"x")], 1)) == 1
    b = await store.acquire(KEY, "worker-b", takeover=True)
    with pytest.raises(LeaseLost) as taken:
        await store.commit(Commit(KEY, a.epoch, 1, b"h", [], 1))
    assert not taken.value.vanished and taken.value.current_epoch == b.epoch
    assert await store.delete(KEY)
    with pytest.raises(LeaseLost) as gone:
        await store.commit(Commit(KEY, b.epoch, 1, b"h", [], 1))
    assert gone.value.vanished
    with pytest.raises(LeaseLost) as gone_renew:
        await store.renew(b)
    assert gone_renew.value.vanished


# --- SQLite helper: TTL and clock ---
# Issue 13 defect 9, for every store: a session TTL is a finite number of seconds, and a
# lease never outlives the session it guards.

_BAD_SESSION_TTLS = [0, -1, 1e-9, float("nan"), float("inf")]


@pytest.mark.parametrize("ttl", _BAD_SESSION_TTLS, ids=repr)
async def test_a_session_ttl_must_be_a_finite_positive_number(
    make_store: StoreFactory, ttl: float
) -> None:
    with pytest.raises(ValueError, match="ttl") as refused:
        await make_store(ttl=ttl)
    assert repr(ttl) in str(refused.value)


async def test_a_lease_may_not_outlive_its_session(make_store: StoreFactory) -> None:
    store = await make_store(ttl=60)
    with pytest.raises(ValueError, match=r"lease ttl 61\b.*session ttl 60"):
        await store.acquire(KEY, "worker-a", ttl=61)
    assert await store.keys() == []  # refused before anything was written
    lease = await store.acquire(KEY, "worker-a", ttl=60)  # as long as the session: fine
    with pytest.raises(ValueError, match=r"lease ttl 61\b.*session ttl 60"):
        await store.renew(lease, ttl=61)
    info = await store.info(KEY)
    assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)
