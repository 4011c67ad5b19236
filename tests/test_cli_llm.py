"""``rayfin llm``: serve, status, generate and stop, run as a user runs them, on a real
Ray head of this module's own (so the session's ``ray_local`` is left alone)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayfin.stream.broker import free_port

pytestmark = pytest.mark.integration

NUM_LAYERS = 4


def rayfin(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as ``python -m rayfin``."""
    return subprocess.run(
        [sys.executable, "-m", "rayfin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama with a word-level tokenizer over ``w0`` .. ``w127``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        # No end-of-sequence token, so generation always makes max_new_tokens tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 0}, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass  # gone already
    return pids


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A Ray head of its own (own ports, temp dir and session); yields the CLI's env.

    ``ray stop`` would stop every Ray on the machine, so the head runs with ``--block``
    as the leader of a new session, and teardown kills that session's processes only
    (workers leave the head's process group, but not its session).
    """
    ray_bin = Path(sys.executable).parent / "ray"
    # Short: Ray's unix socket paths under it must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp"))
    log = temp_dir / "head.log"
    port = free_port()
    # Token authentication is on for `ray start` whenever ~/.ray/auth_token exists (any
    # local ray.init() writes one), and a driver given an explicit address does not send
    # it unless told to; pin the mode so the test does not depend on that file.
    auth = {"RAY_AUTH_MODE": "disabled"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYFIN_", "RAY_"))}
    env.update(auth)
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                str(ray_bin), "start", "--head", "--block",
                "--num-cpus", "4",
                "--port", str(port),
                "--ray-client-server-port", str(free_port()),
                "--temp-dir", str(temp_dir),
                "--disable-usage-stats",
                "--include-dashboard=false",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"RAYFIN_RAY__ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        for pid in _session_pids(head.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _session_pids(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _session_pids(head.pid), "Ray processes outlived the test head"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _status(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return rayfin("llm", "status", "--name", name, "--json", env=env)


def test_detached_swarm_serves_status_and_generate(
    ray_head: dict[str, str], tiny_model: Path
) -> None:
    served = rayfin(
        "llm", "serve", str(tiny_model), "--name", "t", "--stages", "2", "--detach",
        "--num-cpus", "0.25", "--cache-mb", "16", env=ray_head,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    for expected in ("t-s0-r0", "t-s1-r0", "[0, 2)", "[2, 4)"):
        assert expected in served.stdout
    assert "rayfin llm generate" in served.stdout
    try:
        status = _status("t", ray_head)
        assert status.returncode == 0, status.stderr
        servers = json.loads(status.stdout)
        assert [(s["start"], s["end"]) for s in servers] == [(0, 2), (2, 4)]
        assert all(s["answered"] for s in servers)
        assert all(s["cache_capacity_bytes"] == 16 << 20 for s in servers)

        table = rayfin("llm", "status", "--name", "t", env=ray_head)
        assert table.returncode == 0, table.stderr
        assert "4 blocks, 2 server(s)" in table.stdout
        assert table.stdout.count("yes") == 2

        out = rayfin(
            "llm", "generate", "w1 w2 w3", "--name", "t", "--model", str(tiny_model),
            "--max-new-tokens", "5", "--no-chat", env=ray_head,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        assert len(words) == 5, out.stdout
        assert all(re.fullmatch(r"w\d+", w) for w in words), out.stdout
        # Without --model, the client loads the swarm's model.
        too_long = rayfin(
            "llm", "generate", "w1 " * 40, "--name", "t", "--max-new-tokens", "40",
            "--no-chat", env=ray_head,
        )  # fmt: skip
        assert too_long.returncode == 1
        assert "exceed the model's 64 positions" in too_long.stderr
        assert "Traceback" not in too_long.stderr

        clash = rayfin("llm", "serve", str(tiny_model), "--name", "t", "--detach", env=ray_head)
        assert clash.returncode == 1
        assert "already running" in clash.stderr
    finally:
        stopped = rayfin("llm", "stop", "--name", "t", env=ray_head)
    assert stopped.returncode == 0, stopped.stderr
    assert _status("t", ray_head).returncode == 1


def test_foreground_serve_stops_on_ctrl_c(
    ray_head: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    out_file, err_file = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_file.open("w") as out, err_file.open("w") as err:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "rayfin", "llm", "serve", str(tiny_model),
                "--name", "fg", "--num-cpus", "0.25", "--cache-mb", "16",
            ],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **ray_head, "COLUMNS": "200"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "press Ctrl-C" not in out_file.read_text():
            assert server.poll() is None, err_file.read_text()
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.3)
        status = _status("fg", ray_head)
        assert status.returncode == 0, status.stderr
        assert [s["server_id"] for s in json.loads(status.stdout)] == ["fg-s0-r0"]
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0, err_file.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "stopped" in out_file.read_text()
    gone = _status("fg", ray_head)
    assert gone.returncode == 1
    assert "no swarm named 'fg'" in gone.stderr


def test_clean_errors(ray_head: dict[str, str], tiny_model: Path) -> None:
    unknown = rayfin("llm", "status", "--name", "nope", env=ray_head)
    assert unknown.returncode == 1
    assert "no swarm named 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    generate = rayfin("llm", "generate", "w1", "--name", "nope", env=ray_head)
    assert generate.returncode == 1
    assert "no swarm named 'nope'" in generate.stderr

    local = rayfin("llm", "serve", str(tiny_model), "--detach")
    assert local.returncode == 1
    assert "ray start --head" in local.stderr

    nobody = rayfin("llm", "status", env={"RAYFIN_RAY__ADDRESS": f"127.0.0.1:{free_port()}"})
    assert nobody.returncode == 1
    assert "no Ray cluster answers" in nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_llm_help_lists_the_commands() -> None:
    result = rayfin("llm", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "status", "generate", "stop"):
        assert command in result.stdout
    assert "llm" in rayfin("--help").stdout
