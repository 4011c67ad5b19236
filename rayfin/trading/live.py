"""Live trading: the feature stream's tick rows traded by one engine, restartable exactly.

:class:`LiveTrader` is the end of the live pipeline. Feature consumers hand it each
micro-batch of tick-feature rows (:meth:`LiveTrader.on_features`); it drops rows it has
already traded (a consumer replaying after a crash sends some again), scores and trades
the rest through :class:`~rayfin.trading.engine.Trader`, the path backtests take, and
records the ledger batch together with a :class:`~rayfin.trading.ledger.TraderCheckpoint`
in one transaction. A restarted trader loads that checkpoint: positions, pending orders,
the risk state (a halt stays a halt), decision counts and the offsets it had reached, and
goes on as if it had never stopped.

One trader per account: every consumer of the group sends to the same one, so the
portfolio-level limits (open positions, total notional, drawdown) see every symbol. The
consumer waits for the trader to record a batch before its archive and its Kafka commit
move past those records (:class:`~rayfin.stream.consumer.StreamConsumer`), so a crash on
either side replays what the trader has not recorded, and the marks drop what it has.

News sentiment: consumers also hand it the scored news (:meth:`LiveTrader.on_news`, the
same marks rule), which goes into its :class:`~rayfin.features.sentiment.SentimentBook`;
:meth:`LiveTrader.on_features` fills each tick's ``sentiment`` input from the book at the
tick's event time. So a story counts for the ticks the trader trades after it arrived,
from its own time on. The book is part of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rayfin.errors import TradingError
from rayfin.features.sentiment import DEFAULT_HALF_LIFE_S, SentimentBook
from rayfin.trading.engine import Trader, TradingConfig, TradingEngine
from rayfin.trading.inputs import SENTIMENT
from rayfin.trading.ledger import Ledger, LedgerBatch, TraderCheckpoint
from rayfin.trading.scoring import Model

__all__ = ["DEFAULT_TRADER_NAME", "LiveTrader"]

DEFAULT_TRADER_NAME = "trader"
LIVE_CURVE_POINTS = 10_000
"""Equity samples a live engine keeps in memory; the ledger's fills hold the full curve."""

Rows = pd.DataFrame | Mapping[str, np.ndarray]


