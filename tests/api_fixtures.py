"""The HTTP API on Ray Serve, once per test session, over real parts: the session's market
model (trained on real ES ticks) in a registry of its own, a ledger filled by a backtest
of the next ticks through the live trading path, and a two-stage SmolLM2 swarm."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from market_fixtures import ACTIVE_CONFIG, TRAIN_ROWS

from rayfin.config import ApiKey
from rayfin.serve.auth import new_key
from rayfin.stream.broker import free_port
from rayfin.trading.scoring import Model

API_SWARM = "api-test"
API_MAX_NEW_TOKENS = 8
API_MAX_PROMPT_TOKENS = 96
SLOW_RATE = 1.0
"""Requests/s of the ``slow`` key (burst 2): the one tests run out of."""


@dataclass(frozen=True)
class ApiServer:
    """A running API: where it is, its keys, and what it serves."""

    url: str
    read_key: str
    trade_key: str
    slow_key: str
    registry: Path
    ledger_url: str
    model: Model
    features: pd.DataFrame  # engine rows the model has not been trained on


@pytest.fixture(scope="session")
def api_server(
    ray_local: None,
    market_model: Model,
    market_registry: Path,
    market_features: pd.DataFrame,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    from rayfin.llm import launch_swarm
    from rayfin.serve.app import ApiOptions
    from rayfin.serve.deployment import Resources, deploy, undeploy
    from rayfin.serve.llm import LLMOptions
    from rayfin.trading.backtest import backtest
    from rayfin.trading.ledger import Ledger

    root = tmp_path_factory.mktemp("api")
    # A registry of its own: tests promote and upload here without touching the session's.
    registry = root / "models"
    shutil.copytree(market_registry, registry)
    ledger_url = f"sqlite:///{root / 'ledger.db'}"
    held_out = market_features.iloc[TRAIN_ROWS:].reset_index(drop=True)
    with Ledger(ledger_url) as ledger:
        backtest(held_out, model=market_model, config=ACTIVE_CONFIG, ledger=ledger)
    # No logical CPUs held for the session: later tests (Ray Train) need all of them.
    swarm = launch_swarm("smollm2-135m", name=API_SWARM, num_stages=2, num_cpus=0)
    keys = {role: new_key() for role in ("read", "trade", "slow")}
    options = ApiOptions(
        keys=(
            ApiKey(name="reader", role="read", key=keys["read"]),
            ApiKey(name="trader", role="trade", key=keys["trade"]),
            ApiKey(
                name="slow",
                role="read",
                key=keys["slow"],
                rate_limit_per_s=SLOW_RATE,
                rate_limit_burst=2,
            ),
        ),
        ledger_url=ledger_url,
        registry=str(registry),
        threshold=ACTIVE_CONFIG.strategy.threshold,
        model_refresh_s=0.5,
        llm=LLMOptions(
            model="smollm2-135m",
            swarm=API_SWARM,
            max_prompt_tokens=API_MAX_PROMPT_TOKENS,
            max_new_tokens=API_MAX_NEW_TOKENS,
        ),
    )
    url = deploy(options, port=free_port(), resources=Resources(ingress_cpus=0, llm_cpus=0))
    try:
        yield ApiServer(
            url=url,
            read_key=keys["read"],
            trade_key=keys["trade"],
            slow_key=keys["slow"],
            registry=registry,
            ledger_url=ledger_url,
            model=market_model,
            features=held_out,
        )
    finally:
        undeploy()
        swarm.shutdown()
