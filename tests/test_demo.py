"""``rayfin demo`` (what ``make demo`` runs) works end to end on embedded defaults."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from rayfin.stream.probe import kafka_answers

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


def test_ctrl_c_stops_everything_it_started() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayfin", "demo", "--ticks", "500000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        # A terminal's Ctrl-C arrives with SIGINT at its default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    port = None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until the broker and Ray are up and ticks flow
        if match := re.search(r"embedded broker \(tansu\) at 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        if "started Ray" in line or time.monotonic() > deadline:
            break
    assert port is not None
    assert kafka_answers("127.0.0.1", port)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) != 0
    proc.stdout.close()
    assert not kafka_answers("127.0.0.1", port), "the demo's broker outlived Ctrl-C"
