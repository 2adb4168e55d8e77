"""Configuration drift across the workers of one cluster: two workers (or a worker and
an operator's shell) on one store with different settings, handing one conversation to
each other, as in a rolling deploy or a misconfigured fleet.

Each test failed on main before its fix (found by a reviewer). Each drives real
`AgentSession`s with the scripted LLM on a real SQLite file (and a real redis-server of
our own where the store matters), and asserts what the contract says: bad configuration
gives a typed, clear error, and nothing stored, nor any live conversation, is lost
because of it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession
from typer.testing import CliRunner

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.cli import app
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM
from tests.test_hooks import KEY, Billing, Receptionist, Visit, registry, start
from tests.test_salvage import _flip

OLD = "k1:" + base64.b64encode(b"o" * 32).decode()
NEW = "k2:" + base64.b64encode(b"n" * 32).decode()
STAGING = "stage:" + base64.b64encode(b"t" * 32).decode()
# every wait of a test is bounded by this
DEADLINE = 60.0


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RESUME_* variable of the runner's environment: each worker gets its settings
    in code, as the test says."""
    for name in list(os.environ):
        if name.upper().startswith("RESUME_"):
            monkeypatch.delenv(name)


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/fleet.db"


@pytest.fixture(params=["sqlite", "redis"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, clean_env: None) -> Callable[..., Store]:
    """Opens one more worker's store on the same backend (a SQLite file, or a namespace
    of a redis-server this test run started), with that worker's own options."""
    if request.param == "sqlite":
        url = _sqlite_url(tmp_path)
        ns: dict[str, Any] = {}
    else:
        server = request.getfixturevalue("redis_server")  # our own server, never :6379
        url = str(server.url)
        ns = {"namespace": f"drift{uuid.uuid4().hex[:8]}"}

    def open_worker_store(**options: Any) -> Store:
        return lr.open_store(url, **ns, **options)

    return open_worker_store


@pytest.fixture
async def stores() -> AsyncIterator[list[Store]]:
    """Stores a test opened, closed at its end."""
    made: list[Store] = []
    yield made
    for s in made:
        await s.aclose()


async def _bounded(coro: Any) -> Any:
    return await asyncio.wait_for(coro, DEADLINE)


def _texts(items: list[Any]) -> str:
    return " ".join(str(i.get("content")) for i in items if i.get("type") == "message")


# --------------------------------------------------------------------------------------
# 1. a takeover by a worker that cannot read the conversation


def _no_agent_registry() -> lr.AgentRegistry:
    """A registry of a deploy where ``Receptionist`` was renamed: only ``Billing``."""
    reg = lr.AgentRegistry()
    reg.register(Billing)
    return reg


DRIFTS: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception]]] = {
    # (the live worker's options, the new worker's options, the error the new one gets)
    "signing key removed too early on the new worker": (
        {"signing_keys": f"{OLD},{NEW}"},
        {"signing_keys": NEW},
        lr.SignatureMismatch,
    ),
    "encryption key rotated on one worker before the other knows it": (
        {"encryption_keys": f"{NEW},{OLD}"},
        {"encryption_keys": OLD},
        lr.SignatureMismatch,
    ),
    "agent id not registered on the new worker": (
        {},
        {"reg": _no_agent_registry()},
        lr.UnknownAgent,
    ),
}


