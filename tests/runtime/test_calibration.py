import pytest

from runtime.calibration import Calibration


def test_budget_maps_monotonically_to_price():
    cal = Calibration(prices=[0.001, 0.01, 0.1, 1.0], depth_fractions=[0.95, 0.7, 0.4, 0.1])
    assert cal.price_for_budget(1.0) == 0.0
    prices = [cal.price_for_budget(b) for b in (0.9, 0.7, 0.55, 0.4, 0.25, 0.1)]
    assert prices == sorted(prices)
    assert cal.price_for_budget(0.7) == pytest.approx(0.01)
    assert 0.01 < cal.price_for_budget(0.55) < 0.1
    assert cal.price_for_budget(0.05) == 1.0  # below the table: the highest measured price


def test_non_monotone_measurements_are_smoothed():
    cal = Calibration(prices=[0.01, 0.1, 1.0], depth_fractions=[0.8, 0.85, 0.2])
    assert cal.price_for_budget(0.5) > 0.1


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match="compute_budget"):
        Calibration.uncalibrated().price_for_budget(budget)


def test_table_validation():
    with pytest.raises(ValueError):
        Calibration(prices=[0.1, 0.01], depth_fractions=[0.5, 0.6])
    with pytest.raises(ValueError):
        Calibration(prices=[], depth_fractions=[])
