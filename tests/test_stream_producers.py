"""Topics, the ES replay, the market simulator and their CLI, against a real tansu broker."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from rayfin.errors import BrokerError
from rayfin.stream.broker import EmbeddedBroker, free_port
from rayfin.stream.producer import BatchProducer
from rayfin.stream.replay import frame_to_ticks, replay_es_ticks, replay_ticks
from rayfin.stream.schemas import BookUpdate, News, Tick, encode
from rayfin.stream.simulate import MarketSimulator, SimEvent, simulate
from rayfin.stream.topics import MARKET_TOPICS, ensure_topics
from rayfin.stream.validation import decode_ticks, validate

pytestmark = pytest.mark.integration


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def consume(
    servers: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[ConsumerRecord]:
    """Every record of ``topic``: waits for ``expected``, then checks nothing more comes."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for part in batches.values():
                records.extend(part)
        extra = await consumer.getmany(timeout_ms=300)
        records.extend(r for part in extra.values() for r in part)
    finally:
        await consumer.stop()
    return records


# -- topics ------------------------------------------------------------------------------


async def test_ensure_topics_is_idempotent(kafka_broker: EmbeddedBroker) -> None:
    servers = kafka_broker.bootstrap_servers
    first, second = unique("ticks"), unique("news")
    assert await ensure_topics(servers, 3, [first]) == {first: "created"}
    assert await ensure_topics(servers, 3, [first, second, first]) == {
        first: "exists",
        second: "created",
    }
    assert await ensure_topics(servers, 5, [second]) == {second: "exists"}
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([first, second])}
    finally:
        await admin.close()
    # An existing topic keeps its partitions.
    assert [len(described[t]["partitions"]) for t in (first, second)] == [3, 3]


async def test_ensure_topics_without_a_broker_is_a_clear_error() -> None:
    with pytest.raises(BrokerError, match=r"cannot reach Kafka .*rayfin broker start"):
        await ensure_topics(f"127.0.0.1:{free_port()}", 1, ["x"])
    with pytest.raises(BrokerError, match="cannot reach Kafka"):
        async with BatchProducer(f"127.0.0.1:{free_port()}"):
            pass


# -- the ES replay -----------------------------------------------------------------------


async def test_replay_of_es_ticks_arrives_complete_in_order_keyed_and_decodable(
    kafka_broker: EmbeddedBroker,
) -> None:
    from rayfin.datasets import es_ticks

    servers, topic, n = kafka_broker.bootstrap_servers, unique("ticks"), 20_000
    stats = await replay_es_ticks(servers, None, n, topic=topic)
    assert (stats.messages, stats.topic) == (n, topic)
    records = await consume(servers, topic, n)
    assert len(records) == n
    assert {r.key for r in records} == {b"ES"}
    assert len({r.partition for r in records}) == 1  # one key, one partition: one order
    records.sort(key=lambda r: r.offset)
    columns, rejects = decode_ticks([r.value for r in records], [r.timestamp for r in records])
    assert rejects == []
    expected = frame_to_ticks(es_ticks(limit=n))
    assert columns["ts"].tolist() == [t.ts for t in expected]
    assert columns["price"].tolist() == [t.price for t in expected]
    assert columns["size"].tolist() == [t.size for t in expected]
    print(f"replayed {n:,} ES ticks at {stats.rate:,.0f} msg/s")


async def test_replay_keeps_real_time_gaps_divided_by_the_speed(
    kafka_broker: EmbeddedBroker,
) -> None:
    servers, topic = kafka_broker.bootstrap_servers, unique("paced")
    t0 = 1_700_000_000 * 10**9
    gaps_s = [0.0, 0.2, 0.2, 30.0, 0.2]  # 30 s: a halt, shortened by max_gap_s
    ts = [t0 + round(sum(gaps_s[: i + 1]) * 1e9) for i in range(len(gaps_s))]
    ticks = [Tick(symbol="ES", ts=t, price=100.0, size=1) for t in ts]
    await ensure_topics(servers, 1, [topic])
    # 0.2 + 0.2 + 0.4 (capped) + 0.2 = 1.0 s of event time, at 2x: 0.5 s.
    stats = await replay_ticks(servers, ticks, topic=topic, speed=2.0, max_gap_s=0.4)
    assert stats.messages == len(ticks)
    assert 0.45 <= stats.seconds < 2.0, stats.seconds
    records = await consume(servers, topic, len(ticks))
    sent_at = [r.timestamp for r in sorted(records, key=lambda r: r.offset)]
    assert sent_at[-1] - sent_at[0] >= 450  # record timestamps are send times, in ms


# -- the simulator, without Kafka ---------------------------------------------------------


def _events(sim: MarketSimulator, n: int) -> list[SimEvent]:
    return list(itertools.islice(sim, n))


def test_simulator_is_deterministic_for_a_seed() -> None:
    first = [encode(e.message) for e in _events(MarketSimulator(6, seed=42), 5_000)]
    again = [encode(e.message) for e in _events(MarketSimulator(6, seed=42), 5_000)]
    other = [encode(e.message) for e in _events(MarketSimulator(6, seed=43), 5_000)]
    assert first == again
    assert first != other
    assert MarketSimulator(6, seed=42).symbols == MarketSimulator(6, seed=42).symbols


