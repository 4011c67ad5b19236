"""The feedback loop: PSI, live accuracy as labels mature, drift, and guarded retraining."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.errors import ConfigError, ModelInputError, ModelNotFoundError, TrainingError
from rayfin.features import online_features
from rayfin.trading.evaluation import score
from rayfin.trading.labels import DOWN, FLAT, UP, LabelSpec, make_labels
from rayfin.trading.monitoring import (
    KEPT_CURRENT,
    NOT_TRIGGERED,
    PROMOTED,
    ColumnReference,
    DriftReference,
    ModelMonitor,
    MonitorStatus,
    MonitorThresholds,
    psi,
    retrain_if_needed,
)
from rayfin.trading.registry import ModelRegistry, ModelVersion
from rayfin.trading.scoring import Model
from rayfin.trading.training import SearchSpace, train_model

FEATURES = ["ret_1", "price_minus_sma_20t", "sentiment"]
S = 1_000_000_000


# -- PSI and drift references ----------------------------------------------------------------


def test_psi_is_near_zero_on_the_same_distribution_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20_000)
    same = rng.normal(size=5_000)
    assert psi(reference, same) < 0.01
    assert psi(reference, same + 1.0) > 0.25  # a one-sigma shift of the mean
    assert psi(reference, same * 3.0) > 0.25  # tripled volatility
    assert psi(reference, reference) == 0.0
    # Missing values are a bin of their own.
    assert psi(reference, np.full(100, np.nan)) > 5
    # A constant column: unchanged is stable, any other value is a big shift.
    assert psi(np.zeros(1_000), np.zeros(10)) == 0.0
    assert psi(np.zeros(1_000), np.full(10, 0.01)) > 5
    assert psi(np.zeros(1_000), np.full(10, -0.01)) > 5


def test_bins_keep_one_tick_returns_together_across_price_levels() -> None:
    # One-tick log returns are 0.25/price: a different float at every price level. Moving
    # from 1640 to 1650 is no drift in the return distribution, and PSI must say so.
    rng = np.random.default_rng(1)
    ticks = rng.choice([-2, -1, 0, 0, 0, 0, 1, 2], size=10_000)
    prices = rng.uniform(1639, 1645, size=10_000)
    train = np.log1p(ticks * 0.25 / prices)
    later = np.log1p(ticks * 0.25 / rng.uniform(1648, 1652, size=10_000))
    reference = ColumnReference.from_values(train)
    assert psi(reference, later) < 0.01
    # Zero holds half the rows: it has a bin of its own.
    shares = reference.shares(np.zeros(5))
    assert shares.max() == 1.0
    assert reference.expected[np.argmax(shares)] == pytest.approx(0.5, abs=0.02)


def test_drift_reference_round_trips_and_checks_its_bins() -> None:
    inputs = pd.DataFrame(
        {"a": np.r_[np.arange(99.0), np.nan], "b": np.ones(100), "c": np.arange(100) % 3}
    )
    reference = DriftReference.from_inputs(inputs)
    assert reference.rows == 100
    assert reference.columns["a"].missing == pytest.approx(0.01)
    assert len(reference.columns["a"].proportions) == len(reference.columns["a"].edges) + 1
    assert DriftReference.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference
    with pytest.raises(ConfigError, match="increasing"):
        ColumnReference(edges=(1.0, 0.0), proportions=(0.5, 0.25, 0.25), missing=0.0)
    with pytest.raises(ConfigError, match="sum to 1"):
        ColumnReference(edges=(0.0,), proportions=(0.5, 0.25), missing=0.0)
    with pytest.raises(ConfigError, match="bins must be"):
        ColumnReference.from_values([1.0, 2.0], bins=1)
    with pytest.raises(ModelInputError, match="no observed values"):
        psi(reference.columns["a"], [])


# -- the monitor on hand-made rows -----------------------------------------------------------


def tiny_model(spec: LabelSpec, metrics: dict | None = None) -> Model:
    """A real booster over :data:`FEATURES`; the monitor only needs its inputs and label."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, len(FEATURES)))
    y = (x[:, 0] > 0.5).astype(int) + (x[:, 0] > -0.5).astype(int)
    params = {"objective": "multiclass", "num_class": 3, "verbosity": -1, "num_threads": 1}
    booster = lightgbm.train(
        params, lightgbm.Dataset(x, y, feature_name=FEATURES), num_boost_round=2
    )
    version = ModelVersion(
        name="market",
        version=1,
        created="2024-01-01T00:00:00+00:00",
        params={},
        metrics=metrics or {},
        features=tuple(FEATURES),
        label_spec=spec,
        fingerprint="f",
        lightgbm_version=lightgbm.__version__,
    )
    return Model(booster, version)


