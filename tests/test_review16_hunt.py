"""Review hunt of 3660cb6 and 92c08b4 (chat item ids in the checkpoint tracker):
`StreamTracker._diff`, `unique_ids`, `_saved_ids`, `_renamed`, `full`, `saved_id`.

Promises (docs/guide.md, the paragraph on ids; docs/livekit-1.8.9.md; DESIGN.md "Restore
must be exact"): a checkpoint stores the live chat context so that a restore gives it
back; "a second item under an id an earlier one has (an item appended twice, a copy
appended, an id changed to another item's) is saved, and restored, as `<id>~2` (the
least free `~n`) ... once the first is gone, the copy is saved under its own id again";
none of this stops a later checkpoint. The documented limit: "Checkpoints re-check only
the last 12 items for in-place edits ... An id changed further back stays saved under
its old id until something before it changes." A checkpoint with nothing new writes
nothing; the head's seal commits to exactly the items the store holds.

Part 1 is a hypothesis fold test at the tracker level (like tests/test_tracker.py) whose
operations include what apps and LiveKit do to ids. Part 2 replays the minimal failing
sequences on a real AgentSession with `lr.ResumableSession` on a MemoryStore and restores
them in a new AgentSession.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit.agents import llm

import livekit_resume as lr
from livekit_resume.agent_hooks.tracker import EDIT_WINDOW, StreamTracker, unique_ids
from livekit_resume.snapshot.chat import item_from_data, item_to_data, saved_id
from livekit_resume.stores.memory import MemoryStore
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_ids_hunt import Desk, fields, registry, restored
from tests.test_tracker import Replay, encode, msg

WAIT = 5.0
KEY = "room-hunt-review16"

# ------------------------------------------------------------------ the model / oracle


def _uniq(names: list[str]) -> list[str]:
    """`unique_ids`' naming over plain strings."""
    taken = set(names)
    out = list(names)
    seen: set[str] = set()
    for i, name in enumerate(out):
        if name in seen:
            n = 2
            while f"{name}~{n}" in taken:
                n += 1
            name = out[i] = f"{name}~{n}"
            taken.add(name)
        seen.add(name)
    return out


class Model:
    """A tracker under test, the store it writes (a `Replay`) and what the oracle needs
    of the last commit: the objects committed (in order) and the folded state then."""

    def __init__(self) -> None:
        self.tracker = StreamTracker("history")
        self.store = Replay()
        self.committed: list[llm.ChatItem] = []
        self.state: list[dict[str, Any]] = []

    def stale_bound(self, live: list[llm.ChatItem]) -> int:
        """Positions below this may keep what the store held (the documented limit):
        further back than the last EDIT_WINDOW committed items and before the first
        change of the committed prefix (identity first, then equality; a replacement
        equal to the object it replaces is not a change)."""
        old = self.committed
        n_old = len(old)
        if len(live) >= n_old and live[:n_old] == old:
            first = n_old
        else:
            first = next(
                (i for i, (a, b) in enumerate(zip(live, old, strict=False)) if a is not b),
                min(n_old, len(live)),
            )
        return min(first, n_old - EDIT_WINDOW)

    def commit(self, live: list[llm.ChatItem], whole: bool, where: str) -> None:
        bound = 0 if whole else self.stale_bound(live)
        plan = (self.tracker.full if whole else self.tracker.diff)(live, item_to_data)
        change = plan.build(encode)
        self.store.records.extend(change.records)
        self.tracker.accept(change)
        state = self.store.state()  # the fold and decode never fail
        check(live, state, self.state, bound, change.count, where)
        # the seal the head commits to is the seal of what the store holds
        recomputed = StreamTracker("history").index(state).seal
        assert self.tracker.seal == recomputed, f"{where}: seal differs from the folded state's"
        for d in state:
            item_from_data(d)  # a restore takes every item
        # nothing changed since: a second diff writes nothing
        again = self.tracker.diff(live, item_to_data).build(encode)
        assert again.records == [], (where, [(r.id, r.after) for r in again.records])
        self.committed = list(live)
        self.state = state


