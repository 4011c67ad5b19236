"""The adapter hub: trained adapters (LoRA matrices, or a prompt-tuning prefix, with an
optional classification head) saved as numbered, immutable versions with a card.

Layout under the hub's root (a local directory or an ``s3://`` URI; the storage rules are
:class:`rayfin.storage.VersionedStore`'s, shared with the model registry)::

    <name>/v000001/adapter.safetensors  the tensors
    <name>/v000001/card.json            the AdapterCard; written last, it commits the version
    <name>/aliases.json                 each alias's promotion stack and an event log

Each card records :func:`base_model_hash` of the model the adapter was trained on, and
:meth:`AdapterHub.load` refuses an adapter whose hash differs from the caller's base model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pyarrow as pa

from rayfin.errors import (
    AdapterHubError,
    AdapterMismatchError,
    AdapterNotFoundError,
    ModelAssetError,
)
from rayfin.storage import VersionedStore, dumps_json, utc_now

if TYPE_CHECKING:
    import torch

TENSORS_FILE = "adapter.safetensors"
CARD_FILE = "card.json"
HASH_FILE = "rayfin-hash.json"
"""Written into a base model folder (when writable) to remember its hash across processes."""
KINDS = ("lora", "prompt")
LABELLED_TASKS = ("classification", "label-scoring")
"""Tasks whose outputs are the adapter's ``labels``, so a card for them must name them."""

_HASH_FORMAT = 1  # bump when the hashed content changes, to invalidate saved hashes
_CHUNK = 8 << 20


# -- base model fingerprints ------------------------------------------------------------------


def base_model_hash(path: str | Path) -> str:
    """sha256 (hex) of a base model folder's ``config.json`` (canonical JSON, without
    ``transformers_version``) and its ``*.safetensors`` files (bytes, by file name).

    ``path`` is a folder or a catalogue name. A result is remembered in memory and in the
    folder's ``rayfin-hash.json``, keyed by the files' sizes and modification times, so a
    model is read once per machine until its files change.
    """
    from rayfin.llm.loading import resolve_model_path

    folder = Path(resolve_model_path(path)).expanduser()
    if not folder.is_dir():
        raise ModelAssetError(
            f"base model {str(path)!r} is neither a catalogue name nor a model folder"
        )
    folder = folder.resolve()
    weights = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if not (folder / "config.json").is_file() or not weights:
        raise ModelAssetError(
            f"{folder} is not a safetensors model folder (needs config.json and *.safetensors)"
        )
    stats = []
    for name in ["config.json", *weights]:
        stat = (folder / name).stat()
        stats.append((name, stat.st_size, stat.st_mtime_ns))
    return _folder_hash(str(folder), tuple(stats))


_hash_base_model = base_model_hash  # AdapterHub.save has a parameter of that name


@functools.lru_cache(maxsize=32)
def _folder_hash(folder: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    """The hash of ``folder`` whose files have ``stats``; the key makes stale hits impossible
    unless a file changes without its size or mtime changing."""
    key = {"format": _HASH_FORMAT, "files": [list(s) for s in stats]}
    saved_path = Path(folder) / HASH_FILE
    try:
        saved = json.loads(saved_path.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or another shape: hash the files
    digest = _hash_files(Path(folder), [name for name, _, _ in stats[1:]])
    staging = saved_path.with_name(f".{HASH_FILE}.{uuid.uuid4().hex}")
    try:
        staging.write_text(json.dumps({**key, "sha256": digest}, indent=2))
        os.replace(staging, saved_path)  # readers never see half a file
    except OSError:  # a read-only folder: remembered in memory only
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
    return digest


def _hash_files(folder: Path, weights: list[str]) -> str:
    digest = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ModelAssetError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    # Saving the same model with a newer transformers must not orphan its adapters.
    config.pop("transformers_version", None)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Each part is preceded by its name and length, so that no two folders hash alike by
    # moving bytes across a boundary.
    data = canonical.encode()
    digest.update(f"config.json\0{len(data)}\0".encode())
    digest.update(data)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    for name in weights:
        path = folder / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                digest.update(view[:count])
    return digest.hexdigest()


# -- cards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterCard:
    """What the hub knows of one adapter version besides its tensors.

    ``kind`` is ``"lora"`` (``rank``, ``alpha`` and ``target_modules`` set) or ``"prompt"``
    (``num_virtual_tokens`` set); ``labels`` name the outputs of a classification head or
    the scored labels. ``path`` is where the version was read (``None`` before saving).
    """

    name: str
    version: int
    kind: str
    base_model: str
    base_model_hash: str
    task: str
    tensor_names: tuple[str, ...]
    num_parameters: int
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    num_virtual_tokens: int | None = None
    labels: tuple[str, ...] | None = None
    training_data_fingerprint: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``card.json`` holds)."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "base_model": self.base_model,
            "base_model_hash": self.base_model_hash,
            "task": self.task,
            "tensor_names": list(self.tensor_names),
            "num_parameters": self.num_parameters,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "num_virtual_tokens": self.num_virtual_tokens,
            "labels": None if self.labels is None else list(self.labels),
            "training_data_fingerprint": self.training_data_fingerprint,
            "metrics": dict(self.metrics),
            "created_at": self.created_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | None = None) -> Self:
        """Inverse of :meth:`to_dict`."""
        labels = data.get("labels")
        return cls(
            name=data["name"],
            version=int(data["version"]),
            kind=data["kind"],
            base_model=data["base_model"],
            base_model_hash=data["base_model_hash"],
            task=data["task"],
            tensor_names=tuple(data["tensor_names"]),
            num_parameters=int(data["num_parameters"]),
            rank=data.get("rank"),
            alpha=data.get("alpha"),
            target_modules=tuple(data.get("target_modules", ())),
            num_virtual_tokens=data.get("num_virtual_tokens"),
            labels=None if labels is None else tuple(labels),
            training_data_fingerprint=data.get("training_data_fingerprint", ""),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            created_at=data.get("created_at", ""),
            extra=dict(data.get("extra", {})),
            path=path,
        )


