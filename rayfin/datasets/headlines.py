"""Labelled financial news headlines for scoring sentiment, and a Financial PhraseBank reader.

The bundled set (``data/financial_headlines.csv``) was written and labelled for rayfin; see
``docs/headlines.md`` for how, and for the rule that the ``test`` split is never used for
training or model selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import pandas as pd

from rayfin.errors import DatasetError

# Same order as rayfin.sentiment.LABELS (a test checks); not imported from there so that the
# sentiment package may import rayfin.datasets without a cycle.
_LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")

HEADLINE_SPLITS: tuple[str, str, str] = ("train", "validation", "test")
"""The frozen splits of the bundled headlines, stratified by label (60/20/20)."""

_FILE = "financial_headlines.csv"
_COLUMNS = ["id", "headline", "label", "split"]


@dataclass(frozen=True)
class HeadlinesInfo:
    """What the bundled headline set holds."""

    file: str
    rows: int
    per_label: dict[str, int]
    per_split: dict[str, int]
    license: str
    source: str


HEADLINES_INFO = HeadlinesInfo(
    file=_FILE,
    rows=900,
    per_label=dict.fromkeys(_LABELS, 300),
    per_split={"train": 540, "validation": 180, "test": 180},
    license="Apache-2.0",
    source="written and labelled by the rayfin developers (fictional companies)",
)


def headlines_path() -> Path:
    """Path of the bundled headlines CSV."""
    return Path(str(resources.files("rayfin.datasets").joinpath("data", _FILE)))


@cache
def _read_all() -> pd.DataFrame:
    path = headlines_path()
    if not path.is_file():
        raise DatasetError(f"dataset file {path} is missing; reinstall rayfin")
    frame = pd.read_csv(
        path,
        encoding="utf-8",
        dtype={"id": "int64", "headline": str, "label": str, "split": str},
        keep_default_na=False,  # a headline is never a missing value
    )
    if list(frame.columns) != _COLUMNS:
        raise DatasetError(f"{path}: expected columns {_COLUMNS}, got {list(frame.columns)}")
    return frame


def load_headlines(split: str | None = None) -> pd.DataFrame:
    """The bundled headlines (columns id, headline, label, split), one split or all of them.

    ``split`` is ``train``, ``validation``, ``test`` or None for every row. Rows keep file
    order (by ``id``) and the index is reset, so callers may modify the frame freely.
    """
    if split is not None and split not in HEADLINE_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(HEADLINE_SPLITS)}")
    frame = _read_all()
    if split is not None:
        frame = frame[frame["split"] == split]
    return frame.reset_index(drop=True).copy()


def load_phrasebank(path: str | Path) -> pd.DataFrame:
    """Read a Financial PhraseBank file (``sentence@label`` per line, latin-1) you supply.

    Returns columns headline, label. Blank lines are skipped; a line without ``@`` or with a
    label other than negative/neutral/positive raises ValueError naming its line number.
    PhraseBank is not shipped with rayfin (its licence is CC BY-NC-SA 3.0).
    """
    path = Path(path)
    headlines: list[str] = []
    labels: list[str] = []
    with path.open(encoding="latin-1", newline="") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            # rpartition: a sentence may itself contain "@" (e-mail addresses, tickers).
            sentence, at, label = line.rpartition("@")
            sentence, label = sentence.strip(), label.strip().lower()
            if not at or not sentence:
                raise ValueError(f"{path}:{number}: expected 'sentence@label', got {line!r}")
            if label not in _LABELS:
                expected = ", ".join(_LABELS)
                raise ValueError(f"{path}:{number}: unknown label {label!r}; expected {expected}")
            headlines.append(sentence)
            labels.append(label)
    return pd.DataFrame({"headline": headlines, "label": labels})
