"""Conformance: leases and fencing epochs, idempotent retries, and the TTL rules."""

from __future__ import annotations

import asyncio

import pytest

from ...errors import LeaseLost, SessionBusy
from ...stores.base import Commit, Lease, Record
from ..poll import eventually
from ._base import StoreTests
from ._model import KEY, snapshot_of

# Issue 13 defect 9, for every store: a session TTL is a finite number of seconds, and a
# lease never outlives the session it guards.
_BAD_SESSION_TTLS = [0, -1, 1e-9, float("nan"), float("inf")]


class LeaseTests(StoreTests):
    """Who may write a key, and what a refused writer leaves behind (nothing)."""

    async def test_same_owner_reacquires_with_the_same_epoch(self) -> None:
        store = await self.new_store()
        first = await store.acquire(KEY, "worker-a", ttl=30)
        again = await store.acquire(KEY, "worker-a", ttl=60)
        forced = await store.acquire(KEY, "worker-a", ttl=60, takeover=True)
        assert first.epoch == again.epoch == forced.epoch
        assert again.expires_at > first.expires_at
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-a", first.epoch)

    async def test_live_lease_of_another_owner_is_busy(self) -> None:
        store = await self.new_store()
        lease = await store.acquire(KEY, "worker-a", ttl=60)
        with pytest.raises(SessionBusy) as caught:
            await store.acquire(KEY, "worker-b", ttl=60)
        assert caught.value.holder == "worker-a"
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)

    async def test_takeover_grants_a_new_epoch(self) -> None:
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a", ttl=60)
        b = await store.acquire(KEY, "worker-b", ttl=60, takeover=True)
        c = await store.acquire(KEY, "worker-c", ttl=60, takeover=True)
        assert a.epoch < b.epoch < c.epoch
        assert (b.owner, c.owner) == ("worker-b", "worker-c")
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-c", c.epoch)

    async def test_a_reclaim_above_the_stores_epoch_takes_the_key_at_that_epoch(self) -> None:
        """`Store.acquire` ``reclaim``: a holder whose acquisition the store forgot (a
        rollback to before its takeover) gets its epoch back, over the live lease of
        the holder it took the key from, which is fenced; the next takeover is above.
        (The store's clock must have passed the reclaimed epoch: every epoch a store
        hands out is at least its clock in microseconds.)"""
        store = await self.new_store()
        old = await store.acquire(KEY, "worker-a", ttl=60)
        await asyncio.sleep(0.01)  # worker-b's takeover came later, by the store's clock
        forgotten = old.epoch + 1  # what worker-b held before the store went back
        back = await store.acquire(KEY, "worker-b", ttl=60, reclaim=forgotten)
        assert (back.owner, back.epoch) == ("worker-b", forgotten)
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-b", forgotten)
        with pytest.raises(LeaseLost) as fenced:
            await store.commit(Commit(KEY, old.epoch, 0, b"zombie", [], 0))
        assert not fenced.value.vanished
        assert await store.commit(Commit(KEY, back.epoch, 0, b"h", [], 0)) == 1
        newer = await store.acquire(KEY, "worker-c", ttl=60, takeover=True)
        assert newer.epoch > forgotten
        gone = await store.acquire("room-gone", "worker-b", ttl=60, reclaim=forgotten)
        assert gone.epoch == forgotten  # a store that lost the key: the same rule

    async def test_a_reclaim_below_the_stores_epoch_is_fenced(self) -> None:
        """A reclaim below the store's epoch (someone else acquired the key since), or at
        or below a deleted key's tombstone, is `LeaseLost`, not vanished, as its commit
        would be: on a free lease too. At the store's own epoch, or above its clock (no
        epoch it handed out is), it is a plain acquisition. A reclaim that is not an
        epoch is a `ValueError`."""
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a", ttl=60)
        with pytest.raises(SessionBusy):  # the store's own epoch, another owner's lease
            await store.acquire(KEY, "worker-b", ttl=60, reclaim=a.epoch)
        with pytest.raises(SessionBusy):  # above the clock
            await store.acquire(KEY, "worker-b", ttl=60, reclaim=2**53 - 1)
        mine = await store.acquire(KEY, "worker-a", ttl=60, reclaim=a.epoch)
        assert mine.epoch == a.epoch  # its own live lease, renewed
        await store.release(mine)
        with pytest.raises(LeaseLost) as fenced:
            await store.acquire(KEY, "worker-b", ttl=60, reclaim=a.epoch - 1)
        assert not fenced.value.vanished
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == (None, a.epoch)
        # its own acquisition since, whose reply was lost, asked again: not fenced by it
        own = await store.acquire(KEY, "worker-a", ttl=60)
        again = await store.acquire(KEY, "worker-a", ttl=60, reclaim=a.epoch)
        assert again.epoch == own.epoch > a.epoch
        await store.release(again)
        b = await store.acquire(KEY, "worker-b", ttl=60)
        assert await store.delete(KEY, lease=b) is True
        for epoch in (b.epoch, a.epoch):
            with pytest.raises(LeaseLost) as deleted:
                await store.acquire(KEY, "worker-c", ttl=60, reclaim=epoch)
            assert not deleted.value.vanished and "deleted" in str(deleted.value)
        assert await store.info(KEY) is None
        free = await store.acquire("room-free", "worker-b", ttl=60, reclaim=2**53 - 1)
        assert free.epoch < 2**53 - 1
        for bad in (0, -1, True, 2**53, 1.5, "7"):
            with pytest.raises(ValueError):
                await store.acquire("room-bad", "worker-a", ttl=60, reclaim=bad)  # type: ignore[arg-type]
        assert await store.info("room-bad") is None

    async def test_a_reclaim_of_its_own_run_out_lease_keeps_its_epoch(self) -> None:
        """A reclaim at the store's epoch by the owner whose lease ran out there (a
        store gone back to a copy made before it lost a takeover, the lease expired in
        it) keeps that epoch: a new one would be above the epochs of the holders the
        store forgot, and fence the newest. By another owner it is a new epoch."""
        store = await self.new_store()
        short = await store.acquire(KEY, "worker-a", ttl=0.3)
        other = await store.acquire("room-other", "worker-a", ttl=0.3)

        async def run_out() -> bool:
            infos = [await store.info(key) for key in (KEY, "room-other")]
            return all(i is not None and i.owner is None for i in infos)

        await eventually(run_out, "the 0.3 s leases have expired")
        back = await store.acquire(KEY, "worker-a", ttl=60, reclaim=short.epoch)
        assert back.epoch == short.epoch
        assert await store.commit(Commit(KEY, back.epoch, 0, b"h", [], 0)) == 1
        taken = await store.acquire("room-other", "worker-b", ttl=60, reclaim=other.epoch)
        assert taken.epoch > other.epoch

    async def test_expired_lease_is_free_with_a_new_epoch(self) -> None:
        """`Store.acquire`: an expired lease is free, and taking it gets a new epoch, for
        its former owner too (only renewing a live lease keeps the epoch): the stale
        lease of an earlier run of the same owner is fenced."""
        store = await self.new_store()
        mine = await store.acquire("room-mine", "worker-a", ttl=0.3)  # expires first
        short = await store.acquire(KEY, "worker-a", ttl=0.3)

        async def lease_expired() -> bool:
            info = await store.info(KEY)
            assert info is not None
            return info.owner is None and info.lease_expires_at is None

        await eventually(lease_expired, "the 0.3 s lease has expired")
        info = await store.info(KEY)
        assert info is not None and info.epoch == short.epoch
        fresh = await store.acquire(KEY, "worker-b", ttl=60)  # no takeover needed
        assert fresh.epoch > short.epoch
        again = await store.acquire("room-mine", "worker-a", ttl=60)  # the same owner
        assert again.epoch > mine.epoch, "the owner of an expired lease kept its epoch"
        with pytest.raises(LeaseLost):
            await store.commit(Commit("room-mine", mine.epoch, 0, b"stale", [], 0))
        with pytest.raises(LeaseLost):
            await store.renew(mine)
        assert await store.commit(Commit("room-mine", again.epoch, 0, b"h", [], 0)) == 1

    async def test_release_frees_the_lease_but_keeps_the_epoch_counter(self) -> None:
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a", ttl=60)
        await store.release(a)
        info = await store.info(KEY)
        assert info is not None
        assert (info.owner, info.lease_expires_at, info.epoch) == (None, None, a.epoch)
        b = await store.acquire(KEY, "worker-b", ttl=60)  # free: no SessionBusy
        assert b.epoch > a.epoch
        with pytest.raises(LeaseLost):
            await store.commit(Commit(KEY, a.epoch, 0, b"h", [], 0))
        await store.release(b)
        again = await store.acquire(KEY, "worker-b", ttl=60)
        assert again.epoch > b.epoch

    async def test_a_stale_lease_of_the_same_owner_releases_and_deletes_nothing(self) -> None:
        """`Store.release` and `Store.delete` (``lease=``) act only while the lease is
        current, same epoch and owner: an earlier lease of the owner that holds the key
        now (a job that released it and took it again) is ignored by release and
        refused by delete (`LeaseLost`); the current lease stays, every version too."""
        store = await self.new_store()
        old = await store.acquire(KEY, "job-1", ttl=60)
        assert await store.commit(Commit(KEY, old.epoch, 0, b"h", [Record("h", "x", b"x")], 1)) == 1
        await store.release(old)
        new = await store.acquire(KEY, "job-1", ttl=60)
        assert new.epoch > old.epoch
        await store.release(old)  # stale: ignored
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("job-1", new.epoch)
        assert info.lease_expires_at == pytest.approx(new.expires_at, abs=0.01)
        with pytest.raises(LeaseLost) as lost:
            await store.delete(KEY, lease=old)
        assert not lost.value.vanished and lost.value.current_epoch == new.epoch
        with pytest.raises(LeaseLost):
            await store.renew(old)
        assert (await store.load(KEY)).version == 1 and await store.keys() == [KEY]
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("job-1", new.epoch)
        assert await store.commit(Commit(KEY, new.epoch, 1, b"h2", [], 1)) == 2

    async def test_renew_extends_a_current_lease(self) -> None:
        store = await self.new_store()
        lease = await store.acquire(KEY, "worker-a", ttl=5)
        renewed = await store.renew(lease, ttl=120)
        assert (renewed.key, renewed.owner, renewed.epoch) == (KEY, "worker-a", lease.epoch)
        assert renewed.expires_at > lease.expires_at + 60
        info = await store.info(KEY)
        assert info is not None and info.lease_expires_at == pytest.approx(
            renewed.expires_at, abs=0.01
        )

    async def test_a_renewed_lease_says_the_latest_version_or_nothing(self) -> None:
        """`Lease.version`: a holder that committed a newer version than the one the
        renewal names learns the store went back (a failover, a backup restored) and
        writes the session whole. A store that cannot tell says None. The latest version's
        number, not how many are retained: the same until ``keep`` is reached only."""
        store = await self.new_store(keep=3)
        lease = await store.acquire(KEY, "worker-a", ttl=60)
        assert (await store.renew(lease, ttl=60)).version in (None, 0)
        record = [Record("h", "x", b"x")]
        assert await store.commit(Commit(KEY, lease.epoch, 0, b"h", record, 1)) == 1
        assert await store.commit(Commit(KEY, lease.epoch, 1, b"h", [], 1)) == 2
        assert (await store.renew(lease, ttl=60)).version in (None, 2)
        for base in (2, 3, 4):
            assert await store.commit(Commit(KEY, lease.epoch, base, b"h", [], 1)) == base + 1
        renewed = await store.renew(lease, ttl=60)
        assert renewed.version in (None, 5), f"renew says version {renewed.version}, not 5"

    async def test_renew_of_a_stale_lease_is_lease_lost(self) -> None:
        store = await self.new_store()
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

    async def test_a_commit_with_a_lease_ttl_renews_the_held_lease(self) -> None:
        """`Commit.lease_ttl`: a holder committing often needs no separate renewal."""
        store = await self.new_store()
        lease = await store.acquire(KEY, "worker-a", ttl=5)
        plain = Commit(KEY, lease.epoch, 0, b"h", [Record("h", "x", b"x")], 1)
        assert await store.commit(plain) == 1
        info = await store.info(KEY)
        assert info is not None and info.lease_expires_at == pytest.approx(
            lease.expires_at, abs=0.01
        )  # without lease_ttl the lease is left as it is
        renewing = Commit(KEY, lease.epoch, 1, b"h", [], 1, lease_ttl=120)
        assert await store.commit(renewing) == 2
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)
        assert info.lease_expires_at is not None
        assert info.lease_expires_at > lease.expires_at + 60
        # an invalid lease_ttl is refused before anything is written, records included
        before = await snapshot_of(store)
        ghost = [Record("h", "ghost", b"GHOST", "x")]
        for bad in (0, -1, float("nan")):
            with pytest.raises(ValueError):
                await store.commit(Commit(KEY, lease.epoch, 2, b"bad", ghost, 2, lease_ttl=bad))
        assert await snapshot_of(store) == before, "a commit refused for its lease_ttl wrote"
        assert await store.commit(Commit(KEY, lease.epoch, 2, b"h3", [], 1)) == 3
        assert (await store.load(KEY)).streams == {"h": [("x", b"x")]}

    async def test_a_retry_that_finds_its_commit_landed_renews_the_lease_too(self) -> None:
        """The holder counts a commit answered with its version as a renewal, whether it
        landed now or on an earlier attempt whose reply was lost."""
        store = await self.new_store()
        lease = await store.acquire(KEY, "worker-a", ttl=5)
        first = Commit(KEY, lease.epoch, 0, b"h", [], 0, commit_id="c-1")
        assert await store.commit(first) == 1
        again = Commit(KEY, lease.epoch, 0, b"h", [], 0, commit_id="c-1", lease_ttl=120)
        assert await store.commit(again) == 1
        info = await store.info(KEY)
        assert info is not None and info.lease_expires_at is not None
        assert info.lease_expires_at > lease.expires_at + 60

    async def test_a_commit_by_a_stale_epoch_renews_nothing(self) -> None:
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a", ttl=60)
        b = await store.acquire(KEY, "worker-b", ttl=5, takeover=True)
        with pytest.raises(LeaseLost):
            await store.commit(Commit(KEY, a.epoch, 0, b"h", [], 0, lease_ttl=120))
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-b", b.epoch)
        assert info.lease_expires_at == pytest.approx(b.expires_at, abs=0.01)
        await store.release(b)
        assert await store.commit(Commit(KEY, b.epoch, 0, b"h", [], 0, lease_ttl=120)) == 1
        info = await store.info(KEY)  # released: a commit does not take the lease back
        assert info is not None and (info.owner, info.lease_expires_at) == (None, None)
        c = await store.acquire(KEY, "worker-c", ttl=60)  # free: no SessionBusy
        assert c.epoch > b.epoch

    async def test_a_retried_commit_with_the_same_id_gets_its_landed_version(self) -> None:
        """Issue 13 defect 1: a commit whose reply was lost is sent again with the same id;
        the store answers with the version it already wrote instead of refusing a moved head."""
        store = await self.new_store()
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
        nxt = Commit(
            KEY, lease.epoch, 1, b"h2", [Record("h", "m1", b"y", "m0")], 2, commit_id="c-3"
        )
        assert await store.commit(nxt) == 2
        with pytest.raises(LeaseLost):
            await store.commit(first)  # an id two versions back is not a retry any more
        assert (await store.load(KEY)).streams == {"h": [("m0", b"x"), ("m1", b"y")]}

    async def test_lease_lost_says_whether_the_session_vanished_or_was_taken(self) -> None:
        """Issue 13 defect 2: a holder must tell "my session is gone" from "someone took
        it". Gone: expired (its lease and then the session's TTL ran out), as a store
        that lost its data; a deleted one is fenced instead (lifetime.py)."""
        ttl = 0.4
        store = await self.new_store(ttl=ttl)
        a = await store.acquire(KEY, "worker-a", ttl=ttl / 4)
        assert await store.commit(Commit(KEY, a.epoch, 0, b"h", [Record("h", "x", b"x")], 1)) == 1
        b = await store.acquire(KEY, "worker-b", ttl=ttl / 4, takeover=True)
        with pytest.raises(LeaseLost) as taken:
            await store.commit(Commit(KEY, a.epoch, 1, b"h", [], 1))
        assert not taken.value.vanished and taken.value.current_epoch == b.epoch
        await asyncio.sleep(ttl * 1.5)  # the lease, then the session, expired
        with pytest.raises(LeaseLost) as gone:
            await store.commit(Commit(KEY, b.epoch, 1, b"h", [], 1))
        assert gone.value.vanished
        with pytest.raises(LeaseLost) as gone_renew:
            await store.renew(b, ttl=ttl / 4)
        assert gone_renew.value.vanished

    async def test_a_commit_ahead_of_the_head_says_the_store_lost_versions(self) -> None:
        """A commit based on a version the store no longer holds, under the current epoch:
        the store lost versions it had acknowledged (a failover with asynchronous
        replication, a restore from a backup). Nobody took the session, so the writer may
        write it whole again (``vanished``); nothing is written by the refused commit."""
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a")
        assert await store.commit(Commit(KEY, a.epoch, 0, b"h", [Record("h", "x", b"x")], 1)) == 1
        before = await snapshot_of(store)
        with pytest.raises(LeaseLost) as behind:
            await store.commit(Commit(KEY, a.epoch, 3, b"h", [Record("h", "y", b"y", "x")], 1))
        assert behind.value.vanished and behind.value.current_epoch == a.epoch
        assert "lost" in str(behind.value)
        assert await snapshot_of(store) == before

    async def test_a_writer_newer_than_the_stored_epoch_is_told_the_store_lost_it(self) -> None:
        """The store holds an epoch older than the writer's: it went back to before the
        writer acquired the session (a failover, a restore). Nobody took it, so the
        writer may acquire it again (``vanished``); nothing is written or renewed."""
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a")
        assert await store.commit(Commit(KEY, a.epoch, 0, b"h", [Record("h", "x", b"x")], 1)) == 1
        before = await snapshot_of(store)
        ahead = Lease(KEY, "worker-a", a.epoch + 1, a.expires_at)
        with pytest.raises(LeaseLost) as commit:
            await store.commit(Commit(KEY, ahead.epoch, 1, b"h", [Record("h", "y", b"y", "x")], 1))
        assert commit.value.vanished and commit.value.current_epoch == a.epoch
        with pytest.raises(LeaseLost) as renew:
            await store.renew(ahead)
        assert renew.value.vanished and renew.value.current_epoch == a.epoch
        assert await snapshot_of(store) == before

    @pytest.mark.parametrize("ttl", _BAD_SESSION_TTLS, ids=repr)
    async def test_a_session_ttl_must_be_a_finite_positive_number(self, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl") as refused:
            await self.new_store(ttl=ttl)
        assert repr(ttl) in str(refused.value)

    async def test_a_lease_may_not_outlive_its_session(self) -> None:
        store = await self.new_store(ttl=60)
        with pytest.raises(ValueError, match=r"lease ttl 61\b.*session ttl 60"):
            await store.acquire(KEY, "worker-a", ttl=61)
        assert await store.keys() == []  # refused before anything was written
        lease = await store.acquire(KEY, "worker-a", ttl=60)  # as long as the session: fine
        with pytest.raises(ValueError, match=r"lease ttl 61\b.*session ttl 60"):
            await store.renew(lease, ttl=61)
        for bad in (0, -1, float("nan")):
            with pytest.raises(ValueError):
                await store.renew(lease, ttl=bad)
        # a refused renewal extends nothing
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-a", lease.epoch)
        assert info.lease_expires_at == pytest.approx(lease.expires_at, abs=0.01)

    async def test_a_delete_fenced_by_a_lease_taken_over_removes_nothing(self) -> None:
        """A delete under a lease (``delete(key, lease=…)``) removes the session only
        while that lease is current: once another writer took the key over and wrote,
        it is refused with `LeaseLost` and every version stays, listed and loadable."""
        store = await self.new_store()
        a = await store.acquire(KEY, "worker-a")
        assert await store.commit(Commit(KEY, a.epoch, 0, b"h1", [Record("h", "x", b"x")], 1)) == 1
        b = await store.acquire(KEY, "worker-b", takeover=True)
        assert (
            await store.commit(Commit(KEY, b.epoch, 1, b"h2", [Record("h", "y", b"y", "x")], 2))
            == 2
        )
        with pytest.raises(LeaseLost) as lost:
            await store.delete(KEY, lease=a)
        assert not lost.value.vanished and lost.value.current_epoch == b.epoch
        stored = await store.load(KEY)
        assert (stored.version, stored.head) == (2, b"h2")
        assert stored.streams == {"h": [("x", b"x"), ("y", b"y")]}
        assert KEY in await store.keys()
        info = await store.info(KEY)
        assert info is not None and (info.owner, info.epoch) == ("worker-b", b.epoch)
        # a lease of another key is the caller's mistake, refused before anything is read
        other = await store.acquire("room-other", "worker-b")
        with pytest.raises(ValueError, match="room-other"):
            await store.delete(KEY, lease=other)
        assert (await store.load(KEY)).version == 2
        # the current lease deletes, and then there is nothing left to delete
        assert await store.delete(KEY, lease=b) is True
        assert await store.info(KEY) is None and KEY not in await store.keys()
        assert await store.delete(KEY, lease=b) is False
