"""Accuracy, macro-F1 and per-class scores of sentiment predictions against gold labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from rayfin.sentiment.scoring import LABELS, predicted_labels


@dataclass(frozen=True)
class SentimentReport:
    """Scores of one set of predictions; every per-class field follows :data:`LABELS` order."""

    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    """label -> precision, recall, f1 and support (the number of gold rows of that label)."""
    confusion: list[list[int]]
    """``confusion[i][j]``: rows whose gold label is ``LABELS[i]``, predicted ``LABELS[j]``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready copy."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "labels": list(LABELS),
            "per_class": {label: dict(scores) for label, scores in self.per_class.items()},
            "confusion": [list(row) for row in self.confusion],
        }


def _check_labels(labels: Sequence[object], what: str) -> list[str]:
    unknown = sorted({repr(label) for label in labels if label not in LABELS})
    if unknown:
        raise ValueError(
            f"unknown {what} label(s) {', '.join(unknown)}; expected {', '.join(LABELS)}"
        )
    return [str(label) for label in labels]


def _as_labels(predictions: np.ndarray | Sequence[str] | Sequence[Sequence[float]]) -> list[str]:
    array = np.asarray(predictions)
    if array.ndim == 2:
        if array.shape[1] != len(LABELS) or array.dtype.kind not in "fiu":
            raise ValueError(
                f"probabilities must be a numeric [n, 3] array, got {array.dtype} {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError("probabilities contain NaN or infinity")
        return predicted_labels(array)
    if array.ndim == 1:
        return _check_labels(array.tolist(), "predicted")
    raise ValueError(f"predictions must be labels [n] or probabilities [n, 3], got {array.shape}")


def evaluate(
    true_labels: Sequence[str],
    predictions: np.ndarray | Sequence[str] | Sequence[Sequence[float]],
) -> SentimentReport:
    """Score ``predictions`` (label strings, or [n, 3] probabilities in LABELS order).

    Macro-F1 averages the F1 of all three labels, a label never predicted counting as 0.
    Unknown labels, mismatched lengths or an empty set raise ValueError.
    """
    truth = _check_labels(list(true_labels), "true")
    predicted = _as_labels(predictions)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true labels but {len(predicted)} predictions")
    if not truth:
        raise ValueError("nothing to evaluate: no labels given")
    labels = list(LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return SentimentReport(
        n=len(truth),
        accuracy=float(accuracy_score(truth, predicted)),
        macro_f1=float(np.mean(f1)),
        per_class=per_class,
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
    )
