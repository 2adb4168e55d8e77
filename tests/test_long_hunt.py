"""Hunt: a long conversation (hundreds of checkpoints of one session).

What the docs promise over many versions (docs/multi-worker.md "Redis layout",
docs/cli.md, stores/log.py): exactly the last ``keep`` versions stay loadable, each as
it was saved; older ones are gone from every key and row and are a typed
`SnapshotNotFound`; a log generation is folded when superseded records pile up, so what
a session holds stays bounded while its live conversation is; `history`, `show`,
`diff`, `export` and `revert` agree with the store.

Sessions are real `AgentSession` s driven by the scripted LLM (tests/_child_agent.py),
checkpointed by hand (autosave off, so the versions counted are these checkpoints).

Status on the code hunted: every test passes (kept as previously untested coverage of
long sessions: retention, compaction, footprint, fidelity across restores, handoffs,
summaries, reverts and the command line's reads).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, llm
from typer.testing import CliRunner, Result

from livekit_resume import AgentRegistry, ResumableSession, SnapshotNotFound, open_store
from livekit_resume.cli import app
from livekit_resume.snapshot.chat import ctx_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import ItemData, Snapshot
from livekit_resume.stores.base import Store
from livekit_resume.stores.log import COMPACT_SLACK, DEFAULT_KEEP
from tests import _child_agent as child

# The app keeps its conversation to this many items each turn (as LiveKit apps do).
WINDOW = 20


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store: a SQLite file, or a namespace of a private redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/long.db"
    server = request.getfixturevalue("redis_server")
    ns = f"long{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RESUME_NAMESPACE", ns)
    return f"{server.url}"


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    s = open_store(url)
    yield s
    await s.aclose()


def cli(url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["--store", url, *args], env=env)


def cli_json(url: str, *args: str) -> Any:
    result = cli(url, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def acli(url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(cli, url, *args, env=env)


async def snapshot(store: Store, key: str, version: int | None = None) -> Snapshot:
    stored = await store.load(key, version)
    return Codec().decode_parts(key, stored.head, stored.streams, version=stored.version)


Saved = tuple[list[ItemData], list[ItemData]]


def live(session: AgentSession[Any]) -> Saved:
    """The session's history and its agent's own context, as data, right now."""
    agent = session.current_agent
    return ctx_to_data(session.history), ctx_to_data(agent._chat_ctx)


def stored_form(snap: Snapshot) -> Saved:
    assert snap.agent is not None
    return list(snap.history), list(snap.agent.chat_ctx)


class Clerk(Agent):
    """A second agent the conversation is handed to now and then."""

    def __init__(self) -> None:
        super().__init__(instructions="You are the clerk.")


def registry() -> AgentRegistry:
    reg = child.registry()
    reg.register(Clerk)
    return reg


class Conversation:
    """One session key, spoken to turn after turn, with what each version held."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key
        self.saved: dict[int, Saved] = {}
        self.rs: ResumableSession | None = None
        self.session: AgentSession[Any] | None = None
        self.turn = 0

    async def open(self, *, takeover: bool = False) -> None:
        _model, session = child.build_session()
        rs = ResumableSession(
            self.store,
            self.key,
            registry=registry(),
            userdata_type=child.Notes,
            autosave=False,
        )
        agent = await rs.restore(session, default=child.Scribe, takeover=takeover)
        await session.start(agent)
        self.rs, self.session = rs, session

    async def close(self) -> None:
        if self.rs is not None:
            await self.rs.aclose()
        if self.session is not None:
            await self.session.aclose()
        self.rs = self.session = None

    async def say(self, text: str | None = None) -> None:
        assert self.session is not None
        self.turn += 1
        await self.session.run(user_input=text or f"turn {self.turn}: how are you?")

    def truncate(self, window: int = WINDOW) -> None:
        """What LiveKit apps do every turn: keep the last ``window`` items."""
        assert self.session is not None
        self.session.history.truncate(max_items=window)
        agent = self.session.current_agent
        agent._chat_ctx.truncate(max_items=window)

    async def checkpoint(self, reason: str = "turn") -> int:
        assert self.rs is not None and self.session is not None
        version = await self.rs.checkpoint(reason)
        self.saved[version] = live(self.session)
        return version

    async def check_retained(self, keep: int = DEFAULT_KEEP) -> list[int]:
        """Exactly the last ``keep`` versions are listed and load as they were saved;
        the one before them is a typed SnapshotNotFound."""
        infos = await self.store.versions(self.key)
        listed = [i.version for i in infos]
        latest = max(self.saved)
        want = list(range(max(1, latest - keep + 1), latest + 1))
        assert listed == want, (listed, want)
        for v in listed:
            snap = await snapshot(self.store, self.key, v)
            got = stored_form(snap)
            assert got[0] == self.saved[v][0], f"version {v}: history differs from what was saved"
            assert got[1] == self.saved[v][1], f"version {v}: agent context differs"
        if want[0] > 1:
            with pytest.raises(SnapshotNotFound):
                await self.store.load(self.key, want[0] - 1)
        return listed


