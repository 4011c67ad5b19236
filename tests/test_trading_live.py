"""Live trading: the feature stream's ticks traded by one restartable trader, making the
decisions a backtest makes on the same ticks, through crashes of either side."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from market_fixtures import ACTIVE_CONFIG, TEST_ROWS, TRAIN_ROWS
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from rayfin.actors.feature_consumer import launch_consumers
from rayfin.actors.trader import launch_trader
from rayfin.datasets import es_ticks
from rayfin.features import online_features
from rayfin.stream.consumer import ConsumerConfig
from rayfin.stream.replay import frame_to_ticks, replay_ticks
from rayfin.stream.topics import Topics, ensure_topics
from rayfin.testing import POSTGRES_URL, consumer_config, wait_until
from rayfin.trading.backtest import backtest, micro_batches
from rayfin.trading.ledger import Ledger
from rayfin.trading.live import LiveTrader
from rayfin.trading.scoring import Model

pytestmark = pytest.mark.integration

# What two runs must agree on: every stored decision and fill, keyed by source offset.
DECISION_COLUMNS = ["ts", "symbol", "source_offset", "action", "side", "quantity", "reason"]
FILL_COLUMNS = ["ts", "symbol", "side", "quantity", "price", "fee"]


@pytest.fixture(scope="module")
def held_out() -> pd.DataFrame:
    """The ES ticks after the model's training rows: what is traded live."""
    return es_ticks(TRAIN_ROWS + TEST_ROWS).iloc[TRAIN_ROWS:].reset_index(drop=True)


@pytest.fixture(scope="module")
def held_out_features(held_out: pd.DataFrame) -> pd.DataFrame:
    """Their features, as a consumer starting at the first of them computes them."""
    features = online_features(held_out)
    return features.assign(partition=0, offset=np.arange(len(features)))


@pytest.fixture(scope="module")
def expected(market_model: Model, held_out: pd.DataFrame, tmp_path_factory) -> Ledger:
    """The backtest of the held-out ticks, in a ledger of its own."""
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('bt') / 'backtest.db'}")
    result = backtest(held_out, model=market_model, config=ACTIVE_CONFIG, ledger=ledger)
    assert result.metrics["fills"] >= 10, result.outcomes  # something to compare
    return ledger


def _same_trading(got: Ledger, want: Ledger) -> None:
    decisions, fills = got.decisions(), got.fills()
    assert len(decisions) > 0
    pd.testing.assert_frame_equal(
        decisions[DECISION_COLUMNS], want.decisions()[DECISION_COLUMNS], check_dtype=False
    )
    pd.testing.assert_frame_equal(fills[FILL_COLUMNS], want.fills()[FILL_COLUMNS])
    assert (decisions["source_partition"] == 0).all()


def test_a_restarted_trader_resumes_from_its_checkpoint(
    market_model: Model, held_out_features: pd.DataFrame, expected: Ledger, tmp_path: Path
) -> None:
    """Replayed rows are dropped, and the state (positions, pending orders, risk) is the
    one the ledger holds: the run equals one that never stopped."""
    chunks = list(micro_batches(held_out_features, 700))
    url = f"sqlite:///{tmp_path / 'live.db'}"
    with Ledger(url) as ledger:
        first = LiveTrader(market_model, ACTIVE_CONFIG, ledger)
        for chunk in chunks[:5]:
            first.on_features("ticks", chunk)
        assert not first.restored
    with Ledger(url) as ledger:
        second = LiveTrader(market_model, ACTIVE_CONFIG, ledger)
        assert second.restored
        assert second.marks == {("ticks", 0): 5 * 700 - 1}
        assert second.engine.portfolio.positions() == first.engine.portfolio.positions()
        assert second.engine.broker.pending() == first.engine.broker.pending()
        # A consumer replaying from before the checkpoint: those rows are dropped.
        for chunk in chunks[3:]:
            second.on_features("ticks", chunk)
        assert second.replayed == 2 * 700
        assert second.records == len(held_out_features)
        _same_trading(ledger, expected)


def test_a_failed_write_leaves_the_trader_as_it_was(
    market_model: Model, held_out_features: pd.DataFrame, expected: Ledger, postgres_ledger: Ledger
) -> None:
    """PostgreSQL refuses a batch: nothing of it is recorded or kept in memory, and the
    retry makes the same decisions."""
    chunks = list(micro_batches(held_out_features, 1_000))
    trader = LiveTrader(market_model, ACTIVE_CONFIG, postgres_ledger)
    trader.on_features("ticks", chunks[0])
    schema = postgres_ledger.schema
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:  # the database now refuses every new decision
        conn.execute(
            text(f'ALTER TABLE "{schema}".decisions ADD CONSTRAINT no_more CHECK (false) NOT VALID')
        )
    failed_at = None
    for i, chunk in enumerate(chunks[1:], start=1):
        try:
            trader.on_features("ticks", chunk)
        except IntegrityError:
            failed_at = i
            break
    assert failed_at is not None, "no batch after the first made a decision"
    assert trader.marks[("ticks", 0)] == failed_at * 1_000 - 1
    with engine.begin() as conn:
        conn.execute(text(f'ALTER TABLE "{schema}".decisions DROP CONSTRAINT no_more'))
    engine.dispose()
    for chunk in chunks[failed_at:]:
        trader.on_features("ticks", chunk)
    _same_trading(postgres_ledger, expected)


@pytest.fixture
def stream(ray_local: None, kafka_broker, tmp_path: Path) -> ConsumerConfig:
    """A one-partition ticks topic of its own (Kafka offsets = row numbers) and a group."""
    topics = Topics.prefixed(f"t{uuid.uuid4().hex[:8]}.")
    asyncio.run(
        ensure_topics(kafka_broker.bootstrap_servers, 1, [topics.ticks, topics.dead_letters])
    )
    return consumer_config(
        kafka_broker.bootstrap_servers,
        str(tmp_path / "archive"),
        topics,
        kinds=("ticks",),
        max_records=500,
    )


