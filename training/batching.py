"""Feature rows → model batches. Training and the retrieval service both call these functions on the
rows Feast returns (``query_tower_v1`` / ``product_tower_v1``), so the same input gives the same
vector in both (a test checks it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from training.featurizer import encode_texts, join_terms, stable_bucket
from training.model import HISTORY_TYPES, ModelConfig, ProductBatch, QueryBatch

BUCKET_COLUMNS = ("ctr_bucket", "purchase_rate_bucket", "rating_bucket", "review_count_bucket", "age_bucket",
                  "price_bucket")
HISTORY_COLUMNS = {"query": "recent_queries", "shop": "recent_shops", "term": "recent_click_terms",
                   "tag": "purchased_tags"}


def _items(value: object) -> list:
    if value is None or isinstance(value, float):
        return []
    return list(value)


def query_batch(rows: Sequence[Mapping[str, object]], config: ModelConfig) -> QueryBatch:
    """Rows with ``query`` and (optionally, signed-in users only) the ``query_tower_v1`` features."""
    f = config.featurizer
    texts, shops, types, slots, row_of = [], [], [], [], []
    for i, row in enumerate(rows if config.use_history else []):
        slot = 0
        for type_id, kind in enumerate(HISTORY_TYPES):
            for item in _items(row.get(HISTORY_COLUMNS[kind])):
                slot += 1
                is_shop = kind == "shop"
                shops.append(stable_bucket(int(item), config.shop_buckets) if is_shop else 0)
                texts.append("" if is_shop else str(item))
                types.append(type_id)
                slots.append(slot)
                row_of.append(i)
    return QueryBatch(
        terms=torch.from_numpy(encode_texts([str(r.get("query") or "") for r in rows], f)),
        country=torch.tensor([stable_bucket(r.get("country"), config.country_buckets) for r in rows]),
        history_terms=torch.from_numpy(encode_texts(texts, f)),
        history_shop=torch.tensor(shops, dtype=torch.long), history_type=torch.tensor(types, dtype=torch.long),
        history_slot=torch.tensor(slots, dtype=torch.long), history_row=torch.tensor(row_of, dtype=torch.long),
        max_items=max(slots, default=0))


def product_text(row: Mapping[str, object]) -> str:
    """What the term encoder reads of a product: title and tags."""
    return f"{row.get('title') or ''} {join_terms(row.get('tags'))}"


def product_batch(rows: Sequence[Mapping[str, object]], config: ModelConfig) -> ProductBatch:
    """Rows of ``product_tower_v1`` features (missing quality or embeddings are allowed)."""
    def bucket(v: object) -> int:
        return 0 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)

    def dense(column: str, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The column as a (B, dim) tensor, and which rows had a usable vector (others are zeros)."""
        if not dim:
            return None, None
        out = np.zeros((len(rows), dim), dtype=np.float32)
        known = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            v = r.get(column)
            if v is not None and not isinstance(v, float) and len(v) == dim:
                vec = np.asarray(v, dtype=np.float32)
                if np.isfinite(vec).all():
                    out[i], known[i] = vec, True
        return torch.from_numpy(out), torch.from_numpy(known)

    graph, graph_known = dense("graph_embedding", config.graph_dim)
    return ProductBatch(
        terms=torch.from_numpy(encode_texts([product_text(r) for r in rows], config.featurizer)),
        category=torch.tensor([stable_bucket(r.get("category_path"), config.category_buckets) for r in rows]),
        country=torch.tensor([stable_bucket(r.get("shop_country"), config.country_buckets) for r in rows]),
        buckets=torch.tensor([[bucket(r.get(c)) for c in BUCKET_COLUMNS] for r in rows], dtype=torch.long),
        text=dense("text_embedding", config.text_dim)[0], graph=graph, graph_known=graph_known)


__all__ = ["product_batch", "product_text", "query_batch"]
