"""Scorers by name, for the command line and the sentiment actor's factory.

``make_scorer("vader")`` is the lexicon baseline; ``make_scorer("llm", **options)`` the
LLM scorer, imported only when asked for (it pulls in the LLM client).
"""

from __future__ import annotations

from typing import Any

from rayfin.errors import ConfigError
from rayfin.sentiment.scoring import SentimentScorer

SCORER_KINDS = ("vader", "llm")


def make_scorer(kind: str, **options: Any) -> SentimentScorer:
    """A new scorer of ``kind`` (one of :data:`SCORER_KINDS`), built with ``options``."""
    if kind == "vader":
        from rayfin.sentiment.lexicon import VaderScorer

        return VaderScorer(**options)
    if kind == "llm":
        from rayfin.sentiment.llm import LLMSentimentScorer

        return LLMSentimentScorer.from_options(**options)
    raise ConfigError(
        f"unknown sentiment scorer {kind!r}: expected one of {', '.join(SCORER_KINDS)}"
    )
