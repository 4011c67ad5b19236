"""A deterministic synthetic market: trades, level-2 books and news for many symbols.

:class:`MarketSimulator` is seeded and stateful; iterating it yields :class:`SimEvent`
in event-time order, forever. The model, per symbol:

* **Efficient price**: geometric Brownian motion in log space (``sigma`` per √second)
  plus compound Poisson jumps (``jump_rate`` per second, normal log-sizes of
  ``jump_std``), plus the drift of the current news regime.
* **Book**: at each book event the efficient price is quoted on the tick grid: the touch
  straddles it with a spread of 1–3 ticks, and ``levels`` levels per side step away one
  tick (sometimes two) at a time, with random sizes growing with depth. Best bid < best
  ask always.
* **Trades** hit the most recently *published* book of their symbol: at the bid or the
  ask, or strictly between them when the spread is wider than one tick. So every trade is
  at or between the touch of the last ``book`` message before it.
* **News** picks a tone (positive, negative, neutral) and a headline template, and starts
  a drift regime for the symbols it names: the log price drifts by ``+news_drift``
  (positive), ``-news_drift`` (negative) or 0 (neutral) over the next ``regime_s``
  seconds, unless later news replaces it. The tone is not on the wire (it is the label a
  sentiment model should recover), but :attr:`SimEvent.tone` carries it for tests.

Event times come from a simulated clock: all events of all symbols form one Poisson
process (each symbol's trades, books and news with their own intensities, symbols more or
less active by a seeded weight), starting at ``start_ns``. How fast events are *sent* is
up to :func:`simulate`, independent of their timestamps.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from rayfin.stream.producer import BatchProducer, SendStats
from rayfin.stream.schemas import BookUpdate, News, Tick, encode, key_for
from rayfin.stream.topics import BOOK_TOPIC, MARKET_TOPICS, NEWS_TOPIC, TICKS_TOPIC

DEFAULT_START_NS = 1_704_205_800 * 10**9
"""2024-01-02T14:30:00Z, a market open: the default start of the simulated clock."""

TONES = ("positive", "negative", "neutral")

_HEADLINES: dict[str, tuple[str, ...]] = {
    "positive": (
        "{a} beats quarterly earnings estimates and raises full-year outlook",
        "{a} wins multi-year contract worth ${n} million",
        "Analysts upgrade {a} to buy on strong demand",
        "{a} announces ${n} million share buyback",
        "{a} reports record revenue as margins widen",
        "Regulators approve {a}'s flagship product ahead of schedule",
        "{a} and {b} shares climb after sector upgrade",
    ),
    "negative": (
        "{a} misses earnings estimates and cuts guidance",
        "{a} recalls products over safety concerns",
        "Analysts downgrade {a} to sell citing weak margins",
        "{a} faces regulatory probe into accounting practices",
        "{a} chief executive resigns unexpectedly",
        "{a} warns supply shortages will hit sales by ${n} million",
        "{a} and {b} fall as sector outlook darkens",
    ),
    "neutral": (
        "{a} to present at industry conference next week",
        "{a} schedules quarterly earnings call",
        "{a} names new independent board member",
        "{a} files annual report with regulators",
        "{a} completes previously announced office move",
        "{a} and {b} join industry standards group",
    ),
}


_MARKET_HEADLINES: dict[str, tuple[str, ...]] = {
    "positive": (
        "Stocks rally as inflation cools more than expected",
        "Fed signals patience on rates, lifting {a}",
        "Strong retail sales ease recession fears; {a} climbs",
        "Tech earnings beat estimates across the board, {a} gains",
        "Jobless claims fall to a five-year low",
        "Manufacturing index rebounds sharply, beating forecasts",
    ),
    "negative": (
        "Stocks slide as bond yields jump to a two-year high",
        "Fed hints at faster tapering; {a} drops",
        "Weak payrolls report stokes growth worries; {a} falls",
        "Oil spike on Middle East tensions weighs on {a}",
        "Manufacturing contracts for a third month",
        "Consumer confidence slumps to its lowest in a year",
    ),
    "neutral": (
        "Fed minutes due on Wednesday afternoon",
        "Treasury to auction 10-year notes this week",
        "{a} volume thin ahead of the holiday weekend",
        "Exchange updates margin requirements for {a}",
        "Markets await Friday's employment report",
    ),
}


def market_news(
    symbol: str,
    start_ns: int,
    end_ns: int,
    *,
    every_s: float = 600.0,
    seed: int = 0,
    source: str = "rayfin-sim",
) -> list[tuple[News, str]]:
    """Simulated market-wide headlines about ``symbol`` (an index future), a Poisson
    stream of one per ``every_s`` seconds on average between the two event times, each
    with its true tone (positive, negative, neutral): news to replay beside real ticks,
    which carry none."""
    if every_s <= 0:
        raise ValueError(f"every_s must be > 0, got {every_s}")
    rng = random.Random(seed)
    out: list[tuple[News, str]] = []
    ts = start_ns
    while True:
        ts += max(1, round(rng.expovariate(1.0 / every_s) * 1e9))
        if ts >= end_ns:
            return out
        tone = rng.choices(TONES, weights=(0.35, 0.35, 0.30))[0]
        headline = rng.choice(_MARKET_HEADLINES[tone]).format(a=f"{symbol} futures")
        story = News(
            ts=ts, headline=headline, symbols=[symbol], source=source, id=f"{source}-{seed}-{ts}"
        )
        out.append((story, tone))


class SimEvent(NamedTuple):
    """One simulated event: the topic, the message, and (news only) its true tone."""

    topic: str
    message: Tick | BookUpdate | News
    tone: str | None = None


@dataclass
class _Symbol:
    """The state of one simulated symbol."""

    name: str
    weight: float
    log_price: float
    last_ns: int
    drift: float = 0.0  # log price per second, while the regime lasts
    regime_end_ns: int = 0
    next_jump_ns: int = 0
    bid: int = 0  # the published touch, in ticks
    ask: int = 0


class MarketSimulator:
    """A seeded market of ``symbols`` instruments; iterate it for :class:`SimEvent`.

    Rates are per symbol per simulated second (``trade_rate``, ``book_rate``,
    ``news_rate``), scaled for each symbol by a seeded activity weight of mean 1. Two
    simulators with the same arguments yield the same events.
    """

    def __init__(
        self,
        symbols: int = 5,
        seed: int = 0,
        *,
        trade_rate: float = 4.0,
        book_rate: float = 2.0,
        news_rate: float = 1 / 600,
        sigma: float = 1.5e-4,
        jump_rate: float = 1 / 3600,
        jump_std: float = 0.005,
        news_drift: float = 0.01,
        regime_s: float = 300.0,
        levels: int = 5,
        tick_size: float = 0.01,
        start_ns: int = DEFAULT_START_NS,
        source: str = "rayfin-sim",
    ) -> None:
        if symbols < 1:
            raise ValueError(f"symbols must be >= 1, got {symbols}")
        if min(trade_rate, book_rate, news_rate) < 0 or trade_rate + book_rate + news_rate <= 0:
            raise ValueError("event rates must be >= 0, and not all 0")
        if levels < 1 or tick_size <= 0 or regime_s <= 0:
            raise ValueError("levels >= 1, tick_size > 0 and regime_s > 0 are required")
        self.seed = seed
        self.trade_rate = trade_rate
        self.book_rate = book_rate
        self.news_rate = news_rate
        self.sigma = sigma
        self.jump_rate = jump_rate
        self.jump_std = jump_std
        self.news_drift = news_drift
        self.regime_s = regime_s
        self.levels = levels
        self.tick_size = tick_size
        self.source = source
        self._decimals = max(0, -math.floor(math.log10(tick_size) + 1e-9)) + 3
        per_unit = 1 / tick_size
        self._ticks_per_unit = round(per_unit) if abs(per_unit - round(per_unit)) < 1e-9 else None
        self._depth_scales = [100.0 * (1.0 + 0.5 * depth) for depth in range(levels)]
        self._rng = random.Random(seed)
        self.now_ns = start_ns
        self._news_count = 0
        self._started = False

        rng = self._rng
        names: dict[str, None] = {}  # insertion-ordered, for determinism
        while len(names) < symbols:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.choice((3, 4))))
            names.setdefault(name)
        weights = [rng.lognormvariate(0.0, 0.5) for _ in names]
        mean_weight = sum(weights) / len(weights)
        self._symbols: list[_Symbol] = [
            _Symbol(
                name=name,
                weight=w / mean_weight,
                log_price=math.log(rng.uniform(20.0, 400.0)),
                last_ns=start_ns,
            )
            for name, w in zip(names, weights, strict=True)
        ]
        self._by_symbol = {sym.name: sym for sym in self._symbols}
        for sym in self._symbols:
            sym.next_jump_ns = start_ns + self._exp_ns(jump_rate)
        event_rate = trade_rate + book_rate + news_rate
        self._total_rate = event_rate * sum(s.weight for s in self._symbols)
        self._cum_weights: list[float] = []
        total = 0.0
        for sym in self._symbols:
            total += sym.weight
            self._cum_weights.append(total)
        self._p_trade = trade_rate / event_rate
        self._p_book = (trade_rate + book_rate) / event_rate

    @property
    def symbols(self) -> list[str]:
        """The simulated tickers, in a fixed order."""
        return [s.name for s in self._symbols]

    def price(self, symbol: str) -> float:
        """The current efficient (unquoted) price of ``symbol``."""
        return math.exp(self._by_symbol[symbol].log_price)

    # -- the clock and the price process -------------------------------------------------

    def _exp_ns(self, rate: float) -> int:
        if rate <= 0:
            return 2**62  # never
        return max(1, round(self._rng.expovariate(rate) * 1e9))

    def _advance(self, sym: _Symbol, now_ns: int) -> None:
        """Move ``sym``'s efficient price from its last update to ``now_ns``."""
        rng = self._rng
        while True:
            # Jumps happen at their own Poisson times; diffuse piecewise between them.
            until = min(now_ns, sym.next_jump_ns)
            dt = (until - sym.last_ns) / 1e9
            if dt > 0:
                in_regime = (min(until, sym.regime_end_ns) - sym.last_ns) / 1e9
                if in_regime > 0:
                    sym.log_price += sym.drift * in_regime
                sym.log_price += self.sigma * (
                    math.sqrt(dt) * rng.gauss(0.0, 1.0) - 0.5 * self.sigma * dt
                )
                sym.last_ns = until
            if sym.next_jump_ns > now_ns:
                break
            sym.log_price += rng.gauss(0.0, self.jump_std)
            sym.next_jump_ns += self._exp_ns(self.jump_rate)
        # Keep the deepest bid level above zero.
        floor = math.log(self.tick_size * (4 * self.levels + 8))
        sym.log_price = max(sym.log_price, floor)

    def _px(self, ticks: int) -> float:
        """A price on the grid, as the double nearest its decimal value."""
        if self._ticks_per_unit is not None:
            return ticks / self._ticks_per_unit
        return round(ticks * self.tick_size, self._decimals)

    # -- events ---------------------------------------------------------------------------

    def _book(self, sym: _Symbol) -> BookUpdate:
        rand = self._rng.random
        px = self._px
        mid = math.exp(sym.log_price) / self.tick_size
        u = rand()
        spread = 1 if u < 0.6 else 2 if u < 0.9 else 3
        bid = math.floor(mid - spread / 2 + 0.5)
        ask = bid + spread
        sym.bid, sym.ask = bid, ask
        bids, asks = [], []
        b, a = bid, ask
        for scale in self._depth_scales:
            # Sizes uniform around a scale that grows with depth; cheap and good enough.
            bids.append((px(b), int(scale * (0.3 + 1.4 * rand())) + 1))
            asks.append((px(a), int(scale * (0.3 + 1.4 * rand())) + 1))
            b -= 1 if rand() < 0.8 else 2
            a += 1 if rand() < 0.8 else 2
        return BookUpdate(symbol=sym.name, ts=self.now_ns, bids=bids, asks=asks)

    def _trade(self, sym: _Symbol) -> Tick:
        rng = self._rng
        if sym.ask - sym.bid > 1 and rng.random() < 0.2:
            ticks = rng.randint(sym.bid + 1, sym.ask - 1)  # inside the spread
        else:
            ticks = sym.ask if rng.random() < 0.5 else sym.bid
        size = min(10_000, max(1, round(rng.lognormvariate(math.log(50.0), 1.0))))
        return Tick(symbol=sym.name, ts=self.now_ns, price=self._px(ticks), size=size)

    def _news(self, sym: _Symbol) -> tuple[News, str]:
        rng = self._rng
        tone = rng.choices(TONES, weights=(0.35, 0.35, 0.30))[0]
        template = rng.choice(_HEADLINES[tone])
        named = [sym]
        if "{b}" in template:
            if len(self._symbols) == 1:
                template = rng.choice([t for t in _HEADLINES[tone] if "{b}" not in t])
            else:
                named.append(rng.choice([s for s in self._symbols if s is not sym]))
        headline = template.format(
            a=named[0].name,
            b=named[-1].name,
            n=rng.choice((25, 50, 120, 250, 400, 750)),
        )
        drift = {"positive": 1.0, "negative": -1.0, "neutral": 0.0}[tone]
        for other in named:
            self._advance(other, self.now_ns)  # the old regime ends now
            other.drift = drift * self.news_drift / self.regime_s
            other.regime_end_ns = self.now_ns + round(self.regime_s * 1e9)
        self._news_count += 1
        news = News(
            ts=self.now_ns,
            headline=headline,
            symbols=[s.name for s in named],
            source=self.source,
            id=f"sim-{self.seed}-{self._news_count:08d}",
        )
        return news, tone

    def __iter__(self) -> Iterator[SimEvent]:
        return self.events()

    def events(self) -> Iterator[SimEvent]:
        """Events from the current state on, forever, in timestamp order.

        The first call starts with one book per symbol at the start time, so every
        trade has a published book to trade against.
        """
        rng = self._rng
        if not self._started:
            self._started = True
            for sym in self._symbols:
                yield SimEvent(BOOK_TOPIC, self._book(sym))
        symbols, cum = self._symbols, self._cum_weights
        total_rate, last = self._total_rate, len(symbols) - 1
        while True:
            self.now_ns += max(1, round(rng.expovariate(total_rate) * 1e9))
            sym = symbols[min(bisect.bisect_right(cum, rng.random() * cum[-1]), last)]
            u = rng.random()
            if u < self._p_trade:
                yield SimEvent(TICKS_TOPIC, self._trade(sym))
            elif u < self._p_book:
                self._advance(sym, self.now_ns)
                yield SimEvent(BOOK_TOPIC, self._book(sym))
            else:
                news, tone = self._news(sym)
                yield SimEvent(NEWS_TOPIC, news, tone)


