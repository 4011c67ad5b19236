"""``rayfin demo``: the main job on embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rayfin.cli.console import console, run_guarded
from rayfin.demo import DemoOptions

_DEFAULTS = DemoOptions()


def demo(
    ticks: Annotated[
        int, typer.Option(min=1_000, max=500_000, help="Real ES ticks to replay.")
    ] = _DEFAULTS.ticks,
    rate: Annotated[
        float, typer.Option(min=0.0, help="Messages/s sent to Kafka; 0 for as fast as it takes.")
    ] = _DEFAULTS.rate or 0.0,
    serve_forever: Annotated[
        bool, typer.Option(help="Keep the API and dashboard up after the replay, until Ctrl-C.")
    ] = False,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="API port (default: serve.port, or a free one)."),
    ] = None,
    train_rows: Annotated[
        int,
        typer.Option(min=10_000, max=400_000, help="ES rows a first model trains on, if needed."),
    ] = _DEFAULTS.train_rows,
    first_row: Annotated[
        int, typer.Option(min=0, max=499_000, help="The first ES row replayed.")
    ] = _DEFAULTS.first_row,
    news_every: Annotated[
        float, typer.Option(min=1.0, help="Market seconds between simulated headlines (mean).")
    ] = _DEFAULTS.news_every_s,
    stages: Annotated[
        int, typer.Option(min=1, max=30, help="Block servers of the SmolLM2 swarm.")
    ] = _DEFAULTS.stages,
    threshold: Annotated[
        float, typer.Option(min=0.501, max=1.0, help="The strategy's probability threshold.")
    ] = _DEFAULTS.threshold,
    out: Annotated[
        Path | None, typer.Option(help="Ledger, archive and plot folder [<state dir>/demo].")
    ] = None,
) -> None:
    """Run the whole system on embedded defaults: broker, Ray, the SmolLM2 swarm, real ES
    ticks and simulated news through Kafka into features, LLM sentiment, LightGBM, the
    strategy, risk and the ledger, with the HTTP API and its dashboard."""
    from rayfin.demo import run_demo

    options = DemoOptions(
        ticks=ticks,
        first_row=first_row,
        train_rows=train_rows,
        rate=rate or None,
        news_every_s=news_every,
        stages=stages,
        threshold=threshold,
        serve_forever=serve_forever,
        port=port,
        out=out,
    )
    run_guarded(run_demo, options, console=console)
