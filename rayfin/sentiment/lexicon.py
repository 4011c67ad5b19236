"""The VADER lexicon baseline: a general-purpose, rule-based scorer with no financial training.

VADER (Hutto & Gilbert, 2014) sums word valences from a hand-built lexicon, adjusts them for
negation, intensifiers and punctuation, and normalises the sum into a ``compound`` score in
[-1, 1]. Its authors' decision rule is::

    compound >= 0.05  -> positive
    compound <= -0.05 -> negative
    otherwise         -> neutral

:class:`VaderScorer` turns ``compound`` into (negative, neutral, positive) probabilities whose
argmax is exactly that rule's label; see :func:`compound_to_probabilities`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rayfin.sentiment.scoring import LABELS

VADER_THRESHOLD = 0.05
"""Half-width of VADER's neutral band on the compound score."""

# VADER rounds compound to 4 decimals, so the band's edges are moved half a rounding step
# inwards: compound = 0.05 then lies strictly outside the band (positive, as the rule's >=
# says) and 0.0499 strictly inside, and no row ever ties at an edge.
_EDGE = VADER_THRESHOLD - 0.5e-4


def vader_label(compound: float) -> str:
    """The label VADER's standard decision rule gives a compound score."""
    if compound >= VADER_THRESHOLD:
        return "positive"
    if compound <= -VADER_THRESHOLD:
        return "negative"
    return "neutral"


def compound_to_probabilities(compound: np.ndarray, sharpness: float = 5.0) -> np.ndarray:
    """(negative, neutral, positive) probabilities from compound scores, shape [n, 3].

    A softmax over each class's signed distance to the neutral band ``[-t, t]``:
    positive's logit is how far ``c`` lies above ``t`` (``c - t``), negative's how far below
    ``-t`` (``-c - t``), neutral's how far inside the band (``t - |c|``), all times
    ``sharpness``. Outside the band the nearer-side class has the only positive logit and
    inside it neutral does, so the argmax is VADER's own rule; P(positive) - P(negative) has
    the sign of ``c`` and grows with it. ``sharpness`` is a fixed temperature, not fitted to
    any data: it sets confidence, never the predicted label.
    """
    if sharpness <= 0:
        raise ValueError(f"sharpness must be positive, got {sharpness}")
    c = np.round(np.asarray(compound, dtype=np.float64), 4).reshape(-1)
    logits = sharpness * np.stack([-c - _EDGE, _EDGE - np.abs(c), c - _EDGE], axis=1)
    logits -= logits.max(axis=1, keepdims=True)  # for exp's range; softmax is shift-invariant
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def _checked(headlines: Sequence[str]) -> list[str]:
    if isinstance(headlines, str):
        raise TypeError("expected a sequence of headlines, got a single string")
    items = list(headlines)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"headline {i} is {type(text).__name__}, expected str")
    return items


class VaderScorer:
    """:class:`~rayfin.sentiment.scoring.SentimentScorer` backed by the VADER lexicon."""

    labels = LABELS

    def __init__(self, sharpness: float = 5.0) -> None:
        if sharpness <= 0:
            raise ValueError(f"sharpness must be positive, got {sharpness}")
        self.sharpness = sharpness
        self._analyzer = SentimentIntensityAnalyzer()

    def compound(self, headlines: Sequence[str]) -> np.ndarray:
        """VADER's compound score in [-1, 1] per headline, float64 [n]."""
        items = _checked(headlines)
        return np.array(
            [self._analyzer.polarity_scores(text)["compound"] for text in items],
            dtype=np.float64,
        )

    def score(self, headlines: Sequence[str]) -> np.ndarray:
        """(negative, neutral, positive) probabilities per headline, float64 [n, 3]."""
        compound = self.compound(headlines)
        if compound.size == 0:
            return np.zeros((0, len(LABELS)), dtype=np.float64)
        return compound_to_probabilities(compound, self.sharpness)
