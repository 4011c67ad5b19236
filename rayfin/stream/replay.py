"""Replay a tick DataFrame into Kafka with aiokafka, keyed by symbol."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
from aiokafka import AIOKafkaProducer

from rayfin.stream.schemas import TICKS_TOPIC, Tick, encode_tick


@dataclass(frozen=True)
class ReplayStats:
    """What a replay sent."""

    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


def frame_to_ticks(frame: pd.DataFrame) -> list[Tick]:
    """Rows of a :data:`rayfin.datasets.ES_TICKS_SCHEMA` frame as :class:`Tick` messages."""
    ts_ns = frame["timestamp"].dt.as_unit("ns").astype("int64").to_numpy()
    return [
        Tick(symbol=str(sym), ts=int(ts), price=float(px), size=int(sz))
        for sym, ts, px, sz in zip(
            frame["symbol"], ts_ns, frame["price"], frame["volume"], strict=True
        )
    ]


async def replay_ticks(
    bootstrap_servers: str,
    ticks: list[Tick],
    *,
    topic: str = TICKS_TOPIC,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
) -> ReplayStats:
    """Send ``ticks`` as fast as the broker takes them; the partition key is the symbol."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        acks="all",
    )
    await producer.start()
    started = time.perf_counter()
    try:
        for tick in ticks:
            # send() only buffers; batching happens in the producer's background task.
            await producer.send(topic, encode_tick(tick), key=tick.symbol.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return ReplayStats(len(ticks), time.perf_counter() - started)