async def simulate(
    bootstrap_servers: str,
    symbols: int = 5,
    rate: float | None = None,
    seed: int = 0,
    *,
    messages: int | None = None,
    duration: float | None = None,
    topic_prefix: str = "",
    create_topics: bool = True,
    stop: asyncio.Event | None = None,
    linger_ms: int = 5,
    max_batch_size: int = 256 * 1024,
    **simulator_options: Any,
) -> SendStats:
    """Run a :class:`MarketSimulator` into Kafka: ticks, books and news to their topics.

    ``rate`` is in messages per second (None: as fast as Kafka takes them). It stops
    after ``messages`` messages or ``duration`` wall-clock seconds, whichever comes first,
    or when ``stop`` is set; with none of them it runs until cancelled. Topics are
    ``ticks``, ``book`` and ``news`` after ``topic_prefix`` (e.g. ``"dev."``), created
    first when missing if ``create_topics``. ``simulator_options`` go to
    :class:`MarketSimulator` (``trade_rate``, ...). Returns the acknowledged counts,
    keyed by the topic names used.
    """
    from rayfin.stream.topics import ensure_topics

    if messages is not None and messages < 0:
        raise ValueError(f"messages must be >= 0, got {messages}")
    simulator = MarketSimulator(symbols, seed, **simulator_options)
    if create_topics:
        await ensure_topics(bootstrap_servers, topics=[topic_prefix + t for t in MARKET_TOPICS])
    async with BatchProducer(
        bootstrap_servers, rate=rate, linger_ms=linger_ms, max_batch_size=max_batch_size
    ) as producer:
        for sent, event in enumerate(simulator):
            if messages is not None and sent >= messages:
                break
            if duration is not None and producer.elapsed >= duration:
                break
            if stop is not None and stop.is_set():
                break
            message = event.message
            await producer.send(topic_prefix + event.topic, encode(message), key_for(message))
        await producer.flush()
    return producer.stats()
