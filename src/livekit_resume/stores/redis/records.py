"""How log records and version info are stored in Redis (msgpack), and reading them back
with a `SnapshotCorrupt` naming the session when they are not what we wrote."""

from __future__ import annotations

from typing import Any

import msgpack

from ...errors import SnapshotCorrupt
from ..log import Record

__all__ = ["number", "pack_info", "pack_record", "unpack_info", "unpack_record"]

_Info = dict[str, str | int | float | bool | None]


def pack_record(rec: Record) -> bytes:
    packed: bytes = msgpack.packb([rec.stream, rec.id, rec.after, rec.data], use_bin_type=True)
    return packed


def pack_info(info: _Info) -> bytes:
    packed: bytes = msgpack.packb(info, use_bin_type=True)
    return packed


def _unpack(raw: bytes, what: str, key: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SnapshotCorrupt(
            f"session {key!r}: {what} is not valid msgpack ({exc}); foreign data or a "
            "damaged key: delete the session or restore it from a backup"
        ) from None


def unpack_record(raw: bytes, key: str) -> Record:
    v = _unpack(raw, "a log record", key)
    if (
        isinstance(v, list)
        and len(v) == 4
        and isinstance(v[0], str)
        and isinstance(v[1], str)
        and (v[2] is None or isinstance(v[2], str))
        and (v[3] is None or isinstance(v[3], bytes))
    ):
        return Record(v[0], v[1], v[3], v[2])
    raise SnapshotCorrupt(
        f"session {key!r}: a log record is not [stream, id, after, data]; foreign data "
        "or a damaged key: delete the session or restore it from a backup"
    )


def unpack_info(raw: bytes, key: str) -> _Info:
    v = _unpack(raw, "a version's info", key)
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return v
    raise SnapshotCorrupt(f"session {key!r}: a version's info is not a mapping")


def number(raw: Any, what: str, key: str) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise SnapshotCorrupt(f"session {key!r}: {what} is not a number ({raw!r})") from None
