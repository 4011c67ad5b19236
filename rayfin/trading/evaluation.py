"""Out-of-sample evaluation of the market model: an expanding walk-forward over time blocks.

:func:`walk_forward` sorts the feature rows by event time and cuts them into an initial
training block (``train_fraction`` of the rows) followed by ``folds`` test blocks of equal
size. Step ``k`` trains on every row before test block ``k`` and predicts that block:

- the LightGBM model comes from :func:`~rayfin.trading.training.train_model`, whose Ray
  Tune search and early stopping run on purged CV folds *inside* the training rows, so no
  choice is ever made on the test block;
- training sees only the rows whose event time is before the block (less
  ``embargo_seconds``). Their labels are recomputed on that prefix, so a row whose label
  would need a price from the block is unmatured there and drops out: the purge. Features
  are causal (each row depends on earlier ticks only), so slicing them is exact;
- two baselines fit on the same training rows and inputs: the training set's majority
  class (its probabilities are the training class frequencies) and a multinomial logistic
  regression (standardised inputs, missing values set to the training mean plus a
  missing-indicator column, balanced class weights like the LightGBM model's).

Every model is scored per block and pooled over all blocks: accuracy, balanced accuracy,
per-class precision/recall/F1, macro-F1, log loss, balanced log loss (each class's mean
log loss, averaged: the loss training minimises, ln 3 for a uniform guess) and the
confusion matrix. LightGBM gain importances are averaged over the blocks as shares.

Models trained with balanced class weights give probabilities calibrated as if the
classes were equally frequent: judge them on balanced log loss and macro-F1; their plain
log loss is expected to trail the class-frequency prior.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rayfin.errors import RayfinError, TrainingError
from rayfin.trading.inputs import model_inputs
from rayfin.trading.labels import CLASS_NAMES, LabelSpec, class_counts, labels_and_ends
from rayfin.trading.registry import ModelRegistry
from rayfin.trading.training import SearchSpace, feature_frame, train_model

if TYPE_CHECKING:
    import ray.data
    from sklearn.pipeline import Pipeline

    from rayfin.features.spec import FeatureSpec

log = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("lightgbm", "logistic", "majority")
"""The evaluated models, in report order: the market model, then the baselines."""
NUM_CLASSES = len(CLASS_NAMES)
UNIFORM_LOGLOSS = math.log(NUM_CLASSES)
PROBABILITY_FLOOR = 1e-15
"""Probabilities are clipped to this before taking logs, so one confident miss is a large
but finite loss."""
LOGISTIC_MAX_ITER = 1000
NS_PER_SECOND = 1_000_000_000
_FOLD_MODEL = "walk-forward"  # the model name in each fold's throw-away registry


@dataclass(frozen=True)
class Scores:
    """Classification scores of one model on some test rows.

    Per-class tuples are in class order (DOWN, FLAT, UP). A class never predicted has
    precision 0; macro-F1 averages all three classes. ``confusion[i][j]`` counts rows of
    true class ``i`` predicted as ``j``. The log losses are ``None`` for a model without
    probabilities.
    """

    rows: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]
    log_loss: float | None
    balanced_log_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; per-class values keyed by class name."""
        return {
            "rows": self.rows,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "log_loss": self.log_loss,
            "balanced_log_loss": self.balanced_log_loss,
            "per_class": {
                name: {
                    "precision": self.precision[c],
                    "recall": self.recall[c],
                    "f1": self.f1[c],
                    "support": self.support[c],
                }
                for c, name in enumerate(CLASS_NAMES)
            },
            "confusion": [list(row) for row in self.confusion],
        }


