"""A model-based stateful test of the `Store` protocol, run over every backend of
``STORE_FACTORIES``: hypothesis drives 2-3 writers over 1-2 keys through acquisitions
(with and without takeover), renewals, releases, commits (appends, in-place edits,
moves, deletes, cleared streams, bursts long enough to compact), commits whose reply was
lost and the same commit sent again, fenced and unfenced deletes, and a controllable
clock that expires leases and sessions. A plain model (`Model`) says what the contract
of stores/base.py makes each call return or refuse, and after every step each retained
version, the version list, `info` and `keys` are read back and compared with it.

CI runs 30 derandomized examples per backend; ``RESUME_SOAK=N`` (as for the fault
suite) runs N times as many per backend with random seeds.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from livekit_resume.errors import LeaseLost, SessionBusy, SnapshotNotFound
from livekit_resume.stores.base import Commit, KeyPages, Lease, Record, Store, Stored
from livekit_resume.stores.log import TOMBSTONE_TTL
from livekit_resume.testing.conformance._model import Items, apply_record, nonempty
from tests.conftest import STORE_FACTORIES, StoreFactory

T = TypeVar("T")

InfoDict = dict[str, str | int | float | bool | None]

# Times are T0 plus multiples of 1/512 s: exact in binary, so a float survives every
# store's round trip, and each step moves the clock past a microsecond (epochs of a
# session created again start from the clock in microseconds: see log.epoch_floor).
T0 = 1_700_000_000.0
TICK = 1 / 512
LEASE_TTL = 100.0
# Redis expires keys on the server's own clock (PEXPIRE): long enough to never happen
# during a run, so that only the injected clock expires sessions.
SESSION_TTL = 1000.0
STREAMS = ("chat", "tools")
OWNERS = ("w0", "w1", "w2")
# The second key holds what Redis must escape: braces (its hash tag), "%" (the escape
# itself), SCAN's glob characters, a colon (its separator) and a non-ASCII letter.
KEYS = ("k0", "k1:{x}%7D*?[ü")
DATA = st.one_of(st.binary(max_size=6), st.sampled_from([b"", b"@", b"@3:abc", b"\x00\xff"]))

# as the fault suite's: RESUME_SOAK=N multiplies the examples; past 1, seeds are random
SOAK = max(1, int(os.environ.get("RESUME_SOAK", "1") or "1"))
SETTINGS = settings(
    max_examples=30 * SOAK,
    stateful_step_count=40 if SOAK > 1 else 30,
    deadline=None,
    derandomize=SOAK == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class MVersion:
    version: int
    epoch: int
    created_at: float
    head: bytes
    streams: Items
    info: InfoDict
    commit_id: str
    size: int


@dataclass
class MSession:
    """What the contract says one live session holds."""

    epoch: int
    touched: float
    owner: str | None = None
    lease_expires: float | None = None
    head: int = 0
    versions: list[MVersion] = field(default_factory=list)  # retained, oldest first


@dataclass
class Sent:
    """A commit a writer sent, and the streams it leaves."""

    commit: Commit
    streams: Items


@dataclass
class View:
    """One writer's idea of one key: its lease, the version it builds on and what that
    version holds, and the last commit it sent (to send again)."""

    lease: Lease | None = None
    base: int = 0
    streams: Items = field(default_factory=dict)
    last: Sent | None = None


Outcome = tuple[str, Any]  # ("ok", value) or ("raise", exception type)


class Model:
    """The contract of stores/base.py, over a clock the test controls."""

    def __init__(self, keep: int, ttl: float | None) -> None:
        self.keep, self.ttl = keep, ttl
        self.now = T0
        self.sessions: dict[str, MSession] = {}
        self.max_epoch: dict[str, int] = {}  # every epoch handed out, across lives
        self.tombstones: dict[str, tuple[int, float]] = {}  # a delete's: (epoch, until)

    def tombstone(self, key: str) -> int | None:
        epoch, until = self.tombstones.get(key, (0, 0.0))
        return epoch if until > self.now else None

    def live(self, key: str) -> MSession | None:
        s = self.sessions.get(key)
        if s is not None and self.ttl is not None and s.touched + self.ttl <= self.now:
            del self.sessions[key]
            return None
        return s

    def lease_live(self, s: MSession) -> bool:
        return s.lease_expires is not None and s.lease_expires > self.now

    def keys(self) -> list[str]:
        return sorted(k for k in list(self.sessions) if self.live(k) is not None)

    def acquire(self, key: str, owner: str, takeover: bool) -> Outcome:
        s = self.live(key)
        if s is None:
            s = MSession(epoch=int(self.now * 1_000_000), touched=self.now)
            new = True  # above the tombstone, which stays for its day
        else:
            new = False
        live = self.lease_live(s)
        if live and s.owner == owner:
            epoch = s.epoch
        elif live and s.owner is not None and not takeover:
            return ("raise", SessionBusy)
        else:
            epoch = -1  # a new one: the store's answer, checked to be newer
        if new:
            self.sessions[key] = s
        return ("ok", epoch)

    def acquired(self, key: str, owner: str, epoch: int) -> None:
        s = self.sessions[key]
        s.epoch, s.owner, s.lease_expires, s.touched = epoch, owner, self.now + LEASE_TTL, self.now
        self.max_epoch[key] = max(self.max_epoch.get(key, 0), epoch)

    def current(self, lease: Lease) -> MSession | None:
        s = self.live(lease.key)
        if s is None or s.epoch != lease.epoch or s.owner != lease.owner:
            return None
        return s

    def commit(self, c: Commit, streams: Items) -> Outcome:
        """("ok", version) (landing it, or a retry of it) or ("raise", LeaseLost)."""
        s = self.live(c.key)
        if s is None or s.epoch != c.epoch:
            return ("raise", LeaseLost)
        if c.base_version != s.head:
            top = s.versions[-1] if s.versions else None
            if (
                c.commit_id
                and top
                and top.version == c.base_version + 1
                and top.commit_id == c.commit_id
            ):
                if self._renew_by(s, c):
                    s.touched = self.now  # renewed "as renew would": renew touches
                return ("ok", top.version)
            return ("raise", LeaseLost)
        written = len(c.head) + sum(len(r.data or b"") for r in c.records)
        s.head += 1
        s.versions.append(
            MVersion(
                s.head,
                c.epoch,
                self.now,
                c.head,
                nonempty(streams),
                dict(c.info),
                c.commit_id,
                written,
            )
        )
        del s.versions[: -self.keep]
        s.touched = self.now
        self._renew_by(s, c)
        return ("ok", s.head)

    def _renew_by(self, s: MSession, c: Commit) -> bool:
        """`Commit.lease_ttl`: a held lease (an owner recorded) is renewed."""
        if c.lease_ttl is not None and s.owner is not None:
            s.lease_expires = self.now + c.lease_ttl
            return True
        return False

    def delete(self, key: str, lease: Lease | None) -> Outcome:
        s = self.live(key)
        if s is None:
            return ("ok", False)
        if lease is not None and (s.epoch != lease.epoch or s.owner != lease.owner):
            return ("raise", LeaseLost)
        del self.sessions[key]
        self.tombstones[key] = (max(s.epoch, int(self.now * 1_000_000)), self.now + TOMBSTONE_TTL)
        return ("ok", True)


PICK = st.integers(0, 5)  # which writer, key or live key: modulo the candidates
KINDS = ("append", "append", "edit", "move", "remove", "clear", "gone")
# Edits and moves lengthen the log without adding items: a burst of them compacts it.
CHURN = ("append", "edit", "edit", "edit", "move", "move", "remove")


def ops(
    n: int, kinds: tuple[str, ...] = KINDS
) -> st.SearchStrategy[list[tuple[str, str, int, bytes]]]:
    """Raw choices of ``n`` records: (kind, stream, pick, data); `records` resolves
    them against the streams as they stand record after record."""
    kind = st.sampled_from(kinds)
    return st.lists(
        st.tuples(kind, st.sampled_from(STREAMS), st.integers(0, 50), DATA),
        min_size=n,
        max_size=n,
    )


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def new(self) -> str:
        self.n += 1
        return f"i{self.n}"


def records(
    streams: Items, choices: list[tuple[str, str, int, bytes]], ids: Ids
) -> tuple[list[Record], Items]:
    """Records built against ``streams`` (a writer's view) and the streams they leave."""
    out = {name: list(items) for name, items in streams.items()}
    recs: list[Record] = []
    for kind, stream, pick, data in choices:
        order = [i for i, _ in out.get(stream, [])]
        if kind in ("edit", "move", "remove") and not order:
            kind = "append"
        if kind == "append":
            rec = Record(stream, ids.new(), data, order[-1] if order else None)
        elif kind == "edit":
            idx = pick % len(order)
            rec = Record(stream, order[idx], data, order[idx - 1] if idx else None)
        elif kind == "move":
            item = order[pick % len(order)]
            others = [i for i in order if i != item]
            after = None if not others or pick % 3 == 0 else others[pick % len(others)]
            rec = Record(stream, item, data, after)
        elif kind == "remove":
            rec = Record(stream, order[pick % len(order)], None)
        elif kind == "clear":
            rec = Record(stream, "", None)
        else:  # the removal of an item that does not exist: nothing happens
            rec = Record(stream, f"gone{pick}", None)
        apply_record(out, rec)
        recs.append(rec)
    return recs, out


def _machine(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> type[Any]:
    build = STORE_FACTORIES[kind]

    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store: Store | None = None
            self.model = Model(1, None)
            self.owners: tuple[str, ...] = ()
            self.keys: tuple[str, ...] = ()
            self.views: dict[tuple[str, str], View] = {}
            self.ids = Ids()
            self.commits = 0
            self.epochs_seen: set[tuple[str, int]] = set()

        # -- plumbing -------------------------------------------------------------

        def run(self, coro: Awaitable[T]) -> T:
            return self.loop.run_until_complete(_wrap(coro))

        def expect(self, what: str, coro: Awaitable[Any], outcome: Outcome) -> Any:
            status, value = outcome
            try:
                got = self.run(coro)
            except (LeaseLost, SessionBusy) as e:
                assert status == "raise" and isinstance(e, value), (
                    f"{what}: the model expected {outcome}, the store raised {e!r}"
                )
                return e
            assert status == "ok", f"{what}: the model expected {value.__name__}, got {got!r}"
            return got

        @property
        def s(self) -> Store:
            assert self.store is not None
            return self.store

        def clock(self) -> float:
            return self.model.now

        def step(self) -> None:
            self.model.now += TICK

        def teardown(self) -> None:
            try:
                if self.store is not None:
                    self.run(self.store.aclose())
            finally:
                self.loop.close()

        # -- rules ----------------------------------------------------------------

        @initialize(
            keep=st.integers(1, 3),
            ttl=st.sampled_from([None, SESSION_TTL]),
            n_keys=st.integers(1, len(KEYS)),
            n_owners=st.integers(2, len(OWNERS)),
        )
        def setup(self, keep: int, ttl: float | None, n_keys: int, n_owners: int) -> None:
            self.model = Model(keep, ttl)
            self.keys, self.owners = KEYS[:n_keys], OWNERS[:n_owners]
            self.views = {(o, k): View() for o in self.owners for k in self.keys}
            options: dict[str, Any] = {"keep": keep, "ttl": ttl, "clock": self.clock}
            self.store = self.run(build(request, tmp_path, **options))

        def pick(self, i: int, pairs: list[tuple[str, str]]) -> tuple[str, str, View]:
            """The ``i``-th of ``pairs`` (round and round). Every draw of the machine has
            a shape that does not depend on its state: a race's outcome varies from run
            to run on a real server, and hypothesis must be able to replay a draw."""
            owner, key = pairs[i % len(pairs)]
            return owner, key, self.views[(owner, key)]

        def pairs(self) -> list[tuple[str, str]]:
            return [(o, k) for o in self.owners for k in self.keys]

        def holders(self) -> list[tuple[str, str]]:
            """Writers that believe they hold a lease (some of them no longer do)."""
            return [p for p, v in self.views.items() if v.lease is not None]

        def current(self) -> list[tuple[str, str]]:
            """Writers whose lease the model says is current."""
            return [p for p, v in self.views.items() if v.lease and self.model.current(v.lease)]

        def refresh(self, key: str, view: View) -> None:
            """The writer loads the key's latest version (as a worker does on acquiring)."""
            s = self.model.live(key)
            top = s.versions[-1] if s and s.versions else None
            view.base = top.version if top else 0
            view.streams = {n: list(i) for n, i in (top.streams if top else {}).items()}

        @rule(i=PICK, takeover=st.booleans())
        def acquire(self, i: int, takeover: bool) -> None:
            self.step()
            owner, key, view = self.pick(i, self.pairs())
            before = self.model.live(key)
            old_epoch = before.epoch if before else None
            outcome = self.model.acquire(key, owner, takeover)
            got = self.expect(
                f"acquire({key}, {owner}, takeover={takeover})",
                self.s.acquire(key, owner, ttl=LEASE_TTL, takeover=takeover),
                outcome,
            )
            if not isinstance(got, Lease):
                return
            assert (got.key, got.owner) == (key, owner)
            assert math.isclose(got.expires_at, self.model.now + LEASE_TTL, abs_tol=1e-6)
            if outcome[1] == -1:  # a new epoch: newer than any this key ever handed out
                floor = max(self.model.max_epoch.get(key, 0), old_epoch or 0)
                assert got.epoch > floor, f"acquire gave epoch {got.epoch}, not above {floor}"
                assert (key, got.epoch) not in self.epochs_seen
            else:
                assert got.epoch == outcome[1], f"a renewal by acquire changed the epoch: {got}"
            self.epochs_seen.add((key, got.epoch))
            self.model.acquired(key, owner, got.epoch)
            view.lease = got
            self.refresh(key, view)

        @rule(i=PICK)
        def renew(self, i: int) -> None:
            self.step()
            if not self.holders():
                return
            owner, key, view = self.pick(i, self.holders())
            assert view.lease is not None
            s = self.model.current(view.lease)
            got = self.expect(
                f"renew({view.lease})",
                self.s.renew(view.lease, ttl=LEASE_TTL),
                ("raise", LeaseLost) if s is None else ("ok", None),
            )
            if s is not None:
                assert got == Lease(key, owner, view.lease.epoch, self.model.now + LEASE_TTL)
                s.lease_expires, s.touched = self.model.now + LEASE_TTL, self.model.now
                view.lease = got

        @rule(i=PICK)
        def release(self, i: int) -> None:
            self.step()
            if not self.holders():
                return
            _, _, view = self.pick(i, self.holders())
            assert view.lease is not None
            self.run(self.s.release(view.lease))
            s = self.model.current(view.lease)
            if s is not None:
                s.owner, s.lease_expires = None, None

        def send(self, key: str, view: View, sent: Sent, heard: bool) -> None:
            c = sent.commit
            before = self.model.live(key)
            outcome = self.model.commit(c, sent.streams)
            got = self.expect(
                f"commit(epoch={c.epoch}, base={c.base_version}, id={c.commit_id!r})",
                self.s.commit(c),
                outcome,
            )
            if isinstance(got, LeaseLost):
                _check_lost(got, c, before, self.model.tombstone(key))
            if isinstance(got, int):
                assert got == outcome[1]
                if heard:
                    view.base = got
                    view.streams = {n: list(i) for n, i in sent.streams.items()}

        def commit_of(
            self, view: View, key: str, choices: list[tuple[str, str, int, bytes]], **kw: Any
        ) -> Sent:
            assert view.lease is not None
            recs, after = records(view.streams, choices, self.ids)
            self.commits += 1
            n = self.commits
            size = sum(len(items) for items in after.values())
            info: InfoDict = {"n": n, "w": view.lease.owner, "f": 0.5, "b": n % 2 == 0}
            if n % 5 == 0:
                info["z"] = None
            commit = Commit(
                key,
                view.lease.epoch,
                view.base,
                f"head {n}".encode() + bytes([n % 256]),
                tuple(recs),
                size,
                info,
                **kw,
            )
            return Sent(commit, after)

        def write(
            self,
            pairs: list[tuple[str, str]],
            i: int,
            choices: list[tuple[str, str, int, bytes]],
            lease_ttl: float | None,
            heard: bool,
            no_id: bool,
        ) -> None:
            self.step()
            if not pairs:
                return
            owner, key, view = self.pick(i, pairs)
            cid = "" if no_id else f"{owner}-{self.commits + 1}"
            sent = self.commit_of(view, key, choices, commit_id=cid, lease_ttl=lease_ttl)
            view.last = sent
            self.send(key, view, sent, heard)

        @rule(
            i=PICK,
            choices=st.integers(0, 3).flatmap(ops),
            lease_ttl=st.sampled_from([None, LEASE_TTL]),
            heard=st.booleans(),
            no_id=st.integers(0, 9),
        )
        def commit(
            self,
            i: int,
            choices: list[tuple[str, str, int, bytes]],
            lease_ttl: float | None,
            heard: bool,
            no_id: int,
        ) -> None:
            """A commit of 0-3 records by any writer that believes it holds its lease;
            ``heard=False``: its reply was lost (the writer learns nothing and may send it
            again). One in ten has no commit_id."""
            self.write(self.holders(), i, choices, lease_ttl, heard, no_id == 0)

        @rule(
            i=PICK,
            choices=st.integers(1, 3).flatmap(ops),
            lease_ttl=st.sampled_from([None, LEASE_TTL]),
            heard=st.sampled_from([True, True, False]),
        )
        def commit_current(
            self,
            i: int,
            choices: list[tuple[str, str, int, bytes]],
            lease_ttl: float | None,
            heard: bool,
        ) -> None:
            """A commit by a writer whose lease is current (it lands unless its view is
            behind the head)."""
            self.write(self.current(), i, choices, lease_ttl, heard, False)

        @rule(i=PICK, choices=st.integers(30, 80).flatmap(lambda n: ops(n, CHURN)))
        def burst(self, i: int, choices: list[tuple[str, str, int, bytes]]) -> None:
            """Many records at once: edits and moves grow the log past compaction."""
            self.write(self.current(), i, choices, None, True, False)

        def race_call(self, data: st.DataObject, kind: str) -> Call | None:
            """One call of a race, or None when nobody can make it."""
            i, takeover = data.draw(PICK), data.draw(st.booleans())
            choices = data.draw(st.integers(0, 3).flatmap(ops))
            if kind in ("commit", "renew", "release", "fenced delete"):
                pairs = self.current() if kind == "commit" else self.holders()
                if not pairs:
                    return None
                owner, key, view = self.pick(i, pairs)
                assert view.lease is not None
                if kind == "commit":
                    sent = self.commit_of(
                        view, key, choices, commit_id=f"{owner}-r{self.commits + 1}"
                    )
                    return Call(kind, owner, key, view, sent=sent)
                return Call(kind, owner, key, view, lease=view.lease)
            owner, key, view = self.pick(i, self.pairs())
            return Call(kind, owner, key, view, takeover=takeover)

        @rule(
            data=st.data(),
            kinds=st.lists(st.sampled_from(RACES), min_size=2, max_size=2),
        )
        def race(self, data: st.DataObject, kinds: list[str]) -> None:
            """Two calls in flight at once (commits, acquisitions, renewals, releases,
            deletes): the store must answer as if it ran them one after the other, in
            one order or the other."""
            self.step()
            calls = [c for c in (self.race_call(data, k) for k in kinds) if c is not None]
            results = self.run(_together([c.start(self.s) for c in calls]))
            fits = []
            for order in itertools.permutations(range(len(calls))):
                model = copy.deepcopy(self.model)
                if all(calls[i].fits(model, results[i]) for i in order):
                    fits.append(model)
            assert fits, f"no order of {calls} explains what the store answered: {results}"
            if len(fits) > 1:  # the answers fit both orders: the store's state tells which
                seen = self.run(self.sessions_seen())
                fits = [m for m in fits if _sessions_of(m, self.keys) == seen] or fits[:1]
            self.model = fits[0]
            for call, result in zip(calls, results, strict=True):
                if isinstance(result, Lease):
                    self.epochs_seen.add((call.key, result.epoch))
                    call.view.lease = result
                    if call.kind == "acquire":
                        self.refresh(call.key, call.view)
                elif isinstance(result, int) and not isinstance(result, bool):
                    assert call.sent is not None
                    call.view.base = result
                    call.view.streams = {n: list(i) for n, i in call.sent.streams.items()}
                if call.sent is not None:
                    call.view.last = call.sent

        @rule(i=PICK)
        def send_again(self, i: int) -> None:
            """A writer's last commit sent again, unchanged (its reply was lost)."""
            self.step()
            sent = [p for p, v in self.views.items() if v.last]
            if not sent:
                return
            _, key, view = self.pick(i, sent)
            assert view.last is not None
            self.send(key, view, view.last, True)

        @rule(i=PICK)
        def reload(self, i: int) -> None:
            self.step()
            if not self.holders():
                return
            _, key, view = self.pick(i, self.holders())
            self.refresh(key, view)

        @rule(i=PICK, fenced=st.sampled_from([True, True, False]))
        def delete(self, i: int, fenced: bool) -> None:
            """A delete of a live key, fenced by the lease of a writer that believes it
            holds it, or not fenced."""
            self.step()
            live = self.model.keys()
            if not live:
                return
            pairs = [p for p in self.holders() if p[1] in live] if fenced else []
            if pairs:
                _, key, view = self.pick(i, pairs)
                lease = view.lease
            else:
                key, lease = live[i % len(live)], None
            self.expect(
                f"delete({key}, lease={lease})",
                self.s.delete(key, lease=lease),
                self.model.delete(key, lease),
            )

        @rule(seconds=st.sampled_from([0.5, 30.0, LEASE_TTL, LEASE_TTL + 1, 2 * LEASE_TTL]))
        def wait(self, seconds: float) -> None:
            """Time passes: leases (and, over many waits, sessions) expire."""
            self.step()
            self.model.now += seconds

        @rule()
        def sessions_expire(self) -> None:
            self.step()
            if self.model.ttl is not None:
                self.model.now += self.model.ttl

        async def sessions_seen(self) -> list[tuple[int, str | None, int] | None]:
            infos = [await self.s.info(key) for key in self.keys]
            return [None if i is None else (i.epoch, i.owner, i.version) for i in infos]

        # -- what must hold after every step --------------------------------------

        @invariant()
        def matches_model(self) -> None:
            if self.store is None:
                return
            self.run(self.check())

        async def check(self) -> None:
            store, model = self.s, self.model
            keys = await store.keys()
            assert keys == model.keys(), "keys() differs from the live sessions"
            if isinstance(store, KeyPages):
                paged: list[str] = []
                cursor: str | None = None
                while True:
                    page, cursor = await store.keys_page("", cursor, 1)
                    paged += page
                    if cursor is None:
                        break
                assert paged == keys, "keys_page, a key at a time, differs from keys()"
                assert (await store.keys_page("k1", None, None))[0] == [
                    k for k in keys if k.startswith("k1")
                ]
            for key in self.keys:
                s = model.live(key)
                info = await store.info(key)
                listed = await store.versions(key)
                if s is None:
                    assert info is None, f"{key}: info of a session that is gone: {info}"
                    assert listed == []
                    await _not_found(store.load(key))
                    continue
                assert info is not None, f"{key}: info is None, the session lives"
                live = model.lease_live(s)
                want_info = (
                    s.epoch,
                    s.owner if live else None,
                    s.head,
                    s.versions[-1].info if s.versions else {},
                )
                assert (info.epoch, info.owner, info.version, info.info) == want_info, key
                if live:
                    assert info.lease_expires_at is not None and s.lease_expires is not None
                    assert math.isclose(info.lease_expires_at, s.lease_expires, abs_tol=1e-6)
                else:
                    assert info.lease_expires_at is None, f"{key}: {info}"
                if model.ttl is not None:
                    assert info.expires_at is not None
                    assert math.isclose(info.expires_at, s.touched + model.ttl, abs_tol=1e-6)
                    # validate_lease_ttl: a lease never outlives the session's data
                    if info.lease_expires_at is not None:
                        assert info.lease_expires_at <= info.expires_at, f"{key}: {info}"
                got = [(v.version, v.epoch, v.info) for v in listed]
                assert got == [(v.version, v.epoch, v.info) for v in s.versions], key
                for v, seen in zip(s.versions, listed, strict=True):
                    assert math.isclose(seen.created_at, v.created_at, abs_tol=1e-6)
                    assert seen.size == v.size, f"{key} v{v.version}: size {seen.size}"
                if not s.versions:
                    await _not_found(store.load(key))
                    continue
                latest = await store.load(key)
                _same(latest, s.versions[-1])
                for v in s.versions[:-1]:
                    _same(await store.load(key, v.version), v)
                await _not_found(store.load(key, s.head + 1))
                if s.versions[0].version > 1:
                    await _not_found(store.load(key, s.versions[0].version - 1))

    return StoreMachine


RACES = ("commit", "commit", "acquire", "renew", "release", "delete", "fenced delete")


@dataclass
class Call:
    """One call of a race, and whether its answer fits a model that ran it just now."""

    kind: str
    owner: str
    key: str
    view: View
    sent: Sent | None = None
    lease: Lease | None = None
    takeover: bool = False

    def start(self, store: Store) -> Awaitable[Any]:
        if self.kind == "commit":
            assert self.sent is not None
            return store.commit(self.sent.commit)
        if self.kind == "acquire":
            return store.acquire(self.key, self.owner, ttl=LEASE_TTL, takeover=self.takeover)
        if self.kind == "delete":
            return store.delete(self.key)
        assert self.lease is not None
        if self.kind == "renew":
            return store.renew(self.lease, ttl=LEASE_TTL)
        if self.kind == "release":
            return store.release(self.lease)
        return store.delete(self.key, lease=self.lease)

    def fits(self, m: Model, got: Any) -> bool:
        """Whether ``got`` is what the contract answers on ``m`` (which it then updates)."""
        if self.kind == "commit":
            assert self.sent is not None
            want = m.commit(self.sent.commit, self.sent.streams)
        elif self.kind == "acquire":
            before = m.live(self.key)
            floor = max(m.max_epoch.get(self.key, 0), before.epoch if before else 0)
            want = m.acquire(self.key, self.owner, self.takeover)
            if want[0] == "ok":
                if not isinstance(got, Lease) or not (
                    got.epoch > floor if want[1] == -1 else got.epoch == want[1]
                ):
                    return False
                m.acquired(self.key, self.owner, got.epoch)
                return True
        elif self.kind in ("delete", "fenced delete"):
            want = m.delete(self.key, self.lease if self.kind == "fenced delete" else None)
        else:
            assert self.lease is not None
            s = m.current(self.lease)
            if self.kind == "release":
                if s is not None:
                    s.owner, s.lease_expires = None, None
                return got is None
            if s is None:
                return isinstance(got, LeaseLost)
            s.lease_expires, s.touched = m.now + LEASE_TTL, m.now
            return isinstance(got, Lease) and got.epoch == self.lease.epoch
        if want[0] == "raise":
            return isinstance(got, want[1])
        return not isinstance(got, BaseException) and got == want[1]


def _sessions_of(m: Model, keys: tuple[str, ...]) -> list[tuple[int, str | None, int] | None]:
    """What `StoreMachine.sessions_seen` reads of a store in the state of ``m``."""
    out: list[tuple[int, str | None, int] | None] = []
    for key in keys:
        s = m.live(key)
        out.append(None if s is None else (s.epoch, s.owner if m.lease_live(s) else None, s.head))
    return out


async def _together(calls: list[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _check_lost(e: LeaseLost, c: Commit, s: MSession | None, tombstone: int | None) -> None:
    """What a refused commit's `LeaseLost` says (stores/base.py's errors)."""
    if s is None and tombstone is not None and c.epoch <= tombstone:
        assert e.current_epoch == tombstone and not e.vanished, f"deleted under it: {e!r}"
    elif s is None:
        assert e.vanished, f"a commit to a session that is gone: {e!r}"
    elif s.epoch != c.epoch:
        assert e.current_epoch == s.epoch and not e.vanished, repr(e)
    else:  # the head moved ahead: another writer shares this lease
        assert s.head > c.base_version and e.current_epoch == c.epoch and not e.vanished, repr(e)


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


async def _not_found(coro: Awaitable[Stored]) -> None:
    try:
        got = await coro
    except SnapshotNotFound:
        return
    raise AssertionError(f"loaded version {got.version}, which the model does not retain")


def _same(stored: Stored, v: MVersion) -> None:
    got = (stored.version, stored.epoch, stored.head, nonempty(stored.streams), stored.info)
    assert got == (v.version, v.epoch, v.head, v.streams, v.info), (
        f"version {v.version} loads as {got}, the model says {v}"
    )
    assert math.isclose(stored.created_at, v.created_at, abs_tol=1e-6)


@pytest.mark.parametrize("kind", list(STORE_FACTORIES))
def test_store_model(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The model-based machine, over one backend."""
    run_state_machine_as_test(_machine(kind, request, tmp_path), settings=SETTINGS)


async def test_a_retry_that_renews_the_lease_renews_the_session(make_store: StoreFactory) -> None:
    """A retry that finds its commit landed renews the lease "as `Store.renew` would"
    (`Commit.lease_ttl`), and renew moves the session's expiry too: the lease must not
    outlive the session (`validate_lease_ttl`), or the holder's next commit, within its
    lease, finds the session gone. Found while modelling `Commit.lease_ttl` for the
    machine above (whose invariant checks that a lease never outlives its session)."""
    now = [T0]
    store = await make_store(ttl=10.0, clock=lambda: now[0])
    lease = await store.acquire("k", "a", ttl=5.0)
    sent = Commit("k", lease.epoch, 0, b"h1", (), 0, {}, commit_id="c1", lease_ttl=5.0)
    assert await store.commit(sent) == 1
    now[0] = T0 + 8
    assert await store.commit(sent) == 1  # its reply was lost: the lease runs to T0 + 13
    info = await store.info("k")
    assert info is not None and info.lease_expires_at == T0 + 13
    assert info.expires_at is not None and info.expires_at >= T0 + 13
    now[0] = T0 + 11  # the lease holds: so must the session
    assert await store.commit(Commit("k", lease.epoch, 1, b"h2", (), 0, {}, commit_id="c2")) == 2


async def test_a_session_created_again_never_reissues_an_epoch_a_worker_may_hold(
    make_store: StoreFactory,
) -> None:
    """A session deleted and created again must not hand out an epoch of its former life:
    a worker that held one (its lease taken over, then the session removed) would commit
    into the new session. Epochs of a new session start from the clock: in milliseconds,
    three takeovers within a millisecond were enough; the floor is in microseconds now,
    and each takeover is a store transaction, far longer than one."""
    now = [T0]
    store = await make_store(clock=lambda: now[0])
    leases = [await store.acquire("k", f"w{n}", ttl=60.0, takeover=True) for n in range(4)]
    stale = leases[-1]  # the last holder before the delete
    assert [lease.epoch for lease in leases] == list(range(leases[0].epoch, stale.epoch + 1))
    assert await store.delete("k")
    now[0] = T0 + 0.001  # a millisecond later, the key starts a new life
    again = [await store.acquire("k", f"v{n}", ttl=60.0, takeover=True) for n in range(4)]
    assert stale.epoch not in {lease.epoch for lease in again}
    with pytest.raises(LeaseLost):
        await store.commit(Commit("k", stale.epoch, 0, b"h", (), 0, {}))
    info = await store.info("k")
    assert info is not None and info.version == 0 and info.epoch == again[-1].epoch
