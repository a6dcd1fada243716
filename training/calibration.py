"""Channel calibration: how much each of the model's channels (learned, lexical, semantic) counts in
the score, re-fit on queries the model did not train on.

Training learns the mix too (``ChannelMix``'s scales), but on the training queries, where the
learned channel can memorise which products were engaged: on Home Depot (each product judged for
~1.3 queries) training gave it a third of the score while, alone, it found 0.2% of the held-out
queries' products in its top 100 (chance). Here the shares are chosen by purchase recall@k on
held-out rows (the validation window, or held-out queries): a grid over each channel's share
relative to the last one (or, the last switched off, to the one before), the trained shares always
a candidate, so calibration never loses on the rows it is fit on. The result is set on the model
(both towers share the mix), so every later step — boosting, evaluation, gate, export, serving —
sees the calibrated model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from training.batching import product_batch, query_batch
from training.model import UnifiedModel


class CalibrationConfig(BaseModel):
    grid: tuple[float, ...] = Field((0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0),
                                    description="shares tried for each channel, relative to the last channel's 1 (and, "
                                    "with the last switched off, relative to the one before it)")
    k: int = Field(100, ge=1, description="recall@k on the whole catalogue (scaled to the pool)")
    max_rows: int = Field(1000, ge=1, description="held-out (query, purchased product) rows used (seeded sample)")
    pool: int = Field(50_000, ge=100, description="catalogue rows ranked (all when fewer; else a sample "
                      "plus the relevant rows, with k scaled by pool / catalogue): bounds memory on 1M catalogues")
    seed: int = 7


@dataclass
class Calibration:
    weights: list[float]  # each channel's share of the score, as set on the model
    trained_weights: list[float]
    recall: float  # held-out recall@k (on the pool) with ``weights``
    recall_as_trained: float
    rows: int
    pool: int
    k: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@torch.no_grad()
def _unit_channels(channels: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.functional.normalize(c, dim=1) for c in channels]


@torch.no_grad()
def calibrate_channels(model: UnifiedModel, rows: pd.DataFrame, products: pd.DataFrame,
                       config: CalibrationConfig | None = None, batch_size: int = 4096) -> Calibration | None:
    """Fit and set the channel shares of ``model`` on ``rows`` (query features + the purchased
    ``product_id``), ranking ``products``. None (model unchanged) with one channel or no usable row."""
    config = config or CalibrationConfig()
    model.eval()
    n_channels = model.config.channels
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    rows = rows[rows["product_id"].isin(row_of.index)]
    if n_channels < 2 or rows.empty:
        return None
    rng = np.random.default_rng(config.seed)
    if len(rows) > config.max_rows:
        rows = rows.iloc[np.sort(rng.choice(len(rows), config.max_rows, replace=False))]
    relevant = row_of[rows["product_id"].to_numpy()].to_numpy()
    n = len(products)
    pool = np.arange(n)
    if n > config.pool:
        pool = np.union1d(rng.choice(n, config.pool, replace=False), relevant)
    position = np.searchsorted(pool, relevant)
    k = max(1, round(config.k * len(pool) / n))

    records = products.iloc[pool].to_dict("records")
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_channels)]
    for start in range(0, len(records), batch_size):
        batch = product_batch(records[start:start + batch_size], model.config)
        for i, c in enumerate(_unit_channels(model.product_tower.channels(batch))):
            parts[i].append(c)
    product_channels = [torch.cat(p) for p in parts]
    present = torch.stack([(c.abs().sum(dim=1) > 0).float() for c in product_channels])  # (channels, pool)
    query_records = rows.to_dict("records")
    cosines = [torch.zeros(len(rows), len(pool)) for _ in range(n_channels)]
    for start in range(0, len(query_records), 512):
        batch = query_batch(query_records[start:start + 512], model.config)
        for i, c in enumerate(_unit_channels(model.query_tower.channels(batch))):
            cosines[i][start:start + len(c)] = c @ product_channels[i].T
    index = torch.arange(len(rows))
    target = torch.from_numpy(position)

    def recall(weights: torch.Tensor) -> float:
        # The mixed product vector is [s_i ĉ_i] / sqrt(Σ s_i² [channel present]); the query's norm is
        # the same for all products and does not change its ranking.
        scores = sum(w * c for w, c in zip(weights, cosines, strict=True))
        scores = scores / (weights @ present).clamp(min=1e-12).sqrt()
        above = (scores > scores[index, target][:, None]).sum(dim=1)
        return float((above < k).float().mean())

    trained = model.mix.weights()
    trained = trained / trained[-1]
    best, best_recall = trained, recall(trained)
    as_trained = best_recall
    candidates = [[*shares, 1.0] for shares in itertools.product(config.grid, repeat=n_channels - 1)]
    candidates += [[*shares, 1.0, 0.0] for shares in itertools.product(config.grid, repeat=n_channels - 2)]
    for candidate in candidates:
        weights = torch.tensor(candidate)
        value = recall(weights)
        if value > best_recall:
            best, best_recall = weights, value
    model.mix.set_weights(best)
    return Calibration(weights=[round(float(w), 4) for w in best / best.sum()],
                       trained_weights=[round(float(w), 4) for w in trained / trained.sum()],
                       recall=best_recall, recall_as_trained=as_trained, rows=len(rows), pool=len(pool), k=k)
