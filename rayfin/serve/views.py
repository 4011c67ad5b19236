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
from typing import Any

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


def _next(offset: int, limit: int, fetched: int) -> int | None:
    return offset + limit if fetched > limit else None


class LedgerViews:
    """The API's reads of one ledger."""

    def __init__(self, ledger: Ledger, *, pnl_ttl_s: float = 1.0) -> None:
        self.ledger = ledger
        self.pnl_ttl_s = pnl_ttl_s
        self._pnl: dict[int, tuple[float, PnL]] = {}
        self._lock = threading.Lock()

    def decisions(
        self,
        symbol: str | None,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        offset: int,
        newest_first: bool,
    ) -> DecisionPage:
        # One row more than asked says whether another page follows.
        frame = self.ledger.decisions(
            symbol, start, end, limit + 1, offset, newest_first=newest_first
        )
        items = [DecisionRow(**row) for row in _records(frame.head(limit))]
        return DecisionPage(
            items=items, limit=limit, offset=offset, next_offset=_next(offset, limit, len(frame))
        )

    def orders(
        self,
        symbol: str | None,
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
        offset: int,
        newest_first: bool,
    ) -> OrderPage:
        frame = self.ledger.orders(symbol, start, end, limit + 1, offset, newest_first=newest_first)
        items = [OrderRow(**row) for row in _records(frame.head(limit))]
        return OrderPage(
            items=items, limit=limit, offset=offset, next_offset=_next(offset, limit, len(frame))
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
