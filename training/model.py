"""The unified two-tower model (Jha et al. 2023): heavy product tower offline, light query tower online.

* **Product tower**: shared term encoder over title + tags, category / shop-country embeddings,
  embeddings of the quantile buckets of quality signals, and the precomputed transformer (text)
  and graph encodings → projection → L2 normalisation.
* **Query tower**: the same term encoder over the query, the user's country, and a 1-layer
  transformer over the user's history items (recent queries, clicked shops, clicked-title words,
  purchased tags), read through a [CLS] slot → projection → L2 normalisation. A signed-out user has
  an empty history: the [CLS] slot alone still gives a vector.
* Each tower's vector joins three channels (``ChannelMix``): the *learned* projection above, the
  *lexical* match of the shared hashed terms (``LexicalChannel``) and the *semantic* one (product:
  the transformer encoding; query: ``SemanticDistiller``, a bag of terms trained to reproduce it).
  The query's lexical and semantic channels are personalised by the same encoders' reading of the
  history items (``HistoryExpansion``).

Batches are built by :mod:`training.batching` from the same feature dicts in training and serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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
    lexical_dim: int = Field(256, ge=0, description="width of the lexical match channel; 0 disables it")
    semantic_channel: bool = Field(True, description="append the transformer channel (needs text_dim > 0)")
    distill_buckets: int = Field(1 << 16, ge=1024, description="term table of the semantic channel's query side")
    distill_dim: int = 256
    history_expansion: float = Field(0.3, ge=0, description="starting weight of each history item type in the "
                                     "query's lexical and semantic channels (learned; 0 turns the expansion off)")

    @property
    def semantic_dim(self) -> int:
        return self.text_dim if self.semantic_channel else 0

    @property
    def channels(self) -> int:
        return 1 + (self.lexical_dim > 0) + (self.semantic_dim > 0)

    @property
    def embedding_dim(self) -> int:
        """Width of the vectors both towers emit: the learned channel, the lexical, the semantic."""
        return self.output_dim + self.lexical_dim + self.semantic_dim


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


@dataclass
class UserState:
    """The query tower's reading of each row's user, independent of the query: the hashed country, the
    history transformer's [CLS] output (None without ``use_history``) and, per exact-match channel
    (lexical, semantic), the history term its expansion adds (None where the channel is not expanded).
    The retrieval service computes it once per user and reuses it for every query of that user."""

    country: torch.Tensor  # (B,)
    history: torch.Tensor | None  # (B, term_dim)
    expansions: list[torch.Tensor | None]  # per channel: (B, channel width) or None

    def row(self, i: int) -> PackedUserState:
        """Row ``i`` as numpy copies, what a cache keeps: arrays are invisible to Python's cyclic garbage
        collector, tensors are not — each full collection traverses every live tensor, and a cache of a few
        thousand users' tensors made those pauses (which hold the GIL) several ms longer. Copies, so a
        cached row does not keep its whole batch alive."""
        one = lambda t: None if t is None else t[i:i + 1].detach().numpy().copy()  # noqa: E731
        return PackedUserState(one(self.country), one(self.history), tuple(one(e) for e in self.expansions))

    @staticmethod
    def stack(rows: Sequence[PackedUserState]) -> UserState:
        """One state whose rows are ``rows`` (from :meth:`row`), in order."""
        cat = lambda parts: None if parts[0] is None else torch.from_numpy(np.concatenate(parts))  # noqa: E731
        return UserState(cat([r.country for r in rows]), cat([r.history for r in rows]),
                         [cat(list(parts)) for parts in zip(*(r.expansions for r in rows), strict=True)])


class PackedUserState(NamedTuple):
    """One user's :class:`UserState` row as numpy arrays (see :meth:`UserState.row`)."""

    country: np.ndarray
    history: np.ndarray | None
    expansions: tuple[np.ndarray | None, ...]

    def flat(self) -> np.ndarray:
        """The row as one float32 vector: ``[country, history, expansions...]`` (absent parts left out),
        the form a feature store keeps. Country ids are small integers (< 2**24), exact in float32."""
        parts = [self.country.astype(np.float32), *(p for p in (self.history, *self.expansions) if p is not None)]
        return np.concatenate([p.reshape(-1) for p in parts]).astype(np.float32, copy=False)

    @staticmethod
    def from_flat(flat: Sequence[float] | np.ndarray, like: PackedUserState) -> PackedUserState:
        """The inverse of :meth:`flat`, with the layout of ``like`` (any row of the same model: which
        parts exist and their widths depend on the model's config only). A vector of another length is
        a ValueError: it was written by another model."""
        flat = np.asarray(flat, np.float32)
        widths = [None if p is None else p.shape[1] for p in (like.history, *like.expansions)]
        if len(flat) != 1 + sum(w or 0 for w in widths):
            raise ValueError(f"a packed user state of {len(flat)} values does not fit this model's layout "
                             f"(1 + {[w for w in widths if w]})")
        parts, start = [], 1
        for width in widths:
            parts.append(None if width is None else flat[start:start + width].reshape(1, width).copy())
            start += width or 0
        country = np.array([int(flat[0])], like.country.dtype)
        return PackedUserState(country, parts[0], tuple(parts[1:]))


