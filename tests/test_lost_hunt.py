"""Hunt `lost`: ownership (leases, fencing epochs, `LeaseLost`, ``on_lost``) when the
store loses or forgets things, and takeovers at awkward moments.

Real `AgentSession`s driven by the scripted LLM; real stores where it matters: a
``redis-server`` of the test alone persisting nothing (a restart comes back empty, or,
after a ``SAVE``, back at that RDB: a rollback), SQLite files under ``tmp_path`` shared
with a child process killed with SIGKILL; the gated `MemoryStore` of
``test_review17_hunt`` where a window must be entered deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession

import livekit_resume as lr
from livekit_resume.agent_hooks import autosave as autosave_mod
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests import ROOT, child_env
from tests import _child_agent as child
from tests._gated import CountedStore, bounded
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.redis_servers import RedisServer, require_redis_server
from tests.test_hooks import KEY, start
from tests.test_job_policy_adversarial import REGISTRY, Clerk
from tests.test_review14_hunt import begin, said

pytestmark = pytest.mark.filterwarnings("ignore")

WAIT = 8.0


# ------------------------------------------------------------------------ helpers


@pytest.fixture
def bare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, persisting nothing: a restart comes back empty, or
    at the RDB a ``SAVE`` wrote."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


def redis_store(server: RedisServer, namespace: str, **kw: Any) -> Store:
    return lr.open_store(server.url, namespace=namespace, **kw)


async def close_all(
    store: Store,
    resumables: tuple[lr.ResumableSession | None, ...],
    sessions: tuple[AgentSession[Any] | None, ...],
) -> None:
    """The workers' `ResumableSession`s (those started), then their AgentSessions, then
    the store."""
    for r in resumables:
        if r is not None:
            await r.aclose()
    for s in sessions:
        if s is not None:
            await s.aclose()
    await store.aclose()


async def stored_texts(store: Store, key: str = KEY) -> list[str]:
    stored = await store.load(key)
    snap = Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)
    return [
        " ".join(str(c) for c in item["content"])
        for item in snap.history
        if item["type"] == "message"
    ]


def live_texts(session: AgentSession[Any]) -> list[str]:
    return [
        " ".join(str(c) for c in item.content)
        for item in session.history.items
        if item.type == "message"
    ]


async def owner_of(store: Store, key: str = KEY) -> str | None:
    info = await store.info(key)
    return None if info is None else info.owner


async def outcome(aw: Any, timeout: float = WAIT) -> Any:
    """What ``aw`` returned or raised (bounded)."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s")
    except Exception as e:
        return e


# ------------------------------------------ 1. a takeover refused after aclose gave up


async def test_a_takeover_met_by_a_checkpoint_after_acloses_budget_is_lease_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app's `checkpoint()` is on its way (its commit stuck in a slow store); another
    worker takes the call over (``takeover=True``: a newer epoch); the job shuts down:
    `aclose()` waits for the save lock past its close budget, gives up and releases
    (a no-op on the store: the epoch moved). Then the stuck commit reaches the store,
    which refuses it: a takeover.

    checkpoint(): "Raises `LeaseLost` when another worker took the session over".
    What the app sees: ``RuntimeError("... was given up while it was being saved")``
    (session.py `_checkpoint`: ``self._holder.lease is None`` is taken for the session's
    own release), so an app's ``except LeaseLost`` does not run, and it is told its own
    close gave the save up, while another worker holds the call. The new holder's
    lease and conversation are untouched either way (checked too)."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.4)
    store = CountedStore()
    key = f"room-lost-{uuid.uuid4().hex[:8]}"
    lost: list[BaseException] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    session, rs, _ = await begin(store, key, on_lost=on_lost)
    session.history.add_message(role="user", content="my code is 4711")
    store.commit_gate.arm()
    saving = asyncio.ensure_future(rs.checkpoint())
    s2 = make_text_session(ScriptedLLM(default="taken"))
    rs2 = lr.ResumableSession(store, key, registry=REGISTRY, owner="w2", autosave=False)
    try:
        await bounded(store.commit_gate.entered.wait(), "the app's commit")
        agent2 = await bounded(rs2.restore(s2, default=Clerk, takeover=True), "takeover")
        await bounded(s2.start(agent2), "w2 start")
        await bounded(rs.aclose(), "w1's aclose, bounded by its budget")
        assert rs.state == "closed"
        assert await owner_of(store, key) == "w2", "w1's release freed w2's lease"
        store.commit_gate.open()
        got = await outcome(saving)
        await asyncio.sleep(0.05)
        # the new holder goes on
        await bounded(s2.run(user_input="still there?"), "w2 turn")
        await bounded(rs2.checkpoint(), "w2 checkpoint")
        assert await stored_texts(store, key) == live_texts(s2)
        assert "my name is Ada" in said(s2)
    finally:
        store.commit_gate.open()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.gather(saving, return_exceptions=True), 2)
        await rs2.aclose()
        await s2.aclose()
        await session.aclose()
        await store.aclose()
    assert isinstance(got, lr.LeaseLost), (
        f"the app's checkpoint, refused because w2 took the session over, raised "
        f"{got!r} (on_lost: {lost!r})"
    )


