"""``TradingActor``: the one live trader of an account, as a Ray actor.

Every feature consumer of the group sends its tick-feature micro-batches here, so one
portfolio and one risk manager see every symbol, and its scored news, which becomes the
ticks' ``sentiment`` input. The actor restarts after a crash
(``max_restarts``) and Ray retries the calls in flight (``max_task_retries``); the new
instance resumes from the ledger checkpoint (:mod:`rayfin.trading.live`), so a retried
batch is traded once.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import ray

from rayfin.cluster import NAMESPACE, placement
from rayfin.features.sentiment import DEFAULT_HALF_LIFE_S
from rayfin.trading.engine import TradingConfig
from rayfin.trading.ledger import Ledger
from rayfin.trading.live import DEFAULT_TRADER_NAME, LiveTrader
from rayfin.trading.metrics import TradingMetrics
from rayfin.trading.scoring import Model

TRADER_ACTOR = "trader"
"""The name of the account's live trader in the ``rayfin`` namespace."""


class TradingActor:
    """A :class:`~rayfin.trading.live.LiveTrader` behind a Ray actor, recording what it
    does in :class:`~rayfin.trading.metrics.TradingMetrics` (Prometheus through Ray)."""

    def __init__(
        self,
        model: Model,
        config: TradingConfig | None = None,
        ledger_url: str | None = None,
        *,
        schema: str | None = None,
        name: str = DEFAULT_TRADER_NAME,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
    ) -> None:
        ledger = Ledger(ledger_url, schema=schema)
        self.live = LiveTrader(model, config, ledger, name=name, half_life_s=half_life_s)
        self.metrics = TradingMetrics(name, self.live.engine.outcomes)
        self.metrics.state(self.live.engine)

    def on_features(self, topic: str, rows: pa.Table) -> int:
        """Trade a micro-batch of tick-feature rows of ``topic``; returns rows traded."""
        begin = time.perf_counter()
        columns = {name: rows.column(name).to_numpy() for name in rows.column_names}
        before = self.live.records
        self.live.on_features(topic, columns)
        traded = self.live.records - before
        self.metrics.batch(traded, time.perf_counter() - begin, self.live.engine)
        return traded

    def on_news(self, topic: str, rows: pa.Table) -> int:
        """Add scored stories of ``topic`` (``ts``, ``symbols``, ``sentiment``,
        ``partition``, ``offset``) to the sentiment book; returns the stories added."""
        columns: dict[str, Any] = {
            name: rows.column(name).to_numpy() for name in rows.column_names if name != "symbols"
        }
        columns["symbols"] = rows.column("symbols").to_pylist()
        return self.live.on_news(topic, columns)

    def stats(self) -> dict[str, Any]:
        """The trader's :meth:`~rayfin.trading.live.LiveTrader.stats`, and under ``metrics``
        what this process counted (ticks, batches, decisions, risk rejections, batch_ms)."""
        return {**self.live.stats(), "metrics": self.metrics.snapshot()}

    def ledger_url(self) -> str:
        """The ledger's database URL, password hidden."""
        return self.live.ledger.url

    def reset_risk(self) -> str:
        """Return the risk manager to ACTIVE after a halt; returns the state."""
        self.live.reset_risk()
        self.metrics.state(self.live.engine)
        return self.live.engine.risk.state.value


def launch_trader(
    model: Model,
    config: TradingConfig | None = None,
    ledger_url: str | None = None,
    *,
    schema: str | None = None,
    name: str = DEFAULT_TRADER_NAME,
    half_life_s: float = DEFAULT_HALF_LIFE_S,
    num_cpus: float = 0.5,
    actor_name: str | None = None,
) -> Any:
    """Start the trading actor (restarting on failure, retrying calls in flight); returns
    its handle, ready. ``actor_name`` names it in the ``rayfin`` namespace, where the HTTP
    API finds the live pipeline (:data:`TRADER_ACTOR` is the name it looks for)."""
    named = {} if actor_name is None else {"name": actor_name, "namespace": NAMESPACE}
    handle = (
        ray.remote(TradingActor)
        .options(
            num_cpus=num_cpus,
            max_restarts=-1,
            max_task_retries=-1,
            resources=placement("stream"),
            **named,
        )
        .remote(model, config, ledger_url, schema=schema, name=name, half_life_s=half_life_s)
    )
    ray.get(handle.stats.remote())  # constructed: checkpoint loaded, ledger reachable
    return handle