def check(
    live: list[llm.ChatItem],
    state: list[dict[str, Any]],
    prev: list[dict[str, Any]],
    bound: int,
    count: int,
    where: str,
) -> None:
    """The store's folded state against the live items: unique ids, the head's count,
    each position the live item's data under `unique_ids`' id, except below ``bound``
    where the store may keep what it held (then it must be exactly that)."""
    ids = [d["id"] for d in state]
    assert len(set(ids)) == len(ids), f"{where}: the store holds an id twice: {ids}"
    assert count == len(state), f"{where}: head count {count}, store holds {len(state)}: {ids}"
    assert len(state) == len(live), (where, ids, [i.id for i in live])
    want = unique_ids(live)
    datas = [item_to_data(it) for it in live]
    kept = [
        i < bound
        and i < len(prev)
        and state[i] == prev[i]
        and state[i] != {**datas[i], "id": want[i]}
        for i in range(len(live))
    ]
    # with a far-back item still saved under its old id, a later item may be saved under
    # the id that one has live (it is not a second item in the store): also accepted
    view = _uniq([prev[i]["id"] if kept[i] else saved_id(live[i].id) for i in range(len(live))])
    for i, d in enumerate(state):
        if kept[i]:
            continue
        ok = {**datas[i], "id": want[i]}
        alt = {**datas[i], "id": view[i]}
        assert d in (ok, alt), (
            f"{where}: position {i} (bound {bound}) stores {d!r}, live is {ok!r}; "
            f"stored ids {ids}, live ids {[it.id for it in live]}"
        )


# ------------------------------------------------------------------ operations

OPS = [
    "append",
    "insert_mid",  # LiveKit inserts an interrupted reply before the barge-in
    "remove",
    "remove_first_dup",
    "rename_recent",
    "rename_far",
    "take_other_id",
    "take_retired_id",  # a new item taking an id renamed away
    "rename_odd",  # an app's id that is not ASCII text: an int, None, non-ASCII text
    "append_same",
    "append_copy",
    "truncate",
    "edit_recent",
    "edit_far",
    "edit_shared",  # a shallow copy shares its content list
    "replace",
    "full",
    "noop",
]

ops_strategy = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(min_value=0, max_value=10_000)),
    min_size=1,
    max_size=30,
)


def apply(op: str, n: int, live: list[llm.ChatItem], fresh: Any, retired: list[str]) -> bool:
    """Apply ``op`` to ``live``; True when the next commit must be a whole rewrite."""
    size = len(live)
    recent = size - 1 - n % min(size, EDIT_WINDOW) if size else 0
    if op == "append":
        live.append(msg(next(fresh)))
    elif op == "insert_mid":
        live.insert(n % (size + 1), msg(next(fresh)))
    elif op == "full":
        return True
    elif not live:
        return False
    elif op == "remove":
        live.pop(n % size)
    elif op == "remove_first_dup":
        seen: set[str] = set()
        for it in live:
            if it.id in seen:
                first = next(k for k, x in enumerate(live) if x.id == it.id)
                live.pop(first)
                break
            seen.add(it.id)
    elif op in ("rename_recent", "rename_far"):
        item = live[recent if op == "rename_recent" else n % size]
        retired.append(item.id)
        item.id = f"renamed_{next(fresh)}"
    elif op == "rename_odd":
        item = live[n % size]
        retired.append(saved_id(item.id))
        odd: Any = [n, None, f"\u00fc{n}", f"{n}"][n % 4]  # "12" after 12 is like int 12
        item.id = odd
    elif op == "take_other_id":
        live[n % size].id = live[(n // 7) % size].id
    elif op == "take_retired_id" and retired:
        m = msg(next(fresh))
        m.id = retired[n % len(retired)]
        live.append(m)
    elif op == "append_same":
        live.append(live[n % size])
    elif op == "append_copy":
        live.append(live[n % size].model_copy())
    elif op == "truncate" and size > 2:
        del live[: n % (size - 1)]
    elif op in ("edit_recent", "edit_far"):
        item = live[recent if op == "edit_recent" else n % size]
        assert isinstance(item, llm.ChatMessage)
        item.content = [f"edited {n}"]
    elif op == "edit_shared":
        item = live[n % size]
        assert isinstance(item, llm.ChatMessage)
        item.content.append(f"more {n}")
    elif op == "replace":
        i = n % size  # LiveKit's _upsert_item: a new object under the same id
        live[i] = live[i].model_copy(update={"content": [f"replaced {n}"]})
    return False


def run_ops(ops: list[tuple[str, int]], start: int, commit_every: int = 1) -> Model:
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(start)]
    fresh = iter(range(1000, 100_000))
    retired: list[str] = []
    model.commit(live, False, "initial commit")
    whole = False
    for step, (op, n) in enumerate(ops):
        whole = apply(op, n, live, fresh, retired) or whole
        if step % commit_every == 0 or whole:
            model.commit(live, whole, f"after op #{step} {op}({n})")
            whole = False
    model.commit(live, False, "final commit")
    return model


# ------------------------------------------------------------------ part 1: property


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=ops_strategy,
    start=st.integers(min_value=0, max_value=30),
    commit_every=st.integers(min_value=1, max_value=3),
)
def test_store_holds_the_live_context_up_to_the_documented_far_back_limit(
    ops: list[tuple[str, int]], start: int, commit_every: int
) -> None:
    """guide.md (ids) and livekit-1.8.9.md: after every commit the folded store decodes,
    holds unique ids, one record per live item (the head's count), each live item's data
    in live order under `unique_ids(live)`'s id, except an item further back than the
    last 12 committed and before the first change, which may keep exactly what the store
    held; a second diff writes nothing; the seal equals one recomputed from the store."""
    run_ops(ops, start, commit_every)


