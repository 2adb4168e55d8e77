"""A Redis log's elements as records and back, for tests that alter stored records in
place (as an attacker or a torn write would): the store packs a commit's records into
one element (`records.pack_records`), and a record may leave its `after` implied by the
records before it."""

from __future__ import annotations

from collections.abc import Sequence

from livekit_resume.stores.base import Record
from livekit_resume.stores.redis.records import pack_records, unpack_records


def split_log(raws: Sequence[bytes], key: str) -> list[list[Record]]:
    """Each element's records, every `after` explicit."""
    out: list[list[Record]] = []
    done = 0
    for n in range(len(raws)):
        records = unpack_records(raws[: n + 1], key)
        out.append(records[done:])
        done = len(records)
    return out


def join_log(elements: Sequence[Sequence[Record]]) -> list[bytes]:
    """Elements packed back one by one (as many as given): each element's records stand
    on their own, so an altered record changes no other record's `after`."""
    out: list[bytes] = []
    for records in elements:
        (packed,) = pack_records(records)
        out.append(packed)
    return out
