"""Regime map: where adaptive depth pays. One budget against full depth, over context lengths and
batch sizes, on one engine in one process.

    python -m benchmarks.regime_map [--model checkpoints/smollm2-135m-exits-ft] [--budget 0.6]
        [--contexts 128,512,1024,2048] [--batches 1,8,16] [--max-tokens 16] [--rounds 2] [--threads 2]

In each cell, `batch` requests with prompts of `context` - --max-tokens tokens (held-out text)
each decode --max-tokens tokens, so the last one attends over `context` keys. Each round runs both budgets in rotated order; the speedup is decode tokens/s
at the budget over full depth within a round, and the table shows its median over rounds. Beside it
stand the two ideals of `ponder bench` (benchmarks/engine.py): the FLOPs ideal, here with attention
over the cell's context counted (an exited token attends no deeper), and the weight-read ideal
(what a step bound by reading weights could gain). Their ratio to the achieved speedup says how
much of what the work allows the executor turns into time. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.engine import measure, plot, summarize
from benchmarks.harness import csv_of, make_prompts, run_rounds, set_threads, write_results
from runtime.checkpoint import load_checkpoint
from runtime.devices import resolve_device, resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine

GOAL_FRACTION = 0.85  # of the FLOPs ideal, at context >= 1024 or batch >= 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="checkpoints/smollm2-135m-exits-ft")
    p.add_argument("--budget", type=float, default=0.6, help="the budget set against full depth (1.0)")
    p.add_argument("--contexts", type=csv_of(int), default=[128, 512, 1024, 2048], help="prompt lengths in tokens")
    p.add_argument("--batches", type=csv_of(int), default=[1, 8, 16], help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=16, help="decoded tokens per request")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-file", default="training/data/austen/persuasion.txt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--out", default="results/regime-map.json")
    args = p.parse_args(argv)
    if not 0 < args.budget < 1:
        p.error(f"--budget must be in (0, 1), got {args.budget}")
    if min(args.batches) < 1 or args.max_tokens < 2 or args.rounds < 1:
        p.error("--batches must be >= 1, --max-tokens >= 2 (decode needs two tokens), --rounds >= 1")
    if min(args.contexts) <= args.max_tokens:
        p.error(f"every context must exceed --max-tokens={args.max_tokens} (it holds the prompt and the new tokens)")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    dev = resolve_device(args.device)
    ckpt = load_checkpoint(args.model, device=dev, dtype=resolve_dtype(args.dtype, dev))
    cfg, longest = ckpt.config, max(args.contexts)
    if longest > cfg.max_seq_len:
        raise SystemExit(f"context {longest} exceeds the model's max_seq_len={cfg.max_seq_len}")
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=2048,
                                          max_model_len=longest))
    budgets = [1.0, args.budget]
    prompts = make_prompts(ckpt.tokenizer, cfg.vocab_size, max(args.batches), longest - args.max_tokens, args.prompt_file)
    measure(engine, [prompts[0][:16]], 1.0, 4)  # warm-up
    print(f"{args.model} on {dev} ({args.dtype}, {torch.get_num_threads()} threads): budget {args.budget} against 1.0, "
          f"{args.max_tokens} new tokens per request, medians of {args.rounds} rounds", flush=True)
    header = (f"{'context':>7} {'batch':>5} {'depth':>6} {'tok/s@1.0':>10} {'tok/s@B':>9} {'speedup':>8} "
              f"{'FLOPs ideal':>12} {'of it':>6} {'weights ideal':>14} {'of it':>6}")
    print(header)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            cell = [p[: context - args.max_tokens] for p in prompts[:batch]]
            results = run_rounds(budgets, args.rounds, lambda b: measure(engine, cell, b, args.max_tokens),
                                 f"context {context} batch {batch}")
            mean_keys = context - args.max_tokens / 2  # what a decode token attends over, on average
            full = summarize(cfg, batch, 1.0, results, 1.0, context=mean_keys)
            row = summarize(cfg, batch, args.budget, results, 1.0, context=mean_keys)
            row |= {"context": context, "full_depth_tokens_per_s": full["decode_tokens_per_s"]}
            rows.append(row)
            print(f"{context:>7} {batch:>5} {row['mean_core_depth']:>6.2f} {full['decode_tokens_per_s']:>10.1f} "
                  f"{row['decode_tokens_per_s']:>9.1f} {row['speedup']:>7.2f}x {row['ideal_speedup']:>11.2f}x "
                  f"{row['fraction_of_ideal']:>6.0%} {row['weights_ideal_speedup']:>13.2f}x "
                  f"{row['fraction_of_weights_ideal']:>6.0%}", flush=True)
    goal = [r for r in rows if r["context"] >= 1024 or r["batch"] >= 16]
    if goal:
        met = [r for r in goal if r["fraction_of_ideal"] >= GOAL_FRACTION]
        worst = min(goal, key=lambda r: r["fraction_of_ideal"])
        print(f"goal (>= {GOAL_FRACTION:.0%} of the FLOPs ideal at context >= 1024 or batch >= 16): met in "
              f"{len(met)} of {len(goal)} cells; worst {worst['fraction_of_ideal']:.0%} at context "
              f"{worst['context']}, batch {worst['batch']}")
    if args.out:
        result = {"model": args.model, "device": str(dev), "dtype": args.dtype, "threads": torch.get_num_threads(),
                  "budget": args.budget, "max_tokens": args.max_tokens, "rounds": args.rounds,
                  "prompt_file": args.prompt_file, "goal_fraction": GOAL_FRACTION, "rows": rows}
        write_results(args.out, result, lambda path: plot(rows, path, f"{Path(args.model).name}: budget {args.budget} "
                                                                     f"against full depth ({dev}, {args.dtype})",
                                                               x="context", xlabel="context (tokens)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
