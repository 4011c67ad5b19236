"""Joining the Ray cluster from a command, with errors that say what to do."""

from __future__ import annotations

from rayfin.cli.console import fail, run_guarded


def join_ray(*, start_local: bool) -> str:
    """Join the Ray cluster at the ``ray.address`` setting and return its GCS address.

    With no address configured, ``start_local`` starts a Ray instance in this process;
    otherwise the cluster running on this machine is looked up (``auto``).
    """
    import socket

    import ray

    from rayfin.cluster import connect_ray
    from rayfin.config import get_settings

    if ray.is_initialized():  # invoked in a process that already joined one
        return ray.get_runtime_context().gcs_address
    settings = run_guarded(get_settings).ray
    address = settings.address or (None if start_local else "auto")
    hint = "start one with `ray start --head` and set RAYFIN_RAY__ADDRESS=auto"
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # Ray would retry an unreachable GCS for minutes; say so at once instead.
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise fail(f"no Ray cluster answers at {address} ({exc}); {hint}") from None
    try:
        connect_ray(address)
    except ConnectionError as exc:
        raise fail(
            f"cannot join a Ray cluster ({exc}); {hint}. If the cluster uses token "
            "authentication (on by default once ~/.ray/auth_token exists), set "
            "RAY_AUTH_MODE=token here too"
        ) from None
    return ray.get_runtime_context().gcs_address
