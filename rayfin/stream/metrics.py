"""Counters and latency histograms of the stream, for Prometheus through Ray's metrics.

Each consumer keeps its own exact figures (for ``stats()`` and benchmarks) and, when it
runs inside Ray, mirrors them to ``ray.util.metrics``, which Ray exports as
``ray_rayfin_stream_*`` on every node's metrics endpoint.

Records per second are counted over windows of about a second (:data:`RATE_WINDOW_S`):
the consumer calls :meth:`StreamMetrics.tick` on every poll, which closes the window once
it is that old, so an idle topic drops to 0 within a poll of the window's end.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

# Latency buckets in seconds (Prometheus' base unit), from produce time to feature emitted.
LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]
# Latencies kept for exact percentiles: the most recent ones.
_KEEP = 1_000_000
# Records per second are measured over windows at least this long.
RATE_WINDOW_S = 1.0


class StreamMetrics:
    """What one consumer has seen: records in, features out, dead letters, latency, lag."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.records_in: Counter[str] = Counter()
        self.features_out: Counter[str] = Counter()
        self.dead_letters: Counter[tuple[str, str]] = Counter()
        self.lag: dict[tuple[str, int], int] = {}
        self._latency = np.empty(_KEEP, dtype=np.float64)
        self._latency_count = 0
        # Records read per topic in the current rate window, and the rates of the last one.
        self.records_per_second: dict[str, float] = {}
        self._window: Counter[str] = Counter()
        self._window_start = time.monotonic()
        self._ray = _RayMetrics() if _in_ray() else None

    def record_in(self, topic: str, n: int) -> None:
        self.records_in[topic] += n
        self._window[topic] += n
        if self._ray and n:
            self._ray.records_in.inc(n, tags={"topic": topic, "consumer": self.consumer})

    def tick(self, now: float | None = None) -> None:
        """Close the rate window once it is :data:`RATE_WINDOW_S` old: every topic read so
        far gets its records per second over it (0 when idle). Cheap: call it every poll."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._window_start
        if elapsed < RATE_WINDOW_S:
            return
        for topic in self.records_in:
            self._set_rate(topic, self._window[topic] / elapsed)
        self._window.clear()
        self._window_start = now

    def idle(self) -> None:
        """No more records (the consumer stopped): every topic's rate is 0 from now on."""
        for topic in self.records_in:
            self._set_rate(topic, 0.0)
        self._window.clear()
        self._window_start = time.monotonic()

    def _set_rate(self, topic: str, rate: float) -> None:
        self.records_per_second[topic] = round(rate, 1)
        if self._ray:
            self._ray.rate.set(rate, tags={"topic": topic, "consumer": self.consumer})

    def feature_rows(self, table: str, n: int) -> None:
        self.features_out[table] += n
        if self._ray and n:
            self._ray.features_out.inc(n, tags={"table": table, "consumer": self.consumer})

    def dead_letter(self, topic: str, reason: str) -> None:
        self.dead_letters[(topic, reason)] += 1
        if self._ray:
            self._ray.dead_letters.inc(
                1, tags={"topic": topic, "reason": reason, "consumer": self.consumer}
            )

    def latencies(self, values_ms: np.ndarray) -> None:
        """Produce-to-feature latencies of a batch of records, in milliseconds."""
        if not len(values_ms):
            return
        start = self._latency_count % _KEEP
        end = start + len(values_ms)
        if end <= _KEEP:
            self._latency[start:end] = values_ms
        else:
            split = _KEEP - start
            self._latency[start:] = values_ms[:split]
            self._latency[: end - _KEEP] = values_ms[split:]
        self._latency_count += len(values_ms)
        if self._ray:
            # One observation per batch with its median keeps the exporter cheap at
            # 50k records/s; exact percentiles are in stats().
            self._ray.latency.observe(
                float(np.median(values_ms)) / 1e3, tags={"consumer": self.consumer}
            )

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag[(topic, partition)] = lag
        if self._ray:
            self._ray.lag.set(
                lag, tags={"topic": topic, "partition": str(partition), "consumer": self.consumer}
            )

    def latency_percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        n = min(self._latency_count, _KEEP)
        if not n:
            return {}
        values = self._latency[:n]
        return {f"p{q:g}": round(float(np.percentile(values, q)), 3) for q in qs}

    def reset_latency(self) -> None:
        self._latency_count = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "records_in": dict(self.records_in),
            "features_out": dict(self.features_out),
            "dead_letters": {f"{t}/{r}": n for (t, r), n in self.dead_letters.items()},
            "lag": {f"{t}/{p}": n for (t, p), n in self.lag.items()},
            "latency_ms": self.latency_percentiles(),
            "records_per_second": dict(self.records_per_second),
        }


def group_totals(members: list[dict[str, Any]]) -> dict[str, Any]:
    """A consumer group's figures from its members' :meth:`StreamMetrics.snapshot`s: the
    counts and rates summed, the latency percentiles of its slowest member."""
    latency: dict[str, float] = {}
    for stats in members:
        for q, value in stats.get("latency_ms", {}).items():
            latency[q] = max(latency.get(q, 0.0), float(value))
    return {
        "records_in": sum(sum(s.get("records_in", {}).values()) for s in members),
        "feature_rows": sum(sum(s.get("features_out", {}).values()) for s in members),
        "dead_letters": sum(sum(s.get("dead_letters", {}).values()) for s in members),
        "lag": sum(sum(s.get("lag", {}).values()) for s in members),
        "records_per_second": round(
            sum(sum(s.get("records_per_second", {}).values()) for s in members), 1
        ),
        "latency_ms": latency,
    }


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()


class _RayMetrics:
    """The Prometheus side. Names follow Prometheus conventions (Ray adds ``ray_``)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.records_in = metrics.Counter(
            "rayfin_stream_records_consumed",
            description="Records read from Kafka by rayfin stream consumers.",
            tag_keys=("topic", "consumer"),
        )
        self.rate = metrics.Gauge(
            "rayfin_stream_records_per_second",
            description="Records per second read from Kafka by a consumer, over its last "
            "window of about a second (0 when idle or stopped).",
            tag_keys=("topic", "consumer"),
        )
        self.features_out = metrics.Counter(
            "rayfin_stream_feature_rows",
            description="Feature rows computed and handed to the sinks.",
            tag_keys=("table", "consumer"),
        )
        self.dead_letters = metrics.Counter(
            "rayfin_stream_dead_letters",
            description="Records refused by validation and sent to the dead-letter topic.",
            tag_keys=("topic", "reason", "consumer"),
        )
        self.latency = metrics.Histogram(
            "rayfin_stream_latency_seconds",
            description="Seconds from a record's produce time to its features (one "
            "observation per micro-batch: its median).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("consumer",),
        )
        self.lag = metrics.Gauge(
            "rayfin_stream_consumer_lag",
            description="Records in a partition not yet read by its consumer.",
            tag_keys=("topic", "partition", "consumer"),
        )