class HashedBag(nn.Module):
    """Mean of the embeddings of each row's hashed term ids (0 = padding), with a sparse gradient over
    the distinct ids of the batch only.

    ``nn.EmbeddingBag`` gives either a dense gradient (the whole table zero-filled on every lookup's
    backward and updated whole by every optimiser step: about half of a training step's time with ~35M
    hashed rows) or a sparse one with a row per term *occurrence* (hard-negative batches repeat terms
    hundreds of times: slower still). Here the distinct ids are looked up once, sparsely, and the bags
    are pooled over that small table."""

    hashed = True

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.sparse = True
        self.weight = nn.Parameter(torch.empty(buckets, dim))
        nn.init.normal_(self.weight)
        with torch.no_grad():
            self.weight[0] = 0.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:
            return self.weight.new_zeros(len(ids), self.weight.shape[1])
        distinct, position = torch.unique(ids, return_inverse=True)
        rows = nn.functional.embedding(distinct, self.weight, sparse=self.sparse)
        padding = 0 if int(distinct[0]) == 0 else None  # id 0, if present, is the smallest
        return nn.functional.embedding_bag(position, rows, mode="mean", padding_idx=padding)


def hashed_embedding(buckets: int, dim: int) -> nn.Embedding:
    """An embedding table indexed by hashed ids (0 = padding), with sparse gradients like ``HashedBag``."""
    table = nn.Embedding(buckets, dim, padding_idx=0, sparse=True)
    table.hashed = True
    return table


def _hashed_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if getattr(m, "hashed", False) and m.weight.requires_grad]


def hashed_tables(module: nn.Module) -> list[nn.Parameter]:
    """The trainable hashed tables (term bags, distiller bag, lexical weights, shops)."""
    return [m.weight for m in _hashed_modules(module)]


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The hashed tables whose gradients are sparse (only the rows a step touched): a sparse optimiser's."""
    return [m.weight for m in _hashed_modules(module) if m.sparse]


def use_dense_gradients(module: nn.Module) -> None:
    """Dense gradients everywhere: DistributedDataParallel cannot all-reduce sparse ones."""
    for m in _hashed_modules(module):
        m.sparse = False


