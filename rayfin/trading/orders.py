"""The trading domain's types and vocabularies: signals, orders, fills, decisions, instruments.

Everything is a frozen, slotted dataclass validated on construction, so a bad value fails
where it is made (with :class:`~rayfin.errors.TradingError`), not three modules later.
Times (``ts``) are event times in integer nanoseconds since the epoch, UTC, the ticks' own
clock: nothing in :mod:`rayfin.trading` reads the wall clock, so a backtest replays exactly.

Idempotency: every order and decision carries the :class:`SourceKey` of the Kafka record
that caused it, and an order's id is derived from that key, its purpose and its symbol, so
replaying the same records after a crash recreates the same ids and the ledger can ignore
what it already holds.

Reason vocabularies (a :class:`Decision`'s ``reason`` is always one of these):

* :data:`HOLD_REASONS`, why the strategy proposed nothing: ``below_threshold``,
  ``same_direction``.
* :data:`REJECT_REASONS`, why the risk manager refused a proposed order: ``halted``,
  ``reducing_only``, ``rate_limited``, ``max_open_positions``, ``max_notional_symbol``,
  ``max_notional_total``.
* :data:`ACCEPTED`, the order passed the risk checks and was submitted.

:data:`RISK_EVENT_REASONS` says why the risk manager changed state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from rayfin.errors import TradingError

__all__ = [
    "ACCEPTED",
    "BELOW_THRESHOLD",
    "CME_EQUITY_INDEX_FUTURES",
    "DECISION_REASONS",
    "DRAWDOWN_RECOVERED",
    "HALTED",
    "HOLD_REASONS",
    "MANUAL_RESET",
    "MAX_DRAWDOWN",
    "MAX_NOTIONAL_SYMBOL",
    "MAX_NOTIONAL_TOTAL",
    "MAX_OPEN_POSITIONS",
    "RATE_LIMITED",
    "REDUCE_DRAWDOWN",
    "REDUCING_ONLY",
    "REJECT_REASONS",
    "RISK_EVENT_REASONS",
    "SAME_DIRECTION",
    "Action",
    "Decision",
    "Fill",
    "Instrument",
    "Instruments",
    "Order",
    "Purpose",
    "RiskState",
    "Side",
    "Signal",
    "SourceKey",
    "order_id",
]

# --- Reason vocabularies -------------------------------------------------------------------

BELOW_THRESHOLD = "below_threshold"
"""Neither P(up) nor P(down) reached the strategy's threshold."""
SAME_DIRECTION = "same_direction"
"""Already positioned in the signal's direction, with nothing to add."""
HOLD_REASONS: tuple[str, ...] = (BELOW_THRESHOLD, SAME_DIRECTION)

HALTED = "halted"
"""The kill switch tripped; every new order is refused until an explicit reset."""
REDUCING_ONLY = "reducing_only"
"""The manager is REDUCING and the order would not reduce the symbol's exposure."""
RATE_LIMITED = "rate_limited"
"""Too many orders accepted within the rolling event-time window."""
MAX_OPEN_POSITIONS = "max_open_positions"
"""The order would open a position in one symbol more than allowed."""
MAX_NOTIONAL_SYMBOL = "max_notional_symbol"
"""The symbol's notional after the order would exceed the per-symbol limit."""
MAX_NOTIONAL_TOTAL = "max_notional_total"
"""The notional summed over all symbols after the order would exceed the total limit."""
REJECT_REASONS: tuple[str, ...] = (
    HALTED,
    REDUCING_ONLY,
    RATE_LIMITED,
    MAX_OPEN_POSITIONS,
    MAX_NOTIONAL_SYMBOL,
    MAX_NOTIONAL_TOTAL,
)

ACCEPTED = "accepted"
"""The proposed order passed every risk check."""
DECISION_REASONS: tuple[str, ...] = (*HOLD_REASONS, *REJECT_REASONS, ACCEPTED)

REDUCE_DRAWDOWN = "reduce_drawdown"
"""Drawdown from peak equity reached the soft level: ACTIVE → REDUCING."""
MAX_DRAWDOWN = "max_drawdown"
"""Drawdown reached the hard level: the kill switch, → HALTED."""
DRAWDOWN_RECOVERED = "drawdown_recovered"
"""Drawdown fell back to the resume level: REDUCING → ACTIVE."""
MANUAL_RESET = "manual_reset"
"""An operator called ``reset()``: → ACTIVE, with peak equity re-based."""
RISK_EVENT_REASONS: tuple[str, ...] = (
    REDUCE_DRAWDOWN,
    MAX_DRAWDOWN,
    DRAWDOWN_RECOVERED,
    MANUAL_RESET,
)

