"""Graph embeddings of products (and queries) in the query–product engagement graph.

The weighted bipartite graph of ``query_product_edges`` (click 1, favourite 2, cart 3, purchase 5,
summed over a window) is normalised like a random walk's transition matrix (D_q^-1/2 A D_p^-1/2) and
factorised by truncated SVD: products engaged through similar queries land close together, which is
the co-engagement signal tail queries need. The embeddings are frozen features of the product tower;
a product with no engagement has no row (the model learns a fallback vector for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import svds


@dataclass
class GraphEmbeddings:
    product_ids: np.ndarray  # (P,)
    products: np.ndarray  # (P, dim) float32, L2-normalised
    queries: pd.Index  # (Q,) query strings
    query_vectors: np.ndarray  # (Q, dim)

    def for_products(self, product_ids: np.ndarray) -> np.ndarray:
        """(len(product_ids), dim) with NaN rows for products that have no engagement."""
        row = pd.Series(np.arange(len(self.product_ids)), index=self.product_ids)
        index = row.reindex(product_ids).to_numpy()
        out = np.full((len(product_ids), self.products.shape[1]), np.nan, dtype=np.float32)
        known = ~np.isnan(index)
        out[known] = self.products[index[known].astype(int)]
        return out


def graph_embeddings(edges: pd.DataFrame, dim: int = 64, seed: int = 7) -> GraphEmbeddings:
    """Truncated SVD of the degree-normalised query × product engagement matrix."""
    weights = edges.groupby(["query", "product_id"], as_index=False)["weight"].sum()
    queries = pd.Index(weights["query"].unique())
    product_ids = np.sort(weights["product_id"].unique())
    q = queries.get_indexer(weights["query"])
    p = np.searchsorted(product_ids, weights["product_id"].to_numpy())
    matrix = sp.csr_matrix((np.log1p(weights["weight"].to_numpy(dtype=np.float64)), (q, p)),
                           shape=(len(queries), len(product_ids)))
    dq = np.asarray(matrix.sum(axis=1)).ravel()
    dp = np.asarray(matrix.sum(axis=0)).ravel()
    normalised = sp.diags(1 / np.sqrt(dq)) @ matrix @ sp.diags(1 / np.sqrt(dp))
    k = max(1, min(dim, min(normalised.shape) - 1))
    u, s, vt = svds(normalised, k=k, random_state=seed)
    order = np.argsort(-s)
    u, s, vt = u[:, order], s[order], vt[order]
    # Fix each component's sign so the same graph always gives the same vectors.
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    u, vt = u * signs, vt * signs[:, None]

    def unit(x: np.ndarray) -> np.ndarray:
        padded = np.zeros((x.shape[0], dim), dtype=np.float32)
        padded[:, :k] = x
        return padded / np.maximum(np.linalg.norm(padded, axis=1, keepdims=True), 1e-12)

    return GraphEmbeddings(product_ids=product_ids, products=unit(vt.T * np.sqrt(s)), queries=queries,
                           query_vectors=unit(u * np.sqrt(s)))
