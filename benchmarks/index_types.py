"""Index-type benchmark: one Milvus segment of serving vectors, indexed in turn as each index type.

Why one segment: at 1M products the served collection is 6 sealed segments of ~165k rows (774-d), and a
query's Milvus CPU is a fixed cost per call plus one index search per segment. This measures that
per-segment search for each index type on the same rows and queries, without the 10-minute 1M publish.

Rows are built as in ``benchmarks/serving.py`` (the default world's real product vectors, then synthetic
rows perturbed from them); queries are the world's most frequent real queries through the query tower.
Per index type and search parameters: recall@100 vs exact search, wall time per call and the server's
CPU per query at nq 1 and 16. Needs ``make demo`` and a running standalone server (``make milvus-start``).
Writes benchmarks/results/index_types.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from benchmarks.serving import CpuMeter, exact_top_k, invocation, recall, synthesize, use_milvus  # noqa: E402
from retrieval_core.settings import get_settings  # noqa: E402

COLLECTION = "bench_index_types"
# Search parameters tried per index type (build parameters: IndexLifecycle.index_params for the rows).
SEARCHES = {
    "HNSW": [{"ef": 100}, {"ef": 200}],
    "SCANN": [{"nprobe": 32, "reorder_k": 200}, {"nprobe": 64, "reorder_k": 200}, {"nprobe": 64, "reorder_k": 300}],
    "IVF_FLAT": [{"nprobe": 32}, {"nprobe": 64}],
}


def measure(client: object, queries: np.ndarray, exact: list[np.ndarray], params: dict, nq: int) -> dict:
    """Recall@100, wall ms per call and the server's CPU ms per query for calls of ``nq`` queries."""
    client.search(COLLECTION, data=queries[:nq].tolist(), limit=100, anns_field="embedding",
                  search_params={"params": params})  # warm the segment's caches
    found, walls, meter = [], [], CpuMeter()
    meter.start()
    start = time.perf_counter()
    usable = len(queries) - len(queries) % nq
    for i in range(0, usable, nq):
        mark = time.perf_counter()
        hits = client.search(COLLECTION, data=queries[i:i + nq].tolist(), limit=100, anns_field="embedding",
                             search_params={"params": params})
        walls.append(time.perf_counter() - mark)
        found += [[hit["id"] for hit in row] for row in hits]
    cores = meter.stop()["milvus"]
    seconds = time.perf_counter() - start
    return {"nq": nq, "recall_at_100": round(recall(found, exact[:usable]), 4),
            "wall_ms_per_call_p50": round(float(np.median(walls)) * 1000, 2),
            "milvus_cpu_ms_per_query": round(cores * seconds * 1000 / usable, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="a running standalone server")
    parser.add_argument("--rows", type=int, default=165_000, help="rows of the one segment (1M: 6 × ~165k)")
    parser.add_argument("--queries", type=int, default=192, help="real queries (a multiple of 16)")
    parser.add_argument("--types", default="HNSW,SCANN", help="index types, comma separated: HNSW, SCANN, IVF_FLAT")
    args = parser.parse_args()
    command = invocation()
    use_milvus(args.milvus_uri)

    from pymilvus import DataType, MilvusClient

    from feature_repo.warehouse import read_published
    from serving.bundle import ModelBundle
    from serving.index import IndexLifecycle
    from serving.refresh import catalogue_with_encodings, production_model_version

    settings = get_settings()
    lifecycle = IndexLifecycle(settings)
    client = lifecycle.client
    bundle = ModelBundle.load(settings, production_model_version(settings))
    products, _ = catalogue_with_encodings(settings, bundle, dt.datetime.now(dt.UTC))
    config = bundle.model.config
    channels = [w for w in (config.output_dim, config.lexical_dim, config.semantic_dim) if w]
    frame, vectors = synthesize(products, bundle.product_vectors(products), channels, args.rows, 0.5, settings.seed)
    stats = read_published(settings, "query_stats").sort_values("sessions", ascending=False)
    queries = bundle.query_vectors([{"query": q} for q in stats["query"].head(args.queries).tolist()])
    exact = [row for row in exact_top_k(queries, vectors, 100)]  # row positions = the ids inserted below

    if client.has_collection(COLLECTION):
        client.drop_collection(COLLECTION)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
    client.create_collection(COLLECTION, schema=schema)
    results = []
    try:
        for start in range(0, len(vectors), settings.milvus.insert_batch):
            stop = min(start + settings.milvus.insert_batch, len(vectors))
            client.insert(COLLECTION, [{"id": i, "embedding": vectors[i].tolist()} for i in range(start, stop)])
        client.flush(COLLECTION)
        for index_type in [t for t in args.types.split(",") if t]:
            build_params = lifecycle.index_params(index_type, len(vectors))
            if index_type != args.types.split(",")[0]:
                client.release_collection(COLLECTION)
                client.drop_index(COLLECTION, "embedding")
            params = client.prepare_index_params()
            params.add_index(field_name="embedding", index_type=index_type, metric_type="IP", params=build_params)
            mark = time.perf_counter()
            client.create_index(COLLECTION, params)
            lifecycle._wait_indexed(COLLECTION, len(vectors))
            client.load_collection(COLLECTION)
            lifecycle.wait_served_from_index(COLLECTION)
            build_s = round(time.perf_counter() - mark, 1)
            for search in SEARCHES[index_type]:
                for nq in (1, 16):
                    row = {"index": index_type, "build_params": build_params, "search_params": search,
                           "build_and_load_s": build_s, **measure(client, queries, exact, search, nq)}
                    print(row, flush=True)
                    results.append(row)
    finally:
        client.drop_collection(COLLECTION)

    write_result("index_types", {
        "engine": f"Milvus {client.get_server_version()} standalone server (PyPI `milvus` 2.3.5, own network "
                  f"namespace, 127.0.0.1 forwarder) at {settings.milvus.uri}",
        "rows": len(vectors), "real_products": len(products), "dim": int(vectors.shape[1]), "k": 100,
        "queries": len(queries), "results": results,
        "note": "One sealed segment (the size of each of the 6 segments of the 1M serving collection), re-indexed "
                "as each type in turn; rows as in benchmarks/serving.py (real product vectors, then rows perturbed "
                "from them, noise 0.5); queries: the most frequent real queries through the query tower. "
                "milvus_cpu_ms_per_query: the server process's CPU while the calls ran, divided by the queries; at "
                "nq 1 it includes the fixed cost of a call (~2 ms), at nq 16 mostly the index search itself.",
    }, command=command)


if __name__ == "__main__":
    main()
