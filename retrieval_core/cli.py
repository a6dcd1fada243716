"""``uer``: one command line for every stage of the platform.

Each subcommand is a thin shell over a typed stage function; the Airflow DAGs call the same
functions. Run ``uer --help`` or ``uer COMMAND --help``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from retrieval_core.contract import TABLES, ContractViolation, land_partition
from retrieval_core.settings import get_settings

app = typer.Typer(
    help="Unified-embedding personalized retrieval: simulate, land, and run the platform's stages.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@app.command()
def settings() -> None:
    """Print the effective settings (profile defaults + UER_* environment), secrets masked."""
    print(json.dumps(get_settings().masked(), indent=2, default=str))


@app.command()
def simulate(
    world: Annotated[str, typer.Option(help="named world: tiny, default or large")] = "default",
    seed: Annotated[int | None, typer.Option(help="override the world's seed")] = None,
    days: Annotated[int | None, typer.Option(help="override the number of days")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override any world knob, e.g. --set tail_gap_rate=0.3 (repeatable)")] = None,
) -> None:
    """Generate a simulated marketplace and land it, day by day, as raw-data contract partitions.

    Writes data_dir/raw/<table>/ds=YYYY-MM-DD/ (catalogue, users, events) and the latent truth to
    data_dir/diagnostics/ (for tests and analysis; training never reads it).
    """
    from retrieval_core.simulator import simulate as run_simulation
    from retrieval_core.simulator import world_config

    overrides: dict[str, object] = {}
    for item in set_ or []:
        key, _, value = item.partition("=")
        if not _:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    if seed is not None:
        overrides["seed"] = seed
    if days is not None:
        overrides["days"] = days
    try:
        config = world_config(world, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    s = get_settings()
    summary = run_simulation(config, s.raw_dir, s.landing_dir, s.quarantine_dir, s.diagnostics_dir)
    console.print(f"[green]landed[/] {summary.products:,} products, {summary.users:,} users, "
                  f"{summary.events:,} events over {len(summary.days)} days into {s.raw_dir}")


@app.command()
def land(
    table: Annotated[str, typer.Argument(help=f"one of {', '.join(TABLES)}")],
    day: Annotated[str, typer.Argument(help="the partition's day, YYYY-MM-DD")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a parquet file in the contract")],
) -> None:
    """Validate a file against the raw-data contract and publish it as TABLE's partition for DAY.

    A file that breaks the contract is moved to data_dir/quarantine/ with a reason.json, and
    nothing is published: the partition already landed for that day (if any) stays as it was.
    """
    if table not in TABLES:
        raise typer.BadParameter(f"table must be one of {TABLES}, got {table!r}")
    s = get_settings()
    try:
        dest = land_partition(file, table, dt.date.fromisoformat(day), s.raw_dir, s.quarantine_dir)
    except ContractViolation as violation:
        console.print(f"[red]rejected[/] {violation}")
        raise typer.Exit(code=2) from violation
    console.print(f"[green]landed[/] {dest}")


@app.command("land-homedepot")
def land_homedepot() -> None:
    """Land the Home Depot judgments (read from settings.homedepot_dir, never copied) in the contract."""
    from retrieval_core.adapters.homedepot import land_homedepot as run

    s = get_settings()
    try:
        counts = run(s.homedepot_dir, s.raw_dir, s.landing_dir, s.quarantine_dir)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    console.print(f"[green]landed[/] Home Depot: {counts}")


if __name__ == "__main__":
    app()
