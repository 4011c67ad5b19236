"""Turn a catalogue model's GGUF file into a plain transformers folder, once.

Loading a GGUF through transformers de-quantizes every tensor and parses the tokenizer
from GGUF metadata (about 20 s for SmolLM2); the converted safetensors folder loads in
under a second. The folder is built in a temporary directory and renamed into place,
under a file lock, so a crash or two concurrent callers never leave a half-written model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from rayfin.config import get_settings
from rayfin.errors import ModelAssetError
from rayfin.llm.catalog import ModelSpec, get_spec

MARKER_FILE = "rayfin-model.json"
"""Written last into a prepared folder; its presence means the folder is complete."""

PREPARE_STEPS = ("locate GGUF", "read tokenizer", "de-quantize weights", "write safetensors")
"""The steps :func:`prepare_model` reports to its ``on_progress`` callback, in order."""

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``(step, completed, total)``; steps without finer detail report 0/1."""

T = TypeVar("T")


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file inside the installed package (found without importing it)."""
    module = importlib.util.find_spec(spec.package)
    if module is None or not module.submodule_search_locations:
        raise ModelAssetError(
            f"model {spec.name!r} needs the {spec.distribution} package; "
            f"install it with `{spec.install_hint}`"
        )
    path = Path(next(iter(module.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelAssetError(
            f"{path} is missing from {spec.distribution}; reinstall it with `{spec.install_hint}`"
        )
    return path


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where the prepared folder of catalogue model ``name`` lives."""
    root = cache_dir or get_settings().models.cache_dir
    assert root is not None  # filled by Settings
    return Path(root).expanduser() / name


def is_prepared(name: str, cache_dir: Path | None = None) -> bool:
    """True when ``name`` has a complete prepared folder."""
    return (model_dir(name, cache_dir) / MARKER_FILE).is_file()


@contextlib.contextmanager
def _transformers_progress(report: ProgressCallback) -> Iterator[None]:
    """Silence transformers' own bars and feed its GGUF tensor loop into ``report``.

    The GGUF loader iterates tensors through a module-level ``tqdm``; swapping that name
    for a reporting iterator turns the slowest step into a real per-tensor progress.
    If a future transformers renames it, we only lose the per-tensor detail.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def tensors(iterable: Iterable[T], **_kwargs: object) -> Iterator[T]:
        items = list(iterable)
        for done, item in enumerate(items):
            report(PREPARE_STEPS[2], done, len(items))
            yield item
        report(PREPARE_STEPS[2], len(items), len(items))

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = tensors
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def prepare_model(
    name: str,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Convert catalogue model ``name`` to a transformers folder and return its path.

    A folder prepared earlier is reused unless ``force``. ``on_progress`` receives
    ``(step, completed, total)`` for each step of :data:`PREPARE_STEPS`.
    """
    spec = get_spec(name)
    target = model_dir(name, cache_dir)
    report = on_progress or (lambda _step, _done, _total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if not force and (target / MARKER_FILE).is_file():
            return target
        report(PREPARE_STEPS[0], 0, 1)
        source = gguf_path(spec)
        staging = target.parent / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _convert(spec, source, staging, report)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(spec: ModelSpec, source: Path, out: Path, report: ProgressCallback) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.perf_counter()
    with _transformers_progress(report):
        report(PREPARE_STEPS[1], 0, 1)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        report(PREPARE_STEPS[2], 0, 1)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        report(PREPARE_STEPS[3], 0, 1)
        config = gguf_model.config
        # The GGUF marker would make from_pretrained look for a GGUF file again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = spec.hf_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = GenerationConfig.from_model_config(config)
        out.mkdir(parents=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    marker = {
        "name": spec.name,
        "hf_id": spec.hf_id,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "license": spec.license,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "prepared_at": time.time(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2))
