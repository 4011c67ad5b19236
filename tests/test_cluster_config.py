"""The Ray cluster launcher configs (cluster.yaml, cluster.local.yaml) pass Ray's own checks.

``ray up`` does, in order: ``prepare_config`` (merge the provider's defaults.yaml, merge
setup commands, fill per-type min/max workers; for the local provider also synthesize its
single node type), provider-specific resource autodetection and ``validate_config`` (the
JSON schema in ray/autoscaler/ray-schema.json plus cross-field checks), then
``bootstrap_config`` (IAM roles, key pairs, security groups). Only autodetection and
bootstrap talk to the cloud (and need boto3, which is not installed here); ``prepare_config``
and ``validate_config`` are pure, so this test runs exactly those, offline.

The shell commands that start rayfin's services on the head are checked here too: their
order, their ``rayfin`` invocations against the real command line (every option must
exist), and the lines that write ``~/.bashrc`` or start and stop the pipeline, run by bash
in a scratch home with a stand-in ``rayfin``.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import typer.core
import typer.main
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config

from rayfin.cli import app as rayfin_app
from rayfin.cluster import SERVE_ENV
from rayfin.config import ServeSettings, reload_settings
from rayfin.serve.app import ApiOptions
from rayfin.serve.auth import digest, new_key
from rayfin.trading.registry import ModelRegistry

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
    # The head's settings too; only AWS needs boto3 (its autoscaler launches EC2 nodes).
    assert [c for c in aws["head_setup_commands"] if c != "pip install boto3"] == local[
        "head_setup_commands"
    ]
    assert aws["file_mounts"] == local["file_mounts"] == {"/home/ubuntu/rayfin": "."}
    for config in (aws, local):
        assert {".venv", ".git", "__pycache__"} <= set(config["rsync_exclude"])


# The services the head starts: the API, the SmolLM2 swarm, a first model, the pipeline.

PUNCTUATION = set("();<>|&")


def _index(commands: list[str], needle: str) -> int:
    found = [i for i, c in enumerate(commands) if needle in c]
    assert found, f"no command contains {needle!r}"
    return found[0]


def _tokens(command: str) -> list[str]:
    """A shell command's words, with operators (``;``, ``||``, ``>``, ``$(`` ...) apart."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _rayfin_calls(command: str) -> list[list[str]]:
    """The arguments of every ``rayfin`` invocation in a shell command."""
    tokens = _tokens(command)
    calls = []
    for i, token in enumerate(tokens):
        if token == "rayfin":
            args = []
            for arg in tokens[i + 1 :]:
                if set(arg) <= PUNCTUATION:
                    break
                args.append(arg)
            calls.append(args)
    return calls


def _call(commands: list[str], *names: str) -> list[str]:
    """The arguments of the one ``rayfin NAMES ...`` invocation among ``commands``."""
    (args,) = [a for c in commands for a in _rayfin_calls(c) if tuple(a[: len(names)]) == names]
    return args


def _python_snippets(command: str) -> list[str]:
    tokens = _tokens(command)
    return [
        tokens[i + 2] for i, t in enumerate(tokens[:-2]) if t == "python" and tokens[i + 1] == "-c"
    ]


def _parse(args: list[str]) -> Any:
    """Parse ``rayfin ARGS`` with the real command line (typer's click), running nothing:
    an unknown command or option, or an invalid value, raises a usage error."""
    command: Any = typer.main.get_command(rayfin_app)
    names = list(args)
    while isinstance(command, typer.core.TyperGroup):
        name = names.pop(0)
        found = command.get_command(command.make_context("rayfin", [name]), name)
        assert found is not None, f"rayfin has no command {name!r} (in {args})"
        command = found
    return command.make_context(command.name, names)


