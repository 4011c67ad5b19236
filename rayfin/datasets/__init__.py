"""Real market data shipped with rayfin (MIT-licensed, from the ``mlfinpy`` package).

- :func:`es_ticks`: 500,000 E-mini S&P 500 futures trades, 2013-09-01 17:00 to
  2013-09-03 13:51 US Central time.
- :func:`etf_daily`: daily closes of 23 ETFs, 2008 to 2016.

The files and their licence live in ``rayfin/datasets/data/``.
"""

from rayfin.datasets.market import (
    DATASETS,
    ES_TICK_SIZE,
    ES_TICKS_SCHEMA,
    DatasetInfo,
    dataset_path,
    es_ticks,
    etf_daily,
    license_text,
    list_datasets,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "ES_TICKS_SCHEMA",
    "ES_TICK_SIZE",
    "DatasetInfo",
    "dataset_path",
    "es_ticks",
    "etf_daily",
    "license_text",
    "list_datasets",
    "load_dataset",
]
