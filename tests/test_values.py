"""Userdata and ``extra`` values: saved losslessly where their type allows, else refused.

Each kind of value either round-trips (dump -> real codec frame -> adapter validation)
or is refused with `UnsavableValue` naming its path, and a refused value never stops the
rest of the session from saving.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import uuid
from typing import Any

import pytest
from livekit.agents import llm
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_serializer

from livekit_resume import UnsavableValue
from livekit_resume.errors import ResumeError
from livekit_resume.snapshot.chat import ctx_from_data, item_to_data
from livekit_resume.snapshot.codec import HISTORY, Codec
from livekit_resume.snapshot.model import SessionMeta, Snapshot
from livekit_resume.snapshot.values import MAX_DEPTH, dump_userdata, plain_extra, plain_item_value

CODEC = Codec()
BIG = 2**70


def through_codec(data: Any) -> Any:
    """What a restore reads back: the real frame, packed and unpacked."""
    return CODEC.unpack(CODEC.pack({"userdata": data}))[1]["userdata"]


def roundtrip(adapter: TypeAdapter[Any], value: Any) -> Any:
    return adapter.validate_python(through_codec(dump_userdata(adapter, value)))


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Typed(BaseModel):
    raw: bytes = b""
    maybe_raw: bytes | None = None
    big: int = 0
    bigs: list[int] = Field(default_factory=list)
    big_set: set[int] = Field(default_factory=set)
    big_keys: dict[int, int] = Field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    when: dt.datetime | None = None
    day: dt.date | None = None
    ident: uuid.UUID | None = None
    color: Color = Color.RED
    point: Point | None = None
    text: str = ""


def test_typed_values_roundtrip_exactly() -> None:
    value = Typed(
        raw=b"\xff\xfe\x00 not utf-8",
        maybe_raw=b"\x80",
        big=BIG,
        bigs=[1, -BIG, 2**64 - 1, -(2**63)],
        big_set={3, BIG},
        big_keys={BIG: -BIG, 1: 2},
        pair=(7, "seven"),
        when=dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
        day=dt.date(2024, 5, 1),
        ident=uuid.UUID(int=5),
        color=Color.RED,
        point=Point(1, 2),
        text="héllo \U0001f600",
    )
    assert roundtrip(TypeAdapter(Typed), value) == value


def test_big_int_of_an_int_field_is_saved_as_its_decimal_string() -> None:
    data = dump_userdata(TypeAdapter(Typed), Typed(big=BIG))
    assert data["big"] == str(BIG)
    assert TypeAdapter(int).validate_python(data["big"]) == BIG


class Untyped(BaseModel):
    anything: Any = None
    prefs: dict = Field(default_factory=dict)  # type: ignore[type-arg]
    things: list[Any] = Field(default_factory=list)


def test_untyped_bytes_stay_bytes() -> None:
    value = Untyped(anything=b"\xff", prefs={"k": b"\x00\xfe"}, things=[b"\x81"])
    back = roundtrip(TypeAdapter(Untyped), value)
    assert back == value
    assert type(back.anything) is bytes and type(back.prefs["k"]) is bytes


def test_untyped_values_follow_the_documented_rules() -> None:
    when = dt.datetime(2024, 5, 1, 12, 30)
    value = Untyped(
        anything=(1, (2, 3)),
        prefs={
            "tuple": (1, 2),
            "set": {7},
            "when": when,
            "color": Color.RED,
            "point": Point(1, 2),
            "int_keys": {1: "one"},
            "buffer": bytearray(b"ab"),
            "nan": float("inf"),
            "huge_ok": 2**64 - 1,
        },
    )
    back = roundtrip(TypeAdapter(Untyped), value)
    assert back.anything == [1, [2, 3]]
    assert back.prefs == {
        "tuple": [1, 2],
        "set": [7],
        "when": "2024-05-01T12:30:00",
        "color": "red",
        "point": {"x": 1, "y": 2},
        "int_keys": {"1": "one"},
        "buffer": b"ab",
        "nan": float("inf"),
        "huge_ok": 2**64 - 1,
    }


class Opaque:
    """Not plain data, and pydantic does not know it."""


class Nested(BaseModel):
    prefs: dict[str, Any] = Field(default_factory=dict)
    inner: Untyped = Field(default_factory=Untyped)
    note: str = ""


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "path", "needle"),
    [
        (Nested(prefs={"x": BIG}), "userdata.prefs['x']", "beyond 64 bits"),
        (Nested(inner=Untyped(anything=-BIG)), "userdata.inner.anything", "beyond 64 bits"),
        (Nested(inner=Untyped(things=[1, BIG])), "userdata.inner.things[1]", "beyond 64 bits"),
        (Nested(prefs={"x": Opaque()}), "userdata.prefs['x']", "tests.test_values.Opaque"),
        (Nested(note="bad \ud800 text"), "userdata.note", "lone surrogate"),
        (Nested(prefs={"k\udfff": 1}), "userdata.prefs key 'k\\udfff'", "lone surrogate"),
        (Nested(prefs={"deep": _deep(MAX_DEPTH + 5)}), "userdata.prefs['deep']", "deeper"),
        (Nested(prefs={"a": {1: "x", "1": "y"}}), "userdata.prefs['a'] key '1'", "another key"),
    ],
)
def test_unsavable_userdata_value_is_refused_naming_its_path(
    value: Nested, path: str, needle: str
) -> None:
    with pytest.raises(UnsavableValue) as info:
        dump_userdata(TypeAdapter(Nested), value)
    assert info.value.path.startswith(path)
    assert str(info.value).startswith(path)
    assert needle in str(info.value)
    assert isinstance(info.value, ResumeError) and isinstance(info.value, ValueError)


def test_userdata_that_would_not_load_back_is_refused_at_save_time() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(strict=True)
        when: dt.datetime | None = None

    class Loose(BaseModel):
        count: int = 0

    # a strict datetime field does not accept the ISO string a restore would give it
    with pytest.raises(UnsavableValue, match=r"^userdata\.when: .*would not load back"):
        dump_userdata(TypeAdapter(Strict), Strict(when=dt.datetime(2024, 1, 1)))
    # an assignment that skipped validation
    loose = Loose()
    loose.count = "many"  # type: ignore[assignment]
    with pytest.raises(UnsavableValue, match=r"^userdata\.count: "):
        dump_userdata(TypeAdapter(Loose), loose)


def test_userdata_serializer_error_is_refused() -> None:
    class Broken(BaseModel):
        x: int = 0

        @field_serializer("x")
        def _boom(self, value: int) -> int:
            raise RuntimeError("serializer exploded")

    with pytest.raises(UnsavableValue, match="serializer exploded") as info:
        dump_userdata(TypeAdapter(Broken), Broken())
    assert info.value.path == "userdata"


def test_extra_values_follow_the_untyped_rules() -> None:
    extra = {
        "raw": b"\xff\xfe",
        "pair": (1, 2),
        "when": dt.date(2024, 5, 1),
        "nested": {"ok": [1, "two", None]},
    }
    plain = plain_extra(extra)
    assert plain == {
        "raw": b"\xff\xfe",
        "pair": [1, 2],
        "when": "2024-05-01",
        "nested": {"ok": [1, "two", None]},
    }
    meta = SessionMeta(extra=plain)
    assert through_codec(meta.model_dump(mode="python"))["extra"] == plain


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"n": BIG}, "extra['n']"),
        ({"obj": Opaque()}, "extra['obj']"),
        ({"list": [1, {"t": "\ud800"}]}, "extra['list'][1]['t']"),
        ({1: "x"}, "extra"),
    ],
)
def test_unsavable_extra_value_is_refused_naming_its_path(extra: dict[Any, Any], path: str) -> None:
    with pytest.raises(UnsavableValue) as info:
        plain_extra(extra)
    assert info.value.path == path
    assert str(info.value).startswith(path)


def test_snapshot_with_binary_values_has_a_json_form() -> None:
    # the session fingerprints a snapshot through its JSON form to skip unchanged commits
    snap = Snapshot(
        key="k",
        userdata=dump_userdata(TypeAdapter(Typed), Typed(raw=b"\xff\xfe")),
        meta=SessionMeta(extra=plain_extra({"raw": b"\x80"})),
    )
    dumped = snap.model_dump(mode="json")
    assert isinstance(dumped["userdata"]["raw"], str)
    assert CODEC.decode(CODEC.encode(snap)).userdata["raw"] == b"\xff\xfe"


def test_a_refused_value_does_not_stop_the_rest_from_saving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a checkpoint does: refuse the one bad value, log it, save everything else."""
    adapter = TypeAdapter(Nested)
    saved = dump_userdata(adapter, Nested(note="first"))  # the last good userdata
    live = Nested(note="second", prefs={"account": BIG})
    history: list[llm.ChatItem] = [
        llm.ChatMessage(
            id="item_u",
            role="user",
            content=["hi \ud800"],
            created_at=1.0,
            extra={"n": BIG, "obj": Opaque()},
        ),
        llm.FunctionCallOutput(
            id="item_o",
            call_id="c",
            name="lookup",
            output="bytes \udcff decoded badly",
            is_error=False,
            created_at=2.0,
        ),
    ]

    try:
        saved = dump_userdata(adapter, live)
    except UnsavableValue as e:
        logging.getLogger("test").warning("userdata not saved: %s", e)
        refused = e
    assert refused.path == "userdata.prefs['account']"

    items = [item_to_data(i) for i in history]
    snap = Snapshot(key="k", userdata=saved, history=items)
    head = CODEC.encode_head(snap)
    frames = [(d["id"], CODEC.encode_item("k", HISTORY, d)) for d in items]
    back = CODEC.decode_parts("k", head, {HISTORY: frames})
    assert adapter.validate_python(back.userdata) == Nested(note="first")
    restored = ctx_from_data(back.history)
    assert [i.id for i in restored.items] == ["item_u", "item_o"]
    assert "userdata not saved: userdata.prefs['account']" in caplog.text

    # once the app fixes the value, userdata saves again
    live.prefs = {"account": str(BIG)}
    assert roundtrip(adapter, live) == live


