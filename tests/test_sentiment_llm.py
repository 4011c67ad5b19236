"""The LLM news-sentiment scorer on the real SmolLM2 swarm: zero-shot probabilities,
a LoRA-tuned adapter saved to the hub and loaded back by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rayfin.datasets import load_headlines
from rayfin.llm import Swarm, launch_swarm
from rayfin.sentiment import LABELS, SentimentScorer, polarity
from rayfin.sentiment.factory import make_scorer
from rayfin.sentiment.llm import LLMSentimentScorer

pytestmark = [pytest.mark.integration, pytest.mark.model]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def swarm(ray_local: None) -> Iterator[Swarm]:
    swarm = launch_swarm(MODEL, name="t-sentiment", num_stages=2, num_cpus=0.1)
    yield swarm
    swarm.shutdown()


def test_zero_shot_tuned_and_loaded_scores(swarm: Swarm, tmp_path: Path) -> None:
    hub = str(tmp_path / "hub")
    scorer = make_scorer("llm", model=MODEL, swarm=swarm.name)
    assert isinstance(scorer, LLMSentimentScorer)
    assert isinstance(scorer, SentimentScorer)
    headlines = [
        "Halvard Mining cuts full-year guidance after flooding shuts its largest pit",
        "Orrin Bank to report third-quarter results on Tuesday",
        "Tessaly Chips beats estimates and raises its dividend by 20%",
    ]
    zero_shot = scorer.score(headlines)
    assert zero_shot.shape == (3, len(LABELS))
    assert np.allclose(zero_shot.sum(axis=1), 1.0)
    assert polarity(zero_shot)[2] > polarity(zero_shot)[0]
    with pytest.raises(TypeError):
        scorer.score("one headline, not a list")  # type: ignore[arg-type]

    train = load_headlines("train").iloc[:16]
    report = scorer.tune(
        list(train.headline), list(train.label), epochs=1, batch_size=8, progress=False
    )
    assert report.steps == 2
    assert np.isfinite(report.losses).all()
    tuned = scorer.score(headlines)
    assert not np.allclose(tuned, zero_shot)
    card = scorer.save("news-sentiment", hub, report=report, metrics={"train_loss": 0.5})
    assert card.task == "label-scoring"
    assert card.labels == LABELS
    assert card.training_data_fingerprint == report.data_fingerprint

    loaded = LLMSentimentScorer.from_options(
        model=MODEL, swarm=swarm.name, adapter="news-sentiment", version=card.version, hub=hub
    )
    assert np.allclose(loaded.score(headlines), tuned, atol=1e-6)


def test_cli_scores_headlines_on_the_swarm(swarm: Swarm) -> None:
    import json

    from typer.testing import CliRunner

    from rayfin.cli import app

    headline = "Tessaly Chips beats estimates and raises its dividend by 20%"
    result = CliRunner().invoke(app, ["llm", "sentiment", headline, "--name", swarm.name, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["headline"] == headline
    assert abs(sum(row[label] for label in LABELS) - 1.0) < 1e-9
    assert row["label"] in LABELS
    missing = CliRunner().invoke(
        app, ["llm", "sentiment", headline, "--name", swarm.name, "--adapter", "nope@3"]
    )
    assert missing.exit_code == 1
    assert "nope" in missing.output


def test_the_sentiment_actor_scores_news_with_the_llm(swarm: Swarm) -> None:
    """The live path: the consumers' scorer actor built around the LLM scorer."""
    import functools

    import pyarrow as pa
    import ray

    from rayfin.actors.sentiment import NEWS_SCORE_COLUMNS, launch_sentiment

    actor = launch_sentiment(
        functools.partial(make_scorer, "llm", model=MODEL, swarm=swarm.name), num_cpus=0.1
    )
    try:
        news = pa.table(
            {
                "headline": [
                    "Orrin Bank to report third-quarter results on Tuesday",
                    "Halvard Mining cuts guidance after flooding shuts its largest pit",
                ],
                "ts": [1, 2],
            }
        )
        scored = ray.get(actor.score_news.remote(news))
        assert scored.column_names == ["headline", "ts", *NEWS_SCORE_COLUMNS]
        probs = np.column_stack([scored.column(label).to_numpy() for label in LABELS])
        assert np.allclose(probs.sum(axis=1), 1.0)
        assert np.allclose(scored.column("sentiment").to_numpy(), polarity(probs))
        assert ray.get(actor.stats.remote()) == {"scorer": "LLMSentimentScorer", "headlines": 2}
    finally:
        ray.kill(actor)
