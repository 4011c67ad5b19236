"""pytest fixtures for code built on rayfin: a real Kafka broker and a real local Ray.

Enable them with ``pytest_plugins = ["rayfin.testing"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rayfin.errors import BrokerError
from rayfin.stream.broker import EmbeddedBroker, free_port


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
