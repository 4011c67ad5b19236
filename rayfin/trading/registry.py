"""The model registry: numbered, immutable versions of each market model, plus aliases.

Layout under ``root`` (a local directory or an ``s3://`` URI, through pyarrow's
filesystems, as the archive does)::

    <name>/v000001/model.txt      LightGBM model text
    <name>/v000001/reference.json drift reference of the training inputs (optional; see
                                  rayfin.trading.monitoring)
    <name>/v000001/version.json   ModelVersion metadata; its presence commits the version
    <name>/aliases.json           each alias's promotion stack and an event log

A version appears whole or not at all: locally its directory is staged under a temporary
name and renamed into place (a rename onto an existing version fails, so two writers
cannot take one number); on an object store each file is one atomic PUT and
``version.json`` goes last. Version numbers come from the highest directory ever created
and the registry deletes nothing, so a number is never reused. Local writes hold a file
lock per model name; an object store has no such lock, so keep one writer per model name
there. (These rules are :class:`rayfin.storage.VersionedStore`'s, shared with the adapter
hub.)

Promoting pushes a version onto an alias's stack; rolling back pops it, returning the
alias to the version promoted before. Every promotion and rollback is logged with its time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa

from rayfin.errors import ModelNotFoundError, RegistryError, RollbackError
from rayfin.storage import VersionedStore, dumps_json, utc_now
from rayfin.trading.labels import LabelSpec

if TYPE_CHECKING:
    import lightgbm

    from rayfin.trading.monitoring import DriftReference
    from rayfin.trading.scoring import Model

MODEL_FILE = "model.txt"
REFERENCE_FILE = "reference.json"
METADATA_FILE = "version.json"
DEFAULT_ALIAS = "production"


@dataclass(frozen=True)
class ModelVersion:
    """One registered (or, with ``version == 0``, unregistered) market model.

    ``features`` are the model's input columns in order (:mod:`rayfin.trading.inputs`);
    ``fingerprint`` is :func:`data_fingerprint` of its training inputs and labels; ``path``
    is where the version lives in the registry (``None`` when unregistered).
    """

    name: str
    version: int
    created: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    features: tuple[str, ...]
    label_spec: LabelSpec
    fingerprint: str
    lightgbm_version: str
    path: str | None = field(default=None, compare=False)

    @property
    def registered(self) -> bool:
        return self.version > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``version.json`` holds; ``path`` is where it was read)."""
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "params": self.params,
            "metrics": self.metrics,
            "features": list(self.features),
            "label_spec": self.label_spec.to_dict(),
            "fingerprint": self.fingerprint,
            "lightgbm_version": self.lightgbm_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> Self:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=data["name"],
            version=int(data["version"]),
            created=data["created"],
            params=dict(data["params"]),
            metrics=dict(data["metrics"]),
            features=tuple(data["features"]),
            label_spec=LabelSpec.from_dict(data["label_spec"]),
            fingerprint=data["fingerprint"],
            lightgbm_version=data["lightgbm_version"],
            path=path,
        )


