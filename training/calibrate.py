"""Measure the budget -> price table on held-out data and return a Calibration."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from runtime.calibration import Calibration
from runtime.model import ExitSpec, PonderModel
from training.tasks import IGNORE

PRICE_GRID = [float(p) for p in torch.logspace(-4, 1.3, 22)]


@torch.no_grad()
def calibrate(
    model: PonderModel, batches: Iterable[tuple[Tensor, Tensor]], measured_on: str = "", prices: list[float] = PRICE_GRID
) -> Calibration:
    """Mean depth fraction at each price, over positions that carry a target."""
    model.eval()
    device = next(model.parameters()).device
    batches = [(ids.to(device), targets.to(device)) for ids, targets in batches]
    depth_sums, num_tokens = [0.0] * len(prices), 0
    for ids, targets in batches:
        mask = targets != IGNORE
        num_tokens += int(mask.sum())
        for i, price in enumerate(prices):
            out = model(ids, ExitSpec(price=price))
            depth_sums[i] += float(out.depth[mask].sum())
    max_depth = max(model.cfg.max_depth, 1)
    fractions = [s / max(num_tokens, 1) / max_depth for s in depth_sums]
    return Calibration(prices=list(prices), depth_fractions=fractions, measured_on=measured_on, num_tokens=num_tokens)


@torch.no_grad()
def calibrate_from_states(model: PonderModel, ids: Tensor, measured_on: str = "", prices: list[float] = PRICE_GRID,
                          batch: int = 4) -> Calibration:
    """The same table from one full-depth pass: each token's exit scores are read at its full-depth
    states, and its depth at a price is the first step whose score falls below it. This ignores how
    earlier tokens' exits change later tokens' states (second order for a dense model with
    `propagate`); the engine's per-request budget controller absorbs what remains. One forward
    instead of one per price, which is what makes a 30-layer model affordable to calibrate on CPU."""
    model.eval()
    cfg = model.cfg
    scores = []
    for i in range(0, len(ids), batch):
        out = model(ids[i : i + batch])
        scores.append(out.exit_scores.flatten(0, 1))  # (n, D)
    score = torch.cat(scores).float()
    steps = torch.arange(cfg.max_depth)
    fractions = []
    for price in prices:
        stop = (score < price) & (steps >= cfg.min_depth)
        depth = torch.where(stop, steps, cfg.max_depth).amin(-1)
        fractions.append(float(depth.float().mean()) / max(cfg.max_depth, 1))
    return Calibration(prices=list(prices), depth_fractions=fractions, measured_on=measured_on + " (from full-depth states)",
                       num_tokens=len(score))