async def test_a_checkpoint_after_acloses_release_with_no_takeover_lands_without_a_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """passes: coverage. The same stuck checkpoint, nobody takes over: aclose gives up
    and releases, then the commit lands (same epoch, lease released). It must not bring
    a lease back (the commit renews a held lease only), so another worker restores the
    key at once without ``takeover`` and finds the late words once."""
    monkeypatch.setattr(autosave_mod, "CLOSE_SAVE_BUDGET", 0.4)
    store = CountedStore()
    key = f"room-lost-{uuid.uuid4().hex[:8]}"
    session, rs, _ = await begin(store, key)
    session.history.add_message(role="user", content="my code is 4711")
    store.commit_gate.arm()
    saving = asyncio.ensure_future(rs.checkpoint())
    try:
        await bounded(store.commit_gate.entered.wait(), "the app's commit")
        await bounded(rs.aclose(), "aclose")
        assert await owner_of(store, key) is None
        store.commit_gate.open()
        got = await outcome(saving)
        assert isinstance(got, int), repr(got)
        assert await owner_of(store, key) is None, "a late commit took the lease back"
        s2 = make_text_session(ScriptedLLM(default="back"))
        rs2 = lr.ResumableSession(store, key, registry=REGISTRY, owner="w2", autosave=False)
        agent2 = await bounded(rs2.restore(s2, default=Clerk), "restore, no takeover")
        await bounded(s2.start(agent2), "w2 start")
        assert said(s2).count("my code is 4711") == 1
        await rs2.aclose()
        await s2.aclose()
    finally:
        store.commit_gate.open()
        await session.aclose()
        await store.aclose()


# -------------------------------- 2. a store that forgets: empty, or rolled back


async def test_rolled_back_to_before_a_takeover_the_newer_holder_keeps_the_call(
    bare_redis: RedisServer,
) -> None:
    """w1 holds the call (epoch E1); the server's RDB is taken then (``SAVE``: a
    replica, a backup). w2 takes the call over (E2 > E1) and talks on. The server comes
    back from the RDB (a failover to the lagging replica): it holds E1, owner w1, its
    lease still live by the server's clock.

    DESIGN.md: "a zombie worker can never overwrite the conversation of the worker that
    took over". w2's commit finds the store's epoch older than its own (it lost the
    takeover): w2 reclaims its epoch (`Store.acquire` ``reclaim``), over w1's live
    lease, and writes its conversation whole; w1, the holder w2 took the call from, is
    fenced (`LeaseLost`, not vanished, ``on_lost``). Before the fix w2 acquired without
    takeover, was refused by w1's lease and fenced, its turns since the takeover lost,
    while w1 wrote on under E1."""
    ns = f"l{uuid.uuid4().hex[:8]}"
    store = redis_store(bare_redis, ns)
    lost: list[BaseException] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", on_lost=on_lost)
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        bare_redis.cli("save")  # the replica: E1, w1's lease
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", takeover=True)
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # same port, the RDB of before the takeover
        assert await owner_of(store) == "w1"
        await s2.run(user_input="book me on monday")
        got2 = await outcome(rs2.checkpoint())
        await s1.run(user_input="zombie words")
        got1 = await outcome(rs1.checkpoint())
        texts = await stored_texts(store)
        owner = await owner_of(store)
        await asyncio.sleep(0.05)
        assert isinstance(got2, int) and isinstance(got1, lr.LeaseLost), (
            f"the newer holder w2's checkpoint: {got2!r}; the older w1's: {got1!r}; "
            f"the store holds {texts!r}"
        )
        assert not got1.vanished, repr(got1)
        assert owner == "w2"
        assert texts == live_texts(s2)
        for t in ("my name is Ada", "my code is 4711", "book me on monday"):
            assert texts.count(t) == 1, (t, texts)
        assert "zombie words" not in texts
        assert lost, "w1's on_lost was not told"
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))


