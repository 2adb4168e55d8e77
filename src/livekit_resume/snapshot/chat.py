"""Chat items as plain data, and back, exactly.

`item_to_data` turns one `llm.ChatItem` into a dict of msgpack-safe values (dict, list,
str, int, float, bool, None, bytes) that keeps every field LiveKit stores: ids, exact
`created_at` floats, roles, `interrupted`, `extra`, `metrics`, image ids and options, and
so on. `item_from_data` rebuilds the same pydantic item. `ChatContext.to_dict()` is never
used: its defaults drop timestamps, images and audio.

Shapes (the item's own pydantic field names; `hash`, deprecated, only when set)::

    {"id", "type": "message", "role", "content": [part, ...], "interrupted",
     "transcript_confidence", "extra", "metrics", "created_at"}
    {"id", "type": "function_call", "call_id", "arguments", "name", "created_at",
     "extra", "group_id"}
    {"id", "type": "function_call_output", "name", "call_id", "output", "is_error",
     "created_at", "reply_required"}
    {"id", "type": "agent_handoff", "old_agent_id", "new_agent_id", "created_at"}
    {"id", "type": "agent_config_update", "instructions", "tools_added", "tools_removed",
     "created_at"}

Content parts: a `str` stays a `str`; `{"type": "cache_breakpoint"}`;
`{"type": "image_content", "id", "image": <url or data URL>, "inference_width",
"inference_height", "inference_detail", "mime_type"}`; `{"type": "audio_content",
"transcript", "frame": [{"data": <bytes>, "sample_rate", "num_channels",
"samples_per_channel", "userdata"}]}`; and, for media the policy drops,
`{"type": "dropped_media", "kind": "image" | "audio", ...}` (see `MediaPolicy`).

`extra`, `metrics` and `AudioFrame.userdata` may hold anything, except that a metric
`llm.MetricsReport` declares, an image's options and a config update's tool names keep
the types LiveKit declares, which a restore checks (converted as pydantic's lax mode
does, else left out, with a warning). Plain values are kept as
they are (a tuple becomes a list); anything else goes through
`pydantic_core.to_jsonable_python` (a datetime becomes its ISO string, a set a list, a
pydantic model its dict, a non-string dict key a string); see `values.plain_item_value`.

A chat item never fails to convert, since one that failed would stop every later
checkpoint: what cannot be kept is replaced, with a warning naming the item and field.
A lone surrogate in any text (a tool output, a message, an argument, ``extra``) becomes
U+FFFD: it is not valid Unicode, so no lossless form exists. An int beyond 64 bits
becomes its decimal string; an object pydantic cannot convert becomes None. Nothing is
ever pickled or repr'd. Item ids are kept exactly (LiveKit's ids are ASCII).

The repair of unanswered tool calls on restore lives in `repair` (its names are
re-exported here).
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_type_hints

import pydantic_core
from livekit import rtc
from livekit.agents import llm
from pydantic import BaseModel, TypeAdapter, ValidationError

from livekit_resume.errors import SnapshotCorrupt
from livekit_resume.snapshot.frame import all_str, gc_paused
from livekit_resume.snapshot.model import ItemData, describe_invalid
from livekit_resume.snapshot.repair import INTERRUPTED_OUTPUT, NON_BLOCKING_EXTRA, repair_tool_calls
from livekit_resume.snapshot.values import plain_item_value, saved_form

__all__ = [
    "INTERRUPTED_OUTPUT",
    "NON_BLOCKING_EXTRA",
    "MediaPolicy",
    "ctx_from_data",
    "ctx_to_data",
    "item_from_data",
    "item_to_data",
    "repair_tool_calls",
    "saved_id",
    "without_media",
]

logger = logging.getLogger("livekit_resume.snapshot.chat")

MediaPolicy: TypeAlias = Literal["drop", "keep"]
"""What happens to inline media when items become data.

Image URLs (any string image that is not a ``data:`` URL) are always kept.

``"drop"`` (the default): an inline ``data:`` image, an `rtc.VideoFrame` image and an
`AudioContent`'s frames are replaced by a ``{"type": "dropped_media", ...}`` marker that
keeps the image's id and options, or the audio's transcript. On restore a dropped image
becomes a short text part saying an image was there and was not kept, and a dropped audio
part becomes its transcript as a text part (no part at all when it had no transcript):
an `AudioContent` without frames would crash LiveKit's OpenAI realtime converter, and
LiveKit itself turns realtime input audio into its transcript text the same way.

