"""Offline evaluation: purchase Recall@K and NDCG@10 on a later window, sliced, against baselines.

Every system is a *retriever*: given the evaluation rows it returns, per row, the catalogue rows of
its top ``max_k`` products. Metrics are computed the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from training.batching import product_batch, product_text, query_batch
from training.model import UnifiedModel
from training.train import encode_products

KS = (10, 100, 1000)
Retriever = Callable[[pd.DataFrame, int], np.ndarray]  # (rows, max_k) -> (len(rows), max_k) catalogue rows


def metrics(ranked: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (the relevant product in the top K) and NDCG@10 (one relevant item per row)."""
    hit = ranked == relevant[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.inf)
    out = {f"recall@{k}": float(np.mean(rank <= k)) for k in ks}
    out["ndcg@10"] = float(np.mean(np.where(rank <= 10, 1.0 / np.log2(rank + 1), 0.0)))
    out["n"] = int(len(relevant))
    return out


def model_retriever(model: UnifiedModel, products: pd.DataFrame, batch_size: int = 512) -> Retriever:
    catalogue = product_batch(products.to_dict("records"), model.config)
    vectors = encode_products(model, catalogue)

    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        records = rows.to_dict("records")
        out = []
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                q = model.query_tower(query_batch(records[start:start + batch_size], model.config))
                out.append((q @ vectors.T).topk(min(k, len(vectors)), dim=1).indices.numpy())
        return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)

    return retrieve


def popularity_retriever(products: pd.DataFrame, train: pd.DataFrame) -> Retriever:
    """The same list for everyone: products by purchases (then all engagement) in the training window."""
    weight = train["interaction"].map({"click": 1, "favorite": 2, "add_to_cart": 3, "purchase": 10})
    score = weight.groupby(train["product_id"]).sum()
    order = np.argsort(-products["product_id"].map(score).fillna(0).to_numpy(), kind="stable")

    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        return np.tile(order[:k], (len(rows), 1))

    return retrieve


def bm25_retriever(products: pd.DataFrame) -> Retriever:
    """Lexical BM25 (bm25s) over title and tags: the legacy engine's kind of retrieval."""
    import bm25s

    corpus = [product_text(r) for r in products.to_dict("records")]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        tokens = bm25s.tokenize(rows["query"].astype(str).tolist(), stopwords="en", show_progress=False)
        docs, _ = index.retrieve(tokens, k=min(k, len(corpus)), show_progress=False, n_threads=1)
        return np.asarray(docs)

    return retrieve


def rrf_retriever(retrievers: Sequence[Retriever], k: int = 60, depth: int | None = None) -> Retriever:
    """Reciprocal rank fusion (Cormack et al. 2009): score(p) = sum over retrievers of 1 / (k + rank),
    rank 1-based, over each retriever's top ``depth`` (default: the asked ``max_k``); ties keep the
    order of the first retriever's list. Rows short of ``max_k`` fused products are padded with -1."""
    def retrieve(rows: pd.DataFrame, max_k: int) -> np.ndarray:
        lists = [np.asarray(r(rows, depth or max_k)) for r in retrievers]
        out = np.full((len(rows), max_k), -1, dtype=np.int64)
        for i in range(len(rows)):
            ids = np.concatenate([lst[i] for lst in lists])
            scores = np.concatenate([1.0 / (k + np.arange(1, len(lst[i]) + 1)) for lst in lists])
            keep = ids >= 0
            ids, scores = ids[keep], scores[keep]
            unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            total = np.bincount(inverse, weights=scores)
            order = np.lexsort((first, -total))[:max_k]  # by fused score, then first appearance
            out[i, : len(order)] = unique[order]
        return out

    return retrieve


def evaluate(systems: dict[str, Retriever], rows: pd.DataFrame, products: pd.DataFrame,
             query_class: dict[str, str], max_k: int = max(KS)) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of every system on ``rows`` (one relevant product each), overall and per slice."""
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    rows = rows[rows["product_id"].isin(row_of.index)].reset_index(drop=True)
    relevant = row_of[rows["product_id"].to_numpy()].to_numpy()
    slices = {"all": np.ones(len(rows), bool)}
    klass = rows["query"].map(query_class).fillna("tail").to_numpy()
    for name in ("head", "torso", "tail"):
        slices[name] = klass == name
    history = rows.get("has_history", pd.Series(False, index=rows.index)).fillna(False).to_numpy(bool)
    slices["with_history"], slices["without_history"] = history, ~history
    report: dict[str, dict[str, dict[str, float]]] = {}
    for name, retrieve in systems.items():
        ranked = retrieve(rows, max_k)
        report[name] = {s: metrics(ranked[m], relevant[m]) for s, m in slices.items() if m.any()}
    return report
