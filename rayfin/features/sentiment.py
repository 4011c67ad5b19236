"""News sentiment as a per-symbol feature: scored stories, decayed over event time.

One definition, two executors. A story is a scored headline: its event time ``t_i`` (ns),
the symbols it names (none: market-wide, it applies to every symbol) and its score
``s_i`` in [-1, 1] (the scorer's P(positive) - P(negative)). The sentiment of a symbol
at event time ``t`` is

    clip(sum of s_i * 2 ** (-(t - t_i) / half_life) over its stories with t_i <= t, -1, 1)

so a story counts fully when it breaks, half after ``half_life_s`` (default 30 minutes),
and never before its own time; several stories the same way add up, to at most ±1.

:class:`SentimentBook` keeps that value live, story by story, in O(1) per story and
symbol it applies to (a market-wide story updates every symbol); it is what the live
trader holds. :func:`sentiment_series` computes it for a whole history at
once (backtests); a test holds the two to the same values.

**The running sum.** Per symbol the book keeps an *anchor* time ``a`` and the decayed sum
``S`` at ``a`` of the stories folded in so far (all with ``t_i <= a``); the value at any
``t >= a`` is ``S * 2 ** (-(t - a) / half_life)``, because ``2 ** (-(t - a)/h) *
2 ** (-(a - t_i)/h) = 2 ** (-(t - t_i)/h)``. The same identity gives the rule for a story
arriving out of time order, at ``t_i <= a``: add ``s_i * 2 ** (-(a - t_i) / h)`` to ``S``
at once. Every value at ``t >= a`` is then what time-ordered arrival gives (the sum is
linear; only float rounding differs). A story newer than the anchor is kept apart until
:meth:`SentimentBook.advance` says no tick of the symbol before it will be asked about
(the live trader advances each symbol to its newest tick traded), so a tick earlier than a
story never sees it. A tick earlier than its symbol's anchor (a late tick, older than a
story already folded in) reads the value at the anchor.
"""

from __future__ import annotations

import bisect
import math
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_HALF_LIFE_S", "SentimentBook", "sentiment_series"]

DEFAULT_HALF_LIFE_S = 1800.0
"""Seconds after which a story counts half: news moves prices for tens of minutes."""
SENTIMENT = "sentiment"
"""The story score column of a news frame, and the feature column it becomes."""
_HORIZON_HALF_LIVES = 64
"""A story kept apart this many half-lives behind its symbol's newest is folded in anyway:
what bounds the stories kept apart for a symbol no tick advances (folding changes no value
at or after the anchor)."""
_FORMAT = 1  # bumped whenever what a snapshot holds changes shape


@dataclass(slots=True)
class _Stories:
    """One symbol's stories: ``total`` is the decayed sum at ``anchor`` of those folded in;
    the newer ones wait apart, in time order."""

    anchor: int = 0
    total: float = 0.0
    times: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def copy(self) -> _Stories:
        return _Stories(self.anchor, self.total, list(self.times), list(self.scores))


