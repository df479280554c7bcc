"""Make a pretrained backbone exit-friendly, as LayerSkip does: `ponder finetune-exits`.

adapt-exits trains only translators on a frozen backbone, and the middle layers of SmolLM2 do
not hold its final prediction (KL 3.6 nats at layer 20). Here the backbone itself learns, through
LoRA deltas of every block's linears, with four parts in one loss:

- an early-exit loss at sampled depths: each token gets an exit step (full depth with
  probability `full_depth_frac`, else uniform in [lo, max_depth)), and the forward runs exactly as
  served (an exited token keeps its state and its deeper KV follows kv_fill), decoded through the
  exit adapter of its depth. A curriculum lowers `lo` from the last layer to min_depth.
- layer dropout rising with depth: a token skips step s (and continues after it) with
  probability layer_dropout * s / (max_depth - 1), so no single late layer is indispensable.
- self-distillation: every token, at its exit, matches the frozen original's full-depth
  distribution (KL), computed on the fly by the same weights with the deltas switched off.
- the full-depth tokens' share of that KL is what keeps full depth close to the original, and
  `full_rows` windows per step run wholly at full depth without dropout, as budget 1.0 serves them.

After the deltas are merged, the value head (and the adapters) are refit on the new backbone's
cached states as adapt-exits does, and calibration.json is measured. The checkpoint ships only the
LoRA factors, the adapters and the head; base.json still names the base.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.devices import native_bf16, resolve_device
from runtime.lora import add_lora, has_lora, lora_factors, set_lora_enabled, unwrap_lora
from runtime.model import PonderModel
from training.adapt_exits import AdaptConfig, cache_states, train_exits
from training.calibrate import calibrate_from_states
from training.text_windows import split_ids, windows


@dataclass
class FinetuneConfig:
    init: str = "checkpoints/smollm2-135m-exits"  # an adapted checkpoint: its base, adapters and head
    rank: int = 16
    window: int = 256
    batch: int = 4  # windows per step
    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 50
    full_depth_frac: float = 0.35
    full_rows: int = 1  # windows per step run entirely at full depth with no layer dropout: the original's anchor
    curriculum_frac: float = 0.3  # share of steps over which the lowest exit falls to min_depth
    layer_dropout: float = 0.1  # skip probability at the last layer
    self_text: str = ""  # a 1-D token tensor from training.self_text ('' for Austen only)
    self_text_frac: float = 0.5
    eval_every: int = 100
    eval_windows: int = 16
    save_every: int = 25
    value_steps: int = 300
    value_windows: int = 64
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where bf16 is native (runtime.devices.native_bf16), else fp32; or bf16, fp32
    device: str = "auto"


def exit_forward(model: PonderModel, ids: Tensor, exit_step: Tensor, skip: Tensor | None = None) -> Tensor:
    """Logits (B, T, V) of each token decoded at its exit step, through the forward as served.

    exit_step (B, T): core steps each token runs before it exits. skip (B, T, max_depth), optional:
    steps a token skips and then continues after (layer dropout). A token past its exit, or skipping,
    keeps its state and writes its KV entry as kv_fill says, exactly as in the reference forward;
    without skip this is `model(ids, ExitSpec(depths=exit_step)).logits`.
    """
    cfg = model.cfg
    if model.router is not None:
        raise ValueError("finetune-exits takes models with a fixed or recurrent schedule, not a routed one")
    B, T = ids.shape
    cos, sin = model.rope(torch.arange(T, device=ids.device))
    h = model.run_prelude(ids, cos, sin)
    fill: dict[str, tuple[Tensor, Tensor]] = {}
    for s in range(cfg.max_depth):
        run = s < exit_step
        if skip is not None:
            run = run & ~skip[..., s]
        choice = torch.full((B, T), model.scheduled_block(s), dtype=torch.long, device=ids.device)
        h_new = model._core_step(s, model.step_input(h, s), run, None, choice, cos, sin, None, fill)
        h = torch.where(run[..., None], h_new, h)
    return model.decode(h, cos, sin, None, exit_step)


def sample_exits(cfg: FinetuneConfig, model_cfg, step: int, shape: tuple[int, int], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(exit_step (B, T), skip (B, T, D)) for one training step, with the curriculum's lowest exit."""
    D, first = model_cfg.max_depth, model_cfg.min_depth
    progress = min(1.0, step / max(1, cfg.curriculum_frac * cfg.steps))
    lo = D - 1 - round((D - 1 - first) * progress)
    exit_step = torch.randint(lo, D, shape, generator=g)
    exit_step = torch.where(torch.rand(shape, generator=g) < cfg.full_depth_frac, D, exit_step)
    p_skip = cfg.layer_dropout * torch.arange(D) / max(1, D - 1)
    p_skip[:first] = 0.0
    skip = torch.rand(*shape, D, generator=g) < p_skip
    exit_step[: cfg.full_rows], skip[: cfg.full_rows] = D, False  # served at budget 1.0: every token at full depth
    return exit_step, skip


