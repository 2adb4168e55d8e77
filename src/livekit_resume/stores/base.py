"""The store contract: the `Store` protocol, the values it takes and returns, its
optional capabilities, and the checks and errors every backend shares.

A store keeps, per session key:

- a **lease** (owner, fencing epoch, expiry). The epoch grows on every acquisition
  that is not a renewal by the live holder, and it survives release, so a zombie
  writer's epoch can never become current again;
- **versions** 1, 2, 3 ... each with an opaque ``head`` (the snapshot without its
  items, already framed by the codec) and a small unsigned ``info`` dict for listings;
- an append-only **log of item records** shared by the versions of one generation,
  folded into a new generation now and then. How, and when, is stores/log.py's: the
  rules every backend follows.

Stores know nothing of LiveKit or of the snapshot format: heads and item payloads
are bytes. A third-party backend implements `Store` (and, if it can, `EventPublisher`
and `EventSource`), uses stores/log.py, and passes the conformance kit.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeGuard, TypeVar, runtime_checkable

from ..errors import LeaseLost, ResumeError, SessionBusy, SnapshotNotFound, StoreUnavailable

# The log's record is part of the contract (`Commit.records`); the other log names are
# re-exported for the code that imported them from here before stores/log.py existed.
from .log import COMPACT_SLACK as COMPACT_SLACK
from .log import DEFAULT_KEEP as DEFAULT_KEEP
from .log import Record as Record
from .log import epoch_floor as epoch_floor
from .log import fold_records as fold_records
from .log import lease_is_live as lease_is_live
from .log import needs_compaction as needs_compaction
from .log import records_from_streams as records_from_streams

__all__ = [
    "DEFAULT_LEASE_TTL",
    "INFO_BATCH",
    "MAX_KEY_BYTES",
    "Command",
    "CommandChannel",
    "CommandInbox",
    "CommandReply",
    "Commit",
    "Controllable",
    "EventPublisher",
    "EventSource",
    "EventSubscription",
    "InboxBase",
    "Info",
    "KeyPages",
    "Lease",
    "Record",
    "SessionInfo",
    "SessionInfos",
    "SnapshotInfo",
    "Store",
    "StoreClosed",
    "Stored",
    "acquired_epoch",
    "busy_error",
    "head_moved_error",
    "lease_lost_error",
    "not_found_error",
    "not_retained_error",
    "offers",
    "validate_commit",
    "validate_key",
    "validate_lease_ttl",
    "validate_owner",
    "validate_page",
    "validate_reclaim",
    "validate_ttl",
    "validate_version",
]

# Long enough for a room name plus a prefix, short enough to keep Redis keys and
# SQLite indexes small. Rooms longer than this are a caller bug, not data.
MAX_KEY_BYTES = 512
# A worker renews at a third of this; 30 s tolerates a GC pause or a slow store
# without letting a dead worker block a restore for long.
DEFAULT_LEASE_TTL = 30.0

# Below a millisecond no store can tell a TTL from zero.
MIN_TTL = 0.001

Info = Mapping[str, "str | int | float | bool | None"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_text(text: str, what: str) -> bytes:
    """``text`` in UTF-8. A lone surrogate is not text a store can hold: a shell argument
    whose bytes are not UTF-8 comes in as one (Python's surrogateescape)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {text!r} is not valid UTF-8 text (it holds a lone surrogate: "
            "bytes an argument could not decode)"
        ) from None


