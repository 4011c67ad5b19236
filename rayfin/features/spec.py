"""What the feature engines compute: window sizes and the output column names, in order."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

NS_PER_SECOND = 1_000_000_000

TICK_KEY_COLUMNS: tuple[str, ...] = (
    "symbol",
    "ts",
    "partition",
    "offset",
    "price",
    "size",
    "late",
    "seq",
)
"""Leading columns of every tick-feature row: identity, the input values, the late flag and
the per-symbol tick number (0-based, in arrival order)."""

BOOK_KEY_COLUMNS: tuple[str, ...] = ("symbol", "ts", "partition", "offset", "late", "seq")
"""Leading columns of every book-feature row."""

SLIDING_TICK_STATS: tuple[str, ...] = ("sma", "ema", "vol", "vwap", "volume")
SLIDING_TIME_STATS: tuple[str, ...] = ("sma", "vol", "vwap", "volume", "count")
TUMBLING_STATS: tuple[str, ...] = ("count", "sma", "vol", "vwap", "volume")


def time_label(width_ns: int) -> str:
    """Column suffix for an event-time window: ``10s``, ``250ms`` or ``1500us``/``7ns``."""
    for unit, scale in (("s", NS_PER_SECOND), ("ms", 1_000_000), ("us", 1_000)):
        if width_ns % scale == 0:
            return f"{width_ns // scale}{unit}"
    return f"{width_ns}ns"


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    for value in items:
        # bool is an int subclass; a True window is almost certainly a mistake.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must hold positive ints, got {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} has duplicates: {items!r}")
    return items


def _seconds_to_ns(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must hold positive, finite seconds, got {value!r}")
    width = round(value * NS_PER_SECOND)
    if width <= 0:
        raise ValueError(f"{name} must hold positive, finite seconds, got {value!r}")
    return int(width)


def _positive_seconds(name: str, values: Any) -> tuple[float, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of seconds, got {values!r}") from None
    widths = [_seconds_to_ns(name, value) for value in items]
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name} has duplicates: {items!r}")
    return tuple(float(value) for value in items)


@dataclass(frozen=True)
class FeatureSpec:
    """Window sizes of the tick and book features. Empty tuples switch a family off.

    Tick-count windows count ticks of one symbol in arrival order; event-time windows are
    in seconds (fractions allowed, resolved to whole nanoseconds).
    """

    return_lags: tuple[int, ...] = (1, 20, 100)
    """Log return ``log(p_i / p_{i-lag})`` over these many ticks."""
    tick_windows: tuple[int, ...] = (20, 100)
    """Sliding tick-count windows: SMA, EMA (span), volatility, VWAP, volume."""
    time_windows: tuple[float, ...] = (10.0, 60.0)
    """Sliding event-time windows ``(t - T, t]``: SMA, volatility, VWAP, volume, count."""
    tumbling_tick_windows: tuple[int, ...] = (20, 100)
    """Tumbling tick-count windows aligned to the symbol's tick number."""
    tumbling_time_windows: tuple[float, ...] = (10.0, 60.0)
    """Tumbling event-time windows aligned to multiples of the width since the epoch."""
    rsi_period: int | None = 14
    """Wilder RSI period in ticks; ``None`` leaves RSI out."""
    book_depth: int = 5
    """Levels summed by the deep order-book imbalance."""
    book_tick_window: int | None = 20
    """Sliding window, in book updates, for the mean imbalance; ``None`` leaves it out."""
    book_time_window: float | None = 10.0
    """Sliding event-time window, in seconds, for the mean imbalance; ``None`` leaves it out."""

    def __post_init__(self) -> None:
        # Coerce lists to tuples so a spec built from config/JSON stays hashable.
        set_ = object.__setattr__
        set_(self, "return_lags", _positive_ints("return_lags", self.return_lags))
        set_(self, "tick_windows", _positive_ints("tick_windows", self.tick_windows))
        set_(self, "time_windows", _positive_seconds("time_windows", self.time_windows))
        set_(
            self,
            "tumbling_tick_windows",
            _positive_ints("tumbling_tick_windows", self.tumbling_tick_windows),
        )
        set_(
            self,
            "tumbling_time_windows",
            _positive_seconds("tumbling_time_windows", self.tumbling_time_windows),
        )
        if self.rsi_period is not None:
            _positive_ints("rsi_period", (self.rsi_period,))
        _positive_ints("book_depth", (self.book_depth,))
        if self.book_tick_window is not None:
            _positive_ints("book_tick_window", (self.book_tick_window,))
        if self.book_time_window is not None:
            set_(
                self,
                "book_time_window",
                _positive_seconds("book_time_window", (self.book_time_window,))[0],
            )

    # -- derived sizes -------------------------------------------------------------------

    @property
    def time_widths_ns(self) -> tuple[int, ...]:
        return tuple(_seconds_to_ns("time_windows", s) for s in self.time_windows)

    @property
    def tumbling_time_widths_ns(self) -> tuple[int, ...]:
        return tuple(_seconds_to_ns("tumbling_time_windows", s) for s in self.tumbling_time_windows)

    @property
    def book_time_width_ns(self) -> int | None:
        if self.book_time_window is None:
            return None
        return _seconds_to_ns("book_time_window", self.book_time_window)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in snapshots to refuse restoring under another spec)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    # -- output columns ------------------------------------------------------------------

    def tick_columns(self) -> list[str]:
        """Columns of :class:`~rayfin.features.TickFeatureEngine` output, in order."""
        cols = list(TICK_KEY_COLUMNS)
        cols += [f"ret_{lag}" for lag in self.return_lags]
        for n in self.tick_windows:
            cols += [f"{stat}_{n}t" for stat in SLIDING_TICK_STATS]
        if self.rsi_period is not None:
            cols.append(f"rsi_{self.rsi_period}")
        for width in self.time_widths_ns:
            cols += [f"{stat}_{time_label(width)}" for stat in SLIDING_TIME_STATS]
        for n in self.tumbling_tick_windows:
            cols.append(f"tumble_{n}t_id")
            cols += [f"tumble_{n}t_{stat}" for stat in TUMBLING_STATS]
        for width in self.tumbling_time_widths_ns:
            label = time_label(width)
            cols.append(f"tumble_{label}_start")
            cols += [f"tumble_{label}_{stat}" for stat in TUMBLING_STATS]
        return cols

    def book_levels(self) -> tuple[int, ...]:
        """Depths of the imbalance features: level 1 and ``book_depth`` (once if equal)."""
        return (1,) if self.book_depth == 1 else (1, self.book_depth)

    def book_columns(self) -> list[str]:
        """Columns of :class:`~rayfin.features.BookFeatureEngine` output, in order."""
        levels = self.book_levels()
        cols = [*BOOK_KEY_COLUMNS, "best_bid", "best_ask", "bid_size", "ask_size"]
        cols += ["mid", "spread", "spread_bps"]
        cols += [f"imbalance_{level}" for level in levels]
        cols.append("microprice")
        suffixes = []
        if self.book_tick_window is not None:
            suffixes.append(f"{self.book_tick_window}t")
        if self.book_time_width_ns is not None:
            suffixes.append(time_label(self.book_time_width_ns))
        for level in levels:
            cols += [f"imbalance_{level}_mean_{suffix}" for suffix in suffixes]
        return cols