@pytest.mark.parametrize("drift", list(DRIFTS))
async def test_a_takeover_by_a_worker_that_cannot_read_the_conversation_leaves_its_holder_saving(
    fleet: Callable[..., Store], stores: list[Store], drift: str
) -> None:
    """Contract (guide.md, "Restore, step by step"): "A failed restore releases the lease
    and leaves the store untouched"; failure-model.md: "code changed: agent class removed
    | UnknownAgent …; lease released, store unchanged | nothing". `resumable_job` restores
    every job with ``takeover=True`` ("a new job for a key another job holds takes it
    over at once").

    What happens: `ResumableSession.restore(takeover=True)` on a worker whose settings
    cannot read the conversation (a signing key removed too early, an encryption key not
    deployed there yet, an agent id renamed in the new code) takes the lease over
    *first* (`LeaseHolder.acquire_and_load`), then fails to decode and releases it. The
    typed error is right, but the epoch has moved: the live worker, which reads and
    saves the conversation fine, is fenced. Its next checkpoint is `LeaseLost`, its
    autosave stops for good and, under `resumable_job`, ``on_lost`` ends its job. Nobody
    serves the caller any more, and every turn since the last save is lost.

    Why it matters: in a rolling deploy a re-dispatch landing on a not-yet-configured (or
    badly configured) worker kills a healthy call on another worker for nothing. The CLI's
    ``revert --takeover`` was fixed for exactly this ("refused before the lease is taken:
    the version is read and decoded first"); the hooks still do it.
    """
    live_opts, new_opts, error = DRIFTS[drift]
    store_a, store_b = fleet(), fleet()
    stores += [store_a, store_b]
    s1, rs1, _ = await _bounded(
        start(store_a, ["Hello, dental practice!", "Hi Ada.", "Noted."], owner="w1", **live_opts)
    )
    await _bounded(s1.run(user_input="Hi, I'm Ada"))
    saved = await _bounded(rs1.checkpoint())

    with pytest.raises(error):
        await _bounded(start(store_b, [], owner="w2", takeover=True, **new_opts))

    # the live worker goes on saving its conversation, unfenced
    await _bounded(s1.run(user_input="my code is 4711"))
    try:
        version = await _bounded(rs1.checkpoint())
    finally:
        await _bounded(rs1.aclose())
        await _bounded(s1.aclose())
    assert version == saved + 1
    codec = codec_for(store_a, **{k: v for k, v in live_opts.items() if k.endswith("_keys")})
    stored = await _bounded(store_a.load(KEY))
    assert "4711" in _texts(from_stored(codec, stored).history)


# --------------------------------------------------------------------------------------
# 2. reconnect tokens given their keys in code


async def test_issue_and_verify_token_read_the_conversation_with_the_keys_they_are_given(
    tmp_path: Path, clean_env: None, stores: list[Store]
) -> None:
    """Contract (lifecycle.md, reconnect tokens): a token is issued for "the conversation
    the key holds now, signed with `RESUME_SIGNING_KEYS` (or the keys passed)", and the
    example passes them: ``issue_token(store, "room-42", ttl=3600, signing_keys=keys)``;
    tokens.py: "with the signing key kid (RESUME_SIGNING_KEYS, so keys rotate as they do
    for snapshots)": one key list for both.

    What happens: `issue_token` and `verify_token` sign and check the token with the
    keys passed, but read the stored conversation through `codec_for(store)`, which
    takes its keys from the environment alone. On a deployment whose workers sign their
    snapshots with the same keys given in code (``ResumableSession(signing_keys=K)``,
    no ``RESUME_SIGNING_KEYS`` on the back end that issues tokens), every `issue_token`
    raises `SignatureMismatch` ("frame is signed with key 'k1', which is not among the
    configured signing keys (RESUME_SIGNING_KEYS)") although it was given exactly that
    key. The same happens in a back end that rotated its keys in code.

    Why it matters: no client can ever get a reconnect token, and the error blames a
    key the caller did give. `tokens.issue_token`/`verify_token` should read the
    snapshot with a codec of the keys passed (``codec_for(store, signing_keys=...)``).
    """
    store = lr.open_store(_sqlite_url(tmp_path))
    stores.append(store)
    s1, rs1, _ = await _bounded(start(store, ["Hello!", "Hi Ada."], signing_keys=OLD))
    await _bounded(s1.run(user_input="Hi, I'm Ada"))
    await _bounded(rs1.suspend())
    await _bounded(s1.aclose())

    token = await _bounded(lr.issue_token(store, KEY, ttl=600, signing_keys=OLD))
    assert await _bounded(lr.verify_token(store, token, signing_keys=OLD)) == KEY


