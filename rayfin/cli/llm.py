"""``rayfin llm``: serve a model on a swarm of Ray block servers, inspect it, generate."""

from __future__ import annotations

import json
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table

from rayfin.cli.cluster import join_ray
from rayfin.cli.console import console, err_console, fail, run_guarded, sigterm_as_ctrl_c

if TYPE_CHECKING:
    from rayfin.llm.server_info import ServerInfo
    from rayfin.llm.swarm import Swarm

app = typer.Typer(
    help="Serve an LLM on a swarm of Ray block servers, inspect it, generate with it.",
    no_args_is_help=True,
)

_MIB = 1 << 20

NameOption = Annotated[str, typer.Option("--name", "-n", help="Swarm name.")]


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(StrEnum):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class Compression(StrEnum):
    none = "none"
    blockwise8 = "blockwise8"


def _join_swarm(name: str) -> Swarm:
    """The running swarm ``name``, on the cluster :func:`~rayfin.cli.cluster.join_ray` finds."""
    address = join_ray(start_local=False)
    from rayfin.errors import LLMError
    from rayfin.llm.swarm import connect_swarm

    try:
        return connect_swarm(name)
    except LLMError as exc:
        # "auto" picks one of several Ray instances on a machine; say which one it was.
        raise fail(f"{exc} (Ray cluster at {address})") from None


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / _MIB:,.1f}"


def _option(value: Enum) -> str | None:
    return None if value.value == "none" else value.value


