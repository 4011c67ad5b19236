"""Incremental per-symbol feature engines for trades and L2 book snapshots.

Each feature is defined once, as a computation over one chunk of one symbol's rows plus
the state carried from earlier chunks (:class:`~rayfin.features.windows.SymbolState`).
The live executor feeds Kafka micro-batches; the batch executor feeds a symbol's whole
history through the same engine. Any split of a symbol's stream into chunks gives
bit-identical output (see :mod:`rayfin.features.windows` for why the window sums are
exact); a snapshot taken between chunks resumes with the same windows.

Rules
-----
Arrival order
    Rows are processed in arrival order: Kafka offset order within a partition, row order
    for a DataFrame. Tick-count windows, returns, EMA and RSI are over that order.
Late / out-of-order rows
    A row whose ``ts`` is earlier than the latest ``ts`` already seen for its symbol (its
    watermark) is processed as if it happened at the watermark: its event time is clamped,
    so event-time windows stay monotonic. It still counts in every window, and its output
    row has ``late = True``. The output ``ts`` is the row's own, unclamped time. Every input
    row yields exactly one output row.
Warm-up
    A sliding tick-count window's statistics (``sma/ema/vwap/volume_{n}t``) are NaN until
    the symbol has seen ``n`` ticks; ``vol_{n}t`` needs ``n`` 1-tick returns, i.e. ``n + 1``
    ticks; ``ret_{lag}`` needs ``lag + 1`` ticks; ``rsi_{p}`` needs ``p + 1`` ticks. Event-
    time and tumbling windows are never "not full": they report what the window holds so
    far (partial values), with ``vol_*`` NaN below two 1-tick returns. The symbol's first
    tick has no 1-tick return, so it adds nothing to volatility. There is no trade count
    for sliding tick windows (it would always be ``n``).
Book padding
    Bids and asks are ``[n, levels]`` arrays; column 0 is level 1, the best. A level is
    empty when its price is NaN or its size is 0; empty levels, and levels beyond those
    given (fewer than ``book_depth``), count as price NaN, size 0. Imbalance uses sizes only,
    so an empty side gives -1/+1, and both sides empty gives NaN; best prices, mid, spread
    and microprice are NaN when either side's level 1 is empty. The mean imbalances skip
    NaN rows and are NaN when the window holds none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, Self

import msgspec
import numpy as np
import pandas as pd

from rayfin.features.indicators import ema, lag_log_returns, wilder_rsi, window_stats
from rayfin.features.spec import FeatureSpec, time_label
from rayfin.features.windows import (
    SymbolState,
    WindowSums,
    event_times,
    sliding_tick_starts,
    sliding_time_starts,
    tumbling_tick_starts,
    tumbling_time_bounds,
)

NO_PARTITION = -1
"""``partition``/``offset`` value of rows fed without a partition or offsets."""

_INT_COLUMNS = {"ts", "partition", "offset", "seq"}


def column_dtypes(columns: list[str]) -> dict[str, str]:
    """The dtype of each output column (shared by both executors, so their frames match)."""
    return dict(_column_dtypes(tuple(columns)))


@functools.cache
def _column_dtypes(columns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    dtypes: dict[str, str] = {}
    for name in columns:
        if name == "symbol":
            dtypes[name] = "str"
        elif name == "late":
            dtypes[name] = "bool"
        elif (
            name in _INT_COLUMNS
            or name.startswith("count_")
            or name.endswith(("_id", "_start", "_count"))
        ):
            dtypes[name] = "int64"
        else:
            dtypes[name] = "float64"
    return tuple(dtypes.items())


def typed_frame(columns: dict[str, np.ndarray] | pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """A DataFrame of exactly ``names``, in that order, with :func:`column_dtypes`."""
    data: dict[str, Any] = {}
    # Per-column conversion: DataFrame.astype with a dict costs milliseconds per call,
    # which dominated small live micro-batches.
    for name, dtype in column_dtypes(names).items():
        values = columns[name]
        if dtype == "str":
            data[name] = pd.Series(np.asarray(values, dtype=object), dtype=object).astype(str)
        else:
            data[name] = np.asarray(values, dtype=dtype)
    return pd.DataFrame(data, copy=False)


# -- input checks --------------------------------------------------------------------------


def _check_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not symbol:
        raise ValueError(f"symbol must be a non-empty str, got {symbol!r}")
    return symbol


def time_array(name: str, values: Any) -> np.ndarray:
    """A 1-D int64 ns array from ints or datetime64 values; ``ValueError`` otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind == "M":
        if np.isnat(arr).any():
            raise ValueError(f"{name} has NaT at row {int(np.flatnonzero(np.isnat(arr))[0])}")
        return arr.astype("datetime64[ns]").view(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be int64 nanoseconds since the epoch, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def positive_array(name: str, values: Any, rows: int) -> np.ndarray:
    """A float64 array of ``rows`` finite, positive values; ``ValueError`` otherwise."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric") from None
    if arr.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) like ts, got {arr.shape}")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite and > 0; row {row} is {arr[row]!r}")
    return arr


def _offsets_array(offsets: Any, rows: int) -> np.ndarray:
    if offsets is None:
        return np.full(rows, NO_PARTITION, dtype=np.int64)
    arr = np.asarray(offsets)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"offsets must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.shape != (rows,):
        raise ValueError(f"offsets must have shape ({rows},) like ts, got {arr.shape}")
    return arr


def _partition_value(partition: Any) -> int:
    if partition is None:
        return NO_PARTITION
    if isinstance(partition, bool) or not isinstance(partition, int | np.integer):
        raise ValueError(f"partition must be an int or None, got {partition!r}")
    return int(partition)


MAX_CHUNK_ROWS = 8192
"""Larger updates are processed in slices of this many rows: the window tables stay in
cache (same output, since any chunking gives identical results)."""


def _in_slices(
    rows: int, chunk: Callable[[slice], dict[str, np.ndarray]], names: list[str]
) -> dict[str, np.ndarray]:
    if rows == 0:
        return {name: np.empty(0) for name in names}
    parts = [chunk(slice(i, i + MAX_CHUNK_ROWS)) for i in range(0, rows, MAX_CHUNK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


# -- snapshots -----------------------------------------------------------------------------


def _pack_state(state: SymbolState) -> dict[str, Any]:
    return {
        "seq_next": state.seq_next,
        "watermark": state.watermark,
        "seq0": state.seq0,
        "event": state.event.astype("<i8").tobytes(),
        "raw": np.ascontiguousarray(state.raw, dtype="<f8").tobytes(),
        "carry": dict(state.carry),
    }


def _unpack_state(data: dict[str, Any], width: int) -> SymbolState:
    raw = np.frombuffer(data["raw"], dtype="<f8").astype(np.float64).reshape(-1, width)
    return SymbolState(
        width=width,
        seq_next=int(data["seq_next"]),
        watermark=None if data["watermark"] is None else int(data["watermark"]),
        seq0=int(data["seq0"]),
        event=np.frombuffer(data["event"], dtype="<i8").astype(np.int64),
        raw=raw,
        carry={str(k): float(v) for k, v in data["carry"].items()},
    )


class _Engine:
    """Per-symbol state, snapshot and restore shared by the tick and book engines."""

    _FORMAT: ClassVar[str]
    _raw_width: int

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        self.spec = spec if spec is not None else FeatureSpec()
        if not isinstance(self.spec, FeatureSpec):
            raise ValueError(f"spec must be a FeatureSpec, got {type(self.spec).__name__}")
        self._states: dict[str, SymbolState] = {}

    @property
    def symbols(self) -> list[str]:
        """Symbols seen so far, sorted."""
        return sorted(self._states)

    def _state(self, symbol: str) -> SymbolState:
        state = self._states.get(symbol)
        if state is None:
            state = self._states[symbol] = SymbolState(width=self._raw_width)
        return state

    def snapshot(self) -> bytes:
        """Every symbol's state as msgpack bytes (no pickle), to checkpoint with the outputs."""
        payload = {
            "format": self._FORMAT,
            "spec": self.spec.to_dict(),
            "symbols": {sym: _pack_state(st) for sym, st in sorted(self._states.items())},
        }
        return msgspec.msgpack.encode(payload)

    @classmethod
    def restore(cls, spec: FeatureSpec | None, data: bytes) -> Self:
        """An engine that continues exactly where the one that took ``data`` stopped."""
        engine = cls(spec)
        try:
            payload = msgspec.msgpack.decode(data)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a feature-engine snapshot: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != cls._FORMAT:
            raise ValueError(f"not a {cls.__name__} snapshot")
        if payload["spec"] != engine.spec.to_dict():
            raise ValueError(
                "snapshot was taken under a different FeatureSpec; windows would not match "
                f"(snapshot: {payload['spec']}, given: {engine.spec.to_dict()})"
            )
        engine._states = {
            sym: _unpack_state(state, engine._raw_width)
            for sym, state in payload["symbols"].items()
        }
        return engine


# -- trades --------------------------------------------------------------------------------


class TickFeatureEngine(_Engine):
    """Window features of trades, per symbol, from chunks of any size.

    See the module docstring for the arrival-order, late-row and warm-up rules, and
    :meth:`FeatureSpec.tick_columns` for the columns.
    """

    _FORMAT = "rayfin.features.tick/1"
    _raw_width = 3  # price, size, 1-tick log return

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        super().__init__(spec)
        spec = self.spec
        self.columns = spec.tick_columns()
        # Rows a future tick's tick-count windows, returns and (until seeded) RSI reach back.
        self._lookback = max(
            1,
            *spec.tick_windows,
            *spec.tumbling_tick_windows,
            *spec.return_lags,
            (spec.rsi_period or 0) + 1,
        )
        widths = spec.time_widths_ns + spec.tumbling_time_widths_ns
        self._lookback_ns = max(widths) if widths else None

    def update(
        self,
        symbol: str,
        ts: np.ndarray,
        price: np.ndarray,
        size: np.ndarray,
        *,
        offsets: np.ndarray | None = None,
        partition: int | None = None,
    ) -> pd.DataFrame:
        """Features of the next chunk of ``symbol``'s trades, one row per input row.

        ``ts`` is int64 ns since the epoch (datetime64 is accepted), ``price`` and ``size``
        positive floats; ``offsets``/``partition`` are carried through (``-1`` when absent).
        """
        return typed_frame(
            self.update_arrays(symbol, ts, price, size, offsets=offsets, partition=partition),
            self.columns,
        )

    def update_arrays(
        self,
        symbol: str,
        ts: np.ndarray,
        price: np.ndarray,
        size: np.ndarray,
        *,
        offsets: np.ndarray | None = None,
        partition: int | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`update` as a dict of column arrays (saves a DataFrame per micro-batch)."""
        symbol = _check_symbol(symbol)
        ts = time_array("ts", ts)
        m = len(ts)
        price = positive_array("price", price, m)
        size = positive_array("size", size, m)
        offsets = _offsets_array(offsets, m)
        part = _partition_value(partition)
        return _in_slices(
            m,
            lambda sl: self._chunk(symbol, ts[sl], price[sl], size[sl], offsets[sl], part),
            self.columns,
        )

    def _chunk(
        self,
        symbol: str,
        ts: np.ndarray,
        price: np.ndarray,
        size: np.ndarray,
        offsets: np.ndarray,
        part: int,
    ) -> dict[str, np.ndarray]:
        m = len(ts)
        spec = self.spec
        state = self._state(symbol)
        carry = dict(state.carry)  # committed only once the whole chunk is done
        event, late = event_times(ts, state.watermark)
        seq = np.arange(state.seq_next, state.seq_next + m, dtype=np.int64)
        first = len(state.event)  # working row of the chunk's first tick

        raw = np.empty((m, self._raw_width))
        raw[:, 0] = price
        raw[:, 1] = size
        # The price before the chunk; the symbol's first tick has none, hence no return.
        before = state.raw[-1:, 0] if first else np.array([np.nan])
        raw[:, 2] = np.log(price / np.concatenate((before, price[:-1])))
        event_w, raw_w = state.working(event, raw)
        price_w, size_w, ret_w = raw_w[:, 0], raw_w[:, 1], raw_w[:, 2]
        ret0 = np.where(np.isnan(ret_w), 0.0, ret_w)
        rows = np.arange(first, first + m)
        time_starts = [sliding_time_starts(event_w, event, w) for w in spec.time_widths_ns]
        tumble_bounds = [
            tumbling_time_bounds(event_w, event, w) for w in spec.tumbling_time_widths_ns
        ]
        longest = max(
            1,
            *spec.tick_windows,
            *spec.tumbling_tick_windows,
            *(int(first + m - starts[0]) for starts in time_starts),
            *(int(first + m - bounds[1][0]) for bounds in tumble_bounds),
        )
        sums = WindowSums(
            np.column_stack((price_w, price_w * size_w, size_w, ret0, ret0 * ret0)), longest
        )

        out: dict[str, np.ndarray] = {
            "symbol": np.full(m, symbol, dtype=object),
            # Copies: the output must not change if the caller reuses its buffers.
            "ts": ts.copy(),
            "partition": np.full(m, part, dtype=np.int64),
            "offset": offsets.copy(),
            "price": price.copy(),
            "size": size.copy(),
            "late": late,
            "seq": seq,
        }
        for lag in spec.return_lags:
            out[f"ret_{lag}"] = lag_log_returns(price_w, first, seq, lag)

        for n in spec.tick_windows:
            win = sums.range_sums(sliding_tick_starts(seq, n, state.seq0), rows)
            n_returns = np.where(seq >= n, n, 0)
            mean, vol, vwap, volume = window_stats(win, np.full(m, n), n_returns)
            for values in (mean, vwap, volume):
                values[seq < n - 1] = np.nan
            out[f"sma_{n}t"] = mean
            out[f"ema_{n}t"] = ema(price, seq, n, carry, f"ema_{n}")
            out[f"vol_{n}t"] = vol
            out[f"vwap_{n}t"] = vwap
            out[f"volume_{n}t"] = volume

        if spec.rsi_period is not None:
            out[f"rsi_{spec.rsi_period}"] = wilder_rsi(price_w, first, seq, spec.rsi_period, carry)

        for width, starts in zip(spec.time_widths_ns, time_starts, strict=True):
            label = time_label(width)
            count = rows - starts + 1
            # The symbol's first tick is in the window but has no return.
            n_returns = count - (state.seq0 + starts == 0)
            mean, vol, vwap, volume = window_stats(sums.range_sums(starts, rows), count, n_returns)
            out[f"sma_{label}"] = mean
            out[f"vol_{label}"] = vol
            out[f"vwap_{label}"] = vwap
            out[f"volume_{label}"] = volume
            out[f"count_{label}"] = count

        for n in spec.tumbling_tick_windows:
            starts = tumbling_tick_starts(seq, n, state.seq0)
            count = seq % n + 1
            n_returns = count - (seq < n)
            win = sums.range_sums(starts, rows)
            self._tumbling(out, f"tumble_{n}t", "id", seq // n, win, count, n_returns)

        for width, (start_ns, starts) in zip(
            spec.tumbling_time_widths_ns, tumble_bounds, strict=True
        ):
            count = rows - starts + 1
            n_returns = count - (state.seq0 + starts == 0)
            win = sums.range_sums(starts, rows)
            label = f"tumble_{time_label(width)}"
            self._tumbling(out, label, "start", start_ns, win, count, n_returns)

        state.advance(
            event_w, raw_w, m, lookback_ticks=self._lookback, lookback_ns=self._lookback_ns
        )
        state.carry = carry
        return out

    @staticmethod
    def _tumbling(
        out: dict[str, np.ndarray],
        prefix: str,
        window_key: str,
        window: np.ndarray,
        sums: np.ndarray,
        count: np.ndarray,
        n_returns: np.ndarray,
    ) -> None:
        mean, vol, vwap, volume = window_stats(sums, count, n_returns)
        out[f"{prefix}_{window_key}"] = window
        out[f"{prefix}_count"] = count
        out[f"{prefix}_sma"] = mean
        out[f"{prefix}_vol"] = vol
        out[f"{prefix}_vwap"] = vwap
        out[f"{prefix}_volume"] = volume


# -- order book ----------------------------------------------------------------------------


def _book_side(
    name: str, price: Any, size: Any, rows: int, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prices and sizes as ``[rows, depth]``, empty and missing levels as (NaN, 0)."""
    px = np.array(price, dtype=np.float64)
    sz = np.array(size, dtype=np.float64)
    # A 1-D side is a one-level book.
    if px.ndim == 1:
        px = px[:, None]
    if sz.ndim == 1:
        sz = sz[:, None]
    if px.ndim != 2 or px.shape[0] != rows or px.shape != sz.shape or px.shape[1] == 0:
        raise ValueError(
            f"{name} prices and sizes must both be [{rows}, levels>=1] arrays, "
            f"got {px.shape} and {sz.shape}"
        )
    px, sz = px[:, :depth], sz[:, :depth]
    no_price = np.isnan(px)
    bad_px = ~no_price & ~(np.isfinite(px) & (px > 0))
    bad_sz = np.where(no_price, ~((sz == 0) | np.isnan(sz)), ~(np.isfinite(sz) & (sz >= 0)))
    for what, bad in (("price", bad_px), ("size", bad_sz)):
        if bad.any():
            row, level = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"{name} {what} at row {row}, level {level} is invalid "
                f"(price {px[row, level]!r}, size {sz[row, level]!r}); a level is either "
                "price > 0 with size >= 0, or empty: price NaN with size 0/NaN"
            )
    empty = no_price | (sz == 0)
    px = np.where(empty, np.nan, px)
    sz = np.where(empty, 0.0, sz)
    if px.shape[1] < depth:
        pad = depth - px.shape[1]
        px = np.pad(px, ((0, 0), (0, pad)), constant_values=np.nan)
        sz = np.pad(sz, ((0, 0), (0, pad)), constant_values=0.0)
    return px, sz


def _imbalance(bid: np.ndarray, ask: np.ndarray) -> np.ndarray:
    total = bid + ask
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (bid - ask) / total, np.nan)


