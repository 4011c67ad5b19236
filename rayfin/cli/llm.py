"""``rayfin llm``: serve a model on a swarm of Ray block servers, inspect it, generate."""

from __future__ import annotations

import json
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table

from rayfin.cli.console import console, err_console, fail, run_guarded

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


def _connect(*, start_local: bool) -> str:
    """Join the Ray cluster at the ``ray.address`` setting and return its GCS address.

    With no address configured, ``start_local`` starts a Ray instance in this process;
    otherwise the cluster running on this machine is looked up (``auto``).
    """
    import socket

    import ray

    from rayfin.cluster import connect_ray
    from rayfin.config import get_settings

    settings = run_guarded(get_settings).ray
    address = settings.address or (None if start_local else "auto")
    hint = "start one with `ray start --head` and set RAYFIN_RAY__ADDRESS=auto"
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # Ray would retry an unreachable GCS for minutes; say so at once instead.
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise fail(f"no Ray cluster answers at {address} ({exc}); {hint}") from None
    try:
        connect_ray(address)
    except ConnectionError as exc:
        raise fail(
            f"cannot join a Ray cluster ({exc}); {hint}. If the cluster uses token "
            "authentication (on by default once ~/.ray/auth_token exists), set "
            "RAY_AUTH_MODE=token here too"
        ) from None
    return ray.get_runtime_context().gcs_address


def _join_swarm(name: str) -> Swarm:
    """The running swarm ``name``, on the cluster :func:`_connect` finds."""
    address = _connect(start_local=False)
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
    max_restarts: Annotated[
        int, typer.Option(min=-1, help="Times Ray restarts a crashed server (-1: always).")
    ] = 0,
    detach: Annotated[
        bool,
        typer.Option(help="Leave the swarm running on the cluster and exit at once."),
    ] = False,
) -> None:
    """Start a swarm serving MODEL; in the foreground until Ctrl-C, or --detach."""
    import signal
    import time

    from rayfin.config import get_settings

    if detach and not run_guarded(get_settings).ray.address:
        raise fail(
            "--detach needs a Ray cluster that outlives this command: start one with "
            "`ray start --head` and set RAYFIN_RAY__ADDRESS=auto"
        )
    if Path(model).expanduser().is_dir():  # servers may not share our working directory
        model = str(Path(model).expanduser().resolve())
    address = _connect(start_local=True)
    import ray

    from rayfin.llm.swarm import launch_swarm

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
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
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
