"""From Kafka records to feature rows, durably, each source offset exactly once.

:class:`FeaturePipeline` is the consumer's logic without the network: it validates a
partition's micro-batch (bad records become dead letters), computes features with one
engine per partition, and buffers rows until a :meth:`FeaturePipeline.cut` of them is
written to the :class:`~rayfin.stream.archive.Archive` with the partition's checkpoint.
:class:`StreamConsumer` drives it from an aiokafka consumer group: offsets are committed only
after the rows and dead letters they cover are durably written (at-least-once delivery),
and records at or below the archive's mark are skipped, so a replay after a crash writes
nothing twice (effectively exactly-once).

Live features are "emitted" when computed: they update :attr:`FeaturePipeline.latest`
(the newest row per symbol, what a scorer reads) and the latency clock stops there. The
archive write follows within ``flush_interval_s``.

With a trader (:class:`~rayfin.actors.trader.TradingActor`), each poll's tick-feature rows
go to it in one call, at most one call in flight (backpressure), and a write waits for the
trader to have recorded every row it covers before archiving and committing them. So the
archive and the committed offsets never run ahead of the trader's ledger: after a crash of
either, the records the trader has not recorded are read again, and the trader drops the
ones it has (:mod:`rayfin.trading.live`).

With a sentiment scorer (:class:`~rayfin.actors.sentiment.SentimentActor`), each poll's
news of a partition is scored as it comes in, and the archived ``news`` rows carry the
scores (``negative``, ``neutral``, ``positive``, ``sentiment``). With a trader too, the
scored stories go to it (``on_news``) in offset order. A write waits for the scores, and
for the trader to have recorded the stories, before archiving and committing them: the
same rule as ticks, so a crash replays the news the trader has not recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from rayfin.errors import InvalidMessage
from rayfin.features import BookFeatureEngine, FeatureSpec, TickFeatureEngine
from rayfin.stream.archive import Archive, Checkpoint, PartitionMovedError
from rayfin.stream.metrics import StreamMetrics
from rayfin.stream.schemas import BookUpdate, DeadLetter, News
from rayfin.stream.topics import BOOK_TOPIC, NEWS_TOPIC, Topics
from rayfin.stream.validation import dead_letter, decode_ticks, encode_dead_letter, validate

# Archive tables written per kind of source topic: raw records, and features where any.
RAW_TABLE = {"ticks": "ticks", "book": "book", "news": "news"}
FEATURE_TABLE = {"ticks": "tick_features", "book": "book_features"}
ENGINES: dict[str, type[TickFeatureEngine] | type[BookFeatureEngine]] = {
    "ticks": TickFeatureEngine,
    "book": BookFeatureEngine,
}


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """How a feature consumer reads, computes and writes."""

    bootstrap_servers: str
    archive: str
    group_id: str = "rayfin-features"
    topics: Topics = field(default_factory=Topics)
    # Which market topics this consumer group reads.
    kinds: tuple[str, ...] = ("ticks", "book", "news")
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    # Rows are written and offsets committed at least this often, and whenever this
    # many rows are buffered: the bound on what a crash makes the group read again.
    flush_interval_s: float = 0.5
    flush_rows: int = 100_000
    max_records: int = 10_000
    # How long one poll waits for records when none are there, and how long the broker
    # may hold a fetch for more data: both short, for latency (an idle consumer then
    # sends about a hundred small fetches a second).
    poll_timeout_ms: int = 10
    fetch_max_wait_ms: int = 10
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_skew_ns: int = 86_400 * 10**9


@dataclass(slots=True)
class _Partition:
    topic: str
    kind: str
    partition: int
    engine: TickFeatureEngine | BookFeatureEngine | None
    last: int  # highest offset processed (archived or buffered)
    cut_to: int  # highest offset handed to a write (done or in flight)
    # Raw rows, or (news being scored) the task that gives them with their scores.
    raw: list[pa.Table | asyncio.Future[pa.Table]] = field(default_factory=list)
    features: list[pa.Table] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    rows: int = 0


class FeaturePipeline:
    """Validation, features, buffering and durable writes for the partitions one consumer
    holds. ``send_dead_letter`` delivers a dead letter and returns once the broker has it."""

    def __init__(
        self,
        config: ConsumerConfig,
        archive: Archive,
        send_dead_letter: Callable[[DeadLetter], Awaitable[Any]],
        metrics: StreamMetrics,
    ) -> None:
        self.config = config
        self.archive = archive
        self.send_dead_letter = send_dead_letter
        self.metrics = metrics
        self.partitions: dict[tuple[str, int], _Partition] = {}
        self.latest: dict[str, dict[str, Any]] = {}
        # Tick-feature tables emitted since the last take_emitted(), by topic; only kept
        # when something takes them (a trader).
        self.emitted: dict[str, list[pa.Table]] | None = None
        # Scores a partition's raw news (topic, table) in the background, when set: the
        # task's result, the table with its scores, is what gets archived.
        self.score_news: Callable[[str, pa.Table], asyncio.Future[pa.Table]] | None = None
        self._last_cut = time.monotonic()

    # -- assignment ------------------------------------------------------------------

    def assign(self, topic: str, partition: int) -> int:
        """Take over a partition: recover its archive, restore its feature state, and
        return the offset to resume from (just past what the archive holds)."""
        kind = self.config.topics.kind(topic)
        tables = [RAW_TABLE[kind]] + ([FEATURE_TABLE[kind]] if kind in FEATURE_TABLE else [])
        checkpoint = self.archive.recover(topic, partition, tables)
        engine = None
        if (engine_cls := ENGINES.get(kind)) is not None:
            spec = self.config.spec
            engine = (
                engine_cls.restore(spec, checkpoint.state) if checkpoint.state else engine_cls(spec)
            )
        self.partitions[(topic, partition)] = _Partition(
            topic, kind, partition, engine, checkpoint.hwm, checkpoint.hwm
        )
        return checkpoint.hwm + 1

    def revoke(self, topic: str, partition: int) -> None:
        """Drop a partition (after flushing it): its next owner restores from the archive."""
        self.partitions.pop((topic, partition), None)

    # -- processing ------------------------------------------------------------------

    def process(self, topic: str, partition: int, records: list[Any]) -> int:
        """Validate and compute features for one partition's records (in offset order);
        returns the feature rows emitted."""
        state = self.partitions.get((topic, partition))
        if state is None:  # not ours any more (revoked while the batch was in flight)
            return 0
        # A replay after a crash re-reads records the archive already holds: skip them.
        records = [r for r in records if r.offset > state.last]
        if not records:
            return 0
        self.metrics.record_in(topic, len(records))
        if state.kind == "ticks":
            emitted = self._ticks(state, records)
        elif state.kind == "book":
            emitted = self._books(state, records)
        else:
            emitted = self._news(state, records)
        state.last = records[-1].offset
        return emitted

    def _reject(self, state: _Partition, record: Any, error: InvalidMessage | tuple) -> None:
        letter = dead_letter(
            state.topic, state.partition, record.offset, record.key, record.value, error
        )
        state.letters.append(letter)
        self.metrics.dead_letter(state.topic, letter.reason)

    def _ticks(self, state: _Partition, records: list[Any]) -> int:
        stamps = [r.timestamp for r in records]
        columns, rejects = decode_ticks(
            [r.value for r in records], stamps, max_skew_ns=self.config.max_skew_ns
        )
        for index, reason, detail in rejects:
            self._reject(state, records[index], (reason, detail))
        index = columns["index"]
        if not len(index):
            return 0
        offsets = np.fromiter((records[i].offset for i in index), np.int64, len(index))
        stamps_ms = np.asarray(stamps, dtype=np.int64)[index]
        symbols = columns["symbol"]
        frames = [
            state.engine.update_arrays(  # type: ignore[union-attr]
                symbol,
                columns["ts"][rows],
                columns["price"][rows],
                columns["size"][rows].astype(np.float64),
                offsets=offsets[rows],
                partition=state.partition,
            )
            for symbol, rows in _by_symbol(symbols)
        ]
        raw = pa.table(
            {
                "symbol": symbols,
                "ts": columns["ts"],
                "price": columns["price"],
                "size": columns["size"],
                "partition": np.full(len(index), state.partition, dtype=np.int32),
                "offset": offsets,
                "record_ts_ms": stamps_ms,
            }
        )
        return self._emit(state, raw, frames, stamps_ms)

    def _books(self, state: _Partition, records: list[Any]) -> int:
        books: list[BookUpdate] = []
        kept: list[Any] = []
        for record in records:
            try:
                book = validate(
                    BOOK_TOPIC, record.value, record.timestamp, max_skew_ns=self.config.max_skew_ns
                )
            except InvalidMessage as exc:
                self._reject(state, record, exc)
                continue
            books.append(book)  # type: ignore[arg-type]
            kept.append(record)
        if not books:
            return 0
        offsets = np.array([r.offset for r in kept], dtype=np.int64)
        stamps_ms = np.array([r.timestamp for r in kept], dtype=np.int64)
        symbols = np.array([b.symbol for b in books], dtype=str)
        ts = np.array([b.ts for b in books], dtype=np.int64)
        depth = self.config.spec.book_depth
        bid_px, bid_sz = _levels([b.bids for b in books], depth)
        ask_px, ask_sz = _levels([b.asks for b in books], depth)
        frames = [
            state.engine.update_arrays(  # type: ignore[union-attr]
                symbol,
                ts[rows],
                bid_px[rows],
                bid_sz[rows],
                ask_px[rows],
                ask_sz[rows],
                offsets=offsets[rows],
                partition=state.partition,
            )
            for symbol, rows in _by_symbol(symbols)
        ]
        raw = pa.table(
            {
                "symbol": symbols,
                "ts": ts,
                "bids": [[list(level) for level in b.bids] for b in books],
                "asks": [[list(level) for level in b.asks] for b in books],
                "partition": np.full(len(books), state.partition, dtype=np.int32),
                "offset": offsets,
                "record_ts_ms": stamps_ms,
            }
        )
        return self._emit(state, raw, frames, stamps_ms)

    def _news(self, state: _Partition, records: list[Any]) -> int:
        items: list[tuple[Any, News]] = []
        for record in records:
            try:
                news = validate(
                    NEWS_TOPIC, record.value, record.timestamp, max_skew_ns=self.config.max_skew_ns
                )
                items.append((record, news))  # type: ignore[arg-type]
            except InvalidMessage as exc:
                self._reject(state, record, exc)
        if not items:
            return 0
        raw = pa.table(
            {
                # Archived under the story's first symbol; market-wide news under "_market".
                "symbol": [n.symbols[0] if n.symbols else "_market" for _, n in items],
                "ts": np.array([n.ts for _, n in items], dtype=np.int64),
                "headline": [n.headline for _, n in items],
                "symbols": [list(n.symbols) for _, n in items],
                "source": [n.source for _, n in items],
                "id": [n.id for _, n in items],
                "partition": np.full(len(items), state.partition, dtype=np.int32),
                "offset": np.array([r.offset for r, _ in items], dtype=np.int64),
                "record_ts_ms": np.array([r.timestamp for r, _ in items], dtype=np.int64),
            }
        )
        state.raw.append(raw if self.score_news is None else self.score_news(state.topic, raw))
        state.rows += raw.num_rows
        return 0

    def _emit(
        self,
        state: _Partition,
        raw: pa.Table,
        frames: list[dict[str, np.ndarray]],
        stamps_ms: np.ndarray,
    ) -> int:
        for frame in frames:  # one per symbol
            last = {name: _scalar(column[-1]) for name, column in frame.items()}
            self.latest[last["symbol"]] = last
        # The latency clock stops here: the features exist and the scorer can read them.
        self.metrics.latencies(time.time() * 1e3 - stamps_ms.astype(np.float64))
        tables = [pa.table(frame) for frame in frames]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        state.raw.append(raw)
        state.features.append(table)
        state.rows += table.num_rows
        self.metrics.feature_rows(FEATURE_TABLE[state.kind], table.num_rows)
        if self.emitted is not None and state.kind == "ticks":
            self.emitted.setdefault(state.topic, []).append(table)
        return table.num_rows

    def take_emitted(self) -> dict[str, pa.Table]:
        """The tick-feature rows emitted since the last call, one table per topic."""
        if not self.emitted:
            return {}
        taken = {topic: pa.concat_tables(tables) for topic, tables in self.emitted.items()}
        self.emitted = {}
        return taken

    # -- durability ------------------------------------------------------------------

    @property
    def buffered_rows(self) -> int:
        return sum(p.rows for p in self.partitions.values())

    def due(self) -> bool:
        """Whether buffered work should be written now."""
        if self.buffered_rows >= self.config.flush_rows:
            return True
        pending = any(p.last > p.cut_to for p in self.partitions.values())
        return pending and time.monotonic() - self._last_cut >= self.config.flush_interval_s

    def cut(self, only: set[tuple[str, int]] | None = None) -> list[_Cut]:
        """Take the buffered rows, dead letters and a state snapshot of each partition
        (of ``only``) for a write; processing goes on into fresh buffers meanwhile."""
        cuts = []
        for key, state in self.partitions.items():
            if (only is not None and key not in only) or state.last <= state.cut_to:
                continue
            cuts.append(
                _Cut(
                    key=key,
                    kind=state.kind,
                    after=state.cut_to,
                    last=state.last,
                    raw=state.raw,
                    features=state.features,
                    letters=state.letters,
                    # Taken now, it is the state right after ``last``, as the checkpoint says.
                    snapshot=state.engine.snapshot() if state.engine is not None else b"",
                )
            )
            state.raw, state.features, state.letters, state.rows = [], [], [], 0
            state.cut_to = state.last
        self._last_cut = time.monotonic()
        return cuts

    async def write(self, cuts: list[_Cut]) -> dict[tuple[str, int], int]:
        """Deliver the cuts' dead letters, write their rows and checkpoints; return the
        offsets now safe to commit. Cuts of one partition must be written in order."""
        safe: dict[tuple[str, int], int] = {}
        for cut in cuts:
            topic, partition = cut.key
            await asyncio.gather(*(self.send_dead_letter(letter) for letter in cut.letters))
            tables = {}
            if cut.raw:
                # News still being scored (and handed to the trader) is waited for here.
                raw = [part if isinstance(part, pa.Table) else await part for part in cut.raw]
                tables[RAW_TABLE[cut.kind]] = pa.concat_tables(raw)
            if cut.features:
                tables[FEATURE_TABLE[cut.kind]] = pa.concat_tables(cut.features)
            checkpoint = Checkpoint(topic, partition, cut.last, cut.snapshot)
            # Off the event loop: polling and heartbeats go on while Parquet is written.
            try:
                await asyncio.to_thread(
                    self.archive.write, topic, partition, tables, checkpoint, cut.after
                )
            except PartitionMovedError:
                # Another member owns the partition now (this one was too slow to stay in
                # the group); its rows are that member's to write.
                self.partitions.pop(cut.key, None)
                continue
            safe[cut.key] = cut.last + 1
        return safe


@dataclass(slots=True)
class _Cut:
    """A partition's work handed to one write: offsets ``after + 1 .. last``."""

    key: tuple[str, int]
    kind: str
    after: int
    last: int
    raw: list[pa.Table | asyncio.Future[pa.Table]]
    features: list[pa.Table]
    letters: list[DeadLetter]
    snapshot: bytes


