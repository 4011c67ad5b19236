"""The API on Ray Serve: the ingress deployment (:class:`Api`, the FastAPI app of
:mod:`rayfin.serve.app`) and the LLM deployment (:class:`~rayfin.serve.llm.LLMService`),
composed into one application, ``rayfin``, at ``/``.

Scoring runs inside the ingress replica: a hand-off to another deployment would cost more
than the model does. The LLM is a deployment of its own, called through its handle.

HTTP reaches the ingress replicas through Ray Serve's HAProxy ingress when the cluster's
processes run with :data:`rayfin.cluster.SERVE_ENV` (rayfin's local Ray and
``cluster.yaml`` do), else through Serve's own proxy; the API is the same either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from rayfin.cluster import placement
from rayfin.errors import ConfigError
from rayfin.serve.app import ApiOptions, Services, create_api
from rayfin.serve.llm import LLMService

APP_NAME = "rayfin"
INGRESS = "api"
LLM_DEPLOYMENT = "llm"


@serve.ingress()
class Api:
    """The ingress: one :class:`~rayfin.serve.app.Services` and its FastAPI app per replica."""

    def __init__(self, options: ApiOptions, llm: DeploymentHandle | None = None) -> None:
        self.services = Services(options, llm)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.services)

    def __del__(self) -> None:
        self.services.close()


@dataclass(frozen=True)
class Resources:
    """What each replica reserves (logical CPUs: the ingress is mostly waiting on I/O)."""

    ingress_cpus: float = 0.1
    llm_cpus: float = 0.5
    max_ongoing_requests: int = 64


def build_app(options: ApiOptions, resources: Resources | None = None) -> Any:
    """The bound application: the ingress, and the LLM deployment unless ``options.llm``
    is None. Replicas ask for the stream nodes' marker (:func:`rayfin.cluster.placement`)."""
    if not options.keys:
        raise ConfigError(
            "the API has no keys: add serve.api_keys to the settings (make one with "
            "`rayfin serve keygen`)"
        )
    resources = resources or Resources()
    where = placement("stream")
    llm = None
    if options.llm is not None:
        llm = (
            serve.deployment(LLMService)
            .options(
                name=LLM_DEPLOYMENT,
                num_replicas=options.llm_replicas,
                max_ongoing_requests=resources.max_ongoing_requests,
                ray_actor_options={"num_cpus": resources.llm_cpus, "resources": where},
            )
            .bind(options.llm)
        )
    return (
        serve.deployment(Api)
        .options(
            name=INGRESS,
            num_replicas=options.replicas,
            max_ongoing_requests=resources.max_ongoing_requests,
            ray_actor_options={"num_cpus": resources.ingress_cpus, "resources": where},
        )
        .bind(options, llm)
    )


def deploy(
    options: ApiOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    resources: Resources | None = None,
) -> str:
    """Start Serve on the connected Ray cluster (HTTP on ``host:port``) and run the API
    there; returns its base URL once every replica is ready. Serve keeps running after
    this process leaves a long-lived cluster; :func:`undeploy` removes it."""
    from rayfin.config import client_host

    app = build_app(options, resources)
    # Serve's INFO lines ("Connecting to existing Serve app ... will not be applied") read
    # like trouble in a terminal; its warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{client_host(host)}:{port}"


def undeploy() -> None:
    """Remove the API and stop Serve (its proxies and controller) on the cluster."""
    serve.shutdown()
