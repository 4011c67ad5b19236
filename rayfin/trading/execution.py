"""A simulated broker: market orders fill at the next tick of their symbol, with slippage
and fees.

Filling at the *next* tick (the first whose ``ts`` is strictly after the order's) rather
than the tick that produced the signal keeps a backtest from trading at a price it could
only have seen: the decision takes time, and the price it saw is gone by then. Orders of a
symbol fill in the order they were submitted, each for its whole quantity (the simulator
assumes the touch is deep enough; size shows up as extra slippage instead).

Defaults, for ES (E-mini S&P 500 futures, 0.25-point ticks, 50 USD a point):

* :class:`FeeModel`: 2.25 USD per contract per side: a retail all-in rate, e.g. Interactive
  Brokers' tiered 0.85 commission + 1.38 CME exchange fee + 0.02 NFA fee. A round turn
  costs 4.50.
* :class:`SlippageModel`: one tick against the taker (buys fill a tick above the last
  trade, sells a tick below): crossing ES's usually one-tick spread. Optionally one more
  tick per ``contracts_per_extra_tick`` contracts, for orders that eat into the book.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from rayfin.errors import ConfigError, TradingError
from rayfin.trading.orders import Fill, Instrument, Instruments, Order

__all__ = ["FeeModel", "SimulatedBroker", "SlippageModel"]


@dataclass(frozen=True, slots=True)
class FeeModel:
    """A flat fee per contract per fill, in account currency (see the module docstring);
    ``per_symbol`` overrides it for some symbols (a micro contract costs far less)."""

    per_contract: float = 2.25
    per_symbol: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, value in (("per_contract", self.per_contract), *self.per_symbol.items()):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"FeeModel: the fee for {what} must be >= 0, got {value!r}")

    def fee(self, symbol: str, quantity: int) -> float:
        """The fee for filling ``quantity`` contracts of ``symbol``."""
        return self.per_symbol.get(symbol, self.per_contract) * quantity


@dataclass(frozen=True, slots=True)
class SlippageModel:
    """Whole ticks of slippage against the taker: ``ticks``, plus one per
    ``contracts_per_extra_tick`` contracts when set. Whole ticks keep fills on the grid."""

    ticks: int = 1
    contracts_per_extra_tick: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ticks, int) or self.ticks < 0:
            raise ConfigError(f"SlippageModel: ticks must be an int >= 0, got {self.ticks!r}")
        if self.contracts_per_extra_tick is not None and (
            not isinstance(self.contracts_per_extra_tick, int) or self.contracts_per_extra_tick < 1
        ):
            raise ConfigError(
                "SlippageModel: contracts_per_extra_tick must be an int >= 1 or None, got "
                f"{self.contracts_per_extra_tick!r}"
            )

    def slipped_ticks(self, quantity: int) -> int:
        """How many ticks an order of ``quantity`` contracts pays."""
        extra = 0
        if self.contracts_per_extra_tick is not None:
            extra = quantity // self.contracts_per_extra_tick
        return self.ticks + extra

    def fill_price(self, instrument: Instrument, order: Order, price: float) -> float:
        """The price ``order`` fills at when the market trades at ``price``."""
        offset = self.slipped_ticks(order.quantity) * instrument.tick_size
        # A sell slipping below zero would be a nonsensical price; one tick is the floor.
        return max(price + int(order.side) * offset, instrument.tick_size)


class SimulatedBroker:
    """Queues market orders and fills them at their symbol's next tick."""

    __slots__ = ("_pending", "fees", "instruments", "slippage")

    def __init__(
        self,
        instruments: Instruments | None = None,
        fees: FeeModel | None = None,
        slippage: SlippageModel | None = None,
    ) -> None:
        self.instruments = instruments if instruments is not None else Instruments()
        self.fees = fees or FeeModel()
        self.slippage = slippage or SlippageModel()
        # Insertion-ordered: orders fill in submission order; symbols in first-seen order.
        self._pending: dict[str, dict[str, Order]] = {}

    def submit(self, order: Order) -> None:
        """Queue ``order`` to fill at the first tick of its symbol after ``order.ts``."""
        self.instruments[order.symbol]  # an unknown symbol fails now, not at fill time
        queue = self._pending.setdefault(order.symbol, {})
        if order.id in queue:
            raise TradingError(f"order {order.id} is already pending")
        queue[order.id] = order

    def cancel(self, order_id: str) -> Order | None:
        """Withdraw a pending order; returns it, or None if it is not pending."""
        for queue in self._pending.values():
            if order_id in queue:
                return queue.pop(order_id)
        return None

    def pending(self, symbol: str | None = None) -> list[Order]:
        """Orders not filled yet, of ``symbol`` or all, in submission order per symbol."""
        if symbol is not None:
            return list(self._pending.get(symbol, {}).values())
        return [order for queue in self._pending.values() for order in queue.values()]

    @property
    def idle(self) -> bool:
        """Whether no order is pending."""
        return not any(self._pending.values())

    def restore_from(self, saved: SimulatedBroker) -> None:
        """Take the pending orders of ``saved`` (an unpickled snapshot); this broker's
        instruments, fee and slippage models stay."""
        self._pending = saved._pending

    def pending_quantity(self, symbol: str) -> int:
        """The signed position change pending orders of ``symbol`` will make."""
        return sum(order.signed_quantity for order in self._pending.get(symbol, {}).values())

    def on_tick(self, symbol: str, ts: int, price: float) -> list[Fill]:
        """Fill the pending orders of ``symbol`` placed before ``ts``, at the trade
        ``price`` plus slippage; returns the fills in submission order."""
        if not (isinstance(price, (int, float)) and math.isfinite(price) and price > 0):
            raise TradingError(f"tick {symbol}@{ts}: price must be a finite number > 0")
        queue = self._pending.get(symbol)
        if not queue:
            return []
        instrument = self.instruments[symbol]
        fills: list[Fill] = []
        for order in [o for o in queue.values() if o.ts < ts]:
            del queue[order.id]
            fills.append(
                Fill(
                    order_id=order.id,
                    symbol=symbol,
                    side=order.side,
                    quantity=order.quantity,
                    price=self.slippage.fill_price(instrument, order, price),
                    fee=self.fees.fee(symbol, order.quantity),
                    ts=ts,
                    source=order.source,
                )
            )
        return fills
