"""ANN boosting: the augmented inner product equals cosine + w·quality, and optuna finds useful weights."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.boosting import BoostConfig, augment, boosted_recall, fit_boost_weights, quality_vectors


def test_augmented_inner_product_is_cosine_plus_boost() -> None:
    rng = np.random.default_rng(0)
    p, q, quality = rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.random((5, 6))
    w = rng.random(6)
    pa, qa = augment(p, quality, q, w)
    assert np.allclose(qa @ pa.T, q @ p.T + quality @ w, atol=1e-5)


def test_quality_vectors_are_scaled_and_unknowns_are_zero() -> None:
    frame = pd.DataFrame({"ctr": [0.1, None, 0.3], "review_count": [0, 10, 1000], "rating": [4.5, 3.0, None]})
    v = quality_vectors(frame)
    assert v.shape == (3, 6) and (v >= 0).all() and (v <= 1).all()
    assert v[1, 0] == 0 and v[2, 3] == 0  # unknown ctr / rating


def test_optuna_finds_weights_when_quality_predicts_purchases() -> None:
    rng = np.random.default_rng(1)
    products = rng.normal(size=(2000, 16))
    products /= np.linalg.norm(products, axis=1, keepdims=True)
    quality = rng.random((2000, 6)).astype(np.float32)
    # Purchases go to high-purchase-rate products that the embedding alone ranks only moderately.
    relevant = np.argsort(-quality[:, 1])[:300]
    queries = products[relevant] * 0.3 + rng.normal(size=(300, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    weights, boosted, plain = fit_boost_weights(queries, products, quality, relevant, BoostConfig(trials=30))
    assert boosted > plain + 0.05
    assert weights[1] == max(weights)  # the purchase-rate feature gets the largest weight
    assert boosted == boosted_recall(queries, products, quality, relevant, weights, 100)