def test_simulated_books_are_consistent_and_trades_stay_within_the_touch() -> None:
    sim = MarketSimulator(8, seed=7, news_rate=0.01)
    tick = sim.tick_size
    touch: dict[str, tuple[float, float]] = {}
    last_ts = 0
    seen: Counter[str] = Counter()
    for event in _events(sim, 30_000):
        message = event.message
        assert message.ts >= last_ts  # one simulated clock, in order
        last_ts = message.ts
        validate(event.topic, encode(message))  # every event passes validation
        seen[event.topic] += 1
        if isinstance(message, BookUpdate):
            assert len(message.bids) == len(message.asks) == 5
            bid, ask = message.bids[0][0], message.asks[0][0]
            assert ask - bid >= tick - 1e-9
            for price, size in message.bids + message.asks:
                assert abs(price / tick - round(price / tick)) < 1e-6  # on the tick grid
                assert size >= 1
            touch[message.symbol] = (bid, ask)
        elif isinstance(message, Tick):
            bid, ask = touch[message.symbol]  # a book is always published first
            assert bid <= message.price <= ask
            assert abs(message.price / tick - round(message.price / tick)) < 1e-6
            assert message.size >= 1
        else:
            assert isinstance(message, News)
            assert event.tone in ("positive", "negative", "neutral")
            assert all(symbol in message.headline for symbol in message.symbols)
            assert all(symbol in sim.symbols for symbol in message.symbols)
    assert set(seen) == set(MARKET_TOPICS)
    assert seen["ticks"] > seen["book"] > seen["news"] > 10


def test_news_tone_correlates_with_the_drift_that_follows() -> None:
    # Few trades (they do not move prices) so that a long stretch of simulated time,
    # with several hundred news items, takes about a second to generate.
    sim = MarketSimulator(4, seed=11, trade_rate=0.2, book_rate=0.5, news_rate=1 / 400)
    books: dict[str, tuple[list[int], list[float]]] = {s: ([], []) for s in sim.symbols}
    news: list[tuple[int, str, str]] = []
    for event in _events(sim, 150_000):
        message = event.message
        if isinstance(message, BookUpdate):
            books[message.symbol][0].append(message.ts)
            books[message.symbol][1].append(math.log(message.mid))  # type: ignore[arg-type]
        elif isinstance(message, News):
            news.append((message.ts, message.symbols[0], event.tone))  # type: ignore[arg-type]

    horizon = round(sim.regime_s * 1e9)

    def log_return(symbol: str, start: int, end: int) -> float | None:
        times, logs = books[symbol]
        i, j = bisect.bisect_right(times, start) - 1, bisect.bisect_right(times, end) - 1
        if i < 0 or j >= len(times) - 1:
            return None
        return logs[j] - logs[i]

    score = {"positive": 1.0, "negative": -1.0, "neutral": 0.0}
    after, before, tones = [], [], []
    for ts, symbol, tone in news:
        r_after = log_return(symbol, ts, ts + horizon)
        r_before = log_return(symbol, ts - horizon, ts)
        if r_after is not None and r_before is not None:
            after.append(r_after)
            before.append(r_before)
            tones.append(score[tone])
    x, after_r = np.array(tones), np.array(after)
    assert len(x) >= 300
    corr_after = np.corrcoef(x, after_r)[0, 1]
    corr_before = np.corrcoef(x, np.array(before))[0, 1]
    means = {k: after_r[x == v].mean() for k, v in score.items()}
    print(f"tone vs drift: corr after {corr_after:.2f}, before {corr_before:.2f}; {means}")
    assert corr_after > 0.4
    assert abs(corr_before) < 0.2  # news leads the move, it does not follow it
    assert means["positive"] > means["neutral"] > means["negative"]
    assert means["positive"] > 0 > means["negative"]


# -- the simulator, into Kafka ------------------------------------------------------------


async def test_simulate_sends_ticks_books_and_news_to_their_topics(
    kafka_broker: EmbeddedBroker,
) -> None:
    servers, prefix, n = kafka_broker.bootstrap_servers, unique("sim") + ".", 3_000
    options = {"news_rate": 0.05}
    stats = await simulate(servers, 4, None, 5, messages=n, topic_prefix=prefix, **options)
    expected: dict[str, list[bytes]] = defaultdict(list)
    for event in _events(MarketSimulator(4, 5, **options), n):
        expected[prefix + event.topic].append(encode(event.message))
    assert stats.counts == {topic: len(values) for topic, values in expected.items()}
    assert set(stats.counts) == {prefix + t for t in MARKET_TOPICS}
    assert stats.messages == n
    for topic, values in expected.items():
        records = await consume(servers, topic, len(values))
        assert sorted(r.value for r in records) == sorted(values)
        for record in records:
            message = validate(topic.removeprefix(prefix), record.value, record.timestamp)
            symbol = message.symbols[0] if isinstance(message, News) else message.symbol
            assert record.key == symbol.encode()
        # Per key (and so per partition) the order is the simulated order.
        by_key: dict[bytes, list[bytes]] = defaultdict(list)
        for record in sorted(records, key=lambda r: (r.partition, r.offset)):
            by_key[record.key].append(record.value)
        for key, values_of_key in by_key.items():
            assert values_of_key == [v for v in values if _key_of(topic, v) == key]