def score(y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None = None) -> Scores:
    """:class:`Scores` of predictions ``pred`` (and probabilities ``proba``) against ``y``."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if y.shape != pred.shape or y.ndim != 1 or not len(y):
        raise TrainingError(f"need equal, non-empty label arrays, got {y.shape} and {pred.shape}")
    if y.min() < 0 or y.max() >= NUM_CLASSES or pred.min() < 0 or pred.max() >= NUM_CLASSES:
        raise TrainingError(f"labels and predictions must be class indices 0..{NUM_CLASSES - 1}")
    confusion = np.bincount(y * NUM_CLASSES + pred, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(NUM_CLASSES), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(NUM_CLASSES), where=support > 0)
    # F1 = 2tp / (2tp + fp + fn), taken as 0 for a class neither present nor predicted.
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros(NUM_CLASSES), where=denominator > 0)
    present = support > 0
    log_loss = balanced = None
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        if proba.shape != (len(y), NUM_CLASSES):
            raise TrainingError(f"probabilities must be [{len(y)}, 3], got {proba.shape}")
        losses = -np.log(np.clip(proba[np.arange(len(y)), y], PROBABILITY_FLOOR, 1.0))
        log_loss = float(losses.mean())
        balanced = float(np.mean([losses[y == c].mean() for c in np.flatnonzero(present)]))
    return Scores(
        rows=len(y),
        accuracy=float(tp.sum() / len(y)),
        balanced_accuracy=float(recall[present].mean()),
        macro_f1=float(f1.mean()),
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        f1=tuple(float(v) for v in f1),
        support=tuple(int(v) for v in support),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        log_loss=log_loss,
        balanced_log_loss=balanced,
    )


@dataclass(frozen=True)
class Fold:
    """One walk-forward step: what was trained on, what was tested, how each model did.

    Times are event times in ns since the epoch (UTC). ``train_rows`` are the labelled rows
    trained on; ``purged_rows`` are rows before the test block left out because their
    label needs a price from the block (or from the embargo before it);
    ``last_label_end_ns`` is the latest label end among the training rows. ``params`` are
    the searched parameters the inner CV chose, with the refit's ``num_boost_round``.
    ``importance`` is the LightGBM gain per input.
    """

    index: int
    train_start_ns: int
    train_end_ns: int
    test_start_ns: int
    test_end_ns: int
    train_rows: int
    purged_rows: int
    test_rows: int
    last_label_end_ns: int
    train_class_counts: dict[str, int]
    test_class_counts: dict[str, int]
    params: dict[str, Any]
    inner_cv_logloss: float
    trials: int
    logistic_iterations: int
    scores: dict[str, Scores]
    importance: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, times as ns and as ISO 8601 UTC."""
        return {
            "index": self.index,
            "train_start": _iso(self.train_start_ns),
            "train_end": _iso(self.train_end_ns),
            "test_start": _iso(self.test_start_ns),
            "test_end": _iso(self.test_end_ns),
            "train_start_ns": self.train_start_ns,
            "train_end_ns": self.train_end_ns,
            "test_start_ns": self.test_start_ns,
            "test_end_ns": self.test_end_ns,
            "last_label_end_ns": self.last_label_end_ns,
            "train_rows": self.train_rows,
            "purged_rows": self.purged_rows,
            "test_rows": self.test_rows,
            "train_class_counts": dict(self.train_class_counts),
            "test_class_counts": dict(self.test_class_counts),
            "params": _jsonable(self.params),
            "inner_cv_logloss": self.inner_cv_logloss,
            "trials": self.trials,
            "logistic_iterations": self.logistic_iterations,
            "scores": {name: s.to_dict() for name, s in self.scores.items()},
            "importance_gain": dict(self.importance),
        }


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`walk_forward`: its set-up, every fold, and pooled scores.

    ``pooled`` scores each model on all test rows of all folds together; ``importance``
    is ``(input, mean gain share, mean gain)`` per LightGBM input, the share being the
    input's fraction of a fold's total gain, averaged over folds; most important first.
    """

    rows: int
    labelled_rows: int
    symbols: tuple[str, ...]
    start_ns: int
    end_ns: int
    label_spec: LabelSpec
    class_counts: dict[str, int]
    folds: tuple[Fold, ...]
    train_fraction: float
    embargo_seconds: float
    search: SearchSpace
    n_splits: int
    max_rounds: int
    early_stopping_rounds: int
    seed: int
    inputs: tuple[str, ...]
    pooled: dict[str, Scores]
    importance: tuple[tuple[str, float, float], ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain-data form."""
        return {
            "setup": {
                "rows": self.rows,
                "labelled_rows": self.labelled_rows,
                "symbols": list(self.symbols),
                "start": _iso(self.start_ns),
                "end": _iso(self.end_ns),
                "label_spec": self.label_spec.to_dict(),
                "class_counts": dict(self.class_counts),
                "folds": len(self.folds),
                "train_fraction": self.train_fraction,
                "embargo_seconds": self.embargo_seconds,
                "search": {
                    "grid": _jsonable(self.search.grid),
                    "fixed": _jsonable(self.search.fixed),
                    "samples": self.search.samples,
                },
                "inner_cv_folds": self.n_splits,
                "max_rounds": self.max_rounds,
                "early_stopping_rounds": self.early_stopping_rounds,
                "seed": self.seed,
                "inputs": list(self.inputs),
                "uniform_logloss": UNIFORM_LOGLOSS,
                "seconds": self.seconds,
            },
            "pooled": {name: s.to_dict() for name, s in self.pooled.items()},
            "folds": [fold.to_dict() for fold in self.folds],
            "importance": [
                {"input": name, "gain_share": share, "gain": gain}
                for name, share, gain in self.importance
            ],
        }

    def to_markdown(self, top: int = 15) -> str:
        """A report: set-up, pooled comparison, per class, per fold, top ``top`` inputs."""
        return _markdown(self, top)


