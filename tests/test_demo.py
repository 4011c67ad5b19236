"""``rayfin demo`` (what ``make demo`` runs) works end to end on embedded defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.model]


def test_demo_runs_the_slice_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rayfin", "demo", "--ticks", "20000"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "replayed 20,000 real ES ticks" in out
    assert "read 20,000 ticks" in out
    assert "one-minute bars" in out
    assert "it answered:" in out
    assert "what the demo did" in out
