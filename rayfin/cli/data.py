"""``rayfin data``: the bundled market datasets."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from rayfin.cli.console import console, run_guarded

app = typer.Typer(help="Bundled market datasets.", no_args_is_help=True)


@app.command("list")
def list_data() -> None:
    """List the bundled datasets with their size, span and licence."""
    from rayfin.datasets import dataset_path, list_datasets

    table = Table("name", "rows", "span", "size", "licence", "description")
    for info in list_datasets():
        size = dataset_path(info.name).stat().st_size
        table.add_row(
            info.name,
            f"{info.rows:,}",
            f"{info.start} to {info.end}",
            f"{size / 1024:,.0f} KiB",
            f"{info.license} ({info.source})",
            info.description,
        )
    console.print(table)


@app.command()
def head(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. es-ticks.")],
    rows: Annotated[int, typer.Option("--rows", "-n", min=1, help="Rows to show.")] = 5,
) -> None:
    """Show the first rows of a dataset, typed as the loaders return them."""
    from rayfin.datasets import load_dataset

    frame = run_guarded(load_dataset, name)
    console.print(frame.head(rows).to_string(), highlight=False)
