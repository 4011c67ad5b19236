"""Raw aiokafka throughput against the embedded tansu broker, on real ES ticks.

Produce with plain ``AIOKafkaProducer.send`` and consume with ``getmany``: the baseline
later stream benchmarks divide by. Also times rayfin's ``BatchProducer`` (through
``replay_ticks``), which fills Kafka batches itself. Prints one JSON object.

    .venv/bin/python benchmarks/kafka_baseline.py [--messages 200000]
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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from rayfin.datasets import es_ticks
from rayfin.stream.broker import EmbeddedBroker, free_port
from rayfin.stream.replay import frame_to_ticks, replay_ticks
from rayfin.stream.schemas import Tick, encode_tick


async def produce_plain(servers: str, topic: str, ticks: list[Tick]) -> float:
    """Seconds to send ``ticks`` with aiokafka's own batching (linger 5 ms, 256 KiB)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, linger_ms=5, max_batch_size=256 * 1024, acks="all"
    )
    await producer.start()
    try:
        started = time.perf_counter()
        for tick in ticks:
            await producer.send(topic, encode_tick(tick), key=tick.symbol.encode())
        await producer.flush()
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def consume_all(servers: str, topic: str, expected: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id="bench",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=10_000,
    )
    await consumer.start()
    try:
        got, started = 0, time.perf_counter()
        while got < expected:
            batch = await consumer.getmany(timeout_ms=1_000, max_records=10_000)
            got += sum(len(records) for records in batch.values())
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    ticks = frame_to_ticks(es_ticks(limit=args.messages))
    with (
        tempfile.TemporaryDirectory() as state,
        EmbeddedBroker(port=free_port(), state_dir=Path(state)) as broker,
    ):
        produce_s = asyncio.run(produce_plain(broker.bootstrap_servers, "bench", ticks))
        consume_s = asyncio.run(consume_all(broker.bootstrap_servers, "bench", len(ticks)))
        batched = asyncio.run(replay_ticks(broker.bootstrap_servers, ticks, topic="bench-batch"))
    print(
        json.dumps(
            {
                "benchmark": "kafka_baseline",
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "messages": len(ticks),
                "produce_msgs_per_s": round(len(ticks) / produce_s),
                "consume_msgs_per_s": round(len(ticks) / consume_s),
                "batch_producer_msgs_per_s": round(batched.rate),
            }
        )
    )


if __name__ == "__main__":
    main()
