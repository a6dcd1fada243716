"""HNSW recall against graph size, on the rows the 1M serving benchmark indexes — without Milvus.

Why: Milvus searches each sealed segment's HNSW graph and merges the results, so fewer, larger segments
would mean fewer graph walks per query (the largest share of Milvus's CPU per query at 1M). One 1M-row
segment in Milvus 2.3.5 answered with recall@100 0.23–0.28, and it was not known whether that was the
server or the rows. This builds faiss's HNSW (the same graph: M, efConstruction, ef; inner product) on
the first N of the same rows, for several N, and measures recall@100 against exact search with the
world's most frequent real queries — if faiss loses recall with N too, the rows (real products plus
~50 noisy copies of each) are what a large graph handles badly.

Rows as in ``benchmarks/serving.py`` (``benchmark_catalogue``, narrowed as the production bundle narrows).
Needs ``make demo``. Writes benchmarks/results/hnsw_scale.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import write_result  # noqa: E402
from benchmarks.serving import benchmark_catalogue, exact_top_k, invocation, recall  # noqa: E402
from retrieval_core.settings import get_settings  # noqa: E402


def measure(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, m: int, ef_construction: int,
            efs: list[int], k: int = 100) -> list[dict]:
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    start = time.perf_counter()
    index.add(vectors)
    build_s = time.perf_counter() - start
    rows = []
    for ef in efs:
        index.hnsw.efSearch = max(ef, k)
        cpu = time.process_time()
        _, found = index.search(queries, k)
        cpu_ms = (time.process_time() - cpu) * 1000 / len(queries)
        row = {"rows": len(vectors), "m": m, "ef_construction": ef_construction, "ef": ef,
               "recall_at_100": round(recall(found.tolist(), list(exact)), 4), "build_s": round(build_s, 1),
               "cpu_ms_per_query": round(cpu_ms, 3)}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="165000,333000,1000000", help="graph sizes (first N rows), comma separated")
    parser.add_argument("--m", default="16", help="HNSW M values, comma separated")
    parser.add_argument("--ef", default="100,200,400", help="search ef values, comma separated")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--queries", type=int, default=192)
    parser.add_argument("--result", default="hnsw_scale", help="result file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    command = invocation()
    sizes = [int(s) for s in args.sizes.split(",")]

    world = benchmark_catalogue(get_settings(), max(sizes), args.queries)
    vectors, queries = world.vectors, world.queries

    results = []
    for size in sizes:
        exact = exact_top_k(queries, vectors[:size], 100)
        for m in [int(v) for v in args.m.split(",")]:
            results += measure(np.ascontiguousarray(vectors[:size]), queries, exact, m, args.ef_construction,
                               [int(v) for v in args.ef.split(",")])

    import faiss

    write_result(args.result, {
        "engine": f"faiss {faiss.__version__} IndexHNSWFlat, inner product, in process ({faiss.omp_get_max_threads()} "
                  f"OpenMP threads)",
        "real_products": len(world.products), "dim": int(vectors.shape[1]), "k": 100, "queries": len(queries),
        "model_version": world.bundle.model_version, "results": results,
        "note": "Each graph holds the first `rows` rows of the 1M serving benchmark's catalogue (the real products "
                "first, then synthetic rows perturbed from them, noise 0.5, narrowed as the model serves them); "
                "recall_at_100 is against exact inner-product search of the same rows; cpu_ms_per_query is this "
                "process's CPU for one search call of all queries divided by the queries (faiss, not Milvus: "
                "compare recall across sizes, not cost with Milvus).",
    }, command=command)


if __name__ == "__main__":
    main()
