"""ANN product boosting (the paper's section on boosting): append a small vector of product quality
features to every product embedding, and a constant, query-independent weight vector to every
query embedding, so one inner product adds ``w · quality(p)`` to the cosine score inside the ANN
index. The weights are fit by black-box Bayesian optimisation (optuna TPE) of purchase recall on a
*later* window than training (the validation window).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel

BOOST_FEATURES = ("ctr", "purchase_rate", "cart_rate", "rating", "review_count", "age_days")


class BoostConfig(BaseModel):
    trials: int = 40
    max_weight: float = 0.5
    k: int = 100
    seed: int = 7


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


def augment(product_vectors: np.ndarray, quality: np.ndarray, query_vectors: np.ndarray,
            weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors the ANN index and the query side use: [p, quality(p)] and [q, w]."""
    q = np.concatenate([query_vectors, np.broadcast_to(weights, (len(query_vectors), len(weights)))], axis=1)
    return np.concatenate([product_vectors, quality], axis=1).astype(np.float32), q.astype(np.float32)
