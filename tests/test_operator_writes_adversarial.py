"""Operator paths (import, revert, repair, rm, release, remote pause/suspend) that
write or remove a session while a worker holds it live, or just after. Real text-mode
``AgentSession``s (the child agent's scripted LLM) with `ResumableSession`, the command
line through typer's CliRunner (or a subprocess), on SQLite and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livekit_resume import LeaseLost, ResumableSession, open_store
from tests import _child_agent as child
from tests.test_cli import ROOT, key, run_json, snapshot_of, started, url
from tests.test_operator_races import BOUND, _cli, _new_key, _rm_in_a_shell, _turn

__all__ = ["key", "url"]


@contextlib.contextmanager
def _rm_before_the_operators_lease(store: Any, url: str) -> Iterator[list[bool]]:
    """Another operator's ``rm KEY --yes`` lands just before the command line's first
    lease (its owner is ``livekit-resume:…``); the list says whether it fired."""
    cls = type(store)
    real_acquire = cls.acquire
    fired: list[bool] = []

    async def acquire(self: Any, k: str, owner: str, **kw: Any) -> Any:
        if owner.startswith("livekit-resume:") and not fired:
            fired.append(True)
            await asyncio.to_thread(_rm_in_a_shell, url, k)
        return await real_acquire(self, k, owner, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "acquire", acquire)
        yield fired


async def _snap(url: str, key: str, version: int | None = None) -> Any:
    return await asyncio.to_thread(snapshot_of, url, key, version)


def _texts(snap: Any) -> str:
    """Every string in the saved history, and only strings: a timestamp or a metric
    can hold any digits (``4711`` was found in ``created_at`` once)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(snap.history)
    return repr(found)


def _ids(snap: Any) -> list[str]:
    return [str(i.get("id")) for i in snap.history]


async def _idle(rs: ResumableSession) -> None:
    await asyncio.wait_for(rs._autosave.idle.wait(), BOUND)


async def _restore_elsewhere(url: str, key: str) -> tuple[Any, Any, Any]:
    """Another worker restores ``key`` (takeover=False). Returns (store, rs, session)."""
    store = open_store(url)
    _model, session = child.build_session()
    rs = ResumableSession(
        store, key, registry=child.registry(), userdata_type=child.Notes, autosave=False
    )
    agent = await rs.restore(session, default=child.Scribe)
    await session.start(agent)
    return store, rs, session


async def _autosaving(store: Any, key: str, **options: Any) -> tuple[Any, Any, list[LeaseLost]]:
    """A started worker holding ``key`` with autosave on; returns (rs, session, the
    `LeaseLost` its ``on_lost`` heard)."""
    lost: list[LeaseLost] = []

    async def on_lost(e: LeaseLost) -> None:
        lost.append(e)

    _m, session = child.build_session()
    rs = ResumableSession(
        store,
        key,
        registry=child.registry(),
        userdata_type=child.Notes,
        autosave=True,
        on_lost=on_lost,
        **options,
    )
    await session.start(await rs.restore(session, default=child.Scribe))
    return rs, session, lost


def _history_of_session(session: Any) -> str:
    return repr([getattr(i, "content", None) for i in session.history.items])


# ---------------------------------------------------------- import of another key's export


def test_import_of_another_keys_export_restores_under_the_new_key(url: str, tmp_path: Path) -> None:
    """docs/cli.md: ``import FILE [--key K]`` commits an exported file as the session's
    next version. An export of room A imported as room B must restore under B (a worker
    restoring B gets A's conversation) and leave A as it was."""
    a, b = _new_key(), _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, a, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await rs.suspend()
            await session.aclose()
        finally:
            await store.aclose()
        frame = tmp_path / "a.lkr"
        assert (await _cli(url, "export", a, "-o", str(frame))).exit_code == 0
        imported = await _cli(url, "import", str(frame), "--key", b)
        assert imported.exit_code == 0, imported.output
        store2, rs2, session2 = await _restore_elsewhere(url, b)
        try:
            assert rs2.resumed
            assert "blue door" in _history_of_session(session2)
            await _turn(session2, "remember the red roof")
            assert await rs2.checkpoint("turn") >= 2
            await rs2.aclose()
            await session2.aclose()
        finally:
            await store2.aclose()
        shown_a = await _snap(url, a)
        assert "red roof" not in _texts(shown_a) and "blue door" in _texts(shown_a)
        assert (await _snap(url, b)).key == b

    asyncio.run(go())


