"""Moving sessions between stores, keys and format versions with the command line,
adversarially: what ``export``, ``import``, ``revert`` and ``repair`` do with files cut,
reordered or spliced, keys that differ, sessions held, damaged or healthy. Run
in-process against a real SQLite file and a real redis-server (the ``url`` and ``key``
fixtures of test_cli)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from livekit_resume import ResumableSession, SnapshotCorrupt, SnapshotTooLarge, open_store
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.frame import read_frames
from livekit_resume.snapshot.model import AgentFrame, SessionMeta, Snapshot
from tests import _child_agent as child
from tests.test_cli import _converse, _hold, key, run, run_json, started, store_state, url

__all__ = ["key", "url"]  # the fixtures, shared with test_cli


def _epoch(url: str, key: str) -> int:
    return int(run_json(url, "history", key)[-1]["epoch"])


def _commit_as(url: str, key: str, lease: Any) -> int:
    """A checkpoint of the worker holding ``lease``: the latest snapshot written again."""
    from livekit_resume.bridge import from_stored, whole_commit
    from livekit_resume.cli.snapshots import make_codec

    async def go() -> int:
        store = open_store(url)
        try:
            stored = await store.load(key)
            codec = make_codec(store)
            snap = from_stored(codec, stored).model_copy(update={"epoch": lease.epoch})
            commit = whole_commit(codec, snap, base_version=stored.version, owner=lease.owner)
            return await store.commit(commit)
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_repair_of_a_healthy_session_leaves_its_live_holder_in_place(url: str, key: str) -> None:
    lease = _hold(url, key)
    before = run_json(url, "history", key)
    result = run(url, "--json", "repair", key, "--takeover")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["damage"] == []
    assert json.loads(result.stdout)["written"] is None
    assert run_json(url, "history", key) == before
    # nothing was damaged, nothing written: the worker that holds the session goes on
    assert _commit_as(url, key, lease) == before[-1]["version"] + 1


def test_a_healthy_session_held_by_a_worker_repairs_to_nothing_without_takeover(
    url: str, key: str
) -> None:
    lease = _hold(url, key)
    before = run_json(url, "history", key)
    result = run(url, "--json", "repair", key)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] is None
    assert _commit_as(url, key, lease) == before[-1]["version"] + 1


# ------------------------------------------------------------ export files cut and mixed


def _big(tag: str) -> Snapshot:
    items: list[dict[str, Any]] = [
        {
            "type": "message",
            "id": f"m{i}",
            "role": "user",
            "content": [f"{tag} turn {i} " + "x" * 300],
            "created_at": 1_700_000_000.0 + i,
        }
        for i in range(4)
    ]
    return Snapshot(
        key="room",
        epoch=1,
        meta=SessionMeta(room="room"),
        history=items,
        agent=AgentFrame(agent_id="scribe", chat_ctx=items[-2:]),
        userdata={"tag": tag},
    )


def _keyspec(kid: str) -> str:
    return f"{kid}:{base64.b64encode(kid.encode() * 32).decode()}"


CODECS: dict[str, Callable[[], Codec]] = {
    "plain": lambda: Codec(max_frame=SMALL),
    "signed": lambda: Codec(max_frame=SMALL, signing_keys=_keyspec("s")),
    "encrypted": lambda: Codec(max_frame=SMALL, encryption_keys=_keyspec("e")),
}


def _decode(codec: Codec, data: bytes) -> Snapshot:
    return codec.decode_export(read_frames(io.BytesIO(data), max_frame=SMALL))


SMALL = 1200  # a frame limit the whole snapshot is over and each item within


@pytest.mark.parametrize("kind", list(CODECS))
def test_an_item_frame_from_another_export_is_refused_not_imported(kind: str) -> None:
    codec = CODECS[kind]()
    a, b = codec.encode_export(_big("A")), codec.encode_export(_big("B"))
    assert len(a) == len(b) > 2  # a head and one frame per item
    whole = _decode(codec, b"".join(a))
    assert whole.history == _big("A").history and whole.userdata == {"tag": "A"}
    for n in range(1, len(a)):
        spliced = b"".join([*a[:n], b[n], *a[n + 1 :]])
        with pytest.raises(SnapshotCorrupt):
            _decode(codec, spliced)


# ----------------------------------------------------------- commands on missing keys


@pytest.mark.parametrize("argv", [["revert", "ghost", "1"], ["repair", "ghost"]], ids=str)
def test_a_write_to_a_missing_session_leaves_no_session_behind(
    url: str, key: str, argv: list[str]
) -> None:
    before = store_state(url)
    for takeover in ([], ["--takeover"]):
        result = run(url, *argv, *takeover)
        assert result.exit_code == 1 and "SnapshotNotFound" in result.stderr
    assert [s["key"] for s in run_json(url, "ls")] == [key]
    assert store_state(url) == before


# ---------------------------------------------------------------- keys that differ


async def _more(url: str, key: str, lines: list[str]) -> None:
    """More turns of ``key``'s conversation, in a worker of the current environment."""
    store = open_store(url)
    try:
        rs, session = await started(store, key, autosave=False)
        for line in lines:
            await session.run(user_input=line)
            await rs.checkpoint("turn")
        await rs.suspend()
    finally:
        await store.aclose()