# A Signal's probabilities may come out of float32 models; this much slack in their sum is
# rounding, more is a bug upstream.
_PROB_SUM_TOLERANCE = 1e-4


# --- Validation helpers ------------------------------------------------------------------


def _check_symbol(symbol: object, what: str) -> None:
    if not isinstance(symbol, str) or not symbol or symbol != symbol.strip():
        raise TradingError(f"{what}: symbol must be a non-empty string, got {symbol!r}")


def _check_ts(ts: object, what: str) -> None:
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise TradingError(f"{what}: ts must be an int of nanoseconds >= 0, got {ts!r}")


def _check_price(price: object, what: str) -> None:
    if (
        not isinstance(price, (int, float))
        or isinstance(price, bool)
        or not math.isfinite(price)
        or price <= 0
    ):
        raise TradingError(f"{what}: price must be a finite number > 0, got {price!r}")


def _check_quantity(quantity: object, what: str) -> None:
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
        raise TradingError(f"{what}: quantity must be an int > 0, got {quantity!r}")


# --- Enums ---------------------------------------------------------------------------------


class Side(IntEnum):
    """Order side; the value is the sign it gives a position change."""

    BUY = 1
    SELL = -1

    @property
    def opposite(self) -> Side:
        """The other side."""
        return Side(-self.value)


class Purpose(StrEnum):
    """Why an order exists. The strategy makes ``entry``, ``exit`` and ``reduce``; the risk
    manager makes the protective ``stop_loss``, ``take_profit`` and ``kill_switch``."""

    ENTRY = "entry"
    """Opens, adds to or reverses a position."""
    EXIT = "exit"
    """Closes a position the signal now opposes."""
    STOP_LOSS = "stop_loss"
    TAKE_PROFIT = "take_profit"
    KILL_SWITCH = "kill_switch"
    REDUCE = "reduce"
    """Cuts a position without closing it (trimming it back to the maximum quantity)."""


class RiskState(StrEnum):
    """The risk manager's trading state (after NautilusTrader's ``TradingState``)."""

    ACTIVE = "active"
    """Every order is checked against the limits."""
    REDUCING = "reducing"
    """Only orders that reduce a symbol's exposure pass."""
    HALTED = "halted"
    """Nothing passes; positions are flattened by ``kill_switch`` orders."""


class Action(StrEnum):
    """What the strategy wanted to do with a signal."""

    BUY = "buy"
    SELL = "sell"
    HOLD = "hold"


# --- Records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceKey:
    """The Kafka record that caused something: the idempotency key everywhere."""

    topic: str
    partition: int
    offset: int

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic:
            raise TradingError(f"SourceKey: topic must be a non-empty string, got {self.topic!r}")
        for name in ("partition", "offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TradingError(f"SourceKey: {name} must be an int >= 0, got {value!r}")

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


def order_id(source: SourceKey, purpose: Purpose | str, symbol: str) -> str:
    """The deterministic id of the order ``source`` caused for ``purpose`` on ``symbol``.

    The symbol is part of it because one record can cause orders on several symbols (the
    kill switch flattens them all at once).
    """
    return f"{source}:{Purpose(purpose).value}:{symbol}"


@dataclass(frozen=True, slots=True)
class Signal:
    """A model's view of one symbol at one tick: class probabilities (down, flat, up)."""

    symbol: str
    ts: int
    price: float
    """The last tick price, at which the strategy sizes and the risk manager values."""
    probs: tuple[float, float, float]
    source: SourceKey
    sentiment: float = 0.0
    """The news sentiment the model saw with this tick (neutral 0.0 without news)."""

    def __post_init__(self) -> None:
        _check_symbol(self.symbol, "Signal")
        _check_ts(self.ts, "Signal")
        _check_price(self.price, "Signal")
        if not isinstance(self.sentiment, int | float) or not math.isfinite(self.sentiment):
            raise TradingError(f"Signal: sentiment must be a finite number, got {self.sentiment!r}")
        object.__setattr__(self, "sentiment", float(self.sentiment))
        probs = tuple(float(p) for p in self.probs)
        if len(probs) != 3 or not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs):
            raise TradingError(
                f"Signal: probs must be three probabilities (down, flat, up), got {self.probs!r}"
            )
        if abs(sum(probs) - 1.0) > _PROB_SUM_TOLERANCE:
            raise TradingError(f"Signal: probs must sum to 1, got {self.probs!r}")
        object.__setattr__(self, "probs", probs)

    @property
    def p_down(self) -> float:
        return self.probs[0]

    @property
    def p_flat(self) -> float:
        return self.probs[1]

    @property
    def p_up(self) -> float:
        return self.probs[2]


