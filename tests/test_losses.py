"""The hinge loss with learned per-interaction thresholds, InfoNCE, and the negative schedule."""

from __future__ import annotations

import torch

from training.losses import INTERACTIONS, InfoNCELoss, ThresholdHingeLoss, negative_mix


def test_hinge_is_zero_when_every_margin_holds_and_positive_otherwise() -> None:
    loss = ThresholdHingeLoss(margin=0.1, init=0.3)
    types = torch.tensor([0, 3])
    separated = loss(torch.tensor([0.5, 0.6]), torch.tensor([[0.1, 0.0], [-0.2, 0.15]]), types)
    assert separated.item() == 0.0
    violated = loss(torch.tensor([0.35, 0.6]), torch.tensor([[0.1, 0.25], [0.0, 0.0]]), types)
    # positive 0.35 < 0.3 + 0.1 by 0.05; negative 0.25 > 0.3 - 0.1 by 0.05 (mean over 2 → 0.025)
    assert torch.isclose(violated, torch.tensor((0.05 + 0.025) / 2))


def test_thresholds_learn_to_separate_interaction_types() -> None:
    """Purchases score higher than clicks in the data, so the learned purchase threshold ends higher."""
    torch.manual_seed(0)
    loss = ThresholdHingeLoss(margin=0.05, init=0.0)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.05)
    click, purchase = INTERACTIONS.index("click"), INTERACTIONS.index("purchase")
    for _ in range(400):
        types = torch.tensor([click] * 64 + [purchase] * 64)
        positive = torch.cat([torch.rand(64) * 0.3 + 0.3, torch.rand(64) * 0.2 + 0.75])
        negatives = torch.where(types[:, None] == purchase, torch.rand(128, 8) * 0.6, torch.rand(128, 8) * 0.2)
        optimizer.zero_grad()
        loss(positive, negatives, types).backward()
        optimizer.step()
    theta = loss.thresholds.detach()
    assert theta[purchase] > theta[click] + 0.2, theta


def test_negative_weights_shift_the_loss_to_the_weighted_negatives() -> None:
    loss = ThresholdHingeLoss(margin=0.0, init=0.0)
    positive, types = torch.tensor([1.0]), torch.tensor([0])
    negatives = torch.tensor([[0.5, -0.5]])
    only_first = loss(positive, negatives, types, torch.tensor([[1.0, 0.0]]))
    only_second = loss(positive, negatives, types, torch.tensor([[0.0, 1.0]]))
    assert only_first.item() > 0 and only_second.item() == 0


def test_infonce_prefers_a_high_positive() -> None:
    loss = InfoNCELoss(init_temperature=0.1)
    good = loss(torch.tensor([0.9]), torch.tensor([[0.1, 0.2]]))
    bad = loss(torch.tensor([0.1]), torch.tensor([[0.8, 0.9]]))
    assert good < bad


def test_negative_mix_warms_up_then_ramps_linearly() -> None:
    assert [negative_mix(s, warmup_steps=10, ramp_steps=20) for s in (0, 9, 10, 20, 30, 99)] == [
        0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