# ------------------------------------------------------------------ part 1b: minimal cases


def test_two_renames_one_far_back_one_in_the_window_in_one_checkpoint() -> None:
    """livekit-1.8.9.md: an id changed further back than 12 items "stays saved under its
    old id until something before it changes"; an id changed in the window is seen. Both
    at once (items 10 and 20 of 30): the store must hold 30 items with unique ids."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    live[10].id = "R10"
    live[20].id = "R20"
    model.commit(live, False, "two renames")


def test_far_back_rename_committed_then_a_rename_in_the_window() -> None:
    """Same, one op per checkpoint (hypothesis' shape): rename item 10 of 30 (not seen,
    documented), commit; rename item 20 (in the window), commit. The store must still hold
    one record per live item, and the head's seal/count must match it."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    live[10].id = "R10"
    model.commit(live, False, "far-back rename")
    live[20].id = "R20"
    model.commit(live, False, "rename in the window")


def test_far_back_rename_then_a_removal_in_the_window() -> None:
    """A far-back rename (item 5 of 30) then the removal of item 15: the diff's first
    change is 15, its window [3, 15) holds the renamed item, read again: it must be
    rewritten under its new id in place of the old (or kept as it was), never both."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    live[5].id = "R5"
    model.commit(live, False, "far-back rename")
    del live[15]
    model.commit(live, False, "removal")


def test_far_back_edit_then_in_window_rename_is_seen_or_kept_but_consistent() -> None:
    """A far-back in-place content edit (documented as not seen) and then a rename in the
    window: the store stays one record per item (exactness up to the limit)."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    item = live[3]
    assert isinstance(item, llm.ChatMessage)
    item.content = ["edited far back"]
    model.commit(live, False, "far-back edit")
    live[25].id = "R25"
    model.commit(live, False, "rename in the window")


def test_far_back_rename_then_new_item_takes_its_old_id_then_first_removed() -> None:
    """guide.md: "a new item taking an id renamed away far back" no longer stops later
    checkpoints; the store keys by id, so the two must not fold into one."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    live[2].id = "R2"
    model.commit(live, False, "far-back rename")
    m = msg(500)
    m.id = "item_2"
    live.append(m)
    model.commit(live, False, "old id taken")
    del live[0]
    model.commit(live, False, "front removed")


def test_duplicate_appended_then_far_back_rename_to_the_copy_id() -> None:
    """An item appended twice (saved as `<id>~2`), then an item far back renamed to the
    copy's `<id>~2` name: the names must stay unique in the store."""
    model = Model()
    live: list[llm.ChatItem] = [msg(i) for i in range(30)]
    model.commit(live, False, "initial")
    live.append(live[28])
    model.commit(live, False, "appended twice")
    live[4].id = "item_28~2"
    model.commit(live, False, "far-back rename to the copy name")
    live.append(msg(600))
    model.commit(live, False, "append")


def test_hypothesis_minimal_rename_far_then_rename_last() -> None:
    """Hypothesis' minimal case: 13 items; item 0 (just beyond the window) renamed,
    commit; the last item renamed, commit. The store must hold 13 records."""
    run_ops([("rename_far", 0), ("rename_recent", 0)], start=13, commit_every=1)


def test_hypothesis_minimal_take_other_id_far_back_and_rename_last() -> None:
    """Hypothesis' minimal case: 14 items committed; the last renamed and item 1 given
    item 0's id, one commit. The log must fold (it held 'item_0' placed after 'item_0':
    SnapshotCorrupt on every restore)."""
    run_ops([("append", 0), ("rename_recent", 0), ("take_other_id", 1)], start=13, commit_every=2)