# ----------------------------------------------- import --takeover of an older version


def test_import_takeover_of_an_older_export_fences_an_autosaving_worker(
    url: str, tmp_path: Path
) -> None:
    """An export of version 1 imported with ``--takeover`` while an autosaving worker
    holds the session and keeps talking: the worker is fenced (``on_lost``), its turns
    after the import are never stored (nor by its close), and a later restore gives
    back exactly the imported version."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            frame = tmp_path / "v.lkr"
            exported = await _cli(url, "export", key, "-o", str(frame))
            assert exported.exit_code == 0, exported.output
            await _turn(session, "remember the code 4711")
            await _idle(rs)
            imported = await _cli(url, "--json", "import", str(frame), "--takeover")
            assert imported.exit_code == 0, imported.output
            await _turn(session, "remember the green gate")
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.05)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()
        newest = (await asyncio.to_thread(run_json, url, "history", key))[-1]
        stored = await _snap(url, key)
        assert "code 4711" not in _texts(stored) and "green gate" not in _texts(stored)
        assert "blue door" in _texts(stored)
        assert newest["source"] == "import", newest
        # a later restore gives back exactly the operator's version
        store2, rs2, session2 = await _restore_elsewhere(url, key)
        try:
            h = _history_of_session(session2)
            assert "blue door" in h and "code 4711" not in h and "green gate" not in h
            await rs2.aclose()
            await session2.aclose()
        finally:
            await store2.aclose()

    asyncio.run(go())


# ----------------------------------------------- release, then a new holder, then old close


def test_an_old_holders_close_after_release_leaves_the_new_holders_lease(url: str) -> None:
    """``release`` fences the live holder A; worker B then restores the session; A's
    close (final save, release of its lease) must neither write nor free B's lease, and
    B keeps saving."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            released = await _cli(url, "--json", "release", key)
            assert released.exit_code == 0, released.output
            store2, rs2, session2 = await _restore_elsewhere(url, key)
            try:
                assert "blue door" in _history_of_session(session2)
                await _turn(session, "remember the red roof")  # A talks on
                await rs.aclose()
                await session.aclose()
                (listed,) = await asyncio.to_thread(run_json, url, "ls")
                assert listed["owner"] is not None, listed
                assert listed["epoch"] == rs2._lease.epoch, listed
                stored = await _snap(url, key)
                assert "red roof" not in _texts(stored)
                await _turn(session2, "remember the cat is called Tom")
                await rs2.checkpoint("turn")
                await rs2.aclose()
                await session2.aclose()
            finally:
                await store2.aclose()
        finally:
            await store.aclose()
        stored = await _snap(url, key)
        assert "Tom" in _texts(stored) and "red roof" not in _texts(stored)

    asyncio.run(go())


# ----------------------------------------------- rm, then the holder pauses and suspends


