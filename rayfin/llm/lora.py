"""LoRA adapters held by the client and applied by block servers for one request at a time.

The client owns every adapter matrix and the optimizer (:class:`LoraAdapter`). A request to
a server carries the matrices of the blocks it runs (:class:`AdapterPayload`, or only its
digest when the server still caches that exact content), and the server adds
``scaling * B(A(x))`` to the chosen projections with forward hooks that exist only while
that request computes (:func:`lora_applied`). The server's weights never change and never
see a gradient; the hooks are gone before the next request, so clients with different
adapters share servers without seeing each other's.

Tensor names are ``blocks.{block}.{module}.lora_A`` (``[rank, in]``) and ``...lora_B``
(``[out, rank]``), ``module`` one of :data:`TARGET_MODULES`; the update is the one peft
computes (``lora_B(lora_A(x)) * alpha / rank``, no dropout), so a local peft model with the
same matrices gives the same outputs and gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rayfin.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Projections of a Llama-contract decoder layer LoRA can adapt, and where they live.
TARGET_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}

_NAME = re.compile(r"^blocks\.(\d+)\.([a-z_]+)\.lora_([AB])$")


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """Rank, scale and target projections of a LoRA adapter (peft's defaults)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        unknown = sorted(set(self.target_modules) - set(TARGET_MODULES))
        if unknown:
            raise UnsupportedModelError(
                f"unknown LoRA target modules {unknown}; choose from {sorted(TARGET_MODULES)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def tensor_name(block: int, module: str, which: str) -> str:
    return f"blocks.{block}.{module}.lora_{which}"


def parse_name(name: str) -> tuple[int, str, str]:
    """``(block, module, "A" | "B")`` of an adapter tensor name."""
    match = _NAME.match(name)
    if match is None or match.group(2) not in TARGET_MODULES:
        raise ValueError(f"not a LoRA tensor name: {name!r}")
    return int(match.group(1)), match.group(2), match.group(3)


def projection_shape(config: PretrainedConfig, module: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of projection ``module`` in one decoder layer."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    heads = config.num_attention_heads * head_dim
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_width = kv * head_dim
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, heads),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (heads, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[module]


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors: the key a server caches adapter weights under."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def tensors_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True, slots=True)
class AdapterPayload:
    """The adapter a request runs with. ``tensors`` is None when the client believes the
    server still caches ``digest`` under ``key``; a server that does not answers with
    :class:`~rayfin.errors.AdapterNotCachedError` and the client resends the tensors."""

    key: str
    digest: str
    scaling: float
    tensors: dict[str, torch.Tensor] | None = None

    def without_tensors(self) -> AdapterPayload:
        return AdapterPayload(self.key, self.digest, self.scaling, None)


def blocks_of(tensors: Iterable[str]) -> set[int]:
    return {parse_name(name)[0] for name in tensors}


@contextlib.contextmanager
def lora_applied(
    layers: torch.nn.ModuleList,
    first: int,
    tensors: Mapping[str, torch.Tensor] | None,
    scaling: float,
) -> Iterator[None]:
    """While the block returns, projections of ``layers`` (blocks ``first..``) named in
    ``tensors`` add ``scaling * B(A(x))``. Hooks, not new modules: the server's module tree
    and weights stay exactly as loaded."""
    if not tensors:
        yield
        return
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        block, module, which = parse_name(name)
        pairs.setdefault((block, module), {})[which] = tensor
    handles = []
    try:
        for (block, module), pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"block {block} {module}: LoRA needs both lora_A and lora_B")
            index = block - first
            if not 0 <= index < len(layers):
                raise ValueError(f"adapter block {block} is not in this span")
            parent, child = TARGET_MODULES[module]
            linear = getattr(getattr(layers[index], parent), child)
            handles.append(linear.register_forward_hook(_hook(pair["A"], pair["B"], scaling)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(a: torch.Tensor, b: torch.Tensor, scaling: float):  # type: ignore[no-untyped-def]
    def add_update(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a.dtype)
        return output + (F.linear(F.linear(x, a), b) * scaling).to(output.dtype)

    return add_update


class LoraAdapter(torch.nn.Module):
    """The client's LoRA matrices for every block, trainable with any torch optimizer.

    Initialised as peft does: ``A`` Kaiming-uniform, ``B`` zero, so a new adapter leaves
    the model unchanged. ``seed`` makes the initialisation reproducible.
    """

    def __init__(
        self,
        config: LoraConfig,
        model_config: PretrainedConfig,
        *,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_blocks = int(model_config.num_hidden_layers)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._names: dict[str, str] = {}  # tensor name -> attribute name
        for block in range(self.num_blocks):
            for module in config.target_modules:
                fan_in, fan_out = projection_shape(model_config, module)
                a = torch.empty(config.rank, fan_in, dtype=dtype)
                _kaiming_uniform(a, generator)
                b = torch.zeros(fan_out, config.rank, dtype=dtype)
                for which, value in (("A", a), ("B", b)):
                    attr = f"b{block}_{module}_{which}"
                    self.register_parameter(attr, torch.nn.Parameter(value))
                    self._names[tensor_name(block, module, which)] = attr

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every matrix by its tensor name (the hub's and the wire's naming)."""
        return {name: getattr(self, attr) for name, attr in self._names.items()}

    def span_tensors(self, start: int, end: int) -> dict[str, torch.nn.Parameter]:
        """The matrices of blocks ``[start, end)``: what a request for that span carries."""
        return {
            name: getattr(self, attr)
            for name, attr in self._names.items()
            if start <= parse_name(name)[0] < end
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies, for saving."""
        return {name: p.detach().cpu().clone() for name, p in self.named_tensors().items()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved matrices in; names and shapes must match this adapter exactly."""
        own = self.named_tensors()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(
                f"adapter tensors do not match this LoRA config: missing {missing[:4]}, "
                f"unexpected {extra[:4]}"
            )
        with torch.no_grad():
            for name, param in own.items():
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise ValueError(
                        f"{name}: shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(tensors[name])


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator | None) -> None:
    # torch.nn.init.kaiming_uniform_(a=sqrt(5)) (what nn.Linear and peft use), seedable.
    fan_in = tensor.shape[1]
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)