def kl_from(teacher_logp: Tensor, logits: Tensor) -> Tensor:
    """Per-token KL(teacher || student), (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)


class Batches:
    """Random windows from Austen's training split and, if given, the model's own text."""

    def __init__(self, tokenizer, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.streams = [torch.tensor(split_ids(tokenizer, "train"))]
        self.self_tokens = 0
        if cfg.self_text:
            own = torch.load(cfg.self_text).long()
            self.streams.append(own)
            self.self_tokens = len(own)
        self.austen_tokens = len(self.streams[0])

    def __call__(self, g: torch.Generator) -> Tensor:
        n_own = round(self.cfg.batch * self.cfg.self_text_frac) if len(self.streams) > 1 else 0
        rows = []
        for i in range(self.cfg.batch):
            stream = self.streams[1 if i < n_own else 0]
            start = int(torch.randint(0, len(stream) - self.cfg.window, (1,), generator=g))
            rows.append(stream[start : start + self.cfg.window])
        return torch.stack(rows)


@torch.no_grad()
def static_depth_ppl(model: PonderModel, ids: Tensor, depths: list[int], batch: int = 4) -> dict[int, float]:
    """Held-out ppl if every token exits at depth d (decoded through d's adapter), for each d."""
    nll = {d: 0.0 for d in depths}
    for i in range(0, len(ids), batch):
        x, y = ids[i : i + batch, :-1], ids[i : i + batch, 1:]
        states = model(x, return_states=True).states
        for d in depths:
            h = states[d] if d == model.cfg.max_depth else model.exit_adapters[d](states[d])
            nll[d] += float(F.cross_entropy(model.head(model.norm(h)).float().flatten(0, 1), y.flatten(), reduction="sum"))
    return {d: math.exp(v / ids[:, 1:].numel()) for d, v in nll.items()}


def trainable(model: PonderModel, layers: dict) -> list[torch.nn.Parameter]:
    """The LoRA factors, the exit adapters and the exit head; everything else stays frozen."""
    return ([p for layer in layers.values() for p in (layer.down, layer.up)]
            + list(model.exit_adapters.parameters()) + list(model.exit_head.parameters()))


def _save_state(path: Path, step: int, model: PonderModel, opt, g: torch.Generator, tokens: int, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "tokens": tokens, "seconds": seconds, "params": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "opt": opt.state_dict(), "generator": g.get_state()}, tmp)
    tmp.replace(path)


def finetune(cfg: FinetuneConfig, work: Path, run_steps: int | None = None) -> tuple[PonderModel, object, dict]:
    """Train the deltas (resuming from work/train_state.pt if present), for at most run_steps steps
    in this call; returns the wrapped model."""
    if has_lora(Path(cfg.init)):
        raise ValueError(f"--init {cfg.init} already carries LoRA deltas; start from an adapt-exits checkpoint "
                         f"(new deltas are stored relative to the base)")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={cfg.precision!r} must be auto, bf16 or fp32")
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))
    ckpt = load_checkpoint(cfg.init, device=device)
    model, tokenizer = ckpt.model.train(), ckpt.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    layers = add_lora(model, cfg.rank)
    model.to(device)
    params = trainable(model, layers)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    data = Batches(tokenizer, cfg)
    eval_ids = windows(tokenizer, "test", cfg.window + 1, cfg.eval_windows).to(device)
    D = model.cfg.max_depth
    eval_depths = sorted({round(D * f) for f in (0.6, 0.8)} | {D})
    work.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = work / "train_state.pt", work / "metrics.jsonl"
    step, tokens, seconds_before = 0, 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device)
        named = dict(model.named_parameters())
        for name, value in state["params"].items():
            named[name].data.copy_(value)
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        step, tokens, seconds_before = state["step"], state["tokens"], state["seconds"]
        print(f"resumed at step {step} ({tokens:,} tokens)")
        _log(metrics_path, {"step": step, "tokens": tokens, "resumed_with": asdict(cfg)})
    else:
        set_lora_enabled(layers, False)
        original = static_depth_ppl(model.eval(), eval_ids, eval_depths)
        set_lora_enabled(layers, True)
        _log(metrics_path, {"step": 0, "tokens": 0, "original_ppl_at_depth": original,
                            "data": {"austen_tokens": data.austen_tokens, "self_tokens": data.self_tokens}, "config": asdict(cfg),
                            "device": str(device), "bf16": bf16})
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune-exits", unit="step")
    window_loss: list[tuple[float, float]] = []
    started, tokens_at_start = time.perf_counter(), tokens
    stop = cfg.steps if run_steps is None else min(cfg.steps, step + run_steps)
    while step < stop:
        model.train()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = data(g)
        exit_step, skip = sample_exits(cfg, model.cfg, step, tuple(ids.shape), g)
        ids, exit_step, skip = ids.to(device), exit_step.to(device), skip.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                set_lora_enabled(layers, False)
                teacher_logp = F.log_softmax(model(ids).logits.float(), dim=-1)
                set_lora_enabled(layers, True)
            kl = kl_from(teacher_logp, exit_forward(model, ids, exit_step, skip))
        loss = kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step, tokens = step + 1, tokens + ids.numel()
        kl, full = kl.detach(), exit_step == D
        window_loss.append((float(kl[full].mean()) if full.any() else float("nan"), float(kl[~full].mean()) if (~full).any() else float("nan")))
        bar.update(1)
        bar.set_postfix(kl=f"{float(loss.detach()):.3f}", tok_s=f"{(tokens - tokens_at_start) / (time.perf_counter() - started):.0f}")
        if step % cfg.save_every == 0 or step == stop:
            _save_state(state_path, step, model, opt, g, tokens, seconds_before + time.perf_counter() - started)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            row = {"step": step, "tokens": tokens, "lr": lr,
                   "kl_full_depth": _nanmean([a for a, _ in window_loss]), "kl_exited": _nanmean([b for _, b in window_loss]),
                   "ppl_at_depth": static_depth_ppl(model, eval_ids, eval_depths), "seconds": seconds_before + time.perf_counter() - started}
            _log(metrics_path, row)
            plot_curve(metrics_path, work / "curve.png")
            tqdm.write(f"step {step}: {tokens:,} tokens, KL full {row['kl_full_depth']:.3f} exited {row['kl_exited']:.3f}, "
                       f"Persuasion ppl at depth {row['ppl_at_depth']}")
            window_loss = []
    bar.close()
    return model, tokenizer, {"layers": layers, "chat_template": ckpt.chat_template, "base": _base_of(Path(cfg.init)),
                              "step": step, "tokens": tokens}


