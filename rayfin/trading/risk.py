"""Pre-trade checks, protective orders and the kill switch, in explicit trading states.

Modelled on NautilusTrader's trading states, :class:`RiskManager` is always in one
:class:`~rayfin.trading.orders.RiskState`:

* ``ACTIVE``: an order passes if it breaks no limit of :class:`RiskLimits`.
* ``REDUCING``: entered when drawdown reaches ``reduce_drawdown``; only orders that reduce
  their symbol's exposure pass. It goes back to ACTIVE by itself once drawdown is back at
  or below ``resume_drawdown`` (half of ``reduce_drawdown`` unless set): the gap keeps the
  state from flapping on every tick around one line.
* ``HALTED``: the kill switch, entered when drawdown reaches ``max_drawdown``. Every
  position is flattened with ``kill_switch`` orders and every new order is refused
  (``halted``) until an explicit :meth:`RiskManager.reset`.

Drawdown is measured from the peak equity the manager has seen since it started or was
last reset (not the portfolio's all-time peak), so that after a reset the account can
trade again from where it stands. Each state change is a :class:`RiskEvent`.

Everything runs on event time (the ticks' ``ts``), never the wall clock, so a backtest
replays the same decisions. The rate limit counts accepted orders in the window
``(now - rate_window_ns, now]``.

Per tick of a symbol, the intended order of calls is::

    fills = broker.on_tick(symbol, ts, price)          # orders from earlier ticks fill
    for fill in fills: portfolio.apply(fill)
    portfolio.mark(symbol, price, ts)
    for order in risk.on_mark(portfolio, {symbol: price}, ts, source, broker.pending()):
        broker.submit(order)                            # protective orders
    proposal = strategy.decide(signal, portfolio.quantity(symbol)
                               + broker.pending_quantity(symbol))
    if proposal.order:
        check = risk.check(proposal.order, portfolio, price, ts, broker.pending())
        if check.accepted: broker.submit(proposal.order)

``pending`` (orders submitted but not filled yet) matters: exposure is the position plus
pending orders, and protective orders flatten that, so a stop already on its way is not
sent twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from rayfin.errors import ConfigError, TradingError
from rayfin.trading.orders import (
    DRAWDOWN_RECOVERED,
    HALTED,
    MANUAL_RESET,
    MAX_DRAWDOWN,
    MAX_NOTIONAL_SYMBOL,
    MAX_NOTIONAL_TOTAL,
    MAX_OPEN_POSITIONS,
    RATE_LIMITED,
    REDUCE_DRAWDOWN,
    REDUCING_ONLY,
    REJECT_REASONS,
    RISK_EVENT_REASONS,
    Order,
    Purpose,
    RiskState,
    Side,
    SourceKey,
)
from rayfin.trading.pnl import Portfolio

__all__ = ["RiskCheck", "RiskEvent", "RiskLimits", "RiskManager", "RiskState"]

_SECOND_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RiskLimits:
    """The limits :class:`RiskManager` enforces; None turns a limit off.

    Notional is ``|quantity| × price × multiplier`` in account currency, counting pending
    orders. ``stop_loss`` and ``take_profit`` are in price points from the position's
    average entry. Drawdowns are fractions of peak equity, ``0 <= resume_drawdown <
    reduce_drawdown < max_drawdown < 1``. The defaults cap the damage of a runaway model
    (10 orders a second; REDUCING at 5 % drawdown, back to ACTIVE at 2.5 %; HALTED at
    10 %) and leave the size limits, which depend on the account and instrument, to the
    caller.
    """

    max_open_positions: int | None = None
    max_notional_per_symbol: float | None = None
    max_notional_total: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    reduce_drawdown: float | None = 0.05
    resume_drawdown: float | None = None
    max_drawdown: float | None = 0.10
    max_orders: int | None = 10
    rate_window_ns: int = _SECOND_NS

    def __post_init__(self) -> None:
        for name in ("max_open_positions", "max_orders"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(f"RiskLimits: {name} must be an int >= 1 or None, got {value!r}")
        for name in ("max_notional_per_symbol", "max_notional_total", "stop_loss", "take_profit"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"RiskLimits: {name} must be > 0 or None, got {value!r}")
        for name in ("reduce_drawdown", "max_drawdown"):
            value = getattr(self, name)
            if value is not None and not (0 < value < 1):
                raise ConfigError(f"RiskLimits: {name} must be in (0, 1) or None, got {value!r}")
        if (
            self.reduce_drawdown is not None
            and self.max_drawdown is not None
            and self.reduce_drawdown >= self.max_drawdown
        ):
            raise ConfigError(
                f"RiskLimits: reduce_drawdown ({self.reduce_drawdown}) must be below "
                f"max_drawdown ({self.max_drawdown})"
            )
        if self.resume_drawdown is not None and not (
            self.reduce_drawdown is not None and 0 <= self.resume_drawdown < self.reduce_drawdown
        ):
            raise ConfigError(
                f"RiskLimits: resume_drawdown ({self.resume_drawdown}) must be >= 0 and below "
                f"reduce_drawdown ({self.reduce_drawdown})"
            )
        if not isinstance(self.rate_window_ns, int) or self.rate_window_ns < 1:
            raise ConfigError(
                f"RiskLimits: rate_window_ns must be an int >= 1, got {self.rate_window_ns!r}"
            )


@dataclass(frozen=True, slots=True)
class RiskCheck:
    """The verdict on one order; ``reason`` (from :data:`~rayfin.trading.orders.
    REJECT_REASONS`) says why it was refused, None when accepted."""

    accepted: bool
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.accepted != (self.reason is None) or (
            self.reason is not None and self.reason not in REJECT_REASONS
        ):
            raise TradingError(
                f"RiskCheck: accepted={self.accepted} with reason {self.reason!r}; a refusal "
                f"needs a reason in {REJECT_REASONS}, an acceptance none"
            )


@dataclass(frozen=True, slots=True)
class RiskEvent:
    """A state change: from, to, why (a :data:`~rayfin.trading.orders.RISK_EVENT_REASONS`
    value) and when, with the equity and drawdown that caused it. ``source`` is the record
    being processed then; None for a manual reset."""

    ts: int
    from_state: RiskState
    to_state: RiskState
    reason: str
    equity: float
    drawdown: float
    source: SourceKey | None = None

    def __post_init__(self) -> None:
        if self.reason not in RISK_EVENT_REASONS:
            raise TradingError(f"RiskEvent: {self.reason!r} is not one of {RISK_EVENT_REASONS}")
        object.__setattr__(self, "from_state", RiskState(self.from_state))
        object.__setattr__(self, "to_state", RiskState(self.to_state))


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def _pending_by_symbol(pending: Iterable[Order]) -> dict[str, int]:
    by_symbol: dict[str, int] = {}
    for order in pending:
        by_symbol[order.symbol] = by_symbol.get(order.symbol, 0) + order.signed_quantity
    return by_symbol


class RiskManager:
    """Checks orders against :class:`RiskLimits` and protects positions (see the module
    docstring). One manager per account; not thread-safe."""

    __slots__ = ("_accepted_ts", "_events", "_peak", "_state", "_taken", "limits")

    def __init__(self, limits: RiskLimits | None = None) -> None:
        self.limits = limits or RiskLimits()
        self._state = RiskState.ACTIVE
        self._peak: float | None = None  # None until the first mark (or after a reset)
        self._accepted_ts: deque[int] = deque()
        self._events: list[RiskEvent] = []
        self._taken = 0

    @property
    def state(self) -> RiskState:
        return self._state

    @property
    def events(self) -> list[RiskEvent]:
        """Every state change so far, oldest first."""
        return list(self._events)

    def new_events(self) -> list[RiskEvent]:
        """The state changes since the last call: what the next ledger batch should hold."""
        fresh = self._events[self._taken :]
        self._taken = len(self._events)
        return fresh

    # --- pre-trade ---------------------------------------------------------------------------

    def check(
        self,
        order: Order,
        portfolio: Portfolio,
        price: float,
        now_ns: int,
        pending: Iterable[Order] = (),
    ) -> RiskCheck:
        """Whether ``order`` (valued at ``price``) may be submitted now. An accepted order
        counts toward the rate limit, so check each order once, just before submitting it;
        ``pending`` are the orders submitted earlier and not filled yet."""
        if not (isinstance(price, (int, float)) and math.isfinite(price) and price > 0):
            raise TradingError(f"check {order.id}: price must be a finite number > 0")
        if self._state is RiskState.HALTED:
            return RiskCheck(False, HALTED)

        by_symbol = _pending_by_symbol(pending)
        projected = portfolio.quantity(order.symbol) + by_symbol.get(order.symbol, 0)
        after = projected + order.signed_quantity
        # Reducing: against the position and no larger than it (a reversal opens exposure).
        reduces = _sign(order.signed_quantity) == -_sign(projected) and order.quantity <= abs(
            projected
        )
        if self._state is RiskState.REDUCING and not reduces:
            return RiskCheck(False, REDUCING_ONLY)

        limits = self.limits
        window_start = now_ns - limits.rate_window_ns
        while self._accepted_ts and self._accepted_ts[0] <= window_start:
            self._accepted_ts.popleft()
        if limits.max_orders is not None and len(self._accepted_ts) >= limits.max_orders:
            return RiskCheck(False, RATE_LIMITED)

        # Less exposure can never break an exposure limit, so only additions are sized.
        if not reduces:
            reason = self._exposure_breach(
                order.symbol, projected, after, price, portfolio, by_symbol
            )
            if reason is not None:
                return RiskCheck(False, reason)
        self._accepted_ts.append(now_ns)
        return RiskCheck(True)

    def _exposure_breach(
        self,
        symbol: str,
        projected: int,
        after: int,
        price: float,
        portfolio: Portfolio,
        pending: Mapping[str, int],
    ) -> str | None:
        limits = self.limits
        others = {
            s: q
            for s in set(portfolio.open_symbols()) | set(pending)
            if s != symbol and (q := portfolio.quantity(s) + pending.get(s, 0)) != 0
        }
        if (
            limits.max_open_positions is not None
            and projected == 0
            and after != 0
            and len(others) >= limits.max_open_positions
        ):
            return MAX_OPEN_POSITIONS
        notional = portfolio.instruments[symbol].notional(after, price)
        if limits.max_notional_per_symbol is not None and notional > limits.max_notional_per_symbol:
            return MAX_NOTIONAL_SYMBOL
        if limits.max_notional_total is not None:
            for other, quantity in others.items():
                mark = portfolio.last_price(other)
                if mark is None:
                    raise TradingError(
                        f"{other} has a position or pending order but was never marked; mark "
                        "every symbol's ticks in the portfolio before checking orders"
                    )
                notional += portfolio.instruments[other].notional(quantity, mark)
            if notional > limits.max_notional_total:
                return MAX_NOTIONAL_TOTAL
        return None

    # --- on every mark -----------------------------------------------------------------------

    def on_mark(
        self,
        portfolio: Portfolio,
        prices: Mapping[str, float],
        now_ns: int,
        source: SourceKey,
        pending: Iterable[Order] = (),
    ) -> list[Order]:
        """Update the state from the drawdown at ``prices`` and return the protective orders
        to submit: ``kill_switch`` orders flattening everything when HALTED, else
        ``stop_loss`` / ``take_profit`` orders for the symbols in ``prices`` whose move from
        average entry crossed a limit. ``source`` (the record being processed) makes the
        orders' ids; each order flattens position plus ``pending``, so none is sent twice."""
        equity = portfolio.equity_at(prices)
        self._peak = equity if self._peak is None else max(self._peak, equity)
        drawdown = 1.0 if self._peak <= 0 else max(0.0, (self._peak - equity) / self._peak)
        self._update_state(drawdown, equity, now_ns, source)

        by_symbol = _pending_by_symbol(pending)
        if self._state is RiskState.HALTED:
            kills: list[Order] = []
            for symbol in sorted(set(portfolio.open_symbols()) | set(by_symbol)):
                kill = self._flatten(
                    symbol, portfolio, by_symbol, Purpose.KILL_SWITCH, now_ns, source
                )
                if kill is not None:
                    kills.append(kill)
            return kills

        limits = self.limits
        if limits.stop_loss is None and limits.take_profit is None:
            return []
        orders: list[Order] = []
        for symbol in sorted(prices):
            position = portfolio.position(symbol)
            if position.quantity == 0:
                continue
            move = (prices[symbol] - position.avg_price) * _sign(position.quantity)
            if limits.stop_loss is not None and move <= -limits.stop_loss:
                purpose = Purpose.STOP_LOSS
            elif limits.take_profit is not None and move >= limits.take_profit:
                purpose = Purpose.TAKE_PROFIT
            else:
                continue
            order = self._flatten(symbol, portfolio, by_symbol, purpose, now_ns, source)
            if order is not None:
                orders.append(order)
        return orders

    # --- runs of ticks that change nothing (the engine's fast path) --------------------------

    def quiet_rows(
        self,
        equity: np.ndarray,
        symbols: np.ndarray,
        prices: np.ndarray,
        portfolio: Portfolio,
    ) -> int:
        """How many leading ticks of a run :meth:`on_mark` would pass without a state change
        or a protective order, given the ``equity`` each would see (positions unchanged,
        nothing pending). Pure: call :meth:`observe` for the ticks then skipped."""
        n = len(equity)
        if self._state is RiskState.HALTED:
            # Halted and flat, nothing happens; halted with a position, a kill is due.
            return n if not portfolio.open_symbols() else 0
        peaks = np.maximum.accumulate(equity)
        if self._peak is not None:
            peaks = np.maximum(peaks, self._peak)
        with np.errstate(divide="ignore", invalid="ignore"):
            drawdown = np.where(peaks <= 0, 1.0, np.maximum(0.0, (peaks - equity) / peaks))
        limits = self.limits
        change = np.zeros(n, dtype=bool)
        if limits.max_drawdown is not None:
            change |= drawdown >= limits.max_drawdown
        if self._state is RiskState.ACTIVE and limits.reduce_drawdown is not None:
            change |= drawdown >= limits.reduce_drawdown
        if self._state is RiskState.REDUCING:
            change |= drawdown <= self._resume_drawdown()
        if limits.stop_loss is not None or limits.take_profit is not None:
            for symbol in portfolio.open_symbols():
                position = portfolio.position(symbol)
                move = (prices - position.avg_price) * _sign(position.quantity)
                hit = np.zeros(n, dtype=bool)
                if limits.stop_loss is not None:
                    hit |= move <= -limits.stop_loss
                if limits.take_profit is not None:
                    hit |= move >= limits.take_profit
                change |= hit & (symbols == symbol)
        return int(np.argmax(change)) if change.any() else n

    def observe(self, equity: np.ndarray) -> None:
        """Take in the peak of a run of marks that :meth:`quiet_rows` passed."""
        if len(equity):
            top = float(equity.max())
            self._peak = top if self._peak is None else max(self._peak, top)

    def _update_state(self, drawdown: float, equity: float, now_ns: int, source: SourceKey) -> None:
        limits = self.limits
        if self._state is RiskState.HALTED:
            return
        if limits.max_drawdown is not None and drawdown >= limits.max_drawdown:
            self._transition(RiskState.HALTED, MAX_DRAWDOWN, equity, drawdown, now_ns, source)
        elif limits.reduce_drawdown is not None and drawdown >= limits.reduce_drawdown:
            if self._state is RiskState.ACTIVE:
                self._transition(
                    RiskState.REDUCING, REDUCE_DRAWDOWN, equity, drawdown, now_ns, source
                )
        elif self._state is RiskState.REDUCING and drawdown <= self._resume_drawdown():
            self._transition(RiskState.ACTIVE, DRAWDOWN_RECOVERED, equity, drawdown, now_ns, source)

    def _resume_drawdown(self) -> float:
        limits = self.limits
        if limits.resume_drawdown is not None:
            return limits.resume_drawdown
        # Only reachable if ``limits`` was replaced by one without a reduce level.
        return limits.reduce_drawdown / 2 if limits.reduce_drawdown is not None else 1.0

    def _transition(
        self,
        to: RiskState,
        reason: str,
        equity: float,
        drawdown: float,
        now_ns: int,
        source: SourceKey | None,
    ) -> None:
        self._events.append(RiskEvent(now_ns, self._state, to, reason, equity, drawdown, source))
        self._state = to

    @staticmethod
    def _flatten(
        symbol: str,
        portfolio: Portfolio,
        pending: Mapping[str, int],
        purpose: Purpose,
        now_ns: int,
        source: SourceKey,
    ) -> Order | None:
        projected = portfolio.quantity(symbol) + pending.get(symbol, 0)
        if projected == 0:
            return None
        side = Side.SELL if projected > 0 else Side.BUY
        return Order.create(symbol, side, abs(projected), now_ns, purpose, source)

    # --- operator ----------------------------------------------------------------------------

    def restore_from(self, saved: RiskManager) -> None:
        """Take the state of ``saved`` (an unpickled snapshot): its trading state, peak
        equity, rate-limit window and events. This manager's limits stay, so a restart can
        change them; a halt stays a halt until :meth:`reset`."""
        self._state = saved._state
        self._peak = saved._peak
        self._accepted_ts = saved._accepted_ts
        self._events = saved._events
        self._taken = saved._taken

    def reset(self, portfolio: Portfolio, now_ns: int) -> None:
        """Return to ACTIVE (from HALTED or REDUCING) and measure drawdown from the
        portfolio's equity now. A no-op when already ACTIVE."""
        if self._state is RiskState.ACTIVE:
            return
        equity = portfolio.equity
        drawdown = (
            0.0 if self._peak is None or self._peak <= 0 else (self._peak - equity) / self._peak
        )
        self._transition(RiskState.ACTIVE, MANUAL_RESET, equity, max(0.0, drawdown), now_ns, None)
        self._peak = equity
