"""Per-request budget control: calibrated starting price, then dual ascent on realised depth."""

from __future__ import annotations

import math

from runtime.calibration import Calibration
from runtime.engine.params import ComputeParams


class BudgetController:
    """Holds one request's exit price.

    The price starts at the calibration's price for `compute_budget`; after each step,
    log(price) += lr * (realised mean depth fraction - budget), so a request whose text is
    harder or easier than the calibration data still lands on its target mean depth.
    A raw `exit_price` is used as given, and budget 1.0 means no price (full depth).
    """

    def __init__(self, params: ComputeParams, calibration: Calibration, max_depth: int, default_budget: float = 1.0,
                 lr: float = 0.05) -> None:
        self.max_depth, self.lr = max(max_depth, 1), lr
        self.budget = params.compute_budget if params.compute_budget is not None else default_budget
        self.adaptive = params.exit_price is None and self.budget < 1.0
        if params.exit_price is not None:
            self.price: float | None = params.exit_price
        else:
            self.price = calibration.price_for_budget(self.budget) if self.budget < 1.0 else None
        self.depth_sum = 0
        self.num_tokens = 0

    def update(self, depths: list[int]) -> None:
        self.depth_sum += sum(depths)
        self.num_tokens += len(depths)
        if self.adaptive and self.num_tokens:
            error = self.depth_sum / self.num_tokens / self.max_depth - self.budget
            self.price = math.exp(min(max(math.log(max(self.price, 1e-6)) + self.lr * error, math.log(1e-6)), math.log(1e3)))

    @property
    def mean_depth(self) -> float:
        return self.depth_sum / max(self.num_tokens, 1)
