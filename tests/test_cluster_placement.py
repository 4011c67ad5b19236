"""Actors land on the node type meant for them: block servers on nodes marked
``rayfin_block_server`` (GPU workers in cluster.yaml), stream actors on ``rayfin_stream``
nodes, on a real multi-node ``ray.cluster_utils.Cluster``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayfin.cluster import MARKER, placement
from rayfin.config import reload_settings
from rayfin.testing import tiny_causal_lm

# Runs in its own process: the test session's Ray is a single local node.
SCRIPT = r"""
import functools, json, sys
import ray
from ray.cluster_utils import Cluster
from rayfin.actors.sentiment import launch_sentiment
from rayfin.llm import launch_swarm
from rayfin.sentiment.factory import make_scorer

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

swarm = launch_swarm(sys.argv[1], name="placed", num_stages=2, replicas=2, num_cpus=0.1)
vader = functools.partial(make_scorer, "vader")
scorers = [launch_sentiment(vader, num_cpus=0.1) for _ in range(2)]
print(json.dumps({
    "gpu": gpu.node_id,
    "cpu": cpu.node_id,
    "servers": [info.node_id for info in swarm.status()],
    "scorers": [node_of(h) for h in scorers],
}))
swarm.shutdown()
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.integration
def test_block_servers_and_stream_actors_go_to_their_node_types(tmp_path: Path) -> None:
    tiny = tiny_causal_lm(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert placed["servers"] == [placed["gpu"]] * 4
    assert placed["scorers"] == [placed["cpu"]] * 2


def _env() -> dict[str, str]:
    import os

    # A cluster of its own: not the address of any Ray this process may know of.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


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
