"""``rayfin models``: prepare and list model assets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from rayfin.cli.console import console, run_guarded

app = typer.Typer(help="Prepare and list model assets.", no_args_is_help=True)


@app.command()
def prepare(
    name: Annotated[str, typer.Argument(help="Catalogue name, e.g. smollm2-135m.")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="Model cache (default: RAYFIN_MODELS__CACHE_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if prepared.")] = False,
) -> None:
    """Convert a catalogue model's GGUF file to a transformers folder (once)."""
    from rayfin.llm import get_spec, is_prepared, model_dir, prepare_model

    run_guarded(get_spec, name)
    if is_prepared(name, cache_dir) and not force:
        console.print(f"{name} already prepared at {model_dir(name, cache_dir)}")
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        # One bar per step; the de-quantize step advances per tensor.
        tasks: dict[str, TaskID] = {}

        def on_progress(step: str, done: int, total: int) -> None:
            for earlier in tasks.values():
                progress.update(earlier, completed=progress.tasks[earlier].total)
            if step not in tasks:
                tasks[step] = progress.add_task(f"{name}: {step}", total=total)
            progress.update(tasks[step], completed=done, total=total)

        path = run_guarded(
            prepare_model, name, cache_dir=cache_dir, force=force, on_progress=on_progress
        )
        for task in tasks.values():
            progress.update(task, completed=progress.tasks[task].total)
    console.print(f"[green]prepared[/green] {name} at {path}")


@app.command("list")
def list_models(
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache to inspect.")] = None,
) -> None:
    """Show the model catalogue and what is prepared locally."""
    from rayfin.llm import CATALOG, is_prepared, model_dir

    table = Table("name", "prepared", "source package", "description")
    for spec in CATALOG.values():
        ready = is_prepared(spec.name, cache_dir)
        where = str(model_dir(spec.name, cache_dir)) if ready else "no"
        table.add_row(spec.name, where, spec.distribution, spec.description)
    console.print(table)
