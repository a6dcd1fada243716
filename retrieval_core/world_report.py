"""A readable summary of what landed in ``raw_dir``: the demo prints it after simulating."""

from __future__ import annotations

import duckdb
from rich.console import Console
from rich.table import Table

from retrieval_core.settings import Settings, get_settings


def world_report(settings: Settings) -> Table:
    """Counts per table and per event type, and the most searched queries, read from the contract."""
    raw = settings.raw_dir
    con = duckdb.connect()
    table = Table(title=f"landed raw data in {raw}")
    table.add_column("what")
    table.add_column("value", justify="right")
    days = con.execute(f"select count(distinct ds), min(ds), max(ds) from read_parquet('{raw}/events/*/*.parquet', "
                   "hive_partitioning=true)").fetchone()
    table.add_row("days", f"{days[0]} ({days[1]} .. {days[2]})")
    for name, key in (("catalogue", "product_id"), ("users", "user_id")):
        n = con.execute(f"select count(distinct {key}) from read_parquet('{raw}/{name}/*/*.parquet')").fetchone()[0]
        table.add_row(f"{name} ({key})", f"{n:,}")
    for kind, n in con.execute(f"select event_type, count(*) from read_parquet('{raw}/events/*/*.parquet') "
                           "group by 1 order by 2 desc").fetchall():
        table.add_row(f"events: {kind}", f"{n:,}")
    signed_out, queries = con.execute(
        f"select avg((user_id is null)::int), count(distinct query) "
        f"from read_parquet('{raw}/events/*/*.parquet') where event_type = 'impression'").fetchone()
    table.add_row("signed-out share of impressions", f"{signed_out:.1%}")
    table.add_row("distinct queries", f"{queries:,}")
    top = con.execute(f"select query, count(distinct session_id) n from read_parquet('{raw}/events/*/*.parquet') "
                  "group by 1 order by 2 desc limit 5").fetchall()
    table.add_row("top queries (sessions)", ", ".join(f"{q} ({n})" for q, n in top))
    return table


if __name__ == "__main__":
    Console().print(world_report(get_settings()))
