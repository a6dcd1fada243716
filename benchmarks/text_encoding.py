"""Benchmark: MiniLM text-encoding speed (titles/s) on CPU, before and after the speed work, and what
it costs in retrieval quality.

A fixed sample of Home Depot titles (read by path from ``settings.homedepot_dir``): every judged
product of a seeded sample of judgment queries, filled up with random catalogue titles. Each
encoder setting encodes the titles (timed) and the queries; quality is measured as

* ``recall@100``: for each (query, product) judgment with relevance ≥ 2.5 whose product is in the
  sample, whether MiniLM retrieval (cosine over the sample) ranks the product in the top 100;
* ``top100_agreement``: mean overlap of each query's top-100 neighbours with the plain baseline's.

Settings: ``before`` = the plain baseline (sentence-transformers' defaults: max_seq_length 256,
batches of 32); ``after`` = the default ``TextEncoderConfig`` (sorted by token length, batches of
~4k padded tokens, inference mode, max_seq_length 64); plus variants (int8, other lengths, threads).
Timings run in interleaved rounds and the median is reported, because other work on the machine
makes single runs noisy (the load average at the start is recorded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from retrieval_core.adapters.homedepot import PURCHASE_GRADE, read_judgments, read_products  # noqa: E402
from retrieval_core.settings import Settings  # noqa: E402
from training.text_encoder import TextEncoderConfig, encode, for_inference, load_minilm  # noqa: E402

VARIANTS: dict[str, dict] = {
    "before": {"max_seq_length": 256, "bucket_tokens": 0, "batch_size": 32, "threads": None},  # plain defaults
    "previous": {"max_seq_length": 32, "bucket_tokens": 0, "batch_size": 128, "threads": None},  # code before
    "after": {},  # TextEncoderConfig's defaults: by length, max_seq_length 64, torch's threads
    "after_1thread": {"threads": 1},
    "after_len32": {"max_seq_length": 32},
    "after_int8": {"int8": True},
}


def sample(homedepot_dir: Path, n_titles: int, n_queries: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(products, judgments): the judged products of ``n_queries`` random queries plus random fill."""
    products = read_products(homedepot_dir)
    judgments = read_judgments(homedepot_dir)
    judgments = judgments[judgments["product_id"].isin(products["product_id"])]
    rng = np.random.default_rng(seed)
    queries = judgments.loc[judgments["relevance"] >= PURCHASE_GRADE, "query"].unique()
    chosen = rng.choice(queries, size=min(n_queries, len(queries)), replace=False)
    judged = judgments[judgments["query"].isin(chosen)]
    ids = list(dict.fromkeys(judged["product_id"]))[:n_titles]
    rest = products.loc[~products["product_id"].isin(ids), "product_id"].to_numpy()
    ids += list(rng.choice(rest, size=max(0, n_titles - len(ids)), replace=False))
    subset = products.set_index("product_id").loc[ids].reset_index()
    return subset, judged[judged["product_id"].isin(ids)].reset_index(drop=True)


def quality(titles: np.ndarray, queries: np.ndarray, judged: pd.DataFrame, query_list: list[str],
            product_ids: np.ndarray, k: int = 100) -> tuple[float, np.ndarray]:
    """Recall@k of the relevant judgments, and each query's top-k catalogue rows."""
    top = np.argsort(-(queries @ titles.T), axis=1)[:, :k]
    relevant = judged[judged["relevance"] >= PURCHASE_GRADE]
    q_row = {q: i for i, q in enumerate(query_list)}
    p_row = {p: i for i, p in enumerate(product_ids)}
    hits = [p_row[p] in set(top[q_row[q]]) for q, p in zip(relevant["query"], relevant["product_id"], strict=True)]
    return float(np.mean(hits)), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--titles", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="timed encodings of the titles per setting")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    settings = Settings()
    products, judged = sample(settings.homedepot_dir, args.titles, args.queries, args.seed)
    titles = products["title"].astype(str).tolist()
    query_list = sorted(judged["query"].unique())
    names = args.variants.split(",")
    base = load_minilm(TextEncoderConfig())
    configs = {name: TextEncoderConfig(**VARIANTS[name]) for name in names}
    models = {name: for_inference(base, c) if c.int8 else base for name, c in configs.items()}
    load = os.getloadavg()
    print(f"{len(titles)} titles, {len(query_list)} queries, load average {load}", flush=True)
    timings: dict[str, list[float]] = {name: [] for name in names}
    vectors: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:  # interleaved, alternating order
            start = time.perf_counter()
            vectors[name] = encode(models[name], titles, configs[name])
            timings[name].append(len(titles) / (time.perf_counter() - start))
            print(f"round {round_} {name}: {timings[name][-1]:.1f} titles/s", flush=True)
    results, tops = {}, {}
    for name in names:
        q = encode(models[name], query_list, configs[name])
        recall, tops[name] = quality(vectors[name], q, judged, query_list, products["product_id"].to_numpy())
        results[name] = {"config": configs[name].model_dump(include={"max_seq_length", "batch_size", "bucket_tokens",
                                                                         "threads", "int8"}),
                         "titles_per_s": round(float(np.median(timings[name])), 1),
                         "titles_per_s_rounds": [round(t, 1) for t in timings[name]], "recall@100": round(recall, 4)}
    reference = tops.get("before")
    for name in names:
        if reference is not None:
            overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(tops[name], reference, strict=True)]
            results[name]["top100_agreement_with_before"] = round(float(np.mean(overlap)), 4)
        if "before" in vectors:
            results[name]["min_cosine_to_before"] = round(float((vectors[name] * vectors["before"]).sum(1).min()), 4)
    before, after = results.get("before", {}), results.get("after", {})
    figures = {
        "titles_per_s_before": before.get("titles_per_s"), "titles_per_s_after": after.get("titles_per_s"),
        "recall_before": before.get("recall@100"), "recall_after": after.get("recall@100"),
        "recall_metric": "Recall@100 of MiniLM cosine retrieval for Home Depot judgments with relevance >= 2.5 "
                         "whose product is in the sample (queries encoded with the same setting)",
        "titles": len(titles), "queries": len(query_list),
        "relevant_judgments": int((judged["relevance"] >= PURCHASE_GRADE).sum()),
        "load_average_at_start": [round(x, 2) for x in load], "variants": results,
    }
    path = write_result("text_encoding", figures,
                        command=("python benchmarks/text_encoding.py " + " ".join(sys.argv[1:])).strip())
    print(path.read_text())


if __name__ == "__main__":
    main()