async def test_emptied_after_a_takeover_the_newer_holder_writing_first_fences_the_zombie(
    bare_redis: RedisServer,
) -> None:
    """passes: coverage. w2 takes the call over from w1; Redis restarts empty; w2 is the
    first to write: it acquires the vanished session anew and writes it whole; w1's
    next checkpoint is refused (`LeaseLost`, not a vanished session it may take), and
    the store holds w2's conversation, every turn once."""
    ns = f"l{uuid.uuid4().hex[:8]}"
    store = redis_store(bare_redis, ns)
    lost: list[BaseException] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1", on_lost=on_lost)
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", takeover=True)
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # empty
        await s2.run(user_input="book me on monday")
        await bounded(rs2.checkpoint(), "w2's checkpoint")
        await s1.run(user_input="zombie words")
        got1 = await outcome(rs1.checkpoint())
        assert isinstance(got1, lr.LeaseLost) and not got1.vanished, repr(got1)
        texts = await stored_texts(store)
        assert texts == live_texts(s2)
        for t in ("my name is Ada", "my code is 4711", "book me on monday"):
            assert texts.count(t) == 1, (t, texts)
        assert "zombie words" not in texts
        await asyncio.sleep(0.05)
        assert lost, "w1's on_lost was not told"
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))


async def test_emptied_after_a_takeover_the_zombie_writing_first_is_fenced_by_the_newer(
    bare_redis: RedisServer,
) -> None:
    """w2 takes the call over from w1 (w1 has not heard: no renewal since); Redis
    restarts empty; w1, the zombie, writes first. The store forgot both holders, so
    that write lands (w1 reclaims its own epoch E1 on the empty key). w2's next
    checkpoint finds the store at E1, older than its own E2: it reclaims E2 over w1's
    lease and writes its conversation whole, and w1's next write is refused
    (`LeaseLost`, not vanished). DESIGN.md: "a zombie worker can never overwrite the
    conversation of the worker that took over": what the zombie wrote is gone, and the
    store holds w2's conversation, every turn once. Before the fix w1 took the empty
    key under a new epoch from the clock, above E2, and w2 was fenced, its turns since
    the takeover lost."""
    ns = f"l{uuid.uuid4().hex[:8]}"
    store = redis_store(bare_redis, ns)
    s1, rs1, _ = await start(store, ["hello from w1"], owner="w1")
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        s2, rs2, _ = await start(store, ["hello from w2"], owner="w2", takeover=True)
        await s2.run(user_input="my code is 4711")
        await rs2.checkpoint()
        bare_redis.kill()
        bare_redis.start()  # empty
        await s1.run(user_input="zombie words")
        await outcome(rs1.checkpoint())  # lands or not: the store forgot the takeover
        await s2.run(user_input="book me on monday")
        got2 = await outcome(rs2.checkpoint())
        await s1.run(user_input="more zombie words")
        got1 = await outcome(rs1.checkpoint())
        texts = await stored_texts(store)
        assert isinstance(got2, int), f"the newer holder w2: {got2!r}; stored {texts!r}"
        assert isinstance(got1, lr.LeaseLost) and not got1.vanished, repr(got1)
        assert texts == live_texts(s2)
        for t in ("my name is Ada", "my code is 4711", "book me on monday"):
            assert texts.count(t) == 1, (t, texts)
        assert "zombie words" not in texts and "more zombie words" not in texts
    finally:
        await close_all(store, (rs1, rs2), (s1, s2))


# --------------------------------- 3. a stalled Redis: the lease lapses mid-commit


