"""`ponder eval`: quality against compute, adaptive exit against fixed depth.

Text tasks report held-out perplexity; classification tasks (digits, modadd) report accuracy,
per group (e.g. local / global mode) with the mean core depth on the answer tokens.
Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from runtime.checkpoint import load_checkpoint
from runtime.model import ExitSpec, PonderModel
from training.tasks import IGNORE, Task, make_task


@torch.no_grad()
def score(model: PonderModel, batches: Iterable[tuple[Tensor, Tensor]], spec: ExitSpec | int) -> dict[str, float]:
    """NLL, accuracy and mean depth over target positions. spec: an ExitSpec, or an int fixed depth."""
    model.eval()
    nll = correct = depth_sum = n = 0.0
    blocks = torch.zeros(model.cfg.n_pool)
    for ids, targets in batches:
        exit = ExitSpec(depths=torch.full_like(ids, spec)) if isinstance(spec, int) else spec
        out = model(ids, exit)
        mask = targets != IGNORE
        logp = torch.log_softmax(out.logits.float(), -1)
        nll += float(-logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)[mask].sum())
        correct += float((out.logits.argmax(-1) == targets)[mask].sum())
        depth_sum += float(out.depth[mask].sum())
        n += float(mask.sum())
        path = out.path[mask]
        blocks += torch.bincount(path[path >= 0], minlength=model.cfg.n_pool)[: model.cfg.n_pool].float()
    n = max(n, 1.0)
    return {"nll": nll / n, "ppl": math.exp(nll / n), "accuracy": correct / n, "mean_depth": depth_sum / n,
            "depth_fraction": depth_sum / n / max(model.cfg.max_depth, 1), "tokens": n,
            "block_share": (blocks / blocks.sum().clamp_min(1)).tolist()}


def _subset(task: Task, rows: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    data = task.test[rows]
    return [task.pair(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]


def evaluate(model: PonderModel, calibration, task: Task, budgets: list[float], max_tokens: int) -> dict:
    D = model.cfg.max_depth
    groups = {"all": torch.ones(len(task.test), dtype=torch.bool), **task.groups} if task.test.dim() == 2 else {}
    if groups:  # classification: the first max_tokens // seq_len test examples
        first = torch.arange(len(task.test)) < max(1, max_tokens // task.seq_len)
        sets = {g: _subset(task, rows & first, 512) for g, rows in groups.items()}
    else:
        sets = {"all": list(task.batches("test", 16, max_tokens=max_tokens))}
    result = {"max_depth": D, "adaptive": [], "fixed": []}
    for budget in budgets:
        price = calibration.price_for_budget(budget)
        row = {"budget": budget, "price": price}
        for g, batches in sets.items():
            row[g] = score(model, batches, ExitSpec(price=price))
        result["adaptive"].append(row)
    for d in range(D + 1):
        result["fixed"].append({"depth": d, **{g: score(model, batches, d) for g, batches in sets.items()}})
    return result


def interpolate_fixed(fixed: list[dict], mean_depth: float, key: str, group: str = "all") -> float:
    """A fixed-depth model at a fractional mean depth: a per-token mix of the two nearest depths,
    whose expected NLL (or accuracy) interpolates linearly."""
    lo = min(int(math.floor(mean_depth)), len(fixed) - 1)
    hi = min(lo + 1, len(fixed) - 1)
    t = mean_depth - lo
    return (1 - t) * fixed[lo][group][key] + t * fixed[hi][group][key]


def evaluate_main(path: Path, task_name: str, budgets: list[float], baseline: str | None, max_tokens: int, out: str) -> dict:
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budget {b} must be in (0, 1]")
    ckpt = load_checkpoint(path)
    task = make_task(task_name)
    if task.vocab_size != ckpt.config.vocab_size:
        raise ValueError(f"checkpoint vocab {ckpt.config.vocab_size} does not match task {task_name} ({task.vocab_size})")
    result = {"checkpoint": str(path), "task": task_name, **evaluate(ckpt.model, ckpt.calibration, task, budgets, max_tokens)}
    text = task.test.dim() == 1
    key = "nll" if text else "accuracy"
    for row in result["adaptive"]:
        row["fixed_same_depth"] = interpolate_fixed(result["fixed"], row["all"]["mean_depth"], key)
    if baseline:
        base = load_checkpoint(baseline)
        first = torch.arange(len(task.test)) < max(1, max_tokens // task.seq_len)
        base_set = list(task.batches("test", 16, max_tokens=max_tokens)) if text else _subset(task, first, 512)
        result["baseline"] = {"checkpoint": baseline, "parameters": base.model.num_parameters(),
                              "all": score(base.model, base_set, ExitSpec())}
    result["parameters"] = ckpt.model.num_parameters()
    print_table(result, text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    plot(result, text, f"{out}.png")
    print(f"wrote {out}.json and {out}.png")
    return result


def print_table(result: dict, text: bool) -> None:
    D = result["max_depth"]
    groups = [g for g in result["adaptive"][0] if isinstance(result["adaptive"][0][g], dict)]
    if text:
        full = result["adaptive"][0]["all"]["ppl"] if result["adaptive"][0]["budget"] == 1.0 else None
        print(f"{'budget':>7} {'price':>8} {'mean depth':>11} {'ppl':>8} {'vs full':>8} {'fixed@same depth':>17}")
        for row in result["adaptive"]:
            a = row["all"]
            rel = f"{a['ppl'] / full - 1:+.1%}" if full else "-"
            print(f"{row['budget']:>7.2f} {row['price']:>8.4f} {a['mean_depth']:>6.2f}/{D:<4} {a['ppl']:>8.2f} "
                  f"{rel:>8} {math.exp(row['fixed_same_depth']):>17.2f}")
        print("fixed depth:", "  ".join(f"d={r['depth']}: {r['all']['ppl']:.2f}" for r in result["fixed"]))
        if "baseline" in result:
            print(f"dense baseline ({result['baseline']['parameters']:,} params) at full depth: "
                  f"ppl {result['baseline']['all']['ppl']:.2f}  (this model: {result['parameters']:,} params)")
        return
    header = " ".join(f"{g + ' acc':>11} {g + ' depth':>12}" for g in groups)
    print(f"{'budget':>7} {'price':>8} {header} {'fixed@same depth acc':>21}")
    for row in result["adaptive"]:
        cells = " ".join(f"{row[g]['accuracy']:>11.2%} {row[g]['mean_depth']:>12.2f}" for g in groups)
        print(f"{row['budget']:>7.2f} {row['price']:>8.4f} {cells} {row['fixed_same_depth']:>21.2%}")
    print("fixed depth:", "  ".join(
        f"d={r['depth']}: " + "/".join(f"{r[g]['accuracy']:.1%}" for g in groups) for r in result["fixed"]))
    for g in groups:
        print(f"block share ({g}, budget {result['adaptive'][0]['budget']}):",
              " ".join(f"{x:.2f}" for x in result["adaptive"][0][g]["block_share"]))


def plot(result: dict, text: bool, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("ppl", "held-out perplexity") if text else ("accuracy", "test accuracy")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["all"]["depth_fraction"] for r in result["adaptive"]], [r["all"][key] for r in result["adaptive"]],
            "o-", label="adaptive exit (budgets)")
    ax.plot([r["all"]["depth_fraction"] for r in result["fixed"]], [r["all"][key] for r in result["fixed"]],
            "s--", label="fixed depth")
    if "baseline" in result:
        ax.plot([1.0], [result["baseline"]["all"][key]], "k*", markersize=12, label="dense baseline")
    for r in result["adaptive"]:
        ax.annotate(f"{r['budget']:g}", (r["all"]["depth_fraction"], r["all"][key]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean core depth / max depth (compute)")
    ax.set_ylabel(label)
    if text:
        ax.set_yscale("log")
    ax.set_title(f"{result['task']}: quality against compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
