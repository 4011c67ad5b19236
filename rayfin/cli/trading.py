"""``rayfin train`` and ``rayfin backtest`` on the bundled ES ticks: the SDK's
:func:`~rayfin.trading.training.train_model` and :func:`~rayfin.trading.backtest.backtest`
from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rayfin.cli.console import console, run_guarded

ES_ROWS = 500_000
RowsOption = Annotated[
    str,
    typer.Option(
        "--rows",
        help="Rows of the ES ticks to use, as START:END (Python slice, e.g. 0:400000).",
    ),
]


def _slice(value: str) -> slice:
    try:
        start, _, end = value.partition(":")
        bounds = slice(int(start) if start else None, int(end) if end else None)
    except ValueError:
        raise typer.BadParameter(f"expected START:END, got {value!r}") from None
    rows = range(ES_ROWS)[bounds]
    if len(rows) < 1_000:
        raise typer.BadParameter(f"{value!r} selects {len(rows)} rows; need at least 1,000")
    return bounds


def _ticks(rows: str):  # -> pd.DataFrame
    from rayfin.datasets import es_ticks

    return es_ticks().iloc[_slice(rows)].reset_index(drop=True)


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="NAME[:VERSION|ALIAS] in the registry (default: trading.model, production).",
    ),
]
RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry", help="Registry root, a path or s3:// URI (default: trading.registry)."
    ),
]
ThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.5,
        max=1.0,
        help="Act when P(up) or P(down) reaches this (default: trading.threshold).",
    ),
]
TickSizeOption = Annotated[
    float | None,
    typer.Option(
        "--default-tick-size",
        help="Trade symbols beyond the CME index futures on this tick size, multiplier 1 "
        "(a share): 0.01 for rayfin simulate's market.",
    ),
]


def load_model(model: str | None, registry: str | None):  # -> rayfin.trading.scoring.Model
    """The registered model NAME[:VERSION|ALIAS] (alias ``production`` by default; the
    ``trading.model`` setting when None)."""
    from rayfin.config import get_settings
    from rayfin.trading.registry import ModelRegistry

    name, _, ref = (model or get_settings().trading.model).partition(":")
    store = run_guarded(ModelRegistry, registry)
    return run_guarded(store.load, name, ref or "production")


def trading_config(
    threshold: float | None, default_tick_size: float | None = None
):  # -> rayfin.trading.engine.TradingConfig
    """The default trading configuration with the strategy's ``threshold`` (the
    ``trading.threshold`` setting when None), and any symbol accepted on
    ``default_tick_size`` if given."""
    from rayfin.config import get_settings
    from rayfin.trading.engine import TradingConfig
    from rayfin.trading.orders import Instruments
    from rayfin.trading.strategy import StrategyConfig

    return TradingConfig(
        strategy=run_guarded(
            StrategyConfig,
            threshold=get_settings().trading.threshold if threshold is None else threshold,
        ),
        instruments=run_guarded(Instruments, default_tick_size=default_tick_size),
    )


def train(
    rows: RowsOption = "0:400000",
    name: Annotated[
        str | None, typer.Option(help="Model name in the registry (default: trading.model).")
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="Point the 'production' alias at the new version.")
    ] = True,
    registry: RegistryOption = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a LightGBM up/down/flat model on the ES ticks (tuned with purged CV on Ray)."""
    from rayfin.cluster import ensure_ray
    from rayfin.config import get_settings
    from rayfin.trading.registry import ModelRegistry
    from rayfin.trading.training import train_model

    name = name or run_guarded(get_settings).trading.model
    ticks = _ticks(rows)
    store = run_guarded(ModelRegistry, registry)
    run_guarded(ensure_ray)
    with console.status(f"training on {len(ticks):,} ticks (features, search, refit)"):
        version = run_guarded(train_model, ticks, name=name, registry=store, seed=seed)
    if promote:
        run_guarded(store.promote, name, version.version)
    metrics = {k: v for k, v in version.metrics.items() if isinstance(v, int | float)}
    console.print(f"registered {name} v{version.version}" + (" (production)" if promote else ""))
    console.print_json(json.dumps(metrics))


def backtest(
    rows: RowsOption = "400000:500000",
    model: ModelOption = None,
    registry: RegistryOption = None,
    threshold: ThresholdOption = None,
    default_tick_size: TickSizeOption = None,
    plot: Annotated[Path | None, typer.Option(help="Write the equity plot (PNG) here.")] = None,
    ledger: Annotated[
        str | None, typer.Option(help="Record into this database URL (SQLAlchemy).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Replay ES ticks through the live trading path with a registered model."""
    from rayfin.trading.backtest import backtest as run_backtest
    from rayfin.trading.ledger import Ledger

    loaded = load_model(model, registry)
    config = trading_config(threshold, default_tick_size)
    ticks = _ticks(rows)
    book = run_guarded(Ledger, ledger) if ledger else None
    try:
        if as_json:
            result = run_guarded(run_backtest, ticks, model=loaded, config=config, ledger=book)
        else:
            with console.status(f"backtesting {loaded!r} on {len(ticks):,} ticks"):
                result = run_guarded(run_backtest, ticks, model=loaded, config=config, ledger=book)
    finally:
        if book is not None:
            book.close()
    if plot is not None:
        result.plot(plot)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table("metric", "value", title=f"backtest of {loaded!r}")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:,.4f}" if abs(value) < 10 else f"{value:,.0f}")
    console.print(table)
    console.print(
        "decisions: "
        + ", ".join(f"{reason} {n:,}" for reason, n in sorted(result.outcomes.items()))
    )
    if plot is not None:
        console.print(f"wrote {plot}")
