"""Graph embeddings put co-engaged products together and are deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.graph import graph_embeddings


def _edges() -> pd.DataFrame:
    # Two communities: products 1-3 engaged via necklace queries, 11-13 via mug queries.
    rows = []
    for q in ("boho necklace", "pendant", "silver necklace", "choker"):
        rows += [(q, p, w) for p, w in ((1, 5), (2, 3), (3, 1))]
    for q in ("coffee cup", "mug", "tea cup"):
        rows += [(q, p, w) for p, w in ((11, 5), (12, 2), (13, 1))]
    rows.append(("gift", 3, 1))
    rows.append(("gift", 13, 1))
    return pd.DataFrame(rows, columns=["query", "product_id", "weight"])


def test_co_engaged_products_are_closer_than_others_and_unknown_products_are_nan() -> None:
    g = graph_embeddings(_edges(), dim=4)
    v = g.for_products(np.array([1, 2, 11, 12, 999]))
    assert np.isnan(v[4]).all()
    assert np.allclose(np.linalg.norm(v[:4], axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert v[2] @ v[3] > v[2] @ v[1] + 0.3


def test_same_graph_gives_the_same_vectors() -> None:
    a, b = graph_embeddings(_edges(), dim=4), graph_embeddings(_edges().sample(frac=1, random_state=3), dim=4)
    assert np.allclose(a.for_products(np.array([1, 11])), b.for_products(np.array([1, 11])), atol=1e-5)