def tiny_reference(rows: int = 1_000) -> DriftReference:
    rng = np.random.default_rng(2)
    inputs = pd.DataFrame(
        {
            "ret_1": rng.normal(0, 1e-4, rows),
            "price_minus_sma_20t": rng.normal(0, 0.1, rows),
            "sentiment": np.zeros(rows),
        }
    )
    return DriftReference.from_inputs(inputs)


def rows(symbols: list[str], ts: list[int], prices: list[float]) -> pd.DataFrame:
    """Engine-like feature rows with the columns the tiny model's inputs come from."""
    seq: list[int] = []
    seen: dict[str, int] = {}
    for symbol in symbols:
        seq.append(seen.get(symbol, 0))
        seen[symbol] = seq[-1] + 1
    price = np.asarray(prices, dtype=np.float64)
    return pd.DataFrame(
        {
            "symbol": symbols,
            "ts": np.asarray(ts, dtype=np.int64),
            "price": price,
            "seq": seq,
            "ret_1": 0.0,
            "sma_20t": price,
        }
    )


def one_hot(classes: list[int]) -> np.ndarray:
    probs = np.full((len(classes), 3), 0.1)
    probs[np.arange(len(classes)), classes] = 0.8
    return probs


def test_predictions_are_scored_only_once_their_label_matures() -> None:
    spec = LabelSpec(horizon_ticks=2, threshold=0.5)
    thresholds = MonitorThresholds(min_matured=1)
    monitor = ModelMonitor(tiny_model(spec), reference=tiny_reference(), thresholds=thresholds)
    # Two symbols interleaved; each looks 2 of its own ticks ahead. True labels:
    # A: 100 -> 100.5 UP, 100.25 -> 100 FLAT, 100.5 -> 100.25 FLAT, then unmatured;
    # B: 50 -> 49.5 DOWN, then unmatured.
    frame = rows(
        ["A", "B", "A", "B", "A", "A", "B", "A"],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [100.0, 50.0, 100.25, 50.0, 100.5, 100.0, 49.5, 100.25],
    )
    predicted = [UP, UP, DOWN, FLAT, FLAT, FLAT, FLAT, FLAT]
    probs = one_hot(predicted)

    assert monitor.observe(frame.iloc[:4], probs[:4]) == 0  # nothing has matured yet
    status = monitor.status()
    assert (status.observed, status.matured, status.pending) == (4, 0, 4)
    assert status.accuracy is None
    assert status.macro_f1 is None
    assert not status.triggered

    assert monitor.observe(frame.iloc[4:5], probs[4:5]) == 1  # A's first: UP, right
    status = monitor.status()
    assert (status.matured, status.pending, status.accuracy) == (1, 4, 1.0)

    assert monitor.observe(frame.iloc[5:], probs[5:]) == 3
    status = monitor.status()
    # Matured: A0 UP (right), A1 FLAT (said DOWN), A2 FLAT (right), B0 DOWN (said UP).
    assert (status.matured, status.pending, status.window_matured) == (4, 4, 4)
    assert status.accuracy == 0.5
    expected = score(np.array([UP, FLAT, FLAT, DOWN]), np.array([UP, DOWN, FLAT, UP]))
    assert status.macro_f1 == pytest.approx(expected.macro_f1)
    assert status.psi == {}
    assert status.max_psi is None
    assert status.psi_rows == 8


