"""`open_store()`: one front door, a URL scheme picks the backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from .base import Store

__all__ = ["DEFAULT_STORE_URL", "open_store"]

DEFAULT_STORE_URL = "sqlite:///resume.db"


def _memory(url: str, options: dict[str, Any]) -> Store:
    from .memory import MemoryStore

    return MemoryStore(**options)


def _sqlite(url: str, options: dict[str, Any]) -> Store:
    from .sqlite import SQLiteStore

    # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
    path = unquote(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else ""
    if not path:
        raise ValueError(f"store URL {url!r} names no file: use sqlite:///resume.db")
    return SQLiteStore(path, **options)


def _redis(url: str, options: dict[str, Any]) -> Store:
    from .redis import RedisStore

    return RedisStore.from_url(url, **options)


# One table, not a chain of ifs: a backend registers its schemes here.
_OPENERS: dict[str, Callable[[str, dict[str, Any]], Store]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "rediss": _redis,
    "redis+sentinel": _redis,
    "redis+cluster": _redis,
}

# Options the environment may supply (keyword options win).
_ENV_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "namespace": ("RESUME_NAMESPACE", str),
    "ttl": ("RESUME_TTL", float),
}


def open_store(url: str | None = None, **options: Any) -> Store:
    """Open the store a URL names: ``memory://``, ``sqlite:///file.db``, ``redis://…``,
    ``rediss://…``, ``redis+sentinel://…`` or ``redis+cluster://host:port[,host:port]``.

    Without a URL, ``RESUME_STORE`` or the embedded default ``sqlite:///resume.db``.
    Keyword options (``keep``, ``ttl``, ``namespace`` for Redis …) override
    ``RESUME_TTL`` and ``RESUME_NAMESPACE``.
    """
    url = url or os.environ.get("RESUME_STORE") or DEFAULT_STORE_URL
    scheme = urlsplit(url).scheme.lower()
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in _OPENERS)
        raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r} (known: {known})")
    for name, (env, parse) in _ENV_OPTIONS.items():
        if name not in options and os.environ.get(env):
            if name == "namespace" and not scheme.startswith("redis"):
                continue
            options[name] = parse(os.environ[env])
    return opener(url, options)
