"""Every script in examples/ runs to completion. Scripts with the line
``# Needs: a running rayfin API`` run against the session's API (``api_server``), reached
through ``RAYFIN_API_URL`` and a trade key in ``RAYFIN_API_KEY``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from api_fixtures import ApiServer

import rayfin

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
NEEDS_API = "# Needs: a running rayfin API"


def _needs_api(script: Path) -> bool:
    return NEEDS_API in script.read_text().splitlines()


@pytest.mark.model
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, request: pytest.FixtureRequest) -> None:
    env = dict(os.environ)
    api = None
    if _needs_api(script):
        # Only these pay for the API's start (once per session).
        api = request.getfixturevalue("api_server")
        env.update(RAYFIN_API_URL=api.url, RAYFIN_API_KEY=api.trade_key)
        production = _production(api)
    try:
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        if api is not None:
            # An example may deploy a model: leave production as the other tests found it.
            with rayfin.connect(api.url, api.trade_key) as client:
                client.promote(production)
    print(result.stdout)  # shown with -rP: what the example reports
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


def _production(api: ApiServer) -> int:
    with rayfin.connect(api.url, api.read_key) as client:
        version = client.models().production
    assert version is not None
    return version


@pytest.mark.parametrize("script", [s for s in EXAMPLES if _needs_api(s)], ids=lambda p: p.name)
def test_api_examples_say_what_they_need(script: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYFIN_API_")}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0
    assert "RAYFIN_API_URL" in result.stderr
    assert "RAYFIN_API_KEY" in result.stderr
