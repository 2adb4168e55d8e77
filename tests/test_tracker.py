"""The checkpoint diff: whatever LiveKit does to a context, the folded records equal it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.agents import llm

from livekit_resume.agent_hooks.tracker import EDIT_WINDOW, Change, StaleChange, StreamTracker
from livekit_resume.snapshot.chat import item_from_data, item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.seal import pack_item
from livekit_resume.stores.base import Record, fold_records

CODEC = Codec()


def encode(data: dict[str, Any], _digest: bytes, packed: bytes) -> bytes:
    return CODEC.encode_item("k", "history", data, packed=packed)


def decoded(streams: dict[str, list[tuple[str, bytes]]]) -> list[dict[str, Any]]:
    return [CODEC.unpack(b)[1] for _, b in streams.get("history", [])]


class Replay:
    """What a store holds: every committed record, folded on demand."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def state(self) -> list[dict[str, Any]]:
        return decoded(fold_records(self.records))


def msg(n: int) -> llm.ChatMessage:
    return llm.ChatMessage(id=f"item_{n}", role="user", content=[f"text {n}"], created_at=n)


ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "append",
                "insert",
                "remove",
                "replace",
                "replace_equal",
                "edit_recent",
                "edit_nested",
                "truncate",
                "noop",
            ]
        ),
        st.integers(min_value=0, max_value=1000),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, commit_every=st.integers(min_value=1, max_value=4))
def test_folded_records_always_equal_the_live_context(
    ops: list[tuple[str, int]], commit_every: int
) -> None:
    tracker = StreamTracker("history")
    store = Replay()
    live: list[llm.ChatItem] = [msg(i) for i in range(3)]
    fresh = iter(range(100, 10_000))
    for step, (op, n) in enumerate(ops):
        if op == "append":
            live.append(msg(next(fresh)))
        elif op == "insert":
            live.insert(n % (len(live) + 1), msg(next(fresh)))
        elif op == "remove" and live:
            live.pop(n % len(live))
        elif op == "replace" and live:
            i = n % len(live)  # LiveKit's _upsert_item: a new object under the same id
            live[i] = live[i].model_copy(update={"content": [f"replaced {n}"]})
        elif op == "replace_equal" and live:
            i = n % len(live)  # an upsert of an equal copy: another object, same data
            live[i] = live[i].model_copy(deep=True)
        elif op == "truncate" and len(live) > 2:
            del live[: n % (len(live) - 1)]  # app-side truncation: the oldest items go
        elif op == "edit_nested" and live:
            # in place, below the item's fields: a list grown (a realtime transcript),
            # a dict entry set, two levels down
            i = len(live) - 1 - n % min(len(live), EDIT_WINDOW)
            item = live[i]
            assert isinstance(item, llm.ChatMessage)
            if n % 2:
                item.content.append(f"more {n}")
            else:
                item.extra.setdefault("note", {})["level"] = n
        elif op == "edit_recent" and live:
            # in place, within the window LiveKit edits (metrics, a final transcript)
            i = len(live) - 1 - n % min(len(live), EDIT_WINDOW)
            item = live[i]
            assert isinstance(item, llm.ChatMessage)
            item.metrics = {"e2e_latency": float(n)}
        if step % commit_every == 0:
            # now and then the whole stream is written anew (a store that lost the
            # session, a salvage): later diffs build on it like on any commit
            whole = op == "noop" and n % 2 == 0
            plan = (tracker.full if whole else tracker.diff)(live, item_to_data)
            change = plan.build(encode)
            store.records.extend(change.records)
            tracker.accept(change)
            assert store.state() == [item_to_data(i) for i in live]
    change = tracker.diff(live, item_to_data).build(encode)
    store.records.extend(change.records)
    assert store.state() == [item_to_data(i) for i in live]
    assert [item_from_data(d).id for d in store.state()] == [i.id for i in live]


def test_an_unchanged_context_writes_nothing() -> None:
    tracker = StreamTracker("history")
    live: list[llm.ChatItem] = [msg(i) for i in range(50)]
    tracker.accept(tracker.diff(live, item_to_data).build(encode))
    assert tracker.diff(live, item_to_data).build(encode).records == []


def test_appending_writes_only_the_new_items() -> None:
    tracker = StreamTracker("history")
    live: list[llm.ChatItem] = [msg(i) for i in range(500)]
    tracker.accept(tracker.diff(live, item_to_data).build(encode))
    live += [msg(900), msg(901)]
    records = tracker.diff(live, item_to_data).build(encode).records
    assert [(r.id, r.after) for r in records] == [
        ("item_900", "item_499"),
        ("item_901", "item_900"),
    ]


