"""Operator paths (rm, release, revert, import, repair, remote
pause/resume/suspend) that write or remove a session while a worker holds it live, or
right after. Real text-mode ``AgentSession``s with `ResumableSession`, the command line
through typer's CliRunner, on SQLite and a real redis-server (and memory where the
command line is not needed)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from livekit_resume import CommandRefused, LeaseLost, ResumableSession, open_store
from livekit_resume.remote import control
from tests import _child_agent as child
from tests.test_cli import run_json, started, url
from tests.test_operator_races import _cli, _new_key, _turn
from tests.test_operator_writes_adversarial import (
    _autosaving,
    _history_of_session,
    _idle,
    _ids,
    _snap,
    _texts,
    _wait_listening,
)

__all__ = ["url"]


async def _wait_lost(lost: list[LeaseLost], seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if lost:
            return
        await asyncio.sleep(0.05)


def _content_ids(session: Any) -> list[str]:
    """The ids of a live session's items that a snapshot holds (a start adds its own
    handoff and config items, which are left out)."""
    return [
        i.id
        for i in session.history.items
        if i.type not in ("agent_handoff", "agent_config_update")
    ]


def _snap_content_ids(snap: Any) -> list[str]:
    return [
        str(i.get("id"))
        for i in snap.history
        if i.get("type") not in ("agent_handoff", "agent_config_update")
    ]


# ------------------------------------------------------------- rm, then resume / end


def test_rm_of_a_paused_holder_then_its_resume_and_turns_write_nothing_back(url: str) -> None:
    """A holder paused (autosave on) is deleted with ``rm --yes``; it then resumes.
    cli.md rm: "The deleted conversation is never written back", and the holder hears
    `LeaseLost` (deleted, not vanished) through ``on_lost``: the resume's own save
    finds it, so the resume raises it and the session stays silent."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            await rs.pause()
            rm = await _cli(url, "rm", key, "--yes")
            assert rm.exit_code == 0, rm.output
            with pytest.raises(LeaseLost) as refused:
                await rs.resume()
            assert not refused.value.vanished and rs.state == "paused"
            await _wait_lost(lost)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
        finally:
            await store.aclose()
        assert await asyncio.to_thread(run_json, url, "ls") == []

    asyncio.run(go())


