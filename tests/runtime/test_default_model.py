"""The embedded default checkpoint ships in the repo and runs on CPU."""

import torch

from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.generate import generate
from runtime.model import ExitSpec


def test_default_model_loads_and_generates_at_a_budget():
    ckpt = load_checkpoint(DEFAULT_MODEL)
    assert ckpt.calibration.measured_on != "uncalibrated"
    prompt = ckpt.tokenizer.encode("It is a truth universally acknowledged, that").ids
    full = generate(ckpt.model, prompt, 8, ExitSpec(price=ckpt.calibration.price_for_budget(1.0)))
    half = generate(ckpt.model, prompt, 8, ExitSpec(price=ckpt.calibration.price_for_budget(0.5)))
    D = ckpt.config.max_depth
    assert full.exit_depths == [D] * 8
    assert sum(half.exit_depths) < sum(full.exit_depths)
    assert ckpt.tokenizer.decode(full.token_ids).strip()


def test_default_model_calibration_tracks_budget_on_held_out_text():
    from training.tasks import make_task

    ckpt = load_checkpoint(DEFAULT_MODEL)
    ids = make_task("austen").test[:1024].view(4, 256)
    D = ckpt.config.max_depth
    with torch.no_grad():
        for budget in (0.75, 0.5):
            depth = ckpt.model(ids, ExitSpec(price=ckpt.calibration.price_for_budget(budget))).depth.float().mean() / D
            assert abs(float(depth) - budget) < 0.15, (budget, float(depth))