def test_a_second_item_under_one_id_is_saved_as_id_2_until_the_first_goes() -> None:
    tracker = StreamTracker("history")
    store = Replay()

    def commit(change: Change) -> None:
        store.records.extend(change.records)
        tracker.accept(change)

    live: list[llm.ChatItem] = [msg(i) for i in range(20)]
    commit(tracker.diff(live, item_to_data).build(encode))
    live.append(msg(3).model_copy(update={"content": ["a copy"]}))
    commit(tracker.diff(live, item_to_data).build(encode))
    saved = [item_to_data(i) for i in live]
    saved[-1]["id"] = "item_3~2"
    assert store.state() == saved
    # nothing changed: nothing written, the copy is not read anew as a rename
    assert tracker.diff(live, item_to_data).build(encode).records == []
    live.append(msg(40))
    commit(tracker.diff(live, item_to_data).build(encode))
    assert store.state() == [*saved, item_to_data(msg(40))]
    del live[3]  # the first goes: the copy is saved under its own id
    commit(tracker.diff(live, item_to_data).build(encode))
    assert store.state() == [item_to_data(i) for i in live]
    assert tracker.diff(live, item_to_data).build(encode).records == []


def test_a_whole_rewrite_clears_what_the_store_held_and_writes_every_item_in_order() -> None:
    tracker = StreamTracker("history")
    store = Replay()
    live: list[llm.ChatItem] = [msg(i) for i in range(20)]
    first = tracker.diff(live, item_to_data).build(encode)
    store.records.extend(first.records)
    tracker.accept(first)
    stale = item_to_data(msg(500))  # a record the store holds that the live context lacks
    frame = encode(stale, b"", pack_item(stale))
    store.records.append(Record("history", "item_500", frame, None))
    live = [*live[5:], msg(99)]
    change = tracker.full(live, item_to_data).build(encode)
    store.records.extend(change.records)
    tracker.accept(change)
    assert store.state() == [item_to_data(i) for i in live]
    assert tracker.diff(live, item_to_data).build(encode).records == []


def test_a_change_applies_only_onto_the_state_it_was_read_from() -> None:
    tracker = StreamTracker("history")
    live: list[llm.ChatItem] = [msg(i) for i in range(5)]
    stale = tracker.diff(live, item_to_data).build(encode)
    tracker.accept(tracker.diff(live, item_to_data).build(encode))
    with pytest.raises(StaleChange, match="another state"):
        tracker.accept(stale)
    # a change that writes the stream whole applies onto any state
    store = Replay()
    live.append(msg(9))
    whole = tracker.full(live, item_to_data).build(encode)
    tracker.accept(tracker.diff(live, item_to_data).build(encode))
    tracker.accept(whole)
    store.records.extend(whole.records)
    assert store.state() == [item_to_data(i) for i in live]
    assert tracker.diff(live, item_to_data).build(encode).records == []


def test_a_plan_holds_the_items_as_they_were_read() -> None:
    # the plan is read on the event loop and may be encoded on a worker thread: an
    # edit made in between reaches the next checkpoint, not a torn one
    tracker = StreamTracker("history")
    store = Replay()
    live: list[llm.ChatItem] = [msg(i) for i in range(3)]
    plan = tracker.diff(live, item_to_data)
    item = live[-1]
    assert isinstance(item, llm.ChatMessage)
    before = item_to_data(item)
    item.content = ["edited meanwhile"]
    change = plan.build(encode)
    store.records.extend(change.records)
    tracker.accept(change)
    assert store.state()[-1] == before
    change = tracker.diff(live, item_to_data).build(encode)
    store.records.extend(change.records)
    assert store.state() == [item_to_data(i) for i in live]


def test_an_edit_inside_a_model_inside_an_item_is_written() -> None:
    """The edit window compares each recent item with a frozen copy taken when it was
    read: an edit in place one model down (an image in a message's content) is seen."""
    image = llm.ImageContent(image="https://example.com/a.png", inference_detail="auto")
    item = llm.ChatMessage(id="item_img", role="user", content=["look", image], created_at=1)
    tracker = StreamTracker("history")
    tracker.accept(tracker.diff([item], item_to_data).build(encode))
    assert tracker.diff([item], item_to_data).build(encode).records == []
    image.inference_detail = "high"
    change = tracker.diff([item], item_to_data).build(encode)
    assert [r.id for r in change.records] == ["item_img"]
    assert CODEC.unpack(change.records[0].data or b"")[1] == item_to_data(item)
    tracker.accept(change)
    assert tracker.diff([item], item_to_data).build(encode).records == []
