"""Serving benchmark: drive the HTTP retrieval API at fixed request rates on loopback (bounded), then
publish a new index version under load and count failed requests during the alias swap.

Needs a world with a published model (run ``make demo`` first); starts its own API on a free port.
Writes benchmarks/results/serving.json: per rate p50/p95/p99 (ms), errors, requests; the stage
breakdown from the service's Prometheus metrics; refresh seconds; swap_failed_requests; the ANN recall.

Two modes:

* default: the published world as it is, on the configured Milvus (Milvus Lite in the local profile);
* ``--products N --milvus-uri http://127.0.0.1:19530`` (``make bench-serve-1m``): against a real
  standalone Milvus server (``make milvus-start``). The default world's real index is published there
  first (``refresh_index``, if the server does not serve it yet), then a collection of N product
  vectors goes through the same ``IndexLifecycle.publish`` path (insert → flush → wait until no row
  is pending → load → checks → alias swap → prune), so its refresh time is real. The rows beyond the
  real catalogue are synthetic (see ``synthesize``). On top: ANN recall@100 of real query vectors on
  the served index, recall@100 under selective filters (vs exact top-100 among the matching rows), the
  failed requests while a new N-product collection is built and swapped in under load, and an
  index-parameter sweep: the served index type's knob (HNSW ef / IVF_FLAT and SCANN nprobe), then the
  previous collection (no longer serving) re-indexed with another type (``--other-index-type``) and
  swept too. The index type and search parameters come from the settings (e.g.
  ``UER_MILVUS__INDEX_TYPE=SCANN``), as for the API.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from retrieval_core.settings import PROJECT_ROOT, Settings, get_settings  # noqa: E402
from training.boosting import augment  # noqa: E402

# Synthetic product ids start here: far above every real id (the simulator's and Home Depot's are < 1e9).
SYNTHETIC_ID_OFFSET = 1_000_000_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(port: int, timeout_s: float = 180.0) -> subprocess.Popen:
    env = {**os.environ, "UER_SERVING__RELOAD_INTERVAL_S": "1"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("uer")), "serve", "--port", str(port)], env=env,
                               cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, 15)
    raise SystemExit(f"the API did not become ready in {timeout_s:.0f} s")


def percentiles(latencies: list[float]) -> dict[str, float]:
    p = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"p50_ms": round(float(p[0]), 2), "p95_ms": round(float(p[1]), 2), "p99_ms": round(float(p[2]), 2)}


async def drive(url: str, rps: float, seconds: float, queries: list[str], users: list[int]) -> dict:
    """Open-loop load: one request every 1/rps seconds, whatever the latency (at most 64 in flight).

    Latency runs from each request's *scheduled* send time, so time spent queueing behind a saturated
    API counts (no coordinated omission). aiohttp on uvloop: on 2 shared cores the load generator's own
    CPU is taken from the API and Milvus (the httpx client used to take 0.15 cores at ~40 requests/s)."""
    import aiohttp

    latencies, errors = [], 0
    rng = np.random.default_rng(7)
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(session: aiohttp.ClientSession, body: dict, scheduled: float) -> None:
        nonlocal errors
        try:
            async with session.post(url + "/retrieve", json=body) as response:
                await response.read()
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            latencies.append((time.perf_counter() - scheduled) * 1000)
        else:
            errors += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks, start, n = [], time.perf_counter(), int(rps * seconds)
        for i in range(n):
            scheduled = start + i / rps
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user = int(rng.choice(users)) if rng.random() < 0.7 else None
            body = {"query": queries[i % len(queries)], "k": 100, **({"user_id": user} if user else {})}
            tasks.append(asyncio.create_task(one(session, body, scheduled)))
        await asyncio.gather(*tasks)
    return {"rps": rps, **percentiles(latencies), "errors": errors, "requests": n, "latencies_ms": latencies}


def benchmark_users(settings: Settings, n: int = 2000) -> list[int]:
    """The signed-in users the load draws from: the first ``n`` with a published history."""
    from feature_repo.warehouse import read_published

    return read_published(settings, "user_history")["user_id"].unique()[:n].tolist()


def stored_state_share(settings: Settings, users: list[int]) -> float:
    """The share of ``users`` whose state the production model has precomputed (``uer user-states``; the
    daily DAG writes them) and the API would read on a cache miss instead of computing it."""
    from serving.refresh import production_bundle
    from serving.retriever import Retriever

    bundle = production_bundle(settings)
    return round(len(Retriever(settings).stored_states(bundle, users)) / max(len(users), 1), 3)


def run_load(url: str, rps: float, seconds: float, queries: list[str], users: list[int]) -> dict:
    import uvloop

    return uvloop.run(drive(url, rps, seconds, queries, users))


class CpuMeter:
    """Cores used by the API (its process tree), Milvus, this process (the load generator) and the rest of
    the machine between ``start`` and ``stop``: on 2 shared cores, where the time goes."""

    def __init__(self, api_pid: int | None = None):
        import psutil

        self.psutil = psutil
        self.api_pid = api_pid

    def _groups(self) -> dict[str, list]:
        psutil = self.psutil
        groups: dict[str, list] = {"api": [], "milvus": [], "load_generator": [psutil.Process()]}
        try:
            if self.api_pid is not None:
                api = psutil.Process(self.api_pid)
                groups["api"] = [api, *api.children(recursive=True)]  # uer serve → bentoml → its workers
        except psutil.Error:
            pass
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                names = [Path(arg).name for arg in proc.info["cmdline"][:2]]
                if names[0] == "milvus" or "milvus-lite" in names:  # the standalone server, or Milvus Lite's
                    groups["milvus"].append(proc)
            except (psutil.Error, TypeError, IndexError):
                continue
        return groups

    def _sample(self) -> tuple[float, dict[str, float], float]:
        out = {}
        for name, procs in self._groups().items():
            total = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except self.psutil.Error:
                    pass
            out[name] = total
        busy = self.psutil.cpu_times()
        return time.perf_counter(), out, busy.user + busy.system + busy.nice + busy.irq + busy.softirq

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        (t0, a, b0), (t1, b, b1) = self._start, self._sample()
        wall = t1 - t0
        used = {name: round(max(b.get(name, 0.0) - a.get(name, 0.0), 0.0) / wall, 2) for name in b}
        used["whole_machine"] = round((b1 - b0) / wall, 2)
        used["others"] = round(max(used["whole_machine"] - sum(used[n] for n in b), 0.0), 2)
        return used


def service_counters(url: str) -> dict[str, float]:
    """The service's cumulative Prometheus counters that a rate's figures are deltas of, from one scrape:
    user-state cache hits and misses (and where each miss's state came from: stored or computed), /retrieve
    requests and coalescer batches, and garbage-collector
    collections and seconds per generation plus collections of any generation that paused ≥ 10 ms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    number = r"([0-9.e+-]+)"
    out = {f"cache_{result}": float(value) for result, value in
           re.findall(rf'uer_history_cache_total\{{result="(\w+)"\}} {number}', text)}
    out |= {f"state_{source}": float(value) for source, value in
            re.findall(rf'uer_user_state_misses_total\{{source="(\w+)"\}} {number}', text)}
    out |= {f"batch_{kind}": float(value) for kind, value in
            re.findall(rf"^uer_retrieve_batch_size_(sum|count) {number}$", text, re.M)}
    pauses = rf'uer_gc_pause_seconds_(sum|count)\{{generation="(\d)"\}} {number}'
    for kind, generation, value in re.findall(pauses, text):
        out[f"gen{generation}_{'seconds' if kind == 'sum' else 'collections'}"] = float(value)
    short = rf'uer_gc_pause_seconds_bucket\{{generation="\d",le="0.01"\}} {number}'
    under_10ms = sum(float(v) for v in re.findall(short, text))
    out["over_10ms"] = sum(v for k, v in out.items() if k.endswith("_collections")) - under_10ms
    return out


def measured_load(url: str, rates: list[float], seconds: float, queries: list[str], users: list[int],
                  meter: CpuMeter, repeats: int = 1) -> list[dict]:
    """Each rate in turn on the same running API: latency, CPU per process group, the share of signed-in
    requests whose user state was cached (the API keeps its cache from rate to rate), the mean coalescer
    batch, and the API's garbage-collector pauses (they hold the GIL: every request in flight waits).

    ``repeats`` > 1 runs the rates in that many rounds (50, 100, 200, 50, 100, 200, …), so that a drift in
    the shared VM's speed falls on every rate alike. A rate's percentiles are then over all its requests,
    and ``runs`` keeps each round's own figures: their spread is how far a single run can be trusted."""
    runs: dict[float, list[tuple[dict, list[float]]]] = {rps: [] for rps in rates}
    for _ in range(repeats):
        for rps in rates:
            runs[rps].append(_one_rate(url, rps, seconds, queries, users, meter))
            print("rate", runs[rps][-1][0], flush=True)
    return [_pooled(runs[rps]) for rps in rates]


def _one_rate(url: str, rps: float, seconds: float, queries: list[str], users: list[int],
              meter: CpuMeter) -> tuple[dict, list[float]]:
    """One rate's figures, and its requests' latencies (ms) for pooling rounds."""
    meter.start()
    before = service_counters(url)
    out = run_load(url, rps, seconds, queries, users)
    latencies = out.pop("latencies_ms")
    out["cpu_cores_used"] = meter.stop()
    delta = {k: v - before.get(k, 0.0) for k, v in service_counters(url).items()}
    hits, misses = delta.get("cache_hit", 0.0), delta.get("cache_miss", 0.0)
    out["user_cache_hit_ratio"] = round(hits / max(hits + misses, 1), 3)
    out["user_state_misses"] = {source: int(delta.get(f"state_{source}", 0.0)) for source in ("stored", "computed")}
    out["mean_batch_size"] = round(delta.get("batch_sum", 0.0) / max(delta.get("batch_count", 0.0), 1), 2)
    out["gc_pauses"] = {k: round(v, 4) for k, v in delta.items() if k.startswith("gen") or k == "over_10ms"}
    return out, latencies


def _pooled(runs: list[tuple[dict, list[float]]]) -> dict:
    """One rate's rounds as one figure: percentiles over every request, sums of counts, means of the rest."""
    rounds = [figures for figures, _ in runs]
    if len(rounds) == 1:
        return rounds[0]
    latencies = [ms for _, round_latencies in runs for ms in round_latencies]

    def mean(values: list[float]) -> float:
        return round(float(np.mean(values)), 3)

    return {"rps": rounds[0]["rps"], **percentiles(latencies),
            "errors": sum(r["errors"] for r in rounds), "requests": sum(r["requests"] for r in rounds),
            "cpu_cores_used": {k: mean([r["cpu_cores_used"][k] for r in rounds]) for k in rounds[0]["cpu_cores_used"]},
            "user_cache_hit_ratio": mean([r["user_cache_hit_ratio"] for r in rounds]),
            "user_state_misses": {k: sum(r["user_state_misses"][k] for r in rounds)
                                  for k in rounds[0]["user_state_misses"]},
            "mean_batch_size": mean([r["mean_batch_size"] for r in rounds]),
            "p99_ms_per_round": [r["p99_ms"] for r in rounds], "runs": rounds}


def stage_breakdown(url: str) -> dict[str, float]:
    """Mean milliseconds per stage from the service's Prometheus histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    sums = dict(re.findall(r'uer_retrieval_stage_seconds_sum\{stage="(\w+)"\} ([0-9.e+-]+)', text))
    counts = dict(re.findall(r'uer_retrieval_stage_seconds_count\{stage="(\w+)"\} ([0-9.e+-]+)', text))
    return {stage: round(float(sums[stage]) / max(float(counts[stage]), 1) * 1000, 3) for stage in sums}


def under_load(url: str, queries: list[str], rps: float, action: Callable[[], object],
               settle_s: float = 3.0) -> tuple[object, dict]:
    """Run ``action`` while one client sends ``rps`` requests per second (paced, synchronous); keep
    the load ``settle_s`` more seconds (the service follows the alias within reload_interval_s)."""
    latencies, failures, versions, stop = [], [0], [], threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            i, next_at = 0, time.perf_counter()
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    r = http.post(url + "/retrieve", json={"query": queries[i % len(queries)], "k": 100})
                    ok = r.status_code == 200
                    if ok:
                        versions.append(r.json()["index_version"])
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    failures[0] += 1
                i += 1
                next_at += 1 / rps
                time.sleep(max(0.0, next_at - time.perf_counter()))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result = action()
        time.sleep(settle_s)
    finally:
        stop.set()
        thread.join()
    return result, {"swap_failed_requests": failures[0], "swap_requests": len(latencies) + failures[0],
                    "latency_during_refresh_ms": percentiles(latencies),
                    "index_versions_seen": list(dict.fromkeys(versions))}


# -- the N-product mode ------------------------------------------------------------------------------


def invocation() -> str:
    """This run as a command to rerun it: the caller's own ``UER_*`` settings (they change what is measured,
    e.g. ``UER_MILVUS__HNSW_M=8``), then the script and its arguments. Call before ``use_milvus``."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("UER_")
                and not any(secret in k for secret in ("TOKEN", "PASSWORD", "KEY"))]
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parent.parent)
    return " ".join([*settings, f"python {script}", *sys.argv[1:]])