class LiveTrader:
    """A :class:`~rayfin.trading.engine.Trader` that records each batch with its checkpoint
    in ``ledger`` (see the module docstring) and starts from the one stored under
    ``name``, if any. ``config`` applies on a restart too: limits may change, state stays.
    ``half_life_s`` is the news sentiment's (:mod:`rayfin.features.sentiment`); a restart
    must keep it."""

    def __init__(
        self,
        model: Model,
        config: TradingConfig | None = None,
        ledger: Ledger | None = None,
        *,
        name: str = DEFAULT_TRADER_NAME,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
    ) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self.name = name
        checkpoint = self.ledger.checkpoint(name)
        if checkpoint is None:
            engine = TradingEngine(config, max_curve_points=LIVE_CURVE_POINTS)
            self.marks: dict[tuple[str, int], int] = {}
            self.records = 0
        else:
            engine = TradingEngine.restore(
                checkpoint.state, config, max_curve_points=LIVE_CURVE_POINTS
            )
            self.marks = dict(checkpoint.marks)
            self.records = checkpoint.records
        self.book = SentimentBook(half_life_s)
        if checkpoint is not None and checkpoint.sentiment:
            self.book = SentimentBook.restore(checkpoint.sentiment)
            if self.book.half_life_s != half_life_s:
                raise TradingError(
                    f"trader {name!r} decays sentiment with a half-life of "
                    f"{self.book.half_life_s:g} s, not {half_life_s:g} s: start a new trader "
                    "(another name or ledger) to change it"
                )
        self.restored = checkpoint is not None
        self.trader = Trader(model, engine)
        self.replayed = 0  # rows dropped because they were traded before
        self._saved = engine.snapshot()
        self._half_life_s = half_life_s
        self._saved_book = checkpoint.sentiment if checkpoint is not None else b""
        self._book_bytes: tuple[int, bytes] | None = None  # (book.changes, its snapshot)

    @property
    def engine(self) -> TradingEngine:
        return self.trader.engine

    def _fresh(self, topic: str, rows: Rows) -> tuple[np.ndarray, dict[tuple[str, int], int]]:
        """Which of ``rows`` (of ``topic``, in offset order per partition) are past the
        marks, and the marks once they are recorded."""
        for column in ("partition", "offset"):
            if column not in rows:
                raise TradingError(f"rows lack the column {column!r}")
        partitions = np.asarray(rows["partition"], dtype=np.int64)
        offsets = np.asarray(rows["offset"], dtype=np.int64)
        fresh = np.ones(len(offsets), dtype=bool)
        marks = dict(self.marks)
        for partition in np.unique(partitions).tolist():
            at = partitions == partition
            key = (topic, partition)
            mark = marks.get(key, -1)
            fresh &= ~at | (offsets > mark)
            marks[key] = max(mark, int(offsets[at].max()))
        if not fresh.all():
            self.replayed += int((~fresh).sum())
        return fresh, marks

    def on_features(self, topic: str, features: Rows) -> LedgerBatch:
        """Trade the rows of ``features`` (tick-feature rows of ``topic``, in offset order
        per partition) not traded before, with their ``sentiment`` from the book, and record
        them; returns the recorded batch."""
        fresh, marks = self._fresh(topic, features)
        if not fresh.all():
            features = _rows(features, fresh)
        features = self._with_sentiment(features)
        self.trader.topic = topic
        try:
            _, batch = self.trader.on_features(features)
            # Stories up to these ticks are settled: later ticks are not before them.
            self.book.advance_rows(np.asarray(features["symbol"]), np.asarray(features["ts"]))
            state, book = self.engine.snapshot(), self._book_state()
            records = self.records + int(fresh.sum())
            self.ledger.record(batch, TraderCheckpoint(self.name, marks, state, records, book))
        except BaseException:
            # Nothing was recorded: put the engine back, so a retry trades the same rows
            # from the same state and makes the same decisions.
            self.trader.engine = TradingEngine.restore(
                self._saved, self.engine.config, max_curve_points=LIVE_CURVE_POINTS
            )
            self._restore_book()
            raise
        self.marks, self.records, self._saved, self._saved_book = marks, records, state, book
        return batch

    def on_news(self, topic: str, news: Rows) -> int:
        """Add the scored stories of ``news`` (``ts``, ``symbols``, ``sentiment``,
        ``partition``, ``offset``: records of ``topic`` in offset order per partition) not
        added before to the book, and record the checkpoint; returns the stories added."""
        fresh, marks = self._fresh(topic, news)
        if not fresh.any():
            return 0
        ts = np.asarray(news["ts"], dtype=np.int64)[fresh]
        scores = np.asarray(news[SENTIMENT], dtype=np.float64)[fresh]
        symbols = [names for names, keep in zip(news["symbols"], fresh, strict=True) if keep]
        try:
            for story_ts, names, score in zip(ts.tolist(), symbols, scores.tolist(), strict=True):
                self.book.add(story_ts, [] if names is None else names, score)
            book = self._book_state()
            self.ledger.record(
                LedgerBatch(), TraderCheckpoint(self.name, marks, self._saved, self.records, book)
            )
        except BaseException:
            self._restore_book()  # nothing was recorded: a retry adds the same stories
            raise
        self.marks, self._saved_book = marks, book
        return len(ts)

    def _with_sentiment(self, features: Rows) -> Rows:
        """``features`` with the book's sentiment at each row's event time."""
        values = self.book.for_rows(np.asarray(features["symbol"]), np.asarray(features["ts"]))
        if isinstance(features, pd.DataFrame):
            return features.assign(**{SENTIMENT: values})
        return {**features, SENTIMENT: values}

    def _book_state(self) -> bytes:
        """The book as checkpoint bytes (none before any news), pickled again only when it
        changed."""
        if not self.book.stories:
            return b""
        if self._book_bytes is None or self._book_bytes[0] != self.book.changes:
            self._book_bytes = (self.book.changes, self.book.snapshot())
        return self._book_bytes[1]

    def _restore_book(self) -> None:
        """Back to the book last recorded."""
        saved = self._saved_book
        self.book = SentimentBook.restore(saved) if saved else SentimentBook(self._half_life_s)
        self._book_bytes = None

    def reset_risk(self, now_ns: int | None = None) -> None:
        """The operator's reset after a halt (:meth:`~rayfin.trading.risk.RiskManager.reset`),
        recorded with the risk event and a checkpoint. It is stamped ``now_ns``, by default
        the event time of the last tick traded, the clock everything else runs on."""
        engine = self.engine
        if now_ns is None:
            now_ns = max((p.ts for p in engine.portfolio.positions()), default=0)
        engine.risk.reset(engine.portfolio, now_ns)
        state = engine.snapshot()
        self.ledger.record(
            LedgerBatch(risk_events=engine.risk.new_events()),
            TraderCheckpoint(self.name, self.marks, state, self.records, self._saved_book),
        )
        self._saved = state

    def stats(self) -> dict[str, Any]:
        """Records traded, replays dropped, offsets reached, decisions by reason, risk
        state and P&L now."""
        engine = self.engine
        summary = engine.portfolio.summary()
        return {
            "name": self.name,
            "records": self.records,
            "replayed": self.replayed,
            "restored": self.restored,
            "news": self.book.stories,
            "marks": {f"{t}/{p}": o for (t, p), o in sorted(self.marks.items())},
            "outcomes": dict(engine.outcomes),
            "risk_state": engine.risk.state.value,
            "open_positions": engine.portfolio.open_symbols(),
            "realized_pnl": summary.realized_pnl,
            "unrealized_pnl": summary.unrealized_pnl,
            "equity": summary.equity,
            "drawdown": summary.drawdown,
        }


def _rows(features: Rows, keep: np.ndarray) -> Rows:
    if isinstance(features, pd.DataFrame):
        return features.loc[keep]
    return {name: np.asarray(values)[keep] for name, values in features.items()}
