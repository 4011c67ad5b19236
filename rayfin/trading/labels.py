"""Class labels for the market model: where the price goes over a forward horizon.

A row's label compares the symbol's price ``horizon`` ahead with its price now: ``UP`` if it
rose by at least ``threshold`` points, ``DOWN`` if it fell by at least that much, ``FLAT``
otherwise. Rows whose horizon reaches past the symbol's last row have not *matured*: their
outcome is still unknown, they get :data:`UNLABELLED` and never enter training.

Horizons follow the feature engine's rules (:mod:`rayfin.features.engine`): tick horizons
count the symbol's ticks in arrival order (``seq``), time horizons run on event time, where
a late row counts at its symbol's watermark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import pandas as pd

from rayfin.errors import TrainingError

DOWN, FLAT, UP = 0, 1, 2
"""Class indices, also the column order of predicted probabilities."""

CLASS_NAMES: tuple[str, ...] = ("down", "flat", "up")
"""Names of the classes, by index."""

UNLABELLED = -1
"""Label of a row whose horizon has not matured yet."""

DEFAULT_HORIZON_TICKS = 100
NS_PER_SECOND = 1_000_000_000

# Price changes are differences of decimal prices; an exact multiple of the threshold can
# come out a hair short in binary floating point, so comparisons allow this much slack.
_RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LabelSpec:
    """The label definition: a forward horizon (ticks *or* seconds) and a move threshold.

    Give ``horizon_ticks`` or ``horizon_seconds``; when neither is given the horizon is
    :data:`DEFAULT_HORIZON_TICKS` ticks. ``threshold`` is in price points (ES: 0.25 = one
    tick) and a move of exactly ``threshold`` counts as ``UP``/``DOWN``.

    The defaults (100 ticks, 0.25 points) were chosen on the bundled ES ticks' first
    400,000 rows (the training part; the last 100,000 are held out): DOWN 25.7 %, FLAT
    49.4 %, UP 25.0 % of the matured rows. ES rarely moves two ticks within 100 trades, so
    a 0.5-point threshold leaves FLAT at 92.8 % (DOWN 3.6 %, UP 3.7 %); 200 ticks / 0.5
    points gives 8.7 / 82.8 / 8.6 % for a move that clears a round-trip's costs.
    """

    horizon_ticks: int | None = None
    horizon_seconds: float | None = None
    threshold: float = 0.25

    def __post_init__(self) -> None:
        ticks, seconds = self.horizon_ticks, self.horizon_seconds
        if ticks is not None and seconds is not None:
            raise TrainingError(
                "give horizon_ticks or horizon_seconds, not both "
                f"(got {ticks!r} ticks and {seconds!r} s)"
            )
        if ticks is None and seconds is None:
            object.__setattr__(self, "horizon_ticks", DEFAULT_HORIZON_TICKS)
        elif ticks is not None and (
            isinstance(ticks, bool) or not isinstance(ticks, int | np.integer) or ticks <= 0
        ):
            raise TrainingError(f"horizon_ticks must be a positive int, got {ticks!r}")
        elif ticks is not None:
            object.__setattr__(self, "horizon_ticks", int(ticks))
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise TrainingError(f"horizon_seconds must be a number, got {seconds!r}")
            if not math.isfinite(seconds) or round(seconds * NS_PER_SECOND) <= 0:
                raise TrainingError(f"horizon_seconds must be positive, got {seconds!r}")
            object.__setattr__(self, "horizon_seconds", float(seconds))
        threshold = self.threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise TrainingError(f"threshold must be positive points, got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))

    @property
    def horizon_ns(self) -> int | None:
        """The time horizon in nanoseconds, or ``None`` for a tick horizon."""
        if self.horizon_seconds is None:
            return None
        return round(self.horizon_seconds * NS_PER_SECOND)

    def describe(self) -> str:
        """Short text form, e.g. ``100 ticks, ±0.25``."""
        horizon = (
            f"{self.horizon_ticks} ticks"
            if self.horizon_ticks is not None
            else f"{self.horizon_seconds:g} s"
        )
        return f"{horizon}, ±{self.threshold:g}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, stored with each model version."""
        return {
            "horizon_ticks": self.horizon_ticks,
            "horizon_seconds": self.horizon_seconds,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(
            horizon_ticks=data.get("horizon_ticks"),
            horizon_seconds=data.get("horizon_seconds"),
            threshold=data["threshold"],
        )


def make_labels(features: pd.DataFrame, spec: LabelSpec | None = None) -> np.ndarray:
    """Class of each feature row (:data:`DOWN`/:data:`FLAT`/:data:`UP`), int8.

    ``features`` needs ``symbol``, ``ts`` and ``price`` (``seq`` orders each symbol's rows
    when present, else row order does); rows may come in any order, the labels line up with
    them. Unmatured rows are :data:`UNLABELLED`.
    """
    return _label_arrays(features, spec or LabelSpec())[0]


def label_end_times(features: pd.DataFrame, spec: LabelSpec | None = None) -> np.ndarray:
    """When each row's label becomes known, in ns (int64), aligned with ``features``.

    That is the event time of the tick ``horizon_ticks`` later, or the row's event time
    plus ``horizon_seconds``; cross-validation purges training rows whose label end reaches
    into a validation fold. Unmatured rows get ``int64`` max.
    """
    return _label_arrays(features, spec or LabelSpec())[1]


def labels_and_ends(
    features: pd.DataFrame, spec: LabelSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_labels` and :func:`label_end_times` in one pass."""
    return _label_arrays(features, spec or LabelSpec())


def _column(features: pd.DataFrame, name: str) -> np.ndarray:
    if name not in features.columns:
        raise TrainingError(f"labels need a {name!r} column; got columns {list(features.columns)}")
    return features[name].to_numpy()


def _label_arrays(features: pd.DataFrame, spec: LabelSpec) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(spec, LabelSpec):
        raise TrainingError(f"spec must be a LabelSpec, got {type(spec).__name__}")
    codes, _ = pd.factorize(pd.Series(_column(features, "symbol")))
    ts = _column(features, "ts")
    if ts.dtype.kind not in "iu":
        raise TrainingError(f"ts must be int64 ns since the epoch, got {ts.dtype}")
    ts = ts.astype(np.int64, copy=False)
    price = _column(features, "price").astype(np.float64, copy=False)
    n = len(ts)
    labels = np.full(n, UNLABELLED, dtype=np.int8)
    ends = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    if n == 0:
        return labels, ends
    # Sort by symbol, then the symbol's arrival order; work on the sorted view.
    within = _column(features, "seq") if "seq" in features.columns else np.arange(n)
    order = np.lexsort((within, codes))
    sym = codes[order]
    bounds = np.flatnonzero(np.diff(sym)) + 1
    starts = np.concatenate(([0], bounds))
    stops = np.concatenate((bounds, [n]))
    ts_s, price_s = ts[order], price[order]
    future = np.full(n, -1, dtype=np.int64)  # sorted position of the horizon's price
    end_s = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    for start, stop in zip(starts, stops, strict=True):
        # Event time: late rows count at the watermark, as in the feature engine.
        event = np.maximum.accumulate(ts_s[start:stop])
        rows = np.arange(start, stop)
        if spec.horizon_ticks is not None:
            target = rows + spec.horizon_ticks
            matured = target < stop
            future[start:stop] = np.where(matured, target, -1)
            end_s[rows[matured]] = event[target[matured] - start]
        else:
            horizon = spec.horizon_ns
            assert horizon is not None
            due = event + horizon
            # The price at t + H is the last trade at or before it; it is final only once
            # a trade at or after t + H has been seen.
            last = start + np.searchsorted(event, due, side="right") - 1
            matured = due <= event[-1]
            future[start:stop] = np.where(matured, last, -1)
            end_s[rows[matured]] = due[matured]
    matured = future >= 0
    change = np.where(matured, price_s[np.maximum(future, 0)] - price_s, 0.0)
    slack = spec.threshold * _RELATIVE_TOLERANCE
    sorted_labels = np.full(n, FLAT, dtype=np.int8)
    sorted_labels[change >= spec.threshold - slack] = UP
    sorted_labels[change <= -spec.threshold + slack] = DOWN
    sorted_labels[~matured] = UNLABELLED
    labels[order] = sorted_labels
    ends[order] = end_s
    return labels, ends


def class_counts(labels: np.ndarray) -> dict[str, int]:
    """Rows per class name among the matured ``labels``."""
    counts = np.bincount(labels[labels >= 0].astype(np.int64), minlength=len(CLASS_NAMES))
    return {name: int(count) for name, count in zip(CLASS_NAMES, counts, strict=True)}