``"keep"``: a ``data:`` URL is kept as it is; a `VideoFrame` is encoded as LiveKit encodes
it for an LLM (`llm.utils.serialize_image`: JPEG, resized to the inference size when both
are set) and kept as a JPEG data URL; audio frames are kept as raw PCM bytes with their
sample rate, channel count and samples per channel, and rebuilt as `rtc.AudioFrame`s.
A frame that cannot be encoded (Pillow missing, a frame LiveKit cannot resize) is
dropped with a marker and a warning. Every drop is logged at INFO, naming the item.
"""

_DROPPED_IMAGE_TEXT = "[image omitted: this image was not kept when the conversation was saved]"

_ITEM_CLASSES: dict[str, type[BaseModel]] = {
    "message": llm.ChatMessage,
    "function_call": llm.FunctionCall,
    "function_call_output": llm.FunctionCallOutput,
    "agent_handoff": llm.AgentHandoff,
    "agent_config_update": llm.AgentConfigUpdate,
}
# Written only when set; every other field is always written and always required.
_OPTIONAL_FIELDS = frozenset({"hash"})
# Each item type's (allowed, required) keys, computed once: restore checks every item.
_ITEM_KEYS: dict[type[BaseModel], tuple[frozenset[str], frozenset[str]]] = {
    cls: (frozenset(cls.model_fields), frozenset(cls.model_fields) - _OPTIONAL_FIELDS)
    for cls in _ITEM_CLASSES.values()
}
# Each item type's fields in order, read once: pydantic's ``model_fields`` is a
# descriptor that costs microseconds per read, and a checkpoint converts every new item.
_ITEM_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {
    cls: tuple(cls.model_fields) for cls in _ITEM_CLASSES.values()
}
_ITEM_ADAPTER: TypeAdapter[llm.ChatItem] = TypeAdapter(llm.ChatItem)

# The fast path of `item_from_data`: the exact types each field of an item may hold,
# checked in plain Python before the item is built without pydantic (a restore rebuilds
# thousands). Anything else (images, audio, metadata in metrics, config updates, whose
# model has private attributes) goes through pydantic's strict validation, which names
# the culprit. Each check is as strict as that validation or stricter.
_NONE = type(None)
_ROLES = frozenset({"developer", "system", "user", "assistant"})
_FAST_TYPES: dict[type[BaseModel], dict[str, tuple[type, ...]]] = {
    llm.ChatMessage: {
        "id": (str,),
        "type": (str,),
        "role": (str,),
        "interrupted": (bool,),
        "transcript_confidence": (float, _NONE),
        "created_at": (float,),
        "hash": (bytes, _NONE),
        "content": (list,),
        "extra": (dict,),
        "metrics": (dict,),
    },
    llm.FunctionCall: {
        "id": (str,),
        "type": (str,),
        "call_id": (str,),
        "arguments": (str,),
        "name": (str,),
        "created_at": (float,),
        "extra": (dict,),
        "group_id": (str, _NONE),
    },
    llm.FunctionCallOutput: {
        "id": (str,),
        "type": (str,),
        "name": (str,),
        "call_id": (str,),
        "output": (str,),
        "is_error": (bool,),
        "created_at": (float,),
        "reply_required": (bool,),
    },
    llm.AgentHandoff: {
        "id": (str,),
        "type": (str,),
        "old_agent_id": (str, _NONE),
        "new_agent_id": (str,),
        "created_at": (float,),
    },
}
# Metrics LiveKit declares as floats; a metric it declares otherwise takes the slow path,
# one it does not declare is kept as it is (as the slow path keeps it).
_FLOAT_METRICS = frozenset(k for k, t in get_type_hints(llm.MetricsReport).items() if t is float)
_DECLARED_METRICS = frozenset(get_type_hints(llm.MetricsReport))
_TYPE_NAMES = {cls: name for name, cls in _ITEM_CLASSES.items()}
assert all(
    set(_FAST_TYPES[cls]) == set(cls.model_fields) and not cls.__private_attributes__
    for cls in _FAST_TYPES
), "LiveKit's chat item fields changed: update _FAST_TYPES"

_IMAGE_FIELDS = (
    "id",
    "type",
    "image",
    "inference_width",
    "inference_height",
    "inference_detail",
    "mime_type",
)
_IMAGE_KEYS = frozenset(_IMAGE_FIELDS)
_AUDIO_KEYS = frozenset({"type", "transcript", "frame"})
_FRAME_FIELDS = frozenset(
    {"data", "sample_rate", "num_channels", "samples_per_channel", "userdata"}
)


# -- to data -----------------------------------------------------------------------------

# Field values `_plain` returns unchanged (a str only when ASCII): `item_to_data` keeps
# them without building the field's name for a warning it cannot give.
_KEPT_AS_IS = frozenset({bool, float, bytes, str})


def _plain(value: Any, where: str) -> Any:
    """`value` as msgpack-safe plain data (see the module docstring for the rule)."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is bytes:
        return value
    if kind is str and value.isascii():
        return value  # the common case, without the walk
    return plain_item_value(value, where)


# Each item type's fields LiveKit declares as text (``str``, maybe ``None``): a value set
# there without validation (an app's assignment) is stored as text, which a restore
# accepts, never as it is, which a restore would refuse (`_as_text`).
_TEXT_FIELDS: dict[type[BaseModel], frozenset[str]] = {
    cls: frozenset(n for n, kinds in types.items() if str in kinds and set(kinds) <= {str, _NONE})
    for cls, types in _FAST_TYPES.items()
}


