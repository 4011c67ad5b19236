"""The embedded tansu broker: lifecycle, clear errors, and a full aiokafka round trip."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from rayfin.errors import BrokerError
from rayfin.stream.broker import EmbeddedBroker, free_port
from rayfin.stream.probe import kafka_answers

pytestmark = pytest.mark.integration


def test_start_status_stop(tmp_path: Path) -> None:
    broker = EmbeddedBroker(port=free_port(), state_dir=tmp_path)
    assert broker.status().state == "stopped"
    status = broker.start()
    try:
        assert status.running
        assert status.pid is not None
        assert broker.pid_file.is_file()
        assert broker.log_file.is_file()
        assert kafka_answers("127.0.0.1", broker.port)
        assert broker.start().pid == status.pid  # idempotent for the same address
    finally:
        assert broker.stop() is True
    assert broker.status().state == "stopped"
    assert not kafka_answers("127.0.0.1", broker.port)
    assert broker.stop() is False


def test_status_detects_a_dead_broker_as_stale(tmp_path: Path) -> None:
    import psutil

    broker = EmbeddedBroker(port=free_port(), state_dir=tmp_path)
    pid = broker.start().pid
    proc = psutil.Process(pid)
    proc.kill()
    proc.wait(5)
    status = broker.status()
    assert status.state == "stale"
    assert "stale" in status.detail
    broker.start()  # a stale pid file does not block a new start
    assert broker.status().running
    broker.stop()


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .* already in use"):
            EmbeddedBroker(port=port, state_dir=tmp_path).start()
    assert not (tmp_path / "broker.pid").exists()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    broker = EmbeddedBroker(port=free_port(), state_dir=tmp_path, binary=tmp_path / "no-tansu")
    with pytest.raises(BrokerError, match="binary not found"):
        broker.start()


def test_non_executable_binary_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("not a program")
    with pytest.raises(BrokerError, match="not executable"):
        EmbeddedBroker(port=free_port(), state_dir=tmp_path, binary=fake).start()


def test_probe_rejects_a_non_kafka_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not kafka_answers("127.0.0.1", listener.getsockname()[1], timeout=0.3)
    assert not kafka_answers("127.0.0.1", free_port(), timeout=0.3)


async def test_aiokafka_round_trip_with_committed_offsets(kafka_broker: EmbeddedBroker) -> None:
    servers = kafka_broker.bootstrap_servers
    topic, group = f"roundtrip-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"

    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send(topic, f"m{i}".encode(), key=b"ES")
        await producer.flush()
    finally:
        await producer.stop()

    async def read(n: int) -> tuple[list[bytes], int | None]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=servers,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # tansu completes a join only after the previous member's session expires,
            # so short group timeouts keep this test quick (about 14 s instead of 23 s).
            session_timeout_ms=6_000,
            heartbeat_interval_ms=500,
            rebalance_timeout_ms=2_000,
        )
        await consumer.start()
        try:
            got: list[bytes] = []
            while len(got) < n:
                batch = await consumer.getmany(timeout_ms=5_000, max_records=n - len(got))
                assert batch, "no records within 5 s"
                for records in batch.values():
                    got.extend(r.value for r in records)
            await consumer.commit()
            committed = await consumer.committed(TopicPartition(topic, 0))
            return got, committed
        finally:
            await consumer.stop()

    first, committed = await read(4)
    assert first == [b"m0", b"m1", b"m2", b"m3"]
    assert committed == 4
    # A new member of the same group resumes at the committed offset, not at the start.
    rest, committed = await read(6)
    assert rest == [f"m{i}".encode() for i in range(4, 10)]
    assert committed == 10


def test_wildcard_listener_advertises_the_given_host(tmp_path: Path) -> None:
    broker = EmbeddedBroker("0.0.0.0", free_port(), state_dir=tmp_path, advertised_host="127.0.0.2")
    with broker:
        assert broker.bootstrap_servers == f"127.0.0.2:{broker.port}"
        assert "advertised: tcp://127.0.0.2" in broker.log_tail()
        assert broker.status().running
