"""What scoring and deciding add per live micro-batch, against the feature work already
done for it, all in one run. Prints one JSON object.

On real ES ticks, in micro-batches of ``--batch`` rows (1,000 by default) handed over as
the stream hands them to the trader (column arrays), with models trained here on the first
``--train`` ticks:

- baseline: the live feature engine's time per batch (what the consumer does anyway);
- the LightGBM booster alone on a ready float matrix (the floor of scoring);
- ``Model.predict_proba`` on engine feature rows (inputs built, checked, scored);
- scoring plus deciding, :meth:`Trader.on_features` (score, strategy, risk, simulated
  broker, portfolio; no database), twice: with the default configuration (threshold 0.7,
  which this model never reaches: every tick takes the engine's idle fast path), and with
  a model fitted to be confident plus a threshold of 0.501, so that it trades all the time
  (orders, fills, stops, every tick through the full chain while a position is open);
- the live trader (:class:`~rayfin.trading.live.LiveTrader`): the active case plus the
  SQLite ledger batch and checkpoint written per micro-batch;
- rows/s of batched scoring, and p50/p90/p99 milliseconds per batch of each step.

Goal: scoring and deciding add at most 2 ms at p99 per batch of 1,000 ticks.

    .venv/bin/python benchmarks/scoring.py [--batch 1000] [--batches 200] [--train 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rayfin.datasets import es_ticks
from rayfin.features import TickFeatureEngine, online_features
from rayfin.features.online import tick_frame
from rayfin.trading.backtest import micro_batches
from rayfin.trading.engine import Trader, TradingConfig, TradingEngine
from rayfin.trading.inputs import input_arrays
from rayfin.trading.labels import LabelSpec
from rayfin.trading.ledger import Ledger
from rayfin.trading.live import LiveTrader
from rayfin.trading.registry import ModelRegistry
from rayfin.trading.risk import RiskLimits
from rayfin.trading.strategy import StrategyConfig
from rayfin.trading.training import SearchSpace, train_model


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1e3
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)}


def timed(batches: list[Any], step: Callable[[Any], object]) -> list[float]:
    out = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train", type=int, default=40_000)
    args = parser.parse_args()
    ticks = es_ticks(args.train + args.batch * args.batches)
    features = online_features(ticks)
    train = features.iloc[: args.train]
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        version = train_model(
            train, registry=registry, search=SearchSpace(grid={"num_leaves": (31,)}), max_rounds=200
        )
        model = registry.load("market", version.version)
        # Large leaves, a fast rate and a long horizon: probabilities far from a third.
        confident = train_model(
            train,
            registry=registry,
            search=SearchSpace(
                grid={"num_leaves": (63,)}, fixed={"min_data_in_leaf": 20, "learning_rate": 0.3}
            ),
            label_spec=LabelSpec(horizon_ticks=1_000, threshold=0.25),
            max_rounds=60,
            early_stopping_rounds=60,
            seed=3,
        )
        active_model = registry.load("market", confident.version)
        # As the consumer hands them over: column arrays of one source partition.
        live = features.iloc[args.train :].reset_index(drop=True).assign(partition=0)
        batches = list(micro_batches(live, args.batch))
        raw = tick_frame(ticks.iloc[args.train :])
        raw_batches = [raw.iloc[i : i + args.batch] for i in range(0, len(raw), args.batch)]

        engine_state = TickFeatureEngine()
        feature_times = timed(
            raw_batches,
            lambda b: engine_state.update_arrays(
                "ES",
                b["ts"].to_numpy(),
                b["price"].to_numpy(),
                b["size"].to_numpy(np.float64),
            ),
        )
        matrices = [
            np.column_stack(list(input_arrays(b, only=model.features).values())) for b in batches
        ]
        booster_times = timed(matrices, lambda m: model.booster.predict(m, num_threads=1))
        score_times = timed(batches, model.predict_proba)
        idle = Trader(model, TradingEngine(TradingConfig()))
        idle_times = timed(batches, idle.on_features)
        active_config = TradingConfig(
            strategy=StrategyConfig(threshold=0.501, max_quantity=2, scale_by_confidence=True),
            limits=RiskLimits(stop_loss=2.0, take_profit=3.0, max_orders=5),
        )
        active = Trader(active_model, TradingEngine(active_config))
        active_times = timed(batches, active.on_features)
        with Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}") as ledger:
            trader = LiveTrader(active_model, active_config, ledger)
            live_times = timed(batches, lambda b: trader.on_features("ticks", b))
            fills = len(ledger.fills())

    rows = sum(len(b["ts"]) for b in batches)
    feature_p = percentiles(feature_times)
    idle_p = percentiles(idle_times)
    active_p = percentiles(active_times)
    result = {
        "benchmark": "scoring",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "batch_rows": args.batch,
        "batches": len(batches),
        "models": {
            "default": {"version": version.version, "inputs": len(model.features)},
            "confident": {"version": confident.version, "inputs": len(active_model.features)},
        },
        "ms_per_batch": {
            "baseline_feature_engine": feature_p,
            "booster_predict_only": percentiles(booster_times),
            "score": percentiles(score_times),
            "score_and_decide_default_config": idle_p,
            "score_and_decide_trading": active_p,
            "live_trader_with_sqlite_ledger": percentiles(live_times),
        },
        "scoring_rows_per_s": round(rows / sum(score_times)),
        "score_and_decide_rows_per_s": {
            "default_config": round(rows / sum(idle_times)),
            "trading": round(rows / sum(active_times)),
        },
        "score_and_decide_vs_feature_engine_p50": {
            "default_config": round(idle_p["p50"] / feature_p["p50"], 3),
            "trading": round(active_p["p50"] / feature_p["p50"], 3),
        },
        "decisions": {
            "default_config": dict(idle.engine.outcomes),
            "trading": dict(active.engine.outcomes),
        },
        "fills_trading": fills,
        "goal_p99_ms": 2.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
