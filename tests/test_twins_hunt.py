"""Hunt (twins): the two streams a checkpoint writes, ``history`` and ``agent``.

They share item objects: an agent item equal to its history twin is stored as a
reference to it (bridge.is_twin, capture._encoder / _edited / dangling_refs), decoded
through ``by_id`` (codec._items). Item ids are read by `saved_id`, a second item under
one id is saved as ``<id>~2`` (tracker.unique_ids).

Promise (DESIGN.md "Restore must be exact", "save both" streams; docs/snapshots.md):
after every checkpoint the stored latest version decodes, and each stream equals the
live one, item for item (data by `item_to_data`, ids by `unique_ids` of that stream; an
item over the frame limit saved with its output replaced by the documented note). A
checkpoint with nothing new commits nothing (``rs.version`` stays). A new session
restores it all.

Ops are applied within the last few items of each stream (in-place edits further back
than EDIT_WINDOW are a documented limit, not modelled here).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm

import livekit_resume as lr
from livekit_resume.agent_hooks.capture import _OVERSIZE_NOTE
from livekit_resume.agent_hooks.tracker import unique_ids
from livekit_resume.bridge import from_stored
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.memory import MemoryStore
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

KEY = "twins-1"
WAIT = 5.0
RECENT = 8  # ops touch only items this close to the tail of every stream holding them
MAX_FRAME = 8192
BIG = "".join(random.Random(7).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=40_000))


class Alpha(Agent):
    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions="You are alpha.", chat_ctx=chat_ctx)

    @function_tool
    async def lookup(self, ctx: RunContext[Any], what: str) -> str:
        """Look something up."""
        return f"found {what}"


class Beta(Alpha):
    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        Agent.__init__(self, instructions="You are beta.", chat_ctx=chat_ctx)


CALLS = itertools.count(1)


def rule(ctx: llm.ChatContext) -> Any:
    """A tool call for a user turn starting with "tool", else a text reply."""
    last = ctx.items[-1] if ctx.items else None
    if isinstance(last, llm.ChatMessage) and last.role == "user":
        text = last.text_content or ""
        if text.startswith("tool"):
            return [ToolCall("lookup", {"what": text}, call_id=f"llm_call_{next(CALLS)}")]
        return f"reply to {text}"
    return "after the tool"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Alpha)
    reg.register(Beta)
    return reg


def codec() -> Codec:
    return Codec(max_frame=MAX_FRAME)


# ------------------------------------------------------------------ the oracle


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=repr))


def expected(items: list[llm.ChatItem]) -> list[dict[str, Any]]:
    """What the store must hold of a live stream: each item's `item_to_data` under the id
    `unique_ids` gives it; an oversized tool output replaced by the note."""
    out = []
    for item, item_id in zip(items, unique_ids(items), strict=True):
        d = dict(item_to_data(item, media="drop"))
        d["id"] = item_id
        if d.get("type") == "function_call_output" and d.get("output") == BIG:
            d["output"] = _OVERSIZE_NOTE
        if d.get("type") == "message" and BIG in d.get("content", []):
            d["content"] = [_OVERSIZE_NOTE]
        out.append(_plain(d))
    return out


def hist_items(session: AgentSession[Any]) -> list[llm.ChatItem]:
    return session.history.items


def agent_items(session: AgentSession[Any]) -> list[llm.ChatItem]:
    return session.current_agent._chat_ctx.items


def _short(d: dict[str, Any] | None) -> dict[str, str] | None:
    return None if d is None else {k: str(v)[:60] for k, v in d.items()}


def _diff(label: str, want: list[dict[str, Any]], got: list[dict[str, Any]]) -> str:
    lines = [f"{label}: live {len(want)} items, stored {len(got)}"]
    for i in range(max(len(want), len(got))):
        a = want[i] if i < len(want) else None
        b = got[i] if i < len(got) else None
        if a != b:
            lines.append(f"  [{i}] live={_short(a)}\n       stored={_short(b)}")
    return "\n".join(lines)


async def check_stored(store: MemoryStore, session: AgentSession[Any], trace: list[Any]) -> None:
    snap = from_stored(codec(), await asyncio.wait_for(store.load(KEY), WAIT))
    want_h, want_a = expected(hist_items(session)), expected(agent_items(session))
    got_h = [_plain(d) for d in snap.history]
    got_a = [_plain(d) for d in snap.agent.chat_ctx] if snap.agent else []
    assert got_h == want_h, f"trace={trace}\n" + _diff("history", want_h, got_h)
    assert got_a == want_a, f"trace={trace}\n" + _diff("agent", want_a, got_a)


def is_repair(d: dict[str, Any]) -> bool:
    """The "interrupted" output a restore adds for a call without one (DESIGN)."""
    return (
        d.get("type") == "function_call_output"
        and str(d["id"]).endswith("_interrupted")
        and str(d.get("output", "")).startswith("interrupted")
    )


def restored(ds: list[dict[str, Any]], live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ds`` as restored, less the repairs this restore added: one an earlier restore
    added is a live item since, saved and restored as any other."""
    had = {d["id"] for d in live}
    return [d for d in ds if not is_repair(d) or d["id"] in had]


