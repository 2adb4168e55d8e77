"""Store settings that must be refused or honoured, not silently misread (issue 13,
defects 9 and 10): session and lease TTLs, a wall clock stepped back, namespaces in one
SQLite file, odd SQLite URLs, and read-only opening.

Everything runs on real SQLite files in the test's own directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from livekit_resume.errors import ResumeError, SessionBusy, SnapshotNotFound, StoreUnavailable
from livekit_resume.settings import Settings
from livekit_resume.snapshot.codec import Codec
from livekit_resume.stores import base
from livekit_resume.stores.base import Commit, EventPublisher, EventSource, Record, Store
from livekit_resume.stores.memory import MemoryStore
from livekit_resume.stores.sqlite import DEFAULT_NAMESPACE, SQLiteStore
from livekit_resume.stores.url import open_store

KEY = "room-9"
HOUR = 3600.0
BAD_TTLS = ["0", "-1", "1e-9", "abc", "nan", "inf"]


class Clock:
    """A wall clock the test sets and steps, injected as the store's ``clock``."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "RESUME_STORE",
        "RESUME_TTL",
        "RESUME_NAMESPACE",
        "RESUME_KEEP",
        "RESUME_SIGNING_KEYS",
        "RESUME_ENCRYPTION_KEYS",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def _write_session(store: SQLiteStore, key: str = KEY, items: int = 2) -> None:
    lease = await store.acquire(key, "worker-a", ttl=30)
    for n in range(items):
        rec = Record("h", f"m{n}", f"item {n}".encode(), f"m{n - 1}" if n else None)
        await store.commit(Commit(key, lease.epoch, n, f"head {n + 1}".encode(), [rec], n + 1))
    await store.release(lease)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _without_sidecars(files: dict[str, bytes]) -> dict[str, bytes]:
    """SQLite's own -wal/-shm index of a WAL file, which a reader may need to create."""
    return {n: b for n, b in files.items() if not n.endswith(("-wal", "-shm"))}


# -- session TTL -----------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, 1e-9, math.nan, math.inf, "abc"])
def test_a_session_ttl_must_be_a_finite_number_of_seconds(tmp_path: Path, ttl: object) -> None:
    with pytest.raises(ValueError, match="ttl") as refused:
        SQLiteStore(tmp_path / "s.db", ttl=ttl)  # type: ignore[arg-type]
    assert repr(ttl) in str(refused.value)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("url", ["sqlite:///s.db", "memory://", "redis://127.0.0.1:1/0"])
@pytest.mark.parametrize("value", BAD_TTLS)
def test_resume_ttl_that_is_not_a_positive_number_is_refused_in_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, url: str, value: str
) -> None:
    clean_env.chdir(tmp_path)
    clean_env.setenv("RESUME_TTL", value)
    with pytest.raises(ValueError) as refused:
        open_store(url)
    message = str(refused.value)
    assert "RESUME_TTL" in message and repr(value) in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ttl", [0, -1, 1e-9, math.nan, math.inf])
def test_ttl_keyword_that_is_not_a_positive_number_is_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, ttl: float
) -> None:
    clean_env.setenv("RESUME_TTL", "60")  # the keyword wins, and is checked as well
    for url in (f"sqlite:///{tmp_path}/k.db", "memory://"):
        with pytest.raises(ValueError, match="ttl") as refused:
            open_store(url, ttl=ttl)
        assert repr(ttl) in str(refused.value)