@pytest.mark.parametrize("action", ["pause", "suspend", "checkpoint", "aclose"])
def test_after_rm_the_holders_own_saves_write_nothing_back(url: str, action: str) -> None:
    """``rm --yes`` of a held session, then the holder's own pause (its save), suspend
    (final save and release), checkpoint or close: nothing writes the deleted
    conversation back, and the key stays free (cli.md rm: "The deleted conversation is
    never written back")."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            rm = await _cli(url, "rm", key, "--yes")
            assert rm.exit_code == 0, rm.output
            await _turn(session, "remember the red roof")
            try:
                if action == "pause":
                    await rs.pause()
                elif action == "suspend":
                    await rs.suspend()
                elif action == "checkpoint":
                    await rs.checkpoint("manual")
            except LeaseLost as e:
                assert not e.vanished, repr(e)
            await asyncio.sleep(0.3)
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
            assert key not in await store.keys()
        finally:
            await store.aclose()
        ls = await asyncio.to_thread(run_json, url, "ls")
        assert ls == [], ls

    asyncio.run(go())


# ----------------------------------------------- remote commands around an rm


def _freeze(rs: ResumableSession) -> None:
    """The holder's worker hangs: its inbox stays open, no command is ever claimed."""

    async def never(*_a: Any, **_k: Any) -> None:
        await asyncio.Event().wait()

    rs._control._claim_and_apply = never  # type: ignore[method-assign]


async def _wait_listening(rs: ResumableSession) -> None:
    await asyncio.wait_for(rs._control.listening.wait(), BOUND)


@pytest.mark.parametrize("verb", ["pause", "suspend"])
def test_a_remote_command_confirmed_just_as_the_session_is_rm_d_writes_nothing_back(
    url: str, verb: str
) -> None:
    """A remote ``pause``/``suspend`` reaches the live holder; between its claim and its
    save an operator's ``rm --yes`` deletes the session. The command's save must be
    refused (the holder fenced as deleted), the sender told it was not done (exit 1),
    and the deleted conversation not written back (cli.md rm)."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            await _wait_listening(rs)
            real = rs._control._confirm

            async def rm_then_confirm() -> Any:
                done = await _cli(url, "rm", key, "--yes")
                assert done.exit_code == 0, done.output
                return await real()

            rs._control._confirm = rm_then_confirm
            sent = await _cli(url, "--json", verb, key, "--timeout", "10")
            assert sent.exit_code == 1, sent.output
            assert "CommandRefused" in sent.stderr, sent.output
            await asyncio.sleep(0.3)
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
        finally:
            await store.aclose()
        assert await asyncio.to_thread(run_json, url, "ls") == []

    asyncio.run(go())


@pytest.mark.parametrize("verb", ["pause", "suspend"])
def test_a_remote_command_applied_after_rm_in_the_owner_writes_nothing_back(
    url: str, verb: str
) -> None:
    """The same, the rm landing after the owner confirmed its lease, just before the
    command's save (inside ``pause``/``suspend``)."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=True)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            await _wait_listening(rs)
            real_apply = rs._control._apply

            async def rm_then_apply(v: str) -> Any:
                done = await _cli(url, "rm", key, "--yes")
                assert done.exit_code == 0, done.output
                return await real_apply(v)

            rs._control._apply = rm_then_apply  # type: ignore[method-assign,assignment]
            sent = await _cli(url, "--json", verb, key, "--timeout", "10")
            assert sent.exit_code == 1, sent.output
            assert "CommandRefused" in sent.stderr, sent.output
            await asyncio.sleep(0.3)
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
        finally:
            await store.aclose()
        assert await asyncio.to_thread(run_json, url, "ls") == []

    asyncio.run(go())


