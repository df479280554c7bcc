"""The trainer: progress bar, JSON-lines metrics, resume, deterministic under a seed.

Every batch, its price and its Gumbel noise are functions of (seed, step), so a run resumed
from `<out>/last` continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.config import ModelConfig
from runtime.devices import resolve_device
from runtime.model import ExitSpec, PonderModel
from training.calibrate import calibrate
from training.objectives import (
    PriceController, depth_ces, masked_mean, realised_gains, router_balance, token_ce, value_loss,
)
from training.tasks import IGNORE, Task


@dataclass
class TrainConfig:
    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task's factory
    preset: str = "digits-routed"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0  # the seed found weight decay hurt on the small tasks
    grad_clip: float = 1.0
    ds_weight: float = 1.0  # deep supervision
    ds_depths: int = 0  # depths sampled for deep supervision per batch; 0 = all
    value_weight: float = 1.0
    balance_weight: float = 0.01
    gumbel_tau: float = 1.0
    gumbel_scale: float = 0.1  # routing noise; at 1.0 early routing is near-uniform and blocks learn slowly
    audit_fraction: float = 0.25  # batches forced to full depth; the value head learns from these
    full_depth_steps: int = 300  # warm-up with every batch at full depth (no price yet)
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)  # sampled per batch; budget 1.0 is the audit
    dual_lr: float = 0.3
    bf16_autocast: bool = True  # bf16 matmuls (avx512_bf16 on CPU, tensor cores on GPU); master weights stay fp32
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    save_every: int = 500
    calibration_tokens: int = 16_384  # validation tokens measured for calibration.json

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be > 0")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction={self.audit_fraction} must be in [0, 1]")
        if any(not 0.0 < b < 1.0 for b in self.budgets):
            raise ValueError(f"training budgets {self.budgets} must be in (0, 1)")
        self.budgets = tuple(self.budgets)


class Trainer:
    def __init__(self, tcfg: TrainConfig, task: Task, out_dir: str | Path) -> None:
        self.tcfg, self.task, self.out = tcfg, task, Path(out_dir)
        self.device = resolve_device(tcfg.device)
        torch.manual_seed(tcfg.seed)
        cfg = ModelConfig.from_name(
            tcfg.preset, **{"vocab_size": task.vocab_size, "max_seq_len": max(task.seq_len, 8),
                            **task.special_ids, **task.config_fields, **tcfg.model_overrides},
        )
        cfg.notes = {"task": task.name, "train_config": asdict(tcfg)}
        self.model = PonderModel(cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95))
        self.controller = PriceController(tcfg.budgets, lr=tcfg.dual_lr)
        self.step = 0
        self.tokens_seen = 0

    # ----- resume -----

    def save_state(self) -> None:
        last = self.out / "last"
        save_checkpoint(last, self.model, self.task.tokenizer)
        opt_tensors = {}
        for i, p in enumerate(self.model.parameters()):
            for key, value in self.opt.state.get(p, {}).items():
                opt_tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
        save_file(opt_tensors, str(last / "optimizer.safetensors"))
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "log_prices": self.controller.log_prices,
                 "train_config": asdict(self.tcfg)}
        (last / "train_state.json").write_text(json.dumps(state, indent=2))

    def resume(self) -> bool:
        last = self.out / "last"
        if not (last / "train_state.json").is_file():
            return False
        state = json.loads((last / "train_state.json").read_text())
        self.model.load_state_dict(load_checkpoint(last).model.state_dict())
        tensors = load_file(str(last / "optimizer.safetensors"))
        for i, p in enumerate(self.model.parameters()):
            keys = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            if keys:
                self.opt.state[p] = {k: v.to(self.device) for k, v in keys.items()}
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.controller.log_prices = {k: float(v) for k, v in state["log_prices"].items()}
        return True

    # ----- one step -----

    def lr_at(self, step: int) -> float:
        t = self.tcfg
        if step < t.warmup:
            return t.lr * (step + 1) / t.warmup
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> dict[str, float]:
        t, model = self.tcfg, self.model
        gen = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step)
        rng = random.Random(t.seed * 1_000_003 + self.step)
        ids, targets = (x.to(self.device) for x in self.task.train_batch(t.batch_size, gen, self.step / t.steps))
        attn = self.task.train_mask(ids, gen)  # None: causal
        attn = attn.to(self.device) if attn is not None else None
        mask = targets != IGNORE
        audit = self.step < t.full_depth_steps or rng.random() < t.audit_fraction
        budget = 1.0 if audit else rng.choice(t.budgets)
        price = None if audit else self.controller.price(budget)

        model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.bf16_autocast):
            loss, metrics, out = self._losses(ids, targets, mask, audit, price, rng, gen, attn)

        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        self.opt.step()

        D = model.cfg.max_depth
        depth_fraction = masked_mean(out.depth.float(), mask).item() / max(D, 1)
        if not audit:
            self.controller.update(budget, depth_fraction)
        self.step += 1
        self.tokens_seen += ids.numel()
        return {**metrics, "loss": loss.item(), "grad_norm": grad_norm.item(), "budget": budget,
                "depth_fraction": depth_fraction, "audit": float(audit), "lr": self.lr_at(self.step - 1),
                **{f"price@{b}": self.controller.price(b) for b in t.budgets}}

    def _losses(self, ids, targets, mask, audit: bool, price: float | None, rng: random.Random, gen: torch.Generator,
                attn=None):
        t, model = self.tcfg, self.model
        out = model(ids, ExitSpec(price=price), router_mode="gumbel" if model.router is not None else "argmax",
                    gumbel_tau=t.gumbel_tau, gumbel_scale=t.gumbel_scale, generator=gen, return_states=True, mask=attn)
        cos, sin = model.rope(torch.arange(ids.shape[1], device=self.device))
        loss_exit = masked_mean(token_ce(out.logits, targets), mask)
        D = model.cfg.max_depth
        loss, metrics = loss_exit, {"loss_exit": loss_exit.item()}
        ds: list[int] = []
        if t.ds_weight > 0:  # deep supervision at all depths, or a sample of them
            ds = list(range(D + 1)) if t.ds_depths <= 0 else sorted(rng.sample(range(D + 1), min(t.ds_depths, D + 1)))
            ce_ds = depth_ces(model, out, targets, ds, cos, sin, attn)
            loss_ds = masked_mean(ce_ds.mean(0), mask)
            loss = loss + t.ds_weight * loss_ds
            metrics["loss_ds"] = loss_ds.item()
        if audit and t.value_weight > 0:  # full depth: every gain is observed, so the value head learns here
            with torch.no_grad():
                missing = [d for d in range(D + 1) if d not in ds]
                ce_all = torch.zeros(D + 1, *targets.shape, device=self.device)
                if ds:
                    ce_all[ds] = ce_ds.detach()
                if missing:
                    ce_all[missing] = depth_ces(model, out, targets, missing, cos, sin, attn)
            loss_value = value_loss(out.exit_scores, realised_gains(ce_all), mask)
            loss = loss + t.value_weight * loss_value
            metrics["loss_value"] = loss_value.item()
            for d in range(D + 1):
                metrics[f"ce_depth{d}"] = masked_mean(ce_all[d], mask).item()
        if out.router_logits:
            loss_balance = router_balance(out.router_logits, mask)
            loss = loss + t.balance_weight * loss_balance
            metrics["loss_balance"] = loss_balance.item()
        return loss, metrics, out

    # ----- the loop -----

    def fit(self, resume: bool = True, stop_at: int | None = None) -> Path | None:
        """Train to `steps`, then calibrate and write OUT/final. `stop_at` pauses earlier (state in OUT/last)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.resume():
            print(f"resumed from {self.out / 'last'} at step {self.step}")
        log = (self.out / "metrics.jsonl").open("a")
        bar = tqdm(total=self.tcfg.steps, initial=self.step, desc=f"train {self.task.name}", dynamic_ncols=True)
        start, start_tokens = time.perf_counter(), self.tokens_seen
        end = min(self.tcfg.steps, stop_at or self.tcfg.steps)
        while self.step < end:
            metrics = self.train_step()
            bar.update(1)
            if self.step % self.tcfg.log_every == 0 or self.step == self.tcfg.steps:
                elapsed = time.perf_counter() - start
                metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                metrics["step"] = self.step
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss_exit']:.3f}", depth=f"{metrics['depth_fraction']:.2f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            if self.step % self.tcfg.save_every == 0 and self.step < self.tcfg.steps:
                self.save_state()
        bar.close()
        log.close()
        self.save_state()
        if self.step < self.tcfg.steps:
            return None
        print("calibrating on the validation split ...")
        calibration = calibrate(self.model, self.task.batches("valid", max(1, 8192 // self.task.seq_len), max_tokens=self.tcfg.calibration_tokens), measured_on=f"{self.task.name}/valid")
        final = save_checkpoint(self.out / "final", self.model, self.task.tokenizer, calibration)
        print(f"wrote {final}")
        return final
