"""News sentiment from the distributed LLM: zero-shot label log-probabilities, or LoRA-tuned.

The headline goes into a prompt (the model's chat template when it has one) that ends
right before the answer; the probabilities are a softmax over the next-token logits of
the three label words (`` negative``, `` neutral``, `` positive``). Tuning trains a
client-held LoRA adapter on exactly that readout (``task="label-scoring"``), so zero-shot
and tuned scores are the same computation with and without the adapter.

The prompt was chosen among three on the validation split of
:func:`rayfin.datasets.load_headlines` (the test split is only ever scored, see
``benchmarks/sentiment.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayfin.llm.priority import INFERENCE, TRAINING, Priority
from rayfin.sentiment.scoring import LABELS

if TYPE_CHECKING:
    from rayfin.llm.client import DistributedCausalLM
    from rayfin.llm.finetune import TrainingReport
    from rayfin.llm.hub import AdapterCard

INSTRUCTION = (
    "Classify the sentiment of this financial news headline for investors as negative, "
    "neutral or positive."
)
ADAPTER_TASK = "label-scoring"


class LLMSentimentScorer:
    """``score(headlines) -> [n, 3]`` (negative, neutral, positive) with ``model``, using
    whatever adapter it carries."""

    def __init__(
        self,
        model: DistributedCausalLM,
        *,
        batch_size: int = 16,
        max_length: int = 96,
        priority: Priority = INFERENCE,
    ) -> None:
        from rayfin.llm.finetune import label_token_ids

        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.priority = priority
        self.label_ids = label_token_ids(model.tokenizer, LABELS)

    @classmethod
    def from_options(
        cls,
        model: str = "smollm2-135m",
        swarm: str = "default",
        adapter: str | None = None,
        version: int | str | None = None,
        hub: str | None = None,
        **options: Any,
    ) -> LLMSentimentScorer:
        """A scorer on the running swarm ``swarm``: zero-shot, or with ``adapter`` (name,
        and version or alias, from the adapter hub ``hub``)."""
        from rayfin.llm.client import DistributedCausalLM

        client = DistributedCausalLM.from_pretrained(model, swarm=swarm)
        if adapter is not None:
            client.load_adapter(adapter, version, hub)
        return cls(client, **options)

    def prompt(self, headline: str) -> str:
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return (
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"{INSTRUCTION}\nHeadline: {headline}"}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                + "Sentiment:"
            )
        return f"{INSTRUCTION}\nHeadline: {headline}\nSentiment:"

    def score(self, headlines: Sequence[str]) -> np.ndarray:
        from rayfin.llm.finetune import hidden_states, right_pad

        if isinstance(headlines, str) or any(not isinstance(h, str) for h in headlines):
            raise TypeError("score takes a sequence of headline strings")
        out = np.zeros((len(headlines), len(LABELS)), dtype=np.float64)
        tokenizer = self.model.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for first in range(0, len(headlines), self.batch_size):
            chunk = headlines[first : first + self.batch_size]
            rows = [
                tokenizer.encode(self.prompt(h), add_special_tokens=False)[-self.max_length :]
                for h in chunk
            ]
            input_ids, last_index = right_pad(rows, pad)
            with torch.no_grad():
                hidden = hidden_states(self.model, input_ids, priority=self.priority)
                last = hidden[torch.arange(hidden.shape[0]), last_index]
                logits = self.model.lm_head(last)[:, self.label_ids]
                out[first : first + len(chunk)] = torch.softmax(logits.double(), -1).numpy()
        return out

    def tune(
        self,
        headlines: Sequence[str],
        labels: Sequence[str],
        *,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        epochs: int = 2,
        lr: float = 1e-3,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> TrainingReport:
        """Attach a new LoRA adapter and train it on labelled headlines."""
        self.model.add_lora(rank, alpha, target_modules, seed=seed)
        data = [(self.prompt(h), label) for h, label in zip(headlines, labels, strict=True)]
        return self.model.train_adapter(
            data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            task=ADAPTER_TASK,
            labels=LABELS,
            max_length=self.max_length,
            seed=seed,
            priority=TRAINING,
            progress=progress,
        )

    def save(
        self, name: str, hub: str | None = None, *, report: TrainingReport | None = None,
        metrics: dict[str, float] | None = None,
    ) -> AdapterCard:  # fmt: skip
        """Save the tuned adapter to the hub, with its training data's fingerprint."""
        return self.model.save_adapter(
            name,
            hub,
            task=ADAPTER_TASK,
            labels=LABELS,
            metrics=metrics,
            training_data_fingerprint=report.data_fingerprint if report else "",
            extra={"instruction": INSTRUCTION},
        )
