"""Read-only views of the trading ledger for the API: pages of decisions and orders, the
positions, and P&L recomputed from the fills (:meth:`rayfin.trading.ledger.Ledger.pnl`).

P&L replays every fill, so it is cached for ``pnl_ttl_s``: a dashboard polling every
second from many browsers costs one replay per interval, not one per request.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from rayfin.serve.schemas import (
    DecisionPage,
    DecisionRow,
    EquityPoint,
    OrderPage,
    OrderRow,
    PnL,
    PositionRow,
    Positions,
)
from rayfin.trading.ledger import Ledger

Row = TypeVar("Row", DecisionRow, OrderRow)
P = TypeVar("P", DecisionPage, OrderPage)


def iso(ts_ns: int) -> dt.datetime:
    """An event time in ns as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(ts_ns / 1e9, tz=dt.UTC)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN and NA as None, numpy scalars as Python ones."""
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for row in rows:
        for key, value in row.items():
            if isinstance(value, np.generic):
                row[key] = value.item()
            if isinstance(row[key], float) and math.isnan(row[key]):
                row[key] = None
        if "ts" in row:
            row["time"] = iso(int(row["ts"]))
    return rows


@dataclass(frozen=True)
class PageQuery:
    """Which rows of a ledger table (``start <= ts < end``, of ``symbol``), and which page
    of them."""

    symbol: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    limit: int = 100
    offset: int = 0
    newest_first: bool = False


class LedgerViews:
    """The API's reads of one ledger."""

    def __init__(self, ledger: Ledger, *, pnl_ttl_s: float = 1.0) -> None:
        self.ledger = ledger
        self.pnl_ttl_s = pnl_ttl_s
        self._pnl: dict[int, tuple[float, PnL]] = {}
        self._lock = threading.Lock()

    def decisions(self, query: PageQuery) -> DecisionPage:
        return self._page(self.ledger.decisions, DecisionRow, DecisionPage, query)

    def orders(self, query: PageQuery) -> OrderPage:
        return self._page(self.ledger.orders, OrderRow, OrderPage, query)

    @staticmethod
    def _page(
        read: Callable[..., pd.DataFrame], row: type[Row], page: type[P], query: PageQuery
    ) -> P:
        # One row more than asked says whether another page follows.
        q = query
        frame = read(q.symbol, q.start, q.end, q.limit + 1, q.offset, newest_first=q.newest_first)
        return page(
            items=[row(**r) for r in _records(frame.head(q.limit))],
            limit=q.limit,
            offset=q.offset,
            next_offset=q.offset + q.limit if len(frame) > q.limit else None,
        )

    def positions(self) -> Positions:
        return Positions(items=[PositionRow(**row) for row in _records(self.ledger.positions())])

    def pnl(self, points: int) -> PnL:
        now = time.monotonic()
        with self._lock:
            cached = self._pnl.get(points)
            if cached is not None and now - cached[0] < self.pnl_ttl_s:
                return cached[1]
        stored = self.ledger.positions()
        marks = {
            row.symbol: float(row.last_price)
            for row in stored.itertuples()
            if row.last_price is not None and not pd.isna(row.last_price)
        }
        latest = int(stored["ts"].max()) if len(stored) else None
        result = self.ledger.pnl(marks, ts=latest)
        curve = result.equity_curve
        if len(curve) > points:
            keep = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
            curve = curve.iloc[keep]
        summary = result.summary
        out = PnL(
            realized_pnl=summary.realized_pnl,
            unrealized_pnl=summary.unrealized_pnl,
            fees=summary.fees,
            equity=summary.equity,
            peak_equity=summary.peak_equity,
            drawdown=summary.drawdown,
            open_positions=int((result.positions["quantity"] != 0).sum()),
            equity_curve=[
                EquityPoint(ts=int(ts), time=iso(int(ts)), equity=float(equity))
                for ts, equity in zip(curve["ts"], curve["equity"], strict=True)
            ],
        )
        with self._lock:
            self._pnl[points] = (now, out)
        return out
