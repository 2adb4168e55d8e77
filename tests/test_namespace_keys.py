"""Namespaces that share a Redis: no key of one is ever read as another's session."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from livekit_resume.stores.base import validate_namespace
from livekit_resume.stores.redis import RedisStore
from livekit_resume.stores.redis.keys import KeyNames
from livekit_resume.stores.sqlite import SQLiteStore

# A namespace names its own keys: the session's (``ns:{key}:``), its command channel
# and commands (``ns:ctl:{key}…``), its staged records (``ns:up:{key}:…``) and its
# tombstones (``ns:rm:<hash>{<slot tag>}``, ``ns:rm:<hash>``). None of
# them may fall under another namespace's session prefix, which SCAN (``ls --scan``,
# reindex), an acquire's look for remains and ``rm`` all read as that namespace's.
_NS_PART = st.sampled_from(["lk", "ctl", "up", "rm", "ctl2", "sessions"]) | st.text(
    "ctlup", min_size=1
)


_NAMESPACE = st.lists(_NS_PART, min_size=1, max_size=3).map(":".join)
# one namespace beside another, or one that extends it by a part
_PAIR = st.tuples(_NAMESPACE, _NAMESPACE) | _NAMESPACE.flatmap(
    lambda ns: st.tuples(st.just(ns), _NS_PART.map(lambda part: f"{ns}:{part}")).map(
        lambda pair: pair if len(ns) % 2 else pair[::-1]
    )
)


@settings(max_examples=300, deadline=None)
@given(pair=_PAIR, key=st.text(alphabet="ab{}:", min_size=1, max_size=4))
def test_no_key_of_a_namespace_falls_under_another_namespaces_sessions(
    pair: tuple[str, str], key: str
) -> None:
    first, second = pair
    assume(first != second)
    names = []
    for ns in (first, second):
        try:
            names.append(KeyNames(validate_namespace(ns)))
        except ValueError:
            return  # a namespace the stores refuse holds no keys
    mine, theirs = names
    owned = [
        mine.head(key),
        mine.log(key, 0),
        mine.control(key),
        mine.control(key) + ":c1",
        mine.control(key) + ":c1:open",
        mine.staged(key, "t1"),
        mine.tombstone(key),
        mine.legacy_tombstone(key),
        mine.index,
    ]
    scanned = f"{theirs.namespace}:{{"  # what their SCAN matches (namespace.py)
    assert [k for k in owned if k.startswith(scanned)] == []


# Keys of the tags' own letters (``@`` to ``O``), which a tag could spell: one key of
# four such letters in four is its slot's first tag (EMMA, ANNA, OLGA are)
_TAG_LETTERS = st.text(alphabet="@ABCDEFGHIJKLMNO{}", min_size=1, max_size=6)


@settings(max_examples=500, deadline=None)
@given(namespace=_NAMESPACE, key=st.text(min_size=1, max_size=40) | _TAG_LETTERS)
@example(namespace="lk", key="EMMA")
@example(namespace="lk", key="ANNA")
@example(namespace="lk", key="C}")
def test_a_tombstone_lives_in_its_sessions_slot_and_does_not_spell_its_key(
    namespace: str, key: str
) -> None:
    """A Cluster node that keeps a delete keeps the tombstone laid before it: the
    tombstone's slot, by redis-py's own reckoning (CRC16 of the hash tag, as Redis's),
    is the session head's, for any key (braces, ``%``, any text). Its name is the key's
    hash (the tombstone of earlier releases) and a tag of four letters, and what the tag
    adds spells no part of the key (``rm`` leaves no trace of it: security.md)."""
    names = KeyNames(namespace)
    tombstone = names.tombstone(key)
    legacy = names.legacy_tombstone(key)
    assume(key not in "{}")  # a key of one brace is in any tag's
    assert key_slot(tombstone.encode()) == key_slot(names.head(key).encode())
    tag = tombstone.removeprefix(legacy)
    assert tombstone.startswith(legacy) and re.fullmatch(r"\{[@A-O]{4}\}", tag), tag
    # an occurrence of the key that reaches into the tag
    assert key not in tombstone[len(legacy) - len(key) + 1 :], (key, tag)


@pytest.mark.parametrize("namespace", ["lk:ctl", "lk:up", "a:b:ctl", "ctl:up"])
def test_a_namespace_whose_keys_another_namespace_holds_is_refused(
    namespace: str, tmp_path: Path
) -> None:
    """``lk:ctl``'s sessions would be ``lk``'s commands: its ``ls --scan`` listed a
    phantom damaged session, its acquire of an expired session was refused while a
    command of ``lk`` stood (300 s), and ``rm`` in ``lk:up`` deleted ``lk``'s staged
    record in the middle of its commit. Refused on every store, so a namespace moves
    between them."""
    with pytest.raises(ValueError, match="may not end in ':ctl' or ':up'"):
        RedisStore(Redis(), namespace=namespace)
    with pytest.raises(ValueError, match="may not end in ':ctl' or ':up'"):
        SQLiteStore(tmp_path / "s.db", namespace=namespace)


@pytest.mark.parametrize("namespace", ["ctl", "up", "lk:rm", "lk:ctl2", "lk:ctl:x", "lk:upload"])
def test_namespaces_near_the_refused_ones_are_taken(namespace: str) -> None:
    assert RedisStore(Redis(), namespace=namespace).namespace == namespace
