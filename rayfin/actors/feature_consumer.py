"""``FeatureConsumer``: a Ray actor that is one member of the feature consumer group.

Scale out by starting more of them with the same ``group_id``: Kafka spreads the
partitions over the members and moves them when one joins, leaves or dies. Every member
writes to the same archive (a shared path or S3 on a cluster), whose checkpoints carry
each partition's feature state to its next owner.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from rayfin.cluster import NAMESPACE, placement
from rayfin.stream.consumer import ConsumerConfig, StreamConsumer

CONSUMER_ACTOR_PREFIX = "consumer."
"""Named consumers are ``consumer.<member>`` in the ``rayfin`` namespace."""


class FeatureConsumer:
    """Consumes the market topics into features until :meth:`stop`."""

    def __init__(
        self, config: ConsumerConfig, name: str = "consumer", trader: Any = None, scorer: Any = None
    ) -> None:
        self.consumer = StreamConsumer(config, name, trader, scorer)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join the group and start consuming in the background."""
        await self.consumer.start()
        self._task = asyncio.get_running_loop().create_task(self.consumer.run())

    async def wait_assigned(self, timeout_s: float = 60.0) -> list[str]:
        """Block until the group gave this member partitions (joins take seconds)."""
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assigned and time.monotonic() < deadline:
            self._raise_if_failed()
            await asyncio.sleep(0.05)
        return sorted(f"{t}/{p}" for t, p in self.consumer.assigned)

    async def stop(self) -> dict[str, Any]:
        """Flush, commit and leave the group; returns the final stats."""
        self.consumer.stop()
        if self._task is not None:
            await self._task
        return self.consumer.stats()

    def stats(self) -> dict[str, Any]:
        self._raise_if_failed()
        return self.consumer.stats()

    def reset_latency(self) -> None:
        self.consumer.metrics.reset_latency()

    def latest(self, symbol: str) -> dict[str, Any] | None:
        """The newest feature row of ``symbol`` this member computed."""
        pipeline = self.consumer.pipeline
        return None if pipeline is None else pipeline.latest.get(symbol)

    def _raise_if_failed(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            if error is not None:
                raise error


def launch_consumers(
    config: ConsumerConfig,
    count: int,
    *,
    num_cpus: float = 0.5,
    prefix: str = "consumer",
    trader: Any = None,
    scorer: Any = None,
    named: bool = False,
) -> list[Any]:
    """Start ``count`` members of ``config.group_id``, handing their tick features to
    ``trader`` (a :class:`~rayfin.actors.trader.TradingActor`) if given, and scoring their
    news with ``scorer`` (a :class:`~rayfin.actors.sentiment.SentimentActor`) if given;
    returns their handles, started. ``named`` names them ``consumer.<prefix>-<i>`` in the
    ``rayfin`` namespace, where the HTTP API finds the live pipeline."""
    actor = ray.remote(FeatureConsumer)
    handles = []
    for i in range(count):
        member = f"{prefix}-{i}"
        options: dict[str, Any] = {
            "num_cpus": num_cpus,
            "max_concurrency": 100,
            "resources": placement("stream"),
        }
        if named:
            options |= {"name": CONSUMER_ACTOR_PREFIX + member, "namespace": NAMESPACE}
        handles.append(actor.options(**options).remote(config, member, trader, scorer))
    ray.get([h.start.remote() for h in handles])
    return handles
