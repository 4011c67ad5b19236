"""``SentimentActor``: a news-sentiment scorer as a Ray actor, for the feature consumers.

The scorer is built inside the actor from a factory (e.g.
``functools.partial(rayfin.sentiment.factory.make_scorer, "vader")``), so whatever it holds
(a lexicon, an LLM client and its swarm connection) lives once, in the actor's process,
for every consumer of the group. Scoring keeps no state, so Ray restarts a failed actor
and retries the calls in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayfin.cluster import placement
from rayfin.features.sentiment import SENTIMENT
from rayfin.sentiment.scoring import LABELS, SentimentScorer, polarity

NEWS_SCORE_COLUMNS = (*LABELS, SENTIMENT)
"""What scoring adds to a news table: P(negative), P(neutral), P(positive), and
``sentiment`` = P(positive) - P(negative)."""


def score_news(scorer: SentimentScorer, news: pa.Table) -> pa.Table:
    """``news`` (rows with a ``headline``) with :data:`NEWS_SCORE_COLUMNS` appended."""
    headlines = news.column("headline").to_pylist()
    probs = np.asarray(scorer.score(headlines), dtype=np.float64).reshape(-1, len(LABELS))
    if len(probs) != len(headlines) or not np.isfinite(probs).all():
        raise ValueError(
            f"the scorer returned {probs.shape} probabilities for {len(headlines)} headlines"
        )
    for j, label in enumerate(LABELS):
        news = news.append_column(label, pa.array(probs[:, j]))
    return news.append_column(SENTIMENT, pa.array(polarity(probs)))


class SentimentActor:
    """A :class:`~rayfin.sentiment.scoring.SentimentScorer` made by ``factory``, served."""

    def __init__(self, factory: Callable[[], SentimentScorer]) -> None:
        self.scorer = factory()
        if not isinstance(self.scorer, SentimentScorer):
            raise TypeError(f"the factory made {self.scorer!r}, which has no score(headlines)")
        self.headlines = 0

    def score(self, headlines: Sequence[str]) -> np.ndarray:
        """Probabilities ``[n, 3]`` of (negative, neutral, positive) per headline."""
        self.headlines += len(headlines)
        return np.asarray(self.scorer.score(list(headlines)), dtype=np.float64)

    def score_news(self, news: pa.Table) -> pa.Table:
        """:func:`score_news` with this actor's scorer."""
        self.headlines += news.num_rows
        return score_news(self.scorer, news)

    def stats(self) -> dict[str, Any]:
        return {"scorer": type(self.scorer).__name__, "headlines": self.headlines}


def launch_sentiment(
    factory: Callable[[], SentimentScorer], *, num_cpus: float = 0.5, name: str | None = None
) -> Any:
    """Start a :class:`SentimentActor` (restarting on failure, retrying calls in flight);
    returns its handle once the scorer is built. ``name`` makes it a named actor."""
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "max_restarts": -1,
        "max_task_retries": -1,
        "resources": placement("stream"),
    }
    if name is not None:
        options["name"] = name
    handle = ray.remote(SentimentActor).options(**options).remote(factory)
    ray.get(handle.stats.remote())  # constructed: the scorer is ready
    return handle
