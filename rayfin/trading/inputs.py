"""Model inputs: engine feature rows turned into stationary columns for the market model.

Tree models split on absolute values, so a model fitted on yesterday's price levels has
nothing to say once the market trends out of that range. Every input is therefore a level-
free quantity: log returns, volatilities, RSI, volumes and counts pass through; each price
level (SMA, EMA, VWAP, tumbling-bar means, book mid and microprice) becomes the trade price
minus that level, in price points, the unit the labels' threshold is in. Identity columns
(``symbol``, ``ts``, ``partition``, ``offset``, ``seq``, ``late``, tumbling-bar ids and
starts) and the raw price are left out. Book columns (``spread``, ``imbalance_*``, ...) are
used only when the frame carries them.

``sentiment`` is always an input: the news-sentiment score in [-1, 1], neutral 0.0 until a
source provides it, so that a model trained now accepts it later unchanged.

Training and live scoring both build inputs here; the model's metadata records which
input columns it was fitted on (see :mod:`rayfin.trading.scoring`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from rayfin.errors import ModelInputError
from rayfin.features.sentiment import SENTIMENT

NEUTRAL_SENTIMENT = 0.0
PRICE = "price"
LEVEL_PREFIX = "price_minus_"
"""Prefix of inputs that are the trade price minus a price level, in points."""

# Price levels: the input is price minus the level.
_LEVEL = re.compile(r"^(?:(?:sma|ema|vwap)_\w+|tumble_\w+_(?:sma|vwap)|mid|microprice)$")
# Level-free columns, used as they are.
_PASS = re.compile(
    r"^(?:(?:ret|vol|volume|count|rsi)_\w+|tumble_\w+_(?:count|vol|volume)|size"
    r"|spread|spread_bps|bid_size|ask_size|imbalance_\w+)$"
)

Columns = pd.DataFrame | Mapping[str, Any]


def _names(features: Columns) -> list[str]:
    if isinstance(features, pd.DataFrame):
        return [str(name) for name in features.columns]
    if isinstance(features, Mapping):
        return [str(name) for name in features]
    raise ModelInputError(
        f"features must be a DataFrame or a mapping of columns, got {type(features).__name__}"
    )


def _array(features: Columns, name: str) -> np.ndarray:
    values = features[name]
    arr = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
    try:
        return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise ModelInputError(f"column {name!r} must be numeric, got {arr.dtype}") from None


def _rows(features: Columns, names: list[str]) -> int:
    if isinstance(features, pd.DataFrame):
        return len(features)
    lengths = {name: len(np.atleast_1d(np.asarray(features[name]))) for name in names}
    if len(set(lengths.values())) > 1:
        raise ModelInputError(f"feature columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def input_arrays(
    features: Columns,
    sentiment: float | np.ndarray | pd.Series | None = None,
    *,
    only: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """The model inputs of ``features`` as float64 column arrays (see the module docstring).

    ``sentiment`` overrides the frame's ``sentiment`` column with a scalar or one value per
    row; without either, it is :data:`NEUTRAL_SENTIMENT`. ``only`` builds just those inputs
    (in that order), raising :class:`~rayfin.errors.ModelInputError` that names the
    feature columns missing for them.
    """
    names = _names(features)
    present = set(names)
    rows = _rows(features, names)
    if only is None:
        wanted = []
        for name in names:
            if _LEVEL.match(name) and PRICE in present:
                wanted.append(LEVEL_PREFIX + name)
            elif _PASS.match(name):
                wanted.append(name)
        wanted.append(SENTIMENT)
    else:
        wanted = list(only)
        missing = {
            source for name in wanted for source in required_columns(name) if source not in present
        }
        if missing:
            raise ModelInputError(
                f"feature columns missing for the model's inputs: {sorted(missing)}"
            )
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name == SENTIMENT:
            out[name] = _sentiment(features, present, sentiment, rows)
        elif name.startswith(LEVEL_PREFIX):
            out[name] = _array(features, PRICE) - _array(features, name[len(LEVEL_PREFIX) :])
        else:
            out[name] = _array(features, name)
    return out


def sentiment_input(
    features: Columns, sentiment: float | np.ndarray | pd.Series | None = None
) -> np.ndarray:
    """The ``sentiment`` input alone, one value per row of ``features``: what the model
    sees (see :func:`input_arrays` for ``sentiment``)."""
    names = _names(features)
    return _sentiment(features, set(names), sentiment, _rows(features, names))


def _sentiment(
    features: Columns,
    present: set[str],
    sentiment: float | np.ndarray | pd.Series | None,
    rows: int,
) -> np.ndarray:
    if sentiment is None:
        if SENTIMENT not in present:
            return np.full(rows, NEUTRAL_SENTIMENT)
        values = _array(features, SENTIMENT)
    else:
        values = np.asarray(sentiment, dtype=np.float64)
        if values.ndim == 0:
            return np.full(rows, float(values))
        if values.shape != (rows,):
            raise ModelInputError(
                f"sentiment must be a scalar or {rows} values, got shape {values.shape}"
            )
    # A missing score is no news, which is what neutral means.
    return np.where(np.isnan(values), NEUTRAL_SENTIMENT, values)


def model_inputs(
    features: Columns, sentiment: float | np.ndarray | pd.Series | None = None
) -> pd.DataFrame:
    """Every model input ``features`` supports, as a float64 DataFrame, one row per row.

    See :func:`input_arrays` for ``sentiment``.
    """
    return pd.DataFrame(input_arrays(features, sentiment), copy=False)


def required_columns(input_name: str) -> list[str]:
    """The feature columns one model input is computed from."""
    if input_name == SENTIMENT:
        return []  # defaults to neutral
    if input_name.startswith(LEVEL_PREFIX):
        return [PRICE, input_name[len(LEVEL_PREFIX) :]]
    return [input_name]


def is_input_name(name: str) -> bool:
    """Whether ``name`` is a column :func:`model_inputs` can produce."""
    if name == SENTIMENT:
        return True
    if name.startswith(LEVEL_PREFIX):
        return bool(_LEVEL.match(name[len(LEVEL_PREFIX) :]))
    return bool(_PASS.match(name))
