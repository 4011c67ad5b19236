"""Actors land on the node type meant for them: block servers on nodes marked
``rayfin_block_server`` (GPU workers in cluster.yaml), stream actors and the HTTP API's
Serve replicas on ``rayfin_stream`` nodes, on a real multi-node ``ray.cluster_utils.Cluster``
running Serve behind HAProxy as ``cluster.yaml`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayfin.cluster import MARKER, SERVE_ENV, placement
from rayfin.config import reload_settings
from rayfin.stream.broker import free_port
from rayfin.testing import tiny_causal_lm

# Runs in its own process: the test session's Ray is a single local node. Its environment
# has rayfin.cluster.SERVE_ENV, which every node of the Cluster inherits (as `ray start`
# does from ~/.bashrc in cluster.yaml), so Serve runs with its HAProxy ingress.
SCRIPT = r"""
import functools, json, os, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
import ray
from ray import serve
from ray.cluster_utils import Cluster
from rayfin.actors.sentiment import launch_sentiment
from rayfin.config import ApiKey
from rayfin.llm import launch_swarm
from rayfin.sentiment.factory import make_scorer
from rayfin.serve.app import ApiOptions
from rayfin.serve.deployment import APP_NAME, INGRESS, LLM_DEPLOYMENT, deploy
from rayfin.serve.llm import LLMOptions
from rayfin.stream.broker import free_port

tiny, tmp = sys.argv[1], sys.argv[2]
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": 1, "resources": {"rayfin_head": 1}, "include_dashboard": False},
)
gpu = cluster.add_node(num_cpus=1, resources={"rayfin_block_server": 1})
cpu = cluster.add_node(num_cpus=1, resources={"rayfin_stream": 1})
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()

def node_of(handle):
    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

def ha_proxy_env(handle):
    read = lambda self: os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    return ray.get(handle.__ray_call__.remote(read))

def serve_actors(prefix):
    # Ray's state API (ray.util.state.list_actors) needs the dashboard, which this cluster
    # does not run, and serve.status() names no actors; Serve's actors are named ones, in
    # its "serve" namespace: SERVE_REPLICA::<app>#<deployment>#<id> for replicas,
    # SERVE_PROXY_ACTOR-<node id> for the (HAProxy) proxies.
    return [
        ray.get_actor(actor["name"], namespace="serve")
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    ]

# The API as `rayfin serve start --host 0.0.0.0` deploys it, its LLM deployment on the swarm
# (which it connects to on first use), deployed while the swarm starts: both mostly wait.
options = ApiOptions(
    keys=(ApiKey(name="t", role="read", key="placement-test-key"),),
    ledger_url=f"sqlite:///{tmp}/ledger.db",
    registry=f"{tmp}/models",
    llm=LLMOptions(model=tiny, swarm="placed"),
)
deploying = ThreadPoolExecutor(1).submit(deploy, options, host="0.0.0.0", port=free_port())
swarm = launch_swarm(tiny, name="placed", num_stages=2, replicas=2, num_cpus=0.1)
vader = functools.partial(make_scorer, "vader")
scorers = [launch_sentiment(vader, num_cpus=0.1) for _ in range(2)]
url = deploying.result()
with urllib.request.urlopen(url + "/v1/health", timeout=60) as response:
    health = {"http": response.status, **json.loads(response.read())}
deployments = serve.status().applications[APP_NAME].deployments
replicas = {
    name: serve_actors(f"SERVE_REPLICA::{APP_NAME}#{name}#") for name in (INGRESS, LLM_DEPLOYMENT)
}
print(json.dumps({
    "head": ray.get_runtime_context().get_node_id(),
    "gpu": gpu.node_id,
    "cpu": cpu.node_id,
    "servers": [info.node_id for info in swarm.status()],
    "scorers": [node_of(h) for h in scorers],
    "running": {name: deployments[name].replica_states.get("RUNNING", 0) for name in replicas},
    "replicas": {name: [node_of(h) for h in handles] for name, handles in replicas.items()},
    "replica_ha_proxy": [ha_proxy_env(h) for handles in replicas.values() for h in handles],
    "proxies": sorted(node_of(h) for h in serve_actors("SERVE_PROXY_ACTOR")),
    "health": health,
}))
swarm.shutdown()
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.integration
def test_block_servers_stream_actors_and_api_go_to_their_node_types(tmp_path: Path) -> None:
    tiny = tiny_causal_lm(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=420,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    gpu, cpu = placed["gpu"], placed["cpu"]
    assert placed["servers"] == [gpu] * 4
    assert placed["scorers"] == [cpu] * 2
    # Every replica of the API's ingress and of its LLM deployment runs on the stream node,
    # with Serve's HAProxy switched on there, and Serve runs nothing on the GPU node.
    assert placed["running"] == {"api": 1, "llm": 1}
    assert placed["replicas"] == {"api": [cpu], "llm": [cpu]}
    assert placed["replica_ha_proxy"] == ["1", "1"]
    assert placed["head"] in placed["proxies"]  # the HTTP entry point clients use
    assert gpu not in placed["proxies"]
    # And the API answers over HTTP through it, without a key on /v1/health.
    health = placed["health"]
    assert health["http"] == 200
    assert health["components"]["ledger"]["status"] == "ok"
    assert health["components"]["llm"]["status"] == "ok"  # it found the swarm
    assert health["components"]["model"]["status"] == "absent"  # none trained here


def _env() -> dict[str, str]:
    # A cluster of its own: not the address of any Ray this process may know of. With
    # SERVE_ENV, as on a cluster.yaml node. HAProxy's stats and metrics listeners default
    # to fixed ports (8404, 9101): free ones here, which no other Serve on this machine holds.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ports = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
    return env | SERVE_ENV | {key: str(free_port()) for key in ports}


def test_one_machine_asks_for_nothing_unless_told(
    ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert placement("block_server") == {}
    assert placement("stream") == {}
    monkeypatch.setenv("RAYFIN_RAY__PLACEMENT", "markers")
    reload_settings()
    try:
        assert placement("block_server") == {"rayfin_block_server": MARKER}
        with pytest.raises(ValueError, match="unknown actor role"):
            placement("gpu")
    finally:
        monkeypatch.delenv("RAYFIN_RAY__PLACEMENT")
        reload_settings()
    assert placement("stream") == {}
