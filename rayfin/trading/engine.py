"""One trading path for live and backtest: score, decide, check risk, execute, record.

:class:`TradingEngine` runs the per-tick chain (the order of calls documented in
:mod:`rayfin.trading.risk`) over a micro-batch of signals and returns what it produced as
one :class:`~rayfin.trading.ledger.LedgerBatch`, written to the ledger in one transaction
when it has one. :class:`Trader` puts the model in front: feature rows in, class
probabilities scored for the whole batch at once, then the engine. The live consumer and
:func:`rayfin.trading.backtest` both call :meth:`Trader.on_features`, so a backtest makes
the decisions live trading would have made on the same ticks.

What is recorded: every decision where the strategy proposed an order (accepted, or
rejected with its reason), every order (strategy and protective), fill, position change
and risk event. Holds (``below_threshold``, ``same_direction``) are counted, not stored,
unless ``record_holds``: at one per tick they would swamp the ledger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rayfin.errors import TradingError
from rayfin.trading.execution import FeeModel, SimulatedBroker, SlippageModel
from rayfin.trading.ledger import Ledger, LedgerBatch
from rayfin.trading.orders import Decision, Instruments, Signal, SourceKey
from rayfin.trading.pnl import DEFAULT_INITIAL_CASH, Portfolio
from rayfin.trading.risk import RiskLimits, RiskManager
from rayfin.trading.strategy import StrategyConfig, ThresholdStrategy

if TYPE_CHECKING:
    from rayfin.trading.scoring import Model


@dataclass(frozen=True)
class TradingConfig:
    """Everything that shapes decisions and costs, in one object for live and backtest."""

    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    limits: RiskLimits = field(default_factory=RiskLimits)
    fees: FeeModel = field(default_factory=FeeModel)
    slippage: SlippageModel = field(default_factory=SlippageModel)
    instruments: Instruments = field(default_factory=Instruments)
    initial_cash: float = DEFAULT_INITIAL_CASH
    record_holds: bool = False


class TradingEngine:
    """Strategy, risk manager, simulated broker and portfolio, driven one tick at a time,
    recording a ledger batch per micro-batch. Deterministic: event time only."""

    def __init__(self, config: TradingConfig | None = None, ledger: Ledger | None = None) -> None:
        self.config = config or TradingConfig()
        c = self.config
        self.ledger = ledger
        self.strategy = ThresholdStrategy(c.strategy)
        self.risk = RiskManager(c.limits)
        self.broker = SimulatedBroker(c.instruments, c.fees, c.slippage)
        self.portfolio = Portfolio(c.initial_cash, c.instruments)
        self.outcomes: Counter[str] = Counter()  # decision reasons, holds included

    def on_signals(self, signals: Sequence[Signal]) -> LedgerBatch:
        """Run the chain for each signal (one per tick, in arrival order); record and
        return the batch."""
        decisions, orders, fills, positions = [], [], [], {}
        portfolio, broker, risk = self.portfolio, self.broker, self.risk
        for signal in signals:
            symbol, ts, price = signal.symbol, signal.ts, signal.price
            # Orders from earlier ticks fill at this one; then marks, protective orders.
            filled = broker.on_tick(symbol, ts, price)
            for fill in filled:
                portfolio.apply(fill)
            fills.extend(filled)
            portfolio.mark(symbol, price, ts)
            for order in risk.on_mark(
                portfolio, {symbol: price}, ts, signal.source, broker.pending()
            ):
                broker.submit(order)
                orders.append(order)
            held = portfolio.quantity(symbol) + broker.pending_quantity(symbol)
            proposal = self.strategy.decide(signal, held)
            if proposal.order is None:
                assert proposal.reason is not None
                self.outcomes[proposal.reason] += 1
                if self.config.record_holds:
                    decisions.append(Decision.hold(signal, proposal.reason, risk.state))
            else:
                check = risk.check(proposal.order, portfolio, price, ts, broker.pending())
                decision = Decision.checked(signal, proposal.order, check.reason, risk.state)
                self.outcomes[decision.reason] += 1
                decisions.append(decision)
                if check.accepted:
                    broker.submit(proposal.order)
                    orders.append(proposal.order)
            # The ledger keeps each symbol's current position, marked at its last tick.
            positions[symbol] = portfolio.position(symbol)
        batch = LedgerBatch(
            decisions=decisions,
            orders=orders,
            fills=fills,
            positions=list(positions.values()),
            risk_events=risk.new_events(),
        )
        if self.ledger is not None:
            self.ledger.record(batch)
        return batch


class Trader:
    """A model in front of a :class:`TradingEngine`: feature rows in, decisions out."""

    def __init__(self, model: Model, engine: TradingEngine, *, topic: str = "ticks") -> None:
        self.model = model
        self.engine = engine
        self.topic = topic  # the source topic of the feature rows, for idempotency keys

    def on_features(self, features: pd.DataFrame) -> tuple[np.ndarray, LedgerBatch]:
        """Score a micro-batch of tick-feature rows (engine columns, in arrival order, with
        ``partition`` and ``offset`` of their source records) and trade on it; returns the
        probabilities ``[n, 3]`` and the recorded batch."""
        if features.empty:
            return np.empty((0, 3)), self.engine.on_signals([])
        missing = [c for c in ("symbol", "ts", "price", "partition", "offset") if c not in features]
        if missing:
            raise TradingError(f"feature rows lack the columns {missing}")
        probs = self.model.predict_proba(features)
        topic = self.topic
        signals = [
            Signal(
                symbol,
                int(ts),
                float(price),
                (p[0], p[1], p[2]),
                SourceKey(topic, int(part), int(off)),
            )
            for symbol, ts, price, part, off, p in zip(
                features["symbol"].astype(str).tolist(),
                features["ts"].to_numpy(np.int64).tolist(),
                features["price"].to_numpy(np.float64).tolist(),
                features["partition"].to_numpy(np.int64).tolist(),
                features["offset"].to_numpy(np.int64).tolist(),
                probs.tolist(),
                strict=True,
            )
        ]
        return probs, self.engine.on_signals(signals)
