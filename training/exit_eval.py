"""Early exit on an imported pretrained model, against the baselines, on held-out Persuasion.

Methods, each at the compute budgets asked for (target fraction of layers run):
  exit-head      ours: exit adapters + the value head, price from calibration.json (real exit rule)
  calm           CALM's softmax confidence: exit once the adapted decode's top-1 probability
                 reaches a threshold, set on the val split to hit the budget
  adapters       every token exits at the same depth, decoded through that depth's adapter
  logit-lens     every token exits at the same depth, decoded by the final norm and head as is
  classifier     CALM's trained classifier of "this depth's top-1 is the final top-1" (exit_signals)
  latent         Huginn's latent criterion: the state's relative change over the last step
  oracle         hindsight with labels: each token's depth chosen knowing its label's NLL at every
                 depth (it can beat full depth: it picks whichever depth guessed right)
  oracle-kl      hindsight without labels: each token's depth chosen knowing how far each depth's
                 distribution is from full depth's (KL); the best fidelity to full depth at that mean
                 depth, so what separates a signal from it is the signal, and what separates it
                 from full depth is the backbone
  exit-head-full-kv  a diagnostic: the exit head's depths, each token decoded from its full-depth
                 state at that depth, as if exited tokens still wrote every layer's KV (no KV
                 saving; shows what the kv_fill itself costs)
For each: perplexity, top-1 agreement with full depth, mean layers run, saved fraction, and the
compute fraction in FLOPs, which charges each method for its exit tests (CALM decodes the full
vocabulary at every layer it considers exiting at).

Static depths need no extra forward: if every token exits at d, nothing attends deeper slots, so
the logits are the decoded full-depth state after d layers. CALM's confidences are read from
the full-depth states too, then its per-token depths run through the real forward (with kv_fill).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from runtime.calibration import Calibration
from runtime.checkpoint import load_calibration, load_checkpoint
from runtime.flops import piece_macs, token_macs
from runtime.kv_fill import KVFill
from runtime.model import ExitSpec, PonderModel
from training.exit_signals import latent_scores, oracle_depths, train_classifier
from training.text_windows import windows

METHODS = ("exit-head", "exit-head-full-kv", "calm", "classifier", "latent", "oracle", "oracle-kl", "adapters",
           "logit-lens")


def compute_fraction(cfg, depth: Tensor, method: str) -> float:
    """Mean per-token MACs relative to a plain full-depth forward (runtime/flops.py), with each
    method charged for its own exit tests: CALM decodes the full vocabulary at every test."""
    m, D = piece_macs(cfg), cfg.max_depth
    depth = depth.float()
    tests = (depth - cfg.min_depth + 1).clamp_min(0)  # exit tests made: steps min_depth..depth
    cost = depth * m["layer"] + m["head"]
    fill = (D - depth) * m["kv_proj"]
    if method in ("exit-head", "exit-head-full-kv"):
        cost = cost + tests * m["exit_head"] + m["adapter"] + fill
    elif method == "calm":
        cost = cost + tests * (m["head"] + m["adapter"]) + fill
    elif method in ("classifier", "latent"):  # one d_model dot product, or two norms, per test
        cost = cost + tests * cfg.d_model * (1 if method == "classifier" else 2) + m["adapter"] + fill
    elif method in ("oracle", "oracle-kl"):  # bounds: no test is charged, and they read full-depth states
        cost = cost + m["adapter"]
    elif method == "adapters":
        cost = cost + m["adapter"]
    return float(cost.mean() / token_macs(cfg, D, exit_tests=False))


@torch.no_grad()
def decode_at(model: PonderModel, h: Tensor, depth: int, adapters: bool) -> Tensor:
    if adapters and depth < model.cfg.max_depth:
        h = model.exit_adapters[depth](h)
    return model.head(model.norm(h)).float()


def metrics(logits: Tensor, targets: Tensor, full_top1: Tensor, depth: Tensor, cfg, method: str) -> dict:
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return {
        "ppl": float(ce.exp()),
        "top1_agreement": float((logits.argmax(-1) == full_top1).float().mean()),
        "mean_layers": float(depth.float().mean()),
        "saved_fraction": float(1 - depth.float().mean() / cfg.max_depth),
        "compute_fraction": compute_fraction(cfg, depth, method),
    }


@dataclass
class DepthScan:
    """One full-depth pass over windows, decoded at every exit depth through its adapter."""

    full_logits: Tensor  # (N, T, V)
    conf: Tensor  # (D, N, T): top-1 probability of the decode at each depth (0 below min_depth)
    agree: Tensor  # (D, N, T): that decode's top-1 equals the full-depth top-1
    states: Tensor  # (D+1, N, T, d): the state entering each step, and the final one
    nll: Tensor | None = None  # (D+1, N, T): the label's NLL decoded at each depth (inf below min_depth)
    kl: Tensor | None = None  # (D+1, N, T): KL(full depth || the decode at each depth) (inf below min_depth)


@torch.no_grad()
def scan_depths(model: PonderModel, ids: Tensor, batch: int, targets: Tensor | None = None) -> DepthScan:
    cfg = model.cfg
    full, conf, agree, all_states, nll, kl = [], [], [], [], [], []
    for i in tqdm(range(0, len(ids), batch), desc="full-depth pass", unit="batch"):
        out = model(ids[i : i + batch], return_states=True)
        full.append(out.logits.float())
        top1 = out.logits.argmax(-1)
        full_logp = out.logits.float().log_softmax(-1)
        full_p = full_logp.exp()
        all_states.append(torch.stack(out.states))  # (D+1, b, T, d)
        c, a, n, k = [], [], [], []
        for d in range(cfg.max_depth + 1):
            if d < cfg.min_depth:
                c.append(torch.zeros(out.depth.shape))
                a.append(torch.zeros(out.depth.shape, dtype=torch.bool))
                n.append(torch.full(out.depth.shape, float("inf")))
                k.append(torch.full(out.depth.shape, float("inf")))
                continue
            logits = decode_at(model, out.states[d], d, True)
            k.append((full_p * (full_logp - logits.log_softmax(-1))).sum(-1).clamp_min(0))
            if d < cfg.max_depth:
                c.append(logits.softmax(-1).amax(-1))
                a.append(logits.argmax(-1) == top1)
            if targets is not None:
                y = targets[i : i + batch]
                n.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape))
        kl.append(torch.stack(k))
        conf.append(torch.stack(c[: cfg.max_depth]))
        agree.append(torch.stack(a[: cfg.max_depth]))
        if targets is not None:
            nll.append(torch.stack(n))
    return DepthScan(torch.cat(full), torch.cat(conf, dim=1), torch.cat(agree, dim=1), torch.cat(all_states, dim=1),
                     torch.cat(nll, dim=1) if nll else None, torch.cat(kl, dim=1))


def calm_depths(conf: Tensor, threshold: float, min_depth: int) -> Tensor:
    """Depth per token: the first d >= min_depth whose confidence reaches the threshold, else full."""
    D = conf.shape[0]
    steps = torch.arange(D).view(D, *([1] * (conf.dim() - 1)))
    ok = (conf >= threshold) & (steps >= min_depth)
    first = torch.where(ok, steps.expand_as(ok), torch.full_like(ok, D, dtype=torch.long)).amin(0)
    return first


def calm_threshold(conf: Tensor, budget: float, min_depth: int) -> float:
    """Bisect the threshold on a score (D, ...) whose mean depth fraction is the budget."""
    D = conf.shape[0]
    finite = conf[min_depth:][torch.isfinite(conf[min_depth:])]
    lo, hi = float(finite.min()), float(finite.max()) + 1e-6  # above the highest score: nobody exits
    for _ in range(30):
        mid = (lo + hi) / 2
        if calm_depths(conf, mid, min_depth).float().mean() / D > budget:
            hi = mid  # too deep: lower the bar
        else:
            lo = mid
    return hi


@torch.no_grad()
def forward_logits(model: PonderModel, ids: Tensor, spec: ExitSpec | None, batch: int, depths: Tensor | None = None):
    logits, depth = [], []
    for i in range(0, len(ids), batch):
        s = spec if depths is None else ExitSpec(depths=depths[i : i + batch])
        out = model(ids[i : i + batch], s)
        logits.append(out.logits.float())
        depth.append(out.depth)
    return torch.cat(logits), torch.cat(depth)


def evaluate_exits(path: Path, budgets: list[float], n_windows: int, window: int, batch: int = 4,
                   kv_fill_budget: float = 0.6) -> dict:
    ckpt = load_checkpoint(path)
    model, cfg, cal = ckpt.model, ckpt.config, ckpt.calibration
    if model.exit_adapters is None:
        raise ValueError(f"{path} has no exit adapters; train them with `ponder adapt-exits`")
    test = windows(ckpt.tokenizer, "test", window, n_windows)
    val = windows(ckpt.tokenizer, "val", window, max(2, n_windows // 4))
    train = windows(ckpt.tokenizer, "train", window, max(2, n_windows // 2), seed=1)
    ids, targets = test[:, :-1], test[:, 1:]
    start = time.perf_counter()
    scan = scan_depths(model, ids, batch, targets)
    val_scan = scan_depths(model, val[:, :-1], batch)
    train_scan = scan_depths(model, train[:, :-1], batch)
    classifier = train_classifier(train_scan.states, train_scan.agree, cfg.min_depth)
    del train_scan
    signals = {  # name: (test scores, val scores), each (D, N, T), higher = exit
        "calm": (scan.conf, val_scan.conf),
        "classifier": (classifier(scan.states[:-1]), classifier(val_scan.states[:-1])),
        "latent": (latent_scores(scan.states), latent_scores(val_scan.states)),
    }
    states, full_logits = scan.states, scan.full_logits
    full_top1 = full_logits.argmax(-1)
    rows: list[dict] = []

    def add(method: str, budget: float, logits: Tensor, depth: Tensor, **extra) -> None:
        row = {"method": method, "budget": budget, **metrics(logits, targets, full_top1, depth, cfg, method), **extra}
        rows.append(row)
        print(f"{method:>10} budget {budget:.2f}: ppl {row['ppl']:7.2f}  agree {row['top1_agreement']:.3f}  "
              f"layers {row['mean_layers']:5.2f}  saved {row['saved_fraction']:.1%}  flops {row['compute_fraction']:.1%}",
              flush=True)

    def from_states(depth: Tensor) -> Tensor:
        """Logits decoded from each token's full-depth state at its depth (as if no token had exited)."""
        at_depth = states.gather(0, depth[None, ..., None].expand(1, *depth.shape, states.shape[-1]))[0]
        with torch.no_grad():
            return model.head(model.norm(model.adapt_exit(at_depth, depth))).float()

    for budget in tqdm(budgets, desc="budgets", unit="budget"):
        if budget >= 1.0:
            add("full", 1.0, full_logits, torch.full(ids.shape, cfg.max_depth))
            continue
        price = cal.price_for_budget(budget)
        logits, depth = forward_logits(model, ids, ExitSpec(price=price), batch)
        add("exit-head", budget, logits, depth, price=price)
        add("exit-head-full-kv", budget, from_states(depth), depth)
        for name, (score, val_score) in signals.items():
            threshold = calm_threshold(val_score, budget, cfg.min_depth)
            logits, depth = forward_logits(model, ids, None, batch, depths=calm_depths(score, threshold, cfg.min_depth))
            add(name, budget, logits, depth, threshold=threshold)
        for name, cost in (("oracle", scan.nll), ("oracle-kl", scan.kl)):
            depth = oracle_depths(cost, budget * cfg.max_depth, cfg.min_depth)
            add(name, budget, from_states(depth), depth)
        d = max(cfg.min_depth, round(budget * cfg.max_depth))
        for method, adapters in (("adapters", True), ("logit-lens", False)):
            add(method, budget, decode_at(model, states[d], d, adapters), torch.full(ids.shape, d))
    kv_fill = {}
    if kv_fill_budget < 1.0:
        price = cal.price_for_budget(kv_fill_budget)
        served = model.cfg.kv_fill
        for fill in KVFill:
            model.cfg.kv_fill = fill
            logits, depth = forward_logits(model, ids, ExitSpec(price=price), batch)
            kv_fill[fill.value] = metrics(logits, targets, full_top1, depth, cfg, "exit-head")
            print(f"kv_fill {fill.value:>9} at budget {kv_fill_budget}: ppl {kv_fill[fill.value]['ppl']:.2f}, "
                  f"layers {kv_fill[fill.value]['mean_layers']:.2f}", flush=True)
        model.cfg.kv_fill = cfg.kv_fill = served
    return {"checkpoint": str(path), "eval_text": f"Persuasion, {ids.numel()} scored tokens in {n_windows} windows of {window}",
            "max_depth": cfg.max_depth, "min_depth": cfg.min_depth, "rows": rows,
            "kv_fill_at_budget": {"budget": kv_fill_budget, **kv_fill}, "seconds": time.perf_counter() - start}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in result["rows"] if r["method"] == "full")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["mean_layers"])
        if not rows:
            continue
        xs = [r["mean_layers"] for r in rows] + [full["mean_layers"]]
        axes[0].plot(xs, [r["ppl"] for r in rows] + [full["ppl"]], "o-", label=method)
        axes[1].plot(xs, [r["top1_agreement"] for r in rows] + [1.0], "o-", label=method)
    axes[0].axhline(full["ppl"] * 1.05, color="grey", ls="--", lw=1, label="full depth +5%")
    axes[0].axvline(0.6 * result["max_depth"], color="grey", ls=":", lw=1, label="60% of layers")
    axes[0].set(xlabel="mean layers run", ylabel="perplexity (Persuasion)", yscale="log", title="Perplexity")
    axes[1].set(xlabel="mean layers run", ylabel="top-1 agreement with full depth", title="Agreement")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Early exit on {Path(result['checkpoint']).name}: {result['eval_text']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(result: dict) -> None:
    print(f"\n{'method':>10} {'budget':>6} {'ppl':>8} {'agree':>6} {'layers':>6} {'saved':>6} {'flops':>6}")
    for r in result["rows"]:
        print(f"{r['method']:>10} {r['budget']:6.2f} {r['ppl']:8.2f} {r['top1_agreement']:6.3f} {r['mean_layers']:6.2f} "
              f"{r['saved_fraction']:6.1%} {r['compute_fraction']:6.1%}")


def record_quality(path: Path, result: dict) -> Calibration:
    """Write the served rule's measured cost per budget (the exit head, and full depth) into the
    checkpoint's calibration.json, where /v1/models publishes it."""
    cal = load_calibration(path)
    full = next(r for r in result["rows"] if r["method"] == "full")
    cal.quality = [{"budget": r["budget"], "ppl": r["ppl"], "ppl_increase": r["ppl"] / full["ppl"] - 1,
                    "top1_agreement": r["top1_agreement"], "mean_depth_fraction": r["mean_layers"] / result["max_depth"]}
                   for r in result["rows"] if r["method"] in ("full", "exit-head")]
    cal.quality.sort(key=lambda q: -q["budget"])
    cal.quality_measured_on = f"{result['eval_text']}, held out from training (ponder eval-exits)"
    cal.save(path / "calibration.json")
    return cal


def eval_exits_main(path: Path, budgets: list[float], n_windows: int, window: int, out: str, record: bool = True) -> dict:
    result = evaluate_exits(path, budgets, n_windows, window)
    print_table(result)
    if record:
        record_quality(path, result)
        print(f"recorded the quality per budget in {path / 'calibration.json'}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(out + ".png"))
    print(f"wrote {out}.json and {out}.png")
    return result