# ------------------------------------------------------------------- footprint


def sqlite_rows(url: str, key: str) -> dict[str, int]:
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT count(*) FROM {table} WHERE key=?", (key,)).fetchone()[0]
            for table in ("versions", "log")
        }


async def redis_footprint(url: str, key: str) -> dict[str, int]:
    """Keys under the session's prefix, and the total length of its log lists."""
    import os

    from redis.asyncio import Redis

    ns = os.environ["RESUME_NAMESPACE"]
    client = Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{ns}:{{{key}}}:*", count=1000)]
        lists = 0
        for k in keys:
            if b":log:" in k:
                lists += int(await client.llen(k))
        return {"keys": len(keys), "log_elements": lists}
    finally:
        await client.aclose()


async def footprint(url: str, key: str) -> dict[str, int]:
    if url.startswith("sqlite"):
        return sqlite_rows(url, key)
    return await redis_footprint(url, key)


# ----------------------------------------------------------------------- tests


async def test_a_long_truncated_conversation_keeps_exactly_keep_versions_each_as_saved(
    url: str, store: Store
) -> None:
    """240 turns, the app truncating to the last 20 items each turn: after every
    stretch of turns exactly the last 10 versions are listed and each loads as it was
    saved; the store's footprint (rows, keys) stops growing."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    sizes: list[dict[str, int]] = []
    try:
        for n in range(240):
            await conv.say()
            conv.truncate()
            await conv.checkpoint()
            if n % 50 == 49:
                await conv.check_retained()
                sizes.append(await footprint(url, conv.key))
    finally:
        await conv.close()
    # bounded: what the last stretch holds is no more than what the second held, give
    # or take one compaction's worth of log
    slack = 2 * (2 * 2 * WINDOW + COMPACT_SLACK)
    for name in sizes[1]:
        assert sizes[-1][name] <= sizes[1][name] + slack, (name, sizes)
    if url.startswith("sqlite"):
        assert sizes[-1]["versions"] == DEFAULT_KEEP


async def test_restores_in_between_keep_every_retained_version_as_saved(
    url: str, store: Store
) -> None:
    """A call moved to a new AgentSession every 17 turns (suspend, restore), with
    truncation: every retained version still reads as it was saved, across the
    compactions that happen meanwhile."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for n in range(120):
            await conv.say()
            if n % 3 == 0:
                conv.truncate()
            await conv.checkpoint()
            if n % 17 == 16:
                assert conv.rs is not None
                v = await conv.rs.suspend()
                assert conv.session is not None
                conv.saved[v] = live(conv.session)
                await conv.close()
                await conv.open()
                await conv.check_retained()
        await conv.check_retained()
    finally:
        await conv.close()


async def test_a_summary_replacing_fifty_items_reads_back_in_every_retained_version(
    url: str, store: Store
) -> None:
    """An app replaces its oldest 50 items by one summary message every so often (in
    the agent's context and the history): each retained version reads back exactly."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for n in range(140):
            await conv.say()
            assert conv.session is not None
            hist = conv.session.history
            agent = conv.session.current_agent
            if len(hist.items) > 70:
                for ctx in (hist, agent._chat_ctx):
                    old = ctx.items[:50]
                    summary = llm.ChatMessage(
                        role="assistant",
                        content=[f"summary of {len(old)} items up to turn {conv.turn}"],
                    )
                    ctx.items[:50] = [summary]
            await conv.checkpoint()
            if n % 20 == 19:
                await conv.check_retained()
    finally:
        await conv.close()


async def test_revert_to_an_old_version_then_more_turns(url: str, store: Store) -> None:
    """An operator reverts a long session to the oldest retained version; a worker
    restores it and talks on for many turns: the reverted version is the old one's
    conversation, and every retained version reads as saved."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for _ in range(60):
            await conv.say()
            conv.truncate()
            await conv.checkpoint()
        assert conv.rs is not None and conv.session is not None
        v = await conv.rs.suspend()
        conv.saved[v] = live(conv.session)
        await conv.close()
        oldest = (await store.versions(conv.key))[0].version
        result = await acli(url, "--json", "revert", conv.key, str(oldest))
        assert result.exit_code == 0, result.output
        reverted = (await store.versions(conv.key))[-1].version
        assert reverted == v + 1
        conv.saved[reverted] = conv.saved[oldest]
        snap = await snapshot(store, conv.key)
        assert stored_form(snap) == conv.saved[oldest]
        await conv.open()
        assert conv.session is not None
        # the restored history starts with the reverted version's (LiveKit adds its
        # start items after it)
        restored = live(conv.session)[0]
        assert restored[: len(conv.saved[oldest][0])] == conv.saved[oldest][0]
        for n in range(80):
            await conv.say()
            if n % 2:
                conv.truncate()
            await conv.checkpoint()
            if n % 20 == 19:
                await conv.check_retained()
    finally:
        await conv.close()


