"""The ledger on SQLite and PostgreSQL: idempotent replay, P&L from stored fills, queries."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rayfin.errors import TradingError
from rayfin.trading.engine import TradingConfig, TradingEngine
from rayfin.trading.ledger import Ledger, LedgerBatch
from rayfin.trading.orders import Signal, SourceKey
from rayfin.trading.pnl import Portfolio
from rayfin.trading.risk import RiskLimits
from rayfin.trading.strategy import StrategyConfig

T0 = 1_704_205_800 * 10**9
SYMBOLS = {"ES": (4000.0, 0), "NQ": (15000.0, 1)}  # start price, partition


@dataclass
class Session:
    """What a run of the trading chain produced: micro-batches and the live state."""

    batches: list[LedgerBatch] = field(default_factory=list)
    portfolio: Portfolio = field(default_factory=Portfolio)
    prices: dict[str, float] = field(default_factory=dict)
    last_ts: int = 0


def run_session(ticks: int = 600, batch_size: int = 50, seed: int = 10) -> Session:
    """Drive ticks through the trading engine (strategy → risk → broker → portfolio), a
    ledger batch per micro-batch as the live path cuts them. Prices walk on the 0.25
    grid; probabilities are seeded."""
    rng = random.Random(seed)
    engine = TradingEngine(
        TradingConfig(
            strategy=StrategyConfig(threshold=0.6, max_quantity=3, scale_by_confidence=True),
            limits=RiskLimits(
                stop_loss=8.0,
                take_profit=12.0,
                max_notional_total=2_500_000.0,
                max_orders=3,
                reduce_drawdown=0.002,
                resume_drawdown=0.0015,
                max_drawdown=0.5,
            ),
            initial_cash=1_000_000.0,
            record_holds=True,
        )
    )
    session = Session(portfolio=engine.portfolio)
    prices = {s: p for s, (p, _) in SYMBOLS.items()}
    offsets = dict.fromkeys(SYMBOLS, 0)
    ts = T0
    signals: list[Signal] = []
    for i in range(ticks):
        symbol = rng.choice(list(SYMBOLS))
        prices[symbol] += 0.25 * rng.randint(-6, 6)
        ts += rng.randint(1, 400_000_000)
        source = SourceKey("ticks", SYMBOLS[symbol][1], offsets[symbol])
        offsets[symbol] += 1
        weights = [rng.random() ** 3 for _ in range(3)]
        probs = tuple(w / sum(weights) for w in weights)
        signals.append(Signal(symbol, ts, prices[symbol], probs, source))  # type: ignore[arg-type]
        if (i + 1) % batch_size == 0 or i + 1 == ticks:
            session.batches.append(engine.on_signals(signals))
            signals = []
    session.prices = prices
    session.last_ts = ts
    return session


@pytest.fixture(scope="module")
def session() -> Session:
    return run_session()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A fresh ledger: a SQLite file, or a schema of its own in the local PostgreSQL."""
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_ledger")
        return
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as fresh:
        yield fresh


def _counts(ledger: Ledger) -> dict[str, int]:
    return {
        "decisions": len(ledger.decisions()),
        "orders": len(ledger.orders()),
        "fills": len(ledger.fills()),
        "positions": len(ledger.positions()),
        "risk_events": len(ledger.risk_events()),
    }


def test_the_session_exercises_every_table(session: Session) -> None:
    """Guards the other tests against a scenario that stopped producing what they check."""
    totals = {
        name: sum(len(getattr(b, name)) for b in session.batches)
        for name in ("decisions", "orders", "fills", "risk_events")
    }
    assert totals["decisions"] == 600
    assert totals["fills"] >= 20
    assert totals["risk_events"] >= 3
    reasons = {d.reason for b in session.batches for d in b.decisions}
    assert {
        "accepted",
        "below_threshold",
        "same_direction",
        "reducing_only",
        "rate_limited",
    } <= reasons
    purposes = {o.purpose.value for b in session.batches for o in b.orders}
    assert {"entry", "stop_loss", "take_profit"} <= purposes


def test_replaying_batches_writes_nothing_twice(ledger: Ledger, session: Session) -> None:
    for batch in session.batches:
        ledger.record(batch)
    first = _counts(ledger)
    expected = {
        name: sum(len(getattr(b, name)) for b in session.batches)
        for name in ("decisions", "orders", "fills", "risk_events")
    }
    assert first == expected | {"positions": 2}
    fills_before = ledger.fills()
    positions_before = ledger.positions()

    # A crash after batch 5 was written but before its offsets were committed: the
    # pipeline re-reads from batch 3 on, and everything is written a second time.
    for batch in session.batches[3:]:
        ledger.record(batch)
    for batch in session.batches:
        ledger.record(batch)
    assert _counts(ledger) == first
    assert ledger.fills().equals(fills_before)
    # Old snapshots replayed last did not move the positions back in time.
    assert ledger.positions().equals(positions_before)

    live = {p.symbol: p for p in session.portfolio.positions()}
    for row in ledger.positions().itertuples():
        assert row.quantity == live[row.symbol].quantity
        assert row.avg_price == live[row.symbol].avg_price
        assert row.ts == live[row.symbol].ts


