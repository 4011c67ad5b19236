"""Shared test set-up: rayfin's own fixtures plus per-test settings isolation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rayfin.config import get_settings, reload_settings

pytest_plugins = ["rayfin.testing", "market_fixtures", "api_fixtures"]


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own state dir and no stray RAYFIN_* variables or config file.

    The model cache is left at its default so the SmolLM2 conversion happens once per
    machine, as it would for a user.
    """
    import os

    for key in list(os.environ):
        if key.startswith("RAYFIN_") and key != "RAYFIN_MODELS__CACHE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("RAYFIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)  # so no ./rayfin.yaml from the checkout is picked up
    reload_settings()
    yield tmp_path / "state"
    # Only forget: monkeypatch has not restored the environment yet at this point.
    get_settings.cache_clear()
