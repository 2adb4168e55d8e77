"""A model-based test of the session-level API: seeded random walks of two workers
(two `ResumableSession`s, each on its own real `AgentSession` driven by the scripted
LLM) over one key of one store (memory, SQLite, a real ``redis-server``).

The walk mixes user turns (plain, a tool that changes userdata, handoffs both ways),
``checkpoint()``, workers with and without autosave, ``pause()`` / ``resume()``,
``suspend()`` then ``restore()`` (into a new `ResumableSession`, into the same one with
a new `AgentSession`, or into the same closed `AgentSession`), ``aclose()``, ``end()``
and a restore after it, userdata changed in place, a "crash" (a live worker abandoned
without closing it) and takeovers (``takeover=True``) of a live or crashed holder.

The model (`Saved`) is the last state the store acknowledged: what a ``checkpoint``,
``pause``, ``suspend``, ``end`` or ``aclose`` of the lease holder returned for, or what
autosave committed (read once it is idle). After every step:

- the stored head decodes to exactly the model (history items field for field but their
  ``metrics``, agent id, userdata, saved state) and its version never goes down;
- a fenced worker changes nothing stored (its saves are refused with `LeaseLost`);
- a restore fills ``session.history`` with exactly the model's items, in order, rebuilds
  the model's agent (with its saved context) and userdata, or starts afresh (no snapshot,
  or an ended conversation);
- an operation raises only what the model predicts: the typed errors of
  `livekit_resume.errors`, or `RuntimeError` where the state forbids the call.

Each walk's steps are printed with its seed when it fails. ``RESUME_SOAK=N`` runs N
times as many walks per store, with other seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from pydantic import BaseModel

import livekit_resume as lr
from livekit_resume.bridge import from_stored, session_codec
from livekit_resume.errors import LeaseLost, ResumeError, SessionBusy, SnapshotNotFound
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.stores.base import Store
from tests.conftest import STORE_FACTORIES
from tests.lk.scripted_llm import Reply, ScriptedLLM, ToolCall, make_text_session

SOAK = max(1, int(os.environ.get("RESUME_SOAK", "1") or "1"))
WALKS = 4 * SOAK  # per store
STEPS = 45
KINDS = ["memory", "sqlite", "redis"]
# one step's bound: far above what any step takes (milliseconds); a hang fails the walk
STEP_DEADLINE = 15.0
DEBOUNCE = 0.01
SLOW_CHUNK = 0.01  # seconds between two-word chunks of a slow reply
# Short leases: a holder without autosave (which renews every third of it) lets its
# lease lapse within a walk, and another worker then acquires it without a takeover.
# Not shorter: the model takes an autosave holder's lease for held, and on a loaded CI
# machine (a full collection of a long-lived test process's heap, two cores shared by
# Redis Clusters) a renewal came 0.3 s late once, the lease of 0.45 s lapsed and another
# worker's restore was granted.
LEASE_TTL = 0.9
# how far from a lease's expiry the model dares say whether it is held (the loop, a
# store round trip, Redis's clock: all well inside it)
MARGIN = 0.15

# fields LiveKit edits in place after an item is added and the hooks need not follow
_UNCOMPARED = ("metrics",)


class Visit(BaseModel):
    name: str = ""
    day: str | None = None


class Front(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def book(self, ctx: RunContext[Visit], day: str) -> str:
        """Book a visit on a day."""
        ctx.userdata.day = day
        return f"booked {day}"

    @function_tool
    async def to_back(self, ctx: RunContext[Visit]) -> tuple[Agent, str]:
        """Hand the caller to the back office."""
        return Back(), "to the back office"


class Back(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the back office.")

    @function_tool
    async def to_front(self, ctx: RunContext[Visit]) -> tuple[Agent, str]:
        """Hand the caller back to the front desk."""
        return Front(), "to the front desk"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(Back)
    return reg


def _rule(ctx: llm.ChatContext) -> Any:
    """The LLM: a user's command becomes its tool call, anything else is echoed."""
    last = ctx.items[-1] if ctx.items else None
    if last is not None and last.type == "message" and last.role == "user":
        text = last.text_content or ""
        call_id = f"call_{uuid.uuid4().hex[:10]}"  # unique across workers' LLMs
        if text.startswith("book "):
            return [ToolCall("book", {"day": text[5:]}, call_id=call_id)]
        if text == "transfer back":
            return [ToolCall("to_back", call_id=call_id)]
        if text == "transfer front":
            return [ToolCall("to_front", call_id=call_id)]
        if text.startswith("slow "):
            # streamed over ~80 ms: another operation lands while it is being said
            words = " ".join(f"{text[5:]}-w{i}" for i in range(16))
            return Reply(text=words, chunk_delay=SLOW_CHUNK)
        return f"you said {text}"
    return "done"


