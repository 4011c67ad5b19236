"""Launch, join, inspect and stop a swarm of block servers.

A swarm is a named :class:`~rayfin.actors.swarm_registry.SwarmRegistry` plus the block
servers registered with it. Clients need only the name: they ask the registry which
servers exist and route over them. Servers can be added and removed while clients run.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from dataclasses import asdict, replace
from typing import Any

import ray

from rayfin.cluster import NAMESPACE
from rayfin.errors import LLMError, UnsupportedModelError
from rayfin.llm.server_info import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_IDLE_TIMEOUT_S,
    ServerConfig,
    ServerInfo,
    ServerRecord,
)

# OpenMP threads of a server spin only briefly after an op, then sleep. With the default
# (about 300k spins, several ms) idle stages steal the cores the busy stage on the same
# machine needs; sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every op of a stage wake
# its threads. On 2 cores, one-off runs measured 17 ms per stage spinning, 13 ms passive
# alone, and a 3-stage decode about 10 % faster with short spins than passive.
# (KMP_BLOCKTIME is the same setting for Intel's OpenMP runtime.)
SERVER_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}


def registry_name(swarm: str) -> str:
    return f"rayfin.swarm.{swarm}"


def find_registry(swarm: str) -> Any | None:
    """The registry actor of ``swarm``, or ``None`` when no such swarm runs."""
    try:
        return ray.get_actor(registry_name(swarm), namespace=NAMESPACE)
    except ValueError:
        return None


def stage_bounds(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    """Split ``num_blocks`` into ``num_stages`` contiguous ranges as even as possible."""
    if not 1 <= num_stages <= num_blocks:
        raise UnsupportedModelError(
            f"num_stages must be between 1 and the model's {num_blocks} blocks, got {num_stages}"
        )
    edges = [round(i * num_blocks / num_stages) for i in range(num_stages + 1)]
    return list(itertools.pairwise(edges))


class Swarm:
    """A handle on a running swarm: list, add and remove servers, or shut it all down."""

    def __init__(self, name: str, registry: Any) -> None:
        from rayfin.actors.swarm_registry import SwarmSpec

        self.name = name
        self.registry = registry
        self.spec: SwarmSpec = ray.get(registry.spec.remote())
        # Ray ends an actor when its creator drops the last handle, so the Swarm that
        # launched servers holds theirs: a non-detached swarm lives as long as this object.
        self._owned: dict[str, Any] = {}
        self.points_bank: Any | None = None  # the swarm's PointsBank, when it launched one

    def __repr__(self) -> str:
        return f"Swarm({self.name!r}, model={self.spec.model!r}, servers={len(self.servers())})"

    def servers(self) -> list[ServerRecord]:
        """The servers registered now, ordered by their first block."""
        records = ray.get(self.registry.servers.remote())
        return sorted(records, key=lambda r: (r.start, r.end, r.server_id))

    def status(self, timeout_s: float = 10.0) -> list[ServerInfo | None]:
        """Each server's :class:`ServerInfo`; ``None`` where it did not answer in time."""
        return list(self.status_by_id(timeout_s).values())

    def status_by_id(self, timeout_s: float = 10.0) -> dict[str, ServerInfo | None]:
        """:meth:`status` keyed by server id, so servers that did not answer keep theirs."""
        records = self.servers()
        refs = [record.handle.info.remote() for record in records]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        infos: dict[str, ServerInfo | None] = {}
        for record, ref in zip(records, refs, strict=True):
            try:
                infos[record.server_id] = ray.get(ref) if ref in done else None
            except ray.exceptions.RayError:
                infos[record.server_id] = None
        return infos

    def add_server(
        self,
        start: int,
        end: int,
        *,
        server_id: str | None = None,
        timeout_s: float = 600.0,
        **options: Any,
    ) -> str:
        """Start one server for blocks ``[start, end)`` and wait until it has joined."""
        return self.add_servers([(start, end, server_id)], timeout_s=timeout_s, **options)[0]

    def add_servers(
        self,
        ranges: list[tuple[int, int, str | None]],
        *,
        timeout_s: float = 600.0,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        max_restarts: int = 0,
        detached: bool = False,
        env_vars: dict[str, str] | None = None,
        **config: Any,
    ) -> list[str]:
        """Start servers for ``(start, end, server_id or None)`` ranges in parallel.

        ``config`` overrides :class:`ServerConfig` fields (``cache_bytes``, ``threads``, ...);
        ``env_vars`` are set in the servers' processes.
        """
        from rayfin.actors.block_server import BlockServer
        from rayfin.cluster import placement

        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        base = ServerConfig(
            model=self.spec.model,
            start=0,
            end=1,
            swarm=self.name,
            dtype=self.spec.dtype,
            quantization=self.spec.quantization,
            compression=self.spec.compression,
        )
        base = replace(base, **config)
        actor_cls = ray.remote(BlockServer)
        env = SERVER_ENV | dict(env_vars or {})
        handles, ids = [], []
        for start, end, server_id in ranges:
            if not 0 <= start < end <= self.spec.num_blocks:
                raise UnsupportedModelError(
                    f"block range [{start}, {end}) is outside the model's "
                    f"{self.spec.num_blocks} blocks"
                )
            server_id = server_id or f"{self.name}-{start}-{end}-{uuid.uuid4().hex[:6]}"
            handle = actor_cls.options(
                name=f"rayfin.server.{server_id}",
                namespace=NAMESPACE,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                resources=placement("block_server") | dict(resources or {}),
                max_restarts=max_restarts,
                max_concurrency=1000,
                lifetime="detached" if detached else None,
                runtime_env={"env_vars": env},
            ).remote(replace(base, start=start, end=end, server_id=server_id))
            handles.append(handle)
            ids.append(server_id)
        try:
            infos = ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            for handle in handles:
                ray.kill(handle)
            raise LLMError(f"block servers for swarm {self.name!r} failed to start: {exc}") from exc
        # Registration is asynchronous; make sure clients see every server from now on.
        for handle, info in zip(handles, infos, strict=True):
            record = ServerRecord(
                info.server_id, handle, info.start, info.end, info.node_id, info.device
            )
            ray.get(self.registry.register.remote(record))
            self._owned[info.server_id] = handle
        return ids

    def remove_server(self, server_id: str, *, graceful: bool = True) -> None:
        """Take a server out: it deregisters and exits (or is killed outright)."""
        record = next((r for r in self.servers() if r.server_id == server_id), None)
        if record is None:
            raise LLMError(f"swarm {self.name!r} has no server {server_id!r}")
        ray.get(self.registry.deregister.remote(server_id))
        self._owned.pop(server_id, None)
        if graceful:
            # leave() ends by exiting the actor, so the call itself reports a dead actor.
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(record.handle.leave.remote(), timeout=30)
        else:
            ray.kill(record.handle)

    def shutdown(self) -> None:
        """Stop every server, the registry and the points bank (its ledger stays)."""
        from rayfin.actors.points import find_points_bank

        for record in self.servers():
            ray.kill(record.handle)
        for handle in self._owned.values():
            ray.kill(handle)
        self._owned.clear()
        ray.kill(self.registry)
        bank = self.points_bank or find_points_bank(self.name)
        if bank is not None:
            ray.kill(bank, no_restart=True)
        self.points_bank = None


