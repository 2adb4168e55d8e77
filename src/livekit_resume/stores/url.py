"""`open_store()`: one front door, a URL scheme picks the backend."""

from __future__ import annotations

from importlib import import_module
from typing import Any, cast
from urllib.parse import urlsplit

from .. import redact
from ..settings import DEFAULT_STORE_URL, Settings
from .base import Store, validate_ttl

__all__ = ["DEFAULT_STORE_URL", "open_store"]

# One table, not a chain of ifs: each scheme names the backend class whose
# ``from_url(url, **options)`` parses the URL. Imported on first use, so a SQLite user
# never pays for importing the Redis client.
_BACKENDS: dict[str, tuple[str, str]] = {
    "memory": (".memory", "MemoryStore"),
    "sqlite": (".sqlite", "SQLiteStore"),
    "redis": (".redis", "RedisStore"),
    "rediss": (".redis", "RedisStore"),
    "redis+sentinel": (".redis", "RedisStore"),
    "redis+cluster": (".redis", "RedisStore"),
}
# Backends whose from_url takes no read_only: a Redis reader never writes on its own.
_NO_READ_ONLY = frozenset({"RedisStore"})
# Settings open_store takes from the environment (RESUME_*) when not given as options.
_FROM_SETTINGS = ("namespace", "ttl", "keep", "sentinel_password")


def open_store(url: str | None = None, *, read_only: bool = False, **options: Any) -> Store:
    """Open the store a URL names: ``memory://``, ``sqlite:///file.db``, ``redis://…``,
    ``rediss://…``, ``redis+sentinel://…`` or ``redis+cluster://host:port[,host:port]``.

    Without a URL, ``RESUME_STORE`` or the embedded default ``sqlite:///resume.db``.
    Keyword options (``keep``, ``ttl``, ``namespace``, ``sentinel_password`` …) override
    ``RESUME_KEEP``, ``RESUME_TTL``, ``RESUME_NAMESPACE`` and ``RESUME_SENTINEL_PASSWORD``
    (see `livekit_resume.settings`).
    ``read_only=True`` (or ``sqlite:///file.db?mode=ro``) opens a SQLite file for reading
    only, creating and writing nothing; other stores ignore it.
    """
    # An option given is not read from the environment at all.
    wanted = [name for name in _FROM_SETTINGS if name not in options]
    settings = Settings.only("store", *wanted, **({"store": url} if url else {}))
    url = settings.store
    module, name = _BACKENDS[check_scheme(url)]
    options = {**settings.store_options(), **options}
    if "ttl" in options:
        options["ttl"] = validate_ttl(options["ttl"])
    if read_only and name not in _NO_READ_ONLY:
        options["read_only"] = True
    cls = getattr(import_module(module, __package__), name)
    return cast(Store, cls.from_url(url, **options))


def check_scheme(url: str) -> str:
    """The scheme of a store URL, lower-cased, if a backend takes it; else `ValueError`
    naming the known ones."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ValueError(
            f"unknown store URL scheme {scheme!r} in {redact.url(url)!r} (known: {known})"
        )
    return scheme
