"""Backtests on real ES ticks through the live trading path: deterministic, recorded in
the ledger exactly once, with metrics that follow from the trades."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from market_fixtures import ACTIVE_CONFIG, TRAIN_ROWS

from rayfin.datasets import es_ticks
from rayfin.features import online_features
from rayfin.trading.backtest import backtest
from rayfin.trading.engine import TradingConfig
from rayfin.trading.ledger import Ledger
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig

pytestmark = pytest.mark.integration


def test_a_backtest_is_deterministic_and_trades(
    market_model: Model, market_features: pd.DataFrame
) -> None:
    held_out = market_features.iloc[TRAIN_ROWS:]
    first = backtest(held_out, model=market_model, config=ACTIVE_CONFIG)
    second = backtest(held_out, model=market_model, config=ACTIVE_CONFIG)
    assert first.metrics["fills"] > 0, first.outcomes
    pd.testing.assert_frame_equal(first.trades, second.trades)
    pd.testing.assert_frame_equal(first.equity, second.equity)
    assert first.metrics == pytest.approx(second.metrics, nan_ok=True)
    m = first.metrics
    assert m["net_pnl"] == pytest.approx(m["final_equity"] - ACTIVE_CONFIG.initial_cash)
    assert m["fees"] == pytest.approx(first.trades["fee"].sum())
    assert 0 <= m["max_drawdown"] < 1
    assert math.isnan(m["hit_rate"]) or 0 <= m["hit_rate"] <= 1
    assert m["contracts_traded"] == first.trades["quantity"].sum()


def test_raw_ticks_and_features_backtest_alike(market_model: Model) -> None:
    """From raw ticks the backtest computes the market_features with the live engine."""
    raw = es_ticks(TRAIN_ROWS + 3_000).iloc[TRAIN_ROWS:]
    from_raw = backtest(raw, model=market_model, config=ACTIVE_CONFIG)
    from_features = backtest(online_features(raw), model=market_model, config=ACTIVE_CONFIG)
    pd.testing.assert_frame_equal(from_raw.trades, from_features.trades)


def test_the_ledger_holds_each_trade_once_and_agrees_on_pnl(
    market_model: Model, market_features: pd.DataFrame, tmp_path: Path
) -> None:
    held_out = market_features.iloc[TRAIN_ROWS:]
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        result = backtest(held_out, model=market_model, config=ACTIVE_CONFIG, ledger=ledger)
        again = backtest(
            held_out, model=market_model, config=ACTIVE_CONFIG, ledger=ledger
        )  # a replay
        fills = ledger.fills()
        decisions = ledger.decisions(limit=100_000)
        last = held_out["price"].iloc[-1]
        pnl = ledger.pnl({"ES": float(last)}, initial_cash=ACTIVE_CONFIG.initial_cash)
    assert len(fills) == len(result.trades) == len(again.trades)
    assert sorted(fills["order_id"]) == sorted(result.trades["order_id"])
    assert len(decisions) == sum(
        n
        for reason, n in result.outcomes.items()
        if reason not in ("below_threshold", "same_direction")
    )
    assert pnl.summary.realized_pnl == pytest.approx(result.metrics["realized_pnl"])
    assert pnl.summary.unrealized_pnl == pytest.approx(result.metrics["unrealized_pnl"])


def test_plot_writes_a_png(
    market_model: Model, market_features: pd.DataFrame, tmp_path: Path
) -> None:
    result = backtest(
        market_features.iloc[TRAIN_ROWS : TRAIN_ROWS + 3_000],
        model=market_model,
        config=ACTIVE_CONFIG,
    )
    path = result.plot(tmp_path / "bt.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_bad_input_is_refused(market_model: Model) -> None:
    from rayfin.errors import TradingError

    with pytest.raises(TradingError, match="batch_rows"):
        backtest(es_ticks(10), model=market_model, batch_rows=0)
    empty = es_ticks(10).iloc[:0]
    with pytest.raises((TradingError, ValueError)):
        backtest(empty, model=market_model)


def test_rayfin_backtest_from_the_command_line(
    market_model: Model, market_registry: Path, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from rayfin.cli import app

    args = ["backtest", "--rows", f"{TRAIN_ROWS}:{TRAIN_ROWS + 4_000}", "--registry"]
    args += [str(market_registry), "--threshold", "0.501", "--json", "--plot"]
    args += [str(tmp_path / "bt.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ticks = es_ticks(TRAIN_ROWS + 4_000).iloc[TRAIN_ROWS:]
    config = TradingConfig(strategy=StrategyConfig(threshold=0.501))
    expected = backtest(ticks, model=market_model, config=config).to_dict()
    assert report == json.loads(json.dumps(expected))
    assert (tmp_path / "bt.png").stat().st_size > 0
    missing = CliRunner().invoke(app, ["backtest", "--registry", str(tmp_path), "--json"])
    assert missing.exit_code != 0
    assert "market" in missing.output