def _mlp(in_dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


class TermEncoder(nn.Module):
    """Mean of hashed-term embeddings; shared by both towers (the paper's shared term encoder)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bag = HashedBag(config.featurizer.n_buckets, config.term_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)


class LexicalChannel(nn.Module):
    """The shared term encoder's exact-match channel, appended to both towers' vectors.

    A text's channel is the weighted sum of one random vector per hashed term, L2-normalised: the dot
    product of two such vectors approximates the weighted cosine of their sparse term bags (a random
    projection), so a query and a title that share rare words score high even when neither word was
    in the training data — the lexical matching a dense model over a few thousand training queries
    cannot learn. The per-term weights (an IDF of sorts) are learned; the term vectors stay the fixed
    random projection (learning them would only let training-set words drift from unseen ones, and
    a frozen table costs no optimiser state or gradient traffic).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        n, d = config.featurizer.n_buckets, config.lexical_dim
        self.vectors = nn.EmbeddingBag(n, d, mode="sum", padding_idx=0)
        nn.init.normal_(self.vectors.weight, std=d ** -0.5)
        self.vectors.weight.requires_grad_(False)
        self.weights = hashed_embedding(n, 1)
        nn.init.ones_(self.weights.weight)
        with torch.no_grad():
            self.weights.weight[0] = 0.0

    @torch.no_grad()
    def init_idf(self, catalogue_terms: torch.Tensor) -> None:
        """Start each term's weight at its inverse document frequency in the catalogue,
        log(1 + N / (1 + df)): rare words count, common trigrams hardly (a tf-idf cosine to begin with)."""
        n_docs, n = len(catalogue_terms), self.weights.num_embeddings
        rows = torch.arange(n_docs).repeat_interleave(catalogue_terms.shape[1])
        keys = torch.unique(rows * n + catalogue_terms.reshape(-1))
        df = torch.bincount(keys % n, minlength=n).float()
        idf = torch.log1p(n_docs / (1.0 + df))
        self.weights.weight[:, 0] = torch.log(torch.expm1(idf.clamp(min=1e-3)))  # softplus⁻¹
        self.weights.weight[0] = 0.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weights = nn.functional.softplus(self.weights(ids).squeeze(-1)) * (ids != 0)
        return nn.functional.normalize(self.vectors(ids, per_sample_weights=weights), dim=1)


class ChannelMix(nn.Module):
    """Joins the towers' channels (learned, lexical, semantic: each made unit length) into one vector
    with learned scales s_i shared by both towers: the inner product of two joined vectors is
    Σ s_i² cos_i / Σ s_i², a learned blend of the channels' cosines that stays an inner product
    (ANN-ready)."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scales = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def set_weights(self, weights: torch.Tensor) -> None:
        """Each channel's share s_i² of the score (relative; the calibration's result)."""
        self.log_scales.copy_(0.5 * torch.log(weights.clamp(min=1e-8) / weights.max()))

    def weights(self) -> torch.Tensor:
        return self.log_scales.detach().exp() ** 2

    def forward(self, channels: list[torch.Tensor]) -> torch.Tensor:
        if len(channels) == 1:
            return nn.functional.normalize(channels[0], dim=1)
        scales = self.log_scales.exp()
        parts = [s * nn.functional.normalize(c, dim=1) for s, c in zip(scales, channels, strict=True)]
        # Unit length again: a channel with no input (zeros) hands its weight to the others.
        return nn.functional.normalize(torch.cat(parts, dim=1), dim=1)


class SemanticDistiller(nn.Module):
    """The query side of the semantic channel: a bag of hashed terms (its own table, the term ids
    folded into ``distill_buckets``) mapped into the transformer's space, trained to reproduce the
    product titles' MiniLM encodings (distillation on the whole catalogue, no labels), so the light
    query tower can match the product tower's transformer encoding without running a transformer
    per request."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.buckets = config.distill_buckets
        self.bag = HashedBag(config.distill_buckets, config.distill_dim)
        self.map = nn.Sequential(nn.GELU(), nn.Linear(config.distill_dim, config.text_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        folded = torch.where(ids > 0, 1 + ids % (self.buckets - 1), 0)
        return self.map(self.bag(folded))


class HistoryExpansion(nn.Module):
    """Personalises the query's exact-match channels: the lexical (or semantic) reading of the user's
    history items — recent queries, clicked titles' terms, purchased tags — added to the query's own,
    one learned weight per item type. "dress" from a user who bought linen and boho things moves toward
    linen, boho dresses; a signed-out user (no items) keeps the query's channel unchanged.

    Without it the history reaches only the learned channel, which a few thousand training queries
    leave weak: the channels that carry the ranking would ignore who is asking."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        start = torch.full((len(HISTORY_TYPES),), max(config.history_expansion, 1e-6))
        self.log_weights = nn.Parameter(torch.log(start))

    def forward(self, query: torch.Tensor, items: torch.Tensor, batch: QueryBatch) -> torch.Tensor:
        """``query`` (B, d): the query text's channel; ``items`` (I, d): the same encoder over each
        history item (shop items have no text and add nothing)."""
        return self.combine(query, self.history(items, batch, len(query)))

    def history(self, items: torch.Tensor, batch: QueryBatch, rows: int) -> torch.Tensor:
        """(rows, d): each row's weighted mean history item per type, summed; zeros without history.
        It does not depend on the query, so the service computes it once per user."""
        types, d = len(HISTORY_TYPES), items.shape[1]
        if not len(batch.history_type):
            return items.new_zeros(rows, d)
        has_text = (batch.history_terms != 0).any(dim=1)
        slot = (batch.history_row * types + batch.history_type)[has_text]
        per_type = items.new_zeros(rows * types, d).index_add_(0, slot, nn.functional.normalize(items[has_text], dim=1))
        count = torch.bincount(slot, minlength=rows * types).clamp(min=1).unsqueeze(1)
        per_type = (per_type / count).view(rows, types, -1)  # mean item of each type, per row
        return (self.log_weights.exp()[None, :, None] * per_type).sum(dim=1)

    @staticmethod
    def combine(query: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(nn.functional.normalize(query, dim=1) + history, dim=1)


class ProductTower(nn.Module):
    def __init__(self, config: ModelConfig, terms: TermEncoder, lexical: LexicalChannel | None, mix: ChannelMix):
        super().__init__()
        self.config, self.terms, self.lexical, self.mix = config, terms, lexical, mix
        d = config.term_dim
        self.category = nn.Embedding(config.category_buckets, 32)
        self.country = nn.Embedding(config.country_buckets, 16)
        self.buckets = nn.ModuleList(nn.Embedding(config.quantile_buckets + 1, 8) for _ in range(N_BUCKET_FEATURES))
        in_dim = d + 32 + 16 + 8 * N_BUCKET_FEATURES + config.text_dim + config.graph_dim
        self.project = _mlp(in_dim, config.hidden_dim, config.output_dim, config.dropout)
        # Products nobody engaged with yet have no graph embedding: they get this learned vector.
        self.graph_fallback = nn.Parameter(torch.zeros(config.graph_dim))

    def forward(self, batch: ProductBatch) -> torch.Tensor:
        return self.mix(self.channels(batch))

    def channels(self, batch: ProductBatch) -> list[torch.Tensor]:
        """The channels before mixing: learned, lexical, semantic (those the config has)."""
        parts = [self.terms(batch.terms), self.category(batch.category),
                 self.country(batch.country)]
        parts += [emb(batch.buckets[:, i]) for i, emb in enumerate(self.buckets)]
        n = len(batch.category)
        text = batch.text if batch.text is not None else torch.zeros(n, self.config.text_dim)
        if self.config.text_dim:
            parts.append(text)
        if self.config.graph_dim:
            known = batch.graph_known if batch.graph_known is not None else torch.zeros(n, dtype=torch.bool)
            graph = batch.graph if batch.graph is not None else torch.zeros(n, self.config.graph_dim)
            parts.append(torch.where(known[:, None], graph, self.graph_fallback.expand(n, -1)))
        channels = [self.project(torch.cat(parts, dim=1))]
        if self.lexical is not None:
            channels.append(self.lexical(batch.terms))
        if self.config.semantic_dim:
            channels.append(text)
        return channels


class QueryTower(nn.Module):
    def __init__(self, config: ModelConfig, terms: TermEncoder, lexical: LexicalChannel | None, mix: ChannelMix):
        super().__init__()
        self.config, self.terms, self.lexical, self.mix = config, terms, lexical, mix
        d = config.term_dim
        self.country = nn.Embedding(config.country_buckets, 16)
        self.shop = hashed_embedding(config.shop_buckets, d)
        self.item_type = nn.Embedding(len(HISTORY_TYPES), d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.history = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, config.history_heads, dim_feedforward=2 * d, dropout=config.dropout,
                                       batch_first=True), num_layers=1, enable_nested_tensor=False)
        self.project = _mlp(d + 16 + (d if config.use_history else 0), config.hidden_dim, config.output_dim,
                            config.dropout)
        self.semantic = SemanticDistiller(config) if config.semantic_dim else None
        expand = config.use_history and config.history_expansion > 0
        self.expand_lexical = HistoryExpansion(config) if expand and lexical is not None else None
        self.expand_semantic = HistoryExpansion(config) if expand and self.semantic is not None else None

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

    def forward(self, batch: QueryBatch, state: UserState | None = None) -> torch.Tensor:
        return self.mix(self.channels(batch, state))

    def _text_channels(self) -> list[tuple[nn.Module, HistoryExpansion | None]]:
        """The exact-match channels the config has (lexical, semantic), each with its history expansion."""
        pairs = ((self.lexical, self.expand_lexical), (self.semantic, self.expand_semantic))
        return [(encoder, expansion) for encoder, expansion in pairs if encoder is not None]

    def user_state(self, batch: QueryBatch) -> UserState:
        """Everything the tower reads of the batch's users (country, history), without their queries."""
        history = self.encode_history(batch) if self.config.use_history else None
        expansions = [None if expansion is None else expansion.history(encoder(batch.history_terms), batch,
                                                                       len(batch.terms))
                      for encoder, expansion in self._text_channels()]
        return UserState(batch.country, history, expansions)

    def channels(self, batch: QueryBatch, state: UserState | None = None) -> list[torch.Tensor]:
        """The channels before mixing: learned, lexical, semantic (those the config has). ``state``:
        the rows' users as ``user_state`` computed them (default: from ``batch``'s own history)."""
        state = self.user_state(batch) if state is None else state
        parts = [self.terms(batch.terms), self.country(state.country)]
        if state.history is not None:
            parts.append(state.history)
        channels = [self.project(torch.cat(parts, dim=1))]
        for (encoder, expansion), history in zip(self._text_channels(), state.expansions, strict=True):
            channel = encoder(batch.terms)
            channels.append(channel if expansion is None else expansion.combine(channel, history))
        return channels


class UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.terms = TermEncoder(config)
        self.lexical = LexicalChannel(config) if config.lexical_dim else None
        self.mix = ChannelMix(config.channels)
        self.product_tower = ProductTower(config, self.terms, self.lexical, self.mix)
        self.query_tower = QueryTower(config, self.terms, self.lexical, self.mix)

    def forward(self, queries: QueryBatch, products: ProductBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_tower(queries), self.product_tower(products)

    def distillation_loss(self, terms: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """1 − cosine between the semantic distiller's reading of ``terms`` (hashed term ids of product
        texts or query-like texts) and the transformer's encoding of the same texts (rows without an
        encoding are skipped); 0 when the channel is off."""
        if self.query_tower.semantic is None or target is None:
            return torch.zeros(())
        has_text = target.abs().sum(dim=1) > 0
        if not has_text.any():
            return torch.zeros(())
        predicted = self.query_tower.semantic(terms[has_text])
        return 1.0 - nn.functional.cosine_similarity(predicted, target[has_text], dim=1).mean()
