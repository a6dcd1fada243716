"""Training of the unified model: hinge (or InfoNCE) loss over in-batch, uniform and hard negatives.

Hard negatives are mined with the current model (STAR-style): every ``hard_refresh_steps`` the whole
catalogue is re-encoded without gradients, and each query's top-scoring products (other than its
positive) become its hard negatives. Training warms up on uniform negatives only, then shifts loss
weight linearly from uniform to hard (``training.losses.negative_mix``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field, model_validator
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.batching import product_batch, query_batch
from training.featurizer import encode_texts
from training.losses import INTERACTIONS, InfoNCELoss, ThresholdHingeLoss, negative_mix
from training.model import (
    ModelConfig,
    ProductBatch,
    QueryBatch,
    UnifiedModel,
    hashed_tables,
    sparse_parameters,
    use_dense_gradients,
)


class TrainConfig(BaseModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: Literal["hinge", "infonce"] = "hinge"
    hinge_margin: float = 0.1
    steps: int = Field(600, ge=1)
    batch_size: int = Field(256, ge=2)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    uniform_negatives: int = Field(128, ge=0)
    hard_negatives: int = Field(8, ge=0)
    in_batch_negatives: bool = True
    warmup_steps: int = 150
    ramp_steps: int = 300
    hard_refresh_steps: int = 100
    hard_pool: int = Field(200_000, ge=1, description="products hard negatives are mined from, re-drawn at each "
                           "refresh (the whole catalogue when smaller): bounds a step's exact top-k on big catalogues")
    distill_weight: float = Field(1.0, ge=0, description="weight of the semantic channel's distillation loss")
    distill_warm_start_steps: int = Field(300, ge=0, description="distillation-only steps over the catalogue "
                                          "before ranking training (the semantic channel starts useful)")
    distill_batch_size: int = Field(1024, ge=1)
    distill_learning_rate: float = Field(0.03, gt=0, description="of the warm start: measured on Home Depot "
                                         "(distiller alone, 1,000 steps), 0.03 reaches a cosine to the teacher "
                                         "of 0.83 on held-out queries where the ranking rate 0.003 gets 0.75")
    seed: int = 7

    @model_validator(mode="after")
    def _pool_holds_the_negatives(self) -> TrainConfig:
        if self.hard_negatives and self.hard_pool <= self.hard_negatives:
            raise ValueError(f"hard_pool ({self.hard_pool}) must exceed hard_negatives ({self.hard_negatives}): "
                             "the positive and the negatives are mined from the pool")
        return self


@dataclass
class DistillationTexts:
    """Query-like texts (the training queries, spans of titles) and the transformer's encoding of each.

    Distilled on catalogue titles alone, the semantic channel's query side learns to read long texts;
    queries are two or three words, and a bag of terms trained on titles maps them elsewhere than the
    transformer does. These teach it the short texts it will actually read."""

    terms: torch.Tensor  # (N, max_terms) hashed as queries are
    vectors: torch.Tensor  # (N, text_dim)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, config: ModelConfig) -> DistillationTexts:
        """``frame``: columns ``text`` and ``text_embedding`` (as ``training.stages.step_text`` writes them)."""
        # The featuriser of the query tower (query_batch's): these texts stand for queries.
        terms = encode_texts(frame["text"].astype(str).tolist(), config.featurizer)
        vectors = np.stack(frame["text_embedding"].to_numpy()).astype(np.float32) if len(frame) else \
            np.zeros((0, config.text_dim), dtype=np.float32)
        return cls(torch.from_numpy(terms), torch.from_numpy(vectors))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(rng.integers(0, len(self.terms), n))
        return self.terms[rows], self.vectors[rows]


@dataclass
class TrainResult:
    model: UnifiedModel
    loss_fn: nn.Module
    losses: list[float] = field(default_factory=list)
    examples_per_s: float = 0.0
    seconds: float = 0.0


def encode_products(model: UnifiedModel, products: ProductBatch, batch_size: int = 4096) -> torch.Tensor:
    """All product vectors (no gradients), in catalogue order."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(products.category), batch_size):
            index = torch.arange(start, min(start + batch_size, len(products.category)))
            out.append(model.product_tower(products.take(index)))
    model.train()
    return torch.cat(out) if out else torch.zeros(0, model.config.embedding_dim)