# ------------------------------------------------------------------ the ops


def _eligible(session: AgentSession[Any], where: str) -> list[llm.ChatItem]:
    """Items near the tail of every stream holding them (by identity), not LiveKit's
    instructions message; ``where``: in history ("h"), in the agent ("a"), in both."""
    h, a = hist_items(session), agent_items(session)
    h_tail, a_tail = h[-RECENT:], a[-RECENT:]
    in_h = {id(x) for x in h}
    in_a = {id(x) for x in a}
    tail_h = {id(x) for x in h_tail}
    tail_a = {id(x) for x in a_tail}
    pool = h_tail if where in ("h", "both") else a_tail
    out = []
    for x in pool:
        if str(x.id).startswith("lk."):
            continue
        if id(x) in in_h and id(x) not in tail_h:
            continue
        if id(x) in in_a and id(x) not in tail_a:
            continue
        if where == "both" and not (id(x) in in_h and id(x) in in_a):
            continue
        out.append(x)
    return out


def mutate(item: llm.ChatItem, tag: int) -> None:
    if isinstance(item, llm.ChatMessage):
        item.content = [f"edited {tag}"]
    elif isinstance(item, llm.FunctionCall):
        item.arguments = json.dumps({"edited": tag})
    elif isinstance(item, llm.FunctionCallOutput):
        item.output = f"edited {tag}"
    elif isinstance(item, llm.AgentHandoff):
        item.new_agent_id = f"edited-{tag}"
    elif isinstance(item, llm.AgentConfigUpdate):
        item.instructions = f"edited {tag}"


def copy(item: llm.ChatItem) -> llm.ChatItem:
    """Another object, equal field for field (ops assign fields, never mutate them)."""
    return item.model_copy()


def _replace(stream: list[llm.ChatItem], old: llm.ChatItem, new: llm.ChatItem) -> None:
    for i, x in enumerate(stream):
        if x is old:
            stream[i] = new


