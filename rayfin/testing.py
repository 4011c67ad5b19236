"""pytest fixtures for code built on rayfin: a real Kafka broker and a real local Ray.

Enable them with ``pytest_plugins = ["rayfin.testing"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rayfin.errors import BrokerError
from rayfin.stream.broker import EmbeddedBroker, free_port

TINY_VOCAB = 128


def tiny_causal_lm(
    path: Path, *, family: str = "llama", layers: int = 4, seed: int = 0, **overrides: object
) -> Path:
    """Save a randomly initialised causal LM of a real architecture, small enough for unit
    tests, with a word-level tokenizer over its vocabulary (``w0`` .. ``w127``).

    ``family`` is ``llama`` (SmolLM2's architecture), ``qwen2`` or ``qwen3``.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    settings: dict[str, object] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    config = AutoConfig.for_model(family, **(settings | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random biases, where the family has them, so that tests see them carried over.
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, "w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return path


def start_test_broker(state_dir: Path) -> EmbeddedBroker:
    """An embedded broker on a free port; retried because a free port can be taken
    between the moment the OS hands it out and tansu binding it."""
    last: BrokerError | None = None
    for _ in range(3):
        broker = EmbeddedBroker(port=free_port(), state_dir=state_dir)
        try:
            broker.start()
            return broker
        except BrokerError as exc:
            last = exc
    assert last is not None
    raise last


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A tansu broker for the whole session; use ``.bootstrap_servers`` to connect.

    Tests share it, so each should use its own topic and group names.
    """
    broker = start_test_broker(tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance for the session (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