@pytest.mark.parametrize("var", ["RESUME_SIGNING_KEYS", "RESUME_ENCRYPTION_KEYS"])
def test_repair_with_a_key_missing_refuses_and_loses_no_turn(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    # Workers sign with "a", then rotate to "b"; the operator's shell still has "a" only.
    monkeypatch.setenv(var, _keyspec("a"))
    asyncio.run(_converse(url, "room", ["remember the blue door"]))
    monkeypatch.setenv(var, f"{_keyspec('b')},{_keyspec('a')}")
    asyncio.run(_more(url, "room", ["remember the code 4711"]))
    before = run_json(url, "history", "room")
    workers = {var: f"{_keyspec('b')},{_keyspec('a')}"}
    whole = run(url, "--json", "show", "room", env=workers)
    assert whole.exit_code == 0, whole.output
    monkeypatch.delenv(var)

    for argv in (["repair", "room", "--dry-run"], ["repair", "room"]):
        result = run(url, *argv, env={var: _keyspec("a")})
        # frames under a key this shell lacks are not damage: nothing to drop them for
        assert result.exit_code == 1, result.output
        assert "error (SignatureMismatch)" in result.stderr and "'b'" in result.stderr
    assert run_json(url, "history", "room") == before
    after = run(url, "--json", "show", "room", env=workers)
    assert after.stdout == whole.stdout


def test_repair_while_moving_to_encryption_refuses_and_keeps_the_plaintext_turns(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store moving to encryption: turns written in plaintext, then encrypted ones by
    # workers allowed to read the old (RESUME_ALLOW_PLAINTEXT=1); the operator's shell
    # has the key but not the flag.
    asyncio.run(_converse(url, "room", ["remember the blue door"]))
    monkeypatch.setenv("RESUME_ENCRYPTION_KEYS", _keyspec("e"))
    monkeypatch.setenv("RESUME_ALLOW_PLAINTEXT", "1")
    asyncio.run(_more(url, "room", ["remember the code 4711"]))
    whole = run(url, "--json", "show", "room")
    assert whole.exit_code == 0, whole.output
    before = run_json(url, "history", "room")
    monkeypatch.delenv("RESUME_ALLOW_PLAINTEXT")

    for argv in (["repair", "room", "--dry-run"], ["repair", "room"]):
        result = run(url, *argv)
        assert result.exit_code == 1, result.output
        assert "error (SignatureMismatch)" in result.stderr
        assert "RESUME_ALLOW_PLAINTEXT" in result.stderr
    assert run_json(url, "history", "room") == before
    monkeypatch.setenv("RESUME_ALLOW_PLAINTEXT", "1")
    assert run(url, "--json", "show", "room").stdout == whole.stdout


@pytest.mark.parametrize("kind", list(CODECS))
def test_an_export_cut_anywhere_reordered_or_doubled_is_refused(kind: str) -> None:
    codec = CODECS[kind]()
    frames = codec.encode_export(_big("A"))
    data = b"".join(frames)
    for n in range(len(data)):  # every frame boundary and every byte within a frame
        with pytest.raises((SnapshotCorrupt, SnapshotTooLarge)):
            _decode(codec, data[:n])
    for n in range(1, len(frames)):
        swapped = [*frames]
        swapped[n - 1], swapped[n] = swapped[n], swapped[n - 1]
        doubled = [*frames[: n + 1], frames[n], *frames[n + 1 :]]
        for bad in (swapped, doubled, [*frames[:n], *frames[n + 1 :]]):
            with pytest.raises(SnapshotCorrupt):
                _decode(codec, b"".join(bad))


# ------------------------------------------------------------- between the two stores


async def _restored(url: str, key: str) -> tuple[list[Any], list[Any], Any]:
    """What a worker restoring ``key`` gets: history, the agent's context, userdata."""
    store = open_store(url)
    try:
        _model, session = child.build_session()
        rs = ResumableSession(store, key, registry=child.registry(), userdata_type=child.Notes)
        agent = await rs.restore(session, default=child.Scribe)
        assert rs.resumed
        got = (
            [i.model_dump() for i in session.history.items],
            [i.model_dump() for i in agent.chat_ctx.items],
            session.userdata.model_dump(),
        )
        await rs.aclose()
        return got
    finally:
        await store.aclose()


def test_sqlite_to_redis_and_back_restores_what_the_worker_saved(
    url: str, key: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if url.startswith("sqlite"):
        other = str(request.getfixturevalue("redis_server").url)
    else:
        other = f"sqlite:///{tmp_path}/other.db"
    live = asyncio.run(_restored(url, key))
    there, back = tmp_path / "there.lkrs", tmp_path / "back.lkrs"
    assert run(url, "export", key, "-o", str(there)).exit_code == 0
    for _ in range(2):  # the same file twice: two versions, one conversation
        imported = run(other, "--namespace", "moved", "import", str(there))
        assert imported.exit_code == 0, imported.output
    assert run(other, "--namespace", "moved", "export", key, "-o", str(back)).exit_code == 0
    assert run(url, "import", str(back), "--key", "back").exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESUME_NAMESPACE", "moved")
        assert asyncio.run(_restored(other, key)) == live
    assert asyncio.run(_restored(url, "back")) == live
