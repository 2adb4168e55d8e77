"""Hunt (area: tokens): ended conversations, reconnect tokens, and the caller back in a
new room. Each test that fails names a defect; "passes: coverage" ones guard a promise
not tested elsewhere."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import livekit_resume as lr
from livekit_resume.bridge import codec_for, from_stored
from livekit_resume.stores.base import Store
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_job_policy_adversarial import Job, run_job

SIGN = "t1:" + base64.b64encode(b"t" * 32).decode()
ENC = "e1:" + base64.b64encode(b"e" * 32).decode()
T = 5.0


@pytest.fixture(autouse=True)
def _sigterm_kept() -> Iterator[None]:
    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


async def _hangup_call(store: Store, key: str, **options: Any) -> lr.ResumableSession:
    """A call under ``key`` that the app ends at once: the caller hung up before anyone
    spoke (a SIP caller who dials and drops), a goodbye with nothing said."""
    j = Job(f"room-{os.urandom(3).hex()}")
    session = make_text_session(ScriptedLLM(default="noted"))
    try:
        rs = await asyncio.wait_for(
            run_job(j, session, store, key=key, autosave=False, **options), T
        )
        await asyncio.wait_for(rs.end(), T)
        return rs
    finally:
        await session.aclose()


async def test_two_distinct_ended_calls_that_said_nothing_are_both_kept_aside(
    tmp_path: Path,
) -> None:
    """passes: coverage. Two calls under one phone-number key, each ended before anyone
    spoke, end at the same version with the same (empty) history: `_archive_key` must
    not take the second for "this very conversation, already archived" (a cut-short
    archive) and drop it. Both are kept, under ``~v1`` and ``~v1~2``, each with its own
    conversation id (lifecycle.md: "copied whole", "nothing ... copied twice")."""
    store = lr.open_store(f"sqlite:///{tmp_path}/calls.db")
    key = "caller-+15550199"
    try:
        first = await _hangup_call(store, key)
        a = from_stored(codec_for(store), await store.load(key))
        second = await _hangup_call(store, key)
        b = from_stored(codec_for(store), await store.load(key))
        assert a.meta.conversation != b.meta.conversation
        third = await _hangup_call(store, key)
        assert not third.resumed
        kept = sorted(k for k in await store.keys() if k.startswith(f"{key}~"))
        assert first.version == second.version
        convs = [from_stored(codec_for(store), await store.load(k)).meta.conversation for k in kept]
        assert sorted(map(str, convs)) == sorted(
            map(str, [a.meta.conversation, b.meta.conversation])
        )
    finally:
        await store.aclose()


async def _talk_call(
    store: Store, key: str, said: str, *, room: str | None = None, **options: Any
) -> tuple[lr.ResumableSession, Any]:
    j = Job(room or f"room-{os.urandom(3).hex()}")
    session = make_text_session(ScriptedLLM(default="noted"))
    rs = await asyncio.wait_for(run_job(j, session, store, key=key, autosave=False, **options), T)
    if said:
        await asyncio.wait_for(session.run(user_input=said), T)
    return rs, session


async def test_a_job_given_its_encryption_keys_in_code_honours_a_valid_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FAILS. The workers are given their keys in code (``resumable_job(...,
    signing_keys=K, encryption_keys=E)``, which go to `ResumableSession`); the back end
    that issues tokens has them in its environment. The caller comes back in a new room
    with a valid, unexpired token for a healthy conversation: failure-model.md (keys in
    code row) promises "the job's keys sign and read its sessions and check its tokens",
    lifecycle.md "A valid token resumes that conversation and nothing else".

    What happens: `job._token_key` hands `verify_token` the job's ``signing_keys`` only;
    `tokens._conversation` reads the snapshot with the environment's keys, then with the
    signing keys, never with the job's encryption keys, so the decrypt fails with
    `SignatureMismatch` (a `SnapshotCorrupt`) and the token is refused as "damaged ...
    repair it": the caller is greeted as a stranger under the room's key, and the
    operator is told to repair a conversation that is intact. Fix: pass the job's codec
    (or all its ``*_keys``) to `verify_token`/`_conversation` (and give `issue_token`/
    `verify_token` an ``encryption_keys``/``codec`` parameter)."""
    store = lr.open_store(f"sqlite:///{tmp_path}/enc.db")
    key = "caller-+15550111"
    monkeypatch.delenv("RESUME_SIGNING_KEYS", raising=False)
    monkeypatch.delenv("RESUME_ENCRYPTION_KEYS", raising=False)
    keys = {"signing_keys": SIGN, "encryption_keys": ENC}
    try:
        rs, session = await _talk_call(store, key, "my code is 4711", **keys)
        await asyncio.wait_for(rs.suspend(), T)
        await session.aclose()
        # the back end, with the keys in its environment, issues the token
        monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
        monkeypatch.setenv("RESUME_ENCRYPTION_KEYS", ENC)
        token = await lr.issue_token(store, key, ttl=600)
        assert await lr.verify_token(store, token) == key
        # the worker, keys in code only, in a new room: the token names the conversation
        monkeypatch.delenv("RESUME_SIGNING_KEYS")
        monkeypatch.delenv("RESUME_ENCRYPTION_KEYS")
        j = Job("a-new-room")
        again = make_text_session(ScriptedLLM(default="welcome back"))
        rs2 = await asyncio.wait_for(
            run_job(j, again, store, token=token, autosave=False, **keys), T
        )
        try:
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert (rs2.key, rs2.resumed) == (key, True), (
                f"valid token refused; the job went on under {rs2.key!r}: {refused}"
            )
        finally:
            await rs2.aclose()
            await again.aclose()
    finally:
        await store.aclose()