def validate_key(key: str) -> str:
    """Return ``key`` if it can name a session, else raise `ValueError` saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError("session key must be a non-empty string")
    if _CONTROL.search(key):
        raise ValueError(f"session key {key!r} contains control characters")
    if len(_check_text(key, "session key")) > MAX_KEY_BYTES:
        raise ValueError(f"session key is over {MAX_KEY_BYTES} bytes (starts {key[:32]!r})")
    return key


# On Redis, namespace N keeps its commands under ``N:ctl:{key}`` and its staged records
# under ``N:up:{key}``: namespace ``N:ctl`` or ``N:up`` would read them as its sessions.
_OWN_KEYS = ("ctl", "up")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it can prefix a store's keys, else raise `ValueError`:
    non-empty, printable, without braces (on Redis they would change the hash tag of
    every key), and not ending in a ``:ctl`` or ``:up`` part (on Redis those keys are
    another namespace's own). The rule is the same on every store, so a namespace can
    move between them."""
    if (
        not isinstance(namespace, str)
        or not namespace
        or any(c in namespace for c in "{}")
        or not namespace.isprintable()
    ):
        raise ValueError(
            f"namespace {namespace!r} must be non-empty, printable and without braces "
            "(on Redis braces would change the hash tag of every key)"
        )
    parent, _, last = namespace.rpartition(":")
    if parent and last in _OWN_KEYS:
        raise ValueError(
            f"namespace {namespace!r} may not end in ':ctl' or ':up': on Redis, those "
            f"keys hold namespace {parent!r}'s own keys (its commands, its staged records)"
        )
    return namespace


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_commit(commit: Commit) -> Commit:
    """Return ``commit`` if every field has the type `Commit` names, else raise
    `ValueError` saying which: a store would otherwise keep what it cannot give back
    (SQLite turns an int stream name into text and keeps a str head, which then reads
    as a damaged version), or fail half-way with a TypeError."""
    validate_key(commit.key)
    for name in ("epoch", "base_version", "size"):
        if not _is_whole(getattr(commit, name)):
            raise ValueError(f"commit {name} must be an int, not {getattr(commit, name)!r}")
    if not isinstance(commit.head, bytes):
        raise ValueError(f"commit head must be bytes, not {type(commit.head).__name__}")
    if not isinstance(commit.commit_id, str):
        raise ValueError(f"commit_id must be a str, not {commit.commit_id!r}")
    for n, r in enumerate(commit.records):
        if not (
            isinstance(r, Record)
            and isinstance(r.stream, str)
            and isinstance(r.id, str)
            and (r.data is None or isinstance(r.data, bytes))
            and (r.after is None or isinstance(r.after, str))
        ):
            raise ValueError(
                f"commit record {n} must be a Record of str stream and id, bytes or None "
                f"data and str or None after, not {r!r:.200}"
            )
    if not isinstance(commit.whole, bool):
        raise ValueError(f"commit whole must be a bool, not {commit.whole!r}")
    if commit.whole:
        cleared: set[str] = set()
        for r in commit.records:
            if not r.id and r.data is None:
                cleared.add(r.stream)
            elif r.stream not in cleared:
                raise ValueError(
                    f"a whole commit must clear each stream before it writes to it, not "
                    f"write {r.id!r} to {r.stream!r} first"
                )
    if not isinstance(commit.info, Mapping):
        raise ValueError(f"commit info must be a mapping, not {type(commit.info).__name__}")
    for name, value in commit.info.items():
        if not isinstance(name, str) or not (
            value is None or isinstance(value, (str, int, float, bool))
        ):
            raise ValueError(
                f"commit info {name!r} must be a str, int, float, bool or None under a "
                f"str name, not {value!r:.200}"
            )
    return commit


def validate_version(version: int | None) -> int | None:
    """Return ``version`` if it can name a version to load (None: the latest), else raise
    `ValueError`. Any int is accepted: one no store holds is `SnapshotNotFound`."""
    if version is not None and not isinstance(version, int):
        raise ValueError(f"a version must be an int or None, not {version!r}")
    return version


def validate_owner(owner: str) -> str:
    """Return ``owner`` if it can hold a lease (a str), else raise `ValueError`: a lease
    held by None is stored as a released one, which any worker takes without takeover."""
    if not isinstance(owner, str):
        raise ValueError(f"a lease owner must be a str, not {owner!r}")
    return owner


def validate_reclaim(reclaim: int | None) -> int | None:
    """Return ``reclaim`` (`Store.acquire`) if it is None or an epoch a store can hold
    (a positive int below 2**53, as Redis's Lua numbers are exact), else raise
    `ValueError`."""
    if reclaim is not None and not (_is_whole(reclaim) and 0 < reclaim < 2**53):
        raise ValueError(f"reclaim must be an epoch (a positive int), not {reclaim!r}")
    return reclaim