Item = dict[str, Any]


def _compared(data: Item) -> Item:
    return {k: v for k, v in data.items() if k not in _UNCOMPARED}


def live_items(items: list[llm.ChatItem]) -> list[Item]:
    return [_compared(item_to_data(i)) for i in items]


def stored_items(items: list[Item]) -> list[Item]:
    return [_compared(dict(i)) for i in items]


def _brief(items: list[Item]) -> list[str]:
    out = []
    for i in items:
        text = i.get("content") or i.get("output") or i.get("name") or i.get("new_agent_id")
        out.append(f"{i['id']}:{i['type']}:{text!r}")
    return out


@dataclass
class Saved:
    """What the store acknowledged last."""

    version: int
    history: list[Item]
    agent: str | None
    agent_ctx: list[Item]
    userdata: dict[str, Any]
    state: str


Status = Literal["active", "paused", "suspended", "ended", "closed", "crashed"]


@dataclass
class Worker:
    name: str
    rs: lr.ResumableSession
    session: AgentSession[Visit]
    autosave: bool
    status: Status = "active"
    fenced: bool = False
    lost: list[LeaseLost] = field(default_factory=list)
    sessions: list[AgentSession[Visit]] = field(default_factory=list)
    wrote_fenced: bool = False  # its autosave had something to write once fenced
    # the lease was last renewed (acquired, or committed under) between these two times
    renewed: tuple[float, float] = (0.0, 0.0)

    @property
    def running(self) -> bool:
        return self.status in ("active", "paused")


class WalkFailed(AssertionError):
    pass


