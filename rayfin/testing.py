"""pytest fixtures for code built on rayfin: a real Kafka broker and a real local Ray.

Enable them with ``pytest_plugins = ["rayfin.testing"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class S3Server:
    """A local S3-compatible endpoint (moto's server) for the code paths that take an
    ``s3://`` URI: the stream archive and the model registry."""

    endpoint: str  # host:port

    def uri(self, bucket: str, path: str = "") -> str:
        """An ``s3://`` URI that pyarrow (and so rayfin) resolves against this server,
        credentials and options included, so Ray workers need no environment."""
        options = (
            f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
            "&allow_bucket_creation=true"
        )
        return f"s3://testing:testing@{bucket}/{path}?{options}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port, for the session (tests use their own buckets)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(f"127.0.0.1:{port}")
    server.stop()


_metrics_port: int | None = None


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance for the session (2 CPUs, no dashboard), exporting its metrics
    for Prometheus every second (see :func:`ray_metrics_url`)."""
    import ray

    from rayfin.cluster import apply_local_env

    global _metrics_port
    _metrics_port = free_port()
    apply_local_env()  # Serve as rayfin runs it: behind HAProxy
    ray.init(
        address="local",  # never a `ray start` cluster that happens to run here
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=_metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield
    ray.shutdown()
    _metrics_port = None


@pytest.fixture
def ray_metrics_url(ray_local: None) -> str:
    """The Prometheus endpoint of :func:`ray_local`'s node."""
    assert _metrics_port is not None
    return f"http://127.0.0.1:{_metrics_port}/metrics"


POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
"""The local PostgreSQL the database tests use (trust auth, database ``test``)."""


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """The name of a schema of the test's own in the local PostgreSQL (:data:`POSTGRES_URL`),
    for code that takes a ``schema`` and creates it on first use; dropped, with everything
    in it, afterwards. Skips the test when PostgreSQL is not reachable."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    url = POSTGRES_URL
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL at {url} is not reachable: {str(exc.orig).strip()}")
    schema = f"t_{uuid.uuid4().hex}"
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def postgres_ledger(postgres_schema: str) -> Iterator[Any]:
    """A trading :class:`~rayfin.trading.ledger.Ledger` in a schema of its own in the
    local PostgreSQL, dropped afterwards; skips the test when PostgreSQL is not reachable."""
    from rayfin.trading.ledger import Ledger

    with Ledger(POSTGRES_URL, schema=postgres_schema) as ledger:
        yield ledger


def consumer_config(bootstrap_servers: str, archive: str, topics: Any, **overrides: Any) -> Any:
    """A :class:`~rayfin.stream.consumer.ConsumerConfig` for tests: a group of its own and
    short flush, session and heartbeat times, so that crashes and rebalances resolve in
    seconds."""
    import uuid

    from rayfin.stream.consumer import ConsumerConfig

    settings: dict[str, Any] = {
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "flush_interval_s": 0.2,
        "session_timeout_ms": 6_000,
        "heartbeat_interval_ms": 500,
    }
    return ConsumerConfig(
        bootstrap_servers=bootstrap_servers,
        archive=archive,
        topics=topics,
        **(settings | overrides),
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s until it holds; fail naming ``what`` after
    ``timeout_s`` (distributed state settles in seconds, never instantly)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
