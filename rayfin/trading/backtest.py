"""Backtests: history replayed through the live code path, with metrics and a plot.

:func:`backtest` computes features with the live engine (:func:`rayfin.features.online_features`),
then feeds them to a :class:`~rayfin.trading.engine.Trader` in micro-batches, exactly as
the stream consumer hands them over live: the same scoring, strategy, risk manager,
simulated broker and ledger. So for the same ticks, model and configuration, a backtest
makes the decisions live trading makes, and two runs make the same ones. With ``news``
(scored stories), each tick's ``sentiment`` input is the live trader's decayed news
sentiment (:func:`rayfin.features.sentiment.sentiment_series`), as of the tick's time.

Metrics (:class:`BacktestResult.metrics`):

* ``net_pnl``: realized plus unrealized P&L at the last tick, after fees and slippage;
* ``sharpe``: of one-minute equity returns (event time), annualized with
  :data:`MINUTES_PER_YEAR` (252 days of the CME's 23-hour session); NaN with fewer than
  two minutes;
* ``max_drawdown``: the largest peak-to-trough fall of the equity curve, as a fraction;
* ``hit_rate``: the share of closing fills (those that realize P&L) that made money before
  fees;
* ``turnover``: contracts traded, and notional traded over initial cash.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rayfin.errors import TradingError
from rayfin.features import FeatureSpec, online_features
from rayfin.features.sentiment import DEFAULT_HALF_LIFE_S, sentiment_series
from rayfin.trading.engine import Trader, TradingConfig, TradingEngine
from rayfin.trading.inputs import SENTIMENT
from rayfin.trading.ledger import DECISION_COLUMNS, decision_row, fill_row
from rayfin.trading.plots import plot_trading, times

if TYPE_CHECKING:
    from rayfin.trading.ledger import Ledger
    from rayfin.trading.scoring import Model

MINUTES_PER_YEAR = 252 * 23 * 60
TRADE_COLUMNS = ["ts", "symbol", "side", "quantity", "price", "fee", "order_id"]
DEFAULT_BATCH_ROWS = 1_000
"""Rows per micro-batch: what a live consumer typically hands over at 20k ticks/s."""


@dataclass
class BacktestResult:
    """What a backtest produced: summary metrics, every fill, the equity curve, the
    decision outcomes (reason → count) and the decisions a ledger would store (columns of
    its ``decisions`` table, ``sentiment`` included)."""

    metrics: dict[str, float]
    trades: pd.DataFrame = field(repr=False)
    equity: pd.DataFrame = field(repr=False)
    prices: pd.DataFrame = field(repr=False)
    outcomes: dict[str, int] = field(default_factory=dict)
    decisions: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: price with the fills on top, the equity curve below."""
        m = self.metrics
        title = (
            f"net P&L {m['net_pnl']:,.0f}   Sharpe {m['sharpe']:.2f}   "
            f"max drawdown {m['max_drawdown']:.2%}   trades {int(m['fills'])}"
        )
        return plot_trading(path, self.prices, self.trades, self.equity, title)

    def to_dict(self) -> dict[str, Any]:
        """Metrics and outcomes, JSON-safe (NaN as None)."""
        metrics = {k: None if math.isnan(v) else v for k, v in self.metrics.items()}
        return {"metrics": metrics, "outcomes": self.outcomes}


