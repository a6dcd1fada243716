"""Benchmark: simulate the large world (>= 1M products, >= 1M users, >= 20M events over 30 days).

Runs ``uer simulate --world large`` as a child process in a scratch data dir, measuring its wall
time and peak resident memory. Targets (issue): <= 15 minutes, <= 8 GB on 2 cores. Not asserted:
the figures are written to benchmarks/results/simulate_large.json.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    data_dir = Path(os.environ.get("BENCH_DATA_DIR") or tempfile.mkdtemp(prefix="uer-large-"))
    command = [str(ROOT / ".venv/bin/uer"), "simulate", "--world", "large"]
    env = {**os.environ, "UER_DATA_DIR": str(data_dir)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    con = duckdb.connect()
    raw = data_dir / "raw"

    def scalar(sql: str) -> int:
        return con.execute(sql).fetchone()[0]

    products = scalar(f"select count(distinct product_id) from read_parquet('{raw}/catalogue/*/*.parquet')")
    users = scalar(f"select count(distinct user_id) from read_parquet('{raw}/users/*/*.parquet')")
    events = scalar(f"select count(*) from read_parquet('{raw}/events/*/*.parquet')")
    days = scalar(f"select count(distinct ds) from read_parquet('{raw}/events/*/*.parquet', hive_partitioning=true)")
    disk_mb = sum(p.stat().st_size for p in raw.rglob("*.parquet")) / 2**20
    path = write_result("simulate_large", {
        "products": products, "users": users, "events": events, "days": days,
        "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb, 1), "raw_parquet_mb": round(disk_mb, 1),
        "targets": {"seconds": 900, "peak_rss_mb": 8192},
    }, command="make bench-simulate  # = " + " ".join(command[1:]))
    print(path.read_text())
    if "BENCH_DATA_DIR" not in os.environ:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
