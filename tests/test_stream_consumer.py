"""The feature consumer group on a real broker and a real Ray: exactly one feature row per
valid input offset through crashes and rebalances, dead letters for bad records, and
live features equal to the offline engine's."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from rayfin.actors.feature_consumer import launch_consumers
from rayfin.datasets import es_ticks
from rayfin.features import batch_features, online_features
from rayfin.stream.archive import Archive
from rayfin.stream.consumer import RAW_TABLE, ConsumerConfig
from rayfin.stream.schemas import Tick, encode
from rayfin.stream.simulate import simulate
from rayfin.stream.topics import Topics, ensure_topics
from rayfin.stream.validation import decode_dead_letter
from rayfin.testing import consumer_config, wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 4
SYMBOLS = ["ESA", "ESB", "ESC", "ESD"]
# Bad records, by where they go in the stream, and the reason they must be refused for.
BAD = {5: (b"{not json", "bad_json"), 17: (b'{"symbol":"ESA","ts":1,"price":-1,"size":1}', None)}


@pytest.fixture(scope="module")
def ticks() -> pd.DataFrame:
    """Real ES trades, cut into four contiguous runs, one per symbol."""
    frame = es_ticks().iloc[:24_000].reset_index(drop=True)
    frame["symbol"] = np.repeat(SYMBOLS, len(frame) // len(SYMBOLS))
    frame["ts"] = frame["timestamp"].dt.as_unit("ns").astype("int64")
    # Interleave the symbols, as a market does, keeping each symbol's order.
    frame["seq"] = frame.groupby("symbol").cumcount()
    return frame.sort_values(["seq", "symbol"], kind="stable").reset_index(drop=True)


@pytest.fixture
def topics(kafka_broker) -> Topics:
    names = Topics.prefixed(f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(
        ensure_topics(
            kafka_broker.bootstrap_servers,
            PARTITIONS,
            [names.ticks, names.book, names.news, names.dead_letters],
        )
    )
    return names


@pytest.fixture
def group(ray_local: None, kafka_broker, topics: Topics, tmp_path: Path) -> ConsumerConfig:
    return consumer_config(
        kafka_broker.bootstrap_servers,
        str(tmp_path / "archive"),
        topics,
        kinds=("ticks",),
        max_records=2_000,
    )


@pytest.fixture
def launch(group: ConsumerConfig) -> Iterator:
    """Start consumers of ``group``; any still alive after the test are killed."""
    started: list = []

    def start(count: int, prefix: str) -> list:
        handles = launch_consumers(group, count, num_cpus=0.1, prefix=prefix)
        started.extend(handles)
        return handles

    yield start
    for handle in started:
        ray.kill(handle)


def _produce(config: ConsumerConfig, ticks: pd.DataFrame, start: int, end: int) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap_servers, linger_ms=5)
        await producer.start()
        try:
            rows = ticks.iloc[start:end].itertuples()
            for i, row in enumerate(rows, start=start):
                tick = Tick(symbol=row.symbol, ts=row.ts, price=float(row.price), size=row.volume)
                value = BAD[i][0] if i in BAD else encode(tick)
                await producer.send(config.topics.ticks, value, key=row.symbol.encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def _consumed(handles) -> int:
    total = 0
    for handle in handles:
        try:
            total += sum(ray.get(handle.stats.remote(), timeout=10)["records_in"].values())
        except ray.exceptions.RayActorError:
            continue
    return total


def _dead_letters(config: ConsumerConfig) -> list:
    async def read() -> list:
        consumer = AIOKafkaConsumer(
            config.topics.dead_letters,
            bootstrap_servers=config.bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=3_000)
            return [decode_dead_letter(r.value) for rs in batches.values() for r in rs]
        finally:
            await consumer.stop()

    return asyncio.run(read())


def _check_exactly_once(config: ConsumerConfig, ticks: pd.DataFrame) -> pd.DataFrame:
    """Every valid input offset has exactly one feature row, equal to the offline
    engine's row for that tick; every bad one a dead letter."""
    archive = Archive(config.archive)
    features = archive.read("tick_features").to_pandas()
    assert not features.duplicated(["partition", "offset"]).any()
    valid = ticks.drop(index=list(BAD))
    assert len(features) == len(valid)
    assert sorted(features["ts"].tolist()) == sorted(valid["ts"].tolist())
    letters = _dead_letters(config)
    assert {(letter.topic, letter.reason) for letter in letters} >= {
        (config.topics.ticks, "bad_json"),
        (config.topics.ticks, "bad_price"),
    }
    # The features a crash-recovered stream computed are those of one uninterrupted pass.
    expected = online_features(valid[["symbol", "ts", "price", "volume"]])
    got = features.sort_values(["symbol", "offset"]).reset_index(drop=True)
    expected = expected.sort_values(["symbol"], kind="stable").reset_index(drop=True)
    numeric = [c for c in expected.columns if c not in ("symbol", "partition", "offset", "late")]
    np.testing.assert_allclose(
        got[numeric].to_numpy(float), expected[numeric].to_numpy(float), rtol=0, atol=1e-9
    )
    return features


