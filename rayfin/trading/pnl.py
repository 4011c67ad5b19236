"""Positions and P&L from fills and marks.

:class:`Portfolio` keeps, per symbol, the signed quantity in contracts and the average
entry price, and accounts in the instrument's currency (points × contracts × multiplier):

* **Adds** (a fill in the position's direction, or from flat) move the average entry to
  the quantity-weighted mean of the old average and the fill price.
* **Reductions** realize (fill price − average entry) × closed quantity × multiplier,
  signed by the position's direction; the average entry of what is left is unchanged.
* **Reversals** (a fill larger than the position, the other way) close the whole position
  as above, then open the remainder at the fill price.
* **Fees** are subtracted from realized P&L when the fill is applied.

Unrealized P&L marks each open position to its symbol's last price: the last
:meth:`Portfolio.mark`, or the last fill if that came later (a fill is a trade at its
price). Equity is initial cash + realized + unrealized; it is sampled into the equity
curve, and the peak and drawdown updated, on every fill and every mark.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayfin.errors import TradingError
from rayfin.trading.orders import Fill, Instruments

__all__ = ["DEFAULT_INITIAL_CASH", "PnLSummary", "Portfolio", "Position"]

DEFAULT_INITIAL_CASH = 1_000_000.0
"""Enough for a few ES contracts (one is about 250,000 USD notional at 5,000 points)."""


@dataclass(frozen=True, slots=True)
class Position:
    """A snapshot of one symbol's position. ``avg_price`` is 0 when flat; ``realized_pnl``
    is after this symbol's ``fees``; ``ts`` is the event time of its last fill or mark."""

    symbol: str
    quantity: int
    avg_price: float
    realized_pnl: float
    fees: float
    last_price: float | None
    unrealized_pnl: float
    ts: int


@dataclass(frozen=True, slots=True)
class PnLSummary:
    """Account-level P&L at one moment. ``drawdown`` is a fraction of ``peak_equity``."""

    realized_pnl: float
    unrealized_pnl: float
    fees: float
    equity: float
    peak_equity: float
    drawdown: float


class _Book:
    """One symbol's mutable accounting state."""

    __slots__ = ("avg_price", "fees", "last_price", "multiplier", "quantity", "realized", "ts")

    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier
        self.quantity = 0
        self.avg_price = 0.0
        self.realized = 0.0  # before fees
        self.fees = 0.0
        self.last_price: float | None = None
        self.ts = 0

    def unrealized(self, price: float | None) -> float:
        if self.quantity == 0 or price is None:
            return 0.0
        return (price - self.avg_price) * self.quantity * self.multiplier


