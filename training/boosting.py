"""The vectors the ANN index serves, made from the towers' outputs after training.

ANN product boosting (the paper's section on boosting): append a small vector of product quality
features to every product embedding, and a constant, query-independent weight vector to every
query embedding, so one inner product adds ``w · quality(p)`` to the cosine score inside the ANN
index. The weights are fit by black-box Bayesian optimisation (optuna TPE) of purchase recall on a
*later* window than training (the validation window).

Narrowing (``serving_dim``): before boosting, both sides may be projected on the catalogue's top
principal directions. Every HNSW step computes inner products of the full width, so a narrower vector
is a cheaper search (benchmarks/results/index_types.json); the projection is uncentred and orthonormal,
so a projected inner product approximates the full one and scores keep their scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

PROJECTION_FILE = "projection.npy"  # (embedding_dim, serving_dim), beside boost.json in a run and in its bundle
BOOST_FEATURES = ("ctr", "purchase_rate", "cart_rate", "rating", "review_count", "age_days")


class BoostConfig(BaseModel):
    trials: int = 40
    max_weight: float = 0.5
    k: int = 100
    seed: int = 7
    # 256 of 768: purchase recall@100 of the served vectors 0.630 vs 0.628 at full width on the default world,
    # and each HNSW walk over a 165k-row segment 0.45 vs 0.70 ms of Milvus CPU (benchmarks/results/index_types.json).
    serving_dim: int = Field(256, ge=0, description="project the towers' outputs on this many principal directions "
                             "of the catalogue before boosting (what the index stores and searches); 0, or the "
                             "towers' width or more: full width")


def quality_vectors(products: pd.DataFrame) -> np.ndarray:
    """Per product, the boost features scaled to about [0, 1] (unknown → 0)."""
    cols = []
    for name in BOOST_FEATURES:
        values = pd.to_numeric(products.get(name, pd.Series(np.nan, index=products.index)), errors="coerce")
        values = values.fillna(0.0).to_numpy(dtype=np.float64)
        if name in ("review_count", "age_days"):
            values = np.log1p(np.maximum(values, 0))
        scale = np.percentile(values, 99) if np.any(values > 0) else 1.0
        cols.append(np.clip(values / max(scale, 1e-9), 0, 1))
    return np.stack(cols, axis=1).astype(np.float32)


def boosted_recall(query_vectors: np.ndarray, product_vectors: np.ndarray, quality: np.ndarray,
                   relevant: np.ndarray, weights: np.ndarray, k: int) -> float:
    scores = query_vectors @ product_vectors.T + (quality @ weights)[None, :]
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    return float(np.mean([r in row for r, row in zip(relevant, top, strict=True)]))


def fit_boost_weights(query_vectors: np.ndarray, product_vectors: np.ndarray, quality: np.ndarray,
                      relevant: np.ndarray, config: BoostConfig,
                      on_trial: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, float, float]:
    """Optuna TPE over the weights; returns (weights, recall with them, recall without boosting)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    baseline = boosted_recall(query_vectors, product_vectors, quality, relevant, np.zeros(quality.shape[1]), config.k)

    def objective(trial: optuna.Trial) -> float:
        w = np.array([trial.suggest_float(name, 0.0, config.max_weight) for name in BOOST_FEATURES])
        value = boosted_recall(query_vectors, product_vectors, quality, relevant, w, config.k)
        if on_trial:
            on_trial(trial.number, value)
        return value

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    study.enqueue_trial(dict.fromkeys(BOOST_FEATURES, 0.0))  # boosting must never lose to no boosting
    study.optimize(objective, n_trials=config.trials)
    best = np.array([study.best_params[name] for name in BOOST_FEATURES], dtype=np.float32)
    return best, float(study.best_value), baseline


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Row positions of each query's k best inner products, best first."""
    scores = queries @ vectors.T
    k = min(k, vectors.shape[0])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


def fit_projection(product_vectors: np.ndarray, width: int, seed: int, sample: int = 50_000) -> np.ndarray:
    """(dim, width) orthonormal basis of the rows' top principal directions, uncentred so that inner
    products (not distances to the mean) are what is kept."""
    if not 0 < width < product_vectors.shape[1]:
        raise ValueError(f"serving_dim must be between 1 and the embedding width - 1 "
                         f"({product_vectors.shape[1] - 1}), not {width}")
    rng = np.random.default_rng(seed)
    rows = product_vectors[rng.choice(len(product_vectors), min(sample, len(product_vectors)), replace=False)]
    return np.linalg.svd(rows.astype(np.float64), full_matrices=False)[2][:width].T.astype(np.float32)


def project_queries(query_vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Queries on the serving projection, in float64: a float32 matmul rounds differently for 1 row than
    inside a batch, and a query's near-tied results must not swap places with the batch it happens to
    share. Every place that narrows queries (serving, the boost fit, the gate) goes through here. A float64
    ``projection`` is used as it is (the API keeps one: converting 768×256 per batch was ~5% of its
    profile at 200 requests/s)."""
    return (query_vectors.astype(np.float64) @ np.asarray(projection, np.float64)).astype(np.float32)


def top_k_kept(query_vectors: np.ndarray, product_vectors: np.ndarray, projection: np.ndarray,
               k: int = 100) -> float:
    """Share of each query's exact top-k (full vectors) that exact search of the projected vectors
    returns: what the narrowing costs in ranking, before any ANN error."""
    k = min(k, len(product_vectors))
    full = exact_top_k(query_vectors, product_vectors, k)
    narrow = exact_top_k(project_queries(query_vectors, projection), product_vectors @ projection, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(full, narrow, strict=True)]))


def augment(product_vectors: np.ndarray, quality: np.ndarray, query_vectors: np.ndarray,
            weights: np.ndarray, projection: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The vectors the ANN index and the query side use: [p P, quality(p)] and [q P, w] (P: the
    model's serving projection; none: the full width)."""
    if projection is not None:
        width = projection.shape[1]
        # The API calls this with no product rows and a float64 projection: skip converting it (~50 us a batch).
        product_vectors = (product_vectors @ projection.astype(np.float32, copy=False) if len(product_vectors)
                           else np.zeros((0, width), np.float32))
        query_vectors = project_queries(query_vectors, projection)
    q = np.concatenate([query_vectors, np.broadcast_to(weights, (len(query_vectors), len(weights)))], axis=1)
    return np.concatenate([product_vectors, quality], axis=1).astype(np.float32), q.astype(np.float32)