# The text fields an item cannot be without: None there (an app's assignment) is saved
# as text too, which a restore takes, never as None, which it refuses.
_REQUIRED_TEXT: dict[type[BaseModel], frozenset[str]] = {
    **{
        cls: frozenset(n for n, kinds in t.items() if kinds == (str,))
        for cls, t in _FAST_TYPES.items()
    },
    llm.AgentConfigUpdate: frozenset({"id"}),
}


# Each item type's fields LiveKit holds as something other than text, with the types a
# restore takes there (the content list is built here, never assigned as is). A value
# assigned without validation (``interrupted=1``, ``role="tool"``) was saved as it was
# and then refused by every restore of the session: `_restorable` converts it first.
_VALUE_TYPES: dict[type[BaseModel], tuple[tuple[str, tuple[type, ...]], ...]] = {
    **{
        cls: tuple(
            (n, kinds)
            for n, kinds in types.items()
            if n not in _TEXT_FIELDS[cls] and n != "content"
        )
        for cls, types in _FAST_TYPES.items()
    },
    llm.AgentConfigUpdate: (
        ("instructions", (str, _NONE)),
        ("tools_added", (list, _NONE)),
        ("tools_removed", (list, _NONE)),
        ("created_at", (float,)),
    ),
}
# What a required field without a default gets when its value cannot be converted: a
# message of an unknown role is kept as the user's (the least trusted role, never an
# instruction or the model's own words).
_REQUIRED_FALLBACK: dict[str, Any] = {"role": "user", "is_error": False}
_FIELD_ADAPTERS: dict[tuple[type[BaseModel], str], TypeAdapter[Any]] = {}


def _restorable(cls: type[BaseModel], name: str, value: Any, where: str) -> Any:
    """``value`` of field ``name``, of a type a restore refuses there, as one it takes:
    converted as pydantic's lax mode converts it (``1`` → ``True``), else the field's
    default; with a warning."""
    kinds = dict(_VALUE_TYPES[cls]).get(name, (str,))  # role: a text field
    if float in kinds and type(value) is int:
        return float(value)  # what a restore makes of it too: no warning
    field = cls.model_fields[name]
    adapter = _FIELD_ADAPTERS.get((cls, name))
    if adapter is None:
        adapter = _FIELD_ADAPTERS[cls, name] = TypeAdapter(field.annotation or Any)
    try:
        fixed = _plain(adapter.validate_python(value), where)
        kept = type(fixed) in kinds and (name != "role" or fixed in _ROLES)
    except (ValidationError, TypeError):
        kept = False
    if not kept:
        fixed = (
            _REQUIRED_FALLBACK.get(name)
            if field.is_required()
            else _plain(field.get_default(call_default_factory=True), where)
        )
    logger.warning(
        "%s: saved as %r: a %s LiveKit does not hold there, which a restore refuses",
        where,
        fixed,
        type(value).__name__,
    )
    return fixed


def _as_text(value: Any, where: str) -> str:
    """A plain value (`_plain`'s) where LiveKit holds text, as text: bytes decoded as
    UTF-8 (an invalid byte as U+FFFD), anything else as its JSON; with a warning."""
    text = _text_of(value)
    logger.warning("%s: saved as text: a %s where LiveKit holds text", where, type(value).__name__)
    return text


def _text_of(plain: Any) -> str:
    """`_as_text` without its warning: bytes as UTF-8 (an invalid byte as U+FFFD),
    anything else as its JSON (`saved_id` makes ids with it, so the two agree)."""
    if type(plain) is bytes:
        return plain.decode("utf-8", "replace")
    return pydantic_core.to_json(plain, bytes_mode="base64").decode()


_METRICS_ADAPTER: TypeAdapter[Any] = TypeAdapter(llm.MetricsReport)


def _pruned(value: Any, locs: list[tuple[Any, ...]]) -> Any:
    """``value`` (plain data) without the entries ``locs`` point at (the locations of
    pydantic's errors in it: map keys and list indexes)."""
    drop = {loc[0] for loc in locs if len(loc) == 1}
    deeper: dict[Any, list[tuple[Any, ...]]] = {}
    for loc in locs:
        if len(loc) > 1:
            deeper.setdefault(loc[0], []).append(loc[1:])
    if isinstance(value, dict):
        return {
            k: _pruned(v, deeper[k]) if k in deeper else v
            for k, v in value.items()
            if k not in drop
        }
    if isinstance(value, list):
        return [
            _pruned(v, deeper[i]) if i in deeper else v
            for i, v in enumerate(value)
            if i not in drop
        ]
    return value


