"""The ``rayfin`` command line: one typer app, one module per command group."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from rayfin import __version__
from rayfin.cli import broker, data, demo, llm, market, models, serve, stream, trading
from rayfin.cli.console import console, run_guarded
from rayfin.config import CONFIG_ENV_VAR

app = typer.Typer(
    name="rayfin",
    help="A distributed LLM and a real-time market ML pipeline on one Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(broker.app, name="broker")
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(llm.app, name="llm")
app.add_typer(serve.app, name="serve")
app.command("demo")(demo.demo)
app.add_typer(market.replay_app, name="replay")
app.command("simulate")(market.simulate)
app.command("consume")(stream.consume)
app.command("train")(trading.train)
app.command("backtest")(trading.backtest)

config_app = typer.Typer(help="Inspect the configuration in force.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        console.print(f"rayfin {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help=f"YAML settings file (same as {CONFIG_ENV_VAR}).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    # Through the environment, so Ray workers started from here read the same file.
    if config is not None:
        os.environ[CONFIG_ENV_VAR] = str(config.resolve())
    from rayfin.config import reload_settings

    run_guarded(reload_settings)


@config_app.command("show")
def config_show() -> None:
    """Print the settings in force, after env vars and the YAML file are applied."""
    from rayfin.config import config_file_path, get_settings

    settings = run_guarded(get_settings)
    source = run_guarded(config_file_path)
    console.print(f"[dim]# file: {source or 'none'}; env prefix RAYFIN_[/dim]")
    console.print_json(json.dumps(settings.public_dict()))


def main() -> None:
    """Console-script entry point."""
    app()
