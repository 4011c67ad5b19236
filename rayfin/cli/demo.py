"""``rayfin demo``: the main job on embedded defaults."""

from __future__ import annotations

from typing import Annotated

import typer

from rayfin.cli.console import console, run_guarded


def demo(
    ticks: Annotated[
        int, typer.Option(min=1, max=500_000, help="How many real ES ticks to replay.")
    ] = 100_000,
) -> None:
    """Run the end-to-end slice: broker, Ray, ES ticks through Kafka to bars, SmolLM2."""
    from rayfin.demo import run_demo

    run_guarded(run_demo, ticks, console=console)