def _restorable_metrics(metrics: dict[str, Any], where: str) -> dict[str, Any]:
    """``metrics`` as a restore validates them (`MetricsReport`, strictly): a declared
    metric of another type is converted as pydantic's lax mode converts it, else its
    refused entries are left out (a ``stt_metadata`` without a provider keeps its
    model), else the metric is; with a warning. LiveKit itself assigns ``metrics``
    unvalidated (an STT that names no provider): stored as it was, every restore of
    the session refused it."""
    try:
        _METRICS_ADAPTER.validate_python(metrics, strict=True)
        return metrics
    except ValidationError as e:
        errors = [tuple(err["loc"]) for err in e.errors()]
    fixed = dict(metrics)
    for key in dict.fromkeys(str(loc[0]) for loc in errors if loc):
        value = fixed.pop(key)
        candidates = []
        with contextlib.suppress(ValidationError, KeyError, TypeError):
            candidates.append(_plain(_METRICS_ADAPTER.validate_python({key: value})[key], where))
        inner = [loc[1:] for loc in errors if loc[0] == key and len(loc) > 1]
        if inner:
            candidates.append(_pruned(value, inner))
        for candidate in candidates:
            try:
                _METRICS_ADAPTER.validate_python({key: candidate}, strict=True)
            except ValidationError:
                continue
            fixed[key] = candidate
            break
        logger.warning(
            "%s metric %r: %s: a %s LiveKit does not hold there, which a restore refuses",
            where,
            key,
            f"saved as {fixed[key]!r}" if key in fixed else "left out",
            type(value).__name__,
        )
    return fixed


def _needs_restorable_metrics(metrics: dict[str, Any]) -> bool:
    """Whether a restore validates ``metrics`` (the fast path takes only floats)."""
    declared = metrics.keys() & _DECLARED_METRICS
    return bool(declared) and (
        not declared <= _FLOAT_METRICS or any(type(metrics[k]) is not float for k in declared)
    )


def _restorable_image(data: ItemData, where: str) -> ItemData:
    """An image part's data as a restore validates it (`ImageContent`, strictly): an
    option of another type (an ``inference_width`` past 64 bits, saved as text, an
    ``inference_detail`` assigned unvalidated) converted as pydantic's lax mode does,
    else its default; with a warning."""
    try:
        llm.ImageContent.model_validate(data, strict=True)
        return data
    except ValidationError as e:
        bad = dict.fromkeys(err["loc"][0] for err in e.errors() if err["loc"])
    fields = llm.ImageContent.model_fields
    for name in bad:
        if name not in fields or name in ("type", "image"):
            continue  # built here, never an app's value
        value = data[name]
        try:
            fixed = _plain(getattr(llm.ImageContent(image="", **{name: value}), name), where)
            llm.ImageContent.model_validate({"image": "", name: fixed}, strict=True)
        except (ValidationError, TypeError):
            fixed = _plain(fields[name].get_default(call_default_factory=True), where)
        data[name] = fixed
        logger.warning(
            "%s image %r: saved as %r: a %s LiveKit does not hold there, which a restore refuses",
            where,
            name,
            fixed,
            type(value).__name__,
        )
    return data


def _restorable_config(data: ItemData, where: str) -> ItemData:
    """An `llm.AgentConfigUpdate`'s data as a restore validates it: entries of its tool
    lists that are not names left out (``tools_added=["a", None]``), an id that is not
    text made text, any other field refused its default; with a warning."""
    try:
        _ITEM_ADAPTER.validate_python(data, strict=True)
        return data
    except ValidationError as e:
        locs = [tuple(err["loc"])[1:] for err in e.errors()]
    inner = [loc for loc in locs if len(loc) > 1]
    fixed: ItemData = _pruned(data, inner)
    fields = llm.AgentConfigUpdate.model_fields
    for name in dict.fromkeys(str(loc[0]) for loc in locs if len(loc) == 1):
        if name == "id":
            fixed[name] = _as_text(fixed[name], f"{where} field 'id'")
        elif name in fields and name != "type":
            fixed[name] = _plain(fields[name].get_default(call_default_factory=True), where)
    logger.warning(
        "%s: saved without %s: values LiveKit does not hold there, which a restore refuses",
        where,
        ", ".join(".".join(map(str, loc)) for loc in locs),
    )
    return fixed


def _dropped_image(get: Callable[[str], Any], source: str) -> ItemData:
    """The marker of an image not kept, of its fields as ``get`` reads them (an
    `llm.ImageContent`'s attributes, or its data's keys: `without_media`)."""
    return {
        "type": "dropped_media",
        "kind": "image",
        "id": get("id"),
        "source": source,
        "inference_width": get("inference_width"),
        "inference_height": get("inference_height"),
        "inference_detail": get("inference_detail"),
        "mime_type": get("mime_type"),
    }


def _dropped_audio(transcript: Any, duration: float) -> ItemData:
    """The marker of audio frames not kept: their transcript and length."""
    return {
        "type": "dropped_media",
        "kind": "audio",
        "transcript": transcript,
        "duration": duration,
    }


