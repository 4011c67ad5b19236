"""``rayfin consume``: run the feature consumer group on Ray until Ctrl-C (or a deadline)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from rayfin.cli.console import console, fail, run_guarded, sigterm_as_ctrl_c
from rayfin.cli.trading import (
    ModelOption,
    RegistryOption,
    ThresholdOption,
    TickSizeOption,
    load_model,
    trading_config,
)

KINDS = ("ticks", "book", "news")
SENTIMENT_CHOICES = ("none", "vader", "llm")


def _kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds or unknown:
        raise typer.BadParameter(f"expected a comma-separated subset of {', '.join(KINDS)}")
    return kinds


def consume(
    consumers: Annotated[
        int, typer.Option(min=1, max=256, help="Consumer actors to start in the group.")
    ] = 1,
    kinds: Annotated[str, typer.Option(help="Topics to read: ticks, book, news.")] = ",".join(
        KINDS
    ),
    archive: Annotated[
        str | None,
        typer.Option(help="Parquet archive, a path or s3:// URI (default: stream.archive)."),
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="Consumer group id (default: stream.group_id).")
    ] = None,
    topic_prefix: Annotated[
        str | None, typer.Option(help="Prefix of the topic names (default: stream.topic_prefix).")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option(min=0.0, help="Stop after this many seconds.")
    ] = None,
    num_cpus: Annotated[float, typer.Option(min=0.0, help="CPUs reserved per actor.")] = 0.5,
    trade: Annotated[
        bool, typer.Option(help="Trade the tick features live with a registered model.")
    ] = False,
    model: ModelOption = None,
    registry: RegistryOption = None,
    threshold: ThresholdOption = None,
    default_tick_size: TickSizeOption = None,
    ledger: Annotated[
        str | None, typer.Option(help="Trading ledger database URL (default: database.url).")
    ] = None,
    sentiment: Annotated[
        str,
        typer.Option(
            help="Score the news headlines (vader, llm or none); with --trade the scores "
            "become the ticks' decayed sentiment input."
        ),
    ] = "none",
    swarm: Annotated[
        str, typer.Option(help="With --sentiment llm: the running swarm to score on.")
    ] = "default",
    sentiment_adapter: Annotated[
        str | None,
        typer.Option(
            help="With --sentiment llm: a tuned adapter from the hub, NAME or NAME@VERSION "
            "(a number or an alias); zero-shot without one."
        ),
    ] = None,
    adapter_hub: Annotated[
        str | None,
        typer.Option(help="Adapter hub path or s3:// URI (default: state dir/adapters)."),
    ] = None,
) -> None:
    """Compute live features from the market topics into the Parquet archive.

    Starts CONSUMERS actors in one Kafka consumer group on the configured Ray cluster (a
    local one when none is set); run the command again elsewhere to add members, and the
    partitions rebalance. Ctrl-C (or --seconds) flushes, commits and leaves the group.

    With --trade, one trading actor scores and trades every tick-feature row (simulated
    execution) into the ledger; run again, it resumes from the ledger's checkpoint.
    With --sentiment, a scorer actor scores each headline; the archived news carries the
    scores, and the trader decays them per symbol into the model's sentiment input.
    """
    from rayfin.actors.feature_consumer import launch_consumers
    from rayfin.cluster import ensure_ray
    from rayfin.config import get_settings
    from rayfin.stream.consumer import ConsumerConfig
    from rayfin.stream.topics import Topics

    settings = run_guarded(get_settings)
    stream = settings.stream
    config = ConsumerConfig(
        bootstrap_servers=run_guarded(settings.broker.resolved_bootstrap_servers),
        archive=archive or str(stream.archive),
        group_id=group or stream.group_id,
        topics=Topics.prefixed(stream.topic_prefix if topic_prefix is None else topic_prefix),
        kinds=_kinds(kinds),
    )
    if sentiment not in SENTIMENT_CHOICES:
        raise typer.BadParameter(f"--sentiment: expected one of {', '.join(SENTIMENT_CHOICES)}")
    if sentiment != "none" and "news" not in config.kinds:
        raise typer.BadParameter("--sentiment scores the news topic: add news to --kinds")
    loaded = load_model(model, registry) if trade else None
    started_ray = run_guarded(ensure_ray)
    import ray

    with sigterm_as_ctrl_c():
        try:
            trader = None
            if loaded is not None:
                from rayfin.actors.trader import TRADER_ACTOR, launch_trader

                trader = run_guarded(
                    launch_trader,
                    loaded,
                    trading_config(threshold, default_tick_size),
                    # Resolved here: the actor may run on a node with settings of its own.
                    ledger or settings.database.url,
                    num_cpus=num_cpus,
                    actor_name=TRADER_ACTOR,
                )
                console.print(f"trading with {loaded!r} into {ray.get(trader.ledger_url.remote())}")
            options: dict[str, Any] = {}
            if sentiment == "llm":
                name, _, version = (sentiment_adapter or "").partition("@")
                options = {"swarm": swarm, "adapter": name or None, "hub": adapter_hub}
                options["version"] = int(version) if version.isdigit() else version or None
            scorer = None if sentiment == "none" else _launch_scorer(sentiment, num_cpus, **options)
            console.print(
                f"starting {consumers} consumer(s) in group {config.group_id!r} on "
                f"{config.bootstrap_servers}, archiving to {config.archive}"
            )
            members = run_guarded(
                launch_consumers,
                config,
                consumers,
                num_cpus=num_cpus,
                prefix=config.group_id,
                trader=trader,
                scorer=scorer,
                named=True,  # the HTTP API's /v1/pipeline and dashboard find them by name
            )
            stopped_by = _watch(members, seconds, trader)
            final = [ray.get(m.stop.remote()) for m in members]
            _report(final, stopped_by)
            if trader is not None:
                _report_trading(ray.get(trader.stats.remote()))
        finally:
            if started_ray:
                ray.shutdown()


def _launch_scorer(kind: str, num_cpus: float, **options: Any) -> Any:
    """The sentiment actor, its scorer of ``kind`` (built with ``options``) made in it."""
    import functools

    import ray

    from rayfin.actors.sentiment import launch_sentiment
    from rayfin.sentiment.factory import make_scorer

    try:
        scorer = launch_sentiment(
            functools.partial(make_scorer, kind, **options), num_cpus=num_cpus
        )
    except ray.exceptions.RayError as exc:
        # The last line names the error the factory raised in the actor.
        last = str(exc).strip().splitlines()[-1]
        raise fail(f"the {kind} sentiment scorer did not start: {last}") from None
    console.print(f"scoring news headlines with {ray.get(scorer.stats.remote())['scorer']}")
    return scorer


def _watch(members: list[Any], seconds: float | None, trader: Any = None) -> str:
    """Print the group's progress every second until ``seconds`` pass or Ctrl-C."""
    import ray

    from rayfin.stream.metrics import group_totals

    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, (deadline or float("inf")) - time.monotonic())))
            try:
                stats = ray.get([m.stats.remote() for m in members], timeout=30)
            except ray.exceptions.RayError as exc:
                raise fail(f"a consumer failed: {exc}") from None
            group = group_totals(stats)
            assigned = sum(len(s["assigned"]) for s in stats)
            p50 = group["latency_ms"].get("p50")
            line = (
                f"{group['records_in']:,} records ({group['records_per_second']:,.0f}/s), "
                f"lag {group['lag']:,}, "
                f"{assigned} partitions, p50 {'-' if p50 is None else f'{p50:.1f} ms'}"
            )
            if trader is not None:
                try:
                    trading = ray.get(trader.stats.remote(), timeout=30)
                except ray.exceptions.RayError as exc:
                    raise fail(f"the trader failed: {exc}") from None
                line += (
                    f"; traded {trading['records']:,}, news {trading['news']:,}, "
                    f"{trading['risk_state']}, equity {trading['equity']:,.0f}"
                )
            console.print(line)
    except KeyboardInterrupt:
        console.print("stopping: flushing, committing and leaving the group")
        return "Ctrl-C"
    return "deadline"


def _report(final: list[dict[str, Any]], stopped_by: str) -> None:
    table = Table("consumer", "records in", "feature rows", "dead letters")
    for index, stats in enumerate(final):
        table.add_row(
            str(index),
            f"{sum(stats['records_in'].values()):,}",
            f"{sum(stats['features_out'].values()):,}",
            f"{sum(stats['dead_letters'].values()):,}",
        )
    console.print(table)
    console.print(f"stopped by {stopped_by}; everything read is archived and committed")


def _report_trading(stats: dict[str, Any]) -> None:
    console.print(
        f"traded {stats['records']:,} ticks, {stats['news']:,} news ({stats['risk_state']}): "
        "realized "
        f"{stats['realized_pnl']:,.2f}, unrealized {stats['unrealized_pnl']:,.2f}, open "
        f"{', '.join(stats['open_positions']) or 'nothing'}; decisions "
        + ", ".join(f"{reason} {n:,}" for reason, n in sorted(stats["outcomes"].items()))
    )
