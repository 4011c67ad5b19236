"""The Ray cluster launcher configs (cluster.yaml, cluster.local.yaml) pass Ray's own checks.

``ray up`` does, in order: ``prepare_config`` (merge the provider's defaults.yaml, merge
setup commands, fill per-type min/max workers; for the local provider also synthesize its
single node type), provider-specific resource autodetection and ``validate_config`` (the
JSON schema in ray/autoscaler/ray-schema.json plus cross-field checks), then
``bootstrap_config`` (IAM roles, key pairs, security groups). Only autodetection and
bootstrap talk to the cloud (and need boto3, which is not installed here); ``prepare_config``
and ``validate_config`` are pure, so this test runs exactly those, offline.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
AWS_CONFIG = ROOT / "cluster.yaml"
LOCAL_CONFIG = ROOT / "cluster.local.yaml"


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), f"{path.name} is not a YAML mapping"
    return config


def _ray_check(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's offline part of ``ray up``: prepare, then validate; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def aws() -> dict[str, Any]:
    return _load(AWS_CONFIG)


@pytest.fixture
def local() -> dict[str, Any]:
    return _load(LOCAL_CONFIG)


@pytest.mark.parametrize("path", [AWS_CONFIG, LOCAL_CONFIG], ids=lambda p: p.name)
def test_config_passes_ray_validation(path: Path) -> None:
    prepared = _ray_check(_load(path))
    assert prepared["cluster_name"] == "rayfin"
    # The defaults were merged in (validate_config insists on this field existing).
    assert "cluster_synced_files" in prepared


def test_aws_config_shape(aws: dict[str, Any]) -> None:
    prepared = _ray_check(aws)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["head_node_type"] == "head"
    assert prepared["max_workers"] == 12
    types = prepared["available_node_types"]
    assert set(types) == {"head", "gpu_worker", "cpu_worker"}
    for node_type in types.values():
        node_config = node_type["node_config"]
        assert {"InstanceType", "ImageId", "BlockDeviceMappings"} <= set(node_config)
        assert node_config["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100
    # Per-type caps fit under the global cap.
    assert sum(t["max_workers"] for n, t in types.items() if n != "head") <= 12
    # setup_commands were merged into both head and worker setup, torch first.
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[key]
        torch = next(i for i, c in enumerate(commands) if "pip install torch" in c)
        install = commands.index("pip install -e /home/ubuntu/rayfin")
        assert torch < install
        assert "rayfin models prepare smollm2-135m" in commands


def test_aws_placement_intent(aws: dict[str, Any]) -> None:
    types = _ray_check(aws)["available_node_types"]
    gpu = types["gpu_worker"]["resources"]
    assert gpu.get("GPU", 0) >= 1
    assert gpu.get("rayfin_block_server", 0) >= 1
    assert "rayfin_stream" not in gpu
    cpu = types["cpu_worker"]["resources"]
    assert cpu.get("rayfin_stream", 0) >= 1
    assert cpu.get("GPU", 0) == 0
    assert "rayfin_block_server" not in cpu
    head = types["head"]["resources"]
    assert head.get("rayfin_head") == 1
    assert head.get("GPU", 0) == 0
    assert "rayfin_block_server" not in head
    assert "rayfin_stream" not in head
    assert types["gpu_worker"]["min_workers"] == 0
    assert types["gpu_worker"]["max_workers"] == 4
    assert types["cpu_worker"]["min_workers"] == 1
    assert types["cpu_worker"]["max_workers"] == 8


def test_local_config_shape(local: dict[str, Any]) -> None:
    # The local provider forbids user node types; Ray synthesizes one for all hosts.
    assert "available_node_types" not in local
    assert "head_node_type" not in local
    prepared = _ray_check(local)
    assert prepared["head_node_type"] == LOCAL_CLUSTER_NODE_TYPE
    only = prepared["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]
    assert only["min_workers"] == only["max_workers"] == len(local["provider"]["worker_ips"])
    # So placement markers are set by the start commands themselves.
    head_start = " ".join(local["head_start_ray_commands"])
    assert "--resources='{\"rayfin_head\": 1}'" in head_start
    worker_start = " ".join(local["worker_start_ray_commands"])
    assert "rayfin_block_server" in worker_start
    assert "rayfin_stream" in worker_start
    assert "nvidia-smi" in worker_start
    assert "RAYFIN_NODE_RESOURCES" in worker_start


def test_both_configs_share_setup_and_start(aws: dict[str, Any], local: dict[str, Any]) -> None:
    assert aws["setup_commands"] == local["setup_commands"]
    assert aws["head_start_ray_commands"] == local["head_start_ray_commands"]
    assert aws["file_mounts"] == local["file_mounts"] == {"/home/ubuntu/rayfin": "."}
    for config in (aws, local):
        assert {".venv", ".git", "__pycache__"} <= set(config["rsync_exclude"])


# Validation must bite: each broken variant has to be rejected by Ray itself.


def test_unknown_top_level_key_is_rejected(aws: dict[str, Any], local: dict[str, Any]) -> None:
    for config in (aws, local):
        config["max_wrokers"] = 3
        with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
            _ray_check(config)


def test_missing_head_node_type_is_rejected(aws: dict[str, Any]) -> None:
    # prepare_config fills in AWS's default "ray.head.default", which is not one of our node
    # types, so validate_config rejects it.
    del aws["head_node_type"]
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_check(aws)


def test_unknown_head_node_type_is_rejected(aws: dict[str, Any]) -> None:
    aws["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_check(aws)


def test_node_type_without_resources_is_rejected(aws: dict[str, Any]) -> None:
    del aws["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        _ray_check(aws)


def test_fractional_custom_resource_is_rejected(aws: dict[str, Any]) -> None:
    # The schema only allows whole-number resources per node type.
    aws["available_node_types"]["cpu_worker"]["resources"]["rayfin_stream"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        _ray_check(aws)


def test_min_workers_over_global_max_is_rejected(aws: dict[str, Any]) -> None:
    aws["available_node_types"]["cpu_worker"]["min_workers"] = 13
    with pytest.raises(ValueError, match="max_workers"):
        _ray_check(aws)


def test_local_provider_rejects_node_types(local: dict[str, Any]) -> None:
    local["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="available_node_types"):
        _ray_check(local)
