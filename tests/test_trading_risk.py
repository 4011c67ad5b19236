"""The threshold strategy and the risk manager: each rule on its own, with its reason."""

from __future__ import annotations

import pytest

from rayfin.errors import ConfigError, TradingError
from rayfin.trading.orders import (
    ACCEPTED,
    BELOW_THRESHOLD,
    DRAWDOWN_RECOVERED,
    HALTED,
    MANUAL_RESET,
    MAX_DRAWDOWN,
    MAX_NOTIONAL_SYMBOL,
    MAX_NOTIONAL_TOTAL,
    MAX_OPEN_POSITIONS,
    RATE_LIMITED,
    REDUCE_DRAWDOWN,
    REDUCING_ONLY,
    SAME_DIRECTION,
    Action,
    Decision,
    Fill,
    Order,
    Purpose,
    Side,
    Signal,
    SourceKey,
)
from rayfin.trading.pnl import Portfolio
from rayfin.trading.risk import RiskCheck, RiskLimits, RiskManager, RiskState
from rayfin.trading.strategy import Proposal, StrategyConfig, ThresholdStrategy

T0 = 1_704_205_800 * 10**9
SECOND = 10**9
# Limits off unless a test turns one on, so each test exercises exactly one rule.
NO_LIMITS = RiskLimits(reduce_drawdown=None, max_drawdown=None, max_orders=None)


def src(offset: int, topic: str = "ticks", partition: int = 0) -> SourceKey:
    return SourceKey(topic, partition, offset)


def signal(probs: tuple[float, float, float], symbol: str = "ES", offset: int = 1) -> Signal:
    return Signal(symbol, T0 + offset, 4000.0, probs, src(offset))


def order(symbol: str, side: Side, quantity: int, offset: int = 100) -> Order:
    return Order.create(symbol, side, quantity, T0 + offset, Purpose.ENTRY, src(offset))


def fill(symbol: str, side: Side, quantity: int, price: float, offset: int = 0) -> Fill:
    o = Order.create(symbol, side, quantity, T0 + offset, Purpose.ENTRY, src(offset, "setup"))
    return Fill(o.id, symbol, side, quantity, price, 0.0, T0 + offset + 1, o.source)


def portfolio_with(*fills: Fill, cash: float = 1_000_000.0) -> Portfolio:
    portfolio = Portfolio(cash)
    for f in fills:
        portfolio.apply(f)
    return portfolio


def manager(**limits: object) -> RiskManager:
    base = {"reduce_drawdown": None, "max_drawdown": None, "max_orders": None}
    return RiskManager(RiskLimits(**(base | limits)))


# --- strategy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ((0.2, 0.2, 0.6), None),
        ((0.1, 0.2, 0.7), Side.BUY),
        ((0.7, 0.2, 0.1), Side.SELL),
        ((0.3, 0.7, 0.0), None),  # a confident "flat" is not a trade
        ((0.5, 0.0, 0.5), None),
    ],
)
def test_threshold_picks_the_side(probs: tuple[float, float, float], expected: Side | None) -> None:
    proposal = ThresholdStrategy().decide(signal(probs), 0)
    if expected is None:
        assert proposal == Proposal(None, BELOW_THRESHOLD)
    else:
        assert proposal.order is not None
        assert proposal.order.side is expected
        assert proposal.order.quantity == 1
        assert proposal.order.purpose is Purpose.ENTRY


def test_confidence_scaling_is_linear_from_base_to_max() -> None:
    strategy = ThresholdStrategy(
        StrategyConfig(threshold=0.7, base_quantity=1, max_quantity=5, scale_by_confidence=True)
    )
    assert [strategy.size(p) for p in (0.7, 0.775, 0.85, 0.999, 1.0)] == [1, 2, 3, 4, 5]
    proposal = strategy.decide(signal((0.0, 0.15, 0.85)), 0)
    assert proposal.order is not None
    assert proposal.order.quantity == 3


