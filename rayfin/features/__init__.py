"""Per-symbol window features, one definition for live actors and Ray Data.

:class:`TickFeatureEngine` and :class:`BookFeatureEngine` compute every feature
incrementally from chunks of one symbol's rows with carried state; the live executor
(:func:`online_features`, or a Kafka consumer calling ``update``) and the batch executor
(:func:`batch_features`, Ray Data ``map_groups`` over each symbol's history) run that same
code and agree bit for bit. The rules (arrival order, late rows, warm-up, book padding)
are in :mod:`rayfin.features.engine`. Time bars live in :mod:`rayfin.features.bars`, and
the decayed news-sentiment feature in :mod:`rayfin.features.sentiment`.
"""

from rayfin.features.bars import Bar, BarBuilder
from rayfin.features.batch import batch_features
from rayfin.features.engine import BookFeatureEngine, TickFeatureEngine
from rayfin.features.online import online_features, tick_frame
from rayfin.features.sentiment import SentimentBook, sentiment_series
from rayfin.features.spec import FeatureSpec

__all__ = [
    "Bar",
    "BarBuilder",
    "BookFeatureEngine",
    "FeatureSpec",
    "SentimentBook",
    "TickFeatureEngine",
    "batch_features",
    "online_features",
    "sentiment_series",
    "tick_frame",
]
