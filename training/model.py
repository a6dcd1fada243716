"""The unified two-tower model (Jha et al. 2023): heavy product tower offline, light query tower online.

* **Product tower**: shared term encoder over title + tags, category / shop-country embeddings,
  embeddings of the quantile buckets of quality signals, and the precomputed transformer (text)
  and graph encodings → projection → L2 normalisation.
* **Query tower**: the same term encoder over the query, the user's country, and a 1-layer
  transformer over the user's history items (recent queries, clicked shops, clicked-title words,
  purchased tags), read through a [CLS] slot → projection → L2 normalisation. A signed-out user has
  an empty history: the [CLS] slot alone still gives a vector.

Batches are built by :mod:`training.batching` from the same feature dicts in training and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import nn

from training.featurizer import FeaturizerConfig

N_BUCKET_FEATURES = 6  # ctr, purchase_rate, rating, review_count, age, price (see product_quality)
HISTORY_TYPES = ("query", "shop", "term", "tag")


class ModelConfig(BaseModel):
    featurizer: FeaturizerConfig = Field(default_factory=FeaturizerConfig)
    term_dim: int = 64
    output_dim: int = 128
    hidden_dim: int = 256
    category_buckets: int = 1024
    country_buckets: int = 64
    shop_buckets: int = 1 << 15
    quantile_buckets: int = 10
    text_dim: int = 384  # MiniLM; 0 to disable
    graph_dim: int = 64  # 0 to disable
    history_heads: int = 4
    use_history: bool = True
    dropout: float = 0.1


@dataclass
class ProductBatch:
    terms: torch.Tensor  # (B, max_terms) hashed term ids, 0-padded
    category: torch.Tensor  # (B,) hashed category path
    country: torch.Tensor  # (B,) hashed shop country
    buckets: torch.Tensor  # (B, N_BUCKET_FEATURES), 0 = unknown, 1..quantile_buckets
    text: torch.Tensor | None = None  # (B, text_dim)
    graph: torch.Tensor | None = None  # (B, graph_dim); rows of products with no engagement are ignored
    graph_known: torch.Tensor | None = None  # (B,) bool: the product has a graph embedding

    def take(self, index: torch.Tensor) -> ProductBatch:
        """The rows ``index`` (a LongTensor) of this batch."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return ProductBatch(self.terms[index], self.category[index], self.country[index], self.buckets[index],
                            pick(self.text), pick(self.graph), pick(self.graph_known))


@dataclass
class QueryBatch:
    terms: torch.Tensor  # (B, max_terms)
    country: torch.Tensor  # (B,) hashed user country (0 = unknown / signed out)
    history_terms: torch.Tensor  # (I, max_terms) one bag per history item, over all rows
    history_shop: torch.Tensor  # (I,) hashed shop id for shop items, 0 otherwise
    history_type: torch.Tensor  # (I,) index into HISTORY_TYPES
    history_slot: torch.Tensor  # (I,) position of the item in its user's sequence (1-based; 0 is [CLS])
    history_row: torch.Tensor  # (I,) the batch row the item belongs to
    max_items: int = 0


def _mlp(in_dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


class TermEncoder(nn.Module):
    """Mean of hashed-term embeddings; shared by both towers (the paper's shared term encoder)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bag = nn.EmbeddingBag(config.featurizer.n_buckets, config.term_dim, mode="mean", padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)


class ProductTower(nn.Module):
    def __init__(self, config: ModelConfig, terms: TermEncoder):
        super().__init__()
        self.config, self.terms = config, terms
        d = config.term_dim
        self.category = nn.Embedding(config.category_buckets, 32)
        self.country = nn.Embedding(config.country_buckets, 16)
        self.buckets = nn.ModuleList(nn.Embedding(config.quantile_buckets + 1, 8) for _ in range(N_BUCKET_FEATURES))
        in_dim = d + 32 + 16 + 8 * N_BUCKET_FEATURES + config.text_dim + config.graph_dim
        self.project = _mlp(in_dim, config.hidden_dim, config.output_dim, config.dropout)
        # Products nobody engaged with yet have no graph embedding: they get this learned vector.
        self.graph_fallback = nn.Parameter(torch.zeros(config.graph_dim))

    def forward(self, batch: ProductBatch) -> torch.Tensor:
        parts = [self.terms(batch.terms), self.category(batch.category),
                 self.country(batch.country)]
        parts += [emb(batch.buckets[:, i]) for i, emb in enumerate(self.buckets)]
        n = len(batch.category)
        if self.config.text_dim:
            parts.append(batch.text if batch.text is not None else torch.zeros(n, self.config.text_dim))
        if self.config.graph_dim:
            known = batch.graph_known if batch.graph_known is not None else torch.zeros(n, dtype=torch.bool)
            graph = batch.graph if batch.graph is not None else torch.zeros(n, self.config.graph_dim)
            parts.append(torch.where(known[:, None], graph, self.graph_fallback.expand(n, -1)))
        return nn.functional.normalize(self.project(torch.cat(parts, dim=1)), dim=1)


class QueryTower(nn.Module):
    def __init__(self, config: ModelConfig, terms: TermEncoder):
        super().__init__()
        self.config, self.terms = config, terms
        d = config.term_dim
        self.country = nn.Embedding(config.country_buckets, 16)
        self.shop = nn.Embedding(config.shop_buckets, d, padding_idx=0)
        self.item_type = nn.Embedding(len(HISTORY_TYPES), d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.history = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, config.history_heads, dim_feedforward=2 * d, dropout=config.dropout,
                                       batch_first=True), num_layers=1, enable_nested_tensor=False)
        self.project = _mlp(d + 16 + (d if config.use_history else 0), config.hidden_dim, config.output_dim,
                            config.dropout)

    def encode_history(self, batch: QueryBatch) -> torch.Tensor:
        n, d = len(batch.terms), self.config.term_dim
        length = batch.max_items + 1
        seq = torch.zeros(n, length, d)
        seq[:, 0] = self.cls[0, 0]
        mask = torch.ones(n, length, dtype=torch.bool)  # True = padding
        mask[:, 0] = False
        if len(batch.history_type):
            items = self.terms(batch.history_terms) + self.shop(batch.history_shop)
            items = items + self.item_type(batch.history_type)
            seq[batch.history_row, batch.history_slot] = items
            mask[batch.history_row, batch.history_slot] = False
        return self.history(seq, src_key_padding_mask=mask)[:, 0]

    def forward(self, batch: QueryBatch) -> torch.Tensor:
        parts = [self.terms(batch.terms), self.country(batch.country)]
        if self.config.use_history:
            parts.append(self.encode_history(batch))
        return nn.functional.normalize(self.project(torch.cat(parts, dim=1)), dim=1)


class UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.terms = TermEncoder(config)
        self.product_tower = ProductTower(config, self.terms)
        self.query_tower = QueryTower(config, self.terms)

    def forward(self, queries: QueryBatch, products: ProductBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_tower(queries), self.product_tower(products)