def test_a_killed_consumer_loses_and_duplicates_nothing(
    group: ConsumerConfig, launch, ticks: pd.DataFrame
) -> None:
    half = len(ticks) // 2
    _produce(group, ticks, 0, half)
    handles = launch(2, "member")
    ray.get([h.wait_assigned.remote(60) for h in handles])
    wait_until(lambda: _consumed(handles) > half // 4, 60, "the consumers to make progress")
    _produce(group, ticks, half, len(ticks))
    ray.kill(handles[0])  # mid-stream: its buffer and uncommitted offsets are lost
    wait_until(lambda: _consumed(handles[1:]) >= len(ticks) - half // 2, 120, "the survivor")
    wait_until(
        lambda: (
            ray.get(handles[1].stats.remote())["buffered_rows"] == 0
            and _archived(group) == len(ticks) - len(BAD)
        ),
        60,
        "everything to be archived",
    )
    stats = ray.get(handles[1].stop.remote())
    assert stats["rebalances"] >= 2  # joined, then took over the dead member's partitions
    _check_exactly_once(group, ticks)


def _archived(config: ConsumerConfig) -> int:
    table = Archive(config.archive).read("tick_features", columns=["offset"])
    return table.num_rows


def test_a_joining_consumer_takes_partitions_over(
    group: ConsumerConfig, launch, ticks: pd.DataFrame
) -> None:
    third = len(ticks) // 3
    _produce(group, ticks, 0, third)
    (first,) = launch(1, "first")
    assert len(ray.get(first.wait_assigned.remote(60))) == PARTITIONS
    wait_until(lambda: _consumed([first]) >= third, 60, "the first consumer")
    (second,) = launch(1, "second")
    wait_until(
        lambda: (
            len(ray.get(second.stats.remote())["assigned"]) > 0
            and len(ray.get(first.stats.remote())["assigned"]) < PARTITIONS
        ),
        90,
        "the rebalance",
    )
    _produce(group, ticks, third, len(ticks))
    wait_until(lambda: _archived(group) == len(ticks) - len(BAD), 90, "everything to be archived")
    final = [ray.get(h.stop.remote()) for h in (first, second)]
    assert all(sum(s["records_in"].values()) > 0 for s in final)
    # The counters: every record read once, each bad one counted by its reason.
    assert sum(sum(s["records_in"].values()) for s in final) == len(ticks)
    reasons = [r for s in final for r, n in s["dead_letters"].items() for _ in range(n)]
    assert sorted(reasons) == sorted(
        f"{group.topics.ticks}/{why}" for why in ("bad_json", "bad_price")
    )
    assert all(set(s["latency_ms"]) == {"p50", "p90", "p99"} for s in final)
    live = _check_exactly_once(group, ticks)
    # History: the archived raw ticks through Ray Data give the live features again.
    history = batch_features(Archive(group.archive).dataset("ticks"))
    live = live.sort_values(["symbol", "offset"]).reset_index(drop=True)
    history = history.sort_values(["symbol", "ts"], kind="stable").reset_index(drop=True)
    assert len(history) == len(live)
    numeric = [c for c in live.columns if c not in ("symbol", "partition", "offset", "late")]
    np.testing.assert_allclose(
        history[numeric].to_numpy(float), live[numeric].to_numpy(float), rtol=0, atol=1e-9
    )


def test_simulated_books_and_news_are_archived_too(group: ConsumerConfig, topics: Topics) -> None:
    stats = asyncio.run(
        simulate(group.bootstrap_servers, 3, None, 11, messages=3_000, topic_prefix=_prefix(topics))
    )
    sent = stats.counts
    config = dataclasses.replace(group, kinds=("ticks", "book", "news"))
    (member,) = launch_consumers(config, 1, num_cpus=0.1, prefix="all")
    try:
        archive = Archive(config.archive)
        wait_until(
            lambda: (
                {t: archive.read(t, columns=["offset"]).num_rows for t in RAW_TABLE.values()}
                == {t: sent[getattr(topics, kind)] for kind, t in RAW_TABLE.items()}
            ),
            90,
            "every record of every topic to be archived",
        )
        ray.get(member.stop.remote())
    finally:
        ray.kill(member)
    books = archive.read("book_features").to_pandas()
    assert len(books) == sent[topics.book]
    assert not books.duplicated(["partition", "offset"]).any()
    quoted = books.dropna(subset=["best_bid", "best_ask"])
    assert (quoted["best_bid"] < quoted["best_ask"]).all()
    assert archive.read("tick_features").num_rows == sent[topics.ticks]


def _prefix(topics: Topics) -> str:
    return topics.ticks.removesuffix(Topics().ticks)


def test_a_consumer_on_s3_exports_its_metrics(
    group: ConsumerConfig, topics: Topics, s3_server, ray_metrics_url: str
) -> None:
    """The consumer with its archive in an S3 bucket (a local S3-compatible server): every
    tick archived once, history read back through Ray Data; and its counters, latency
    histogram and lag reach Ray's Prometheus endpoint."""
    stats = asyncio.run(
        simulate(group.bootstrap_servers, 2, None, 5, messages=2_000, topic_prefix=_prefix(topics))
    )
    sent = stats.counts[topics.ticks]
    _send_raw(group, topics.ticks, [b"{not json"])
    config = dataclasses.replace(group, archive=s3_server.uri(f"b{uuid.uuid4().hex[:8]}", "lake"))
    archive = Archive(config.archive)
    assert not archive.local
    (member,) = launch_consumers(config, 1, num_cpus=0.1, prefix="s3")
    try:
        wait_until(
            lambda: archive.read("tick_features", columns=["offset"]).num_rows == sent,
            90,
            "every tick to be archived in S3",
        )
        expected = {
            "ray_rayfin_stream_records_consumed_total": sent + 1,
            "ray_rayfin_stream_feature_rows_total": sent,
            "ray_rayfin_stream_dead_letters_total": 1,
            "ray_rayfin_stream_consumer_lag": 0,
        }
        names = [*expected, "ray_rayfin_stream_latency_seconds_count"]

        def exported() -> bool:
            # Ray exports each series on its own schedule, so wait for all of them.
            seen = _scrape(ray_metrics_url, "s3-0", names)
            count = seen.pop("ray_rayfin_stream_latency_seconds_count", 0)
            return seen == expected and count > 0

        wait_until(exported, 30, "the consumer's metrics to be exported")
        ray.get(member.stop.remote())
    finally:
        ray.kill(member)
    live = archive.read("tick_features").to_pandas()
    assert not live.duplicated(["partition", "offset"]).any()
    assert sum(archive.checkpoint(topics.ticks, p).hwm + 1 for p in range(PARTITIONS)) == sent + 1
    history = batch_features(archive.dataset("ticks"))
    assert len(history) == sent
    assert set(history["symbol"]) == set(live["symbol"])


def _send_raw(config: ConsumerConfig, topic: str, values: list[bytes]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=config.bootstrap_servers)
        await producer.start()
        try:
            for value in values:
                await producer.send_and_wait(topic, value, key=b"ESA")
        finally:
            await producer.stop()

    asyncio.run(send())


def _scrape(url: str, consumer: str, names) -> dict[str, float]:
    """Each of ``names``' value summed over the series of ``consumer``, from Prometheus'
    text format."""
    import urllib.request

    body = urllib.request.urlopen(url, timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in body.splitlines():
        name, _, rest = line.partition("{")
        if name in names and f'consumer="{consumer}"' in rest:
            totals[name] = totals.get(name, 0.0) + float(rest.rsplit(" ", 1)[1])
    return totals


def test_rayfin_consume_runs_the_group_from_the_command_line(
    group: ConsumerConfig, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from rayfin.cli import app
    from rayfin.config import reload_settings

    stats = asyncio.run(
        simulate(group.bootstrap_servers, 2, None, 3, messages=1_500, topic_prefix=_prefix(topics))
    )
    monkeypatch.setenv("RAYFIN_BROKER__BOOTSTRAP_SERVERS", group.bootstrap_servers)
    reload_settings()
    args = ["consume", "--kinds", "ticks,book", "--group", group.group_id]
    args += ["--topic-prefix", _prefix(topics), "--archive", group.archive, "--seconds", "15"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stopped by deadline" in result.output
    archive = Archive(group.archive)
    assert archive.read("ticks", columns=["offset"]).num_rows == stats.counts[topics.ticks]
    assert archive.read("book", columns=["offset"]).num_rows == stats.counts[topics.book]
    assert not archive.files("news")  # not asked for
