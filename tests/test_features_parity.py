"""One definition, two executors: live micro-batches and Ray Data agree on real ES ticks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rayfin.datasets import es_ticks
from rayfin.features import FeatureSpec, batch_features, online_features

pytestmark = pytest.mark.integration

TOL = 1e-9


@pytest.fixture(scope="module")
def es_frame() -> pd.DataFrame:
    return es_ticks()


def assert_same_features(batch: pd.DataFrame, online: pd.DataFrame) -> None:
    assert list(batch.columns) == list(online.columns)
    assert batch.dtypes.equals(online.dtypes)
    assert (batch["symbol"] == online["symbol"]).all()
    floats = online.select_dtypes("float64").columns
    others = online.columns.difference(floats)
    pd.testing.assert_frame_equal(batch[others], online[others], check_exact=True)
    a, b = online[floats].to_numpy(), batch[floats].to_numpy()
    assert (np.isnan(a) == np.isnan(b)).all(), "NaNs in different places"
    assert np.nanmax(np.abs(a - b)) <= TOL
    # Stronger than the contract: the two executors run the same code, bit for bit.
    pd.testing.assert_frame_equal(batch, online, check_exact=True)


@pytest.mark.usefixtures("ray_local")
def test_batch_equals_online_on_all_es_ticks(es_frame: pd.DataFrame) -> None:
    online = online_features(es_frame)
    batch = batch_features(es_frame)
    assert len(batch) == len(es_frame) == 500_000
    assert list(online.columns) == FeatureSpec().tick_columns()
    assert (online["offset"].to_numpy() == np.arange(len(es_frame))).all()
    assert_same_features(batch, online)


@pytest.mark.usefixtures("ray_local")
def test_batch_takes_a_dataset_with_several_symbols_and_late_ticks(
    es_frame: pd.DataFrame,
) -> None:
    import ray.data

    frame = es_frame.iloc[:60_000].copy()
    rng = np.random.default_rng(1)
    frame["symbol"] = np.where(rng.random(len(frame)) < 0.3, "NQ", "ES")
    late = rng.choice(len(frame), size=200, replace=False)
    frame.loc[frame.index[late], "timestamp"] -= pd.Timedelta(seconds=30)
    # Several blocks, so arrival order has to survive block boundaries and the shuffle.
    dataset = ray.data.from_pandas([frame.iloc[i : i + 12_000] for i in range(0, 60_000, 12_000)])
    spec = FeatureSpec(tick_windows=(7, 50), time_windows=(2.5,), tumbling_time_windows=(30,))

    batch = batch_features(dataset, spec)
    online = online_features(frame, spec, chunk_size=999)
    assert online["late"].sum() > 100
    assert online["symbol"].iloc[0] == "ES"
    assert online["symbol"].iloc[-1] == "NQ"
    assert_same_features(batch, online)
