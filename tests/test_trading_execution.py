"""Simulated execution (next tick, slippage, fees) and portfolio P&L on hand-computed cases."""

from __future__ import annotations

import pytest

from rayfin.errors import ConfigError, TradingError
from rayfin.trading.execution import FeeModel, SimulatedBroker, SlippageModel
from rayfin.trading.orders import Fill, Instrument, Instruments, Order, Purpose, Side, SourceKey
from rayfin.trading.pnl import Portfolio

T0 = 1_704_205_800 * 10**9


def order(symbol: str, side: Side, quantity: int, ts: int, offset: int = 1) -> Order:
    return Order.create(symbol, side, quantity, ts, Purpose.ENTRY, SourceKey("ticks", 0, offset))


def fill(side: Side, quantity: int, price: float, ts: int, fee: float = 0.0) -> Fill:
    o = order("ES", side, quantity, ts - 1, offset=ts)
    return Fill(o.id, "ES", side, quantity, price, fee, ts, o.source)


# --- execution -------------------------------------------------------------------------------


def test_orders_fill_at_the_next_tick_of_their_symbol_with_slippage_and_fees() -> None:
    broker = SimulatedBroker()
    buy = order("ES", Side.BUY, 2, T0 + 10)
    broker.submit(buy)
    assert broker.pending_quantity("ES") == 2
    assert broker.on_tick("ES", T0 + 10, 4000.0) == []  # the tick that made the order
    assert broker.on_tick("NQ", T0 + 11, 15000.0) == []  # another symbol's tick
    [f] = broker.on_tick("ES", T0 + 12, 4001.0)
    assert (f.order_id, f.side, f.quantity, f.ts) == (buy.id, Side.BUY, 2, T0 + 12)
    assert f.price == 4001.25  # one 0.25 tick against the buyer
    assert f.fee == 4.5  # 2 contracts × 2.25
    assert f.source == buy.source
    assert broker.pending() == []
    assert broker.on_tick("ES", T0 + 13, 4001.0) == []


def test_fills_keep_submission_order_and_size_adds_slippage() -> None:
    broker = SimulatedBroker(
        fees=FeeModel(per_contract=2.25, per_symbol={"MES": 0.62}),
        slippage=SlippageModel(ticks=1, contracts_per_extra_tick=5),
    )
    big = order("ES", Side.SELL, 10, T0, offset=1)
    small = order("ES", Side.BUY, 1, T0, offset=2)
    micro = order("MES", Side.BUY, 4, T0, offset=3)
    for o in (big, small, micro):
        broker.submit(o)
    fills = broker.on_tick("ES", T0 + 1, 4000.0)
    assert [(f.order_id, f.price, f.fee) for f in fills] == [
        (big.id, 4000.0 - 3 * 0.25, 22.5),  # 1 tick + 10 // 5 extra
        (small.id, 4000.25, 2.25),
    ]
    [mes] = broker.on_tick("MES", T0 + 1, 4000.0)
    assert mes.fee == pytest.approx(4 * 0.62)


def test_broker_refuses_duplicates_and_unknown_instruments() -> None:
    broker = SimulatedBroker()
    o = order("ES", Side.BUY, 1, T0)
    broker.submit(o)
    with pytest.raises(TradingError, match="already pending"):
        broker.submit(o)
    assert broker.cancel(o.id) == o
    assert broker.cancel(o.id) is None
    with pytest.raises(TradingError, match="unknown instrument 'ABC'"):
        broker.submit(order("ABC", Side.BUY, 1, T0))

    # Accepting any symbol on stated terms, as the synthetic equity market needs.
    equities = SimulatedBroker(Instruments((), default_tick_size=0.01))
    equities.submit(order("ABC", Side.SELL, 100, T0))
    [f] = equities.on_tick("ABC", T0 + 1, 25.0)
    assert f.price == pytest.approx(24.99)


def test_bad_execution_parameters_are_refused() -> None:
    with pytest.raises(ConfigError):
        FeeModel(per_contract=-1.0)
    with pytest.raises(ConfigError):
        SlippageModel(ticks=-1)
    with pytest.raises(ConfigError):
        SlippageModel(contracts_per_extra_tick=0)
    with pytest.raises(TradingError):
        Instrument("ES", 0.0, 50.0)
    with pytest.raises(TradingError, match="twice"):
        Instruments([Instrument("ES", 0.25, 50.0), Instrument("ES", 0.25, 50.0)])


