"""The VADER baseline scorer and the sentiment metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayfin.datasets import load_headlines
from rayfin.sentiment import LABELS, SentimentScorer, polarity, predicted_labels
from rayfin.sentiment.lexicon import VaderScorer, compound_to_probabilities, vader_label
from rayfin.sentiment.metrics import SentimentReport, evaluate


@pytest.fixture(scope="module")
def scorer() -> VaderScorer:
    return VaderScorer()


def test_scores_are_probability_rows(scorer: VaderScorer) -> None:
    assert isinstance(scorer, SentimentScorer)
    headlines = load_headlines("validation")["headline"].tolist()
    probabilities = scorer.score(headlines)
    assert probabilities.shape == (180, 3)
    assert probabilities.dtype == np.float64
    assert ((probabilities > 0) & (probabilities < 1)).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_no_headlines_gives_an_empty_matrix(scorer: VaderScorer) -> None:
    probabilities = scorer.score([])
    assert probabilities.shape == (0, 3)
    assert probabilities.dtype == np.float64


@pytest.mark.parametrize("bad", ["Stocks rally", ["Stocks rally", 3], [None], [b"bytes"]])
def test_non_string_input_is_refused(scorer: VaderScorer, bad: object) -> None:
    with pytest.raises(TypeError):
        scorer.score(bad)  # type: ignore[arg-type]


def test_argmax_is_the_compound_rule_on_every_headline(scorer: VaderScorer) -> None:
    headlines = load_headlines()["headline"].tolist()
    compound = scorer.compound(headlines)
    rule = [vader_label(value) for value in compound]
    assert predicted_labels(scorer.score(headlines)) == rule
    # The set is not degenerate for VADER: every class is predicted many times.
    assert min(rule.count(label) for label in LABELS) > 100


def test_band_edges_follow_the_rule_exactly() -> None:
    compound = np.array([0.05, 0.0499, -0.05, -0.0499, 0.0, 1.0, -1.0, 0.0501, -0.0501])
    expected = [vader_label(value) for value in compound]
    assert expected == [
        "positive",
        "neutral",
        "negative",
        "neutral",
        "neutral",
        "positive",
        "negative",
        "positive",
        "negative",
    ]
    for sharpness in (0.5, 5.0, 50.0):
        assert predicted_labels(compound_to_probabilities(compound, sharpness)) == expected


def test_polarity_rises_with_compound() -> None:
    compound = np.arange(-10_000, 10_001) / 10_000
    values = polarity(compound_to_probabilities(compound))
    assert (np.diff(values) > 0).all()
    assert values[10_000] == 0.0
    np.testing.assert_allclose(values, -values[::-1], atol=1e-15)


def test_bad_sharpness_is_refused() -> None:
    with pytest.raises(ValueError, match="sharpness"):
        VaderScorer(sharpness=0.0)
    with pytest.raises(ValueError, match="sharpness"):
        compound_to_probabilities(np.zeros(2), sharpness=-1.0)


@pytest.mark.parametrize(
    ("headline", "label"),
    [
        ("Record profit and strong growth delight investors", "positive"),
        ("Bank collapses amid fraud scandal and heavy losses", "negative"),
        ("Company to report earnings on Tuesday", "neutral"),
    ],
)
def test_obvious_headlines_get_the_obvious_label(
    scorer: VaderScorer, headline: str, label: str
) -> None:
    assert predicted_labels(scorer.score([headline])) == [label]


def test_vader_baseline_on_the_test_split(scorer: VaderScorer) -> None:
    # Pinned so that reported baseline numbers stay true to the frozen file (VADER 3.3.2).
    test = load_headlines("test")
    report = evaluate(test["label"], scorer.score(test["headline"].tolist()))
    assert report.n == 180
    assert report.accuracy == pytest.approx(99 / 180)
    assert report.macro_f1 == pytest.approx(0.5400261, abs=1e-6)


# A hand-checked example. Gold: neg neg neu neu pos pos; predicted: neg neu neu neu pos neg.
# negative: precision 1/2, recall 1/2, F1 1/2; neutral: 2/3, 1, 4/5; positive: 1, 1/2, 2/3.
_TRUE = ["negative", "negative", "neutral", "neutral", "positive", "positive"]
_PREDICTED = ["negative", "neutral", "neutral", "neutral", "positive", "negative"]


def _check_hand_example(report: SentimentReport) -> None:
    assert report.n == 6
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.macro_f1 == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # 59/90
    assert report.per_class["negative"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2}
    )
    assert report.per_class["neutral"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 4 / 5, "support": 2}
    )
    assert report.per_class["positive"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2}
    )
    assert report.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_metrics_on_labels() -> None:
    _check_hand_example(evaluate(_TRUE, _PREDICTED))


def test_metrics_on_probabilities() -> None:
    rows = {
        "negative": [0.7, 0.2, 0.1],
        "neutral": [0.3, 0.4, 0.3],
        "positive": [0.1, 0.1, 0.8],
    }
    probabilities = np.array([rows[label] for label in _PREDICTED])
    report = evaluate(_TRUE, probabilities)
    _check_hand_example(report)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["labels"] == list(LABELS)
    assert data["macro_f1"] == report.macro_f1
    assert data["confusion"] == report.confusion


def test_a_class_never_predicted_scores_zero() -> None:
    report = evaluate(["negative", "positive"], ["negative", "negative"])
    assert report.per_class["positive"]["f1"] == 0.0
    assert report.per_class["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report.macro_f1 == pytest.approx((2 / 3) / 3)


@pytest.mark.parametrize(
    ("true", "predicted", "message"),
    [
        (["negative", "bullish"], ["negative", "neutral"], "unknown true label"),
        (["negative", "neutral"], ["negative", "Neutral"], "unknown predicted label"),
        (["negative"], ["negative", "neutral"], "1 true labels but 2"),
        ([], [], "nothing to evaluate"),
        (["negative"], np.array([[0.5, 0.5]]), r"\[n, 3\]"),
        (["negative"], np.array([[np.nan, 0.5, 0.5]]), "NaN"),
        (["negative"], np.zeros((1, 3, 1)), "labels"),
    ],
)
def test_bad_inputs_are_refused(true: list[str], predicted: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(true, predicted)  # type: ignore[arg-type]