def use_milvus(uri: str) -> None:
    """Point this process and the API it starts at ``uri`` (a running Milvus server: no embedded one)."""
    os.environ["UER_MILVUS__URI"] = uri
    os.environ["UER_MILVUS__EMBEDDED_SERVER"] = "false"
    get_settings.cache_clear()


def synthesize(products: pd.DataFrame, vectors: np.ndarray, channels: list[int], total: int, noise: float,
               seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``total`` rows: the real catalogue, then rows made from randomly sampled real products.

    A synthetic row copies a sampled product's scalar fields (category_path, shop_country, price, currency) and its
    quality columns (the vector's tail beyond the tower channels), and takes its tower vector channel
    by channel plus Gaussian noise of relative norm ``noise``, rescaled to the channel's original norm
    (the towers emit normalised channels times a scale). Its id is ``SYNTHETIC_ID_OFFSET + i``."""
    n_real = len(products)
    if products["product_id"].max() >= SYNTHETIC_ID_OFFSET:
        raise ValueError("real product ids reach the synthetic range")
    extra = total - n_real
    if extra <= 0:
        return products, vectors
    rng = np.random.default_rng(seed)
    source = rng.integers(0, n_real, size=extra)
    out = np.empty((total, vectors.shape[1]), np.float32)
    out[:n_real] = vectors
    chunk = 100_000
    for start in range(0, extra, chunk):
        rows = source[start:start + chunk]
        block = vectors[rows].copy()
        lo = 0
        for width in channels:
            part = block[:, lo:lo + width]
            norm = np.linalg.norm(part, axis=1, keepdims=True)
            noisy = part + rng.standard_normal(part.shape, dtype=np.float32) * (noise * norm / np.sqrt(width))
            scale = np.divide(norm, np.linalg.norm(noisy, axis=1, keepdims=True),
                              out=np.zeros_like(norm), where=norm > 0)
            block[:, lo:lo + width] = noisy * scale
            lo += width
        out[n_real + start:n_real + start + len(rows)] = block
    fields = ["category_path", "shop_country", "price", "currency"]
    synthetic = products[fields].iloc[source].reset_index(drop=True)
    synthetic.insert(0, "product_id", SYNTHETIC_ID_OFFSET + np.arange(extra, dtype=np.int64))
    frame = pd.concat([products[["product_id", *fields]].reset_index(drop=True), synthetic], ignore_index=True)
    return frame, out


def synthetic_catalogue(bundle: object, products: pd.DataFrame, full_vectors: np.ndarray, total: int, noise: float,
                        seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``synthesize`` on the real products' full-width vectors (the towers' channels, then the quality
    columns: ``product_vectors`` of the bundle without its projection), then narrowed as the bundle's own
    ``product_vectors`` narrows (``boosting.augment``), so that the noise is the same whether a model
    narrows or not."""
    config = bundle.model.config
    channels = [w for w in (config.output_dim, getattr(config, "lexical_dim", 0), getattr(config, "semantic_dim", 0))
                if w]
    frame, vectors = synthesize(products, full_vectors, channels, total, noise, seed)
    if bundle.projection is None:
        return frame, vectors
    width = config.embedding_dim
    out = np.empty((len(vectors), bundle.dim), np.float32)
    for start in range(0, len(vectors), 100_000):
        block = vectors[start:start + 100_000]
        out[start:start + len(block)], _ = augment(block[:, :width], block[:, width:], block[:0, :width],
                                                   bundle.boost_weights, bundle.projection)
    return frame, out


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Row indices of the exact inner-product top-k per query (best first), chunked over the rows."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start:start + chunk].T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kth=kk - 1, axis=1)[:, :kk]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        best_rows = np.concatenate([best_rows, top + start], 1)
        keep = np.argsort(-best_scores, axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


def segments(client: object, collection: str) -> list[int]:
    return sorted((int(s.num_rows) for s in client.list_loaded_segments(collection)), reverse=True)


def timed_search(client: object, collection: str, queries: np.ndarray, k: int, params: dict,
                 expr: str = "") -> tuple[list[list[int]], dict]:
    """One query per call, sequentially (the latency a request sees from pymilvus, through the forwarder)."""
    ids, latencies = [], []
    for q in queries:
        start = time.perf_counter()
        hits = client.search(collection, data=[q.tolist()], limit=k, filter=expr, anns_field="embedding",
                             search_params={"params": params})
        latencies.append((time.perf_counter() - start) * 1000)
        ids.append([int(h["id"] if "id" in h else h["product_id"]) for h in hits[0]])
    return ids, percentiles(latencies)


def search_cost(lifecycle: object, collection: str, queries: np.ndarray, nq_values: list[int],
                seconds: float = 8.0) -> list[dict]:
    """Milvus's own CPU and the caller's wall time per search call and per query, for calls of nq queries
    (the API's coalescer sends one call per batch), k=100, through ``IndexLifecycle.search`` — where the
    server's time goes: a fixed cost per call, or the graph walks of each query in every segment."""
    out = []
    for nq in nq_values:
        meter, calls, walls = CpuMeter(), 0, []
        meter.start()
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            batch = queries[(calls * nq) % len(queries):][:nq]
            if len(batch) < nq:
                batch = queries[:nq]
            start = time.perf_counter()
            lifecycle.search(collection, batch, 100)
            walls.append((time.perf_counter() - start) * 1000)
            calls += 1
        used, elapsed_ms = meter.stop(), (time.perf_counter() - began) * 1000
        milvus_ms_per_call = used["milvus"] * elapsed_ms / calls
        out.append({"nq": nq, "calls": calls, "wall_ms_per_call": percentiles(walls),
                    "milvus_cpu_ms_per_call": round(milvus_ms_per_call, 2),
                    "milvus_cpu_ms_per_query": round(milvus_ms_per_call / nq, 2),
                    "caller_cpu_ms_per_call": round(used["load_generator"] * elapsed_ms / calls, 2)})
        print("search cost", out[-1], flush=True)
    return out


def recall(approx: list[list[int]], exact: list[np.ndarray]) -> float:
    return float(np.mean([len(set(a) & set(e.tolist())) / max(len(e), 1) for a, e in zip(approx, exact,
                                                                                        strict=True)]))


def filtered_recall(client: object, collection: str, frame: pd.DataFrame, vectors: np.ndarray,
                    queries: np.ndarray, params: dict) -> list[dict]:
    """Recall@100 of filtered ANN search vs the exact top-100 among the rows matching the filter."""
    from serving.filters import Filters

    ids = frame["product_id"].to_numpy(np.int64)
    shares = frame["category_path"].value_counts(normalize=True)
    category = shares.index[np.argmin(np.abs(shares.to_numpy() - 0.02))]  # the category nearest 2 % of rows
    countries = frame["shop_country"].value_counts(normalize=True)
    country = countries.index[np.argmin(np.abs(countries.to_numpy() - 0.15))]
    # Milvus holds price as DOUBLE (-1 when unknown): compare what it compares
    price = pd.to_numeric(frame["price"], errors="coerce").fillna(-1.0).astype(np.float64)
    lo, hi = (float(round(x, 2)) for x in price[frame["shop_country"] == country].quantile([0.4, 0.6]))
    small = countries.index[-1]
    currency = frame.loc[frame["shop_country"] == country, "currency"].mode()[0]  # prices compare within one
    # The expressions come from the API's own filter model (serving.filters), as a request's would.
    cases = [
        ("one category", Filters(category=[category]),
         (frame["category_path"] == category).to_numpy()),
        ("one country + price range", Filters(shop_country=[country], price_min=lo, price_max=hi, currency=currency),
         ((frame["shop_country"] == country) & (price >= lo) & (price <= hi)
          & (frame["currency"] == currency)).to_numpy()),
        ("one category + the rarest country", Filters(category=[category], shop_country=[small]),
         ((frame["category_path"] == category) & (frame["shop_country"] == small)).to_numpy()),
    ]
    out = []
    for name, filters, mask in cases:
        expr = filters.expression()
        rows = np.flatnonzero(mask)
        exact = [ids[rows[r]] for r in exact_top_k(queries, vectors[rows], 100)]
        approx, latency = timed_search(client, collection, queries, 100, params, expr)
        out.append({"filter": name, "expr": expr, "matching_rows": int(len(rows)),
                    "selectivity": round(len(rows) / len(frame), 5), "recall_at_100": round(recall(approx, exact), 4),
                    **latency})
    return out


class StepTimer:
    """Seconds spent in each step of ``IndexLifecycle.publish`` (wrapping the instance's own methods)."""

    def __init__(self, lifecycle: object):
        self.seconds: dict[str, float] = {}
        for name in ("build", "_wait_indexed", "ensure_loaded", "check", "swap", "prune"):
            setattr(lifecycle, name, self._wrap(name, getattr(lifecycle, name)))
        client = lifecycle.client
        for name in ("insert", "flush", "load_collection"):
            setattr(client, name, self._wrap(name, getattr(client, name)))

    def _wrap(self, name: str, method: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


SWEEP_KNOB = {"HNSW": "ef", "IVF_FLAT": "nprobe", "SCANN": "nprobe"}


def sweep(lifecycle: object, collection: str, index_type: str, values: list[int], queries: np.ndarray,
          exact: list[np.ndarray], build_s: float | None = None) -> list[dict]:
    """Recall@100 and single-query latency of ``collection`` for each ef (HNSW) or nprobe (IVF_FLAT, SCANN;
    SCANN's reorder_k stays the settings')."""
    knob, base = SWEEP_KNOB[index_type], lifecycle.search_params(100, index_type)
    out = []
    for value in values:
        params = {**base, knob: value}
        approx, latency = timed_search(lifecycle.client, collection, queries, 100, params)
        out.append({"index": index_type, **params, "recall_at_100": round(recall(approx, exact), 4), **latency,
                    **({"build_and_load_s": build_s} if build_s is not None else {})})
    return out


def rebuild(lifecycle: object, collection: str, rows: int, index_type: str) -> float:
    """(Re-)index ``collection`` (not serving) as ``index_type`` with the lifecycle's parameters, dropping
    the index it has, if any; returns the seconds from create_index until the query node serves it."""
    client = lifecycle.client
    index_params = lifecycle.index_params(index_type, rows)
    if client.list_indexes(collection):
        client.release_collection(collection)
        client.drop_index(collection, "embedding")
    params = client.prepare_index_params()
    params.add_index(field_name="embedding", index_type=index_type, metric_type="IP", params=index_params)
    start = time.perf_counter()
    client.create_index(collection, params)
    lifecycle._wait_indexed(collection, rows)
    client.load_collection(collection)
    lifecycle.wait_served_from_index(collection)
    return round(time.perf_counter() - start, 1)


@dataclasses.dataclass
class BenchmarkCatalogue:
    """What the Milvus benchmarks index and query: the production model's real catalogue, then synthetic
    rows perturbed from it (``synthetic_catalogue``), and the world's most frequent real queries."""

    bundle: object  # serving.bundle.ModelBundle: the one the rows and queries were made with
    products: pd.DataFrame  # the real catalogue
    frame: pd.DataFrame  # product_id and the filter fields of every row, real first
    vectors: np.ndarray
    query_texts: list[str]  # most frequent first
    queries: np.ndarray  # the first ``n_queries`` texts through the query tower, signed out
    tower_seconds: float  # the real catalogue's features and product tower


def benchmark_catalogue(settings: Settings, total: int, n_queries: int, noise: float = 0.5, texts: int = 500,
                        full_width: bool = False, version: str | None = None) -> BenchmarkCatalogue:
    """``total`` rows of model ``version``'s vectors (default: the production model) — narrowed as it serves
    them, or at the towers' full width with ``full_width`` — and query vectors made the same way. Needs
    ``make demo``."""
    from feature_repo.warehouse import read_published
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings, chosen_registration, production_bundle

    bundle = ModelBundle.load(settings, *chosen_registration(settings, version)) if version else production_bundle(
        settings)
    full = dataclasses.replace(bundle, projection=None)  # synthesized at full width (``synthetic_catalogue``)
    mark = time.perf_counter()
    products, _ = catalogue_with_encodings(settings, bundle, dt.datetime.now(dt.UTC))
    full_vectors = full.product_vectors(products)
    tower_seconds = time.perf_counter() - mark
    served = full if full_width else bundle
    frame, vectors = synthetic_catalogue(served, products, full_vectors, total, noise, settings.seed)
    stats = read_published(settings, "query_stats").sort_values("sessions", ascending=False)
    query_texts = stats["query"].head(max(texts, n_queries)).tolist()
    queries = served.query_vectors([{"query": q} for q in query_texts[:n_queries]])
    return BenchmarkCatalogue(served, products, frame, vectors, query_texts, queries, tower_seconds)


def run_scaled(args: argparse.Namespace) -> None:
    from serving.index import IndexCheckFailed, IndexLifecycle
    from serving.refresh import production_registration, refresh_index

    settings = get_settings()
    lifecycle = IndexLifecycle(settings)
    server_version = lifecycle.client.get_server_version()
    version, bundle_id = production_registration(settings)
    figures: dict[str, object] = {}
    load_start = round(os.getloadavg()[0], 2)  # other work on the same 2 cores skews every latency here

    # 1. The real world, published in this server (what `uer index publish` does nightly).
    base = lifecycle.serving()
    if base is not None and base.model_version == version and base.bundle_id in (None, bundle_id):
        real_rows = int(lifecycle.client.query(base.collection, filter="product_id < " + str(SYNTHETIC_ID_OFFSET),
                                               output_fields=["count(*)"])[0]["count(*)"])
        total_rows = int(lifecycle.client.query(base.collection, filter="",
                                                output_fields=["count(*)"])[0]["count(*)"])
        if real_rows != total_rows:
            base = None  # a synthetic collection left serving by an interrupted run
    if base is None:
        print(f"publishing the real catalogue of model {version} into {settings.milvus.uri}", flush=True)
        report = refresh_index(settings, version)
        base = report.index
        figures["real_refresh"] = {"products": report.products, "seconds": report.seconds,
                                   "ann_recall_at_100": report.checks["ann_recall_at_100"]}

    # 2. N products (real + synthetic) through the real publish path.
    world = benchmark_catalogue(settings, args.products, args.recall_queries, args.noise, version=version)
    products, frame, vectors = world.products, world.frame, world.vectors
    query_texts, queries, tower_seconds = world.query_texts, world.queries, world.tower_seconds
    users = benchmark_users(settings)
    stored_states = stored_state_share(settings, users)
    print(f"{len(frame):,} products ({len(products):,} real), dim {vectors.shape[1]}; {stored_states:.0%} of the "
          f"benchmark users have a stored state; publishing", flush=True)
    timer = StepTimer(lifecycle)
    synthetic: list[str] = []
    api = None
    try:
        start = time.perf_counter()
        try:
            big, checks = lifecycle.publish(version, frame, vectors, queries, bundle_id=world.bundle.bundle_id)
        except IndexCheckFailed as exc:
            print(f"the publish gate refused the collection after {time.perf_counter() - start:.0f} s "
                  f"({timer.take()}): {exc}", flush=True)
            raise
        refresh_seconds = round(time.perf_counter() - start, 1)
        synthetic.append(big.collection)
        breakdown = timer.take()
        print(f"published {big.collection} in {refresh_seconds} s: {breakdown}; {checks}", flush=True)
        client = lifecycle.client
        layout = segments(client, big.collection)  # publish waited until each is served from its index
        print(f"segments {layout}", flush=True)

        # 3. HTTP load at fixed rates against the N-product collection.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api = start_api(port)
        run_load(url, 20, 5, query_texts, users)  # warm-up
        rates = measured_load(url, [float(r) for r in args.rates.split(",")], args.seconds, query_texts, users,
                              CpuMeter(api.pid), args.repeats)
        stages = stage_breakdown(url)

        # 4. Recall of the served index: unfiltered at the serving ef, filtered, then the sweep.
        exact = [frame["product_id"].to_numpy(np.int64)[r] for r in exact_top_k(queries, vectors, 100)]
        approx, serving_latency = timed_search(client, big.collection, queries, 100, lifecycle.search_params())
        served_recall = round(recall(approx, exact), 4)
        print(f"served ANN recall@100 {served_recall} ({serving_latency})", flush=True)
        filtered = filtered_recall(client, big.collection, frame, vectors, queries, lifecycle.search_params())
        print("filtered", filtered, flush=True)
        nprobes = [int(x) for x in args.nprobe.split(",") if x]
        knobs = {"HNSW": [int(x) for x in args.ef.split(",") if x], "IVF_FLAT": nprobes, "SCANN": nprobes}
        served_type = settings.milvus.index_type
        index_sweep = sweep(lifecycle, big.collection, served_type, knobs.get(served_type, []), queries, exact)
        print("sweep", index_sweep, flush=True)
        cost = search_cost(lifecycle, big.collection, queries, [int(n) for n in args.nq.split(",") if n])

        # 5. A new N-product collection built, checked and swapped in while the API serves traffic.
        if args.swap == "rebuild":
            def action() -> object:
                return lifecycle.publish(version, frame, vectors, queries, bundle_id=world.bundle.bundle_id)
        else:
            def action() -> object:
                report = refresh_index(settings, version)
                return report.index, report.checks
        start = time.perf_counter()
        (swapped, swap_checks), swap = under_load(url, query_texts, args.swap_rps, action)
        swap_seconds = round(time.perf_counter() - start, 1)
        if args.swap == "rebuild":
            synthetic.append(swapped.collection)
        swap_breakdown = timer.take()
        print(f"swap under load: {swap_seconds} s, {swap}", flush=True)
        os.killpg(api.pid, 15)
        api = None

        # 6. The other index type on the previous N-product collection (it no longer serves).
        other = args.other_index_type or ("IVF_FLAT" if served_type == "HNSW" else "HNSW")
        if args.other_index and knobs[other]:
            build_s = rebuild(lifecycle, big.collection, len(frame), other)
            index_sweep += sweep(lifecycle, big.collection, other, knobs[other], queries, exact, build_s)
            print("sweep", index_sweep[-len(knobs[other]):], flush=True)
    finally:
        if api is not None:
            os.killpg(api.pid, 15)
        if not args.keep:  # leave the server serving the real catalogue, without the synthetic collections
            serving = lifecycle.serving()
            if serving is not None and serving.collection in synthetic:
                lifecycle.swap(base)
            for name in synthetic:
                if name in lifecycle.client.list_collections():
                    lifecycle.drop(name)

    write_result(args.result, {
        "engine": f"Milvus {server_version} standalone server (PyPI `milvus` 2.3.5, own network namespace, "
                  f"127.0.0.1 forwarder) at {settings.milvus.uri}, serving index {settings.milvus.index_type} "
                  + (f"M={settings.milvus.hnsw_m} efConstruction={settings.milvus.hnsw_ef_construction} "
                     f"ef={settings.milvus.search_ef}" if settings.milvus.index_type == "HNSW" else
                     f"search params {lifecycle.search_params()}"),
        "milvus_settings": {k: v for k, v in settings.milvus.model_dump().items() if k != "token"},
        "env_overrides": {k: v for k, v in os.environ.items() if k.startswith("UER_") and "TOKEN" not in k
                          and "PASSWORD" not in k and "KEY" not in k},
        "products": len(frame), "real_products": len(products), "dim": int(vectors.shape[1]),
        "stored_user_state_share": stored_states, "rates": rates, "stage_mean_ms": stages,
        "refresh_seconds": refresh_seconds, "refresh_breakdown_s": breakdown,
        "product_tower_seconds_real_catalogue": round(tower_seconds, 1),
        "swap_failed_requests": swap["swap_failed_requests"], "swap_requests": swap["swap_requests"],
        "swap_under_load": {"mode": args.swap, "client_rps": args.swap_rps, "seconds": swap_seconds,
                            "breakdown_s": swap_breakdown, "ann_recall_at_100": swap_checks["ann_recall_at_100"],
                            **swap},
        "ann_recall_at_100": served_recall,
        "ann_recall_at_100_publish_check": checks["ann_recall_at_100"],
        "ann_recall_queries": f"{len(queries)} real queries (top by sessions, signed out) through the query tower; "
                              f"exact top-100 by numpy over all {len(frame):,} vectors",
        "served_search_ms": serving_latency,
        "segments_rows": layout,
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "filtered_recall_at_100": filtered,
        "index_sweep": index_sweep,
        "search_cost": cost,
        **figures,
        "note": (f"{len(products):,} real products of the default world plus {len(frame) - len(products):,} "
                 f"synthetic rows: each copies a randomly sampled real product's category_path, shop_country, "
                 f"price and quality columns, and takes its tower vector plus Gaussian noise of relative norm "
                 f"{args.noise} per channel, rescaled to the channel's norm; ids from {SYNTHETIC_ID_OFFSET}. "
                 f"refresh_seconds is IndexLifecycle.publish of all {len(frame):,} vectors (insert, flush, wait "
                 f"until no row is pending, load, checks, alias swap, prune); the embedding step of a real "
                 f"refresh is not in it (the product tower took {tower_seconds:.1f} s for the "
                 f"{len(products):,} real products). ann_recall_at_100 is measured on the served index with "
                 f"the serving search parameters; ann_recall_at_100_publish_check is IndexLifecycle.check's "
                 f"figure inside publish, taken after the query node serves every segment from its index "
                 f"(IndexLifecycle.wait_served_from_index). "
                 f"Load generator (httpx, asyncio), BentoML API and Milvus share the same 2 cores (load "
                 f"average in load_average_1m). Sweep, filtered and served_search latencies: one pymilvus search "
                 f"per call, k=100, sequential, through the forwarder. search_cost: IndexLifecycle.search calls of nq "
                 f"queries in a loop for 8 s each; CPU from the processes' counters (milvus = the server; caller "
                 f"= this process: pymilvus and the request building), divided by calls."),
    }, command=args.command)


# -- the default mode --------------------------------------------------------------------------------


def run_published(args: argparse.Namespace) -> None:
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
    users = benchmark_users(settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start_api(port)
    try:
        run_load(url, 5, 4, queries, users)  # warm-up
        rates = measured_load(url, [float(r) for r in args.rates.split(",")], args.seconds, queries, users,
                              CpuMeter(api.pid), args.repeats)
        stages = stage_breakdown(url)
        # A refresh (new collection, check, alias swap) while a client keeps querying.
        report, swap = under_load(url, queries, args.swap_rps, lambda: refresh_index(settings))
    finally:
        os.killpg(api.pid, 15)
    write_result(args.result, {
        "engine": f"Milvus at {settings.milvus.uri} (embedded Milvus Lite server: {settings.milvus.embedded_server}), "
                  f"index {settings.milvus.index_type}",
        "products": products, "stored_user_state_share": stored_state_share(settings, users), "rates": rates,
        "stage_mean_ms": stages,
        "refresh_seconds": report.seconds["total"], "refresh_breakdown_s": report.seconds,
        "swap_failed_requests": swap["swap_failed_requests"], "swap_requests": swap["swap_requests"],
        "swap_under_load": swap,
        "ann_recall_at_100": report.checks["ann_recall_at_100"],
        "note": "the published world as it is (no synthetic rows)",
    }, command=args.command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=None, help="requests per second, comma separated "
                        "(default 5,10,20,50; with --products 50,100,200)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each rate")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the rates: each rate's percentiles "
                        "over all its rounds' requests, every round's own figures beside them")
    parser.add_argument("--milvus-uri", default=None, help="a running Milvus server (sets UER_MILVUS__URI and "
                        "UER_MILVUS__EMBEDDED_SERVER=false for this run and its API)")
    parser.add_argument("--products", type=int, default=0,
                        help="publish a collection of this many products (real + synthetic) and benchmark it")
    parser.add_argument("--noise", type=float, default=0.5, help="relative noise norm of synthetic vectors")
    parser.add_argument("--recall-queries", type=int, default=200, help="real queries for the recall figures")
    parser.add_argument("--ef", default="100,200,400,800,1600", help="HNSW ef values of the sweep")
    parser.add_argument("--nprobe", default="8,16,32,64,128", help="IVF_FLAT / SCANN nprobe values of the sweep")
    parser.add_argument("--nq", default="1,4,16,32", help="queries per call of the search-cost figures")
    parser.add_argument("--no-other-index", dest="other_index", action="store_false",
                        help="skip re-indexing the previous collection with the other index type")
    parser.add_argument("--other-index-type", choices=["HNSW", "IVF_FLAT", "SCANN"], default=None,
                        help="the other index type (default: IVF_FLAT when serving HNSW, else HNSW)")
    parser.add_argument("--swap", choices=["rebuild", "refresh"], default="rebuild",
                        help="under load: rebuild the N-product collection, or refresh the real catalogue")
    parser.add_argument("--swap-rps", type=float, default=20.0, help="client rate while the swap happens")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic collections (and the alias)")
    parser.add_argument("--result", default=None, help="result file name under benchmarks/results/ (default: "
                        "serving with --products, the issue's 1M record; serving_lite without)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    args.command = invocation()
    if args.milvus_uri:
        use_milvus(args.milvus_uri)
    if args.products:
        args.result = args.result or "serving"
        args.rates = args.rates or "50,100,200"
        run_scaled(args)
    else:
        args.result = args.result or "serving_lite"
        args.rates = args.rates or "5,10,20,50"
        run_published(args)


if __name__ == "__main__":
    main()
