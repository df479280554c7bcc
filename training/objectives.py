"""Losses and the price controller (docs/architecture.md, "The model").

- LM loss at each token's exit, plus deep supervision at sampled depths.
- Exit/value-head regression onto the realised gain: on audit batches (forced full depth)
  the target at step s is relu(CE_s - min_{s' > s} CE_s'), the cross-entropy that more
  steps actually removed.
- A dual-ascent price per training budget keeps the realised mean depth on target.
- Routed models: straight-through Gumbel routing, plus a balance term against collapse
  onto one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.model import ForwardOutput, PonderModel
from training.tasks import IGNORE


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy (B, T); 0 where the target is ignored."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return ce.view(targets.shape)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def depth_ces(model: PonderModel, out: ForwardOutput, targets: Tensor, depths: list[int], cos: Tensor, sin: Tensor,
              mask: Tensor | None = None) -> Tensor:
    """CE (len(depths), B, T) decoding the states entering the given steps (deep supervision).
    mask: the attention mask the forward ran with (None: causal)."""
    assert out.states is not None
    return torch.stack([token_ce(model.decode(out.states[d], cos, sin, mask), targets) for d in depths])


def realised_gains(ce_by_depth: Tensor) -> Tensor:
    """(D+1, B, T) CE at each depth -> (D, B, T) gain still available after step s."""
    future_best = torch.flip(torch.cummin(torch.flip(ce_by_depth, [0]), dim=0).values, [0])  # min over s' >= s
    return (ce_by_depth[:-1] - future_best[1:]).clamp_min(0)


def value_loss(exit_scores: Tensor, gains: Tensor, mask: Tensor) -> Tensor:
    """Huber regression of the exit head (B, T, D) onto realised gains (D, B, T)."""
    pred = exit_scores.permute(2, 0, 1)
    return masked_mean(F.smooth_l1_loss(pred, gains, reduction="none", beta=0.5), mask[None].expand_as(pred).float())


def router_balance(router_logits: list[Tensor], mask: Tensor) -> Tensor:
    """KL(mean routing distribution || uniform) over loss positions, summed over steps."""
    total = torch.zeros(())
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        mean = (probs * mask[..., None]).sum((0, 1)) / mask.sum().clamp_min(1)
        total = total + (mean * (mean.clamp_min(1e-9).log() + math.log(mean.numel()))).sum()
    return total


@dataclass
class PriceController:
    """Dual ascent on log-price per budget: log λ += lr * (mean_depth / max_depth - budget)."""

    budgets: tuple[float, ...]
    lr: float = 0.3
    init_price: float = 0.05
    log_prices: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for b in self.budgets:
            self.log_prices.setdefault(str(b), math.log(self.init_price))

    def price(self, budget: float) -> float:
        return math.exp(self.log_prices[str(budget)])

    def update(self, budget: float, depth_fraction: float) -> None:
        value = self.log_prices[str(budget)] + self.lr * (depth_fraction - budget)
        self.log_prices[str(budget)] = min(max(value, math.log(1e-5)), math.log(20.0))
