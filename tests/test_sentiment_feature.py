"""News sentiment as a feature: the decayed per-symbol definition (book and history
executor), the live trader's book through replays and restarts, the backtest, the ledger's
decisions, and the whole path from Kafka through a scorer actor into the ledger."""

from __future__ import annotations

import asyncio
import functools
import itertools
import pickle
import sqlite3
import uuid
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
import pytest

from rayfin.errors import TradingError
from rayfin.features.sentiment import SentimentBook, sentiment_series
from rayfin.trading.backtest import backtest
from rayfin.trading.engine import TradingConfig
from rayfin.trading.labels import LabelSpec
from rayfin.trading.ledger import Ledger, LedgerBatch
from rayfin.trading.live import LiveTrader
from rayfin.trading.orders import Decision, Instruments, Order, RiskState, Side, Signal, SourceKey
from rayfin.trading.registry import ModelVersion
from rayfin.trading.scoring import Model
from rayfin.trading.strategy import StrategyConfig

HALF_LIFE_S = 1800.0
H = int(HALF_LIFE_S * 1e9)  # the half-life in ns
S = 10**9
T0 = 1_704_205_800 * S
# Every tick's decision is stored (holds too), so each shows the sentiment it was made on.
CONFIG = TradingConfig(
    strategy=StrategyConfig(threshold=0.6),
    instruments=Instruments(default_tick_size=0.01),
    record_holds=True,
)


def news_frame(rows: list[tuple[int, list[str], float]]) -> pd.DataFrame:
    """Scored stories (ts, symbols, sentiment) as one partition's records, in order."""
    frame = pd.DataFrame(rows, columns=["ts", "symbols", "sentiment"])
    return frame.assign(partition=0, offset=np.arange(len(frame)))


# -- the definition ----------------------------------------------------------------------


def test_a_story_counts_from_its_own_time_and_halves_every_half_life() -> None:
    book = SentimentBook(HALF_LIFE_S)
    book.add(T0, ["AAA"], 0.8)
    ts = np.array([T0 - 1, T0, T0 + H, T0 + 2 * H])
    np.testing.assert_allclose(book.at("AAA", ts), [0.0, 0.8, 0.4, 0.2])
    assert book.at("BBB", ts).tolist() == [0.0] * 4


def test_stories_add_up_but_the_value_stays_within_one() -> None:
    book = SentimentBook(HALF_LIFE_S)
    book.add(T0, ["AAA"], 0.7)
    book.add(T0 + H, ["AAA"], 0.9)
    book.add(T0, ["BBB"], -0.9)
    book.add(T0, ["BBB"], -0.9)
    book.add(T0, ["CCC"], 0.5)
    book.add(T0, ["CCC"], -0.5)
    at = T0 + H
    assert book.at("AAA", [at - 1])[0] == pytest.approx(0.35, abs=1e-9)  # before the second
    assert book.at("AAA", [at]).tolist() == [1.0]  # 0.35 + 0.9, clipped
    assert book.at("BBB", [T0]).tolist() == [-1.0]
    assert book.at("CCC", [T0]).tolist() == [0.0]


def test_a_tick_before_a_story_never_sees_it() -> None:
    book = SentimentBook(HALF_LIFE_S)
    book.add(T0 + 10 * S, ["AAA"], 0.5)
    book.advance("AAA", T0)  # ticks up to T0 traded: the later story stays apart
    np.testing.assert_allclose(book.at("AAA", [T0, T0 + 10 * S - 1, T0 + 10 * S]), [0, 0, 0.5])


def test_a_late_tick_older_than_a_settled_story_reads_the_value_at_the_story() -> None:
    """The documented edge: once ticks past a story were traded, the story is folded into
    the running sum, and a tick that comes later but is older reads the anchor's value."""
    book = SentimentBook(HALF_LIFE_S)
    book.add(T0 + 10 * S, ["AAA"], 0.5)
    assert book.advance("AAA", T0 + 20 * S)
    assert book.at("AAA", [T0 + 5 * S]).tolist() == [0.5]