def validate_ttl(ttl: float | None, name: str = "ttl") -> float | None:
    """Return a TTL if it is None or a finite number of seconds (at least a millisecond),
    else raise `ValueError` naming ``name`` and the value.

    0, a negative, NaN or infinite TTL would expire every session at once (or never) while
    its lease still looks held: each later commit would be `LeaseLost`.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds > 0, not {ttl!r}")
    if not (math.isfinite(ttl) and ttl >= MIN_TTL):
        raise ValueError(f"{name} must be a finite number of seconds >= {MIN_TTL}, not {ttl!r}")
    return float(ttl)


def validate_lease_ttl(ttl: float, session_ttl: float | None) -> float:
    """A lease ttl a store with ``session_ttl`` can honour, else `ValueError` naming both.

    A lease must never outlive the data: a session expiring while its lease still looks
    held would vanish under its live holder, and every later commit of that holder would
    be refused.
    """
    validate_ttl(ttl, "lease ttl")
    if session_ttl is not None and ttl > session_ttl:
        raise ValueError(
            f"lease ttl {ttl} s is longer than the store's session ttl {session_ttl} s: "
            "the session would expire under its live holder; use a lease ttl of at most "
            f"{session_ttl} s or a longer session ttl"
        )
    return float(ttl)


@dataclass(frozen=True, slots=True)
class Lease:
    """Ownership of one key: only the holder of the current ``epoch`` may commit."""

    key: str
    owner: str
    epoch: int
    expires_at: float  # wall-clock seconds by the store's clock (Redis: the server's TIME)
    # the session's latest version when `Store.renew` granted this lease (None: the store
    # does not say): a holder that committed a newer one learns the store went back
    version: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Commit:
    """What a checkpoint writes.

    ``base_version`` is the version the records apply to (0 for a new key); the store
    refuses the commit if the head moved since (`LeaseLost`), as it does for a stale
    ``epoch``. ``size`` is the caller's count of live items after the commit, used only
    to decide compaction. ``info`` is small, unsigned, for listings (state, reason...).

    ``commit_id`` is the idempotency key. A commit whose outcome the caller could not
    learn (a timeout, a dropped connection) is sent again unchanged, same id: if the
    first attempt landed, the store answers with that attempt's version instead of
    refusing a moved head. Empty: the store draws one, and only its own retries of
    that one call recognise each other.

    ``whole`` says the records clear each stream before they write to it: the version
    reads nothing of its base, so a store may write it over a base version it can no
    longer read (its record lost: how an operator's revert or import rolls a session
    back past it). A store that checks its log against the base starts a new log then.

    ``lease_ttl``, when set, makes the commit renew the lease too: a commit that lands
    (or a retry that finds it landed) while its epoch holds the lease (an owner is
    recorded: not released) sets the lease's expiry to now + ``lease_ttl``, as
    `Store.renew` would, in the same atomic step. A holder that commits often then needs
    no separate renewal. A commit refused for a stale epoch extends nothing. None: the
    lease is left as it is.
    """

    key: str
    epoch: int
    base_version: int
    head: bytes
    records: Sequence[Record] = ()
    size: int = 0
    info: Info = field(default_factory=dict)
    commit_id: str = ""
    lease_ttl: float | None = None
    whole: bool = False


@dataclass(frozen=True, slots=True)
class Stored:
    """A loaded version: the head bytes and each stream's items, in order."""

    key: str
    version: int
    epoch: int
    created_at: float
    head: bytes
    streams: dict[str, list[tuple[str, bytes]]]
    info: dict[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One retained version, as listings show it. ``damaged`` says why a version cannot
    be read (its record lost or altered: `load` of it raises `SnapshotCorrupt`); what
    of it was lost too is 0 (``epoch``, ``created_at``, ``size``) or empty (``info``)."""

    version: int
    epoch: int
    created_at: float
    size: int  # bytes this commit wrote (head + records)
    info: dict[str, str | int | float | bool | None]
    damaged: str | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session key: its latest version and who holds it. ``read_at`` is the store's
    clock when it was read (Redis: the session's server's ``TIME``): compare the times
    with it, not with this host's clock, which may run ahead or behind (None: a store
    that does not say)."""

    key: str
    version: int
    epoch: int
    owner: str | None
    lease_expires_at: float | None
    updated_at: float
    expires_at: float | None
    info: dict[str, str | int | float | bool | None]
    # not compared: two reads of an unchanged session are equal
    read_at: float | None = field(default=None, compare=False)


@runtime_checkable
class Store(Protocol):
    """Async protocol every backend implements. Methods raise `StoreUnavailable` when
    the backend cannot be reached, `ValueError` for an invalid key."""

    async def acquire(
        self,
        key: str,
        owner: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        takeover: bool = False,
        reclaim: int | None = None,
    ) -> Lease:
        """Take the key's lease. A free or expired lease, or one already held by ``owner``,
        is granted; a live lease of another owner raises `SessionBusy` unless ``takeover``.
        Any acquisition that is not ``owner`` renewing its own live lease gets a new epoch,
        above the one before and never below the clock (`epoch_floor`).

        ``reclaim``: the epoch ``owner`` held when the store lost the session under it
        (`LeaseLost.vanished`). Where the store's epoch is below it (or the session is
        gone) and it is not above the store's clock (`epoch_floor`), the store forgot an
        acquisition: its holder, if any, is one ``owner`` took the session from, or
        older. The lease is then granted at that very epoch, over a live lease too, so
        that of the holders a store forgot, the latest wins. Where the store's epoch is
        above it (someone acquired the key since), or the key was deleted at or after it
        (a tombstone), ``owner`` is fenced: `LeaseLost`, as its commit would be. At the
        store's own epoch, ``owner``'s lease there is kept at that epoch, run out or not
        (a new one would fence the newest holder the store forgot). Else (another
        owner's lease at that epoch, or above the clock) ``reclaim`` changes nothing."""
        ...

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Extend a lease still current (same epoch and owner), else raise `LeaseLost`.
        The lease returned says the session's latest version (`Lease.version`), if the
        store can tell."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up if still current; the epoch counter is kept."""
        ...

    async def commit(self, commit: Commit) -> int:
        """Atomically append a version; return its number. Raises `LeaseLost` for a stale
        epoch or a moved head; nothing is written then. With ``commit.lease_ttl`` set, a
        commit that lands also extends a held lease (see `Commit`): the conformance
        suite checks it, and `ResumableSession` skips renewals a commit made."""
        ...

    async def load(self, key: str, version: int | None = None) -> Stored:
        """The latest (or the given retained) version; `SnapshotNotFound` if none."""
        ...

    async def versions(self, key: str) -> list[SnapshotInfo]:
        """Retained versions, oldest first (empty if the key is unknown)."""
        ...

    async def info(self, key: str) -> SessionInfo | None:
        """The key's latest version and lease, or None if unknown."""
        ...

    async def keys(self) -> list[str]:
        """Every live session key, sorted."""
        ...

    async def delete(self, key: str, *, lease: Lease | None = None) -> bool:
        """Remove every trace of the key, lease included; False if it did not exist.

        A deleted session leaves a tombstone of its epoch for `TOMBSTONE_TTL`: a writer
        that held it then, finding it gone, is refused as fenced (`LeaseLost`, not
        ``vanished``: never told to write it back). The key is free at once: a new
        session under it starts above every epoch of the deleted one.

        With ``lease`` (of this key), only while it is current, as for `renew`: once
        another writer acquired the key, `LeaseLost` and nothing is removed, so a
        writer that took the key over never loses a turn to this delete."""
        ...

    async def aclose(self) -> None:
        """Release connections and files; every later call raises `StoreUnavailable`
        (closing again is nothing)."""
        ...


# Optional capabilities: a backend that has them implements these too, and the hooks and
# the command line find them with `offers` (the conformance kit, which checks a backend
# itself, with isinstance()).


_P = TypeVar("_P")
_MISSING = object()


@functools.cache
def _members(capability: type) -> frozenset[str]:
    return frozenset(
        name for cls in capability.__mro__ for name in vars(cls) if not name.startswith("_")
    )


# ``Callable[..., _P]`` rather than ``type[_P]``: mypy takes no protocol for ``type[_P]``.
def offers(store: object, capability: Callable[..., _P]) -> TypeGuard[_P]:
    """Whether ``store`` has every member of the protocol ``capability``, looked up as a
    call looks it up: what ``isinstance`` did up to Python 3.11. Since 3.12 it looks them
    up statically (``inspect.getattr_static``) and misses what a wrapper forwards from
    its ``__getattr__`` (`WatchedStore`, a test's probe): the wrapped store would lose
    its commands, events and namespace without a word."""
    assert isinstance(capability, type)
    for name in _members(capability):
        found = getattr(store, name, _MISSING)
        # as 3.11 did: a method set to None is a method the store does not have
        if found is _MISSING or (found is None and callable(getattr(capability, name))):
            return False
    return True


@runtime_checkable
class EventPublisher(Protocol):
    """A store that can announce a session's state changes to other workers."""

    async def publish(self, key: str, event: str, **fields: Any) -> None:
        """Announce ``event`` (``paused``, ``resumed``, ``suspended``, ``restored``, …)
        of session ``key`` as ``{"event": …, "key": …, **fields}``. Delivery is at most
        once, to subscribers listening at the time; ``StoreUnavailable`` if it fails."""
        ...


class EventSubscription(Protocol):
    """What `EventSource.subscribe` returns: ``async with`` waits until the subscription
    is active (nothing published after that is missed), ``async for`` yields each event
    as a dict with at least ``event`` and ``key``; ``aclose()`` unsubscribes."""

    async def __aenter__(self) -> EventSubscription: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    async def __anext__(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EventSource(Protocol):
    """A store whose namespace's events (its own commits and takeovers, and what
    `EventPublisher.publish` sends) can be listened to."""

    def subscribe(self) -> EventSubscription:
        """The namespace's events, from the moment the subscription is active."""
        ...


# Remote control (issue 16): a command for a session's owner, carried by the store.


@dataclass(frozen=True, slots=True)
class Command:
    """``verb`` (``pause``, ``resume``, ``suspend``) for the owner of ``key`` at ``epoch``;
    ``id`` names it in the claim and the answer. ``timeout``: how long its sender waits
    for an owner to take it (None: not known, a command of another process); a store
    that can uses it to refuse a claim nobody waits for any more. It takes no part in
    comparing commands (an inbox rebuilds a command without it)."""

    id: str
    key: str
    verb: str
    epoch: int
    timeout: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CommandReply:
    """What became of a command: ``done`` (``version`` is the owner's version after it),
    ``refused`` (``reason`` says why), ``claimed`` (the owner took it and is still
    applying it), ``pending`` (nobody took it yet) or ``withdrawn`` (the sender gave up
    before anybody took it; it is never applied)."""

    status: Literal["done", "refused", "claimed", "pending", "withdrawn"]
    version: int = 0
    reason: str = ""


class CommandInbox(Protocol):
    """The commands sent to one key, as its owner receives them: ``async with`` returns
    once the inbox is active (nothing sent after that is missed), ``async for`` yields
    each `Command`; ``aclose()`` stops listening. Every live inbox of the key receives
    each command; `CommandChannel.claim` decides which one applies it."""

    async def __aenter__(self) -> CommandInbox: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[Command]: ...

    async def __anext__(self) -> Command: ...

    async def aclose(self) -> None: ...


_Inbox = TypeVar("_Inbox", bound="InboxBase")


class InboxBase:
    """What every backend's `CommandInbox` shares: ``async with`` (or the first
    ``__anext__``) activates it once, leaving closes it. A backend implements
    `_activate`, `_next` and `_close`."""

    _active = False

    async def _activate(self) -> None:
        raise NotImplementedError

    async def _next(self) -> Command:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _Inbox) -> _Inbox:
        if not self._active:
            await self._activate()
            self._active = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self: _Inbox) -> _Inbox:
        return self

    async def __anext__(self) -> Command:
        await self.__aenter__()
        return await self._next()

    async def aclose(self) -> None:
        """Stop listening (again: nothing)."""
        if self._active:
            self._active = False
            await self._close()