def _image_marker(image: llm.ImageContent, source: str, where: str) -> ItemData:
    marker = _dropped_image(lambda name: getattr(image, name), source)
    return _plain(marker, where)  # type: ignore[no-any-return]


def _image_to_data(image: llm.ImageContent, media: MediaPolicy, where: str) -> ItemData:
    src = image.image
    if isinstance(src, str):
        if src.startswith("data:") and media == "drop":
            logger.info("%s: inline image %r not kept (media='drop')", where, image.id)
            return _image_marker(image, "data_url", where)
        url = src
    else:
        if media == "drop":
            logger.info("%s: video frame image %r not kept (media='drop')", where, image.id)
            return _image_marker(image, "video_frame", where)
        try:
            encoded = llm.utils.serialize_image(image)
        except Exception as exc:  # LiveKit's and Pillow's own errors (a 0-pixel frame: 1/0)
            logger.warning(
                "%s: cannot encode video frame image %r (%s); dropped from the snapshot",
                where,
                image.id,
                exc,
            )
            return _image_marker(image, "video_frame", where)
        assert encoded.data_bytes is not None
        b64 = base64.b64encode(encoded.data_bytes).decode("ascii")
        url = f"data:{encoded.mime_type or 'image/jpeg'};base64,{b64}"
    data: ItemData = {name: getattr(image, name) for name in _IMAGE_FIELDS}
    data["image"] = url
    return _restorable_image(_plain(data, where), where)


def _audio_to_data(audio: llm.AudioContent, media: MediaPolicy, where: str) -> ItemData:
    if media == "drop":
        logger.info("%s: audio frames not kept (media='drop'), its transcript is", where)
        transcript = _plain(audio.transcript, f"{where} transcript")
        return _dropped_audio(transcript, sum(f.duration for f in audio.frame))
    return {
        "type": "audio_content",
        "transcript": _plain(audio.transcript, f"{where} transcript"),
        "frame": [
            {
                "data": bytes(f.data),
                "sample_rate": f.sample_rate,
                "num_channels": f.num_channels,
                "samples_per_channel": f.samples_per_channel,
                "userdata": _plain(f.userdata, f"{where} audio frame userdata"),
            }
            for f in audio.frame
        ],
    }


def without_media(data: ItemData) -> ItemData:
    """An item's data read with ``media="keep"``, as ``media="drop"`` would have read it:
    inline images and audio frames as their markers (a video frame kept is an inline
    image by then)."""
    content = data.get("content")
    if type(content) is not list:
        return data
    parts: list[Any] = []
    for part in content:
        kind = part.get("type") if type(part) is dict else None
        if kind == "image_content" and str(part.get("image", "")).startswith("data:"):
            parts.append(_dropped_image(part.get, "data_url"))
        elif kind == "audio_content":
            frames = part.get("frame") or []
            duration = sum(f["samples_per_channel"] / f["sample_rate"] for f in frames)
            parts.append(_dropped_audio(part.get("transcript"), duration))
        else:
            parts.append(part)
    return {**data, "content": parts}


def _content_to_data(part: Any, media: MediaPolicy, item_id: str, index: int) -> Any:
    if type(part) is str and part.isascii():
        return part  # the common case (`_plain`), without naming it
    where = f"item {item_id!r} content[{index}]"
    if type(part) is str:
        return _plain(part, where)
    if isinstance(part, llm.ImageContent):
        return _image_to_data(part, media, where)
    if isinstance(part, llm.AudioContent):
        return _audio_to_data(part, media, where)
    if isinstance(part, llm.CacheBreakpoint):
        return {"type": "cache_breakpoint"}
    if isinstance(part, str):
        return _plain(str.__str__(part), where)
    # not a part LiveKit knows (an app's mutation): saved as text, as the module promises
    # (a part that stopped every later checkpoint would lose the whole conversation)
    plain = _plain(part, where)
    return plain if type(plain) is str else _as_text(plain, where)


def _content_list(value: Any, where: str) -> list[Any]:
    """A message's ``content`` assigned something other than a list, as the list a
    restore takes: none for None, the parts of a tuple, else the value as one part."""
    parts = [] if value is None else list(value) if type(value) is tuple else [value]
    logger.warning("%s: a %s saved as %r", where, type(value).__name__, parts)
    return parts


def saved_id(value: Any) -> str:
    """The id `item_to_data` saves an item whose ``id`` is ``value`` under, without its
    warnings: LiveKit's own (ASCII text) as it is, another value as the text it makes of
    it (a lone surrogate replaced, an int or None as its JSON)."""
    if type(value) is str and value.isascii():
        return value
    plain = saved_form(value)
    return plain if type(plain) is str else _text_of(plain)