def _scalar(value: Any) -> Any:
    """A numpy scalar as a plain Python value (strings of object arrays already are)."""
    return value.item() if isinstance(value, np.generic) else value


def _by_symbol(symbols: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each symbol of a batch, in order of first appearance, with its rows in order."""
    return [(s, np.flatnonzero(symbols == s)) for s in dict.fromkeys(symbols.tolist())]


def _levels(sides: list[list[tuple[float, int]]], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Book sides as ``[n, depth]`` price and size arrays (the feature spec's book depth);
    missing levels are NaN prices and zero sizes."""
    prices = np.full((len(sides), depth), np.nan)
    sizes = np.zeros((len(sides), depth))
    for i, levels in enumerate(sides):
        for j, (price, size) in enumerate(levels[:depth]):
            prices[i, j] = price
            sizes[i, j] = size
    return prices, sizes


class StreamConsumer:
    """One member of the feature consumer group: aiokafka in, :class:`FeaturePipeline`
    through, commits after durable writes. Run it with :meth:`run` until :meth:`stop`."""

    def __init__(
        self, config: ConsumerConfig, name: str = "consumer", trader: Any = None, scorer: Any = None
    ) -> None:
        self.config = config
        self.name = name
        self.trader = trader  # a TradingActor handle, or None
        self.scorer = scorer  # a SentimentActor handle, or None
        self.metrics = StreamMetrics(name)
        self.archive = Archive(config.archive)
        self.pipeline: FeaturePipeline | None = None
        self.assigned: set[tuple[str, int]] = set()
        self.rebalances = 0
        self.commit_failures = 0
        self._writing: asyncio.Task[None] | None = None
        self._trading: list[Any] = []  # the trader calls in flight (ObjectRefs), one a topic
        self.rows_to_trader = 0
        self._scoring: asyncio.Task[pa.Table] | None = None  # the latest news being scored
        self.news_to_trader = 0
        self._stopping = asyncio.Event()
        self._consumer: Any = None
        self._producer: Any = None

    async def start(self) -> None:
        c = self.config
        self._producer = AIOKafkaProducer(
            bootstrap_servers=c.bootstrap_servers, acks="all", linger_ms=5
        )
        await self._producer.start()

        async def send(letter: DeadLetter) -> None:
            delivered = await self._producer.send(
                c.topics.dead_letters, encode_dead_letter(letter), key=letter.key
            )
            await delivered

        self.pipeline = FeaturePipeline(c, self.archive, send, self.metrics)
        if self.trader is not None:
            self.pipeline.emitted = {}
        if self.scorer is not None:
            self.pipeline.score_news = self._score_news
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=c.bootstrap_servers,
            group_id=c.group_id,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=c.max_records,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
        )
        await self._consumer.start()
        names = [getattr(c.topics, kind) for kind in c.kinds]
        self._consumer.subscribe(names, listener=_Rebalance(self))

    async def run(self) -> None:
        """Poll, process and write until :meth:`stop`; then write the rest, commit, and
        leave the group. Writes run in the background, one at a time, so polling never
        waits for Parquet."""
        if self._consumer is None or self.pipeline is None:
            raise RuntimeError("start() the consumer before run()")
        consumer, pipeline = self._consumer, self.pipeline
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(
                    timeout_ms=self.config.poll_timeout_ms, max_records=self.config.max_records
                )
                for tp, records in batches.items():
                    pipeline.process(tp.topic, tp.partition, records)
                self.metrics.tick()  # records per second, 0 on an idle poll
                if self.trader is not None:
                    await self._trade(pipeline.take_emitted())
                if self._writing is not None and self._writing.done():
                    self._writing.result()  # a failed write stops the consumer
                    self._writing = None
                if self._writing is None and pipeline.due():
                    self._writing = asyncio.get_running_loop().create_task(
                        self._write(pipeline.cut())
                    )
        finally:
            self.metrics.idle()
            await self._settle()
            await self._write(pipeline.cut())
            await consumer.stop()
            await self._producer.stop()

    async def _trade(self, emitted: dict[str, pa.Table]) -> None:
        """Hand the rows to the trader, once its previous call is done (one in flight)."""
        if not emitted:
            return
        await self._traded()
        self._trading = [
            self.trader.on_features.remote(topic, rows) for topic, rows in emitted.items()
        ]
        self.rows_to_trader += sum(rows.num_rows for rows in emitted.values())

    async def _traded(self) -> None:
        """Wait until the trader recorded every row sent so far (its calls run in order);
        a failed trade raises, which stops the consumer before anything is lost."""
        for call in self._trading:
            await call

    def _score_news(self, topic: str, news: pa.Table) -> asyncio.Task[pa.Table]:
        """Start scoring ``news`` (one partition's, of a poll); the task ends once the trader
        has recorded the scored stories, and gives the table to archive."""
        task = asyncio.get_running_loop().create_task(self._scored(topic, news, self._scoring))
        self._scoring = task
        return task

    async def _scored(
        self, topic: str, news: pa.Table, before: asyncio.Task[pa.Table] | None
    ) -> pa.Table:
        scored = await self.scorer.score_news.remote(news)
        if before is not None:
            # Stories reach the trader in the order they were read (its marks need
            # offset order); a failure before this one fails this one too.
            await before
        if self.trader is not None:
            rows = scored.select(["ts", "symbols", "sentiment", "partition", "offset"])
            await self.trader.on_news.remote(topic, rows)
            self.news_to_trader += rows.num_rows
        return scored

    async def _settle(self) -> None:
        """Wait for the write in flight, if any."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def _write(self, cuts: list[_Cut]) -> None:
        assert self.pipeline is not None
        # Archive and commit nothing the trader has not recorded.
        await self._traded()
        await self._commit(await self.pipeline.write(cuts))
        self._update_lag()

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        try:
            await self._consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except (CommitFailedError, IllegalStateError):
            # The group rebalanced under the write: the rows are archived, and the next
            # owner starts past them from the archive's checkpoint.
            self.commit_failures += 1

    def _update_lag(self) -> None:
        assert self.pipeline is not None
        for (topic, partition), state in self.pipeline.partitions.items():
            end = self._consumer.highwater(TopicPartition(topic, partition))
            if end is not None:  # None until the first fetch from the partition
                self.metrics.set_lag(topic, partition, max(0, end - state.last - 1))

    def stop(self) -> None:
        self._stopping.set()

    def stats(self) -> dict[str, Any]:
        out = self.metrics.snapshot()
        out["assigned"] = sorted(f"{t}/{p}" for t, p in self.assigned)
        out["rebalances"] = self.rebalances
        out["commit_failures"] = self.commit_failures
        out["buffered_rows"] = self.pipeline.buffered_rows if self.pipeline else 0
        out["rows_to_trader"] = self.rows_to_trader
        out["news_to_trader"] = self.news_to_trader
        return out


class _Rebalance(ConsumerRebalanceListener):
    """Flush and commit what is given up; recover what is taken over."""

    def __init__(self, owner: StreamConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        owner = self.owner
        if owner.pipeline is None or not revoked:
            return
        keys = {(tp.topic, tp.partition) for tp in revoked}
        await owner._settle()
        await owner._write(owner.pipeline.cut(only=keys))
        for topic, partition in keys:
            owner.pipeline.revoke(topic, partition)
        owner.assigned -= keys

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        owner = self.owner
        assert owner.pipeline is not None
        owner.rebalances += 1
        starts = {
            tp: await asyncio.to_thread(owner.pipeline.assign, tp.topic, tp.partition)
            for tp in assigned
        }
        for tp, start in starts.items():
            owner._consumer.seek(tp, start)
        # All at once: whoever watches ``assigned`` sees the whole assignment.
        owner.assigned |= {(tp.topic, tp.partition) for tp in assigned}
