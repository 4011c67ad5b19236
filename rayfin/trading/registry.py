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
there.

Promoting pushes a version onto an alias's stack; rolling back pops it, returning the
alias to the version promoted before. Every promotion and rollback is logged with its time.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from rayfin.errors import ModelNotFoundError, RegistryError, RollbackError
from rayfin.storage import put_atomic
from rayfin.trading.labels import LabelSpec

if TYPE_CHECKING:
    import lightgbm

    from rayfin.trading.monitoring import DriftReference
    from rayfin.trading.scoring import Model

MODEL_FILE = "model.txt"
REFERENCE_FILE = "reference.json"
METADATA_FILE = "version.json"
ALIASES_FILE = "aliases.json"
DEFAULT_ALIAS = "production"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Aliases start with a letter, so that "3" always means version 3.
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_REGISTER_ATTEMPTS = 20


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


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default).encode()


def check_model_name(name: str) -> str:
    """``name`` if it is a valid model name, else :class:`~rayfin.errors.RegistryError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"model name must be letters, digits, '.', '_' or '-' (at most 128), got {name!r}"
        )
    return name


def _check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise RegistryError(
            "alias must start with a letter and hold letters, digits, '.', '_' or '-', "
            f"got {alias!r}"
        )
    return alias


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
        raise RegistryError(f"version must be an int >= 1, got {version!r}")
    return int(version)


class ModelRegistry:
    """Versions and aliases of market models under ``root`` (see the module docstring).

    ``root`` defaults to ``<state_dir>/models`` from :func:`rayfin.config.get_settings`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            from rayfin.config import get_settings

            root = get_settings().state_dir / "models"
        text = str(root)
        if "://" in text:
            try:
                self.fs, base = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, ValueError, OSError) as exc:
                raise RegistryError(f"cannot open model registry {text}: {exc}") from exc
            self._prefix = text.split("?", 1)[0].rstrip("/")  # options are not a location
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            self._prefix = base
        self.base = base.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def root(self) -> str:
        """Where the registry lives, as given (local path or URI)."""
        return self._prefix

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r})"

    # -- paths and raw I/O ---------------------------------------------------------------

    def _model_dir(self, name: str) -> str:
        return f"{self.base}/{name}"

    def _version_dir(self, name: str, version: int) -> str:
        return f"{self.base}/{name}/v{version:06d}"

    def _uri(self, path: str) -> str:
        """``path`` (on the filesystem) as the user-facing location."""
        return self._prefix + path[len(self.base) :]

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes | None:
        """The file's bytes, or ``None`` if it does not exist."""
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            # Object stores report a missing key as a plain OSError.
            if not self._exists(path):
                return None
            raise

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serialise writers of one model name (local registries only)."""
        if not self.local:
            yield
            return
        from filelock import FileLock

        folder = self._model_dir(name)
        self.fs.create_dir(folder, recursive=True)
        with FileLock(f"{folder}/.lock"):
            yield

    def _version_numbers(self, name: str, *, committed: bool) -> list[int]:
        """Version numbers whose directory exists (``committed``: with its metadata)."""
        selector = pafs.FileSelector(self._model_dir(name), allow_not_found=True)
        numbers = []
        for info in self.fs.get_file_info(selector):
            match = _VERSION_DIR.match(info.base_name)
            if info.type != pafs.FileType.Directory or not match:
                continue
            number = int(match.group(1))
            if committed and not self._exists(f"{info.path}/{METADATA_FILE}"):
                continue
            numbers.append(number)
        return sorted(numbers)

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model names with at least one registered version, sorted."""
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        found = [
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory and _NAME.match(info.base_name)
        ]
        return sorted(name for name in found if self._version_numbers(name, committed=True))

    def versions(self, name: str) -> list[ModelVersion]:
        """Every registered version of ``name``, oldest first."""
        numbers = self._version_numbers(check_model_name(name), committed=True)
        if not numbers:
            raise self._unknown_name(name)
        return [self._read_version(name, number) for number in numbers]

    def get(self, name: str, ref: int | str) -> ModelVersion:
        """A version of ``name`` by number (``3`` or ``"3"``) or by alias (``"production"``)."""
        return self._read_version(check_model_name(name), self._resolve(name, ref))

    def aliases(self, name: str) -> dict[str, int]:
        """Each alias of ``name`` and the version it points to now."""
        state = self._alias_state(check_model_name(name))
        return {alias: stack[-1] for alias, stack in state["aliases"].items() if stack}

    def alias_history(self, name: str, alias: str = DEFAULT_ALIAS) -> list[int]:
        """The versions ``alias`` was promoted to, oldest first; the last is current."""
        return list(
            self._alias_state(check_model_name(name))["aliases"].get(_check_alias(alias), [])
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

    def _unknown_name(self, name: str) -> ModelNotFoundError:
        known = ", ".join(self.names()) or "none"
        return ModelNotFoundError(
            f"no model named {name!r} in registry {self.root} (registered models: {known})"
        )

    def _read_version(self, name: str, number: int) -> ModelVersion:
        folder = self._version_dir(name, number)
        raw = self._read(f"{folder}/{METADATA_FILE}")
        if raw is None:
            numbers = self._version_numbers(name, committed=True)
            if not numbers:
                raise self._unknown_name(name)
            listed = ", ".join(map(str, numbers))
            raise ModelNotFoundError(f"model {name!r} has no version {number} (versions: {listed})")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"{self._uri(folder)}/{METADATA_FILE} is unreadable: {exc}"
            ) from exc
        return ModelVersion.from_dict(data, path=self._uri(folder))

    def _resolve(self, name: str, ref: int | str) -> int:
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, str):
            aliases = self._alias_state(name)["aliases"]
            stack = aliases.get(_check_alias(ref))
            if not stack:
                if not self._version_numbers(name, committed=True):
                    raise self._unknown_name(name)
                known = ", ".join(sorted(a for a, s in aliases.items() if s)) or "none"
                raise ModelNotFoundError(f"model {name!r} has no alias {ref!r} (aliases: {known})")
            return int(stack[-1])
        return _check_version(ref)

    def _alias_state(self, name: str) -> dict[str, Any]:
        path = f"{self._model_dir(name)}/{ALIASES_FILE}"
        raw = self._read(path)
        if raw is None:
            return {"aliases": {}, "events": []}
        try:
            state = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self._uri(path)} is unreadable: {exc}") from exc
        return state

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
            reference_data = _dumps(reference.to_dict())
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
        try:
            with self._lock(name):
                number = self._commit(name, text.encode(), meta, reference_data)
        except (OSError, pa.ArrowException) as exc:
            raise RegistryError(f"cannot register {name} in {self.root}: {exc}") from exc
        return self._read_version(name, number)

    def _commit(
        self, name: str, model: bytes, meta: dict[str, Any], reference: bytes | None
    ) -> int:
        folder = self._model_dir(name)
        self.fs.create_dir(folder, recursive=True)
        for _ in range(_REGISTER_ATTEMPTS):
            numbers = self._version_numbers(name, committed=False)
            number = (numbers[-1] if numbers else 0) + 1
            metadata = _dumps({**meta, "version": number})
            target = self._version_dir(name, number)
            if not self.local:
                put_atomic(self.fs, f"{target}/{MODEL_FILE}", model)
                if reference is not None:
                    put_atomic(self.fs, f"{target}/{REFERENCE_FILE}", reference)
                put_atomic(self.fs, f"{target}/{METADATA_FILE}", metadata)  # the commit
                return number
            staging = f"{folder}/.staging-{uuid.uuid4().hex}"
            self.fs.create_dir(staging)
            with self.fs.open_output_stream(f"{staging}/{MODEL_FILE}") as out:
                out.write(model)
            if reference is not None:
                with self.fs.open_output_stream(f"{staging}/{REFERENCE_FILE}") as out:
                    out.write(reference)
            with self.fs.open_output_stream(f"{staging}/{METADATA_FILE}") as out:
                out.write(metadata)
            try:
                # Fails if another writer created this version meanwhile: take the next one.
                self.fs.move(staging, target)
                return number
            except OSError:
                self.fs.delete_dir(staging)
        raise RegistryError(f"could not allocate a version of {name} in {self.root}")

    def promote(self, name: str, version: int | str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Point ``alias`` at ``version``; :meth:`rollback` returns it to the previous one."""
        check_model_name(name)
        _check_alias(alias)
        number = self._resolve(name, version)
        target = self._read_version(name, number)  # raises for an unknown version
        with self._lock(name):
            state = self._alias_state(name)
            stack = state["aliases"].setdefault(alias, [])
            if stack and stack[-1] == number:
                return target  # already there; a second entry would make rollback a no-op
            stack.append(number)
            state["events"].append(
                {"time": utc_now(), "action": "promote", "alias": alias, "version": number}
            )
            self._write_aliases(name, state)
        return target

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Return ``alias`` to the version it pointed to before its latest promotion."""
        check_model_name(name)
        _check_alias(alias)
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

    def _write_aliases(self, name: str, state: dict[str, Any]) -> None:
        path = f"{self._model_dir(name)}/{ALIASES_FILE}"
        try:
            put_atomic(self.fs, path, _dumps(state))
        except (OSError, pa.ArrowException) as exc:
            raise RegistryError(f"cannot write {self._uri(path)}: {exc}") from exc
