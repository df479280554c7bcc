"""Teach an imported dense model to exit early: exit adapters and the exit head, backbone frozen.

1. One frozen full-depth forward over Austen windows caches the state after every layer.
2. Each step samples tokens and depths from that cache. The exit adapter of depth d (a low-rank
   tuned-lens translator) is distilled from the final layer: KL(p_final || p_d). The exit head
   at depth d regresses onto that same KL (detached): the cross-entropy that the remaining
   layers would still remove, in expectation under the final distribution.
3. The adapted checkpoint stores only the new weights and names its base (base.json), then
   calibration.json is measured on held-out text (not Persuasion) with the real exit rule.

The backbone stays frozen: the served model is then exactly the pretrained one at full depth,
the shipped files stay small, and this trains in minutes on a CPU from cached states.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from runtime.base_model import base_checkpoint
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.model import PonderModel
from training.calibrate import calibrate_from_states
from training.text_windows import windows


@dataclass
class AdaptConfig:
    base: str = "smollm2-135m"
    rank: int = 64  # exit adapter rank
    min_depth: int = 8  # layers every token runs; no exit (and no adapter training) before
    window: int = 256  # tokens per cached window
    train_windows: int = 160
    calib_windows: int = 16
    steps: int = 600
    tokens_per_step: int = 256
    depths_per_step: int = 6
    lr: float = 3e-3
    value_weight: float = 1.0
    kv_fill: str = "propagate"
    seed: int = 0
    bf16: bool = True


def adapted_model(cfg: AdaptConfig) -> tuple[PonderModel, object, str | None]:
    """The base model with fresh exit adapters and exit head, its tokenizer and chat template."""
    base = load_checkpoint(base_checkpoint(cfg.base))
    model_cfg = dataclasses.replace(base.config, exit_adapter_rank=cfg.rank, min_depth=cfg.min_depth,
                                    kv_fill=cfg.kv_fill, exit_step_bias=True)
    torch.manual_seed(cfg.seed)
    model = PonderModel(model_cfg)
    missing, unexpected = model.load_state_dict(base.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("exit_adapters.") for k in missing), (missing, unexpected)
    return model, base.tokenizer, base.chat_template


@torch.no_grad()
def cache_states(model: PonderModel, ids: Tensor, first_depth: int, batch: int = 8) -> Tensor:
    """(N, L, D+1-first_depth, d) bf16: the state entering steps first_depth..max_depth at full depth."""
    out = []
    for i in tqdm(range(0, len(ids), batch), desc="caching states", unit="batch"):
        states = model(ids[i : i + batch], return_states=True).states
        out.append(torch.stack(states[first_depth:], dim=2).to(torch.bfloat16))
    return torch.cat(out)


def kl_to_final(model: PonderModel, h_depth: Tensor, depth: int, teacher_logp: Tensor) -> Tensor:
    """Per-token KL(p_final || p_depth) for states h_depth (n, d) decoded through the depth's adapter."""
    logp = F.log_softmax(model.head(model.norm(model.exit_adapters[depth](h_depth))).float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)


def train_exits(model: PonderModel, states: Tensor, cfg: AdaptConfig, log_every: int = 50) -> list[dict]:
    D, first = model.cfg.max_depth, cfg.min_depth
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for d in range(first, D) for p in model.exit_adapters[d].parameters()] + list(model.exit_head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    flat = states.flatten(0, 1)  # (N*L, depths, d)
    log, history = [], []
    bar = tqdm(range(cfg.steps), desc="training exits", unit="step")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, len(flat), (cfg.tokens_per_step,), generator=g)
        depths = (torch.randperm(D - first, generator=g)[: cfg.depths_per_step] + first).tolist()
        h = flat[rows].float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            with torch.no_grad():
                teacher = F.log_softmax(model.head(model.norm(h[:, D - first])).float(), dim=-1)
            kl_loss = value_loss = 0.0
            kls = {}
            for d in depths:
                x = h[:, d - first]
                kl = kl_to_final(model, x, d, teacher)
                pred = model.exit_head(x, d).float()
                kl_loss = kl_loss + kl.mean()
                value_loss = value_loss + F.smooth_l1_loss(pred, kl.detach(), beta=0.5)
                kls[d] = float(kl.detach().mean())
        loss = (kl_loss + cfg.value_weight * value_loss) / len(depths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append((float(kl_loss.detach()) / len(depths), float(value_loss.detach()) / len(depths)))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            kl_mean = sum(x for x, _ in log) / len(log)
            value_mean = sum(x for _, x in log) / len(log)
            history.append({"step": step + 1, "kl": kl_mean, "value_loss": value_mean, "kl_by_depth": kls})
            bar.set_postfix(kl=f"{kl_mean:.3f}", value=f"{value_mean:.3f}")
            log = []
    for p in model.parameters():
        p.requires_grad_(False)
    return history


def adapt_main(cfg: AdaptConfig, out: Path, threads: int | None = None) -> Path:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer, chat_template = adapted_model(cfg)
    train_ids = windows(tokenizer, "train", cfg.window, cfg.train_windows, seed=cfg.seed)
    states = cache_states(model, train_ids, cfg.min_depth)
    print(f"cached {states.numel() * 2 / 2**30:.2f} GiB of states for {train_ids.numel():,} tokens "
          f"in {time.perf_counter() - start:.0f}s")
    history = train_exits(model, states, cfg)
    del states
    model.cfg.notes.update(adapted={**asdict(cfg), "history": history[-1:] if history else []})
    path = save_checkpoint(out, model, tokenizer, dtype=torch.bfloat16, chat_template=chat_template, base=cfg.base)
    # Calibrate what will be served: the checkpoint as saved (bf16 adapter weights), loaded back.
    served = load_checkpoint(path).model
    val = windows(tokenizer, "val", cfg.window, cfg.calib_windows)
    calibration = calibrate_from_states(served, val, measured_on="Austen val split (last 5% of the 5 training novels)")
    calibration.save(path / "calibration.json")
    print(f"wrote {path} in {time.perf_counter() - start:.0f}s")
    return path