async def test_a_lease_never_outlives_its_session(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", ttl=60)
    try:
        with pytest.raises(ValueError, match=r"lease ttl 61\b.*session ttl 60"):
            await store.acquire(KEY, "worker-a", ttl=61)
        assert await store.keys() == []  # refused before anything was written
        lease = await store.acquire(KEY, "worker-a", ttl=60)  # equal is fine
        with pytest.raises(ValueError, match=r"lease ttl 90\b.*session ttl 60"):
            await store.renew(lease, ttl=90)
        info = await store.info(KEY)
        assert info is not None and info.lease_expires_at == lease.expires_at
    finally:
        await store.aclose()


# -- a wall clock stepped back ---------------------------------------------------------


async def test_a_clock_stepped_back_blocks_a_takeover_for_at_most_one_lease_ttl(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    try:
        held = await store.acquire(KEY, "worker-a", ttl=30)
        clock.now -= HOUR  # NTP steps the clock back; worker-a then dies
        with pytest.raises(SessionBusy):
            await store.acquire(KEY, "worker-b", ttl=30)  # still within one lease ttl
        info = await store.info(KEY)
        assert info is not None and info.lease_expires_at is not None
        assert info.lease_expires_at <= clock.now + 30
        clock.now += 31  # one lease ttl later, not an hour
        taken = await store.acquire(KEY, "worker-b", ttl=30)
        assert taken.owner == "worker-b" and taken.epoch > held.epoch
    finally:
        await store.aclose()


async def test_a_live_holder_keeps_its_lease_through_a_clock_stepped_back(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    try:
        lease = await store.acquire(KEY, "worker-a", ttl=30)
        clock.now -= HOUR
        with pytest.raises(SessionBusy):
            await store.acquire(KEY, "worker-b", ttl=30)
        clock.now += 10
        lease = await store.renew(lease, ttl=30)  # renewals keep it, as before the step
        clock.now += 25
        with pytest.raises(SessionBusy):
            await store.acquire(KEY, "worker-b", ttl=30)
        assert await store.commit(Commit(KEY, lease.epoch, 0, b"h", [], 0)) == 1
    finally:
        await store.aclose()


async def test_a_clock_stepped_back_delays_expiry_by_at_most_one_session_ttl(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", ttl=60, clock=clock)
    try:
        lease = await store.acquire(KEY, "worker-a", ttl=30)
        await store.commit(Commit(KEY, lease.epoch, 0, b"h", [Record("h", "m", b"x")], 1))
        await store.release(lease)
        clock.now -= HOUR
        assert await store.keys() == [KEY]  # written "in the future": counts as now
        info = await store.info(KEY)
        assert info is not None and info.expires_at == clock.now + 60
        clock.now += 61  # one session ttl later, not an hour
        assert await store.keys() == []
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY)
    finally:
        await store.aclose()


# -- namespaces ------------------------------------------------------------------------


async def test_two_namespaces_in_one_file_never_see_each_others_sessions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared.db"
    a = SQLiteStore(path, namespace="tenant-a")
    b = SQLiteStore(path, namespace="tenant-b")
    try:
        await _write_session(a, KEY, items=2)
        assert await a.keys() == [KEY]
        assert await b.keys() == []
        with pytest.raises(SnapshotNotFound):
            await b.load(KEY)
        assert await b.versions(KEY) == [] and await b.info(KEY) is None
        # The same key is a different session: no SessionBusy, its own versions.
        held_a = await a.acquire(KEY, "worker-a", ttl=30)
        held_b = await b.acquire(KEY, "worker-b", ttl=30)
        assert held_b.owner == "worker-b"
        assert await b.commit(Commit(KEY, held_b.epoch, 0, b"b", [Record("h", "x", b"b")], 1)) == 1
        assert (await a.load(KEY)).version == 2
        assert await a.commit(Commit(KEY, held_a.epoch, 2, b"a3", [], 2)) == 3
        assert await b.delete(KEY)
        assert (await a.load(KEY)).head == b"a3"
        assert await b.keys() == [] and await a.keys() == [KEY]
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_store_without_namespace_uses_the_default_one(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    plain = SQLiteStore(path)
    named = SQLiteStore(path, namespace=DEFAULT_NAMESPACE)
    try:
        assert plain.namespace == DEFAULT_NAMESPACE == "lkresume"
        await _write_session(plain)
        assert (await named.load(KEY)).version == 2
    finally:
        await plain.aclose()
        await named.aclose()


@pytest.mark.parametrize("namespace", ["", "a{b}", "tab\there"])
def test_a_namespace_that_cannot_name_keys_is_refused(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        SQLiteStore(tmp_path / "s.db", namespace=namespace)


async def test_open_store_gives_sqlite_the_namespace_of_resume_namespace(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    clean_env.setenv("RESUME_NAMESPACE", "tenant-a")
    a = open_store(url)
    clean_env.setenv("RESUME_NAMESPACE", "tenant-b")
    b = open_store(url)
    keyword = open_store(url, namespace="tenant-a")  # the keyword wins over the environment
    try:
        assert isinstance(a, SQLiteStore) and isinstance(b, SQLiteStore)
        await _write_session(a)
        assert await a.keys() == [KEY] and await b.keys() == []
        assert await keyword.keys() == [KEY]
    finally:
        for store in (a, b, keyword):
            await store.aclose()


def test_memory_store_ignores_resume_namespace(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RESUME_NAMESPACE", "tenant-a")
    assert isinstance(open_store("memory://"), MemoryStore)


# -- odd SQLite URLs -------------------------------------------------------------------


def test_sqlite_memory_url_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"persists nothing.*memory://"):
        open_store("sqlite:///:memory:")
    with pytest.raises(ValueError, match="persists nothing"):
        SQLiteStore(":memory:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "suffix", ["?mode=rw", "?mode=rwc", "?cache=shared", "?mode=ro&cache=shared", "#top"]
)
def test_a_query_or_fragment_is_refused_never_part_of_the_file_name(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, suffix: str
) -> None:
    clean_env.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported query|fragment"):
        open_store("sqlite:///odd.db" + suffix)
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_url_with_a_host_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="names a host"):
        open_store("sqlite://server/resume.db")


async def test_a_percent_encoded_question_mark_is_part_of_the_name(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.chdir(tmp_path)
    store = open_store("sqlite:///what%3F.db")
    try:
        assert isinstance(store, SQLiteStore) and not store.read_only
        await _write_session(store)
    finally:
        await store.aclose()
    assert (tmp_path / "what?.db").is_file()


# -- read-only opening -----------------------------------------------------------------


@pytest.fixture
async def written(tmp_path: Path) -> Path:
    """A store file holding one session of two versions, closed."""
    path = tmp_path / "data" / "resume.db"
    path.parent.mkdir()
    store = SQLiteStore(path)
    try:
        await _write_session(store)
    finally:
        await store.aclose()
    return path


@pytest.fixture
async def reader(written: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(written, read_only=True)
    yield store
    await store.aclose()


async def _reads_everything(store: SQLiteStore) -> None:
    assert await store.keys() == [KEY]
    stored = await store.load(KEY)
    assert (stored.version, stored.head) == (2, b"head 2")
    assert stored.streams == {"h": [("m0", b"item 0"), ("m1", b"item 1")]}
    assert (await store.load(KEY, 1)).streams == {"h": [("m0", b"item 0")]}
    assert [v.version for v in await store.versions(KEY)] == [1, 2]
    info = await store.info(KEY)
    assert info is not None and info.version == 2


async def test_a_read_only_store_reads_and_writes_nothing(
    written: Path, reader: SQLiteStore
) -> None:
    before = _files(written.parent)
    stamp = os.stat(written).st_mtime_ns
    await _reads_everything(reader)
    after = _files(written.parent)
    assert _without_sidecars(after) == _without_sidecars(before)
    assert after.get(written.name + "-wal", b"") == b""  # nothing was written through WAL
    assert os.stat(written).st_mtime_ns == stamp


async def test_a_read_only_store_refuses_every_write(written: Path, reader: SQLiteStore) -> None:
    before = _without_sidecars(_files(written.parent))
    writer = SQLiteStore(written)
    try:
        lease = await writer.acquire(KEY, "worker-a", ttl=30)
    finally:
        await writer.aclose()
    held = _without_sidecars(_files(written.parent))
    assert held != before  # the file really changes when written
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: reader.acquire(KEY, "worker-b", ttl=30, takeover=True),
        lambda: reader.renew(lease, ttl=30),
        lambda: reader.release(lease),
        lambda: reader.commit(Commit(KEY, lease.epoch, 2, b"h3", [], 2)),
        lambda: reader.delete(KEY),
    ]
    for write in writes:
        with pytest.raises(StoreUnavailable, match=r"read-only.*without read_only"):
            await write()
    assert _without_sidecars(_files(written.parent)) == held, "a refused write changed the file"


async def test_a_read_only_store_on_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    for path in (tmp_path / "typo.db", tmp_path / "no-such-dir" / "resume.db"):
        store = SQLiteStore(path, read_only=True)
        try:
            for call in (store.keys(), store.load(KEY), store.info(KEY)):
                with pytest.raises(StoreUnavailable, match=f"no store at {path}"):
                    await call
        finally:
            await store.aclose()
    assert os.listdir(tmp_path) == []


async def test_a_read_only_store_leaves_expired_sessions_in_the_file(written: Path) -> None:
    clock = Clock()
    late = SQLiteStore(written, read_only=True, ttl=60, clock=clock)
    try:
        clock.now = 2 * 10**10  # long after the session was written
        assert await late.keys() == []
        with pytest.raises(SnapshotNotFound):
            await late.load(KEY)
    finally:
        await late.aclose()
    fresh = SQLiteStore(written, read_only=True)
    try:
        assert await fresh.keys() == [KEY]  # hidden, not purged
    finally:
        await fresh.aclose()


async def test_an_empty_file_reads_as_an_empty_store_without_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    store = SQLiteStore(path, read_only=True)
    try:
        assert await store.keys() == []
        with pytest.raises(SnapshotNotFound):
            await store.load(KEY)
        assert await store.versions(KEY) == [] and await store.info(KEY) is None
    finally:
        await store.aclose()
    assert path.read_bytes() == b""


async def test_open_store_read_only_by_keyword_or_mode_ro(
    written: Path, clean_env: pytest.MonkeyPatch
) -> None:
    for store in (
        open_store(f"sqlite:///{written}", read_only=True),
        open_store(f"sqlite:///{written}?mode=ro"),
    ):
        try:
            assert isinstance(store, SQLiteStore) and store.read_only
            assert store.path == str(written)  # the query is not part of the name
            await _reads_everything(store)
        finally:
            await store.aclose()
    memory = open_store("memory://", read_only=True)  # accepted and ignored
    assert isinstance(memory, MemoryStore)
    remote = open_store("redis://127.0.0.1:1/0", read_only=True)  # never connected here
    try:
        assert type(remote).__name__ == "RedisStore"
    finally:
        await remote.aclose()


@contextlib.contextmanager
def _unwritable(directory: Path, file: Path) -> Iterator[None]:
    """chmod 0555 the directory and 0444 the file. Root ignores modes, so as root the
    directory is also made immutable (``chattr +i``), which binds root too."""
    immutable = False
    os.chmod(file, 0o444)
    os.chmod(directory, 0o555)
    try:
        if os.geteuid() == 0:
            chattr = shutil.which("chattr")
            if chattr is None:
                pytest.skip("running as root without chattr: cannot make a directory unwritable")
            done = subprocess.run([chattr, "+i", str(directory)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"chattr +i refused here: {done.stderr.decode().strip()}")
            immutable = True
        with pytest.raises(OSError):
            (directory / "probe").touch()  # the directory really is unwritable
        yield
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr") or "chattr", "-i", str(directory)], check=True)
        os.chmod(directory, 0o755)
        os.chmod(file, 0o644)


async def test_a_file_in_an_unwritable_directory_can_still_be_read(written: Path) -> None:
    before = _files(written.parent)
    assert _without_sidecars(before) == before  # closed cleanly: no -wal, no -shm
    with _unwritable(written.parent, written):
        store = open_store(f"sqlite:///{written}", read_only=True)
        try:
            assert isinstance(store, SQLiteStore)
            await _reads_everything(store)
        finally:
            await store.aclose()
    assert _files(written.parent) == before


async def test_a_read_only_file_in_a_writable_directory_can_still_be_read(
    written: Path,
) -> None:
    os.chmod(written, 0o444)
    try:
        store = SQLiteStore(written, read_only=True)
        try:
            await _reads_everything(store)
        finally:
            await store.aclose()
    finally:
        os.chmod(written, 0o644)


async def test_commits_still_in_the_wal_of_an_unwritable_directory_are_not_ignored(
    written: Path, tmp_path: Path
) -> None:
    """Read without its -shm index, a file's -wal cannot be seen; refuse, never read stale."""
    store = SQLiteStore(written)
    copy = tmp_path / "copy"
    copy.mkdir()
    try:
        lease = await store.acquire(KEY, "worker-a", ttl=30)
        await store.commit(Commit(KEY, lease.epoch, 2, b"head 3", [], 2))
        # Copied while the writer is open: the third version is only in the -wal.
        for name in (written.name, written.name + "-wal"):
            shutil.copyfile(written.parent / name, copy / name)
    finally:
        await store.aclose()
    assert (copy / (written.name + "-wal")).stat().st_size > 0
    with _unwritable(copy, copy / written.name):
        reader = SQLiteStore(copy / written.name, read_only=True)
        try:
            with pytest.raises(StoreUnavailable, match=r"-wal holds commits"):
                await reader.load(KEY)
        finally:
            await reader.aclose()


# -- one typed settings model, from_url on every backend ------------------------------


def test_settings_read_resume_variables_and_keywords_win(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RESUME_STORE", "memory://")
    clean_env.setenv("RESUME_NAMESPACE", "tenant-a")
    clean_env.setenv("RESUME_TTL", "60")
    clean_env.setenv("RESUME_KEEP", "")  # empty: not set
    settings = Settings.load()
    assert (settings.store, settings.namespace, settings.ttl, settings.keep) == (
        "memory://",
        "tenant-a",
        60.0,
        None,
    )
    assert settings.store_options() == {"namespace": "tenant-a", "ttl": 60.0}
    chosen = Settings.load(namespace="tenant-b", ttl=None)
    assert (chosen.namespace, chosen.ttl) == ("tenant-b", None)
    clean_env.setenv("RESUME_TTL", "soon")  # not read where it is not wanted
    keys = Settings.only("signing_keys", "encryption_keys")
    assert (keys.store, keys.namespace, keys.ttl) == ("sqlite:///resume.db", None, None)
    with pytest.raises(ValueError, match="no such settings: colour"):
        Settings.only("colour")


def test_settings_read_again_see_every_change_of_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    # settings are kept once read (building them is slow): a change must still be seen
    clean_env.setenv("RESUME_TTL", "60")
    assert Settings.load().ttl == 60.0
    assert Settings.load() is Settings.load()
    clean_env.setenv("RESUME_TTL", "61")
    assert Settings.load().ttl == 61.0
    clean_env.setenv("resume_keep", "4")  # matched whatever its case
    assert Settings.load().keep == 4
    clean_env.delenv("resume_keep")
    assert Settings.load().keep is None
    assert Settings.load(keep=2).keep == 2
    assert Settings.load(namespace=bytearray(b"t")).namespace == "t"  # unhashable: read anew
    clean_env.setenv("RESUME_TTL", "soon")
    with pytest.raises(ValueError, match="RESUME_TTL='soon'"):
        Settings.load()
    assert Settings.only("keep").ttl is None


def test_settings_never_show_keys(clean_env: pytest.MonkeyPatch) -> None:
    secret = "k1:" + "QUJD" * 8
    clean_env.setenv("RESUME_SIGNING_KEYS", secret)
    settings = Settings.load(encryption_keys=secret)
    for shown in (repr(settings), str(settings), str(settings.model_dump())):
        assert "QUJD" not in shown
    frame = settings.codec().pack({"said": "hello"})
    assert settings.codec().unpack(frame)[1] == {"said": "hello"}
    with pytest.raises(ResumeError):  # signed and encrypted: the keys reached the codec
        Codec().unpack(frame)


def test_a_bad_setting_is_refused_in_one_line_naming_it(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RESUME_KEEP", "none")
    with pytest.raises(ValueError) as refused:
        Settings.load()
    assert "RESUME_KEEP='none'" in str(refused.value) and "\n" not in str(refused.value)
    clean_env.setenv("RESUME_KEEP", "3")
    assert Settings.load().keep == 3


async def test_open_store_takes_keep_from_resume_keep(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("RESUME_KEEP", "1")
    store = open_store(f"sqlite:///{tmp_path}/keep.db")
    kept = open_store(f"sqlite:///{tmp_path}/keep.db", keep=5)  # the keyword wins
    try:
        assert isinstance(store, SQLiteStore)
        await _write_session(store, items=3)
        assert [v.version for v in await store.versions(KEY)] == [3]
        assert "keep=5" in repr(kept)
    finally:
        await store.aclose()
        await kept.aclose()


def test_every_backend_opens_from_its_own_url(tmp_path: Path) -> None:
    memory = MemoryStore.from_url("memory://", namespace="ignored", keep=2)
    assert isinstance(memory, MemoryStore)
    sqlite = SQLiteStore.from_url(f"sqlite:///{tmp_path}/own.db?mode=ro", namespace="t")
    assert (sqlite.path, sqlite.namespace, sqlite.read_only) == (
        str(tmp_path / "own.db"),
        "t",
        True,
    )
    for wrong, backend in (("sqlite:///x.db", MemoryStore), ("memory://", SQLiteStore)):
        with pytest.raises(ValueError, match="opens"):
            backend.from_url(wrong)
    assert list(tmp_path.iterdir()) == []


def test_capabilities_are_found_by_type_not_by_getattr(tmp_path: Path) -> None:
    from livekit_resume.stores.redis import RedisStore

    redis = RedisStore.from_url("redis://127.0.0.1:1/0")  # never connected here
    sqlite = SQLiteStore(tmp_path / "c.db")
    for store in (MemoryStore(), sqlite, redis):
        assert isinstance(store, Store)
    assert isinstance(redis, EventPublisher) and isinstance(redis, EventSource)
    for plain in (MemoryStore(), sqlite):
        assert not isinstance(plain, EventPublisher) and not isinstance(plain, EventSource)


def test_a_third_party_backend_finds_the_contract_in_the_package() -> None:
    import livekit_resume as lr

    for name in ("Store", "Lease", "Commit", "Record", "Stored", "SnapshotInfo", "SessionInfo"):
        assert name in lr.__all__ and getattr(lr, name) is getattr(base, name)
