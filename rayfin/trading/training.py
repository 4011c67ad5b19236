"""Training the market model: labels, purged CV, a Ray Tune search, the refit, the registry.

:func:`train_model` runs, in order:

1. features (from raw ticks, unless given a feature frame), labels
   (:mod:`rayfin.trading.labels`) and model inputs (:mod:`rayfin.trading.inputs`); rows
   whose label has not matured are dropped;
2. a Ray Tune search (grid or random, :class:`SearchSpace`) in which every trial fits one
   LightGBM model per purged walk-forward fold (:mod:`rayfin.trading.cv`), early-stopped
   on that fold's validation rows. The objective is the mean over folds of the validation
   ``multi_logloss`` weighted with the training fold's balanced class weights: the loss
   the model is fitted to minimise, and one a model cannot lower by favouring FLAT (a
   uniform guess scores ln 3 ≈ 1.0986). Macro-F1 and balanced accuracy are reported too;
3. the refit of the best parameters on every labelled row, for the mean of the folds'
   best iterations. It runs in this process, or data-parallel over Ray Train workers
   (:class:`ray.train.lightgbm.LightGBMTrainer`) for large data or when asked;
4. registration in the :class:`~rayfin.trading.registry.ModelRegistry`, with the drift
   reference of the training inputs (:class:`~rayfin.trading.monitoring.DriftReference`)
   that live monitoring compares recent inputs against.

Class weights are balanced (``rows / (3 · rows of the class)``), computed on each training
fold and, for the refit, on all rows. Training is deterministic for a fixed ``seed``:
LightGBM runs with ``deterministic=True`` and a fixed thread count, and the data-parallel
workers take fixed, interleaved shares of the rows.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rayfin.cluster import ensure_ray
from rayfin.errors import TrainingError
from rayfin.features.spec import TICK_KEY_COLUMNS, FeatureSpec
from rayfin.trading.cv import purged_walk_forward
from rayfin.trading.inputs import model_inputs
from rayfin.trading.labels import CLASS_NAMES, LabelSpec, class_counts, labels_and_ends
from rayfin.trading.registry import (
    MODEL_FILE,
    ModelRegistry,
    ModelVersion,
    check_model_name,
    data_fingerprint,
    utc_now,
)

if TYPE_CHECKING:
    from pathlib import Path

    import lightgbm
    import ray.data

DEFAULT_MODEL_NAME = "market"
DATA_PARALLEL_ROWS = 2_000_000
"""Above this many labelled rows the refit runs data-parallel on Ray Train by default."""
MIN_ROWS_PER_FOLD = 50
"""Training needs at least this many labelled rows per CV block (``n_splits + 1`` blocks)."""

NUM_CLASSES = len(CLASS_NAMES)
UNIFORM_LOGLOSS = math.log(NUM_CLASSES)
OBJECTIVE = "cv_logloss"

DEFAULT_GRID: Mapping[str, Sequence[Any]] = {
    "num_leaves": (7, 31),
    "min_data_in_leaf": (500, 2000),
}
"""The default search: 4 combinations of tree size and leaf support. Tick-horizon signals
are weak and regimes shift between folds, so large, well-supported leaves generalise best
(on the first 100,000 ES ticks, leaves of 100 rows early-stop after a few rounds)."""

DEFAULT_FIXED: Mapping[str, Any] = {
    "learning_rate": 0.05,
    "feature_fraction": 0.5,
    "lambda_l2": 1.0,
}
"""Parameters every trial uses unless the search space varies them."""

# Parameters training sets itself (and their common LightGBM aliases): a search space that
# changed them would break the objective, determinism or the data-parallel set-up.
_MANAGED = frozenset(
    {
        "objective", "objective_type", "app", "application", "loss",
        "num_class", "num_classes", "metric", "metrics", "metric_types",
        "seed", "random_seed", "random_state", "deterministic",
        "num_threads", "num_thread", "nthread", "nthreads", "n_jobs",
        "num_iterations", "num_iteration", "n_iter", "num_tree", "num_trees", "num_round",
        "num_rounds", "nrounds", "num_boost_round", "n_estimators", "max_iter",
        "early_stopping_round", "early_stopping_rounds", "early_stopping", "n_iter_no_change",
        "tree_learner", "tree", "tree_type", "tree_learner_type",
        "num_machines", "num_machine", "machines", "workers", "nodes",
        "local_listen_port", "local_port", "port", "pre_partition", "is_pre_partition",
        "verbosity", "verbose",
    }
)  # fmt: skip


@dataclass(frozen=True)
class SearchSpace:
    """The hyperparameter search: LightGBM parameters to vary, and how.

    With ``samples=None`` every combination of ``grid`` is tried (each value a sequence).
    With ``samples=n``, ``n`` random draws are made: a sequence is a uniform choice, and a
    Ray Tune distribution (``ray.tune.loguniform(0.01, 0.2)``...) is sampled as such; draws
    are reproducible for a given ``seed``. ``fixed`` holds the parameters not searched;
    a parameter in both is searched, so a grid over ``learning_rate`` needs no change to
    the default ``fixed``.
    """

    grid: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_GRID))
    fixed: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_FIXED))
    samples: int | None = None

    def __post_init__(self) -> None:
        from ray.tune.search.sample import Domain

        if self.samples is not None and (
            isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1
        ):
            raise TrainingError(f"samples must be a positive int or None, got {self.samples!r}")
        for key in (*self.grid, *self.fixed):
            if key in _MANAGED:
                raise TrainingError(f"{key!r} is set by training itself and cannot be searched")
        for key, values in self.grid.items():
            if isinstance(values, Domain):
                if self.samples is None:
                    raise TrainingError(
                        f"{key!r} is a distribution; a grid needs a list of values "
                        "(or set samples for a random search)"
                    )
            elif isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise TrainingError(f"{key!r} needs a non-empty list of values, got {values!r}")

    def param_space(self) -> dict[str, Any]:
        """The Ray Tune ``param_space`` of this search."""
        from ray import tune
        from ray.tune.search.sample import Domain

        space: dict[str, Any] = {}
        for key, values in self.grid.items():
            if isinstance(values, Domain):
                space[key] = values
            elif self.samples is None:
                space[key] = tune.grid_search(list(values))
            else:
                space[key] = tune.choice(list(values))
        return space


@dataclass(frozen=True)
class _FoldData:
    """What every search trial needs (shipped once through the object store)."""

    x: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    names: list[str]
    base: dict[str, Any]
    """Every parameter but the searched ones."""
    max_rounds: int
    early_stopping_rounds: int


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Balanced weight of each class, ``rows / (3 · rows of the class)``, as a [3] array."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)[:NUM_CLASSES]
    if (counts == 0).any():
        missing = [CLASS_NAMES[c] for c in np.flatnonzero(counts == 0)]
        raise TrainingError(
            f"no {'/'.join(missing)} rows to train on; lower the label threshold, lengthen "
            "the horizon or use more data"
        )
    return len(labels) / (NUM_CLASSES * counts.astype(np.float64))


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for c in range(NUM_CLASSES):
        tp = np.sum((pred == c) & (y == c))
        wrong = np.sum((pred == c) != (y == c))  # false positives plus false negatives
        scores.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return float(np.mean(scores))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [np.mean(pred[y == c] == c) for c in range(NUM_CLASSES) if (y == c).any()]
    return float(np.mean(recalls))


def _fit_fold(
    params: dict[str, Any], data: _FoldData, train: np.ndarray, val: np.ndarray
) -> dict[str, Any]:
    """One fold: fit with early stopping on the validation rows, score the best iteration."""
    import lightgbm

    y_train, y_val = data.y[train], data.y[val]
    weights = class_weights(y_train)
    train_set = lightgbm.Dataset(
        data.x[train], y_train, weight=weights[y_train], feature_name=data.names
    )
    val_set = lightgbm.Dataset(data.x[val], y_val, weight=weights[y_val], reference=train_set)
    booster = lightgbm.train(
        params,
        train_set,
        num_boost_round=data.max_rounds,
        valid_sets=[val_set],
        valid_names=["val"],
        callbacks=[lightgbm.early_stopping(data.early_stopping_rounds, verbose=False)],
    )
    best = booster.best_iteration or data.max_rounds
    pred = np.argmax(booster.predict(data.x[val], num_iteration=best), axis=1)
    return {
        "logloss": float(booster.best_score["val"]["multi_logloss"]),
        "best_iteration": best,
        "macro_f1": _macro_f1(y_val, pred),
        "balanced_accuracy": _balanced_accuracy(y_val, pred),
    }


def _cross_validate(params: dict[str, Any], data: _FoldData) -> dict[str, Any]:
    folds = [_fit_fold(params, data, train, val) for train, val in data.splits]
    return {
        OBJECTIVE: float(np.mean([f["logloss"] for f in folds])),
        "cv_logloss_folds": [f["logloss"] for f in folds],
        "cv_macro_f1": float(np.mean([f["macro_f1"] for f in folds])),
        "cv_balanced_accuracy": float(np.mean([f["balanced_accuracy"] for f in folds])),
        "best_iterations": [int(f["best_iteration"]) for f in folds],
    }


_CV_SCORES = (
    OBJECTIVE,
    "cv_logloss_folds",
    "cv_macro_f1",
    "cv_balanced_accuracy",
    "best_iterations",
)
"""What :func:`_cross_validate` reports, as kept in the model's metrics."""


