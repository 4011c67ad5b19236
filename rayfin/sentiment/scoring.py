"""What every news-sentiment scorer offers: headlines in, class probabilities out.

Scorers (the VADER lexicon baseline, the zero-shot and LoRA-tuned LLM) return one row of
``(negative, neutral, positive)`` probabilities per headline; :func:`polarity` folds a row
into the single score in [-1, 1] that the trading model takes as its ``sentiment`` input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
"""Class order of every probability row."""


@runtime_checkable
class SentimentScorer(Protocol):
    """Anything that scores headlines: ``score(headlines) -> float array [n, 3]``."""

    def score(self, headlines: Sequence[str]) -> np.ndarray:
        """Probabilities of (negative, neutral, positive) per headline; rows sum to 1."""
        ...


def polarity(probabilities: np.ndarray) -> np.ndarray:
    """P(positive) - P(negative) per row: the ``sentiment`` feature, in [-1, 1]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(LABELS):
        raise ValueError(f"expected probabilities of shape [n, 3], got {probabilities.shape}")
    return probabilities[:, 2] - probabilities[:, 0]


def predicted_labels(probabilities: np.ndarray) -> list[str]:
    """The most likely label of each row."""
    return [LABELS[i] for i in np.asarray(probabilities).argmax(axis=1)]
