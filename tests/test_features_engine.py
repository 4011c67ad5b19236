"""The window-feature engines against plain pandas/numpy references on real ES ticks.

Covers: each tick feature vs a straightforward reference (max abs diff <= 1e-9), exact
chunk invariance, the late-tick rule, snapshot/restore, the book engine on a book small
enough to check by hand, and the errors for bad input.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.features import BookFeatureEngine, FeatureSpec, TickFeatureEngine, online_features
from rayfin.features.spec import time_label

ROWS = 20_000
TOL = 1e-9
SEC = 1_000_000_000
SPEC = FeatureSpec()


@dataclass(frozen=True)
class Ticks:
    ts: np.ndarray
    price: np.ndarray
    size: np.ndarray


@pytest.fixture(scope="module")
def es_frame() -> pd.DataFrame:
    return es_ticks(limit=ROWS)


@pytest.fixture(scope="module")
def es(es_frame: pd.DataFrame) -> Ticks:
    ts = es_frame["timestamp"].dt.as_unit("ns").array.asi8.copy()
    return Ticks(ts, es_frame["price"].to_numpy(), es_frame["volume"].to_numpy(np.float64))


@pytest.fixture(scope="module")
def whole(es: Ticks) -> pd.DataFrame:
    """The default spec over the slice in one update."""
    return TickFeatureEngine(SPEC).update("ES", es.ts, es.price, es.size)


def run_chunked(engine: TickFeatureEngine, ticks: Ticks, cuts: np.ndarray) -> pd.DataFrame:
    parts = [
        engine.update("ES", ticks.ts[a:b], ticks.price[a:b], ticks.size[a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    return pd.concat(parts, ignore_index=True)


def random_cuts(rng: np.random.Generator, rows: int, low: int, high: int) -> np.ndarray:
    sizes = rng.integers(low, high + 1, size=rows // low + 1)
    cuts = np.concatenate(([0], np.cumsum(sizes)))
    return np.unique(np.minimum(cuts, rows))


def assert_close(actual: pd.Series | np.ndarray, expected: pd.Series | np.ndarray, name: str):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, name
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    mismatch = np.flatnonzero(nan_a != nan_e)
    assert mismatch.size == 0, f"{name}: NaN differs first at row {mismatch[:5]}"
    assert (~nan_a).any(), f"{name}: all NaN"
    diff = np.abs(a[~nan_a] - e[~nan_e])
    assert diff.max() <= TOL, f"{name}: max abs diff {diff.max():.3g}"


# -- references ----------------------------------------------------------------------------


def wilder_rsi_reference(price: np.ndarray, period: int) -> np.ndarray:
    """Textbook Wilder RSI: SMA seed, then ``avg = (avg * (p - 1) + x) / p``."""
    change = np.diff(price)
    gain, loss = np.maximum(change, 0.0), np.maximum(-change, 0.0)
    out = np.full(len(price), np.nan)

    def rsi(g: float, lo: float) -> float:
        if lo == 0.0:
            return 50.0 if g == 0.0 else 100.0
        return 100.0 - 100.0 / (1.0 + g / lo)

    avg_gain, avg_loss = gain[:period].mean(), loss[:period].mean()
    out[period] = rsi(avg_gain, avg_loss)
    for i in range(period + 1, len(price)):
        avg_gain = (avg_gain * (period - 1) + gain[i - 1]) / period
        avg_loss = (avg_loss * (period - 1) + loss[i - 1]) / period
        out[i] = rsi(avg_gain, avg_loss)
    return out


def reference_features(es: Ticks, spec: FeatureSpec) -> dict[str, pd.Series]:
    """Every tick feature the slow, obvious way (the ES slice is in time order)."""
    index = pd.DatetimeIndex(pd.to_datetime(es.ts, unit="ns"))
    p = pd.Series(es.price, index=index)
    s = pd.Series(es.size, index=index)
    notional = p * s
    ret = np.log(p / p.shift(1))
    out: dict[str, pd.Series] = {}
    for lag in spec.return_lags:
        out[f"ret_{lag}"] = np.log(p / p.shift(lag))
    for n in spec.tick_windows:
        warm = np.arange(len(p)) < n - 1
        out[f"sma_{n}t"] = p.rolling(n).mean()
        out[f"ema_{n}t"] = p.ewm(span=n, adjust=False).mean().mask(warm)
        out[f"vol_{n}t"] = ret.rolling(n).std()
        out[f"vwap_{n}t"] = notional.rolling(n).sum() / s.rolling(n).sum()
        out[f"volume_{n}t"] = s.rolling(n).sum()
    out[f"rsi_{spec.rsi_period}"] = pd.Series(wilder_rsi_reference(es.price, spec.rsi_period))
    for width in spec.time_widths_ns:
        label, offset = time_label(width), pd.Timedelta(width, unit="ns")
        out[f"sma_{label}"] = p.rolling(offset).mean()
        out[f"vol_{label}"] = ret.rolling(offset).std()
        out[f"vwap_{label}"] = notional.rolling(offset).sum() / s.rolling(offset).sum()
        out[f"volume_{label}"] = s.rolling(offset).sum()
        out[f"count_{label}"] = p.rolling(offset).count()
    seq = np.arange(len(p))
    keys = {f"tumble_{n}t": seq // n for n in spec.tumbling_tick_windows}
    keys |= {f"tumble_{time_label(w)}": es.ts // w * w for w in spec.tumbling_time_widths_ns}
    for prefix, key in keys.items():
        key = pd.Series(key, index=index)
        volume = s.groupby(key).cumsum()
        count = s.groupby(key).cumcount() + 1
        out[f"{prefix}_count"] = count
        out[f"{prefix}_sma"] = p.groupby(key).cumsum() / count
        out[f"{prefix}_vol"] = pd.Series(
            ret.reset_index(drop=True).groupby(key.to_numpy()).expanding().std().droplevel(0)
        ).sort_index()
        out[f"{prefix}_vwap"] = notional.groupby(key).cumsum() / volume
        out[f"{prefix}_volume"] = volume
    return out


# -- features vs references ----------------------------------------------------------------


def test_columns_follow_the_spec(whole: pd.DataFrame) -> None:
    assert list(whole.columns) == SPEC.tick_columns()
    assert whole.columns[:8].tolist() == [
        "symbol",
        "ts",
        "partition",
        "offset",
        "price",
        "size",
        "late",
        "seq",
    ]
    assert whole["seq"].tolist() == list(range(ROWS))
    assert (whole["partition"] == -1).all()
    assert (whole["offset"] == -1).all()
    assert not whole["late"].any()  # the vendor file is in time order


def test_every_feature_matches_a_pandas_reference(es: Ticks, whole: pd.DataFrame) -> None:
    expected = reference_features(es, SPEC)
    checked = set()
    for name, values in expected.items():
        assert_close(whole[name], values, name)
        checked.add(name)
    for n in SPEC.tumbling_tick_windows:
        assert (whole[f"tumble_{n}t_id"] == np.arange(ROWS) // n).all()
        checked.add(f"tumble_{n}t_id")
    for width in SPEC.tumbling_time_widths_ns:
        name = f"tumble_{time_label(width)}_start"
        assert (whole[name] == es.ts // width * width).all()
        checked.add(name)
    # Nothing in the output went unchecked.
    assert checked == set(SPEC.tick_columns()) - set(SPEC.tick_columns()[:8])


def test_warm_up_rule(whole: pd.DataFrame) -> None:
    # n-tick windows need n ticks; volatility and n-tick returns need n returns.
    assert whole["sma_20t"].isna().to_numpy().nonzero()[0].tolist() == list(range(19))
    assert whole["ema_100t"].first_valid_index() == 99
    assert whole["vol_20t"].first_valid_index() == 20
    assert whole["ret_100"].first_valid_index() == 100
    assert whole["rsi_14"].first_valid_index() == 14
    # Event-time and tumbling windows report partial values from the first tick.
    assert whole.loc[0, "count_60s"] == 1
    assert whole.loc[0, "sma_10s"] == whole.loc[0, "price"]
    assert whole.loc[0, "tumble_100t_vwap"] == whole.loc[0, "price"]


# -- chunk invariance ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_chunkings_are_bit_identical(seed: int, es: Ticks, whole: pd.DataFrame) -> None:
    cuts = random_cuts(np.random.default_rng(seed), ROWS, 1, 5000)
    chunked = run_chunked(TickFeatureEngine(SPEC), es, cuts)
    pd.testing.assert_frame_equal(chunked, whole, check_exact=True)


def test_tiny_chunks_are_bit_identical(es: Ticks, whole: pd.DataFrame) -> None:
    # 1200 ticks span ~100 s: every window fills, and the 60 s tail is trimmed.
    rows = 1200
    ticks = Ticks(es.ts[:rows], es.price[:rows], es.size[:rows])
    one_by_one = run_chunked(TickFeatureEngine(SPEC), ticks, np.arange(rows + 1))
    pd.testing.assert_frame_equal(one_by_one, whole.iloc[:rows], check_exact=True)
    rows = 5000
    ticks = Ticks(es.ts[:rows], es.price[:rows], es.size[:rows])
    cuts = random_cuts(np.random.default_rng(7), rows, 1, 40)
    small = run_chunked(TickFeatureEngine(SPEC), ticks, cuts)
    pd.testing.assert_frame_equal(small, whole.iloc[:rows], check_exact=True)


def test_online_features_is_chunk_size_invariant(es_frame: pd.DataFrame, whole: pd.DataFrame):
    expected = whole.assign(offset=np.arange(ROWS))
    for chunk_size in (None, 1013, ROWS):
        got = online_features(es_frame, chunk_size=chunk_size)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)


def test_online_features_takes_tick_objects(es_frame: pd.DataFrame) -> None:
    @dataclass(frozen=True)
    class Tick:
        symbol: str
        ts: int
        price: float
        size: int

    frame = es_frame.iloc[:500]
    ts = frame["timestamp"].dt.as_unit("ns").array.asi8
    ticks = [
        Tick("ES", int(t), float(p), int(v))
        for t, p, v in zip(ts, frame["price"], frame["volume"], strict=True)
    ]
    pd.testing.assert_frame_equal(
        online_features(ticks, chunk_size=64), online_features(frame), check_exact=True
    )


def test_symbols_are_independent_and_sorted(es_frame: pd.DataFrame) -> None:
    frame = es_frame.iloc[:6000].copy()
    # Interleave a second symbol: every third tick is "NQ".
    frame["symbol"] = np.where(np.arange(len(frame)) % 3 == 0, "NQ", "ES")
    got = online_features(frame, chunk_size=500)
    assert got["symbol"].tolist() == ["ES"] * 4000 + ["NQ"] * 2000
    for symbol in ("ES", "NQ"):
        alone = online_features(frame[frame["symbol"] == symbol])
        mine = got[got["symbol"] == symbol].reset_index(drop=True)
        # Same features; offsets are positions in the mixed frame.
        expected = alone.assign(offset=np.flatnonzero(frame["symbol"] == symbol))
        pd.testing.assert_frame_equal(mine, expected, check_exact=True)


# -- late ticks ----------------------------------------------------------------------------


def test_late_ticks_are_clamped_to_the_watermark(es: Ticks) -> None:
    rows = 4000
    ts = es.ts[:rows].copy()
    rng = np.random.default_rng(3)
    late_rows = np.sort(rng.choice(np.arange(100, rows), size=60, replace=False))
    ts[late_rows] -= rng.integers(1, 90_000_000_000, size=60)  # up to 90 s in the past
    clamped = np.maximum.accumulate(ts)

    engine = TickFeatureEngine(SPEC)
    got = run_chunked(
        engine, Ticks(ts, es.price[:rows], es.size[:rows]), np.append(np.arange(0, rows, 333), rows)
    )
    as_if = TickFeatureEngine(SPEC).update("ES", clamped, es.price[:rows], es.size[:rows])

    assert len(got) == rows  # one output row per input row
    assert (got["ts"].to_numpy() == ts).all()  # the row's own time is reported
    assert (got["late"].to_numpy() == (ts < clamped)).all()
    assert got["late"].sum() >= 30  # a tick moved back only a little can stay in order
    features = SPEC.tick_columns()[7:]
    pd.testing.assert_frame_equal(got[features], as_if[features], check_exact=True)
    # A late tick counts in the windows ending at the watermark.
    minute = 60 * SEC
    for row in np.flatnonzero(got["late"].to_numpy())[:10]:
        in_10s = row + 1 - np.searchsorted(clamped[: row + 1], clamped[row] - 10 * SEC, "right")
        assert got.loc[row, "count_10s"] == in_10s
        assert got.loc[row, "tumble_60s_start"] == clamped[row] // minute * minute


# -- snapshot / restore --------------------------------------------------------------------


def test_snapshot_restore_resumes_exactly(es: Ticks, whole: pd.DataFrame) -> None:
    engine = TickFeatureEngine(SPEC)
    rng = np.random.default_rng(11)
    cuts = random_cuts(rng, ROWS, 1, 3000)
    mid = len(cuts) // 2
    first = run_chunked(engine, es, cuts[: mid + 1])
    engine.update("NQ", es.ts[:50], es.price[:50] * 2.0, es.size[:50])  # a second symbol
    data = engine.snapshot()
    assert isinstance(data, bytes)

    restored = TickFeatureEngine.restore(SPEC, data)
    assert restored.symbols == ["ES", "NQ"]
    rest = run_chunked(restored, es, cuts[mid:])
    pd.testing.assert_frame_equal(
        pd.concat([first, rest], ignore_index=True), whole, check_exact=True
    )
    # The restored NQ state continues too.
    nq = restored.update("NQ", es.ts[50:60], es.price[50:60] * 2.0, es.size[50:60])
    assert nq["seq"].tolist() == list(range(50, 60))


def test_restore_refuses_another_spec_or_garbage() -> None:
    data = TickFeatureEngine(SPEC).snapshot()
    with pytest.raises(ValueError, match="different FeatureSpec"):
        TickFeatureEngine.restore(FeatureSpec(tick_windows=(10,)), data)
    with pytest.raises(ValueError, match="snapshot"):
        TickFeatureEngine.restore(SPEC, b"\x00not msgpack")
    with pytest.raises(ValueError, match="TickFeatureEngine snapshot"):
        TickFeatureEngine.restore(SPEC, BookFeatureEngine(SPEC).snapshot())


# -- order book ----------------------------------------------------------------------------

NAN = np.nan
BOOK_SPEC = FeatureSpec(book_depth=5, book_tick_window=2, book_time_window=1.0)


def hand_book() -> dict[str, np.ndarray]:
    """Four snapshots, three levels given (depth 5 pads two)."""
    return {
        "ts": np.array([0, SEC // 2, SEC // 4, 2 * SEC]),  # row 2 is late
        "bid_px": np.array(
            [[100.0, 99.0, 98.0], [NAN, 99.0, 98.0], [100.0, 99.0, NAN], [100.0, 99.5, 99.0]]
        ),
        "bid_sz": np.array([[10.0, 5, 5], [0, 4, 4], [30, 10, 0], [1, 1, 0]]),
        "ask_px": np.array(
            [[101.0, 102.0, NAN], [101.0, 102.0, 103.0], [101.0, 102.0, 103.0], [101.0, NAN, NAN]]
        ),
        "ask_sz": np.array([[30.0, 10, 0], [10, 10, 10], [10, 10, 10], [3, NAN, 0]]),
    }


def test_book_features_by_hand() -> None:
    book = hand_book()
    got = BookFeatureEngine(BOOK_SPEC).update("ES", **book)
    assert list(got.columns) == BOOK_SPEC.book_columns()
    expected = {
        "late": [False, False, True, False],
        "best_bid": [100.0, NAN, 100.0, 100.0],
        "best_ask": [101.0, 101.0, 101.0, 101.0],
        "bid_size": [10.0, 0.0, 30.0, 1.0],
        "ask_size": [30.0, 10.0, 10.0, 3.0],
        "mid": [100.5, NAN, 100.5, 100.5],
        "spread": [1.0, NAN, 1.0, 1.0],
        "spread_bps": [1e4 / 100.5, NAN, 1e4 / 100.5, 1e4 / 100.5],
        "imbalance_1": [-0.5, -1.0, 0.5, -0.5],
        # top 5: bids 20 vs asks 40; 8 vs 30; 40 vs 30; 2 vs 3.
        "imbalance_5": [-1 / 3, -22 / 38, 10 / 70, -1 / 5],
        "microprice": [(100 * 30 + 101 * 10) / 40, NAN, (100 * 10 + 101 * 30) / 40, 100.25],
        # 2-update mean: NaN until two updates.
        "imbalance_1_mean_2t": [NAN, -0.75, -0.25, 0.0],
        "imbalance_5_mean_2t": [
            NAN,
            (-1 / 3 - 22 / 38) / 2,
            (-22 / 38 + 10 / 70) / 2,
            (10 / 70 - 1 / 5) / 2,
        ],
        # 1 s window (t - 1 s, t]: row 2 is late, clamped to 0.5 s; row 3 at 2 s is alone.
        "imbalance_1_mean_1s": [-0.5, -0.75, -1 / 3, -0.5],
        "imbalance_5_mean_1s": [
            -1 / 3,
            (-1 / 3 - 22 / 38) / 2,
            (-1 / 3 - 22 / 38 + 1 / 7) / 3,
            -0.2,
        ],
    }
    for name, values in expected.items():
        if name == "late":
            assert got[name].tolist() == values
        else:
            np.testing.assert_allclose(got[name], values, rtol=0, atol=1e-12, err_msg=name)
    assert got["seq"].tolist() == [0, 1, 2, 3]


def test_book_engine_is_chunk_invariant_and_restores() -> None:
    rng = np.random.default_rng(5)
    n, levels = 3000, 3
    ts = np.cumsum(rng.integers(0, 400_000_000, size=n))
    ts[rng.choice(n, 40, replace=False)] -= 2 * SEC  # some late snapshots
    mid = 100 + np.cumsum(rng.normal(0, 0.01, size=n))
    bid_px = mid[:, None] - 0.01 * np.arange(1, levels + 1)
    ask_px = mid[:, None] + 0.01 * np.arange(1, levels + 1)
    bid_sz = rng.integers(0, 50, size=(n, levels)).astype(float)
    ask_sz = rng.integers(0, 50, size=(n, levels)).astype(float)
    spec = FeatureSpec(book_tick_window=20, book_time_window=5.0)

    def run(engine: BookFeatureEngine, a: int, b: int) -> pd.DataFrame:
        return engine.update(
            "ES", ts[a:b], bid_px[a:b], bid_sz[a:b], ask_px[a:b], ask_sz[a:b], partition=3
        )

    whole = run(BookFeatureEngine(spec), 0, n)
    assert (whole["partition"] == 3).all()
    assert whole["late"].any()
    assert whole["imbalance_1"].isna().any()  # both level-1 sizes 0 somewhere
    cuts = random_cuts(np.random.default_rng(6), n, 1, 400)
    engine = BookFeatureEngine(spec)
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if i == len(cuts) // 2:
            engine = BookFeatureEngine.restore(spec, engine.snapshot())
        parts.append(run(engine, a, b))
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole, check_exact=True)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.drop(columns="price"), "'price' column"),
        (lambda f: f.drop(columns="volume"), "'size' or 'volume'"),
        (lambda f: f.drop(columns="timestamp"), "'ts' or 'timestamp'"),
        (lambda f: f.assign(price=f["price"].where(f.index != 7)), "price .* row 7"),
        (lambda f: f.assign(volume=f["volume"] * 0), "size must be finite and > 0; row 0"),
        (lambda f: f.assign(price=-f["price"]), "price must be finite and > 0"),
        (lambda f: f.assign(timestamp=f["timestamp"].where(f.index != 3)), "NaT at row 3"),
        (lambda f: f.assign(symbol=None), "symbol is missing"),
        (lambda f: f.assign(timestamp=f["price"]), "int64 nanoseconds"),
    ],
)
def test_bad_tick_frames_are_refused(es_frame: pd.DataFrame, change, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        online_features(change(es_frame.iloc[:20].copy()))


def test_bad_engine_arguments_are_refused(es: Ticks) -> None:
    engine = TickFeatureEngine(SPEC)
    ts, price, size = es.ts[:10], es.price[:10], es.size[:10]
    with pytest.raises(ValueError, match="shape"):
        engine.update("ES", ts, price[:9], size)
    with pytest.raises(ValueError, match="nanoseconds"):
        engine.update("ES", ts.astype(float), price, size)
    with pytest.raises(ValueError, match="symbol"):
        engine.update("", ts, price, size)
    with pytest.raises(ValueError, match="offsets"):
        engine.update("ES", ts, price, size, offsets=np.arange(3))
    with pytest.raises(ValueError, match="partition"):
        engine.update("ES", ts, price, size, partition="0")
    one = pd.DataFrame({"symbol": ["ES"], "ts": [1], "price": [1.0], "size": [1]})
    with pytest.raises(ValueError, match="chunk_size"):
        online_features(one, chunk_size=0)
    # A refused update leaves no trace: the engine has not seen a tick yet.
    assert engine.symbols == []
    assert len(engine.update("ES", ts[:0], price[:0], size[:0])) == 0


def test_bad_books_are_refused() -> None:
    book = hand_book()
    engine = BookFeatureEngine(BOOK_SPEC)
    bad_size = book | {"bid_sz": book["bid_sz"] * -1}
    with pytest.raises(ValueError, match="bid size at row 0, level 0"):
        engine.update("ES", **bad_size)
    bad_price = book | {"ask_px": book["ask_px"] * 0}
    with pytest.raises(ValueError, match="ask price"):
        engine.update("ES", **bad_price)
    orphan_size = book | {"ask_sz": np.where(np.isnan(book["ask_px"]), 5.0, book["ask_sz"])}
    with pytest.raises(ValueError, match=r"ask size .* empty: price NaN"):
        engine.update("ES", **orphan_size)
    with pytest.raises(ValueError, match="levels"):
        engine.update("ES", **(book | {"bid_sz": book["bid_sz"][:, :2]}))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tick_windows": (0,)}, "tick_windows"),
        ({"tick_windows": (20, 20)}, "duplicates"),
        ({"time_windows": (-1.0,)}, "time_windows"),
        ({"time_windows": (float("nan"),)}, "time_windows"),
        ({"return_lags": (True,)}, "return_lags"),
        ({"rsi_period": 0}, "rsi_period"),
        ({"book_depth": 0}, "book_depth"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureSpec(**kwargs)


def test_spec_columns_follow_the_configuration() -> None:
    spec = FeatureSpec(
        return_lags=[1],
        tick_windows=[5],
        time_windows=[0.25],
        tumbling_tick_windows=(),
        tumbling_time_windows=(1,),
        rsi_period=None,
        book_depth=1,
        book_tick_window=None,
    )
    assert spec.return_lags == (1,)  # lists become tuples
    assert spec.tick_columns()[8:] == [
        "ret_1",
        *["sma_5t", "ema_5t", "vol_5t", "vwap_5t", "volume_5t"],
        *["sma_250ms", "vol_250ms", "vwap_250ms", "volume_250ms", "count_250ms"],
        "tumble_1s_start",
        *["tumble_1s_count", "tumble_1s_sma", "tumble_1s_vol", "tumble_1s_vwap"],
        "tumble_1s_volume",
    ]
    assert spec.book_columns()[6:] == [
        *["best_bid", "best_ask", "bid_size", "ask_size", "mid", "spread", "spread_bps"],
        *["imbalance_1", "microprice", "imbalance_1_mean_10s"],
    ]
