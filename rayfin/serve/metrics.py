"""Prometheus metrics: the API's own (through ``ray.util.metrics``), and ``GET /metrics``,
which gathers rayfin's metrics from every node of the cluster into one scrape.

Every rayfin process records its metrics with ``ray.util.metrics``; Ray exports them on
each node's metrics port with a ``ray_`` prefix (counters also get ``_total``). A
Prometheus server can scrape those ports itself (Ray's service discovery file); for a
single target, ``/metrics`` fetches every live node's page, keeps the ``ray_rayfin_*``
and ``ray_serve_*`` families (``?all=true``: every family) and merges each family's
samples, which Ray labels with the node they come from, into one exposition.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

KEPT_PREFIXES = ("ray_rayfin_", "ray_serve_")
SCRAPE_TIMEOUT_S = 2.0
LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0]


def node_metrics_urls() -> list[str]:
    """The metrics page of every live node of the Ray cluster this process is in."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            return response.read().decode()
    except OSError:
        return ""  # a node going away mid-scrape: the others still count


def merge(pages: Iterable[str], prefixes: tuple[str, ...] | None = KEPT_PREFIXES) -> bytes:
    """One Prometheus exposition of the families in ``pages`` (all of them with
    ``prefixes=None``), each family's samples from every page together."""
    families: dict[str, Metric] = {}
    for page in pages:
        for family in text_string_to_metric_families(page):
            if prefixes is not None and not family.name.startswith(prefixes):
                continue
            kept = families.get(family.name)
            if kept is None:
                families[family.name] = family
            else:
                kept.samples.extend(family.samples)

    class _Collected:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())  # type: ignore[arg-type]
    return generate_latest(registry)


def cluster_metrics(everything: bool = False) -> bytes:
    """:func:`merge` of every node's page (blocking: run it in a thread)."""
    urls = node_metrics_urls()
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        pages = list(pool.map(_fetch, urls))
    return merge(pages, None if everything else KEPT_PREFIXES)


class ApiMetrics:
    """Requests by route, method and status; their latency; refusals by reason."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter(
            "rayfin_serve_requests",
            description="HTTP requests the rayfin API answered.",
            tag_keys=("route", "method", "status"),
        )
        self.latency = metrics.Histogram(
            "rayfin_serve_request_latency_seconds",
            description="Seconds from a request's arrival at the ingress replica to its response.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )
        self.refused = metrics.Counter(
            "rayfin_serve_refused_requests",
            description="Requests refused before any work: unauthorized, forbidden, "
            "rate_limited, too_large.",
            tag_keys=("reason",),
        )

    def refuse(self, reason: str) -> None:
        self.refused.inc(1, tags={"reason": reason})


ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class RequestMetrics:
    """ASGI middleware recording each HTTP request in the app's :class:`ApiMetrics` by its
    route template (``/v1/models/{version}/promote``), never its raw path (unbounded
    labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        metrics: ApiMetrics | None = None
        if scope["type"] == "http":
            metrics = scope["app"].state.services.metrics
        if metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observe(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.requests.inc(
                1, tags={"route": route, "method": scope["method"], "status": str(status)}
            )
            metrics.latency.observe(time.perf_counter() - start, tags={"route": route})