def _key_of(topic: str, value: bytes) -> bytes:
    import msgspec

    data = msgspec.json.decode(value)
    return (data["symbols"][0] if "symbols" in data else data["symbol"]).encode()


async def test_simulate_paces_to_the_requested_rate(kafka_broker: EmbeddedBroker) -> None:
    servers, prefix = kafka_broker.bootstrap_servers, unique("paced") + "."
    stats = await simulate(servers, 3, 2_000.0, 1, duration=1.0, topic_prefix=prefix)
    assert 0.95 <= stats.seconds < 2.0
    assert 1_500 <= stats.messages <= 2_100, stats
    print(f"paced simulate: {stats.messages:,} messages in {stats.seconds:.2f} s")


async def test_simulate_at_max_rate_reports_its_throughput(kafka_broker: EmbeddedBroker) -> None:
    servers, prefix = kafka_broker.bootstrap_servers, unique("max") + "."
    stats = await simulate(servers, 20, None, 2, messages=30_000, topic_prefix=prefix)
    assert stats.messages == 30_000
    print(f"simulate at max: {stats.rate:,.0f} msg/s")


async def test_a_stop_event_ends_the_simulation_cleanly(kafka_broker: EmbeddedBroker) -> None:
    servers, prefix = kafka_broker.bootstrap_servers, unique("stop") + "."
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    stats = await simulate(servers, 2, 1_000.0, 0, topic_prefix=prefix, stop=stop)
    assert 0.45 <= stats.seconds < 2.0
    assert 300 <= stats.messages <= 1_100


# -- the CLI -------------------------------------------------------------------------------


def rayfin(*args: str, servers: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "RAYFIN_BROKER__BOOTSTRAP_SERVERS": servers}
    return subprocess.run(
        [sys.executable, "-m", "rayfin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_replay_and_simulate_end_to_end(kafka_broker: EmbeddedBroker) -> None:
    servers = kafka_broker.bootstrap_servers
    topic = unique("cli-ticks")
    replayed = rayfin(
        "replay", "es-ticks", "--rate", "max", "--limit", "2500", "--topic", topic,
        servers=servers,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert f"replaying ES ticks to {topic!r} on {servers}" in replayed.stdout
    assert "sent 2,500 messages" in replayed.stdout
    assert len(asyncio.run(consume(servers, topic, 2_500))) == 2_500

    prefix = unique("cli") + "."
    simulated = rayfin(
        "simulate", "--symbols", "3", "--rate", "max", "--seed", "4", "--messages", "1500",
        "--topic-prefix", prefix, servers=servers,
    )  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr
    out = simulated.stdout
    assert "sent 1,500 messages" in out
    counts = Counter(e.topic for e in _events(MarketSimulator(3, 4), 1_500))
    for topic_name in MARKET_TOPICS:
        assert f"{prefix}{topic_name}" in out
        assert f"{counts[topic_name]:,}" in out

    paced = rayfin(
        "simulate", "--rate", "500", "--seconds", "1", "--topic-prefix", prefix,
        servers=servers,
    )  # fmt: skip
    assert paced.returncode == 0, paced.stderr
    assert "msg/s" in paced.stdout


def test_cli_fails_cleanly_without_a_broker() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    for args in (("replay", "es-ticks", "--limit", "10"), ("simulate", "--messages", "10")):
        result = rayfin(*args, servers=nowhere)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"cannot reach Kafka at {nowhere}" in result.stderr
        assert "rayfin broker start" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert "Unable connect" not in result.stderr  # aiokafka's log noise is muted


def test_cli_rejects_bad_arguments(kafka_broker: EmbeddedBroker) -> None:
    servers = kafka_broker.bootstrap_servers
    both = rayfin("simulate", "--messages", "5", "--seconds", "1", servers=servers)
    assert both.returncode == 2
    assert "not both" in both.stderr
    bad_rate = rayfin("replay", "es-ticks", "--rate", "fast", servers=servers)
    assert bad_rate.returncode == 2
    assert "number or 'max'" in bad_rate.stderr
    assert "Traceback" not in both.stderr + bad_rate.stderr


def test_cli_ctrl_c_stops_the_simulation_and_reports(kafka_broker: EmbeddedBroker) -> None:
    env = {
        **os.environ,
        "COLUMNS": "200",
        "RAYFIN_BROKER__BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayfin", "simulate", "--rate", "2000",
         "--topic-prefix", unique("sigint") + "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    assert "simulating" in proc.stdout.readline()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped by Ctrl-C" in out
    assert "Traceback" not in err