def _search_trial(config: dict[str, Any], *, data: _FoldData) -> None:
    """A Ray Tune trial: cross-validate one parameter set."""
    from ray import tune

    tune.report(_cross_validate({**data.base, **config}, data))


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


@contextmanager
def _quiet_tune_loggers() -> Iterator[None]:
    """Silence Tune's advice to install TensorBoardX for the log files we throw away, and
    move the experiment box it prints even at ``verbose=0`` to stderr: stdout belongs to
    the caller (a CLI's or benchmark's JSON)."""
    log = logging.getLogger("ray.tune.utils.callback")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        log.setLevel(level)


def _search(
    space: SearchSpace, data: _FoldData, *, seed: int, num_threads: int
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Run the Tune search; return the best trial's searched config, its CV scores and the
    number of trials."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    trainable = tune.with_resources(
        tune.with_parameters(_search_trial, data=data), {"cpu": num_threads}
    )
    # Trial results are only needed in memory: the experiment folder is temporary.
    with tempfile.TemporaryDirectory(prefix="rayfin-tune-") as storage, _quiet_tune_loggers():
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=space.samples or 1,
                search_alg=BasicVariantGenerator(
                    random_state=seed, max_concurrent=max(1, cpus // num_threads)
                ),
                # A fresh actor per trial costs seconds of process start-up and imports.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(storage_path=storage, name="search", verbose=0),
        )
        grid = tuner.fit()
        results = [grid[i] for i in range(len(grid))]
    # A failed trial is not skipped: the best of the rest would make the chosen model
    # depend on which trials happened to fail.
    failed = [r for r in results if r.error is not None or OBJECTIVE not in (r.metrics or {})]
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(results)} search trials failed; the first, with "
            f"{failed[0].config}: {failed[0].error}"
        )
    # Ties go to the smaller config in a fixed order, so the choice never depends on which
    # trial finished first.
    best = min(results, key=lambda r: (r.metrics[OBJECTIVE], _config_key(r.config)))
    scores = {key: best.metrics[key] for key in _CV_SCORES}
    return dict(best.config), scores, len(results)


