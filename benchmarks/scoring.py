"""What scoring and deciding add per live micro-batch, against the feature work already
done for it, all in one run. Prints one JSON object.

On real ES ticks, in micro-batches of ``--batch`` rows (1,000 by default), with a model
trained here on the first ``--train`` ticks:

- baseline: the live feature engine's time per batch (what the consumer does anyway);
- the LightGBM booster alone on a ready float matrix (the floor of scoring);
- ``Model.predict_proba`` on engine feature rows (inputs built, checked, scored);
- scoring plus deciding: :meth:`Trader.on_features` (score, strategy, risk, simulated
  broker, portfolio; no database) and the same with the SQLite ledger written per batch;
- rows/s of batched scoring, and p50/p99 milliseconds per batch of each step.

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
from rayfin.trading.engine import Trader, TradingConfig, TradingEngine
from rayfin.trading.inputs import input_arrays
from rayfin.trading.ledger import Ledger
from rayfin.trading.registry import ModelRegistry
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
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        version = train_model(
            features.iloc[: args.train],
            registry=registry,
            search=SearchSpace(grid={"num_leaves": (31,)}),
            max_rounds=200,
        )
        model = registry.load("market", version.version)
        # As the consumer hands them over: rows of one source partition.
        live = features.iloc[args.train :].reset_index(drop=True).assign(partition=0)
        batches = [live.iloc[i : i + args.batch] for i in range(0, len(live), args.batch)]
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
        # A threshold that trades, so deciding does real work (orders, fills, risk).
        config = TradingConfig(strategy=StrategyConfig(threshold=0.55))
        trader = Trader(model, TradingEngine(config))
        decide_times = timed(batches, trader.on_features)
        with Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}") as ledger:
            recorded = Trader(model, TradingEngine(config, ledger))
            ledger_times = timed(batches, recorded.on_features)
            fills = len(ledger.fills())

    rows = sum(len(b) for b in batches)
    feature_p = percentiles(feature_times)
    decide_p = percentiles(decide_times)
    result = {
        "benchmark": "scoring",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "batch_rows": args.batch,
        "batches": len(batches),
        "model": {"version": version.version, "inputs": len(model.features)},
        "ms_per_batch": {
            "baseline_feature_engine": feature_p,
            "booster_predict_only": percentiles(booster_times),
            "score": percentiles(score_times),
            "score_and_decide": decide_p,
            "score_decide_and_ledger_sqlite": percentiles(ledger_times),
        },
        "scoring_rows_per_s": round(rows / sum(score_times)),
        "score_and_decide_rows_per_s": round(rows / sum(decide_times)),
        "score_and_decide_vs_feature_engine_p50": round(decide_p["p50"] / feature_p["p50"], 3),
        "fills": fills,
        "decisions": dict(trader.engine.outcomes),
        "goal_p99_ms": 2.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
