"""The trading engine's idle fast path and its snapshots: both must change nothing about
what the per-tick chain decides."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from rayfin.errors import TradingError
from rayfin.trading.engine import SignalBatch, TradingConfig, TradingEngine
from rayfin.trading.ledger import LedgerBatch
from rayfin.trading.orders import Signal, SourceKey
from rayfin.trading.risk import RiskLimits, RiskState
from rayfin.trading.strategy import StrategyConfig

T0 = 1_704_205_800 * 10**9
START = {"ES": 4000.0, "NQ": 15000.0, "MES": 4000.0}
PARTITION = {"ES": 0, "NQ": 1, "MES": 2}

# Tight limits on a small account, so one run goes through fills, stops, take-profits,
# rejections, REDUCING and back, and finally the kill switch.
CONFIG = TradingConfig(
    strategy=StrategyConfig(threshold=0.7, max_quantity=2, scale_by_confidence=True),
    limits=RiskLimits(
        stop_loss=6.0,
        take_profit=9.0,
        max_open_positions=2,
        max_orders=2,
        reduce_drawdown=0.005,
        resume_drawdown=0.004,
        max_drawdown=0.04,
    ),
    initial_cash=400_000.0,
)


def signals(
    n: int, seed: int, confident: float = 0.03, symbols: tuple[str, ...] = tuple(START)
) -> list[Signal]:
    """Seeded ticks of ``symbols``; a share ``confident`` of them pass the threshold."""
    rng = random.Random(seed)
    prices, offsets, ts, out = dict(START), dict.fromkeys(START, 0), T0, []
    for _ in range(n):
        symbol = rng.choice(symbols)
        prices[symbol] = max(prices[symbol] + 0.25 * rng.randint(-8, 8), 100.0)
        ts += rng.randint(1, 300_000_000)
        if rng.random() < confident:
            high = rng.uniform(0.7, 0.95)
            rest = (1 - high) / 2
            probs = (high, rest, rest) if rng.random() < 0.5 else (rest, rest, high)
        else:
            w = [rng.uniform(0.2, 1.0) for _ in range(3)]
            probs = tuple(x / sum(w) for x in w)
        source = SourceKey("ticks", PARTITION[symbol], offsets[symbol])
        offsets[symbol] += 1
        out.append(Signal(symbol, ts, prices[symbol], probs, source))  # type: ignore[arg-type]
    return out


def chunks(items: list[Signal], size: int) -> list[list[Signal]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def test_the_fast_path_decides_exactly_as_the_per_tick_chain() -> None:
    """Three symbols, rarely confident: mostly flat runs, sometimes two positions open."""
    ticks = signals(20_000, seed=5)
    slow, fast = TradingEngine(CONFIG), TradingEngine(CONFIG)
    slow_batches: list[LedgerBatch] = []
    fast_batches: list[LedgerBatch] = []
    for chunk in chunks(ticks, 1_000):
        slow_batches.append(slow.on_signals(chunk))
        fast_batches.append(fast.on_batch(SignalBatch.from_signals(chunk)))
    assert fast_batches == slow_batches
    assert fast.outcomes == slow.outcomes
    assert fast.portfolio.equity_curve == slow.portfolio.equity_curve
    assert fast.portfolio.positions() == slow.portfolio.positions()
    assert fast.risk.events == slow.risk.events
    # The run exercised what the fast path must not skip.
    purposes = {o.purpose.value for b in slow_batches for o in b.orders}
    assert {"entry", "stop_loss", "take_profit"} <= purposes, purposes
    assert {e.to_state for e in slow.risk.events} >= {RiskState.REDUCING, RiskState.ACTIVE}
    assert sum(len(b.fills) for b in slow_batches) > 20
    assert slow.outcomes["below_threshold"] > 15_000


@pytest.mark.parametrize(
    ("symbols", "confident", "seed"), [(("ES",), 0.3, 1), (("ES",), 0.6, 2), (("ES", "NQ"), 0.2, 3)]
)
def test_the_fast_path_holds_positions_exactly_as_the_chain(
    symbols: tuple[str, ...], confident: float, seed: int
) -> None:
    """Often confident: positions held through long runs, stops and take-profits hit."""
    ticks = signals(15_000, seed=seed, confident=confident, symbols=symbols)
    config = TradingConfig(
        strategy=CONFIG.strategy,
        limits=RiskLimits(stop_loss=6.0, take_profit=9.0, max_orders=2, reduce_drawdown=0.03),
        initial_cash=1_000_000.0,
    )
    slow, fast = TradingEngine(config), TradingEngine(config)
    for chunk in chunks(ticks, 1_000):
        assert fast.on_batch(SignalBatch.from_signals(chunk)) == slow.on_signals(chunk)
    assert fast.outcomes == slow.outcomes
    assert fast.portfolio.equity_curve == slow.portfolio.equity_curve
    assert fast.risk.events == slow.risk.events
    assert slow.outcomes["same_direction"] > 500, slow.outcomes
    assert sum(1 for _ in slow.portfolio.equity_curve) > len(ticks)  # fills sampled too


def test_the_fast_path_matches_through_a_halt() -> None:
    """After the kill switch nothing is open and every order is refused: idle again."""
    halting = TradingConfig(
        strategy=CONFIG.strategy,
        limits=RiskLimits(reduce_drawdown=None, max_drawdown=0.002, max_orders=None),
        initial_cash=400_000.0,
    )
    ticks = signals(6_000, seed=9, confident=0.05)
    slow, fast = TradingEngine(halting), TradingEngine(halting)
    for chunk in chunks(ticks, 500):
        assert fast.on_batch(SignalBatch.from_signals(chunk)) == slow.on_signals(chunk)
    assert slow.risk.state is RiskState.HALTED
    assert fast.portfolio.equity_curve == slow.portfolio.equity_curve
    assert slow.outcomes["halted"] > 0


def test_recorded_holds_take_the_per_tick_path() -> None:
    config = TradingConfig(strategy=CONFIG.strategy, limits=CONFIG.limits, record_holds=True)
    ticks = signals(2_000, seed=5)
    slow, fast = TradingEngine(config), TradingEngine(config)
    for chunk in chunks(ticks, 400):
        fast_batch = fast.on_batch(SignalBatch.from_signals(chunk))
        assert fast_batch == slow.on_signals(chunk)
        assert len(fast_batch.decisions) == len(chunk)


def test_a_restored_engine_goes_on_as_if_never_stopped() -> None:
    ticks = signals(12_000, seed=6)
    first, second = ticks[:6_000], ticks[6_000:]
    engine = TradingEngine(CONFIG)
    for chunk in chunks(first, 1_000):
        engine.on_batch(SignalBatch.from_signals(chunk))
    snapshot = engine.snapshot()
    restored = TradingEngine.restore(snapshot, CONFIG)
    assert restored.portfolio.positions() == engine.portfolio.positions()
    assert restored.broker.pending() == engine.broker.pending()
    assert restored.risk.state is engine.risk.state
    assert restored.outcomes == engine.outcomes
    for chunk in chunks(second, 1_000):
        batch = SignalBatch.from_signals(chunk)
        assert restored.on_batch(batch) == engine.on_batch(batch)
    assert restored.portfolio.summary() == engine.portfolio.summary()
    assert restored.risk.events == engine.risk.events


def test_the_snapshot_leaves_the_equity_curve_out() -> None:
    engine = TradingEngine(CONFIG)
    engine.on_batch(SignalBatch.from_signals(signals(5_000, seed=2)))
    assert len(engine.portfolio.equity_curve) >= 5_000  # a sample per tick and per fill
    assert len(engine.snapshot()) < 20_000
    assert TradingEngine.restore(engine.snapshot(), CONFIG).portfolio.equity_curve == []


def test_restore_refuses_another_account_or_format() -> None:
    engine = TradingEngine(CONFIG)
    engine.on_batch(SignalBatch.from_signals(signals(500, seed=1)))
    other_cash = TradingConfig(strategy=CONFIG.strategy, limits=CONFIG.limits, initial_cash=1e6)
    with pytest.raises(TradingError, match=r"started with 400,000\.00"):
        TradingEngine.restore(engine.snapshot(), other_cash)
    with pytest.raises(TradingError, match="another rayfin version"):
        TradingEngine.restore(pickle.dumps({"version": 0}), CONFIG)


def test_a_bad_row_fails_the_whole_batch_before_trading() -> None:
    good = SignalBatch.from_signals(signals(10, seed=3))
    engine = TradingEngine(CONFIG)
    prices = good.prices.copy()
    prices[7] = np.nan
    with pytest.raises(TradingError, match="row 7: price"):
        SignalBatch(
            "ticks",
            good.symbols,
            good.ts,
            prices,
            good.probs,
            good.partitions,
            good.offsets,
        )
    probs = good.probs.copy()
    probs[2] = (0.5, 0.5, 0.5)
    with pytest.raises(TradingError, match="row 2: probs"):
        SignalBatch(
            "ticks", good.symbols, good.ts, good.prices, probs, good.partitions, good.offsets
        )
    assert engine.outcomes == {}