class CommandChannel(Protocol):
    """How a store carries commands to the worker that holds a session and brings its
    answer back. A command is claimed at most once, by its owner or, when nobody took
    it in time, withdrawn by its sender: it is applied once or never."""

    def inbox(self, key: str) -> CommandInbox:
        """The commands for ``key`` from the moment the inbox is active."""
        ...

    async def send(self, command: Command) -> int | None:
        """Deliver ``command``; return how many inboxes received it (0: nobody listens),
        or None when the transport cannot tell (a polled table)."""
        ...

    async def claim(self, command: Command) -> bool:
        """Take ``command`` to apply it; False when it was withdrawn or taken already."""
        ...

    async def answer(self, command: Command, reply: CommandReply) -> None:
        """Record the owner's ``done`` or ``refused`` for the sender."""
        ...

    async def withdraw(self, command: Command) -> bool:
        """Give up ``command`` unless it was claimed; True when it was withdrawn."""
        ...

    async def reply(self, command: Command) -> CommandReply:
        """Where ``command`` stands now (``pending`` until claimed)."""
        ...


@runtime_checkable
class Controllable(Protocol):
    """A store that carries remote commands to the owners of its sessions."""

    def commands(self) -> CommandChannel:
        """The store's command channel (one per store, made on first use)."""
        ...