def backtest(
    ticks: pd.DataFrame,
    *,
    model: Model,
    config: TradingConfig | None = None,
    ledger: Ledger | None = None,
    feature_spec: FeatureSpec | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    topic: str = "ticks",
    news: pd.DataFrame | None = None,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
) -> BacktestResult:
    """Replay ``ticks`` (raw ticks as :func:`~rayfin.features.online_features` takes them,
    or its output) through the live trading path; see the module docstring.

    ``ledger`` receives every batch (idempotently, keyed by the tick's position in the
    input, as partition 0 of ``topic``); without one, nothing is written. ``news``
    (``ts``, ``symbols``, ``sentiment``: scored stories, as the archive's ``news`` table
    holds them) sets the ``sentiment`` input, decayed with ``half_life_s``.
    """
    if batch_rows < 1:
        raise TradingError(f"batch_rows must be >= 1, got {batch_rows!r}")
    features = ticks if _is_feature_frame(ticks) else online_features(ticks, feature_spec)
    if features.empty:
        raise TradingError("backtest: no ticks to replay")
    if (features["partition"] < 0).any():
        # Rows computed offline have no source partition (-1); their offset is their
        # position in the input, which keys the ledger as partition 0 of ``topic``.
        features = features.assign(partition=features["partition"].clip(lower=0))
    if news is not None:
        features = features.assign(**{SENTIMENT: sentiment_series(features, news, half_life_s)})
    engine = TradingEngine(config, ledger)
    trader = Trader(model, engine, topic=topic)
    fills, decisions = [], []
    for rows in micro_batches(features, batch_rows):
        _, batch = trader.on_features(rows)
        fills.extend(batch.fills)
        decisions.extend(batch.decisions)
    trades = pd.DataFrame([fill_row(f) for f in fills], columns=TRADE_COLUMNS)
    equity = pd.DataFrame(engine.portfolio.equity_curve, columns=["ts", "equity"])
    prices = features[["ts", "symbol", "price"]].reset_index(drop=True)
    metrics = _metrics(engine, trades, equity, fills)
    decided = pd.DataFrame([decision_row(d) for d in decisions], columns=DECISION_COLUMNS)
    return BacktestResult(metrics, trades, equity, prices, dict(engine.outcomes), decided)


def micro_batches(features: pd.DataFrame, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """``features`` in batches of ``rows`` as column arrays, as the stream hands them to
    the live trader (slices of one array per column: no copy, no DataFrame per batch)."""
    columns = {str(name): features[name].to_numpy() for name in features.columns}
    for start in range(0, len(features), rows):
        yield {name: values[start : start + rows] for name, values in columns.items()}


def _is_feature_frame(frame: pd.DataFrame) -> bool:
    return {"partition", "offset", "seq"} <= set(frame.columns)


def _metrics(
    engine: TradingEngine, trades: pd.DataFrame, equity: pd.DataFrame, fills: list[Any]
) -> dict[str, float]:
    portfolio = engine.portfolio
    summary = portfolio.summary()
    curve = equity["equity"].to_numpy(np.float64)
    peaks = np.maximum.accumulate(curve) if len(curve) else curve
    max_drawdown = float(((peaks - curve) / peaks).max()) if len(curve) else 0.0
    instruments = engine.config.instruments
    notional = sum(instruments[f.symbol].notional(f.quantity, f.price) for f in fills)
    return {
        "net_pnl": summary.realized_pnl + summary.unrealized_pnl,
        "realized_pnl": summary.realized_pnl,
        "unrealized_pnl": summary.unrealized_pnl,
        "fees": summary.fees,
        "final_equity": summary.equity,
        "sharpe": _sharpe(equity),
        "max_drawdown": max_drawdown,
        "hit_rate": _hit_rate(fills, engine),
        "fills": float(len(trades)),
        "contracts_traded": float(trades["quantity"].sum()) if len(trades) else 0.0,
        "turnover": notional / portfolio.initial_cash,
    }


def _sharpe(equity: pd.DataFrame) -> float:
    if equity.empty:
        return math.nan
    series = pd.Series(equity["equity"].to_numpy(), index=times(equity["ts"]))
    minutes = series.resample("1min").last().dropna()
    returns = minutes.pct_change().dropna()
    if len(returns) < 2 or returns.std(ddof=1) == 0:
        return math.nan
    return float(returns.mean() / returns.std(ddof=1) * math.sqrt(MINUTES_PER_YEAR))


def _hit_rate(fills: list[Any], engine: TradingEngine) -> float:
    """Replays the fills to find each closing fill's realized P&L."""
    from rayfin.trading.pnl import Portfolio

    replay = Portfolio(engine.portfolio.initial_cash, engine.config.instruments)
    wins = closes = 0
    for fill in fills:
        before = replay.realized_pnl + replay.fees  # realized before fees
        position = replay.quantity(fill.symbol)
        replay.apply(fill)
        if position and np.sign(position) != np.sign(int(fill.side)):
            closes += 1
            wins += (replay.realized_pnl + replay.fees) - before > 0
    return wins / closes if closes else math.nan
