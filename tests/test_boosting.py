"""ANN boosting: the augmented inner product equals cosine + w·quality, and optuna finds useful weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.boosting import (
    BoostConfig,
    augment,
    boosted_recall,
    fit_boost_weights,
    fit_projection,
    project_queries,
    quality_vectors,
    top_k_kept,
)


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


def test_serving_projection_keeps_inner_products_in_the_catalogue_subspace() -> None:
    """Products that span 8 of 32 dimensions: the 8-d projection keeps every product-query inner product
    (queries may leave the subspace: the part outside it scores 0 against every product anyway), so the
    exact top-k is unchanged; 4 dimensions lose some of it, and both sides go through ``augment``."""
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(32, 8)))[0]
    products = (rng.normal(size=(500, 8)) @ basis.T).astype(np.float32)
    queries = rng.normal(size=(40, 32)).astype(np.float32)
    projection = fit_projection(products, 8, seed=0)
    assert projection.shape == (32, 8)
    np.testing.assert_allclose(projection.T @ projection, np.eye(8), atol=1e-5)
    assert top_k_kept(queries, products, projection, k=20) == 1.0
    assert top_k_kept(queries, products, fit_projection(products, 4, seed=0), k=20) < 0.9
    quality, w = rng.random((500, 6)).astype(np.float32), rng.random(6).astype(np.float32)
    pa, qa = augment(products, quality, queries, w, projection)
    assert pa.shape == (500, 14) and qa.shape == (40, 14)
    np.testing.assert_allclose(qa @ pa.T, queries @ products.T + quality @ w, atol=1e-4)


@pytest.mark.parametrize("width", [0, 32, 40])
def test_serving_projection_must_narrow(width: int) -> None:
    with pytest.raises(ValueError, match="serving_dim"):
        fit_projection(np.ones((10, 32), np.float32), width, seed=0)


def test_a_narrowed_query_does_not_depend_on_the_batch_it_shares() -> None:
    """The API coalesces concurrent requests: a query alone and inside any batch must get the same
    narrowed vector, bit for bit, or near-tied results could swap places with the company it keeps."""
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((64, 768)).astype(np.float32)
    projection = fit_projection(rng.standard_normal((2000, 768)).astype(np.float32), 256, seed=0)
    batch = project_queries(queries, projection)
    for i in range(len(queries)):
        np.testing.assert_array_equal(project_queries(queries[i:i + 1], projection)[0], batch[i])
    _, served = augment(queries[:0], np.zeros((0, 6), np.float32), queries[5:9], np.ones(6, np.float32), projection)
    np.testing.assert_array_equal(served[:, :256], batch[5:9])  # the served path is this one