def data_fingerprint(inputs: pd.DataFrame, labels: np.ndarray) -> str:
    """sha256 over training inputs (names, order, values) and labels, as hex.

    Values are hashed as little-endian float64 with NaN and -0.0 canonicalised, so the
    same content gives the same fingerprint in every run and on every machine.
    """
    digest = hashlib.sha256()
    labels = np.asarray(labels)
    if len(labels) != len(inputs):
        raise RegistryError(f"{len(labels)} labels for {len(inputs)} input rows")
    header = {"columns": [str(c) for c in inputs.columns], "rows": len(inputs)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in inputs.columns:
        values = inputs[name].to_numpy(dtype=np.float64)
        values = np.where(np.isnan(values), np.nan, values) + 0.0  # one NaN, +0.0
        digest.update(values.astype("<f8", copy=False).tobytes())
    digest.update(labels.astype("<i8").tobytes())
    return digest.hexdigest()


def check_model_name(name: str) -> str:
    """``name`` if it is a valid model name, else :class:`~rayfin.errors.RegistryError`."""
    return ModelRegistry.check_name(name)


class ModelRegistry(VersionedStore):
    """Versions and aliases of market models under ``root`` (see the module docstring).

    ``root`` defaults to the ``trading.registry`` setting (``<state_dir>/models``).
    """

    commit_file = METADATA_FILE
    noun = "model"
    place = "registry"
    error = RegistryError
    not_found = ModelNotFoundError

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            from rayfin.config import get_settings

            root = get_settings().trading.registry
            assert root is not None  # Settings always derives one
        super().__init__(root)

    # -- reading -------------------------------------------------------------------------

    def versions(self, name: str) -> list[ModelVersion]:
        """Every registered version of ``name``, oldest first."""
        numbers = self._version_numbers(check_model_name(name), committed=True)
        if not numbers:
            raise self._unknown_name(name)
        return [self._read_version(name, number) for number in numbers]

    def get(self, name: str, ref: int | str) -> ModelVersion:
        """A version of ``name`` by number (``3`` or ``"3"``) or by alias (``"production"``)."""
        return self._read_version(check_model_name(name), self._resolve(name, ref))

    def alias_history(self, name: str, alias: str = DEFAULT_ALIAS) -> list[int]:
        """The versions ``alias`` was promoted to, oldest first; the last is current."""
        return list(
            self._alias_state(check_model_name(name))["aliases"].get(self.check_alias(alias), [])
        )

    def load(self, name: str, ref: int | str = DEFAULT_ALIAS) -> Model:
        """The scoring :class:`~rayfin.trading.scoring.Model` of a version or alias."""
        from rayfin.trading.scoring import Model

        version = self.get(name, ref)
        text = self._read(f"{self._version_dir(name, version.version)}/{MODEL_FILE}")
        if text is None:
            raise RegistryError(f"{version.path} has metadata but no {MODEL_FILE}")
        return Model.from_text(text.decode(), version)

    def reference(self, name: str, ref: int | str = DEFAULT_ALIAS) -> DriftReference:
        """The drift reference stored with a version or alias: its training inputs' bins."""
        from rayfin.trading.monitoring import DriftReference

        version = self.get(name, ref)
        path = f"{self._version_dir(name, version.version)}/{REFERENCE_FILE}"
        raw = self._read(path)
        if raw is None:
            raise ModelNotFoundError(
                f"{name} v{version.version} has no drift reference ({REFERENCE_FILE}): it was "
                "registered without one; retrain it to monitor its inputs"
            )
        try:
            return DriftReference.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:  # JSON errors are ValueErrors
            raise RegistryError(f"{self._uri(path)} is unreadable: {exc}") from exc

    def _read_version(self, name: str, number: int) -> ModelVersion:
        data, location = self._read_metadata(name, number)
        return ModelVersion.from_dict(data, path=location)

    # -- writing -------------------------------------------------------------------------

    def register(
        self,
        model: lightgbm.Booster | str,
        *,
        name: str,
        features: list[str] | tuple[str, ...],
        label_spec: LabelSpec,
        fingerprint: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        reference: DriftReference | None = None,
    ) -> ModelVersion:
        """Store ``model`` (a Booster or its model text) as the next version of ``name``.

        ``reference``, the drift reference of the training inputs, is stored with it for
        :meth:`reference`; it must cover every input in ``features``.
        """
        import lightgbm

        check_model_name(name)
        text = model.model_to_string() if isinstance(model, lightgbm.Booster) else model
        if not isinstance(text, str) or not text.startswith("tree"):
            raise RegistryError("model must be a lightgbm Booster or its model text")
        if not features or not all(isinstance(f, str) for f in features):
            raise RegistryError(f"features must be a non-empty list of names, got {features!r}")
        if not isinstance(label_spec, LabelSpec):
            raise RegistryError(f"label_spec must be a LabelSpec, got {label_spec!r}")
        reference_data = None
        if reference is not None:
            from rayfin.trading.monitoring import DriftReference

            if not isinstance(reference, DriftReference):
                raise RegistryError(
                    f"reference must be a DriftReference, got {type(reference).__name__}"
                )
            uncovered = [f for f in features if f not in reference.columns]
            if uncovered:
                raise RegistryError(f"the drift reference has no bins for inputs {uncovered}")
            reference_data = dumps_json(reference.to_dict())
        meta = {
            "name": name,
            "created": utc_now(),
            "params": dict(params or {}),
            "metrics": dict(metrics or {}),
            "features": list(features),
            "label_spec": label_spec.to_dict(),
            "fingerprint": fingerprint,
            "lightgbm_version": lightgbm.__version__,
        }
        files = {MODEL_FILE: text.encode()}
        if reference_data is not None:
            files[REFERENCE_FILE] = reference_data
        try:
            with self._lock(name):
                number = self._commit(
                    name, files, lambda number: dumps_json({**meta, "version": number})
                )
        except (OSError, pa.ArrowException) as exc:
            raise RegistryError(f"cannot register {name} in {self.root}: {exc}") from exc
        return self._read_version(name, number)

    def promote(self, name: str, version: int | str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Point ``alias`` at ``version``; :meth:`rollback` returns it to the previous one."""
        check_model_name(name)
        self.check_alias(alias)
        number = self._resolve(name, version)
        target = self._read_version(name, number)  # raises for an unknown version
        self._push_alias(name, alias, number)
        return target

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Return ``alias`` to the version it pointed to before its latest promotion."""
        check_model_name(name)
        self.check_alias(alias)
        with self._lock(name):
            state = self._alias_state(name)
            stack = state["aliases"].get(alias, [])
            if len(stack) < 2:
                if not self._version_numbers(name, committed=True):
                    raise self._unknown_name(name)
                now = f"points to v{stack[-1]} and " if stack else "was never promoted and "
                raise RollbackError(
                    f"cannot roll back {name} {alias!r}: it {now}has no earlier version"
                )
            left = stack.pop()
            state["events"].append(
                {
                    "time": utc_now(),
                    "action": "rollback",
                    "alias": alias,
                    "version": stack[-1],
                    "from": left,
                }
            )
            self._write_aliases(name, state)
        return self._read_version(name, stack[-1])
