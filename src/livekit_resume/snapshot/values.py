"""App values (userdata, the session's ``extra``, chat items' ``extra``) as plain data.

A snapshot body is msgpack: dict (str or bytes keys), list, str, bytes, int in 64 bits,
float, bool, None. Anything else is turned into those here, once, where the value is
known, so that one odd value can never make every later checkpoint fail.

The rules (also in docs/guide.md, "What userdata can hold"):

* kept as they are: str, bytes (any bytes: msgpack stores them as binary), int within
  64 bits, float (NaN and infinities too), bool, None; bytearray and memoryview become
  bytes;
* containers: a list or tuple becomes a list, a set or frozenset a list, a dict a dict
  whose non-str keys become strings (bytes keys stay bytes);
* any other value goes through `pydantic_core.to_jsonable_python`: a datetime becomes
  its ISO string, a UUID or Decimal its string, an Enum its value, a pydantic model or
  dataclass its dict;
* an int beyond 64 bits is stored as its decimal string: a field declared ``int`` gets
  it back as the same int (pydantic's lax validation); where nothing declares it an int
  (``Any``, a bare ``dict``, the session's ``extra``) it would come back as a str, so it
  is refused;
* refused, with `UnsavableValue` naming the value's path and type: a str holding a lone
  surrogate (not valid Unicode), an object pydantic cannot convert, an iterator (saving
  its values would use it up), a pydantic secret (dumped as its mask), nesting deeper
  than `MAX_DEPTH`, two keys of one dict that become the same string, and userdata whose
  saved form does not load back into its type (or loads back a dataclass field with
  ``init=False`` at its default).

`dump_userdata` and `plain_extra` refuse (the caller keeps saving the rest);
`plain_item_value`, for chat items, never refuses: a conversation must always save, so it
replaces what it cannot keep and logs a warning naming the item and field.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import pydantic
import pydantic_core
from pydantic import SecretBytes, SecretStr, TypeAdapter, ValidationError

from livekit_resume.errors import UnsavableValue
from livekit_resume.msgscan import MAX_VALUES
from livekit_resume.snapshot.frame import MAX_DEPTH as FRAME_DEPTH

__all__ = [
    "MAX_DEPTH",
    "clean_text",
    "dump_userdata",
    "plain_extra",
    "plain_item_value",
    "saved_form",
]

logger = logging.getLogger("livekit_resume.snapshot.values")

# A frame holds values nested at most `frame.MAX_DEPTH` levels (its codec refuses the
# whole frame beyond) and a snapshot wraps each value in a few levels of its own (the
# head, an item and its field); app state is a few levels deep, so anything this deep
# is a bug (or a cycle) and is refused here, where only that value is lost, before it
# can stop a save.
MAX_DEPTH = FRAME_DEPTH - 8

# msgpack's integer range: the signed 64-bit minimum and the unsigned 64-bit maximum.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_MISSING: Any = object()
# stands for "a member of this set" in a trail: no index survives a set
_SET: Any = object()
# a problem's path shows this many segments at each end (a cycle makes it very long)
_PATH_ENDS = 8
_CONVERT_ERRORS = (pydantic_core.PydanticSerializationError, ValueError, TypeError)

_BIG_INT_TODO = (
    "declare the field as int (it is then saved as its decimal string), "
    "or store str(value) yourself"
)


def _big_int_problem(value: int) -> str:
    return (
        f"({value}) is beyond 64 bits and no type declares it an int (it would come back as a str)"
    )


class _Trail:
    """Where a value sits: a linked list up to the root, formatted only on a problem."""

    __slots__ = ("attr", "depth", "key", "parent", "root")

    def __init__(
        self, root: str, parent: _Trail | None = None, key: Any = None, attr: bool = False
    ) -> None:
        self.root, self.parent, self.key, self.attr = root, parent, key, attr
        self.depth: int = parent.depth + 1 if parent is not None else 0

    def child(self, key: Any, orig_parent: Any = _MISSING) -> _Trail:
        # a model's or dataclass's field reads as an attribute, a dict's key as an index
        attr = (
            isinstance(key, str)
            and key.isidentifier()
            and orig_parent is not _MISSING
            and not isinstance(orig_parent, Mapping)
        )
        return _Trail(self.root, self, key, attr)

    def keys(self) -> tuple[Any, ...]:
        out: list[Any] = []
        node: _Trail | None = self
        while node is not None and node.parent is not None:
            out.append(node.key)
            node = node.parent
        return tuple(reversed(out))

    def __str__(self) -> str:
        segments: list[str] = []
        node: _Trail | None = self
        while node is not None and node.parent is not None:
            if node.key is _SET:
                segments.append("[<member>]")
            else:
                segments.append(f".{node.key}" if node.attr else f"[{node.key!r}]")
            node = node.parent
        segments.reverse()
        if len(segments) > 2 * _PATH_ENDS:
            segments[_PATH_ENDS:-_PATH_ENDS] = ["..."]
        return self.root + "".join(segments)


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clean_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (a valid pair is joined)."""
    if not _has_surrogate(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _is_plain_scalar(value: Any) -> bool:
    """Kept as it is, with nothing to check (most values: a fast path)."""
    kind = type(value)
    if kind is str:
        return value.isascii()  # type: ignore[no-any-return]
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX  # type: ignore[no-any-return]
    return value is None or kind is bool or kind is float or kind is bytes


def _child(orig: Any, key: Any) -> Any:
    """The original object under `key` of `orig` (to name model fields as attributes)."""
    if orig is _MISSING:
        return _MISSING
    if isinstance(orig, Mapping):
        return orig.get(key, _MISSING)
    if isinstance(orig, (list, tuple)):
        return orig[key] if isinstance(key, int) and 0 <= key < len(orig) else _MISSING
    if isinstance(key, str):
        return getattr(orig, key, _MISSING)
    return _MISSING


class _Walker:
    """Turns one value into plain data: strict (refuse) or lenient (replace and warn)."""

    def __init__(
        self,
        *,
        lenient: bool,
        big: list[tuple[_Trail, int]] | None = None,
        quiet: bool = False,
    ) -> None:
        self.lenient, self.quiet = lenient, quiet
        # where too-big ints were stringified, to check they load back as ints; None: a
        # too-big int is refused (strict) or stringified with a warning (lenient)
        self.big = big
        # the values of what was walked, as msgpack counts them (`msgscan`): a list or
        # map once, each element, each key and each value
        self.values = 1

    def problem(
        self,
        where: _Trail | str,
        value: Any,
        what: str,
        todo: str,
        replacement: Any,
        saved_as: str,
    ) -> Any:
        """Refuse `value` (strict), or log and return `replacement` (lenient)."""
        path, kind = str(where), _type_name(value)
        if not self.lenient:
            raise UnsavableValue(f"{path}: cannot save this {kind}: {what}; {todo}", path=path)
        if self.quiet:
            return replacement
        logger.warning("%s: saved %s: this %s %s", path, saved_as, kind, what, extra={"path": path})
        return replacement

    def text(self, value: str, where: _Trail | str) -> str:
        if not _has_surrogate(value):
            return value
        return str(
            self.problem(
                where,
                value,
                "holds a lone surrogate, which is not valid Unicode",
                "decode text with errors='replace' (or keep raw data as bytes) before storing it",
                clean_text(value),
                "with each lone surrogate replaced by U+FFFD",
            )
        )

    def walk(self, value: Any, trail: _Trail, orig: Any = _MISSING) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is float or kind is bytes:
            return value
        if kind is str:
            return self.text(value, trail)
        if kind is int:
            if _INT_MIN <= value <= _INT_MAX:
                return value
            if self.big is not None:
                self.big.append((trail, value))
                return str(value)
            return self.problem(
                trail,
                value,
                _big_int_problem(value),
                _BIG_INT_TODO,
                str(value),
                "its decimal string",
            )
        if trail.depth >= MAX_DEPTH:
            return self.problem(
                trail,
                value,
                f"is nested deeper than {MAX_DEPTH} levels (or holds a cycle)",
                "store it flatter",
                None,
                "None",
            )
        if kind is list or kind is tuple:
            self.values += len(value)
            return [
                v if _is_plain_scalar(v) else self.walk(v, trail.child(i), _child(orig, i))
                for i, v in enumerate(value)
            ]
        if kind is dict:
            return self.mapping(value, trail, orig)
        if kind is set or kind is frozenset:
            self.values += len(value)
            return [self.walk(v, trail.child(_SET)) for v in value]
        if kind is bytearray or kind is memoryview:
            return bytes(value)
        if isinstance(value, Iterator):
            # pydantic would make a list of it, using it up: the app's own would be empty
            return self.problem(
                trail,
                value,
                "is an iterator: saving its values would use it up",
                "store a list of its values",
                None,
                "None",
            )
        if isinstance(value, _SECRETS):
            # pydantic dumps it as its mask, which loads back as a secret of asterisks
            return self.problem(
                trail,
                value,
                "is a secret: it would be saved as its mask ('**********')",
                "keep it out of userdata (store a reference to it), or declare the field "
                "str to save it as it is",
                None,
                "None",
            )
        try:
            converted = pydantic_core.to_jsonable_python(value)
        except _CONVERT_ERRORS:
            return self.problem(
                trail,
                value,
                "is not plain data and pydantic cannot convert it",
                "declare its type in userdata_type or store plain values "
                "(str, numbers, bool, None, bytes, lists, dicts)",
                None,
                "None",
            )
        return self.walk(converted, trail)

    def mapping(self, value: dict[Any, Any], trail: _Trail, orig: Any) -> dict[Any, Any]:
        self.values += 2 * len(value)
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if type(key) is str:
                stored: Any = key if key.isascii() else self.text(key, f"{trail} key {key!r}")
            elif type(key) is bytes:
                stored = key
            else:
                try:
                    (stored,) = pydantic_core.to_jsonable_python({key: None})
                except _CONVERT_ERRORS:
                    self.problem(
                        f"{trail} key {key!r}",
                        key,
                        "is a dict key pydantic cannot turn into a string",
                        "use str keys",
                        None,
                        "nothing (the entry is left out)",
                    )
                    continue
                stored = self.text(str(stored), f"{trail} key {key!r}")
            if stored in out:
                self.problem(
                    f"{trail} key {key!r}",
                    key,
                    f"is a dict key that becomes {stored!r}, as another key of this dict does",
                    "use distinct str keys",
                    None,
                    "nothing (the entry is left out)",
                )
                continue
            if _is_plain_scalar(item):
                out[stored] = item  # the common case: no trail, no walk
            else:
                out[stored] = self.walk(item, trail.child(key, orig), _child(orig, key))
        return out


def _holds_int(data: Any, keys: tuple[Any, ...], value: int) -> bool:
    """Whether `data` holds the int `value` at `keys` (a path in the dumped structure)."""
    node = data
    for i, key in enumerate(keys):
        if key is _SET:
            if not isinstance(node, (set, frozenset)):
                return False
            rest = keys[i + 1 :]
            return any(_holds_int(member, rest, value) for member in node)
        if isinstance(node, Mapping):
            node = node.get(key, _MISSING)
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return False
        if node is _MISSING:
            return False
    return type(node) is int and node == value


def _loc_path(loc: tuple[int | str, ...]) -> str:
    return "userdata" + "".join(
        f".{p}" if isinstance(p, str) and p.isidentifier() else f"[{p!r}]" for p in loc
    )


# (pydantic.Secret since pydantic 2.7)
_SECRETS = tuple(t for t in (SecretStr, SecretBytes, getattr(pydantic, "Secret", None)) if t)
# What loads back through the type: computed fields left out, a Json field as its JSON
# text; fields by name, or by alias where only that validates (`dump_userdata`)
_DUMP: dict[str, Any] = {"mode": "python", "warnings": False, "round_trip": True}


class _NotLoaded(UnsavableValue):
    """The saved form does not validate against the type."""


def dump_userdata(adapter: TypeAdapter[Any], value: Any) -> Any:
    """``session.userdata`` as plain data that loads back through `adapter`.

    Raises `UnsavableValue` naming the path of the first value that cannot be saved (see
    the module docstring for the rules); the caller keeps saving the rest of the
    session. The saved form is validated here once, as a restore validates it, so a
    value a restore would refuse is refused now, while the app can still log and fix it.
    """
    try:
        return _dump_userdata(adapter, value, by_alias=False)
    except _NotLoaded as by_name:
        # a model whose fields validate by alias only: its fields by alias, as they load
        try:
            return _dump_userdata(adapter, value, by_alias=True)
        except UnsavableValue:
            raise by_name from None


def _dump_userdata(adapter: TypeAdapter[Any], value: Any, *, by_alias: bool) -> Any:
    try:
        raw = adapter.dump_python(value, by_alias=by_alias, **_DUMP)
    except Exception as exc:  # serializers written by the app may raise anything
        raise UnsavableValue(
            f"userdata: its type adapter cannot serialize this {_type_name(value)} "
            f"({type(exc).__name__}: {exc}); fix its serializer or the value",
            path="userdata",
        ) from exc
    big: list[tuple[_Trail, int]] = []
    walker = _Walker(lenient=False, big=big)
    data = walker.walk(raw, _Trail("userdata"), value)
    if walker.values > MAX_VALUES:
        raise UnsavableValue(
            f"userdata: holds {walker.values:,} values (lists, dicts, their entries), more "
            f"than the {MAX_VALUES:,} a restore reads; keep bulk data elsewhere (a file, a "
            "database) and its reference in userdata",
            path="userdata",
        )
    try:
        back = adapter.validate_python(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = _loc_path(tuple(err["loc"]))
        raise _NotLoaded(
            f"{path}: the saved form of this {_type_name(value)} would not load back "
            f"({err['msg']}), so a restore would refuse it; make the value fit its "
            "declared type (or declare the type the value really has)",
            path=path,
        ) from None
    not_loaded = _not_from_input(adapter)
    if not (big or not_loaded):
        return data
    again = adapter.dump_python(back, by_alias=by_alias, **_DUMP)
    for trail, number in big:
        if not _holds_int(again, trail.keys(), number):
            path = str(trail)
            raise UnsavableValue(
                f"{path}: cannot save this int: {_big_int_problem(number)}; {_BIG_INT_TODO}",
                path=path,
            )
    changed = _field_reset(raw, again, (), not_loaded) if not_loaded else None
    if changed is not None:
        path = _loc_path(changed)
        raise UnsavableValue(
            f"{path}: a dataclass field with init=False is not set from its saved form: a "
            "restore would give back its default, not this value; declare it init=True, "
            "or leave it out of userdata",
            path=path,
        )
    return data


_NOT_FROM_INPUT: weakref.WeakKeyDictionary[TypeAdapter[Any], frozenset[str]] = (
    weakref.WeakKeyDictionary()
)


def _not_from_input(adapter: TypeAdapter[Any]) -> frozenset[str]:
    """The names of dataclass fields with ``init=False`` anywhere in the type: validation
    leaves them at their default, whatever the input holds. Once per adapter."""
    found = _NOT_FROM_INPUT.get(adapter)
    if found is None:
        found = _NOT_FROM_INPUT[adapter] = _init_false(adapter.core_schema)
    return found


def _init_false(schema: Any) -> frozenset[str]:
    names: set[str] = set()
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if node.get("type") == "dataclass-field" and node.get("init") is False:
                names.add(str(node.get("name")))
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return frozenset(names)


def _field_reset(
    a: Any, b: Any, loc: tuple[int | str, ...], names: frozenset[str]
) -> tuple[int | str, ...] | None:
    """Where dump ``b`` (of the value loaded back) holds another value than dump ``a``
    under one of ``names`` (None: nowhere)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key, value in a.items():
            if key not in b:
                continue
            if key in names and not _same(value, b[key]):
                return (*loc, key)
            found = _field_reset(value, b[key], (*loc, key), names)
            if found is not None:
                return found
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _field_reset(x, y, (*loc, i), names)
            if found is not None:
                return found
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN
    try:
        return bool(a == b)
    except Exception:  # an app's __eq__ may raise: not ours to judge
        return True


def plain_extra(extra: Mapping[str, Any], name: str = "extra") -> dict[str, Any]:
    """The session's ``extra`` dict (or an agent's state, ``name="state"``) as plain
    data, by the rules of untyped userdata.

    Raises `UnsavableValue` naming the path (``extra['key']...``) of the first value that
    cannot be saved.
    """
    walker = _Walker(lenient=False)
    root = _Trail(name)
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if type(key) is not str:
            raise UnsavableValue(
                f"{name}: cannot save key {key!r}: it is a {_type_name(key)}; "
                f"the keys of {name} must be str",
                path=name,
            )
        walker.text(key, f"{name} key {key!r}")
        out[key] = walker.walk(value, root.child(key))
    return out


def plain_item_value(value: Any, where: str) -> Any:
    """A chat item's field (``extra``, ``metrics``, text ...) as plain data; never raises.

    What cannot be kept is replaced, with a warning naming `where` (the item and field):
    a lone surrogate by U+FFFD, an int beyond 64 bits by its decimal string, an object
    pydantic cannot convert (or nesting deeper than `MAX_DEPTH`) by None, a dict entry
    whose key cannot become a distinct string is left out.
    """
    return _Walker(lenient=True).walk(value, _Trail(where))


def saved_form(value: Any) -> Any:
    """What `plain_item_value` makes of ``value``, without its warnings: two values
    whose saved forms are equal are saved alike."""
    return _Walker(lenient=True, quiet=True).walk(value, _Trail("value"))
