"""int8 / nf4 weights for a server's blocks, with the real bitsandbytes kernels on CPU."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import transformers

from rayfin.errors import UnsupportedModelError
from rayfin.llm.quantization import (
    QUANTIZATIONS,
    check_quantization,
    parameter_bytes,
    quantize_linears,
)

SIZES = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BNB_CLASS = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
# Measured bytes of the quantized linears over their float32 bytes: 0.264 (int8: 1 byte a weight
# plus a float32 scale per row) and 0.181 (nf4: half a byte a weight, 8-bit scales per 64, plus
# per-layer code tables that weigh a lot in layers this small).
BYTES_RATIO = {"int8": (0.25, 0.30), "nf4": (0.125, 0.21)}
# Measured relative errors on the Llama layers: int8 0.8 % (q_proj) and 1.8 % (mlp), nf4 9 % and
# 16 %; the Qwen2 ones are within a few tenths of those.
MAX_ERROR = {"int8": {"q_proj": 0.02, "mlp": 0.04}, "nf4": {"q_proj": 0.15, "mlp": 0.25}}


@pytest.fixture(scope="module")
def llama_layers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    return model.model.layers


@pytest.fixture(scope="module")
def qwen2_layers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)).eval()
    # Biases start at zero, which would not show whether they were carried over.
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    return model.model.layers


def _x(rows: int = 9) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, rows, SIZES["hidden_size"])


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _linear_bytes(module: torch.nn.Module) -> int:
    return sum(
        p.numel() * p.element_size()
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters()
    )


def test_quantizations_are_checked() -> None:
    assert QUANTIZATIONS == (None, "int8", "nf4")
    assert check_quantization("nf4") == "nf4"
    with pytest.raises(UnsupportedModelError, match=r"None, 'int8', 'nf4'") as info:
        quantize_linears(torch.nn.Linear(4, 4), "int4")
    assert "'int4'" in str(info.value)


def test_parameter_bytes_of_plain_modules() -> None:
    assert parameter_bytes(torch.nn.Linear(4, 3)) == (12 + 3) * 4
    shared = torch.nn.Linear(4, 4, bias=False)
    assert parameter_bytes(torch.nn.Sequential(shared, shared)) == 16 * 4
    assert parameter_bytes(torch.nn.BatchNorm1d(8)) == 4 * 8 * 4 + 8  # 4 vectors + step count


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_llama_layers_are_quantized(llama_layers: torch.nn.ModuleList, method: str) -> None:
    layers = quantize_linears(copy.deepcopy(llama_layers), method)
    for layer in layers:
        assert sum(isinstance(m, BNB_CLASS[method]) for m in layer.modules()) == 7
        assert not any(type(m) is torch.nn.Linear for m in layer.modules())
        frozen = [m for m in layer.modules() if isinstance(m, BNB_CLASS[method])]
        assert not any(p.requires_grad for m in frozen for p in m.parameters())

    others = parameter_bytes(llama_layers) - _linear_bytes(llama_layers)  # the norms
    ratio = (parameter_bytes(layers) - others) / _linear_bytes(llama_layers)
    low, high = BYTES_RATIO[method]
    assert low < ratio < high

    x = _x()
    with torch.no_grad():
        for name in ("q_proj", "mlp"):
            path = f"self_attn.{name}" if name == "q_proj" else name
            ref = llama_layers[0].get_submodule(path)(x)
            got = layers[0].get_submodule(path)(x)
            assert got.dtype == ref.dtype
            assert got.shape == ref.shape
            assert _rel_error(got, ref) < MAX_ERROR[method][name]
    # A forward does not change what the layers hold.
    assert (parameter_bytes(layers) - others) / _linear_bytes(llama_layers) == ratio


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_qwen2_biases_are_carried_over(qwen2_layers: torch.nn.ModuleList, method: str) -> None:
    layers = quantize_linears(copy.deepcopy(qwen2_layers), method)
    x = _x()
    for proj in ("q_proj", "k_proj", "v_proj"):
        original = qwen2_layers[1].self_attn.get_submodule(proj)
        quantized = layers[1].self_attn.get_submodule(proj)
        assert isinstance(quantized, BNB_CLASS[method])
        assert torch.equal(quantized.bias, original.bias)
        with torch.no_grad():
            error = _rel_error(quantized(x), original(x))
        assert error < MAX_ERROR[method]["q_proj"]


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_backward_reaches_the_input(llama_layers: torch.nn.ModuleList, method: str) -> None:
    layers = quantize_linears(copy.deepcopy(llama_layers), method)
    mlp, ref_mlp = layers[0].mlp, llama_layers[0].mlp
    x = _x()
    with torch.no_grad():
        mlp(x)  # an inference step first, as a server does, must not break later backward
    xq = x.clone().requires_grad_()
    mlp(xq).sum().backward()
    xr = x.clone().requires_grad_()
    ref_mlp(xr).sum().backward()
    assert xq.grad is not None
    assert torch.isfinite(xq.grad).all()
    assert _rel_error(xq.grad, xr.grad) < MAX_ERROR[method]["mlp"]
    assert all(p.grad is None for p in mlp.parameters())


def test_none_only_moves(llama_layers: torch.nn.ModuleList) -> None:
    layers = quantize_linears(copy.deepcopy(llama_layers), None, device="cpu")
    assert sum(type(m) is torch.nn.Linear for m in layers.modules()) == 14
    assert parameter_bytes(layers) == parameter_bytes(llama_layers)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantizing_twice_changes_nothing(llama_layers: torch.nn.ModuleList, method: str) -> None:
    layers = quantize_linears(copy.deepcopy(llama_layers), method)
    x = _x()
    with torch.no_grad():
        before = layers[0].mlp(x)
        again = quantize_linears(layers, method)
        assert again is layers
        assert torch.equal(layers[0].mlp(x), before)


def test_a_lone_linear_is_replaced() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    quantized = quantize_linears(copy.deepcopy(linear), "int8")
    assert isinstance(quantized, bnb.nn.Linear8bitLt)
    x = _x()
    with torch.no_grad():
        assert _rel_error(quantized(x), linear(x)) < MAX_ERROR["int8"]["q_proj"]
