"""What the retrieval API's own steps cost in CPU, in process (no HTTP, no Milvus): the numbers behind
``serving.blas_threads`` and the per-request costs quoted in the README's serving section.

* the query projection (``training.boosting.project_queries``, float64, 768 → 256) for batches of 1–16
  rows with numpy's BLAS on one and on two threads, on an idle machine and with every core busy (two
  spinning processes stand in for Milvus and the HTTP workers);
* the query tower for one signed-out query, and the share of its text encoders (lexical, semantic);
* a user-state cache miss: the ``query_tower_v1`` lookup in the Feast online store, then the tower's
  user state (``ModelBundle.user_states``), for 1 and 8 users; and the same miss with the states
  precomputed (``uer user-states``, timed here too): the ``query_tower_state_v1`` lookup and unpacking;
* pruning one bundle's states from the online store and the offline source (``uer prune-retired``);
* a week of retired versions' product embeddings: what they add to a refresh's read of the catalogue
  (``product_tower_v1``, Feast's point-in-time join) and to the disk, and pruning them.

CPU is this process's (all its threads: a spinning BLAS thread counts) per call. Needs ``make demo``.
Writes benchmarks/results/api_costs.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from benchmarks.serving import benchmark_users, invocation  # noqa: E402
from retrieval_core.settings import get_settings  # noqa: E402


def cost(call: Callable[[], object], seconds: float) -> dict[str, float]:
    """Wall and process-CPU milliseconds per call, over at least ``seconds`` of calls (after one warm-up)."""
    call()
    calls, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        call()
        calls += 1
    return {"wall_ms": round((time.perf_counter() - wall) * 1000 / calls, 3),
            "cpu_ms": round((time.process_time() - cpu) * 1000 / calls, 3), "calls": calls}


def busy_cores(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="least seconds of calls per figure")
    parser.add_argument("--result", default="api_costs", help="result file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    command = invocation()

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from threadpoolctl import threadpool_limits

    from feature_repo.store import get_store
    from feature_repo.warehouse import (
        EMBEDDINGS,
        USER_STATES,
        WRITTEN_SOURCES,
        features_dir,
        version_rows,
        write_version,
    )
    from serving.refresh import production_bundle
    from serving.retention import prune_product_embeddings, prune_user_states
    from serving.retriever import Retriever
    from serving.service import limit_compute_threads
    from serving.user_states import publish_user_states
    from training.batching import query_batch
    from training.boosting import project_queries
    from training.dataset import product_features

    settings = get_settings()
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(settings.seed)
    projection = rng.standard_normal((768, 256))  # the shape and dtype the API projects queries with

    projection_rows = []
    for load in ("idle", "all cores busy"):
        hogs = busy_cores(cores) if load != "idle" else []
        try:
            for threads in (1, 2):
                with threadpool_limits(limits=threads, user_api="blas"):
                    for rows in (1, 2, 4, 16):
                        queries = rng.standard_normal((rows, 768)).astype(np.float32)
                        row = {"load": load, "blas_threads": threads, "rows": rows,
                               **cost(lambda q=queries: project_queries(q, projection), args.seconds)}
                        print(row, flush=True)
                        projection_rows.append(row)
        finally:
            for hog in hogs:
                hog.kill()

    limit_compute_threads(settings.serving)  # as in the API process from here on
    bundle = production_bundle(settings)
    tower = bundle.model.query_tower
    signed_out = bundle.user_states([{}])
    text = [{"query": "linen dress for summer"}]
    terms = query_batch(text, bundle.model.config).terms
    with torch.inference_mode():
        query_tower = {"one_query_ms": cost(lambda: bundle.query_vectors(text, signed_out), args.seconds),
                       **{f"{type(encoder).__name__}_ms": cost(lambda e=encoder: e(terms), args.seconds)
                          for encoder, _ in tower._text_channels()}}
    print(query_tower, flush=True)

    retriever = Retriever(settings)
    users = benchmark_users(settings)
    rows = list(retriever.histories(users[:8]).values())
    picks = iter(range(10**9))  # a different user per lookup: the online store's own caches stay cold

    def lookup(n: int) -> Callable[[], object]:
        return lambda: retriever.histories([users[(next(picks) * n + i) % len(users)] for i in range(n)])

    def stored(n: int) -> Callable[[], object]:
        return lambda: retriever.stored_states(bundle, [users[(next(picks) * n + i) % len(users)] for i in range(n)])

    published = publish_user_states(settings, bundle.model_version)
    assert len(retriever.stored_states(bundle, users[:8])) == 8, "the benchmark users have no stored state"
    miss = {"feast_lookup_1_user": cost(lookup(1), args.seconds),
            "feast_lookup_8_users": cost(lookup(8), args.seconds),
            "user_state_1_user": cost(lambda: bundle.user_states(rows[:1]), args.seconds),
            "user_state_8_users": cost(lambda: bundle.user_states(rows), args.seconds),
            "precomputed_state_1_user": cost(stored(1), args.seconds),
            "precomputed_state_8_users": cost(stored(8), args.seconds)}
    print(miss, flush=True)

    # Pruning one bundle's full set of states: the same states copied under a bundle that serves nowhere.
    retired = f"{bundle.model_version}@retired"
    copy = pq.read_table(features_dir(settings) / USER_STATES / f"version={bundle.bundle_id}")
    copy = copy.set_column(copy.schema.get_field_index("model_bundle"), "model_bundle",
                           pa.array([retired] * copy.num_rows))
    write_version(settings, USER_STATES, copy, retired)
    get_store(settings).write_to_online_store(USER_STATES, copy.to_pandas(types_mapper=pd.ArrowDtype))
    mark = time.perf_counter()
    pruned = prune_user_states(settings)
    prune = {"bundles": len(pruned), "users": copy.num_rows, "seconds": round(time.perf_counter() - mark, 3)}
    assert pruned == [retired], pruned
    print(prune, flush=True)

    # Seven retired versions' product embeddings (production's rows copied, a day older each, so production's
    # still win the join) as a week of retraining without pruning would leave them.
    source = features_dir(settings) / EMBEDDINGS
    names = WRITTEN_SOURCES[EMBEDDINGS][0].names
    own = version_rows(settings, EMBEDDINGS, bundle.bundle_id, names)
    own = (own if own.num_rows else version_rows(settings, EMBEDDINGS, bundle.model_version, names)).to_pandas()

    def catalogue_read() -> float:  # the read every refresh starts with
        mark = time.perf_counter()
        product_features(settings, dt.datetime.now(dt.UTC))
        return round(time.perf_counter() - mark, 3)

    def source_mb() -> float:
        return round(sum(f.stat().st_size for f in source.glob("*/*.parquet")) / 2**20, 1)

    embeddings = {"products": len(own), "read_seconds_one_version": min(
        catalogue_read() for _ in range(3)), "source_mb_one_version": source_mb()}
    for day in range(1, 8):
        version = f"{bundle.model_version}-retired-{day}"
        write_version(settings, EMBEDDINGS, pa.Table.from_pandas(own.assign(
            embedding_version=version, event_timestamp=own["event_timestamp"] - pd.Timedelta(days=day)),
            preserve_index=False), version)
    embeddings |= {"retired_versions": 7, "read_seconds_eight_versions": min(catalogue_read() for _ in range(3)),
                   "source_mb_eight_versions": source_mb()}
    mark = time.perf_counter()
    pruned = prune_product_embeddings(settings)
    embeddings |= {"prune_seconds": round(time.perf_counter() - mark, 3),
                   "read_seconds_after_prune": min(catalogue_read() for _ in range(3)),
                   "source_mb_after_prune": source_mb()}
    assert sum("-retired-" in key for key in pruned) == 7, pruned
    print(embeddings, flush=True)

    write_result(args.result, {
        "model_version": bundle.model_version, "online_store": settings.online_store,
        "torch_threads": torch.get_num_threads(), "query_projection": projection_rows,
        "query_tower": query_tower, "user_state_miss": miss,
        "user_states_publish": {"users": published.users, "with_history": published.personalized,
                                "seconds": published.seconds},
        "user_states_prune": prune, "product_embeddings_retention": embeddings,
        "note": "Milliseconds per call in this process (cpu_ms counts every thread of it). query_projection: "
                "project_queries of `rows` float32 queries with a 768x256 float64 projection, numpy's BLAS "
                "limited to `blas_threads` (threadpoolctl), with and without one spinning process per core. "
                "query_tower and user_state_miss run as the API does (serving.torch_threads, "
                "serving.blas_threads): one signed-out query's vector (tower + projection + boosting columns) "
                "and the tower's text encoders on its terms; a cache miss reads query_tower_v1 from the Feast "
                "online store (Retriever.histories) and computes the users' state (ModelBundle.user_states); "
                "with precomputed states it reads query_tower_state_v1 and unpacks them instead "
                "(Retriever.stored_states). user_states_publish: `uer user-states` for every materialised user. "
                "user_states_prune: serving.retention.prune_user_states (part of `uer prune-retired`) removing one "
                "bundle that serves nowhere (a copy of those states under another bundle id), online and offline, "
                "its live-bundle lookup included. product_embeddings_retention: training.dataset.product_features "
                "(the catalogue's product_tower_v1 as every refresh reads it; best of 3) with production's "
                "embeddings alone, with 7 retired versions' copies beside them (a day older each), and after "
                "serving.retention.prune_product_embeddings removed them; source_mb: the source's parquet files.",
    }, command=command)


if __name__ == "__main__":
    main()
