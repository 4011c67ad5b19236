"""Run a contiguous range of transformer blocks over one or many sessions' KV caches.

The blocks are the model's own transformers modules; rayfin only supplies the rotary
position embeddings and an attention function (registered with transformers'
``AttentionInterface``) that reads and appends to each session's cache. Because the
projections, norms and MLP see the whole batch while attention runs per session, decode
steps of sessions at different positions share one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rayfin.llm.checkpoint import ATTENTION_IMPLEMENTATION

if TYPE_CHECKING:
    from rayfin.llm.kv_cache import SessionCache


@dataclass(slots=True)
class CacheSlot:
    """Rows ``rows`` of a batch belong to one session whose cache holds ``past`` tokens."""

    rows: slice
    cache: SessionCache | None
    past: int


def _causal_mask(past: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Query ``i`` (at absolute position ``past + i``) sees keys ``0 .. past + i``."""
    if length == 1:
        return None
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    return keys[None, :] <= queries[:, None]


def session_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rayfin_slots: list[CacheSlot] | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each session's new tokens over its cache plus themselves.

    ``query`` is ``[batch, heads, new, head_dim]``; ``key``/``value`` are the new tokens'
    ``[batch, kv_heads, new, head_dim]`` after rotary embedding. They are written into the
    cache at the session's position before attending, exactly like a transformers Cache.
    """
    if attention_mask is not None:
        raise ValueError("rayfin session attention takes no padding mask")
    slots = rayfin_slots or [CacheSlot(slice(None), None, 0)]
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for slot in slots:
        q, k, v = query[slot.rows], key[slot.rows], value[slot.rows]
        length = q.shape[2]
        if slot.cache is not None:
            k, v = slot.cache.append(module.layer_idx, slot.past, k, v)
        mask = _causal_mask(slot.past, length, q.device)
        outputs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask if slot.past else None,
                is_causal=length > 1 and not slot.past,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, session_attention)


_register()


class BlockSpan:
    """Blocks ``[first, first + len(layers))`` of a model, runnable over any sub-range."""

    def __init__(self, layers: torch.nn.ModuleList, rotary: torch.nn.Module, first: int) -> None:
        self.layers = layers
        self.rotary = rotary
        self.first = first
        self.last = first + len(layers)

    def to(self, device: torch.device | str) -> BlockSpan:
        self.layers.to(device)
        self.rotary.to(device)
        return self

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        slots: list[CacheSlot] | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run blocks ``[start, end)`` (default: all held) on ``hidden`` ``[batch, new, dim]``.

        ``position_ids`` is ``[batch, new]``: each row's absolute positions, so rows from
        sessions at different lengths can share the batch.
        """
        start = self.first if start is None else start
        end = self.last if end is None else end
        position_embeddings = self.rotary(hidden, position_ids)
        for layer in self.layers[start - self.first : end - self.first]:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                rayfin_slots=slots,
            )
        return hidden
