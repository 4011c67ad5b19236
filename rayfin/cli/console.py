"""Shared terminal output, and the rule that user errors print without a traceback."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from rayfin.errors import RayfinError

console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(code)


def run_guarded(func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call ``func``; a :class:`RayfinError` or invalid setting becomes a clean exit 1."""
    try:
        return func(*args, **kwargs)
    except RayfinError as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        raise fail(f"invalid configuration:\n{exc}") from None


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM (a service manager's stop) raises KeyboardInterrupt, so
    a long-running command stops the way Ctrl-C stops it: cleanly."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
