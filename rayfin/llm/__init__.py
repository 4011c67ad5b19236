"""The distributed LLM half of rayfin: model assets, block servers, swarms and the client.

Start a swarm with :func:`launch_swarm` (or ``rayfin llm serve``), then use
:class:`DistributedCausalLM` like a transformers model whose blocks run on Ray actors;
fine-tune it with client-held adapters (``add_lora``, ``train_adapter``), kept in an
:class:`AdapterHub`. Servers earn points (:class:`PointsLedger`) that clients spend on
queue :class:`Priority`.
"""

from rayfin.llm.assets import PREPARE_STEPS, is_prepared, model_dir, prepare_model
from rayfin.llm.catalog import CATALOG, ModelSpec, get_spec
from rayfin.llm.chat import chat_reply
from rayfin.llm.loading import load_local_model, resolve_model_path

__all__ = [
    "CATALOG",
    "PREPARE_STEPS",
    "AdapterCard",
    "AdapterHub",
    "DistributedCausalLM",
    "InferenceSession",
    "LoraAdapter",
    "LoraConfig",
    "ModelSpec",
    "PointsLedger",
    "PointsPolicy",
    "Priority",
    "Swarm",
    "TrainingReport",
    "WorkRecord",
    "base_model_hash",
    "chat_reply",
    "connect_swarm",
    "find_points_bank",
    "get_spec",
    "is_prepared",
    "launch_points_bank",
    "launch_swarm",
    "load_local_model",
    "model_dir",
    "prepare_model",
    "resolve_model_path",
    "train_adapter",
]

# The distributed parts import torch and Ray; load them on first use so that the CLI and
# the asset helpers stay quick to import.
_LAZY = {
    "AdapterCard": "rayfin.llm.hub",
    "AdapterHub": "rayfin.llm.hub",
    "base_model_hash": "rayfin.llm.hub",
    "DistributedCausalLM": "rayfin.llm.client",
    "InferenceSession": "rayfin.llm.client",
    "LoraAdapter": "rayfin.llm.lora",
    "LoraConfig": "rayfin.llm.lora",
    "Priority": "rayfin.llm.priority",
    "TrainingReport": "rayfin.llm.finetune",
    "train_adapter": "rayfin.llm.finetune",
    "Swarm": "rayfin.llm.swarm",
    "connect_swarm": "rayfin.llm.swarm",
    "launch_swarm": "rayfin.llm.swarm",
    "PointsLedger": "rayfin.llm.points",
    "PointsPolicy": "rayfin.llm.points",
    "WorkRecord": "rayfin.llm.points",
    "find_points_bank": "rayfin.actors.points",
    "launch_points_bank": "rayfin.actors.points",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayfin.llm' has no attribute {name!r}")
