"""Read only the parts of a checkpoint that one process needs.

A block server loads the weights of its own blocks, a client loads the embeddings, the
final norm and the LM head; neither ever materialises the whole model. Both build their
modules from the model's own transformers classes on the meta device, then assign the
tensors read from safetensors, so every supported family runs its own reference code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rayfin.errors import ModelAssetError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# Families whose decoder layers share the Llama contract: pre-norm blocks called as
# ``layer(hidden, position_embeddings=(cos, sin), **attention_kwargs)`` with rotary
# positions computed once per model, attention through ``config._attn_implementation``.
SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

ATTENTION_IMPLEMENTATION = "rayfin_session"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a server and a client must agree on about a model."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_length: int

    def kv_bytes_per_token(self, num_layers: int, element_size: int) -> int:
        """KV-cache bytes one token costs across ``num_layers`` blocks."""
        return 2 * num_layers * self.num_kv_heads * self.head_dim * element_size


def load_config(path: str | Path) -> PretrainedConfig:
    """The model's config, checked to be a supported family."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported by the distributed LLM; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return config


def model_shape(config: PretrainedConfig) -> ModelShape:
    """The dimensions of ``config``; a sliding window caps the session length so that
    attention never needs the window (which keeps outputs exact)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window
    layer_types = getattr(config, "layer_types", None) or []
    if uses_window and (config.model_type == "mistral" or "sliding_attention" in layer_types):
        max_length = min(max_length, int(window))
    return ModelShape(
        model_type=config.model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=int(config.num_attention_heads),
        num_kv_heads=int(config.num_key_value_heads or config.num_attention_heads),
        head_dim=int(head_dim),
        vocab_size=int(config.vocab_size),
        max_length=max_length,
    )


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelAssetError(
            f"{path} has no model.safetensors or model.safetensors.index.json; the distributed "
            "LLM reads safetensors checkpoints (see `rayfin models prepare`)"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def read_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read just ``names`` from the checkpoint at ``path``; missing names are an error."""
    from safetensors import safe_open

    files = _weight_files(Path(path))
    missing = [name for name in names if name not in files]
    if missing:
        raise ModelAssetError(f"checkpoint {path} lacks tensors: {', '.join(missing[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in file_names:
                tensors[name] = handle.get_tensor(name)
    return tensors


def _skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The full model on the meta device: module structure without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Give ``module`` (on meta) real weights, strictly: every parameter must be provided."""
    module.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)


def load_blocks(
    path: str | Path, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype
) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """Decoder layers ``[start, end)`` and the rotary embedding, on CPU in ``dtype``."""
    import torch

    shape = model_shape(config)
    if not 0 <= start < end <= shape.num_layers:
        raise UnsupportedModelError(
            f"block range [{start}, {end}) is outside the model's {shape.num_layers} blocks"
        )
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    skeleton = _skeleton(config)
    layers = torch.nn.ModuleList(skeleton.model.layers[start:end])
    prefix = {i: f"model.layers.{i}." for i in range(start, end)}
    names = [
        prefix[i] + local
        for i, layer in zip(range(start, end), layers, strict=True)
        for local in layer.state_dict()
    ]
    tensors = read_tensors(path, names)
    renamed = {
        f"{i - start}.{name[len(prefix[i]) :]}": tensor
        for i in range(start, end)
        for name, tensor in tensors.items()
        if name.startswith(prefix[i])
    }
    _assign(layers, renamed, dtype)
    # Rotary frequencies are computed, not stored: build the module for real.
    rotary = type(skeleton.model.rotary_emb)(config=config)
    return layers.eval().requires_grad_(False), rotary.eval()


def load_client_parts(
    path: str | Path, config: PretrainedConfig, dtype: torch.dtype
) -> tuple[torch.nn.Embedding, torch.nn.Module, torch.nn.Linear]:
    """The token embeddings, the final norm and the LM head (tied or not)."""
    skeleton = _skeleton(config)
    embed, norm, head = skeleton.model.embed_tokens, skeleton.model.norm, skeleton.lm_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    files = _weight_files(Path(path))
    if not tied or "lm_head.weight" in files:
        names.append("lm_head.weight")
    tensors = read_tensors(path, names)
    _assign(embed, {"weight": tensors["model.embed_tokens.weight"]}, dtype)
    _assign(norm, {"weight": tensors["model.norm.weight"]}, dtype)
    if "lm_head.weight" in tensors:
        _assign(head, {"weight": tensors["lm_head.weight"]}, dtype)
    else:
        head.weight = embed.weight
    for module in (embed, norm, head):
        module.eval().requires_grad_(False)
    return embed, norm, head
