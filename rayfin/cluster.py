"""Joining Ray the way every rayfin entry point does: the configured cluster, or a local
instance when none is configured."""

from __future__ import annotations


def ensure_ray() -> bool:
    """Connect to ``settings.ray.address``, or start a local Ray (no dashboard, the
    configured CPU count), unless this process already joined one. Returns True when this
    call connected, so that the caller knows to ``ray.shutdown()``."""
    import ray

    if ray.is_initialized():
        return False
    from rayfin.config import get_settings

    settings = get_settings().ray
    if settings.address is None:
        ray.init(
            num_cpus=settings.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=settings.address, log_to_driver=False, configure_logging=False)
    return True
