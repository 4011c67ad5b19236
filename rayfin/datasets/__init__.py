"""Real market data shipped with rayfin (MIT-licensed, from the ``mlfinpy`` package).

- :func:`es_ticks`: 500,000 E-mini S&P 500 futures trades, 2013-09-01 17:00 to
  2013-09-03 13:51 US Central time.
- :func:`etf_daily`: daily closes of 23 ETFs, 2008 to 2016.
- :func:`load_headlines`: 900 financial news headlines labelled negative/neutral/positive
  with frozen train/validation/test splits, written for rayfin (Apache-2.0; see
  ``docs/headlines.md``); :func:`load_phrasebank` reads a Financial PhraseBank file you supply.

The files and their licence live in ``rayfin/datasets/data/``.
"""

from rayfin.datasets.headlines import (
    HEADLINE_SPLITS,
    HEADLINES_INFO,
    HeadlinesInfo,
    headlines_path,
    load_headlines,
    load_phrasebank,
)
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
    "HEADLINES_INFO",
    "HEADLINE_SPLITS",
    "DatasetInfo",
    "HeadlinesInfo",
    "dataset_path",
    "es_ticks",
    "etf_daily",
    "headlines_path",
    "license_text",
    "list_datasets",
    "load_dataset",
    "load_headlines",
    "load_phrasebank",
]