def test_rm_then_the_holders_end_writes_nothing_back_and_the_key_starts_fresh(url: str) -> None:
    """``rm --yes`` of a held session, then the holder ends the conversation
    (``rs.end()``: a last snapshot marked ended). Nothing is written back; a new
    session under the key starts fresh, above the deleted epoch."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            assert rs._lease is not None
            old_epoch = rs._lease.epoch
            rm = await _cli(url, "rm", key, "--yes")
            assert rm.exit_code == 0, rm.output
            await _turn(session, "remember the red roof")
            with pytest.raises(LeaseLost) as e:
                await rs.end()
            assert not e.value.vanished
            assert await store.info(key) is None
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
            rs2, session2 = await started(store, key, autosave=False)
            assert not rs2.resumed
            assert rs2._lease is not None and rs2._lease.epoch > old_epoch
            assert "blue door" not in _history_of_session(session2)
            await rs2.aclose()
            await session2.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ------------------------------------- same ResumableSession restored after an operator write


@pytest.mark.parametrize("command", ["revert", "import"])
def test_a_suspended_worker_restoring_again_after_an_operator_write_continues_it_exactly(
    url: str, tmp_path: Path, command: str
) -> None:
    """A worker suspends; an operator then reverts the session to version 1 (or imports
    an export of it); the same `ResumableSession` restores again (a caller back) into a
    new `AgentSession`, talks and suspends. Another worker then restores exactly the
    operator's version plus that turn: no item of the turns reverted away, each item
    once, the userdata of version 1 plus the new fact (cli.md revert: "A worker that
    restores the session afterwards resumes the older conversation")."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            first = await rs.checkpoint("turn")
            frame = tmp_path / "v1.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            await _turn(session, "remember the code 4711")
            await rs.checkpoint("turn")
            await _turn(session, "remember the cat is called Tom")
            await rs.suspend()
            await session.aclose()
            args = {
                "revert": ("--json", "revert", key, str(first)),
                "import": ("--json", "import", str(frame)),
            }[command]
            done = await _cli(url, *args)
            assert done.exit_code == 0, done.output
            operator = await _snap(url, key)
            assert "code 4711" not in _texts(operator) and "blue door" in _texts(operator)

            # the same ResumableSession, a new AgentSession (a caller back)
            _m, session_b = child.build_session()
            agent = await rs.restore(session_b, default=child.Scribe)
            await session_b.start(agent)
            assert rs.resumed
            assert "code 4711" not in _history_of_session(session_b)
            assert session_b.userdata.facts == ["the blue door"], session_b.userdata
            await _turn(session_b, "remember the train leaves at nine")
            await rs.checkpoint("turn")
            expected = _content_ids(session_b)
            await rs.suspend()
            await session_b.aclose()
        finally:
            await store.aclose()
        final = await _snap(url, key)
        assert "code 4711" not in _texts(final) and "Tom" not in _texts(final), _texts(final)
        assert _snap_content_ids(final) == expected, (_texts(final), expected)
        assert len(set(_ids(final))) == len(_ids(final))
        store2 = open_store(url)
        try:
            _m2, session_c = child.build_session()
            rs2 = ResumableSession(
                store2, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
            )
            await session_c.start(await rs2.restore(session_c, default=child.Scribe))
            assert _content_ids(session_c)[: len(expected)] == expected
            assert session_c.userdata.facts == ["the blue door", "the train leaves at nine"]
            await rs2.aclose()
            await session_c.aclose()
        finally:
            await store2.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("command", ["revert", "import"])
def test_an_operator_write_restores_the_versions_userdata_and_agent_context_exactly(
    url: str, tmp_path: Path, command: str
) -> None:
    """``revert 1 --takeover`` (or ``import --takeover`` of version 1's export) while an
    autosaving worker talks on: a restore elsewhere gives back version 1's userdata and
    the agent's own context exactly, not the live worker's later ones."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            v1 = (await asyncio.to_thread(run_json, url, "history", key))[-1]["version"]
            frame = tmp_path / "v1.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            want = await _snap(url, key, v1)
            for fact in ("code 4711", "cat is called Tom"):
                await _turn(session, f"remember the {fact}")
                await _idle(rs)
            args = {
                "revert": ("--json", "revert", key, str(v1), "--takeover"),
                "import": ("--json", "import", str(frame), "--takeover"),
            }[command]
            done = await _cli(url, *args)
            assert done.exit_code == 0, done.output
            await _turn(session, "remember the red roof")
            await _wait_lost(lost)
            assert lost and not lost[0].vanished
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
        got = await _snap(url, key)
        assert got.userdata == want.userdata, (got.userdata, want.userdata)
        assert got.agent is not None and want.agent is not None
        assert [i.get("id") for i in got.agent.chat_ctx] == [
            i.get("id") for i in want.agent.chat_ctx
        ]
        store2 = open_store(url)
        try:
            _m2, session_c = child.build_session()
            rs2 = ResumableSession(
                store2, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
            )
            agent = await rs2.restore(session_c, default=child.Scribe)
            assert session_c.userdata.facts == ["the blue door"], session_c.userdata
            agent_ids = [i.id for i in agent.chat_ctx.items]
            for i in want.agent.chat_ctx:
                assert i.get("id") in agent_ids
            assert "code 4711" not in repr(
                [getattr(i, "content", None) for i in agent.chat_ctx.items]
            )
            await session_c.start(agent)
            await rs2.aclose()
            await session_c.aclose()
        finally:
            await store2.aclose()

    asyncio.run(go())


# ------------------------------------------- a remote suspend whose save is refused (fenced)


@pytest.mark.parametrize("verb", ["suspend", "pause"])
@pytest.mark.parametrize("between", ["rm", "revert"])
def test_a_remote_command_fenced_mid_save_does_not_say_the_worker_still_holds_it(
    url: str, between: str, verb: str
) -> None:
    """A remote ``suspend`` reaches the holder; as it applies it, an operator's
    ``rm --yes`` (or ``revert --takeover``) fences the holder, so the final save is
    refused (`LeaseLost`). The sender is refused (`CommandRefused`, exit 1 from the
    command line); the refusal must not tell it
    "the session is paused, still held by its worker" (control.md: that reading is for
    a final save that *failed*, the worker keeping its lease and autosave): the worker
    holds nothing any more. Nothing is written back."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            first = await rs.checkpoint("turn")
            await _turn(session, "remember the code 4711")
            await _idle(rs)
            await _wait_listening(rs)
            real_save = rs._save

            fenced = asyncio.Event()

            async def fenced_then_save(reason: str, *a: Any, **k: Any) -> int:
                if reason == verb:
                    args = {
                        "rm": ("rm", key, "--yes"),
                        "revert": ("revert", key, str(first), "--takeover"),
                    }[between]
                    try:
                        done = await _cli(url, *args)
                    finally:
                        fenced.set()
                    assert done.exit_code == 0, done.output
                return await real_save(reason, *a, **k)

            rs._save = fenced_then_save  # type: ignore[method-assign]
            # sent through the API the command line uses, not CliRunner: the rm runs in
            # CliRunner meanwhile, and two CliRunners at once swap one process's
            # sys.stderr under each other (the refusal was printed into the rm's)
            sender = open_store(url)
            try:
                with pytest.raises(CommandRefused) as refused:
                    await getattr(control(sender), verb)(key, timeout=10)
            finally:
                await sender.aclose()
            assert "still held by its worker" not in str(refused.value), refused.value
            # refused as soon as the rm lands (no live owner), maybe before the rm's own
            # CliRunner is done: the next command line waits for it
            await asyncio.wait_for(fenced.wait(), 30)
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
        if between == "rm":
            assert await asyncio.to_thread(run_json, url, "ls") == []
        else:
            assert "code 4711" not in _texts(await _snap(url, key))

    asyncio.run(go())


# ------------------------------------------- remote commands, an old and a new session at once


def test_remote_commands_after_rm_reach_the_new_session_never_the_fenced_one(url: str) -> None:
    """One worker process (one store object): session A holds the key, an operator
    ``rm``s it, and a new session B under the key starts there while A (autosave off)
    has not noticed and still listens. ``pause`` (aimed at the current epoch) pauses B,
    never A; ``pause --epoch <A's>`` is refused at once and touches neither; ``resume``
    resumes B. A stays fenced."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs_a, session_a = await started(store, key, autosave=False)
            await _turn(session_a, "remember the blue door")
            await rs_a.checkpoint("turn")
            await _wait_listening(rs_a)
            assert rs_a._lease is not None
            epoch_a = rs_a._lease.epoch
            assert (await _cli(url, "rm", key, "--yes")).exit_code == 0
            rs_b, session_b = await started(store, key, autosave=False)
            await _wait_listening(rs_b)
            assert not rs_b.resumed
            old = await _cli(url, "--json", "pause", key, "--epoch", str(epoch_a), "--timeout", "3")
            assert old.exit_code == 1 and "CommandRefused" in old.stderr, old.output
            assert rs_a.state == "active" and rs_b.state == "active"
            sent = await _cli(url, "--json", "pause", key, "--timeout", "10")
            assert sent.exit_code == 0, sent.output
            assert rs_b.state == "paused", rs_b.state  # type: ignore[comparison-overlap]
            assert rs_a.state == "active", rs_a.state
            back = await _cli(url, "--json", "resume", key, "--timeout", "10")
            assert back.exit_code == 0, back.output
            assert rs_b.state == "active" and rs_a.state == "active"
            await _turn(session_a, "remember the red roof")
            with pytest.raises(LeaseLost) as lost:
                await rs_a.checkpoint("turn")
            assert not lost.value.vanished
            await _turn(session_b, "remember the cat is called Tom")
            await rs_b.checkpoint("turn")
            await rs_b.aclose()
            await session_b.aclose()
            await rs_a.aclose()
            await session_a.aclose()
        finally:
            await store.aclose()
        final = await _snap(url, key)
        assert "Tom" in _texts(final)
        assert "blue door" not in _texts(final) and "red roof" not in _texts(final)

    asyncio.run(go())


# ------------------------------------------- export of one namespace imported into another


def test_a_signed_export_imported_into_another_namespace_restores_there(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cli.md: export files are signed like the store's but "not bound to one"
    namespace (snapshots.make_codec). With signing keys set for workers and shell, an
    export of namespace A's session imported with ``--namespace B`` restores in B."""
    from tests.test_cli import _keyspec

    monkeypatch.setenv("RESUME_SIGNING_KEYS", _keyspec("k1"))
    key = _new_key()
    ns_a, ns_b = f"na{uuid.uuid4().hex[:6]}", f"nb{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        store = open_store(url, namespace=ns_a)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await rs.suspend()
            await session.aclose()
        finally:
            await store.aclose()
        frame = tmp_path / "a.lkr"
        ex = await _cli(url, "--namespace", ns_a, "export", key, "-o", str(frame))
        assert ex.exit_code == 0, ex.output
        imported = await _cli(url, "--namespace", ns_b, "import", str(frame))
        assert imported.exit_code == 0, imported.output
        store_b = open_store(url, namespace=ns_b)
        try:
            _m, session_b = child.build_session()
            rs_b = ResumableSession(
                store_b, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
            )
            await session_b.start(await rs_b.restore(session_b, default=child.Scribe))
            assert rs_b.resumed and "blue door" in _history_of_session(session_b)
            await rs_b.aclose()
            await session_b.aclose()
        finally:
            await store_b.aclose()

    asyncio.run(go())


# ------------------------------------------- programmatic control on the memory store


async def test_memory_a_remote_suspend_after_delete_never_suspends_the_new_session() -> None:
    """`Store.delete` of a held session on a `MemoryStore`, a new session under the key
    in the same process; the fenced holder still listens. ``control().suspend`` aimed
    at the deleted epoch is refused and suspends nothing; aimed at the current one it
    suspends the new session only."""
    store = open_store("memory://")
    try:
        key = _new_key()
        rs_a, session_a = await started(store, key, autosave=False)
        await _turn(session_a, "remember the blue door")
        await rs_a.checkpoint("turn")
        assert rs_a._lease is not None
        epoch_a = rs_a._lease.epoch
        assert await store.delete(key)
        rs_b, session_b = await started(store, key, autosave=False)
        remote = control(store)
        with pytest.raises(CommandRefused):
            await remote.suspend(key, epoch=epoch_a, timeout=1)
        assert rs_a.state == "active" and rs_b.state == "active"
        v = await remote.suspend(key, timeout=5)
        assert rs_b.state == "suspended" and rs_a.state == "active"  # type: ignore[comparison-overlap]
        assert v == rs_b.version
        with pytest.raises(LeaseLost):
            await rs_a.checkpoint("turn")
        await rs_a.aclose()
        await session_a.aclose()
        await session_b.aclose()
    finally:
        await store.aclose()


# ------------------------------------------- an operator write whose commit races an rm


def _rm_before_the_operators_commit(store: Any, url: str) -> Any:
    """Another operator's ``rm KEY --yes`` lands after the command line took its lease,
    just before its commit."""
    import contextlib

    from tests.test_operator_races import _rm_in_a_shell

    cls = type(store)
    real_acquire, real_commit = cls.acquire, cls.commit
    epochs: set[int] = set()
    fired: list[bool] = []

    async def acquire(self: Any, k: str, owner: str, **kw: Any) -> Any:
        lease = await real_acquire(self, k, owner, **kw)
        if owner.startswith("livekit-resume:"):
            epochs.add(lease.epoch)
        return lease

    async def commit(self: Any, c: Any) -> Any:
        if c.epoch in epochs and not fired:
            fired.append(True)
            await asyncio.to_thread(_rm_in_a_shell, url, c.key)
        return await real_commit(self, c)

    @contextlib.contextmanager
    def patched() -> Any:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cls, "acquire", acquire)
            mp.setattr(cls, "commit", commit)
            yield fired

    return patched()