def _fit_local(
    x: np.ndarray, y: np.ndarray, names: list[str], params: dict[str, Any], rounds: int
) -> lightgbm.Booster:
    import lightgbm

    weights = class_weights(y)
    train_set = lightgbm.Dataset(x, y, weight=weights[y], feature_name=names)
    return lightgbm.train(params, train_set, num_boost_round=rounds)


def _data_parallel_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: LightGBM data-parallel over this worker's share of the rows."""
    import os

    import lightgbm
    import ray
    import ray.train
    from ray.train.lightgbm import get_network_params

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Interleaved shares: each worker sees the whole period, and the split is fixed.
    x = ray.get(config["x"])[rank::world]
    y = ray.get(config["y"])[rank::world]
    w = ray.get(config["w"])[rank::world]
    params = {
        **config["params"],
        **get_network_params(),
        "tree_learner": "data_parallel",
        "pre_partition": True,
    }
    train_set = lightgbm.Dataset(x, y, weight=w, feature_name=config["names"])
    booster = lightgbm.train(params, train_set, num_boost_round=config["rounds"])
    metrics = {"trees": booster.num_trees()}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        booster.save_model(os.path.join(folder, MODEL_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _fit_data_parallel(
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    params: dict[str, Any],
    rounds: int,
    *,
    num_workers: int,
    num_threads: int,
) -> lightgbm.Booster:
    import ray
    import ray.train
    from ray.train.lightgbm import LightGBMTrainer, RayTrainReportCallback

    weights = class_weights(y)[y]  # balanced over all rows, not per worker share
    config = {
        "x": ray.put(x),
        "y": ray.put(y),
        "w": ray.put(weights),
        "names": names,
        "params": params,
        "rounds": rounds,
    }
    with tempfile.TemporaryDirectory(prefix="rayfin-train-") as storage:
        trainer = LightGBMTrainer(
            _data_parallel_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, resources_per_worker={"CPU": num_threads}
            ),
            run_config=ray.train.RunConfig(storage_path=storage, name="refit"),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors in its own types
            raise TrainingError(f"data-parallel training failed: {exc}") from exc
        if result.checkpoint is None:
            raise TrainingError("data-parallel training returned no model")
        return RayTrainReportCallback.get_model(result.checkpoint, MODEL_FILE)


def _check_cluster_fits(num_workers: int, num_threads: int) -> None:
    """Refuse a worker group the cluster cannot hold: Ray Train would wait for it forever."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    if num_workers * num_threads > cpus:
        raise TrainingError(
            f"{num_workers} workers x {num_threads} threads need {num_workers * num_threads} "
            f"CPUs; the Ray cluster has {cpus}"
        )


def _is_ray_dataset(data: object) -> bool:
    # Only look if Ray Data was imported: a Dataset cannot exist otherwise.
    if "ray.data" not in sys.modules:
        return False
    import ray.data

    return isinstance(data, ray.data.Dataset)


def feature_frame(
    data: pd.DataFrame | ray.data.Dataset, feature_spec: FeatureSpec | None = None
) -> pd.DataFrame:
    """Engine feature rows of ``data``: a feature frame as is, raw ticks through the engine.

    A DataFrame with every tick-feature key column (``symbol, ts, ..., seq``) is taken as
    features; any other DataFrame as ticks (:func:`rayfin.features.online_features`); a
    Ray Dataset as ticks (:func:`rayfin.features.batch_features`).
    """
    from rayfin.features import batch_features, online_features

    if _is_ray_dataset(data):
        return batch_features(data, feature_spec)
    if not isinstance(data, pd.DataFrame):
        raise TrainingError(
            f"training data must be a DataFrame or a Ray Dataset, got {type(data).__name__}"
        )
    if set(TICK_KEY_COLUMNS) <= set(data.columns):
        if feature_spec is not None:
            raise TrainingError("feature_spec applies to raw ticks; these are features already")
        return data
    try:
        return online_features(data, feature_spec)
    except ValueError as exc:
        raise TrainingError(f"cannot compute features of the training data: {exc}") from exc


def _managed_params(seed: int, num_threads: int) -> dict[str, Any]:
    """The LightGBM parameters training sets itself (see ``_MANAGED``)."""
    return {
        "objective": "multiclass",
        "num_class": NUM_CLASSES,
        "metric": "multi_logloss",
        "deterministic": True,
        # Row-wise histograms chosen up front, not by a timing probe that could differ.
        "force_row_wise": True,
        "seed": seed,
        "num_threads": num_threads,
        "verbosity": -1,
        # One Dataset binning serves any min_data_in_leaf a trial picks.
        "feature_pre_filter": False,
    }


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainingError(f"{name} must be a positive int, got {value!r}")
    return value


def train_model(
    data: pd.DataFrame | ray.data.Dataset,
    *,
    name: str = DEFAULT_MODEL_NAME,
    label_spec: LabelSpec | None = None,
    search: SearchSpace | None = None,
    n_splits: int = 3,
    embargo_seconds: float = 0.0,
    max_rounds: int = 500,
    early_stopping_rounds: int = 25,
    num_workers: int | None = None,
    data_parallel_rows: int = DATA_PARALLEL_ROWS,
    num_threads: int = 1,
    feature_spec: FeatureSpec | None = None,
    registry: ModelRegistry | str | Path | None = None,
    register: bool = True,
    seed: int = 0,
) -> ModelVersion:
    """Train, tune and (by default) register a market model; see the module docstring.

    ``data`` is raw ticks (a DataFrame as :func:`rayfin.features.online_features` takes, or
    a Ray Dataset) or engine feature rows; ``feature_spec`` configures the features of raw
    ticks. ``n_splits`` purged walk-forward folds score each search trial, with an extra
    ``embargo_seconds`` gap before each validation fold (the purge alone already keeps
    every training label clear of it). Each fit grows up to ``max_rounds`` rounds and stops
    after ``early_stopping_rounds`` without improvement.

    The refit is data-parallel on Ray Train with ``num_workers`` workers when that is above
    1 (the cluster must have ``num_workers * num_threads`` CPUs); left ``None``, it is
    data-parallel only above ``data_parallel_rows`` labelled rows, with one worker per
    ``num_threads`` CPUs of the cluster (if that makes two or more). Each search trial,
    the local refit and each data-parallel worker use ``num_threads`` LightGBM threads.

    Returns the registered :class:`~rayfin.trading.registry.ModelVersion` (in ``registry``,
    default ``<state_dir>/models``, with its drift reference). With ``register=False``
    nothing is written and the returned version is unregistered (``version`` 0, no
    ``path``): a dry run for its metrics. Starts Ray if it is not running yet.
    """
    import lightgbm

    spec = label_spec if label_spec is not None else LabelSpec()
    if not isinstance(spec, LabelSpec):
        raise TrainingError(f"label_spec must be a LabelSpec, got {type(spec).__name__}")
    space = search if search is not None else SearchSpace()
    if not isinstance(space, SearchSpace):
        raise TrainingError(f"search must be a SearchSpace, got {type(space).__name__}")
    n_splits = _positive_int("n_splits", n_splits)
    max_rounds = _positive_int("max_rounds", max_rounds)
    early_stopping_rounds = _positive_int("early_stopping_rounds", early_stopping_rounds)
    num_threads = _positive_int("num_threads", num_threads)
    data_parallel_rows = _positive_int("data_parallel_rows", data_parallel_rows)
    if num_workers is not None:
        num_workers = _positive_int("num_workers", num_workers)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TrainingError(f"seed must be an int, got {seed!r}")
    if not (isinstance(embargo_seconds, int | float) and 0 <= embargo_seconds < math.inf):
        raise TrainingError(f"embargo_seconds must be >= 0, got {embargo_seconds!r}")
    if register:
        # Fail on a bad name or root now, not after the training.
        check_model_name(name)
        if not isinstance(registry, ModelRegistry):
            registry = ModelRegistry(registry)

    ensure_ray()
    if num_workers is not None and num_workers > 1:
        _check_cluster_fits(num_workers, num_threads)
    features = feature_frame(data, feature_spec)
    labels, ends = labels_and_ends(features, spec)
    matured = labels >= 0
    rows = int(matured.sum())
    if rows < MIN_ROWS_PER_FOLD * (n_splits + 1):
        raise TrainingError(
            f"only {rows} labelled rows ({len(features)} rows, horizon {spec.describe()}); "
            f"{n_splits} folds need at least {MIN_ROWS_PER_FOLD * (n_splits + 1)}"
        )
    y = labels[matured].astype(np.int64)
    class_weights(y)  # every class present, or a clear error before any training
    splits = purged_walk_forward(
        features["ts"].to_numpy()[matured], n_splits, ends[matured], round(embargo_seconds * 1e9)
    )
    inputs = model_inputs(features)[matured].reset_index(drop=True)
    fingerprint = data_fingerprint(inputs, y)
    reference = None
    if register:
        # Imported here: monitoring builds on this module.
        from rayfin.trading.monitoring import DriftReference

        reference = DriftReference.from_inputs(inputs)
    names = list(inputs.columns)
    x = inputs.to_numpy(dtype=np.float64)
    del inputs  # x holds the same values; large frames should not be held twice

    base = {**space.fixed, **_managed_params(seed, num_threads)}
    fold_data = _FoldData(x, y, splits, names, base, max_rounds, early_stopping_rounds)
    best_config, scores, trials = _search(space, fold_data, seed=seed, num_threads=num_threads)
    rounds = max(1, round(float(np.mean(scores["best_iterations"]))))
    params = {**base, **best_config}  # searched values win over fixed ones

    if num_workers is None and rows > data_parallel_rows:
        import ray

        num_workers = int(ray.cluster_resources().get("CPU", 1)) // num_threads
    workers = num_workers if num_workers is not None and num_workers > 1 else 0
    if workers:
        booster = _fit_data_parallel(
            x, y, names, params, rounds, num_workers=workers, num_threads=num_threads
        )
    else:
        booster = _fit_local(x, y, names, params, rounds)

    metrics = {
        **scores,
        "objective": f"{OBJECTIVE}: class-weighted multi_logloss, mean of purged CV folds",
        "uniform_logloss": UNIFORM_LOGLOSS,
        "num_boost_round": rounds,
        "trials": trials,
        "rows": rows,
        "unlabelled_rows": int(len(labels) - rows),
        "class_counts": class_counts(y),
        "folds": n_splits,
        "embargo_seconds": float(embargo_seconds),
        "data_parallel_workers": workers,
    }
    stored_params = {**params, "num_boost_round": rounds}
    if not register:
        return ModelVersion(
            name=name,
            version=0,
            created=utc_now(),
            params=stored_params,
            metrics=metrics,
            features=tuple(names),
            label_spec=spec,
            fingerprint=fingerprint,
            lightgbm_version=lightgbm.__version__,
        )
    assert isinstance(registry, ModelRegistry)
    return registry.register(
        booster,
        name=name,
        features=names,
        label_spec=spec,
        fingerprint=fingerprint,
        params=stored_params,
        metrics=metrics,
        reference=reference,
    )
