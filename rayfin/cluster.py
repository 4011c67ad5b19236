"""Joining Ray the way every rayfin entry point does: the configured cluster, or a local
instance when none is configured."""

from __future__ import annotations


def connect_ray(address: str | None) -> None:
    """``ray.init`` as rayfin runs it: a local instance (no dashboard, the configured CPU
    count) when ``address`` is None, else the cluster at ``address`` (``auto`` included)."""
    import ray

    from rayfin.config import get_settings

    if address is None:
        ray.init(
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
