"""Tiny random checkpoints for exporter tests: each schedule, each kv_fill, with a working price."""

import torch

from runtime.calibration import Calibration
from runtime.checkpoint import Checkpoint
from runtime.config import ModelConfig
from runtime.model import PonderModel
from training.tasks import symbol_tokenizer

SYMBOLS = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)] + list(" .,!?-'\n;:01")
SCHEDULES = {
    "fixed": dict(n_pool=3, max_depth=3),
    "recurrent": dict(schedule="recurrent", n_pool=1, max_depth=3),
    "routed": dict(schedule="routed", n_pool=3, max_depth=4, n_prelude=0),
}
KV_FILLS = ("propagate", "latest", "shared")


def tiny_checkpoint(schedule: str, kv_fill: str, seed: int = 0, **overrides) -> tuple[Checkpoint, float]:
    """A random tiny model and a price at which about half its tokens exit early."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", kv_fill=kv_fill, eos_id=None, **{**SCHEDULES[schedule], **overrides})
    model = PonderModel(cfg).eval()
    with torch.no_grad():
        scores = model(torch.randint(0, 64, (2, 24))).exit_scores
    price = float(scores.quantile(0.5))
    calibration = Calibration(prices=[price / 2, price, price * 2], depth_fractions=[0.9, 0.5, 0.1], measured_on="random")
    return Checkpoint(model=model, tokenizer=symbol_tokenizer(SYMBOLS), calibration=calibration), price


def adapted_checkpoint(**overrides) -> tuple[Checkpoint, float]:
    """A tiny model shaped like an imported one: a per-step exit bias, and exit adapters that are not
    the identity."""
    ckpt, price = tiny_checkpoint("fixed", "propagate", exit_step_bias=True, exit_adapter_rank=4, **overrides)
    with torch.no_grad():
        for adapter in ckpt.model.exit_adapters:
            adapter.up.weight.normal_(std=0.2)
    return ckpt, price
