"""The HTTP API on Ray Serve: rayfin's decisions, trading state, model registry and
distributed LLM under ``/v1`` (see ``docs/api.md``).

The public surface is :class:`~rayfin.serve.app.ApiOptions` and :func:`create_api` (the
FastAPI app), :func:`deploy` / :func:`undeploy` (the Serve application) and
:mod:`rayfin.serve.schemas` (every body, which the SDK shares). The rest are its parts:
``auth`` (keys, roles, rate limits), ``problems`` (errors), ``scoring``, ``views``
(ledger reads), ``llm`` (the LLM deployment), ``pipeline``, ``metrics`` and
``static/dashboard.html``.
"""

__all__ = ["ApiOptions", "create_api", "deploy", "openapi_spec", "undeploy"]

# Loaded on first use: the SDK imports rayfin.serve.schemas without Ray Serve or trading.
_LAZY = {
    "ApiOptions": "rayfin.serve.app",
    "create_api": "rayfin.serve.app",
    "openapi_spec": "rayfin.serve.app",
    "deploy": "rayfin.serve.deployment",
    "undeploy": "rayfin.serve.deployment",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayfin.serve' has no attribute {name!r}")
