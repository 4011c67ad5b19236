"""rayfin's Prometheus metrics as Ray exports them: the live trader's ticks, decisions,
risk rejections, batch latency and state; the block servers' KV cache, tokens and compute
time; the stream consumer's records per second. Each is read back from the node's metrics
endpoint (``ray_metrics_url``: Ray exports every second in the tests)."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
import torch
from market_fixtures import ACTIVE_CONFIG, TRAIN_ROWS
from prometheus_client.parser import text_string_to_metric_families

from rayfin.actors.trader import launch_trader
from rayfin.llm import DistributedCausalLM, launch_swarm
from rayfin.stream.metrics import RATE_WINDOW_S, StreamMetrics
from rayfin.testing import tiny_causal_lm, wait_until
from rayfin.trading.orders import REJECT_REASONS, RiskState
from rayfin.trading.scoring import Model

Sample = tuple[str, dict[str, str], float]


def _scrape(url: str, prefix: str, **match: str) -> list[Sample]:
    """Every sample of the families named ``prefix...`` whose labels include ``match``."""
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(body)
        if family.name.startswith(prefix)
        for sample in family.samples
        if all(sample.labels.get(key) == value for key, value in match.items())
    ]


def _sum(samples: list[Sample], name: str) -> float:
    """``name``'s value summed over its series (a process restart starts a new one)."""
    return sum(value for sample, _, value in samples if sample == name)


def _by(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """``name``'s value summed per value of ``label``."""
    out: dict[str, float] = defaultdict(float)
    for sample, labels, value in samples:
        if sample == name:
            out[labels[label]] += value
    return dict(out)


@pytest.mark.integration
def test_the_trader_exports_ticks_decisions_rejections_and_its_state(
    market_model: Model, market_features: pd.DataFrame, ray_metrics_url: str, tmp_path: Path
) -> None:
    """Real feature rows traded by a real trader actor in micro-batches (and one replayed):
    the exported ticks are the rows traded, the decisions by outcome are the engine's
    counts, the rejections their risk subset, one latency observation per batch, and the
    gauges are the trader's equity, drawdown and risk state."""
    name = f"metrics-{uuid.uuid4().hex[:8]}"  # the trader label: this test's series only
    rows = market_features.iloc[TRAIN_ROWS:].reset_index(drop=True)
    rows = rows.assign(partition=0, offset=np.arange(len(rows)))
    tables = [
        pa.Table.from_pandas(rows.iloc[start : start + 1_000], preserve_index=False)
        for start in range(0, len(rows), 1_000)
    ]
    url = f"sqlite:///{tmp_path / 'live.db'}"
    trader = launch_trader(market_model, ACTIVE_CONFIG, url, name=name, num_cpus=0.1)
    try:
        traded = sum(ray.get(trader.on_features.remote("ticks", table)) for table in tables)
        # A consumer replaying after a crash: nothing is traded twice, nothing counted.
        assert ray.get(trader.on_features.remote("ticks", tables[-1])) == 0
        stats = ray.get(trader.stats.remote())
    finally:
        ray.kill(trader, no_restart=True)
    outcomes = stats["outcomes"]
    assert traded == len(rows) == stats["records"] == sum(outcomes.values())
    rejections = {r: n for r, n in outcomes.items() if r in REJECT_REASONS}
    assert len(outcomes) > 1  # several outcomes, so the by-outcome check means something
    assert stats["metrics"]["decisions"] == outcomes
    assert stats["metrics"]["risk_rejections"] == rejections
    assert stats["metrics"]["batches"] == len(tables) + 1
    states = {state.value: float(state.value == stats["risk_state"]) for state in RiskState}
    seen: dict[str, object] = {}

    def exported() -> bool:
        samples = _scrape(ray_metrics_url, "ray_rayfin_trading_", trader=name)
        seen.update(
            ticks=_sum(samples, "ray_rayfin_trading_ticks_total"),
            decisions=_by(samples, "ray_rayfin_trading_decisions_total", "outcome"),
            rejections=_by(samples, "ray_rayfin_trading_risk_rejections_total", "reason"),
            batches=_sum(samples, "ray_rayfin_trading_batch_seconds_count"),
            states=_by(samples, "ray_rayfin_trading_risk_state", "state"),
            equity=_sum(samples, "ray_rayfin_trading_equity"),
            drawdown=_sum(samples, "ray_rayfin_trading_drawdown"),
        )
        return (
            seen["ticks"] == traded
            and seen["decisions"] == outcomes
            and seen["rejections"] == rejections
            and seen["batches"] == len(tables) + 1
            and seen["states"] == states
            and seen["equity"] == pytest.approx(stats["equity"])
            and seen["drawdown"] == pytest.approx(stats["drawdown"])
        )

    try:
        wait_until(exported, 30, "the trader's metrics to be exported")
    except AssertionError:
        raise AssertionError(f"exported {seen}, expected outcomes {outcomes}") from None


@pytest.mark.integration
def test_block_servers_export_kv_cache_tokens_and_compute_time(
    ray_metrics_url: str, tmp_path: Path
) -> None:
    """A tiny swarm: the cache gauges show a session while it is open (its reserved
    bytes) and none after; the token counter counts what the blocks processed, and the
    histogram holds one observation per batched compute."""
    tiny = tiny_causal_lm(tmp_path / "tiny-llama")
    swarm = launch_swarm(
        str(tiny), name=f"t-metrics-{uuid.uuid4().hex[:6]}", num_stages=2, num_cpus=0.1
    )
    try:
        client = DistributedCausalLM.from_pretrained(tiny, swarm=swarm)
        servers = [record.server_id for record in swarm.servers()]
        assert len(servers) == 2
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        seen: dict[str, object] = {}

        def cache_and_tokens(server: str) -> tuple[float, float, float, float]:
            samples = _scrape(ray_metrics_url, "ray_rayfin_llm_", server=server)
            return (
                _sum(samples, "ray_rayfin_llm_kv_cache_capacity_bytes"),
                _sum(samples, "ray_rayfin_llm_kv_cache_used_bytes"),
                _sum(samples, "ray_rayfin_llm_kv_cache_sessions"),
                _sum(samples, "ray_rayfin_llm_server_tokens_total"),
            )

        def shows(expected: dict[str, tuple[float, float, float, float]]) -> bool:
            seen.update({server: cache_and_tokens(server) for server in expected})
            return all(seen[server] == want for server, want in expected.items())

        with client.inference_session(max_length=32) as session:
            session.step(ids)
            infos = swarm.status_by_id()
            open_ = {}
            for server in servers:
                info = infos[server]
                assert info is not None
                assert info.sessions == 1
                assert info.tokens == 5
                assert info.cache_used_bytes > 0
                open_[server] = (info.cache_capacity_bytes, info.cache_used_bytes, 1, 5)
            wait_until(lambda: shows(open_), 30, f"the open session in the metrics ({seen})")

        generated = client.generate(
            torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1)),
            max_new_tokens=6,
            eos_token_id=[],
        )
        assert generated.shape == (2, 12)
        infos = swarm.status_by_id()
        closed = {}
        for server in servers:
            info = infos[server]
            assert info is not None
            assert info.sessions == 0
            assert info.tokens >= 5 + 2 * 6  # the session's step, then the prompts at least
            closed[server] = (info.cache_capacity_bytes, 0, 0, info.tokens)
        wait_until(lambda: shows(closed), 30, f"the tokens in the metrics ({seen})")

        def computes(server: str) -> float:
            samples = _scrape(ray_metrics_url, "ray_rayfin_llm_server_step", server=server)
            return _sum(samples, "ray_rayfin_llm_server_step_seconds_count")

        for server in servers:
            batches = infos[server].extra["batches"]  # type: ignore[union-attr]
            wait_until(lambda s=server, b=batches: computes(s) == b, 30, "the compute histogram")
    finally:
        swarm.shutdown()