def test_positioned_same_way_holds_scales_in_or_trims() -> None:
    up = signal((0.0, 0.1, 0.9))
    assert ThresholdStrategy().decide(up, 1) == Proposal(None, SAME_DIRECTION)

    scaling = ThresholdStrategy(StrategyConfig(base_quantity=3, max_quantity=5, scale_in=True))
    top_up = scaling.decide(up, 1).order
    assert top_up is not None
    assert (top_up.side, top_up.quantity, top_up.purpose) == (Side.BUY, 2, Purpose.ENTRY)
    assert scaling.decide(up, 3) == Proposal(None, SAME_DIRECTION)

    trim = scaling.decide(up, 8).order  # max_quantity was lowered below the position
    assert trim is not None
    assert (trim.side, trim.quantity, trim.purpose) == (Side.SELL, 3, Purpose.REDUCE)


def test_opposite_signal_reverses_or_exits() -> None:
    down = signal((0.8, 0.1, 0.1))
    reverse = ThresholdStrategy(StrategyConfig(base_quantity=2)).decide(down, 3).order
    assert reverse is not None
    assert (reverse.side, reverse.quantity, reverse.purpose) == (Side.SELL, 5, Purpose.ENTRY)

    exit_ = ThresholdStrategy(StrategyConfig(on_opposite="exit")).decide(down, 3).order
    assert exit_ is not None
    assert (exit_.side, exit_.quantity, exit_.purpose) == (Side.SELL, 3, Purpose.EXIT)


def test_order_ids_are_deterministic_per_source_purpose_and_symbol() -> None:
    strategy = ThresholdStrategy()
    first = strategy.decide(signal((0.0, 0.1, 0.9), offset=7), 0).order
    again = strategy.decide(signal((0.0, 0.1, 0.9), offset=7), 0).order
    assert first is not None
    assert again is not None
    assert first.id == again.id == "ticks:0:7:entry:ES"
    assert Order.create("ES", Side.SELL, 1, T0, "stop_loss", src(7)).id != first.id
    with pytest.raises(TradingError, match="does not match"):
        Order("made-up", "ES", Side.BUY, 1, T0, Purpose.ENTRY, src(7))


