"""Raw aiokafka throughput against the embedded tansu broker, on real ES ticks.

This is the baseline later stream benchmarks divide by. Prints one JSON object.

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

from aiokafka import AIOKafkaConsumer

from rayfin.datasets import es_ticks
from rayfin.stream.broker import EmbeddedBroker, free_port
from rayfin.stream.replay import frame_to_ticks, replay_ticks


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
        produced = asyncio.run(replay_ticks(broker.bootstrap_servers, ticks, topic="bench"))
        consume_s = asyncio.run(consume_all(broker.bootstrap_servers, "bench", len(ticks)))
    print(
        json.dumps(
            {
                "benchmark": "kafka_baseline",
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "messages": len(ticks),
                "produce_msgs_per_s": round(produced.rate),
                "consume_msgs_per_s": round(len(ticks) / consume_s),
            }
        )
    )


if __name__ == "__main__":
    main()
