"""The market model: labels, model inputs, purged CV, tuned training and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import tune
from ray.tune.search.sample import Categorical, Float

from rayfin.datasets import es_ticks
from rayfin.errors import ModelInputError, TrainingError
from rayfin.features import online_features
from rayfin.trading.cv import purged_walk_forward
from rayfin.trading.inputs import SENTIMENT, model_inputs
from rayfin.trading.labels import (
    DOWN,
    FLAT,
    UNLABELLED,
    UP,
    LabelSpec,
    class_counts,
    label_end_times,
    make_labels,
)
from rayfin.trading.monitoring import psi
from rayfin.trading.registry import ModelRegistry, ModelVersion
from rayfin.trading.training import SearchSpace, train_model

S = 1_000_000_000
ES_ROWS = 60_000
# One small grid, few rounds: the tests check the machinery, not the model's skill.
TINY_SEARCH = SearchSpace(
    grid={"num_leaves": (7, 15)},
    fixed={"min_data_in_leaf": 500, "learning_rate": 0.1, "feature_fraction": 0.5},
)
TINY = {"search": TINY_SEARCH, "max_rounds": 60, "early_stopping_rounds": 10}


@pytest.fixture(scope="module")
def es_raw() -> pd.DataFrame:
    return es_ticks(ES_ROWS)


@pytest.fixture(scope="module")
def es_features(es_raw: pd.DataFrame) -> pd.DataFrame:
    return online_features(es_raw)


def frame(symbols: list[str], ts: list[int], prices: list[float]) -> pd.DataFrame:
    seq: list[int] = []
    seen: dict[str, int] = {}
    for symbol in symbols:
        seq.append(seen.get(symbol, 0))
        seen[symbol] = seq[-1] + 1
    return pd.DataFrame(
        {"symbol": symbols, "ts": np.array(ts, dtype=np.int64), "price": prices, "seq": seq}
    )


# -- labels ----------------------------------------------------------------------------------


def test_tick_horizon_labels_per_symbol_with_unmatured_rows() -> None:
    # Two symbols interleaved; each looks 2 of its own ticks ahead.
    f = frame(
        ["A", "B", "A", "B", "A", "A", "B", "A"],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [100.0, 50.0, 100.25, 50.0, 100.5, 100.0, 49.5, 100.25],
    )
    spec = LabelSpec(horizon_ticks=2, threshold=0.5)
    # A: 100 -> 100.5 up; 100.25 -> 100 flat; 100.5 -> 100.25 flat; last two unmatured.
    # B: 50 -> 49.5 down; the other two unmatured.
    expected = [UP, DOWN, FLAT, UNLABELLED, FLAT, UNLABELLED, UNLABELLED, UNLABELLED]
    assert make_labels(f, spec).tolist() == expected
    # A label is known when the horizon's tick arrives.
    ends = label_end_times(f, spec)
    assert ends[[0, 1, 2, 4]].tolist() == [5, 7, 6, 8]
    assert (ends[[3, 5, 6, 7]] == np.iinfo(np.int64).max).all()


def test_labels_line_up_with_rows_in_any_order() -> None:
    f = frame(["A"] * 6, [1, 2, 3, 4, 5, 6], [10.0, 10.5, 11.0, 10.0, 9.0, 9.5])
    spec = LabelSpec(horizon_ticks=1, threshold=0.5)
    shuffled = f.iloc[[3, 0, 5, 1, 4, 2]]
    assert make_labels(shuffled, spec).tolist() == make_labels(f, spec)[[3, 0, 5, 1, 4, 2]].tolist()


def test_seconds_horizon_uses_the_last_price_by_then() -> None:
    f = frame(
        ["A"] * 6,
        [0, 1 * S, 2 * S, 5 * S, 9 * S, 10 * S],
        [10.0, 10.25, 9.5, 11.0, 10.0, 10.0],
    )
    spec = LabelSpec(horizon_seconds=4, threshold=0.5)
    # t=0 -> price at 4 s is the 2 s trade (9.5): down. t=1 -> at 5 s, 11.0: up.
    # t=2 -> at 6 s, still 11.0: up. t=5 -> at 9 s, 10.0: down. t=9, 10: no trade at or
    # after 13 s / 14 s yet, so unmatured.
    assert make_labels(f, spec).tolist() == [DOWN, UP, UP, DOWN, UNLABELLED, UNLABELLED]
    assert label_end_times(f, spec)[:4].tolist() == [4 * S, 5 * S, 6 * S, 9 * S]


def test_seconds_horizon_counts_late_rows_at_the_watermark() -> None:
    # The third row is late (2 s after a 6 s tick): it counts at 6 s, so its 4 s horizon
    # ends at 10 s, where the price is 12.
    f = frame(["A"] * 4, [0, 6 * S, 2 * S, 10 * S], [10.0, 10.0, 11.0, 12.0])
    labels = make_labels(f, LabelSpec(horizon_seconds=4, threshold=0.5))
    assert labels[2] == UP
    assert label_end_times(f, LabelSpec(horizon_seconds=4))[2] == 10 * S


def test_threshold_move_counts_despite_float_rounding() -> None:
    f = frame(["A"] * 3, [1, 2, 3], [1.1, 1.3, 1.1])
    assert 1.3 - 1.1 < 0.2  # binary floating point
    assert make_labels(f, LabelSpec(horizon_ticks=1, threshold=0.2))[:2].tolist() == [UP, DOWN]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"horizon_ticks": 10, "horizon_seconds": 5.0}, "not both"),
        ({"horizon_ticks": 0}, "positive int"),
        ({"horizon_ticks": True}, "positive int"),
        ({"horizon_seconds": -1.0}, "positive"),
        ({"threshold": 0.0}, "positive points"),
        ({"threshold": float("nan")}, "positive points"),
    ],
)
def test_label_spec_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(TrainingError, match=match):
        LabelSpec(**kwargs)


def test_label_spec_defaults_and_round_trip() -> None:
    spec = LabelSpec()
    assert (spec.horizon_ticks, spec.horizon_seconds, spec.threshold) == (100, None, 0.25)
    timed = LabelSpec(horizon_seconds=30, threshold=0.5)
    assert timed.horizon_ns == 30 * S
    assert LabelSpec.from_dict(timed.to_dict()) == timed


def test_labels_need_symbol_ts_and_price() -> None:
    with pytest.raises(TrainingError, match="'price'"):
        make_labels(pd.DataFrame({"symbol": ["A"], "ts": [1]}))


def test_default_labels_populate_every_class_on_es(es_features: pd.DataFrame) -> None:
    labels = make_labels(es_features)
    assert (labels == UNLABELLED).sum() == 100  # the last 100 ticks have no outcome yet
    counts = class_counts(labels)
    shares = {name: count / sum(counts.values()) for name, count in counts.items()}
    assert all(0.2 < share < 0.5 for share in shares.values()), shares


# -- model inputs ----------------------------------------------------------------------------


def test_model_inputs_are_level_free(es_features: pd.DataFrame) -> None:
    inputs = model_inputs(es_features)
    columns = set(inputs.columns)
    for identity in ("symbol", "ts", "partition", "offset", "seq", "late", "price"):
        assert identity not in columns
    assert not [c for c in columns if c.endswith(("_id", "_start"))]
    assert not {"sma_20t", "ema_100t", "vwap_10s", "tumble_60s_sma"} & columns
    np.testing.assert_array_equal(
        inputs["price_minus_sma_20t"], es_features["price"] - es_features["sma_20t"]
    )
    np.testing.assert_array_equal(inputs["vol_100t"], es_features["vol_100t"])
    assert {"ret_1", "rsi_14", "volume_60s", "count_10s", "tumble_20t_vol", "size"} <= columns
    assert (inputs[SENTIMENT] == 0.0).all()
    assert (inputs.dtypes == np.float64).all()
    # No book columns in a trade-only frame.
    assert not [c for c in columns if "spread" in c or "imbalance" in c]


def test_model_inputs_take_sentiment_and_book_columns_when_present() -> None:
    f = pd.DataFrame(
        {
            "price": [100.0, 101.0],
            "sma_20t": [99.0, 100.0],
            "spread": [0.25, 0.5],
            "imbalance_1": [0.1, -0.2],
            "microprice": [100.1, 100.9],
            "best_bid": [99.75, 100.75],
            SENTIMENT: [0.5, np.nan],
        }
    )
    inputs = model_inputs(f)
    assert list(inputs.columns) == [
        "price_minus_sma_20t",
        "spread",
        "imbalance_1",
        "price_minus_microprice",
        SENTIMENT,
    ]
    assert inputs[SENTIMENT].tolist() == [0.5, 0.0]  # a missing score is neutral
    assert model_inputs(f, sentiment=-0.3)[SENTIMENT].tolist() == [-0.3, -0.3]
    with pytest.raises(ModelInputError, match="sentiment"):
        model_inputs(f, sentiment=np.zeros(3))


# -- purged walk-forward CV ------------------------------------------------------------------


def test_purged_walk_forward_has_no_look_ahead() -> None:
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(0, 10_000, 2_000)) * 1_000  # with ties
    ts = rng.permutation(ts)  # any row order
    horizon, embargo = 50_000, 20_000
    splits = purged_walk_forward(ts, 4, horizon, embargo)
    assert len(splits) == 4
    seen_val: list[np.ndarray] = []
    for train, val in splits:
        val_start = ts[val].min()
        assert ts[train].max() < val_start
        assert (ts[train] + horizon < val_start - embargo).all()
        # Exactly the rows before the fold whose labels end clear of it, plus the embargo.
        before = np.flatnonzero(ts < val_start)
        kept = before[ts[before] + horizon < val_start - embargo]
        np.testing.assert_array_equal(train, kept)
        seen_val.append(val)
    # Validation folds are disjoint, in time order, and together cover the last 4/5.
    all_val = np.concatenate(seen_val)
    assert len(np.unique(all_val)) == len(all_val)
    assert len(all_val) == pytest.approx(len(ts) * 4 / 5, abs=40)
    starts = [ts[v].min() for v in seen_val]
    assert starts == sorted(starts)


def test_purge_and_embargo_sizes_in_ticks() -> None:
    ts = np.arange(1_000, dtype=np.int64)
    splits = purged_walk_forward(ts, 4, horizon=10, embargo=5, unit="ticks")
    for k, (train, val) in enumerate(splits):
        val_start = (k + 1) * 200
        np.testing.assert_array_equal(val, np.arange(val_start, val_start + 200))
        # 10 rows purged (their labels reach the fold) and 5 more embargoed.
        np.testing.assert_array_equal(train, np.arange(val_start - 15))


def test_purge_with_per_row_label_ends(es_features: pd.DataFrame) -> None:
    f = es_features.iloc[:5_000]
    spec = LabelSpec(horizon_ticks=100)
    ends = label_end_times(f, spec)
    labelled = make_labels(f, spec) >= 0
    ts = f["ts"].to_numpy()[labelled]
    for train, val in purged_walk_forward(ts, 3, ends[labelled]):
        assert ends[labelled][train].max() < ts[val].min()


def test_cv_errors() -> None:
    with pytest.raises(TrainingError, match="cannot make"):
        purged_walk_forward(np.arange(3), 3, 0)
    with pytest.raises(TrainingError, match="no training rows"):
        purged_walk_forward(np.arange(100), 4, horizon=30, unit="ticks")
    with pytest.raises(TrainingError, match="n_splits"):
        purged_walk_forward(np.arange(100), 0, 0)
    with pytest.raises(TrainingError, match="before its row"):
        purged_walk_forward(np.arange(100), 2, np.arange(100) - 1)


def test_search_space_grid_and_random() -> None:
    grid = SearchSpace(grid={"num_leaves": [7, 15]}).param_space()
    assert grid == {"num_leaves": {"grid_search": [7, 15]}}
    drawn = SearchSpace(
        grid={"num_leaves": [7, 15], "learning_rate": tune.loguniform(0.01, 0.1)}, samples=3
    ).param_space()
    assert isinstance(drawn["num_leaves"], Categorical)
    assert isinstance(drawn["learning_rate"], Float)


# -- training and scoring --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(
    ray_local: None,
    es_raw: pd.DataFrame,
    es_features: pd.DataFrame,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ModelRegistry, ModelVersion, ModelVersion]:
    """The same model trained twice with one seed: from raw ticks, then from features."""
    registry = ModelRegistry(tmp_path_factory.mktemp("models"))
    first = train_model(es_raw, registry=registry, seed=7, **TINY)
    second = train_model(es_features, registry=registry, seed=7, **TINY)
    return registry, first, second


@pytest.mark.integration
def test_training_registers_a_version_with_metrics(
    trained: tuple[ModelRegistry, ModelVersion, ModelVersion],
) -> None:
    registry, version, _ = trained
    assert (version.name, version.version) == ("market", 1)
    assert registry.versions("market")[0] == version
    metrics = version.metrics
    assert metrics["trials"] == 2
    assert len(metrics["cv_logloss_folds"]) == len(metrics["best_iterations"]) == 3
    assert 0.5 < metrics["cv_logloss"] < 1.5
    assert 0.0 <= metrics["cv_macro_f1"] <= 1.0
    assert metrics["rows"] == ES_ROWS - 100
    assert sum(metrics["class_counts"].values()) == metrics["rows"]
    assert metrics["data_parallel_workers"] == 0
    assert version.params["num_leaves"] in (7, 15)
    assert version.params["num_boost_round"] == metrics["num_boost_round"] >= 1
    assert version.params["deterministic"] is True
    assert len(version.fingerprint) == 64
    assert version.label_spec == LabelSpec()
    assert "price_minus_vwap_60s" in version.features
    assert version.features[-1] == SENTIMENT


@pytest.mark.integration
def test_training_is_deterministic(
    trained: tuple[ModelRegistry, ModelVersion, ModelVersion],
    es_features: pd.DataFrame,
) -> None:
    registry, first, second = trained
    assert second.version == 2
    # Raw ticks and their feature frame are the same training data.
    assert first.fingerprint == second.fingerprint
    assert first.params == second.params
    assert first.metrics == second.metrics
    rows = es_features.iloc[-2_000:]
    a = registry.load("market", 1).predict_proba(rows)
    b = registry.load("market", 2).predict_proba(rows)
    np.testing.assert_array_equal(a, b)


@pytest.mark.integration
def test_training_stores_the_drift_reference_of_its_inputs(
    trained: tuple[ModelRegistry, ModelVersion, ModelVersion],
    es_features: pd.DataFrame,
) -> None:
    registry, first, second = trained
    reference = registry.reference("market", first.version)
    assert set(reference.columns) == set(first.features)
    assert reference.rows == first.metrics["rows"]
    assert registry.reference("market", second.version) == reference  # same inputs
    # The training inputs are the reference distribution: PSI exactly 0.
    inputs = model_inputs(es_features)[make_labels(es_features) >= 0]
    for name in ("ret_1", "price_minus_vwap_60s", "vol_60s", SENTIMENT):
        assert psi(reference.columns[name], inputs[name]) == 0.0


@pytest.mark.integration
def test_model_scores_feature_rows(
    trained: tuple[ModelRegistry, ModelVersion, ModelVersion],
    es_features: pd.DataFrame,
) -> None:
    registry, version, _ = trained
    model = registry.load("market", version.version)
    rows = es_features.iloc[-1_000:]
    assert SENTIMENT not in rows.columns
    proba = model.predict_proba(rows)  # no sentiment column: scored as neutral
    assert proba.shape == (1_000, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba > 0).all()
    assert model.classes == ("down", "flat", "up")
    neutral = model.predict_proba(rows.assign(**{SENTIMENT: 0.0}))
    np.testing.assert_array_equal(proba, neutral)
    as_mapping = {name: rows[name].to_numpy() for name in rows.columns}
    np.testing.assert_array_equal(model.predict_proba(as_mapping), proba)
    assert model.predict_proba(rows.iloc[:0]).shape == (0, 3)


@pytest.mark.integration
def test_scoring_names_missing_feature_columns(
    trained: tuple[ModelRegistry, ModelVersion, ModelVersion],
    es_features: pd.DataFrame,
) -> None:
    model = trained[0].load("market", 1)
    rows = es_features.iloc[-10:].drop(columns=["sma_20t", "rsi_14"])
    with pytest.raises(ModelInputError, match=r"\['rsi_14', 'sma_20t'\]"):
        model.predict_proba(rows)


@pytest.mark.integration
def test_data_parallel_training_on_two_workers(
    ray_local: None, es_features: pd.DataFrame, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    version = train_model(
        es_features.iloc[:20_000], registry=registry, num_workers=2, seed=0, **TINY
    )
    assert version.metrics["data_parallel_workers"] == 2
    proba = registry.load("market", version.version).predict_proba(es_features.iloc[-500:])
    assert proba.shape == (500, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


@pytest.mark.integration
def test_dry_run_writes_nothing(ray_local: None, es_features: pd.DataFrame, tmp_path: Path) -> None:
    root = tmp_path / "models"
    version = train_model(
        es_features.iloc[:10_000], registry=root, register=False, n_splits=2, **TINY
    )
    assert (version.version, version.path, version.registered) == (0, None, False)
    assert version.metrics["folds"] == 2
    assert not root.exists()


@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
def test_training_rejects_unusable_data_and_settings(es_features: pd.DataFrame) -> None:
    rows = es_features.iloc[:5_000]
    with pytest.raises(TrainingError, match="no down/up rows"):
        train_model(rows, label_spec=LabelSpec(threshold=50.0), register=False)
    with pytest.raises(TrainingError, match="only 99 labelled rows"):
        train_model(es_features.iloc[:199], register=False)
    with pytest.raises(TrainingError, match="the Ray cluster has 2"):
        train_model(rows, num_workers=8, register=False)
    with pytest.raises(TrainingError, match="'seed' is set by training"):
        SearchSpace(grid={"seed": [1, 2]})
    distribution = tune.loguniform(0.01, 0.1)
    with pytest.raises(TrainingError, match="distribution"):
        SearchSpace(grid={"learning_rate": distribution})
    with pytest.raises(TrainingError, match="DataFrame or a Ray Dataset"):
        train_model([1, 2, 3], register=False)  # type: ignore[arg-type]
