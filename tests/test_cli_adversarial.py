"""The operator's surface of ``livekit-resume`` under what operators meet on a live
cluster: damaged sessions among healthy ones, odd keys, values JSON cannot carry,
mistyped store paths, prompts beside ``--json``. Run in-process against a real SQLite
file and a real redis-server (the ``url`` and ``key`` fixtures of test_cli)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from livekit_resume import open_store
from livekit_resume.bridge import from_stored
from livekit_resume.cli import app
from livekit_resume.cli.snapshots import make_codec, write_whole
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import Snapshot
from livekit_resume.stores.base import Store, Stored
from tests.redis_servers import RedisServer
from tests.test_cli import key, run, run_json, url

__all__ = ["key", "url"]  # the fixtures, shared with test_cli


def cli(*args: str, **kw: Any) -> Result:
    return CliRunner().invoke(app, list(args), **kw)


def _copy(url: str, key: str, new: str, **update: Any) -> None:
    """Write ``key``'s latest snapshot as session ``new`` (with ``update`` applied)."""

    async def go() -> None:
        store = open_store(url)
        try:
            snap = from_stored(make_codec(store), await store.load(key))

            async def build(_s: Store, _c: Codec, _stored: Stored | None) -> Snapshot:
                return snap.model_copy(update=update)

            await write_whole(store, new, build, takeover=False, source="import")
        finally:
            await store.aclose()

    asyncio.run(go())


def _damage(url: str, key: str, request: pytest.FixtureRequest) -> None:
    """Break the latest version record of ``key`` as an eviction or a bad hand edit
    would: its listing info is gone (Redis) or not JSON (SQLite)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            db.execute("UPDATE versions SET info='not json' WHERE key=?", (key,))
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    ns = os.environ["RESUME_NAMESPACE"]
    version = run_json(url, "ls")
    latest = next(s["version"] for s in version if s["key"] == key)
    assert server.cli("del", f"{ns}:{{{key}}}:v:{latest}").strip() == "1"


# ------------------------------------------------------------------ ls, damage


def test_ls_lists_the_healthy_sessions_beside_a_damaged_one(
    url: str, key: str, request: pytest.FixtureRequest
) -> None:
    _copy(url, key, "aa-healthy")
    _copy(url, key, "zz-healthy")
    _damage(url, key, request)
    assert run(url, "show", key).exit_code == 1  # it is damaged indeed

    listed = run(url, "--json", "ls")
    assert listed.exit_code == 0, listed.output
    rows = {s["key"]: s for s in json.loads(listed.stdout)}
    assert set(rows) == {"aa-healthy", key, "zz-healthy"}
    assert rows["aa-healthy"]["state"] == "suspended" and "error" not in rows["aa-healthy"]
    assert rows[key]["error"] == "SnapshotCorrupt"

    # a page stops at its limit either way, and --state skips what it cannot read
    page = json.loads(run(url, "--json", "ls", "--limit", "2").stdout)
    assert [s["key"] for s in page["sessions"]] == ["aa-healthy", key]
    suspended = json.loads(run(url, "--json", "ls", "--state", "suspended").stdout)
    assert [s["key"] for s in suspended] == ["aa-healthy", "zz-healthy"]

    table = run(url, "ls")
    assert table.exit_code == 0, table.output
    assert "aa-healthy" in table.stdout and "zz-healthy" in table.stdout
    assert "damaged" in table.stdout
    assert f"{key!r}" in table.stderr and "SnapshotCorrupt" in table.stderr