def test_market_wide_stories_apply_to_every_symbol_known_or_not() -> None:
    book = SentimentBook(HALF_LIFE_S)
    book.add(T0, ["AAA"], 0.2)
    book.add(T0 + S, [], -0.4)  # market-wide
    book.add(T0 + 2 * S, ["CCC"], 0.1)  # CCC first named after it
    at = T0 + 2 * S
    decay = lambda ns: 2.0 ** (-ns / H)  # noqa: E731
    expected = {
        "AAA": 0.2 * decay(2 * S) - 0.4 * decay(S),
        "BBB": -0.4 * decay(S),  # never named
        "CCC": -0.4 * decay(S) + 0.1,
    }
    for symbol, value in expected.items():
        assert book.at(symbol, [at])[0] == pytest.approx(value, abs=1e-12)
    news = news_frame([(T0, ["AAA"], 0.2), (T0 + S, [], -0.4), (T0 + 2 * S, ["CCC"], 0.1)])
    rows = pd.DataFrame({"symbol": list(expected), "ts": at})
    np.testing.assert_allclose(sentiment_series(rows, news, HALF_LIFE_S), list(expected.values()))


def _stories(rng: np.random.Generator, n: int, span_ns: int) -> list[tuple[int, list[str], float]]:
    names = [["AAA"], ["BBB"], ["AAA", "BBB"], []]
    return [
        (
            T0 + int(rng.integers(0, span_ns)),
            names[rng.integers(0, 4)],
            float(rng.uniform(-0.6, 0.6)),
        )
        for _ in range(n)
    ]


def test_stories_out_of_time_order_give_the_values_of_stories_in_order() -> None:
    """The running-sum rule: a story behind the anchor is decayed to the anchor on
    arrival, which is what time order would have given at every later time."""
    rng = np.random.default_rng(7)
    stories = _stories(rng, 300, 4 * H)
    in_order, shuffled = SentimentBook(HALF_LIFE_S), SentimentBook(HALF_LIFE_S)
    for story in sorted(stories, key=lambda s: s[0]):
        in_order.add(*story)
    for i, j in enumerate(rng.permutation(len(stories))):
        shuffled.add(*stories[j])
        if i % 25 == 0:  # ticks traded meanwhile, up to some time: stories get folded in
            for symbol in ("AAA", "BBB"):
                shuffled.advance(symbol, T0 + int(rng.integers(0, 4 * H)))
    ts = np.sort(rng.integers(4 * H, 6 * H, 200)) + T0  # after every story and anchor
    news = news_frame(stories)
    for symbol in ("AAA", "BBB", "ZZZ"):
        want = in_order.at(symbol, ts)
        np.testing.assert_allclose(shuffled.at(symbol, ts), want, rtol=0, atol=1e-12)
        rows = pd.DataFrame({"symbol": symbol, "ts": ts})
        np.testing.assert_allclose(sentiment_series(rows, news, HALF_LIFE_S), want, atol=1e-12)
    assert np.abs(in_order.at("AAA", ts)).max() > 0.05


def test_the_history_executor_matches_the_book_fed_as_the_stream_does() -> None:
    """Ticks of three symbols in batches; before each batch the stories up to its last
    tick arrive, shuffled; the book is read per batch and advanced after it."""
    rng = np.random.default_rng(11)
    span = 6 * H
    stories = _stories(rng, 120, span)
    ticks = pd.DataFrame(
        {
            "symbol": rng.choice(["AAA", "BBB", "CCC"], 3_000),
            "ts": T0 + np.sort(rng.integers(0, span, 3_000)),
        }
    )
    book = SentimentBook(HALF_LIFE_S)
    pending = sorted(stories, key=lambda s: s[0])
    live = []
    for start in range(0, len(ticks), 100):
        batch = ticks.iloc[start : start + 100]
        due = [s for s in pending if s[0] <= batch["ts"].max()]
        pending = pending[len(due) :]
        for i in rng.permutation(len(due)):
            book.add(*due[i])
        symbols, ts = batch["symbol"].to_numpy(), batch["ts"].to_numpy()
        live.append(book.for_rows(symbols, ts))
        book.advance_rows(symbols, ts)
    history = sentiment_series(ticks, news_frame(stories), HALF_LIFE_S)
    np.testing.assert_allclose(np.concatenate(live), history, rtol=0, atol=1e-12)
    assert (history != 0).mean() > 0.9