def test_pnl_from_stored_fills_matches_the_portfolio(ledger: Ledger, session: Session) -> None:
    for batch in session.batches:
        ledger.record(batch)
    live = session.portfolio
    report = ledger.pnl(session.prices, initial_cash=live.initial_cash, ts=session.last_ts)
    assert report.summary.realized_pnl == pytest.approx(live.realized_pnl, rel=1e-12, abs=1e-9)
    assert report.summary.fees == pytest.approx(live.fees, rel=1e-12)
    assert report.summary.unrealized_pnl == pytest.approx(live.unrealized_pnl, abs=1e-9)
    assert report.summary.equity == pytest.approx(live.equity, rel=1e-12)
    assert live.realized_pnl != 0.0

    fills = ledger.fills()
    curve = report.equity_curve
    assert list(curve.columns) == ["ts", "equity"]
    assert len(curve) == len(fills) + len(session.prices)  # a point per fill, per mark
    assert curve["ts"].is_monotonic_increasing
    assert curve["equity"].iloc[-1] == pytest.approx(live.equity, rel=1e-12)
    by_symbol = report.positions.set_index("symbol")
    for position in live.positions():
        assert by_symbol.loc[position.symbol, "quantity"] == position.quantity
        assert by_symbol.loc[position.symbol, "realized_pnl"] == pytest.approx(
            position.realized_pnl, rel=1e-12, abs=1e-9
        )


def test_queries_filter_by_symbol_and_time_and_page(ledger: Ledger, session: Session) -> None:
    for batch in session.batches:
        ledger.record(batch)
    decisions = ledger.decisions()
    assert decisions["ts"].is_monotonic_increasing
    assert set(decisions["symbol"]) == {"ES", "NQ"}

    es = ledger.decisions(symbol="ES")
    assert len(es) == (decisions["symbol"] == "ES").sum()
    assert set(es["symbol"]) == {"ES"}
    assert set(es["source_partition"]) == {0}

    start, end = int(decisions["ts"].iloc[100]), int(decisions["ts"].iloc[200])
    window = ledger.decisions(start=start, end=end)
    assert len(window) == 100  # start inclusive, end exclusive; ticks have distinct ts
    assert window["ts"].min() == start
    assert window["ts"].max() < end
    as_datetimes = ledger.decisions(
        start=dt.datetime.fromtimestamp(start / 1e9, dt.UTC).replace(microsecond=0),
        end=dt.datetime.fromtimestamp(end / 1e9 + 1, dt.UTC).replace(microsecond=0),
    )
    assert len(as_datetimes) >= 100

    nq = ledger.decisions(symbol="NQ")
    pages = [ledger.decisions(symbol="NQ", limit=70, offset=o) for o in range(0, len(nq), 70)]
    assert all(len(page) == 70 for page in pages[:-1])
    assert 0 < len(pages[-1]) <= 70
    assert [t for page in pages for t in page["ts"]] == list(nq["ts"])
    assert ledger.decisions(symbol="NQ", limit=5, offset=len(nq)).empty

    es_fills = ledger.fills(symbol="ES", limit=3)
    assert len(es_fills) == 3
    assert set(es_fills["symbol"]) == {"ES"}
    assert ledger.fills(start=session.last_ts + 1).empty
    assert len(ledger.orders(symbol="NQ")) == sum(
        1 for b in session.batches for o in b.orders if o.symbol == "NQ"
    )
    events = ledger.risk_events()
    assert set(events["reason"]) <= {"reduce_drawdown", "drawdown_recovered", "max_drawdown"}
    assert len(ledger.risk_events(limit=1, offset=1)) == 1


def test_single_record_methods_are_idempotent_too(ledger: Ledger, session: Session) -> None:
    batch = next(b for b in session.batches if b.fills and b.risk_events)
    for _ in range(2):
        ledger.record_decision(batch.decisions[0])
        ledger.record_order(batch.orders[0])
        ledger.record_fill(batch.fills[0])
        ledger.record_position(batch.positions[0])
        ledger.record_risk_event(batch.risk_events[0])
    assert _counts(ledger) == dict.fromkeys(
        ("decisions", "orders", "fills", "positions", "risk_events"), 1
    )


def test_bad_queries_and_urls_are_refused(tmp_path: Path) -> None:
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        with pytest.raises(TradingError, match="timezone-aware"):
            ledger.decisions(start=dt.datetime(2024, 1, 2))
        with pytest.raises(TradingError, match="limit"):
            ledger.fills(limit=-1)
        with pytest.raises(TradingError, match="offset"):
            ledger.orders(offset=-5)
    with pytest.raises(TradingError, match="PostgreSQL only"):
        Ledger(f"sqlite:///{tmp_path / 'l.db'}", schema="x")
    with pytest.raises(TradingError, match="SQLite or PostgreSQL"):
        Ledger("mysql://u@localhost/db")
    with pytest.raises(TradingError, match="not a database URL"):
        Ledger("not a url")


def test_default_ledger_lives_in_the_state_dir(isolated_state: Path, session: Session) -> None:
    with Ledger() as ledger:
        ledger.record(session.batches[0])
        assert len(ledger.decisions()) == len(session.batches[0].decisions)
    assert (isolated_state / "rayfin.db").is_file()
