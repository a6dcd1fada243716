"""Index-type benchmark: one Milvus segment of serving vectors, indexed in turn as each index type.

Why one segment: a query's Milvus CPU is a fixed cost per call plus one index search per segment (at 1M
products: 6 sealed segments of ~165k full-width 774-d rows when this was first measured; 6 of ~150k since
the served vectors are narrowed to 262-d, ``boost.serving_dim``). This measures that
per-segment search for each index type on the same rows and queries, without the 10-minute 1M publish.

Rows are built as in ``benchmarks/serving.py`` (the default world's real product vectors, then synthetic
rows perturbed from them); queries are the world's most frequent real queries through the query tower.
Per index type and search parameters: recall@100 vs exact search, wall time per call and the server's
CPU per query at nq 1 and 16. Then the same for narrower vectors (``--dims``: the rows projected on
their top principal directions, HNSW only) with what the narrowing costs in ranking. Needs ``make demo``
and a running standalone server (``make milvus-start``).
Writes benchmarks/results/index_types.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from benchmarks.serving import (  # noqa: E402
    CpuMeter,
    benchmark_catalogue,
    exact_top_k,
    invocation,
    rebuild,
    recall,
    use_milvus,
)
from retrieval_core.settings import get_settings  # noqa: E402
from training.boosting import fit_projection, top_k_kept  # noqa: E402

COLLECTION = "bench_index_types"
# Search parameters tried per index type (build parameters: IndexLifecycle.index_params for the rows).
SEARCHES = {
    "HNSW": [{"ef": 100}, {"ef": 200}],
    "SCANN": [{"nprobe": 32, "reorder_k": 200}, {"nprobe": 64, "reorder_k": 200}, {"nprobe": 64, "reorder_k": 300}],
    "IVF_FLAT": [{"nprobe": 32}, {"nprobe": 64}],
}


def measure(client: object, queries: np.ndarray, exact: list[np.ndarray], params: dict, nq: int,
            min_seconds: float) -> dict:
    """Recall@100, wall ms per call and the server's CPU ms per query for calls of ``nq`` queries, the query
    set repeated until ``min_seconds`` have passed (a pass over 192 queries alone is too short to read CPU)."""
    client.search(COLLECTION, data=queries[:nq].tolist(), limit=100, anns_field="embedding",
                  search_params={"params": params})  # warm the segment's caches
    found, walls, meter, searched = [], [], CpuMeter(), 0
    usable = len(queries) - len(queries) % nq
    meter.start()
    start = time.perf_counter()
    while not searched or time.perf_counter() - start < min_seconds:
        for i in range(0, usable, nq):
            mark = time.perf_counter()
            hits = client.search(COLLECTION, data=queries[i:i + nq].tolist(), limit=100, anns_field="embedding",
                                 search_params={"params": params})
            walls.append(time.perf_counter() - mark)
            if not searched:
                found += [[hit["id"] for hit in row] for row in hits]
        searched += usable
    seconds = time.perf_counter() - start
    cores = meter.stop()["milvus"]
    return {"nq": nq, "queries_searched": searched, "recall_at_100": round(recall(found, exact[:usable]), 4),
            "wall_ms_per_call_p50": round(float(np.median(walls)) * 1000, 2),
            "milvus_cpu_ms_per_query": round(cores * seconds * 1000 / searched, 2)}


def index_and_measure(lifecycle: object, vectors: np.ndarray, queries: np.ndarray, index_types: list[str],
                      min_seconds: float, searches: dict[str, list[dict]]) -> list[dict]:
    """Insert ``vectors`` (one sealed segment, or as many as the server's segment size cuts them into),
    index them as each type in turn and measure ``searches[type]``."""
    from pymilvus import DataType, MilvusClient
    from pymilvus.client.types import SegmentState

    client, batch = lifecycle.client, lifecycle.config.insert_batch
    exact = list(exact_top_k(queries, vectors, 100))  # row positions = the ids inserted below
    if client.has_collection(COLLECTION):
        client.drop_collection(COLLECTION)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
    client.create_collection(COLLECTION, schema=schema)
    results = []
    try:
        for start in range(0, len(vectors), batch):
            stop = min(start + batch, len(vectors))
            client.insert(COLLECTION, [{"id": i, "embedding": vectors[i].tolist()} for i in range(start, stop)])
        client.flush(COLLECTION)
        for index_type in index_types:
            build_s = rebuild(lifecycle, COLLECTION, len(vectors), index_type)
            build_params = lifecycle.index_params(index_type, len(vectors))
            segments = sorted(s.num_rows for s in client.list_persistent_segments(COLLECTION)
                              if s.state == SegmentState.Flushed)
            for search in searches[index_type]:
                for nq in (1, 16):
                    row = {"index": index_type, "build_params": build_params, "search_params": search,
                           "segment_rows": segments, "build_and_load_s": build_s,
                           **measure(client, queries, exact, search, nq, min_seconds)}
                    print(row, flush=True)
                    results.append(row)
    finally:
        client.drop_collection(COLLECTION)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milvus-uri", default="http://127.0.0.1:19530", help="a running standalone server")
    parser.add_argument("--rows", type=int, default=165_000, help="rows of the one segment (1M full width: 6 × ~165k)")
    parser.add_argument("--queries", type=int, default=192, help="real queries (a multiple of 16)")
    parser.add_argument("--types", default="HNSW,SCANN", help="index types, comma separated: HNSW, SCANN, IVF_FLAT")
    parser.add_argument("--seconds", type=float, default=6.0, help="least seconds of calls per measurement")
    parser.add_argument("--dims", default="384,256", help="narrower vectors to measure too (HNSW), comma separated")
    parser.add_argument("--narrow-ef", default="100", help="HNSW ef values searched on the narrower vectors")
    parser.add_argument("--result", default="index_types", help="result file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    command = invocation()
    use_milvus(args.milvus_uri)

    from serving.index import IndexLifecycle

    settings = get_settings()
    lifecycle = IndexLifecycle(settings)
    client = lifecycle.client
    # Full width: the narrower widths below are projections of these (a model that narrows is undone here).
    world = benchmark_catalogue(settings, args.rows, args.queries, full_width=True)
    products, vectors, queries = world.products, world.vectors, world.queries

    results = index_and_measure(lifecycle, vectors, queries, [t for t in args.types.split(",") if t], args.seconds,
                                SEARCHES)
    narrower = []
    real = len(products)
    for width in [int(d) for d in args.dims.split(",") if d]:
        basis = fit_projection(vectors[:real], width, settings.seed)  # fitted on the real catalogue only
        kept = top_k_kept(queries, vectors[:real], basis)
        print(f"{width}-d: the exact top-100 among real products keeps {kept:.3f} of the full vectors' top-100",
              flush=True)
        rows = index_and_measure(lifecycle, vectors @ basis, queries @ basis, ["HNSW"], args.seconds,
                                 {"HNSW": [{"ef": int(ef)} for ef in args.narrow_ef.split(",")]})
        narrower.append({"dim": width, "real_top_100_kept": round(kept, 4), "results": rows})

    write_result(args.result, {
        "engine": f"Milvus {client.get_server_version()} standalone server (PyPI `milvus` 2.3.5, own network "
                  f"namespace, 127.0.0.1 forwarder) at {settings.milvus.uri}",
        "rows": len(vectors), "real_products": len(products), "dim": int(vectors.shape[1]), "k": 100,
        "queries": len(queries), "results": results, "narrower_vectors": narrower,
        "note": "One sealed segment (segment_rows: what the server made of the rows), re-indexed "
                "as each type in turn; rows as in benchmarks/serving.py (real product vectors, then rows perturbed "
                "from them, noise 0.5); queries: the most frequent real queries through the query tower. "
                "milvus_cpu_ms_per_query: the server process's CPU while the calls ran, divided by the queries; at "
                "nq 1 it includes the fixed cost of a call (~2 ms), at nq 16 mostly the index search itself. "
                "narrower_vectors: the same rows and queries projected on the top principal directions (uncentred "
                "SVD, inner products kept) of the rows, HNSW at the first search parameters; recall_at_100 there is "
                "against exact search of the projected vectors, and real_top_100_kept is the share of each query's "
                "exact top-100 among the 20k real products (full vectors) that exact search of the projected "
                "vectors still returns: what the narrowing itself costs in ranking, before any ANN error.",
    }, command=command)


if __name__ == "__main__":
    main()