@runtime_checkable
class KeyPages(Protocol):
    """A store that lists its session keys a page at a time, without reading them all."""

    async def keys_page(
        self, prefix: str, after: str | None, limit: int | None
    ) -> tuple[list[str], str | None]:
        """Live keys starting with ``prefix``, sorted, greater than ``after`` (None:
        from the first), at most ``limit`` (None: all); and the cursor of the next page
        (the last key returned), None when no key follows."""
        ...


# The sessions whose infos `SessionInfos` reads per round trip (per pipeline and node
# on Redis, per hop to its thread on SQLite): a page of ``ls`` in a few, and no batch so
# long that it holds the event loop or the store's connection for long.
INFO_BATCH = 500


@runtime_checkable
class SessionInfos(Protocol):
    """A store that reads the `Store.info` of many sessions in a few round trips."""

    async def infos(self, keys: Sequence[str]) -> list[SessionInfo | ResumeError | None]:
        """Each key's `Store.info`, in order; a session that cannot be read has the
        `SnapshotCorrupt` or `StoreUnavailable` its `info` would raise in its place."""
        ...


def validate_page(prefix: str, after: str | None, limit: int | None) -> None:
    """A `KeyPages` request, else `ValueError`: ``prefix`` and ``after`` text a store can
    hold, a page size None (all) or at least 1 (a page of 0 keys has no last key to be
    the next page's cursor)."""
    _check_text(prefix, "key prefix")
    if after is not None:
        _check_text(after, "page cursor")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"a page limit must be a whole number >= 1 or None, not {limit!r}")


