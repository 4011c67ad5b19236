"""Parameter-efficient fine-tuning of a :class:`DistributedCausalLM` from the client.

Everything trainable lives here, on the client: LoRA matrices
(:class:`~rayfin.llm.lora.LoraAdapter`), a prompt-tuning prefix (:class:`PromptPrefix`),
a classification head (:class:`ClassificationHead`), and the optimizer. The servers run
forward and backward through their frozen blocks (:mod:`rayfin.llm.backprop`).

Three tasks, one loop (:func:`train_adapter`):

* ``"causal-lm"``: next-token loss on texts, or on the completion of ``(prompt,
  completion)`` pairs.
* ``"label-scoring"``: ``(prompt, label)`` pairs; the loss is cross-entropy over the
  logits of each label's first token at the prompt's last position (zero-shot scoring
  reads the same logits, so tuning sharpens what the base model already does).
* ``"classification"``: ``(text, label)`` pairs through a small linear head on the final
  normalised hidden state of the last token.

Batches are right-padded: with causal attention a real token never sees the padding after
it, so padding changes no real position's output.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from rayfin.llm.backprop import remote_blocks
from rayfin.llm.priority import TRAINING, Priority

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rayfin.llm.client import DistributedCausalLM

log = logging.getLogger(__name__)

Task = Literal["causal-lm", "label-scoring", "classification"]
DEFAULT_MAX_LENGTH = 256
"""Tokens an example is cut to (from the left) unless ``max_length`` says otherwise."""
TASKS: tuple[str, ...] = ("causal-lm", "label-scoring", "classification")


class PromptPrefix(torch.nn.Module):
    """``num_virtual_tokens`` trainable input embeddings put before every prompt: prompt
    tuning, the cheapest adapter (no weights travel to the servers, only the longer
    hidden state). Initialised from the embeddings of random vocabulary tokens."""

    def __init__(
        self, embed_tokens: torch.nn.Embedding, num_virtual_tokens: int, *, seed: int = 0
    ) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(
            0, embed_tokens.num_embeddings, (num_virtual_tokens,), generator=generator
        )
        self.embeddings = torch.nn.Parameter(embed_tokens.weight[ids].detach().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        return prepend_prefix(self.embeddings, embeds)


class ClassificationHead(torch.nn.Module):
    """A linear layer from the last token's final hidden state to ``len(labels)`` logits."""

    def __init__(self, hidden_size: int, labels: Sequence[str], *, seed: int = 0) -> None:
        super().__init__()
        self.labels = tuple(labels)
        generator = torch.Generator().manual_seed(seed)
        self.linear = torch.nn.Linear(hidden_size, len(self.labels))
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.02, generator=generator)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


@dataclass(frozen=True, slots=True)
class Batch:
    """Right-padded token ids, the index of each row's last real token, and targets."""

    input_ids: torch.Tensor  # [batch, length]
    last: torch.Tensor  # [batch] index of the last real token
    targets: torch.Tensor  # causal-lm: [batch, length] (-100 = no loss); else [batch] class


@dataclass(slots=True)
class TrainingReport:
    """What :func:`train_adapter` did: per-step losses, time and traffic."""

    task: str
    epochs: int
    steps: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    data_fingerprint: str = ""

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(sum(tail) / len(tail)) if tail else math.nan

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_step(self) -> float:
        return (self.bytes_sent + self.bytes_received) / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "epochs": self.epochs,
            "steps": self.steps,
            "examples": self.examples,
            "final_loss": self.final_loss,
            "seconds": self.seconds,
            "steps_per_s": self.steps_per_s,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_per_step": self.bytes_per_step,
            "data_fingerprint": self.data_fingerprint,
        }