def test_head_starts_the_services_after_the_broker(aws: dict[str, Any]) -> None:
    commands = aws["head_start_ray_commands"]
    order = [
        _index(commands, "rayfin-consume.pid"),  # stop the pipeline of an earlier `ray up`
        commands.index("ray stop"),
        _index(commands, "ray start --head"),
        _index(commands, "rayfin broker start"),
        _index(commands, "rayfin serve start"),
        _index(commands, "rayfin llm serve"),
        _index(commands, "rayfin train"),
        _index(commands, "ensure_topics"),
        _index(commands, "rayfin consume"),
    ]
    assert order == sorted(set(order)), order
    api = _parse(_call(commands, "serve", "start")).params
    assert (api["detach"], api["host"], api["port"], api["llm"]) == (True, "0.0.0.0", 8000, True)
    swarm = _parse(_call(commands, "llm", "serve")).params
    assert (swarm["model"], swarm["stages"], swarm["detach"]) == ("smollm2-135m", 3, True)
    assert swarm["name"] == ServeSettings().swarm  # the swarm the API's LLM routes use
    # No GPU node is up when the swarm starts, so its servers' GPU share is given (else
    # they take none), and all of them fit on one gpu_worker; the wait covers that node's
    # boot and setup, in one plain command (no retry loop around it).
    gpus = aws["available_node_types"]["gpu_worker"]["resources"]["GPU"]
    assert swarm["num_gpus"], "no --num-gpus: the servers would take no GPU"
    assert swarm["num_gpus"] * swarm["stages"] * swarm["replicas"] <= gpus
    assert swarm["timeout"] >= 1800
    assert commands[_index(commands, "rayfin llm serve")].startswith("rayfin llm serve ")
    pipeline = _parse(_call(commands, "consume")).params
    assert pipeline["trade"]
    assert pipeline["sentiment"] == "llm"
    assert pipeline["swarm"] == swarm["name"]
    assert pipeline["model"] is None  # the trading.model setting's production version
    # Train only when the registry has no production model: `check || rayfin train`.
    train = commands[_index(commands, "rayfin train")]
    assert "|| rayfin train" in train
    assert '.get("market", "production")' in train
    assert _parse(_call(commands, "train")).params["promote"]
    # The registry and the ledger come from the head's settings, resolved by rayfin itself
    # (see test_the_head_commands_share_one_registry_and_ledger): nothing passes them, and
    # no command reads a setting with a `$(python -c ...)` of its own.
    assert _parse(_call(commands, "train")).params["registry"] is None
    assert (pipeline["registry"], pipeline["ledger"]) == (None, None)
    assert not [c for c in commands if "$(python" in c or "get_settings().serve" in c]
    # The pipeline runs in the background, logged, with its pid kept for the next start.
    start = commands[_index(commands, "rayfin consume")]
    assert "nohup rayfin consume" in start
    assert "> ~/rayfin-consume.log 2>&1 < /dev/null &" in start
    assert start.endswith("echo $! > ~/rayfin-consume.pid")


@pytest.mark.parametrize("path", [AWS_CONFIG, LOCAL_CONFIG], ids=lambda p: p.name)
def test_every_rayfin_call_parses(path: Path) -> None:
    config = _load(path)
    commands = [*config["setup_commands"], *config["head_setup_commands"]]
    commands += config["head_start_ray_commands"]
    calls = [args for c in commands for args in _rayfin_calls(c)]
    assert len(calls) == 6  # models, broker, serve, llm, train, consume
    for args in calls:
        _parse(args)
    for command in commands:
        for snippet in _python_snippets(command):
            compile(snippet, "python -c", "exec")
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)


def test_the_command_line_check_bites() -> None:
    with pytest.raises(Exception, match="No such option: --num-gpu"):
        _parse(["llm", "serve", "--num-gpu", "1"])
    with pytest.raises(AssertionError, match="rayfin has no command 'registry'"):
        _parse(["registry", "list"])
    with pytest.raises(Exception, match="greater than or equal to 1"):
        _parse(["llm", "serve", "--stages", "0"])
    with pytest.raises(Exception, match="greater than or equal to 0"):
        _parse(["llm", "serve", "--num-gpus", "-1"])


