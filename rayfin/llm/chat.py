"""One chat turn with a local causal LM: template, greedy generation, decode."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """``[1, length]`` token ids of one user message in the model's chat template, ready
    for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def chat_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 40,
) -> str:
    """The model's greedy reply to one user message, without the prompt or special tokens."""
    import torch

    ids = chat_input_ids(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    prompt_len = ids.shape[1]
    return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