@app.command()
def serve(
    model: Annotated[
        str, typer.Argument(help="Catalogue name or transformers folder.")
    ] = "smollm2-135m",
    name: NameOption = "default",
    stages: Annotated[
        int, typer.Option(min=1, help="Split the blocks into this many servers.")
    ] = 1,
    replicas: Annotated[int, typer.Option(min=1, help="Servers per stage.")] = 1,
    dtype: Annotated[DType, typer.Option(help="Weights and activations dtype.")] = DType.float32,
    quantization: Annotated[
        Quantization, typer.Option(help="Server weight quantization.")
    ] = Quantization.none,
    compression: Annotated[
        Compression, typer.Option(help="Hidden-state compression on the wire.")
    ] = Compression.none,
    cache_mb: Annotated[int, typer.Option(min=1, help="KV cache per server, MiB.")] = 1024,
    num_cpus: Annotated[float, typer.Option(min=0.0, help="Ray CPUs reserved per server.")] = 0.5,
    num_gpus: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="GPUs per server (default: one when the cluster has GPUs now, else none; "
            "give it when GPU nodes are still to be started by the autoscaler).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for every server to be ready.")
    ] = 600.0,
    max_restarts: Annotated[
        int, typer.Option(min=-1, help="Times Ray restarts a crashed server (-1: always).")
    ] = 0,
    detach: Annotated[
        bool,
        typer.Option(help="Leave the swarm running on the cluster and exit at once."),
    ] = False,
    points: Annotated[
        bool,
        typer.Option(
            help="Run the swarm's points bank (on --points-url, default database.points_url): "
            "servers earn for their work and charge clients' bids."
        ),
    ] = False,
    points_url: Annotated[
        str | None, typer.Option(help="Points ledger database URL (implies --points).")
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option(
            help="Points account the servers' work is credited to (default: each server id)."
        ),
    ] = None,
) -> None:
    """Start a swarm serving MODEL; in the foreground until Ctrl-C, or --detach."""
    import time

    from rayfin.config import get_settings

    if detach and not run_guarded(get_settings).ray.address:
        raise fail(
            "--detach needs a Ray cluster that outlives this command: start one with "
            "`ray start --head` and set RAYFIN_RAY__ADDRESS=auto"
        )
    if Path(model).expanduser().is_dir():  # servers may not share our working directory
        model = str(Path(model).expanduser().resolve())
    address = join_ray(start_local=True)
    import ray

    from rayfin.llm.swarm import launch_swarm

    with sigterm_as_ctrl_c():
        try:
            with console.status(f"starting {stages * replicas} server(s) for {model}..."):
                swarm = run_guarded(
                    launch_swarm,
                    model,
                    name=name,
                    num_stages=stages,
                    replicas=replicas,
                    dtype=dtype.value,
                    quantization=_option(quantization),
                    compression=_option(compression),
                    cache_bytes=cache_mb * _MIB,
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    timeout_s=timeout,
                    points_url=points_url
                    or (run_guarded(get_settings).database.points_url if points else None),
                    operator=operator,
                    max_restarts=max_restarts,
                    detached=detach,
                )
        except KeyboardInterrupt:
            err_console.print("interrupted while starting; stopping")
            ray.shutdown()
            raise typer.Exit(130) from None

        table = Table("server", "blocks", "device", "weights MiB", "cache free MiB")
        for info in swarm.status():
            if info is not None:
                table.add_row(
                    info.server_id,
                    f"[{info.start}, {info.end})",
                    info.device,
                    _mib(info.weight_bytes),
                    _mib(info.cache_free_bytes),
                )
        console.print(f"[green]swarm {name!r}[/green] serving {model} on Ray at {address}")
        console.print(table)
        flag = "" if name == "default" else f" --name {name}"
        console.print(
            f'generate:  rayfin llm generate "Hello"{flag}\n'
            f"status:    rayfin llm status{flag}\n"
            f"Ray:       {address} (elsewhere, or if several Ray instances run here, "
            f"set RAYFIN_RAY__ADDRESS={address})",
            highlight=False,
            markup=False,
        )
        if detach:
            console.print(f"detached; stop it with: rayfin llm stop{flag}", highlight=False)
            ray.shutdown()
            return
        console.print("serving; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print(f"stopping swarm {name!r}")
        finally:
            try:
                swarm.shutdown()
            finally:
                ray.shutdown()
        console.print("stopped")


def _as_json(server_id: str, info: ServerInfo | None) -> dict[str, Any]:
    from rayfin.llm.swarm import describe

    if info is None:
        return {"server_id": server_id, "answered": False}
    data = describe(info)
    try:
        json.dumps(data["extra"])
    except (TypeError, ValueError):
        del data["extra"]
    data["answered"] = True
    return data


@app.command()
def status(
    name: NameOption = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each server of a swarm: blocks, memory, cache and load."""
    swarm = _join_swarm(name)
    rows = list(swarm.status_by_id().items())
    if as_json:
        console.print_json(json.dumps([_as_json(sid, info) for sid, info in rows]))
        return
    spec = swarm.spec
    console.print(
        f"swarm {name!r}: {spec.model}, {spec.num_blocks} blocks, {len(rows)} server(s)",
        highlight=False,
    )
    table = Table(
        Column("server", no_wrap=True), Column("blocks", no_wrap=True), "device", "dtype",
        "quant", "compress", "weights MiB", "RSS MiB", "sessions", "queued",
        Column("cache used/total MiB", no_wrap=True), "tokens/s", "ms/block", "answered",
    )  # fmt: skip
    for server_id, info in rows:
        if info is None:
            table.add_row(server_id, *[""] * 12, "[red]no[/red]")
            continue
        table.add_row(
            server_id,
            f"[{info.start}, {info.end})",
            info.device,
            info.dtype,
            info.quantization or "-",
            info.compression or "-",
            _mib(info.weight_bytes),
            _mib(info.rss_bytes),
            str(info.sessions),
            str(info.queued),
            f"{_mib(info.cache_used_bytes)} / {_mib(info.cache_capacity_bytes)}",
            f"{info.tokens_per_s:,.1f}",
            f"{info.block_latency_s * 1000:,.2f}",
            "[green]yes[/green]",
        )
    console.print(table)


@app.command()
def stop(name: NameOption = "default") -> None:
    """Stop every server of a swarm (e.g. one started with --detach)."""
    swarm = _join_swarm(name)
    count = len(swarm.servers())
    swarm.shutdown()
    console.print(f"stopped swarm {name!r} ({count} server(s))")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message with --chat).")],
    name: NameOption = "default",
    model: Annotated[
        str | None, typer.Option(help="Client weights and tokenizer (default: the swarm's).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Tokens to generate.")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample or arg-max.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed, for reproducible sampling.")] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap the prompt in the chat template (default: when the model has one).",
        ),
    ] = None,
) -> None:
    """Generate a continuation of PROMPT on a running swarm; prints only the new text."""
    swarm = _join_swarm(name)
    from transformers import AutoTokenizer

    from rayfin.llm.client import DistributedCausalLM
    from rayfin.llm.loading import resolve_model_path

    model = model or swarm.spec.model
    path = run_guarded(resolve_model_path, model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load the tokenizer of {model!r}: {exc}") from None
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    if chat:
        from rayfin.llm.chat import chat_input_ids

        input_ids = chat_input_ids(tokenizer, prompt)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    client = run_guarded(DistributedCausalLM.from_pretrained, path, swarm=name)
    try:
        output = run_guarded(
            client.generate,
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    except ValueError as exc:  # bad sampling options, empty prompt
        raise fail(str(exc)) from None
    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    typer.echo(text.strip() if chat else text)


# -- the adapter hub ---------------------------------------------------------------------------


def _adapter_ref(value: str | None) -> tuple[str | None, int | str | None]:
    """``NAME`` or ``NAME@VERSION`` (a number or an alias)."""
    name, _, version = (value or "").partition("@")
    return name or None, (int(version) if version.isdigit() else version or None)


@app.command()
def sentiment(
    headlines: Annotated[list[str], typer.Argument(help="One or more headlines.")],
    name: NameOption = "default",
    adapter: Annotated[
        str | None,
        typer.Option(
            help="A tuned adapter from the hub: NAME or NAME@VERSION (zero-shot without)."
        ),
    ] = None,
    hub: Annotated[str | None, typer.Option(help="Adapter hub path or s3:// URI.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score news HEADLINES (negative / neutral / positive) on a running swarm."""
    swarm = _join_swarm(name)
    from rayfin.sentiment import LABELS, polarity, predicted_labels
    from rayfin.sentiment.llm import LLMSentimentScorer

    adapter_name, version = _adapter_ref(adapter)
    scorer = run_guarded(
        LLMSentimentScorer.from_options,
        model=swarm.spec.model,
        swarm=name,
        adapter=adapter_name,
        version=version,
        hub=hub,
    )
    scores = run_guarded(scorer.score, headlines)
    rows = [
        {"headline": h, **dict(zip(LABELS, map(float, p), strict=True)), "label": label,
         "sentiment": float(v)}
        for h, p, label, v in zip(headlines, scores, predicted_labels(scores), polarity(scores),
                                  strict=True)
    ]  # fmt: skip
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("headline", *LABELS, "label", "sentiment")
    for row in rows:
        table.add_row(
            row["headline"], *(f"{row[k]:.3f}" for k in LABELS), row["label"],
            f"{row['sentiment']:+.3f}",
        )  # fmt: skip
    console.print(table)


@app.command("tune-sentiment")
def tune_sentiment(
    name: NameOption = "default",
    adapter: Annotated[str, typer.Option(help="Hub name to save the adapter under.")] = (
        "news-sentiment"
    ),
    hub: Annotated[str | None, typer.Option(help="Adapter hub path or s3:// URI.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    rank: Annotated[int, typer.Option(min=1)] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Train a LoRA sentiment adapter on the bundled headlines' train split (on a running
    swarm), score the validation split, and save it to the adapter hub."""
    swarm = _join_swarm(name)
    from rayfin.datasets import load_headlines
    from rayfin.sentiment.llm import LLMSentimentScorer
    from rayfin.sentiment.metrics import evaluate

    scorer = run_guarded(LLMSentimentScorer.from_options, model=swarm.spec.model, swarm=name)
    train, validation = load_headlines("train"), load_headlines("validation")
    report = run_guarded(
        scorer.tune,
        list(train.headline),
        list(train.label),
        rank=rank,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
    )
    scores = evaluate(list(validation.label), scorer.score(list(validation.headline)))
    card = run_guarded(
        scorer.save,
        adapter,
        hub,
        report=report,
        metrics={"validation_accuracy": scores.accuracy, "validation_macro_f1": scores.macro_f1},
    )
    console.print(
        f"saved [bold]{card.name}[/bold] v{card.version}: {report.steps} steps in "
        f"{report.seconds:.0f} s, final loss {report.final_loss:.3f}; validation accuracy "
        f"{scores.accuracy:.1%}, macro-F1 {scores.macro_f1:.3f}"
    )


adapters_app = typer.Typer(
    help="Saved LoRA and prompt-tuning adapters in the adapter hub.", no_args_is_help=True
)
app.add_typer(adapters_app, name="adapters")

HubOption = Annotated[
    str | None,
    typer.Option("--hub", help="Adapter hub, a path or s3:// URI (default: <state_dir>/adapters)."),
]


def _adapter_hub(path: str | None):  # -> rayfin.llm.hub.AdapterHub
    from rayfin.llm.hub import AdapterHub

    return run_guarded(AdapterHub, path)


@adapters_app.command("list")
def adapters_list(
    hub: HubOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the latest version of every adapter in the hub."""
    store = _adapter_hub(hub)
    cards = run_guarded(store.list)
    if as_json:
        console.print_json(json.dumps([card.to_dict() for card in cards]))
        return
    if not cards:
        console.print(f"no adapters in {store.root}", highlight=False)
        return
    table = Table(
        Column("name", no_wrap=True), "latest", "kind", "task", "base model", "parameters",
        "aliases", title=store.root,
    )  # fmt: skip
    for card in cards:
        aliases = run_guarded(store.aliases, card.name)
        table.add_row(
            card.name,
            f"v{card.version}",
            card.kind,
            card.task,
            card.base_model,
            f"{card.num_parameters:,}",
            ", ".join(f"{alias}: v{number}" for alias, number in sorted(aliases.items())),
        )
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version number or alias (default: latest).")
    ] = None,
    hub: HubOption = None,
) -> None:
    """Print the card of one version of adapter NAME, as JSON."""
    store = _adapter_hub(hub)
    card = run_guarded(store.card, name, version)
    aliases = run_guarded(store.aliases, name)
    data = card.to_dict() | {
        "path": card.path,
        "aliases": sorted(alias for alias, number in aliases.items() if number == card.version),
    }
    console.print_json(json.dumps(data))


# -- the points ledger -------------------------------------------------------------------------

points_app = typer.Typer(
    help="Points servers earned and clients spent, read from the points database (no Ray).",
    no_args_is_help=True,
)
app.add_typer(points_app, name="points")

PointsUrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Points database URL (default: the database.points_url setting)."),
]
PointsSchemaOption = Annotated[
    str | None, typer.Option("--schema", help="PostgreSQL schema holding the tables.")
]


def _points_ledger(url: str | None, schema: str | None):  # -> rayfin.llm.points.PointsLedger
    from rayfin.llm.points import PointsLedger

    return run_guarded(PointsLedger, url, schema=schema)


def _points_guarded(func: Any, *args: Any, **kwargs: Any) -> Any:
    """:func:`run_guarded`, and a database that cannot be reached is a clean exit too."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return run_guarded(func, *args, **kwargs)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise fail(f"the points database cannot be used: {str(cause).strip()}") from None


def _cell(value: object) -> str:
    return "" if value is None or value != value else str(value)  # None, or NaN from pandas


@points_app.command("balance")
def points_balance(
    account: Annotated[str | None, typer.Argument(help="One account (default: all).")] = None,
    url: PointsUrlOption = None,
    schema: PointsSchemaOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the points balance of ACCOUNT, or of every account."""
    ledger = _points_ledger(url, schema)
    try:
        if account is not None:
            balances = {account: _points_guarded(ledger.balance, account)}
        else:
            balances = _points_guarded(ledger.balances)
    finally:
        ledger.close()
    if as_json:
        console.print_json(json.dumps(balances))
        return
    if not balances:
        console.print(f"no accounts in {ledger.url}", highlight=False)
        return
    table = Table(Column("account", no_wrap=True), Column("points", justify="right"))
    for name, points in balances.items():
        table.add_row(name, f"{points:,}")
    console.print(table)


@points_app.command("grant")
def points_grant(
    account: Annotated[str, typer.Argument(help="The account credited.")],
    points: Annotated[int, typer.Argument(min=1, help="Points to credit.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, kept in the history.")],
    grant_id: Annotated[
        str | None, typer.Option("--id", help="Grant id: a second grant of it does nothing.")
    ] = None,
    url: PointsUrlOption = None,
    schema: PointsSchemaOption = None,
) -> None:
    """Credit POINTS to ACCOUNT (e.g. a new client's first points)."""
    ledger = _points_ledger(url, schema)
    try:
        granted = _points_guarded(ledger.grant, account, points, reason, grant_id=grant_id)
        balance = _points_guarded(ledger.balance, account)
    finally:
        ledger.close()
    if granted:
        console.print(f"granted {points:,} points to {account}; balance {balance:,}")
    else:
        console.print(f"grant {grant_id} was already made; {account} has {balance:,} points")


@points_app.command("history")
def points_history(
    account: Annotated[str | None, typer.Option("--account", help="One account only.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Newest entries shown.")] = 50,
    url: PointsUrlOption = None,
    schema: PointsSchemaOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the newest earnings, spends and grants, of one account or all."""
    import datetime as dt

    ledger = _points_ledger(url, schema)
    try:
        frame = _points_guarded(ledger.history, account, limit)
    finally:
        ledger.close()
    if as_json:
        console.print_json(frame.to_json(orient="records"))
        return
    table = Table(
        Column("time (UTC)", no_wrap=True), Column("account", no_wrap=True), "kind",
        Column("points", justify="right"), "work", "server", "client", "request",
        Column("tokens", justify="right"), "detail",
    )  # fmt: skip
    for row in frame.itertuples(index=False):
        at = dt.datetime.fromtimestamp(row.at_ns // 1_000_000_000, dt.UTC)
        table.add_row(
            at.strftime("%Y-%m-%d %H:%M:%S"),
            row.account,
            row.kind,
            f"{row.amount:+,}",
            _cell(row.work),
            _cell(row.server_id),
            _cell(row.client),
            _cell(row.request_id),
            f"{row.tokens:,}" if row.tokens else "",
            _cell(row.detail),
        )
    console.print(table)
