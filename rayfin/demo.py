"""The end-to-end slice that ``make demo`` runs, on embedded defaults.

Today it covers the parts that exist: the embedded broker, a local Ray, real ES ticks
through Kafka into a consumer-group actor that builds one-minute bars, and SmolLM2
answering from the prepared local weights. Later issues grow it into the full job
(swarm, features, sentiment, LightGBM, risk, ledger, HTTP API).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console
from rich.table import Table

from rayfin.config import get_settings
from rayfin.errors import RayfinError

if TYPE_CHECKING:
    from rayfin.features.bars import Bar

DEMO_GROUP = "rayfin-demo-bars"


@dataclass
class DemoReport:
    """What the demo did, with its measurements."""

    bootstrap_servers: str = ""
    ticks_sent: int = 0
    produce_rate: float = 0.0
    ticks_consumed: int = 0
    consume_rate: float = 0.0
    bars: pd.DataFrame = field(default_factory=pd.DataFrame)
    llm_prompt: str = ""
    llm_answer: str = ""
    steps: list[tuple[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def _kafka(console: Console) -> Iterator[str]:
    """An external Kafka when configured, else an embedded broker stopped on exit."""
    from rayfin.stream.broker import EmbeddedBroker, free_port

    configured = get_settings().broker.bootstrap_servers
    if configured:
        console.print(f"using the configured Kafka at {configured}")
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="rayfin-demo-") as state:
        broker = EmbeddedBroker(port=free_port(), state_dir=Path(state))
        with broker:
            console.print(f"started the embedded broker (tansu) at {broker.bootstrap_servers}")
            yield broker.bootstrap_servers


@contextlib.contextmanager
def _ray(console: Console) -> Iterator[None]:
    import ray

    from rayfin.cluster import ensure_ray

    started = ensure_ray()
    if started:
        console.print(f"started Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _bars_frame(bars: list[Bar]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [
            {
                "start": pd.Timestamp(b.start, unit="ns", tz="UTC").tz_convert("America/Chicago"),
                "open": b.open,
                "high": b.high,
                "low": b.low,
                "close": b.close,
                "volume": b.volume,
                "vwap": b.vwap,
                "trades": b.trades,
            }
            for b in bars
        ]
    )
    return frame.sort_values("start").reset_index(drop=True) if len(frame) else frame


def run_demo(ticks: int = 100_000, *, console: Console | None = None) -> DemoReport:
    """Run the slice and return its report (also printed to ``console``)."""
    import ray

    from rayfin.actors.bar_consumer import BarConsumer
    from rayfin.datasets import es_ticks
    from rayfin.stream.replay import frame_to_ticks, replay_ticks

    console = console or Console()
    report = DemoReport()
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.steps.append((name, now - clock))
        clock = now

    frame = es_ticks(limit=ticks)
    step("load ES ticks")
    with _kafka(console) as bootstrap, _ray(console):
        report.bootstrap_servers = bootstrap
        step("start broker and Ray")
        consumer = BarConsumer.remote(bootstrap, DEMO_GROUP)
        consuming = consumer.consume.remote(expected=len(frame))
        stats = asyncio.run(replay_ticks(bootstrap, frame_to_ticks(frame)))
        report.ticks_sent, report.produce_rate = stats.messages, stats.rate
        console.print(f"replayed {stats.messages:,} real ES ticks at {stats.rate:,.0f} msg/s")
        result = ray.get(consuming)
        if result["consumed"] < stats.messages:
            raise RayfinError(
                f"the consumer read {result['consumed']:,} of {stats.messages:,} ticks before "
                "its timeout; see the broker log and `ray status`"
            )
        report.ticks_consumed = int(result["consumed"])
        report.consume_rate = result["consumed"] / max(result["seconds"], 1e-9)
        report.bars = _bars_frame(ray.get(consumer.closed_bars.remote()))
        ray.kill(consumer)
        step("replay through Kafka into bars")
    console.print(
        f"consumer group {DEMO_GROUP!r} read {report.ticks_consumed:,} ticks "
        f"({report.consume_rate:,.0f} msg/s) into {len(report.bars)} one-minute bars"
    )
    _print_bars(console, report.bars)
    _ask_llm(console, report)
    step("SmolLM2 answer")
    _print_summary(console, report)
    return report


def _print_bars(console: Console, bars: pd.DataFrame) -> None:
    table = Table(
        "bar (US Central)",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "vwap",
        title="last one-minute ES bars",
    )
    for row in bars.tail(5).itertuples():
        table.add_row(
            f"{row.start:%Y-%m-%d %H:%M}",
            f"{row.open:.2f}",
            f"{row.high:.2f}",
            f"{row.low:.2f}",
            f"{row.close:.2f}",
            f"{row.volume:,}",
            f"{row.vwap:.3f}",
        )
    console.print(table)


def _ask_llm(console: Console, report: DemoReport) -> None:
    from rayfin.llm import chat_reply, load_local_model

    bars = report.bars
    first, last = bars.iloc[0], bars.iloc[-1]
    change = last.close - first.open
    move = "rise" if change > 0 else "fall" if change < 0 else "are unchanged"
    amount = f" {abs(change):.2f} points" if change else ""
    # A headline built from the bars: a preview of the news-sentiment feature to come.
    report.llm_prompt = (
        f"Headline: S&P 500 futures {move}{amount} to {last.close:.2f}. Is this headline "
        "positive, negative or neutral for stocks? Answer in one sentence."
    )
    with console.status("preparing and loading SmolLM2-135M (first run converts the GGUF)"):
        model, tokenizer = load_local_model(get_settings().models.default)
    report.llm_answer = chat_reply(model, tokenizer, report.llm_prompt)
    console.print(f"[bold]asked SmolLM2:[/bold] {report.llm_prompt}")
    console.print(f"[bold]it answered:[/bold] {report.llm_answer}")


def _print_summary(console: Console, report: DemoReport) -> None:
    table = Table("step", "seconds", title="what the demo did")
    for name, seconds in report.steps:
        table.add_row(name, f"{seconds:.1f}")
    console.print(table)
    console.print(
        "Not yet part of the demo (later issues): the distributed SmolLM2 swarm, window "
        "features, news sentiment, LightGBM decisions under risk limits, the trade ledger "
        "and the HTTP API."
    )