@pytest.mark.parametrize("command", ["import", "revert"])
def test_an_operator_write_whose_commit_meets_an_rm_writes_nothing_and_leaves_nothing(
    url: str, tmp_path: Path, command: str
) -> None:
    """``import --takeover`` (or ``revert 1 --takeover``) of a held session takes its
    lease; another operator's ``rm --yes`` lands before its commit. The command is
    refused with a typed error (exit 1), the key stays deleted (``ls`` empty, no session
    at version 0), and the old holder stays fenced as deleted."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            first = await rs.checkpoint("turn")
            frame = tmp_path / "v1.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            await _turn(session, "remember the code 4711")
            await rs.checkpoint("turn")
            args = {
                "import": ("--json", "import", str(frame), "--takeover"),
                "revert": ("--json", "revert", key, str(first), "--takeover"),
            }[command]
            with _rm_before_the_operators_commit(store, url) as fired:
                done = await _cli(url, *args)
            assert fired
            assert done.exit_code == 1, done.output
            err = json.loads(done.stderr.strip().splitlines()[-1])
            assert err["error"] in ("LeaseLost", "SnapshotNotFound"), err
            assert await asyncio.to_thread(run_json, url, "ls") == []
            await _turn(session, "remember the red roof")
            with pytest.raises(LeaseLost) as lost:
                await rs.checkpoint("turn")
            assert not lost.value.vanished
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
        assert await asyncio.to_thread(run_json, url, "ls") == []

    asyncio.run(go())


# ------------------------------------------- a frozen holder whose lease expired


@pytest.mark.parametrize("command", ["import", "revert", "rm"])
def test_a_frozen_holder_whose_lease_expired_is_fenced_by_an_operator_write(
    url: str, tmp_path: Path, command: str
) -> None:
    """A holder frozen past its lease (1 s here): ``import`` (no --takeover needed),
    ``revert`` or ``rm`` of its session. When it wakes, its checkpoint, suspend and close
    are refused (`LeaseLost`, not vanished) and never overwrite or write back; a later
    restore gives exactly the operator's version."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            _m, session = child.build_session()
            rs = ResumableSession(
                store,
                key,
                registry=child.registry(),
                userdata_type=child.Notes,
                autosave=False,
                lease_ttl=1.0,
            )
            await session.start(await rs.restore(session, default=child.Scribe))
            await _turn(session, "remember the blue door")
            first = await rs.checkpoint("turn")
            frame = tmp_path / "v1.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            await _turn(session, "remember the code 4711")
            await rs.checkpoint("turn")
            await asyncio.sleep(1.3)  # frozen: the lease ran out
            args = {
                "import": ("--json", "import", str(frame)),
                "revert": ("--json", "revert", key, str(first)),
                "rm": ("--json", "rm", key),
            }[command]
            kw = {"input": "y\n"} if command == "rm" else {}
            done = await _cli(url, *args, **kw)
            assert done.exit_code == 0, done.output
            after = None if command == "rm" else await _snap(url, key)
            await _turn(session, "remember the red roof")
            with pytest.raises(LeaseLost) as lost:
                await rs.checkpoint("turn")
            assert not lost.value.vanished, lost.value
            with pytest.raises(LeaseLost):
                await rs.suspend()
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
        if after is None:
            assert await asyncio.to_thread(run_json, url, "ls") == []
            return
        final = await _snap(url, key)
        assert _ids(final) == _ids(after), (_texts(final), _texts(after))
        assert "code 4711" not in _texts(final) and "red roof" not in _texts(final)

    asyncio.run(go())


