"""Walk-forward evaluation of the market model on a slice of the real ES ticks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.errors import RayfinError, TrainingError
from rayfin.features import online_features
from rayfin.trading.evaluation import (
    MODELS,
    Evaluation,
    score,
    update_results_section,
    walk_forward,
)
from rayfin.trading.labels import DOWN, FLAT, UP, LabelSpec, labels_and_ends
from rayfin.trading.training import SearchSpace

ES_ROWS = 40_000
TINY_SEARCH = SearchSpace(
    grid={"num_leaves": (7, 15)},
    fixed={"min_data_in_leaf": 500, "learning_rate": 0.1, "feature_fraction": 0.5},
)


@pytest.fixture(scope="module")
def es_features() -> pd.DataFrame:
    return online_features(es_ticks(ES_ROWS))


@pytest.fixture(scope="module")
def evaluation(ray_local: None, es_features: pd.DataFrame) -> Evaluation:
    return walk_forward(
        es_features,
        folds=2,
        train_fraction=0.5,
        search=TINY_SEARCH,
        n_splits=2,
        max_rounds=40,
        early_stopping_rounds=10,
    )


@pytest.mark.integration
def test_folds_are_time_ordered_disjoint_and_purged(
    evaluation: Evaluation, es_features: pd.DataFrame
) -> None:
    ts = es_features["ts"].to_numpy()
    labels, ends = labels_and_ends(es_features, LabelSpec())
    folds = evaluation.folds
    assert [f.index for f in folds] == [0, 1]
    for fold in folds:
        # Training ends before testing starts, and no label of a training row reaches it.
        assert fold.train_start_ns == ts.min()
        assert fold.train_end_ns < fold.test_start_ns <= fold.test_end_ns
        assert fold.last_label_end_ns < fold.test_start_ns
        # Checked against labels of the whole slice: exactly the rows whose label ends
        # before the block are trained on, and the rows before it whose label does not
        # are the purged ones.
        before = (ts < fold.test_start_ns) & (labels >= 0)
        assert fold.train_rows == int((before & (ends < fold.test_start_ns)).sum())
        assert fold.purged_rows == int((before & (ends >= fold.test_start_ns)).sum()) > 0
    assert folds[0].test_end_ns < folds[1].test_start_ns  # disjoint, in time order
    assert folds[1].train_rows > folds[0].train_rows  # expanding window
    # Every labelled row from the first block on is tested exactly once.
    tested = (ts >= folds[0].test_start_ns) & (labels >= 0)
    assert sum(f.test_rows for f in folds) == int(tested.sum())
    assert evaluation.pooled["lightgbm"].rows == int(tested.sum())
    assert evaluation.rows == ES_ROWS
    assert evaluation.labelled_rows == ES_ROWS - 100


@pytest.mark.integration
def test_metrics_are_consistent(evaluation: Evaluation) -> None:
    assert set(evaluation.pooled) == set(MODELS)
    for scores in [
        *evaluation.pooled.values(),
        *(s for f in evaluation.folds for s in f.scores.values()),
    ]:
        confusion = np.array(scores.confusion)
        assert confusion.sum() == scores.rows
        assert scores.accuracy == pytest.approx(np.trace(confusion) / scores.rows)
        assert list(confusion.sum(axis=1)) == list(scores.support)
        assert scores.macro_f1 == pytest.approx(np.mean(scores.f1))
        assert 0.0 <= scores.macro_f1 <= 1.0
        assert all(0.0 <= v <= 1.0 for v in (*scores.precision, *scores.recall))
        assert scores.log_loss is not None
        assert scores.log_loss > 0
    # Pooled counts are the folds' counts added up.
    for name in MODELS:
        summed = sum(np.array(f.scores[name].confusion) for f in evaluation.folds)
        np.testing.assert_array_equal(summed, np.array(evaluation.pooled[name].confusion))
    # The majority baseline predicts one class: its training set's most frequent.
    for fold in evaluation.folds:
        confusion = np.array(fold.scores["majority"].confusion)
        majority = max(fold.train_class_counts, key=fold.train_class_counts.__getitem__)
        column = ("down", "flat", "up").index(majority)
        assert confusion[:, column].sum() == fold.test_rows
        assert fold.params["num_leaves"] in (7, 15)
        assert 1 <= fold.params["num_boost_round"] <= 40
    shares = [share for _, share, _ in evaluation.importance]
    assert sum(shares) == pytest.approx(1.0)
    assert shares == sorted(shares, reverse=True)


@pytest.mark.integration
def test_report_renders(evaluation: Evaluation) -> None:
    data = json.loads(json.dumps(evaluation.to_dict()))
    assert data["setup"]["folds"] == 2
    assert data["setup"]["search"]["grid"] == {"num_leaves": [7, 15]}
    assert set(data["pooled"]) == set(MODELS)
    assert set(data["pooled"]["logistic"]["per_class"]) == {"down", "flat", "up"}
    text = evaluation.to_markdown()
    for heading in ("### Set-up", "### Pooled", "### Per class", "### Per fold", "importance"):
        assert heading in text
    for name in MODELS:
        assert f"| {name} |" in text
    ranked = evaluation.to_markdown(top=3).split("| rank |")[1].splitlines()
    ranks = [line.split(" | ")[0] for line in ranked if line.startswith("| ")]
    assert ranks == ["| 1", "| 2", "| 3"]


def test_score_by_hand() -> None:
    y = np.array([DOWN, DOWN, FLAT, UP, UP, UP])
    pred = np.array([DOWN, FLAT, FLAT, UP, UP, DOWN])
    proba = np.full((6, 3), 1 / 3)
    s = score(y, pred, proba)
    assert s.confusion == ((1, 1, 0), (0, 1, 0), (1, 0, 2))
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.precision == pytest.approx((0.5, 0.5, 1.0))
    assert s.recall == pytest.approx((0.5, 1.0, 2 / 3))
    assert s.balanced_accuracy == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert s.f1 == pytest.approx((0.5, 2 / 3, 0.8))
    assert s.log_loss == s.balanced_log_loss == pytest.approx(np.log(3))
    # A class neither present nor predicted scores 0 and still counts in the macro mean.
    two = score(np.array([DOWN, UP]), np.array([DOWN, UP]))
    assert two.f1 == (1.0, 0.0, 1.0)
    assert two.macro_f1 == pytest.approx(2 / 3)
    assert two.log_loss is None
    with pytest.raises(TrainingError, match="class indices"):
        score(np.array([0, 3]), np.array([0, 1]))


def test_walk_forward_rejects_bad_settings(es_features: pd.DataFrame) -> None:
    # Checked before any training, so no Ray is needed.
    with pytest.raises(TrainingError, match="folds"):
        walk_forward(es_features, folds=0)
    with pytest.raises(TrainingError, match="train_fraction"):
        walk_forward(es_features, train_fraction=1.0)
    with pytest.raises(TrainingError, match="cannot make"):
        walk_forward(es_features.iloc[:3], folds=4)


def test_results_section_keeps_other_content(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "RESULTS.md"
    update_results_section(path, "market-model", "first run")
    text = path.read_text()
    assert text.startswith("# Results")
    assert "<!-- market-model:begin -->\nfirst run\n<!-- market-model:end -->" in text
    # Another section and hand-written text around ours survive a rewrite.
    path.write_text(
        "# Results\n\nintro\n\n<!-- market-model:begin -->\nold\n<!-- market-model:end -->\n"
        "\nnotes after\n\n<!-- llm:begin -->\nllm numbers\n<!-- llm:end -->\n"
    )
    update_results_section(path, "market-model", "## Market\n\nnew table\n")
    assert path.read_text() == (
        "# Results\n\nintro\n\n<!-- market-model:begin -->\n## Market\n\nnew table\n"
        "<!-- market-model:end -->\n\nnotes after\n\n<!-- llm:begin -->\nllm numbers\n"
        "<!-- llm:end -->\n"
    )
    update_results_section(path, "sentiment", "appended")
    assert path.read_text().endswith("<!-- sentiment:begin -->\nappended\n<!-- sentiment:end -->\n")
    path.write_text("<!-- market-model:end -->\n<!-- market-model:begin -->\n")
    with pytest.raises(RayfinError, match="markers"):
        update_results_section(path, "market-model", "x")