def item_to_data(item: llm.ChatItem, *, media: MediaPolicy = "drop") -> ItemData:
    """One chat item as plain, msgpack-safe data keeping every field (see `MediaPolicy`)."""
    cls = type(item)
    fields = _ITEM_FIELDS.get(cls)
    if fields is None:
        raise TypeError(f"not a LiveKit chat item: {cls.__qualname__}")
    if media not in ("drop", "keep"):
        raise ValueError(f"media policy must be 'drop' or 'keep', not {media!r}")
    values = item.__dict__  # read fields directly: `hash` warns when read as an attribute
    text = _TEXT_FIELDS.get(cls, frozenset())
    data: ItemData = {}
    for name in fields:
        value = values[name]
        kind = type(value)
        if name == "content" and isinstance(item, llm.ChatMessage):
            if kind is not list:
                value = _content_list(value, f"item {item.id!r} field 'content'")
            data[name] = [_content_to_data(part, media, item.id, i) for i, part in enumerate(value)]
        elif value is None:
            if name in _REQUIRED_TEXT[cls]:
                data[name] = _as_text(None, f"item {item.id!r} field {name!r}")
            elif name not in _OPTIONAL_FIELDS:
                data[name] = None
        elif kind in _KEPT_AS_IS and (value.isascii() if kind is str else name not in text):
            data[name] = value  # the common cases of `_plain`, without naming the field
        elif kind is dict and not value and name not in text:
            data[name] = {}  # an empty ``extra`` or ``metrics``: `_plain` gives a new {}
        else:
            where = f"item {item.id!r} field {name!r}"
            plain = _plain(value, where)
            if name in text and type(plain) is not str:
                plain = _as_text(plain, where)
            data[name] = plain
    for name, kinds in _VALUE_TYPES[cls]:
        if type(data.get(name)) not in kinds:
            data[name] = _restorable(cls, name, data[name], f"item {item.id!r} field {name!r}")
    if cls is llm.ChatMessage and data["role"] not in _ROLES:
        data["role"] = _restorable(cls, "role", data["role"], f"item {item.id!r} field 'role'")
    extra = data.get("extra")
    if extra and not all_str(extra):
        data["extra"] = _str_keyed(extra, f"item {item.id!r} field 'extra'")
    if cls is llm.ChatMessage:
        metrics = data["metrics"]
        if metrics and _needs_restorable_metrics(metrics):
            data["metrics"] = _restorable_metrics(metrics, f"item {item.id!r}")
    elif cls is llm.AgentConfigUpdate:
        data = _restorable_config(data, f"item {item.id!r}")
    return data


def _str_keyed(value: dict[Any, Any], where: str) -> dict[str, Any]:
    """An item's ``extra`` with its bytes keys as text (UTF-8, other bytes escaped), with
    a warning: LiveKit holds ``dict[str, Any]`` there, and a restore refuses another key
    (every restore of the session did). A key whose text another key has is left out."""
    out = {k: v for k, v in value.items() if type(k) is str}
    for k, v in value.items():
        if type(k) is str:
            continue
        text = k.decode("utf-8", "backslashreplace") if type(k) is bytes else str(k)
        if text in out:
            logger.warning(
                "%s: key %r left out: it becomes %r, a key it has already", where, k, text
            )
            continue
        logger.warning("%s: key %r saved as %r: LiveKit holds str keys there", where, k, text)
        out[text] = v
    return out


def ctx_to_data(ctx: llm.ChatContext, *, media: MediaPolicy = "drop") -> list[ItemData]:
    """Every item of `ctx`, in order, as plain data (see `item_to_data`)."""
    return [item_to_data(item, media=media) for item in ctx.items]


# -- from data ---------------------------------------------------------------------------


def _corrupt(item_id: object, problem: str) -> SnapshotCorrupt:
    label = repr(item_id) if isinstance(item_id, str) else "without an id"
    return SnapshotCorrupt(f"chat item {label}: {problem}")


