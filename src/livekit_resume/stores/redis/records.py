"""How log records and version info are stored in Redis (msgpack), and reading them back
with a `SnapshotCorrupt` naming the session when they are not what we wrote."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Any

import msgpack

from ...errors import SnapshotCorrupt
from ...gcpause import gc_paused
from ...msgscan import MAX_VALUES, too_many_values
from ..log import Record, fold_rows

__all__ = [
    "number",
    "pack_info",
    "pack_record",
    "pack_records",
    "unpack_info",
    "unpack_records",
    "unpack_rows",
    "unpack_streams",
]

_Info = dict[str, str | int | float | bool | None]
# A record as `log.fold_rows` takes it: (stream, id, data, after).
_Row = tuple[str, str, bytes | None, str | None]


# A snapshot's two streams are stored as these small numbers; any other stream by name.
_STREAM_CODES = {"history": 0, "agent": 1}
_STREAM_NAMES = {code: name for name, code in _STREAM_CODES.items()}
# The first byte of a batch of records (never that of a msgpack list: a lone record).
BATCH = b"Z"
# A batch closes once its records hold this many bytes (a record larger than that is a
# batch of its own); reading one inflates at most MAX_BATCH bytes.
BATCH_BYTES = 256 * 1024
MAX_BATCH = 256 * 1024 * 1024
# Raw deflate: no zlib header and checksum (each item frame has its own).
_RAW_DEFLATE = -15
# Batches smaller than this are stored, not compressed (`_pack_batch`).
_STORE_UNDER = 1024


def pack_record(rec: Record) -> bytes:
    """One record in its long form, ``[stream, id, after, data]``."""
    if rec.data is None or len(rec.data) < 1 << 16:
        packed: bytes = msgpack.packb([rec.stream, rec.id, rec.after, rec.data], use_bin_type=True)
        return packed
    # msgpack's very bytes (array of 4, then bin 32), joined once: packb would copy the
    # data twice while holding the GIL, bytes.join copies it once without
    fields = (msgpack.packb(v, use_bin_type=True) for v in (rec.stream, rec.id, rec.after))
    return b"".join((b"\x94", *fields, _BIN32.pack(0xC6, len(rec.data)), rec.data))


_BIN32 = struct.Struct(">BI")


def pack_records(records: Iterable[Record]) -> list[bytes]:
    """Records appended to a log together, in order, as few list elements as can be.

    Each element is a batch: `BATCH` then the raw deflate of the msgpack list of its
    records, a new batch past `BATCH_BYTES`. One element per commit (or a few per
    compaction) holds Redis's own overhead per element and the records' ids to a
    fraction of what a record per element costs, and reads back in a few calls.

    In a batch a known stream is a small number, and a record placing an item right
    after the one its stream's previous placing record (in this call) placed, the
    common case of appends and of every compacted log, is ``[stream, id, data]``: its
    ``after`` is that previous id, which a reader of the log from its start knows
    (`unpack_records`). The records are appended whole and in order (one script), so
    that record is the previous placing one of its stream in the log too. Otherwise
    ``[stream, id, after, data]``.

    A record holding more than `BATCH_BYTES` is an element of its own in the long form
    (`pack_record`), not deflated again: its data is a frame, deflated already, and
    deflating megabytes twice costs a second per 30 MB.
    """
    out: list[bytes] = []
    batch: list[list[Any]] = []
    size = 0
    last: dict[str, str] = {}
    for rec in records:
        if rec.data is not None and len(rec.data) > BATCH_BYTES:
            if batch:
                out.append(_pack_batch(batch))
                batch, size = [], 0
            out.append(pack_record(rec))
            last[rec.stream] = rec.id
            continue
        stream = _STREAM_CODES.get(rec.stream, rec.stream)
        if rec.data is not None and rec.after is not None and last.get(rec.stream) == rec.after:
            batch.append([stream, rec.id, rec.data])
        else:
            batch.append([stream, rec.id, rec.after, rec.data])
        if rec.data is not None:
            last[rec.stream] = rec.id
        size += len(rec.id) + len(rec.data or b"")
        if size >= BATCH_BYTES:
            out.append(_pack_batch(batch))
            batch, size = [], 0
    if batch:
        out.append(_pack_batch(batch))
    return out


def _pack_batch(batch: list[list[Any]]) -> bytes:
    # Level 1: item frames are deflated already; the ids and the envelopes, and the
    # agent's references (the same few bytes each), are what is left to gain. A body
    # under `_STORE_UNDER` (a turn's checkpoint) is stored (level 0: raw deflate all the
    # same, read by the same code): its Huffman trees cost ~10 µs for the ~80 bytes
    # they would save, and a compaction folds such batches into larger, deflated ones.
    body = msgpack.packb(batch, use_bin_type=True)
    # A window just holding the body, a hash table to match: the default state (a 32 KiB
    # window, ~260 KB allocated, partly cleared) costs more than a checkpoint's batch.
    # Any window reads back with the reader's 32 KiB one.
    bits = max(9, min(-_RAW_DEFLATE, len(body).bit_length()))
    level = 0 if len(body) < _STORE_UNDER else 1
    deflate = zlib.compressobj(level, zlib.DEFLATED, -bits, max(3, min(8, bits - 6)))
    return BATCH + deflate.compress(body) + deflate.flush()


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
    if too_many_values(raw):  # never written: a batch closes at BATCH_BYTES of records
        raise SnapshotCorrupt(
            f"session {key!r}: {what} holds more than {MAX_VALUES:,} values, more than "
            "any we write; foreign data or a damaged key: delete the session or restore "
            "it from a backup"
        )
    try:
        return msgpack.unpackb(raw, raw=False)
    except _MSGPACK_ERRORS as exc:
        raise _not_msgpack(what, key, exc) from None


def unpack_records(raws: Iterable[bytes], key: str) -> list[Record]:
    """A log read from its start (see `pack_records`; an element may also be one
    record in its long form, as `pack_record` and earlier versions wrote them);
    `SnapshotCorrupt` naming the session for a record that is not one we wrote."""
    return [Record(*row) for row in unpack_rows(raws, key)]


def unpack_streams(raws: Iterable[bytes], key: str) -> dict[str, list[tuple[str, bytes]]]:
    """A log read from its start, folded into its streams' items (`log.fold_rows`), in one
    pause of cyclic GC, on the loop's thread or a worker's: the thousands of lists and
    tuples made on the way are gone before it collects, and only the folded streams
    remain for it to look at (a ~1 ms collection at 10,000 records). Unpaused, the
    collections on the way moved those lists and tuples into older generations, and
    so brought on collections of the whole heap: the log of a 5,000-item session made
    ~35 collections and often one of the whole heap: about 12 % of its restore in a
    worker whose earlier sessions left garbage (none from a freshly collected heap)."""
    with gc_paused():
        return fold_rows(unpack_rows(raws, key), key)


def unpack_rows(raws: Iterable[bytes], key: str) -> list[_Row]:
    """`unpack_records` as plain ``(stream, id, data, after)`` tuples (`log.fold_rows`):
    a restore reads thousands of records, and makes no `Record` of each."""
    out: list[_Row] = []
    last: dict[str, str] = {}
    for raw in raws:
        if raw[:1] == BATCH:
            batch = _unpack(_inflate(raw[1:], key), "a batch of log records", key)
            if type(batch) is not list:
                raise _bad_record(key)
            _append(out, batch, last, key)
        else:
            _append(out, [_unpack(raw, "a log record", key)], last, key)
    return out


def _inflate(raw: bytes, key: str) -> bytes:
    d = zlib.decompressobj(_RAW_DEFLATE)
    try:
        body = d.decompress(raw, MAX_BATCH + 1)
    except zlib.error as exc:
        raise SnapshotCorrupt(
            f"session {key!r}: a batch of log records does not decompress ({exc}); "
            "a damaged key: delete the session or restore it from a backup"
        ) from None
    if len(body) > MAX_BATCH or d.unconsumed_tail or not d.eof:
        raise SnapshotCorrupt(
            f"session {key!r}: a batch of log records is truncated or inflates past "
            f"{MAX_BATCH} bytes; a damaged key: delete the session or restore it"
        )
    return body


def _append(out: list[_Row], values: list[Any], last: dict[str, str], key: str) -> None:
    names, add = _STREAM_NAMES, out.append
    for v in values:
        if type(v) is not list:
            raise _bad_record(key)
        n = len(v)
        if n == 3:
            code, item_id, data = v
            after = None
        elif n == 4:
            code, item_id, after, data = v
        else:
            raise _bad_record(key)
        stream = names.get(code) if type(code) is int else code
        if type(stream) is not str or type(item_id) is not str:
            raise _bad_record(key)
        if n == 3:
            after = last.get(stream)
            if after is None or type(data) is not bytes:
                raise _bad_record(key)
        elif not (after is None or type(after) is str) or not (data is None or type(data) is bytes):
            raise _bad_record(key)
        if data is not None:
            last[stream] = item_id
        add((stream, item_id, data, after))


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
