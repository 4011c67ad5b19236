"""A market model trained once per test session on real ES ticks, for the tests that
trade with one (backtests, live trading)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.features import online_features
from rayfin.trading.engine import TradingConfig
from rayfin.trading.labels import LabelSpec
from rayfin.trading.registry import ModelRegistry
from rayfin.trading.risk import RiskLimits
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig
from rayfin.trading.training import SearchSpace, train_model

TRAIN_ROWS, TEST_ROWS = 30_000, 8_000
# A low bar to act, so that a weak model still trades and every part of the path runs
# (on these ticks no model is often sure: P(up) or P(down) rarely passes 0.55).
ACTIVE_CONFIG = TradingConfig(
    strategy=StrategyConfig(threshold=0.501, max_quantity=2, scale_by_confidence=True),
    limits=RiskLimits(stop_loss=2.0, take_profit=3.0, max_orders=5),
)


@pytest.fixture(scope="session")
def market_features() -> pd.DataFrame:
    """Live-engine features of the first ``TRAIN_ROWS + TEST_ROWS`` ES ticks."""
    return online_features(es_ticks(TRAIN_ROWS + TEST_ROWS))


@pytest.fixture(scope="session")
def market_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def market_model(ray_local: None, market_features: pd.DataFrame, market_registry: Path) -> Model:
    """Trained on the first ``TRAIN_ROWS`` ticks and promoted to ``production``."""
    registry = ModelRegistry(market_registry)
    # Large leaves, a fast rate and a long horizon: a model sure enough to act on.
    search = SearchSpace(
        grid={"num_leaves": (63,)}, fixed={"min_data_in_leaf": 20, "learning_rate": 0.3}
    )
    version = train_model(
        market_features.iloc[:TRAIN_ROWS],
        registry=registry,
        search=search,
        label_spec=LabelSpec(horizon_ticks=1_000, threshold=0.25),
        max_rounds=60,
        early_stopping_rounds=60,
        seed=3,
    )
    registry.promote("market", version.version)
    return registry.load("market")
