"""Time bars (OHLCV + VWAP) built incrementally, one tick at a time."""

from __future__ import annotations

from dataclasses import dataclass

NS_PER_SECOND = 1_000_000_000


@dataclass
class Bar:
    """One closed or forming bar. ``start`` is the bar's open time in ns since the epoch."""

    symbol: str
    start: int
    open: float
    high: float
    low: float
    close: float
    volume: int
    notional: float
    trades: int

    @property
    def vwap(self) -> float:
        return self.notional / self.volume if self.volume else self.close


class BarBuilder:
    """Tumbling time bars per symbol, aligned to multiples of ``seconds`` since the epoch.

    Ticks must arrive in event-time order per symbol (as one Kafka partition delivers
    them); a tick older than the forming bar is counted in ``late`` and dropped, so a
    closed bar never changes after it was emitted.
    """

    def __init__(self, seconds: int = 60) -> None:
        if seconds <= 0:
            raise ValueError("bar length must be positive")
        self.width = seconds * NS_PER_SECOND
        self._forming: dict[str, Bar] = {}
        self.late = 0

    def update(self, symbol: str, ts: int, price: float, size: int) -> Bar | None:
        """Add one trade; return the bar it closed, if any."""
        start = ts - ts % self.width
        bar = self._forming.get(symbol)
        if bar is not None and start == bar.start:
            bar.high = max(bar.high, price)
            bar.low = min(bar.low, price)
            bar.close = price
            bar.volume += size
            bar.notional += price * size
            bar.trades += 1
            return None
        if bar is not None and start < bar.start:
            self.late += 1
            return None
        self._forming[symbol] = Bar(
            symbol, start, price, price, price, price, size, price * size, 1
        )
        return bar

    def flush(self) -> list[Bar]:
        """Close and return every forming bar (end of stream)."""
        bars = list(self._forming.values())
        self._forming.clear()
        return bars