class Walk:
    def __init__(self, store: Store, key: str, seed: int) -> None:
        self.store = store
        self.key = key
        self.seed = seed
        self.rng = random.Random(seed)
        self.registry = registry()
        self.codec = session_codec(store, None)
        self.saved: Saved | None = None
        self.ended = False  # the stored conversation ended: a restore starts afresh
        self.holder: Worker | None = None
        self.slots: dict[str, Worker | None] = {"A": None, "B": None}
        self.all: list[Worker] = []
        self.trace: list[str] = []
        self.top_version = 0
        self.made = 0

    # ------------------------------------------------------------------ plumbing

    def log(self, line: str) -> None:
        self.trace.append(line)

    def fail(self, msg: str) -> WalkFailed:
        steps = "\n  ".join(self.trace)
        return WalkFailed(f"seed {self.seed}, key {self.key!r}: {msg}\nsteps:\n  {steps}")

    def check(self, cond: bool, msg: str) -> None:
        if not cond:
            raise self.fail(msg)

    async def call(
        self, what: str, coro: Awaitable[Any], expect: type[BaseException] | None
    ) -> Any:
        """Run ``coro``; it must return when ``expect`` is None, else raise ``expect``.
        Anything else (an untyped error, the wrong typed one) fails the walk."""
        try:
            got = await asyncio.wait_for(_awaited(coro), STEP_DEADLINE)
        except (ResumeError, RuntimeError) as e:
            if expect is not None and isinstance(e, expect):
                self.log(f"    -> raised {type(e).__name__} as expected")
                return e
            raise self.fail(f"{what}: expected {_name(expect)}, raised {e!r}") from e
        except Exception as e:
            raise self.fail(f"{what}: raised an undocumented {e!r}") from e
        if expect is not None:
            raise self.fail(f"{what}: expected {_name(expect)}, returned {got!r}")
        self.log(f"    -> {got!r}")
        return got

    async def settle(self) -> None:
        """Every worker's autosave has nothing left to write; what the holder's wrote
        becomes the model."""
        for w in self.all:
            if w.running or w.status == "crashed":
                try:
                    await asyncio.wait_for(w.rs._autosave.idle.wait(), STEP_DEADLINE)
                except TimeoutError as e:
                    raise self.fail(f"autosave of {w.name} never became idle") from e
        await asyncio.sleep(0)  # on_lost runs in a task of its own
        for w in self.all:
            if w.wrote_fenced:
                self.check(
                    bool(w.lost) and w.rs._autosave.lost is not None,
                    f"{w.name}'s autosave was refused as fenced, on_lost never ran",
                )
        h = self.holder
        if h is not None and h.running and h.autosave and not h.fenced:
            model_version = self.saved.version if self.saved else 0
            if h.rs.version != model_version:
                self.check(
                    h.rs.version > model_version,
                    f"autosave of {h.name} went back to version {h.rs.version}",
                )
                self.acknowledge(h, h.rs.version)

    def acknowledge(self, w: Worker, version: int, state: str | None = None) -> None:
        """``w``'s live session, as it is now, is what the store holds at ``version``."""
        session = w.session
        agent = session.current_agent
        data = session.userdata.model_dump()
        self.saved = Saved(
            version=version,
            history=live_items(session.history.items),
            agent=self.registry.id_of(agent),
            agent_ctx=live_items(agent.chat_ctx.items),
            userdata=data,
            state=state or ("paused" if w.status == "paused" else "active"),
        )
        self.ended = state == "ended"

    async def check_store(self) -> None:
        try:
            stored = await self.store.load(self.key)
        except SnapshotNotFound:
            self.check(self.saved is None, f"nothing stored, the model holds {self.saved}")
            return
        self.check(
            stored.version >= self.top_version,
            f"stored version went back from {self.top_version} to {stored.version}",
        )
        self.top_version = stored.version
        self.check(self.saved is not None, f"version {stored.version} stored, none acknowledged")
        assert self.saved is not None
        m = self.saved
        snap = from_stored(self.codec, stored)
        self.check(
            stored.version == m.version,
            f"stored version {stored.version}, the last acknowledged is {m.version}",
        )
        got = stored_items(snap.history)
        self.check(
            got == m.history,
            "stored history differs from the acknowledged one:\n"
            f"    stored: {_brief(got)}\n    model:  {_brief(m.history)}"
            + _first_difference(got, m.history),
        )
        self.check(snap.agent is not None, "stored head has no agent")
        assert snap.agent is not None
        self.check(
            snap.agent.agent_id == m.agent,
            f"stored agent {snap.agent.agent_id!r}, acknowledged {m.agent!r}",
        )
        got_ctx = stored_items(snap.agent.chat_ctx)
        self.check(
            got_ctx == m.agent_ctx,
            "stored agent context differs:\n"
            f"    stored: {_brief(got_ctx)}\n    model:  {_brief(m.agent_ctx)}"
            + _first_difference(got_ctx, m.agent_ctx),
        )
        self.check(
            snap.userdata == m.userdata,
            f"stored userdata {snap.userdata!r}, acknowledged {m.userdata!r}",
        )
        self.check(snap.state == m.state, f"stored state {snap.state!r}, acknowledged {m.state!r}")

    def new_session(self) -> AgentSession[Visit]:
        self.made += 1
        session: AgentSession[Visit] = make_text_session(
            ScriptedLLM.rule_based(_rule), userdata=Visit(name=f"fresh{self.made}")
        )
        return session

    def new_worker(self, name: str, autosave: bool) -> Worker:
        session = self.new_session()
        lost: list[LeaseLost] = []

        async def on_lost(e: LeaseLost) -> None:
            lost.append(e)

        rs = lr.ResumableSession(
            self.store,
            self.key,
            registry=self.registry,
            userdata_type=Visit,
            autosave=autosave,
            debounce=DEBOUNCE,
            lease_ttl=LEASE_TTL,
            owner=f"{name}-{uuid.uuid4().hex[:6]}",
            on_lost=on_lost,
        )
        w = Worker(name, rs, session, autosave, lost=lost, sessions=[session])
        return w

    # ------------------------------------------------------------------ operations

    def ops(self) -> list[tuple[int, str, Callable[[], Awaitable[None]]]]:
        """The operations possible now, with their weights."""
        out: list[tuple[int, str, Callable[[], Awaitable[None]]]] = [(1, "idle", self.op_idle)]
        h = self.holder
        free = [slot for slot, w in self.slots.items() if w is None or not w.running]
        if h is not None and not h.autosave and free:
            # its lease lapses, and another worker acquires it without a takeover
            out.append((3, "lapse", lambda: self.op_lapse(self.rng.choice(free))))
        for slot, w in self.slots.items():
            if w is None or not w.running:
                out.append((6, f"open {slot}", partial(self.op_open, slot)))
                continue
            out += [
                (12, f"turn {slot}", partial(self.op_turn, w)),
                (5, f"checkpoint {slot}", partial(self.op_checkpoint, w)),
                (2, f"userdata {slot}", partial(self.op_userdata, w)),
                (2, f"suspend {slot}", partial(self.op_finish, w, "suspend")),
                (1, f"end {slot}", partial(self.op_finish, w, "end")),
                (1, f"aclose {slot}", partial(self.op_aclose, w)),
                (1, f"crash {slot}", partial(self.op_crash, w)),
            ]
            if w.status == "active":
                out.append((2, f"pause {slot}", partial(self.op_pause, w)))
            else:
                out.append((3, f"resume {slot}", partial(self.op_resume, w)))
            # calls the state forbids: they must refuse, changing nothing
            out.append((1, f"misuse {slot}", partial(self.op_misuse, w)))
            if w.status == "active":
                out.append((5, f"during {slot}", partial(self.op_during, w, slot)))
            out.append((3, f"twice {slot}", partial(self.op_twice, w)))
        return out

    async def step(self) -> None:
        ops = self.ops()
        weights = [w for w, _, _ in ops]
        _, _, run = self.rng.choices(ops, weights)[0]
        began = time.monotonic()
        versions = {id(w): w.rs.version for w in self.all}
        holder = self.holder
        await run()
        await self.settle()
        if self.holder is not None and (
            self.holder is not holder or self.holder.rs.version != versions.get(id(self.holder))
        ):
            # acquired, or committed under its lease (which renews it), during the step
            self.holder.renewed = (began, time.monotonic())
        await self.check_store()

    def lease_held(self) -> bool | None:
        """Whether the holder's lease is live now: True, False, or None when too close to
        its expiry to say."""
        h = self.holder
        if h is None:
            return False
        if h.autosave and (h.running or h.status == "crashed"):
            return True  # renewed every third of its ttl
        now = time.monotonic()
        start, end = h.renewed
        if now < start + LEASE_TTL - MARGIN:
            return True
        if now > end + LEASE_TTL + MARGIN:
            return False
        return None

    async def op_lapse(self, slot: str) -> None:
        await self.op_idle()
        await self.op_open(slot, takeover=False)

    async def op_idle(self) -> None:
        """Nothing happens for longer than a lease: leases nobody renews lapse."""
        self.log("idle")
        await asyncio.sleep(LEASE_TTL + 2 * MARGIN)

    async def op_open(
        self,
        slot: str,
        *,
        takeover: bool | None = None,
        how: str | None = None,
        adopt: bool = False,
    ) -> None:
        """A worker restores the key: a new `ResumableSession`, or the slot's suspended
        one again (with a new `AgentSession`, or the same one, emptied)."""
        old = self.slots[slot]
        if takeover is None:
            takeover = self.rng.random() < 0.5
        if how is None:
            how = "new"
            if old is not None and old.status == "suspended" and not old.fenced:
                how = self.rng.choice(["new", "again", "in place"])
        if how == "new":
            w = self.new_worker(f"{slot}{len(self.all)}", autosave=self.rng.random() < 0.5)
        else:
            assert old is not None
            w = old
            if how == "again":
                w.session = self.new_session()
                w.sessions.append(w.session)
            else:
                w.session.history.items.clear()
        self.log(
            f"open {slot}: {how} {w.name} (autosave={w.autosave}) takeover={takeover}"
            f" [holder {self.holder.name if self.holder else None}]"
        )
        held = self.lease_held() if not takeover else False
        self.log(f"    holder's lease held: {held}")
        before = list(w.session.history.items)
        racing = self.holder
        restoring = w.rs.restore(w.session, default=Front, takeover=takeover)
        if held is None:  # either outcome is right
            try:
                agent = await asyncio.wait_for(_awaited(restoring), STEP_DEADLINE)
            except SessionBusy:
                held = True
                self.log("    -> SessionBusy (the lease was still held)")
            except Exception as e:
                raise self.fail(f"restore: raised {e!r}") from e
            else:
                self.log(f"    -> {agent!r} (the lease had lapsed)")
        else:
            agent = await self.call("restore", restoring, SessionBusy if held else None)
        busy = held
        if busy:
            self.check(
                list(w.session.history.items) == before,
                "a refused restore changed the session's history",
            )
            if how == "new":
                await w.session.aclose()
            return
        if how == "new":
            if old is not None and old.status == "crashed":
                pass  # stays in self.all: its session is closed at the end
            self.all.append(w)
        self.slots[slot] = w
        if self.holder is not None:
            self.holder.fenced = True
        self.holder = w
        w.status = "active"
        if adopt:
            # restored while the holder was speaking: whatever it had stored by then is
            # what this worker must get (read back, and checked against the holder's
            # live session below)
            read = await self.read_stored()
            if read is not None and read != self.saved and racing is not None:
                # the holder (speaking, or the one before it) wrote since: one moment of it
                self.check(
                    _is_prefix(read.history, live_items(racing.session.history.items)),
                    "what the fenced holder had stored is no moment of its session:\n"
                    f"    stored: {_brief(read.history)}\n"
                    f"    live:   {_brief(live_items(racing.session.history.items))}",
                )
            if read is not None:
                self.saved, self.ended = read, read.state == "ended"
        # what the restore put back, before start()
        m = self.saved
        if m is None or self.ended:
            self.check(not w.rs.resumed, "resumed with nothing to resume")
            self.check(
                isinstance(agent, Front) and not w.session.history.items,
                f"a fresh start gave {type(agent).__name__} and "
                f"{_brief(live_items(w.session.history.items))}",
            )
            expected_version = m.version if m is not None else 0
        else:
            self.check(w.rs.resumed, "a stored conversation was not resumed")
            got = live_items(w.session.history.items)
            self.check(
                got == m.history,
                "restored history is not the acknowledged one:\n"
                f"    restored: {_brief(got)}\n    model:    {_brief(m.history)}"
                + _first_difference(got, m.history),
            )
            self.check(
                self.registry.id_of(agent) == m.agent,
                f"restored agent {type(agent).__name__}, acknowledged {m.agent!r}",
            )
            got_ctx = live_items(agent.chat_ctx.items)
            self.check(
                got_ctx == m.agent_ctx,
                "restored agent context is not the acknowledged one:\n"
                f"    restored: {_brief(got_ctx)}\n    model:    {_brief(m.agent_ctx)}"
                + _first_difference(got_ctx, m.agent_ctx),
            )
            self.check(
                w.session.userdata.model_dump() == m.userdata,
                f"restored userdata {w.session.userdata!r}, acknowledged {m.userdata!r}",
            )
            expected_version = m.version
        self.check(
            w.rs.version == expected_version,
            f"restored at version {w.rs.version}, the store holds {expected_version}",
        )
        self.check(w.rs.state == "active", f"restored in state {w.rs.state!r}")
        await asyncio.wait_for(w.session.start(agent), STEP_DEADLINE)

    async def op_turn(self, w: Worker) -> None:
        n = len(self.trace)
        agent = w.session.current_agent
        choices = [f"hello {n}"]
        if w.status == "active":
            if isinstance(agent, Front):
                choices += [f"book day{n}", "transfer back"]
            else:
                choices += ["transfer front"]
        text = self.rng.choice(choices)
        self.log(f"turn {w.name} ({w.status}, {type(agent).__name__}): {text!r}")
        before = len(w.session.history.items)
        await self.call("run", w.session.run(user_input=text), None)
        added = live_items(w.session.history.items[before:])
        self.log(f"    added {_brief(added)}")
        if w.autosave and w.fenced:
            w.wrote_fenced = True
        if w.status == "active" and text.startswith("hello"):
            # an active session answers (after a resume, a restore, a refused pause...)
            self.check(
                any(i["type"] == "message" and i["role"] == "assistant" for i in added),
                f"an active session did not answer: {_brief(added)}",
            )
        if w.status == "paused":
            # while paused nothing is answered: the user's words alone are recorded
            self.check(
                [i["type"] for i in added] == ["message"] and added[0]["role"] == "user",
                f"a paused session answered: {_brief(added)}",
            )

    async def op_checkpoint(self, w: Worker) -> None:
        self.log(f"checkpoint {w.name} ({w.status}{', fenced' if w.fenced else ''})")
        if w.fenced:
            # refused, whether or not it has anything new (see
            # `test_a_fenced_worker_with_nothing_new_is_told_it_was_taken_over`)
            await self.call("checkpoint", w.rs.checkpoint(), LeaseLost)
            return
        version = await self.call("checkpoint", w.rs.checkpoint(), None)
        self.acknowledged_by(w, version)

    def acknowledged_by(self, w: Worker, version: int, state: str | None = None) -> None:
        before = self.saved.version if self.saved else 0
        self.check(version >= before, f"{w.name} saved version {version} below {before}")
        self.check(w.rs.version == version, f"rs.version {w.rs.version}, returned {version}")
        self.acknowledge(w, version, state)

    async def op_during(self, w: Worker, slot: str) -> None:
        """Another operation while ``w`` is saying a slow reply."""
        other = "B" if slot == "A" else "A"
        kinds = ["pause", "suspend", "end", "checkpoint", "aclose", "crash and takeover"]
        if self.slots[other] is None or not self.slots[other].running:  # type: ignore[union-attr]
            kinds.append("takeover")
        kind = self.rng.choice(kinds)
        delay = self.rng.uniform(0, 12 * SLOW_CHUNK)
        n = len(self.trace)
        self.log(
            f"during a slow reply of {w.name}{' (fenced)' if w.fenced else ''}, "
            f"after {delay * 1000:.0f} ms: {kind}"
        )
        running: asyncio.Future[Any] = asyncio.ensure_future(w.session.run(user_input=f"slow r{n}"))
        await asyncio.sleep(delay)
        if kind == "pause":
            await self.op_pause(w)
        elif kind in ("suspend", "end"):
            await self.op_finish(w, kind)  # type: ignore[arg-type]
        elif kind in ("checkpoint", "aclose"):
            # the reply goes on while it is saved: what is stored is the session at one
            # moment of it, read back (and checked to be one)
            before = self.saved
            if kind == "checkpoint":
                expect = LeaseLost if w.fenced else None
                got = await self.call("checkpoint", w.rs.checkpoint(), expect)
                if w.fenced and not isinstance(got, LeaseLost):
                    self.log("    (fenced, nothing new)")
            else:
                await self.call("aclose", w.rs.aclose(), None)
                w.status = "closed"
            await self.finish_run(w, running)
            if not w.fenced:
                await self.adopt_stored(w, before)
            if kind == "aclose":
                if not w.fenced:
                    self.holder = None
                await asyncio.wait_for(w.session.aclose(), STEP_DEADLINE)
            return
        else:
            if kind == "crash and takeover":
                await self.op_crash(w)
            # the other worker takes the key over while this one is speaking (and maybe
            # autosaving): it gets one moment of the conversation, this one is fenced
            before, was_holder = self.saved, self.holder is w
            target = other if kind == "takeover" else slot
            await self.op_open(target, takeover=True, how="new", adopt=True)
            await self.finish_run(w, running)
            if was_holder and before is not None and self.saved is not None:
                self.check(
                    _is_prefix(before.history, self.saved.history)
                    or self.saved.history == before.history,
                    "the conversation taken over lost items acknowledged before",
                )
            return
        await self.finish_run(w, running)

    async def op_twice(self, w: Worker) -> None:
        """Two lifecycle calls on one worker at once (a job's timer and the app, say):
        each returns or refuses (`RuntimeError` for the state the other left,
        `LeaseLost` when fenced), and the store ends up holding the session as it is."""
        names = ["checkpoint", "pause", "resume", "suspend", "end", "aclose"]
        pair = [self.rng.choice(names), self.rng.choice(names)]
        self.log(f"twice {w.name} ({w.status}{', fenced' if w.fenced else ''}): {pair}")
        calls = {
            "checkpoint": w.rs.checkpoint,
            "pause": w.rs.pause,
            "resume": w.rs.resume,
            "suspend": w.rs.suspend,
            "end": w.rs.end,
            "aclose": w.rs.aclose,
        }
        before = self.saved
        results = await asyncio.wait_for(
            asyncio.gather(*(calls[n]() for n in pair), return_exceptions=True), STEP_DEADLINE
        )
        allowed: tuple[type[BaseException], ...] = (RuntimeError,)
        if w.fenced:
            allowed += (LeaseLost,)
        for name, got in zip(pair, results, strict=True):
            self.log(f"    {name} -> {got!r}")
            if isinstance(got, BaseException) and not isinstance(got, allowed):
                raise self.fail(f"{name} (beside {pair}) raised {got!r}") from got
        state = w.rs.state
        self.log(f"    state {state}")
        self.check(state in ("active", "paused", "suspended", "ended", "closed"), state)
        w.status = state
        if state in ("suspended", "ended"):
            self.check(not w.fenced, f"a fenced worker was {state}")
        if w.fenced:
            if state == "closed":
                await asyncio.wait_for(w.session.aclose(), STEP_DEADLINE)
            return
        if state in ("suspended", "ended", "closed"):
            self.holder = None
        await self.settle()  # a resume's autosave
        got_saved = await self.read_stored()
        live = live_items(w.session.history.items)
        if got_saved is None:
            self.check(before is None, "the store lost the conversation")
        else:
            # nothing was said meanwhile: what is stored is the session as it is (unless
            # nothing was saved at all, and nothing changed since the last save)
            if got_saved != before:
                self.check(
                    got_saved.history == live,
                    "after two calls at once the store does not hold the session:\n"
                    f"    stored: {_brief(got_saved.history)}\n    live:   {_brief(live)}",
                )
                self.check(w.rs.version == got_saved.version, "rs.version is not the stored one")
            if state in ("suspended", "ended"):
                self.check(
                    got_saved.state == state and got_saved.history == live,
                    f"{state}, but the store holds state {got_saved.state!r}",
                )
            self.saved, self.ended = got_saved, got_saved.state == "ended"
        if state == "closed":
            await asyncio.wait_for(w.session.aclose(), STEP_DEADLINE)

    async def finish_run(self, w: Worker, running: asyncio.Future[Any]) -> None:
        try:
            await asyncio.wait_for(running, STEP_DEADLINE)
        except TimeoutError as e:
            raise self.fail(f"the slow reply of {w.name} never ended") from e
        except Exception as e:  # a session closed under its reply: LiveKit's own end
            self.log(f"    the slow reply ended with {e!r}")
        else:
            self.log("    the slow reply ended")

    async def adopt_stored(self, w: Worker, before: Saved | None) -> None:
        """What ``w`` saved during its reply becomes the model, once checked to be one
        moment of its session: its history a prefix of the live one, extending what was
        acknowledged before."""
        got = await self.read_stored()
        if got is None:
            self.check(before is None, "the store lost the conversation")
            return
        self.check(
            _is_prefix(got.history, live_items(w.session.history.items)),
            "what was saved during a reply is no moment of the session:\n"
            f"    stored: {_brief(got.history)}\n"
            f"    live:   {_brief(live_items(w.session.history.items))}",
        )
        if before is not None and not self.ended:
            self.check(
                _is_prefix(before.history, got.history),
                "a save during a reply lost acknowledged items:\n"
                f"    stored: {_brief(got.history)}\n    before: {_brief(before.history)}",
            )
        self.check(w.rs.version == got.version, f"rs.version {w.rs.version}, stored {got.version}")
        self.saved = got
        self.ended = got.state == "ended"

    async def read_stored(self) -> Saved | None:
        try:
            stored = await self.store.load(self.key)
        except SnapshotNotFound:
            return None
        snap = from_stored(self.codec, stored)
        assert snap.agent is not None
        return Saved(
            version=stored.version,
            history=stored_items(snap.history),
            agent=snap.agent.agent_id,
            agent_ctx=stored_items(snap.agent.chat_ctx),
            userdata=snap.userdata,
            state=snap.state,
        )

    async def op_userdata(self, w: Worker) -> None:
        name = f"name{len(self.trace)}"
        self.log(f"userdata {w.name}: name={name}")
        w.session.userdata.name = name

    async def op_pause(self, w: Worker) -> None:
        self.log(f"pause {w.name}{' (fenced)' if w.fenced else ''}")
        version = await self.call("pause", w.rs.pause(), LeaseLost if w.fenced else None)
        w.status = "paused"
        self.check(w.rs.state == "paused", f"paused, state {w.rs.state!r}")
        if not w.fenced:
            self.acknowledged_by(w, version)

    async def op_resume(self, w: Worker) -> None:
        self.log(f"resume {w.name}{' (fenced)' if w.fenced else ''}")
        await self.call("resume", w.rs.resume(), LeaseLost if w.fenced else None)
        if w.fenced:
            # its save told it of the takeover: silenced again, nothing written
            self.check(w.rs.state == "paused", f"a refused resume left state {w.rs.state!r}")
            return
        w.status = "active"
        self.check(w.rs.state == "active", f"resumed, state {w.rs.state!r}")
        self.acknowledged_by(w, w.rs.version)  # a resume saves before it returns

    async def op_finish(self, w: Worker, how: Literal["suspend", "end"]) -> None:
        self.log(f"{how} {w.name} ({w.status}{', fenced' if w.fenced else ''})")
        fn = w.rs.suspend if how == "suspend" else w.rs.end
        version = await self.call(how, fn(), LeaseLost if w.fenced else None)
        if w.fenced:
            # nothing given up: silenced, with its (lost) lease, still open
            w.status = "paused"
            self.check(w.rs.state == "paused", f"a refused {how} left state {w.rs.state!r}")
            return
        state: Status = "suspended" if how == "suspend" else "ended"
        w.status = state
        self.check(w.rs.state == state, f"{how} left state {w.rs.state!r}")
        self.acknowledged_by(w, version, state)
        self.holder = None

    async def op_aclose(self, w: Worker) -> None:
        self.log(f"aclose {w.name} ({w.status}{', fenced' if w.fenced else ''})")
        await self.call("aclose", w.rs.aclose(), None)
        if not w.fenced:
            # the final save: what the session holds now
            self.acknowledged_by(w, w.rs.version)
            self.holder = None
        w.status = "closed"
        self.check(w.rs.state == "closed", f"aclose left state {w.rs.state!r}")
        await asyncio.wait_for(w.session.aclose(), STEP_DEADLINE)

    async def op_crash(self, w: Worker) -> None:
        """The worker is never heard from again: no close, no save, its lease held."""
        self.log(f"crash {w.name}")
        w.status = "crashed"
        for slot, s in self.slots.items():
            if s is w:
                self.slots[slot] = None

    async def op_misuse(self, w: Worker) -> None:
        """A call its state forbids: `RuntimeError`, nothing changed."""
        if w.status == "active":
            self.log(f"misuse {w.name}: resume while active")
            await self.call("resume", w.rs.resume(), RuntimeError)
        else:
            self.log(f"misuse {w.name}: pause while paused")
            await self.call("pause", w.rs.pause(), RuntimeError)
        self.log(f"misuse {w.name}: restore while running")
        await self.call(
            "restore", w.rs.restore(self.new_session(), default=Front, takeover=True), RuntimeError
        )
        self.check(w.rs.state == w.status, f"a refused call moved state to {w.rs.state!r}")

    # ------------------------------------------------------------------ the walk

    async def run(self, steps: int) -> None:
        try:
            for _ in range(steps):
                await self.step()
            # whatever happened, a worker taking the key over gets the model back
            slot = self.rng.choice(["A", "B"])
            other = self.slots[slot]
            if other is not None and other.running:
                await self.op_crash(other)
            self.log("final takeover")
            await self.op_open(slot, takeover=True, how="new")
            await self.settle()
            await self.check_store()
        finally:
            await self.teardown()

    async def teardown(self) -> None:
        for w in self.all:
            with contextlib.suppress(Exception):  # the walk's verdict is already made
                await asyncio.wait_for(w.rs.aclose(), STEP_DEADLINE)
            for s in w.sessions:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.aclose(), STEP_DEADLINE)


