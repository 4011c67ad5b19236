"""Settings: defaults, env vars, YAML file, priority, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rayfin.config import Settings, reload_settings
from rayfin.errors import ConfigError


def test_defaults_are_derived_from_the_root_dirs(
    isolated_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAYFIN_MODELS__CACHE_DIR", raising=False)
    settings = reload_settings()
    assert settings.state_dir == isolated_state
    assert settings.models.cache_dir == settings.cache_dir / "models"
    assert settings.database.url == f"sqlite:///{isolated_state / 'rayfin.db'}"
    assert settings.broker.resolved_bootstrap_servers() == "127.0.0.1:9092"


def test_nested_env_vars_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYFIN_BROKER__PORT", "9999")
    monkeypatch.setenv("RAYFIN_BROKER__BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("RAYFIN_DATABASE__URL", "postgresql+psycopg://127.0.0.1/test")
    settings = reload_settings()
    assert settings.broker.port == 9999
    assert settings.broker.resolved_bootstrap_servers() == "kafka-1:9092,kafka-2:9092"
    assert settings.database.url == "postgresql+psycopg://127.0.0.1/test"


def test_yaml_file_is_read_and_env_wins_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("broker:\n  port: 9500\n  host: 0.0.0.0\nmodels:\n  default: smollm2-135m\n")
    monkeypatch.setenv("RAYFIN_CONFIG", str(config))
    assert reload_settings().broker.port == 9500
    monkeypatch.setenv("RAYFIN_BROKER__PORT", "9600")
    settings = reload_settings()
    assert settings.broker.port == 9600
    assert settings.broker.host == "0.0.0.0"


def test_local_rayfin_yaml_is_picked_up(tmp_path: Path) -> None:
    (tmp_path / "rayfin.yaml").write_text("ray:\n  num_cpus: 3\n")
    assert reload_settings().ray.num_cpus == 3


def test_unknown_keys_are_errors_not_silent_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("broker:\n  prot: 9500\n")
    monkeypatch.setenv("RAYFIN_CONFIG", str(config))
    with pytest.raises(ValidationError, match="prot"):
        reload_settings()


def test_out_of_range_values_are_rejected() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        Settings(broker={"port": 70000})


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYFIN_CONFIG", "/nonexistent/rayfin.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        reload_settings()
