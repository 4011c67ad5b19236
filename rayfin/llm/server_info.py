"""What servers publish about themselves: their configuration and their live load.

These are plain records passed between the block servers, the swarm registry and clients,
so each side can import them without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# KV cache a server reserves for sessions unless told otherwise.
DEFAULT_CACHE_BYTES = 1 << 30
# Sessions untouched this long are freed; the client replays them if it comes back.
DEFAULT_IDLE_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How to start one block server. ``model`` is a catalogue name or a folder."""

    model: str
    start: int
    end: int
    swarm: str = "default"
    server_id: str = ""
    dtype: str = "float32"
    quantization: str | None = None
    compression: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_batch_rows: int = 64
    # Longest a decode batch waits for other active sessions' steps (0: never wait).
    batch_wait_s: float = 0.005
    # Torch threads; None uses every core the process may run on, since the stages of
    # one session run one after another rather than at the same time.
    threads: int | None = None
    device: str | None = None  # None: CUDA when this actor was given a GPU, else CPU
    # The points account this server's work is credited to (default: the server id).
    operator: str | None = None

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """A server as the registry lists it: enough to reach it and to route around it."""

    server_id: str
    handle: Any  # ray.actor.ActorHandle of a BlockServer
    start: int
    end: int
    node_id: str
    device: str


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A snapshot of one server's configuration, memory and load."""

    server_id: str
    swarm: str
    model: str
    start: int
    end: int
    node_id: str
    device: str
    dtype: str
    quantization: str | None
    compression: str | None
    weight_bytes: int
    cache_capacity_bytes: int
    cache_used_bytes: int
    rss_bytes: int
    sessions: int
    queued: int
    requests: int
    tokens: int
    busy_s: float
    block_latency_s: float  # estimated seconds per block for one decode step
    uptime_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_free_bytes(self) -> int:
        return self.cache_capacity_bytes - self.cache_used_bytes

    @property
    def tokens_per_s(self) -> float:
        """Tokens this server pushed through its blocks per second of compute."""
        return self.tokens / self.busy_s if self.busy_s > 0 else 0.0
