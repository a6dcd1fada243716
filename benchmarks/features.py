"""Benchmark: the feature pipeline's cost per day, and online lookup latency for one user's history.

For each world (default, and large unless --skip-large, which keeps the file's large-world figures as they
were measured): simulate into a scratch dir, build the
backlog up to the second-to-last day (first build), then the last day as the daily incremental
run; record dbt / GX / materialise seconds of both (and, per world, every stage's seconds, the rows
written online and the large world's peak resident memory). `--raw-from DIR` reuses the raw
partitions of a large world already simulated into DIR (`BENCH_DATA_DIR=DIR make bench-simulate`).
Then time online lookups of one user's history through the feature service `query_tower_v1`:
in-process SDK and through `feast serve` over HTTP on 127.0.0.1, for SQLite (local profile) and
Redis (production profile, Postgres offline store).
Writes benchmarks/results/features.json. Reference: Feast's published Python server p99 15.3 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from feature_repo import store  # noqa: E402
from feature_repo.stages import FeatureDayReport, build_feature_day  # noqa: E402
from retrieval_core.contract import landed_days, read_table  # noqa: E402
from retrieval_core.settings import Settings  # noqa: E402
from retrieval_core.simulator import simulate, world_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = RESULTS / "features.json"
LOOKUPS = 1000


def _settings(root: Path, profile: str, database: str | None = None) -> Settings:
    extra = {"postgres": {"database": database}, "redis": {"db": 4}} if profile == "production" else {}
    return Settings(profile=profile, data_dir=root / "data", artifacts_dir=root / "artifacts", **extra)


def _pipeline(settings: Settings) -> dict[str, dict[str, float]]:
    return {run: report.seconds for run, report in _pipeline_reports(settings).items()}


def _pipeline_reports(settings: Settings) -> dict[str, FeatureDayReport]:
    """The first build (the backlog up to the second-to-last day), then the last day alone."""
    days = landed_days(settings.raw_dir, "events")
    return {"first_build": build_feature_day(settings, days[-2]), "daily": build_feature_day(settings, days[-1])}


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far (Linux ru_maxrss is in KiB): this process, and its largest child
    (dbt runs in child processes)."""
    return {"pipeline_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "largest_child_process": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "n": len(samples)}


def _active_users(settings: Settings) -> list[int]:
    events = read_table(settings.raw_dir, "events", landed_days(settings.raw_dir, "events")[-3:])
    return events.user_id.dropna().astype(int).unique()[:LOOKUPS].tolist()


def _sdk_latency(settings: Settings, users: list[int]) -> dict[str, float]:
    feast = store.get_store(settings)
    service = feast.get_feature_service("query_tower_v1")
    for u in users[:20]:  # warm-up: the first call loads the registry and opens connections
        feast.get_online_features(features=service, entity_rows=[{"user_id": u}])
    samples = []
    for u in users:
        start = time.perf_counter()
        feast.get_online_features(features=service, entity_rows=[{"user_id": u}]).to_dict()
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_latency(settings: Settings, users: list[int]) -> dict[str, float]:
    port = _free_port()
    env = {**os.environ, "UER_PROFILE": settings.profile, "UER_DATA_DIR": str(settings.data_dir),
           "UER_ARTIFACTS_DIR": str(settings.artifacts_dir), "UER_POSTGRES__DATABASE": settings.postgres.database,
           "UER_REDIS__DB": str(settings.redis.db)}
    server = subprocess.Popen([str(ROOT / ".venv/bin/uer"), "features", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(120):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError("feature server did not come up in 60 s")
            body = {"feature_service": "query_tower_v1"}
            for u in users[:20]:
                client.post("/get-online-features", json={**body, "entities": {"user_id": [u]}})
            samples = []
            for u in users:
                start = time.perf_counter()
                response = client.post("/get-online-features", json={**body, "entities": {"user_id": [u]}})
                response.raise_for_status()
                samples.append(time.perf_counter() - start)
        return _percentiles(samples)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("great_expectations", "feast", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-large", action="store_true", help="only the default world")
    parser.add_argument("--only-large", action="store_true",
                        help="only the large world, merged into the existing result file")
    parser.add_argument("--raw-from", type=Path, default=None,
                        help="a data dir whose raw/ already holds the simulated large world (not simulated again)")
    parser.add_argument("--keep-scratch", action="store_true", help="leave the built worlds in the scratch dir")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="uer-features-"))
    result: dict[str, object] = {"world": {}, "dbt_seconds": {}, "gx_seconds": {}, "materialize_seconds": {},
                                 "online_lookup_ms": {}}
    worlds = ["default"] if args.skip_large else ["default", "large"]
    previous = RESULT_FILE.exists() and json.loads(RESULT_FILE.read_text())
    if args.only_large and previous:
        worlds = ["large"]
        result = {k: v for k, v in previous.items()
                  if k not in ("command", "date", "machine", "large_world_attempt", "large_world_machine")}
        result["default_world_machine"] = previous.get("default_world_machine", previous.get("machine"))
    elif args.skip_large and previous:  # the large world's figures stay, as measured then (``large_world_note``)
        for key in ("world", "dbt_seconds", "gx_seconds", "materialize_seconds", "pipeline_seconds", "published_days",
                    "online_rows_written"):
            if "large" in previous.get(key, {}):
                result.setdefault(key, {})["large"] = previous[key]["large"]
        result |= {key: previous[key] for key in ("peak_rss_mb", "large_world_command", "large_world_note")
                   if key in previous}
        if "large" in previous.get("world", {}):
            result["large_world_machine"] = previous.get("large_world_machine", previous.get("machine"))
            result["large_world_date"] = previous.get("large_world_date", previous.get("date"))
            result.setdefault("large_world_command", previous.get("command"))
    # ``machine`` (written with the result) is where the worlds measured now ran; the other world's is kept apart
    database = f"uer_bench_{uuid.uuid4().hex[:6]}"
    try:
        for world in worlds:
            local = _settings(scratch / world, "local")
            config = world_config(world)
            if world == "large" and args.raw_from:
                local.raw_dir.parent.mkdir(parents=True, exist_ok=True)
                local.raw_dir.symlink_to(args.raw_from.resolve() / "raw", target_is_directory=True)
            else:
                simulate(config, local.raw_dir, local.landing_dir, local.quarantine_dir, local.diagnostics_dir,
                         show_progress=False)
            reports = _pipeline_reports(local)
            timings = {run: report.seconds for run, report in reports.items()}
            result["world"][world] = {"products": config.n_products, "users": config.n_users, "days": config.days}
            for key, name in (("dbt_seconds", "dbt"), ("gx_seconds", "gx"), ("materialize_seconds", "materialize")):
                result[key][world] = {run: t[name] for run, t in timings.items()}
            result.setdefault("pipeline_seconds", {})[world] = timings
            result.setdefault("published_days", {})[world] = {run: [str(reports[run].published_days[0]),
                                                                    str(reports[run].published_days[-1])]
                                                              for run in reports}
            result.setdefault("online_rows_written", {})[world] = {run: r.online_rows for run, r in reports.items()}
            if world == "large":
                result["peak_rss_mb"] = {"large": _peak_rss_mb()}
            print(world, timings, {run: r.online_rows for run, r in reports.items()}, _peak_rss_mb(), flush=True)
            if world == "default":
                users = _active_users(local)
                result["online_lookup_ms"]["sqlite_sdk"] = _sdk_latency(local, users)
                result["online_lookup_ms"]["sqlite_server"] = _server_latency(local, users)
                prod = _settings(scratch / world, "production", database)
                redis.Redis(port=prod.redis.port, db=prod.redis.db).flushdb()
                prod_timings = _pipeline(prod)
                result["production_pipeline_seconds"] = prod_timings
                result["online_lookup_ms"]["redis_sdk"] = _sdk_latency(prod, users)
                result["online_lookup_ms"]["redis_server"] = _server_latency(prod, users)
                print(result["online_lookup_ms"], flush=True)
            if not args.keep_scratch:
                shutil.rmtree(scratch / world, ignore_errors=True)
    finally:
        with psycopg.connect(Settings().postgres.dsn(database="postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{database}" with (force)')
        redis.Redis(db=4).flushdb()
        if args.keep_scratch:
            print(f"scratch kept: {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    result["reference"] = {"feast_python_server_p99_ms": 15.3}
    result["date_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/features.py --skip-large" if args.skip_large else "make bench-features"
    if args.only_large:
        result["large_world_command"] = "python benchmarks/features.py --only-large" + (
            f"  # raw partitions from `uer simulate --world large` (seed {world_config('large').seed})"
            if args.raw_from else "")
        command = previous["command"] if previous else command
    print(write_result("features", result, command=command).read_text())


if __name__ == "__main__":
    main()