def plot_curve(metrics_path: Path, out: Path) -> None:
    """Held-out Persuasion ppl at each eval depth against tokens trained, the original's as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    original = next(r["original_ppl_at_depth"] for r in rows if "original_ppl_at_depth" in r)
    evals = [r for r in rows if "ppl_at_depth" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, depth in enumerate(original):
        color = f"C{i}"
        ax.plot([0] + [r["tokens"] for r in evals], [original[depth]] + [r["ppl_at_depth"][depth] for r in evals], "o-",
                color=color, label=f"exit at layer {depth}")
        ax.axhline(original[depth], color=color, ls="--", lw=1)
    ax.set(xlabel="tokens trained", ylabel="Persuasion ppl (every token exits there)", yscale="log",
           title="finetune-exits: held-out ppl by exit depth (dashed: before)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _base_of(path: Path) -> str | None:
    """The base an adapted checkpoint names (None for a self-contained checkpoint)."""
    return json.loads((path / "base.json").read_text())["source"] if (path / "base.json").is_file() else None


def finetune_main(cfg: FinetuneConfig, out: Path, work: Path, threads: int | None = None,
                  run_steps: int | None = None) -> Path | None:
    """Train (or resume), then write the checkpoint once all cfg.steps are done."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tokenizer, info = finetune(cfg, work, run_steps)
    if info["step"] < cfg.steps:
        print(f"stopped at step {info['step']} of {cfg.steps}; run again to resume from {work}")
        return None
    factors = {k: v.to(torch.bfloat16) for k, v in lora_factors(info["layers"]).items()}
    unwrap_lora(model, info["layers"])
    model = model.cpu()
    # The value head regresses on what the remaining layers of the *new* backbone still remove:
    # refit it (with the adapters) on that backbone's cached states, as adapt-exits does.
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    adapt = AdaptConfig(min_depth=model.cfg.min_depth, rank=model.cfg.exit_adapter_rank, steps=cfg.value_steps,
                        window=cfg.window, train_windows=cfg.value_windows, seed=cfg.seed, lr=1e-3)
    states = cache_states(model, windows(tokenizer, "train", adapt.window, adapt.train_windows, seed=cfg.seed + 1), adapt.min_depth)
    history = train_exits(model, states, adapt)
    del states
    model.cfg.notes.update(finetuned={**asdict(cfg), "steps_done": info["step"], "tokens": info["tokens"],
                                      "value_fit": history[-1:] if history else []})
    # Over a base, only the factors ship (merged again at load); a self-contained checkpoint keeps
    # its merged weights.
    path = save_checkpoint(out, model, tokenizer, dtype=torch.bfloat16, chat_template=info["chat_template"],
                           base=info["base"], extra=factors if info["base"] else None)
    served = load_checkpoint(path).model
    val = windows(tokenizer, "val", adapt.window, adapt.calib_windows)
    calibrate_from_states(served, val, measured_on="Austen val split (last 5% of the 5 training novels)").save(path / "calibration.json")
    print(f"wrote {path} in {time.perf_counter() - start:.0f}s")
    return path
