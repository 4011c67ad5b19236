"""``rayfin serve``: the HTTP API on Ray Serve (start, status, stop), its keys and its spec."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from rayfin.cli.cluster import join_ray
from rayfin.cli.console import console, err_console, fail, run_guarded, sigterm_as_ctrl_c

app = typer.Typer(help="The HTTP API (Ray Serve): start, status, stop, keys.", no_args_is_help=True)

HostOption = Annotated[str | None, typer.Option(help="Listen address (default: serve.host).")]
PortOption = Annotated[
    int | None, typer.Option(min=1, max=65535, help="HTTP port (default: serve.port).")
]


@app.command()
def start(
    host: HostOption = None,
    port: PortOption = None,
    detach: Annotated[
        bool, typer.Option(help="Leave the API running on the cluster and exit at once.")
    ] = False,
    llm: Annotated[
        bool, typer.Option(help="Deploy the LLM endpoints (/v1/generate, /v1/sentiment).")
    ] = True,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Ingress replicas (default: serve.replicas).")
    ] = None,
    dev_keys: Annotated[
        bool,
        typer.Option(
            help="Make a read and a trade key for this run and print them (local use; "
            "configure serve.api_keys for anything shared)."
        ),
    ] = False,
) -> None:
    """Serve the API over the configured ledger, model registry and LLM swarm; in the
    foreground until Ctrl-C, or --detach."""
    from rayfin.config import ApiKey, get_settings
    from rayfin.serve.app import ApiOptions
    from rayfin.serve.auth import digest, new_key

    settings = run_guarded(get_settings)
    if detach and not settings.ray.address:
        raise fail(
            "--detach needs a Ray cluster that outlives this command: start one with "
            "`ray start --head` and set RAYFIN_RAY__ADDRESS=auto"
        )
    overrides: dict[str, object] = {}
    if replicas is not None:
        overrides["replicas"] = replicas
    if not llm:
        overrides["llm"] = None
    options = run_guarded(ApiOptions.from_settings, settings, **overrides)
    printed: dict[str, str] = {}
    if dev_keys:
        printed = {role: new_key() for role in ("read", "trade")}
        extra = tuple(
            ApiKey(name=f"dev-{role}", role=role, sha256=digest(key))  # type: ignore[arg-type]
            for role, key in printed.items()
        )
        options = replace(options, keys=options.keys + extra)
    address = join_ray(start_local=True)
    from rayfin.serve.deployment import deploy, undeploy

    serve_settings = settings.serve
    with sigterm_as_ctrl_c():
        try:
            with console.status("deploying the API on Ray Serve..."):
                url = run_guarded(
                    deploy,
                    options,
                    host=host or serve_settings.host,
                    port=port or serve_settings.port,
                )
        except KeyboardInterrupt:
            err_console.print("interrupted while starting; stopping")
            raise typer.Exit(130) from None
        console.print(f"[green]rayfin API[/green] at {url} (Ray at {address})", highlight=False)
        console.print(
            f"dashboard: {url}/dashboard\nOpenAPI:   {url}/docs\nmetrics:   {url}/metrics",
            highlight=False,
            markup=False,
        )
        for role, key in printed.items():
            console.print(f"{role} key: {key}", highlight=False, markup=False, soft_wrap=True)
        if detach:
            console.print("detached; stop it with: rayfin serve stop", highlight=False)
            return
        console.print("serving; press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping the API")
        finally:
            undeploy()
        console.print("stopped")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the API's deployments and replicas on the cluster; exit 3 when it is not running."""
    join_ray(start_local=False)
    from ray import serve

    from rayfin.serve.deployment import APP_NAME

    apps = serve.status().applications
    found = apps.get(APP_NAME)
    if found is None:
        if as_json:
            print(json.dumps({"running": False}))
        else:
            console.print("the rayfin API is not running")
        raise typer.Exit(3)
    data = {
        "running": True,
        "status": str(found.status),
        "deployments": {
            name: {"status": str(d.status), "replicas": dict(d.replica_states)}
            for name, d in found.deployments.items()
        },
    }
    if as_json:
        print(json.dumps(data))
        return
    console.print(f"rayfin API: {data['status']}")
    for name, d in data["deployments"].items():  # type: ignore[union-attr]
        console.print(f"  {name}: {d['status']}, replicas {d['replicas']}")


@app.command()
def stop() -> None:
    """Remove the API (and Serve) from the cluster (e.g. one started with --detach)."""
    join_ray(start_local=False)
    from rayfin.serve.deployment import undeploy

    undeploy()
    console.print("stopped the rayfin API")


@app.command()
def keygen(
    name: Annotated[str, typer.Option(help="Who holds the key.")] = "researcher",
    role: Annotated[str, typer.Option(help="read, or trade (may promote models).")] = "read",
) -> None:
    """Make a new API key: the key to hand over, and the settings entry (its SHA-256)."""
    from rayfin.config import ApiKey
    from rayfin.serve.auth import ROLES, digest, new_key

    if role not in ROLES:
        raise typer.BadParameter(f"--role: expected one of {', '.join(ROLES)}")
    key = new_key()
    entry = run_guarded(ApiKey, name=name, role=role, sha256=digest(key))
    console.print(
        f"key (give it to {name}; it is not stored): {key}", highlight=False, soft_wrap=True
    )
    console.print("settings entry (rayfin.yaml), which holds only its digest:")
    console.print(
        f"serve:\n  api_keys:\n    - name: {entry.name}\n      role: {entry.role}\n"
        f"      sha256: {entry.sha256}",
        highlight=False,
        markup=False,
    )


@app.command()
def openapi(
    out: Annotated[Path | None, typer.Option(help="Write the spec here (else stdout).")] = None,
) -> None:
    """Print the API's OpenAPI spec (JSON), with its examples."""
    from rayfin.serve.app import openapi_spec

    text = json.dumps(openapi_spec(), indent=2) + "\n"
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        console.print(f"wrote {out}")
