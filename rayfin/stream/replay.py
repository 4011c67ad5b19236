"""Replay recorded ticks into Kafka with aiokafka, keyed by symbol.

:func:`replay_es_ticks` sends the bundled E-mini S&P 500 trades either as fast as Kafka
takes them or at a multiple of real time, keeping the recorded gaps between trades
(divided by the speed-up). :func:`replay_ticks` sends any list of :class:`Tick`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rayfin.stream.producer import BatchProducer, SendStats
from rayfin.stream.schemas import NEWS_TOPIC, TICKS_TOPIC, News, Tick, encode, encode_tick, key_for


@dataclass(frozen=True)
class ReplayStats:
    """What a replay sent (acknowledged by Kafka), and in how long."""

    messages: int
    seconds: float
    topic: str = TICKS_TOPIC

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    @property
    def counts(self) -> dict[str, int]:
        return {self.topic: self.messages}


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
    speed: float | None = None,
    max_gap_s: float | None = None,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Send ``ticks`` in order; the partition key is the symbol.

    ``speed`` None sends as fast as the broker takes them; ``speed=10`` sends at ten times
    real time: tick *i* leaves ``(ts_i - ts_0) / 10`` seconds after the first. Gaps longer
    than ``max_gap_s`` of event time (e.g. a trading halt) are shortened to it. Setting
    ``stop`` ends the replay early, after delivering what was sent.
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 (a multiple of real time) or None, got {speed}")
    due = _due_times([t.ts for t in ticks], speed, max_gap_s)
    async with BatchProducer(
        bootstrap_servers, linger_ms=linger_ms, max_batch_size=max_batch_size
    ) as producer:
        for i, tick in enumerate(ticks):
            if stop is not None and stop.is_set():
                break
            # send() only buffers; batching happens in the producer's background task.
            await producer.send(
                topic,
                encode_tick(tick),
                tick.symbol.encode(),
                at=None if due is None else float(due[i]),
            )
        await producer.flush()
    stats = producer.stats()
    return ReplayStats(stats.counts.get(topic, 0), stats.seconds, topic)


async def replay_market(
    bootstrap_servers: str,
    ticks: list[Tick],
    news: list[News],
    *,
    rate: float | None = None,
    topic_prefix: str = "",
    stop: asyncio.Event | None = None,
    sent: list[int] | None = None,
) -> SendStats:
    """Send ``ticks`` and ``news`` merged in event-time order to the ticks and news topics
    (after ``topic_prefix``), at ``rate`` messages/s (None: as fast as Kafka takes them).
    ``sent[0]`` counts the messages handed to the producer so far, for progress displays;
    setting ``stop`` ends the replay early, after delivering what was sent."""
    import heapq

    merged = heapq.merge(
        ((t.ts, 0, i) for i, t in enumerate(ticks)),
        ((n.ts, 1, i) for i, n in enumerate(news)),
    )
    async with BatchProducer(bootstrap_servers, rate=rate) as producer:
        for count, (_, kind, i) in enumerate(merged, 1):
            if stop is not None and stop.is_set():
                break
            if kind == 0:
                tick = ticks[i]
                await producer.send(
                    topic_prefix + TICKS_TOPIC, encode_tick(tick), tick.symbol.encode()
                )
            else:
                story = news[i]
                await producer.send(topic_prefix + NEWS_TOPIC, encode(story), key_for(story))
            if sent is not None:
                sent[0] = count
        await producer.flush()
    return producer.stats()


def _due_times(ts_ns: list[int], speed: float | None, max_gap_s: float | None) -> np.ndarray | None:
    """Seconds after the start at which each tick is due, or None when unpaced."""
    if speed is None or not ts_ns:
        return None
    gaps = np.diff(np.asarray(ts_ns, dtype=np.int64), prepend=ts_ns[0]) / 1e9
    gaps = np.maximum(gaps, 0.0)  # out-of-order trades leave at once, never earlier
    if max_gap_s is not None:
        gaps = np.minimum(gaps, max_gap_s)
    return np.cumsum(gaps) / speed


async def replay_es_ticks(
    bootstrap_servers: str,
    speed: float | None = None,
    limit: int | None = None,
    *,
    topic: str = TICKS_TOPIC,
    max_gap_s: float | None = None,
    create_topics: bool = True,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Replay the bundled ES trades (:func:`rayfin.datasets.es_ticks`) as :class:`Tick`.

    ``speed`` is the multiple of real time (None: as fast as possible), ``limit`` keeps
    the first trades only. With ``create_topics`` the pipeline's topics are created first
    when missing (see :func:`rayfin.stream.topics.ensure_topics`).
    """
    from rayfin.datasets import es_ticks
    from rayfin.stream.topics import ensure_topics

    ticks = frame_to_ticks(es_ticks(limit=limit))
    if create_topics:
        await ensure_topics(bootstrap_servers, topics=[topic])
    return await replay_ticks(
        bootstrap_servers,
        ticks,
        topic=topic,
        speed=speed,
        max_gap_s=max_gap_s,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        stop=stop,
    )
