"""The distributed LLM half of rayfin: model assets, block servers, swarms and the client.

Start a swarm with :func:`launch_swarm` (or ``rayfin llm serve``), then use
:class:`DistributedCausalLM` like a transformers model whose blocks run on Ray actors.
"""

from rayfin.llm.assets import PREPARE_STEPS, is_prepared, model_dir, prepare_model
from rayfin.llm.catalog import CATALOG, ModelSpec, get_spec
from rayfin.llm.chat import chat_reply
from rayfin.llm.loading import load_local_model, resolve_model_path

__all__ = [
    "CATALOG",
    "PREPARE_STEPS",
    "DistributedCausalLM",
    "InferenceSession",
    "ModelSpec",
    "Swarm",
    "chat_reply",
    "connect_swarm",
    "get_spec",
    "is_prepared",
    "launch_swarm",
    "load_local_model",
    "model_dir",
    "prepare_model",
    "resolve_model_path",
]

# The distributed parts import torch and Ray; load them on first use so that the CLI and
# the asset helpers stay quick to import.
_LAZY = {
    "DistributedCausalLM": "rayfin.llm.client",
    "InferenceSession": "rayfin.llm.client",
    "Swarm": "rayfin.llm.swarm",
    "connect_swarm": "rayfin.llm.swarm",
    "launch_swarm": "rayfin.llm.swarm",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayfin.llm' has no attribute {name!r}")