class SentimentBook:
    """Decayed news sentiment per symbol, kept story by story (see the module docstring).

    Picklable; :meth:`snapshot` and :meth:`restore` carry it through a checkpoint.
    """

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if not (math.isfinite(half_life_s) and half_life_s > 0):
            raise ValueError(f"half_life_s must be a finite number > 0, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self.stories = 0  # stories added
        self.changes = 0  # bumped on every change of state, so a holder saves only news
        self._market = _Stories()  # market-wide stories: where a new symbol starts from
        self._symbols: dict[str, _Stories] = {}

    @property
    def _half_life_ns(self) -> float:
        return self.half_life_s * 1e9

    def _decay(self, dt_ns: int) -> float:
        return 2.0 ** (-dt_ns / self._half_life_ns)

    def _of(self, symbol: str) -> _Stories:
        stories = self._symbols.get(symbol)
        if stories is None:
            # A symbol first seen now has had every market-wide story so far.
            stories = self._symbols[symbol] = self._market.copy()
        return stories

    # -- updates ---------------------------------------------------------------------

    def add(self, ts_ns: int, symbols: Iterable[str], score: float) -> None:
        """One scored story at event time ``ts_ns`` about ``symbols`` (none: every symbol)."""
        ts_ns, score = int(ts_ns), float(score)
        if ts_ns < 0 or not math.isfinite(score):
            raise ValueError(f"a story needs ts_ns >= 0 and a finite score, got {ts_ns}, {score}")
        named = list(dict.fromkeys(symbols))
        # Market-wide news goes to every symbol (each keeps its own anchor) and to the
        # market's own stories, for symbols not seen yet.
        targets = [self._of(s) for s in named] if named else [self._market, *self._symbols.values()]
        for stories in targets:
            self._add(stories, ts_ns, score)
        self.stories += 1
        self.changes += 1

    def _add(self, stories: _Stories, ts: int, score: float) -> None:
        if ts <= stories.anchor:
            # Out of time order, behind the anchor: decayed to the anchor now, it counts
            # at every t >= anchor exactly as if it had come in order.
            stories.total += score * self._decay(stories.anchor - ts)
            return
        i = bisect.bisect_right(stories.times, ts)
        stories.times.insert(i, ts)
        stories.scores.insert(i, score)
        horizon = stories.times[-1] - round(_HORIZON_HALF_LIVES * self._half_life_ns)
        if stories.times[0] <= horizon:
            self._fold(stories, horizon)

    def advance(self, symbol: str, ts_ns: int) -> bool:
        """No tick of ``symbol`` before ``ts_ns`` will be asked about (beyond late ones):
        fold its stories up to then into the running sum. Returns whether anything changed."""
        if not self.stories:
            return False
        created = symbol not in self._symbols
        folded = self._fold(self._of(symbol), int(ts_ns))
        if created or folded:
            self.changes += 1
        return created or folded

    def _fold(self, stories: _Stories, upto: int) -> bool:
        k = bisect.bisect_right(stories.times, upto)
        if k == 0:
            return False
        anchor = stories.times[k - 1]  # the newest story folded in
        total = stories.total * self._decay(anchor - stories.anchor)
        for ts, score in zip(stories.times[:k], stories.scores[:k], strict=True):
            total += score * self._decay(anchor - ts)
        stories.anchor, stories.total = anchor, total
        del stories.times[:k], stories.scores[:k]
        return True

    # -- reads -----------------------------------------------------------------------

    def at(self, symbol: str, ts_ns: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """The sentiment of ``symbol`` at each event time of ``ts_ns`` (a batch of its
        ticks): stories after a tick's time do not count for it."""
        ts = np.atleast_1d(np.asarray(ts_ns, dtype=np.int64))
        stories = self._symbols.get(symbol, self._market)
        h = self._half_life_ns
        # Ticks before the anchor read the value at the anchor (see the module docstring).
        since = np.maximum(ts - stories.anchor, 0).astype(np.float64)
        values = stories.total * np.exp2(-since / h)
        if stories.times:
            lag = ts[:, None] - np.asarray(stories.times, dtype=np.int64)[None, :]
            weights = np.where(lag >= 0, np.exp2(-np.maximum(lag, 0) / h), 0.0)
            values += weights @ np.asarray(stories.scores, dtype=np.float64)
        return np.clip(values, -1.0, 1.0)

    def for_rows(self, symbols: np.ndarray, ts_ns: np.ndarray) -> np.ndarray:
        """:meth:`at` for each row of a batch of several symbols' ticks."""
        ts = np.asarray(ts_ns, dtype=np.int64)
        values = np.zeros(len(ts))
        if self.stories:
            for symbol, at in _by_symbol(np.asarray(symbols)):
                values[at] = self.at(symbol, ts[at])
        return values

    def advance_rows(self, symbols: np.ndarray, ts_ns: np.ndarray) -> bool:
        """:meth:`advance` each symbol of a batch of ticks to its newest tick."""
        ts = np.asarray(ts_ns, dtype=np.int64)
        changed = False
        if self.stories:
            for symbol, at in _by_symbol(np.asarray(symbols)):
                changed |= self.advance(symbol, int(ts[at].max()))
        return changed

    def symbols(self) -> list[str]:
        """Symbols with stories of their own or having been advanced, sorted."""
        return sorted(self._symbols)

    # -- checkpoints -----------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The book as bytes, for :meth:`restore`."""
        return pickle.dumps({"format": _FORMAT, "book": self}, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, snapshot: bytes) -> SentimentBook:
        """The book a :meth:`snapshot` holds."""
        # Only rayfin writes snapshots, into its own checkpoints.
        state = pickle.loads(snapshot)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("SentimentBook.restore: the snapshot is from another rayfin version")
        return state["book"]


def sentiment_series(
    rows: pd.DataFrame, news: pd.DataFrame | None, half_life_s: float = DEFAULT_HALF_LIFE_S
) -> np.ndarray:
    """The sentiment of each row of ``rows`` (``symbol``, ``ts``: ticks or feature rows)
    from ``news`` (``ts``, ``symbols``, ``sentiment``: one scored story a row, as the
    archive's ``news`` table holds them), as of the row's time; see the module docstring.
    Rows without news are 0.0."""
    values = np.zeros(len(rows))
    if news is None or not len(news) or not len(rows):
        return values
    if not (math.isfinite(half_life_s) and half_life_s > 0):
        raise ValueError(f"half_life_s must be a finite number > 0, got {half_life_s!r}")
    story_ts = news["ts"].to_numpy(np.int64)
    scores = news[SENTIMENT].to_numpy(np.float64)
    market: list[int] = []
    named: dict[str, list[int]] = {}
    for i, symbols in enumerate(news["symbols"]):
        names = [] if symbols is None else list(dict.fromkeys(symbols))
        if not names:
            market.append(i)
        for symbol in names:
            named.setdefault(symbol, []).append(i)
    symbols = rows["symbol"].to_numpy()
    ts = rows["ts"].to_numpy(np.int64)
    half_life_ns = half_life_s * 1e9
    for symbol in pd.unique(symbols):
        stories = np.array(market + named.get(symbol, []), dtype=np.int64)
        if len(stories):
            at = symbols == symbol
            values[at] = _as_of(ts[at], story_ts[stories], scores[stories], half_life_ns)
    return np.clip(values, -1.0, 1.0)


def _by_symbol(symbols: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each symbol of a batch with the positions of its rows."""
    return [(s, np.flatnonzero(symbols == s)) for s in dict.fromkeys(symbols.tolist())]


def _as_of(ts: np.ndarray, story_ts: np.ndarray, scores: np.ndarray, h: float) -> np.ndarray:
    """The decayed sum at each of ``ts`` of the stories at or before it (unclipped)."""
    order = np.argsort(story_ts, kind="stable")
    story_ts, scores = story_ts[order], scores[order]
    # The sum just after each story, carried from the one before it.
    running = np.empty(len(scores))
    total, last = 0.0, int(story_ts[0])
    for j, (t, s) in enumerate(zip(story_ts.tolist(), scores.tolist(), strict=True)):
        total = total * 2.0 ** (-(t - last) / h) + s
        running[j], last = total, t
    latest = np.searchsorted(story_ts, ts, side="right") - 1
    seen = latest >= 0
    latest = np.maximum(latest, 0)
    since = np.maximum(ts - story_ts[latest], 0)
    return np.where(seen, running[latest] * np.exp2(-since / h), 0.0)
