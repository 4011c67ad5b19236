"""Purged walk-forward cross-validation for labels that look ahead.

Rows are put in time order and cut into ``n_splits + 1`` blocks of about equal size. Fold
``k`` validates on block ``k + 1`` and trains on everything before it (an expanding window),
so training rows always precede validation rows. A row's label is only known at its label
end (``horizon`` later); a training row whose label end is not strictly before the
validation fold's first timestamp saw prices from the validation period and is *purged*.
The *embargo* then drops the training rows whose label end falls within ``embargo`` of that
start as well, a margin against serial correlation across the boundary.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from rayfin.errors import TrainingError

Split = tuple[np.ndarray, np.ndarray]


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise TrainingError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def purged_walk_forward(
    ts: np.ndarray,
    n_splits: int,
    horizon: int | np.ndarray,
    embargo: int = 0,
    *,
    unit: Literal["ns", "ticks"] = "ns",
) -> list[Split]:
    """``n_splits`` (train indices, validation indices) pairs into ``ts``, oldest fold first.

    ``ts`` is each row's time (int64 ns; any order, ties allowed: equal times never straddle
    a fold boundary). ``horizon`` is how far each label looks ahead:

    - with ``unit="ns"``, an int (nanoseconds, the same for every row) or an array of each
      row's label end time in ns (e.g. :func:`rayfin.trading.labels.label_end_times`, the
      exact form for tick horizons over several symbols);
    - with ``unit="ticks"``, an int count of rows ahead in time order (one symbol's stream).

    ``embargo`` is in the same unit. Indices are sorted ascending. Raises
    :class:`~rayfin.errors.TrainingError` when a fold would have no training rows left.
    """
    n_splits = _check_count("n_splits", n_splits, 1)
    embargo = _check_count("embargo", embargo, 0)
    if unit not in ("ns", "ticks"):
        raise TrainingError(f"unit must be 'ns' or 'ticks', got {unit!r}")
    ts = np.asarray(ts)
    if ts.ndim != 1 or (ts.size and ts.dtype.kind not in "iu"):
        raise TrainingError(f"ts must be a 1-D int64 ns array, got {ts.dtype} {ts.shape}")
    ts = ts.astype(np.int64, copy=False)
    n = len(ts)
    if n < n_splits + 1:
        raise TrainingError(f"{n} rows cannot make {n_splits} folds")
    order = np.argsort(ts, kind="stable")
    sorted_ts = ts[order]

    if isinstance(horizon, np.ndarray):
        if unit != "ns":
            raise TrainingError("per-row label end times are in ns; use unit='ns'")
        ends = horizon.astype(np.int64, copy=False)
        if ends.shape != (n,):
            raise TrainingError(f"label end times must have shape ({n},), got {ends.shape}")
        if (ends < ts).any():
            raise TrainingError("a label cannot end before its row's time")
        # Key on which the purge compares: the label end, in time.
        key = ends[order]
    else:
        horizon = _check_count("horizon", horizon, 0)
        # Ticks: compare positions in time order instead (exact for one stream).
        key = sorted_ts + horizon if unit == "ns" else np.arange(n, dtype=np.int64) + horizon

    # Block boundaries by row count, moved back so that equal times stay in one block.
    cuts = [n * k // (n_splits + 1) for k in range(1, n_splits + 2)]
    bounds = [int(np.searchsorted(sorted_ts, sorted_ts[c], side="left")) for c in cuts[:-1]]
    bounds.append(n)

    splits: list[Split] = []
    for k in range(n_splits):
        val_start, val_stop = bounds[k], bounds[k + 1]
        if val_start == val_stop:
            raise TrainingError(
                f"fold {k} is empty: too many rows share a timestamp for {n_splits} folds"
            )
        # The validation fold starts at this time (ns) or position (ticks).
        start = sorted_ts[val_start] if unit == "ns" else val_start
        keep = key[:val_start] < start - embargo
        if not keep.any():
            raise TrainingError(
                f"fold {k} has no training rows left after purging the horizon and embargo; "
                "use fewer folds, a shorter horizon or more data"
            )
        train = np.sort(order[:val_start][keep])
        val = np.sort(order[val_start:val_stop])
        splits.append((train, val))
    return splits