class World:
    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.session: AgentSession[Any] | None = None
        self.rs: lr.ResumableSession | None = None
        self.n = 0
        self.turns = 0

    async def start(self) -> None:
        self.session = make_text_session(ScriptedLLM.rule_based(rule))
        self.rs = lr.ResumableSession(
            self.store, KEY, registry=registry(), autosave=False, codec=codec()
        )
        agent = await asyncio.wait_for(self.rs.restore(self.session, default=Alpha), WAIT)
        await asyncio.wait_for(self.session.start(agent), WAIT)

    async def close(self) -> None:
        assert self.rs is not None and self.session is not None
        try:
            await asyncio.wait_for(self.rs.aclose(), WAIT)
        finally:
            await asyncio.wait_for(self.session.aclose(), WAIT)

    def tag(self) -> int:
        self.n += 1
        return self.n

    async def apply(self, op: tuple[Any, ...]) -> None:
        s = self.session
        assert s is not None
        kind = op[0]
        h, a = hist_items(s), agent_items(s)
        streams = {"h": [h], "a": [a], "both": [h, a]}
        if kind in ("turn", "tool_turn"):
            if self.turns >= 8:
                return
            self.turns += 1
            text = f"{'tool' if kind == 'tool_turn' else 'user'} {self.tag()}"
            await asyncio.wait_for(asyncio.ensure_future(s.run(user_input=text)), WAIT)
            return
        if kind == "instructions":
            await asyncio.wait_for(
                s.current_agent.update_instructions(f"instructions {self.tag()}"), WAIT
            )
            return
        if kind == "handoff":
            other = Beta if isinstance(s.current_agent, Alpha) else Alpha
            s.update_agent(other(chat_ctx=s.current_agent.chat_ctx))
            task = s._update_activity_atask
            if task is not None:
                await asyncio.wait_for(asyncio.shield(task), WAIT)
            assert isinstance(s.current_agent, other)
            return
        if kind == "replace_ctx":
            variant, k = op[1], op[2]
            ctx = s.current_agent.chat_ctx.copy()
            if variant == "truncated":
                items = list(ctx.items)
                keep = [x for x in items if str(x.id).startswith("lk.")]
                rest = [x for x in items if not str(x.id).startswith("lk.")]
                ctx = llm.ChatContext(keep + rest[k % (len(rest) + 1) :])
            elif variant == "new_objects":
                ctx = llm.ChatContext([copy(x) for x in ctx.items])
            elif variant == "new_ids":
                fresh = []
                for x in ctx.items:
                    c = copy(x)
                    if not str(x.id).startswith("lk."):
                        c.id = f"new_{self.tag()}"
                    fresh.append(c)
                ctx = llm.ChatContext(fresh)
            await asyncio.wait_for(
                s.current_agent.update_chat_ctx(ctx, exclude_invalid_function_calls=False), WAIT
            )
            return
        if kind == "big":
            where = op[1]
            call_id = f"call_{self.tag()}"
            call = llm.FunctionCall(call_id=call_id, name="lookup", arguments="{}")
            out = llm.FunctionCallOutput(call_id=call_id, name="lookup", output=BIG, is_error=False)
            for stream in streams[where]:
                stream.extend([call, out])
            return
        # ops on one existing item
        where, k = op[1], op[2]
        pool = _eligible(s, where)
        if not pool:
            return
        item = pool[k % len(pool)]
        if kind == "edit_same":  # in place: every stream holding the object sees it
            mutate(item, self.tag())
        elif kind == "edit_copy":  # a copy, edited, in the streams ``where`` names
            c = copy(item)
            mutate(c, self.tag())
            for stream in streams[where]:
                _replace(stream, item, c)
        elif kind == "rename_same":
            item.id = f"renamed_{self.tag()}"
        elif kind == "rename_collide":  # onto another item's id (`unique_ids` tells them apart)
            other = pool[(k // 3 + 1) % len(pool)]
            item.id = other.id
        elif kind == "rename_tilde":  # onto the name `unique_ids` gives a second item
            other = pool[(k // 3 + 1) % len(pool)]
            item.id = f"{other.id}~2"
        elif kind == "rename_unicode":
            item.id = f"ïtem_{self.tag()}"
        elif kind == "edit_big":  # in place, over the frame limit
            if isinstance(item, llm.ChatMessage):
                item.content = [BIG]
            elif isinstance(item, llm.FunctionCallOutput):
                item.output = BIG
        elif kind == "move_to_end":  # the same object, later in the streams named
            for stream in streams[where]:
                if any(x is item for x in stream):
                    stream.remove(item)
                    stream.append(item)
        elif kind == "rename_copy":
            c = copy(item)
            c.id = f"renamed_{self.tag()}"
            for stream in streams[where]:
                _replace(stream, item, c)
        elif kind == "dup_same":
            for stream in streams[where]:
                stream.append(item)
        elif kind == "dup_copy":
            c = copy(item)
            for stream in streams[where]:
                stream.append(c)
        elif kind == "remove":
            for stream in streams[where]:
                for i in range(len(stream) - 1, -1, -1):
                    if stream[i] is item:
                        del stream[i]
                        break
        else:  # pragma: no cover
            raise AssertionError(op)

    async def step(self, trace: list[Any]) -> None:
        """Checkpoint; the stored latest equals both live streams; a second checkpoint
        with nothing new commits nothing."""
        assert self.rs is not None and self.session is not None
        v = await asyncio.wait_for(self.rs.checkpoint(), WAIT)
        assert v == self.rs.version
        await check_stored(self.store, self.session, trace)
        again = await asyncio.wait_for(self.rs.checkpoint(), WAIT)
        assert again == v, f"trace={trace}: a checkpoint with nothing new wrote v{again} > v{v}"


WHERE = st.sampled_from(["h", "a", "both"])
IDX = st.integers(0, 20)
OPS = st.one_of(
    st.just(("turn",)),
    st.just(("turn",)),
    st.just(("tool_turn",)),
    st.just(("restart",)),
    st.just(("instructions",)),
    st.just(("handoff",)),
    st.tuples(
        st.just("replace_ctx"),
        st.sampled_from(["copy", "truncated", "new_objects", "new_ids"]),
        IDX,
    ),
    st.tuples(st.just("big"), WHERE),
    st.tuples(
        st.sampled_from(
            [
                "edit_same",
                "edit_copy",
                "rename_same",
                "rename_copy",
                "rename_collide",
                "rename_tilde",
                "rename_unicode",
                "edit_big",
                "move_to_end",
                "dup_same",
                "dup_copy",
                "remove",
            ]
        ),
        WHERE,
        IDX,
    ),
)


async def run_ops(ops: list[list[tuple[Any, ...]]]) -> None:
    w = World()
    await w.start()
    trace: list[Any] = []
    closed = False
    try:
        await w.step(["start"])
        await w.apply(("turn",))
        trace.append(("turn",))
        await w.step(trace)
        assert w.session is not None
        live_h = expected(hist_items(w.session))
        for group in ops:
            for op in group:
                trace.append(op)
                if op == ("restart",):  # a new process restores, and goes on
                    await w.step(trace)
                    assert w.session is not None
                    live_h = expected(hist_items(w.session))
                    await w.close()
                    turns = w.turns
                    w = World(w.store)
                    await w.start()
                    w.turns, w.n = turns, 1000 * len(trace)
                    assert w.session is not None
                    got = restored(expected(hist_items(w.session)), live_h)
                    assert got[: len(live_h)] == live_h, f"trace={trace}\n" + _diff(
                        "restored history", live_h, got[: len(live_h)]
                    )
                    continue
                await w.apply(op)
            trace.append("checkpoint")
            await w.step(trace)
            assert w.session is not None
            live_h = expected(hist_items(w.session))
        assert w.session is not None
        live_h, live_a = expected(hist_items(w.session)), expected(agent_items(w.session))
        await w.close()
        closed = True
    finally:
        if not closed:
            with contextlib.suppress(Exception):
                await w.close()
    # a new session restores both streams
    w2 = World(w.store)
    await w2.start()
    try:
        assert w2.rs is not None and w2.rs.resumed
        assert w2.session is not None
        # a call left without its output is answered by the documented repair
        got_h = restored(expected(hist_items(w2.session)), live_h)
        assert got_h[: len(live_h)] == live_h, f"trace={trace}\n" + _diff(
            "restored history", live_h, got_h[: len(live_h)]
        )
        got_a = restored(expected(agent_items(w2.session)), live_a)
        ids = {d["id"] for d in live_a}
        got_known = [d for d in got_a if d["id"] in ids]
        got_ids, live_ids = [d["id"] for d in got_a], [d["id"] for d in live_a]
        assert [d["id"] for d in got_known] == live_ids, (
            f"trace={trace}\nrestored agent ids {got_ids} vs live {live_ids}"
        )

        # the instructions message is rewritten by LiveKit at start: compare the rest
        def strip(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [d for d in ds if not str(d["id"]).startswith("lk.")]

        assert strip(got_known) == strip(live_a), f"trace={trace}\n" + _diff(
            "restored agent", strip(live_a), strip(got_known)
        )
    finally:
        await w2.close()


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(st.lists(OPS, min_size=1, max_size=2), max_size=10))
# a call's output removed, then a restart: the restore's repair is a live item from then
# on (the test took it for one to leave out, and failed on a correct store)
@example(ops=[[("tool_turn",)], [("remove", "both", 12), ("restart",)]])
@example(ops=[[("tool_turn",)], [("remove", "a", 12), ("restart",)]])
def test_both_streams_stored_as_live_after_every_checkpoint(
    ops: list[list[tuple[Any, ...]]],
) -> None:
    """DESIGN "Restore must be exact" / "save both": after every checkpoint the stored
    latest decodes to both live streams (data and `unique_ids` ids, shared items stored
    as references), a checkpoint with nothing new commits nothing, and a new session
    restores both streams."""
    asyncio.run(asyncio.wait_for(run_ops(ops), 60))
