"""How log records and version info are stored in Redis (msgpack), and reading them back
with a `SnapshotCorrupt` naming the session when they are not what we wrote."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from ...errors import SnapshotCorrupt
from ..log import Record

__all__ = [
    "number",
    "pack_info",
    "pack_record",
    "pack_records",
    "unpack_info",
    "unpack_records",
]

_Info = dict[str, str | int | float | bool | None]


# A snapshot's two streams are stored as these small numbers; any other stream by name.
_STREAM_CODES = {"history": 0, "agent": 1}
_STREAM_NAMES = {code: name for name, code in _STREAM_CODES.items()}


def pack_record(rec: Record) -> bytes:
    """One record in its long form, ``[stream, id, after, data]``."""
    packed: bytes = msgpack.packb([rec.stream, rec.id, rec.after, rec.data], use_bin_type=True)
    return packed


def pack_records(records: Iterable[Record]) -> list[bytes]:
    """Records appended to a log together, in order, each as small as it can be.

    A known stream is a small number. A record placing an item right after the one its
    stream's previous placing record (in this batch) placed, the common case of appends
    and of every compacted log, is ``[stream, id, data]``: its ``after`` is that
    previous id, which a reader of the log from its start knows (`unpack_records`). The
    batch is appended whole and in order (one script), so that record is the previous
    placing one of its stream in the log too. Otherwise ``[stream, id, after, data]``.
    """
    out: list[bytes] = []
    last: dict[str, str] = {}
    for rec in records:
        stream = _STREAM_CODES.get(rec.stream, rec.stream)
        if rec.data is not None and rec.after is not None and last.get(rec.stream) == rec.after:
            value: list[Any] = [stream, rec.id, rec.data]
        else:
            value = [stream, rec.id, rec.after, rec.data]
        if rec.data is not None:
            last[rec.stream] = rec.id
        out.append(msgpack.packb(value, use_bin_type=True))
    return out


def pack_info(info: _Info) -> bytes:
    packed: bytes = msgpack.packb(info, use_bin_type=True)
    return packed


_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def _not_msgpack(what: str, key: str, exc: Exception) -> SnapshotCorrupt:
    return SnapshotCorrupt(
        f"session {key!r}: {what} is not valid msgpack ({exc}); foreign data or a "
        "damaged key: delete the session or restore it from a backup"
    )


def _unpack(raw: bytes, what: str, key: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False)
    except _MSGPACK_ERRORS as exc:
        raise _not_msgpack(what, key, exc) from None


def unpack_records(raws: Iterable[bytes], key: str) -> list[Record]:
    """A log read from its start (see `pack_records`); `SnapshotCorrupt` naming the
    session for a record that is not one we wrote."""
    out: list[Record] = []
    last: dict[str, str] = {}
    unpackb = msgpack.unpackb
    for raw in raws:
        try:
            v = unpackb(raw, raw=False)
        except _MSGPACK_ERRORS as exc:
            raise _not_msgpack("a log record", key, exc) from None
        if type(v) is not list or len(v) not in (3, 4):
            raise _bad_record(key)
        code, item_id, data = v[0], v[1], v[-1]
        stream = _STREAM_NAMES.get(code) if type(code) is int else code
        if type(stream) is not str or type(item_id) is not str:
            raise _bad_record(key)
        if len(v) == 3:
            after = last.get(stream)
            if after is None or type(data) is not bytes:
                raise _bad_record(key)
        else:
            after = v[2]
            if not (after is None or type(after) is str) or not (
                data is None or type(data) is bytes
            ):
                raise _bad_record(key)
        if data is not None:
            last[stream] = item_id
        out.append(Record(stream, item_id, data, after))
    return out


def _bad_record(key: str) -> SnapshotCorrupt:
    return SnapshotCorrupt(
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
