"""Hunt (area: migrate): an operator moves conversations between stores, namespaces and
machines with ``livekit-resume export`` / ``import`` (docs/cli.md, docs/security.md
"rotate", docs/schema.md "Exports ... go through the same upcasters").

Promise under test: a conversation exported and imported restores in a real
`AgentSession` (scripted LLM, `ResumableSession.restore`) with its history, agent
(handoffs, agent state), userdata, tool state and state intact; bad input gets a typed
error (exit 1, ``error (Type)``) and nothing stored changes.

The CLI runs in-process (typer's CliRunner, as tests/test_cli.py does); Redis is the
session-scoped ``redis_server`` fixture (a real redis-server on a free loopback port).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from pydantic import BaseModel
from typer.testing import CliRunner, Result

import livekit_resume as lr
from livekit_resume.cli import app
from livekit_resume.snapshot.codec import DEFAULT_MAX_FRAME
from livekit_resume.snapshot.repair import INTERRUPTED_OUTPUT
from tests.lk.scripted_llm import ScriptedLLM, ToolCall, make_text_session

T = 5.0


def keyspec(kid: str, seed: bytes | None = None) -> str:
    raw = (seed or kid.encode()) * 32
    return f"{kid}:{base64.b64encode(raw[:32]).decode()}"


def cli(url: str, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Result:
    return CliRunner().invoke(app, ["--store", url, *args], env=env, **kw)


def cli_json(url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    r = cli(url, "--json", *args, env=env)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return json.loads(r.stdout)


def state_of(url: str, env: dict[str, str] | None = None, ns: str | None = None) -> Any:
    """What ls and history show: to tell that a refused command changed nothing."""
    pre = ["--namespace", ns] if ns else []
    sessions = cli_json(url, *pre, "ls", env=env)
    for s in sessions:
        s.pop("lease_expires_in", None)
        s.pop("updated_at", None)
    return sessions, {s["key"]: cli_json(url, *pre, "history", s["key"], env=env) for s in sessions}


# ------------------------------------------------------------------ the agents


GATE: list[asyncio.Event] = []


class Notes(BaseModel):
    facts: list[str] = []
    vip: bool = False


class Front(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the front desk.")

    @function_tool
    async def remember(self, context: RunContext[Notes], fact: str) -> str:
        """Remember a fact.

        Args:
            fact: the fact
        """
        context.userdata.facts.append(fact)
        return f"remembered {fact}"

    @function_tool
    async def to_billing(self, context: RunContext[Notes]) -> tuple[Agent, str]:
        """Hand the caller to billing."""
        return Billing(), "to billing"


class Billing(Agent):
    def __init__(self, invoice: str | None = None) -> None:
        super().__init__(instructions="You handle invoices.")
        self.invoice = invoice

    def snapshot_state(self) -> dict[str, Any]:
        return {"invoice": self.invoice}

    @function_tool
    async def send_invoice(self, context: RunContext[Notes], amount: int) -> str:
        """Send an invoice.

        Args:
            amount: the amount
        """
        self.invoice = f"inv-{amount}"
        return f"invoice of {amount} sent"

    @function_tool
    async def slow_refund(self, context: RunContext[Notes]) -> str:
        """Refund (slowly)."""
        await GATE[-1].wait()
        return "refund done"


def registry() -> lr.AgentRegistry:
    reg = lr.AgentRegistry()
    reg.register(Front)
    reg.register(Billing, factory=lambda state: Billing(**(state or {})))
    return reg


async def turn(session: AgentSession[Any], text: str) -> None:
    await asyncio.wait_for(asyncio.ensure_future(session.run(user_input=text)), T)


async def converse(url: str, key: str, *, ns: str | None = None, **codec: Any) -> list[str]:
    """A conversation with a fact remembered, a handoff, agent state, a tool still
    running at the last save; then the worker dies. Returns the ids of the saved history."""
    store = lr.open_store(url, namespace=ns) if ns else lr.open_store(url)
    GATE.append(asyncio.Event())
    try:
        model = ScriptedLLM(
            [
                [ToolCall("remember", {"fact": "blue door"}, call_id="call_r1")],
                "noted",
                [ToolCall("to_billing", {}, call_id="call_h1")],
                "billing here",
                [ToolCall("send_invoice", {"amount": 42}, call_id="call_i1")],
                "sent",
                [ToolCall("slow_refund", {}, call_id="call_slow")],
            ],
            default="ok",
        )
        session = make_text_session(model, userdata=Notes())
        rs = lr.ResumableSession(
            store, key, registry=registry(), userdata_type=Notes, autosave=False, **codec
        )
        agent = await asyncio.wait_for(rs.restore(session, default=Front), T)
        await asyncio.wait_for(session.start(agent), T)
        await turn(session, "remember the blue door")
        await asyncio.wait_for(rs.checkpoint("turn"), T)
        session.userdata.vip = True
        await turn(session, "billing please")
        await asyncio.wait_for(rs.checkpoint("turn"), T)
        await turn(session, "invoice me 42")
        assert isinstance(session.current_agent, Billing)
        running: asyncio.Future[Any] = asyncio.ensure_future(session.run(user_input="refund me"))
        started = asyncio.Event()

        def on_update(ev: Any) -> None:
            fc = getattr(ev.update, "function_call", None)
            if fc is not None and fc.call_id == "call_slow":
                started.set()

        session.on("tool_execution_updated", on_update)
        await asyncio.wait_for(started.wait(), T)
        await asyncio.wait_for(rs.checkpoint("tool"), T)
        ids = [i.id for i in session.history.items]
        GATE[-1].set()
        running.cancel()
        # the worker dies here (its machine is retired): no final save
        await asyncio.wait_for(rs._detach_and_release(), T)
        await asyncio.wait_for(session.aclose(), T)
        return ids
    finally:
        await store.aclose()


async def restore_and_check(
    url: str, key: str, saved_ids: list[str], *, ns: str | None = None, **codec: Any
) -> None:
    """The promise: history, agent, agent state, userdata, tool state come back."""
    store = lr.open_store(url, namespace=ns) if ns else lr.open_store(url)
    try:
        model = ScriptedLLM([], default="back")
        session = make_text_session(model, userdata=Notes())
        rs = lr.ResumableSession(
            store, key, registry=registry(), userdata_type=Notes, autosave=False, **codec
        )
        agent = await asyncio.wait_for(rs.restore(session, default=Front), T)
        assert rs.resumed
        restored = [i.id for i in session.history.items]
        # DESIGN.md "Restore must be exact": the saved items first, each exactly once
        assert restored[: len(saved_ids)] == saved_ids, (saved_ids, restored)
        assert len(set(restored)) == len(restored)
        assert isinstance(agent, Billing), type(agent)
        assert agent.invoice == "inv-42"
        assert session.userdata == Notes(facts=["blue door"], vip=True)
        # the tool in flight at the save is answered "interrupted" in the agent's context
        outs = [
            i
            for i in agent.chat_ctx.items
            if isinstance(i, llm.FunctionCallOutput) and i.call_id == "call_slow"
        ]
        assert outs and INTERRUPTED_OUTPUT.split(":")[0] in outs[0].output, outs
        await asyncio.wait_for(session.start(agent), T)
        await turn(session, "still there?")
        req = model.requests[-1]
        assert any(
            isinstance(i, llm.FunctionCallOutput) and i.call_id == "call_i1" for i in req.items
        )
        await asyncio.wait_for(rs.aclose(), T)
        await asyncio.wait_for(session.aclose(), T)
    finally:
        await store.aclose()


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/single.db"


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    server = request.getfixturevalue("redis_server")
    monkeypatch.delenv("RESUME_NAMESPACE", raising=False)
    return str(server.url)


def ns() -> str:
    return f"mig{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ round trips


def test_sqlite_to_redis_namespace_restores_handoff_state_userdata_and_tool_state(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """cli.md: export writes the snapshot to a file, import commits it as the session's
    next version; snapshots.md: the agent (handoff), its snapshot_state, userdata and the
    tool calls in flight are captured. Moved from the SQLite default to a Redis
    namespace, a real AgentSession restores all of it."""
    key = "room-move-1"
    saved = asyncio.run(converse(sqlite_url, key))
    f = tmp_path / "move.lkrs"
    r = cli(sqlite_url, "--json", "export", key, "-o", str(f))
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["key"] == key and out["bytes"] == f.stat().st_size
    target = ns()
    r = cli(redis_url, "--namespace", target, "--json", "import", str(f))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    listed = cli_json(redis_url, "--namespace", target, "ls")
    assert [s["key"] for s in listed] == [key]
    assert listed[0]["state"] == "active"
    hist = cli_json(redis_url, "--namespace", target, "history", key)
    assert [h["source"] for h in hist] == ["import"]
    asyncio.run(restore_and_check(redis_url, key, saved, ns=target))


def test_rotation_export_under_the_old_key_import_under_the_new_restores_with_new_only(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """security.md, rotation: "rewrite a session whole with the first key: export KEY -o f
    && import f --key KEY"; after step 5 (old key removed) the rewritten session reads.
    Here across stores: a SQLite store signed with 'old', exported with the workers'
    list 'new,old', imported into Redis; a worker given only 'new' restores it."""
    old, new = keyspec("old"), keyspec("new")
    key = "room-rot"
    saved = asyncio.run(converse(sqlite_url, key, signing_keys=old))
    both = {"RESUME_SIGNING_KEYS": f"{new},{old}"}
    f = tmp_path / "rot.lkrs"
    assert cli(sqlite_url, "export", key, "-o", str(f), env=both).exit_code == 0
    target = ns()
    r = cli(redis_url, "--namespace", target, "import", str(f), env=both)
    assert r.exit_code == 0, r.stderr
    # only the new key now: the imported version reads
    only_new = {"RESUME_SIGNING_KEYS": new}
    shown = cli(redis_url, "--namespace", target, "--json", "show", key, env=only_new)
    assert shown.exit_code == 0, shown.stderr
    asyncio.run(restore_and_check(redis_url, key, saved, ns=target, signing_keys=new))


def test_encrypted_export_into_a_store_without_that_key_is_refused_and_changes_nothing(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """cli.md: export is "signed/encrypted like the store's"; exit codes: a foreign
    snapshot is `SignatureMismatch` (exit 1). An encrypted export brought to a target that
    has another encryption key, or none, is refused; nothing stored changes."""
    enc = keyspec("e1")
    key = "room-enc"
    asyncio.run(converse(sqlite_url, key, encryption_keys=enc))
    f = tmp_path / "enc.lkrs"
    r = cli(sqlite_url, "export", key, "-o", str(f), env={"RESUME_ENCRYPTION_KEYS": enc})
    assert r.exit_code == 0, r.stderr
    assert b"blue door" not in f.read_bytes()
    target = ns()
    # something already there, to see it unchanged
    r = cli(
        redis_url,
        "--namespace",
        target,
        "import",
        str(f),
        "--key",
        "other",
        env={"RESUME_ENCRYPTION_KEYS": enc},
    )
    assert r.exit_code == 0, r.stderr
    before = state_of(redis_url, ns=target, env={"RESUME_ENCRYPTION_KEYS": enc})
    for env in ({"RESUME_ENCRYPTION_KEYS": keyspec("e2")}, {"RESUME_ENCRYPTION_KEYS": ""}):
        bad = cli(redis_url, "--namespace", target, "import", str(f), env=env)
        assert bad.exit_code == 1, (env, bad.stdout, bad.stderr)
        assert "error (SignatureMismatch)" in bad.stderr, bad.stderr
        bad = cli(
            redis_url, "--namespace", target, "--json", "import", str(f), "--key", "other", env=env
        )
        assert bad.exit_code == 1
        assert json.loads(bad.stderr)["error"] == "SignatureMismatch"
    assert state_of(redis_url, ns=target, env={"RESUME_ENCRYPTION_KEYS": enc}) == before


def test_signed_export_into_an_unsigned_target_and_unsigned_into_signed(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """cli.md: the CLI "writes nothing they cannot read". A signed export brought to a
    target whose workers have no keys is refused (a signature no one can check), and an
    unsigned export brought to a signed target is refused (an unauthenticated frame where
    keys are set): typed errors, exit 1, nothing changed."""
    sign = keyspec("s1")
    asyncio.run(converse(sqlite_url, "room-s", signing_keys=sign))
    asyncio.run(converse(sqlite_url, "room-u"))
    fs, fu = tmp_path / "s.lkrs", tmp_path / "u.lkrs"
    assert (
        cli(
            sqlite_url, "export", "room-s", "-o", str(fs), env={"RESUME_SIGNING_KEYS": sign}
        ).exit_code
        == 0
    )
    assert cli(sqlite_url, "export", "room-u", "-o", str(fu)).exit_code == 0
    target = ns()
    before = state_of(redis_url, ns=target)
    r = cli(redis_url, "--namespace", target, "import", str(fs), env={"RESUME_SIGNING_KEYS": ""})
    assert r.exit_code == 1 and "SignatureMismatch" in r.stderr, (r.stdout, r.stderr)
    r = cli(redis_url, "--namespace", target, "import", str(fu), env={"RESUME_SIGNING_KEYS": sign})
    assert r.exit_code == 1 and "SignatureMismatch" in r.stderr, (r.stdout, r.stderr)
    assert state_of(redis_url, ns=target) == before


def test_export_of_an_older_version_imported_then_history_and_diff_on_the_target(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """cli.md: `export KEY -o FILE --version V` writes that version; `import` commits it
    as the next version (`history`: source import); `diff KEY A B` reports by item id
    what changed. Importing version 1 over a target already holding the latest makes
    the items after version 1 'removed' and the userdata change back."""
    key = "room-ver"
    asyncio.run(converse(sqlite_url, key))
    hist = cli_json(sqlite_url, "history", key)
    assert len(hist) >= 2
    latest_f, v1_f = tmp_path / "latest.lkrs", tmp_path / "v1.lkrs"
    assert cli(sqlite_url, "export", key, "-o", str(latest_f)).exit_code == 0
    r = cli(sqlite_url, "--json", "export", key, "-o", str(v1_f), "--version", "1")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    target = ns()
    pre = ["--namespace", target]
    assert cli(redis_url, *pre, "import", str(latest_f)).exit_code == 0
    r = cli(redis_url, *pre, "--json", "import", str(v1_f))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 2
    thist = cli_json(redis_url, *pre, "history", key)
    assert [h["version"] for h in thist] == [1, 2]
    assert [h["source"] for h in thist] == ["import", "import"]
    assert thist[1]["items"] == hist[0]["items"]
    assert thist[0]["items"] == hist[-1]["items"]
    d = cli_json(redis_url, *pre, "diff", key, "1", "2")
    src = cli_json(sqlite_url, "diff", key, "1", str(hist[-1]["version"]))
    # the reverse of the source's diff from 1 to latest
    assert [i["id"] for i in d["streams"]["history"]["removed"]] == [
        i["id"] for i in src["streams"]["history"]["added"]
    ]
    assert d["streams"]["history"]["added"] == []
    assert d["userdata"] == (
        None
        if src["userdata"] is None
        else {"from": src["userdata"]["to"], "to": src["userdata"]["from"]}
    )
    assert d["agent"] == (
        None if src["agent"] is None else {"from": src["agent"]["to"], "to": src["agent"]["from"]}
    )


def test_import_from_stdin_round_trips(sqlite_url: str, tmp_path: Path) -> None:
    """cli.md: `export -o -` writes to stdout, `import -` reads stdin (a pipe between
    two machines' shells)."""
    key = "room-pipe"
    saved = asyncio.run(converse(sqlite_url, key))
    out = cli(sqlite_url, "export", key, "-o", "-")
    assert out.exit_code == 0
    other = f"sqlite:///{tmp_path}/other.db"
    r = cli(other, "--json", "import", "-", input=out.stdout_bytes)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["key"] == key
    asyncio.run(restore_and_check(other, key, saved))


# ------------------------------------------------------------------ ended, archives


async def talk(
    url: str,
    key: str,
    lines: list[str],
    *,
    finish: str,
    ns: str | None = None,
    userdata: Notes | None = None,
) -> list[str]:
    """A Front conversation: each line a turn and a checkpoint, then ``finish``
    (``end``, ``suspend``, or ``hold``: the lease kept, the session returned open)."""
    store = lr.open_store(url, namespace=ns) if ns else lr.open_store(url)
    try:
        model = ScriptedLLM(default="ok")
        session = make_text_session(model, userdata=userdata or Notes())
        rs = lr.ResumableSession(
            store, key, registry=registry(), userdata_type=Notes, autosave=False
        )
        agent = await asyncio.wait_for(rs.restore(session, default=Front), T)
        await asyncio.wait_for(session.start(agent), T)
        for line in lines:
            await turn(session, line)
            await asyncio.wait_for(rs.checkpoint("turn"), T)
        ids = [i.id for i in session.history.items]
        if finish == "end":
            await asyncio.wait_for(rs.end(), T)
        else:
            await asyncio.wait_for(rs.suspend(), T)
        await asyncio.wait_for(session.aclose(), T)
        return ids
    finally:
        await store.aclose()


async def texts_restored(url: str, key: str) -> tuple[bool, list[str]]:
    store = lr.open_store(url)
    try:
        session = make_text_session(ScriptedLLM(default="ok"), userdata=Notes())
        rs = lr.ResumableSession(
            store, key, registry=registry(), userdata_type=Notes, autosave=False
        )
        await asyncio.wait_for(rs.restore(session, default=Front), T)
        out = [
            i.text_content or ""
            for i in session.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        resumed = rs.resumed
        await asyncio.wait_for(rs.aclose(), T)
        return resumed, out
    finally:
        await store.aclose()


def test_export_of_an_archive_imported_under_a_new_key_lists_and_shows(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """lifecycle.md: an ended conversation is kept aside under `<key>~v<version>` by the
    next restore; cli.md: `export` of any key, `import --key K`. The archive exported
    from SQLite and imported into Redis under another key is listed `ended` there and its
    transcript is the ended conversation's; a restore of it never resumes it (ended)."""
    key = "room-arch"
    asyncio.run(talk(sqlite_url, key, ["first call line"], finish="end"))
    resumed, _ = asyncio.run(texts_restored(sqlite_url, key))
    assert not resumed
    keys = [s["key"] for s in cli_json(sqlite_url, "ls")]
    archive = [k for k in keys if k.startswith(f"{key}~v")]
    assert archive, keys
    f = tmp_path / "arch.lkrs"
    r = cli(sqlite_url, "export", archive[0], "-o", str(f))
    assert r.exit_code == 0, r.stderr
    target = ns()
    pre = ["--namespace", target]
    r = cli(redis_url, *pre, "--json", "import", str(f), "--key", "kept-1")
    assert r.exit_code == 0, r.stderr
    listed = cli_json(redis_url, *pre, "ls")
    assert [(s["key"], s["state"]) for s in listed] == [("kept-1", "ended")]
    shown = cli(redis_url, *pre, "show", "kept-1")
    assert shown.exit_code == 0 and "first call line" in shown.stdout
    # and without --key it keeps the archive's own name
    r = cli(redis_url, *pre, "--json", "import", str(f))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["key"] == archive[0]


def test_import_of_an_ended_export_over_a_live_conversation_loses_no_conversation(
    sqlite_url: str, tmp_path: Path
) -> None:
    """cli.md: import commits the file "as the session's next version"; lifecycle.md: "An
    ended conversation is kept aside whatever the timing" and the next call starts anew.
    An operator imports an ended conversation's export onto a key that holds another,
    suspended conversation. The next call must not resume the ended one, and neither
    conversation may be lost: the ended one kept aside, the one that was on the key
    still readable (as an older version of the key, or kept aside too)."""
    asyncio.run(talk(sqlite_url, "src", ["ended topic"], finish="end"))
    f = tmp_path / "ended.lkrs"
    assert cli(sqlite_url, "export", "src", "-o", str(f)).exit_code == 0
    asyncio.run(talk(sqlite_url, "dst", ["live topic one", "live topic two"], finish="suspend"))
    r = cli(sqlite_url, "--json", "import", str(f), "--key", "dst")
    assert r.exit_code == 0, r.stderr
    assert cli_json(sqlite_url, "ls", "--prefix", "dst")[0]["state"] == "ended"
    resumed, texts = asyncio.run(texts_restored(sqlite_url, "dst"))
    assert not resumed and texts == []
    # every user line ever stored is still somewhere in the store
    found: set[str] = set()
    for s in cli_json(sqlite_url, "ls"):
        for h in cli_json(sqlite_url, "history", s["key"]):
            shown = cli(sqlite_url, "--json", "show", s["key"], "--version", str(h["version"]))
            if shown.exit_code == 0:
                found |= {
                    w
                    for w in ("ended topic", "live topic one", "live topic two")
                    if w in shown.stdout
                }
    assert found == {"ended topic", "live topic one", "live topic two"}, found


def test_import_into_a_key_removed_by_rm_fences_its_old_holder(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """cli.md `rm`: a tombstone fences the old holder, "the deleted conversation is never
    written back", and "a new session under it starts above every epoch of the deleted
    one". An import into the removed key is such a new session: the old holder's lease
    stays refused (LeaseLost) and the import stays the latest."""
    for url in (sqlite_url, redis_url):
        target = ns()
        pre = ["--namespace", target]
        key = "room-tomb"
        asyncio.run(talk(url, key, ["old line"], finish="suspend", ns=target))
        f = tmp_path / f"t{target}.lkrs"
        assert cli(url, *pre, "export", key, "-o", str(f)).exit_code == 0

        async def scenario(
            url: str = url, target: str = target, key: str = key, pre: list[str] = pre, f: Path = f
        ) -> None:
            store = lr.open_store(url, namespace=target)
            try:
                lease = await store.acquire(key, "zombie", ttl=60)
                r = await asyncio.to_thread(cli, url, *pre, "rm", key, "--yes")
                assert r.exit_code == 0, r.stderr
                r = await asyncio.to_thread(cli, url, *pre, "--json", "import", str(f))
                assert r.exit_code == 0, r.stderr
                hist = await asyncio.to_thread(cli_json, url, *pre, "history", key)
                assert hist[-1]["epoch"] > lease.epoch
                with pytest.raises(lr.LeaseLost):
                    await store.renew(lease)
            finally:
                await store.aclose()

        asyncio.run(scenario())
        resumed, texts = asyncio.run(texts_restored_ns(url, key, target))
        assert resumed and texts == ["old line"]


async def texts_restored_ns(url: str, key: str, ns_: str) -> tuple[bool, list[str]]:
    store = lr.open_store(url, namespace=ns_)
    try:
        session = make_text_session(ScriptedLLM(default="ok"), userdata=Notes())
        rs = lr.ResumableSession(
            store, key, registry=registry(), userdata_type=Notes, autosave=False
        )
        await asyncio.wait_for(rs.restore(session, default=Front), T)
        out = [
            i.text_content or ""
            for i in session.history.items
            if isinstance(i, llm.ChatMessage) and i.role == "user"
        ]
        resumed = rs.resumed
        await asyncio.wait_for(rs.aclose(), T)
        return resumed, out
    finally:
        await store.aclose()


# ------------------------------------------------------------------ large sessions


def test_a_session_larger_than_one_frame_moves_whole_and_a_cut_file_writes_nothing(
    sqlite_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """failure-model.md: "`export` of a session larger than one frame writes a head frame
    and one frame per item, which `import` reads"; a truncated file is refused
    (`SnapshotCorrupt`) and nothing is written. The frame limit is lowered (the CLI's
    `_MAX_FRAME`) so a few turns exceed one frame."""
    from livekit_resume.cli import snapshots as cli_snapshots

    key = "room-big"
    lines = [f"remember line {n}: " + "x" * 300 for n in range(12)]
    saved = asyncio.run(talk(sqlite_url, key, lines, finish="suspend"))
    monkeypatch.setattr(cli_snapshots, "_MAX_FRAME", 2048)
    f = tmp_path / "big.lkrs"
    r = cli(sqlite_url, "--json", "export", key, "-o", str(f))
    assert r.exit_code == 0, r.stderr
    from livekit_resume.snapshot.frame import read_frames

    with open(f, "rb") as fh:
        frames = read_frames(fh, max_frame=2048)
    assert len(frames) > 2
    target = ns()
    pre = ["--namespace", target]
    # cut after each frame but the last: refused, nothing written
    data = f.read_bytes()
    cut = tmp_path / "cut.lkrs"
    ends = []
    pos = 0
    for fr in frames[:-1]:
        pos += len(fr)
        ends.append(pos)
    for end in (ends[0], ends[len(ends) // 2], ends[-1], len(data) - 1):
        cut.write_bytes(data[:end])
        bad = cli(redis_url, *pre, "--json", "import", str(cut))
        assert bad.exit_code == 1, (end, bad.stdout)
        assert json.loads(bad.stderr)["error"] == "SnapshotCorrupt", bad.stderr
    assert cli_json(redis_url, *pre, "ls") == []
    r = cli(redis_url, *pre, "--json", "import", str(f))
    assert r.exit_code == 0, r.stderr
    monkeypatch.setattr(cli_snapshots, "_MAX_FRAME", DEFAULT_MAX_FRAME)

    async def check() -> None:
        store = lr.open_store(redis_url, namespace=target)
        try:
            session = make_text_session(ScriptedLLM(default="ok"), userdata=Notes())
            rs = lr.ResumableSession(
                store, key, registry=registry(), userdata_type=Notes, autosave=False
            )
            await asyncio.wait_for(rs.restore(session, default=Front), T)
            got = [i.id for i in session.history.items]
            assert got[: len(saved)] == saved
            await asyncio.wait_for(rs.aclose(), T)
        finally:
            await store.aclose()

    asyncio.run(check())


# ------------------------------------------------------------------ live sessions


_ROOT = Path(__file__).resolve().parent.parent


async def _cli_proc(url: str, *args: str) -> tuple[int, bytes, bytes]:
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT / "src"), str(_ROOT)])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livekit_resume",
        "--store",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


def test_export_while_the_session_is_live_and_checkpointing_is_one_whole_version(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """DESIGN.md Stores, Atomic: "A reader never sees half a snapshot"; cli.md: export
    writes "the snapshot" (a version). Exports taken by another process while a worker
    talks and autosaves are each one whole committed version: its history is a version's
    history, and it imports and restores elsewhere."""
    from livekit_resume.snapshot.codec import Codec

    for url in (sqlite_url, redis_url):
        target = ns()
        key = "room-live"

        async def scenario(
            url: str = url, target: str = target, key: str = key
        ) -> list[tuple[int, Any]]:
            store = lr.open_store(url, namespace=target)
            exports: list[tuple[int, Any]] = []
            try:
                session = make_text_session(ScriptedLLM(default="ok"), userdata=Notes())
                rs = lr.ResumableSession(
                    store, key, registry=registry(), userdata_type=Notes, debounce=0.0
                )
                agent = await asyncio.wait_for(rs.restore(session, default=Front), T)
                await asyncio.wait_for(session.start(agent), T)
                await turn(session, "hello 0")
                await asyncio.wait_for(rs.checkpoint("turn"), T)
                for n in range(1, 2):
                    talking = asyncio.ensure_future(turn(session, f"hello {n}"))
                    code, out, err = await _cli_proc(
                        url, "--namespace", target, "export", key, "-o", "-"
                    )
                    assert code == 0, err
                    exports.append((n, Codec().decode(out)))
                    await talking
                await asyncio.wait_for(rs.checkpoint("turn"), T)
                versions = {}
                for v in await store.versions(key):
                    stored = await store.load(key, v.version)
                    snap = Codec(namespace=target).decode_parts(key, stored.head, stored.streams)
                    versions[v.version] = snap
                for _n, snap in exports:
                    assert snap.version in versions
                    assert snap.history == versions[snap.version].history
                    assert snap.agent == versions[snap.version].agent
                await asyncio.wait_for(rs.aclose(), T)
                await asyncio.wait_for(session.aclose(), T)
            finally:
                await store.aclose()
            return exports

        asyncio.run(scenario())


def test_an_export_of_a_trimmed_version_is_a_typed_error(sqlite_url: str, tmp_path: Path) -> None:
    """cli.md: export --version V of a version not retained is `SnapshotNotFound`
    (exit 1), and no file is written."""
    key = "room-trim"
    asyncio.run(talk(sqlite_url, key, ["a"], finish="suspend"))
    f = tmp_path / "none.lkrs"
    r = cli(sqlite_url, "--json", "export", key, "-o", str(f), "--version", "99")
    assert r.exit_code == 1
    assert json.loads(r.stderr)["error"] == "SnapshotNotFound"
    assert not f.exists()


def test_an_old_format_1_export_imports_and_restores_with_its_pending_tool(
    sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """schema.md: "Exports ... are frames too, and go through the same upcasters when
    imported"; format 1 kept unanswered calls as `pending_tools` and an item's time as
    `timestamp`. A format 1 export (an old backup) imports into Redis and restores with
    its items in order and the pending call answered "interrupted"."""
    from livekit_resume.cli.snapshots import make_codec

    key = "room-old"
    asyncio.run(converse(sqlite_url, key))
    f = tmp_path / "cur.lkrs"
    assert cli(sqlite_url, "export", key, "-o", str(f)).exit_code == 0
    codec = make_codec()
    snap = codec.decode(f.read_bytes())
    assert snap.tool_calls, "the converse() snapshot holds the running refund call"
    data = snap.model_dump(mode="python")
    for item in data["history"]:
        item["timestamp"] = item.pop("created_at")
    if data.get("agent"):
        for item in data["agent"]["chat_ctx"]:
            item["timestamp"] = item.pop("created_at")
    data["pending_tools"] = [
        {"call_id": c["call_id"], "name": c["name"]} for c in data.pop("tool_calls")
    ]
    old = tmp_path / "old.lkrs"
    old.write_bytes(codec.pack(data, version=1))
    target = ns()
    r = cli(redis_url, "--namespace", target, "--json", "import", str(old))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    got = make_codec().decode(
        cli(redis_url, "--namespace", target, "export", key, "-o", "-").stdout_bytes
    )
    assert [i["id"] for i in got.history] == [i["id"] for i in snap.history]
    assert [i["created_at"] for i in got.history] == [i["created_at"] for i in snap.history]
    assert [c.call_id for c in got.tool_calls] == [c.call_id for c in snap.tool_calls]
