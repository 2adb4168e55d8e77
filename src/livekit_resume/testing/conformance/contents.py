"""Conformance: what a store keeps, version by version, and how concurrent writers fare.

Expected contents come from the model in `._model`, never from the store's own fold.
A stream left without items may or may not be listed by a load (compaction drops it),
so comparisons ignore empty streams.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, cast

import pytest

from ...errors import LeaseLost, SnapshotNotFound
from ...stores.base import Commit, Record
from ...stores.log import needs_compaction
from ._base import StoreTests
from ._model import (
    KEY,
    InfoDict,
    Items,
    live,
    nonempty,
    records_of,
    snapshot_of,
    writer,
)

# A racing task is refused once per commit of another task that landed between its load
# and its commit: 35 at most (8 tasks of 5 commits). More is a store whose load lags.
_MAX_CONFLICTS = 100


class ContentTests(StoreTests):
    """Heads, streams, retention and compaction; racing committers and stale writers."""

    async def test_head_and_streams_round_trip_exactly(self) -> None:
        store = await self.new_store()
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
        records = records_of(streams)
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

    async def test_versions_are_numbered_one_two_three(self) -> None:
        w = await writer(await self.new_store())
        numbers = []
        for n in range(3):
            w.append("history", f"m{n}", b"x")
            numbers.append(await w.commit())
        assert numbers == [1, 2, 3]
        assert [v.version for v in await w.store.versions(KEY)] == [1, 2, 3]
        assert (await w.store.load(KEY)).version == 3
        for v in (1, 2, 3):
            await w.check(v)

    async def test_only_the_last_keep_versions_stay_loadable(self) -> None:
        store = await self.new_store(keep=3)
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
        # no version past the head, nor one no store can number (SQLite's INTEGER)
        for never in (6, 0, -1, 2**63, 2**64):
            with pytest.raises(SnapshotNotFound):
                await store.load(KEY, never)

    async def test_old_version_loads_its_own_items_after_later_edits(self) -> None:
        w = await writer(await self.new_store(keep=10))
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

    async def test_incremental_commits_read_back_like_a_full_rewrite(self) -> None:
        store = await self.new_store(keep=10)
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
            assert live(await store.load(KEY)) == nonempty(w.model)

        for version in range(w.version - 9, w.version + 1):
            await w.check(version)

        # The same final state written at once, as a first commit on a fresh key.
        fresh = await store.acquire("room-rewrite", "worker-b")
        records = records_of(w.model)
        await store.commit(Commit("room-rewrite", fresh.epoch, 0, b"h", records, len(records)))
        assert live(await store.load("room-rewrite")) == live(await store.load(KEY))

    async def test_compaction_keeps_every_retained_version_identical(self) -> None:
        store = await self.new_store(keep=5)
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

    async def test_a_whole_commit_reads_its_records_alone_and_leaves_older_versions(
        self,
    ) -> None:
        """`Commit.whole`: its records clear each stream before writing to it, so the new
        version holds exactly them, whatever came before; older versions keep theirs."""
        store = await self.new_store(keep=10)
        w = await writer(store)
        for n in range(4):
            w.append("history", f"m{n}", f"message {n}".encode())
        w.append("agent", "a0", b"agent")
        await w.commit()
        w.edit("history", "m1", b"edited")
        await w.commit()
        whole = {"history": [("w0", b"anew"), ("w1", b"again")], "agent": [("a9", b"x")]}
        records = [Record("history", "", None), Record("agent", "", None)]
        records += records_of(whole)
        head = b"whole head"
        version = await store.commit(
            Commit(KEY, w.lease.epoch, w.version, head, records, 3, {"n": 3}, whole=True)
        )
        assert version == w.version + 1
        stored = await store.load(KEY)
        assert (stored.head, live(stored)) == (head, whole)
        for older in (1, 2):
            await w.check(older)

    async def test_a_whole_commit_that_writes_before_it_clears_is_refused(self) -> None:
        store = await self.new_store()
        w = await writer(store)
        w.append("history", "m0", b"x")
        await w.commit()
        before = await snapshot_of(store)
        for records in (
            [Record("history", "m1", b"y", "m0")],
            [Record("history", "", None), Record("agent", "a", b"z")],
        ):
            with pytest.raises(ValueError, match="whole commit"):
                await store.commit(Commit(KEY, w.lease.epoch, 1, b"h", records, 1, whole=True))
        assert await snapshot_of(store) == before
        # nothing of the refused commits was kept: the next version reads only its own
        w.append("history", "m2", b"after")
        assert await w.commit() == 2
        await w.check(2)

    async def test_a_commit_of_the_wrong_field_types_is_refused(self) -> None:
        """`validate_commit`: a field not of the type `Commit` names (a str head or item,
        a stream named by an int, a nested or bytes info value, a str base version) is
        `ValueError`; nothing is written, and the next commit reads none of it."""
        store = await self.new_store()
        w = await writer(store)
        w.append("history", "m0", b"x")
        await w.commit()
        before = await snapshot_of(store)
        text: Any = "text"
        epoch = w.lease.epoch
        bad: list[Commit] = [
            Commit(KEY, epoch, 1, text, [Record("history", "g0", b"ghost", "m0")], 2),
            Commit(KEY, epoch, 1, b"h", [Record("history", "g1", text, "m0")], 2),
            Commit(KEY, epoch, 1, b"h", [Record(cast(Any, 7), "g2", b"ghost")], 2),
            Commit(KEY, epoch, 1, b"h", [], 1, {"nested": cast(Any, {"a": 1})}),
            Commit(KEY, epoch, 1, b"h", [], 1, {"raw": cast(Any, b"bytes")}),
            Commit(KEY, epoch, text, b"h", [Record("history", "g3", b"ghost", "m0")], 2),
        ]
        for commit in bad:
            with pytest.raises(ValueError):
                await store.commit(commit)
        assert await snapshot_of(store) == before
        w.append("history", "m1", b"y")
        assert await w.commit() == 2
        await w.check(2)

    # -- writers racing ------------------------------------------------------------------

    async def test_concurrent_committers_on_one_lease_get_contiguous_versions(self) -> None:
        store = await self.new_store(keep=100)
        lease = await store.acquire(KEY, "worker-a")
        await store.commit(Commit(KEY, lease.epoch, 0, b"start", [Record("h", "start", b"s")], 1))
        accepted: dict[int, str] = {}
        conflicts = 0

        async def task(t: int) -> None:
            nonlocal conflicts
            mine = 0  # each refusal is another task's commit: at most 35 on a sound store
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
                        mine += 1
                        assert mine < _MAX_CONFLICTS, (
                            f"task {t} was refused {mine} times on the head it had just "
                            f"loaded (version {base.version}): a load lags the commits, or "
                            "a commit is refused on the head it names"
                        )
                        continue
                    accepted[version] = item
                    break

        # every task runs to its end (each is bounded), so none outlives the test
        for failed in await asyncio.gather(*(task(t) for t in range(8)), return_exceptions=True):
            if isinstance(failed, BaseException):
                raise failed

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

    async def test_stale_worker_cannot_overwrite_takeover(self) -> None:
        store = await self.new_store()
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

    async def test_commit_on_a_moved_head_is_refused_and_changes_nothing(self) -> None:
        store = await self.new_store()
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
        await w.check(3)  # the refused records were not kept in the log either

    async def test_commit_without_the_lease_is_refused(self) -> None:
        store = await self.new_store()
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
