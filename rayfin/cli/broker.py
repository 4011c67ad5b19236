"""``rayfin broker``: the embedded Kafka-compatible broker (tansu)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from rayfin.cli.console import console, run_guarded

if TYPE_CHECKING:
    from rayfin.stream.broker import EmbeddedBroker

app = typer.Typer(help="Run the embedded Kafka-compatible broker (tansu).", no_args_is_help=True)

_STYLE = {"running": "green", "stopped": "yellow", "stale": "red", "unresponsive": "red"}


def _broker(
    host: str | None = None, port: int | None = None, advertised_host: str | None = None
) -> EmbeddedBroker:
    from rayfin.config import get_settings
    from rayfin.stream.broker import EmbeddedBroker

    settings = get_settings().broker
    given = {"host": host, "port": port, "advertised_host": advertised_host}
    overrides = {k: v for k, v in given.items() if v is not None}
    return EmbeddedBroker.from_settings(settings.model_copy(update=overrides))


@app.command()
def start(
    port: Annotated[
        int | None, typer.Option(help="Port (default 9092, RAYFIN_BROKER__PORT).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    advertised_host: Annotated[
        str | None,
        typer.Option(
            help="Address clients on other machines reach it at (with --host 0.0.0.0); "
            "default: the host, RAYFIN_BROKER__ADVERTISED_HOST."
        ),
    ] = None,
) -> None:
    """Start the broker in the background and wait until it answers Kafka requests."""
    broker = _broker(host, port, advertised_host)
    status = run_guarded(broker.start)
    console.print(
        f"[green]broker running[/green] on {status.address} (pid {status.pid}); "
        f"log: {status.log_file}"
    )


@app.command()
def stop() -> None:
    """Stop the broker started by ``rayfin broker start``."""
    broker = _broker()
    if run_guarded(broker.stop):
        console.print("broker stopped")
    else:
        console.print("no broker was running")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Say whether the broker runs and answers.

    Exit status, as with ``systemctl status``: 0 running, 3 stopped, 1 stale or unresponsive.
    """
    state = run_guarded(_broker().status)
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "state": state.state,
                    "address": state.address,
                    "pid": state.pid,
                    "log_file": str(state.log_file),
                    "detail": state.detail,
                }
            )
        )
    else:
        style = _STYLE.get(state.state, "white")
        pid = f" pid {state.pid}" if state.pid else ""
        console.print(
            f"[{style}]{state.state}[/{style}] {state.address}{pid}: {state.detail}",
            highlight=False,
        )
    if not state.running:
        raise typer.Exit(1 if state.state != "stopped" else 3)
