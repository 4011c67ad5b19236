"""A researcher's loop: history -> features on Ray Data -> a tuned model -> a backtest ->
deployed to the running API, which then scores with it.

RAYFIN_API_URL=http://127.0.0.1:8000 RAYFIN_API_KEY=rf_... .venv/bin/python \
    examples/research_workflow.py

The key must be a trade key (deploying promotes a model): `rayfin serve start --dev-keys`
prints one. The model is trained into your local registry (`<state dir>/models`), then
uploaded to the API's; it serves as soon as it is promoted there. Runs in well under a
minute on two cores.
"""
# Needs: a running rayfin API

# %%
from __future__ import annotations

import os
import sys
import time

import rayfin
from rayfin.sdk import frame_rows, research
from rayfin.trading import ModelRegistry, SearchSpace

url, key = os.environ.get("RAYFIN_API_URL"), os.environ.get("RAYFIN_API_KEY")
if not url or not key:
    sys.exit(
        "set RAYFIN_API_URL (e.g. http://127.0.0.1:8000) and RAYFIN_API_KEY (a trade key) "
        "to the running rayfin API; `rayfin serve start --dev-keys` runs one and prints keys"
    )
client = rayfin.connect(url, key)
registry = ModelRegistry()  # <state dir>/models
started = time.perf_counter()


def step(text: str) -> None:
    print(f"[{time.perf_counter() - started:5.1f} s] {text}")


# %% History: the first 40,000 of the bundled real E-mini S&P 500 trades.
ticks = research.load_history(slice(0, 40_000))
step(f"{len(ticks):,} ES trades, {ticks.timestamp.iloc[0]} to {ticks.timestamp.iloc[-1]}")

# %% Features on Ray Data: the live engine per symbol, so training sees what live trading sees.
features = research.compute_features(ticks)
step(f"{len(features):,} feature rows x {features.shape[1]} columns (Ray Data)")

# %% Train on the first 30,000 rows: Ray Tune over purged walk-forward folds, then the refit,
# registered with its drift reference. One grid point keeps the search short.
train_rows, test_rows = features.iloc[:30_000], features.iloc[30_000:]
version = research.train(
    train_rows,
    registry=registry,
    search=SearchSpace(grid={"num_leaves": (31,)}),
    max_rounds=100,
)
m = version.metrics
step(
    f"trained {version.name} v{version.version} in {registry.root}: CV logloss "
    f"{m['cv_logloss']:.4f} (uniform {m['uniform_logloss']:.4f}), {m['num_boost_round']} rounds"
)

# %% Backtest the held-out 10,000 ticks through the live trading path.
result = research.backtest(test_rows, registry=registry, version=version)
b = result.metrics
step(
    f"backtest: net P&L {b['net_pnl']:,.2f}, max drawdown {b['max_drawdown']:.2%}, "
    f"{int(b['fills'])} fills; outcomes {result.outcomes}"
)

# %% Deploy: upload the model text, metadata and drift reference, then promote it.
before = client.models()
deployed = client.deploy_model(registry, version)
step(
    f"deployed as {deployed.name} v{deployed.version} (aliases {deployed.aliases}); "
    f"production was v{before.production}"
)

# %% The API now scores with the new version: check it on a held-out tick.
row = frame_rows(test_rows.tail(1))[0]
score = client.score(row.symbol, row.price, row.features)
if score.model.version != deployed.version:
    sys.exit(f"/v1/score answered with v{score.model.version}, not v{deployed.version}")
p = score.probabilities
step(
    f"/v1/score now uses {score.model.name} v{score.model.version}: "
    f"P(down/flat/up) = {p.down:.3f}/{p.flat:.3f}/{p.up:.3f} -> {score.decision.action}"
)
client.close()
