"""The names of a namespace's keys (the layout is in the package docstring)."""

from __future__ import annotations

import hashlib

__all__ = ["KeyNames", "glob_escape"]


def _tag(key: str) -> str:
    """The key as a hash tag body: no brace may end (or empty) the tag early."""
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class KeyNames:
    """Key names of one namespace: every key of a session shares the hash tag ``{key}``."""

    def __init__(self, namespace: str, database: int = 0) -> None:
        self.namespace = namespace
        self.index = f"{namespace}:sessions"
        # Redis pub/sub ignores the database number: the same namespace in another
        # database would hear this one's events
        self._db = f":db{database}" if database else ""
        self.channel = f"{namespace}:events{self._db}"

    def prefix(self, key: str) -> str:
        """What every key of the session starts with."""
        return f"{self.namespace}:{{{_tag(key)}}}:"

    def control(self, key: str) -> str:
        """The session's command channel (stores/redis/control.py): its hash tag, outside
        its prefix, so that the session's own keys never include a command's."""
        return f"{self.namespace}:ctl:{{{_tag(key)}}}"

    def control_channel(self, key: str) -> str:
        """Where the session's commands are published: `control`, and the database."""
        return self.control(key) + self._db

    def head(self, key: str) -> str:
        return self.prefix(key) + "head"

    def is_body(self, key: str, name: str) -> bool:
        """Whether ``name`` is one of the session's version bodies (``v:<n>:b``)."""
        rest = name.removeprefix(self.prefix(key) + "v:")
        return rest != name and rest.endswith(":b") and rest[:-2].isdigit()

    def log(self, key: str, gen: int) -> str:
        return f"{self.prefix(key)}log:{gen}"

    def staged(self, key: str, token: str) -> str:
        """Where a large log element waits for the script that appends it (`records`,
        `STAGED`): the session's hash tag, outside its prefix, so that one left behind
        is never taken for the remains of the session."""
        return f"{self.namespace}:up:{{{_tag(key)}}}:{token}"

    def tombstone(self, key: str) -> str:
        """What a delete of the session leaves (tombstone.lua): named by a SHA-256 of
        the key, never the key itself (`rm` leaves no trace of it), so in a slot of its
        own, and without a brace: no namespace's sessions include it."""
        return f"{self.namespace}:rm:{hashlib.sha256(key.encode()).hexdigest()}"
