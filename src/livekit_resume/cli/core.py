"""The command line's frame: the typer app, its global options (before or after the
command), opening the store, one-line errors and stable exit codes. The commands live in
`read` and `write`; `app` puts them together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
import typer
import typer.core

from .. import redact
from ..errors import (
    ResumeError,
    SnapshotCorrupt,
)
from ..settings import DEFAULT_STORE_URL, Settings
from ..stores.base import Store, validate_key, validate_namespace
from ..stores.url import check_scheme, open_store
from . import render
from .snapshots import (
    PROG,
)

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "app"]

# Exit codes, stable for scripts (docs/cli.md). A usage error is click's own 2.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# An operator's command against a Redis that does not answer gives up after one retry of
# a 2 s wait, about 4 s a call, where a worker's store waits 5 s and retries three times
# (about 21 s) to ride out a failover. A command makes a few calls: the short budget
# keeps it near a few seconds rather than the better part of a minute.
CLI_SOCKET_TIMEOUT = 2.0
CLI_RETRIES = 1
_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+sentinel", "redis+cluster"})

# The root's options, accepted anywhere on the line: moved before the command.
_GLOBAL_FLAGS = frozenset({"--json"})
_GLOBAL_VALUED = frozenset({"--store", "--namespace"})


def hoist_globals(args: Sequence[str], takes_value: Collection[str] = ()) -> list[str]:
    """``args`` with every global option (and its value) moved to the front, so that
    ``ls --store URL`` reads as ``--store URL ls``; nothing after ``--`` moves, nor the
    value of an option in ``takes_value`` (``--after --json`` pages after ``--json``)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in _GLOBAL_FLAGS or (arg.split("=", 1)[0] in _GLOBAL_VALUED and "=" in arg):
            front.append(arg)
        elif arg in _GLOBAL_VALUED and i + 1 < len(args):
            front += args[i : i + 2]
            i += 1
        elif arg in takes_value:
            rest += args[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _wants_json(args: Sequence[str]) -> bool:
    """Whether ``--json`` is on the line (before any ``--``)."""
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


class _Group(typer.core.TyperGroup):
    """The root command: global options before or after the command; with ``--json``, a
    usage error is a JSON object on stderr too (still exit 2)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_globals(args, self._valued_options()))

    def _valued_options(self) -> frozenset[str]:
        """The commands' options that take a value, by every name they answer to (by
        duck type: typer 0.29 carries a click of its own)."""
        return frozenset(
            name
            for command in self.commands.values()
            for param in command.params
            if param.param_type_name == "option"
            and not getattr(param, "is_flag", True)
            and not getattr(param, "count", True)
            for name in param.opts
        )

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        as_json = _wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except typer.TyperException as e:
            _usage_error(e, as_json=as_json)
        ctx.meta[_JSON_META] = as_json
        return ctx

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as e:
            _usage_error(e, as_json=bool(ctx.meta.get(_JSON_META)))
        except OSError as e:
            # what is printed could not be written (a pipe whose reader left, a full
            # disk): one line on stderr, not a traceback, and nothing more for stdout
            _drop_stdout()
            if isinstance(e, BrokenPipeError):
                raise typer.Exit(EXIT_ERROR) from None
            _fail(e, as_json=bool(ctx.meta.get(_JSON_META)))


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush of what it
    still holds does not fail again on the way out."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


_JSON_META = "livekit_resume.json"


def _usage_error(exc: typer.TyperException, *, as_json: bool) -> NoReturn:
    """A usage error (click's, exit 2): as JSON when asked, else click shows it."""
    if not as_json:
        raise exc
    kind = type(exc).__name__
    click.echo(json.dumps({"error": kind, "message": exc.format_message()}), err=True)
    raise typer.Exit(getattr(exc, "exit_code", EXIT_USAGE))


app = typer.Typer(
    name=PROG,
    cls=_Group,
    help="Inspect, export, import, diff, revert and demo resumable LiveKit agent sessions."
    "\n\n--store, --namespace and --json work before or after the command."
    " Exit codes: 0 ok, 1 error, 2 usage (docs/cli.md).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

# Parameters several commands share.
_KeyArg = Annotated[str, typer.Argument(metavar="KEY", help="Session key.")]
# A version is a positive 64-bit integer in every store (SQLite's INTEGER): a number
# outside is a usage error, never a traceback from the store.
MAX_VERSION = 2**63 - 1


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser of a whole number from ``low`` to ``high``, written in ASCII digits
    only: Python's ``int()`` also reads ``1_0`` as 10, ``+3``, `` 3 `` and other
    scripts' digits, so a typo named another version."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()):
            raise typer.BadParameter(f"{text!r} is not a whole number (digits 0-9 only)")
        value = int(text)
        if value < low:
            raise typer.BadParameter(f"{value} is less than {low}")
        if high is not None and value > high:
            raise typer.BadParameter(f"{value} is more than {high}")
        return value

    return parse


_VersionOpt = Annotated[
    int | None,
    typer.Option(
        "--version",
        "-v",
        metavar="N",
        parser=whole(1, MAX_VERSION),
        help="A retained version (default: latest)",
    ),
]
_TakeoverOpt = Annotated[
    bool, typer.Option("--takeover", help="Take the lease over from a live worker.")
]


@dataclass(frozen=True)
class _Options:
    store_url: str
    store_explicit: bool
    json: bool
    namespace: str | None = None


def _opts(ctx: typer.Context) -> _Options:
    obj = ctx.find_root().obj
    assert isinstance(obj, _Options)
    return obj


class _SaidOnce(logging.Filter):
    """One command says each warning once: it may open its store more than once (``rm``
    reads it read-only first), and each store warns of the server's settings."""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        said = record.getMessage()
        if said in self._said:
            return False
        self._said.add(said)
        return True


@app.callback()
def _root(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help=f"Store URL (default: $RESUME_STORE, else {DEFAULT_STORE_URL})",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables (for scripts).")
    ] = False,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            metavar="NS",
            help="Namespace of the store (default: $RESUME_NAMESPACE)",
            show_default=False,
        ),
    ] = None,
) -> None:
    for check, value, flag in (
        (check_scheme, store, "--store"),
        (validate_namespace, namespace, "--namespace"),
    ):
        try:
            if value is not None:
                check(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=f"'{flag}'") from None
    said_once, logger = _SaidOnce(), logging.getLogger("livekit_resume")
    logger.addFilter(said_once)
    ctx.call_on_close(lambda: logger.removeFilter(said_once))
    ctx.obj = _Options(
        store_url=store or Settings.only("store").store,
        store_explicit=store is not None,
        json=as_json,
        namespace=namespace,
    )


