"""The store conformance suite, for any backend: ours run it, and so can yours.

A store (PostgreSQL, DynamoDB, S3, ...) is done when this suite passes on it. Subclass
`StoreConformance` in a test module and say how to make a fresh, empty store::

    # tests/test_my_store.py
    from livekit_resume.testing.conformance import StoreConformance

    class TestMyStore(StoreConformance):
        async def make_store(self, **options):
            return MyStore(dsn=..., **options)

``options`` are what the suite varies: ``keep`` (versions kept loadable, default 10)
and ``ttl`` (seconds a session lives without writes, default none). Each test makes
its stores through ``make_store`` and closes them (``aclose``) when it ends, so each
store must start empty: a new database, table prefix or namespace per call. Fixtures
the factory needs come in through an autouse fixture of the subclass that keeps them
on ``self`` (see ``tests/test_conformance.py`` of livekit-resume, which runs its own
five backends through this class).

The tests use only the `Store` protocol and the optional ones beside it in
`livekit_resume.stores.base` (events). They need pytest and pytest-asyncio (auto or
strict mode); neither is a dependency of livekit-resume, and nothing imports this
module unless a test does. About 50 tests, some of them parametrised; a few wait for
sub-second TTLs to expire, so a run takes a few seconds per backend.
"""

from __future__ import annotations

from ..poll import eventually
from ._base import StoreTests
from ._model import KEY, Writer, writer
from .contents import ContentTests
from .events import EventTests
from .leases import LeaseTests
from .lifetime import LifetimeTests

__all__ = [
    "KEY",
    "ContentTests",
    "EventTests",
    "LeaseTests",
    "LifetimeTests",
    "StoreConformance",
    "StoreTests",
    "Writer",
    "eventually",
    "writer",
]


class StoreConformance(ContentTests, LeaseTests, LifetimeTests, EventTests):
    """Every conformance test. Define ``async def make_store(self, **options) -> Store``.

    The groups (`ContentTests`, `LeaseTests`, `LifetimeTests`, `EventTests`) can be
    subclassed alone to run part of the suite. Tests of an optional capability (events)
    skip, saying so, on a store that does not implement its protocol.
    """
