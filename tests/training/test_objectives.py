import torch

from training.objectives import PriceController, realised_gains


def test_realised_gain_is_the_best_later_improvement():
    ce = torch.tensor([3.0, 2.0, 2.5, 1.0, 1.5]).view(5, 1, 1)  # CE entering steps 0..4
    gains = realised_gains(ce).flatten().tolist()
    assert gains == [2.0, 1.0, 1.5, 0.0]


def test_dual_ascent_raises_price_when_too_deep_and_lowers_it_when_too_shallow():
    ctl = PriceController(budgets=(0.5,), lr=0.5)
    p0 = ctl.price(0.5)
    ctl.update(0.5, depth_fraction=0.9)
    assert ctl.price(0.5) > p0
    p1 = ctl.price(0.5)
    ctl.update(0.5, depth_fraction=0.1)
    assert ctl.price(0.5) < p1
