"""A Ray actor that consumes ticks from Kafka in a consumer group and builds time bars."""

from __future__ import annotations

import asyncio
import time

import msgspec
import ray
from aiokafka import AIOKafkaConsumer

from rayfin.features.bars import Bar, BarBuilder
from rayfin.stream.schemas import TICKS_TOPIC, decode_tick


@ray.remote(num_cpus=0.5)
class BarConsumer:
    """Reads ``topic`` in micro-batches (``getmany``), builds bars, commits after each batch.

    Offsets are committed only after the batch has been folded into the builder, so a
    restarted consumer resumes without skipping ticks.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        *,
        topic: str = TICKS_TOPIC,
        bar_seconds: int = 60,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.topic = topic
        self.builder = BarBuilder(bar_seconds)
        self.bars: list[Bar] = []
        self.consumed = 0
        self.rejected = 0

    async def consume(self, expected: int, timeout_s: float = 120.0) -> dict[str, float]:
        """Consume until ``expected`` ticks were read or ``timeout_s`` passed."""
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=10_000,
        )
        await consumer.start()
        first: float | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while self.consumed < expected and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
                for records in batches.values():
                    if first is None:
                        first = time.perf_counter()
                    for record in records:
                        try:
                            tick = decode_tick(record.value)
                        except msgspec.DecodeError:
                            self.rejected += (
                                1  # the dead-letter topic arrives with the stream issue
                            )
                            continue
                        closed = self.builder.update(tick.symbol, tick.ts, tick.price, tick.size)
                        if closed is not None:
                            self.bars.append(closed)
                    self.consumed += len(records)
                if batches:
                    await consumer.commit()
                await asyncio.sleep(0)
        finally:
            await consumer.stop()
        elapsed = time.perf_counter() - first if first is not None else 0.0
        return {
            "consumed": self.consumed,
            "rejected": self.rejected,
            "seconds": elapsed,
            "late": self.builder.late,
        }

    def closed_bars(self, flush: bool = True) -> list[Bar]:
        """Every bar built so far; ``flush`` also closes the forming ones."""
        if flush:
            self.bars.extend(self.builder.flush())
        return list(self.bars)