# -- in a live session ---------------------------------------------------------------------


class Account(BaseModel):
    name: str = ""
    balance: int = 0
    notes: dict[str, Any] = Field(default_factory=dict)


async def test_a_session_keeps_saving_while_one_userdata_value_is_unsavable() -> None:
    from livekit.agents import Agent

    import livekit_resume as lr
    from tests.lk.scripted_llm import ScriptedLLM, make_text_session

    class Clerk(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="You keep accounts.")

    reg = lr.AgentRegistry()
    reg.register(Clerk)
    store = lr.open_store("memory://")
    session = make_text_session(ScriptedLLM([], default="noted"), userdata=Account(name="Ada"))
    rs = lr.ResumableSession(
        store, "room-values", registry=reg, userdata_type=Account, autosave=False
    )
    await session.start(await rs.restore(session, default=Clerk))
    await session.run(user_input="my balance is huge")
    session.userdata.balance = BIG  # declared int: saved as its decimal string
    v1 = await rs.checkpoint()
    session.userdata.notes["raw"] = b"\xff\xfe"  # any bytes: kept as bytes
    v2 = await rs.checkpoint()
    session.userdata.notes["big"] = BIG  # untyped: refused, the rest still saves
    await session.run(user_input="and one more thing")
    v3 = await rs.checkpoint()
    assert v1 < v2 < v3
    stored = await store.load("room-values")
    snap = Codec().decode_parts("room-values", stored.head, stored.streams)
    # the last userdata that could be saved
    assert snap.userdata == {"name": "Ada", "balance": str(BIG), "notes": {"raw": b"\xff\xfe"}}
    texts = [d["content"] for d in snap.history if d.get("type") == "message"]
    assert ["and one more thing"] in texts
    await rs.aclose()
    await session.aclose()
    await store.aclose()

    with pytest.raises(UnsavableValue, match=r"^extra\['obj'\]"):
        lr.ResumableSession(store, "room-x", registry=reg, extra={"obj": Opaque()})


