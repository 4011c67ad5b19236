"""Backtests on real ES ticks through the live trading path: deterministic, recorded in
the ledger exactly once, with metrics that follow from the trades."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.features import online_features
from rayfin.trading.backtest import backtest
from rayfin.trading.engine import TradingConfig
from rayfin.trading.labels import LabelSpec
from rayfin.trading.ledger import Ledger
from rayfin.trading.registry import ModelRegistry
from rayfin.trading.risk import RiskLimits
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig
from rayfin.trading.training import SearchSpace, train_model

pytestmark = pytest.mark.integration

TRAIN_ROWS, TEST_ROWS = 30_000, 8_000
# A low bar to act, so that a weak model still trades and every part of the path runs
# (on these ticks no model is often sure: P(up) or P(down) rarely passes 0.55).
CONFIG = TradingConfig(
    strategy=StrategyConfig(threshold=0.501, max_quantity=2, scale_by_confidence=True),
    limits=RiskLimits(stop_loss=2.0, take_profit=3.0, max_orders=5),
)


@pytest.fixture(scope="module")
def features() -> pd.DataFrame:
    return online_features(es_ticks(TRAIN_ROWS + TEST_ROWS))


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def model(ray_local: None, features: pd.DataFrame, registry_root: Path) -> Model:
    registry = ModelRegistry(registry_root)
    # Large leaves, a fast rate and a long horizon: a model sure enough to act on.
    search = SearchSpace(
        grid={"num_leaves": (63,)}, fixed={"min_data_in_leaf": 20, "learning_rate": 0.3}
    )
    version = train_model(
        features.iloc[:TRAIN_ROWS],
        registry=registry,
        search=search,
        label_spec=LabelSpec(horizon_ticks=1_000, threshold=0.25),
        max_rounds=60,
        early_stopping_rounds=60,
        seed=3,
    )
    registry.promote("market", version.version)
    return registry.load("market")


def test_a_backtest_is_deterministic_and_trades(model: Model, features: pd.DataFrame) -> None:
    held_out = features.iloc[TRAIN_ROWS:]
    first = backtest(held_out, model=model, config=CONFIG)
    second = backtest(held_out, model=model, config=CONFIG)
    assert first.metrics["fills"] > 0, first.outcomes
    pd.testing.assert_frame_equal(first.trades, second.trades)
    pd.testing.assert_frame_equal(first.equity, second.equity)
    assert first.metrics == pytest.approx(second.metrics, nan_ok=True)
    m = first.metrics
    assert m["net_pnl"] == pytest.approx(m["final_equity"] - CONFIG.initial_cash)
    assert m["fees"] == pytest.approx(first.trades["fee"].sum())
    assert 0 <= m["max_drawdown"] < 1
    assert math.isnan(m["hit_rate"]) or 0 <= m["hit_rate"] <= 1
    assert m["contracts_traded"] == first.trades["quantity"].sum()


def test_raw_ticks_and_features_backtest_alike(model: Model) -> None:
    """From raw ticks the backtest computes the features with the live engine."""
    raw = es_ticks(TRAIN_ROWS + 3_000).iloc[TRAIN_ROWS:]
    from_raw = backtest(raw, model=model, config=CONFIG)
    from_features = backtest(online_features(raw), model=model, config=CONFIG)
    pd.testing.assert_frame_equal(from_raw.trades, from_features.trades)


def test_the_ledger_holds_each_trade_once_and_agrees_on_pnl(
    model: Model, features: pd.DataFrame, tmp_path: Path
) -> None:
    held_out = features.iloc[TRAIN_ROWS:]
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        result = backtest(held_out, model=model, config=CONFIG, ledger=ledger)
        again = backtest(held_out, model=model, config=CONFIG, ledger=ledger)  # a replay
        fills = ledger.fills()
        decisions = ledger.decisions(limit=100_000)
        last = held_out["price"].iloc[-1]
        pnl = ledger.pnl({"ES": float(last)}, initial_cash=CONFIG.initial_cash)
    assert len(fills) == len(result.trades) == len(again.trades)
    assert sorted(fills["order_id"]) == sorted(result.trades["order_id"])
    assert len(decisions) == sum(
        n
        for reason, n in result.outcomes.items()
        if reason not in ("below_threshold", "same_direction")
    )
    assert pnl.summary.realized_pnl == pytest.approx(result.metrics["realized_pnl"])
    assert pnl.summary.unrealized_pnl == pytest.approx(result.metrics["unrealized_pnl"])


def test_plot_writes_a_png(model: Model, features: pd.DataFrame, tmp_path: Path) -> None:
    result = backtest(features.iloc[TRAIN_ROWS : TRAIN_ROWS + 3_000], model=model, config=CONFIG)
    path = result.plot(tmp_path / "bt.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_bad_input_is_refused(model: Model) -> None:
    from rayfin.errors import TradingError

    with pytest.raises(TradingError, match="batch_rows"):
        backtest(es_ticks(10), model=model, batch_rows=0)
    empty = es_ticks(10).iloc[:0]
    with pytest.raises((TradingError, ValueError)):
        backtest(empty, model=model)


def test_rayfin_backtest_from_the_command_line(
    model: Model, registry_root: Path, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from rayfin.cli import app

    args = ["backtest", "--rows", f"{TRAIN_ROWS}:{TRAIN_ROWS + 4_000}", "--registry"]
    args += [str(registry_root), "--threshold", "0.501", "--json", "--plot"]
    args += [str(tmp_path / "bt.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ticks = es_ticks(TRAIN_ROWS + 4_000).iloc[TRAIN_ROWS:]
    config = TradingConfig(strategy=StrategyConfig(threshold=0.501))
    expected = backtest(ticks, model=model, config=config).to_dict()
    assert report == json.loads(json.dumps(expected))
    assert (tmp_path / "bt.png").stat().st_size > 0
    missing = CliRunner().invoke(app, ["backtest", "--registry", str(tmp_path), "--json"])
    assert missing.exit_code != 0
    assert "market" in missing.output
