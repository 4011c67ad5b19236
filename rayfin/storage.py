"""Files on a local disk or an object store, through pyarrow filesystems, and the versioned
store that the model registry and the adapter hub are built on."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rayfin.errors import RayfinError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Aliases start with a letter, so that "3" always means version 3.
ALIAS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
ALIASES_FILE = "aliases.json"
_VERSION_DIR = re.compile(r"^v(\d+)$")
_COMMIT_ATTEMPTS = 20

# Object stores have no file lock; threads of one process at least take turns.
_remote_locks: dict[tuple[str, str], threading.Lock] = {}
_remote_locks_guard = threading.Lock()


def put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never
    half of one: an object store's PUT is atomic; on a local disk the bytes go to a staging
    file of their own (concurrent writers never share one) that is renamed into place."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    staging = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(staging) as out:
        out.write(data)
    fs.move(staging, path)


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def dumps_json(data: Any) -> bytes:
    """``data`` as indented, key-sorted JSON bytes; numpy scalars and arrays become plain."""
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default).encode()


class VersionedStore:
    """Numbered, immutable versions of named items under ``root`` (a local directory or a
    URI such as ``s3://bucket/prefix?endpoint_override=...``), plus alias stacks.

    Layout: ``<name>/v000001/...`` holds one version, committed by its metadata file
    (:attr:`commit_file`), which is written last; ``<name>/aliases.json`` holds each alias's
    promotion stack and an event log. Locally a version is staged under a temporary name
    and renamed into place (a rename onto an existing version fails, so two writers cannot
    take one number); on an object store each file is one atomic PUT, the commit file last.
    Numbers come from the highest directory ever created and nothing is deleted, so a
    number is never reused. Local writers of one name hold a file lock; an object store
    has none, so there threads of one process take turns and processes must keep to one
    writer per name.

    Subclasses set the class attributes, which also word the error messages.
    """

    commit_file: ClassVar[str] = "version.json"
    noun: ClassVar[str] = "item"  # "no model named ...", "model name must be ..."
    place: ClassVar[str] = "store"  # "... in registry ROOT"
    error: ClassVar[type[RayfinError]] = RayfinError
    not_found: ClassVar[type[RayfinError]] = RayfinError

    def __init__(self, root: str | Path) -> None:
        text = str(root)
        if "://" in text:
            try:
                self.fs, base = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, ValueError, OSError) as exc:
                raise self.error(f"cannot open {self.place} {text}: {exc}") from exc
            self._prefix = text.split("?", 1)[0].rstrip("/")  # options are not a location
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
            self._prefix = base
        self.base = base.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def root(self) -> str:
        """Where the store lives, as given (local path, or URI without its options)."""
        return self._prefix

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    # -- checks --------------------------------------------------------------------------

    @classmethod
    def check_name(cls, name: str) -> str:
        """``name`` if it is a valid item name (a slug safe as a directory name)."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise cls.error(
                f"{cls.noun} name must be letters, digits, '.', '_' or '-' (at most 128), "
                f"starting with a letter or digit, got {name!r}"
            )
        return name

    @classmethod
    def check_alias(cls, alias: str) -> str:
        if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias):
            raise cls.error(
                "alias must start with a letter and hold letters, digits, '.', '_' or '-', "
                f"got {alias!r}"
            )
        return alias

    @classmethod
    def check_version(cls, version: object) -> int:
        if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
            raise cls.error(f"version must be an int >= 1, got {version!r}")
        return int(version)

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

    def _read_json(self, path: str) -> Any | None:
        """The parsed JSON file, ``None`` if missing; :attr:`error` if unreadable."""
        raw = self._read(path)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.error(f"{self._uri(path)} is unreadable: {exc}") from exc

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serialise writers of one name (see the class docstring)."""
        if not self.local:
            with _remote_locks_guard:
                lock = _remote_locks.setdefault((self.root, name), threading.Lock())
            with lock:
                yield
            return
        from filelock import FileLock

        folder = self._model_dir(name)
        self.fs.create_dir(folder, recursive=True)
        with FileLock(f"{folder}/.lock"):
            yield

    def _version_numbers(self, name: str, *, committed: bool) -> list[int]:
        """Version numbers whose directory exists (``committed``: with its commit file)."""
        selector = pafs.FileSelector(self._model_dir(name), allow_not_found=True)
        numbers = []
        for info in self.fs.get_file_info(selector):
            match = _VERSION_DIR.match(info.base_name)
            if info.type != pafs.FileType.Directory or not match:
                continue
            if committed and not self._exists(f"{info.path}/{self.commit_file}"):
                continue
            numbers.append(int(match.group(1)))
        return sorted(numbers)

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names with at least one committed version, sorted."""
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        found = [
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory and NAME_PATTERN.match(info.base_name)
        ]
        return sorted(name for name in found if self._version_numbers(name, committed=True))

    def aliases(self, name: str) -> dict[str, int]:
        """Each alias of ``name`` and the version it points to now."""
        state = self._alias_state(self.check_name(name))
        return {alias: stack[-1] for alias, stack in state["aliases"].items() if stack}

    def _unknown_name(self, name: str) -> RayfinError:
        known = ", ".join(self.names()) or "none"
        return self.not_found(
            f"no {self.noun} named {name!r} in {self.place} {self.root} "
            f"(registered {self.noun}s: {known})"
        )

    def _unknown_version(self, name: str, number: int) -> RayfinError:
        numbers = self._version_numbers(name, committed=True)
        if not numbers:
            return self._unknown_name(name)
        listed = ", ".join(map(str, numbers))
        return self.not_found(f"{self.noun} {name!r} has no version {number} (versions: {listed})")

    def _read_metadata(self, name: str, number: int) -> tuple[dict[str, Any], str]:
        """The commit file of a version and the version's location; not-found if absent."""
        folder = self._version_dir(name, number)
        data = self._read_json(f"{folder}/{self.commit_file}")
        if data is None:
            raise self._unknown_version(name, number)
        return data, self._uri(folder)

    def _resolve(self, name: str, ref: int | str) -> int:
        """A version number from a number (``3`` or ``"3"``) or an alias."""
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, str):
            aliases = self._alias_state(name)["aliases"]
            stack = aliases.get(self.check_alias(ref))
            if not stack:
                if not self._version_numbers(name, committed=True):
                    raise self._unknown_name(name)
                known = ", ".join(sorted(a for a, s in aliases.items() if s)) or "none"
                raise self.not_found(
                    f"{self.noun} {name!r} has no alias {ref!r} (aliases: {known})"
                )
            return int(stack[-1])
        return self.check_version(ref)

    def _alias_state(self, name: str) -> dict[str, Any]:
        state = self._read_json(f"{self._model_dir(name)}/{ALIASES_FILE}")
        return state if state is not None else {"aliases": {}, "events": []}

    # -- writing -------------------------------------------------------------------------

    def _commit(self, name: str, files: dict[str, bytes], metadata: Callable[[int], bytes]) -> int:
        """Write ``files`` and then ``metadata(number)`` as the commit file of the next
        version of ``name``; return its number. Call with :meth:`_lock` held."""
        folder = self._model_dir(name)
        self.fs.create_dir(folder, recursive=True)
        for _ in range(_COMMIT_ATTEMPTS):
            numbers = self._version_numbers(name, committed=False)
            number = (numbers[-1] if numbers else 0) + 1
            content = {**files, self.commit_file: metadata(number)}  # the commit goes last
            target = self._version_dir(name, number)
            if not self.local:
                for file, data in content.items():
                    put_atomic(self.fs, f"{target}/{file}", data)
                return number
            staging = f"{folder}/.staging-{uuid.uuid4().hex}"
            self.fs.create_dir(staging)
            for file, data in content.items():
                with self.fs.open_output_stream(f"{staging}/{file}") as out:
                    out.write(data)
            try:
                # Fails if another writer created this version meanwhile: take the next one.
                self.fs.move(staging, target)
                return number
            except OSError:
                self.fs.delete_dir(staging)
        raise self.error(f"could not allocate a version of {name} in {self.root}")

    def _push_alias(self, name: str, alias: str, number: int) -> None:
        """Point ``alias`` at version ``number`` (pushed onto its stack, and logged)."""
        with self._lock(name):
            state = self._alias_state(name)
            stack = state["aliases"].setdefault(alias, [])
            if stack and stack[-1] == number:
                return  # already there; a second entry would make a rollback a no-op
            stack.append(number)
            state["events"].append(
                {"time": utc_now(), "action": "promote", "alias": alias, "version": number}
            )
            self._write_aliases(name, state)

    def _write_aliases(self, name: str, state: dict[str, Any]) -> None:
        path = f"{self._model_dir(name)}/{ALIASES_FILE}"
        try:
            put_atomic(self.fs, path, dumps_json(state))
        except (OSError, pa.ArrowException) as exc:
            raise self.error(f"cannot write {self._uri(path)}: {exc}") from exc