def walk_forward(
    data: pd.DataFrame | ray.data.Dataset,
    *,
    label_spec: LabelSpec | None = None,
    folds: int = 4,
    train_fraction: float = 0.5,
    embargo_seconds: float = 0.0,
    search: SearchSpace | None = None,
    n_splits: int = 3,
    max_rounds: int = 500,
    early_stopping_rounds: int = 25,
    num_threads: int = 1,
    feature_spec: FeatureSpec | None = None,
    seed: int = 0,
) -> Evaluation:
    """Walk-forward evaluation of the market model and two baselines (module docstring).

    ``data`` is raw ticks or engine feature rows, as :func:`train_model` takes them. The
    first ``train_fraction`` of the rows (by event time) only ever train; the rest make
    ``folds`` test blocks. ``embargo_seconds`` widens the gap before each test block and
    is also the embargo of the inner CV. ``search``, ``n_splits``, ``max_rounds``,
    ``early_stopping_rounds``, ``num_threads`` and ``seed`` go to :func:`train_model`.
    Starts Ray if it is not running yet.
    """
    started = time.perf_counter()
    spec = label_spec if label_spec is not None else LabelSpec()
    if not isinstance(spec, LabelSpec):
        raise TrainingError(f"label_spec must be a LabelSpec, got {type(spec).__name__}")
    space = search if search is not None else SearchSpace()
    if not isinstance(space, SearchSpace):
        raise TrainingError(f"search must be a SearchSpace, got {type(space).__name__}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise TrainingError(f"folds must be a positive int, got {folds!r}")
    if not (isinstance(train_fraction, int | float) and 0 < train_fraction < 1):
        raise TrainingError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    if not (isinstance(embargo_seconds, int | float) and 0 <= embargo_seconds < math.inf):
        raise TrainingError(f"embargo_seconds must be >= 0, got {embargo_seconds!r}")
    embargo_ns = round(embargo_seconds * NS_PER_SECOND)

    features = feature_frame(data, feature_spec)
    labels, _ = labels_and_ends(features, spec)
    ts = features["ts"].to_numpy().astype(np.int64, copy=False)
    bounds = _block_times(np.sort(ts, kind="stable"), folds, float(train_fraction))
    inputs = model_inputs(features)
    names = tuple(str(c) for c in inputs.columns)
    train_options = {
        "label_spec": spec,
        "search": space,
        "n_splits": n_splits,
        "embargo_seconds": embargo_seconds,
        "max_rounds": max_rounds,
        "early_stopping_rounds": early_stopping_rounds,
        "num_threads": num_threads,
        "seed": seed,
    }

    results: list[Fold] = []
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {
        name: [] for name in MODELS
    }
    for k in range(folds):
        test_start, test_stop = bounds[k], bounds[k + 1]
        fold, predictions = _run_fold(
            k,
            features,
            inputs,
            labels,
            ts,
            spec,
            test_start=test_start,
            test_stop=test_stop,
            cutoff=test_start - embargo_ns,
            train_options=train_options,
        )
        results.append(fold)
        for name, prediction in predictions.items():
            pooled[name].append(prediction)
        log.info(
            "fold %d/%d: %d train, %d purged, %d test rows; macro-F1 %s",
            k + 1,
            folds,
            fold.train_rows,
            fold.purged_rows,
            fold.test_rows,
            ", ".join(f"{n} {s.macro_f1:.3f}" for n, s in fold.scores.items()),
        )

    pooled_scores = {name: _pooled_score(parts) for name, parts in pooled.items()}
    return Evaluation(
        rows=len(features),
        labelled_rows=int((labels >= 0).sum()),
        symbols=tuple(str(s) for s in pd.unique(features["symbol"].astype(str))),
        start_ns=int(ts.min()),
        end_ns=int(ts.max()),
        label_spec=spec,
        class_counts=class_counts(labels),
        folds=tuple(results),
        train_fraction=float(train_fraction),
        embargo_seconds=float(embargo_seconds),
        search=space,
        n_splits=n_splits,
        max_rounds=max_rounds,
        early_stopping_rounds=early_stopping_rounds,
        seed=seed,
        inputs=names,
        pooled=pooled_scores,
        importance=_mean_importance(results, names),
        seconds=time.perf_counter() - started,
    )


def _block_times(sorted_ts: np.ndarray, folds: int, train_fraction: float) -> list[int]:
    """Start times of the ``folds`` test blocks, then one past the last row's time.

    Blocks are cut by row count and each cut moved back to the first row of its
    timestamp, so that rows sharing a time never straddle a block boundary.
    """
    n = len(sorted_ts)
    first = round(n * train_fraction)
    if first < 1 or n - first < folds:
        raise TrainingError(
            f"{n} rows cannot make a training block of {train_fraction:g} and {folds} test blocks"
        )
    cuts = [first + (n - first) * k // folds for k in range(folds)]
    starts = [int(np.searchsorted(sorted_ts, sorted_ts[c], side="left")) for c in cuts]
    if starts[0] == 0 or len(set(starts)) < folds:
        raise TrainingError(
            f"too many rows share a timestamp to cut {folds} test blocks; use fewer folds "
            "or more data"
        )
    return [int(sorted_ts[s]) for s in starts] + [int(sorted_ts[-1]) + 1]


def _run_fold(
    index: int,
    features: pd.DataFrame,
    inputs: pd.DataFrame,
    labels: np.ndarray,
    ts: np.ndarray,
    spec: LabelSpec,
    *,
    test_start: int,
    test_stop: int,
    cutoff: int,
    train_options: Mapping[str, Any],
) -> tuple[Fold, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """Train every model on the rows before ``cutoff``, score them on the test block."""
    before = ts < cutoff
    if not before.any():
        raise TrainingError(f"fold {index} has no rows before its test block and embargo")
    prefix = features[before]
    # The labels train_model computes on the same prefix: rows whose label needs a price
    # from at or after the cutoff are unmatured there, which is what purges them.
    train_labels, train_ends = labels_and_ends(prefix, spec)
    trained = train_labels >= 0
    if not trained.any():
        raise TrainingError(f"fold {index} has no labelled training rows left after the purge")
    last_end = int(train_ends[trained].max())
    if last_end >= cutoff:  # cannot happen: prefix labels only see prefix prices
        raise TrainingError(f"fold {index}: a training label ends after the test block starts")
    y_train = train_labels[trained].astype(np.int64)
    x_train = inputs[before][trained]

    test = (ts >= test_start) & (ts < test_stop) & (labels >= 0)
    if not test.any():
        raise TrainingError(f"fold {index} has no labelled test rows")
    y_test = labels[test].astype(np.int64)
    test_features = features[test]

    with tempfile.TemporaryDirectory(prefix="rayfin-eval-") as folder:
        # train_model returns no booster unless it registers one: register into a
        # throw-away registry and score through the same Model that serving would load.
        registry = ModelRegistry(Path(folder))
        version = train_model(prefix, name=_FOLD_MODEL, registry=registry, **train_options)
        model = registry.load(_FOLD_MODEL, version.version)
    if version.metrics["rows"] != len(y_train):
        raise TrainingError(
            f"fold {index}: training used {version.metrics['rows']} rows, expected {len(y_train)}"
        )
    gbm_proba = model.predict_proba(test_features)
    gain = model.booster.feature_importance(importance_type="gain")
    importance = {
        str(name): float(value)
        for name, value in zip(model.booster.feature_name(), gain, strict=True)
    }

    logistic = _fit_logistic(x_train.to_numpy(np.float64), y_train)
    x_test = inputs[test].to_numpy(np.float64)
    logistic_proba = logistic.predict_proba(x_test)

    train_counts = np.bincount(y_train, minlength=NUM_CLASSES)
    majority = int(np.argmax(train_counts))  # ties go to the lower class index
    prior = np.tile(train_counts / train_counts.sum(), (len(y_test), 1))

    predictions = {
        "lightgbm": (y_test, np.argmax(gbm_proba, axis=1), gbm_proba),
        "logistic": (y_test, np.argmax(logistic_proba, axis=1), logistic_proba),
        "majority": (y_test, np.full(len(y_test), majority), prior),
    }
    searched = {key: version.params[key] for key in train_options["search"].grid}
    fold = Fold(
        index=index,
        train_start_ns=int(ts[before].min()),
        train_end_ns=int(ts[before].max()),
        test_start_ns=test_start,
        test_end_ns=int(ts[test].max()),
        train_rows=len(y_train),
        purged_rows=int(((labels[before] >= 0) & ~trained).sum()),
        test_rows=len(y_test),
        last_label_end_ns=last_end,
        train_class_counts=class_counts(y_train),
        test_class_counts=class_counts(y_test),
        params={**searched, "num_boost_round": version.params["num_boost_round"]},
        inner_cv_logloss=float(version.metrics["cv_logloss"]),
        trials=int(version.metrics["trials"]),
        logistic_iterations=int(np.max(logistic[-1].n_iter_)),
        scores={name: score(*p) for name, p in predictions.items()},
        importance=importance,
    )
    return fold, predictions


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> Pipeline:
    """The logistic-regression baseline, fitted on the training rows.

    Inputs are standardised on the training rows; a missing value (warm-up rows, and
    volatilities of windows with one trade) becomes 0, the training mean, and gets an
    indicator column, so the model sees missingness as LightGBM does. Class weights are
    balanced, as the LightGBM model's, so the two are compared on the same footing.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(
        StandardScaler(),
        SimpleImputer(strategy="constant", fill_value=0.0, add_indicator=True),
        LogisticRegression(class_weight="balanced", max_iter=LOGISTIC_MAX_ITER),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            pipeline.fit(x, y)
        except ConvergenceWarning as exc:
            raise TrainingError(
                f"the logistic-regression baseline did not converge in {LOGISTIC_MAX_ITER} "
                f"iterations: {exc}"
            ) from exc
    return pipeline


def _pooled_score(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> Scores:
    y = np.concatenate([p[0] for p in parts])
    pred = np.concatenate([p[1] for p in parts])
    probas = [p[2] for p in parts if p[2] is not None]
    proba = np.concatenate(probas) if len(probas) == len(parts) else None
    return score(y, pred, proba)


def _mean_importance(
    folds: Sequence[Fold], names: Sequence[str]
) -> tuple[tuple[str, float, float], ...]:
    # Shares, not raw gains: later folds train on more rows, and raw gain grows with them.
    gains = np.array([[fold.importance.get(name, 0.0) for name in names] for fold in folds])
    totals = gains.sum(axis=1, keepdims=True)
    shares = np.divide(gains, totals, out=np.zeros_like(gains), where=totals > 0)
    rows = zip(names, shares.mean(axis=0), gains.mean(axis=0), strict=True)
    ranked = sorted(rows, key=lambda r: (-r[1], r[0]))
    return tuple((str(name), float(share), float(gain)) for name, share, gain in ranked)


# -- reporting -------------------------------------------------------------------------------


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").isoformat(timespec="milliseconds")


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, tuples and Ray Tune distributions made JSON-safe."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # e.g. a tune.loguniform(...) of a random search


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _short_time(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").strftime("%m-%d %H:%M")


def _balance(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    return " / ".join(f"{100 * counts[name] / total:.1f}" for name in CLASS_NAMES)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _markdown(ev: Evaluation, top: int) -> str:
    folds = ev.folds
    first, last = folds[0], folds[-1]
    test_rows = sum(f.test_rows for f in folds)
    space = ev.search
    if space.samples is None:
        search = f"grid {_jsonable(space.grid)}"
    else:
        search = f"{space.samples} random draws from {_jsonable(space.grid)}"
    out = [
        "### Set-up",
        "",
        f"- Data: {ev.rows:,} rows of {', '.join(ev.symbols)}, {_iso(ev.start_ns)} to "
        f"{_iso(ev.end_ns)} (UTC); {ev.labelled_rows:,} with a matured label.",
        f"- Labels: {ev.label_spec.describe()} points; class balance DOWN / FLAT / UP "
        f"{_balance(ev.class_counts)} %.",
        f"- Walk-forward: the first {ev.train_fraction:.0%} of rows only train, then "
        f"{len(folds)} consecutive test blocks ({test_rows:,} test rows,"
        f" {_iso(first.test_start_ns)} to {_iso(last.test_end_ns)}). Each step trains on "
        "every row before its block (expanding window); rows whose label needs a price "
        f"from the block are purged; embargo {ev.embargo_seconds:g} s.",
        f"- LightGBM: `train_model` on each training set alone: Ray Tune {search}, fixed "
        f"{_jsonable(space.fixed)}; each trial scored on {ev.n_splits} purged CV folds of "
        f"the training set, early stopping after {ev.early_stopping_rounds} rounds (at most "
        f"{ev.max_rounds}), balanced class weights; seed {ev.seed}. Nothing is tuned on a "
        "test block.",
        "- Baselines, on the same rows and folds: the training set's majority class "
        "(probabilities: its class frequencies); multinomial logistic regression on the "
        "same inputs (standardised, missing values at the training mean plus missing "
        "indicators, balanced class weights, C = 1).",
        f"- Balanced log loss is the mean over classes of each class's log loss (the "
        f"training objective); a uniform guess scores ln 3 = {UNIFORM_LOGLOSS:.4f}.",
        "",
        "### Pooled over all test blocks",
        "",
    ]
    out += _table(
        ["model", "accuracy", "balanced acc.", "macro-F1", "log loss", "balanced log loss"],
        [
            [
                name,
                _pct(s.accuracy),
                _pct(s.balanced_accuracy),
                _num(s.macro_f1),
                _num(s.log_loss),
                _num(s.balanced_log_loss),
            ]
            for name, s in ev.pooled.items()
        ],
    )
    out += ["", "### Per class (pooled)", ""]
    out += _table(
        ["model", "class", "precision", "recall", "F1", "true rows", "predicted rows"],
        [
            [
                name,
                CLASS_NAMES[c].upper(),
                _pct(s.precision[c]),
                _pct(s.recall[c]),
                _num(s.f1[c]),
                f"{s.support[c]:,}",
                f"{sum(row[c] for row in s.confusion):,}",
            ]
            for name, s in ev.pooled.items()
            for c in range(NUM_CLASSES)
        ],
    )
    out += ["", "Confusion matrices (pooled; rows true, columns predicted DOWN / FLAT / UP):", ""]
    out += _table(
        ["model", "true DOWN", "true FLAT", "true UP"],
        [
            [name] + [" / ".join(f"{v:,}" for v in row) for row in s.confusion]
            for name, s in ev.pooled.items()
        ],
    )
    out += ["", "### Per fold", ""]
    out += _table(
        [
            "fold",
            "test block (UTC)",
            "train rows",
            "purged",
            "test rows",
            "test D / F / U %",
            "chosen params",
            "inner CV loss",
        ],
        [
            [
                str(f.index + 1),
                f"{_short_time(f.test_start_ns)} – {_short_time(f.test_end_ns)}",
                f"{f.train_rows:,}",
                f"{f.purged_rows:,}",
                f"{f.test_rows:,}",
                _balance(f.test_class_counts),
                ", ".join(f"{k}={v}" for k, v in f.params.items()),
                _num(f.inner_cv_logloss),
            ]
            for f in folds
        ],
    )
    out += [""]
    out += _table(
        ["fold"] + [f"{name} {m}" for name in MODELS for m in ("acc.", "macro-F1", "bal. LL")],
        [
            [str(f.index + 1)]
            + [
                value
                for name in MODELS
                for value in (
                    _pct(f.scores[name].accuracy),
                    _num(f.scores[name].macro_f1, 3),
                    _num(f.scores[name].balanced_log_loss, 3),
                )
            ]
            for f in folds
        ],
    )
    out += ["", f"### LightGBM feature importance (gain share, mean of {len(folds)} folds)", ""]
    out += _table(
        ["rank", "input", "gain share"],
        [
            [str(i + 1), f"`{name}`", _pct(share)]
            for i, (name, share, _) in enumerate(ev.importance[:top])
        ],
    )
    return "\n".join(out) + "\n"


# -- docs/RESULTS.md -------------------------------------------------------------------------

RESULTS_HEADER = (
    "# Results\n\n"
    "Measured results of rayfin's models on real data. Each section is written by the "
    "script it names; edit the text outside the markers only.\n"
)


def update_results_section(path: str | Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``.

    Everything outside the markers is kept. A missing file is created with a short header;
    a file without the markers gets the section appended. Raises
    :class:`~rayfin.errors.RayfinError` if the markers are there but broken.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    starts, ends = text.count(begin), text.count(end)
    if starts == ends == 0:
        updated = f"{text.rstrip()}\n\n{section}\n"
    elif starts == ends == 1 and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        updated = head + section + rest.split(end, 1)[1]
    else:
        raise RayfinError(
            f"{path} must hold {begin} once, followed by {end} once; found {starts} and "
            f"{ends}: fix the markers by hand"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated, encoding="utf-8")