# --------------------------------------------------------------------------------------
# 3. a shorter session ttl on one worker


async def test_a_worker_with_a_shorter_session_ttl_never_purges_a_conversation_held_live(
    fleet: Callable[..., Store], stores: list[Store]
) -> None:
    """Contract (multi-worker.md, "Leases and fencing"): "`restore()` acquires the lease.
    A free or expired lease is granted; a live lease of another owner raises
    `SessionBusy`", and "A lease never outlives its session: with a session `ttl`,
    `lease_ttl` must be at most that long". failure-model.md: "two workers think they
    own a session | … | nothing stored is overwritten".

    What happens: a store judges a session expired by *its own* ``ttl``
    (`SessionRows.expired` on SQLite, ``TTL_MS`` in session.lua on Redis), whatever lease
    is live on it. Worker A (no session ttl, ``lease_ttl=20``) holds a conversation;
    worker B, configured with ``RESUME_TTL=1`` (a rolling deploy that changes the TTL, a
    misconfigured pod), restores the key without takeover 1.5 s after A's last write:
    instead of `SessionBusy`, B's acquire purges A's whole conversation as expired and
    starts a fresh one (``resumed`` False, version 0). A's next checkpoint is then
    `LeaseLost` (B holds the key), so A is fenced and the conversation is gone from the
    store and from the call.

    Why it matters: one misconfigured worker silently deletes live calls held by the
    rest of the fleet. A session whose lease is live is not idle: expiry should never
    apply while another owner's lease runs (or a session should expire by the ttl it
    was written with).
    """
    store_a, store_b = fleet(), fleet(ttl=1.0)
    stores += [store_a, store_b]
    s1, rs1, _ = await _bounded(
        start(store_a, ["Hello, dental practice!", "Hi Ada.", "Noted."], owner="w1", lease_ttl=20.0)
    )
    await _bounded(s1.run(user_input="Hi, I'm Ada"))
    saved = await _bounded(rs1.checkpoint())
    await asyncio.sleep(1.5)  # past B's session ttl, well inside A's lease
    listed = await _bounded(store_b.keys())  # what `ls` on B's settings shows

    busy = False
    try:
        s2, rs2, _ = await _bounded(start(store_b, [], owner="w2", lease_ttl=1.0))
    except lr.SessionBusy:
        busy = True
    else:
        await _bounded(rs2.aclose())
        await _bounded(s2.aclose())
    lost: lr.LeaseLost | None = None
    try:
        await _bounded(s1.run(user_input="my code is 4711"))
        version = await _bounded(rs1.checkpoint())
    except lr.LeaseLost as e:
        lost = e
    finally:
        await _bounded(rs1.aclose())
        await _bounded(s1.aclose())
    assert KEY in listed, "a listing by B's ttl hid A's live conversation"
    assert busy, "B started afresh over A's live conversation instead of SessionBusy"
    assert lost is None, f"the live holder was fenced: {lost}"
    assert version == saved + 1
    stored = await _bounded(store_a.load(KEY))
    texts = _texts(
        from_stored(Codec(namespace=getattr(store_a, "namespace", None)), stored).history
    )
    assert "Hi, I'm Ada" in texts and "4711" in texts


# --------------------------------------------------------------------------------------
# 4. salvage on a worker with a smaller max_frame


