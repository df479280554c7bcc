"""`ponder eval-thoughts`: held-out addition accuracy against the thought budget, served by the engine.

For each thought KV mode the checkpoint supports and each max_thought_tokens in {0, half the
trained length, the trained length}, every held-out problem is answered greedily by the batched
engine. Prints accuracy, tokens/s, answers/s and mean thought tokens per answer; records the KV
blocks in use after every engine step (discard frees each thought's blocks); writes JSON and a PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.checkpoint import load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams
from training.thought_tasks import addition_task, answer_text, format_problem


def run_budget(engine: LLMEngine, problems: list[tuple[int, int]], n: int, cap: int, mode: str,
               trace: list[float] | None = None) -> dict:
    tok = engine.tokenizer
    sampling = SamplingParams(max_tokens=cap + n + 4, temperature=0.0)
    compute = ComputeParams(max_thought_tokens=cap, thought_kv=mode)
    answers: dict[str, str] = {}
    thoughts: dict[str, int] = {}
    generated = 0
    start = time.perf_counter()
    for i, (a, b) in enumerate(problems):
        engine.add_request(f"q{i}", tok.encode(format_problem(a, b, n)).ids, sampling, compute)
        answers[f"q{i}"] = ""
    bar = tqdm(total=len(problems), desc=f"{mode} max_thought_tokens={cap}", leave=False)
    while engine.has_unfinished():
        for out in engine.step():
            answers[out.request_id] += out.new_text
            generated += len(out.new_token_ids)
            if out.finished:
                thoughts[out.request_id] = out.num_thought_tokens
                bar.update(1)
        if trace is not None:
            trace.append(engine.kv_usage())
    bar.close()
    elapsed = time.perf_counter() - start
    correct = sum(answers[f"q{i}"] == answer_text(a, b, n) for i, (a, b) in enumerate(problems))
    assert engine.scheduler.allocator.num_used == 0  # nothing leaked
    return {"thought_kv": mode, "max_thought_tokens": cap, "accuracy": correct / len(problems),
            "mean_thought_tokens": sum(thoughts.values()) / len(problems), "tokens_per_s": generated / elapsed,
            "answers_per_s": len(problems) / elapsed, "generated_tokens": generated, "seconds": elapsed}


def evaluate_thoughts(checkpoint: Path, num_problems: int, max_num_seqs: int, out: str) -> dict:
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if cfg.default_thought_tokens is None:
        raise ValueError(f"{checkpoint} has no default_thought_tokens; is it an addition-with-thoughts checkpoint?")
    n = cfg.default_thought_tokens  # one thought token per digit
    task = addition_task(n_digits=n, train_size=1)
    problems = [tuple(p) for p in task.test_pairs[:num_problems].tolist()]
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(1024, max_num_seqs),
                                          block_size=4, max_waiting=len(problems)))
    result = {"checkpoint": str(checkpoint), "n_digits": n, "trained_thought_tokens": n,
              "num_problems": len(problems), "threads": torch.get_num_threads(), "runs": [], "kv_trace": {}}
    caps = [0, n // 2, n]
    print(f"{len(problems)} held-out {n}-digit problems; max_num_seqs={max_num_seqs}")
    print(f"{'thought_kv':>10} {'max_thought':>11} {'accuracy':>8} {'thoughts':>8} {'tok/s':>8} {'answers/s':>9}")
    for mode in cfg.thought_kv:
        for cap in caps:
            trace: list[float] = []
            r = run_budget(engine, problems, n, cap, mode, trace)
            result["runs"].append(r)
            if cap == n:
                result["kv_trace"][mode] = trace
            print(f"{mode:>10} {cap:>11} {r['accuracy']:>8.3f} {r['mean_thought_tokens']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r['answers_per_s']:>9.1f}")
    for mode in cfg.thought_kv:
        acc = {r["max_thought_tokens"]: r["accuracy"] for r in result["runs"] if r["thought_kv"] == mode}
        result[f"gain_{mode}"] = acc[n] - acc[0]
        print(f"{mode}: thoughts raise accuracy by {100 * (acc[n] - acc[0]):.1f} points over answering directly")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, f"{out}.png")
    print(f"wrote {out}.json and {out}.png")
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, kv) = plt.subplots(1, 2, figsize=(11, 4))
    modes = sorted({r["thought_kv"] for r in result["runs"]})
    caps = sorted({r["max_thought_tokens"] for r in result["runs"]})
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        accs = [next(r["accuracy"] for r in result["runs"] if r["thought_kv"] == mode and r["max_thought_tokens"] == c)
                for c in caps]
        bars = ax.bar([i + j * width for i in range(len(caps))], [100 * a for a in accs], width, label=f"thought_kv={mode}")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(caps))], [str(c) for c in caps])
    ax.set_xlabel("max_thought_tokens (trained length %d)" % result["trained_thought_tokens"])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{result['n_digits']}-digit addition, {result['num_problems']} held-out problems")
    ax.legend()
    for mode, trace in result["kv_trace"].items():
        kv.plot([100 * u for u in trace], label=f"thought_kv={mode}")
    kv.set_xlabel("engine step")
    kv.set_ylabel("KV blocks in use (%)")
    kv.set_title("KV usage while answering (max_thought_tokens = trained)")
    kv.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
