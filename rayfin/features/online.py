"""The live executor: the tick engine fed micro-batches in arrival order.

This is what a Kafka consumer does with each ``getmany`` batch; :func:`online_features`
replays a DataFrame (or any iterable of ticks) the same way, which makes it the reference
the batch executor (:func:`rayfin.features.batch_features`) is checked against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from rayfin.features.engine import TickFeatureEngine, positive_array, time_array, typed_frame
from rayfin.features.spec import FeatureSpec

DEFAULT_CHUNK_SIZE = 4096
"""Rows per micro-batch when :func:`online_features` is not told otherwise."""

TICK_INPUT_COLUMNS = ("symbol", "ts", "price", "size")
"""Columns of :func:`tick_frame`'s result."""


def _pick(frame: pd.DataFrame, *names: str) -> pd.Series:
    for name in names:
        if name in frame.columns:
            return frame[name]
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"ticks need a {wanted} column; got columns {list(frame.columns)}")


def _ns_since_epoch(column: pd.Series) -> np.ndarray:
    # kind "M" covers numpy, tz-aware and Arrow-backed (as Ray Data hands out) datetimes.
    if column.dtype.kind == "M":
        missing = column.isna().to_numpy()
        if missing.any():
            raise ValueError(f"{column.name} has NaT at row {int(np.flatnonzero(missing)[0])}")
        # Naive times are taken as UTC; aware ones are converted to it.
        return pd.to_datetime(column, utc=True).dt.as_unit("ns").array.asi8.copy()
    return time_array(str(column.name), column.to_numpy())


def tick_frame(ticks: pd.DataFrame | Iterable[Any]) -> pd.DataFrame:
    """Ticks as a checked ``symbol, ts (int64 ns), price, size`` frame, in arrival order.

    Accepts a DataFrame with ``ts`` (int64 ns or datetimes) or ``timestamp`` (the ES frame
    of :func:`rayfin.datasets.es_ticks`) and ``size`` or ``volume``; or an iterable of
    objects with ``symbol, ts, price, size`` attributes (e.g. :class:`rayfin.stream.Tick`).
    Raises ``ValueError`` for missing columns, NaN/NaT and non-positive prices or sizes.
    Out-of-order times are legal (see the late rule in :mod:`rayfin.features.engine`).
    """
    if isinstance(ticks, pd.DataFrame):
        symbol = _pick(ticks, "symbol")
        ts = _ns_since_epoch(_pick(ticks, "ts", "timestamp"))
        price = _pick(ticks, "price").to_numpy()
        size = _pick(ticks, "size", "volume").to_numpy()
    else:
        try:
            rows = [(t.symbol, t.ts, t.price, t.size) for t in ticks]
        except AttributeError as exc:
            raise ValueError(f"ticks must have symbol, ts, price and size: {exc}") from None
        except TypeError:
            raise ValueError(
                f"ticks must be a DataFrame or an iterable of ticks, got {type(ticks).__name__}"
            ) from None
        symbol = pd.Series([r[0] for r in rows], dtype=object)
        ts = time_array("ts", [r[1] for r in rows])
        price = np.array([r[2] for r in rows], dtype=np.float64)
        size = np.array([r[3] for r in rows], dtype=np.float64)
    if symbol.isna().any():
        raise ValueError(f"symbol is missing at row {int(np.flatnonzero(symbol.isna())[0])}")
    n = len(ts)
    return pd.DataFrame(
        {
            "symbol": symbol.astype(str).to_numpy(dtype=object),
            "ts": ts,
            "price": positive_array("price", price, n),
            "size": positive_array("size", size, n),
        }
    )


def online_features(
    ticks: pd.DataFrame | Iterable[Any],
    spec: FeatureSpec | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Features of ``ticks`` computed the live way, one output row per input row.

    Rows are cut into micro-batches of ``chunk_size`` rows in arrival order (as a
    consumer's ``getmany`` returns them), each split by symbol and fed to one
    :class:`TickFeatureEngine`. Any ``chunk_size`` gives the same output. ``offset`` is
    the row's position in ``ticks`` and ``partition`` is -1. Rows are sorted by symbol,
    then arrival order.
    """
    frame = tick_frame(ticks)
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    engine = TickFeatureEngine(spec)
    codes, symbols = pd.factorize(frame["symbol"])
    ts = frame["ts"].to_numpy()
    price = frame["price"].to_numpy()
    size = frame["size"].to_numpy()
    pieces: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    for start in range(0, len(frame), chunk):
        batch_codes = codes[start : start + chunk]
        order = np.argsort(batch_codes, kind="stable")  # by symbol, arrival order kept
        bounds = np.flatnonzero(np.diff(batch_codes[order])) + 1
        for group in np.split(order, bounds):
            rows = start + group
            code = int(codes[rows[0]])
            pieces[code].append(
                engine.update_arrays(
                    str(symbols[code]), ts[rows], price[rows], size[rows], offsets=rows
                )
            )
    ordered = [part for code in sorted(pieces, key=lambda c: symbols[c]) for part in pieces[code]]
    if not ordered:
        return typed_frame({name: np.empty(0) for name in engine.columns}, engine.columns)
    columns = {name: np.concatenate([part[name] for part in ordered]) for name in engine.columns}
    return typed_frame(columns, engine.columns)
