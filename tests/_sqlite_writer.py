"""A worker process for tests/test_sqlite.py: drives one `SQLiteStore` from JSON lines.

    python tests/_sqlite_writer.py DB_PATH KEEP

It prints ``{"ready": pid}`` once, then answers each command line on stdin with one
line on stdout: ``{"ok": result}`` or ``{"error": "LeaseLost", "message": "..."}``.
The parent coordinates through these lines only (no sleeps): a child does nothing
until it is told to. Commands:

- ``acquire`` key owner [takeover] -> epoch
- ``renew`` key owner epoch -> epoch
- ``commit`` key epoch base item [after] -> version (one item record, head = item)
- ``burst`` key owner count [progress] -> versions: acquire, then ``count`` commits, each
  appending item ``{key}-{n}`` with head ``{key}:{n}``; with ``progress`` a line
  ``{"progress": version}`` follows every commit (for a parent that kills mid-burst)
- ``chain`` key owner rounds -> {accepted: [[version, item]], lost}: each round takes the
  key over, reads the head and appends one item; a round that loses the race counts
  as lost
- ``exit``
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from livekit_resume.errors import LeaseLost, ResumeError, SnapshotNotFound
from livekit_resume.stores.base import Commit, Lease, Record
from livekit_resume.stores.sqlite import SQLiteStore


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _tail(store: SQLiteStore, key: str) -> tuple[int, str | None, int]:
    """The key's head version, its last item id and its item count."""
    try:
        stored = await store.load(key)
    except SnapshotNotFound:
        return 0, None, 0
    items = stored.streams.get("h", [])
    return stored.version, items[-1][0] if items else None, len(items)


async def _append(
    store: SQLiteStore,
    key: str,
    epoch: int,
    base: int,
    item: str,
    head: str,
    after: str | None,
    size: int,
) -> int:
    record = Record("h", item, item.encode(), after)
    return await store.commit(Commit(key, epoch, base, head.encode(), [record], size))


async def _handle(store: SQLiteStore, cmd: dict[str, Any]) -> Any:
    op, key = cmd["op"], cmd.get("key", "")
    if op == "acquire":
        lease = await store.acquire(key, cmd["owner"], takeover=cmd.get("takeover", False))
        return lease.epoch
    if op == "renew":
        lease = await store.renew(Lease(key, cmd["owner"], cmd["epoch"], 0.0))
        return lease.epoch
    if op == "commit":
        item = cmd["item"]
        return await _append(
            store, key, cmd["epoch"], cmd["base"], item, item, cmd.get("after"), cmd["base"] + 1
        )
    if op == "burst":
        epoch = (await store.acquire(key, cmd["owner"])).epoch
        versions = []
        for n in range(1, cmd["count"] + 1):
            after = f"{key}-{n - 1}" if n > 1 else None
            version = await _append(store, key, epoch, n - 1, f"{key}-{n}", f"{key}:{n}", after, n)
            versions.append(version)
            if cmd.get("progress"):
                _say({"progress": version})
        return versions
    if op == "chain":
        accepted, lost = [], 0
        for r in range(cmd["rounds"]):
            epoch = (await store.acquire(key, cmd["owner"], takeover=True)).epoch
            base, tail, count = await _tail(store, key)
            item = f"{cmd['owner']}-{r}"
            try:
                version = await _append(store, key, epoch, base, item, item, tail, count + 1)
            except LeaseLost:
                lost += 1
            else:
                accepted.append([version, item])
        return {"accepted": accepted, "lost": lost}
    raise ValueError(f"unknown command {op!r}")


async def main(path: str, keep: int) -> None:
    # The tests check correctness under contention, not latency: on a loaded 2-core machine
    # seven writers can keep one waiting past the default busy_timeout of 5 s.
    store = SQLiteStore(path, keep=keep, busy_timeout=60.0)
    loop = asyncio.get_running_loop()
    _say({"ready": os.getpid()})
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                _say({"ok": None})
                return
            try:
                result = await _handle(store, cmd)
            except ResumeError as exc:
                _say({"error": type(exc).__name__, "message": str(exc)})
            else:
                _say({"ok": result})
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