async def test_a_commit_stalled_past_the_lease_then_a_takeover_each_turn_once(
    bare_redis: RedisServer,
) -> None:
    """w1's checkpoint is sent to a Redis stopped (SIGSTOP) with its lease 1.5 s from
    lapsing; the client gives up (0.5 s socket timeout, no retries: `StoreUnavailable`,
    the commit kept pending). The lease lapses; w2 restores with takeover while the
    server is still stopped, then the server runs again and applies both in an order of
    its own. Whatever the order: w1 is refused from then on (`LeaseLost`, ``on_lost``),
    w2's restore holds w1's late turn if and only if the store applied it first, and
    once w2 talks on the store holds w2's conversation, each turn exactly once."""
    ns = f"l{uuid.uuid4().hex[:8]}"
    store1 = redis_store(bare_redis, ns, socket_timeout=0.5, retries=0)
    store2 = redis_store(bare_redis, ns, socket_timeout=3.0, retries=0)
    lost: list[BaseException] = []

    async def on_lost(e: lr.LeaseLost) -> None:
        lost.append(e)

    s1, rs1, _ = await start(store1, ["hello"], owner="w1", lease_ttl=1.5, on_lost=on_lost)
    s2 = rs2 = None
    try:
        await s1.run(user_input="my name is Ada")
        await rs1.checkpoint()
        await s1.run(user_input="my code is 4711")
        bare_redis.pause()
        try:
            first = await outcome(rs1.checkpoint())
            assert isinstance(first, lr.StoreUnavailable), repr(first)
            await asyncio.sleep(1.3)  # the lease lapses (by the server's clock too)
            from tests.test_hooks import Receptionist, Visit, registry

            s2 = AgentSession(llm=ScriptedLLM(["w2"], default="ok"), userdata=Visit(name="x"))
            rs2 = lr.ResumableSession(
                store2,
                KEY,
                registry=registry(),
                userdata_type=Visit,
                owner="w2",
                autosave=False,
            )
            restoring = asyncio.ensure_future(
                rs2.restore(s2, default=lambda: Receptionist(rs2), takeover=True)
            )
            await asyncio.sleep(0.2)
        finally:
            bare_redis.resume()
        agent2 = await bounded(restoring, "w2's takeover")
        await bounded(s2.start(agent2), "w2 start")
        restored_with_late_turn = "my code is 4711" in live_texts(s2)
        again = await outcome(rs1.checkpoint())
        assert isinstance(again, lr.LeaseLost) and not again.vanished, repr(again)
        await s2.run(user_input="book me on monday")
        await bounded(rs2.checkpoint(), "w2 checkpoint")
        texts = await stored_texts(store2)
        assert texts == live_texts(s2)
        for t in ("my name is Ada", "book me on monday"):
            assert texts.count(t) == 1, (t, texts)
        assert texts.count("my code is 4711") == (1 if restored_with_late_turn else 0), texts
        await asyncio.sleep(0.05)
        assert lost, "w1's on_lost was not told"
    finally:
        bare_redis.resume()
        for r in (rs1, rs2):
            if r is not None:
                await r.aclose()
        for s in (s1, s2):
            if s is not None:
                await s.aclose()
        await store1.aclose()
        await store2.aclose()


# ------------------------------------------ 4. renewals racing takeovers (SQLite)


async def test_autosave_renewals_racing_takeovers_fence_the_old_holder(tmp_path: Path) -> None:
    """w1 renews every 0.1 s (lease_ttl 0.3, autosave on) and talks; w2 takes over at a
    random moment, racing a renewal or a commit; then w3 from w2, likewise. Each older
    holder is fenced (``on_lost``, `LeaseLost` on its next checkpoint), never writes
    after the takeover, and the store holds the newest holder's conversation, each turn
    once. Two stores on one SQLite file (two connections, as two processes would)."""
    from tests.test_hooks import Receptionist, Visit, registry

    url = f"sqlite:///{tmp_path}/race.db"
    rng = random.Random(7)
    stores = [lr.open_store(url) for _ in range(3)]
    made: list[tuple[AgentSession[Any], lr.ResumableSession]] = []
    lost: dict[str, list[BaseException]] = {"w1": [], "w2": [], "w3": []}
    try:
        prev_s: AgentSession[Any] | None = None
        prev_rs: lr.ResumableSession | None = None
        for n, owner in enumerate(("w1", "w2", "w3")):

            async def on_lost(e: lr.LeaseLost, owner: str = owner) -> None:
                lost[owner].append(e)

            s: AgentSession[Visit] = AgentSession(
                llm=ScriptedLLM([], default=f"ok from {owner}"), userdata=Visit(name="Ada")
            )
            rs = lr.ResumableSession(
                stores[n],
                KEY,
                registry=registry(),
                userdata_type=Visit,
                owner=owner,
                lease_ttl=0.3,
                debounce=0.01,
                on_lost=on_lost,
            )
            if prev_s is not None:
                assert prev_rs is not None
                chatter: asyncio.Future[Any] = asyncio.ensure_future(
                    prev_s.run(user_input=f"{owner} is coming")
                )
                await asyncio.sleep(rng.uniform(0.0, 0.15))
            agent = await bounded(
                rs.restore(s, default=functools.partial(Receptionist, rs), takeover=True),
                "restore",
            )
            await bounded(s.start(agent), "start")
            made.append((s, rs))
            if prev_s is not None:
                await outcome(chatter)
                await asyncio.sleep(0.3)
                assert prev_rs is not None
                got = await outcome(prev_rs.checkpoint())
                assert isinstance(got, lr.LeaseLost), (prev_rs.key, repr(got))
                assert lost[prev_rs._owner], f"{prev_rs._owner}'s on_lost not told"
            await bounded(s.run(user_input=f"turn of {owner}"), "turn")
            await asyncio.wait_for(rs._autosave.idle.wait(), WAIT)
            prev_s, prev_rs = s, rs
        assert prev_s is not None and prev_rs is not None
        await bounded(prev_rs.checkpoint(), "last checkpoint")
        texts = await stored_texts(stores[0])
        assert texts == live_texts(prev_s)
        for owner in ("w1", "w2", "w3"):
            assert texts.count(f"turn of {owner}") == 1, texts
        assert not lost["w3"]
    finally:
        for s, rs in made:
            await rs.aclose()
            await s.aclose()
        for st in stores:
            await st.aclose()


