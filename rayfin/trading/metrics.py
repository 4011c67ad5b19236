"""Counters, gauges and a latency histogram of the live trader, for Prometheus through
Ray's metrics.

The trading actor (:class:`~rayfin.actors.trader.TradingActor`) hands each micro-batch it
traded and recorded to :meth:`TradingMetrics.batch`: the ticks, the seconds it took, and
its engine, whose own decision counts (``engine.outcomes``, reason -> n) give the batch's
decisions by their growth since the last batch. The exact figures stay in-process
(:meth:`TradingMetrics.snapshot`, for ``stats()``); when the trader runs inside Ray they
are mirrored to ``ray.util.metrics``, which Ray exports as ``ray_rayfin_trading_*`` on
every node's metrics endpoint (counters with ``_total``). Every series carries the
trader's name (one per account), and the other labels come from fixed vocabularies
(:data:`~rayfin.trading.orders.DECISION_REASONS`, :class:`~rayfin.trading.orders.RiskState`),
so the number of series stays bounded.

A restarted trader counts from its checkpoint on: decisions restored with the engine
were counted by the process that made them.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from rayfin.trading.orders import REJECT_REASONS, RiskState

if TYPE_CHECKING:
    from rayfin.trading.engine import TradingEngine

__all__ = ["BATCH_BUCKETS_S", "TradingMetrics"]

# Seconds per micro-batch: scoring a few thousand ticks and one ledger transaction.
BATCH_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Batch durations kept for exact percentiles: the most recent ones.
_KEEP = 10_000
_REJECTS = frozenset(REJECT_REASONS)


class TradingMetrics:
    """What one live trader has done since its process started: ticks traded, decisions by
    outcome, risk rejections by reason, seconds per batch; and its equity, drawdown and
    risk state now. ``outcomes`` are the engine's decision counts at the start (restored
    from a checkpoint): only decisions made after them are counted."""

    def __init__(self, trader: str, outcomes: Mapping[str, int] | None = None) -> None:
        self.trader = trader
        self.ticks = 0
        self.batches = 0
        self.decisions: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self._counted: Counter[str] = Counter(outcomes or {})
        self._seconds: deque[float] = deque(maxlen=_KEEP)
        self._tags = {"trader": trader}
        self._ray = _RayMetrics() if _in_ray() else None

    def batch(self, ticks: int, seconds: float, engine: TradingEngine) -> None:
        """A micro-batch traded and recorded: ``ticks`` rows traded (replays dropped) in
        ``seconds``, with ``engine`` after it."""
        self.ticks += ticks
        self.batches += 1
        self._seconds.append(seconds)
        if self._ray:
            if ticks:
                self._ray.ticks.inc(ticks, tags=self._tags)
            self._ray.batch_seconds.observe(seconds, tags=self._tags)
        self._count(engine.outcomes)
        self.state(engine)

    def _count(self, outcomes: Mapping[str, int]) -> None:
        """Count what ``outcomes`` (reason -> decisions so far) gained since last time."""
        for reason, total in outcomes.items():
            new = int(total) - self._counted[reason]
            if new <= 0:
                continue
            self.decisions[reason] += new
            rejected = reason in _REJECTS
            if rejected:
                self.rejections[reason] += new
            if self._ray:
                self._ray.decisions.inc(new, tags={**self._tags, "outcome": reason})
                if rejected:
                    self._ray.rejections.inc(new, tags={**self._tags, "reason": reason})
        self._counted = Counter({reason: int(n) for reason, n in outcomes.items()})

    def state(self, engine: TradingEngine) -> None:
        """Set the gauges from ``engine``: equity, drawdown, risk state (after a batch, a
        restore, an operator's reset)."""
        if not self._ray:
            return
        portfolio = engine.portfolio
        self._ray.equity.set(float(portfolio.equity), tags=self._tags)
        self._ray.drawdown.set(float(portfolio.drawdown), tags=self._tags)
        now = engine.risk.state
        for state in RiskState:
            self._ray.risk_state.set(
                1.0 if state is now else 0.0, tags={**self._tags, "state": state.value}
            )

    def batch_percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        """Milliseconds per batch over the most recent batches."""
        if not self._seconds:
            return {}
        values = np.fromiter(self._seconds, dtype=np.float64) * 1e3
        return {f"p{q:g}": round(float(np.percentile(values, q)), 3) for q in qs}

    def snapshot(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "batches": self.batches,
            "decisions": dict(self.decisions),
            "risk_rejections": dict(self.rejections),
            "batch_ms": self.batch_percentiles(),
        }


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()


class _RayMetrics:
    """The Prometheus side. Names follow Prometheus conventions (Ray adds ``ray_``, and
    ``_total`` to counters)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.ticks = metrics.Counter(
            "rayfin_trading_ticks",
            description="Tick-feature rows traded by the live trader (replayed rows it had "
            "traded before are not counted).",
            tag_keys=("trader",),
        )
        self.decisions = metrics.Counter(
            "rayfin_trading_decisions",
            description="Trading decisions, one per tick traded, by outcome: a hold's reason "
            "(below_threshold, same_direction), a risk rejection's reason, or accepted.",
            tag_keys=("trader", "outcome"),
        )
        self.rejections = metrics.Counter(
            "rayfin_trading_risk_rejections",
            description="Proposed orders the risk manager refused, by reason (halted, "
            "reducing_only, rate_limited, max_open_positions, max_notional_symbol, "
            "max_notional_total).",
            tag_keys=("trader", "reason"),
        )
        self.batch_seconds = metrics.Histogram(
            "rayfin_trading_batch_seconds",
            description="Seconds the live trader took to score, trade and record (one ledger "
            "transaction) one micro-batch of tick features.",
            boundaries=BATCH_BUCKETS_S,
            tag_keys=("trader",),
        )
        self.equity = metrics.Gauge(
            "rayfin_trading_equity",
            description="The account's equity (initial cash + realized + unrealized P&L), in "
            "the account currency, after the last micro-batch.",
            tag_keys=("trader",),
        )
        self.drawdown = metrics.Gauge(
            "rayfin_trading_drawdown",
            description="How far equity is below its peak, as a fraction of the peak (0 to 1).",
            tag_keys=("trader",),
        )
        self.risk_state = metrics.Gauge(
            "rayfin_trading_risk_state",
            description="The risk manager's state: 1 for the current one (active, reducing "
            "or halted), 0 for the others.",
            tag_keys=("trader", "state"),
        )
