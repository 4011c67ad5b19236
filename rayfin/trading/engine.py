"""One trading path for live and backtest: score, decide, check risk, execute, record.

:class:`TradingEngine` runs the per-tick chain (the order of calls documented in
:mod:`rayfin.trading.risk`) over a micro-batch of signals and returns what it produced as
one :class:`~rayfin.trading.ledger.LedgerBatch`, written to the ledger in one transaction
when it has one. :class:`Trader` puts the model in front: feature rows in, class
probabilities scored for the whole batch at once, then the engine. The live trading actor
and :func:`rayfin.trading.backtest` both call :meth:`Trader.on_features`, so a backtest
makes the decisions live trading would have made on the same ticks.

What is recorded: every decision where the strategy proposed an order (accepted, or
rejected with its reason), every order (strategy and protective), fill, position change
and risk event. Holds (``below_threshold``, ``same_direction``) are counted, not stored,
unless ``record_holds``: at one per tick they would swamp the ledger.

**The quiet-run fast path.** Most ticks change nothing but the marks: no order is pending,
the strategy holds (below the threshold, or already positioned that way), no stop or
take-profit is hit and the drawdown crosses no line of the risk manager. For a run of
such ticks the per-tick chain reduces to marking prices, sampling equity and counting
holds, so :meth:`TradingEngine.on_batch` finds the run's end with numpy (the first tick
the strategy would act on, then the first a protective order or a state change would
happen at, from the equity path of the open position), does the run in one step, and runs
the full chain on the tick that ends it. The result is identical to the per-tick chain
(:meth:`on_signals`), down to every equity sample and risk event; a test holds the two to
that. With more than one position open the chain runs tick by tick.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rayfin.errors import TradingError
from rayfin.trading.execution import FeeModel, SimulatedBroker, SlippageModel
from rayfin.trading.inputs import sentiment_input
from rayfin.trading.ledger import Ledger, LedgerBatch
from rayfin.trading.orders import (
    BELOW_THRESHOLD,
    SAME_DIRECTION,
    Decision,
    Instruments,
    Signal,
    SourceKey,
)
from rayfin.trading.pnl import DEFAULT_INITIAL_CASH, Portfolio, Position
from rayfin.trading.risk import RiskLimits, RiskManager
from rayfin.trading.strategy import StrategyConfig, ThresholdStrategy

if TYPE_CHECKING:
    from rayfin.trading.scoring import Model

__all__ = ["SignalBatch", "Trader", "TradingConfig", "TradingEngine"]

# Bumped whenever what :meth:`TradingEngine.snapshot` holds changes shape.
_SNAPSHOT_VERSION = 1
_PROB_SUM_TOLERANCE = 1e-4  # as :class:`~rayfin.trading.orders.Signal` allows
_SOURCE_COLUMNS = ("symbol", "ts", "price", "partition", "offset")


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


@dataclass(frozen=True, slots=True, eq=False)
class SignalBatch:
    """A micro-batch of signals as columns, one row per tick in arrival order: what
    :class:`Trader` builds from scored feature rows. Checked as a whole on construction,
    so a bad row fails the batch before any of it is traded."""

    topic: str
    symbols: np.ndarray  # str (object)
    ts: np.ndarray  # int64 ns
    prices: np.ndarray  # float64
    probs: np.ndarray  # float64 [n, 3]: down, flat, up
    partitions: np.ndarray  # int64
    offsets: np.ndarray  # int64
    # float64: the news sentiment the model saw per tick; None (the default): neutral 0.0.
    sentiment: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.symbols)
        if self.sentiment is None:
            object.__setattr__(self, "sentiment", np.zeros(n))
        if not isinstance(self.topic, str) or not self.topic:
            raise TradingError(f"SignalBatch: topic must be a non-empty string, got {self.topic!r}")
        shapes = {
            "ts": self.ts.shape,
            "prices": self.prices.shape,
            "partitions": self.partitions.shape,
            "offsets": self.offsets.shape,
            "sentiment": self.sentiment.shape,
        }
        if any(shape != (n,) for shape in shapes.values()) or self.probs.shape != (n, 3):
            raise TradingError(
                f"SignalBatch: {n} symbols but shapes {shapes}, probs {self.probs.shape}"
            )
        for symbol in dict.fromkeys(self.symbols.tolist()):
            if not isinstance(symbol, str) or not symbol or symbol != symbol.strip():
                raise TradingError(
                    f"SignalBatch: symbol must be a non-empty string, got {symbol!r}"
                )
        _first_bad(self.ts < 0, "ts must be nanoseconds >= 0", self.ts)
        _first_bad(
            ~(np.isfinite(self.prices) & (self.prices > 0)), "price must be > 0", self.prices
        )
        probs = self.probs
        bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs > 1).any(axis=1)
        bad |= np.abs(probs.sum(axis=1) - 1.0) > _PROB_SUM_TOLERANCE
        _first_bad(bad, "probs must be three probabilities summing to 1", probs)
        _first_bad(
            (self.partitions < 0) | (self.offsets < 0),
            "partition and offset must be >= 0",
            self.offsets,
        )
        _first_bad(~np.isfinite(self.sentiment), "sentiment must be finite", self.sentiment)

    @classmethod
    def from_signals(cls, signals: Sequence[Signal]) -> SignalBatch:
        """The columns of ``signals`` (all from one topic)."""
        topics = {s.source.topic for s in signals}
        if len(topics) > 1:
            raise TradingError(f"SignalBatch: signals from several topics {sorted(topics)}")
        return cls(
            topics.pop() if topics else "ticks",
            np.array([s.symbol for s in signals], dtype=object),
            np.array([s.ts for s in signals], dtype=np.int64),
            np.array([s.price for s in signals], dtype=np.float64),
            np.array([s.probs for s in signals], dtype=np.float64).reshape(-1, 3),
            np.array([s.source.partition for s in signals], dtype=np.int64),
            np.array([s.source.offset for s in signals], dtype=np.int64),
            np.array([s.sentiment for s in signals], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.symbols)

    def signal(self, i: int) -> Signal:
        """Row ``i`` as a :class:`~rayfin.trading.orders.Signal`."""
        p = self.probs[i]
        return Signal(
            self.symbols[i],
            int(self.ts[i]),
            float(self.prices[i]),
            (float(p[0]), float(p[1]), float(p[2])),
            SourceKey(self.topic, int(self.partitions[i]), int(self.offsets[i])),
            float(self.sentiment[i]),
        )


def _first_bad(bad: np.ndarray, what: str, values: np.ndarray) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TradingError(f"SignalBatch row {row}: {what}, got {values[row]!r}")


class _Out:
    """What one micro-batch produces, gathered as the chain runs."""

    __slots__ = ("decisions", "fills", "orders", "positions")

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.orders: list[Any] = []
        self.fills: list[Any] = []
        # The ledger keeps each symbol's current position, marked at its last tick.
        self.positions: dict[str, Position] = {}


class TradingEngine:
    """Strategy, risk manager, simulated broker and portfolio, driven one tick at a time,
    recording a ledger batch per micro-batch. Deterministic: event time only.

    ``max_curve_points`` bounds the portfolio's in-memory equity curve (a live engine runs
    for weeks; the ledger keeps the fills the curve follows from)."""

    def __init__(
        self,
        config: TradingConfig | None = None,
        ledger: Ledger | None = None,
        *,
        max_curve_points: int | None = None,
    ) -> None:
        self.config = config or TradingConfig()
        c = self.config
        self.ledger = ledger
        self.strategy = ThresholdStrategy(c.strategy)
        self.risk = RiskManager(c.limits)
        self.broker = SimulatedBroker(c.instruments, c.fees, c.slippage)
        self.portfolio = Portfolio(c.initial_cash, c.instruments, max_curve_points=max_curve_points)
        self.outcomes: Counter[str] = Counter()  # decision reasons, holds included

    # -- the chain -----------------------------------------------------------------------

    def on_signals(self, signals: Sequence[Signal]) -> LedgerBatch:
        """Run the full chain for each signal (one per tick, in arrival order); record and
        return the batch. :meth:`on_batch` gives the same result faster."""
        out = _Out()
        for signal in signals:
            self._step(signal, out)
        return self._finish(out)

    def on_batch(self, batch: SignalBatch) -> LedgerBatch:
        """:meth:`on_signals` for a column batch, with the quiet-run fast path (see the
        module docstring); record and return the ledger batch."""
        out = _Out()
        n = len(batch)
        if self.config.record_holds:  # every hold is stored: each tick takes the chain
            for i in range(n):
                self._step(batch.signal(i), out)
            return self._finish(out)
        threshold = self.config.strategy.threshold
        probs = batch.probs
        # The strategy's own test, on the same float64 values: +1 long, -1 short, 0 hold.
        side = np.where(probs[:, 2] >= threshold, 1, np.where(probs[:, 0] >= threshold, -1, 0))
        i = 0
        while i < n:
            i = self._quiet_run(batch, side, i, out) if self.broker.idle else i
            if i < n:
                self._step(batch.signal(i), out)
                i += 1
        return self._finish(out)

    def _quiet_run(self, batch: SignalBatch, side: np.ndarray, i: int, out: _Out) -> int:
        """Process the ticks from ``i`` on that change nothing but marks (no fill, no
        protective order, no risk state change, no order proposed) in one numpy step, as
        the chain would; returns the first tick that needs the chain (``len(batch)`` if
        none). Nothing may be pending at the broker."""
        n = len(batch)
        portfolio, strategy = self.portfolio, self.config.strategy
        # The strategy proposes an order on a confident tick unless it holds that way
        # already (within max_quantity, and not scaling in): the window ends at the first.
        confident = np.flatnonzero(side[i:]) + i
        held = np.zeros(len(confident), dtype=np.int64)
        confident_symbols = batch.symbols[confident]
        for symbol in portfolio.open_symbols():
            held[confident_symbols == symbol] = portfolio.quantity(symbol)
        acts = (
            (held == 0)
            | (np.sign(held) != side[confident])
            | (np.abs(held) > strategy.max_quantity)
        )
        if strategy.scale_in:
            acts[:] = True
        end = int(confident[np.argmax(acts)]) if acts.any() else n
        if end == i:
            return i
        symbols, prices = batch.symbols[i:end], batch.prices[i:end]
        equity = portfolio.equity_path(symbols, prices)
        if equity is None:  # several positions open: the chain, tick by tick
            return i
        quiet = self.risk.quiet_rows(equity, symbols, prices, portfolio)
        if quiet == 0:
            return i
        k = i + quiet
        equity = equity[:quiet]
        portfolio.mark_run(batch.symbols[i:k], batch.prices[i:k], batch.ts[i:k], equity)
        self.risk.observe(equity)
        holding = int(np.count_nonzero(side[i:k]))  # confident, and already that way
        if holding:
            self.outcomes[SAME_DIRECTION] += holding
        if quiet - holding:
            self.outcomes[BELOW_THRESHOLD] += quiet - holding
        for symbol in dict.fromkeys(batch.symbols[i:k].tolist()):
            out.positions[symbol] = portfolio.position(symbol)
        return k

    def _step(self, signal: Signal, out: _Out) -> None:
        portfolio, broker, risk = self.portfolio, self.broker, self.risk
        symbol, ts, price = signal.symbol, signal.ts, signal.price
        # Orders from earlier ticks fill at this one; then marks, protective orders.
        filled = broker.on_tick(symbol, ts, price)
        for fill in filled:
            portfolio.apply(fill)
        out.fills.extend(filled)
        portfolio.mark(symbol, price, ts)
        for order in risk.on_mark(portfolio, {symbol: price}, ts, signal.source, broker.pending()):
            broker.submit(order)
            out.orders.append(order)
        held = portfolio.quantity(symbol) + broker.pending_quantity(symbol)
        proposal = self.strategy.decide(signal, held)
        if proposal.order is None:
            assert proposal.reason is not None
            self.outcomes[proposal.reason] += 1
            if self.config.record_holds:
                out.decisions.append(Decision.hold(signal, proposal.reason, risk.state))
        else:
            check = risk.check(proposal.order, portfolio, price, ts, broker.pending())
            decision = Decision.checked(signal, proposal.order, check.reason, risk.state)
            self.outcomes[decision.reason] += 1
            out.decisions.append(decision)
            if check.accepted:
                broker.submit(proposal.order)
                out.orders.append(proposal.order)
        out.positions[symbol] = portfolio.position(symbol)

    def _finish(self, out: _Out) -> LedgerBatch:
        batch = LedgerBatch(
            decisions=out.decisions,
            orders=out.orders,
            fills=out.fills,
            positions=list(out.positions.values()),
            risk_events=self.risk.new_events(),
        )
        if self.ledger is not None:
            self.ledger.record(batch)
        return batch

    # -- state ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The engine's state (positions, pending orders, risk state and counters, decision
        counts) as bytes, to :meth:`restore` after a restart. Configuration is not in it,
        and neither is the equity curve: the ledger's fills give that back."""
        state = {
            "version": _SNAPSHOT_VERSION,
            "portfolio": self.portfolio,
            "broker": self.broker,
            "risk": self.risk,
            "outcomes": self.outcomes,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(
        cls,
        snapshot: bytes,
        config: TradingConfig | None = None,
        ledger: Ledger | None = None,
        **kwargs: Any,
    ) -> TradingEngine:
        """An engine with ``config`` and the state of ``snapshot``. The risk manager goes
        on in the state it was in (a halt stays a halt) under ``config``'s limits."""
        engine = cls(config, ledger, **kwargs)
        # Only rayfin writes snapshots, into its own ledger database.
        state = pickle.loads(snapshot)
        if not isinstance(state, dict) or state.get("version") != _SNAPSHOT_VERSION:
            raise TradingError(
                "TradingEngine.restore: the snapshot is from another rayfin version "
                f"(format {state.get('version') if isinstance(state, dict) else '?'}, "
                f"this one reads {_SNAPSHOT_VERSION})"
            )
        engine.portfolio.restore_from(state["portfolio"])
        engine.broker.restore_from(state["broker"])
        engine.risk.restore_from(state["risk"])
        engine.outcomes = state["outcomes"]
        return engine


class Trader:
    """A model in front of a :class:`TradingEngine`: feature rows in, decisions out."""

    def __init__(self, model: Model, engine: TradingEngine, *, topic: str = "ticks") -> None:
        self.model = model
        self.engine = engine
        self.topic = topic  # the source topic of the feature rows, for idempotency keys

    def on_features(
        self, features: pd.DataFrame | Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, LedgerBatch]:
        """Score a micro-batch of tick-feature rows (engine columns, in arrival order, with
        ``partition`` and ``offset`` of their source records; a DataFrame or a mapping of
        column arrays) and trade on it; returns the probabilities ``[n, 3]`` and the
        recorded batch. The ``sentiment`` column (neutral 0.0 where absent or NaN) goes to
        the model and into the decisions."""
        missing = [c for c in _SOURCE_COLUMNS if c not in features]
        if missing:
            raise TradingError(f"feature rows lack the columns {missing}")
        if len(features["ts"]) == 0:
            return np.empty((0, 3)), self.engine.on_signals([])
        sentiment = sentiment_input(features)
        probs = self.model.predict_proba(features, sentiment)
        batch = SignalBatch(
            self.topic,
            _column(features, "symbol").astype(object),
            _column(features, "ts").astype(np.int64, copy=False),
            _column(features, "price").astype(np.float64, copy=False),
            probs,
            _column(features, "partition").astype(np.int64, copy=False),
            _column(features, "offset").astype(np.int64, copy=False),
            sentiment,
        )
        return probs, self.engine.on_batch(batch)


def _column(features: pd.DataFrame | Mapping[str, np.ndarray], name: str) -> np.ndarray:
    values = features[name]
    return values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
