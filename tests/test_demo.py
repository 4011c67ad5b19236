"""``rayfin demo`` (what ``make demo`` runs) works end to end on embedded defaults, and
Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayfin.stream.probe import kafka_answers
from rayfin.trading.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model registry for both runs: the first demo trains a model, the second finds it."""
    return tmp_path_factory.mktemp("demo-models")


def _env(registry: Path) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "RAYFIN_TRADING__REGISTRY": str(registry)}


def test_demo_runs_the_whole_job(tmp_path: Path, shared_registry: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable, "-m", "rayfin", "demo", "--ticks", "20000", "--train-rows", "30000",
            "--rate", "0", "--news-every", "600", "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(shared_registry),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    text = result.stdout
    assert "launched the smollm2-135m swarm 'demo'" in text
    assert re.search(r"trained market v1 \(cross-validated macro F1 0\.\d+\)", text)
    assert "started the live pipeline" in text
    assert re.search(r"serving the HTTP API at http://127\.0\.0\.1:\d+", text)
    match = re.search(r"replayed 20,000 real ES ticks and (\d+) simulated headlines", text)
    assert match, text
    news = int(match.group(1))
    assert news > 0
    assert "traded 20,000 ticks" in text
    assert f"{news} / {news} stories scored by the LLM swarm" in text
    for call in ("GET /v1/pnl", "GET /v1/decisions", "POST /v1/score", "POST /v1/sentiment"):
        assert call in text
    assert "POST /v1/generate" in text
    assert "/dashboard#key=rf_" in text
    # The P&L plot is a real PNG, and the ledger holds what the trader recorded.
    plot = out / "pnl.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000
    with Ledger(f"sqlite:///{out / 'ledger.db'}") as ledger:
        decisions = ledger.decisions()
        assert len(decisions) > 0
        assert decisions["sentiment"].notna().all()
        assert decisions["symbol"].eq("ES").all()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_everything_it_started(tmp_path: Path, shared_registry: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "rayfin", "demo", "--ticks", "500000", "--rate", "5000",
            "--train-rows", "30000", "--out", str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(shared_registry),
        # A terminal's Ctrl-C arrives with SIGINT at its default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    broker = api = None
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # wait until the API serves, while the replay runs
        seen.append(line)
        if match := re.search(r"embedded broker \(tansu\) at 127\.0\.0\.1:(\d+)", line):
            broker = int(match.group(1))
        if match := re.search(r"serving the HTTP API at http://127\.0\.0\.1:(\d+)", line):
            api = int(match.group(1))
            break
        if time.monotonic() > deadline:
            break
    assert broker is not None, "".join(seen)
    assert api is not None, "".join(seen)
    assert kafka_answers("127.0.0.1", broker)
    assert _port_open(api)
    time.sleep(3)  # into the replay
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) != 0
    proc.stdout.close()
    assert not kafka_answers("127.0.0.1", broker), "the demo's broker outlived Ctrl-C"
    assert not _port_open(api), "the demo's HTTP API outlived Ctrl-C"
