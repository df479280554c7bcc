"""`ponder eval-thoughts`: held-out accuracy against the thought budget, served by the engine.

For each thought KV mode the checkpoint supports and each max_thought_tokens in {0, half the
trained length, the trained length}, every held-out problem of the checkpoint's thought task
(training/thought_tasks.py, training/swap_task.py) is answered greedily by the batched engine.
Prints accuracy, tokens/s, answers/s, mean thought tokens per answer and KV blocks: the most in use
at once, and each problem's own peak (discard frees a thought's blocks once the answer starts).
With `rounds` > 1 the full-length runs of the modes are repeated in turn, and throughput is the
median over rounds (the ratio discard/keep is the median of per-round ratios). Writes JSON and a PNG.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.checkpoint import load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams
from training.thought_decode import held_out_accuracy
from training.thought_tasks import ThoughtTask, thought_task_for

BLOCK_SIZE = 4
KV_PLOT_STEPS = 100


def run_budget(engine: LLMEngine, task: ThoughtTask, problems: list[list[int]], cap: int, mode: str,
               trace: list[float] | None = None) -> dict:
    tok = engine.tokenizer
    answer_len = len(task.answer_text(problems[0]))  # one token per answer character
    sampling = SamplingParams(max_tokens=cap + answer_len + 4, temperature=0.0)
    compute = ComputeParams(max_thought_tokens=cap, thought_kv=mode)
    scheduler, allocator = engine.scheduler, engine.scheduler.allocator
    answers: dict[str, str] = {}
    thoughts: dict[str, int] = {}
    own_peak: dict[str, int] = {}
    generated, peak, steps, block_steps = 0, 0, 0, 0
    start = time.perf_counter()
    for i, problem in enumerate(problems):
        engine.add_request(f"q{i}", tok.encode(task.format_problem(problem)).ids, sampling, compute)
        answers[f"q{i}"] = ""
    bar = tqdm(total=len(problems), desc=f"{mode} max_thought_tokens={cap}", leave=False)
    while engine.has_unfinished():
        outs = engine.step()
        for req in scheduler.running:  # the blocks each running request holds after the step
            own_peak[req.request_id] = max(own_peak.get(req.request_id, 0), len(req.block_table))
        for out in outs:
            answers[out.request_id] += out.new_text
            generated += len(out.new_token_ids)
            if out.finished:
                thoughts[out.request_id] = out.output.num_thought_tokens
                bar.update(1)
        peak, steps, block_steps = max(peak, allocator.num_used), steps + 1, block_steps + allocator.num_used
        if trace is not None:
            trace.append(engine.kv_usage())
    bar.close()
    elapsed = time.perf_counter() - start
    correct = sum(answers[f"q{i}"] == task.answer_text(p) for i, p in enumerate(problems))
    assert allocator.num_used == 0  # nothing leaked
    return {"thought_kv": mode, "max_thought_tokens": cap, "accuracy": correct / len(problems),
            "mean_thought_tokens": sum(thoughts.values()) / len(problems), "tokens_per_s": generated / elapsed,
            "answers_per_s": len(problems) / elapsed, "generated_tokens": generated, "seconds": elapsed,
            "peak_blocks": peak, "mean_blocks": block_steps / max(steps, 1),
            "peak_blocks_per_problem": sum(own_peak.values()) / len(problems)}


def evaluate_thoughts(checkpoint: Path, num_problems: int, max_num_seqs: int, out: str, rounds: int = 1) -> dict:
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    task = thought_task_for(cfg, checkpoint)
    n = task.thought_len
    problems = task.test_problems[:num_problems].tolist()
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(1024, max_num_seqs),
                                          block_size=BLOCK_SIZE, max_waiting=len(problems)))
    result = {"checkpoint": str(checkpoint), "task": task.name, "trained_thought_tokens": n,
              "num_problems": len(problems), "max_num_seqs": max_num_seqs, "block_size": BLOCK_SIZE,
              "threads": torch.get_num_threads(), "rounds": rounds, "runs": [], "kv_trace": {}}
    caps = [0, n // 2, n]
    print(f"{len(problems)} held-out {task.name} problems ({n} thought tokens trained); max_num_seqs={max_num_seqs}, "
          f"block_size={BLOCK_SIZE}")
    print(f"{'thought_kv':>10} {'max_thought':>11} {'accuracy':>8} {'thoughts':>8} {'tok/s':>8} {'answers/s':>9} "
          f"{'peak_blocks':>11} {'per_problem':>11}")
    for mode in cfg.thought_kv:
        for cap in caps:
            trace: list[float] = []
            r = run_budget(engine, task, problems, cap, mode, trace)
            result["runs"].append(r)
            if cap == n:
                result["kv_trace"][mode] = trace
            print(f"{mode:>10} {cap:>11} {r['accuracy']:>8.3f} {r['mean_thought_tokens']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r['answers_per_s']:>9.1f} {r['peak_blocks']:>11} "
                  f"{r['peak_blocks_per_problem']:>11.2f}")
    for mode in cfg.thought_kv:
        acc = {r["max_thought_tokens"]: r["accuracy"] for r in result["runs"] if r["thought_kv"] == mode}
        result[f"gain_{mode}"] = acc[n] - acc[0]
        print(f"{mode}: thoughts raise accuracy by {100 * (acc[n] - acc[0]):.1f} points over answering directly")
    if len(cfg.thought_kv) == 2:
        result["throughput"] = compare_throughput(engine, task, problems, n, rounds, result["runs"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, f"{out}.png")
    print(f"wrote {out}.json and {out}.png")
    return result


def evaluate_reference(checkpoint: Path, num_problems: int, out: str) -> dict:
    """Accuracy on the reference forward (training/thought_decode.py) under both thought KV masks,
    whatever the checkpoint lists: how a model trained without the discard mask fares with it."""
    ckpt = load_checkpoint(checkpoint)
    task = thought_task_for(ckpt.config, checkpoint)
    n = task.thought_len
    caps = [0, n // 2, n]
    accuracy = {mode: held_out_accuracy(ckpt.model, task, caps, mode == "discard", num_problems)
                for mode in ("keep", "discard")}
    print(f"{num_problems} held-out {task.name} problems on the reference forward; trained thought_kv "
          f"{ckpt.config.thought_kv}")
    print(f"{'mask':>8} " + " ".join(f"{'max_thought=' + str(c):>14}" for c in caps))
    for mode, acc in accuracy.items():
        print(f"{mode:>8} " + " ".join(f"{acc[c]:>14.3f}" for c in caps))
    result = {"checkpoint": str(checkpoint), "task": task.name, "num_problems": num_problems,
              "trained_thought_kv": ckpt.config.thought_kv, "accuracy": accuracy}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare_throughput(engine: LLMEngine, task: ThoughtTask, problems: list[list[int]], n: int, rounds: int,
                       runs: list[dict]) -> dict:
    """Full-length thoughts, keep against discard: answers/s per round (the first round is the table's)."""
    full = {r["thought_kv"]: r for r in runs if r["max_thought_tokens"] == n}
    per_round = [{m: full[m]["answers_per_s"] for m in ("keep", "discard")}]
    for i in range(1, rounds):
        order = ("discard", "keep") if i % 2 else ("keep", "discard")  # alternate who runs first
        per_round.append({m: run_budget(engine, task, problems, n, m)["answers_per_s"] for m in order})
    ratios = [r["discard"] / r["keep"] for r in per_round]
    summary = {"answers_per_s": per_round, "median_keep": statistics.median(r["keep"] for r in per_round),
               "median_discard": statistics.median(r["discard"] for r in per_round),
               "discard_over_keep": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "peak_blocks": {m: full[m]["peak_blocks"] for m in full},
               "peak_blocks_per_problem": {m: full[m]["peak_blocks_per_problem"] for m in full},
               "mean_blocks": {m: full[m]["mean_blocks"] for m in full}}
    print(f"max_thought_tokens={n}, {len(per_round)} round(s): answers/s keep {summary['median_keep']:.1f}, "
          f"discard {summary['median_discard']:.1f} (discard/keep {summary['discard_over_keep']:.3f}, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}); peak KV blocks keep {full['keep']['peak_blocks']}, discard "
          f"{full['discard']['peak_blocks']}; per problem {full['keep']['peak_blocks_per_problem']:.2f} against "
          f"{full['discard']['peak_blocks_per_problem']:.2f}; mean in use {full['keep']['mean_blocks']:.1f} against "
          f"{full['discard']['mean_blocks']:.1f}")
    return summary


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, kv) = plt.subplots(1, 2, figsize=(11, 4))
    modes = [m for m in ("keep", "discard") if any(r["thought_kv"] == m for r in result["runs"])]
    color = {"keep": "C0", "discard": "C1"}
    caps = sorted({r["max_thought_tokens"] for r in result["runs"]})
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        accs = [next(r["accuracy"] for r in result["runs"] if r["thought_kv"] == mode and r["max_thought_tokens"] == c)
                for c in caps]
        bars = ax.bar([i + j * width for i in range(len(caps))], [100 * a for a in accs], width,
                      label=f"thought_kv={mode}", color=color[mode])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(caps))], [str(c) for c in caps])
    ax.set_xlabel("max_thought_tokens (trained length %d)" % result["trained_thought_tokens"])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{result['task']}, {result['num_problems']} held-out problems")
    ax.legend()
    for mode in modes:  # the first few waves of requests; the rest repeat them
        trace = result["kv_trace"].get(mode, [])[:KV_PLOT_STEPS]
        kv.plot([100 * u for u in trace], label=f"thought_kv={mode}", color=color[mode])
    kv.set_xlabel(f"engine step (first {KV_PLOT_STEPS})")
    kv.set_ylabel("KV blocks in use (%)")
    kv.set_title(f"KV in use, max_num_seqs={result['max_num_seqs']}, full thoughts")
    kv.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