@pytest.mark.integration
def test_the_stream_exports_records_per_second(ray_metrics_url: str) -> None:
    """The consumers' records-per-second gauge: the rate over the last window, 0 once
    idle or stopped (a StreamMetrics in this driver, mirrored to Ray like a consumer's)."""
    consumer = f"rate-{uuid.uuid4().hex[:8]}"
    metrics = StreamMetrics(consumer)
    start = time.monotonic() + 10 * RATE_WINDOW_S
    metrics.tick(start)  # closes the first window (nothing read): the next starts here
    assert metrics.records_per_second == {}
    metrics.record_in("ticks", 3_000)
    metrics.record_in("news", 10)
    metrics.tick(start + RATE_WINDOW_S / 2)  # the window is still open
    assert metrics.records_per_second == {}
    metrics.tick(start + 2 * RATE_WINDOW_S)
    assert metrics.records_per_second == {"ticks": 1_500.0, "news": 5.0}
    assert metrics.snapshot()["records_per_second"] == {"ticks": 1_500.0, "news": 5.0}

    def rates() -> dict[str, float]:
        samples = _scrape(ray_metrics_url, "ray_rayfin_stream_records", consumer=consumer)
        return _by(samples, "ray_rayfin_stream_records_per_second", "topic")

    wait_until(lambda: rates() == {"ticks": 1_500.0, "news": 5.0}, 30, "the rates exported")
    metrics.record_in("ticks", 10)
    metrics.tick(start + 4 * RATE_WINDOW_S)  # two windows' time since: 10 records, no news
    assert metrics.records_per_second == {"ticks": 5.0, "news": 0.0}
    metrics.idle()
    assert metrics.records_per_second == {"ticks": 0.0, "news": 0.0}
    wait_until(lambda: rates() == {"ticks": 0.0, "news": 0.0}, 30, "the stopped rates exported")