def test_live_trading_through_kafka_matches_the_backtest_through_crashes(
    stream: ConsumerConfig,
    market_model: Model,
    held_out: pd.DataFrame,
    expected: Ledger,
    tmp_path: Path,
) -> None:
    """Ticks replayed into Kafka, features in a consumer actor, trading in the trader
    actor: the ledger holds the backtest's decisions and fills exactly, although the
    trader is killed mid-stream (Ray restarts it from its checkpoint) and so is the
    consumer (a new member replays from the archive's checkpoint)."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    ticks = frame_to_ticks(held_out)
    half = len(ticks) // 2
    trader = launch_trader(market_model, ACTIVE_CONFIG, url, num_cpus=0.1)
    consumers = launch_consumers(stream, 1, num_cpus=0.1, prefix="live", trader=trader)
    try:
        ray.get(consumers[0].wait_assigned.remote(60))
        asyncio.run(replay_ticks(stream.bootstrap_servers, ticks[:half], topic=stream.topics.ticks))

        def traded() -> int:
            return ray.get(trader.stats.remote(), timeout=30)["records"]

        wait_until(lambda: traded() > half // 3, 60, "trading to start")
        ray.kill(trader, no_restart=False)  # Ray restarts it; calls in flight are retried
        wait_until(lambda: traded() >= half, 90, "the restarted trader to catch up")
        assert ray.get(trader.stats.remote())["restored"]
        ray.kill(consumers[0])  # its unarchived rows are read again by the next member
        consumers += launch_consumers(stream, 1, num_cpus=0.1, prefix="again", trader=trader)
        ray.get(consumers[-1].wait_assigned.remote(60))
        asyncio.run(replay_ticks(stream.bootstrap_servers, ticks[half:], topic=stream.topics.ticks))
        wait_until(lambda: traded() == len(ticks), 120, "every tick to be traded")
        stats = ray.get(trader.stats.remote())
        assert stats["marks"] == {f"{stream.topics.ticks}/0": len(ticks) - 1}
        ray.get(consumers[-1].stop.remote())
    finally:
        for handle in [*consumers, trader]:
            ray.kill(handle, no_restart=True)
    with Ledger(url) as live:
        _same_trading(live, expected)
        assert live.checkpoint("trader").records == len(ticks)


def test_rayfin_consume_trade_runs_live_trading_from_the_command_line(
    stream: ConsumerConfig,
    market_model: Model,
    market_registry: Path,
    held_out: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from rayfin.cli import app
    from rayfin.cli.trading import trading_config
    from rayfin.config import reload_settings

    ticks = held_out.iloc[:3_000]
    asyncio.run(
        replay_ticks(stream.bootstrap_servers, frame_to_ticks(ticks), topic=stream.topics.ticks)
    )
    monkeypatch.setenv("RAYFIN_BROKER__BOOTSTRAP_SERVERS", stream.bootstrap_servers)
    reload_settings()
    url = f"sqlite:///{tmp_path / 'live.db'}"
    prefix = stream.topics.ticks.removesuffix("ticks")
    args = ["consume", "--kinds", "ticks", "--group", stream.group_id, "--topic-prefix", prefix]
    args += ["--archive", stream.archive, "--seconds", "20", "--num-cpus", "0.1", "--trade"]
    args += ["--registry", str(market_registry), "--threshold", "0.501", "--ledger", url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "traded 3,000 ticks" in result.output
    config = trading_config(0.501)
    with Ledger(f"sqlite:///{tmp_path / 'bt.db'}") as want, Ledger(url) as got:
        backtest(ticks, model=market_model, config=config, ledger=want)
        _same_trading(got, want)


def test_a_halt_survives_a_restart_until_the_operator_resets_it(
    market_model: Model, held_out_features: pd.DataFrame, tmp_path: Path
) -> None:
    from dataclasses import replace

    from rayfin.trading.risk import RiskLimits, RiskState

    config = replace(ACTIVE_CONFIG, limits=RiskLimits(reduce_drawdown=None, max_drawdown=0.00005))
    url = f"sqlite:///{tmp_path / 'live.db'}"
    chunks = list(micro_batches(held_out_features, 1_000))
    with Ledger(url) as ledger:
        trader = LiveTrader(market_model, config, ledger)
        for chunk in chunks[:4]:
            trader.on_features("ticks", chunk)
        assert trader.engine.risk.state is RiskState.HALTED
    with Ledger(url) as ledger:
        restarted = LiveTrader(market_model, config, ledger)
        assert restarted.engine.risk.state is RiskState.HALTED
        restarted.on_features("ticks", chunks[4])
        assert restarted.engine.outcomes["halted"] > trader.engine.outcomes["halted"]
        restarted.reset_risk()
        assert restarted.engine.risk.state is RiskState.ACTIVE
        events = ledger.risk_events()
        last_tick = int(chunks[4]["ts"][-1])
        assert events["reason"].tolist()[-1] == "manual_reset"
        assert events["ts"].tolist()[-1] == last_tick  # event time, not the wall clock
    with Ledger(url) as ledger:
        assert LiveTrader(market_model, config, ledger).engine.risk.state is RiskState.ACTIVE


def test_the_cli_trades_any_symbol_on_a_default_tick_size() -> None:
    from rayfin.cli.trading import trading_config
    from rayfin.errors import TradingError

    assert trading_config(0.7, 0.01).instruments["SYM3"].tick_size == 0.01
    with pytest.raises(TradingError, match="unknown instrument 'SYM3'"):
        trading_config(0.7).instruments["SYM3"]