def test_matured_scores_equal_labels_of_the_whole_stream() -> None:
    # A time horizon, two symbols, late rows, uneven batches: the monitor must score every
    # matured prediction against exactly the label make_labels gives on the whole stream.
    rng = np.random.default_rng(3)
    n = 3_000
    symbols = rng.choice(["ES", "NQ"], size=n).tolist()
    ts = np.cumsum(rng.integers(0, 3 * S // 10, size=n))
    late = rng.random(n) < 0.05
    ts[late] -= rng.integers(0, 2 * S, size=late.sum())  # some rows arrive late
    steps = rng.choice([-0.25, 0.0, 0.25], size=n)
    prices = 1650 + np.cumsum(steps)
    frame = rows(symbols, ts.tolist(), prices.tolist())
    spec = LabelSpec(horizon_seconds=5.0, threshold=0.5)
    truth = make_labels(frame, spec)
    predicted = rng.integers(0, 3, size=n)
    skilled = rng.random(n) < 0.5
    predicted[skilled] = truth[skilled].clip(0)  # some skill
    monitor = ModelMonitor(
        tiny_model(spec),
        reference=tiny_reference(),
        window=n,
        thresholds=MonitorThresholds(min_matured=1, min_psi_rows=1),
    )
    cuts = np.sort(rng.choice(np.arange(1, n), size=40, replace=False))
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True):
        monitor.observe(frame.iloc[start:stop], one_hot(predicted[start:stop].tolist()))
    status = monitor.status()
    matured = truth >= 0
    assert status.matured == matured.sum()
    assert status.pending == n - matured.sum()
    expected = score(truth[matured], predicted[matured])
    assert status.accuracy == pytest.approx(expected.accuracy)
    assert status.macro_f1 == pytest.approx(expected.macro_f1)


def test_memory_is_bounded_by_the_windows() -> None:
    spec = LabelSpec(horizon_ticks=10, threshold=0.25)
    monitor = ModelMonitor(
        tiny_model(spec),
        reference=tiny_reference(),
        window=50,
        psi_window=30,
        max_pending=5,
        thresholds=MonitorThresholds(min_matured=50, min_psi_rows=30),
    )
    n = 200
    frame = rows(["ES"] * n, list(range(n)), (1650 + 0.25 * (np.arange(n) % 7)).tolist())
    for start in range(0, n, 25):
        monitor.observe(frame.iloc[start : start + 25], one_hot([FLAT] * 25))
    status = monitor.status()
    assert (status.window_matured, status.psi_rows, status.pending) == (50, 30, 5)
    # Each batch leaves 10 unmatured; all but 5 are given up unscored.
    assert status.dropped + status.matured + status.pending == n
    assert status.dropped > 0


def test_degradation_against_absolute_and_validated_scores() -> None:
    spec = LabelSpec(horizon_ticks=1, threshold=0.25)
    n = 40
    prices = 1650 + 0.25 * (np.arange(n) % 2)  # up, down, up, ...: labels alternate
    frame = rows(["ES"] * n, list(range(n)), prices.tolist())
    always_flat = one_hot([FLAT] * n)
    thresholds = MonitorThresholds(min_accuracy=0.4, min_matured=20)
    model = tiny_model(spec, metrics={"cv_macro_f1": 0.45})
    monitor = ModelMonitor(model, reference=tiny_reference(), thresholds=thresholds)
    monitor.observe(frame.iloc[:15], always_flat[:15])
    assert not monitor.status().degraded  # 14 matured: too few to judge
    monitor.observe(frame.iloc[15:], always_flat[15:])
    status = monitor.status()
    assert status.accuracy == 0.0
    assert status.degraded
    assert not status.drifted
    assert any(r.startswith("accuracy 0.000 < 0.4") for r in status.reasons)
    assert any("below the model's cross-validated 0.450" in r for r in status.reasons)
    assert status.triggered


def test_monitor_rejects_what_it_cannot_use() -> None:
    spec = LabelSpec(horizon_ticks=2)
    model = tiny_model(spec)
    monitor = ModelMonitor(model, reference=tiny_reference())
    frame = rows(["A", "A"], [1, 2], [1.0, 2.0])
    with pytest.raises(ModelInputError, match=r"probs must be \[2, 3\]"):
        monitor.observe(frame, np.ones((2, 2)))
    with pytest.raises(ModelInputError, match=r"need columns \['price'\]"):
        monitor.observe(frame.drop(columns="price"), one_hot([FLAT, FLAT]))
    with pytest.raises(ModelInputError, match=r"missing.*\['sma_20t'\]"):
        monitor.observe(frame.drop(columns="sma_20t"), one_hot([FLAT, FLAT]))
    with pytest.raises(ConfigError, match="predicts labels of 2 ticks"):
        ModelMonitor(model, LabelSpec(horizon_ticks=3), reference=tiny_reference())
    partial = DriftReference.from_inputs(pd.DataFrame({"ret_1": [0.0, 1.0]}))
    with pytest.raises(ConfigError, match="no bins for"):
        ModelMonitor(model, reference=partial)
    with pytest.raises(ConfigError, match="never be reached"):
        ModelMonitor(model, reference=tiny_reference(), window=100)
    with pytest.raises(ConfigError, match="max_psi"):
        MonitorThresholds(max_psi=0)
    with pytest.raises(ConfigError, match="min_accuracy"):
        MonitorThresholds(min_accuracy=1.5)


def test_retraining_needs_a_trigger_and_sane_options(tmp_path: Path) -> None:
    calm = MonitorStatus(
        name="market",
        version=1,
        observed=0,
        matured=0,
        pending=0,
        dropped=0,
        window_matured=0,
        accuracy=None,
        macro_f1=None,
        psi={},
        psi_rows=0,
        max_psi=None,
        drifted_columns=(),
        drifted=False,
        degraded=False,
    )
    registry = ModelRegistry(tmp_path / "models")
    outcome = retrain_if_needed(calm, pd.DataFrame(), registry=registry)
    assert outcome.action == NOT_TRIGGERED
    assert not outcome.promoted
    assert outcome.candidate is None
    assert outcome.candidate_scores is None
    with pytest.raises(TrainingError, match="holdout_fraction"):
        retrain_if_needed(calm, pd.DataFrame(), registry=registry, holdout_fraction=1.0)
    with pytest.raises(TrainingError, match=r"sets \['label_spec'\] itself"):
        retrain_if_needed(calm, pd.DataFrame(), registry=registry, label_spec=LabelSpec())
    with pytest.raises(TrainingError, match="not 'other'"):
        retrain_if_needed(calm, pd.DataFrame(), registry=registry, name="other")
    drifted = MonitorStatus(**{**calm.__dict__, "drifted": True})
    with pytest.raises(ModelNotFoundError, match="no model named 'market'"):
        retrain_if_needed(drifted, pd.DataFrame(), registry=registry)


# -- injected drift on real ES ticks ---------------------------------------------------------

TINY_SEARCH = SearchSpace(
    grid={"num_leaves": (7,)},
    fixed={"min_data_in_leaf": 500, "learning_rate": 0.1, "feature_fraction": 0.5},
)
TINY = {"search": TINY_SEARCH, "max_rounds": 60, "early_stopping_rounds": 10, "n_splits": 2}
TRAIN, CALM, DRIFT = slice(0, 30_000), slice(30_000, 60_000), slice(60_000, 90_000)
BATCH = 2_000


def inject_drift(ticks: pd.DataFrame) -> pd.DataFrame:
    """A new regime: moves three times as large, and a slow swing of 2 points that makes
    the price over the next 100 ticks predictable for a model trained on it."""
    price = ticks["price"].to_numpy()
    i = np.arange(len(price))
    drifted = price[0] + 3.0 * (price - price[0]) + 2.0 * np.sin(2 * np.pi * i / 1_000)
    return ticks.assign(price=np.round(drifted * 4) / 4)  # still on the 0.25 grid


def feed(monitor: ModelMonitor, model: Model, features: pd.DataFrame) -> MonitorStatus:
    for start in range(0, len(features), BATCH):
        batch = features.iloc[start : start + BATCH]
        monitor.observe(batch, model.predict_proba(batch))
    return monitor.status()


@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
def test_injected_drift_triggers_retraining_and_guarded_promotion(tmp_path: Path) -> None:
    raw = es_ticks(DRIFT.stop)
    ticks = pd.concat([raw.iloc[: DRIFT.start], inject_drift(raw.iloc[DRIFT])])
    features = online_features(ticks.reset_index(drop=True))  # one stream: no warm-up gaps
    registry = ModelRegistry(tmp_path / "models")
    production = train_model(features.iloc[TRAIN], registry=registry, seed=0, **TINY)
    registry.promote("market", production.version)

    monitor = ModelMonitor.from_registry(
        registry,
        "market",
        psi_window=30_000,
        thresholds=MonitorThresholds(min_psi_rows=30_000, min_matured=5_000),
    )
    model = registry.load("market")
    calm = feed(monitor, model, features.iloc[CALM])
    assert (calm.matured, calm.pending) == (29_900, 100)  # the last 100 await their horizon
    assert set(calm.psi) == set(production.features)
    assert calm.max_psi is not None
    assert calm.max_psi < 0.25
    assert not calm.triggered, calm.reasons
    quiet = retrain_if_needed(calm, features.iloc[CALM], registry=registry, **TINY)
    assert quiet.action == NOT_TRIGGERED
    assert [v.version for v in registry.versions("market")] == [1]  # nothing trained

    drifted = feed(monitor, model, features.iloc[DRIFT])
    assert drifted.drifted
    assert drifted.triggered
    assert {"vol_60s", "ret_100", "price_minus_sma_100t"} <= set(drifted.drifted_columns)
    assert "drifted past PSI 0.25" in drifted.reasons[0]

    recent = features.iloc[DRIFT]
    outcome = retrain_if_needed(drifted, recent, registry=registry, **TINY)
    # Either way the outcome says what was compared and why.
    assert outcome.action in (PROMOTED, KEPT_CURRENT)
    assert outcome.triggers == drifted.reasons
    assert outcome.current is not None
    assert outcome.current.version == 1
    assert outcome.candidate is not None
    assert outcome.candidate.version == 2
    assert outcome.candidate_scores is not None
    assert outcome.current_scores is not None
    assert outcome.candidate_scores.rows == outcome.current_scores.rows == outcome.holdout_rows
    # The hold-out is the last fifth of the labelled rows, and the candidate trained only
    # on rows before it, less the 100 whose horizon reaches into it.
    assert 0.2 * (len(recent) - 100) <= outcome.holdout_rows < 0.2 * len(recent)
    assert outcome.holdout_start_ns is not None
    before = int((recent["ts"] < outcome.holdout_start_ns).sum())
    assert outcome.candidate.metrics["rows"] == before - 100
    # Trained on the new regime, the candidate predicts it much better: promoted.
    assert outcome.candidate_scores.macro_f1 > outcome.current_scores.macro_f1 + 0.1
    assert outcome.action == PROMOTED
    assert outcome.promoted
    assert "the candidate is better" in outcome.reason
    assert registry.aliases("market") == {"production": 2}

    # The same data again trains the same candidate: a tie keeps the current version.
    again = retrain_if_needed(drifted, recent, registry=registry, **TINY)
    assert again.action == KEPT_CURRENT
    assert again.candidate is not None
    assert again.candidate.version == 3
    assert again.current is not None
    assert again.current.version == 2
    assert again.candidate_scores == again.current_scores
    assert "tied" in again.reason
    assert "no better" in again.reason
    assert registry.aliases("market") == {"production": 2}

    assert registry.rollback("market").version == 1
    assert registry.aliases("market") == {"production": 1}
