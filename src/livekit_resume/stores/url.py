"""`open_store()`: one front door, a URL scheme picks the backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .base import Store, validate_ttl

__all__ = ["DEFAULT_STORE_URL", "open_store"]

DEFAULT_STORE_URL = "sqlite:///resume.db"


def _memory(url: str, options: dict[str, Any]) -> Store:
    from .memory import MemoryStore

    # One MemoryStore is a world of its own: nothing to separate, nothing to protect.
    options.pop("namespace", None)
    options.pop("read_only", None)
    return MemoryStore(**options)


def _sqlite(url: str, options: dict[str, Any]) -> Store:
    from .sqlite import SQLiteStore

    # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db. The
    # query and fragment are split off before unquoting: %3F in a name is a real "?".
    parts = urlsplit(url)
    if parts.netloc:
        raise ValueError(
            f"store URL {url!r} names a host ({parts.netloc!r}); SQLite files are local: "
            "use sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    if parts.fragment:
        raise ValueError(f"store URL {url!r} has a fragment (#{parts.fragment}); remove it")
    path = unquote(parts.path[1:])
    if not path:
        raise ValueError(f"store URL {url!r} names no file: use sqlite:///resume.db")
    if path == ":memory:":
        raise ValueError(
            f"store URL {url!r} persists nothing (each connection gets its own empty "
            "database); use memory:// for a store that lives in the process"
        )
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if (name, value) != ("mode", "ro"):
            raise ValueError(
                f"store URL {url!r}: unsupported query {name}={value!r} "
                "(supported: ?mode=ro, to open the file read-only)"
            )
        options["read_only"] = True
    return SQLiteStore(path, **options)


def _redis(url: str, options: dict[str, Any]) -> Store:
    from .redis import RedisStore

    options.pop("read_only", None)  # a Redis reader never writes on its own
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


def _env_ttl(text: str) -> float:
    try:
        ttl = validate_ttl(float(text), "RESUME_TTL")
    except ValueError:
        ttl = None
    if ttl is None:
        raise ValueError(
            f"RESUME_TTL={text!r} is not a finite number of seconds >= 0.001 (the session "
            "TTL); fix or unset it"
        )
    return ttl


# Options the environment may supply (keyword options win).
_ENV_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "namespace": ("RESUME_NAMESPACE", str),
    "ttl": ("RESUME_TTL", _env_ttl),
}


def open_store(url: str | None = None, *, read_only: bool = False, **options: Any) -> Store:
    """Open the store a URL names: ``memory://``, ``sqlite:///file.db``, ``redis://…``,
    ``rediss://…``, ``redis+sentinel://…`` or ``redis+cluster://host:port[,host:port]``.

    Without a URL, ``RESUME_STORE`` or the embedded default ``sqlite:///resume.db``.
    Keyword options (``keep``, ``ttl``, ``namespace`` …) override ``RESUME_TTL`` and
    ``RESUME_NAMESPACE``. ``read_only=True`` (or ``sqlite:///file.db?mode=ro``) opens a
    SQLite file for reading only, creating and writing nothing; other stores ignore it.
    """
    url = url or os.environ.get("RESUME_STORE") or DEFAULT_STORE_URL
    scheme = urlsplit(url).scheme.lower()
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in _OPENERS)
        raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r} (known: {known})")
    for name, (env, parse) in _ENV_OPTIONS.items():
        if name not in options and os.environ.get(env):
            if name == "namespace" and scheme == "memory":
                continue
            options[name] = parse(os.environ[env])
    if "ttl" in options:
        options["ttl"] = validate_ttl(options["ttl"])
    if read_only:
        options["read_only"] = True
    return opener(url, options)
