"""The rayfin HTTP API from Python: health, scores, the trading ledger, models and the LLM.

RAYFIN_API_URL=http://127.0.0.1:8000 RAYFIN_API_KEY=rf_... .venv/bin/python examples/api_client.py

Start the API with `rayfin serve start --dev-keys` (it prints a read and a trade key; for
lasting keys, `rayfin serve keygen`). A read key is enough here.
"""
# Needs: a running rayfin API

# %%
from __future__ import annotations

import os
import sys

import rayfin
from rayfin.datasets import es_ticks
from rayfin.features import online_features
from rayfin.trading.inputs import PRICE, required_columns

url, key = os.environ.get("RAYFIN_API_URL"), os.environ.get("RAYFIN_API_KEY")
if not url or not key:
    sys.exit(
        "set RAYFIN_API_URL (e.g. http://127.0.0.1:8000) and RAYFIN_API_KEY (an API key) "
        "to the running rayfin API; `rayfin serve start` runs one"
    )
client = rayfin.connect(url, key)

# %% Is everything up? Health needs no key: load balancers poll it.
health = client.health()
print(f"API {health.version} at {url}: {health.status}")
for name, part in health.components.items():
    print(f"  {name:7} {part.status:8} {part.detail[:70]}")

# %% The model behind /v1/score, and the feature columns its inputs are built from.
models = client.models()
production = next(v for v in models.versions if v.version == models.production)
needed = sorted({c for f in production.features for c in required_columns(f)} - {PRICE})
print(
    f"\nmodel {models.name}: versions {[v.version for v in models.versions]}, production "
    f"v{production.version} ({len(production.features)} inputs from {len(needed)} columns)"
)

# %% Features of real ES ticks, computed here the live way (the engine the consumers run).
features = online_features(es_ticks(38_000)).iloc[-2_000:]
print(f"{len(features):,} feature rows of the ES ticks 36,000-38,000")

# %% Score one tick, then the whole frame (cut into requests that fit the body limit). A
# value still warming up is NaN; it goes as null, which the model takes as missing.
row = features.iloc[-1]
one = client.score("ES", float(row[PRICE]), {name: float(row[name]) for name in needed})
p = one.probabilities
print(
    f"one tick at {row[PRICE]:.2f}: P(down/flat/up) = {p.down:.3f}/{p.flat:.3f}/{p.up:.3f} "
    f"-> {one.decision.action}"
)
batch = client.score_frame(features)
actions: dict[str, int] = {}
for result in batch.results:
    actions[result.decision.action] = actions.get(result.decision.action, 0) + 1
print(
    f"{len(batch.results):,} ticks scored by {batch.model.name} v{batch.model.version}: {actions}"
)

# %% The trading ledger: decisions page by page, then all of them as a DataFrame.
page = client.decisions(limit=5, order="desc")
print(f"\nlatest decisions (next page at offset {page.next_offset}):")
for d in page.items:
    print(
        f"  {d.time:%Y-%m-%d %H:%M:%S} {d.symbol} {d.action:5} {d.price:.2f} "
        f"p_up={d.p_up:.2f} accepted={d.accepted} {d.reason}"
    )
decisions = client.decisions_frame()
accepted = decisions["accepted"].sum()
print(f"{len(decisions):,} decisions in the ledger, {accepted:,} accepted by the risk checks")

# %% Positions and P&L, recomputed by the server from the ledger's fills.
for position in client.positions().items:
    print(
        f"position {position.symbol}: {position.quantity:+d} @ {position.avg_price:.2f}, "
        f"realized {position.realized_pnl:,.2f}, unrealized {position.unrealized_pnl:,.2f}"
    )
pnl = client.pnl(points=100)
print(
    f"equity {pnl.equity:,.2f} (peak {pnl.peak_equity:,.2f}, drawdown {pnl.drawdown:.2%}), "
    f"fees {pnl.fees:,.2f}; {len(pnl.equity_curve)} curve points"
)

# %% The distributed LLM: headline sentiment and free text.
headlines = ["Acme beats estimates and raises guidance", "Acme recalls its flagship car"]
for score in client.sentiment(headlines).scores:
    print(f"sentiment {score.sentiment:+.2f}  {score.headline}")
# Without max_new_tokens, the answer is as long as the server allows (64 at most).
answer = client.generate("What is a futures contract? One sentence.")
print(f"LLM ({answer.new_tokens} tokens, {answer.tokens_per_s:.1f}/s): {answer.text.strip()}")

client.close()
