"""`RedisURL`: what a Redis store URL says, parsed once into a typed value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

from ... import redact as _redact

__all__ = ["DEFAULT_PORT", "DEFAULT_SENTINEL_PORT", "RedisURL", "redact"]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

Mode = Literal["standalone", "sentinel", "cluster"]

_MODES: dict[str, Mode] = {
    "redis": "standalone",
    "rediss": "standalone",
    "redis+sentinel": "sentinel",
    "redis+cluster": "cluster",
}


@dataclass(frozen=True, slots=True)
class RedisURL:
    """What a Redis store URL says.

    - ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS)
    - ``redis+sentinel://[password@]host[:port][,host[:port]…]/service_name[/db]``
    - ``redis+cluster://[password@]host[:port][,host[:port]…]``

    A lone ``secret@`` is taken as a password (Redis' ``AUTH secret``). Percent-escapes
    in the user and password are decoded. Extra client settings (certificates, …) are
    keyword options of `RedisStore.from_url`, not query parameters.
    """

    mode: Mode
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    service: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        mode = _MODES.get(scheme)
        if mode is None:
            raise ValueError(f"{redact(url)!r} is not a Redis URL (redis://, rediss://, …)")
        if parts.query or parts.fragment:
            raise ValueError(
                f"Redis URL {redact(url)!r} has a query or fragment: pass client settings "
                "as keyword options of open_store() instead"
            )
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        username, password = _credentials(userinfo)
        default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
        hosts = tuple(_host_port(h, default_port, url) for h in hostlist.split(","))
        if mode == "standalone" and len(hosts) != 1:
            raise ValueError(f"Redis URL {redact(url)!r} names several hosts: use one")
        db, service = _database(parts, mode, url)
        return cls(mode, hosts, db, username, password, scheme == "rediss", service)

    def describe(self) -> str:
        """Where the store lives, for messages (never the password)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        if self.mode == "sentinel":
            return f"sentinel {hosts} service {self.service}/{self.db}"
        if self.mode == "cluster":
            return f"cluster {hosts}"
        return f"{'rediss' if self.tls else 'redis'} {hosts}/{self.db}"


def redact(url: str) -> str:
    """The URL without its credentials, for messages (`livekit_resume.redact.url`)."""
    return _redact.url(url)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    """``user:password``, ``:password`` or a lone ``password``, percent-decoded."""
    if not userinfo:
        return None, None
    user, colon, secret = userinfo.partition(":")
    if colon:
        return unquote(user) or None, unquote(secret) or None
    return None, unquote(user)


def _database(parts: SplitResult, mode: Mode, url: str) -> tuple[int, str | None]:
    """The database number, and a Sentinel URL's service name, from the URL's path."""
    path = [p for p in parts.path.split("/") if p]
    db, service = 0, None
    if mode == "sentinel":
        if not path:
            raise ValueError(
                f"Sentinel URL {redact(url)!r} names no service: "
                "redis+sentinel://host:26379/mymaster[/db]"
            )
        service, path = unquote(path[0]), path[1:]
    if len(path) > 1:
        raise ValueError(f"Redis URL {redact(url)!r} has a path beyond the database")
    if path:
        # digits only: int() also takes "-1" (refused by the server at the first
        # command, as an outage), "+1", "1_0" and non-ASCII digits
        if not (path[0].isascii() and path[0].isdigit()):
            raise ValueError(f"Redis URL {redact(url)!r}: database {path[0]!r} is not a number")
        db = int(path[0])
    if mode == "cluster" and db != 0:
        raise ValueError(f"Redis Cluster has only database 0 ({redact(url)!r})")
    return db, service


def _host_port(text: str, default: int, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"Redis URL {redact(url)!r} has an empty host")
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"Redis URL {redact(url)!r}: port {port_text!r} is not a number")
    port = int(port_text) if port_text else default
    if not 0 < port < 65536:
        raise ValueError(f"Redis URL {redact(url)!r}: port {port} is not a TCP port (1-65535)")
    return host, port