# -- the hub ----------------------------------------------------------------------------------


class AdapterHub(VersionedStore):
    """Versions and aliases of adapters under ``path`` (see the module docstring).

    ``path`` is a local directory or an ``s3://`` URI, and defaults to
    ``<state_dir>/adapters`` from :func:`rayfin.config.get_settings`.
    """

    commit_file = CARD_FILE
    noun = "adapter"
    place = "adapter hub"
    error = AdapterHubError
    not_found = AdapterNotFoundError

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            from rayfin.config import get_settings

            path = get_settings().state_dir / "adapters"
        super().__init__(path)

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[AdapterCard]:
        """The latest version of every adapter, by name."""
        return [self.card(name) for name in self.names()]

    def versions(self, name: str) -> list[AdapterCard]:
        """Every version of adapter ``name``, oldest first."""
        numbers = self._version_numbers(self.check_name(name), committed=True)
        if not numbers:
            raise self._unknown_name(name)
        return [self._read_card(name, number) for number in numbers]

    def card(self, name: str, version: int | str | None = None) -> AdapterCard:
        """The card of a version of ``name``: a number, an alias, or ``None`` for the latest."""
        self.check_name(name)
        if version is None:
            numbers = self._version_numbers(name, committed=True)
            if not numbers:
                raise self._unknown_name(name)
            return self._read_card(name, numbers[-1])
        return self._read_card(name, self._resolve(name, version))

    def load(
        self,
        name: str,
        version: int | str | None = None,
        *,
        base_model_hash: str | None = None,
    ) -> tuple[dict[str, torch.Tensor], AdapterCard]:
        """The tensors (on CPU) and card of a version of ``name`` (``None``: the latest).

        With ``base_model_hash`` (:func:`base_model_hash` of the model the adapter is for),
        an adapter trained on another base model is refused with
        :class:`~rayfin.errors.AdapterMismatchError`.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as load_tensors

        card = self.card(name, version)
        if base_model_hash is not None and base_model_hash != card.base_model_hash:
            raise AdapterMismatchError(
                f"adapter {name} v{card.version} was trained on base model "
                f"{card.base_model!r} (hash {card.base_model_hash}), but the base model "
                f"given has hash {base_model_hash}; load it with {card.base_model!r} or "
                "retrain it on this model"
            )
        location = f"{self._version_dir(name, card.version)}/{TENSORS_FILE}"
        raw = self._read(location)
        if raw is None:
            raise AdapterHubError(f"{card.path} has a card but no {TENSORS_FILE}")
        try:
            tensors = load_tensors(raw)
        except SafetensorError as exc:
            raise AdapterHubError(f"{self._uri(location)} is unreadable: {exc}") from exc
        if sorted(tensors) != sorted(card.tensor_names):
            raise AdapterHubError(f"{self._uri(location)} holds other tensors than its card lists")
        return tensors, card

    def _read_card(self, name: str, number: int) -> AdapterCard:
        data, location = self._read_metadata(name, number)
        try:
            return AdapterCard.from_dict(data, path=location)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterHubError(f"{location}/{CARD_FILE} is not a valid card: {exc}") from exc

    # -- writing -------------------------------------------------------------------------

    def save(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        kind: str,
        base_model: str | Path,
        base_model_hash: str | None = None,
        task: str = "causal-lm",
        rank: int | None = None,
        alpha: float | None = None,
        target_modules: Sequence[str] = (),
        num_virtual_tokens: int | None = None,
        labels: Sequence[str] | None = None,
        training_data_fingerprint: str = "",
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AdapterCard:
        """Save ``tensors`` as the next version of adapter ``name`` and return its card.

        ``base_model_hash`` defaults to :func:`base_model_hash` of ``base_model`` (a
        catalogue name or folder). A LoRA adapter needs ``rank``, ``alpha`` and
        ``target_modules``; a prompt adapter ``num_virtual_tokens``; a classification or
        label-scoring one its ``labels``.
        """
        from safetensors.torch import save as save_tensors

        self.check_name(name)
        copies = _checked_tensors(tensors)
        card = AdapterCard(
            name=name,
            version=0,
            kind=kind,
            base_model=str(base_model),
            base_model_hash=base_model_hash or _hash_base_model(base_model),
            task=task,
            tensor_names=tuple(sorted(copies)),
            num_parameters=sum(t.numel() for t in copies.values()),
            rank=rank,
            alpha=None if alpha is None else _number(alpha, "alpha"),
            target_modules=tuple(target_modules),
            num_virtual_tokens=num_virtual_tokens,
            labels=None if labels is None else tuple(labels),
            training_data_fingerprint=training_data_fingerprint,
            metrics={str(k): _number(v, f"metric {k!r}") for k, v in (metrics or {}).items()},
            created_at=utc_now(),
            extra=dict(extra or {}),
        )
        _check_card(card)
        files = {TENSORS_FILE: save_tensors(copies, metadata={"format": "pt"})}
        try:
            with self._lock(name):
                number = self._commit(
                    name, files, lambda number: dumps_json(replace(card, version=number).to_dict())
                )
        except (OSError, pa.ArrowException) as exc:
            raise AdapterHubError(f"cannot save adapter {name} in {self.root}: {exc}") from exc
        return self._read_card(name, number)

    def set_alias(self, name: str, alias: str, version: int | str) -> AdapterCard:
        """Point ``alias`` (e.g. ``"production"``) at a version of ``name``; return its card."""
        self.check_name(name)
        self.check_alias(alias)
        card = self._read_card(name, self._resolve(name, version))  # raises if unknown
        self._push_alias(name, alias, card.version)
        return card


def _checked_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``tensors`` (so later training steps cannot change what is
    saved), or :class:`~rayfin.errors.AdapterHubError` naming what is wrong."""
    import torch

    if not isinstance(tensors, Mapping) or not tensors:
        raise AdapterHubError("an adapter needs a non-empty mapping of tensor names to tensors")
    copies = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise AdapterHubError(f"tensor names must be non-empty strings, got {key!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise AdapterHubError(f"{key} is not a dense torch.Tensor: {type(value).__name__}")
        copies[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return copies


def _number(value: object, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AdapterHubError(f"{what} must be a number, got {value!r}") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_card(card: AdapterCard) -> None:
    problems = []
    if card.kind not in KINDS:
        problems.append(f"kind must be one of {KINDS}, got {card.kind!r}")
    if card.kind == "lora":
        if not _is_count(card.rank):
            problems.append(f"a LoRA adapter needs rank >= 1, got {card.rank!r}")
        if card.alpha is None or card.alpha <= 0:
            problems.append(f"a LoRA adapter needs alpha > 0, got {card.alpha!r}")
        if not card.target_modules:
            problems.append("a LoRA adapter needs its target_modules")
    if card.kind == "prompt" and not _is_count(card.num_virtual_tokens):
        problems.append(
            f"a prompt adapter needs num_virtual_tokens >= 1, got {card.num_virtual_tokens!r}"
        )
    if not isinstance(card.task, str) or not card.task:
        problems.append(f"task must be a non-empty string, got {card.task!r}")
    if card.labels is not None and (
        not card.labels
        or not all(isinstance(label, str) for label in card.labels)
        or len(set(card.labels)) != len(card.labels)
    ):
        problems.append(f"labels must be distinct strings, got {list(card.labels)!r}")
    if card.task in LABELLED_TASKS and card.labels is None:
        problems.append(f"a {card.task} adapter needs its labels")
    if not isinstance(card.base_model_hash, str) or not card.base_model_hash:
        problems.append("base_model_hash must be a non-empty string")
    if not isinstance(card.training_data_fingerprint, str):
        problems.append("training_data_fingerprint must be a string")
    try:
        dumps_json(card.extra)
    except (TypeError, ValueError) as exc:
        problems.append(f"extra must be JSON-serialisable: {exc}")
    if problems:
        raise AdapterHubError(f"cannot save adapter {card.name}: " + "; ".join(problems))
