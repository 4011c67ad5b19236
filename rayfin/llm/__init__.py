"""The distributed LLM half of rayfin. For now: model assets and local loading."""

from rayfin.llm.assets import PREPARE_STEPS, is_prepared, model_dir, prepare_model
from rayfin.llm.catalog import CATALOG, ModelSpec, get_spec
from rayfin.llm.chat import chat_reply
from rayfin.llm.loading import load_local_model, resolve_model_path

__all__ = [
    "CATALOG",
    "PREPARE_STEPS",
    "ModelSpec",
    "chat_reply",
    "get_spec",
    "is_prepared",
    "load_local_model",
    "model_dir",
    "prepare_model",
    "resolve_model_path",
]