class BookFeatureEngine(_Engine):
    """Features of L2 book snapshots, per symbol, from chunks of any size.

    See the module docstring for the padding, late-row and warm-up rules, and
    :meth:`FeatureSpec.book_columns` for the columns.
    """

    _FORMAT = "rayfin.features.book/1"

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        super().__init__(spec)
        self.columns = self.spec.book_columns()
        self._levels = self.spec.book_levels()
        self._raw_width = len(self._levels)  # one imbalance per level set
        self._lookback = max(1, self.spec.book_tick_window or 1)
        self._lookback_ns = self.spec.book_time_width_ns

    def update(
        self,
        symbol: str,
        ts: np.ndarray,
        bid_px: np.ndarray,
        bid_sz: np.ndarray,
        ask_px: np.ndarray,
        ask_sz: np.ndarray,
        *,
        offsets: np.ndarray | None = None,
        partition: int | None = None,
    ) -> pd.DataFrame:
        """Features of the next chunk of ``symbol``'s book snapshots, one row per snapshot."""
        return typed_frame(
            self.update_arrays(
                symbol, ts, bid_px, bid_sz, ask_px, ask_sz, offsets=offsets, partition=partition
            ),
            self.columns,
        )

    def update_arrays(
        self,
        symbol: str,
        ts: np.ndarray,
        bid_px: np.ndarray,
        bid_sz: np.ndarray,
        ask_px: np.ndarray,
        ask_sz: np.ndarray,
        *,
        offsets: np.ndarray | None = None,
        partition: int | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`update` as a dict of column arrays."""
        symbol = _check_symbol(symbol)
        ts = time_array("ts", ts)
        m = len(ts)
        depth = self.spec.book_depth
        bpx, bsz = _book_side("bid", bid_px, bid_sz, m, depth)
        apx, asz = _book_side("ask", ask_px, ask_sz, m, depth)
        offsets = _offsets_array(offsets, m)
        part = _partition_value(partition)
        return _in_slices(
            m,
            lambda sl: self._chunk(
                symbol, ts[sl], bpx[sl], bsz[sl], apx[sl], asz[sl], offsets[sl], part
            ),
            self.columns,
        )

    def _chunk(
        self,
        symbol: str,
        ts: np.ndarray,
        bpx: np.ndarray,
        bsz: np.ndarray,
        apx: np.ndarray,
        asz: np.ndarray,
        offsets: np.ndarray,
        part: int,
    ) -> dict[str, np.ndarray]:
        m = len(ts)
        state = self._state(symbol)
        event, late = event_times(ts, state.watermark)
        seq = np.arange(state.seq_next, state.seq_next + m, dtype=np.int64)
        first = len(state.event)
        rows = np.arange(first, first + m)

        best_bid, best_ask = bpx[:, 0], apx[:, 0]
        bid1, ask1 = bsz[:, 0], asz[:, 0]
        mid = (best_bid + best_ask) / 2.0
        spread = best_ask - best_bid
        with np.errstate(invalid="ignore", divide="ignore"):
            microprice = (best_bid * ask1 + best_ask * bid1) / (bid1 + ask1)
        imbalances = {
            level: _imbalance(bsz[:, :level].sum(axis=1), asz[:, :level].sum(axis=1))
            for level in self._levels
        }
        out: dict[str, np.ndarray] = {
            "symbol": np.full(m, symbol, dtype=object),
            "ts": ts.copy(),
            "partition": np.full(m, part, dtype=np.int64),
            "offset": offsets.copy(),
            "late": late,
            "seq": seq,
            "best_bid": best_bid,
            "best_ask": best_ask,
            "bid_size": bid1,
            "ask_size": ask1,
            "mid": mid,
            "spread": spread,
            "spread_bps": spread / mid * 1e4,
            "microprice": microprice,
        }
        for level, values in imbalances.items():
            out[f"imbalance_{level}"] = values

        raw = np.column_stack([imbalances[level] for level in self._levels])
        event_w, raw_w = state.working(event, raw)
        valid = ~np.isnan(raw_w)
        # Per level: sum of the non-NaN imbalances and how many there are.
        windows: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        if self.spec.book_tick_window is not None:
            n = self.spec.book_tick_window
            windows.append((f"{n}t", sliding_tick_starts(seq, n, state.seq0), seq < n - 1))
        if self.spec.book_time_width_ns is not None:
            width = self.spec.book_time_width_ns
            windows.append((time_label(width), sliding_time_starts(event_w, event, width), None))
        longest = max([1] + [int(first + m - starts[0]) for _, starts, _ in windows])
        sums = WindowSums(
            np.column_stack((np.where(valid, raw_w, 0.0), valid.astype(np.float64))), longest
        )
        k = len(self._levels)
        for suffix, starts, warm in windows:
            win = sums.range_sums(starts, rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = win[:, :k] / win[:, k:]
            if warm is not None:
                means[warm] = np.nan
            for j, level in enumerate(self._levels):
                out[f"imbalance_{level}_mean_{suffix}"] = means[:, j]

        state.advance(
            event_w, raw_w, m, lookback_ticks=self._lookback, lookback_ns=self._lookback_ns
        )
        return out
