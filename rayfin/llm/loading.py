"""Load a causal LM and its tokenizer from a catalogue name, a folder, or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rayfin.errors import ModelAssetError
from rayfin.llm.assets import prepare_model
from rayfin.llm.catalog import CATALOG

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"``, ``"bfloat16"``, ...)."""
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ModelAssetError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return value


def resolve_model_path(name_or_path: str | Path, *, cache_dir: Path | None = None) -> str:
    """A catalogue name becomes its prepared folder; folders and hub ids pass through."""
    text = str(name_or_path)
    if text in CATALOG:
        return str(prepare_model(text, cache_dir=cache_dir))
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    return text


def load_local_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is a catalogue name (prepared on first use, see
    :func:`rayfin.llm.prepare_model`), a local transformers folder, or a Hugging Face
    id already in the local hub cache. ``dtype`` defaults to float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(name_or_path, cache_dir=cache_dir)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except OSError as exc:
        known = ", ".join(sorted(CATALOG))
        raise ModelAssetError(
            f"cannot load {str(name_or_path)!r}: it is not a catalogue name ({known}), "
            f"not a local folder, and not loadable as a Hugging Face id ({exc})"
        ) from exc
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
