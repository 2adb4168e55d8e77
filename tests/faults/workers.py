"""What a forked worker does. Each body runs in its own event loop in a fresh child of the
fork server and reports on its `Channel`, one line per fact:

    READY <version> <epoch>     restored (or fresh) and holding the lease
    PENDING <version> <digest>  (store level) about to commit what reads as <digest>
    COMMIT <version> ...        the store acknowledged this version (printed after commit returned)
    TURN <n> <version>          turn n's user message is in acknowledged <version>
    QUIET <version>             (zombie-to-be) idle from now on: only renewals write
    LOST <vanished>             (session level) autosave stopped on a lost lease
    CHECKPOINT <result>         (session level, after LOST) what an explicit checkpoint did
    SUSPENDING <version>        (suspending worker) the suspend starts; RELEASED,
                                HOLDING and SUSPENDED: see `session_suspends`

A worker never ends on its own: the test kills it (that is the fault).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import signal
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from livekit.agents import llm

from livekit_resume import LeaseLost, ResumableSession, SnapshotNotFound, open_store
from livekit_resume.stores.base import Commit, Lease, Record, Store
from tests import _child_agent as agent_kit
from tests.faults.forkserver import Channel
from tests.faults.watch import WatchStore

__all__ = [
    "STREAM",
    "WORKERS",
    "AckStore",
    "HeldSuspend",
    "digest_items",
    "turn_text",
]

# Autosave debounce in the workers: short, so that a run holds several commits.
DEBOUNCE = 0.02
# Bounds a broken store inside a worker; a healthy commit takes milliseconds.
SAVE_TIMEOUT = 30.0
# The stream the store-level workers write (stores know nothing of its meaning).
STREAM = "s"


def turn_text(tag: str, turn: int) -> str:
    """The user's words of one turn: unique per run, so the test can find each one."""
    return f"remember {tag} turn {turn}"


