"""Per-row indicator formulas: log returns, window statistics from sums, EMA and Wilder RSI.

EMA and RSI are first-order recurrences ``y_i = a * y_{i-1} + (1 - a) * x_i``. They run in
``scipy.signal.lfilter``, which is a sequential loop, with the filter state carried from
chunk to chunk: continuing a filter from its final state is the same arithmetic as never
having stopped, so the result does not depend on the chunking.
"""

from __future__ import annotations

import numpy as np


def lag_log_returns(price_w: np.ndarray, first: int, seq: np.ndarray, lag: int) -> np.ndarray:
    """``log(p_i / p_{i-lag})`` for working rows ``first..``; NaN until ``lag`` ticks precede."""
    out = np.full(len(seq), np.nan)
    ok = seq >= lag
    rows = first + np.flatnonzero(ok)
    out[ok] = np.log(price_w[rows] / price_w[rows - lag])
    return out


def window_stats(
    sums: np.ndarray, count: np.ndarray, n_returns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean price, volatility, VWAP and volume from per-window sums.

    ``sums`` columns are ``[price, price*size, size, ret, ret**2]`` (see
    :data:`TICK_SUM_COLUMNS`); ``n_returns`` is how many 1-tick returns the window holds.
    Volatility is the sample (ddof=1) standard deviation of those returns, NaN below two.
    """
    s_price, s_notional, s_size, s_ret, s_ret2 = sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s_price / count
        vwap = s_notional / s_size
        k = n_returns.astype(np.float64)
        var = (s_ret2 - s_ret * (s_ret / k)) / (k - 1.0)
        # Rounding can leave a constant window's variance a hair below zero.
        vol = np.sqrt(np.maximum(var, 0.0))
    vol[n_returns < 2] = np.nan
    return mean, vol, vwap, s_size.copy()


TICK_SUM_COLUMNS = ("price", "notional", "size", "ret", "ret2")
"""Columns summed over every tick window, in :func:`window_stats` order."""


def _smooth(x: np.ndarray, alpha: float, state: float) -> tuple[np.ndarray, float]:
    """``y_i = (1 - alpha) * y_{i-1} + alpha * x_i`` from filter state ``(1 - alpha) * y_prev``."""
    # Imported here: scipy.signal takes ~1 s to import, and importing rayfin.features (for
    # the bars, say) should not pay for it until a feature is computed.
    from scipy.signal import lfilter

    y, zf = lfilter([alpha], [1.0, alpha - 1.0], x, zi=[state])
    return y, float(zf[0])


def ema(
    price: np.ndarray, seq: np.ndarray, span: int, carry: dict[str, float], key: str
) -> np.ndarray:
    """EMA with ``alpha = 2 / (span + 1)``, seeded with the symbol's first price.

    NaN for the first ``span - 1`` ticks (the warm-up rule of tick-count windows).
    """
    alpha = 2.0 / (span + 1.0)
    out = np.empty(len(price))
    start = 0
    if key not in carry:  # this chunk holds the symbol's first tick
        out[0] = price[0]
        carry[key] = (1.0 - alpha) * price[0]
        start = 1
    if start < len(price):
        out[start:], carry[key] = _smooth(price[start:], alpha, carry[key])
    out[seq < span - 1] = np.nan
    return out


def wilder_rsi(
    price_w: np.ndarray, first: int, seq: np.ndarray, period: int, carry: dict[str, float]
) -> np.ndarray:
    """Wilder's RSI over 1-tick price changes, for working rows ``first..``.

    The average gain/loss starts as the simple mean of the first ``period`` changes (at
    tick ``period``) and is then smoothed with ``alpha = 1 / period``. RSI is
    ``100 * gain / (gain + loss)``: 100 after only gains, 50 when the price has not moved.
    NaN before tick ``period``. Needs the symbol's first ``period + 1`` prices in ``price_w``
    until it is seeded.
    """
    m = len(seq)
    out = np.full(m, np.nan)
    change = np.diff(price_w[max(first - 1, 0) :])
    if first == 0:  # the symbol's first tick has no change; keep rows and changes aligned
        change = np.concatenate(([0.0], change))
    gain = np.maximum(change, 0.0)
    loss = np.maximum(-change, 0.0)
    alpha = 1.0 / period
    start = 0
    if "rsi_gain" not in carry:
        seed_row = period - int(seq[0])
        if seed_row >= m:
            return out
        # Until the seed is taken the symbol's whole history is retained, so its first
        # period + 1 prices start at working row first - seq[0].
        base = first - int(seq[0])
        seed_change = np.diff(price_w[base : base + period + 1])
        g0 = float(np.maximum(seed_change, 0.0).sum() / period)
        l0 = float(np.maximum(-seed_change, 0.0).sum() / period)
        out[seed_row] = _rsi(np.array([g0]), np.array([l0]))[0]
        carry["rsi_gain"] = (1.0 - alpha) * g0
        carry["rsi_loss"] = (1.0 - alpha) * l0
        start = seed_row + 1
    if start < m:
        avg_gain, carry["rsi_gain"] = _smooth(gain[start:], alpha, carry["rsi_gain"])
        avg_loss, carry["rsi_loss"] = _smooth(loss[start:], alpha, carry["rsi_loss"])
        out[start:] = _rsi(avg_gain, avg_loss)
    return out


def _rsi(avg_gain: np.ndarray, avg_loss: np.ndarray) -> np.ndarray:
    total = avg_gain + avg_loss
    with np.errstate(invalid="ignore", divide="ignore"):
        rsi = 100.0 * avg_gain / total
    rsi[total == 0.0] = 50.0
    return rsi
