"""The bundled real market data loads with the documented types."""

from __future__ import annotations

import pandas as pd
import pytest

from rayfin.datasets import (
    ES_TICK_SIZE,
    dataset_path,
    es_ticks,
    etf_daily,
    license_text,
    list_datasets,
    load_dataset,
)
from rayfin.errors import DatasetError


def test_es_ticks_is_typed_and_complete() -> None:
    ticks = es_ticks()
    assert list(ticks.columns) == ["timestamp", "symbol", "price", "volume"]
    assert str(ticks["timestamp"].dtype) == "datetime64[ms, America/Chicago]"
    assert isinstance(ticks["symbol"].dtype, pd.CategoricalDtype)
    assert ticks["price"].dtype == "float64"
    assert ticks["volume"].dtype == "int64"
    assert len(ticks) == 500_000
    assert ticks["timestamp"].is_monotonic_increasing
    assert ticks["timestamp"].iloc[0] == pd.Timestamp(
        "2013-09-01 17:00:00.083", tz="America/Chicago"
    )
    assert (ticks["volume"] > 0).all()
    # Every ES price is on the 0.25-point grid.
    assert ((ticks["price"] / ES_TICK_SIZE) % 1 == 0).all()
    assert set(ticks["symbol"].unique()) == {"ES"}


def test_limit_keeps_the_first_rows() -> None:
    head = es_ticks(limit=1000)
    assert len(head) == 1000
    pd.testing.assert_frame_equal(head, es_ticks().head(1000))


def test_etf_daily() -> None:
    closes = etf_daily()
    assert closes.shape == (2141, 23)
    assert {"SPY", "TLT", "DIA"} <= set(closes.columns)
    assert closes.index.name == "date"
    assert closes.index.is_monotonic_increasing
    assert (closes.dtypes == "float64").all()
    assert closes.notna().all().all()


def test_catalogue_matches_files() -> None:
    for info in list_datasets():
        assert dataset_path(info.name).is_file()
        assert len(load_dataset(info.name)) == info.rows
    assert "MIT License" in license_text()


def test_unknown_dataset_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match="known datasets: es-ticks, etf-daily"):
        dataset_path("nope")
