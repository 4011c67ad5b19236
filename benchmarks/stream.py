"""The market stream end to end, against raw aiokafka, all in one run. Prints one JSON object.

On real ES ticks and the embedded tansu broker:

- raw aiokafka consume rate (``getmany``, nothing done with the records): the baseline;
- end-to-end ticks/s from Kafka to features written: one ``FeatureConsumer`` actor
  validates, computes every feature of the default spec, archives raw ticks and features
  to Parquet with checkpoints, and commits; timed until the archive holds every tick;
- their ratio;
- latency from produce time to features emitted at a fixed offered load (20,000 ticks/s
  by default), as percentiles, with the consumer already in its group; and, as its floor,
  the latency of a bare aiokafka consumer reading the same load (in this process).

    .venv/bin/python benchmarks/stream.py [--messages 200000] [--rate 20000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from aiokafka import AIOKafkaConsumer

from rayfin.actors.feature_consumer import launch_consumers
from rayfin.datasets import es_ticks
from rayfin.stream.archive import Archive
from rayfin.stream.broker import EmbeddedBroker, free_port
from rayfin.stream.consumer import ConsumerConfig
from rayfin.stream.producer import BatchProducer
from rayfin.stream.replay import frame_to_ticks
from rayfin.stream.schemas import Tick, encode_tick
from rayfin.stream.topics import Topics, ensure_topics


async def produce(servers: str, topic: str, ticks: list[Tick], rate: float | None) -> float:
    """Send ``ticks`` (paced at ``rate`` messages/s, or unpaced); returns the rate achieved."""
    async with BatchProducer(servers, rate=rate, linger_ms=1 if rate else 5) as producer:
        started = time.perf_counter()
        for tick in ticks:
            await producer.send(topic, encode_tick(tick), key=tick.symbol.encode())
        await producer.flush()
        return len(ticks) / (time.perf_counter() - started)


async def raw_consume(servers: str, topic: str, expected: int) -> float:
    """Messages/s of a bare aiokafka group member that only counts what it reads."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id="bench-raw",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=10_000,
    )
    await consumer.start()
    try:
        first = 0
        while first == 0:  # the clock starts with the first records, after the group join
            batch = await consumer.getmany(timeout_ms=1_000, max_records=10_000)
            first = sum(len(records) for records in batch.values())
        started, got = time.perf_counter(), first
        while got < expected:
            batch = await consumer.getmany(timeout_ms=1_000, max_records=10_000)
            got += sum(len(records) for records in batch.values())
        return (expected - first) / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def raw_latency(
    config: ConsumerConfig, topic: str, ticks: list[Tick], rate: float
) -> dict[str, float]:
    """Produce-to-read latency of a bare aiokafka consumer (reads, nothing else) at the
    same offered load and fetch settings: the transport's floor on this machine."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=config.bootstrap_servers,
        group_id="bench-raw-latency",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=config.fetch_max_wait_ms,
    )
    await consumer.start()
    latencies: list[float] = []
    done = asyncio.Event()

    async def read() -> None:
        while not done.is_set():
            batch = await consumer.getmany(timeout_ms=config.poll_timeout_ms)
            now_ms = time.time() * 1e3
            latencies.extend(now_ms - r.timestamp for rs in batch.values() for r in rs)

    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        reader = asyncio.get_running_loop().create_task(read())
        await produce(config.bootstrap_servers, topic, ticks, rate)
        await asyncio.sleep(1.0)
        done.set()
        await reader
    finally:
        await consumer.stop()
    values = np.array(latencies)
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)}


def archived(archive: Archive, topics: Topics, partitions: int) -> int:
    """Ticks the archive holds, by the partitions' checkpoints."""
    return sum(archive.checkpoint(topics.ticks, p).hwm + 1 for p in range(partitions))


