"""calibration.json: the measured map from compute budget to exit price.

A budget is the target mean core depth as a fraction of max_depth. Training measures, on
held-out data, the mean depth each price gives; serving inverts that table. Price 0 always
means full depth (the exit head's predicted gain is strictly positive). `quality` publishes what
a budget costs (held-out perplexity and agreement with full depth) before anyone sends it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Calibration:
    prices: list[float]  # ascending
    depth_fractions: list[float]  # mean depth / max_depth measured at each price (non-increasing)
    measured_on: str = ""  # what held-out data the table came from
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # What each budget costs, measured on held-out text by `ponder eval-exits`: one row per budget
    # with ppl, ppl_increase (vs full depth), top1_agreement (with full depth) and mean_depth_fraction.
    quality: list[dict[str, float]] = field(default_factory=list)
    quality_measured_on: str = ""

    def __post_init__(self) -> None:
        if len(self.prices) != len(self.depth_fractions) or not self.prices:
            raise ValueError("calibration needs equally long, non-empty prices and depth_fractions")
        if any(b <= a for a, b in zip(self.prices, self.prices[1:])):
            raise ValueError("calibration prices must be strictly ascending")

    def price_for_budget(self, budget: float) -> float:
        """Price whose measured mean depth fraction is `budget` (log-linear interpolation)."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"compute_budget={budget} must be in (0, 1]")
        if budget >= 1.0:
            return 0.0
        # Depth falls as price rises; make the table monotone, then find the bracketing pair.
        fracs = list(self.depth_fractions)
        for i in range(1, len(fracs)):
            fracs[i] = min(fracs[i], fracs[i - 1])
        points = [(0.0, 1.0)] + list(zip(self.prices, fracs))
        for (p0, f0), (p1, f1) in zip(points, points[1:]):
            if f0 >= budget >= f1 and f0 > f1:
                t = (f0 - budget) / (f0 - f1)
                if p0 <= 0.0:
                    return p1 * t
                return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
        return self.prices[-1] if budget < fracs[-1] else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)

    @classmethod
    def uncalibrated(cls) -> Calibration:
        """A placeholder table for a model that was never calibrated: only budget 1.0 is exact."""
        return cls(prices=[1e-3, 1e3], depth_fractions=[1.0, 0.0], measured_on="uncalibrated")
