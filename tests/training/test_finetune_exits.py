"""finetune-exits: the served forward with sampled exits, LoRA deltas shipped over a base, resuming."""

import json

import pytest
import torch
from tokenizers import Tokenizer

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.lora import add_lora, lora_factors, merge_lora, unwrap_lora
from runtime.model import ExitSpec
from tests.training.conftest import TOKENIZER, dense
from training.finetune_exits import FinetuneConfig, exit_forward, finetune, finetune_main, sample_exits


def test_exit_forward_is_the_reference_forward_with_those_depths():
    model = dense()
    ids = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(1))
    depths = torch.randint(1, 5, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids, ExitSpec(depths=depths)).logits
        assert torch.allclose(exit_forward(model, ids, depths), want, atol=1e-5)
        # Layer dropout: a token that skips a step changes its own and later tokens' logits, never earlier ones'.
        skip = torch.zeros(3, 20, 4, dtype=torch.bool)
        skip[:, 10, 1] = True
        full = torch.full((3, 20), 4)
        base, skipped = exit_forward(model, ids, full), exit_forward(model, ids, full, skip)
    assert torch.equal(base[:, :10], skipped[:, :10])
    assert not torch.allclose(base[:, 10:], skipped[:, 10:])


def test_sampled_exits_follow_the_curriculum_and_min_depth():
    cfg, model_cfg = FinetuneConfig(steps=100, curriculum_frac=0.5, full_depth_frac=0.25, full_rows=0), dense().cfg
    g = torch.Generator().manual_seed(0)
    early, skip = sample_exits(cfg, model_cfg, 0, (64, 64), g)
    late, _ = sample_exits(cfg, model_cfg, 60, (64, 64), g)
    assert set(early.unique().tolist()) == {3, 4}  # at first only the last layer may be skipped
    assert set(late.unique().tolist()) == {1, 2, 3, 4}  # then down to min_depth
    assert abs(float((late == 4).float().mean()) - 0.25) < 0.03  # full depth: full_depth_frac
    assert not skip[..., 0].any() and skip[..., 3].float().mean() > skip[..., 1].float().mean()
    anchored, skip = sample_exits(FinetuneConfig(steps=100, full_rows=2), model_cfg, 60, (8, 64), g)
    assert anchored[:2].eq(4).all() and not skip[:2].any() and not anchored[2:].eq(4).all()


def test_lora_factors_ship_over_the_base_and_merge_at_load(adapted, tmp_path):
    path, model = adapted
    layers = add_lora(model, rank=4)
    assert len(layers) == (1 + 4 + 1) * 7  # prelude, pool and coda blocks, 7 linears each
    for layer in layers.values():
        torch.nn.init.normal_(layer.up, std=0.05)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    factors = lora_factors(layers)
    unwrap_lora(model, layers)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-4)  # merging is exact up to float rounding
    out = save_checkpoint(tmp_path / "tuned", model, Tokenizer.from_file(TOKENIZER), base="tiny-base", extra=factors)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert not any(k.endswith("attn.wq.weight") for k in stored)  # the base's weights are not copied
    assert "pool.0.attn.wq.lora_down" in stored and "pool.3.mlp.w_down.lora_up" in stored
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(out).model(ids).logits, want, atol=1e-4)
    with pytest.raises(KeyError, match="no matching"):
        merge_lora({"a.lora_down": torch.zeros(1, 1), "a.weight": torch.zeros(1, 1)})


def test_finetune_resumes_where_it_stopped_and_writes_a_servable_checkpoint(adapted, tmp_path):
    path, _ = adapted
    cfg = FinetuneConfig(init=str(path), rank=4, window=32, batch=2, steps=6, lr=1e-2, warmup=1, eval_every=3,
                         save_every=2, eval_windows=2, value_steps=4, value_windows=4, precision="fp32")
    whole, _, _ = finetune(cfg, tmp_path / "whole")
    assert finetune_main(cfg, tmp_path / "out", tmp_path / "parts", run_steps=3) is None  # stopped early
    out = finetune_main(cfg, tmp_path / "out", tmp_path / "parts")
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    state = torch.load(tmp_path / "parts" / "train_state.pt")
    assert state["step"] == 6
    for name, value in state["params"].items():  # 3 steps, a restart, 3 more: the same as 6 in one go
        assert torch.allclose(value, trained[name]), name
    rows = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3, 3, 6] and "resumed_with" in rows[2]
    assert (tmp_path / "parts" / "curve.png").stat().st_size > 0
    assert set(rows[1]["ppl_at_depth"]) == set(rows[0]["original_ppl_at_depth"])
    ckpt = load_checkpoint(out)
    assert ckpt.model.cfg.notes["finetuned"]["tokens"] == 6 * 2 * 32
    assert ckpt.calibration.depth_fractions[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="already carries LoRA"):
        finetune(FinetuneConfig(init=str(out)), tmp_path / "again")