async def _awaited(aw: Awaitable[Any]) -> Any:
    return await aw


def _name(expect: type[BaseException] | None) -> str:
    return "a return" if expect is None else expect.__name__


def _is_prefix(a: list[Item], b: list[Item]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _first_difference(a: list[Item], b: list[Item]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            keys = sorted({k for k in (*x, *y) if x.get(k) != y.get(k)})
            return f"\n    first difference at {i}: " + ", ".join(
                f"{k}: {x.get(k)!r} != {y.get(k)!r}" for k in keys
            )
    if len(a) != len(b):
        return f"\n    lengths {len(a)} != {len(b)}"
    return ""


# ------------------------------------------------------------------------ the tests


@pytest.fixture(params=KINDS)
async def walk_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    store = await STORE_FACTORIES[request.param](request, tmp_path)
    try:
        yield store
    finally:
        await store.aclose()


SEEDS = (
    [1000 + n for n in range(WALKS)]
    if SOAK == 1
    else [random.randrange(10**9) for _ in range(WALKS)]
)


async def test_session_model_random_walks(walk_store: Store) -> None:
    """Seeded random walks of two workers over one key each; see the module's docstring."""
    for seed in SEEDS:
        await Walk(walk_store, f"walk-{seed}", seed).run(STEPS)


async def test_a_fenced_worker_with_nothing_new_is_told_it_was_taken_over(
    walk_store: Store,
) -> None:
    """Found by the walk. ``checkpoint()`` promises `LeaseLost` "when another worker
    took the session over (nothing is written)". A fenced worker whose session had not
    changed since its last commit was told instead that its checkpoint landed, at its
    own last version, which the store no longer held as the latest: ``Capture.draft``
    found nothing new and ``_commit_now`` returned without asking the store. Nothing
    was overwritten; but a worker checking that it still owns the call (before a side
    effect, or with autosave off, which never renews) was told it did."""
    reg = registry()

    async def worker(name: str, *, takeover: bool) -> tuple[AgentSession[Visit], Any]:
        session = make_text_session(ScriptedLLM.rule_based(_rule), userdata=Visit(name=name))
        rs = lr.ResumableSession(
            walk_store, "fenced-noop", registry=reg, userdata_type=Visit, autosave=False
        )
        await session.start(await rs.restore(session, default=Front, takeover=takeover))
        return session, rs

    s1, rs1 = await worker("one", takeover=False)
    s2: AgentSession[Visit] | None = None
    rs2: Any = None
    try:
        await s1.run(user_input="hello one")
        assert await rs1.checkpoint() == 1
        s2, rs2 = await worker("two", takeover=True)  # rs1 is fenced from here
        await s2.run(user_input="hello two")
        assert await rs2.checkpoint() == 2
        # rs1 has said nothing since its commit: nothing to write, yet it is fenced
        with pytest.raises(LeaseLost):
            await rs1.checkpoint()
        # ... and once it has something to write, it is refused (this holds today)
        await s1.run(user_input="hello again from one")
        with pytest.raises(LeaseLost):
            await rs1.checkpoint()
        assert (await walk_store.load("fenced-noop")).version == 2
    finally:
        for rs, session in ((rs1, s1), (rs2, s2)):
            if rs is not None:
                await rs.aclose()
            if session is not None:
                await session.aclose()
