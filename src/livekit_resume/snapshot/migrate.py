"""Upcasters: read snapshots written by older format versions.

Each upcaster takes plain data of version ``v`` and returns version ``v + 1``; they are
chained until the current `FORMAT_VERSION`. A snapshot has two kinds of frames (the
head and each chat item, written at different times), so there are two tables.

A step with no upcaster in a table passes that kind of frame through unchanged: a
version that adds a head field registers a head upcaster only, and every chat item of
the older version still loads. The head's ``format_version`` is set here, after the
chain, so an upcaster never has to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import IncompatibleSnapshot, SnapshotCorrupt
from .model import FORMAT_VERSION

__all__ = ["OLDEST_READABLE", "item_is_current", "migrate_head", "migrate_item"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

OLDEST_READABLE = 1


def _head_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    # Format 1 kept only the names of unanswered calls, as "pending_tools"; format 2
    # records running and unanswered calls apart, as "tool_calls" with a status.
    if "tool_calls" in data:
        # never in format 1: a format 2 frame whose header says 1 (with encryption keys
        # alone, the header is checked by its CRC only, and both formats bind the same
        # context), which this step would strip of its tool calls
        raise SnapshotCorrupt("a format 1 snapshot holds tool_calls, a field of format 2")
    pending = data.pop("pending_tools", None) or []
    data["tool_calls"] = [
        {
            "call_id": p["call_id"],
            "name": p["name"],
            "arguments": p.get("arguments", ""),
            "status": "unanswered",
        }
        for p in pending
    ]
    return data


def _item_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    # Format 1 named the creation time "timestamp"; LiveKit calls it "created_at".
    if "timestamp" in data:
        data["created_at"] = data.pop("timestamp")
    return data


# 2 -> 3 changed what frames bind (namespace, version, seal), not the data: no upcaster,
# the identity (the codec reads a format 2 frame with its own context). 3 -> 4 changed
# how frames may be compressed (frame.FLAG_ZDICT) and added an optional field
# (AgentFrame.realtime, None when absent), not the meaning of any data: the identity too.
_HEAD: dict[int, Upcaster] = {1: _head_1_to_2}
_ITEM: dict[int, Upcaster] = {1: _item_1_to_2}


def _run(table: dict[int, Upcaster], data: Any, version: int, what: str) -> Any:
    if version > FORMAT_VERSION:
        raise IncompatibleSnapshot(
            f"{what} was written by format version {version}; this livekit-resume reads "
            f"up to {FORMAT_VERSION}: upgrade livekit-resume on this worker"
        )
    if version < OLDEST_READABLE:
        raise IncompatibleSnapshot(f"{what} has format version {version}, which never existed")
    if version == FORMAT_VERSION:
        return data
    if not isinstance(data, dict):
        raise SnapshotCorrupt(f"{what} of format version {version} is not a map")
    for v in range(version, FORMAT_VERSION):
        step = table.get(v)
        if step is None:
            continue  # nothing of this kind changed in version v + 1
        try:
            data = step(data)
        except (KeyError, TypeError, AttributeError) as e:
            raise SnapshotCorrupt(f"{what} of format version {v} is malformed: {e!r}") from e
    return data


def migrate_head(data: Any, version: int) -> Any:
    """A snapshot head (or a whole snapshot) of ``version`` upcast to the current format."""
    data = _run(_HEAD, data, version, "snapshot")
    if version < FORMAT_VERSION and isinstance(data, dict):
        data["format_version"] = FORMAT_VERSION
        agent = data.get("agent")  # not a map: the model refuses it, not this loop
        for items in (data.get("history"), agent.get("chat_ctx") if type(agent) is dict else None):
            if isinstance(items, list):
                items[:] = [_run(_ITEM, i, version, "chat item") for i in items]
    return data


def item_is_current(version: int) -> bool:
    """Whether a chat item frame of ``version`` reads as it was written (no upcaster)."""
    return OLDEST_READABLE <= version <= FORMAT_VERSION and not any(
        v in _ITEM for v in range(version, FORMAT_VERSION)
    )


def migrate_item(data: Any, version: int) -> Any:
    """One chat item frame of ``version`` upcast to the current format."""
    return _run(_ITEM, data, version, "chat item")