async def test_verifying_a_token_decodes_a_long_conversation_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS. performance.md ("Restore"): "A history of more than 100 items (both
    streams counted) is decoded ... on a worker thread": the other calls of a worker
    share its loop. A caller back in a new room with a token is restored through
    `resumable_job`, whose `_token_key` first runs `verify_token`; that reads the whole
    conversation with `tokens._conversation` → `from_stored` on the loop, whatever its
    length (only to learn its id and state), before the restore decodes it again, off
    the loop. A long conversation (10,000 items is ~0.2-0.4 s) stalls every other
    call's audio on that worker at each token presented, and a client may present one
    as often as it connects. Cause: tokens.py `_conversation` (and `issue_token`) call
    `from_stored` directly. Fix: read it through `session._off_the_loop_if_long` (or
    read and verify the head only: the id and state are the head's)."""
    import threading

    from livekit_resume.agent_hooks.session import OFFLOAD_ITEMS

    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    store = lr.open_store(f"sqlite:///{tmp_path}/long.db")
    key = "caller-+15550133"
    try:
        rs, session = await _talk_call(store, key, "")
        for n in range(OFFLOAD_ITEMS // 2 + 2):  # a turn: two items, in both streams
            await asyncio.wait_for(session.run(user_input=f"turn {n}"), T)
        await asyncio.wait_for(rs.suspend(), T)
        await session.aclose()
        stored = await store.load(key)
        assert sum(map(len, stored.streams.values())) > OFFLOAD_ITEMS
        token = await lr.issue_token(store, key, ttl=600)

        threads: list[threading.Thread] = []
        real = from_stored

        def noting(*args: Any, **kw: Any) -> Any:
            threads.append(threading.current_thread())
            return real(*args, **kw)

        monkeypatch.setattr("livekit_resume.tokens.from_stored", noting)
        assert await lr.verify_token(store, token) == key
        assert threads and all(t is not threading.main_thread() for t in threads), (
            "verify_token decoded a conversation of "
            f"{sum(map(len, stored.streams.values()))} items on the event loop"
        )
    finally:
        await store.aclose()


async def test_end_before_the_session_starts_ends_the_stored_conversation_or_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS. The entrypoint restores the caller's conversation and, before
    ``session.start()``, decides it is over (a business rule on what was restored, the
    dispatch saying "new call", the caller gone before the agent started) and calls
    ``rs.end()``. lifecycle.md: end "saves a last snapshot marked `ended`, releases the
    lease and closes the session ... An ended conversation is never resumed" and
    "ending revokes every token issued for it"; `end`'s docstring says the same.

    What happens: `end()` returns a version, ``rs.state`` says ``ended`` and the lease is
    released, but nothing was written: `_checkpoint` returns ``self._version`` unsaved
    when ``current_agent(session) is None`` ("never started: the store already holds
    everything"), which holds for a checkpoint but not for a state change. The store
    still says ``suspended``, the next call resumes the conversation, and its tokens
    still verify. (A remote ``suspend`` in that window is refused "has not started",
    control.md; the local `end` reports a success it did not have.) Cause: session.py
    `_checkpoint` (the never-started shortcut) under `_finish_now`. Fix: have `_finish`
    raise `RuntimeError` before start as the remote command does, or write the ended
    state (the head of the stored snapshot with ``state="ended"``) in that case."""
    from livekit.agents import AgentSession

    from tests.test_hooks import KEY, Receptionist, Visit, registry
    from tests.test_tokens import conversation

    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    store = lr.open_store(f"sqlite:///{tmp_path}/early.db")
    try:
        await conversation(store)  # remember the blue door; suspended
        token = await lr.issue_token(store, KEY, ttl=600)
        session: AgentSession[Visit] = AgentSession(
            llm=ScriptedLLM([], default="ok"), userdata=Visit()
        )
        rs = lr.ResumableSession(
            store, KEY, registry=registry(), userdata_type=Visit, owner="w9", autosave=False
        )
        await rs.restore(session, default=lambda: Receptionist(rs))
        assert rs.resumed
        try:
            version: int | None = await asyncio.wait_for(rs.end(), T)
        except RuntimeError:
            version = None  # refused, as the remote command is: acceptable
        if version is not None:
            saved = from_stored(codec_for(store), await store.load(KEY))
            try:
                await lr.verify_token(store, token)
                revoked = False
            except lr.TokenRefused:
                revoked = True
            assert (rs.state, saved.state, revoked) == ("ended", "ended", True), (
                f"end() returned version {version} and says {rs.state!r}, but the store "
                f"holds the conversation as {saved.state!r} (token revoked: {revoked})"
            )
        await session.aclose()
    finally:
        await store.aclose()


async def test_a_token_for_a_conversation_archived_as_stale_resumes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """passes: coverage. A token issued for a conversation, presented once that
    conversation went stale (``resume_within``): the job under the token's key keeps
    the conversation whole under ``<key>~v<version>`` and starts a new one with a new
    id; the token then resumes nothing (not the new conversation, not the archive), and
    nothing is lost or duplicated (lifecycle.md "Hang-up and call back", "a valid token
    resumes that conversation and nothing else")."""
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    store = lr.open_store(f"sqlite:///{tmp_path}/stale.db")
    key = "caller-+15550166"
    try:
        rs, session = await _talk_call(store, key, "my order is 4711")
        await asyncio.wait_for(rs.suspend(), T)
        await session.aclose()
        old = from_stored(codec_for(store), await store.load(key))
        token = await lr.issue_token(store, key, ttl=600)
        await asyncio.sleep(0.3)
        j = Job("room-new")
        again = make_text_session(ScriptedLLM(default="hello"))
        rs2 = await asyncio.wait_for(
            run_job(j, again, store, token=token, resume_within=0.1, autosave=False), T
        )
        try:
            assert rs2.key == key and not rs2.resumed
            await asyncio.wait_for(again.run(user_input="a new call"), T)
            await asyncio.wait_for(rs2.checkpoint(), T)
            new = from_stored(codec_for(store), await store.load(key))
            assert new.meta.conversation != old.meta.conversation
            kept = [k for k in await store.keys() if k.startswith(f"{key}~")]
            assert len(kept) == 1, kept  # kept once, whole
            archived = from_stored(codec_for(store), await store.load(kept[0]))
            assert archived.meta.conversation == old.meta.conversation
            assert archived.history == old.history
            with pytest.raises(lr.TokenRefused):
                await lr.verify_token(store, token)
        finally:
            await rs2.aclose()
            await again.aclose()
    finally:
        await store.aclose()