def page_of(
    keys: Sequence[str], prefix: str, after: str | None, limit: int | None
) -> tuple[list[str], str | None]:
    """One `KeyPages` page cut from sorted ``keys``: those starting with ``prefix``,
    after ``after``, at most ``limit``, and the cursor of the next page."""
    validate_page(prefix, after, limit)
    found = [k for k in keys if k.startswith(prefix) and (after is None or k > after)]
    if limit is None or len(found) <= limit:
        return found, None
    return found[:limit], found[limit - 1]


# The errors every backend raises, worded once so that they read the same everywhere.


class StoreClosed(StoreUnavailable):
    """The store was closed (``aclose``) and is asked again: no retry can help, so a
    session's saves, renewals and command inbox stop on it rather than retry."""


def busy_error(key: str, holder: str | None, epoch: int) -> SessionBusy:
    return SessionBusy(
        f"session {key!r} is held by {holder!r} (epoch {epoch}); wait for its lease to "
        "expire or pass takeover=True to take it over",
        holder=holder,
    )


def acquired_epoch(
    key: str,
    owner: str,
    now: float,
    *,
    epoch: int | None,
    holder: str | None,
    live: bool,
    takeover: bool,
    reclaim: int | None,
    tombstone: int | None = None,
) -> int:
    """The epoch `Store.acquire` grants ``owner`` of a session at ``epoch`` (None: there
    is none; ``tombstone``, the epoch a delete left) whose lease ``holder`` holds, while
    ``live``; `SessionBusy` raised if it is not granted, `LeaseLost` if a ``reclaim``
    is fenced. One rule for every backend written in Python (the Redis script,
    acquire.lua, follows it)."""
    clock = epoch_floor(now)
    floor = max(clock, tombstone or 0)
    if reclaim is not None:
        # Someone else acquired the key since the reclaimed epoch, or deleted it: its
        # holder is fenced, as its commit would have been (a free lease or a key made
        # again would otherwise take a superseded holder's whole conversation over the
        # newer). Not by its own acquisition: one that landed with its reply lost, asked
        # again (a retry, the next checkpoint) with the epoch it held before.
        if epoch is not None and reclaim < epoch and holder != owner:
            raise lease_lost_error(key, reclaim, epoch)
        if epoch is None and tombstone is not None and reclaim <= tombstone:
            raise lease_lost_error(key, reclaim, None, tombstone=tombstone)
        # The store forgot an acquisition if its epoch is below the reclaimed one, and
        # that one is not above its clock: every epoch it hands out now is above the
        # clock, so a holder that acquired since the loss (under a clock behind, below
        # the reclaim) is never fenced by one it superseded.
        if (epoch or 0) < reclaim <= clock:
            return reclaim
        # Its own lease, run out in the state the store went back to: nobody acquired
        # the key since, or another would hold it. Kept, as a renewal would: a new epoch
        # would be above those of the holders the store forgot, and fence the newest.
        if reclaim == epoch and holder == owner:
            return epoch
    if epoch is None:
        return floor + 1
    if live and holder == owner:
        return epoch
    if live and holder is not None and not takeover:
        raise busy_error(key, holder, epoch)
    # from the clock too: a store rolled back to before an acquisition (a failover to a
    # lagging replica) hands out none of the epochs it handed out since
    return max(epoch + 1, floor)


