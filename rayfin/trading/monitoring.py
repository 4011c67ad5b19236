"""The feedback loop: live monitoring of the market model, and retraining when it slips.

:class:`ModelMonitor` watches a model in production. It is fed micro-batches of the feature
rows the model scored, with the probabilities it gave them, and tracks:

- **accuracy** and macro-F1 of the predictions whose label has matured. A prediction waits,
  per symbol, until its horizon has passed; it is then labelled by
  :mod:`rayfin.trading.labels` from the rows seen since, exactly as training labels rows.
  The last ``window`` matured predictions are scored;
- **feature drift**: the Population Stability Index (:func:`psi`) of each model input over
  the last ``psi_window`` rows, against the :class:`DriftReference` that training stored
  with the model in the registry (the bins of its training inputs).

:meth:`ModelMonitor.status` reports both and whether the :class:`MonitorThresholds` are
crossed. :func:`retrain_if_needed` acts on that status: it trains a candidate on recent
data, scores it and the current production model on a held-out tail of that data which the
candidate never trained on, registers the candidate, and promotes it only if it wins.

Window sizes. Consecutive tick labels share most of their horizon, so ``n`` matured
predictions hold only about ``n / horizon_ticks`` independent outcomes; tick features are as
autocorrelated, and a few thousand rows show one market mood, not the distribution. The
defaults therefore judge 20,000 rows. With a reference from the first 30,000 bundled ES
ticks (the Labor Day overnight session), 20,000-row windows over the next 50,000 (the quiet
holiday) peak at PSI 0.11 to 0.25 on their most shifted input, one window aside (0.5 on
``count_60s``); once Europe opens the next morning, 22 of the 46 inputs exceed 0.25.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import pandas as pd

from rayfin.errors import ConfigError, ModelInputError, TrainingError
from rayfin.trading.evaluation import Scores, score
from rayfin.trading.inputs import input_arrays
from rayfin.trading.labels import CLASS_NAMES, LabelSpec, make_labels
from rayfin.trading.registry import DEFAULT_ALIAS, ModelRegistry, ModelVersion
from rayfin.trading.training import feature_frame, train_model

if TYPE_CHECKING:
    from pathlib import Path

    import ray.data
    from numpy.typing import ArrayLike

    from rayfin.features.spec import FeatureSpec
    from rayfin.trading.scoring import Model

DEFAULT_BINS = 10
"""Quantile bins per input in a drift reference (deciles, the usual choice for PSI)."""
EDGE_DIGITS = 2
"""Significant digits that tell values apart when placing bin edges (see
:meth:`ColumnReference.from_values`)."""
PSI_EPSILON = 1e-4
"""Floor of a bin's share in :func:`psi`, so that an empty bin costs a large, finite term."""
PSI_STABLE = 0.1
"""PSI below this: no meaningful shift."""
PSI_SIGNIFICANT = 0.25
"""PSI above this: a significant shift (between the two: moderate, worth watching)."""

DEFAULT_WINDOW = 20_000
"""Matured predictions scored for rolling accuracy and macro-F1."""
DEFAULT_PSI_WINDOW = 20_000
"""Recent input rows compared with the drift reference."""
DEFAULT_MAX_PENDING = 100_000
"""Predictions kept waiting for their label; beyond it the oldest are dropped unscored
(only a long time horizon on a busy stream gets near it: a tick horizon of ``h`` keeps
at most ``h`` per symbol)."""
DEFAULT_HOLDOUT_FRACTION = 0.2
MIN_HOLDOUT_ROWS = 1_000
"""Fewest labelled hold-out rows :func:`retrain_if_needed` will compare models on."""

NOT_TRIGGERED = "not_triggered"
PROMOTED = "promoted"
KEPT_CURRENT = "kept_current"
RetrainAction = Literal["not_triggered", "promoted", "kept_current"]


# -- drift reference and PSI -----------------------------------------------------------------


