"""``POST /v1/score`` over HTTP against the same scoring called directly, in one run.
Prints one JSON object.

A model is trained here on the first ``--train`` real ES ticks (a registry of its own),
and the API is deployed on a local Ray (no LLM deployment). Request bodies are real
engine feature rows of the ticks after those (``--rows`` of them, sent round-robin).

- baseline: ``Scorer.score`` in this process on the same validated bodies, one row per
  call: what the ingress replica does for a request, without HTTP, Serve or JSON;
- HTTP, one request at a time (latency) and ``--concurrency`` at once (throughput), from
  an aiohttp client in this process with keep-alive connections;
- each through both ingresses: Serve's HAProxy ingress (what rayfin runs,
  ``rayfin.cluster.SERVE_ENV``) and Serve's default Python proxy, each in a child process
  of its own (Serve reads the choice when it starts).

Goals on this machine: p50 <= 8 ms and >= 400 requests/s for ``/v1/score``. The client
shares the machine's cores with Ray, HAProxy and the replica, so the figures include its
cost.

    .venv/bin/python benchmarks/serve.py [--requests 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GOAL_P50_MS = 8.0
GOAL_RPS = 400.0


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e3
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)}


def bodies(train: int, rows: int) -> tuple[Path, list[dict[str, Any]]]:
    """A registry with a model trained on the first ``train`` ticks, and score bodies of
    the ``rows`` ticks after them."""
    import pandas as pd

    from rayfin.datasets import es_ticks
    from rayfin.features import online_features
    from rayfin.trading.inputs import PRICE, required_columns
    from rayfin.trading.registry import ModelRegistry
    from rayfin.trading.training import SearchSpace, train_model

    features = online_features(es_ticks(train + rows))
    registry = ModelRegistry(Path(tempfile.mkdtemp(prefix="rayfin-bench-serve-")) / "models")
    version = train_model(
        features.iloc[:train],
        registry=registry,
        search=SearchSpace(grid={"num_leaves": (31,)}),
        max_rounds=60,
    )
    registry.promote("market", version.version)
    needed = sorted({c for f in version.features for c in required_columns(f)} - {PRICE})
    out = []
    for row in features.iloc[train:].itertuples(index=False):
        data = row._asdict()
        out.append(
            {
                "symbol": str(data["symbol"]),
                "price": float(data["price"]),
                "features": {n: None if pd.isna(data[n]) else float(data[n]) for n in needed},
            }
        )
    return Path(registry.root), out


def direct(registry: Path, payloads: list[dict[str, Any]], requests: int) -> dict[str, Any]:
    """The baseline: the ingress replica's scoring work, called in this process."""
    from rayfin.serve.schemas import ScoreRow
    from rayfin.serve.scoring import LiveModel, Scorer
    from rayfin.trading.registry import ModelRegistry
    from rayfin.trading.strategy import StrategyConfig

    scorer = Scorer(LiveModel(ModelRegistry(registry), "market"), StrategyConfig())
    rows = [ScoreRow.model_validate(p) for p in payloads]
    for row in rows[:100]:  # warm up
        scorer.score([row])
    samples = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        scorer.score([rows[i % len(rows)]])
        samples.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"latency_ms": percentiles(samples), "requests_per_s": round(requests / elapsed, 1)}


async def load(
    url: str, key: str, payloads: list[dict[str, Any]], requests: int, concurrency: int
) -> dict[str, Any]:
    """``requests`` POSTs of the payloads, ``concurrency`` at a time."""
    import aiohttp

    encoded = [json.dumps(p).encode() for p in payloads]
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    samples: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                async with session.post(url, data=encoded[i % len(encoded)]) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                samples.append(time.perf_counter() - t)

        for _ in range(min(200, requests)):  # warm up connections and the replica
            async with session.post(url, data=encoded[0]) as response:
                await response.read()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "latency_ms": percentiles(samples),
        "requests_per_s": round(requests / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def serve_run(args: argparse.Namespace) -> dict[str, Any]:
    """One ingress mode (this process's environment decides which): deploy, then load."""
    import ray

    from rayfin.cluster import connect_ray
    from rayfin.config import ApiKey
    from rayfin.serve.app import ApiOptions
    from rayfin.serve.auth import new_key
    from rayfin.serve.deployment import deploy, undeploy
    from rayfin.stream.broker import free_port

    connect_ray(None)
    registry, payloads = bodies(args.train, args.rows)
    key = new_key()
    options = ApiOptions(
        keys=(
            ApiKey(
                name="bench", role="read", key=key, rate_limit_per_s=1e9, rate_limit_burst=10**9
            ),
        ),
        ledger_url=f"sqlite:///{registry.parent / 'ledger.db'}",
        registry=str(registry),
        llm=None,
    )
    base = deploy(options, port=free_port())
    url = base + "/v1/score"
    try:
        out = {
            "ingress": "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy",
            "direct": direct(registry, payloads, args.requests),
            "one_at_a_time": asyncio.run(load(url, key, payloads, args.requests, 1)),
            "concurrent": asyncio.run(load(url, key, payloads, args.requests, args.concurrency)),
        }
    finally:
        undeploy()
        ray.shutdown()
    latency = out["one_at_a_time"]["latency_ms"]["p50"]
    out["http_over_direct_p50"] = round(latency / out["direct"]["latency_ms"]["p50"], 1)
    out["meets_goal"] = {
        "p50_ms<=8": latency <= GOAL_P50_MS,
        "requests_per_s>=400": out["concurrent"]["requests_per_s"] >= GOAL_RPS,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--train", type=int, default=30_000)
    parser.add_argument("--rows", type=int, default=2_000)
    parser.add_argument(
        "--ingress", choices=("both", "haproxy", "proxy"), default="both",
        help="both: each in a child process",
    )  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(serve_run(args)))
        return
    runs = {}
    for mode in ("haproxy", "proxy") if args.ingress == "both" else (args.ingress,):
        flag = "1" if mode == "haproxy" else "0"
        env = {
            **os.environ,
            "RAY_SERVE_ENABLE_HA_PROXY": flag,
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": flag,
        }
        child = [sys.executable, __file__, "--child", *sys.argv[1:]]
        done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"the {mode} run failed:\n{done.stderr[-3000:]}")
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    result: dict[str, Any] = {
        "benchmark": "serve",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "requests": args.requests,
        "runs": runs,
    }
    if len(runs) == 2:
        result["haproxy_over_proxy"] = {
            "p50_latency": round(
                runs["proxy"]["one_at_a_time"]["latency_ms"]["p50"]
                / runs["haproxy"]["one_at_a_time"]["latency_ms"]["p50"],
                2,
            ),
            "throughput": round(
                runs["haproxy"]["concurrent"]["requests_per_s"]
                / runs["proxy"]["concurrent"]["requests_per_s"],
                2,
            ),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