def digest_items(items: Sequence[tuple[str, bytes]]) -> str:
    """What a stream reads as: ids and bytes, in order."""
    h = hashlib.sha256()
    for item_id, data in items:
        h.update(item_id.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


class AckStore(WatchStore):
    """Forwards to the real store; says ``COMMIT <version> <epoch>`` once a commit returned."""

    def __init__(self, inner: Store, channel: Channel) -> None:
        super().__init__(inner)
        self.channel = channel

    async def commit(self, commit: Commit) -> int:
        version = await super().commit(commit)
        self.channel.say("COMMIT", version, commit.epoch)
        return version


async def _started(
    store: Store, args: dict[str, Any], **options: Any
) -> tuple[Any, ResumableSession]:
    """The worker's AgentSession, restored under ``args["key"]`` (no takeover) and started."""
    _model, session = agent_kit.build_session()
    rs = ResumableSession(
        store,
        args["key"],
        registry=agent_kit.registry(),
        userdata_type=agent_kit.Notes,
        lease_ttl=float(args.get("lease_ttl", 30.0)),
        **options,
    )
    await session.start(await rs.restore(session, default=agent_kit.Scribe, takeover=False))
    return session, rs


def _user_message_id(session: Any, text: str) -> str:
    for item in reversed(session.history.items):
        if isinstance(item, llm.ChatMessage) and item.role == "user" and item.text_content == text:
            return str(item.id)
    raise AssertionError(f"user message {text!r} is not in the history")


async def session_turns(channel: Channel, args: dict[str, Any]) -> None:
    """A live AgentSession with autosave, doing turns until it is killed.

    After a lost lease (a zombie that was taken over) it reports ``LOST``, tries one
    more turn and an explicit checkpoint, reports ``CHECKPOINT``, and waits to be killed.
    """
    store = AckStore(open_store(args["url"], **args["options"]), channel)
    session, rs = await _started(store, args, debounce=DEBOUNCE)
    channel.say("READY", rs.version, rs._lease.epoch if rs._lease else -1)
    autosave = rs._autosave
    quiet_after = args.get("quiet_after")  # a zombie-to-be: this many turns, then quiet
    for turn in itertools.count(1):
        if turn == quiet_after:
            # Nothing more to save: only lease renewals write now. A SQLite writer frozen
            # inside a transaction would hold the file's lock against every process;
            # the scenario freezes the worker outside one.
            channel.say("QUIET", store.versions_written[-1])
            await asyncio.gather(*autosave._tasks, return_exceptions=True)  # end on a loss
        text = turn_text(args["tag"], turn)
        await session.run(user_input=text)
        item_id = _user_message_id(session, text)
        await asyncio.wait_for(autosave.idle.wait(), SAVE_TIMEOUT)
        if autosave.lost is not None:
            break
        await store.wait_saved(item_id, timeout=SAVE_TIMEOUT)
        channel.say("TURN", turn, store.versions_written[-1])
    assert autosave.lost is not None
    channel.say("LOST", autosave.lost.vanished)
    # a zombie: its next turn still answers, but nothing may reach the store
    await session.run(user_input=turn_text(args["tag"], 0))
    try:
        version = await rs.checkpoint()
    except LeaseLost:
        channel.say("CHECKPOINT", "LeaseLost")
    else:
        channel.say("CHECKPOINT", "committed", version)
    await asyncio.Event().wait()


def _edit(items: list[tuple[str, bytes]], prefix: str, n: int) -> list[Record]:
    """Random changes to ``items`` (in place): mostly appends, some edits and removals."""
    records: list[Record] = []
    for i in range(random.randint(1, 4)):
        roll = random.random()
        if roll < 0.15 and items:
            idx = random.randrange(len(items))
            records.append(Record(STREAM, items.pop(idx)[0], None))
        elif roll < 0.35 and items:
            idx = random.randrange(len(items))
            data = random.randbytes(random.randint(16, 1500))
            items[idx] = (items[idx][0], data)
            after = items[idx - 1][0] if idx else None
            records.append(Record(STREAM, items[idx][0], data, after))
        else:
            item = (f"{prefix}-{n}-{i}", random.randbytes(random.randint(16, 1500)))
            records.append(Record(STREAM, item[0], item[1], items[-1][0] if items else None))
            items.append(item)
    return records


async def store_commits(channel: Channel, args: dict[str, Any]) -> None:
    """Raw `Store.commit` in a loop under a taken-over lease, until killed.

    Each head names the digest its items must read as, so any retained version can be
    checked whole on its own, whether or not its commit was acknowledged.
    """
    store = open_store(args["url"], **args["options"])
    key = args["key"]
    lease = await store.acquire(key, f"store-worker-{os.getpid()}", takeover=True)
    try:
        stored = await store.load(key)
        items, version = list(stored.streams.get(STREAM, [])), stored.version
    except SnapshotNotFound:
        items, version = [], 0
    channel.say("READY", version, lease.epoch)
    prefix = uuid.uuid4().hex[:6]
    for n in itertools.count():
        after = list(items)
        records = _edit(after, prefix, n)
        digest = digest_items(after)
        head = json.dumps({"digest": digest, "items": len(after)}).encode()
        channel.say("PENDING", version + 1, digest)
        version = await store.commit(
            Commit(
                key=key,
                epoch=lease.epoch,
                base_version=version,
                head=head,
                records=records,
                size=len(after),
                info={"n": n},
                commit_id=uuid.uuid4().hex,
            )
        )
        items = after
        channel.say("COMMIT", version, digest)


class HeldSuspend(AckStore):
    """`AckStore` that, once `armed`, stops the suspend at ``at``: before its final
    commit goes out (``commit``), before its release goes out (``release``) or once the
    release returned (``released``, after ``RELEASED <epoch>``). It says ``HOLDING <at>
    <epoch>`` there and waits for a SIGUSR1: a test kills the worker there, or freezes
    it, sends the signal and thaws it later."""

    def __init__(self, inner: Store, channel: Channel, at: str) -> None:
        super().__init__(inner, channel)
        self._at = at
        self._open = asyncio.Event()
        # set up front: a SIGUSR1 kills a process that has no handler for it
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._open.set)
        self.armed = False

    async def _hold(self, at: str, epoch: int) -> None:
        if self.armed and at == self._at:
            self.armed = False
            self.channel.say("HOLDING", at, epoch)
            await self._open.wait()

    async def commit(self, commit: Commit) -> int:
        await self._hold("commit", commit.epoch)
        return await super().commit(commit)

    async def release(self, lease: Lease) -> None:
        await self._hold("release", lease.epoch)
        await self.inner.release(lease)
        self.channel.say("RELEASED", lease.epoch)
        await self._hold("released", lease.epoch)


async def session_suspends(channel: Channel, args: dict[str, Any]) -> None:
    """A live AgentSession takes ``turns`` turns, each saved, then suspends, its
    final commit said ``COMMIT`` once acknowledged; the suspend stops where ``at`` says
    (a `HeldSuspend`). Once the suspend returns the worker says ``SUSPENDED ok``, or the
    name of the error it raised. ``TURN <n> <version>`` as `session_turns`."""
    store = HeldSuspend(open_store(args["url"], **args["options"]), channel, args["at"])
    session, rs = await _started(store, args, autosave=False)
    channel.say("READY", rs.version, rs._lease.epoch if rs._lease else -1)
    for turn in range(1, int(args["turns"]) + 1):
        await session.run(user_input=turn_text(args["tag"], turn))
        channel.say("TURN", turn, await rs.checkpoint())
    # the last turn is saved by the suspend itself
    await session.run(user_input=turn_text(args["tag"], 0))
    channel.say("SUSPENDING", rs.version)
    store.armed = True
    try:
        await rs.suspend()
        channel.say("SUSPENDED", "ok")
    except Exception as e:
        channel.say("SUSPENDED", type(e).__name__)
    await asyncio.Event().wait()


WORKERS: dict[str, Callable[[Channel, dict[str, Any]], Awaitable[None]]] = {
    "session_turns": session_turns,
    "session_suspends": session_suspends,
    "store_commits": store_commits,
}
