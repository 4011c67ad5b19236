"""Incremental one-minute bars agree with a pandas resample over the real ES ticks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.features.bars import BarBuilder
from rayfin.stream.replay import frame_to_ticks


def test_bars_match_pandas_resample_on_real_ticks() -> None:
    frame = es_ticks(limit=100_000)
    builder = BarBuilder(seconds=60)
    bars = []
    for tick in frame_to_ticks(frame):
        closed = builder.update(tick.symbol, tick.ts, tick.price, tick.size)
        if closed is not None:
            bars.append(closed)
    bars.extend(builder.flush())

    utc = frame.set_index(frame["timestamp"].dt.tz_convert("UTC"))
    grouped = utc.resample("1min")
    expected = pd.DataFrame(
        {
            "open": grouped["price"].first(),
            "high": grouped["price"].max(),
            "low": grouped["price"].min(),
            "close": grouped["price"].last(),
            "volume": grouped["volume"].sum(),
            "trades": grouped["price"].count(),
        }
    )
    expected = expected[expected["trades"] > 0]
    expected["vwap"] = (utc["price"] * utc["volume"]).resample("1min").sum().loc[
        expected.index
    ] / expected["volume"]

    got = pd.DataFrame(
        [(b.start, b.open, b.high, b.low, b.close, b.volume, b.trades, b.vwap) for b in bars],
        columns=["start", "open", "high", "low", "close", "volume", "trades", "vwap"],
    )
    assert builder.late == 0
    assert len(got) == len(expected)
    assert (got["start"].to_numpy() == expected.index.as_unit("ns").asi8).all()
    for col in ("open", "high", "low", "close", "volume", "trades"):
        assert (got[col].to_numpy() == expected[col].to_numpy()).all(), col
    np.testing.assert_allclose(got["vwap"], expected["vwap"], rtol=0, atol=1e-9)


def test_late_ticks_are_counted_and_dropped() -> None:
    builder = BarBuilder(seconds=60)
    minute = 60 * 1_000_000_000
    assert builder.update("ES", 5 * minute, 100.0, 1) is None
    closed = builder.update("ES", 6 * minute, 101.0, 2)
    assert closed is not None
    assert closed.close == 100.0
    assert builder.update("ES", 5 * minute + 1, 99.0, 1) is None  # belongs to a closed bar
    assert builder.late == 1
    (forming,) = builder.flush()
    assert (forming.open, forming.low, forming.volume) == (101.0, 101.0, 2)


def test_bar_length_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        BarBuilder(seconds=0)