def test_a_suspend_sent_to_a_crashed_holder_never_reaches_the_next_session_under_the_key(
    url: str,
) -> None:
    """A worker crashed holding its lease (nobody listens). An operator sends
    ``suspend`` (waiting); meanwhile another ``rm``s the key and a new conversation
    starts under it, listening. The command, aimed at the dead session's epoch, must
    never act on the new one: the sender is refused, the new session stays active and
    saves."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            # frozen: it hears commands, never answers; the lease stays live
            await _wait_listening(rs)
            _freeze(rs)
            sender = asyncio.ensure_future(_cli(url, "--json", "suspend", key, "--timeout", "4"))
            await asyncio.sleep(0.8)
            assert await store.delete(key)
            store2 = open_store(url)
            try:
                rs2, session2 = await started(store2, key, autosave=False)
                assert not rs2.resumed
                await _wait_listening(rs2)
                sent = await sender
                assert sent.exit_code == 1 and "CommandRefused" in sent.stderr, sent.output
                await asyncio.sleep(0.3)
                assert rs2.state == "active", rs2.state
                await _turn(session2, "remember the red roof")
                assert await rs2.checkpoint("turn") >= 1
                info = await store2.info(key)
                assert info is not None and info.info.get("state") == "active", info
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


def test_a_suspend_whose_sender_was_killed_never_acts_on_a_session_made_after_rm(
    url: str,
) -> None:
    """The sender of ``suspend`` to a crashed holder is SIGKILLed while it waits (it
    never withdraws its command). Then ``rm`` and a new conversation under the key:
    the leftover command must not suspend it."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await _wait_listening(rs)
            _freeze(rs)  # frozen: hears commands, never answers; the lease lives
            env = dict(os.environ)
            proc = subprocess.Popen(  # noqa: ASYNC220  (killed mid-wait, below)
                [
                    sys.executable,
                    "-m",
                    "livekit_resume",
                    "--store",
                    url,
                    "suspend",
                    key,
                    "--timeout",
                    "60",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            await asyncio.sleep(2.0)
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            rm = await _cli(url, "rm", key, "--yes")
            assert rm.exit_code == 0, rm.output
            store2 = open_store(url)
            try:
                rs2, session2 = await started(store2, key, autosave=True)
                await _wait_listening(rs2)
                await _turn(session2, "remember the red roof")
                await asyncio.sleep(1.5)
                assert rs2.state == "active", rs2.state
                await _idle(rs2)
                info = await store2.info(key)
                assert info is not None and info.info.get("state") == "active" and info.owner, info
                await rs2.aclose()
                await session2.aclose()
            finally:
                await store2.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ----------------------------------------------- operator writes racing a talking worker


async def _talk(session: Any, rs: ResumableSession, stop: asyncio.Event) -> int:
    """Turns one after another (autosave on) until ``stop``; returns how many."""
    n = 0
    while not stop.is_set():
        await _turn(session, f"remember the number {n}")
        n += 1
        await asyncio.sleep(0.01)
    return n


@pytest.mark.parametrize("command", ["import", "revert", "release"])
def test_an_operator_write_racing_a_talking_worker_wins_whole(
    url: str, tmp_path: Path, command: str
) -> None:
    """The worker keeps talking (autosave on) while ``import --takeover`` of an early
    export, ``revert 1 --takeover`` or ``release`` runs. Afterwards the worker is
    fenced, and a restore gives back exactly the operator's version: none of the turns
    the worker had after the command."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            frame = tmp_path / "early.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            first = (await asyncio.to_thread(run_json, url, "history", key))[0]["version"]
            stop = asyncio.Event()
            talker = asyncio.ensure_future(_talk(session, rs, stop))
            await asyncio.sleep(0.5)
            args = {
                "import": ("--json", "import", str(frame), "--takeover"),
                "revert": ("--json", "revert", key, str(first), "--takeover"),
                "release": ("--json", "release", key),
            }[command]
            done = await _cli(url, *args)
            assert done.exit_code == 0, done.output
            # what the operator left, read at once
            after = await _snap(url, key)
            await asyncio.sleep(0.8)
            stop.set()
            await asyncio.wait_for(talker, BOUND)
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.05)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
            final = await _snap(url, key)
            assert _ids(final) == _ids(after), (_texts(after), _texts(final))
            if command != "release":
                assert "number" not in _texts(final), _texts(final)
            store2, rs2, session2 = await _restore_elsewhere(url, key)
            try:
                # a start adds its own handoff and config items after the restored ones
                ids = [
                    i.id
                    for i in session2.history.items
                    if i.id in _ids(after) or i.type not in ("agent_handoff", "agent_config_update")
                ]
                assert ids == _ids(after), (
                    [(i.id, i.type, getattr(i, "content", None)) for i in session2.history.items],
                    _texts(after),
                )
                await rs2.aclose()
                await session2.aclose()
            finally:
                await store2.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


def test_rm_then_import_of_an_old_export_with_an_autosaving_holder_still_live(
    url: str, tmp_path: Path
) -> None:
    """rm --yes of a held session (autosave on), then ``import`` of an export taken
    before the rm (within the tombstone's day) before the holder noticed. The import
    starts above the tombstone; the holder's next autosave and close are refused and
    never overwrite the import."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key, lease_ttl=30.0)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            assert rs._lease is not None
            old_epoch = rs._lease.epoch
            frame = tmp_path / "before.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            assert (await _cli(url, "rm", key, "--yes")).exit_code == 0
            imported = await _cli(url, "import", str(frame))
            assert imported.exit_code == 0, imported.output
            (listed,) = await asyncio.to_thread(run_json, url, "ls")
            assert listed["epoch"] > old_epoch, (listed, old_epoch)
            after = await _snap(url, key)
            await _turn(session, "remember the red roof")
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.05)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
            final = await _snap(url, key)
            assert _ids(final) == _ids(after) and "red roof" not in _texts(final)
        finally:
            await store.aclose()

    asyncio.run(go())


def test_repair_of_an_undamaged_held_session_changes_nothing(url: str) -> None:
    """docs/cli.md: "a healthy session is left as it was, its live worker undisturbed,
    and the lease is taken only when there is damage to write away" (with and without
    --takeover)."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            before = await asyncio.to_thread(run_json, url, "history", key)
            (held,) = await asyncio.to_thread(run_json, url, "ls")
            for extra in ((), ("--takeover",)):
                rep = await _cli(url, "--json", "repair", key, *extra)
                assert rep.exit_code == 0, rep.output
                assert '"written": null' in rep.stdout, rep.stdout
            assert await asyncio.to_thread(run_json, url, "history", key) == before
            (now,) = await asyncio.to_thread(run_json, url, "ls")
            assert now["epoch"] == held["epoch"] and now["owner"] == held["owner"]
            await _turn(session, "remember the red roof")
            assert await rs.checkpoint("turn") == before[-1]["version"] + 1
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


def test_revert_to_a_trimmed_away_version_is_a_typed_error_and_changes_nothing(
    url: str,
) -> None:
    """``revert KEY 1 --takeover`` once version 1 was trimmed (the store keeps 10):
    exit 1, ``SnapshotNotFound``; the live worker keeps its lease and saves."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            for n in range(12):
                await _turn(session, f"remember the number {n}")
                await rs.checkpoint("turn")
            hist = await asyncio.to_thread(run_json, url, "history", key)
            assert hist[0]["version"] > 1
            (held,) = await asyncio.to_thread(run_json, url, "ls")
            done = await _cli(url, "--json", "revert", key, "1", "--takeover")
            assert done.exit_code == 1 and "SnapshotNotFound" in done.stderr, done.output
            assert await asyncio.to_thread(run_json, url, "history", key) == hist
            (now,) = await asyncio.to_thread(run_json, url, "ls")
            assert now["epoch"] == held["epoch"]
            await _turn(session, "remember the red roof")
            assert await rs.checkpoint("turn") == hist[-1]["version"] + 1
            await rs.aclose()
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ----------------------------------------------- release racing another operator's rm


def test_a_release_racing_an_rm_leaves_no_phantom_session(url: str) -> None:
    """Two operators: ``release KEY`` (its session found, then its lease taken over)
    and ``rm KEY --yes`` landing between the two. Afterwards the key must be gone
    (``ls`` empty; or ``release`` refused and nothing left), not a session record of
    version 0 that ``ls`` lists and ``show``/``history`` say does not exist; the old
    holder stays fenced (cli.md rm/release; the revert analogue is fixed:
    "A key that names no session is refused before any lease is taken (nothing is left
    behind)")."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            with _rm_before_the_operators_lease(store, url) as fired:
                released = await _cli(url, "--json", "release", key)
            assert fired
            # refused, not "released" with the deleted session's owner
            assert released.exit_code == 1, released.output
            assert "no session" in released.output
            await _turn(session, "remember the red roof")
            with pytest.raises(LeaseLost) as lost:
                await rs.checkpoint("turn")
            assert not lost.value.vanished
            await session.aclose()
            ls = await asyncio.to_thread(run_json, url, "ls")
            shown = await _cli(url, "show", key)
            assert ls == [], (released.output, ls, shown.output)
        finally:
            await store.aclose()

    asyncio.run(go())


# ----------------------------------------------- repair of a live, damaged session


def test_repair_takeover_of_a_damaged_session_a_worker_keeps_saving_fences_it(url: str) -> None:
    """A record of a live, autosaving session is damaged; ``repair --takeover`` salvages
    and writes it whole while the worker talks on. The worker is fenced; the repaired
    version is what a restore gives back (no item the worker said after it)."""
    from tests.test_salvage import _flip_first_history_record

    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _turn(session, "remember the code 4711")
            await _idle(rs)
            await asyncio.to_thread(_flip_first_history_record, url, key)
            rep = await _cli(url, "--json", "repair", key, "--takeover")
            assert rep.exit_code == 0, rep.output
            assert '"written": null' not in rep.stdout, rep.stdout
            after = await _snap(url, key)
            await _turn(session, "remember the red roof")
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.05)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
            final = await _snap(url, key)
            assert _ids(final) == _ids(after) and "red roof" not in _texts(final)
            assert "code 4711" in _texts(final)
        finally:
            await store.aclose()

    asyncio.run(go())


def test_a_repair_racing_an_rm_leaves_nothing_behind(url: str) -> None:
    """``repair KEY --takeover`` reads the damaged session, then another operator's
    ``rm --yes`` lands before its lease: the repair is refused (nothing to repair) and
    leaves no session behind."""
    from tests.test_salvage import _flip_first_history_record

    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await _turn(session, "remember the code 4711")
            await rs.checkpoint("turn")
            await asyncio.to_thread(_flip_first_history_record, url, key)
            with _rm_before_the_operators_lease(store, url) as fired:
                rep = await _cli(url, "--json", "repair", key, "--takeover")
            assert fired
            ls = await asyncio.to_thread(run_json, url, "ls")
            assert ls == [], (rep.output, ls)
            assert rep.exit_code == 1 and "SnapshotNotFound" in rep.stderr, rep.output
            with pytest.raises(LeaseLost) as lost_:
                await rs.checkpoint("turn")
            assert not lost_.value.vanished
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ----------------------------------------------- signed: an export moved to another key


def test_a_signed_export_imported_under_another_key_restores_there(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With signing (and encryption) keys set for workers and shell alike, an export of
    room A imported as room B (``--key``) is restorable under B by a worker."""
    from tests.test_cli import _keyspec

    monkeypatch.setenv("RESUME_SIGNING_KEYS", _keyspec("k1"))
    a, b = _new_key(), _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, a, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await rs.suspend()
            await session.aclose()
        finally:
            await store.aclose()
        frame = tmp_path / "a.lkr"
        ex = await _cli(url, "export", a, "-o", str(frame))
        assert ex.exit_code == 0, ex.output
        imported = await _cli(url, "import", str(frame), "--key", b)
        assert imported.exit_code == 0, imported.output
        store2, rs2, session2 = await _restore_elsewhere(url, b)
        try:
            assert rs2.resumed and "blue door" in _history_of_session(session2)
            await rs2.aclose()
            await session2.aclose()
        finally:
            await store2.aclose()

    asyncio.run(go())


# ----------------------------------------------- remote commands after release / rm


@pytest.mark.parametrize("verb", ["pause", "suspend"])
@pytest.mark.parametrize("before", ["release", "rm", "import"])
def test_a_remote_command_after_an_operator_write_never_reaches_the_fenced_holder(
    url: str, tmp_path: Path, verb: str, before: str
) -> None:
    """The live holder A (listening) is fenced by ``release``, ``rm --yes`` or
    ``import --takeover``; a remote ``pause``/``suspend`` then is refused (no live
    owner, or no session), A is not paused or suspended by it, and nothing is created
    or written."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session = await started(store, key, autosave=False)
            await _turn(session, "remember the blue door")
            await rs.checkpoint("turn")
            await _wait_listening(rs)
            frame = tmp_path / "f.lkr"
            assert (await _cli(url, "export", key, "-o", str(frame))).exit_code == 0
            args = {
                "release": ("release", key),
                "rm": ("rm", key, "--yes"),
                "import": ("import", str(frame), "--takeover"),
            }[before]
            assert (await _cli(url, *args)).exit_code == 0
            listed = await asyncio.to_thread(run_json, url, "ls")
            sent = await _cli(url, "--json", verb, key, "--timeout", "2")
            assert sent.exit_code == 1, sent.output
            assert "CommandRefused" in sent.stderr or "SnapshotNotFound" in sent.stderr
            await asyncio.sleep(0.2)
            assert rs.state == "active", rs.state
            assert await asyncio.to_thread(run_json, url, "ls") == listed
            await session.aclose()
        finally:
            await store.aclose()

    asyncio.run(go())


# ----------------------------------------------- rm twice, the holder still live


@pytest.mark.parametrize("second", [("rm", "{key}", "--yes"), ("rm", "{key}", "<y>")])
def test_a_second_rm_of_a_deleted_key_keeps_its_old_holder_fenced(
    url: str, second: tuple[str, ...]
) -> None:
    """``rm --yes`` of a held session, then a second ``rm`` of the now missing key
    (refused, SnapshotNotFound: an operator retrying). The tombstone must stay: the old
    holder's next autosave is refused as deleted, never taken for a vanished session
    and written back."""
    key = _new_key()

    async def go() -> None:
        store = open_store(url)
        try:
            rs, session, lost = await _autosaving(store, key)
            await _turn(session, "remember the blue door")
            await _idle(rs)
            assert (await _cli(url, "rm", key, "--yes")).exit_code == 0
            args = tuple(a.format(key=key) for a in second)
            kw: dict[str, Any] = {}
            if args[-1] == "<y>":
                args, kw = args[:-1], {"input": "y\n"}
            again = await _cli(url, *args, **kw)
            assert again.exit_code == 1 and "SnapshotNotFound" in again.stderr, again.output
            await _turn(session, "remember the red roof")
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.05)
            assert lost and not lost[0].vanished, lost
            await rs.aclose()
            await session.aclose()
            assert await store.info(key) is None
        finally:
            await store.aclose()
        assert await asyncio.to_thread(run_json, url, "ls") == []

    asyncio.run(go())


# ------------------------------------------- two operator commands in one process


async def test_two_operator_commands_in_one_process_do_not_share_a_lease(
    url: str, key: str
) -> None:
    """An ``import`` holding the key's lease while an ``rm`` runs in the same process
    (a script driving both, an operator tool built on the command line's functions):
    the rm finds the key held and deletes nothing. Both took the lease under one owner
    (program, host, pid), which a store takes for the holder renewing its own lease: the
    rm deleted the session under the import's lease."""
    from livekit_resume.cli.snapshots import delete_unheld, write_whole
    from livekit_resume.errors import SessionBusy

    importing, removing = open_store(url), open_store(url)
    try:
        entered, go_on = asyncio.Event(), asyncio.Event()

        async def build(*_: Any) -> None:
            entered.set()
            await go_on.wait()

        held = asyncio.create_task(
            write_whole(importing, key, build, takeover=False, source="import")
        )
        await asyncio.wait_for(entered.wait(), BOUND)
        try:
            with pytest.raises(SessionBusy):
                await asyncio.wait_for(delete_unheld(removing, key), BOUND)
        finally:
            go_on.set()
            await asyncio.wait_for(held, BOUND)
        assert await removing.info(key) is not None
    finally:
        await importing.aclose()
        await removing.aclose()
