"""News sentiment: scorers (lexicon baseline, zero-shot and LoRA-tuned LLM) and the
labelled headlines they are measured on."""

from rayfin.sentiment.scoring import LABELS, SentimentScorer, polarity, predicted_labels

__all__ = ["LABELS", "SentimentScorer", "polarity", "predicted_labels"]
