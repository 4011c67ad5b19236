"""The trading ledger: decisions, orders, fills, positions and risk events in a database.

SQLite (the default, a file in the state dir) or PostgreSQL, through SQLAlchemy 2.0 Core.
Tables are created on first use; ``schema`` puts them in a PostgreSQL schema of their own.
Tables made by an older rayfin get the nullable columns added since (``decisions.sentiment``,
``trader_checkpoints.sentiment``) on first use too, by ``ALTER TABLE ... ADD COLUMN``: their
old rows read NULL there, and nothing has to be recreated.

Writes are idempotent: each row has a natural key from the Kafka record that caused it,
and inserts skip rows whose key is already stored (``INSERT ... ON CONFLICT DO NOTHING``
on both databases). So replaying a micro-batch after a crash writes nothing twice. Keys:

* ``decisions``: the source record (topic, partition, offset): one decision per signal;
* ``orders``: the order id, derived from (topic, partition, offset, purpose, symbol), which
  is also a unique constraint;
* ``fills``: the order id (an order fills once, whole);
* ``risk_events``: (ts, from_state, to_state, reason);
* ``positions``: one current row per symbol, upserted, and only by a snapshot at least as
  new as the stored one, so a replayed old batch cannot move a position back in time;
* ``trader_checkpoints``: one row per live trader, upserted with every batch it records:
  the last source offset it traded per partition and its engine state, so that a restarted
  trader goes on exactly where the ledger stops (see :mod:`rayfin.trading.live`).

:meth:`Ledger.record` writes a whole micro-batch in one transaction: it all lands or none
of it does. P&L (:meth:`Ledger.pnl`) is recomputed from the stored fills by replaying them
through :class:`~rayfin.trading.pnl.Portfolio`, so it agrees with the live portfolio by
construction. Fills are replayed in (ts, insertion) order, which is the order they were
applied in as long as each symbol's fills were recorded in the order they happened.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    inspect,
    select,
    text,
)

from rayfin.database import AUTO_ID, SqlStore
from rayfin.errors import TradingError
from rayfin.trading.orders import Decision, Fill, Instruments, Order, SourceKey
from rayfin.trading.pnl import DEFAULT_INITIAL_CASH, PnLSummary, Portfolio, Position
from rayfin.trading.risk import RiskEvent

__all__ = [
    "DECISION_COLUMNS",
    "Ledger",
    "LedgerBatch",
    "LedgerPnL",
    "TraderCheckpoint",
    "decision_row",
    "fill_row",
]


def _source_columns(nullable: bool = False) -> list[Column[Any]]:
    return [
        Column("source_topic", String, nullable=nullable),
        Column("source_partition", Integer, nullable=nullable),
        Column("source_offset", BigInteger, nullable=nullable),
    ]


class _Tables(NamedTuple):
    decisions: Table
    orders: Table
    fills: Table
    positions: Table
    risk_events: Table
    checkpoints: Table


def _tables(metadata: MetaData) -> _Tables:
    decisions = Table(
        "decisions",
        metadata,
        Column("seq", AUTO_ID, primary_key=True, autoincrement=True),
        Column("ts", BigInteger, nullable=False),
        Column("symbol", String, nullable=False),
        *_source_columns(),
        Column("price", Double, nullable=False),
        Column("p_down", Double, nullable=False),
        Column("p_flat", Double, nullable=False),
        Column("p_up", Double, nullable=False),
        Column("action", String, nullable=False),
        Column("order_id", String),
        Column("side", SmallInteger),
        Column("quantity", Integer),
        Column("purpose", String),
        Column("accepted", Boolean, nullable=False),
        Column("reason", String, nullable=False),
        Column("risk_state", String, nullable=False),
        # The news sentiment the model saw (NULL in rows recorded before rayfin kept it).
        Column("sentiment", Double),
        UniqueConstraint("source_topic", "source_partition", "source_offset"),
        Index(None, "symbol", "ts"),
        Index(None, "ts"),
    )
    orders = Table(
        "orders",
        metadata,
        Column("id", String, primary_key=True),
        Column("ts", BigInteger, nullable=False),
        Column("symbol", String, nullable=False),
        Column("side", SmallInteger, nullable=False),
        Column("quantity", Integer, nullable=False),
        Column("purpose", String, nullable=False),
        *_source_columns(),
        UniqueConstraint("source_topic", "source_partition", "source_offset", "purpose", "symbol"),
        Index(None, "symbol", "ts"),
        Index(None, "ts"),
    )
    fills = Table(
        "fills",
        metadata,
        Column("seq", AUTO_ID, primary_key=True, autoincrement=True),
        Column("order_id", String, nullable=False, unique=True),
        Column("ts", BigInteger, nullable=False),
        Column("symbol", String, nullable=False),
        Column("side", SmallInteger, nullable=False),
        Column("quantity", Integer, nullable=False),
        Column("price", Double, nullable=False),
        Column("fee", Double, nullable=False),
        *_source_columns(),
        Index(None, "symbol", "ts"),
        Index(None, "ts"),
    )
    positions = Table(
        "positions",
        metadata,
        Column("symbol", String, primary_key=True),
        Column("quantity", Integer, nullable=False),
        Column("avg_price", Double, nullable=False),
        Column("realized_pnl", Double, nullable=False),
        Column("fees", Double, nullable=False),
        Column("last_price", Double),
        Column("unrealized_pnl", Double, nullable=False),
        Column("ts", BigInteger, nullable=False),
    )
    risk_events = Table(
        "risk_events",
        metadata,
        Column("seq", AUTO_ID, primary_key=True, autoincrement=True),
        Column("ts", BigInteger, nullable=False),
        Column("from_state", String, nullable=False),
        Column("to_state", String, nullable=False),
        Column("reason", String, nullable=False),
        Column("equity", Double, nullable=False),
        Column("drawdown", Double, nullable=False),
        *_source_columns(nullable=True),
        UniqueConstraint("ts", "from_state", "to_state", "reason"),
    )
    checkpoints = Table(
        "trader_checkpoints",
        metadata,
        Column("name", String, primary_key=True),
        Column("marks", String, nullable=False),  # JSON: [[topic, partition, offset], ...]
        Column("state", LargeBinary, nullable=False),
        Column("records", BigInteger, nullable=False),
        Column("sentiment", LargeBinary),  # the trader's SentimentBook; NULL: no news yet
    )
    return _Tables(decisions, orders, fills, positions, risk_events, checkpoints)


DECISION_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in _tables(MetaData()).decisions.c if c.name != "seq"
)
"""The columns :meth:`Ledger.decisions` returns, those of :func:`decision_row`."""


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """What one micro-batch produced, written by :meth:`Ledger.record` in one transaction."""

    decisions: Sequence[Decision] = ()
    orders: Sequence[Order] = ()
    fills: Sequence[Fill] = ()
    positions: Sequence[Position] = ()
    risk_events: Sequence[RiskEvent] = ()


@dataclass(frozen=True, slots=True)
class TraderCheckpoint:
    """Where a live trader stands: the last source offset it traded per (topic, partition),
    its engine state (:meth:`~rayfin.trading.engine.TradingEngine.snapshot`), how many
    records it has traded in all, and its news sentiment
    (:meth:`~rayfin.features.sentiment.SentimentBook.snapshot`; empty before any news)."""

    name: str
    marks: Mapping[tuple[str, int], int]
    state: bytes
    records: int = 0
    sentiment: bytes = b""


@dataclass(frozen=True, slots=True)
class LedgerPnL:
    """P&L recomputed from the stored fills: the totals, every position (columns as
    :class:`~rayfin.trading.pnl.Position`) and the equity curve (``ts``, ``equity``)."""

    summary: PnLSummary
    positions: pd.DataFrame = field(repr=False)
    equity_curve: pd.DataFrame = field(repr=False)


def _source(key: SourceKey | None) -> dict[str, Any]:
    return {
        "source_topic": key.topic if key else None,
        "source_partition": key.partition if key else None,
        "source_offset": key.offset if key else None,
    }


def decision_row(d: Decision) -> dict[str, Any]:
    """A decision as a ``decisions`` row (also the backtest's decisions)."""
    order = d.order
    return {
        "ts": d.ts,
        "symbol": d.symbol,
        **_source(d.source),
        "price": d.price,
        "p_down": d.probs[0],
        "p_flat": d.probs[1],
        "p_up": d.probs[2],
        "action": d.action.value,
        "order_id": order.id if order else None,
        "side": int(order.side) if order else None,
        "quantity": order.quantity if order else None,
        "purpose": order.purpose.value if order else None,
        "accepted": d.accepted,
        "reason": d.reason,
        "risk_state": d.risk_state.value,
        "sentiment": d.sentiment,
    }


def _source_key(row: Mapping[str, Any]) -> SourceKey:
    return SourceKey(row["source_topic"], row["source_partition"], row["source_offset"])


def _order_row(o: Order) -> dict[str, Any]:
    return {
        "id": o.id,
        "ts": o.ts,
        "symbol": o.symbol,
        "side": int(o.side),
        "quantity": o.quantity,
        "purpose": o.purpose.value,
        **_source(o.source),
    }


def fill_row(f: Fill) -> dict[str, Any]:
    """A fill as a ``fills`` row (also the backtest's trades)."""
    return {
        "order_id": f.order_id,
        "ts": f.ts,
        "symbol": f.symbol,
        "side": int(f.side),
        "quantity": f.quantity,
        "price": f.price,
        "fee": f.fee,
        **_source(f.source),
    }


def _position_row(p: Position) -> dict[str, Any]:
    return {
        "symbol": p.symbol,
        "quantity": p.quantity,
        "avg_price": p.avg_price,
        "realized_pnl": p.realized_pnl,
        "fees": p.fees,
        "last_price": p.last_price,
        "unrealized_pnl": p.unrealized_pnl,
        "ts": p.ts,
    }


def _risk_event_row(e: RiskEvent) -> dict[str, Any]:
    return {
        "ts": e.ts,
        "from_state": e.from_state.value,
        "to_state": e.to_state.value,
        "reason": e.reason,
        "equity": e.equity,
        "drawdown": e.drawdown,
        **_source(e.source),
    }


def _ns(value: int | dt.datetime | None, what: str) -> int | None:
    """Event time in ns from an int of ns or a timezone-aware datetime."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise TradingError(f"{what}: give a timezone-aware datetime or int ns, got {value}")
        return pd.Timestamp(value).value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TradingError(f"{what}: expected int ns or a datetime, got {value!r}")


class Ledger(SqlStore):
    """The trading ledger in one database (see the module docstring).

    ``url`` is a SQLAlchemy URL, SQLite or PostgreSQL; None means the configured
    ``database.url`` (by default ``sqlite:///<state_dir>/rayfin.db``). ``schema`` (PostgreSQL
    only) keeps the tables in that schema, created if missing.
    """

    _error = TradingError
    _url_setting = "url"

    def __init__(self, url: str | None = None, *, schema: str | None = None) -> None:
        super().__init__(url, schema=schema)
        self._t = _tables(self._metadata)

    def _create_tables(self, conn: Connection) -> None:
        """Create the tables where missing, and add to old ones the columns they lack."""
        super()._create_tables(conn)
        self._add_new_columns(conn)

    def _add_new_columns(self, conn: Connection) -> None:
        """Add the columns a table made by an older rayfin lacks (all nullable)."""
        inspector = inspect(conn)
        quote = conn.dialect.identifier_preparer
        # PostgreSQL: another process may be doing the same right now.
        if_missing = "IF NOT EXISTS " if self._dialect == "postgresql" else ""
        for table in self._t:
            present = {c["name"] for c in inspector.get_columns(table.name, schema=self._schema)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise TradingError(
                        f"Ledger: table {table.name} lacks the column {column.name}, which "
                        "cannot be added to existing rows; use a new database or schema"
                    )
                conn.execute(
                    text(
                        f"ALTER TABLE {quote.format_table(table)} ADD COLUMN {if_missing}"
                        f"{quote.format_column(column)} {column.type.compile(conn.dialect)}"
                    )
                )

    # --- writes ----------------------------------------------------------------------------

    def record(self, batch: LedgerBatch, checkpoint: TraderCheckpoint | None = None) -> None:
        """Write ``batch`` in one transaction, skipping rows already stored; with the
        ``checkpoint`` of the trader that produced it, so the two never disagree."""
        t = self._t
        inserts = (
            (t.decisions, [decision_row(d) for d in batch.decisions]),
            (t.orders, [_order_row(o) for o in batch.orders]),
            (t.fills, [fill_row(f) for f in batch.fills]),
            (t.risk_events, [_risk_event_row(e) for e in batch.risk_events]),
        )
        # PostgreSQL refuses an upsert that touches one row twice: keep each symbol's newest.
        latest: dict[str, Position] = {}
        for p in batch.positions:
            if p.symbol not in latest or p.ts >= latest[p.symbol].ts:
                latest[p.symbol] = p
        with self._begin() as conn:
            for table, rows in inserts:
                if rows:
                    conn.execute(self._insert(table).on_conflict_do_nothing(), rows)
            if latest:
                stmt = self._insert(t.positions)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[t.positions.c.symbol],
                    set_={
                        c.name: stmt.excluded[c.name] for c in t.positions.c if c.name != "symbol"
                    },
                    where=t.positions.c.ts <= stmt.excluded.ts,
                )
                conn.execute(stmt, [_position_row(p) for p in latest.values()])
            if checkpoint is not None:
                self._save_checkpoint(conn, checkpoint)

    def _save_checkpoint(self, conn: Connection, checkpoint: TraderCheckpoint) -> None:
        t = self._t.checkpoints
        row = {
            "name": checkpoint.name,
            "marks": json.dumps(sorted([tp[0], tp[1], o] for tp, o in checkpoint.marks.items())),
            "state": checkpoint.state,
            "records": checkpoint.records,
            "sentiment": checkpoint.sentiment or None,
        }
        stmt = self._insert(t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.name], set_={k: stmt.excluded[k] for k in row if k != "name"}
        )
        conn.execute(stmt, row)

    def checkpoint(self, name: str) -> TraderCheckpoint | None:
        """The checkpoint trader ``name`` last recorded, or None if it never did."""
        t = self._t.checkpoints
        with self._begin() as conn:
            row = conn.execute(select(t).where(t.c.name == name)).mappings().first()
        if row is None:
            return None
        marks = {(topic, int(p)): int(o) for topic, p, o in json.loads(row["marks"])}
        sentiment = bytes(row["sentiment"]) if row["sentiment"] is not None else b""
        return TraderCheckpoint(name, marks, bytes(row["state"]), int(row["records"]), sentiment)

    def record_decision(self, decision: Decision) -> None:
        """:meth:`record` one decision, in its own transaction."""
        self.record(LedgerBatch(decisions=(decision,)))

    def record_order(self, order: Order) -> None:
        """:meth:`record` one order, in its own transaction."""
        self.record(LedgerBatch(orders=(order,)))

    def record_fill(self, fill: Fill) -> None:
        """:meth:`record` one fill, in its own transaction."""
        self.record(LedgerBatch(fills=(fill,)))

    def record_position(self, position: Position) -> None:
        """:meth:`record` one position, in its own transaction."""
        self.record(LedgerBatch(positions=(position,)))

    def record_risk_event(self, risk_event: RiskEvent) -> None:
        """:meth:`record` one risk event, in its own transaction."""
        self.record(LedgerBatch(risk_events=(risk_event,)))

    # --- reads -----------------------------------------------------------------------------

    def _query(
        self,
        table: Table,
        order_by: Sequence[str],
        symbol: str | None,
        start: int | dt.datetime | None,
        end: int | dt.datetime | None,
        limit: int | None,
        offset: int,
        newest_first: bool = False,
    ) -> pd.DataFrame:
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise TradingError(f"limit must be an int >= 0 or None, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise TradingError(f"offset must be an int >= 0, got {offset!r}")
        columns = [c for c in table.c if c.name != "seq"]
        query = select(*columns)
        if symbol is not None:
            query = query.where(table.c.symbol == symbol)
        if (start_ns := _ns(start, "start")) is not None:
            query = query.where(table.c.ts >= start_ns)
        if (end_ns := _ns(end, "end")) is not None:
            query = query.where(table.c.ts < end_ns)
        keys = [table.c[name] for name in order_by]
        query = query.order_by(*(key.desc() for key in keys) if newest_first else keys)
        return self._frame(query.limit(limit).offset(offset))

    def decisions(
        self,
        symbol: str | None = None,
        start: int | dt.datetime | None = None,
        end: int | dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
        *,
        newest_first: bool = False,
    ) -> pd.DataFrame:
        """Decisions with ``start <= ts < end`` (ns or aware datetimes), of ``symbol`` if
        given, oldest first (or ``newest_first``); ``limit`` and ``offset`` page through
        them."""
        return self._query(
            self._t.decisions, ("ts", "seq"), symbol, start, end, limit, offset, newest_first
        )

    def orders(
        self,
        symbol: str | None = None,
        start: int | dt.datetime | None = None,
        end: int | dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
        *,
        newest_first: bool = False,
    ) -> pd.DataFrame:
        """Orders, filtered, ordered and paged as :meth:`decisions`."""
        return self._query(
            self._t.orders, ("ts", "id"), symbol, start, end, limit, offset, newest_first
        )

    def fills(
        self,
        symbol: str | None = None,
        start: int | dt.datetime | None = None,
        end: int | dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> pd.DataFrame:
        """Fills, filtered and paged as :meth:`decisions`, in replay order."""
        return self._query(self._t.fills, ("ts", "seq"), symbol, start, end, limit, offset)

    def risk_events(
        self,
        start: int | dt.datetime | None = None,
        end: int | dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> pd.DataFrame:
        """Risk state changes, filtered and paged as :meth:`decisions`."""
        return self._query(self._t.risk_events, ("ts", "seq"), None, start, end, limit, offset)

    def positions(self) -> pd.DataFrame:
        """The current position of every symbol ever recorded, by symbol."""
        t = self._t.positions
        return self._frame(select(t).order_by(t.c.symbol))

    # --- P&L -------------------------------------------------------------------------------

    def portfolio(
        self,
        initial_cash: float = DEFAULT_INITIAL_CASH,
        instruments: Instruments | None = None,
    ) -> Portfolio:
        """A :class:`Portfolio` rebuilt by applying every stored fill, in replay order: how
        a restarted pipeline recovers its positions."""
        portfolio = Portfolio(initial_cash, instruments)
        t = self._t.fills
        query = select(t).order_by(t.c.ts, t.c.seq)
        with self._begin() as conn:
            for row in conn.execute(query).mappings():
                portfolio.apply(
                    Fill(
                        order_id=row["order_id"],
                        symbol=row["symbol"],
                        side=row["side"],
                        quantity=row["quantity"],
                        price=row["price"],
                        fee=row["fee"],
                        ts=row["ts"],
                        source=_source_key(row),
                    )
                )
        return portfolio

    def pnl(
        self,
        marks: Mapping[str, float] | None = None,
        *,
        initial_cash: float = DEFAULT_INITIAL_CASH,
        instruments: Instruments | None = None,
        ts: int | None = None,
    ) -> LedgerPnL:
        """Realized, unrealized and equity from the stored fills. Open positions are
        valued at ``marks`` where given (at event time ``ts``, default the last fill's),
        else at their last fill price."""
        portfolio = self.portfolio(initial_cash, instruments)
        if marks:
            curve = portfolio.equity_curve
            mark_ts = ts if ts is not None else (curve[-1][0] if curve else 0)
            for symbol in sorted(marks):
                portfolio.mark(symbol, marks[symbol], mark_ts)
        positions = pd.DataFrame(
            [_position_row(p) for p in portfolio.positions()],
            columns=list(self._t.positions.c.keys()),
        )
        curve_frame = pd.DataFrame(portfolio.equity_curve, columns=["ts", "equity"])
        return LedgerPnL(portfolio.summary(), positions, curve_frame)