@pytest.mark.parametrize(
    "config",
    [
        {"threshold": 0.5},
        {"threshold": 1.2},
        {"base_quantity": 0},
        {"base_quantity": 3, "max_quantity": 2},
        {"on_opposite": "flip"},
    ],
)
def test_bad_strategy_config_is_refused(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StrategyConfig(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "probs", [(0.5, 0.5), (0.2, 0.2, 0.2), (-0.1, 0.1, 1.0), (float("nan"), 0.5, 0.5)]
)
def test_bad_signal_is_refused(probs: tuple[float, ...]) -> None:
    with pytest.raises(TradingError, match="probs"):
        Signal("ES", T0, 4000.0, probs, src(1))  # type: ignore[arg-type]


# --- decisions -------------------------------------------------------------------------------


def test_decisions_carry_reasons_from_the_vocabulary() -> None:
    sig = signal((0.0, 0.1, 0.9))
    buy = Order.create("ES", Side.BUY, 1, sig.ts, Purpose.ENTRY, sig.source)
    accepted = Decision.checked(sig, buy, None, RiskState.ACTIVE)
    assert (accepted.action, accepted.accepted, accepted.reason) == (Action.BUY, True, ACCEPTED)
    refused = Decision.checked(sig, buy, HALTED, RiskState.HALTED)
    assert (refused.accepted, refused.reason) == (False, HALTED)
    held = Decision.hold(sig, BELOW_THRESHOLD, RiskState.ACTIVE)
    assert (held.action, held.order, held.accepted) == (Action.HOLD, None, False)
    with pytest.raises(TradingError):
        Decision.hold(sig, "felt_like_it", RiskState.ACTIVE)
    with pytest.raises(TradingError):
        Decision.checked(sig, buy, "felt_like_it", RiskState.ACTIVE)
    with pytest.raises(TradingError):
        RiskCheck(False, None)


# --- pre-trade limits ------------------------------------------------------------------------


def test_max_open_positions_counts_positions_and_pending_orders() -> None:
    risk = manager(max_open_positions=1)
    portfolio = portfolio_with(fill("ES", Side.BUY, 1, 4000.0))
    nq = order("NQ", Side.BUY, 1)
    assert risk.check(nq, portfolio, 15000.0, T0) == RiskCheck(False, MAX_OPEN_POSITIONS)
    # Adding to or reversing the open position opens no new one.
    assert risk.check(order("ES", Side.BUY, 1), portfolio, 4000.0, T0).accepted
    assert risk.check(order("ES", Side.SELL, 3), portfolio, 4000.0, T0).accepted

    flat = Portfolio()
    pending = [order("ES", Side.BUY, 1, offset=5)]
    assert risk.check(nq, flat, 15000.0, T0, pending) == RiskCheck(False, MAX_OPEN_POSITIONS)
    assert risk.check(nq, flat, 15000.0, T0).accepted


def test_max_notional_per_symbol() -> None:
    risk = manager(max_notional_per_symbol=300_000.0)  # one ES at 4000 is 200,000
    flat = Portfolio()
    assert risk.check(order("ES", Side.BUY, 1), flat, 4000.0, T0).accepted
    assert risk.check(order("ES", Side.BUY, 2), flat, 4000.0, T0) == RiskCheck(
        False, MAX_NOTIONAL_SYMBOL
    )
    long_one = portfolio_with(fill("ES", Side.BUY, 1, 4000.0))
    assert risk.check(order("ES", Side.BUY, 1), long_one, 4000.0, T0).reason == (
        MAX_NOTIONAL_SYMBOL
    )
    # Reducing is always allowed, even when the price makes the position too big.
    assert risk.check(order("ES", Side.SELL, 1), long_one, 9000.0, T0).accepted


def test_max_notional_total_values_other_symbols_at_their_marks() -> None:
    portfolio = portfolio_with(fill("ES", Side.BUY, 1, 4000.0))  # 200,000
    portfolio.mark("ES", 4000.0, T0 + 5)
    nq = order("NQ", Side.SELL, 1)  # 15,000 × 20 = 300,000
    tight = manager(max_notional_total=450_000.0)
    assert tight.check(nq, portfolio, 15000.0, T0) == RiskCheck(False, MAX_NOTIONAL_TOTAL)
    assert manager(max_notional_total=600_000.0).check(nq, portfolio, 15000.0, T0).accepted
    portfolio.mark("ES", 2000.0, T0 + 6)  # ES now counts 100,000
    assert tight.check(nq, portfolio, 15000.0, T0).accepted


def test_rate_limit_counts_accepted_orders_in_a_rolling_event_time_window() -> None:
    risk = manager(max_orders=2, rate_window_ns=SECOND)
    flat = Portfolio()
    es = order("ES", Side.BUY, 1)
    assert risk.check(es, flat, 4000.0, T0).accepted
    assert risk.check(es, flat, 4000.0, T0 + SECOND // 2).accepted
    assert risk.check(es, flat, 4000.0, T0 + SECOND - 1) == RiskCheck(False, RATE_LIMITED)
    # The first order leaves the window (now - 1 s, now] exactly one second later.
    assert risk.check(es, flat, 4000.0, T0 + SECOND).accepted
    assert risk.check(es, flat, 4000.0, T0 + SECOND + 1).reason == RATE_LIMITED


# --- protective orders -----------------------------------------------------------------------


def test_stop_loss_flattens_once_per_position() -> None:
    risk = manager(stop_loss=4.0)
    portfolio = portfolio_with(fill("ES", Side.BUY, 2, 4000.0))
    assert risk.on_mark(portfolio, {"ES": 3996.25}, T0 + 10, src(10)) == []
    [stop] = risk.on_mark(portfolio, {"ES": 3996.0}, T0 + 11, src(11))
    assert (stop.side, stop.quantity, stop.purpose) == (Side.SELL, 2, Purpose.STOP_LOSS)
    assert stop.id == "ticks:0:11:stop_loss:ES"
    # The stop is pending: a later mark does not send it again.
    assert risk.on_mark(portfolio, {"ES": 3990.0}, T0 + 12, src(12), [stop]) == []

    short = portfolio_with(fill("ES", Side.SELL, 1, 4000.0))
    [cover] = risk.on_mark(short, {"ES": 4004.0}, T0 + 13, src(13))
    assert (cover.side, cover.quantity, cover.purpose) == (Side.BUY, 1, Purpose.STOP_LOSS)


def test_take_profit_closes_a_winning_position() -> None:
    risk = manager(take_profit=8.0, stop_loss=4.0)
    portfolio = portfolio_with(fill("ES", Side.SELL, 3, 4000.0))
    assert risk.on_mark(portfolio, {"ES": 3992.25}, T0 + 10, src(10)) == []
    [take] = risk.on_mark(portfolio, {"ES": 3992.0}, T0 + 11, src(11))
    assert (take.side, take.quantity, take.purpose) == (Side.BUY, 3, Purpose.TAKE_PROFIT)
    assert risk.state is RiskState.ACTIVE


# --- states ----------------------------------------------------------------------------------


def test_reducing_lets_only_exposure_reducing_orders_through() -> None:
    risk = manager(reduce_drawdown=0.01, max_drawdown=0.5)
    portfolio = portfolio_with(fill("ES", Side.BUY, 2, 4000.0), cash=100_000.0)
    assert risk.on_mark(portfolio, {"ES": 4000.0}, T0 + 10, src(10)) == []
    risk.on_mark(portfolio, {"ES": 3990.0}, T0 + 11, src(11))  # -1,000 on 100,000: 1 %
    assert risk.state is RiskState.REDUCING

    assert risk.check(order("ES", Side.BUY, 1), portfolio, 3990.0, T0 + 12).reason == (
        REDUCING_ONLY
    )
    assert risk.check(order("NQ", Side.SELL, 1), portfolio, 15000.0, T0 + 12).reason == (
        REDUCING_ONLY
    )
    # A reversal reduces the long but opens a short: refused.
    assert risk.check(order("ES", Side.SELL, 3), portfolio, 3990.0, T0 + 12).reason == (
        REDUCING_ONLY
    )
    assert risk.check(order("ES", Side.SELL, 1), portfolio, 3990.0, T0 + 12).accepted
    assert risk.check(order("ES", Side.SELL, 2), portfolio, 3990.0, T0 + 12).accepted

    # Below the line but not yet at the resume level (half of it, 0.5 %): still REDUCING.
    risk.on_mark(portfolio, {"ES": 3994.0}, T0 + 13, src(13))  # -600: 0.6 %
    assert risk.state is RiskState.REDUCING
    risk.on_mark(portfolio, {"ES": 3996.0}, T0 + 14, src(14))  # -400: 0.4 %
    assert risk.state is RiskState.ACTIVE
    assert [(e.from_state, e.to_state, e.reason) for e in risk.events] == [
        (RiskState.ACTIVE, RiskState.REDUCING, REDUCE_DRAWDOWN),
        (RiskState.REDUCING, RiskState.ACTIVE, DRAWDOWN_RECOVERED),
    ]


def test_kill_switch_halts_flattens_rejects_and_resets() -> None:
    risk = manager(reduce_drawdown=0.01, max_drawdown=0.02)
    portfolio = portfolio_with(
        fill("ES", Side.BUY, 2, 4000.0), fill("NQ", Side.SELL, 1, 15000.0), cash=200_000.0
    )
    pending_entry = order("MES", Side.BUY, 4, offset=50)
    prices = {"ES": 4000.0, "NQ": 15000.0}
    assert risk.on_mark(portfolio, prices, T0 + 100, src(100), [pending_entry]) == []

    # ES -30 points × 2 × 50 = -3,000 and NQ +10 × 20 = -200: 1.6 % (REDUCING) ...
    prices = {"ES": 3970.0, "NQ": 15010.0}
    assert risk.on_mark(portfolio, prices, T0 + 101, src(101), [pending_entry]) == []
    assert risk.state is RiskState.REDUCING
    # ... then ES -43 points: -4,500 in all, 2.25 %: the kill switch.
    prices = {"ES": 3957.0, "NQ": 15010.0}
    kills = risk.on_mark(portfolio, prices, T0 + 102, src(102), [pending_entry])
    assert risk.state is RiskState.HALTED
    assert [(o.symbol, o.side, o.quantity, o.purpose) for o in kills] == [
        ("ES", Side.SELL, 2, Purpose.KILL_SWITCH),
        ("MES", Side.SELL, 4, Purpose.KILL_SWITCH),  # nets out the entry still pending
        ("NQ", Side.BUY, 1, Purpose.KILL_SWITCH),
    ]
    assert {o.id for o in kills} == {f"ticks:0:102:kill_switch:{s}" for s in ("ES", "MES", "NQ")}
    # Kill orders pending: nothing is sent twice, and every new order is refused.
    pending = [pending_entry, *kills]
    assert risk.on_mark(portfolio, prices, T0 + 103, src(103), pending) == []
    for probe in (order("ES", Side.SELL, 2), order("ES", Side.BUY, 1)):
        assert risk.check(probe, portfolio, 3957.0, T0 + 104) == RiskCheck(False, HALTED)

    for f in (
        fill("ES", Side.SELL, 2, 3957.0, offset=200),
        fill("NQ", Side.BUY, 1, 15010.0, offset=201),
    ):
        portfolio.apply(f)
    risk.on_mark(portfolio, {"ES": 3957.0}, T0 + 300, src(300))
    assert risk.state is RiskState.HALTED  # only an explicit reset leaves HALTED

    risk.reset(portfolio, T0 + 400)
    assert risk.state is RiskState.ACTIVE
    assert risk.check(order("ES", Side.BUY, 1), portfolio, 3957.0, T0 + 401).accepted
    # Drawdown is measured from equity at the reset, so the same equity does not re-trip.
    assert risk.on_mark(portfolio, {"ES": 3957.0}, T0 + 402, src(402)) == []
    assert risk.state is RiskState.ACTIVE
    assert [(e.from_state, e.to_state, e.reason, e.ts) for e in risk.events] == [
        (RiskState.ACTIVE, RiskState.REDUCING, REDUCE_DRAWDOWN, T0 + 101),
        (RiskState.REDUCING, RiskState.HALTED, MAX_DRAWDOWN, T0 + 102),
        (RiskState.HALTED, RiskState.ACTIVE, MANUAL_RESET, T0 + 400),
    ]
    assert risk.events[1].drawdown == pytest.approx(4_500 / 200_000)
    assert len(risk.new_events()) == 3
    assert risk.new_events() == []


@pytest.mark.parametrize(
    "limits",
    [
        {"max_open_positions": 0},
        {"max_notional_total": -1.0},
        {"stop_loss": 0.0},
        {"max_drawdown": 1.5},
        {"reduce_drawdown": 0.2, "max_drawdown": 0.1},
        {"reduce_drawdown": 0.05, "resume_drawdown": 0.05},
        {"reduce_drawdown": None, "resume_drawdown": 0.01},
        {"rate_window_ns": 0},
    ],
)
def test_bad_limits_are_refused(limits: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RiskLimits(**limits)  # type: ignore[arg-type]