def _float_values(values: ArrayLike, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelInputError(f"{what} must be numeric") from None
    if array.ndim != 1:
        raise ModelInputError(f"{what} must be 1-D, got shape {array.shape}")
    return array


def _round_significant(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, one representation per result."""
    out = values.copy()
    nonzero = values != 0
    v = values[nonzero]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        exponent = np.floor(np.log10(np.abs(v))) - (digits - 1)
        mantissa = np.round(v / 10.0**exponent)
        # 9.96 rounds to 10.0: carry into the exponent, so that equal results are equal floats.
        carry = np.abs(mantissa) >= 10**digits
        mantissa[carry] /= 10
        exponent[carry] += 1
        rounded = mantissa * 10.0**exponent
    # Subnormal values overflow the scaling; they stay as they are.
    out[nonzero] = np.where(np.isfinite(rounded), rounded, v)
    return out


def _bin_edges(finite: np.ndarray, bins: int) -> np.ndarray:
    if not len(finite):
        return np.empty(0)
    rounded = _round_significant(finite, EDGE_DIGITS)
    levels, counts = np.unique(rounded, return_counts=True)
    if len(levels) == 1:
        # Constant (to EDGE_DIGITS): bins below, within and above the training range.
        return np.array([finite.min(), np.nextafter(finite.max(), np.inf)])
    targets = np.quantile(rounded, np.arange(1, bins) / bins, method="inverted_cdf")
    at = np.unique(np.searchsorted(levels, targets))  # each quantile's level
    top = len(levels) - 1
    # Cut above each quantile's level, and below it too where the level is the top one
    # or holds a bin's share itself (0 for returns). A cut between levels j and j + 1
    # goes in a wide gap between training values near there, not at the rounding
    # boundary, which a cluster of nearly equal values may straddle.
    above = at[at < top]
    below = at[(at > 0) & ((at == top) | (counts[at] * bins >= len(finite)))]
    values = np.unique(finite)
    cuts = [
        _widest_gap(values, levels[j], levels[j + 1])
        for j in np.unique(np.concatenate((above, below - 1)))
    ]
    return np.unique(cuts)


def _widest_gap(values: np.ndarray, low: float, high: float) -> float:
    """The middle of the widest gap between consecutive sorted ``values`` that overlaps
    ``(low, high)``, widths discounted by the gap's distance from the middle of the two in
    steps of ``high - low``: a cut between two levels stays near them."""
    start = max(int(np.searchsorted(values, low, side="right")) - 1, 0)
    stop = min(int(np.searchsorted(values, high, side="left")), len(values) - 1)
    lows, highs = values[start:stop], values[start + 1 : stop + 1]
    middle = (low + high) / 2
    distance = np.maximum(np.maximum(lows - middle, middle - highs), 0.0)
    i = int(np.argmax((highs - lows) / (1 + distance / (high - low))))
    return float((lows[i] + highs[i]) / 2)


def _bin_shares(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    missing = np.isnan(values)
    index = np.searchsorted(edges, values[~missing], side="right")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    return np.append(counts, missing.sum()) / len(values)


@dataclass(frozen=True)
class ColumnReference:
    """The training distribution of one model input: bins and each bin's share of rows.

    Value bin ``i`` holds ``edges[i - 1] <= x < edges[i]``, the first and last bins open-
    ended, so every value has a bin; ``proportions`` are the value bins' shares and
    ``missing`` is the share of NaN, which is a bin of its own.
    """

    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    missing: float

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        shares = np.asarray((*self.proportions, self.missing), dtype=np.float64)
        if edges.ndim != 1 or np.isnan(edges).any() or (np.diff(edges) <= 0).any():
            raise ConfigError(f"bin edges must be increasing numbers, got {self.edges!r}")
        if len(self.proportions) != len(edges) + 1:
            raise ConfigError(
                f"{len(edges)} bin edges need {len(edges) + 1} proportions, "
                f"got {len(self.proportions)}"
            )
        if not np.isfinite(shares).all() or (shares < 0).any() or abs(shares.sum() - 1) > 1e-6:
            raise ConfigError(f"bin shares must be >= 0 and sum to 1, got {shares.tolist()}")

    @classmethod
    def from_values(cls, values: ArrayLike, bins: int = DEFAULT_BINS) -> Self:
        """The reference of training ``values``: about ``bins`` quantile bins, NaN apart.

        Edges fall halfway between values that differ in their first :data:`EDGE_DIGITS`
        significant digits, never between values that agree there: a one-tick log return
        is 0.25/price, a slightly different number at every price level, and an edge
        between those would read a small move in the price level as drift. A value that
        holds a bin's share or more (0 for returns) gets a bin of its own, so such columns
        have fewer bins; a constant column gets bins below, at and above its value.
        """
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ConfigError(f"bins must be an int >= 2, got {bins!r}")
        array = _float_values(values, "reference values")
        if not len(array):
            raise ModelInputError("a drift reference needs at least one value")
        edges = _bin_edges(array[np.isfinite(array)], bins)
        shares = _bin_shares(edges, array)
        return cls(
            edges=tuple(float(e) for e in edges),
            proportions=tuple(float(s) for s in shares[:-1]),
            missing=float(shares[-1]),
        )

    @property
    def expected(self) -> np.ndarray:
        """The training shares of every bin, the NaN bin last."""
        return np.asarray((*self.proportions, self.missing), dtype=np.float64)

    def shares(self, values: ArrayLike) -> np.ndarray:
        """The shares of ``values`` in this reference's bins, the NaN bin last."""
        array = _float_values(values, "observed values")
        if not len(array):
            raise ModelInputError("no observed values to compare with the reference")
        return _bin_shares(np.asarray(self.edges, dtype=np.float64), array)

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            "proportions": list(self.proportions),
            "missing": self.missing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            edges=tuple(float(e) for e in data["edges"]),
            proportions=tuple(float(p) for p in data["proportions"]),
            missing=float(data["missing"]),
        )


@dataclass(frozen=True)
class DriftReference:
    """Each model input's training distribution, stored with the model in the registry.

    ``rows`` is how many training rows it was computed from, ``bins`` the quantile bins
    asked for per input.
    """

    columns: Mapping[str, ColumnReference]
    rows: int
    bins: int = DEFAULT_BINS

    @classmethod
    def from_inputs(cls, inputs: pd.DataFrame, bins: int = DEFAULT_BINS) -> Self:
        """The reference of training ``inputs`` (:func:`~rayfin.trading.inputs.model_inputs`)."""
        if not isinstance(inputs, pd.DataFrame) or not len(inputs.columns):
            raise ModelInputError("a drift reference needs a DataFrame of model inputs")
        columns = {
            str(name): ColumnReference.from_values(inputs[name].to_numpy(np.float64), bins)
            for name in inputs.columns
        }
        return cls(columns=columns, rows=len(inputs), bins=bins)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``reference.json`` in the registry holds)."""
        return {
            "rows": self.rows,
            "bins": self.bins,
            "columns": {name: ref.to_dict() for name, ref in self.columns.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(
            columns={
                str(name): ColumnReference.from_dict(ref) for name, ref in data["columns"].items()
            },
            rows=int(data["rows"]),
            bins=int(data["bins"]),
        )


def psi(
    reference: ColumnReference | ArrayLike, observed: ArrayLike, *, epsilon: float = PSI_EPSILON
) -> float:
    """Population Stability Index of ``observed`` values against ``reference``.

    ``PSI = Σ (o - e) · ln(o / e)`` over the reference's bins (NaN is one of them), ``e``
    and ``o`` being the reference's and the observed shares, each floored at ``epsilon``.
    The usual reading: below :data:`PSI_STABLE` (0.1) stable; 0.1 to
    :data:`PSI_SIGNIFICANT` (0.25) a moderate shift, worth watching; above 0.25 a
    significant shift. ``reference`` is a :class:`ColumnReference` or raw reference values,
    binned as training bins them. A sample of ``n`` rows from the reference distribution
    itself scores roughly ``bins / n``, not 0.
    """
    if not (isinstance(epsilon, int | float) and 0 < epsilon < 1):
        raise ConfigError(f"epsilon must be in (0, 1), got {epsilon!r}")
    if not isinstance(reference, ColumnReference):
        reference = ColumnReference.from_values(reference)
    expected = np.maximum(reference.expected, epsilon)
    actual = np.maximum(reference.shares(observed), epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


# -- monitoring ------------------------------------------------------------------------------


def _count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _optional_fraction(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be in [0, 1] or None, got {value!r}")


@dataclass(frozen=True)
class MonitorThresholds:
    """When a monitored model counts as drifted or degraded (``None`` turns a check off).

    *Drifted*: at least ``min_drifted_columns`` inputs have a PSI above ``max_psi``, judged
    once ``min_psi_rows`` recent rows are in. *Degraded*: rolling accuracy below
    ``min_accuracy``, macro-F1 below ``min_macro_f1``, or macro-F1 more than
    ``max_f1_drop`` below the model's own cross-validated macro-F1 (``cv_macro_f1`` in its
    metrics), judged once ``min_matured`` predictions are in the window.

    Defaults: PSI 0.25 is the conventional "significant shift". The accuracy a model should
    reach depends on the market and the label, so no absolute bar is set; instead the
    model is held to its own validation score. A drop of 0.1 in macro-F1 is about twice its
    sampling noise over 10,000 to 20,000 predictions of a 100-tick label (one to two hundred
    independent outcomes); a uniform guess scores about 0.32 on ES's class mix.
    """

    max_psi: float = PSI_SIGNIFICANT
    min_drifted_columns: int = 1
    min_psi_rows: int = DEFAULT_PSI_WINDOW
    min_accuracy: float | None = None
    min_macro_f1: float | None = None
    max_f1_drop: float | None = 0.1
    min_matured: int = DEFAULT_WINDOW // 2

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_psi, bool)
            or not isinstance(self.max_psi, int | float)
            or not 0 < self.max_psi < math.inf
        ):
            raise ConfigError(f"max_psi must be a positive number, got {self.max_psi!r}")
        _count("min_drifted_columns", self.min_drifted_columns)
        _count("min_psi_rows", self.min_psi_rows)
        _count("min_matured", self.min_matured)
        _optional_fraction("min_accuracy", self.min_accuracy)
        _optional_fraction("min_macro_f1", self.min_macro_f1)
        _optional_fraction("max_f1_drop", self.max_f1_drop)


@dataclass(frozen=True)
class MonitorStatus:
    """What :meth:`ModelMonitor.status` sees now.

    ``observed`` rows were fed in all; ``matured`` of their predictions have been scored,
    ``pending`` still wait for their label and ``dropped`` were given up unscored (see
    ``max_pending``). ``accuracy`` and ``macro_f1`` cover the last ``window_matured``
    matured predictions (``None`` before the first). ``psi`` is each input's PSI over the
    last ``psi_rows`` rows, empty until ``min_psi_rows`` are in; ``drifted_columns`` are the
    inputs above the threshold. ``reasons`` say which thresholds are crossed.
    """

    name: str
    version: int
    observed: int
    matured: int
    pending: int
    dropped: int
    window_matured: int
    accuracy: float | None
    macro_f1: float | None
    psi: dict[str, float]
    psi_rows: int
    max_psi: float | None
    drifted_columns: tuple[str, ...]
    drifted: bool
    degraded: bool
    reasons: tuple[str, ...] = field(default=())

    @property
    def triggered(self) -> bool:
        """Whether retraining is called for: the inputs drifted or the model degraded."""
        return self.drifted or self.degraded


class _Ring:
    """The last ``capacity`` rows of a 2-D array, in fixed memory."""

    def __init__(self, capacity: int, width: int, dtype: type) -> None:
        self.data = np.zeros((capacity, width), dtype=dtype)
        self.size = 0
        self.head = 0  # where the next row goes

    def extend(self, rows: np.ndarray) -> None:
        capacity = len(self.data)
        rows = rows[-capacity:]
        n = len(rows)
        first = min(n, capacity - self.head)
        self.data[self.head : self.head + first] = rows[:first]
        self.data[: n - first] = rows[first:]
        self.head = (self.head + n) % capacity
        self.size = min(capacity, self.size + n)

    def rows(self) -> np.ndarray:
        """The kept rows (in no particular order: the statistics here ignore order)."""
        return self.data[: self.size] if self.size < len(self.data) else self.data


_NO_TIME = np.iinfo(np.int64).min


class ModelMonitor:
    """Rolling accuracy and input drift of one model version (see the module docstring).

    ``reference`` is the model's :class:`DriftReference` (``registry.reference(name,
    version)``; :meth:`from_registry` fetches both). ``label_spec`` defaults to the one the
    model was trained on; another one is refused, since its predictions are classes of that
    label. ``window`` matured predictions are scored, the last ``psi_window`` input rows
    are compared with the reference, and at most ``max_pending`` predictions wait for their
    label: memory stays bounded however long the monitor runs. Not thread-safe: feed it
    from one place.
    """

    def __init__(
        self,
        model: Model,
        label_spec: LabelSpec | None = None,
        *,
        reference: DriftReference,
        window: int = DEFAULT_WINDOW,
        psi_window: int = DEFAULT_PSI_WINDOW,
        thresholds: MonitorThresholds | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        version = model.version
        spec = version.label_spec if label_spec is None else label_spec
        if not isinstance(spec, LabelSpec):
            raise ConfigError(f"label_spec must be a LabelSpec, got {type(spec).__name__}")
        if spec != version.label_spec:
            raise ConfigError(
                f"{version.name} v{version.version} predicts labels of "
                f"{version.label_spec.describe()}, not {spec.describe()}"
            )
        if not isinstance(reference, DriftReference):
            raise ConfigError(f"reference must be a DriftReference, got {type(reference).__name__}")
        uncovered = [name for name in model.features if name not in reference.columns]
        if uncovered:
            raise ConfigError(
                f"the drift reference has no bins for {version.name} v{version.version}'s "
                f"inputs {uncovered}"
            )
        self.thresholds = thresholds if thresholds is not None else MonitorThresholds()
        if not isinstance(self.thresholds, MonitorThresholds):
            raise ConfigError(
                f"thresholds must be MonitorThresholds, got {type(self.thresholds).__name__}"
            )
        self.window = _count("window", window)
        self.psi_window = _count("psi_window", psi_window)
        self.max_pending = _count("max_pending", max_pending)
        if self.thresholds.min_matured > self.window:
            raise ConfigError(
                f"min_matured {self.thresholds.min_matured} can never be reached with a "
                f"window of {self.window}"
            )
        if self.thresholds.min_psi_rows > self.psi_window:
            raise ConfigError(
                f"min_psi_rows {self.thresholds.min_psi_rows} can never be reached with a "
                f"psi_window of {self.psi_window}"
            )
        self.model = model
        self.label_spec = spec
        self.reference = reference
        self._features = list(model.features)
        self._inputs = _Ring(self.psi_window, len(self._features), np.float64)
        self._outcomes = _Ring(self.window, 2, np.int8)  # (label, predicted class)
        self._pending = self._empty_pending()
        self._watermarks: dict[Any, int] = {}
        self._next_seq = 0
        self._observed = 0
        self._matured = 0
        self._dropped = 0

    @classmethod
    def from_registry(
        cls,
        registry: ModelRegistry,
        name: str,
        ref: int | str = DEFAULT_ALIAS,
        **options: Any,
    ) -> Self:
        """A monitor of the version ``ref`` (number or alias) of ``name``, with its reference.

        ``options`` go to the constructor.
        """
        version = registry.get(name, ref).version  # an alias could move between two reads
        model = registry.load(name, version)
        return cls(model, reference=registry.reference(name, version), **options)

    @staticmethod
    def _empty_pending() -> dict[str, np.ndarray]:
        return {
            "symbol": np.empty(0, dtype=object),
            "ts": np.empty(0, dtype=np.int64),  # event time: the symbol's watermark
            "price": np.empty(0, dtype=np.float64),
            "seq": np.empty(0, dtype=np.int64),  # arrival order
            "pred": np.empty(0, dtype=np.int8),
        }

    def observe(self, features: pd.DataFrame, probs: np.ndarray) -> int:
        """Record a scored micro-batch; return how many predictions matured with it.

        ``features`` are the engine feature rows the model scored (``symbol``, ``ts`` in
        int64 ns and ``price``; ``seq``, when present, orders each symbol's rows) and
        ``probs`` its ``[n, 3]`` probabilities for them. Each symbol's rows must arrive in
        order across batches, as the feature engine emits them.
        """
        if not isinstance(features, pd.DataFrame):
            raise ModelInputError(f"features must be a DataFrame, got {type(features).__name__}")
        missing = [c for c in ("symbol", "ts", "price") if c not in features.columns]
        if missing:
            raise ModelInputError(f"monitored feature rows need columns {missing}")
        n = len(features)
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (n, len(CLASS_NAMES)):
            raise ModelInputError(
                f"probs must be [{n}, {len(CLASS_NAMES)}] for {n} rows, got {probs.shape}"
            )
        if not np.isfinite(probs).all():
            raise ModelInputError("probs must be finite")
        ts = features["ts"].to_numpy()
        if ts.dtype.kind not in "iu":
            raise ModelInputError(f"ts must be int64 ns since the epoch, got {ts.dtype}")
        try:
            price = features["price"].to_numpy(np.float64)
        except (TypeError, ValueError):
            raise ModelInputError(f"price must be numeric, got {features['price'].dtype}") from None
        if n == 0:
            return 0
        columns = input_arrays(features, only=self._features)
        self._inputs.extend(np.column_stack(list(columns.values())))

        symbols = features["symbol"].to_numpy()
        codes, uniques = pd.factorize(symbols)
        if "seq" in features.columns:
            order = np.lexsort((features["seq"].to_numpy(), codes))
        else:
            order = np.argsort(codes, kind="stable")
        codes, ts = codes[order], ts[order].astype(np.int64)
        # Event time as labels.py defines it: a late row counts at its symbol's watermark,
        # carried over from earlier batches. Passed as ``ts``, labels.py sees the same times
        # as on the whole stream, which is why the window can drop old rows.
        event = np.empty(n, dtype=np.int64)
        bounds = np.flatnonzero(np.diff(codes)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, n], strict=True):
            symbol = uniques[codes[start]]
            marks = np.maximum.accumulate(
                np.maximum(ts[start:stop], self._watermarks.get(symbol, _NO_TIME))
            )
            event[start:stop] = marks
            self._watermarks[symbol] = int(marks[-1])
        new = {
            "symbol": symbols[order].astype(object),
            "ts": event,
            "price": price[order],
            "seq": self._next_seq + np.arange(n, dtype=np.int64),
            "pred": np.argmax(probs[order], axis=1).astype(np.int8),
        }
        self._next_seq += n
        self._observed += n
        pending = {key: np.concatenate((self._pending[key], new[key])) for key in new}
        return self._score_matured(pending)

    def _score_matured(self, pending: dict[str, np.ndarray]) -> int:
        # Relabel what is pending: once a row's label is known, so is every earlier row's
        # of its symbol, so what stays pending is a suffix per symbol and holds every price
        # the rest still need.
        frame = pd.DataFrame(
            {key: pending[key] for key in ("symbol", "ts", "price", "seq")}, copy=False
        )
        labels = make_labels(frame, self.label_spec)
        matured = labels >= 0
        if matured.any():
            outcomes = np.column_stack((labels[matured], pending["pred"][matured]))
            self._outcomes.extend(outcomes.astype(np.int8))
        count = int(matured.sum())
        self._matured += count
        keep = ~matured
        excess = int(keep.sum()) - self.max_pending
        if excess > 0:
            # Rows are in arrival order: give up on the oldest.
            keep[np.flatnonzero(keep)[:excess]] = False
            self._dropped += excess
        self._pending = {key: values[keep] for key, values in pending.items()}
        return count

    def status(self) -> MonitorStatus:
        """Rolling scores, drift and the thresholds crossed (see :class:`MonitorStatus`)."""
        limits = self.thresholds
        version = self.model.version
        reasons: list[str] = []

        outcomes = self._outcomes.rows()
        accuracy = macro_f1 = None
        degraded = False
        if len(outcomes):
            scores = score(outcomes[:, 0], outcomes[:, 1])
            accuracy, macro_f1 = scores.accuracy, scores.macro_f1
        if len(outcomes) >= limits.min_matured:
            assert accuracy is not None
            assert macro_f1 is not None
            over = f"over the last {len(outcomes)} matured predictions"
            if limits.min_accuracy is not None and accuracy < limits.min_accuracy:
                reasons.append(f"accuracy {accuracy:.3f} < {limits.min_accuracy:g} {over}")
            if limits.min_macro_f1 is not None and macro_f1 < limits.min_macro_f1:
                reasons.append(f"macro-F1 {macro_f1:.3f} < {limits.min_macro_f1:g} {over}")
            validated = version.metrics.get("cv_macro_f1")
            if (
                limits.max_f1_drop is not None
                and isinstance(validated, int | float)
                and macro_f1 < validated - limits.max_f1_drop
            ):
                reasons.append(
                    f"macro-F1 {macro_f1:.3f} is more than {limits.max_f1_drop:g} below the "
                    f"model's cross-validated {validated:.3f} {over}"
                )
            degraded = bool(reasons)

        rows = self._inputs.rows()
        values: dict[str, float] = {}
        if len(rows) >= limits.min_psi_rows:
            values = {
                name: psi(self.reference.columns[name], rows[:, j])
                for j, name in enumerate(self._features)
            }
        above = tuple(name for name, value in values.items() if value > limits.max_psi)
        drifted = len(above) >= limits.min_drifted_columns
        if drifted:
            worst = sorted(above, key=lambda name: -values[name])
            listed = ", ".join(f"{name} {values[name]:.2f}" for name in worst[:5])
            more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
            reasons.append(
                f"{len(above)} input(s) drifted past PSI {limits.max_psi:g} over the last "
                f"{len(rows)} rows: {listed}{more}"
            )
        return MonitorStatus(
            name=version.name,
            version=version.version,
            observed=self._observed,
            matured=self._matured,
            pending=len(self._pending["seq"]),
            dropped=self._dropped,
            window_matured=len(outcomes),
            accuracy=accuracy,
            macro_f1=macro_f1,
            psi=values,
            psi_rows=len(rows),
            max_psi=max(values.values()) if values else None,
            drifted_columns=above,
            drifted=drifted,
            degraded=degraded,
            reasons=tuple(reasons),
        )


# -- retraining ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOutcome:
    """What :func:`retrain_if_needed` did, and why.

    ``action`` is ``not_triggered`` (no threshold crossed: nothing trained), ``promoted``
    (the candidate beat the current model on the hold-out and now holds the alias) or
    ``kept_current`` (it did not; it is registered but not promoted). ``triggers`` are the
    monitor's reasons, ``reason`` the decision's. Both models' :class:`Scores` are on the
    same ``holdout_rows`` labelled rows from ``holdout_start_ns`` on, which the candidate
    did not train on.
    """

    action: RetrainAction
    reason: str
    triggers: tuple[str, ...]
    current: ModelVersion | None = None
    candidate: ModelVersion | None = None
    current_scores: Scores | None = None
    candidate_scores: Scores | None = None
    holdout_start_ns: int | None = None
    holdout_rows: int = 0

    @property
    def promoted(self) -> bool:
        return self.action == PROMOTED


_TRAINING_OWNED = frozenset(
    {"data", "name", "registry", "register", "label_spec", "feature_spec", "seed"}
)


def retrain_if_needed(
    status: MonitorStatus,
    recent: pd.DataFrame | ray.data.Dataset,
    *,
    registry: ModelRegistry | str | Path | None = None,
    name: str | None = None,
    alias: str = DEFAULT_ALIAS,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    min_improvement: float = 0.0,
    feature_spec: FeatureSpec | None = None,
    seed: int = 0,
    **train_options: Any,
) -> RetrainOutcome:
    """Retrain when ``status`` crossed a threshold; promote the candidate only if it wins.

    ``recent`` is recent raw ticks or engine feature rows (as
    :func:`~rayfin.trading.training.train_model` takes them). Its labelled rows are put in
    time order and the last ``holdout_fraction`` of them held out. The candidate trains,
    with the current model's label definition, on the rows before the hold-out only; their
    labels are recomputed there, so a row whose horizon reaches into the hold-out is
    unlabelled and left out (the purge). The candidate is registered under ``name``
    (default: the monitored model's), then it and the version ``alias`` points to are
    scored on the hold-out. Promotion needs the candidate's macro-F1 to beat the current
    one's by more than ``min_improvement``; at an exact macro-F1 tie (with
    ``min_improvement`` 0) the lower balanced log loss wins, the loss training minimises.
    Otherwise the current version keeps the alias. Macro-F1 comes first because the
    decisions trade on the predicted class, and it cannot be gamed by favouring FLAT.

    ``train_options`` (``search``, ``max_rounds``, ``n_splits``, ...) go to
    :func:`~rayfin.trading.training.train_model`.
    """
    if not isinstance(status, MonitorStatus):
        raise TrainingError(f"status must be a MonitorStatus, got {type(status).__name__}")
    if not (
        isinstance(holdout_fraction, int | float)
        and not isinstance(holdout_fraction, bool)
        and 0 < holdout_fraction < 1
    ):
        raise TrainingError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    if not (isinstance(min_improvement, int | float) and 0 <= min_improvement < 1):
        raise TrainingError(f"min_improvement must be in [0, 1), got {min_improvement!r}")
    owned = sorted(_TRAINING_OWNED & set(train_options))
    if owned:
        raise TrainingError(f"retraining sets {owned} itself")
    name = status.name if name is None else name
    if name != status.name:
        raise TrainingError(f"the status is of model {status.name!r}, not {name!r}")
    if not status.triggered:
        return RetrainOutcome(
            action=NOT_TRIGGERED, reason="no monitoring threshold is crossed", triggers=()
        )

    if not isinstance(registry, ModelRegistry):
        registry = ModelRegistry(registry)
    current = registry.get(name, alias)
    spec = current.label_spec
    features = feature_frame(recent, feature_spec)
    labels = make_labels(features, spec)
    ts = features["ts"].to_numpy().astype(np.int64)
    start = _holdout_start(ts[labels >= 0], holdout_fraction)
    holdout = (ts >= start) & (labels >= 0)
    # Rows before the hold-out only; train_model relabels them on their own, which leaves
    # every row whose horizon reaches the hold-out unlabelled: no training label has seen
    # a hold-out price.
    candidate = train_model(
        features[ts < start],
        name=name,
        label_spec=spec,
        registry=registry,
        register=True,
        seed=seed,
        **train_options,
    )
    rows, y = features[holdout], labels[holdout].astype(np.int64)
    candidate_scores = _scores(registry.load(name, candidate.version), rows, y)
    current_scores = _scores(registry.load(name, current.version), rows, y)
    wins, reason = _compare(candidate_scores, current_scores, min_improvement)
    if wins:
        registry.promote(name, candidate.version, alias)
    return RetrainOutcome(
        action=PROMOTED if wins else KEPT_CURRENT,
        reason=f"v{candidate.version} vs v{current.version} on the hold-out: {reason}",
        triggers=status.reasons,
        current=current,
        candidate=candidate,
        current_scores=current_scores,
        candidate_scores=candidate_scores,
        holdout_start_ns=start,
        holdout_rows=len(y),
    )


def _holdout_start(labelled_ts: np.ndarray, fraction: float) -> int:
    """The time the hold-out starts: the last ``fraction`` of labelled rows, ties included."""
    ordered = np.sort(labelled_ts)
    n = len(ordered)
    size = math.ceil(n * fraction)
    if size < MIN_HOLDOUT_ROWS:
        raise TrainingError(
            f"{n} labelled recent rows leave {size} for the hold-out; comparing models needs "
            f"at least {MIN_HOLDOUT_ROWS}: pass more recent data or a larger holdout_fraction"
        )
    start = int(ordered[n - size])
    if start <= ordered[0]:
        raise TrainingError("no recent rows are left before the hold-out to train on")
    return start


def _scores(model: Model, rows: pd.DataFrame, y: np.ndarray) -> Scores:
    proba = model.predict_proba(rows)
    return score(y, np.argmax(proba, axis=1), proba)


def _compare(candidate: Scores, current: Scores, min_improvement: float) -> tuple[bool, str]:
    gain = candidate.macro_f1 - current.macro_f1
    f1 = f"macro-F1 {candidate.macro_f1:.4f} vs {current.macro_f1:.4f}"
    assert candidate.balanced_log_loss is not None
    assert current.balanced_log_loss is not None
    loss = f"balanced log loss {candidate.balanced_log_loss:.4f} vs {current.balanced_log_loss:.4f}"
    if gain > min_improvement:
        return True, f"{f1}: the candidate is better"
    if gain == 0 and min_improvement == 0:
        if candidate.balanced_log_loss < current.balanced_log_loss:
            return True, f"{f1}, tied; {loss}: the candidate is better"
        return False, f"{f1}, tied; {loss}: the candidate is no better"
    needed = f" (needs more than +{min_improvement:g})" if min_improvement else ""
    return False, f"{f1}{needed}: the candidate is no better"
