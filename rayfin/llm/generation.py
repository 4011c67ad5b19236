"""Choosing the next token and deciding when to stop, as Hugging Face ``generate`` does.

Greedy decoding takes the arg-max. Sampling applies temperature, top-k and top-p (in that
order, as transformers' logits warpers do) and draws from a ``torch.Generator`` seeded by
the caller, so a seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class TokenSelector:
    """Picks one token per row from the last position's logits."""

    def __init__(self, options: SamplingOptions) -> None:
        self.options = options
        self.generator = torch.Generator()
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[batch, vocab]`` to token ids ``[batch]``."""
        o = self.options
        if not o.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / o.temperature
        if o.top_k is not None and o.top_k < scores.shape[-1]:
            kth = torch.topk(scores, o.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -torch.inf)
        if o.top_p is not None and o.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop the low tail whose total mass is at most 1 - top_p; keep at least one.
            drop = cumulative <= (1 - o.top_p)
            drop[..., -1] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1)


@dataclass(slots=True)
class StopState:
    """Which rows are done: by an end-of-sequence token or by a stop string."""

    eos_token_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    tokenizer: PreTrainedTokenizerBase | None = None
    finished: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def start(self, batch: int) -> None:
        self.finished = torch.zeros(batch, dtype=torch.bool)
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer=...")

    def update(self, tokens: torch.Tensor, generated: torch.Tensor) -> None:
        """Mark rows finished after ``tokens`` ``[batch]`` were appended to ``generated``."""
        if self.eos_token_ids:
            eos = torch.tensor(sorted(self.eos_token_ids))
            self.finished |= torch.isin(tokens, eos)
        if self.stop_strings:
            assert self.tokenizer is not None
            for row in range(generated.shape[0]):
                if self.finished[row]:
                    continue
                text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                if any(stop in text for stop in self.stop_strings):
                    self.finished[row] = True

    @property
    def all_done(self) -> bool:
        return bool(self.finished.all())
