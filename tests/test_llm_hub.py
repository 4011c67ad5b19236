"""The adapter hub: versions, aliases, base-model checks, S3, the CLI; and base model hashes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from rayfin.cli import app
from rayfin.errors import (
    AdapterHubError,
    AdapterMismatchError,
    AdapterNotFoundError,
    LLMError,
    ModelAssetError,
)
from rayfin.llm.hub import (
    HASH_FILE,
    AdapterCard,
    AdapterHub,
    _folder_hash,
    _hash_files,
    base_model_hash,
)
from rayfin.testing import S3Server, tiny_causal_lm

BASE_HASH = "ab" * 32
LORA = {"kind": "lora", "rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj")}


def lora_tensors(seed: int) -> dict[str, torch.Tensor]:
    """LoRA-shaped tensors of several dtypes, one of them a non-contiguous view."""
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(16, 4, generator=generator)
    return {
        "blocks.0.q_proj.lora_A": torch.randn(4, 16, generator=generator),
        "blocks.0.q_proj.lora_B": b.t(),  # a transposed view: not contiguous
        "blocks.1.v_proj.lora_A": torch.randn(4, 16, generator=generator).to(torch.bfloat16),
        "head.weight": torch.randn(3, 16, generator=generator, dtype=torch.float64),
    }


def save(hub: AdapterHub, name: str, seed: int, **fields: Any) -> AdapterCard:
    settings = {**LORA, "base_model": "smollm2-135m", "base_model_hash": BASE_HASH} | fields
    return hub.save(name, lora_tensors(seed), **settings)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor), key  # bit-equal, not merely close


@pytest.fixture
def hub(tmp_path: Path) -> AdapterHub:
    return AdapterHub(str(tmp_path / "hub"))


# -- saving, listing, loading --------------------------------------------------------------


def test_save_and_load_round_trip(hub: AdapterHub) -> None:
    tensors = lora_tensors(1)
    card = hub.save(
        "sentiment",
        tensors,
        **LORA,
        base_model="smollm2-135m",
        base_model_hash=BASE_HASH,
        task="classification",
        labels=["down", "flat", "up"],
        training_data_fingerprint="f" * 64,
        metrics={"accuracy": 0.75, "loss": torch.tensor(0.5).item()},
        extra={"steps": 100, "optimizer": {"name": "adamw", "lr": 1e-4}},
    )
    tensors["head.weight"].zero_()  # what was saved is a copy
    assert card.version == 1
    assert card.path == f"{hub.root}/sentiment/v000001"
    assert card.tensor_names == tuple(sorted(tensors))
    assert card.num_parameters == 4 * 16 * 3 + 3 * 16
    assert card.labels == ("down", "flat", "up")
    assert card.target_modules == ("q_proj", "v_proj")
    assert card.metrics == {"accuracy": 0.75, "loss": 0.5}
    assert card.created_at.endswith("+00:00")
    loaded, again = hub.load("sentiment")
    assert again == card
    assert_same(loaded, lora_tensors(1))
    # On disk: the tensors and the card, nothing staged left behind.
    folder = Path(hub.base) / "sentiment"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "v000001"]
    assert sorted(p.name for p in (folder / "v000001").iterdir()) == [
        "adapter.safetensors",
        "card.json",
    ]
    data = json.loads((folder / "v000001" / "card.json").read_text())
    assert AdapterCard.from_dict(data) == card
    assert data["extra"] == {"steps": 100, "optimizer": {"name": "adamw", "lr": 1e-4}}


def test_versions_increment_and_list_shows_the_latest(hub: AdapterHub) -> None:
    assert hub.list() == []
    first = save(hub, "a", 1)
    second = save(hub, "a", 2, metrics={"loss": 0.1})
    prompt = hub.save(
        "b",
        {"prompt": torch.randn(8, 16)},
        kind="prompt",
        num_virtual_tokens=8,
        base_model="smollm2-135m",
        base_model_hash=BASE_HASH,
    )
    assert (first.version, second.version, prompt.version) == (1, 2, 1)
    assert hub.versions("a") == [first, second]
    assert hub.list() == [second, prompt]
    assert hub.names() == ["a", "b"]
    assert hub.card("a") == second
    assert hub.card("a", 1) == hub.card("a", "1") == first
    assert_same(hub.load("a", 1)[0], lora_tensors(1))
    assert_same(hub.load("a", 2)[0], lora_tensors(2))
    assert prompt.num_virtual_tokens == 8
    assert prompt.rank is None


def test_concurrent_saves_take_distinct_versions(hub: AdapterHub) -> None:
    barrier = threading.Barrier(8)
    cards: dict[int, AdapterCard] = {}

    def writer(seed: int) -> None:
        barrier.wait()
        cards[seed] = save(AdapterHub(hub.root), "shared", seed, extra={"seed": seed})

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(card.version for card in cards.values()) == list(range(1, 9))
    for seed, card in cards.items():  # each version holds its own writer's tensors
        tensors, stored = hub.load("shared", card.version)
        assert stored.extra == {"seed": seed}
        assert_same(tensors, lora_tensors(seed))


def test_an_uncommitted_version_is_invisible_and_its_number_not_reused(
    hub: AdapterHub,
) -> None:
    save(hub, "a", 1)
    partial = Path(hub.base) / "a" / "v000002"  # a crashed writer's leftovers: no card
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"partial")
    assert [c.version for c in hub.versions("a")] == [1]
    assert hub.card("a").version == 1
    assert save(hub, "a", 3).version == 3


# -- aliases and lookups ---------------------------------------------------------------------


def test_aliases(hub: AdapterHub) -> None:
    save(hub, "a", 1)
    save(hub, "a", 2)
    assert hub.aliases("a") == {}
    assert hub.set_alias("a", "production", 1).version == 1
    hub.set_alias("a", "staging", "production")  # an alias may name the version
    assert hub.aliases("a") == {"production": 1, "staging": 1}
    assert hub.card("a", "production").version == 1
    assert_same(hub.load("a", "production")[0], lora_tensors(1))
    hub.set_alias("a", "production", 2)
    assert hub.aliases("a") == {"production": 2, "staging": 1}
    assert hub.load("a", "production")[1].version == 2
    with pytest.raises(AdapterNotFoundError, match=r"no alias 'canary' \(aliases: production"):
        hub.card("a", "canary")
    with pytest.raises(AdapterHubError, match="alias must start with a letter"):
        hub.set_alias("a", "1st", 1)
    with pytest.raises(AdapterNotFoundError, match=r"no version 7 \(versions: 1, 2\)"):
        hub.set_alias("a", "production", 7)


def test_unknown_names_and_versions_list_what_exists(hub: AdapterHub) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'a' .*adapters: none"):
        hub.load("a")
    save(hub, "a", 1)
    save(hub, "b", 1)
    for call in (lambda: hub.card("c"), lambda: hub.versions("c"), lambda: hub.load("c", 1)):
        with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'c'.*: a, b\)"):
            call()
    with pytest.raises(AdapterNotFoundError, match=r"'a' has no version 3 \(versions: 1\)"):
        hub.load("a", 3)
    with pytest.raises(AdapterHubError, match="version must be an int >= 1"):
        hub.card("a", 0)
    assert issubclass(AdapterNotFoundError, LookupError)


def test_load_refuses_an_adapter_of_another_base_model(hub: AdapterHub) -> None:
    save(hub, "a", 1)
    other = "cd" * 32
    with pytest.raises(AdapterMismatchError) as caught:
        hub.load("a", base_model_hash=other)
    message = str(caught.value)
    assert "trained on base model 'smollm2-135m'" in message
    assert BASE_HASH in message
    assert other in message
    assert isinstance(caught.value, LLMError)
    tensors, card = hub.load("a", base_model_hash=BASE_HASH)
    assert card.base_model_hash == BASE_HASH
    assert_same(tensors, lora_tensors(1))


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-x", "a b", "x" * 129, 3])
def test_bad_names_are_rejected(hub: AdapterHub, name: Any) -> None:
    with pytest.raises(AdapterHubError, match="adapter name must be letters, digits"):
        save(hub, name, 1)
    assert not Path(hub.base).exists() or not any(Path(hub.base).iterdir())


@pytest.mark.parametrize(
    ("tensors", "fields", "match"),
    [
        ({}, {}, "non-empty mapping"),
        ({"w": [1.0]}, {}, "w is not a dense torch.Tensor"),
        ({"w": torch.eye(3).to_sparse()}, {}, "w is not a dense torch.Tensor"),
        ({"": torch.ones(1)}, {}, "tensor names must be non-empty"),
        ({"w": torch.ones(1)}, {"kind": "ia3"}, "kind must be one of"),
        ({"w": torch.ones(1)}, {"rank": None}, "needs rank >= 1"),
        ({"w": torch.ones(1)}, {"alpha": None}, "needs alpha > 0"),
        ({"w": torch.ones(1)}, {"target_modules": ()}, "needs its target_modules"),
        ({"w": torch.ones(1)}, {"kind": "prompt"}, "needs num_virtual_tokens >= 1"),
        ({"w": torch.ones(1)}, {"task": "classification"}, "classification adapter needs"),
        ({"w": torch.ones(1)}, {"labels": ["up", "up"]}, "labels must be distinct strings"),
        ({"w": torch.ones(1)}, {"metrics": {"loss": "low"}}, "metric 'loss' must be a number"),
        ({"w": torch.ones(1)}, {"extra": {"when": object()}}, "extra must be JSON"),
    ],
)
def test_bad_adapters_are_rejected(
    hub: AdapterHub, tensors: Any, fields: dict[str, Any], match: str
) -> None:
    settings = {**LORA, "base_model": "m", "base_model_hash": BASE_HASH} | fields
    with pytest.raises(AdapterHubError, match=match):
        hub.save("a", tensors, **settings)
    assert hub.names() == []  # a refused save takes no version


# -- base model hashes -----------------------------------------------------------------------


def test_base_model_hash_of_smollm2_is_stable_and_cached() -> None:
    from rayfin.llm.assets import prepare_model

    folder = prepare_model("smollm2-135m")
    _folder_hash.cache_clear()
    first = base_model_hash(folder)
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert base_model_hash(str(folder)) == first
    assert base_model_hash("smollm2-135m") == first  # a catalogue name resolves to it
    assert _folder_hash.cache_info().hits >= 2  # the same process hashes it once
    # A new process reads the hash file instead of 538 MB of weights ...
    saved = json.loads((folder / HASH_FILE).read_text())
    assert saved["sha256"] == first
    _folder_hash.cache_clear()
    assert base_model_hash(folder) == first
    # ... and the hash file agrees with the weights themselves.
    assert _hash_files(folder, ["model.safetensors"]) == first


def test_base_model_hash_follows_the_weights(tmp_path: Path) -> None:
    tiny = tiny_causal_lm(tmp_path / "tiny", seed=0)
    twin = tiny_causal_lm(tmp_path / "twin", seed=0)
    other = tiny_causal_lm(tmp_path / "other", seed=1)
    tiny_hash = base_model_hash(tiny)
    assert base_model_hash(twin) == tiny_hash  # content, not location
    assert base_model_hash(other) != tiny_hash
    from rayfin.llm.assets import model_dir

    assert base_model_hash(model_dir("smollm2-135m")) != tiny_hash
    assert json.loads((tiny / HASH_FILE).read_text())["sha256"] == tiny_hash
    # The transformers version that wrote the config does not matter; the config does.
    config = json.loads((twin / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (twin / "config.json").write_text(json.dumps(config, indent=4))
    assert base_model_hash(twin) == tiny_hash
    config["rms_norm_eps"] = 1e-3
    (twin / "config.json").write_text(json.dumps(config))
    assert base_model_hash(twin) != tiny_hash
    # New weights are noticed, though the saved hash file is still there.
    shutil.copyfile(other / "model.safetensors", tiny / "model.safetensors")  # same size
    assert base_model_hash(tiny) == base_model_hash(other)
    with pytest.raises(ModelAssetError, match="neither a catalogue name nor a model folder"):
        base_model_hash(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelAssetError, match="not a safetensors model folder"):
        base_model_hash(tmp_path / "empty")


def test_save_hashes_the_base_model_it_is_given(hub: AdapterHub, tmp_path: Path) -> None:
    tiny = tiny_causal_lm(tmp_path / "tiny")
    card = hub.save("a", lora_tensors(1), **LORA, base_model=tiny)
    assert card.base_model == str(tiny)
    assert card.base_model_hash == base_model_hash(tiny)
    hub.load("a", base_model_hash=base_model_hash(tiny))
    with pytest.raises(AdapterMismatchError):
        hub.load("a", base_model_hash=base_model_hash(tiny_causal_lm(tmp_path / "b", seed=1)))


# -- S3 and the default location -------------------------------------------------------------


def test_s3_round_trip(s3_server: S3Server) -> None:
    hub = AdapterHub(s3_server.uri("adapter-hub", "team/adapters"))
    assert hub.root == "s3://testing:testing@adapter-hub/team/adapters"
    assert hub.list() == []
    threads = [threading.Thread(target=save, args=(hub, "a", seed)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    save(hub, "b", 4)
    assert [c.version for c in hub.versions("a")] == [1, 2, 3]
    assert [(c.name, c.version) for c in hub.list()] == [("a", 3), ("b", 1)]
    card = hub.set_alias("b", "production", 1)
    assert card.path == f"{hub.root}/b/v000001"
    tensors, loaded = hub.load("b", "production", base_model_hash=BASE_HASH)
    assert loaded == card
    assert_same(tensors, lora_tensors(4))
    # Another client (a fresh hub on the same URI) sees the same.
    assert AdapterHub(s3_server.uri("adapter-hub", "team/adapters")).aliases("b") == {
        "production": 1
    }


def test_default_hub_is_in_the_state_dir(isolated_state: Path) -> None:
    assert AdapterHub().root == str((isolated_state / "adapters").resolve())


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_list_and_show(hub: AdapterHub) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})  # no cell truncated
    result = runner.invoke(app, ["llm", "adapters", "list", "--hub", hub.root])
    assert result.exit_code == 0, result.output
    assert "no adapters" in result.output
    save(hub, "sentiment", 1)
    save(hub, "sentiment", 2)
    save(hub, "ranker", 3)
    hub.set_alias("sentiment", "production", 1)
    result = runner.invoke(app, ["llm", "adapters", "list", "--hub", hub.root])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if "sentiment" in line)
    assert "v2" in row
    assert "lora" in row
    assert "production: v1" in row
    assert any("ranker" in line and "v1" in line for line in lines)
    result = runner.invoke(app, ["llm", "adapters", "list", "--json", "--hub", hub.root])
    assert [c["name"] for c in json.loads(result.output)] == ["ranker", "sentiment"]

    result = runner.invoke(
        app, ["llm", "adapters", "show", "sentiment", "--version", "production", "--hub", hub.root]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["version"] == 1
    assert shown["aliases"] == ["production"]
    assert shown["base_model_hash"] == BASE_HASH
    assert shown["path"] == f"{hub.root}/sentiment/v000001"
    result = runner.invoke(app, ["llm", "adapters", "show", "sentiment", "--hub", hub.root])
    assert json.loads(result.output)["version"] == 2
    result = runner.invoke(app, ["llm", "adapters", "show", "nope", "--hub", hub.root])
    assert result.exit_code == 1
    assert "no adapter named 'nope'" in result.output
    assert "ranker, sentiment" in result.output


def test_cli_uses_the_default_hub(isolated_state: Path) -> None:
    save(AdapterHub(), "mine", 1)
    result = CliRunner().invoke(app, ["llm", "adapters", "list"])
    assert result.exit_code == 0, result.output
    assert "mine" in result.output