async def test_salvage_on_a_worker_with_a_smaller_max_frame_never_drops_an_intact_item(
    tmp_path: Path, clean_env: None, stores: list[Store]
) -> None:
    """Contract (failure-model.md, a damaged item record): salvage "keeps every intact
    item, puts a system note where items were lost"; what is lost is "the damaged items,
    exactly as reported". security.md: a repair shell without the workers' key "refuses
    frames it cannot read for want of a key rather than report them lost"
    (`SignatureMismatch.unknown_key`: "the frame may well be intact: it is this process's
    configuration that cannot read it, and salvage must not drop it").

    What happens: the same holds for keys but not for ``max_frame``. Worker A (a codec
    with ``max_frame`` of 1 MB, as the `SnapshotTooLarge` message advises: "give every
    worker and the CLI a larger max_frame") saves a 300 kB document the caller pasted.
    One other item record is then damaged. Worker B, still at a 200 kB limit (the rolling
    deploy has not reached it), restores with ``salvage=True``: the intact document,
    whose frame verified (CRC) and only "inflates past the limit of 200000 bytes", is
    reported lost beside the damaged item (salvage.py ``_DAMAGE`` includes
    `SnapshotTooLarge`), and the first checkpoint writes the session whole without it.
    The document is gone from every later version, although its bytes were fine.
    ``livekit-resume repair`` (fixed at the 64 MiB default) does the same to items a
    worker with a larger ``max_frame`` wrote.

    Why it matters: a configuration difference turns a repair into permanent loss of
    intact turns. An intact frame over this process's limit is configuration, not
    damage: raise (`SnapshotTooLarge`, naming max_frame) as for an unknown key.
    """
    url = _sqlite_url(tmp_path)
    store = lr.open_store(url)
    stores.append(store)
    large = Codec(max_frame=1_000_000)
    document = os.urandom(150_000).hex()
    s1, rs1, _ = await _bounded(start(store, ["Hello!", "Hi Ada.", "Got it."], codec=large))
    await _bounded(s1.run(user_input="Hi, I'm Ada"))
    await _bounded(s1.run(user_input="here is my document: " + document))
    saved = await _bounded(rs1.suspend())
    await _bounded(s1.aclose())
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:  # one record damaged
        seq, data = conn.execute(
            "SELECT seq, data FROM log WHERE key=? AND stream='history' AND data IS NOT NULL "
            "ORDER BY gen, seq LIMIT 1",
            (KEY,),
        ).fetchone()
        conn.execute(
            "UPDATE log SET data=? WHERE key=? AND seq=? AND stream='history'",
            (_flip(data), KEY, seq),
        )

    session: AgentSession[Visit] = AgentSession(llm=ScriptedLLM([], default="ok"), userdata=Visit())
    rs = lr.ResumableSession(
        store,
        KEY,
        registry=registry(),
        userdata_type=Visit,
        owner="w2",
        autosave=False,
        codec=Codec(max_frame=200_000),
    )
    try:
        agent = await _bounded(rs.restore(session, default=Receptionist, salvage=True))
    except lr.SnapshotTooLarge:
        # refused as configuration: fine, as long as nothing was written
        assert (await _bounded(store.info(KEY))).version == saved
        return
    await _bounded(session.start(agent))
    try:
        await _bounded(rs.checkpoint())
    finally:
        await _bounded(rs.aclose())
        await _bounded(session.aclose())
    stored = await _bounded(store.load(KEY))
    history = from_stored(large, stored).history
    assert document in _texts(history), "the intact document was dropped as 'damaged'"


# --------------------------------------------------------------------------------------
# 5. a worker's own codec and the store's namespace