def check_lease_key(key: str, lease: Lease) -> None:
    """A delete fenced by the lease of another key is the caller's bug: refuse it."""
    if lease.key != key:
        raise ValueError(f"the lease given to delete {key!r} is of {lease.key!r}")


def lease_lost_error(
    key: str, epoch: int, current: int | None, *, tombstone: int | None = None
) -> LeaseLost:
    """``current=None``: the session's record is gone. Deleted while this writer held
    it (a ``tombstone`` at its epoch or newer, see `Store.delete`): fenced, never told to
    write it back. Else expired, or the store lost its data: not taken by another
    writer. An epoch older than the writer's: the store went back to before this writer
    acquired it, which nobody else did either."""
    if current is None and tombstone is not None and epoch <= tombstone:
        return LeaseLost(
            f"session {key!r} was deleted (`rm`, or Store.delete) while this writer held "
            f"it at epoch {epoch}: a deleted conversation is not written back, so this "
            "writer must stop writing",
            current_epoch=tombstone,
        )
    if current is None:
        return LeaseLost(
            f"session {key!r} no longer exists in the store (deleted, expired, or the "
            f"store lost its data) while held at epoch {epoch}; acquire it again to write",
            vanished=True,
        )
    if current < epoch:
        return LeaseLost(
            f"session {key!r} is at epoch {current} in the store, older than this "
            f"writer's {epoch}: the store lost its acquisition (a failover with "
            "asynchronous replication, or a restore from a backup); acquire it again to "
            "write it whole",
            current_epoch=current,
            vanished=True,
        )
    return LeaseLost(
        f"writer of session {key!r} at epoch {epoch} is stale (current epoch: {current}); "
        "another worker took the session over, so this one must stop writing",
        current_epoch=current,
    )


def head_moved_error(commit: Commit, head: int) -> LeaseLost:
    """The head is not at ``commit.base_version`` although the epoch is current. Behind
    it, the store lost versions it had acknowledged: nobody took the session, so the
    writer may write it whole again (``vanished``)."""
    if head < commit.base_version:
        return LeaseLost(
            f"session {commit.key!r} is at version {head}, behind version "
            f"{commit.base_version} that this writer committed: the store lost acknowledged "
            "versions (a failover with asynchronous replication, or a restore from a "
            "backup); acquire it again to write it whole",
            current_epoch=commit.epoch,
            vanished=True,
        )
    return LeaseLost(
        f"commit to session {commit.key!r} expected version {commit.base_version} but the "
        f"head is at {head}: another writer shares this lease; reload before writing",
        current_epoch=commit.epoch,
    )


def not_found_error(key: str) -> SnapshotNotFound:
    return SnapshotNotFound(f"no snapshot for session {key!r}")


def not_retained_error(key: str, version: int, kept: Sequence[int]) -> SnapshotNotFound:
    have = f"{kept[0]}..{kept[-1]}" if kept else "none"
    return SnapshotNotFound(f"session {key!r} has no version {version} (retained: {have})")
