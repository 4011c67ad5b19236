"""``/v1/pipeline``: the live pipeline as its own actors report it.

The feature consumers and the trader launched with names (``rayfin consume --trade``,
``rayfin demo``) live in the ``rayfin`` namespace; this view finds them there, asks each
for its stats (with a short timeout: a busy actor must not stall the API) and sums them.
"""

from __future__ import annotations

from typing import Any

from rayfin.actors.feature_consumer import CONSUMER_ACTOR_PREFIX
from rayfin.actors.trader import TRADER_ACTOR
from rayfin.cluster import NAMESPACE
from rayfin.serve.schemas import PipelineStats
from rayfin.stream.metrics import group_totals

STATS_TIMEOUT_S = 2.0


def _named(prefix: str) -> list[str]:
    import ray

    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == NAMESPACE and actor["name"].startswith(prefix)
    )


def _stats(names: list[str]) -> list[dict[str, Any]]:
    import ray

    refs = []
    for name in names:
        try:
            refs.append(ray.get_actor(name, namespace=NAMESPACE).stats.remote())
        except ValueError:  # gone since it was listed
            continue
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=STATS_TIMEOUT_S))
        except (ray.exceptions.RayError, TimeoutError):
            continue
    return out


def pipeline_stats(llm: dict[str, Any] | None) -> PipelineStats:
    """The consumers' totals, the trader's stats and the API's LLM stats."""
    consumers = _stats(_named(CONSUMER_ACTOR_PREFIX))
    traders = _stats(_named(TRADER_ACTOR))
    trader = traders[0] if traders else None
    if trader is not None:
        trader = {k: v for k, v in trader.items() if k != "marks"}
    return PipelineStats(
        consumers=len(consumers), **group_totals(consumers), trader=trader, llm=llm
    )
