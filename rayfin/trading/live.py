"""Live trading: the feature stream's tick rows traded by one engine, restartable exactly.

:class:`LiveTrader` is the end of the live pipeline. Feature consumers hand it each
micro-batch of tick-feature rows (:meth:`LiveTrader.on_features`); it drops rows it has
already traded (a consumer replaying after a crash sends some again), scores and trades
the rest through :class:`~rayfin.trading.engine.Trader`, the path backtests take, and
records the ledger batch together with a :class:`~rayfin.trading.ledger.TraderCheckpoint`
in one transaction. A restarted trader loads that checkpoint: positions, pending orders,
the risk state (a halt stays a halt), decision counts and the offsets it had reached, and
goes on as if it had never stopped.

One trader per account: every consumer of the group sends to the same one, so the
portfolio-level limits (open positions, total notional, drawdown) see every symbol. The
consumer waits for the trader to record a batch before its archive and its Kafka commit
move past those records (:class:`~rayfin.stream.consumer.StreamConsumer`), so a crash on
either side replays what the trader has not recorded, and the marks drop what it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rayfin.errors import TradingError
from rayfin.trading.engine import Trader, TradingConfig, TradingEngine
from rayfin.trading.ledger import Ledger, LedgerBatch, TraderCheckpoint
from rayfin.trading.scoring import Model

__all__ = ["DEFAULT_TRADER_NAME", "LiveTrader"]

DEFAULT_TRADER_NAME = "trader"
LIVE_CURVE_POINTS = 10_000
"""Equity samples a live engine keeps in memory; the ledger's fills hold the full curve."""

Rows = pd.DataFrame | Mapping[str, np.ndarray]


class LiveTrader:
    """A :class:`~rayfin.trading.engine.Trader` that records each batch with its checkpoint
    in ``ledger`` (see the module docstring) and starts from the one stored under
    ``name``, if any. ``config`` applies on a restart too: limits may change, state stays."""

    def __init__(
        self,
        model: Model,
        config: TradingConfig | None = None,
        ledger: Ledger | None = None,
        *,
        name: str = DEFAULT_TRADER_NAME,
    ) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self.name = name
        checkpoint = self.ledger.checkpoint(name)
        if checkpoint is None:
            engine = TradingEngine(config, max_curve_points=LIVE_CURVE_POINTS)
            self.marks: dict[tuple[str, int], int] = {}
            self.records = 0
        else:
            engine = TradingEngine.restore(
                checkpoint.state, config, max_curve_points=LIVE_CURVE_POINTS
            )
            self.marks = dict(checkpoint.marks)
            self.records = checkpoint.records
        self.restored = checkpoint is not None
        self.trader = Trader(model, engine)
        self.replayed = 0  # rows dropped because they were traded before
        self._saved = engine.snapshot()

    @property
    def engine(self) -> TradingEngine:
        return self.trader.engine

    def on_features(self, topic: str, features: Rows) -> LedgerBatch:
        """Trade the rows of ``features`` (tick-feature rows of ``topic``, in offset order
        per partition) not traded before, and record them; returns the recorded batch."""
        for column in ("partition", "offset"):
            if column not in features:
                raise TradingError(f"feature rows lack the column {column!r}")
        partitions = np.asarray(features["partition"], dtype=np.int64)
        offsets = np.asarray(features["offset"], dtype=np.int64)
        fresh = np.ones(len(offsets), dtype=bool)
        marks = dict(self.marks)
        for partition in np.unique(partitions).tolist():
            rows = partitions == partition
            key = (topic, partition)
            mark = marks.get(key, -1)
            fresh &= ~rows | (offsets > mark)
            marks[key] = max(mark, int(offsets[rows].max()))
        if not fresh.all():
            self.replayed += int((~fresh).sum())
            features = _rows(features, fresh)
        self.trader.topic = topic
        try:
            _, batch = self.trader.on_features(features)
            state = self.engine.snapshot()
            records = self.records + int(fresh.sum())
            self.ledger.record(batch, TraderCheckpoint(self.name, marks, state, records))
        except BaseException:
            # Nothing was recorded: put the engine back, so a retry trades the same rows
            # from the same state and makes the same decisions.
            self.trader.engine = TradingEngine.restore(
                self._saved, self.engine.config, max_curve_points=LIVE_CURVE_POINTS
            )
            raise
        self.marks, self.records, self._saved = marks, records, state
        return batch

    def reset_risk(self, now_ns: int | None = None) -> None:
        """The operator's reset after a halt (:meth:`~rayfin.trading.risk.RiskManager.reset`),
        recorded with the risk event and a checkpoint. It is stamped ``now_ns``, by default
        the event time of the last tick traded, the clock everything else runs on."""
        engine = self.engine
        if now_ns is None:
            now_ns = max((p.ts for p in engine.portfolio.positions()), default=0)
        engine.risk.reset(engine.portfolio, now_ns)
        state = engine.snapshot()
        self.ledger.record(
            LedgerBatch(risk_events=engine.risk.new_events()),
            TraderCheckpoint(self.name, self.marks, state, self.records),
        )
        self._saved = state

    def stats(self) -> dict[str, Any]:
        """Records traded, replays dropped, offsets reached, decisions by reason, risk
        state and P&L now."""
        engine = self.engine
        summary = engine.portfolio.summary()
        return {
            "name": self.name,
            "records": self.records,
            "replayed": self.replayed,
            "restored": self.restored,
            "marks": {f"{t}/{p}": o for (t, p), o in sorted(self.marks.items())},
            "outcomes": dict(engine.outcomes),
            "risk_state": engine.risk.state.value,
            "open_positions": engine.portfolio.open_symbols(),
            "realized_pnl": summary.realized_pnl,
            "unrealized_pnl": summary.unrealized_pnl,
            "equity": summary.equity,
            "drawdown": summary.drawdown,
        }


def _rows(features: Rows, keep: np.ndarray) -> Rows:
    if isinstance(features, pd.DataFrame):
        return features.loc[keep]
    return {name: np.asarray(values)[keep] for name, values in features.items()}