def _check_keys(
    item_id: object,
    what: str,
    data: dict[str, Any],
    allowed: frozenset[str],
    required: frozenset[str],
) -> None:
    """No key outside ``allowed``, none of ``required`` missing. The good case is two
    set comparisons in C; the lists of culprits are built only for the error."""
    keys = data.keys()
    if keys <= allowed and required <= keys:
        return
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise _corrupt(item_id, f"{what} has unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - keys)
    raise _corrupt(item_id, f"{what} is missing field(s) {', '.join(missing)}")


def _frame_from_data(item_id: object, raw: Any) -> rtc.AudioFrame:
    if not isinstance(raw, dict):
        raise _corrupt(item_id, f"audio frame is a {type(raw).__name__}, not a mapping")
    _check_keys(item_id, "audio frame", raw, _FRAME_FIELDS, _FRAME_FIELDS)
    data = raw["data"]
    ints = [raw[k] for k in ("sample_rate", "num_channels", "samples_per_channel")]
    userdata = raw["userdata"]
    if not isinstance(data, bytes) or any(type(v) is not int or v < 0 for v in ints):
        raise _corrupt(item_id, "audio frame needs bytes data and non-negative int sizes")
    if not isinstance(userdata, dict):
        raise _corrupt(item_id, "audio frame userdata is not a mapping")
    try:
        return rtc.AudioFrame(data, *ints, userdata=userdata)
    except (ValueError, TypeError) as exc:
        raise _corrupt(item_id, f"invalid audio frame: {exc}") from exc


def _content_from_data(item_id: object, part: Any) -> list[llm.ChatContent]:
    if isinstance(part, str):
        return [part]
    if not isinstance(part, dict):
        raise _corrupt(item_id, f"content part is a {type(part).__name__}")
    kind = part.get("type")
    try:
        if kind == "cache_breakpoint":
            return [llm.CacheBreakpoint.model_validate(part, strict=True)]
        if kind == "image_content":
            _check_keys(item_id, "image content", part, _IMAGE_KEYS, _IMAGE_KEYS)
            if not isinstance(part["image"], str):
                raise _corrupt(item_id, "image content 'image' is not a string")
            return [llm.ImageContent.model_validate(part, strict=True)]
        if kind == "audio_content":
            _check_keys(item_id, "audio content", part, _AUDIO_KEYS, _AUDIO_KEYS)
            frames = part["frame"]
            if not isinstance(frames, list):
                raise _corrupt(item_id, "audio content 'frame' is not a list")
            return [
                llm.AudioContent.model_validate(
                    {
                        "type": "audio_content",
                        "transcript": part["transcript"],
                        "frame": [_frame_from_data(item_id, f) for f in frames],
                    },
                    strict=True,
                )
            ]
    except ValidationError as exc:
        raise _corrupt(item_id, f"invalid {kind} content: {describe_invalid(exc)}") from exc
    if kind == "dropped_media":
        media_kind = part.get("kind")
        if media_kind == "image":
            return [_DROPPED_IMAGE_TEXT]
        if media_kind == "audio":
            transcript = part.get("transcript")
            if transcript is not None and not isinstance(transcript, str):
                raise _corrupt(item_id, "dropped audio transcript is not a string")
            return [transcript] if transcript else []
        raise _corrupt(item_id, f"dropped media of unknown kind {media_kind!r}")
    raise _corrupt(item_id, f"content part of unknown type {kind!r}")


def item_from_data(data: ItemData) -> llm.ChatItem:
    """Rebuild the chat item `item_to_data` made; raises `SnapshotCorrupt` on bad data.

    Dropped media comes back as text (see `MediaPolicy`).
    """
    if type(data) is dict:
        # the fast path: a map of a shape already checked (its type, keys and the exact
        # type of each value) only needs its values' own contents checked
        shape = _shape(data)
        known = _SHAPES.get(shape)
        if known is not None:
            fast = _fast_item(known, data)
            if fast is not None:
                return fast
    if not isinstance(data, dict):
        raise SnapshotCorrupt(f"chat item is a {type(data).__name__}, not a mapping")
    item_id = data.get("id")
    if not isinstance(item_id, str):
        raise _corrupt(item_id, "missing or non-string 'id'")
    kind = data.get("type")
    cls = _ITEM_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _corrupt(item_id, f"unknown item type {kind!r}")
    _check_keys(item_id, str(kind), data, *_ITEM_KEYS[cls])
    known = _known_shape(cls, data)
    fast = None if known is None else _fast_item(known, data)
    if fast is not None:
        return fast

    values = dict(data)
    if cls is llm.ChatMessage:
        content = data["content"]
        if not isinstance(content, list):
            raise _corrupt(item_id, "message 'content' is not a list")
        values["content"] = [c for part in content for c in _content_from_data(item_id, part)]
    try:
        item = _ITEM_ADAPTER.validate_python(values, strict=True)
    except ValidationError as exc:
        if not (cls is llm.ChatMessage and type(data["metrics"]) is dict and _in_metrics(exc)):
            raise _corrupt(item_id, f"invalid {kind}: {describe_invalid(exc)}") from exc
        # saved before the checkpoint made its metrics restorable (an STT that names no
        # provider): telemetry, not the conversation, so fixed here as it is on saving
        values["metrics"] = _restorable_metrics(data["metrics"], f"item {item_id!r}")
        try:
            item = _ITEM_ADAPTER.validate_python(values, strict=True)
        except ValidationError as again:
            raise _corrupt(item_id, f"invalid {kind}: {describe_invalid(again)}") from again

    if isinstance(item, llm.ChatMessage):
        # MetricsReport is a TypedDict: validation drops keys it does not declare, but
        # LiveKit (or the app) may have written more into the live dict. Keep them.
        saved = values["metrics"]
        metrics: dict[str, Any] = item.metrics  # type: ignore[assignment]
        for key, value in saved.items():
            metrics.setdefault(key, value)
    return item


def _in_metrics(exc: ValidationError) -> bool:
    """Whether every error of a message's validation is in its ``metrics``."""
    return all(tuple(err["loc"])[1:2] == ("metrics",) for err in exc.errors())


@dataclass(frozen=True, slots=True)
class _Shape:
    """An item map's shape the fast path takes: its class, and how its values become the
    model's fields (``in_order``: its keys are the fields in order, less ``unset``)."""

    cls: type[BaseModel]
    in_order: bool
    unset: tuple[str, ...]


# Shapes of item maps seen to hold every field with exactly the type it should (keys
# allowed and required, each value's type in `_FAST_TYPES`), keyed by `_shape`: a
# restore rebuilds thousands of items of a handful of shapes. Bounded: a shape is a few
# dozen bytes, and a writer makes few (a key order, an optional field set or not).
_SHAPES: dict[tuple[Any, ...], _Shape] = {}
_MAX_SHAPES = 512


def _shape(data: ItemData) -> tuple[Any, ...]:
    """What `_SHAPES` is keyed by: the type field, the keys in order, their values' types
    (a type field that is not a `str`, maybe unhashable, as None: never a known shape)."""
    kind = data.get("type")
    return (kind if type(kind) is str else None, *data, *map(type, data.values()))


def _known_shape(cls: type[BaseModel], data: ItemData) -> _Shape | None:
    """The shape of ``data`` (keys already checked) when every field holds exactly the
    type it should (remembered in `_SHAPES`), else None (pydantic validates it)."""
    types = _FAST_TYPES.get(cls)
    if types is None or data.get("type") != _TYPE_NAMES[cls]:
        return None
    for name, value in data.items():
        if type(value) not in types[name]:
            return None
    order = _ITEM_FIELDS[cls]
    unset = tuple(name for name in order if name not in data)
    known = _Shape(
        cls,
        tuple(data) == tuple(n for n in order if n in data)
        and (not unset or order[-len(unset) :] == unset),
        unset,
    )
    if len(_SHAPES) >= _MAX_SHAPES:
        _SHAPES.clear()
    _SHAPES[_shape(data)] = known
    return known


_STR = frozenset((str,))


def _only_str(values: Iterable[Any]) -> bool:
    """Whether every value (every key of a map) is a str, not a subclass: validation
    gives a subclass back as a plain str (msgpack never makes one; an app's map may)."""
    return set(map(type, values)) <= _STR


def _fast_item(shape: _Shape, data: ItemData) -> llm.ChatItem | None:
    """The item built from ``data``, of a shape the fast path takes, when its values'
    contents hold what they should, else None (the caller validates it with pydantic)."""
    cls = shape.cls
    if shape.in_order:
        values = data.copy()  # dict order: the model's field order
        for name in shape.unset:
            values[name] = None
    else:
        values = {name: data.get(name) for name in _ITEM_FIELDS[cls]}
    # its own containers, as validation gives (their values are shared, as with `Any`)
    if cls is llm.ChatMessage:
        content = values["content"] = list(data["content"])
        # one text part, the commonest content, without `_only_str`'s set
        one_text = len(content) == 1 and type(content[0]) is str
        if data["role"] not in _ROLES or not (one_text or _only_str(content)):
            return None  # not only text: a part is checked (and built) by pydantic
        metrics = values["metrics"] = dict(data["metrics"])
        if metrics:
            if not _only_str(metrics):
                return None
            declared = metrics.keys() & _DECLARED_METRICS
            if declared:
                if not declared <= _FLOAT_METRICS:
                    return None
                for k in declared:  # a loop, not `any` of a generator: per item
                    if type(metrics[k]) is not float:
                        return None
    if "extra" in values:
        extra = values["extra"] = dict(data["extra"])
        if extra and not _only_str(extra):
            return None
    # What `model_construct` does, without its per-field machinery: the model has no
    # private attributes (checked above) and every field is set. Its slots are set
    # through their descriptors, found once (`object.__setattr__` looks each one up).
    item = cls.__new__(cls)
    _set_dict(item, values)
    _set_fields_set(item, set(data))
    _set_extra(item, None)
    _set_private(item, None)
    return item  # type: ignore[return-value]  # one of the fast-path item classes


# `BaseModel`'s slots, as `_fast_item` sets them: the very descriptors
# `object.__setattr__` would find (no item class redefines one, checked here).
_SLOTS = ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
_set_dict, _set_fields_set, _set_extra, _set_private = (
    BaseModel.__dict__[name].__set__ for name in _SLOTS
)
assert not any(
    name in base.__dict__
    for cls in _FAST_TYPES
    for base in cls.__mro__[: cls.__mro__.index(BaseModel)]
    for name in _SLOTS
), "a LiveKit chat item class redefines a slot of BaseModel: update _fast_item"


def ctx_from_data(items: list[ItemData]) -> llm.ChatContext:
    """A `ChatContext` of the rebuilt items, in the given order (never re-sorted)."""
    if not isinstance(items, list):
        raise SnapshotCorrupt(f"chat items are a {type(items).__name__}, not a list")
    with gc_paused():
        return llm.ChatContext([item_from_data(data) for data in items])