def data_fingerprint(dataset: Sequence[Any]) -> str:
    """SHA-256 of the training examples, in order: recorded with the adapter."""
    h = hashlib.sha256()
    for item in dataset:
        h.update(repr(item).encode())
        h.update(b"\x00")
    return h.hexdigest()


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[int]:
    """The first token of ``" " + label`` for each label; they must differ."""
    ids = [tokenizer.encode(" " + label, add_special_tokens=False)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share a first token; choose other label words")
    return ids


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded ``[batch, length]`` tensor, and each row's last real
    index."""
    if any(not row for row in rows):
        raise ValueError("an example has no tokens")
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    return input_ids, torch.tensor([len(row) - 1 for row in rows])


def prepend_prefix(prefix: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """``prefix`` ``[virtual, dim]`` before every row of ``embeds`` ``[batch, new, dim]``."""
    expanded = prefix.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
    return torch.cat([expanded, embeds], dim=1)


def make_batch(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Any],
    task: Task,
    labels: Sequence[str] | None,
    max_length: int,
    pad_id: int,
) -> Batch:
    """Tokenise, truncate from the left (the end of a prompt matters most), right-pad."""
    rows: list[list[int]] = []
    targets: list[Any] = []
    for item in items:
        if task == "causal-lm":
            prompt, completion = ("", item) if isinstance(item, str) else item
            head, tail = (
                _encode(tokenizer, prompt) if prompt else [],
                _encode(tokenizer, completion),
            )
            ids = (head + tail)[-max_length:]
            learn = [False] * len(head) + [True] * len(tail)
            learn = learn[-max_length:]
            rows.append(ids)
            # Position i predicts token i + 1.
            targets.append(
                [ids[i + 1] if learn[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]
            )
        else:
            text, label = item
            assert labels is not None
            if label not in labels:
                raise ValueError(f"label {label!r} is not one of {list(labels)}")
            rows.append(_encode(tokenizer, text)[-max_length:])
            targets.append(labels.index(label))
    input_ids, last = right_pad(rows, pad_id)
    length = input_ids.shape[1]
    if task == "causal-lm":
        target = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, row in enumerate(targets):
            target[i, : len(row)] = torch.tensor(row)
    else:
        target = torch.tensor(targets)
    return Batch(input_ids, last, target)


def hidden_states(
    model: DistributedCausalLM,
    input_ids: torch.Tensor,
    *,
    priority: Priority = TRAINING,
) -> torch.Tensor:
    """Final normalised hidden states ``[batch, length, dim]`` of ``input_ids`` with the
    model's adapter and prefix, differentiable in both (prefix positions dropped)."""
    embeds = model.embed_tokens(input_ids)
    prefix = model.prompt_prefix
    if prefix is not None:
        embeds = prefix.prepend(embeds)
    out = remote_blocks(model.backprop, embeds, model.adapter, priority=priority)
    if prefix is not None:
        out = out[:, prefix.num_virtual_tokens :]
    return model.norm(out)


def batch_loss(
    model: DistributedCausalLM,
    batch: Batch,
    task: Task,
    *,
    label_ids: Sequence[int] | None = None,
    head: ClassificationHead | None = None,
    priority: Priority = TRAINING,
) -> torch.Tensor:
    hidden = hidden_states(model, batch.input_ids, priority=priority)
    if task == "causal-lm":
        logits = model.lm_head(hidden)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
    last = hidden[torch.arange(hidden.shape[0]), batch.last]
    if task == "classification":
        assert head is not None
        return F.cross_entropy(head(last), batch.targets)
    assert label_ids is not None
    logits = model.lm_head(last)[:, list(label_ids)]
    return F.cross_entropy(logits, batch.targets)


def train_adapter(
    model: DistributedCausalLM,
    dataset: Sequence[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    task: Task = "causal-lm",
    labels: Sequence[str] | None = None,
    head: ClassificationHead | None = None,
    max_length: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    priority: Priority = TRAINING,
    progress: bool = True,
    log_every: int = 10,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingReport:
    """Train the model's adapter and/or prompt prefix (and ``head`` for classification)
    on ``dataset`` with AdamW; see the module docstring for the tasks' data."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if task != "causal-lm" and not labels:
        raise ValueError(f"task {task!r} needs labels")
    if task == "classification" and head is None:
        raise ValueError("classification needs a head: ClassificationHead(hidden_size, labels)")
    if not dataset:
        raise ValueError("the dataset is empty")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    virtual = model.prompt_prefix.num_virtual_tokens if model.prompt_prefix is not None else 0
    if max_length is None:  # long enough for headlines and short texts
        max_length = min(DEFAULT_MAX_LENGTH, model.shape.max_length - virtual)
    if max_length + virtual > model.shape.max_length:
        raise ValueError(
            f"max_length {max_length} (+{virtual} prefix tokens) exceeds the model's "
            f"{model.shape.max_length} positions"
        )
    params = model.trainable_parameters()
    if head is not None:
        params += list(head.parameters())
    if not params:
        raise ValueError("nothing to train: call add_lora(...) or add_prompt_tuning(...) first")
    tokenizer = model.tokenizer
    label_ids = label_token_ids(tokenizer, labels) if task == "label-scoring" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order = list(range(len(dataset)))
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    report = TrainingReport(task, epochs, data_fingerprint=data_fingerprint(dataset))
    sent, received = model.backprop.bytes_sent, model.backprop.bytes_received
    bar = _progress(progress, epochs * steps_per_epoch)
    begin = time.perf_counter()
    try:
        for epoch in range(epochs):
            rng.shuffle(order)
            for first in range(0, len(order), batch_size):
                items = [dataset[i] for i in order[first : first + batch_size]]
                batch = make_batch(tokenizer, items, task, labels, max_length, pad_id)
                loss = batch_loss(
                    model, batch, task, label_ids=label_ids, head=head, priority=priority
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                value = float(loss.detach())
                report.losses.append(value)
                report.steps += 1
                report.examples += len(items)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
                if log_every and report.steps % log_every == 0:
                    log.info("step %d epoch %d loss %.4f", report.steps, epoch + 1, value)
                if on_step is not None:
                    on_step(report.steps, value)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - begin
    report.bytes_sent = model.backprop.bytes_sent - sent
    report.bytes_received = model.backprop.bytes_received - received
    return report


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train_adapter", unit="step")