@dataclass(frozen=True, slots=True)
class Order:
    """A market order for ``quantity`` contracts. Build it with :meth:`create` so its id
    follows from its source, purpose and symbol."""

    id: str
    symbol: str
    side: Side
    quantity: int
    ts: int
    purpose: Purpose
    source: SourceKey

    def __post_init__(self) -> None:
        _check_symbol(self.symbol, "Order")
        _check_quantity(self.quantity, "Order")
        _check_ts(self.ts, "Order")
        try:
            object.__setattr__(self, "side", Side(self.side))
            object.__setattr__(self, "purpose", Purpose(self.purpose))
        except ValueError as exc:
            raise TradingError(f"Order: {exc}") from None
        expected = order_id(self.source, self.purpose, self.symbol)
        if self.id != expected:
            raise TradingError(f"Order: id {self.id!r} does not match its source ({expected!r})")

    @classmethod
    def create(
        cls,
        symbol: str,
        side: Side,
        quantity: int,
        ts: int,
        purpose: Purpose | str,
        source: SourceKey,
    ) -> Order:
        """An order with its deterministic id."""
        _check_symbol(symbol, "Order")
        return cls(order_id(source, purpose, symbol), symbol, side, quantity, ts, purpose, source)

    @property
    def signed_quantity(self) -> int:
        """The position change this order makes when filled."""
        return int(self.side) * self.quantity


@dataclass(frozen=True, slots=True)
class Fill:
    """An order's execution. ``price`` includes slippage, ``fee`` is the total charged in
    account currency; ``source`` is the source of the order filled."""

    order_id: str
    symbol: str
    side: Side
    quantity: int
    price: float
    fee: float
    ts: int
    source: SourceKey

    def __post_init__(self) -> None:
        if not isinstance(self.order_id, str) or not self.order_id:
            raise TradingError(f"Fill: order_id must be a non-empty string, got {self.order_id!r}")
        _check_symbol(self.symbol, "Fill")
        _check_quantity(self.quantity, "Fill")
        _check_price(self.price, "Fill")
        _check_ts(self.ts, "Fill")
        if not math.isfinite(self.fee) or self.fee < 0:
            raise TradingError(f"Fill: fee must be a finite number >= 0, got {self.fee!r}")
        try:
            object.__setattr__(self, "side", Side(self.side))
        except ValueError as exc:
            raise TradingError(f"Fill: {exc}") from None

    @property
    def signed_quantity(self) -> int:
        """The position change this fill made."""
        return int(self.side) * self.quantity


@dataclass(frozen=True, slots=True)
class Decision:
    """What happened to one signal: the strategy's action, the order it proposed (if any),
    and whether the risk manager accepted it, with the reason (see the module docstring).

    A hold has no order, ``accepted=False`` and a :data:`HOLD_REASONS` reason; a refused
    order has a :data:`REJECT_REASONS` reason; an accepted order has :data:`ACCEPTED`.
    ``risk_state`` is the manager's state when it decided, ``sentiment`` the signal's. Build
    it with :meth:`hold` or :meth:`checked`.
    """

    ts: int
    symbol: str
    source: SourceKey
    price: float
    probs: tuple[float, float, float]
    action: Action
    order: Order | None
    accepted: bool
    reason: str
    risk_state: RiskState
    sentiment: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "action", Action(self.action))
            object.__setattr__(self, "risk_state", RiskState(self.risk_state))
        except ValueError as exc:
            raise TradingError(f"Decision: {exc}") from None
        if self.action is Action.HOLD:
            if self.order is not None or self.accepted or self.reason not in HOLD_REASONS:
                raise TradingError(
                    "Decision: a hold has no order, is not accepted and has a reason in "
                    f"{HOLD_REASONS}, got order={self.order!r}, reason={self.reason!r}"
                )
            return
        if self.order is None:
            raise TradingError(f"Decision: action {self.action.value!r} needs its order")
        if self.order.symbol != self.symbol or self.order.source != self.source:
            raise TradingError("Decision: the order is for another symbol or source")
        if (self.order.side is Side.BUY) != (self.action is Action.BUY):
            raise TradingError(
                f"Decision: action {self.action.value!r} disagrees with the order's side"
            )
        if self.accepted != (self.reason == ACCEPTED) or self.reason not in DECISION_REASONS:
            raise TradingError(
                f"Decision: accepted={self.accepted} with reason {self.reason!r}; an accepted "
                f"order has reason {ACCEPTED!r}, a refused one a reason in {REJECT_REASONS}"
            )

    @classmethod
    def hold(cls, signal: Signal, reason: str, risk_state: RiskState) -> Decision:
        """The strategy proposed nothing for ``signal``, for ``reason``."""
        return cls(
            signal.ts,
            signal.symbol,
            signal.source,
            signal.price,
            signal.probs,
            Action.HOLD,
            None,
            False,
            reason,
            risk_state,
            signal.sentiment,
        )

    @classmethod
    def checked(
        cls, signal: Signal, order: Order, reason: str | None, risk_state: RiskState
    ) -> Decision:
        """The strategy proposed ``order``; ``reason`` is the risk manager's refusal, or
        None when it accepted the order."""
        return cls(
            signal.ts,
            signal.symbol,
            signal.source,
            signal.price,
            signal.probs,
            Action.BUY if order.side is Side.BUY else Action.SELL,
            order,
            reason is None,
            ACCEPTED if reason is None else reason,
            risk_state,
            signal.sentiment,
        )


