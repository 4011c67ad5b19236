"""Walk-forward evaluation of the market model on the real ES ticks. Prints one JSON object.

Runs :func:`rayfin.trading.evaluation.walk_forward` on the bundled E-mini S&P 500 trades
(all 500,000 by default) with the defaults of ``train_model`` and ``LabelSpec``: labels
100 ticks ahead at ±0.25 points, the default 4-point search grid tuned on purged CV inside
each training set, and an expanding walk-forward whose first half only trains, then 4 test
blocks of an eighth of the rows each. LightGBM is compared with a majority-class and a
logistic-regression baseline on the same folds.

    .venv/bin/python benchmarks/evaluate_market_model.py [--rows 500000] [--folds 4]
        [--write docs/RESULTS.md]

``--write`` replaces the ``market-model`` section of that Markdown file (between
``<!-- market-model:begin -->`` and ``<!-- market-model:end -->``) and keeps the rest.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

import ray

from rayfin.datasets import es_ticks
from rayfin.trading.evaluation import (
    UNIFORM_LOGLOSS,
    Evaluation,
    update_results_section,
    walk_forward,
)
from rayfin.trading.labels import LabelSpec

SECTION = "market-model"


def summary(ev: Evaluation) -> list[str]:
    """Plain statements of how LightGBM compares with the baselines, from the numbers."""
    gbm, logistic, majority = (ev.pooled[name] for name in ("lightgbm", "logistic", "majority"))
    wins = sum(f.scores["lightgbm"].macro_f1 > f.scores["logistic"].macro_f1 for f in ev.folds)
    loss_wins = sum(
        (f.scores["lightgbm"].balanced_log_loss or 0.0)
        < (f.scores["logistic"].balanced_log_loss or 0.0)
        for f in ev.folds
    )
    lines = [
        f"- Pooled macro-F1: LightGBM {gbm.macro_f1:.4f}, logistic regression "
        f"{logistic.macro_f1:.4f} ({gbm.macro_f1 - logistic.macro_f1:+.4f}), majority class "
        f"{majority.macro_f1:.4f}. LightGBM has the higher macro-F1 in {wins} of "
        f"{len(ev.folds)} folds.",
    ]
    if gbm.balanced_log_loss is not None and logistic.balanced_log_loss is not None:
        lines.append(
            f"- Pooled balanced log loss: LightGBM {gbm.balanced_log_loss:.4f}, logistic "
            f"regression {logistic.balanced_log_loss:.4f}, uniform guess {UNIFORM_LOGLOSS:.4f} "
            f"(lower is better). LightGBM has the lower one in {loss_wins} of {len(ev.folds)} "
            "folds."
        )
    return lines


def section(ev: Evaluation, command: str, seconds: float) -> str:
    """The Markdown of the ``market-model`` section of RESULTS.md."""
    today = datetime.now(UTC).date().isoformat()
    head = [
        "## Market model: walk-forward evaluation on real ES ticks",
        "",
        f"Written by `{command}` on {today} "
        f"({platform.machine()}, {os.cpu_count()} CPUs; {seconds / 60:.1f} min end to end).",
        "",
        *summary(ev),
        "",
        "",
    ]
    return "\n".join(head) + ev.to_markdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=None, help="first N ticks only (default: all 500,000)"
    )
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--horizon-ticks", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.25)
    parser.add_argument("--embargo-seconds", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=1, help="LightGBM threads per trial")
    parser.add_argument("--write", metavar="PATH", help="update the market-model section here")
    args = parser.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ticks = es_ticks(args.rows)
    # Training moves Ray Tune's banners to stderr, so stdout holds only the JSON.
    ev = walk_forward(
        ticks,
        label_spec=LabelSpec(horizon_ticks=args.horizon_ticks, threshold=args.threshold),
        folds=args.folds,
        train_fraction=args.train_fraction,
        embargo_seconds=args.embargo_seconds,
        num_threads=args.num_threads,
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "benchmark": "evaluate_market_model",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "ticks": len(ticks),
        "seconds": round(seconds, 1),
        **ev.to_dict(),
    }
    if args.write:
        command = "benchmarks/evaluate_market_model.py " + " ".join(sys.argv[1:])
        update_results_section(args.write, SECTION, section(ev, command.strip(), seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
