"""int8 / nf4 weights for the transformer blocks a server holds, through bitsandbytes.

:func:`quantize_linears` swaps every ``torch.nn.Linear`` for its bitsandbytes counterpart and
moves the module to its device, which is when bitsandbytes quantizes (on CPU as on CUDA):

* ``Int8Params.to(device)`` quantizes when its data is still on the CPU and not yet int8, so
  replacements are always built around a CPU copy of the weight, then moved;
* ``Params4bit.to(device)`` quantizes on any real (non-meta) device until ``bnb_quantized``.

Backward through the quantized layers works for the input (frozen weights, activation grads),
checked for both methods on CPU with bitsandbytes 0.50.2, with one change from the defaults: on
CPUs with AVX512-BF16, ``Linear4bit`` in eval mode repacks its weight on the first forward that
needs no grad, for a kernel that has no autograd; from then on backward silently gives no input
grad. We switch that repacking off. Measured on a 576x1536 layer here, it was 3.4x faster for
one token (0.085 ms against 0.29 ms) but slower for 64 (1.28 ms against 1.12 ms).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch

from rayfin.errors import UnsupportedModelError

QUANTIZATIONS: tuple[str | None, ...] = (None, "int8", "nf4")

# LLM.int8(): input columns with any |value| above this go through a float16 matmul instead of
# int8, which keeps the rare large activations of transformer blocks accurate.
INT8_THRESHOLD = 6.0


def check_quantization(name: str | None) -> str | None:
    """Return ``name`` if it is one of :data:`QUANTIZATIONS`, else raise UnsupportedModelError."""
    if name not in QUANTIZATIONS:
        choices = ", ".join(repr(q) for q in QUANTIZATIONS)
        raise UnsupportedModelError(f"unknown quantization {name!r}: choose one of {choices}")
    return name


def quantize_linears(
    module: torch.nn.Module,
    method: str | None,
    *,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Replace every ``nn.Linear`` in ``module`` (in place) with a ``method`` one on ``device``.

    ``"int8"`` uses ``Linear8bitLt`` (LLM.int8(), 1 byte a weight plus a scale per row),
    ``"nf4"`` uses ``Linear4bit`` with NF4 codes (half a byte a weight plus a scale per 64,
    itself 8-bit) computing in ``compute_dtype``; ``None`` only moves the module. Weights and
    biases are frozen. Returns ``module``, or its replacement if ``module`` is itself a Linear.
    """
    method = check_quantization(method)
    target = torch.device(device)
    if method is None:
        return module.to(target)
    if method == "int8":
        _quiet_int8_cast_warning()
    import bitsandbytes as bnb

    # bitsandbytes' layers are Linear subclasses too; quantizing twice must leave them alone.
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    if isinstance(module, torch.nn.Linear) and not isinstance(module, quantized):
        return _quantized(module, method, target, compute_dtype)

    done: dict[int, torch.nn.Module] = {}  # a Linear shared by two parents stays shared
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and not isinstance(child, quantized):
                if id(child) not in done:
                    # One layer at a time, so at most one extra float copy exists at once.
                    done[id(child)] = _quantized(child, method, target, compute_dtype)
                setattr(parent, name, done[id(child)])
    # Norms, embeddings and buffers; the quantized layers are already there and stay as they are.
    return module.to(target)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of storage held by ``module``'s parameters, buffers and quantization state.

    Quantized weights count at their stored size (int8: 1 byte, nf4: half a byte a weight),
    plus their scales, nested scales and code tables. Storage shared between tensors counts once.
    """
    seen: set[Any] = set()
    total = 0
    for tensor in _storage_tensors(module):
        storage = tensor.untyped_storage()
        # Meta tensors have no address; count each once by identity.
        key = (tensor.device, storage.data_ptr()) if storage.data_ptr() else id(tensor)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _quantized(
    linear: torch.nn.Linear, method: str, target: torch.device, compute_dtype: torch.dtype
) -> torch.nn.Module:
    """A bitsandbytes copy of ``linear``, quantized on ``target``."""
    import bitsandbytes as bnb

    # Int8Params only quantizes on a move that starts from the CPU; Params4bit does either way.
    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    layer: torch.nn.Linear
    # Built on the meta device: the random init of a real weight would be thrown away at once.
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        # See the module docstring: the CPU repacking would break backward to the input.
        layer.support_avx512bf16_for_cpu = False
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=layer.weight.compress_statistics,
            quant_storage=layer.quant_storage,
            module=layer,
        )
    if has_bias:
        # Qwen2's q/k/v projections have biases; they stay in their float dtype.
        layer.bias = torch.nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    layer.train(linear.training)
    return layer.to(target)


class _DropInt8CastWarning(logging.Filter):
    """Drops bitsandbytes' warning that int8 layers cast their input to float16.

    It is logged on every forward of every layer whose input is not float16, i.e. hundreds of
    times a token for a float32 server, and the cast is how LLM.int8() works, not a mistake.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_INT8_CAST_FILTER = _DropInt8CastWarning()


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST_FILTER not in logger.filters:
        logger.addFilter(_INT8_CAST_FILTER)


def _storage_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor ``module`` keeps: parameters, buffers, and bitsandbytes' side state."""
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        # Int8Params keeps its row scales (and codes) beside the data until the first forward
        # moves them to the layer's MatmulLtState.
        for name in ("CB", "SCB"):
            yield from _tensors(getattr(weight, name, None))
        state = getattr(sub, "state", None)
        for name in ("CB", "SCB"):
            yield from _tensors(getattr(state, name, None))
        # Params4bit (and Linear4bit) keep absmax, the code table and nested scales here.
        yield from _tensors(getattr(weight, "quant_state", None))
        yield from _tensors(getattr(sub, "quant_state", None))


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """The tensors in ``value``: itself, or those of a bitsandbytes QuantState, recursively."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    # No QuantState can exist before bitsandbytes is imported, and importing it is slow.
    functional = sys.modules.get("bitsandbytes.functional")
    if functional is not None and isinstance(value, functional.QuantState):
        for item in vars(value).values():
            yield from _tensors(item)
