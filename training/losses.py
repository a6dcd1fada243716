"""Losses of the unified model: the paper's hinge loss with a learned threshold per interaction type,
and softmax/InfoNCE over in-batch negatives as the configurable alternative.

Scores are cosine similarities in [-1, 1]. The hinge pushes a positive's score above its type's
threshold and every negative's score below it, each by a margin; because the thresholds are learned
per type (click < favourite < cart < purchase in practice), a score can later be pruned by the
threshold of the interaction a caller cares about.
"""

from __future__ import annotations

import torch
from torch import nn

INTERACTIONS = ("click", "favorite", "add_to_cart", "purchase")


class ThresholdHingeLoss(nn.Module):
    """mean(relu(margin + θ_t − s⁺)) + mean(relu(margin + s⁻ − θ_t)), with θ_t learned per type."""

    def __init__(self, n_types: int = len(INTERACTIONS), margin: float = 0.1, init: float = 0.3):
        super().__init__()
        self.margin = margin
        self.thresholds = nn.Parameter(torch.full((n_types,), init))

    def forward(self, positive: torch.Tensor, negatives: torch.Tensor, types: torch.Tensor,
                negative_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``positive`` (B,), ``negatives`` (B, N) scores; ``types`` (B,) interaction ids;
        ``negative_weights`` (B, N) optional per-negative weights (e.g. uniform vs hard)."""
        theta = self.thresholds[types]
        pos = torch.relu(self.margin + theta - positive)
        neg = torch.relu(self.margin + negatives - theta[:, None])
        if negative_weights is not None:
            neg = (neg * negative_weights).sum(dim=1) / negative_weights.sum(dim=1).clamp_min(1e-9)
        else:
            neg = neg.mean(dim=1)
        return (pos + neg).mean()


class InfoNCELoss(nn.Module):
    """Softmax cross-entropy of the positive against the negatives, with a learned temperature."""

    def __init__(self, init_temperature: float = 0.05):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(float(init_temperature)).log())

    def forward(self, positive: torch.Tensor, negatives: torch.Tensor, types: torch.Tensor | None = None,
                negative_weights: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.cat([positive[:, None], negatives], dim=1) / self.log_temperature.exp()
        if negative_weights is not None:
            logits = torch.cat([logits[:, :1], logits[:, 1:] + negative_weights.clamp_min(1e-9).log()], dim=1)
        target = torch.zeros(len(positive), dtype=torch.long, device=positive.device)
        return nn.functional.cross_entropy(logits, target)


def negative_mix(step: int, warmup_steps: int, ramp_steps: int) -> float:
    """Share of loss weight on hard negatives: 0 during warm-up (uniform only), then a linear ramp to 1."""
    if step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - warmup_steps) / ramp_steps)