# ------------------------------ 5. SQLite: the holder killed mid-commit, taken over

_WRITER = r"""
import asyncio, sys
from livekit_resume import ResumableSession, open_store
from tests import _child_agent as child

async def main(url, key):
    store = open_store(url)
    _model, session = child.build_session()
    rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes,
                          debounce=0.0)
    agent = await rs.restore(session, default=child.Scribe)
    await session.start(agent)
    await session.run(user_input="remember fact 1")
    await rs.checkpoint()  # the first commit of a process is slow (cold): not the point
    print("READY", flush=True)
    for n in range(2, 400):
        await session.run(user_input=f"remember fact {n}")
        print(f"SAID {n}", flush=True)
        await asyncio.sleep(0.003)  # autosave keeps up as with a caller's pace

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sqlite_holder_killed_mid_commit_then_taken_over_each_turn_once(
    tmp_path: Path, seed: int
) -> None:
    """A child process talks with autosave on a SQLite file, committing all the time;
    it is killed (SIGKILL) at a random moment, most likely mid-commit. This process
    takes the call over (its lease is live): the conversation it restores is a prefix
    of the child's, every fact once and in order, the userdata's facts the same as the
    history's (one commit is all or nothing); then it talks on and the store holds
    every turn exactly once."""
    url = f"sqlite:///{tmp_path}/x.db"
    key = f"room-kill-{seed}"
    proc = subprocess.Popen(  # noqa: ASYNC220 (read in an executor, as test_cross_process)
        [sys.executable, "-c", _WRITER, url, key],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    loop = asyncio.get_running_loop()
    said_n = 0
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30)
        assert line.strip() == "READY", line + (proc.stderr.read() if proc.stderr else "")
        target = random.Random(seed).randint(8, 14)
        while said_n < target:
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 10)
            assert line.startswith("SAID"), line
            said_n = int(line.split()[1])
        await asyncio.sleep(random.Random(seed).uniform(0.0, 0.02))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    store = lr.open_store(url)
    _model, session = child.build_session()
    rs = lr.ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
    )
    try:
        with pytest.raises(lr.SessionBusy):
            await lr.ResumableSession(
                store, key, registry=child.registry(), userdata_type=child.Notes
            ).restore(child.build_session()[1], default=child.Scribe)
        agent = await bounded(rs.restore(session, default=child.Scribe, takeover=True), "takeover")
        await bounded(session.start(agent), "start")
        users = [t for t in live_texts(session) if t.startswith("remember fact")]
        k = len(users)
        assert users == [f"remember fact {n}" for n in range(1, k + 1)], users
        assert k >= 1, (said_n, rs.version, live_texts(session))
        outputs = [
            str(i.output)
            for i in session.history.items
            if i.type == "function_call_output" and str(i.output).startswith("remembered #")
        ]
        j = len(outputs)
        assert outputs == [f"remembered #{n}: fact {n}" for n in range(1, j + 1)], outputs
        assert j in (k, k - 1), (outputs, users)  # the last turn's tool may not have run
        assert session.userdata.facts == [f"fact {n}" for n in range(1, j + 1)], (
            session.userdata.facts,
            outputs,
        )
        await bounded(session.run(user_input="remember fact after"), "turn")
        await bounded(rs.checkpoint(), "checkpoint")
        texts = await stored_texts(store, key)
        assert texts == live_texts(session)
        ids = [i.id for i in session.history.items]
        assert len(ids) == len(set(ids))
        assert [t for t in texts if t.startswith("remember fact")] == [
            *(f"remember fact {n}" for n in range(1, k + 1)),
            "remember fact after",
        ]
    finally:
        await rs.aclose()
        await session.aclose()
        await store.aclose()
