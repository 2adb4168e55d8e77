"""Session rows and time: when a session has expired, and what to do about a wall clock
stepped back.

Leases and the session TTL use this machine's wall clock (processes on one machine share
it). A clock stepped back would make a lease or a session look fresh for as long as the
step; a row that shows an expiry further ahead than its granted ttl, or a write time in
the future, is pulled back to now, so a step of any size delays a takeover by at most
one lease ttl and an expiry by at most one session ttl.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace

from ...errors import SnapshotCorrupt
from ..log import lease_is_live
from .transactions import lock_now, purge, write

__all__ = ["SESSION_COLUMNS", "Session", "SessionRows", "altered", "is_counter"]

logger = logging.getLogger("livekit_resume")


@dataclass(frozen=True, slots=True)
class Session:
    """One row of the ``sessions`` table (its key and namespace aside)."""

    epoch: int
    owner: str | None
    lease_expires_at: float | None
    lease_ttl: float | None
    touched_at: float
    gen: int
    version: int
    log_len: int


SESSION_COLUMNS = "epoch, owner, lease_expires_at, lease_ttl, touched_at, gen, version, log_len"
# Expired sessions one tidy purges: every other process's writes wait for its transaction
# (5,000 at once held the write lock 0.2 s, 20,000 about 0.6 s). Reads skip expired rows
# whether purged or not; the rest go with the next tidies.
PURGE_BATCH = 500
# SQLite's INTEGER is 64-bit: a counter at the limit could not be stepped (epoch + 1,
# version + 1), and a negative one is written by nothing.
_INT_LIMIT = 2**63 - 1
_NUMBER = (int, float)
# What each column of a session row may hold; SQLite keeps whatever an UPDATE puts in.
_COLUMN_TYPES: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    # (name, types, may be NULL)
    ("epoch", (int,), False),
    ("owner", (str,), True),
    ("lease_expires_at", _NUMBER, True),
    ("lease_ttl", _NUMBER, True),
    ("touched_at", _NUMBER, False),
    ("gen", (int,), False),
    ("version", (int,), False),
    ("log_len", (int,), False),
)
_COUNTERS = frozenset({"epoch", "gen", "version", "log_len"})
# Rows whose times are numbers: the only ones the tidy's SQL may correct or expire (a text
# time compares above every number in SQL and adds as 0).
_TIMES_ARE_NUMBERS = (
    "typeof(touched_at) IN ('integer', 'real') "
    "AND typeof(lease_expires_at) IN ('integer', 'real', 'null') "
    "AND typeof(lease_ttl) IN ('integer', 'real', 'null')"
)


def altered(key: str, what: str) -> SnapshotCorrupt:
    """The error for a row of ``key`` that no operation of the store writes."""
    return SnapshotCorrupt(
        f"session {key!r}: {what}; the file was altered outside livekit-resume: restore "
        "it from a backup, or remove the session (livekit-resume rm)"
    )


def is_counter(value: object) -> bool:
    """Whether ``value`` is an epoch, version or log position the store could write."""
    return isinstance(value, int) and 0 <= value < _INT_LIMIT


def parse(key: str, row: tuple[object, ...]) -> Session:
    """The `Session` of a row of `SESSION_COLUMNS`, or `SnapshotCorrupt` naming the column
    whose value no operation writes (a text time, a negative or 64-bit-wide counter): read
    as it is, it raised TypeError or OverflowError deep in an operation, or was acted on."""
    for (name, types, nullable), value in zip(_COLUMN_TYPES, row, strict=True):
        if value is None and nullable:
            continue
        if not isinstance(value, types) or (name in _COUNTERS and not is_counter(value)):
            raise altered(key, f"its session row has {name} {value!r}")
    return Session(*row)  # type: ignore[arg-type]


class SessionRows:
    """The session rows of namespace ``ns``: read them, expire them, correct their times.

    ``ttl`` is the session TTL (None: sessions never expire), ``clock`` the wall clock;
    a ``read_only`` store never tidies.
    """

    def __init__(
        self, ns: str, *, ttl: float | None, clock: Callable[[], float], read_only: bool
    ) -> None:
        self._ns = ns
        self._ttl = ttl
        self._clock = clock
        self._read_only = read_only

    def expired(self, s: Session, now: float) -> bool:
        # A write time in the future (a clock stepped back) counts as now: see `session`.
        # Never while a lease runs: a store opened with a shorter ttl (another worker's
        # setting) would purge a conversation its holder is saving.
        return (
            self._ttl is not None
            and min(s.touched_at, now) + self._ttl <= now
            and not lease_is_live(s.lease_expires_at if s.owner else None, now)
        )

    @staticmethod
    def skewed(s: Session, now: float) -> bool:
        """Whether the row's times run ahead of ``now`` further than they could have been
        set: the wall clock was stepped back since."""
        ahead = (
            s.lease_ttl is not None
            and s.lease_expires_at is not None
            and s.lease_expires_at - now > s.lease_ttl
        )
        return ahead or s.touched_at > now

    @staticmethod
    def lease_expiry(s: Session, now: float) -> float | None:
        """The lease's expiry, never more than its granted ttl after ``now``."""
        if s.lease_ttl is None or s.lease_expires_at is None:
            return s.lease_expires_at
        return min(s.lease_expires_at, now + s.lease_ttl)

    def listed(self, key: str, row: tuple[object, ...], now: float) -> tuple[bool, bool]:
        """Whether a row of `SESSION_COLUMNS` is listed (live, or damaged: listed so that
        an operator finds it, and `load` says what is wrong), and whether it needs a tidy."""
        try:
            s = parse(key, row)
        except SnapshotCorrupt:
            return True, False
        return not self.expired(s, now), self.skewed(s, now)

    def select(self, conn: sqlite3.Connection, key: str) -> Session | None:
        found = conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE ns=? AND key=?", (self._ns, key)
        ).fetchone()
        return None if found is None else parse(key, found)

    def session(self, conn: sqlite3.Connection, key: str, now: float) -> Session | None:
        """The key's session row inside a write transaction; an expired one is purged.

        A row whose times run ahead of the clock (stepped back) is pulled back to now
        first, and stays so: that bounds how long the step keeps a lease held (one lease
        ttl) or a session alive (one session ttl) from the first write that sees it.
        """
        s = self.select(conn, key)
        if s is None:
            return None
        if self.skewed(s, now):
            s = self._unskew(conn, key, s, now)
        if self.expired(s, now):
            purge(conn, self._ns, key)
            return None
        return s

    def _unskew(self, conn: sqlite3.Connection, key: str, s: Session, now: float) -> Session:
        expires, touched = self.lease_expiry(s, now), min(s.touched_at, now)
        logger.warning(
            "session %r: its lease or write time is ahead of the clock (stepped back?); "
            "pulled back to now",
            key,
            extra={"key": key, "epoch": s.epoch},
        )
        conn.execute(
            "UPDATE sessions SET lease_expires_at=?, touched_at=? WHERE ns=? AND key=?",
            (expires, touched, self._ns, key),
        )
        return replace(s, lease_expires_at=expires, touched_at=touched)

    def read_session(self, conn: sqlite3.Connection, key: str) -> tuple[Session | None, bool]:
        """The key's live session row inside a read transaction, and whether the row needs
        a write once the read is over (expired, or its times run ahead of the clock)."""
        s = self.select(conn, key)
        if s is None:
            return None, False
        now = self._clock()
        if self.expired(s, now):
            return None, True
        return s, self.skewed(s, now)

    def tidy(self, conn: sqlite3.Connection, key: str | None = None) -> None:
        """In its own write transaction, purge expired sessions (at most `PURGE_BATCH`)
        and pull times that run ahead of the clock back to now (one key, or all). A
        read-only store skips it.

        Only if the write lock is free now: it runs after a read, which WAL lets go on
        while another process writes, and must not then wait for that writer (a restore
        failing with `StoreUnavailable` after the busy timeout). Skipped, it is done by
        the next write of the key (`session`) or the next read that finds the lock free.
        """
        if self._read_only or not lock_now(conn):
            return
        with write(conn, begun=True):
            now = self._clock()
            where = "ns=:ns" + (" AND key=:key" if key is not None else "")
            args = {"ns": self._ns, "key": key, "now": now, "ttl": self._ttl}
            # Pulled back first (the same rule as `session`), so the purge below sees it.
            conn.execute(
                "UPDATE sessions SET touched_at=min(touched_at, :now), lease_expires_at=CASE "
                "WHEN lease_expires_at > :now + lease_ttl THEN :now + lease_ttl "
                f"ELSE lease_expires_at END WHERE {where} AND {_TIMES_ARE_NUMBERS} AND "
                "(touched_at > :now OR lease_expires_at > :now + lease_ttl)",
                args,
            )
            if self._ttl is None:
                return
            gone = conn.execute(
                f"SELECT key FROM sessions WHERE {where} AND {_TIMES_ARE_NUMBERS} AND "
                "touched_at + :ttl <= :now AND NOT (owner IS NOT NULL AND "
                "lease_expires_at > :now) LIMIT :batch",
                {**args, "batch": PURGE_BATCH},
            ).fetchall()
            for (k,) in gone:
                purge(conn, self._ns, k)