def test_a_worker_given_a_codec_of_its_own_writes_what_the_cli_reads_with_the_same_keys(
    tmp_path: Path, clean_env: None
) -> None:
    """Contract: ResumableSession's docstring: "``codec`` replaces them with a `Codec` of
    your own (keys, ``max_frame``)" (the only way to give a worker the larger
    ``max_frame`` that `SnapshotTooLarge` recommends); security.md: the namespace is
    "bound into every frame … Every worker and the CLI of one deployment must agree";
    docs/cli.md and security.md: the CLI "decodes with the workers' keys".

    What happens: a worker on a store of namespace ``prod`` (``RESUME_NAMESPACE=prod``)
    given ``codec=Codec(signing_keys=K, max_frame=…)`` binds its frames to the codec's
    default namespace, ``lkresume``, not the store's: nothing checks that the two agree,
    and the worker saves happily. The operator then runs ``livekit-resume --namespace
    prod show KEY`` with ``RESUME_SIGNING_KEYS=K``, the very key, and gets
    ``SignatureMismatch: frame signature does not verify with key 'k1'``: the message
    blames the key, not the namespace. `issue_token` and any worker using the
    environment's codec fail the same way on those sessions.

    Why it matters: an operator cannot inspect, export or repair any conversation of such
    a deployment, and is sent after the wrong setting. Either `ResumableSession` should
    refuse a codec whose namespace is not its store's (a `ValueError` naming both), or
    bind the store's namespace.
    """
    url = _sqlite_url(tmp_path)

    async def converse() -> bool:
        store = lr.open_store(url, namespace="prod")
        try:
            try:
                s1, rs1, _ = await _bounded(
                    start(
                        store,
                        ["Hello!", "Hi Ada."],
                        codec=Codec(signing_keys=OLD, max_frame=128 << 20),
                    )
                )
            except ValueError as e:
                assert "namespace" in str(e)  # refused up front, naming the mismatch: fine
                return False
            await _bounded(s1.run(user_input="Hi, I'm Ada"))
            await _bounded(rs1.suspend())
            await _bounded(s1.aclose())
            return True
        finally:
            await store.aclose()

    if not asyncio.run(converse()):
        return
    result = CliRunner().invoke(
        app,
        ["--store", url, "--namespace", "prod", "--json", "show", KEY],
        env={"RESUME_SIGNING_KEYS": OLD},
    )
    assert result.exit_code == 0, result.output
    assert "Hi, I'm Ada" in result.stdout


# --------------------------------------------------------------------------------------
# 6. import from a shell with other keys


def test_import_from_a_shell_whose_keys_the_workers_lack_is_refused_and_changes_nothing(
    tmp_path: Path, clean_env: None
) -> None:
    """Contract: "bad input or a broken environment gives a typed error … and nothing
    stored is lost or changed"; security.md's runbook: a key goes "on every worker *and*
    wherever the CLI runs … A worker that signed with a key another worker does not know
    yet would write versions that worker refuses"; the CLI's `revert` and `repair`
    decode what the store holds before they write, and are refused when they cannot.

    What happens: an operator moves a conversation from staging into production with the
    staging shell's keys still set (``RESUME_SIGNING_KEYS=stage:…``): ``livekit-resume
    export`` from staging, then ``import FILE --key KEY`` into production. `import` never
    checks that its keys can read what the production workers wrote there (write.py
    ``import_cmd`` builds a whole version from the file alone), so it commits a new
    latest version signed with ``stage``, which no production worker holds. Every restore
    of the key then fails with ``SignatureMismatch: frame is signed with key 'stage'``:
    the caller's conversation is unrestorable until someone notices and reverts.

    Why it matters: one command from the wrong shell makes a live conversation
    unrestorable. The key already holds a head: `import` should decode it first with its
    own codec and refuse (exit 1, naming the keys) when it cannot, as `revert` does.
    """
    prod, staging = f"sqlite:///{tmp_path}/prod.db", f"sqlite:///{tmp_path}/staging.db"

    async def converse(url: str, keys: str, said: str) -> None:
        store = lr.open_store(url)
        try:
            s, rs, _ = await _bounded(start(store, ["Hello!", "Noted."], signing_keys=keys))
            await _bounded(s.run(user_input=said))
            await _bounded(rs.suspend())
            await _bounded(s.aclose())
        finally:
            await store.aclose()

    asyncio.run(converse(prod, OLD, "my code is 4711"))
    asyncio.run(converse(staging, STAGING, "a staging test call"))
    operator = {"RESUME_SIGNING_KEYS": STAGING}
    exported = str(tmp_path / "call.lkrs")
    result = CliRunner().invoke(
        app, ["--store", staging, "export", KEY, "-o", exported], env=operator
    )
    assert result.exit_code == 0, result.output

    result = CliRunner().invoke(
        app, ["--store", prod, "import", exported, "--key", KEY], env=operator
    )
    assert result.exit_code == 1, result.output  # refused: its keys cannot read prod's

    async def worker_restores() -> str:
        store = lr.open_store(prod)
        try:
            s, rs, _ = await _bounded(start(store, [], signing_keys=OLD, owner="w9"))
            texts = " ".join(i.text_content or "" for i in s.history.items if i.type == "message")
            await _bounded(rs.aclose())
            await _bounded(s.aclose())
            return texts
        finally:
            await store.aclose()

    assert "4711" in asyncio.run(worker_restores())