def wait_archived(member: Any, archive: Archive, topics: Topics, expected: int) -> None:
    """Sleep until the archive holds ``expected`` ticks; fail with the consumer's stats
    when it stops making progress for 60 s."""
    seen, progressed = 0, time.monotonic()
    while (count := archived(archive, topics, 1)) < expected:
        if count > seen:
            seen, progressed = count, time.monotonic()
        elif time.monotonic() - progressed > 60:
            stats = ray.get(member.stats.remote())
            raise RuntimeError(f"the archive is stuck at {count:,} of {expected:,}: {stats}")
        time.sleep(0.01)


def consumer_config(
    servers: str, root: Path, topics: Topics, group: str, fetch_max_wait_ms: int | None = None
) -> ConsumerConfig:
    waits = {} if fetch_max_wait_ms is None else {"fetch_max_wait_ms": fetch_max_wait_ms}
    return ConsumerConfig(
        bootstrap_servers=servers,
        archive=str(root),
        group_id=group,
        topics=topics,
        kinds=("ticks",),
        **waits,
    )


def end_to_end(servers: str, root: Path, ticks: list[Tick]) -> dict[str, Any]:
    topics = Topics.prefixed("e2e.")
    asyncio.run(ensure_topics(servers, 1, topics.all))
    asyncio.run(produce(servers, topics.ticks, ticks, None))
    raw = asyncio.run(raw_consume(servers, topics.ticks, len(ticks)))
    archive = Archive(str(root / "e2e"))
    (member,) = launch_consumers(consumer_config(servers, root / "e2e", topics, "bench-e2e"), 1)
    ray.get(member.wait_assigned.remote(60))
    started = time.perf_counter()
    wait_archived(member, archive, topics, len(ticks))
    elapsed = time.perf_counter() - started
    stats = ray.get(member.stop.remote())
    e2e = len(ticks) / elapsed
    return {
        "messages": len(ticks),
        "raw_aiokafka_consume_msgs_per_s": round(raw),
        "end_to_end_ticks_per_s": round(e2e),
        "end_to_end_vs_raw_ratio": round(e2e / raw, 3),
        "feature_rows": stats["features_out"].get("tick_features", 0),
        "archive_files": len(archive.committed_files("tick_features")),
    }


def latency(
    servers: str, root: Path, ticks: list[Tick], rate: float, fetch_max_wait_ms: int | None
) -> dict[str, Any]:
    topics = Topics.prefixed("lat.")
    asyncio.run(ensure_topics(servers, 1, topics.all))
    config = consumer_config(servers, root / "lat", topics, "bench-lat", fetch_max_wait_ms)
    (member,) = launch_consumers(config, 1)
    ray.get(member.wait_assigned.remote(60))
    # Warm up the consumer's code paths, then measure only the paced run.
    asyncio.run(produce(servers, topics.ticks, ticks[:2_000], rate))
    time.sleep(1.0)
    ray.get(member.reset_latency.remote())
    offered = asyncio.run(produce(servers, topics.ticks, ticks[2_000:], rate))
    wait_archived(member, Archive(str(root / "lat")), topics, len(ticks))
    stats = ray.get(member.stop.remote())
    floor = asyncio.run(raw_latency(config, topics.book, ticks[2_000:], rate))
    return {
        "target_ticks_per_s": rate,
        "offered_ticks_per_s": round(offered),
        "ticks": len(ticks) - 2_000,
        "latency_ms": stats["latency_ms"],
        "bare_aiokafka_latency_ms": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=None)
    parser.add_argument("--only", choices=("throughput", "latency"), default=None)
    args = parser.parse_args()
    frame = es_ticks()
    ticks = frame_to_ticks(frame.iloc[: args.messages])
    paced = frame_to_ticks(frame.iloc[: int(args.rate * args.seconds) + 2_000])
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with (
        tempfile.TemporaryDirectory() as state,
        EmbeddedBroker(port=free_port(), state_dir=Path(state) / "broker") as broker,
    ):
        root = Path(state)
        result: dict[str, Any] = {
            "benchmark": "stream",
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        }
        if args.only in (None, "throughput"):
            result["throughput"] = end_to_end(broker.bootstrap_servers, root, ticks)
        if args.only in (None, "latency"):
            result["latency"] = latency(
                broker.bootstrap_servers, root, paced, args.rate, args.fetch_max_wait_ms
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
