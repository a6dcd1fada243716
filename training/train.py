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
from pydantic import BaseModel, Field
from rich.progress import Progress

from training.batching import product_batch, query_batch
from training.losses import INTERACTIONS, InfoNCELoss, ThresholdHingeLoss, negative_mix
from training.model import ModelConfig, ProductBatch, UnifiedModel


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
    seed: int = 7


@dataclass
class TrainResult:
    model: UnifiedModel
    loss_fn: torch.nn.Module
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
    return torch.cat(out)


def train(examples: pd.DataFrame, products: pd.DataFrame, config: TrainConfig,
          show_progress: bool = True) -> TrainResult:
    """Train on ``examples`` (query, history features, product_id, interaction) against ``products``
    (product_tower_v1 rows; the catalogue negatives are drawn from)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = UnifiedModel(config.model)
    loss_fn: torch.nn.Module = (ThresholdHingeLoss(margin=config.hinge_margin) if config.loss == "hinge"
                                else InfoNCELoss())
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    catalogue = product_batch(products.to_dict("records"), config.model)
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    examples = examples[examples["product_id"].isin(row_of.index)].reset_index(drop=True)
    if examples.empty:
        raise ValueError("no training example has a product in the catalogue: check the product features")
    positives = torch.from_numpy(row_of[examples["product_id"].to_numpy()].to_numpy())
    types = torch.tensor([INTERACTIONS.index(t) for t in examples["interaction"]])
    records = examples.to_dict("records")
    product_vectors: torch.Tensor | None = None
    result = TrainResult(model=model, loss_fn=loss_fn)
    start = time.perf_counter()
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("training", total=config.steps)
        for step in range(config.steps):
            batch_index = rng.integers(0, len(examples), config.batch_size)
            queries = model.query_tower(query_batch([records[i] for i in batch_index], config.model))
            pos_rows = positives[batch_index]
            groups: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (scores, valid, weight)
            pos_vectors = model.product_tower(catalogue.take(pos_rows))
            positive = (queries * pos_vectors).sum(dim=1)
            if config.in_batch_negatives:
                scores = queries @ pos_vectors.T
                valid = pos_rows[None, :] != pos_rows[:, None]
                groups.append((scores, valid, 1.0))
            mix = negative_mix(step, config.warmup_steps, config.ramp_steps) if config.hard_negatives else 0.0
            if config.uniform_negatives and mix < 1.0:
                uniform = torch.from_numpy(rng.integers(0, len(products), config.uniform_negatives))
                scores = queries @ model.product_tower(catalogue.take(uniform)).T
                groups.append((scores, uniform[None, :] != pos_rows[:, None], 1.0 - mix))
            if config.hard_negatives and mix > 0.0:
                if product_vectors is None or step % config.hard_refresh_steps == 0:
                    product_vectors = encode_products(model, catalogue)
                with torch.no_grad():
                    top = (queries.detach() @ product_vectors.T).topk(config.hard_negatives + 1, dim=1).indices
                hard = model.product_tower(catalogue.take(top.reshape(-1))).reshape(*top.shape, -1)
                scores = (queries[:, None, :] * hard).sum(dim=2)
                groups.append((scores, top != pos_rows[:, None], mix))
            negatives = torch.cat([g[0] for g in groups], dim=1)
            weights = torch.cat([g[1].float() * g[2] for g in groups], dim=1)
            loss = loss_fn(positive, negatives, types[batch_index], weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            progress.update(task, advance=1, description=f"training (loss {loss.item():.4f})")
    result.seconds = time.perf_counter() - start
    result.examples_per_s = config.steps * config.batch_size / result.seconds
    model.eval()
    return result