def mining_pool(model: UnifiedModel, catalogue: ProductBatch, size: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Catalogue rows to mine hard negatives from (all, or ``size`` drawn at random) and their vectors."""
    n = len(catalogue.category)
    rows = torch.arange(n) if n <= size else torch.from_numpy(np.sort(rng.choice(n, size, replace=False)))
    return rows, encode_products(model, catalogue.take(rows))


class TrainingStep(nn.Module):
    """One step's loss as a single forward, so DistributedDataParallel can synchronise gradients
    (its hooks only see computation that runs through the wrapped module's forward)."""

    def __init__(self, model: UnifiedModel, loss_fn: nn.Module, config: TrainConfig):
        super().__init__()
        self.model, self.loss_fn, self.config = model, loss_fn, config

    def forward(self, queries_in: QueryBatch, catalogue: ProductBatch, pos_rows: torch.Tensor, types: torch.Tensor,
                uniform: torch.Tensor | None, mix: float,
                hard_pool: tuple[torch.Tensor, torch.Tensor] | None,
                distill_texts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        config, model = self.config, self.model
        queries = model.query_tower(queries_in)
        groups: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (scores, valid, weight)
        pos_vectors = model.product_tower(catalogue.take(pos_rows))
        positive = (queries * pos_vectors).sum(dim=1)
        if config.in_batch_negatives:
            groups.append((queries @ pos_vectors.T, pos_rows[None, :] != pos_rows[:, None], 1.0))
        if uniform is not None:
            scores = queries @ model.product_tower(catalogue.take(uniform)).T
            groups.append((scores, uniform[None, :] != pos_rows[:, None], 1.0 - mix))
        if hard_pool is not None:  # (catalogue rows, their vectors as of the last refresh)
            pool_rows, pool_vectors = hard_pool
            with torch.no_grad():
                top = pool_rows[(queries.detach() @ pool_vectors.T).topk(config.hard_negatives + 1, dim=1).indices]
            hard = model.product_tower(catalogue.take(top.reshape(-1))).reshape(*top.shape, -1)
            groups.append(((queries[:, None, :] * hard).sum(dim=2), top != pos_rows[:, None], mix))
        negatives = torch.cat([g[0] for g in groups], dim=1)
        weights = torch.cat([g[1].float() * g[2] for g in groups], dim=1)
        loss = self.loss_fn(positive, negatives, types, weights)
        if config.distill_weight:
            seen = pos_rows if uniform is None else torch.cat([pos_rows, uniform])
            products = catalogue.take(seen)
            loss = loss + config.distill_weight * model.distillation_loss(products.terms, products.text)
            if distill_texts is not None:
                loss = loss + config.distill_weight * model.distillation_loss(*distill_texts)
        return loss


class Optimizer:
    """AdamW for the dense parameters and lazy Adam (``SparseAdam``: moments of the rows a step touched)
    for the sparse hashed tables of :func:`training.model.sparse_parameters`, without weight decay.

    Under DDP the tables have dense gradients: they get AdamW without weight decay, which also moves rows
    a step did not touch by their momentum — close to, not the same as, the lazy update of one process."""

    def __init__(self, module: nn.Module, config: TrainConfig):
        tables, sparse = hashed_tables(module), sparse_parameters(module)
        table_ids, sparse_ids = {id(p) for p in tables}, {id(p) for p in sparse}
        dense_tables = [p for p in tables if id(p) not in sparse_ids]
        groups = [{"params": [p for p in module.parameters() if p.requires_grad and id(p) not in table_ids],
                   "weight_decay": config.weight_decay}]
        groups += [{"params": dense_tables, "weight_decay": 0.0}] if dense_tables else []
        self.optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=config.learning_rate)]
        if sparse:
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def warm_start_distillation(model: UnifiedModel, catalogue: ProductBatch, config: TrainConfig,
                            texts: DistillationTexts | None = None) -> list[float]:
    """Distillation-only steps on random catalogue titles (and as many query-like ``texts``), so the
    semantic channel's query side reads text like the transformer before ranking starts; returns the
    losses. Seeded alike on every rank: under DDP each rank computes the same steps and the weights
    stay identical."""
    if not (config.distill_warm_start_steps and model.query_tower.semantic is not None and catalogue.text is not None):
        return []
    rng = np.random.default_rng(config.seed)
    optimizer = Optimizer(model, config.model_copy(update={"learning_rate": config.distill_learning_rate}))
    losses = []
    for _ in range(config.distill_warm_start_steps):
        rows = torch.from_numpy(rng.integers(0, len(catalogue.category), config.distill_batch_size))
        products = catalogue.take(rows)
        loss = model.distillation_loss(products.terms, products.text)
        if texts is not None:
            loss = loss + model.distillation_loss(*texts.sample(rng, config.distill_batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train(examples: pd.DataFrame, products: pd.DataFrame, config: TrainConfig,
          show_progress: bool = True, distill_texts: pd.DataFrame | None = None) -> TrainResult:
    """Train on ``examples`` (query, history features, product_id, interaction) against ``products``
    (product_tower_v1 rows; the catalogue negatives are drawn from). ``distill_texts`` (text,
    text_embedding): query-like texts the semantic channel also distils (``DistillationTexts``).

    Under ``torchrun`` (a process group is initialised) the step runs in DistributedDataParallel:
    each rank draws its own batches, gradients are averaged, every rank ends with the same weights."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    rng = np.random.default_rng([config.seed, rank])
    model = UnifiedModel(config.model)
    if distributed:
        use_dense_gradients(model)
    loss_fn: nn.Module = (ThresholdHingeLoss(margin=config.hinge_margin) if config.loss == "hinge"
                          else InfoNCELoss())
    catalogue = product_batch(products.to_dict("records"), config.model)
    if model.lexical is not None:
        model.lexical.init_idf(catalogue.terms)  # the same on every rank: computed from the same catalogue
    step_module = TrainingStep(model, loss_fn, config)
    runner: nn.Module = DistributedDataParallel(step_module, find_unused_parameters=True) if distributed \
        else step_module
    optimizer = Optimizer(step_module, config)
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    examples = examples[examples["product_id"].isin(row_of.index)].reset_index(drop=True)
    if examples.empty:
        raise ValueError("no training example has a product in the catalogue: check the product features")
    positives = torch.from_numpy(row_of[examples["product_id"].to_numpy()].to_numpy())
    types = torch.tensor([INTERACTIONS.index(t) for t in examples["interaction"]])
    records = examples.to_dict("records")
    hard_pool: tuple[torch.Tensor, torch.Tensor] | None = None
    result = TrainResult(model=model, loss_fn=loss_fn)
    start = time.perf_counter()
    texts = None
    if distill_texts is not None and len(distill_texts) and model.query_tower.semantic is not None:
        texts = DistillationTexts.from_frame(distill_texts, config.model)
    warm_start_distillation(model, catalogue, config, texts)
    with Progress(disable=not show_progress or rank != 0) as progress:
        task = progress.add_task("training", total=config.steps)
        for step in range(config.steps):
            batch_index = rng.integers(0, len(examples), config.batch_size)
            mix = negative_mix(step, config.warmup_steps, config.ramp_steps) if config.hard_negatives else 0.0
            uniform = (torch.from_numpy(rng.integers(0, len(products), config.uniform_negatives))
                       if config.uniform_negatives and mix < 1.0 else None)
            mining = config.hard_negatives > 0 and mix > 0.0
            if mining and (hard_pool is None or step % config.hard_refresh_steps == 0):
                hard_pool = mining_pool(model, catalogue, config.hard_pool, rng)
            loss = runner(query_batch([records[i] for i in batch_index], config.model), catalogue,
                          positives[batch_index], types[batch_index], uniform, mix, hard_pool if mining else None,
                          texts.sample(rng, config.batch_size) if texts is not None and config.distill_weight else None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            progress.update(task, advance=1, description=f"training (loss {loss.item():.4f})")
    result.seconds = time.perf_counter() - start
    result.examples_per_s = config.steps * config.batch_size / result.seconds
    model.eval()
    return result
