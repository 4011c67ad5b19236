"""The bundled labelled headlines and the Financial PhraseBank reader."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from rayfin.datasets import (
    HEADLINE_SPLITS,
    HEADLINES_INFO,
    headlines_path,
    load_headlines,
    load_phrasebank,
)
from rayfin.sentiment import LABELS

# Capitalised words (company, place and institution names) and numbers: two headlines equal
# after masking these would be one template stamped with different names or figures.
_NAMES_AND_NUMBERS = re.compile(r"\b[A-Z][\w&'.+-]*|\$?\d[\d,.]*%?\w*")


def test_headlines_have_the_documented_size_columns_and_balance() -> None:
    frame = load_headlines()
    assert list(frame.columns) == ["id", "headline", "label", "split"]
    assert frame["id"].dtype == "int64"
    assert frame["id"].tolist() == list(range(1, 901))
    assert len(frame) == HEADLINES_INFO.rows == 900
    assert set(frame["label"]) == set(LABELS)
    assert set(frame["split"]) == set(HEADLINE_SPLITS)
    assert frame["label"].value_counts().to_dict() == HEADLINES_INFO.per_label
    assert HEADLINES_INFO.per_label == {"negative": 300, "neutral": 300, "positive": 300}
    assert frame["split"].value_counts().to_dict() == HEADLINES_INFO.per_split
    assert headlines_path().name == HEADLINES_INFO.file
    # The loader keeps its own copy of the label order to avoid an import cycle.
    assert tuple(HEADLINES_INFO.per_label) == LABELS


def test_headlines_are_unique_and_not_templated() -> None:
    headlines = load_headlines()["headline"]
    assert headlines.str.strip().eq(headlines).all()
    assert headlines.str.lower().nunique() == len(headlines)
    masked = headlines.map(lambda text: _NAMES_AND_NUMBERS.sub("X", text).lower())
    duplicated = headlines[masked.duplicated(keep=False)].tolist()
    assert duplicated == []
    words = headlines.str.split().str.len()
    assert words.between(6, 20).all()


def test_splits_are_stratified_and_disjoint() -> None:
    parts = {split: load_headlines(split) for split in HEADLINE_SPLITS}
    assert {split: len(part) for split, part in parts.items()} == {
        "train": 540,
        "validation": 180,
        "test": 180,
    }
    for split, part in parts.items():
        assert (part["split"] == split).all()
        assert part["label"].value_counts().to_dict() == dict.fromkeys(LABELS, len(part) // 3)
        assert part.index.tolist() == list(range(len(part)))
    ids = [set(part["id"]) for part in parts.values()]
    texts = [set(part["headline"].str.lower()) for part in parts.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not ids[i] & ids[j]
            assert not texts[i] & texts[j]
    assert set().union(*ids) == set(range(1, 901))


@pytest.mark.parametrize("split", ["dev", "Test", "", "all"])
def test_unknown_split_is_refused(split: str) -> None:
    with pytest.raises(ValueError, match="train, validation, test"):
        load_headlines(split)


def test_callers_get_their_own_copy() -> None:
    frame = load_headlines("test")
    frame.loc[0, "label"] = "changed"
    assert load_headlines("test").loc[0, "label"] in LABELS


def test_phrasebank_reader_decodes_latin1_and_keeps_at_signs(tmp_path: Path) -> None:
    path = tmp_path / "Sentences_50Agree.txt"
    path.write_bytes(
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn , said Jörg Åberg .@positive\r\n"
        "\r\n"
        "Questions go to ir@example.com as before .@neutral\r\n"
        "Net sales fell by 12 % in the quarter .@negative\r\n".encode("latin-1")
    )
    frame = load_phrasebank(path)
    expected = pd.DataFrame(
        {
            "headline": [
                "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn , said Jörg Åberg .",
                "Questions go to ir@example.com as before .",
                "Net sales fell by 12 % in the quarter .",
            ],
            "label": ["positive", "neutral", "negative"],
        }
    )
    pd.testing.assert_frame_equal(frame, expected)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("The company has no plans to move production", r":3: expected 'sentence@label'"),
        ("Results were mixed .@mixed", r":3: unknown label 'mixed'"),
        ("@neutral", r":3: expected 'sentence@label'"),
    ],
)
def test_phrasebank_reader_names_the_malformed_line(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    path = tmp_path / "phrasebank.txt"
    path.write_bytes(
        f"Sales increased .@positive\nCosts were flat .@neutral\n{bad_line}\n".encode("latin-1")
    )
    with pytest.raises(ValueError, match=message):
        load_phrasebank(path)