def test_hypothesis_minimal_take_other_id_reorders() -> None:
    """Hypothesis' minimal case: 15 items; the last renamed and item 2 given item 0's id,
    one commit. The store must keep the live order (it moved item_0 after item_1)."""
    run_ops([("append", 0), ("rename_recent", 0), ("take_other_id", 2)], start=14, commit_every=2)


# ------------------------------------------------------------------ part 2: real sessions


class Live:
    def __init__(self, session: Any, rs: lr.ResumableSession, agent: Any) -> None:
        self.session, self.rs, self.agent = session, rs, agent

    async def turn(self, text: str) -> None:
        await asyncio.wait_for(asyncio.ensure_future(self.session.run(user_input=text)), WAIT)

    async def checkpoint(self) -> None:
        await asyncio.wait_for(self.rs.checkpoint(), WAIT)

    @property
    def items(self) -> list[llm.ChatItem]:
        items: list[llm.ChatItem] = self.session.history.items
        return items

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.rs.aclose(), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.session.aclose(), WAIT)


async def begin(store: MemoryStore) -> Live:
    session = make_text_session(ScriptedLLM([f"reply {i}" for i in range(30)]))
    rs = lr.ResumableSession(store, KEY, registry=registry(), autosave=False)
    agent = await asyncio.wait_for(rs.restore(session, default=Desk), WAIT)
    await asyncio.wait_for(session.start(agent), WAIT)
    return Live(session, rs, agent)


@pytest.fixture
async def mem() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.aclose()


async def restore_new_process(store: MemoryStore) -> list[llm.ChatItem]:
    """What a new AgentSession restores (restore must succeed), history items."""
    lv = await begin(store)
    try:
        return list(lv.items)
    finally:
        await lv.close()


def same_up_to_limit(live: list[llm.ChatItem], got: list[llm.ChatItem], far: set[int]) -> None:
    """``got`` is ``live`` item for item; at the positions in ``far`` (renamed further back
    than the window: the documented limit) the id may be the old one."""
    live_d = [fields(i) for i in live]
    got_d = [fields(i) for i in got[: len(live)]]
    assert len(got) >= len(live), ([i.id for i in got], [i.id for i in live])
    for k, (a, b) in enumerate(zip(live_d, got_d, strict=True)):
        if k in far:
            a, b = {**a, "id": None}, {**b, "id": None}
        assert a == b, (k, a, b)


async def test_e2e_far_back_rename_then_rename_of_the_last_item_restores(mem: MemoryStore) -> None:
    """DESIGN.md "Restore must be exact", up to livekit-1.8.9.md's limit (an id changed
    further back than 12 items stays saved under its old id). A real session: 8 turns,
    checkpoint; the app renames an item far back, checkpoint; then the last item,
    checkpoint. A new AgentSession must restore (no SnapshotCorrupt) the history."""
    lv = await begin(mem)
    for k in range(8):
        await lv.turn(f"turn {k}")
    await lv.checkpoint()
    n = len(lv.items)
    assert n > EDIT_WINDOW + 2, n
    far = n - EDIT_WINDOW - 1  # just beyond the last 12 committed items
    lv.items[far].id = "renamed_far_back"
    await lv.checkpoint()
    lv.items[-1].id = "renamed_last"
    await lv.checkpoint()
    live = list(lv.items)
    hist, _ = await restored(mem, KEY)  # as a restore decodes it (the live one holds the lease)
    await lv.close()
    got = await restore_new_process(mem)
    assert len(hist) == len(live), ([i.id for i in hist], [i.id for i in live])
    same_up_to_limit(live, got, {far})


async def test_e2e_far_back_item_takes_its_neighbours_id_and_last_renamed_restores(
    mem: MemoryStore,
) -> None:
    """guide.md (ids): an id changed to another item's is saved as `<id>~2` and never
    stops checkpoints or restores; livekit-1.8.9.md: further back than 12 items the old id
    may stay. A real session: 8 turns, checkpoint; the item just beyond the window given
    the id of the one before it and the last item renamed, one checkpoint; a new
    AgentSession must restore the history in order."""
    lv = await begin(mem)
    for k in range(8):
        await lv.turn(f"turn {k}")
    await lv.checkpoint()
    far = len(lv.items) - EDIT_WINDOW - 1  # just beyond the last 12 committed items
    lv.items[far].id = lv.items[far - 1].id
    lv.items[-1].id = "renamed_last"
    await lv.checkpoint()
    live = list(lv.items)
    await lv.close()
    got = await restore_new_process(mem)
    same_up_to_limit(live, got, {far})
