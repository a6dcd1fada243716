"""Serving benchmark: drive the HTTP retrieval API at fixed request rates on loopback (bounded), then
publish a new index version under load and count failed requests during the alias swap.

Needs a world with a published index (run ``make demo`` first); starts its own API on a free port.
Writes benchmarks/results/serving.json: per rate p50/p95/p99 (ms), errors, requests; the stage
breakdown from the service's Prometheus metrics; refresh seconds; swap_failed_requests; the ANN recall.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from retrieval_core.settings import PROJECT_ROOT, get_settings  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(port: int) -> subprocess.Popen:
    env = {**os.environ, "UER_SERVING__RELOAD_INTERVAL_S": "1"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("uer")), "serve", "--port", str(port)], env=env,
                               cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, 15)
    raise SystemExit("the API did not become ready in 120 s")


async def drive(url: str, rps: float, seconds: float, queries: list[str], users: list[int]) -> dict:
    """Open-loop load: one request every 1/rps seconds, whatever the latency (at most 64 in flight)."""
    latencies, errors = [], 0
    limit = asyncio.Semaphore(64)
    rng = np.random.default_rng(7)

    async def one(client: httpx.AsyncClient, body: dict) -> None:
        nonlocal errors
        async with limit:
            start = time.perf_counter()
            try:
                response = await client.post(url + "/retrieve", json=body, timeout=30)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1

    async with httpx.AsyncClient() as client:
        tasks, start, n = [], time.perf_counter(), int(rps * seconds)
        for i in range(n):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user = int(rng.choice(users)) if rng.random() < 0.7 else None
            body = {"query": queries[i % len(queries)], "k": 100, **({"user_id": user} if user else {})}
            tasks.append(asyncio.create_task(one(client, body)))
        await asyncio.gather(*tasks)
    p = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"rps": rps, "p50_ms": round(p[0], 2), "p95_ms": round(p[1], 2), "p99_ms": round(p[2], 2),
            "errors": errors, "requests": n}


def stage_breakdown(url: str) -> dict[str, float]:
    """Mean seconds per stage from the service's Prometheus histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    sums = dict(re.findall(r'uer_retrieval_stage_seconds_sum\{stage="(\w+)"\} ([0-9.e+-]+)', text))
    counts = dict(re.findall(r'uer_retrieval_stage_seconds_count\{stage="(\w+)"\} ([0-9.e+-]+)', text))
    return {stage: round(float(sums[stage]) / max(float(counts[stage]), 1) * 1000, 3) for stage in sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="5,10,20,50", help="requests per second, comma separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each rate")
    args = parser.parse_args()
    settings = get_settings()
    from feature_repo.warehouse import read_published
    from serving.index import IndexLifecycle
    from serving.refresh import refresh_index

    lifecycle = IndexLifecycle(settings)
    serving = lifecycle.serving()
    if serving is None:
        raise SystemExit("nothing is published: run `make demo` first")
    products = int(lifecycle.client.query(serving.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
    stats = read_published(settings, "query_stats").sort_values("sessions", ascending=False)
    queries = stats["query"].head(500).tolist()
    users = read_published(settings, "user_history")["user_id"].unique()[:2000].tolist()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start_api(port)
    try:
        asyncio.run(drive(url, 5, 4, queries, users))  # warm-up
        rates = [asyncio.run(drive(url, float(r), args.seconds, queries, users)) for r in args.rates.split(",")]
        stages = stage_breakdown(url)
        # A refresh (new collection, check, alias swap) while a client keeps querying.
        failures, done, stop = [0], [0], threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    r = http.post(url + "/retrieve", json={"query": queries[0], "k": 100})
                    done[0] += 1
                    failures[0] += r.status_code != 200

        thread = threading.Thread(target=client)
        thread.start()
        report = refresh_index(settings)
        time.sleep(3)  # the service follows the alias within reload_interval_s
        stop.set()
        thread.join()
    finally:
        os.killpg(api.pid, 15)
    write_result("serving", {
        "engine": f"milvus-lite (gRPC server on loopback) at {settings.milvus.uri}, index {settings.milvus.index_type}",
        "products": products, "rates": rates, "stage_mean_ms": stages,
        "refresh_seconds": report.seconds["total"], "refresh_breakdown_s": report.seconds,
        "swap_failed_requests": failures[0], "swap_requests": done[0],
        "ann_recall_at_100": report.checks["ann_recall_at_100"],
        "note": "default world (not the 1M-product target): the 1M run on a standalone Milvus server is not done yet",
    }, command="make bench-serve  # " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
