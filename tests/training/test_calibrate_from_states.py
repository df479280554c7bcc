"""The one-pass calibration against the exact one (a price per forward)."""

import pytest
import torch

from runtime.config import ModelConfig
from runtime.model import PonderModel
from training.calibrate import calibrate, calibrate_from_states

PRICES = [0.01, 0.1, 0.5, 1.0, 2.0, 5.0]


def model_with_spread_scores() -> PonderModel:
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("tiny", max_depth=4, n_pool=4, min_depth=1)).eval()
    with torch.no_grad():  # spread the value head's predictions over the price grid
        model.exit_head.out.weight.mul_(200)
        model.exit_head.out.bias.fill_(0.5)
    return model


def test_matches_the_exact_calibration_when_tokens_cannot_interact():
    model = model_with_spread_scores()
    ids = torch.randint(0, 64, (40, 1))  # one token per sequence: nobody's exit changes another's state
    targets = torch.zeros_like(ids)
    exact = calibrate(model, [(ids, targets)], prices=PRICES)
    fast = calibrate_from_states(model, ids, prices=PRICES)
    assert fast.depth_fractions == pytest.approx(exact.depth_fractions, abs=1e-6)
    assert len(set(fast.depth_fractions)) > 2  # the test prices actually move the depth


def test_is_monotone_and_bounded_by_min_depth():
    model = model_with_spread_scores()
    fast = calibrate_from_states(model, torch.randint(0, 64, (6, 16)), prices=PRICES + [1e6])
    fr = fast.depth_fractions
    assert all(b <= a for a, b in zip(fr, fr[1:]))
    assert fr[-1] == model.cfg.min_depth / model.cfg.max_depth
    assert fast.num_tokens == 6 * 16
