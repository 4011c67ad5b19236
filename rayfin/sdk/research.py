"""The researcher's workflow, from history to a model serving on the API:

    ticks = load_history(slice(0, 40_000))           # the bundled real ES trades
    features = compute_features(ticks)               # the live engine, on Ray Data
    version = train(features.iloc[:30_000], registry="models")   # Tune + registry
    result = backtest(features.iloc[30_000:], registry="models", version=version)
    deploy(client, "models", version)                # POST /v1/models, then promote

Each step is one of rayfin's own parts (named in its docstring), so what runs here is what
runs live. Heavy imports (Ray, LightGBM) happen inside the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from rayfin.features import FeatureSpec
    from rayfin.sdk.client import RayfinClient
    from rayfin.serve.schemas import ModelVersionOut
    from rayfin.trading import BacktestResult, Model, ModelRegistry, ModelVersion

DEFAULT_NAME = "market"


def load_history(rows: slice | None = None) -> pd.DataFrame:
    """The bundled real E-mini S&P 500 trades (:func:`rayfin.datasets.es_ticks`), all of
    them or the ``rows`` slice (``slice(0, 40_000)``), renumbered from 0."""
    from rayfin.datasets import es_ticks

    if rows is None:
        return es_ticks()
    # Parse only as far as needed when the slice ends at a known row.
    forward = rows.step is None or rows.step > 0
    limit = rows.stop if forward and rows.stop is not None and rows.stop >= 0 else None
    if limit is not None and rows.start is not None and rows.start < 0:
        limit = None
    return es_ticks(limit).iloc[rows].reset_index(drop=True)


def compute_features(ticks: Any, spec: FeatureSpec | None = None) -> pd.DataFrame:
    """Engine feature rows of ``ticks`` (a DataFrame, ticks, or a ``ray.data.Dataset``),
    computed per symbol on Ray Data (:func:`rayfin.features.batch_features`): the same rows
    the live consumers compute. Starts a local Ray unless one is running."""
    from rayfin.features import batch_features

    return batch_features(ticks, spec)


def _registry(registry: ModelRegistry | str | Path | None) -> ModelRegistry:
    from rayfin.trading import ModelRegistry

    return registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)


def train(
    features_or_ticks: Any,
    *,
    registry: ModelRegistry | str | Path | None,
    **options: Any,
) -> ModelVersion:
    """Tune, fit and register a market model (:func:`rayfin.trading.train_model`; its
    keywords as ``options``: ``search``, ``label_spec``, ``max_rounds``, ``name``...).
    ``registry`` None is ``<state dir>/models``. Returns the registered version."""
    from rayfin.trading import train_model

    return train_model(features_or_ticks, registry=_registry(registry), **options)


def _ref(version: int | str | ModelVersion, name: str) -> tuple[str, int | str]:
    """(model name, version number or alias) of a version given either way."""
    from rayfin.trading import ModelVersion

    if isinstance(version, ModelVersion):
        if not version.registered:
            raise ValueError("this version was never registered (train with register=True)")
        return version.name, version.version
    return name, version


def backtest(
    features_or_ticks: pd.DataFrame,
    *,
    model: Model | None = None,
    registry: ModelRegistry | str | Path | None = None,
    version: int | str | ModelVersion = "production",
    name: str = DEFAULT_NAME,
    **options: Any,
) -> BacktestResult:
    """Replay history through the live trading path (:func:`rayfin.trading.backtest`;
    its keywords as ``options``: ``config``, ``ledger``, ``news``...) with ``model``, or
    else with ``version`` (a number, an alias or a :class:`ModelVersion`) of ``name`` in
    ``registry``."""
    from rayfin.trading import backtest as run_backtest

    if model is None:
        model = _registry(registry).load(*_ref(version, name))
    return run_backtest(features_or_ticks, model=model, **options)


def deploy(
    client: RayfinClient,
    registry: ModelRegistry | str | Path | None,
    version: int | str | ModelVersion,
    *,
    name: str = DEFAULT_NAME,
    promote: bool = True,
) -> ModelVersionOut:
    """Put a locally trained version on the API: upload its model text, metadata and
    drift reference (``POST /v1/models``, a trade key), then, with ``promote``, make it
    production there. ``version`` is a number or alias of ``name`` in ``registry``, or a
    registered :class:`ModelVersion` (then of its own name); the server registers it as
    its own next version of ``name``. Returns the server's view of that version."""
    from rayfin.errors import ModelNotFoundError

    store = _registry(registry)
    local_name, ref = _ref(version, name)
    model = store.load(local_name, ref)
    meta = model.version
    try:
        reference = store.reference(local_name, meta.version)
    except ModelNotFoundError:  # registered without one: the server monitors nothing then
        reference = None
    uploaded = client.upload_model(
        model.booster.model_to_string(),
        name=name,
        features=meta.features,
        label_spec=meta.label_spec,
        fingerprint=meta.fingerprint,
        params=meta.params,
        metrics=meta.metrics,
        reference=reference,
    )
    if not promote:
        return uploaded
    return client.promote(uploaded.version, name=name)