# --------------------------------------------------------------------------------------
# 7. a different media policy on the worker that takes the call over


async def test_a_worker_with_media_drop_does_not_rewrite_the_images_it_restored_and_left_alone(
    tmp_path: Path, clean_env: None, stores: list[Store]
) -> None:
    """Contract: tracker.py: "only new and changed items are converted, hashed and
    encoded", and an item of the edit window "read again that turns out unchanged is
    rewritten as it was: harmless"; the guide: ``media="keep"`` keeps inline images; the
    failure model's takeover and suspend rows: "what is lost | nothing".

    What happens: worker A runs with ``media="keep"`` (callers send photos); its call is
    suspended and picked up by worker B still on the default ``media="drop"`` (a rolling
    deploy turning "keep" on, or one pool configured differently). B restores both photos
    into its live context (the model sees them), and without touching either item saves
    once. `StreamTracker.baseline` keeps no shapes for restored items, so B's first
    checkpoint converts the last `EDIT_WINDOW` items again with *its* policy, finds their
    data "changed" (the image dropped) and writes them as edits. The caller's recent photo
    is gone from the store for good (A restoring later gets a text marker), while an
    older photo outside the window survives: which photos are lost depends only on how
    recent they are.

    Why it matters: a policy difference between workers silently deletes the caller's
    most recent media, the ones the conversation is about, although no worker edited
    them. An item restored and not changed should keep the data it was stored with.
    """
    store = lr.open_store(_sqlite_url(tmp_path))
    stores.append(store)
    old_photo = "data:image/png;base64," + base64.b64encode(os.urandom(3000)).decode()
    new_photo = "data:image/png;base64," + base64.b64encode(os.urandom(3000)).decode()

    def sent(session: AgentSession[Any], text: str, image: str) -> None:
        from livekit.agents import llm

        msg = llm.ChatMessage(role="user", content=[text, llm.ImageContent(image=image)])
        session.history.items.append(msg)
        session.current_agent._chat_ctx.items.append(msg)  # as LiveKit adds a user turn

    s1, rs1, _ = await _bounded(start(store, ["Hello!"] + ["ok"] * 12, media="keep"))
    await _bounded(s1.run(user_input="Hi, I'm Ada"))
    sent(s1, "my old car", old_photo)
    for n in range(8):
        await _bounded(s1.run(user_input=f"turn {n}"))
    sent(s1, "the dent in my car", new_photo)
    await _bounded(rs1.suspend())
    await _bounded(s1.aclose())
    stored = str(from_stored(Codec(), await _bounded(store.load(KEY))).history)
    assert old_photo in stored and new_photo in stored

    s2, rs2, _ = await _bounded(start(store, ["ok"] * 4, owner="w2", media="drop"))
    live = [c for i in s2.history.items if i.type == "message" for c in i.content]
    assert any(getattr(c, "image", None) == new_photo for c in live)  # B's model sees it
    try:
        await _bounded(rs2.checkpoint())
    finally:
        await _bounded(rs2.aclose())
        await _bounded(s2.aclose())
    stored = str(from_stored(Codec(), await _bounded(store.load(KEY))).history)
    assert old_photo in stored
    assert new_photo in stored, "B's save dropped the recent photo it never touched"