def _bash(command: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a config's command as Ray does (bash, ~/.bashrc sourced), in a scratch home."""
    environ = {**os.environ, "HOME": str(home), **env}
    script = f"test -f ~/.bashrc && source ~/.bashrc\n{command}"
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=environ, timeout=120
    )


def _bashrc_env(home: Path) -> dict[str, str]:
    done = _bash("env -0", home)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.split("\0") if "=" in line)


def test_every_node_exports_serve_env_before_ray_start(aws: dict[str, Any], tmp_path: Path) -> None:
    # Setup commands run before the start commands on every node, head and workers.
    prepared = _ray_check(aws)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("RAY_SERVE_ENABLE_HA_PROXY" in c for c in prepared[key]), key
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert not any("RAY_SERVE_" in c for c in aws[key]), key
    # Run the setup lines that write ~/.bashrc (twice: `ray up` reruns them), less the venv.
    lines = [c for c in aws["setup_commands"] if "~/.bashrc" in c and "rayfin-venv" not in c]
    home = tmp_path / "home"
    home.mkdir()
    for _ in range(2):
        for line in lines:
            assert _bash(line, home).returncode == 0
    env = _bashrc_env(home)
    assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV
    assert (home / ".bashrc").read_text().count("RAY_SERVE_ENABLE_HA_PROXY") == 1


def test_head_settings(aws: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    lines = [c for c in aws["head_setup_commands"] if "~/.bashrc" in c]
    for _ in range(2):
        for line in lines:
            done = _bash(line, home)
            assert done.returncode == 0, done.stderr
    env = _bashrc_env(home)
    assert env["RAYFIN_RAY__ADDRESS"] == "auto"  # every rayfin command joins the cluster
    assert env["RAYFIN_RAY__PLACEMENT"] == "markers"  # ... and asks for its node type
    # The broker is advertised at the head's first address (`hostname -I`, Linux).
    assert env["RAYFIN_BROKER__HOST"] == "0.0.0.0"
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True)
    if addresses.returncode == 0 and addresses.stdout.split():
        assert env["RAYFIN_BROKER__ADVERTISED_HOST"] == addresses.stdout.split()[0]
    # The API keys: digests only, and a placeholder that refuses to run until replaced.
    keys = json.loads(env["RAYFIN_SERVE__API_KEYS"])
    assert [(k["name"], k["role"], set(k)) for k in keys] == [
        ("ops", "trade", {"name", "role", "sha256"})
    ]
    assert "PLACEHOLDER" in keys[0]["sha256"]
    with pytest.raises(ValidationError, match="sha256"):
        ServeSettings(api_keys=keys)
    keys[0]["sha256"] = digest(new_key())
    assert ServeSettings(api_keys=keys).api_keys[0].role == "trade"
    assert (home / ".bashrc").read_text().count("RAYFIN_SERVE__API_KEYS") == 1


def test_aws_opens_the_api_port_to_a_placeholder_range(aws: dict[str, Any]) -> None:
    rules = _ray_check(aws)["provider"]["security_group"]["IpPermissions"]
    (api,) = [r for r in rules if r["FromPort"] == 8000]
    assert (api["ToPort"], api["IpProtocol"]) == (8000, "tcp")
    assert [r["CidrIp"] for r in api["IpRanges"]] == ["203.0.113.0/24"]  # TEST-NET-3


STUB = """#!/usr/bin/env bash
# A stand-in for rayfin: records its arguments, and stops on SIGTERM like `rayfin consume`.
echo "$@" >> "$HOME/rayfin-calls"
if [ "$1" = consume ]; then
  trap 'echo stopped-by-TERM >> "$HOME/rayfin-calls"; exit 0' TERM
  while true; do sleep 0.1; done
fi
"""


