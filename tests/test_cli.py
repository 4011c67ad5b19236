"""The ``rayfin`` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayfin.cli import app
from rayfin.stream.broker import free_port

runner = CliRunner()


def rayfin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as ``python -m rayfin``."""
    return subprocess.run(
        [sys.executable, "-m", "rayfin", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
    )


def test_help_lists_the_commands() -> None:
    result = rayfin("--help")
    assert result.returncode == 0, result.stderr
    for command in ("broker", "models", "data", "demo", "config"):
        assert command in result.stdout
    for group, subcommands in {
        "broker": ("start", "stop", "status"),
        "models": ("prepare", "list"),
        "data": ("list", "head"),
    }.items():
        out = rayfin(group, "--help").stdout
        assert all(sub in out for sub in subcommands), out


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("rayfin ")


def test_data_list_and_head() -> None:
    result = rayfin("data", "list")
    assert result.returncode == 0
    assert "es-ticks" in result.stdout
    assert "500,000" in result.stdout
    head = rayfin("data", "head", "es-ticks", "-n", "2")
    assert "1640.25" in head.stdout
    assert "America/Chicago" not in head.stderr
    bad = rayfin("data", "head", "nope")
    assert bad.returncode == 1
    assert "unknown dataset 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.integration
def test_broker_start_status_stop_across_processes(isolated_state: Path) -> None:
    env = {"RAYFIN_STATE_DIR": str(isolated_state), "RAYFIN_BROKER__PORT": str(free_port())}
    assert rayfin("broker", "status", env=env).returncode == 3  # stopped
    started = rayfin("broker", "start", env=env)
    assert started.returncode == 0, started.stderr
    try:
        status = rayfin("broker", "status", "--json", env=env)
        assert status.returncode == 0
        assert json.loads(status.stdout)["state"] == "running"
        # A second broker on the same port from another state dir is refused clearly.
        clash = rayfin(
            "broker", "start", env={**env, "RAYFIN_STATE_DIR": str(isolated_state / "other")}
        )
        assert clash.returncode == 1
        assert "already in use" in clash.stderr
    finally:
        assert rayfin("broker", "stop", env=env).returncode == 0
    assert rayfin("broker", "status", env=env).returncode == 3


def test_invalid_configuration_is_reported_without_traceback() -> None:
    result = rayfin("config", "show", env={"RAYFIN_BROKER__PORT": "0"})
    assert result.returncode == 1
    assert "invalid configuration" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_reflects_env(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("broker:\n  port: 9555\n")
    result = rayfin("--config", str(config), "config", "show")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.split("\n", 1)[1])
    assert shown["broker"]["port"] == 9555


@pytest.mark.model
def test_models_prepare_reuses_the_cache() -> None:
    result = rayfin("models", "prepare", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    again = rayfin("models", "prepare", "smollm2-135m")
    assert "already prepared" in again.stdout
    unknown = rayfin("models", "prepare", "gpt-17")
    assert unknown.returncode == 1
    assert "catalogue has" in unknown.stderr
