"""Salvage: rebuild what is intact of a damaged snapshot, and say exactly what is not.

The versions of a session share one log of item frames, so one damaged frame (a flipped
bit, a torn write) makes every version that reads it `SnapshotCorrupt`. `salvage_parts`
decodes frame by frame instead: an item that fails its checksum, signature, msgpack or
shape is left out and reported as a `Damage`, and a system message put in its place
tells the model (and the reader of a transcript) how many items are missing. An agent
item that refers to a lost history item is lost with it. A head that does not decode is
replaced by an older version's head, reported too.

`validate_restorable` is the check an import runs before it commits anything: every
item rebuilds as a LiveKit chat item with a finite ``created_at``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import IncompatibleSnapshot, SignatureMismatch, SnapshotCorrupt, SnapshotTooLarge
from .codec import AGENT, HISTORY, Codec, check_item_ids, validate_snapshot
from .frame import holds_what_it_declares
from .model import ItemData, Snapshot

__all__ = ["SALVAGE_ID_PREFIX", "Damage", "salvage_parts", "validate_restorable"]

# Ids of the notes that stand in for lost items; LiveKit's own ids never start so.
SALVAGE_ID_PREFIX = "lkresume_salvage_"
# What a frame that cannot be read raises. IncompatibleSnapshot is not damage: a newer
# writer's frame is intact, and dropping it would lose data this version cannot read.
_DAMAGE = (SnapshotCorrupt, SnapshotTooLarge)


def _raise_unknown_key(e: SnapshotCorrupt) -> None:
    """A frame under a key this process lacks is not damage either: a repair run where
    the workers' newer key is missing took the newest head that did decode and wrote
    its turns away as "lost". Raised, it names the key to add. So is a plaintext frame
    refused for want of RESUME_ALLOW_PLAINTEXT in a store being moved to encryption."""
    if isinstance(e, SignatureMismatch) and (e.unknown_key is not None or e.plaintext):
        raise e


def _raise_over_limit(e: SnapshotTooLarge, frame: bytes) -> None:
    """Nor is an intact frame over this process's limits: a worker whose ``max_frame``
    is smaller than the writer's reported it lost, and the session was written anew
    without it. Raised, it names the limit. A size the bytes present contradict is
    damage."""
    if holds_what_it_declares(frame):
        raise e


def _raise_not_damage(e: SnapshotCorrupt | SnapshotTooLarge, frame: bytes) -> None:
    if isinstance(e, SnapshotCorrupt):
        _raise_unknown_key(e)
    else:
        _raise_over_limit(e, frame)


@dataclass(frozen=True)
class Damage:
    """One thing salvage could not recover. ``item_id`` is empty for a whole-stream or
    head finding (``stream`` is then ``"head"`` for the head)."""

    stream: str
    item_id: str
    reason: str


def salvage_parts(
    codec: Codec,
    key: str,
    head: bytes,
    streams: Mapping[str, Sequence[tuple[str, bytes]]],
    *,
    version: int,
    fallback_heads: Iterable[tuple[int, bytes] | bytes] = (),
) -> tuple[Snapshot, list[Damage]]:
    """Decode what can be decoded of a stored version; return it and what was lost.

    ``fallback_heads`` are older versions' ``(version, head)`` (or bare heads, when the
    version is not known), newest first, tried in turn when ``head`` does not decode.
    Raises `SnapshotCorrupt` when no head decodes (nothing can be rebuilt then: check
    RESUME_SIGNING_KEYS and RESUME_ENCRYPTION_KEYS first), `IncompatibleSnapshot` for a
    frame of a newer format. An empty damage list means the version was intact.
    """
    damage: list[Damage] = []
    data, counts = _head(codec, key, head, version, fallback_heads, damage)

    history_frames = streams.get(HISTORY, ())
    history = _stream(codec, key, HISTORY, history_frames, {}, damage)
    intact = {i["id"]: i for i in history if not _is_note(i)}
    agent_frames = streams.get(AGENT, ())
    agent = data.get("agent")
    if isinstance(agent, dict):
        agent["chat_ctx"] = _stream(codec, key, AGENT, agent_frames, intact, damage)
    elif agent_frames:
        damage.append(
            Damage(AGENT, "", f"{len(agent_frames)} agent items dropped: the head has no agent")
        )
    for stream, frames in ((HISTORY, history_frames), (AGENT, agent_frames)):
        listed = counts.get(stream)
        if isinstance(listed, int) and listed != len(frames):
            damage.append(
                Damage(stream, "", f"head lists {listed} items, the store holds {len(frames)}")
            )
    data["version"] = version
    data["history"] = history
    snapshot = validate_snapshot(data)
    validate_restorable(snapshot)
    return snapshot, damage


def validate_restorable(snapshot: Snapshot) -> None:
    """Raise `SnapshotCorrupt` naming the item unless every chat item of ``snapshot``
    has an id unique in its stream and rebuilds as a LiveKit item with a finite
    ``created_at``: what a store and a restore need."""
    if not math.isfinite(snapshot.created_at):
        raise SnapshotCorrupt(f"session {snapshot.key!r}: created_at is {snapshot.created_at}")
    streams = [(HISTORY, snapshot.history)]
    if snapshot.agent is not None:
        streams.append((AGENT, snapshot.agent.chat_ctx))
    for stream, items in streams:
        check_item_ids(snapshot.key, stream, items)
        for item in items:
            try:
                _check_item(item)
            except SnapshotCorrupt as e:
                raise SnapshotCorrupt(f"session {snapshot.key!r}: {stream} {e}") from None


# -- internals ---------------------------------------------------------------------------


def _check_item(item: ItemData) -> None:
    from .chat import item_from_data  # imports LiveKit: only when a salvage runs

    item_from_data(item)
    created_at = item.get("created_at")
    if not isinstance(created_at, float) or not math.isfinite(created_at):
        raise SnapshotCorrupt(f"chat item {item.get('id')!r}: created_at is {created_at!r}")


def _head(
    codec: Codec,
    key: str,
    head: bytes,
    version: int,
    fallbacks: Iterable[tuple[int, bytes] | bytes],
    damage: list[Damage],
) -> tuple[dict[str, Any], dict[str, Any]]:
    tried: list[str] = []
    for n, entry in enumerate((head, *fallbacks)):
        if isinstance(entry, tuple):
            label, frame = f"version {entry[0]}", entry[1]
        else:
            label, frame = f"version {version}" if n == 0 else f"older head #{n}", entry
        try:
            data, counts = codec.decode_head(key, frame)
            # the head alone must be a valid snapshot, or its items cannot be attached
            validate_snapshot({**data, "history": []})
        except IncompatibleSnapshot:
            raise
        except _DAMAGE as e:
            if n == 0:
                _raise_not_damage(e, frame)
            tried.append(f"{label}: {e}")
            continue
        if tried:
            damage.append(
                Damage(
                    "head",
                    "",
                    f"the head of version {version} does not decode ({tried[0]}); session "
                    f"metadata, userdata and agent were taken from {label}",
                )
            )
            counts = {}  # an older head's counts describe an older log
        return data, counts
    raise SnapshotCorrupt(
        f"session {key!r}: no snapshot head decodes, nothing can be salvaged "
        f"({'; '.join(tried)}); check RESUME_SIGNING_KEYS and RESUME_ENCRYPTION_KEYS"
    )


def _stream(
    codec: Codec,
    key: str,
    stream: str,
    frames: Sequence[tuple[str, bytes]],
    refs: Mapping[str, ItemData],
    damage: list[Damage],
) -> list[ItemData]:
    # First pass: each frame is an item or a loss; runs of losses become one note each.
    slots: list[ItemData | list[str]] = []
    seen: set[str] = set()
    for item_id, frame in frames:
        reason: str | None = None
        if item_id in seen:
            reason = "the stream holds this id twice; the later one was dropped"
        else:
            seen.add(item_id)
            try:
                item = codec.decode_item(key, stream, item_id, frame, refs)
                _check_item(item)
            except IncompatibleSnapshot:
                raise
            except _DAMAGE as e:
                _raise_not_damage(e, frame)
                reason = str(e)
        if reason is None:
            slots.append(item)
            continue
        damage.append(Damage(stream, item_id, reason))
        if slots and isinstance(slots[-1], list):
            slots[-1].append(item_id)
        else:
            slots.append([item_id])
    out: list[ItemData] = []
    # a note's id must be new in its stream: an id lost twice (two runs) names two notes
    taken = {slot["id"] for slot in slots if isinstance(slot, dict)}
    for n, slot in enumerate(slots):
        if isinstance(slot, dict):
            out.append(slot)
            continue
        before = slots[n - 1] if n else None
        after = slots[n + 1] if n + 1 < len(slots) else None
        note_id = base = f"{SALVAGE_ID_PREFIX}{slot[0]}"
        again = 1
        while note_id in taken:
            again += 1
            note_id = f"{base}_{again}"
        taken.add(note_id)
        out.append(_note(note_id, slot, before, after))  # type: ignore[arg-type]  # neighbours of a run are items
    return out


def _note(
    note_id: str, lost: list[str], before: ItemData | None, after: ItemData | None
) -> ItemData:
    """A system message standing where ``lost`` items were, timed just after the item
    before them (LiveKit inserts by ``created_at``), or just before the one after."""
    import time

    from livekit.agents import llm

    from .chat import item_to_data

    if before is not None:
        created_at = math.nextafter(before["created_at"], math.inf)
    elif after is not None:
        created_at = math.nextafter(after["created_at"], -math.inf)
    else:
        created_at = time.time()
    n = len(lost)
    what, verb = ("items", "are") if n > 1 else ("item", "is")
    text = (
        f"[{n} {what} of this conversation could not be recovered from storage "
        f"(damaged) and {verb} missing here.]"
    )
    message = llm.ChatMessage(id=note_id, role="system", content=[text], created_at=created_at)
    return item_to_data(message)


def _is_note(item: ItemData) -> bool:
    return str(item.get("id", "")).startswith(SALVAGE_ID_PREFIX)
