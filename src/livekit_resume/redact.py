"""What may be shown of a secret or of foreign text: store URLs without their
credentials, key material never, and terminal control characters escaped.

Every message, log line, span attribute and line of command-line output that names a
store URL goes through `url`; every string that came from a store, a file or a user
(keys, transcripts, userdata, error messages) goes through `printable` before it
reaches a terminal, so that no escape sequence in it is ever acted on.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlsplit

__all__ = ["HIDDEN", "printable", "secrets", "shell_word", "url"]

# What a hidden value reads as.
HIDDEN = "***"

# Query parameters whose value is a secret (``?password=…``, ``?token=…``).
_SECRET_PARAMS = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)

# Characters a terminal may act on: C0 controls and DEL, C1 controls, and the
# bidirectional overrides and isolates that reorder what is shown (plus the marks); and
# lone surrogates (an argument's bytes that are not UTF-8), which no output can encode.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_CONTROL_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def url(value: str) -> str:
    """``value`` with its password (and a user's name beside it) and any secret query
    parameter replaced by ``***``: ``redis://:pw@host`` → ``redis://***@host``.

    Everything up to the last ``@`` after the scheme is hidden, not only what the URL
    syntax reads as the user part: a password written with an unencoded ``/``, ``?`` or
    ``#`` (``redis://:pa/ss@host``) ends the host part early, and must not show either;
    nor a password in a URL whose ``://`` is missing (``default:pw@host:6379``).
    A query parameter is matched and hidden as it is written (``password=a%2Fb``)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return HIDDEN if "@" in value else value
    shown = value
    scheme, sep, rest = value.partition("://")
    # "sqlite:///a@b" is a path; "redis:///:pw@host", a slash too many, is not
    if sep and "@" in rest and not (rest.startswith("/") and _is_file(scheme)):
        shown = f"{scheme}://{HIDDEN}@{rest.rpartition('@')[2]}"
    elif not sep and "@" in value:  # "user:pw@host", its scheme forgotten or mistyped
        shown = f"{HIDDEN}@{value.rpartition('@')[2]}"
    if parts.query:
        for pair in re.split("[&;]", parts.query):
            name, _, secret = pair.partition("=")
            if secret and _SECRET_PARAMS.search(unquote_plus(name)):
                shown = shown.replace(f"{name}={secret}", f"{name}={HIDDEN}")
    return shown


def _is_file(scheme: str) -> bool:
    return scheme.lower() in ("sqlite", "file")


def secrets(message: str, values: Iterable[str | None]) -> str:
    """``message`` with every one of ``values`` (and each comma-separated part of it,
    and the key material after a ``kid:``) replaced by ``***``."""
    hidden: set[str] = set()
    for value in values:
        if not value:
            continue
        hidden.add(value)
        for part in value.split(","):
            part = part.strip()
            hidden.add(part)
            hidden.add(part.partition(":")[2])
    # longest first: a part never leaves the rest of a longer value showing
    for secret in sorted((s for s in hidden if len(s) >= 4), key=len, reverse=True):
        message = message.replace(secret, HIDDEN)
    return message


def printable(text: object, *, newlines: bool = False) -> str:
    """``text`` with every control character escaped as Python writes it (``\\x1b``,
    ``\\x9b``, ``\\u202e``), so that a terminal shows it instead of acting on it.
    ``newlines=True`` keeps line breaks (a transcript's paragraphs)."""
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return pattern.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# What ANSI-C quoting escapes: its own quote and escape, and what `printable` would.
_ANSI_C = re.compile(r"[\\']|" + _CONTROL.pattern)


def shell_word(text: str) -> str:
    """``text`` as one word a shell reads back as itself, and printable: quoted, or
    where it holds a character `printable` would escape, in ANSI-C quotes with that
    character escaped as bash, zsh and ksh read it (``$'\\u202e'``)."""
    if not _CONTROL.search(text):
        return shlex.quote(text)
    return "$'" + _ANSI_C.sub(_ansi_c_escape, text) + "'"


def _ansi_c_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in "\\'":
        return "\\" + char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        # a byte that was not UTF-8 (surrogateescape): written as that byte, it comes
        # back to Python as this very character
        return f"\\x{code - 0xDC00:02x}"
    # \x above 0x7f is a byte, not a character: a shell writes U+0080 on as \u
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"