# ------------------------------------------------------------------------- helpers


def _fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    render.error_line(exc, as_json=as_json)
    raise typer.Exit(EXIT_ERROR)


def _run(
    ctx: typer.Context,
    fn: Callable[[Store], Awaitable[T]],
    *,
    read_only: bool,
    session: str | None = None,
) -> T:
    """Open the store, run ``fn`` on one event loop, close the store; typed errors exit 1.
    ``read_only``: a command that only reads never creates or writes a file.
    ``session``: the key a writing command acts on, looked up read-only first, so that
    a mistyped SQLite path is an error rather than a new empty file."""
    opts = _opts(ctx)

    async def go() -> T:
        if session is not None and not read_only:
            probe = _open(opts.store_url, read_only=True, namespace=opts.namespace)
            try:
                if getattr(probe, "read_only", False):  # a file opened without creating it
                    with contextlib.suppress(SnapshotCorrupt):  # it exists: the command says
                        await probe.info(session)
            finally:
                await probe.aclose()
        store = _open(opts.store_url, read_only=read_only, namespace=opts.namespace)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(go())
    except (ResumeError, ValueError, OSError) as e:
        _fail(e, as_json=opts.json)


def _open(url: str, *, read_only: bool, namespace: str | None) -> Store:
    """The store ``url`` names; a URL or a setting (``RESUME_TTL``…) it cannot be opened
    with is a usage error (each message names which)."""
    options: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
    if urlsplit(url).scheme.lower() in _REDIS_SCHEMES:
        options.update(socket_timeout=CLI_SOCKET_TIMEOUT, retries=CLI_RETRIES)
    try:
        if check_scheme(url) == "memory":
            raise ValueError(
                f"{redact.url(url)!r} is a store inside one process: the command line "
                "cannot see a worker's; use sqlite:///… or redis://…"
            )
        return open_store(url, read_only=read_only, **options)
    except ImportError as e:
        raise ValueError(f"the store for {redact.url(url)!r} is not available here: {e}") from e
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _done(opts: _Options, data: Any, text: str) -> None:
    """What a command that wrote something says: ``data`` with --json, else ``text``."""
    if opts.json:
        render.print_json(data)
    else:
        render.console().print(redact.printable(text))


def _key(key: str) -> str:
    try:
        return validate_key(key)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