# --- portfolio -------------------------------------------------------------------------------


def test_adds_average_the_entry_and_partial_closes_realize() -> None:
    portfolio = Portfolio(1_000_000.0)
    portfolio.apply(fill(Side.BUY, 2, 4000.0, T0 + 1, fee=4.5))
    portfolio.apply(fill(Side.BUY, 1, 4003.0, T0 + 2, fee=2.25))
    position = portfolio.position("ES")
    assert (position.quantity, position.avg_price) == (3, 4001.0)

    portfolio.apply(fill(Side.SELL, 2, 4005.0, T0 + 3, fee=4.5))  # 2 × 4 points × 50
    position = portfolio.position("ES")
    assert (position.quantity, position.avg_price) == (1, 4001.0)
    assert portfolio.fees == 11.25
    assert portfolio.realized_pnl == 400.0 - 11.25

    portfolio.mark("ES", 4011.0, T0 + 4)  # 1 × 10 points × 50
    assert portfolio.unrealized_pnl == 500.0
    assert portfolio.equity == 1_000_000.0 + 400.0 - 11.25 + 500.0


def test_reversal_closes_then_opens_at_the_fill_price() -> None:
    portfolio = Portfolio(1_000_000.0)
    portfolio.apply(fill(Side.BUY, 1, 4001.0, T0 + 1))
    portfolio.apply(fill(Side.SELL, 3, 4000.0, T0 + 2, fee=6.75))  # close 1 at -1, short 2
    position = portfolio.position("ES")
    assert (position.quantity, position.avg_price) == (-2, 4000.0)
    assert portfolio.realized_pnl == -50.0 - 6.75

    portfolio.mark("ES", 3990.0, T0 + 3)  # short 2 × 10 points × 50
    assert portfolio.unrealized_pnl == 1000.0
    portfolio.apply(fill(Side.BUY, 2, 3990.0, T0 + 4))
    assert portfolio.position("ES").quantity == 0
    assert portfolio.position("ES").avg_price == 0.0
    assert portfolio.realized_pnl == -50.0 - 6.75 + 1000.0
    assert portfolio.unrealized_pnl == 0.0
    assert portfolio.open_symbols() == []


def test_short_adds_and_covers() -> None:
    portfolio = Portfolio(1_000_000.0)
    portfolio.apply(fill(Side.SELL, 1, 4000.0, T0 + 1))
    portfolio.apply(fill(Side.SELL, 1, 4002.0, T0 + 2))
    assert portfolio.position("ES").avg_price == 4001.0
    portfolio.apply(fill(Side.BUY, 1, 3999.0, T0 + 3))  # +2 points on one
    assert portfolio.realized_pnl == 100.0
    assert portfolio.position("ES").quantity == -1


def test_equity_curve_peak_and_drawdown() -> None:
    portfolio = Portfolio(100_000.0)
    portfolio.apply(fill(Side.BUY, 1, 4000.0, T0 + 1))
    portfolio.mark("ES", 4040.0, T0 + 2)  # +2,000
    portfolio.mark("ES", 3980.0, T0 + 3)  # -1,000
    assert portfolio.equity_curve == [
        (T0 + 1, 100_000.0),
        (T0 + 2, 102_000.0),
        (T0 + 3, 99_000.0),
    ]
    assert portfolio.peak_equity == 102_000.0
    assert portfolio.drawdown == pytest.approx(3_000 / 102_000)
    assert portfolio.equity_at({"ES": 4040.0}) == 102_000.0
    assert portfolio.equity == 99_000.0  # equity_at stores nothing
    summary = portfolio.summary()
    assert (summary.equity, summary.peak_equity) == (99_000.0, 102_000.0)

    bounded = Portfolio(100_000.0, max_curve_points=2)
    for i in range(5):
        bounded.mark("ES", 4000.0 + i, T0 + i)
    assert [ts for ts, _ in bounded.equity_curve] == [T0 + 3, T0 + 4]


def test_portfolio_refuses_bad_input() -> None:
    with pytest.raises(TradingError):
        Portfolio(0.0)
    portfolio = Portfolio()
    with pytest.raises(TradingError):
        portfolio.mark("ES", float("nan"), T0)
    with pytest.raises(TradingError, match="unknown instrument"):
        portfolio.mark("XYZ", 10.0, T0)