def test_an_iterator_is_not_saved_and_not_used_up() -> None:
    """pydantic would make a list of an iterator, leaving the app's own empty: refused
    in the session's ``extra``, None (with a warning) in a chat item, and untouched."""
    numbers = iter([1, 2, 3])
    with pytest.raises(UnsavableValue, match=r"extra\['g'\].*iterator"):
        plain_extra({"g": numbers})
    assert plain_item_value({"g": numbers}, "item x extra") == {"g": None}
    assert list(numbers) == [1, 2, 3]


class _Aliased(BaseModel):
    name: str = Field(alias="fullName")


class _ShownAs(BaseModel):
    # an alias for the app's own JSON output only: it validates by name
    name: str = Field(serialization_alias="displayName")


class _Both(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(alias="fullName")


@pytest.mark.parametrize(
    ("model", "value", "saved"),
    [
        (_Aliased, _Aliased(fullName="Ada"), {"fullName": "Ada"}),
        (_ShownAs, _ShownAs(name="Ada"), {"name": "Ada"}),
        (_Both, _Both(fullName="Ada"), {"name": "Ada"}),
    ],
)
def test_userdata_fields_are_saved_under_the_names_they_load_by(
    model: type[BaseModel], value: BaseModel, saved: dict[str, str]
) -> None:
    """By name, as earlier releases saved them (a model that also validates by name reads
    them either way); by alias only for a model that validates by alias alone, which was
    refused at every checkpoint."""
    adapter = TypeAdapter(model)
    assert dump_userdata(adapter, value) == saved
    assert roundtrip(adapter, value) == value