class Portfolio:
    """Positions, P&L, equity and drawdown of one account (see the module docstring).

    ``max_curve_points`` bounds the equity curve kept in memory (oldest points dropped);
    None keeps every point, which suits backtests, not a process that runs for weeks.
    """

    __slots__ = ("_books", "_curve", "_peak", "initial_cash", "instruments")

    def __init__(
        self,
        initial_cash: float = DEFAULT_INITIAL_CASH,
        instruments: Instruments | None = None,
        *,
        max_curve_points: int | None = None,
    ) -> None:
        if not math.isfinite(initial_cash) or initial_cash <= 0:
            # Drawdown is a fraction of peak equity, meaningless unless equity starts > 0.
            raise TradingError(f"initial_cash must be a finite number > 0, got {initial_cash!r}")
        if max_curve_points is not None and max_curve_points < 1:
            raise TradingError(f"max_curve_points must be >= 1, got {max_curve_points!r}")
        self.initial_cash = float(initial_cash)
        self.instruments = instruments if instruments is not None else Instruments()
        self._books: dict[str, _Book] = {}
        self._curve: deque[tuple[int, float]] = deque(maxlen=max_curve_points)
        self._peak = self.initial_cash

    def _book(self, symbol: str) -> _Book:
        book = self._books.get(symbol)
        if book is None:
            book = self._books[symbol] = _Book(self.instruments[symbol].multiplier)
        return book

    # --- updates ---------------------------------------------------------------------------

    def apply(self, fill: Fill) -> None:
        """Book ``fill``: update the position, realize P&L and fees, sample equity."""
        book = self._book(fill.symbol)
        held, signed = book.quantity, fill.signed_quantity
        if held == 0 or (held > 0) == (signed > 0):
            total = abs(held) + fill.quantity
            book.avg_price = (abs(held) * book.avg_price + fill.quantity * fill.price) / total
            book.quantity = held + signed
        else:
            closed = min(abs(held), fill.quantity)
            direction = 1 if held > 0 else -1
            book.realized += closed * (fill.price - book.avg_price) * direction * book.multiplier
            opened = fill.quantity - closed
            if opened:
                book.quantity = int(fill.side) * opened
                book.avg_price = fill.price
            else:
                book.quantity = held + signed
                if book.quantity == 0:
                    book.avg_price = 0.0
        book.fees += fill.fee
        book.last_price = fill.price
        book.ts = fill.ts
        self._sample(fill.ts)

    def mark(self, symbol: str, price: float, ts: int) -> None:
        """Value ``symbol`` at ``price`` from event time ``ts`` on; sample equity."""
        if not isinstance(price, (int, float)) or not math.isfinite(price) or price <= 0:
            raise TradingError(f"mark {symbol}: price must be a finite number > 0, got {price!r}")
        book = self._book(symbol)
        book.last_price = float(price)
        book.ts = ts
        self._sample(ts)

    def equity_path(self, symbols: np.ndarray, prices: np.ndarray) -> np.ndarray | None:
        """The equity :meth:`mark` would sample on each tick of a run (``symbols[k]`` at
        ``prices[k]``), positions staying as they are; nothing is changed. Computed with
        :meth:`equity`'s own arithmetic, so the numbers are identical; None when more than
        one position is open (summing several in numpy could round differently)."""
        n = len(prices)
        base = self.initial_cash + self.realized_pnl
        open_books = [(s, b) for s, b in self._books.items() if b.quantity != 0]
        if not open_books:
            return np.full(n, base)
        if len(open_books) > 1:
            return None
        symbol, book = open_books[0]
        assert book.last_price is not None  # a position comes from a fill, which marks
        # The symbol's price at each row: its last tick so far, else its current mark.
        last_row = np.maximum.accumulate(np.where(symbols == symbol, np.arange(n), -1))
        path = np.where(last_row >= 0, prices[np.maximum(last_row, 0)], book.last_price)
        unrealized = (path - book.avg_price) * book.quantity * book.multiplier
        return base + unrealized

    def mark_run(
        self, symbols: np.ndarray, prices: np.ndarray, ts: np.ndarray, equity: np.ndarray
    ) -> None:
        """:meth:`mark` each tick of a run in one step, ``equity`` being its
        :meth:`equity_path` (positions must not change in between)."""
        n = len(symbols)
        if not n == len(prices) == len(ts) == len(equity):
            raise TradingError(
                f"mark_run: {n} symbols, {len(prices)} prices, {len(ts)} ts, {len(equity)} "
                "equity values"
            )
        if n == 0:
            return
        if not (np.isfinite(prices) & (prices > 0)).all():
            raise TradingError("mark_run: every price must be a finite number > 0")
        last = {symbol: k for k, symbol in enumerate(symbols.tolist())}  # first-seen order
        for symbol, k in last.items():
            book = self._book(symbol)
            book.last_price = float(prices[k])
            book.ts = int(ts[k])
        self._peak = max(self._peak, float(equity.max()))
        self._curve.extend(zip(ts.tolist(), equity.tolist(), strict=True))

    def _sample(self, ts: int) -> None:
        equity = self.equity
        self._peak = max(self._peak, equity)
        self._curve.append((ts, equity))

    # --- reads -----------------------------------------------------------------------------

    def quantity(self, symbol: str) -> int:
        """The signed position in ``symbol`` (0 if never traded)."""
        book = self._books.get(symbol)
        return book.quantity if book is not None else 0

    def last_price(self, symbol: str) -> float | None:
        """The price ``symbol`` is marked at, or None if it never was."""
        book = self._books.get(symbol)
        return book.last_price if book is not None else None

    def open_symbols(self) -> list[str]:
        """Symbols with a non-zero position, sorted."""
        return sorted(s for s, b in self._books.items() if b.quantity != 0)

    def position(self, symbol: str) -> Position:
        """A snapshot of ``symbol``'s position (flat and zero if never traded)."""
        book = self._books.get(symbol)
        if book is None:
            return Position(symbol, 0, 0.0, 0.0, 0.0, None, 0.0, 0)
        return Position(
            symbol,
            book.quantity,
            book.avg_price,
            book.realized - book.fees,
            book.fees,
            book.last_price,
            book.unrealized(book.last_price),
            book.ts,
        )

    def positions(self) -> list[Position]:
        """Snapshots of every symbol ever traded or marked, sorted by symbol."""
        return [self.position(symbol) for symbol in sorted(self._books)]

    @property
    def realized_pnl(self) -> float:
        """Realized P&L after fees, all symbols."""
        return sum(b.realized - b.fees for b in self._books.values())

    @property
    def fees(self) -> float:
        return sum(b.fees for b in self._books.values())

    @property
    def unrealized_pnl(self) -> float:
        """Open positions marked to their last prices."""
        return sum(b.unrealized(b.last_price) for b in self._books.values())

    @property
    def equity(self) -> float:
        return self.initial_cash + self.realized_pnl + self.unrealized_pnl

    def equity_at(self, prices: Mapping[str, float]) -> float:
        """Equity with the symbols in ``prices`` marked there instead (nothing is stored)."""
        unrealized = sum(
            b.unrealized(prices.get(symbol, b.last_price)) for symbol, b in self._books.items()
        )
        return self.initial_cash + self.realized_pnl + unrealized

    @property
    def peak_equity(self) -> float:
        """The highest equity sampled so far (initial cash before any sample)."""
        return self._peak

    @property
    def drawdown(self) -> float:
        """How far equity is below its peak, as a fraction of the peak."""
        return max(0.0, (self._peak - self.equity) / self._peak)

    @property
    def equity_curve(self) -> list[tuple[int, float]]:
        """``(ts, equity)`` after every fill and mark, oldest first."""
        return list(self._curve)

    # --- state -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The equity curve stays out: it can be long, and it follows from the fills.
        return {
            "initial_cash": self.initial_cash,
            "instruments": self.instruments,
            "books": self._books,
            "peak": self._peak,
            "max_curve_points": self._curve.maxlen,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.initial_cash = state["initial_cash"]
        self.instruments = state["instruments"]
        self._books = state["books"]
        self._peak = state["peak"]
        self._curve = deque(maxlen=state["max_curve_points"])

    def restore_from(self, saved: Portfolio) -> None:
        """Take the positions, P&L and peak equity of ``saved`` (an unpickled snapshot);
        this portfolio's instruments and curve bound stay."""
        if saved.initial_cash != self.initial_cash:
            raise TradingError(
                f"restore: the saved account started with {saved.initial_cash:,.2f}, this one "
                f"with {self.initial_cash:,.2f}"
            )
        self._books = saved._books
        self._peak = saved._peak

    def summary(self) -> PnLSummary:
        """Realized, unrealized, fees, equity, peak and drawdown now."""
        return PnLSummary(
            self.realized_pnl,
            self.unrealized_pnl,
            self.fees,
            self.equity,
            self._peak,
            self.drawdown,
        )