async def test_cli_reads_of_a_long_session_match_the_store_and_trimmed_is_typed(
    url: str, store: Store
) -> None:
    """After 80 checkpoints: `history` lists exactly the retained versions, `show
    --version` and `export --version` of each give its conversation, `diff` of the
    oldest and newest agrees with their items; a version just trimmed is a clear
    SnapshotNotFound from `show`, `export` and `diff`, never another snapshot."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for _ in range(80):
            await conv.say()
            conv.truncate()
            await conv.checkpoint()
    finally:
        await conv.close()
    retained = await conv.check_retained()
    listed = await asyncio.to_thread(cli_json, url, "history", conv.key)
    rows = listed if isinstance(listed, list) else listed.get("versions", listed)
    assert [r["version"] for r in rows] == retained
    for v in (retained[0], retained[len(retained) // 2], retained[-1]):
        shown = await asyncio.to_thread(cli_json, url, "show", conv.key, "--version", str(v))
        text = json.dumps(shown)
        for item in conv.saved[v][0]:
            assert item["id"] in text, (v, item["id"])
        out = await acli(url, "export", conv.key, "-o", "-", "--version", str(v))
        assert out.exit_code == 0, out.output
    a, b = retained[0], retained[-1]
    d = await asyncio.to_thread(cli_json, url, "diff", conv.key, str(a), str(b))
    ids_a = {i["id"] for i in conv.saved[a][0]}
    ids_b = {i["id"] for i in conv.saved[b][0]}
    hist = d["streams"]["history"]
    assert {i["id"] for i in hist["added"]} == ids_b - ids_a
    assert {i["id"] for i in hist["removed"]} == ids_a - ids_b
    gone = retained[0] - 1
    for args in (
        ("show", conv.key, "--version", str(gone)),
        ("export", conv.key, "-o", "-", "--version", str(gone)),
        ("diff", conv.key, str(gone), str(b)),
    ):
        result = await acli(url, "--json", *args)
        assert result.exit_code != 0, (args, result.output)
        assert "SnapshotNotFound" in result.output or "SnapshotNotFound" in (result.stderr or ""), (
            args,
            result.output,
        )


def handoff_count(session: AgentSession[Any]) -> int:
    return sum(1 for i in session.history.items if i.type == "agent_handoff")


async def test_handoffs_back_and_forth_over_a_long_call(url: str, store: Store) -> None:
    """The call is handed between two agents every 7 turns (each handoff writes the
    agent's context whole), the history truncated each turn: every retained version
    reads as saved, with the agent that was current then."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    agents: dict[int, str] = {}
    try:
        for n in range(160):
            assert conv.session is not None
            if n % 7 == 6:
                current = conv.session.current_agent
                handoffs = handoff_count(conv.session)
                conv.session.update_agent(child.Scribe() if isinstance(current, Clerk) else Clerk())
                # the handoff lands in the history asynchronously: wait for it, so that
                # what is compared is what the checkpoint read
                for _ in range(500):
                    if handoff_count(conv.session) > handoffs:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
            await conv.say()
            conv.truncate()
            v = await conv.checkpoint()
            agents[v] = type(conv.session.current_agent).__name__
            if n % 40 == 39:
                for kept in await conv.check_retained():
                    snap = await snapshot(store, conv.key, kept)
                    assert snap.agent is not None
                    assert snap.agent.agent_id.lower() == agents[kept].lower(), kept
    finally:
        await conv.close()


async def test_history_truncated_while_the_agent_context_keeps_everything(
    url: str, store: Store
) -> None:
    """The app truncates the session's history but not the agent's own context (whose
    items were stored as references to the history's): every retained version reads
    as saved, and a restore gives the agent its whole context back."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for n in range(120):
            await conv.say()
            assert conv.session is not None
            conv.session.history.truncate(max_items=WINDOW)
            await conv.checkpoint()
            if n % 30 == 29:
                await conv.check_retained()
        assert conv.rs is not None and conv.session is not None
        v = await conv.rs.suspend()
        conv.saved[v] = live(conv.session)
        await conv.close()
        await conv.open()
        assert conv.session is not None
        agent_ctx = ctx_to_data(conv.session.current_agent._chat_ctx)
        ids = [i["id"] for i in agent_ctx]
        for item in conv.saved[v][1]:
            assert item["id"] in ids
    finally:
        await conv.close()


async def test_turn_count_and_items_listed_stay_right_over_a_long_call(
    url: str, store: Store
) -> None:
    """Over 150 turns, restores and truncation: each version's meta.turn_count is the
    number of user turns so far, and `history` lists its item count."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    turns: dict[int, int] = {}
    try:
        for n in range(150):
            await conv.say()
            conv.truncate()
            v = await conv.checkpoint()
            turns[v] = conv.turn
            if n % 37 == 36:
                await conv.close()
                await conv.open(takeover=True)
    finally:
        await conv.close()
    rows = await asyncio.to_thread(cli_json, url, "history", conv.key)
    for row in rows:
        v = row["version"]
        snap = await snapshot(store, conv.key, v)
        assert snap.meta.turn_count == turns[v], (v, snap.meta.turn_count, turns[v])
        assert row["items"] == len(conv.saved[v][0]), (v, row["items"])


async def test_export_of_an_old_retained_version_imports_as_it_was(
    url: str, store: Store, tmp_path: Path
) -> None:
    """`export --version` of the oldest retained version of a long session, imported
    under another key, reads back as that version was saved."""
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    await conv.open()
    try:
        for _ in range(90):
            await conv.say()
            conv.truncate()
            await conv.checkpoint()
    finally:
        await conv.close()
    oldest = (await store.versions(conv.key))[0].version
    out = tmp_path / "old.lkrs"
    r = await acli(url, "export", conv.key, "-o", str(out), "--version", str(oldest))
    assert r.exit_code == 0, r.output
    other = conv.key + "-copy"
    r = await acli(url, "import", str(out), "--key", other)
    assert r.exit_code == 0, r.output
    snap = await snapshot(store, other)
    assert stored_form(snap) == conv.saved[oldest]


@pytest.mark.parametrize("keep", [1, 2, 3])
async def test_a_small_keep_over_many_checkpoints_and_reverts(url: str, keep: int) -> None:
    """``keep`` 1 to 3: after hundreds of checkpoints, reverts in between (keep 2, 3)
    and compactions, exactly ``keep`` versions are listed and read as saved."""
    store = open_store(url, keep=keep)
    conv = Conversation(store, f"room-{uuid.uuid4().hex[:6]}")
    try:
        await conv.open()
        for n in range(200):
            await conv.say()
            conv.truncate()
            await conv.checkpoint()
            if n % 50 == 49:
                await conv.check_retained(keep)
                if keep > 1:
                    assert conv.rs is not None and conv.session is not None
                    v = await conv.rs.suspend()
                    conv.saved[v] = live(conv.session)
                    await conv.close()
                    oldest = (await store.versions(conv.key))[0].version
                    # the command line's store keeps what the workers' does
                    r = await acli(
                        url, "revert", conv.key, str(oldest), env={"RESUME_KEEP": str(keep)}
                    )
                    assert r.exit_code == 0, r.output
                    conv.saved[v + 1] = conv.saved[oldest]
                    await conv.check_retained(keep)
                    await conv.open()
        await conv.check_retained(keep)
        held = await footprint(url, conv.key)
        if url.startswith("sqlite"):
            assert held["versions"] == keep
            # at most the generations of the kept versions, each folded under 2x+slack
            assert held["log"] <= keep * (2 * 2 * (WINDOW + 4) + COMPACT_SLACK), held
        else:
            # the head, each kept version's record and body, a log per kept version
            assert held["keys"] <= 1 + 3 * keep, held
    finally:
        await conv.close()
        await store.aclose()