def connect_swarm(name: str = "default") -> Swarm:
    """Attach to a running swarm by name."""
    registry = find_registry(name)
    if registry is None:
        raise LLMError(
            f"no swarm named {name!r} in this Ray cluster; start one with "
            "rayfin.llm.launch_swarm(...) or `rayfin llm serve`"
        )
    return Swarm(name, registry)


def launch_swarm(
    model: str,
    *,
    name: str = "default",
    num_stages: int = 1,
    replicas: int = 1,
    dtype: str = "float32",
    quantization: str | None = None,
    compression: str | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    max_restarts: int = 0,
    detached: bool = False,
    threads: int | None = None,
    env_vars: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    points_url: str | None = None,
    operator: str | None = None,
) -> Swarm:
    """Start a swarm serving every block of ``model``: ``num_stages`` contiguous ranges,
    each with ``replicas`` servers, all registered under ``name``.

    ``quantization`` is ``None``, ``"int8"`` or ``"nf4"`` (server weights);
    ``compression`` is ``None`` or ``"blockwise8"`` (hidden states on the wire).
    ``num_gpus`` defaults to one per server when the cluster has GPUs, else none.
    ``max_restarts`` lets Ray restart a crashed server (clients replay onto it);
    ``detached`` keeps the swarm alive after the launching process exits.
    ``points_url`` (a database URL) starts the swarm's points bank there: servers then
    credit their operators for the work they do and charge clients' bids. ``operator`` is
    the points account the servers' work is credited to (default: each server's id).
    """
    from rayfin.actors.swarm_registry import SwarmRegistry, SwarmSpec
    from rayfin.llm.checkpoint import load_config, model_shape
    from rayfin.llm.compression import check_compression
    from rayfin.llm.loading import resolve_model_path
    from rayfin.llm.quantization import check_quantization

    check_quantization(quantization)
    check_compression(compression)
    if replicas < 1:
        raise UnsupportedModelError(f"replicas must be at least 1, got {replicas}")
    if find_registry(name) is not None:
        raise LLMError(
            f"a swarm named {name!r} is already running; add servers to it with "
            f"connect_swarm({name!r}).add_server(...), or choose another name"
        )
    num_blocks = model_shape(load_config(resolve_model_path(model))).num_layers
    bounds = stage_bounds(num_blocks, num_stages)
    spec = SwarmSpec(name, model, num_blocks, dtype, quantization, compression)
    registry = (
        ray.remote(SwarmRegistry)
        .options(
            name=registry_name(name),
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=1000,
            lifetime="detached" if detached else None,
        )
        .remote(spec)
    )
    swarm = Swarm(name, registry)
    if points_url is not None:
        from rayfin.actors.points import launch_points_bank

        # Held by the swarm: a named actor whose last handle is dropped is terminated.
        swarm.points_bank = launch_points_bank(name, points_url, detached=detached)
    ranges = [
        (start, end, f"{name}-s{stage}-r{replica}")
        for stage, (start, end) in enumerate(bounds)
        for replica in range(replicas)
    ]
    try:
        swarm.add_servers(
            ranges,
            timeout_s=timeout_s,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            max_restarts=max_restarts,
            detached=detached,
            cache_bytes=cache_bytes,
            idle_timeout_s=idle_timeout_s,
            threads=threads,
            env_vars=env_vars,
            operator=operator,
        )
    except BaseException:
        ray.kill(registry)
        raise
    return swarm


def describe(info: ServerInfo) -> dict[str, Any]:
    """A server's info as plain JSON-able data, with derived figures."""
    data = asdict(info)
    data["cache_free_bytes"] = info.cache_free_bytes
    data["tokens_per_s"] = info.tokens_per_s
    return data
