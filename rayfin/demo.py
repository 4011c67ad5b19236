"""The main job, which ``make demo`` runs: the whole system on embedded defaults.

In order: the embedded broker and a local Ray; the SmolLM2 swarm (block servers); the
production market model, trained on the first real ES ticks if none is registered; the
live pipeline (feature consumers, the LLM news-sentiment scorer, the trader and its
ledger); the HTTP API on Ray Serve, with its dashboard; then the later ES ticks replayed
through Kafka with simulated market news between them, under a live progress display.
When everything replayed is traded it writes a P&L plot, calls the API the way users
would, prints what to try, and shuts everything down (or serves on, ``serve_forever``).

Every part is the one users run on their own (``rayfin llm serve``, ``rayfin train``,
``rayfin consume --trade --sentiment llm``, ``rayfin serve start``); the demo only wires
them together on one machine. It owns what it starts: Ctrl-C stops all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from rich.console import Console
from rich.live import Live
from rich.table import Table

from rayfin.config import ApiKey, get_settings
from rayfin.errors import RayfinError
from rayfin.stream.metrics import group_totals

DEMO_SWARM = "demo"
DEMO_GROUP = "rayfin-demo"
ES_ROWS = 500_000


@dataclass(frozen=True)
class DemoOptions:
    """What the demo replays and how; the defaults are ``make demo``'s."""

    ticks: int = 100_000
    """Real ES ticks to replay, from ``first_row`` on."""
    first_row: int = 400_000
    """The first ES row replayed: after the rows a first model trains on."""
    train_rows: int = 200_000
    """ES rows a first model trains on, when none is registered."""
    rate: float | None = 20_000.0
    """Messages per second sent to Kafka (None: as fast as it takes them)."""
    news_every_s: float = 900.0
    """One simulated headline per this many seconds of market time, on average."""
    stages: int = 2
    """Block servers the SmolLM2 swarm splits its 30 blocks over."""
    consumers: int = 1
    threshold: float = 0.501
    """The strategy's threshold: on real ES ticks the model is seldom more sure than this."""
    serve_forever: bool = False
    port: int | None = None
    """The API's port (None: serve.port, or a free one if that is taken)."""
    out: Path | None = None
    """Where the ledger, archive and plot go (None: <state dir>/demo, replaced each run)."""
    seed: int = 7


@dataclass
class DemoReport:
    """What the demo did, with its measurements."""

    bootstrap_servers: str = ""
    url: str = ""
    read_key: str = ""
    trade_key: str = ""
    model: str = ""
    ticks_sent: int = 0
    news_sent: int = 0
    traded: int = 0
    news_scored: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    pnl: dict[str, Any] = field(default_factory=dict)
    plot: Path | None = None
    api: dict[str, Any] = field(default_factory=dict)
    steps: list[tuple[str, float]] = field(default_factory=list)


