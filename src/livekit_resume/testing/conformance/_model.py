"""What the conformance tests compare against: a small model of a key's streams, written
here (not `fold_records`), so a bug shared by the stores and the fold would still show."""

from __future__ import annotations

from ...stores.base import Commit, Lease, Record, Store, Stored

KEY = "room-42"
Items = dict[str, list[tuple[str, bytes]]]
InfoDict = dict[str, str | int | float | bool | None]


def live(stored: Stored) -> Items:
    """A load's streams without the empty ones."""
    return {name: list(items) for name, items in stored.streams.items() if items}


def apply_record(model: Items, rec: Record) -> None:
    """The meaning of a record, written plainly: remove the id, then place it after ``after``."""
    items = model.setdefault(rec.stream, [])
    if rec.data is None and rec.id == "":
        items.clear()
        return
    items[:] = [(i, d) for i, d in items if i != rec.id]
    if rec.data is not None:
        pos = 0 if rec.after is None else [i for i, _ in items].index(rec.after) + 1
        items.insert(pos, (rec.id, rec.data))


def nonempty(model: Items) -> Items:
    return {name: list(items) for name, items in model.items() if items}


def records_of(streams: Items) -> list[Record]:
    """Records that write ``streams`` whole, each item after the one before it."""
    records = []
    for name, items in streams.items():
        prev = None
        for item_id, data in items:
            records.append(Record(name, item_id, data, prev))
            prev = item_id
    return records


class Writer:
    """One worker's view of a key: builds records against a model and commits them."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store, self.lease = store, lease
        self.version = 0
        self.model: Items = {}
        self.pending: list[Record] = []
        self.expected: dict[int, tuple[bytes, Items, InfoDict]] = {}

    def _add(self, rec: Record) -> None:
        apply_record(self.model, rec)
        self.pending.append(rec)

    def ids(self, stream: str) -> list[str]:
        return [i for i, _ in self.model.get(stream, [])]

    def append(self, stream: str, item_id: str, data: bytes) -> None:
        ids = self.ids(stream)
        self._add(Record(stream, item_id, data, ids[-1] if ids else None))

    def edit(self, stream: str, item_id: str, data: bytes) -> None:
        ids = self.ids(stream)
        idx = ids.index(item_id)
        self._add(Record(stream, item_id, data, ids[idx - 1] if idx else None))

    def move(self, stream: str, item_id: str, after: str | None) -> None:
        data = dict(self.model[stream])[item_id]
        self._add(Record(stream, item_id, data, after))

    def remove(self, stream: str, item_id: str) -> None:
        self._add(Record(stream, item_id, None))

    def clear(self, stream: str) -> None:
        self._add(Record(stream, "", None))

    @property
    def size(self) -> int:
        return sum(len(items) for items in self.model.values())

    async def commit(self, info: InfoDict | None = None) -> int:
        head = f"head of {self.lease.key} v{self.version + 1}".encode() + b"\x00\xff"
        info = info if info is not None else {"n": self.version + 1}
        version = await self.store.commit(
            Commit(
                self.lease.key,
                self.lease.epoch,
                self.version,
                head,
                tuple(self.pending),
                self.size,
                info,
            )
        )
        assert version == self.version + 1
        self.version, self.pending = version, []
        self.expected[version] = (head, nonempty(self.model), dict(info))
        return version

    async def check(self, version: int) -> None:
        head, streams, info = self.expected[version]
        stored = await self.store.load(self.lease.key, version)
        assert (stored.version, stored.head, live(stored), stored.info) == (
            version,
            head,
            streams,
            info,
        )


async def writer(
    store: Store, key: str = KEY, owner: str = "worker-a", *, ttl: float | None = None
) -> Writer:
    """A writer holding the key's lease (for ``ttl`` seconds: at most the store's own)."""
    lease = await (store.acquire(key, owner) if ttl is None else store.acquire(key, owner, ttl=ttl))
    return Writer(store, lease)


async def snapshot_of(store: Store, key: str = KEY) -> tuple[object, ...]:
    """Everything a reader can see of a key, to compare before and after a refusal."""
    info = await store.info(key)
    return (await store.load(key), await store.versions(key), info and info.version, info)
