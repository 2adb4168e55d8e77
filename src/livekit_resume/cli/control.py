"""Commands that control a live session from afar (``pause``, ``resume``, ``suspend``):
each goes through the store to the worker that holds the session's lease, which applies
it and answers with its version (see docs/control.md). A refusal (no live owner, no
answer in time, an epoch the session left) is a one-line ``CommandRefused``, exit 1."""

from __future__ import annotations

from typing import Annotated

import typer

from ..remote import DEFAULT_TIMEOUT, MAX_TIMEOUT, Verb, control
from ..stores.base import Store
from .core import _done, _key, _KeyArg, _opts, _run, app, whole

_EpochOpt = Annotated[
    int | None,
    typer.Option(
        "--epoch",
        metavar="N",
        parser=whole(1),
        help="The lease epoch the command is aimed at (default: the current one); "
        "refused if the session was taken over since.",
    ),
]
_TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="S",
        min=0.001,
        max=MAX_TIMEOUT,
        help="Seconds to wait for the owner to answer.",
    ),
]


def _send(ctx: typer.Context, verb: Verb, key: str, epoch: int | None, timeout: float) -> None:
    opts = _opts(ctx)
    key = _key(key)

    async def go(store: Store) -> int:
        remote = control(store)
        send = {"pause": remote.pause, "resume": remote.resume, "suspend": remote.suspend}[verb]
        return await send(key, epoch=epoch, timeout=timeout)

    version = _run(ctx, go, read_only=False, session=key)
    done = {"pause": "paused", "resume": "resumed", "suspend": "suspended"}[verb]
    _done(
        opts,
        {"key": key, "command": verb, "version": version},
        f"{done} {key!r} (version {version})",
    )


def _register(verb: Verb, summary: str) -> None:
    def command(
        ctx: typer.Context,
        key: _KeyArg,
        epoch: _EpochOpt = None,
        timeout: _TimeoutOpt = DEFAULT_TIMEOUT,
    ) -> None:
        _send(ctx, verb, key, epoch, timeout)

    command.__doc__ = summary
    app.command(verb)(command)


_register("pause", "Pause a live session from afar: its worker stops its audio and replies.")
_register("resume", "Resume a session paused in its worker (the worker that holds it).")
_register(
    "suspend",
    "Suspend a live session from afar: final snapshot, lease released, session closed.",
)
