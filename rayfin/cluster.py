"""Joining Ray the way every rayfin entry point does (the configured cluster, or a local
instance when none is configured), and placing actors on the node type meant for them.

On a multi-node cluster (``cluster.yaml``, ``cluster.local.yaml``) each node type
advertises a marker resource: ``rayfin_block_server`` on GPU workers, ``rayfin_stream`` on
CPU workers, ``rayfin_head`` on the head. Each actor asks for a small fraction of its
role's marker (:func:`placement`), so block servers only land on GPU nodes and stream
actors only on CPU nodes, many to a node. On one machine nothing advertises the markers
and nothing is asked for.
"""

from __future__ import annotations

import os

NAMESPACE = "rayfin"
"""The Ray namespace of rayfin's named actors (swarm registries, the live pipeline's
actors), so that any driver or Serve replica finds them by name."""

SERVE_ENV: dict[str, str] = {
    # Ray Serve's HAProxy ingress: HTTP goes from a native HAProxy straight to the ingress
    # replicas, without Serve's Python proxy hop (p50 from about 9 to about 1.5 ms here).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # User code on the replica's event loop, handles over gRPC, GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}
"""Environment every process of a Ray cluster that runs rayfin's API needs (read by Ray
Serve when it is imported); ``cluster.yaml`` exports the same. Set either to 0 to opt out."""

LOCAL_SERVE_ENV: dict[str, str] = {
    **SERVE_ENV,
    # A replica that stops drains its connections for 30 s, for a load balancer to notice;
    # a Ray on one machine has none, and would wait that long at every shutdown.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
"""HAProxy's own listeners, on fixed ports (8404, 9101) unless told otherwise."""


def apply_local_env() -> None:
    """Put :data:`LOCAL_SERVE_ENV` in this process's environment (values already set win),
    before it starts a local Ray, whose processes inherit it. HAProxy's stats and metrics
    listeners get free ports, always: a child process that inherited its parent's would
    clash with the parent's Serve (two local Rays on one machine: a test and a demo)."""
    from rayfin.stream.broker import free_port

    for key, value in LOCAL_SERVE_ENV.items():
        os.environ.setdefault(key, value)
    for key in HAPROXY_PORTS:
        os.environ[key] = str(free_port())


ROLES: dict[str, str] = {
    "block_server": "rayfin_block_server",
    "stream": "rayfin_stream",
    "head": "rayfin_head",
}
"""Actor role -> the custom resource that marks the nodes meant for it."""
MARKER = 0.01
"""The share of a marker one actor asks for: up to 100 actors of a role per node."""


def connect_ray(address: str | None) -> None:
    """``ray.init`` as rayfin runs it: a local instance (no dashboard, the configured CPU
    count) when ``address`` is None, else the cluster at ``address`` (``auto`` included)."""
    import ray

    from rayfin.config import get_settings

    if address is None:
        apply_local_env()
        ray.init(
            # A new instance even when a `ray start` cluster runs on this machine, which a
            # bare ray.init() would join.
            address="local",
            num_cpus=get_settings().ray.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def ensure_ray() -> bool:
    """Connect to ``settings.ray.address``, or start a local Ray, unless this process
    already joined one. Returns True when this call connected, so that the caller knows to
    ``ray.shutdown()``."""
    import ray

    if ray.is_initialized():
        return False
    from rayfin.config import get_settings

    connect_ray(get_settings().ray.address)
    return True


def placement(role: str) -> dict[str, float]:
    """The custom resources an actor of ``role`` (a key of :data:`ROLES`) asks for, per the
    ``ray.placement`` setting: its marker when the cluster advertises it ("auto"), always
    ("markers": an autoscaler then starts a node of that type), or never ("none")."""
    import ray

    from rayfin.config import get_settings

    if role not in ROLES:
        raise ValueError(f"unknown actor role {role!r}; expected one of {', '.join(ROLES)}")
    marker = ROLES[role]
    mode = get_settings().ray.placement
    if mode == "none":
        return {}
    if mode == "markers" or ray.cluster_resources().get(marker, 0) > 0:
        return {marker: MARKER}
    return {}
