"""The model registry: versions, aliases, promotion and rollback, fingerprints, loading."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
import pytest

from rayfin.errors import ModelNotFoundError, RegistryError, RollbackError
from rayfin.trading.labels import LabelSpec
from rayfin.trading.monitoring import DriftReference
from rayfin.trading.registry import ModelRegistry, ModelVersion, data_fingerprint
from rayfin.trading.scoring import Model

FEATURES = ["ret_1", "price_minus_sma_20t", "sentiment"]


def tiny_booster(seed: int) -> lightgbm.Booster:
    """A real three-class booster over :data:`FEATURES`, fitted in milliseconds."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, len(FEATURES)))
    y = (x[:, 0] > 0.5).astype(int) + (x[:, 0] > -0.5).astype(int)
    data = lightgbm.Dataset(x, y, feature_name=FEATURES)
    params = {
        "objective": "multiclass",
        "num_class": 3,
        "num_leaves": 4,
        "min_data_in_leaf": 10,
        "verbosity": -1,
        "seed": seed,
        "deterministic": True,
        "num_threads": 1,
    }
    return lightgbm.train(params, data, num_boost_round=5)


def feature_rows(n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    price = 1650 + rng.normal(size=n)
    return pd.DataFrame({"price": price, "sma_20t": price - 0.25, "ret_1": rng.normal(size=n)})


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def register(registry: ModelRegistry, seed: int, name: str = "market") -> ModelVersion:
    return registry.register(
        tiny_booster(seed),
        name=name,
        features=FEATURES,
        label_spec=LabelSpec(horizon_seconds=30, threshold=0.5),
        fingerprint=f"{seed:064x}",
        params={"num_leaves": 4, "seed": np.int64(seed)},
        metrics={"cv_logloss": np.float64(1.05), "folds": [1.0, 1.1]},
    )


def test_register_numbers_versions_and_keeps_metadata(registry: ModelRegistry) -> None:
    first = register(registry, 1)
    second = register(registry, 2)
    assert (first.version, second.version) == (1, 2)
    assert registry.versions("market") == [first, second]
    assert registry.names() == ["market"]
    got = registry.get("market", 2)
    assert got == second
    assert registry.get("market", "2") == second
    assert got.features == tuple(FEATURES)
    assert got.label_spec == LabelSpec(horizon_seconds=30, threshold=0.5)
    assert got.params == {"num_leaves": 4, "seed": 2}
    assert got.metrics == {"cv_logloss": 1.05, "folds": [1.0, 1.1]}
    assert got.lightgbm_version == lightgbm.__version__
    assert datetime.fromisoformat(got.created).tzinfo is not None
    assert got.path == str(registry.base) + "/market/v000002"
    assert json.loads((Path(got.path) / "version.json").read_text())["version"] == 2
    # Nothing staged is left behind.
    assert sorted(p.name for p in (Path(registry.base) / "market").iterdir()) == [
        ".lock",
        "v000001",
        "v000002",
    ]


def test_promote_and_rollback(registry: ModelRegistry) -> None:
    register(registry, 1)
    register(registry, 2)
    assert registry.promote("market", 1).version == 1
    assert registry.get("market", "production").version == 1
    registry.promote("market", 2)
    registry.promote("market", 2)  # already there: no second history entry
    assert registry.aliases("market") == {"production": 2}
    assert registry.alias_history("market") == [1, 2]
    assert registry.rollback("market").version == 1
    assert registry.get("market", "production").version == 1
    assert registry.alias_history("market") == [1]
    # Aliases are independent, and the log records every step.
    registry.promote("market", 2, alias="staging")
    assert registry.aliases("market") == {"production": 1, "staging": 2}
    state = json.loads((Path(registry.base) / "market" / "aliases.json").read_text())
    actions = [(e["action"], e["alias"], e["version"]) for e in state["events"]]
    assert actions == [
        ("promote", "production", 1),
        ("promote", "production", 2),
        ("rollback", "production", 1),
        ("promote", "staging", 2),
    ]


def test_load_by_version_and_alias_scores(registry: ModelRegistry) -> None:
    register(registry, 1)
    register(registry, 2)
    registry.promote("market", 2)
    by_alias = registry.load("market")  # production by default
    by_version = registry.load("market", 2)
    assert isinstance(by_alias, Model)
    assert by_alias.version == by_version.version == registry.get("market", 2)
    rows = feature_rows()
    proba = by_alias.predict_proba(rows)
    assert proba.shape == (20, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba, by_version.predict_proba(rows))
    # The same rows straight through the booster, inputs built by hand.
    x = np.column_stack([rows["ret_1"], rows["price"] - rows["sma_20t"], np.zeros(len(rows))])
    np.testing.assert_allclose(proba, tiny_booster(2).predict(x))
    assert not np.array_equal(proba, registry.load("market", 1).predict_proba(rows))


def test_unknown_names_versions_and_aliases(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'market'"):
        registry.versions("market")
    with pytest.raises(ModelNotFoundError, match="no model named 'market'"):
        registry.load("market")
    register(registry, 1)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'other'.*market"):
        registry.get("other", 1)
    with pytest.raises(ModelNotFoundError, match=r"no version 7 \(versions: 1\)"):
        registry.get("market", 7)
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        registry.promote("market", 7)
    with pytest.raises(ModelNotFoundError, match="no alias 'production'"):
        registry.load("market")
    with pytest.raises(ModelNotFoundError, match="no model named 'other'"):
        registry.rollback("other")
    with pytest.raises(RegistryError, match="model name"):
        registry.get("../etc", 1)
    with pytest.raises(RegistryError, match="alias must start with a letter"):
        registry.promote("market", 1, alias="1st")
    with pytest.raises(RegistryError, match="version must be an int"):
        registry.get("market", 0)


def test_rollback_needs_an_earlier_promotion(registry: ModelRegistry) -> None:
    register(registry, 1)
    with pytest.raises(RollbackError, match="never promoted"):
        registry.rollback("market")
    registry.promote("market", 1)
    with pytest.raises(RollbackError, match="points to v1 and has no earlier version"):
        registry.rollback("market")
    assert registry.get("market", "production").version == 1


def test_version_numbers_are_never_reused(registry: ModelRegistry) -> None:
    register(registry, 1)
    # A version another writer has started (or a crash left) but not committed.
    (Path(registry.base) / "market" / "v000002").mkdir()
    (Path(registry.base) / "market" / "v000002" / "model.txt").write_text("partial")
    assert [v.version for v in registry.versions("market")] == [1]
    assert register(registry, 3).version == 3
    assert [v.version for v in registry.versions("market")] == [1, 3]


def test_register_rejects_bad_input(registry: ModelRegistry) -> None:
    spec = LabelSpec()
    with pytest.raises(RegistryError, match="Booster or its model text"):
        registry.register(
            "not a model", name="m", features=FEATURES, label_spec=spec, fingerprint=""
        )
    with pytest.raises(RegistryError, match="features"):
        registry.register(tiny_booster(1), name="m", features=[], label_spec=spec, fingerprint="")
    with pytest.raises(RegistryError, match="model name"):
        registry.register(
            tiny_booster(1), name="a/b", features=FEATURES, label_spec=spec, fingerprint=""
        )


def test_model_refuses_metadata_that_does_not_match_the_booster(
    registry: ModelRegistry,
) -> None:
    version = register(registry, 1)
    booster = tiny_booster(1)
    swapped = ModelVersion(**{**version.__dict__, "features": ("ret_1", "sentiment", "rsi_14")})
    with pytest.raises(RegistryError, match="differ from its metadata"):
        Model(booster, swapped)
    unknown = ModelVersion(**{**version.__dict__, "features": ("ret_1", "price", "sentiment")})
    with pytest.raises(RegistryError, match="cannot build"):
        Model(booster, unknown)


def test_default_root_is_the_state_dir(isolated_state: Path) -> None:
    assert ModelRegistry().root == str((isolated_state / "models").resolve())


def test_model_text_round_trips(registry: ModelRegistry) -> None:
    booster = tiny_booster(5)
    version = registry.register(
        booster.model_to_string(),
        name="text",
        features=FEATURES,
        label_spec=LabelSpec(),
        fingerprint="f",
    )
    rows = feature_rows()
    np.testing.assert_array_equal(
        registry.load("text", version.version).predict_proba(rows),
        Model(booster, version).predict_proba(rows),
    )


def test_drift_reference_is_stored_with_the_version(registry: ModelRegistry) -> None:
    rows = feature_rows(200)
    inputs = pd.DataFrame({"ret_1": rows["ret_1"], "price_minus_sma_20t": 0.25, "sentiment": 0.0})
    reference = DriftReference.from_inputs(inputs)
    version = registry.register(
        tiny_booster(1),
        name="market",
        features=FEATURES,
        label_spec=LabelSpec(),
        fingerprint="f",
        reference=reference,
    )
    assert (Path(version.path) / "reference.json").is_file()
    registry.promote("market", version.version)
    assert registry.reference("market") == reference
    assert registry.reference("market", version.version).rows == 200
    # A version registered without one says so.
    register(registry, 2)
    with pytest.raises(ModelNotFoundError, match="v2 has no drift reference"):
        registry.reference("market", 2)
    with pytest.raises(RegistryError, match=r"no bins for inputs \['sentiment'\]"):
        registry.register(
            tiny_booster(1),
            name="market",
            features=FEATURES,
            label_spec=LabelSpec(),
            fingerprint="f",
            reference=DriftReference.from_inputs(inputs.drop(columns="sentiment")),
        )
    with pytest.raises(RegistryError, match="must be a DriftReference"):
        registry.register(
            tiny_booster(1),
            name="market",
            features=FEATURES,
            label_spec=LabelSpec(),
            fingerprint="f",
            reference=reference.to_dict(),  # type: ignore[arg-type]
        )
    # Neither failed registration took a version number.
    assert [v.version for v in registry.versions("market")] == [1, 2]
    (Path(version.path) / "reference.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"reference\.json is unreadable"):
        registry.reference("market", 1)


# -- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_is_stable_and_content_based() -> None:
    inputs = pd.DataFrame({"a": [1.0, np.nan, -0.0], "b": [0.5, 2.0, 3.0]})
    labels = np.array([0, 1, 2], dtype=np.int8)
    fingerprint = data_fingerprint(inputs, labels)
    # Same content, however it is held: a copy, other dtypes, another NaN, +0.0.
    same = pd.DataFrame(
        {
            "a": np.array([1.0, -np.nan, 0.0], dtype=np.float64),
            "b": np.array([0.5, 2.0, 3.0], dtype=np.float32),
        }
    )
    assert data_fingerprint(same, labels.astype(np.int64)) == fingerprint
    assert data_fingerprint(inputs.copy(), labels.copy()) == fingerprint
    # A pinned value: the fingerprint must not drift between releases or machines.
    assert fingerprint == "255df06886445ef32ffba566fcbd1afab977d9a90065fb7dea260c5d6ba8cc26"
    # Any change in values, labels or column order changes it.
    assert data_fingerprint(inputs.assign(b=[0.5, 2.0, 3.5]), labels) != fingerprint
    assert data_fingerprint(inputs, np.array([0, 1, 1])) != fingerprint
    assert data_fingerprint(inputs[["b", "a"]], labels) != fingerprint
    with pytest.raises(RegistryError, match="labels for"):
        data_fingerprint(inputs, labels[:2])
