"""Loaders for the bundled market datasets, with explicit, checked column types."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pacompute
import pyarrow.csv as pacsv

from rayfin.errors import DatasetError

ES_TICK_SIZE = 0.25
"""Minimum price increment of the E-mini S&P 500 future, in index points."""

# The vendor file carries naive timestamps. Sunday's first trade at 17:00 and the
# re-open at 17:00 after the Labor Day halt on 2013-09-02 match CME Globex hours in US
# Central time, so that is the zone we attach.
ES_TIMEZONE = "America/Chicago"

ES_TICKS_SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.timestamp("ms", tz=ES_TIMEZONE), nullable=False),
        pa.field("symbol", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("volume", pa.int64(), nullable=False),
    ]
)
"""Columns of :func:`es_ticks`: one row per trade, in exchange order."""

_LICENSE_FILE = "LICENSE-mlfinpy.txt"


@dataclass(frozen=True)
class DatasetInfo:
    """A bundled dataset."""

    name: str
    file: str
    description: str
    rows: int
    start: str
    end: str
    license: str
    source: str


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="es-ticks",
            file="es_ticks_2013-09.csv.gz",
            description="E-mini S&P 500 futures trades (price, size), US Central time",
            rows=500_000,
            start="2013-09-01 17:00",
            end="2013-09-03 13:51",
            license="MIT",
            source="mlfinpy 0.1.2",
        ),
        DatasetInfo(
            name="etf-daily",
            file="etf_daily_2008-2016.csv.gz",
            description="daily closes of 23 ETFs (SPY, DIA, TLT, ...)",
            rows=2_141,
            start="2008-01-02",
            end="2016-07-01",
            license="MIT",
            source="mlfinpy 0.1.2",
        ),
    )
}


def _data_dir() -> Path:
    return Path(str(resources.files("rayfin.datasets").joinpath("data")))


def dataset_path(name: str) -> Path:
    """Path of a bundled dataset file, by catalogue name (see :data:`DATASETS`)."""
    try:
        info = DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None
    path = _data_dir() / info.file
    if not path.is_file():
        raise DatasetError(f"dataset file {path} is missing; reinstall rayfin")
    return path


def license_text() -> str:
    """The licence the bundled datasets are distributed under."""
    return (_data_dir() / _LICENSE_FILE).read_text()


def list_datasets() -> list[DatasetInfo]:
    """All bundled datasets."""
    return list(DATASETS.values())


def es_ticks(limit: int | None = None) -> pd.DataFrame:
    """E-mini S&P 500 trades as a DataFrame typed by :data:`ES_TICKS_SCHEMA`.

    ``limit`` keeps only the first rows. Timestamps are tz-aware (US Central) and
    non-decreasing; several trades may share a millisecond, so order is the file order.
    """
    table = pacsv.read_csv(
        dataset_path("es-ticks"),
        convert_options=pacsv.ConvertOptions(
            column_types={
                "DateTime": pa.timestamp("ms"),
                "Price": pa.float64(),
                "Volume": pa.int64(),
            },
            include_columns=["DateTime", "Price", "Volume"],
        ),
    )
    if limit is not None:
        table = table.slice(0, limit)
    ts = pacompute.assume_timezone(table["DateTime"], ES_TIMEZONE)
    symbol = pa.DictionaryArray.from_arrays(
        pa.array([0] * table.num_rows, pa.int8()), pa.array(["ES"])
    )
    typed = pa.Table.from_arrays(
        [ts, symbol, table["Price"], table["Volume"]], schema=ES_TICKS_SCHEMA
    )
    return typed.to_pandas()


def etf_daily() -> pd.DataFrame:
    """Daily ETF closes: a ``DatetimeIndex`` named ``date`` and one float64 column per ETF."""
    table = pacsv.read_csv(
        dataset_path("etf-daily"),
        convert_options=pacsv.ConvertOptions(column_types={"Date": pa.date32()}),
    )
    frame = table.to_pandas()
    frame["Date"] = pd.to_datetime(frame["Date"])
    return frame.set_index("Date").rename_axis("date").astype("float64")


def load_dataset(name: str) -> pd.DataFrame:
    """Load a bundled dataset by catalogue name (``es-ticks`` or ``etf-daily``)."""
    dataset_path(name)  # one place for the unknown-name error
    loaders = {"es-ticks": es_ticks, "etf-daily": etf_daily}
    return loaders[name]()
