"""Quality evaluation on any data in the raw-data contract (a path): query-disjoint train/test split,
the unified model trained on the train queries, evaluated with BM25, MiniLM and their hybrid on the
held-out queries over the whole catalogue.

The contract has no relevance labels, so they come from the events:

* a (query, product) pair's *interaction* is its strongest engagement (click < favourite <
  add_to_cart < purchase); pairs only shown (impressions) are no training example;
* the test relevance is ``relevant_events`` (purchase by default: for Home Depot, landed by
  ``retrieval_core.adapters.homedepot``, that is relevance ≥ 2.5);
* graded NDCG uses the gain of the strongest event: purchase / add_to_cart 2, click / favourite 1,
  impression 0 (for Home Depot: relevance ≥ 2.5 → 2, ≥ 2.0 → 1, below → 0), as 2^gain − 1.

Queries are split, not events: no test query (after lower-casing and trimming) is seen in training,
in the engagement graph or in the text encoder's adaptation. Signed-out events (no user) give
examples with an empty history; signed-in users' history is not used here (no feature store).

The steps are the training pipeline's own (``training.stages``): graph embeddings from the train
queries' engagement graph, MiniLM adapted on train (query → purchased product) pairs then cached by
content hash, ``training.train.train``, ``training.evaluate`` retrievers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from retrieval_core.contract import read_table
from training.batching import product_text
from training.calibration import calibrate_channels
from training.evaluate import KS, Retriever, bm25_retriever, metrics, model_retriever, rrf_retriever
from training.stages import (
    DISTILL_TEXTS,
    TrainingRunConfig,
    _with_encodings,
    distillation_texts,
    load_model,
    minilm_retriever,
    read_distillation_texts,
    save_model,
    step_graph,
    step_text,
    write_distillation_texts,
)
from training.text_encoder import EmbeddingCache, encode, load_minilm, title_spans
from training.train import train

ENGAGEMENTS = ("click", "favorite", "add_to_cart", "purchase")  # weakest → strongest
GAIN = {"impression": 0, "click": 1, "favorite": 1, "add_to_cart": 2, "purchase": 2}
Log = Callable[[str], None]
EDGE_WEIGHT = {"click": 1, "favorite": 2, "add_to_cart": 3, "purchase": 5}  # as dbt's query_product_edges


class ContractEvalConfig(BaseModel):
    test_fraction: float = Field(0.3, gt=0, lt=1)
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="of the train queries, held out of training "
                                       "to calibrate the model's channel weights (``run.calibration``)")
    split_seed: int = 7
    relevant_events: tuple[str, ...] = ("purchase",)
    rrf_k: int = 60
    max_k: int = 1000
    run: TrainingRunConfig = Field(default_factory=TrainingRunConfig)
    title_queries_per_product: int = Field(0, ge=0, description="self-supervised extra training examples: word "
                                           "spans of each catalogue title as a query for its product (click)")
    title_query_words: tuple[int, int] = (1, 4)
    extra_systems: tuple[str, ...] = Field(("minilm_adapted", "unified+bm25_rrf"),
                                           description="besides unified, bm25, minilm and hybrid_rrf")


@dataclass
class ContractData:
    products: pd.DataFrame  # latest catalogue row per product
    events: pd.DataFrame


@dataclass
class ContractEvalResult:
    systems: dict[str, dict[str, float]]  # query-level metrics per system
    per_pair: dict[str, dict[str, float]]  # training.evaluate.metrics over (query, relevant product) rows
    details: dict = field(default_factory=dict)


def read_contract(raw_dir: Path) -> ContractData:
    """The catalogue (the latest row of each product wins) and every landed event."""
    catalogue = read_table(raw_dir, "catalogue")
    products = catalogue.drop_duplicates("product_id", keep="last").sort_values("product_id").reset_index(drop=True)
    events = read_table(raw_dir, "events")
    events["query"] = events["query"].astype(str).str.strip().str.lower()
    return ContractData(products=products, events=events)


def judgments(events: pd.DataFrame) -> pd.DataFrame:
    """One row per (query, product) shown or engaged: its strongest engagement (None if only shown) and gain."""
    strength = events["event_type"].map({t: i for i, t in enumerate(("impression", *ENGAGEMENTS))})
    best = events.assign(strength=strength).groupby(["query", "product_id"], as_index=False)["strength"].max()
    kinds = np.array(["impression", *ENGAGEMENTS], dtype=object)[best["strength"].to_numpy()]
    best["interaction"] = np.where(kinds == "impression", None, kinds)
    best["gain"] = [GAIN[k] for k in kinds]
    best["events"] = kinds
    return best.drop(columns="strength")


def split_queries(queries: Sequence[str], test_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """A seeded, query-disjoint split: (train queries, test queries)."""
    unique = np.array(sorted(set(queries)), dtype=object)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = int(round(len(unique) * test_fraction))
    return set(unique[order[n_test:]]), set(unique[order[:n_test]])


def build_dataset(data: ContractData, config: ContractEvalConfig, out: Path) -> dict:
    """The files the training steps read (``training.stages``): examples.parquet (split "train", and
    "validation": the judgments of ``validation_fraction`` of the train queries, held out of training
    and of the text encoder's adaptation, for the channel calibration),
    train_products.parquet and eval_products.parquet (the whole catalogue), edges.parquet (train
    queries' engagement graph), plus test.parquet (the held-out judgments) and meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = judgments(data.events)
    pairs = pairs[pairs["product_id"].isin(data.products["product_id"])]
    train_q, test_q = split_queries(pairs["query"], config.test_fraction, config.split_seed)
    train_pairs = pairs[pairs["query"].isin(train_q) & pairs["interaction"].notna()]
    # Shuffled (seeded), so that any cap on the adaptation pairs is a random sample.
    examples = train_pairs.sample(frac=1.0, random_state=config.split_seed).reset_index(drop=True)
    _, validation_q = split_queries(examples["query"], config.validation_fraction, config.split_seed + 1)
    split = np.where(examples["query"].isin(validation_q), "validation", "train")
    examples = examples[["query", "product_id", "interaction"]].assign(split=split, user_id=None,
                                                                       has_history=False)
    examples.to_parquet(out / "examples.parquet")
    data.products.to_parquet(out / "train_products.parquet")
    data.products.to_parquet(out / "eval_products.parquet")
    fit_q = set(examples.loc[examples["split"] == "train", "query"])  # the graph sees no validation query
    engaged = data.events[data.events["query"].isin(fit_q) & data.events["event_type"].isin(ENGAGEMENTS)]
    edges = engaged.assign(weight=engaged["event_type"].map(EDGE_WEIGHT)).groupby(
        ["query", "product_id"], as_index=False)["weight"].sum()
    edges.to_parquet(out / "edges.parquet")
    test = pairs[pairs["query"].isin(test_q)]
    test.to_parquet(out / "test.parquet")
    meta = {"products": len(data.products), "train_queries": len(train_q), "test_queries": len(test_q),
            "train_examples": int((examples["split"] == "train").sum()),
            "validation_examples": int((examples["split"] == "validation").sum()), "edges": len(edges),
            "test_judgments": len(test),
            "split_fingerprint": hashlib.sha1("\n".join(sorted(test_q)).encode()).hexdigest()[:12]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def title_queries(products: pd.DataFrame, per_product: int, words: tuple[int, int], seed: int) -> pd.DataFrame:
    """Pseudo-queries from the catalogue alone: ``per_product`` random spans of ``words`` (min, max)
    consecutive title words per product, each an example (span → product, interaction click). They
    teach the term encoder the whole catalogue's vocabulary; no judged query is involved."""
    spans = title_spans(products["title"].astype(str).tolist(), per_product, words, seed)
    ids = products["product_id"].to_numpy()
    out = pd.DataFrame({"query": [s for _, s in spans], "product_id": ids[[i for i, _ in spans]]})
    return out.assign(interaction="click", split="train", user_id=None, has_history=False)


def query_metrics(ranked: np.ndarray, relevant: Sequence[set[int]], gains: Sequence[dict[int, int]],
                  ks: Sequence[int] = KS) -> dict[str, float]:
    """Per-query Recall@K (share of the query's relevant products in its top K), averaged over queries,
    and graded NDCG@10 (gain 2^g − 1; the ideal ranking from all of the query's judgments)."""
    recall = {k: [] for k in ks}
    ndcg = []
    discount = 1.0 / np.log2(np.arange(2, 12))
    for row, rel, gain in zip(ranked, relevant, gains, strict=True):
        for k in ks:
            recall[k].append(len(rel & set(row[:k].tolist())) / len(rel))
        dcg = sum((2.0 ** gain.get(int(p), 0) - 1) * discount[i] for i, p in enumerate(row[:10]))
        ideal = sorted((2.0 ** g - 1 for g in gain.values()), reverse=True)[:10]
        idcg = sum(g * discount[i] for i, g in enumerate(ideal))
        ndcg.append(dcg / idcg if idcg > 0 else 0.0)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out["ndcg@10"] = float(np.mean(ndcg))
    out["n"] = len(ranked)
    return out


def run_version(config: ContractEvalConfig, meta: dict) -> str:
    """A key of everything the adapted text encoder depends on (for the artefact and encoder caches)."""
    text = config.run.text.model_dump(exclude={"batch_size", "bucket_tokens", "threads"})
    distill = config.run.model_dump(include={"distill_texts_max", "distill_spans_per_product", "distill_span_words"})
    blob = json.dumps({"text": text, "pairs": config.run.adapt_pairs_max, "split": meta["split_fingerprint"],
                       "distill": distill, "validation_fraction": config.validation_fraction,
                       "seed": config.split_seed, "products": meta["products"]}, sort_keys=True)
    return "adapted-" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def prepare(raw_dir: Path, work_dir: Path, config: ContractEvalConfig,
            log: Log = print) -> tuple[Path, Path | None, Path | None]:
    """Dataset, graph and text encodings under ``work_dir`` (the text step is skipped when its output
    for this version exists; its encodings are cached by content hash under work_dir/encoder_cache)."""
    dataset = work_dir / "dataset"
    data = read_contract(raw_dir)
    meta = build_dataset(data, config, dataset)
    log(f"dataset: {meta}")
    version = run_version(config, meta)
    out = work_dir / version
    out.mkdir(parents=True, exist_ok=True)
    graph = out / "graph.parquet" if config.run.graph_dim else None
    if graph is not None and not graph.exists():
        start = time.perf_counter()
        step_graph(dataset, config.run.graph_dim, graph)
        log(f"graph: {time.perf_counter() - start:.1f}s")
    text = out / "text.parquet" if config.run.use_text else None
    # The encoder cache keys texts, not settings: one cache per sequence length / quantisation.
    int8 = "-int8" if config.run.text.int8 else ""
    cache_dir = work_dir / "encoder_cache" / f"len{config.run.text.max_seq_length}{int8}"
    if text is not None and config.run.text.adapt_epochs == 0:
        # No adaptation: the text feature is MiniLM off the shelf (step_text's base cache), encoded once.
        start = time.perf_counter()
        products = pd.read_parquet(dataset / "eval_products.parquet")
        base = load_minilm(config.run.text)
        cache = EmbeddingCache(cache_dir / "minilm-base.parquet", "minilm-base")
        texts = [product_text(r) for r in products.to_dict("records")]
        vectors, new = cache.encode(texts, lambda t: encode(base, t, config.run.text))
        frame = pd.DataFrame({"product_id": products["product_id"].to_numpy(), "text_embedding": list(vectors)})
        frame.to_parquet(text)
        frame.to_parquet(text.with_name("minilm_base.parquet"))
        written = write_distillation_texts(
            distillation_texts(dataset, config.run),
            lambda t: cache.encode(t, lambda new_texts: encode(base, new_texts, config.run.text))[0],
            text.with_name(DISTILL_TEXTS))
        log(f"distillation texts: {written}")
        log(f"text (off the shelf, {new} newly encoded): {time.perf_counter() - start:.1f}s")
    elif text is not None and not all(text.with_name(n).exists() for n in (text.name, "minilm_base.parquet",
                                                                            DISTILL_TEXTS)):
        start = time.perf_counter()
        step_text(dataset, config.run, cache_dir, version, text)
        log(f"text (adapt + encode): {time.perf_counter() - start:.1f}s")
    return dataset, graph, text


def _test_rows(dataset: Path, config: ContractEvalConfig, products: pd.DataFrame):
    test = pd.read_parquet(dataset / "test.parquet")
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    test = test.assign(row=row_of[test["product_id"].to_numpy()].to_numpy())
    is_relevant = test["events"].isin(config.relevant_events)
    queries = sorted(test.loc[is_relevant, "query"].unique())
    relevant = test[is_relevant].groupby("query")["row"].agg(lambda r: set(r.tolist()))
    gains = test.groupby("query").apply(lambda g: dict(zip(g["row"].tolist(), g["gain"].tolist(), strict=True)),
                                        include_groups=False)
    return queries, [relevant[q] for q in queries], [gains[q] for q in queries]


def evaluate_systems(systems: dict[str, Retriever], queries: list[str], relevant: list[set[int]],
                     gains: list[dict[int, int]], max_k: int = 1000, log: Log = print) -> ContractEvalResult:
    """Query-level metrics (``query_metrics``) and per-pair metrics (``training.evaluate.metrics``)."""
    rows = pd.DataFrame({"query": queries})
    result = ContractEvalResult(systems={}, per_pair={})
    pair_query = np.repeat(np.arange(len(queries)), [len(r) for r in relevant])
    pair_product = np.array([p for r in relevant for p in sorted(r)], dtype=np.int64)
    for name, retrieve in systems.items():
        start = time.perf_counter()
        ranked = retrieve(rows, max_k)
        result.systems[name] = query_metrics(ranked, relevant, gains)
        result.per_pair[name] = metrics(ranked[pair_query], pair_product)
        result.details.setdefault("retrieve_seconds", {})[name] = round(time.perf_counter() - start, 1)
        log(f"{name}: {json.dumps({k: round(v, 4) for k, v in result.systems[name].items()})}")
    return result


def adapted_minilm_retriever(text: Path, config: ContractEvalConfig) -> Retriever:
    """The adapted MiniLM alone: queries and products encoded by it (``step_text`` saves it as text_encoder)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(text.with_name("text_encoder")), device="cpu")
    vectors = np.stack(pd.read_parquet(text)["text_embedding"].to_numpy()).astype(np.float32)
    return minilm_retriever(model, vectors, config.run.text)


def run_contract_eval(raw_dir: Path, work_dir: Path, config: ContractEvalConfig,
                      log: Log = print) -> ContractEvalResult:
    """Split, prepare, train the unified model on the train queries, evaluate every system on the test queries."""
    dataset, graph, text = prepare(raw_dir, work_dir, config, log)
    products = _with_encodings(pd.read_parquet(dataset / "eval_products.parquet"), graph, text)
    examples = pd.read_parquet(dataset / "examples.parquet")
    validation = examples[(examples["split"] == "validation") & examples["interaction"].isin(config.relevant_events)]
    # (contract data: "relevant" is configurable, not always a purchase, so not dataset.validation_purchases)
    examples = examples[examples["split"] == "train"]
    if config.title_queries_per_product:
        examples = pd.concat([examples, title_queries(products, config.title_queries_per_product,
                                                      config.title_query_words, config.split_seed)],
                             ignore_index=True)
    train_config = config.run.train.model_copy(update={"model": config.run.model_config_()})
    start = time.perf_counter()
    trained = train(examples, products, train_config, show_progress=False,
                    distill_texts=read_distillation_texts(text))
    log(f"train: {time.perf_counter() - start:.1f}s, {trained.examples_per_s:.0f} examples/s, "
        f"final loss {np.mean(trained.losses[-20:]):.4f}")
    calibration = calibrate_channels(trained.model, validation, products, config.run.calibration) \
        if config.run.calibrate else None
    if calibration is not None:
        log(f"channel calibration: {calibration.as_dict()}")
    save_model(trained.model, work_dir / "model")
    model = load_model(work_dir / "model")
    queries, relevant, gains = _test_rows(dataset, config, products)
    bm25 = bm25_retriever(products)
    base = text.with_name("minilm_base.parquet") if text is not None else None
    base_vectors = np.stack(pd.read_parquet(base)["text_embedding"].to_numpy()).astype(np.float32)
    minilm = minilm_retriever(load_minilm(config.run.text), base_vectors, config.run.text)
    unified = model_retriever(model, products)
    systems: dict[str, Retriever] = {"unified": unified, "bm25": bm25, "minilm": minilm,
                                     "hybrid_rrf": rrf_retriever([bm25, minilm], k=config.rrf_k)}
    if "minilm_adapted" in config.extra_systems and text is not None and config.run.text.adapt_epochs:
        systems["minilm_adapted"] = adapted_minilm_retriever(text, config)
    if "unified+bm25_rrf" in config.extra_systems:
        systems["unified+bm25_rrf"] = rrf_retriever([unified, bm25], k=config.rrf_k)
    result = evaluate_systems(systems, queries, relevant, gains, config.max_k, log)
    result.details.update({
        "dataset": json.loads((dataset / "meta.json").read_text()), "test_queries_with_relevant": len(queries),
        "relevant_pairs": int(sum(len(r) for r in relevant)),
        "train": {"seconds": round(trained.seconds, 1), "examples_per_s": round(trained.examples_per_s, 1),
                  "final_loss": float(np.mean(trained.losses[-20:]))},
        "channel_calibration": calibration.as_dict() if calibration is not None else None})
    return result