# --- the parts --------------------------------------------------------------------------------


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
def _ray(console: Console) -> Iterator[bool]:
    """Ray for the demo; yields whether it started a local one (which takes everything
    started on it down with it)."""
    import ray

    from rayfin.cluster import ensure_ray

    started = ensure_ray()
    if started:
        console.print(f"started Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def _swarm(console: Console, options: DemoOptions) -> Any:
    from rayfin.llm import launch_swarm

    model = get_settings().models.default
    with console.status(
        f"launching the {model} swarm ({options.stages} block servers; a first run converts "
        "the bundled GGUF weights once, about 30 s)"
    ):
        swarm = launch_swarm(model, name=DEMO_SWARM, num_stages=options.stages, num_cpus=0.25)
    ranges = ", ".join(f"[{i.start}, {i.end})" for i in swarm.status() if i is not None)
    console.print(f"launched the {model} swarm {DEMO_SWARM!r}: blocks {ranges}")
    return swarm


def _production_model(console: Console, options: DemoOptions) -> Any:
    """The registered ``production`` market model; trains and promotes one if none is."""
    from rayfin.errors import ModelNotFoundError
    from rayfin.trading.registry import ModelRegistry

    settings = get_settings().trading
    registry = ModelRegistry(settings.registry)
    try:
        model = registry.load(settings.model)
        console.print(f"using {model!r} from {registry.root}")
        return model
    except ModelNotFoundError:
        pass
    from rayfin.datasets import es_ticks
    from rayfin.trading.labels import LabelSpec
    from rayfin.trading.training import SearchSpace, train_model

    ticks = es_ticks(limit=options.train_rows)
    with console.status(f"no market model yet: training one on {len(ticks):,} ES ticks"):
        version = train_model(
            ticks,
            name=settings.model,
            registry=registry,
            # A long horizon and large, fast trees: a model sure enough, now and then, to
            # act on (see docs/RESULTS.md for how little any model knows about ES ticks).
            label_spec=LabelSpec(horizon_ticks=1_000, threshold=0.25),
            search=SearchSpace(
                grid={"num_leaves": (63,)}, fixed={"min_data_in_leaf": 20, "learning_rate": 0.3}
            ),
            max_rounds=60,
            early_stopping_rounds=60,
            seed=options.seed,
        )
    registry.promote(settings.model, version.version)
    f1 = version.metrics.get("cv_macro_f1", float("nan"))
    console.print(
        f"trained {settings.model} v{version.version} (cross-validated macro F1 {f1:.3f}) "
        f"and promoted it to production in {registry.root}"
    )
    return registry.load(settings.model)


def _trading_config(options: DemoOptions) -> Any:
    from rayfin.trading.engine import TradingConfig
    from rayfin.trading.risk import RiskLimits
    from rayfin.trading.strategy import StrategyConfig

    return TradingConfig(
        strategy=StrategyConfig(
            threshold=options.threshold, max_quantity=2, scale_by_confidence=True
        ),
        limits=RiskLimits(stop_loss=2.0, take_profit=3.0, max_orders=5),
    )


@dataclass
class _Pipeline:
    trader: Any
    scorer: Any
    consumers: list[Any]


def _pipeline(
    console: Console, options: DemoOptions, bootstrap: str, model: Any, out: Path
) -> _Pipeline:
    from rayfin.actors.feature_consumer import launch_consumers
    from rayfin.actors.sentiment import launch_sentiment
    from rayfin.actors.trader import TRADER_ACTOR, launch_trader
    from rayfin.sentiment.factory import make_scorer
    from rayfin.stream.consumer import ConsumerConfig
    from rayfin.stream.topics import ensure_topics

    asyncio.run(ensure_topics(bootstrap))
    trader = launch_trader(
        model,
        _trading_config(options),
        f"sqlite:///{out / 'ledger.db'}",
        num_cpus=0.25,
        actor_name=TRADER_ACTOR,
    )
    factory = functools.partial(
        make_scorer, "llm", model=get_settings().models.default, swarm=DEMO_SWARM
    )
    scorer = launch_sentiment(factory, num_cpus=0.25)
    config = ConsumerConfig(
        bootstrap_servers=bootstrap,
        archive=str(out / "archive"),
        group_id=DEMO_GROUP,
        kinds=("ticks", "news"),
    )
    consumers = launch_consumers(
        config,
        options.consumers,
        num_cpus=0.25,
        prefix=DEMO_GROUP,
        trader=trader,
        scorer=scorer,
        named=True,
    )
    console.print(
        f"started the live pipeline: {options.consumers} feature consumer(s) in group "
        f"{DEMO_GROUP!r}, the LLM news-sentiment scorer, and the trader with its ledger at "
        f"{out / 'ledger.db'}",
        soft_wrap=True,
    )
    return _Pipeline(trader, scorer, consumers)


def _free_or(port: int) -> int:
    import socket

    from rayfin.stream.broker import free_port

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def _serve(console: Console, options: DemoOptions, out: Path, report: DemoReport) -> None:
    from dataclasses import replace

    from rayfin.serve.app import ApiOptions
    from rayfin.serve.auth import digest, new_key
    from rayfin.serve.deployment import deploy

    settings = get_settings()
    api = ApiOptions.from_settings(
        settings, ledger_url=f"sqlite:///{out / 'ledger.db'}", threshold=options.threshold
    )
    assert api.llm is not None
    report.read_key, report.trade_key = new_key(), new_key()
    demo_keys = (
        ApiKey(name="demo-read", role="read", sha256=digest(report.read_key)),
        ApiKey(name="demo-trade", role="trade", sha256=digest(report.trade_key)),
    )
    api = replace(api, keys=api.keys + demo_keys, llm=replace(api.llm, swarm=DEMO_SWARM))
    port = options.port or _free_or(settings.serve.port)
    with console.status("deploying the HTTP API on Ray Serve"):
        report.url = deploy(api, host=settings.serve.host, port=port)
    console.print(f"serving the HTTP API at {report.url}")
    console.print(
        f"  dashboard: {report.url}/dashboard#key={report.read_key}\n"
        f"  API docs:  {report.url}/docs",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _replay_data(options: DemoOptions) -> tuple[list[Any], list[Any], pd.DataFrame]:
    """The ES ticks to replay, the simulated news between them, and their prices."""
    from rayfin.datasets import es_ticks
    from rayfin.stream.replay import frame_to_ticks
    from rayfin.stream.simulate import market_news

    first = min(options.first_row, ES_ROWS - options.ticks)
    frame = es_ticks(limit=first + options.ticks).iloc[first:].reset_index(drop=True)
    ticks = frame_to_ticks(frame)
    news = market_news(
        "ES", ticks[0].ts, ticks[-1].ts, every_s=options.news_every_s, seed=options.seed
    )
    prices = pd.DataFrame({"ts": [t.ts for t in ticks], "price": [t.price for t in ticks]})
    return ticks, [story for story, _ in news], prices


# --- live progress ------------------------------------------------------------------------------


class _Progress:
    """What the live display shows, from the actors' own stats."""

    def __init__(self, pipeline: _Pipeline, ticks: int, news: int) -> None:
        self.pipeline = pipeline
        self.ticks = ticks
        self.news = news
        self.sent = [0]
        self.started = time.monotonic()
        self.trader: dict[str, Any] = {}
        self.consumers: list[dict[str, Any]] = []
        self.group: dict[str, Any] = group_totals([])
        self.scorer: dict[str, Any] = {}

    def poll(self) -> None:
        import ray

        p = self.pipeline
        self.trader, self.scorer, *self.consumers = ray.get(
            [p.trader.stats.remote(), p.scorer.stats.remote()]
            + [c.stats.remote() for c in p.consumers],
            timeout=30,
        )
        self.group = group_totals(self.consumers)

    @property
    def done(self) -> bool:
        return (
            self.trader.get("records", 0) >= self.ticks and self.trader.get("news", 0) >= self.news
        )

    def render(self) -> Table:
        t = self.trader
        group = self.group
        latency = group["latency_ms"]
        outcomes = t.get("outcomes", {})
        holds = outcomes.get("below_threshold", 0) + outcomes.get("same_direction", 0)
        accepted = outcomes.get("accepted", 0)
        rejected = sum(outcomes.values()) - holds - accepted
        table = Table(title="rayfin demo: live", show_header=False, min_width=72)
        table.add_column(style="bold")
        table.add_column()
        total = self.ticks + self.news
        table.add_row("replayed", f"{self.sent[0]:,} / {total:,} messages")
        table.add_row(
            "features",
            f"{group['records_in']:,} records ({group['records_per_second']:,.0f}/s), latency p50 "
            f"{latency.get('p50', 0):.1f} ms, p99 {latency.get('p99', 0):.1f} ms",
        )
        table.add_row(
            "news sentiment",
            f"{t.get('news', 0):,} / {self.news:,} stories scored by the LLM swarm",
        )
        table.add_row(
            "decisions",
            f"{t.get('records', 0):,} ticks traded: {accepted:,} orders accepted, "
            f"{rejected:,} refused by risk, {holds:,} holds",
        )
        table.add_row(
            "P&L",
            f"equity {t.get('equity', 0):,.2f}  realized {t.get('realized_pnl', 0):,.2f}  "
            f"unrealized {t.get('unrealized_pnl', 0):,.2f}  risk {t.get('risk_state', '-')}",
        )
        table.add_row("elapsed", f"{time.monotonic() - self.started:,.1f} s")
        return table


def _run_replay(
    console: Console,
    bootstrap: str,
    ticks: list[Any],
    news: list[Any],
    options: DemoOptions,
    progress: _Progress,
    timeout_s: float,
) -> Any:
    """Replay in a thread while the display follows the pipeline; returns the send stats
    once every tick and story is traded."""
    from rayfin.stream.replay import replay_market

    stop = threading.Event()
    result: dict[str, Any] = {}

    def replay() -> None:
        async def run() -> None:
            event = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.1)
                event.set()

            watcher = asyncio.create_task(watch())
            try:
                result["stats"] = await replay_market(
                    bootstrap, ticks, news, rate=options.rate, stop=event, sent=progress.sent
                )
            finally:
                watcher.cancel()

        try:
            asyncio.run(run())
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=replay, name="rayfin-demo-replay", daemon=True)
    deadline = time.monotonic() + timeout_s
    thread.start()
    try:
        with Live(progress.render(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(0.5)
                if "error" in result:
                    raise RayfinError(f"the replay failed: {result['error']}")
                progress.poll()
                live.update(progress.render())
                if not thread.is_alive() and progress.done:
                    break
                if time.monotonic() > deadline:
                    raise RayfinError(
                        f"the pipeline traded {progress.trader.get('records', 0):,} of "
                        f"{len(ticks):,} ticks in {timeout_s:.0f} s; see `ray status`"
                    )
    finally:
        stop.set()
        thread.join(timeout=30)
    return result["stats"]


# --- after the replay ---------------------------------------------------------------------------


def _plot(out: Path, prices: pd.DataFrame, report: DemoReport) -> Path:
    from rayfin.trading.ledger import Ledger
    from rayfin.trading.plots import plot_trading

    with Ledger(f"sqlite:///{out / 'ledger.db'}") as ledger:
        fills = ledger.fills()
        pnl = ledger.pnl({"ES": float(prices["price"].iloc[-1])}, ts=int(prices["ts"].iloc[-1]))
    summary = pnl.summary
    equity = pnl.equity_curve
    if len(equity) < 2:  # no fills: flat at the starting cash over the replay
        equity = pd.DataFrame(
            {"ts": prices["ts"].iloc[[0, -1]], "equity": [summary.equity, summary.equity]}
        )
    title = (
        f"rayfin demo: {len(prices):,} ES ticks, {len(fills)} fills, net P&L "
        f"{summary.realized_pnl + summary.unrealized_pnl:,.2f} (fees {summary.fees:,.2f})"
    )
    return plot_trading(out / "pnl.png", prices, fills, equity, title)


def _call_api(console: Console, report: DemoReport, latest: dict[str, Any] | None) -> None:
    """Use the API as a client would, and show what it answers."""
    with httpx.Client(
        base_url=report.url, headers={"X-API-Key": report.read_key}, timeout=120
    ) as http:
        pnl = http.get("/v1/pnl", params={"points": 50}).raise_for_status().json()
        report.pnl = {k: v for k, v in pnl.items() if k != "equity_curve"}
        decisions = http.get("/v1/decisions", params={"order": "desc", "limit": 3}).json()
        report.api["decisions"] = decisions["items"]
        if latest is not None:
            features = {
                k: float(v)
                for k, v in latest.items()
                if k not in ("symbol", "ts", "price", "partition", "offset", "late", "seq")
                and isinstance(v, int | float)
                and v == v  # NaN: not yet warm
            }
            body = {
                "symbol": latest["symbol"],
                "price": float(latest["price"]),
                "features": features,
            }
            report.api["score"] = http.post("/v1/score", json=body).raise_for_status().json()
        headlines = ["Stocks rally as inflation cools", "Stocks slide as bond yields jump"]
        report.api["sentiment"] = (
            http.post("/v1/sentiment", json={"headlines": headlines}).raise_for_status().json()
        )
        report.api["generate"] = (
            http.post(
                "/v1/generate",
                json={
                    "prompt": "What is an E-mini S&P 500 future? One sentence.",
                    "max_new_tokens": 40,
                },
            )
            .raise_for_status()
            .json()
        )
    table = Table("call", "answer", title="the HTTP API, called like a client would")
    table.add_row(
        "GET /v1/pnl",
        f"equity {pnl['equity']:,.2f}, realized {pnl['realized_pnl']:,.2f}, "
        f"unrealized {pnl['unrealized_pnl']:,.2f}, drawdown {pnl['drawdown']:.3%}",
    )
    if decisions["items"]:
        d = decisions["items"][0]
        table.add_row(
            "GET /v1/decisions",
            f"latest: {d['time'][:19]} {d['symbol']} {d['action']} at {d['price']:.2f} "
            f"({d['reason']}, P(up) {d['p_up']:.3f})",
        )
    if "score" in report.api:
        s = report.api["score"]
        p = s["probabilities"]
        table.add_row(
            "POST /v1/score",
            f"{s['model']['name']} v{s['model']['version']}: down {p['down']:.3f} flat "
            f"{p['flat']:.3f} up {p['up']:.3f} -> {s['decision']['action']}",
        )
    for score in report.api["sentiment"]["scores"]:
        table.add_row("POST /v1/sentiment", f"{score['headline']!r}: {score['sentiment']:+.3f}")
    g = report.api["generate"]
    table.add_row(
        "POST /v1/generate", f"{g['text']!r} ({g['new_tokens']} tokens, {g['tokens_per_s']:.1f}/s)"
    )
    console.print(table)


def _print_try(console: Console, report: DemoReport) -> None:
    key = report.read_key
    console.print("[bold]try it[/bold] (while the API runs):")
    console.print(
        f"  open {report.url}/dashboard#key={key}\n"
        f"  open {report.url}/docs\n"
        f"  curl -H 'X-API-Key: {key}' '{report.url}/v1/decisions?order=desc&limit=5'\n"
        f"  curl -H 'X-API-Key: {key}' {report.url}/v1/pnl\n"
        f"  curl -H 'X-API-Key: {key}' -H 'content-type: application/json' "
        f'-d \'{{"headlines": ["Fed signals rate cuts"]}}\' {report.url}/v1/sentiment\n'
        f"  curl {report.url}/metrics",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _print_summary(console: Console, report: DemoReport) -> None:
    table = Table("step", "seconds", title="what the demo did")
    for name, seconds in report.steps:
        table.add_row(name, f"{seconds:.1f}")
    console.print(table)


# --- the job ------------------------------------------------------------------------------------


def run_demo(options: DemoOptions | None = None, *, console: Console | None = None) -> DemoReport:
    """Run the main job (see the module docstring); returns its report."""
    import ray

    options = options or DemoOptions()
    if not 1_000 <= options.ticks <= ES_ROWS:
        raise RayfinError(f"ticks must be between 1,000 and {ES_ROWS:,}, got {options.ticks:,}")
    console = console or Console()
    report = DemoReport()
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.steps.append((name, now - clock))
        clock = now

    out = options.out or get_settings().state_dir / "demo"
    shutil.rmtree(out, ignore_errors=True)  # the ledger's marks belong to this run's broker
    out.mkdir(parents=True)
    ticks, news, prices = _replay_data(options)
    step("load ES ticks and simulate news")
    with contextlib.ExitStack() as stack:
        report.bootstrap_servers = stack.enter_context(_kafka(console))
        local = stack.enter_context(_ray(console))
        step("start broker and Ray")
        swarm = _swarm(console, options)
        if not local:  # on a shared cluster, leave nothing behind
            stack.callback(swarm.shutdown)
        step("launch the SmolLM2 swarm")
        model = _production_model(console, options)
        report.model = repr(model)
        step("market model")
        pipeline = _pipeline(console, options, report.bootstrap_servers, model, out)
        step("start the live pipeline")
        from rayfin.serve.deployment import undeploy

        _serve(console, options, out, report)
        if not local:
            stack.callback(undeploy)
        step("deploy the HTTP API")
        progress = _Progress(pipeline, len(ticks), len(news))
        stats = _run_replay(
            console, report.bootstrap_servers, ticks, news, options, progress, timeout_s=900
        )
        report.ticks_sent = stats.counts.get("ticks", 0)
        report.news_sent = stats.counts.get("news", 0)
        report.traded = progress.trader["records"]
        report.news_scored = progress.trader["news"]
        report.outcomes = dict(progress.trader["outcomes"])
        console.print(
            f"replayed {report.ticks_sent:,} real ES ticks and {report.news_sent:,} simulated "
            f"headlines at {stats.rate:,.0f} msg/s; traded {report.traded:,} ticks"
        )
        step("replay, features, sentiment, trading")
        latest = ray.get(pipeline.consumers[0].latest.remote("ES"))
        for consumer in pipeline.consumers:
            ray.get(consumer.stop.remote())
        report.plot = _plot(out, prices, report)
        console.print(f"wrote the P&L plot to {report.plot}")
        _call_api(console, report, latest)
        step("P&L plot and API calls")
        _print_summary(console, report)
        _print_try(console, report)
        if options.serve_forever:
            console.print("serving until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:  # the way to end it: stop everything, exit 0
                console.print("Ctrl-C: stopping everything the demo started")
        else:
            console.print("shutting down; `rayfin demo --serve-forever` keeps the API up")
    return report
