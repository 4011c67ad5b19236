"""``rayfin replay`` and ``rayfin simulate``: produce market data into the configured Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.table import Table

from rayfin.cli.console import console, fail, run_guarded

if TYPE_CHECKING:
    from rayfin.stream.producer import SendStats

T = TypeVar("T")

replay_app = typer.Typer(help="Replay recorded market data into Kafka.", no_args_is_help=True)

SpeedOption = Annotated[
    str,
    typer.Option(
        "--rate",
        help="Multiple of real time (10: ten times faster than recorded), or 'max'.",
    ),
]
RateOption = Annotated[
    str, typer.Option("--rate", help="Messages per second, or 'max' for as fast as possible.")
]


def parse_rate(value: str) -> float | None:
    """``max`` as None, else a positive number."""
    if value.strip().lower() == "max":
        return None
    try:
        rate = float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a number or 'max', got {value!r}") from None
    if not rate > 0 or rate == float("inf"):
        raise typer.BadParameter(f"must be a positive number or 'max', got {value!r}")
    return rate


def _bootstrap() -> str:
    from rayfin.config import get_settings

    return run_guarded(get_settings).broker.resolved_bootstrap_servers()


def _run(work: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``work(stop)`` on a new event loop; the first Ctrl-C sets ``stop`` so that the
    work ends cleanly and reports what it sent, a second one interrupts at once."""
    # aiokafka logs each failed connection attempt; the error raised says it all.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def first_interrupt() -> None:
            loop.remove_signal_handler(signal.SIGINT)
            stop.set()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, first_interrupt)
        try:
            return await work(stop)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)

    return run_guarded(asyncio.run, main())


def _report(counts: dict[str, int], topics: list[str], seconds: float, stopped: bool) -> None:
    table = Table("topic", "messages")
    for topic in topics:
        table.add_row(topic, f"{counts.get(topic, 0):,}")
    total = sum(counts.values())
    table.add_row("[bold]total[/bold]", f"[bold]{total:,}[/bold]")
    console.print(table)
    rate = total / seconds if seconds > 0 else 0.0
    note = " (stopped by Ctrl-C)" if stopped else ""
    console.print(
        f"sent {total:,} messages (acknowledged by Kafka) in {seconds:.2f} s: "
        f"{rate:,.0f} msg/s{note}"
    )


@replay_app.command("es-ticks")
def replay_es_ticks(
    rate: SpeedOption = "max",
    limit: Annotated[
        int | None,
        typer.Option(min=1, max=500_000, help="Replay only the first LIMIT trades."),
    ] = None,
    max_gap: Annotated[
        float | None,
        typer.Option(min=0.0, help="Shorten gaps longer than this many seconds of event time."),
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic to send to.")] = "ticks",
) -> None:
    """Replay the bundled E-mini S&P 500 trades to the ticks topic, keyed by symbol.

    --rate N replays at N times real time, keeping the recorded gaps between trades
    (divided by N); --rate max sends as fast as Kafka takes them.
    """
    from rayfin.stream import replay

    speed = parse_rate(rate)
    bootstrap = _bootstrap()
    pace = "as fast as possible" if speed is None else f"at {speed:g}x real time"
    console.print(f"replaying ES ticks to {topic!r} on {bootstrap} {pace}")
    stopped = False

    async def work(stop: asyncio.Event) -> replay.ReplayStats:
        nonlocal stopped
        result = await replay.replay_es_ticks(
            bootstrap, speed, limit, topic=topic, max_gap_s=max_gap, stop=stop
        )
        stopped = stop.is_set()
        return result

    stats = _run(work)
    _report(stats.counts, [stats.topic], stats.seconds, stopped)


def simulate(
    symbols: Annotated[int, typer.Option(min=1, max=10_000, help="How many symbols.")] = 5,
    rate: RateOption = "max",
    seed: Annotated[int, typer.Option(help="Random seed: the same seed, the same market.")] = 0,
    messages: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many messages.")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option(min=0.0, help="Stop after this many wall-clock seconds.")
    ] = None,
    topic_prefix: Annotated[
        str, typer.Option(help="Prefix of the topic names, e.g. 'dev.' for dev.ticks.")
    ] = "",
) -> None:
    """Send a simulated market (trades, L2 books, news) to the ticks, book and news topics.

    --rate is in messages per second, or 'max'. Without --messages or --seconds it runs
    until Ctrl-C.
    """
    from rayfin.stream.simulate import simulate as run_simulation
    from rayfin.stream.topics import MARKET_TOPICS

    if messages is not None and seconds is not None:
        raise fail("give --messages or --seconds, not both", code=2)
    msg_rate = parse_rate(rate)
    bootstrap = _bootstrap()
    pace = "as fast as possible" if msg_rate is None else f"at {msg_rate:g} msg/s"
    console.print(f"simulating {symbols} symbols (seed {seed}) to {bootstrap} {pace}")
    stopped = False

    async def work(stop: asyncio.Event) -> SendStats:
        nonlocal stopped
        result = await run_simulation(
            bootstrap,
            symbols,
            msg_rate,
            seed,
            messages=messages,
            duration=seconds,
            topic_prefix=topic_prefix,
            stop=stop,
        )
        stopped = stop.is_set()
        return result

    stats = _run(work)
    _report(stats.counts, [topic_prefix + t for t in MARKET_TOPICS], stats.seconds, stopped)
