"""Scoring: a trained market model turning feature rows into class probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd

from rayfin.errors import ModelInputError, RegistryError
from rayfin.trading.inputs import input_arrays, is_input_name
from rayfin.trading.labels import CLASS_NAMES

if TYPE_CHECKING:
    import lightgbm

    from rayfin.trading.registry import ModelVersion

DEFAULT_SCORING_THREADS = 1
"""LightGBM threads per predict call: a live batch of ~1,000 rows takes well under a
millisecond on one thread, and more threads would only compete with the stream's actors."""


class Model:
    """A LightGBM booster and the :class:`~rayfin.trading.registry.ModelVersion` it is.

    Probabilities are those of a model fitted with balanced class weights: they are
    calibrated as if the three classes were equally frequent, which keeps a rare class
    from being swamped by FLAT (see :mod:`rayfin.trading.training`).
    """

    def __init__(
        self,
        booster: lightgbm.Booster,
        version: ModelVersion,
        *,
        num_threads: int = DEFAULT_SCORING_THREADS,
    ) -> None:
        features = list(version.features)
        unknown = [name for name in features if not is_input_name(name)]
        if unknown:
            raise RegistryError(
                f"{version.name} v{version.version} lists inputs that rayfin cannot build: "
                f"{unknown}"
            )
        if booster.num_model_per_iteration() != len(CLASS_NAMES):
            raise RegistryError(
                f"{version.name} v{version.version} predicts "
                f"{booster.num_model_per_iteration()} classes, not {len(CLASS_NAMES)}"
            )
        if booster.feature_name() != features:
            raise RegistryError(
                f"{version.name} v{version.version}: the booster's inputs "
                f"{booster.feature_name()} differ from its metadata's {features}"
            )
        self.booster = booster
        self.version = version
        self.num_threads = num_threads

    @classmethod
    def from_text(cls, text: str, version: ModelVersion, **kwargs: Any) -> Self:
        """A model from LightGBM model text (as the registry stores it)."""
        import lightgbm

        try:
            booster = lightgbm.Booster(model_str=text)
        except lightgbm.basic.LightGBMError as exc:
            raise RegistryError(
                f"{version.name} v{version.version} is not a readable LightGBM model: {exc}"
            ) from exc
        return cls(booster, version, **kwargs)

    @property
    def features(self) -> list[str]:
        """The model's input columns, in order."""
        return list(self.version.features)

    @property
    def classes(self) -> tuple[str, ...]:
        """Names of the probability columns: ``down``, ``flat``, ``up``."""
        return CLASS_NAMES

    def __repr__(self) -> str:
        return f"Model({self.version.name!r}, version={self.version.version})"

    def predict_proba(
        self,
        features: pd.DataFrame | Mapping[str, np.ndarray],
        sentiment: float | np.ndarray | pd.Series | None = None,
    ) -> np.ndarray:
        """Probabilities ``[n, 3]`` (DOWN, FLAT, UP) for feature rows.

        ``features`` are engine feature rows (a DataFrame or a mapping of column arrays);
        a ``sentiment`` column, or the ``sentiment`` argument, is used when given and
        neutral otherwise. Raises :class:`~rayfin.errors.ModelInputError` naming the
        feature columns the model needs but ``features`` lack.
        """
        columns = input_arrays(features, sentiment, only=self.features)
        rows = len(next(iter(columns.values())))
        if rows == 0:
            return np.empty((0, len(CLASS_NAMES)))
        matrix = np.empty((rows, len(columns)), dtype=np.float64)
        for j, values in enumerate(columns.values()):
            if values.shape != (rows,):
                raise ModelInputError(f"every feature column must be 1-D with {rows} rows")
            matrix[:, j] = values
        proba = self.booster.predict(matrix, num_threads=self.num_threads)
        return np.asarray(proba, dtype=np.float64).reshape(rows, len(CLASS_NAMES))