# --- Instruments ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instrument:
    """A contract's specification: the price grid and the currency value of one point."""

    symbol: str
    tick_size: float
    multiplier: float
    """Account currency per point of price per contract (ES: 50 USD)."""

    def __post_init__(self) -> None:
        _check_symbol(self.symbol, "Instrument")
        for name in ("tick_size", "multiplier"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise TradingError(f"Instrument {self.symbol}: {name} must be > 0, got {value!r}")

    def notional(self, quantity: int, price: float) -> float:
        """The currency value of ``quantity`` contracts (either sign) at ``price``."""
        return abs(quantity) * price * self.multiplier


CME_EQUITY_INDEX_FUTURES: tuple[Instrument, ...] = (
    Instrument("ES", 0.25, 50.0),
    Instrument("MES", 0.25, 5.0),
    Instrument("NQ", 0.25, 20.0),
    Instrument("MNQ", 0.25, 2.0),
)
"""CME E-mini and Micro E-mini S&P 500 and Nasdaq-100 futures (contract specs)."""


class Instruments:
    """Instrument lookup by symbol.

    By default it knows :data:`CME_EQUITY_INDEX_FUTURES` and an unknown symbol is an error,
    because guessing a multiplier silently scales every P&L and notional figure. Pass
    ``default_tick_size`` (and ``default_multiplier``, 1 by default: a share) to accept any
    symbol on those terms instead, as the synthetic equity market needs
    (:class:`~rayfin.stream.simulate.MarketSimulator` quotes on a 0.01 grid).
    """

    __slots__ = ("_by_symbol", "default_multiplier", "default_tick_size")

    def __init__(
        self,
        instruments: Iterable[Instrument] = CME_EQUITY_INDEX_FUTURES,
        *,
        default_tick_size: float | None = None,
        default_multiplier: float = 1.0,
    ) -> None:
        self._by_symbol: dict[str, Instrument] = {}
        for instrument in instruments:
            if instrument.symbol in self._by_symbol:
                raise TradingError(f"Instruments: {instrument.symbol} is listed twice")
            self._by_symbol[instrument.symbol] = instrument
        if default_tick_size is not None:
            # Validates both defaults once, here, rather than on the first unknown symbol.
            Instrument("DEFAULT", default_tick_size, default_multiplier)
        self.default_tick_size = default_tick_size
        self.default_multiplier = default_multiplier

    def __getitem__(self, symbol: str) -> Instrument:
        instrument = self._by_symbol.get(symbol)
        if instrument is not None:
            return instrument
        if self.default_tick_size is None:
            raise TradingError(
                f"unknown instrument {symbol!r}: known are {sorted(self._by_symbol)}; pass it "
                "to Instruments(...), or set default_tick_size to accept any symbol"
            )
        instrument = Instrument(symbol, self.default_tick_size, self.default_multiplier)
        self._by_symbol[symbol] = instrument
        return instrument

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._by_symbol or (
            self.default_tick_size is not None and isinstance(symbol, str)
        )