# ------------------------------------------- a remote suspend to a frozen holder taken over


def test_a_suspend_sent_to_a_frozen_holder_never_suspends_the_worker_that_took_over(
    url: str,
) -> None:
    """A holder frozen (hears commands, never answers) past its lease; ``suspend`` is
    sent to it (aimed at its epoch, waiting); meanwhile another worker restores the
    session (its lease expired: no takeover). The sender is refused; the new worker is
    never suspended, and saves on."""
    from tests.test_operator_writes_adversarial import _freeze, _restore_elsewhere

    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            _m, session = child.build_session()
            rs = ResumableSession(
                store,
                key,
                registry=child.registry(),
                userdata_type=child.Notes,
                autosave=False,
                lease_ttl=2.0,
            )
            await session.start(await rs.restore(session, default=child.Scribe))
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await _wait_listening(rs)
            _freeze(rs)
            sender = asyncio.ensure_future(_cli(url, "--json", "suspend", key, "--timeout", "5"))
            await asyncio.sleep(2.3)
            store2, rs2, session2 = await _restore_elsewhere(url, key)
            try:
                await _wait_listening(rs2)
                sent = await sender
                assert sent.exit_code == 1 and "CommandRefused" in sent.stderr, sent.output
                await asyncio.sleep(0.3)
                assert rs2.state == "active", rs2.state
                await _turn(session2, "remember the red roof")
                assert await rs2.checkpoint("turn") >= 2
                info = await store2.info(key)
                assert info is not None and info.owner is not None
                assert info.info.get("state") == "active", info
                await rs2.aclose()
                await session2.aclose()
            finally:
                await store2.aclose()
            with pytest.raises(LeaseLost):
                await rs.checkpoint("turn")
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())