def test_the_book_survives_pickling_and_its_snapshots() -> None:
    book = SentimentBook(HALF_LIFE_S)
    for story in _stories(np.random.default_rng(3), 50, 2 * H):
        book.add(*story)
    book.advance("AAA", T0 + H)
    ts = T0 + np.arange(0, 3 * H, H // 7)
    for copy in (pickle.loads(pickle.dumps(book)), SentimentBook.restore(book.snapshot())):
        assert (copy.stories, copy.changes, copy.half_life_s) == (50, book.changes, HALF_LIFE_S)
        for symbol in ("AAA", "BBB", "new"):
            np.testing.assert_array_equal(copy.at(symbol, ts), book.at(symbol, ts))
    with pytest.raises(ValueError, match="another rayfin version"):
        SentimentBook.restore(pickle.dumps({"format": 0}))
    with pytest.raises(ValueError, match="half_life_s"):
        SentimentBook(0.0)


def test_no_news_is_neutral() -> None:
    rows = pd.DataFrame({"symbol": ["AAA", "BBB"], "ts": [T0, T0]})
    assert sentiment_series(rows, None).tolist() == [0.0, 0.0]
    assert SentimentBook().for_rows(rows["symbol"].to_numpy(), rows["ts"].to_numpy()).tolist() == [
        0.0,
        0.0,
    ]


# -- the trader --------------------------------------------------------------------------


@functools.cache
def sentiment_model() -> Model:
    """A real booster on the sentiment input alone: UP above 0.1, DOWN below -0.1."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 1))
    y = (x[:, 0] > -0.1).astype(int) + (x[:, 0] > 0.1).astype(int)
    params = {"objective": "multiclass", "num_class": 3, "verbosity": -1, "num_threads": 1}
    booster = lightgbm.train(
        params, lightgbm.Dataset(x, y, feature_name=["sentiment"]), num_boost_round=20
    )
    version = ModelVersion(
        name="news",
        version=1,
        created="2024-01-01T00:00:00+00:00",
        params={},
        metrics={},
        features=("sentiment",),
        label_spec=LabelSpec(),
        fingerprint="f",
        lightgbm_version=lightgbm.__version__,
    )
    return Model(booster, version)


def tick_rows(n: int = 400, seconds: int = 600) -> pd.DataFrame:
    """Feature rows (what the model and the engine need) of two symbols, one partition."""
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {
            "symbol": np.where(np.arange(n) % 2 == 0, "AAA", "BBB").astype(object),
            "ts": T0 + np.sort(rng.integers(0, seconds * S, n)),
            "price": 100.0 + np.cumsum(rng.choice([-0.01, 0.01], n)),
            "partition": 0,
            "offset": np.arange(n),
            "seq": np.arange(n) // 2,
        }
    )


NEWS = news_frame(
    [(T0 + 100 * S, ["AAA"], 0.8), (T0 + 250 * S, [], -0.3), (T0 + 400 * S, ["BBB"], -0.7)]
)


def _batches(rows: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [rows.iloc[i : i + size] for i in range(0, len(rows), size)]


def test_the_trader_fills_sentiment_from_its_news_and_the_decisions_show_it(
    tmp_path: Path,
) -> None:
    rows = tick_rows()
    with Ledger(f"sqlite:///{tmp_path / 'live.db'}") as ledger:
        trader = LiveTrader(sentiment_model(), CONFIG, ledger)
        assert trader.on_news("news", NEWS) == 3
        for batch in _batches(rows, 50):
            trader.on_features("ticks", batch)
        decisions = ledger.decisions()
        assert trader.stats()["news"] == 3
    assert len(decisions) == len(rows)
    np.testing.assert_allclose(
        decisions["sentiment"], sentiment_series(rows, NEWS, HALF_LIFE_S), atol=1e-12
    )
    buys = decisions[decisions["action"] == "buy"]
    assert len(buys)
    assert (buys["symbol"] == "AAA").all()
    assert (buys["sentiment"] > 0.1).all()
    assert (decisions.loc[decisions["ts"] < T0 + 100 * S, "sentiment"] == 0).all()


def test_replayed_news_is_dropped_and_the_book_survives_a_restart(tmp_path: Path) -> None:
    rows = tick_rows()
    batches = _batches(rows, 50)
    url = f"sqlite:///{tmp_path / 'live.db'}"
    with Ledger(url) as ledger:
        first = LiveTrader(sentiment_model(), CONFIG, ledger)
        first.on_news("news", NEWS.iloc[:2])
        for batch in batches[:4]:
            first.on_features("ticks", batch)
    with Ledger(url) as ledger:
        second = LiveTrader(sentiment_model(), CONFIG, ledger)
        assert second.restored
        assert second.book.stories == 2
        assert second.marks[("news", 0)] == 1
        assert second.on_news("news", NEWS) == 1  # the consumer replays from the start
        assert second.replayed == 2
        for batch in batches[2:]:  # and the ticks from before the checkpoint
            second.on_features("ticks", batch)
        decisions = ledger.decisions()
        with pytest.raises(TradingError, match="half-life"):
            LiveTrader(sentiment_model(), CONFIG, ledger, half_life_s=60.0)
    # The same as a trader that had all the news from the start.
    want = sentiment_series(rows, NEWS, HALF_LIFE_S)
    np.testing.assert_allclose(decisions["sentiment"], want, atol=1e-12)


def test_a_news_batch_that_is_not_recorded_leaves_the_book_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger(f"sqlite:///{tmp_path / 'live.db'}") as ledger:
        trader = LiveTrader(sentiment_model(), CONFIG, ledger)
        trader.on_news("news", NEWS.iloc[:1])

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(ledger, "record", refuse)
        with pytest.raises(OSError, match="disk full"):
            trader.on_news("news", NEWS)
        assert trader.book.stories == 1
        assert trader.marks == {("news", 0): 0}
        monkeypatch.undo()
        assert trader.on_news("news", NEWS) == 2
        assert ledger.checkpoint("trader").marks == {("news", 0): 2}


def test_a_backtest_with_news_makes_the_live_traders_decisions(tmp_path: Path) -> None:
    rows = tick_rows()
    result = backtest(rows, model=sentiment_model(), config=CONFIG, news=NEWS, batch_rows=50)
    with Ledger(f"sqlite:///{tmp_path / 'live.db'}") as ledger:
        trader = LiveTrader(sentiment_model(), CONFIG, ledger)
        trader.on_news("news", NEWS)
        for batch in _batches(rows, 50):
            trader.on_features("ticks", batch)
        live = ledger.decisions()
    columns = ["ts", "symbol", "source_offset", "action", "reason", "sentiment"]
    pd.testing.assert_frame_equal(
        result.decisions[columns].reset_index(drop=True), live[columns], check_dtype=False
    )
    assert result.metrics["fills"] > 0
    without = backtest(rows, model=sentiment_model(), config=CONFIG, batch_rows=50)
    assert (without.decisions["sentiment"] == 0).all()
    assert without.metrics["fills"] == 0


def test_a_ledger_made_before_sentiment_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    source = SourceKey("ticks", 0, 0)
    signal = Signal("AAA", T0, 100.0, (0.1, 0.1, 0.8), source, sentiment=0.5)
    order = Order.create("AAA", Side.BUY, 1, T0, "entry", source)
    decision = Decision.checked(signal, order, None, RiskState.ACTIVE)
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.record(LedgerBatch(decisions=[decision]))
    with sqlite3.connect(path) as db:  # as rayfin made them before this column
        db.execute("ALTER TABLE decisions DROP COLUMN sentiment")
        db.execute("ALTER TABLE trader_checkpoints DROP COLUMN sentiment")
    with Ledger(f"sqlite:///{path}") as ledger:
        later = Decision.checked(
            Signal("AAA", T0 + 1, 100.0, (0.1, 0.1, 0.8), SourceKey("ticks", 0, 1), sentiment=0.5),
            Order.create("AAA", Side.BUY, 1, T0 + 1, "entry", SourceKey("ticks", 0, 1)),
            None,
            RiskState.ACTIVE,
        )
        ledger.record(LedgerBatch(decisions=[later]))
        trader = LiveTrader(sentiment_model(), CONFIG, ledger)
        trader.on_news("news", NEWS)
        assert ledger.decisions()["sentiment"].tolist()[1] == 0.5
        assert pd.isna(ledger.decisions()["sentiment"].tolist()[0])  # recorded before
        assert LiveTrader(sentiment_model(), CONFIG, ledger).book.stories == 3


# -- the stream --------------------------------------------------------------------------


@pytest.mark.integration
def test_news_scored_in_the_stream_reaches_the_ledgers_decisions(
    ray_local: None, kafka_broker, tmp_path: Path
) -> None:
    """Simulated news and ticks through Kafka, a consumer actor with the VADER scorer actor
    and the trader actor: the archived news carries its scores, and every decision the
    sentiment the history executor gives from those scores."""
    import ray

    from rayfin.actors.feature_consumer import launch_consumers
    from rayfin.actors.sentiment import launch_sentiment
    from rayfin.actors.trader import launch_trader
    from rayfin.sentiment.factory import make_scorer
    from rayfin.stream.archive import Archive
    from rayfin.stream.producer import BatchProducer
    from rayfin.stream.schemas import encode, key_for
    from rayfin.stream.simulate import MarketSimulator
    from rayfin.stream.topics import NEWS_TOPIC, TICKS_TOPIC, Topics, ensure_topics
    from rayfin.testing import consumer_config, wait_until

    topics = Topics.prefixed(f"s{uuid.uuid4().hex[:8]}.")
    bootstrap = kafka_broker.bootstrap_servers
    asyncio.run(ensure_topics(bootstrap, 1, [topics.ticks, topics.news, topics.dead_letters]))
    events = list(itertools.islice(MarketSimulator(3, seed=5, news_rate=0.05), 3_000))
    news = [e.message for e in events if e.topic == NEWS_TOPIC]
    ticks = [e.message for e in events if e.topic == TICKS_TOPIC]
    assert len(news) >= 10

    async def send(topic: str, messages: list) -> None:
        async with BatchProducer(bootstrap) as producer:
            for message in messages:
                await producer.send(topic, encode(message), key_for(message))
            await producer.flush()

    config = consumer_config(bootstrap, str(tmp_path / "archive"), topics, kinds=("ticks", "news"))
    url = f"sqlite:///{tmp_path / 'live.db'}"
    trader = launch_trader(sentiment_model(), CONFIG, url, num_cpus=0.1)
    scorer = launch_sentiment(functools.partial(make_scorer, "vader"), num_cpus=0.1)
    (member,) = launch_consumers(config, 1, num_cpus=0.1, prefix="s", trader=trader, scorer=scorer)
    try:
        ray.get(member.wait_assigned.remote(60))
        # News first, so that every tick is traded after the stories before it arrived:
        # then live must equal the history executor exactly.
        asyncio.run(send(topics.news, news))

        def stats() -> dict:
            return ray.get(trader.stats.remote(), timeout=30)

        wait_until(lambda: stats()["news"] == len(news), 60, "the trader to have the news")
        ray.kill(trader, no_restart=False)  # Ray restarts it: the book is in its checkpoint
        wait_until(lambda: stats()["restored"], 60, "the trader to restart")
        assert stats()["news"] == len(news)
        asyncio.run(send(topics.ticks, ticks))
        wait_until(lambda: stats()["records"] == len(ticks), 60, "every tick to be traded")
        ray.get(member.stop.remote())
    finally:
        for handle in (member, trader, scorer):
            ray.kill(handle, no_restart=True)
    archived = Archive(config.archive).read("news").to_pandas()
    assert len(archived) == len(news)
    probs = archived[["negative", "neutral", "positive"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(archived["sentiment"], probs[:, 2] - probs[:, 0])
    assert (archived["sentiment"] != 0).any()
    with Ledger(url) as ledger:
        decisions = ledger.decisions()
    assert len(decisions) == len(ticks)
    want = sentiment_series(decisions, archived, HALF_LIFE_S)
    np.testing.assert_allclose(decisions["sentiment"], want, atol=1e-12)
    named = {s for story in news for s in story.symbols}
    after_news = decisions[decisions["ts"] > min(n.ts for n in news)]
    for symbol in named:
        assert (after_news.loc[after_news["symbol"] == symbol, "sentiment"] != 0).any(), symbol


# -- scorers by name, and the command line ---------------------------------------------


def test_scorers_are_made_by_name() -> None:
    from rayfin.errors import ConfigError
    from rayfin.sentiment.factory import make_scorer
    from rayfin.sentiment.lexicon import VaderScorer

    scorer = make_scorer("vader")
    assert isinstance(scorer, VaderScorer)
    assert scorer.score(["Shares soar on record profits"]).shape == (1, 3)
    with pytest.raises(ConfigError, match="unknown sentiment scorer 'finbert'"):
        make_scorer("finbert")


def test_rayfin_consume_scores_only_the_news_topic() -> None:
    from typer.testing import CliRunner

    from rayfin.cli import app

    result = CliRunner().invoke(app, ["consume", "--kinds", "ticks", "--sentiment", "vader"])
    assert result.exit_code == 2
    assert "add news to --kinds" in result.output
    result = CliRunner().invoke(app, ["consume", "--sentiment", "finbert"])
    assert result.exit_code == 2
    assert "expected one of none, vader, llm" in result.output