def test_first_model_and_pipeline_lines_run(aws: dict[str, Any], tmp_path: Path) -> None:
    commands = aws["head_start_ray_commands"]
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rayfin").write_text(STUB)
    (bin_dir / "rayfin").chmod(0o755)
    # `python` is this interpreter (with rayfin); `rayfin` is the stand-in. The registry is
    # the head's setting (a line in its ~/.bashrc would export it).
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    registry = str(tmp_path / "registry")
    env = {"PATH": path, "RAYFIN_TRADING__REGISTRY": registry}
    calls = home / "rayfin-calls"

    # No production model in the (empty) registry: the check fails, so it trains.
    train = commands[_index(commands, "rayfin train")]
    done = _bash(train.replace(" 2>/dev/null", ""), home, **env)
    assert done.returncode == 0, done.stderr
    assert "ModelNotFoundError" in done.stderr  # the check ran, and found no model
    assert registry in done.stderr  # ... in trading.registry
    assert calls.read_text().splitlines() == ["train"]
    calls.unlink()
    # With a production model (a tiny real one) in trading.registry, nothing is trained.
    _promote_a_model(registry)
    done = _bash(train, home, **env)
    assert done.returncode == 0, done.stderr
    assert not calls.exists()

    # The pipeline starts in the background (a job without job control, so one that
    # ignores SIGINT) and the next `ray up` stops it with SIGTERM.
    done = _bash(commands[_index(commands, "rayfin consume")], home, **env)
    assert done.returncode == 0, done.stderr
    pid = int((home / "rayfin-consume.pid").read_text())
    try:
        assert (home / "rayfin-consume.log").exists()
        _wait_for_lines(calls, 1)
        assert calls.read_text().splitlines() == [
            "consume --consumers 2 --trade --default-tick-size 0.01 --sentiment llm"
        ]
        # (Some containers never reap orphans, so the stopped stand-in stays a zombie that
        # `kill -0` still finds: the wait for it is cut to 3 s here.)
        stop = commands[_index(commands, "rayfin-consume.pid")].replace("seq 30", "seq 3")
        done = _bash(stop, home, **env)
        assert done.returncode == 0, done.stderr
        _wait_for_lines(calls, 2)
        assert calls.read_text().splitlines()[-1] == "stopped-by-TERM"
        assert not (home / "rayfin-consume.pid").exists()
    finally:
        if "stopped-by-TERM" not in calls.read_text():  # still running: the stand-in we started
            os.kill(pid, signal.SIGKILL)


def test_the_head_commands_share_one_registry_and_ledger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What the start commands rely on, now that they pass neither: the first-model check
    # and `rayfin train` (ModelRegistry()), `rayfin consume` (its model: ModelRegistry())
    # and the API (its options, built by `rayfin serve start` on the head) resolve the
    # registry and the ledger from the same settings. (`rayfin consume` hands its trader
    # --ledger, else database.url.)
    registry, ledger = str(tmp_path / "registry"), f"sqlite:///{tmp_path}/ledger.db"
    monkeypatch.setenv("RAYFIN_TRADING__REGISTRY", registry)
    monkeypatch.setenv("RAYFIN_DATABASE__URL", ledger)
    settings = reload_settings()
    assert (settings.trading.registry, settings.database.url) == (registry, ledger)
    assert ModelRegistry().root == registry
    api = ApiOptions.from_settings(settings)
    assert (api.registry, api.ledger_url, api.model) == (registry, ledger, "market")


def _promote_a_model(root: str) -> None:
    """Register a tiny real LightGBM model as ``market`` and promote it."""
    import lightgbm
    import numpy as np

    from rayfin.trading.labels import LabelSpec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1))
    y = (x[:, 0] > 0.5).astype(int) + (x[:, 0] > -0.5).astype(int)
    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 4, "verbosity": -1}
    booster = lightgbm.train(params, lightgbm.Dataset(x, y, feature_name=["ret_1"]), 5)
    registry = ModelRegistry(root)
    version = registry.register(
        booster,
        name="market",
        features=["ret_1"],
        label_spec=LabelSpec(horizon_seconds=30, threshold=0.5),
        fingerprint="0" * 64,
    )
    registry.promote("market", version.version)


def _wait_for_lines(path: Path, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines")


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
