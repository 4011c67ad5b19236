"""A batching aiokafka producer shared by the replay and the simulator.

:class:`BatchProducer` wraps :class:`aiokafka.AIOKafkaProducer` with the settings every
rayfin producer wants (``acks="all"``, a short linger, large batches), optional pacing,
delivery counting per topic, and a clean error when Kafka cannot be reached.

Pacing: with ``rate`` set, message *n* is due ``n / rate`` seconds after
:meth:`~BatchProducer.start`; a caller can instead give each message its own due time
(``at=``, seconds after start), as the real-time replay does. The producer sleeps only
when it is more than ``PACING_SLACK_S`` ahead of the schedule, so pacing costs one clock
read per message, and no message leaves more than that early. Behind schedule, it sends
without sleeping until it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from rayfin.errors import BrokerError
from rayfin.stream.schemas import Message, encode, key_for, topic_for
from rayfin.stream.topics import unreachable

PACING_SLACK_S = 0.002
"""How far ahead of schedule a paced producer may get before it sleeps."""
_KEY_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class SendStats:
    """What a producer delivered (acknowledged by Kafka), per topic, and how fast."""

    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


class _OpenBatch:
    """A batch being filled for one topic-partition."""

    __slots__ = ("builder", "count", "created", "partition", "topic")

    def __init__(self, builder: Any, topic: str, partition: int, created: float) -> None:
        self.builder = builder
        self.topic = topic
        self.partition = partition
        self.created = created
        self.count = 0


class BatchProducer:
    """A started-once, stopped-once Kafka producer with pacing and delivery counts.

    Use as ``async with BatchProducer(servers, rate=...) as producer:``. :meth:`send`
    only buffers (it waits for pacing, or when Kafka falls behind); :meth:`flush` waits
    until Kafka acknowledged everything and raises :class:`~rayfin.errors.BrokerError`
    if any message failed. ``rate`` is in messages per second; None sends unpaced.

    Records are packed into per-partition batches here, with aiokafka's batch API, and a
    batch leaves when it is full (``max_batch_size`` bytes) or ``linger_ms`` old. That
    skips aiokafka's per-message bookkeeping (a future, a metadata wait and a key hash
    per record), which costs more than half of the time of ``AIOKafkaProducer.send``.
    Keys are hashed with Kafka's default partitioner (murmur2), so a key lands on the
    same partition as with any other Kafka client; records without a key go round-robin.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        rate: float | None = None,
        linger_ms: int = 5,
        max_batch_size: int = 256 * 1024,
        acks: str | int = "all",
        client_id: str = "rayfin-producer",
        **kafka_options: Any,
    ) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 messages/s (or None), got {rate}")
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger_ms}")
        self.bootstrap_servers = bootstrap_servers
        self.rate = rate
        self.linger_s = linger_ms / 1000
        self._options: dict[str, Any] = {
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_size,
            "acks": acks,
            "client_id": client_id,
            **kafka_options,
        }
        self._producer: Any = None
        self._partitioner: Callable[[bytes, list[int], list[int]], int] | None = None
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._queued = 0
        self._delivered: Counter[str] = Counter()
        self._failed = 0
        self._error: BaseException | None = None
        self._open: dict[tuple[str, int], _OpenBatch] = {}
        self._inflight: deque[tuple[asyncio.Future[Any], str, int]] = deque()
        self._partitions: dict[str, list[int]] = {}
        self._key_partition: dict[tuple[str, bytes], int] = {}
        self._round_robin = 0
        self._ship_lock = asyncio.Lock()
        self._linger_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Kafka; raises :class:`BrokerError` when it cannot be reached."""
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError
        from aiokafka.partitioner import DefaultPartitioner

        if self._producer is not None or self._stopped_at is not None:
            raise RuntimeError("a BatchProducer can be started once")
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, **self._options)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise unreachable(self.bootstrap_servers, exc) from exc
        self._producer = producer
        self._partitioner = DefaultPartitioner()
        self._started_at = time.perf_counter()
        self._linger_task = asyncio.create_task(self._linger_loop(), name="rayfin-linger")

    async def stop(self) -> None:
        """Deliver what is buffered, then disconnect; safe to call more than once."""
        producer = self._producer
        if producer is None:
            return
        try:
            if self._error is None:
                await self.flush()
        finally:
            self._producer = None
            if self._linger_task is not None:
                self._linger_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._linger_task
            await producer.stop()
            self._stopped_at = time.perf_counter()
        self._raise_failure()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        except BrokerError:
            if exc is None:
                raise  # otherwise the original error is the one to see

    # -- counters -------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds since start (until stop, once stopped)."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else time.perf_counter()
        return end - self._started_at

    @property
    def queued(self) -> int:
        """Messages handed to :meth:`send` so far."""
        return self._queued

    def stats(self) -> SendStats:
        """Acknowledged messages per topic, over the time since start."""
        self._reap()
        return SendStats(dict(self._delivered), self.elapsed)

    # -- sending --------------------------------------------------------------------------

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, *, at: float | None = None
    ) -> None:
        """Buffer one record, after waiting for its due time.

        ``at`` is the due time in seconds after :meth:`start`; without it, a paced
        producer schedules the n-th message at ``n / rate``.
        """
        if self._producer is None:
            raise RuntimeError("start the producer before sending")
        if self._error is not None:
            self._raise_failure()
        now = time.perf_counter()
        if at is None and self.rate is not None:
            at = self._queued / self.rate
        if at is not None:
            ahead = self._started_at + at - now  # type: ignore[operator]
            if ahead > PACING_SLACK_S:
                await asyncio.sleep(ahead)
                now = time.perf_counter()

        partition = self._key_partition.get((topic, key)) if key is not None else None
        if partition is None:
            partition = await self._partition(topic, key)
        slot = (topic, partition)
        while True:
            batch = self._open.get(slot)
            if batch is None:
                batch = self._open[slot] = self._new_batch(topic, partition, now)
            if batch.builder.append(timestamp=None, key=key, value=value) is not None:
                break
            if batch.count == 0:
                del self._open[slot]
                raise BrokerError(
                    f"a {len(value):,}-byte record does not fit in one batch "
                    f"(max_batch_size {self._options['max_batch_size']:,} bytes)"
                )
            await self._ship(slot)  # full: ship it, the record opens the next one
        batch.count += 1
        self._queued += 1
        if now - batch.created >= self.linger_s:
            await self._ship(slot)

    async def send_message(self, message: Message, *, at: float | None = None) -> None:
        """Encode ``message`` and send it to its topic under its partition key."""
        await self.send(topic_for(message), encode(message), key_for(message), at=at)

    async def flush(self) -> None:
        """Ship every open batch and wait until Kafka acknowledged everything."""
        if self._producer is not None:
            for slot in list(self._open):
                await self._ship(slot)
            pending = [future for future, _, _ in self._inflight]
            if pending:
                await asyncio.wait(pending)
        self._reap()
        self._raise_failure()

    # -- internals ------------------------------------------------------------------------

    def _new_batch(self, topic: str, partition: int, now: float) -> _OpenBatch:
        return _OpenBatch(self._producer.create_batch(), topic, partition, now)

    async def _partition(self, topic: str, key: bytes | None) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            from aiokafka.errors import KafkaError

            try:
                found = await self._producer.partitions_for(topic)
            except KafkaError as exc:
                raise BrokerError(
                    f"no partitions for topic {topic!r} on {self.bootstrap_servers}: {exc}"
                ) from exc
            partitions = self._partitions[topic] = sorted(found)
        if key is None:
            self._round_robin += 1
            return partitions[self._round_robin % len(partitions)]
        partition = self._partitioner(key, partitions, partitions)  # type: ignore[misc]
        if len(self._key_partition) >= _KEY_CACHE_SIZE:
            self._key_partition.clear()
        self._key_partition[(topic, key)] = partition
        return partition

    async def _ship(self, slot: tuple[str, int]) -> None:
        batch = self._open.pop(slot, None)
        if batch is None or batch.count == 0:
            return
        batch.builder.close()
        async with self._ship_lock:  # one submission at a time keeps batches in order
            try:
                future = await self._producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
            except Exception as exc:
                self._failed += batch.count
                self._error = self._error or exc
                raise self._failure() from exc
        self._inflight.append((future, batch.topic, batch.count))
        self._reap()

    def _reap(self) -> None:
        """Count the batches Kafka has answered, oldest first."""
        inflight = self._inflight
        while inflight and inflight[0][0].done():
            future, topic, count = inflight.popleft()
            if future.cancelled():
                self._failed += count
                self._error = self._error or asyncio.CancelledError("delivery cancelled")
            elif future.exception() is not None:
                self._failed += count
                self._error = self._error or future.exception()
            else:
                self._delivered[topic] += count

    async def _linger_loop(self) -> None:
        """Ship batches that waited ``linger_ms``, when no new record does it."""
        interval = max(self.linger_s, 0.001)
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            for slot, batch in list(self._open.items()):
                if now - batch.created >= self.linger_s and self._open.get(slot) is batch:
                    try:
                        await self._ship(slot)
                    except BrokerError:
                        return  # recorded; the next send or flush raises it
            self._reap()

    def _failure(self) -> BrokerError:
        return BrokerError(
            f"Kafka at {self.bootstrap_servers} did not accept {self._failed:,} "
            f"message(s): {self._error!r}"
        )

    def _raise_failure(self) -> None:
        if self._error is not None:
            error = self._error
            raise self._failure() from error
