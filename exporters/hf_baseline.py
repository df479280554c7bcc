"""Ponder's engine at full depth against Hugging Face `generate()` with the same weights.

    python -m exporters.hf_baseline [--model DIR] [--batch-sizes 1,16]

Both generate the same greedy tokens from the same prompts in one process; the figure is
new tokens per second over the whole batch (prefill included). The two alternate, and the ratio
is the median of the per-repeat ratios, so drift on a shared machine hits both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from exporters.llama import to_llama
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams


def ponder_run(engine: LLMEngine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts.tolist()):
        engine.add_request(f"p{time.perf_counter_ns()}-{i}", p, params, ComputeParams(compute_budget=1.0))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return time.perf_counter() - start, list(tokens.values())


@torch.inference_mode()
def hf_run(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      attention_mask=torch.ones_like(prompts), pad_token_id=0)
    return time.perf_counter() - start, out[:, prompts.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads (use 1 on a shared machine)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="results/hf-baseline.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model, dtype=getattr(torch, args.dtype))
    hf = to_llama(ckpt.model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{args.model} ({args.dtype}, {torch.get_num_threads()} threads); ratio: median over {args.repeats} alternating repeats")
    print(f"{'batch':>5} {'ponder tok/s':>13} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>12}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(1024, batch * args.prompt_len)))
        prompts = torch.randint(4, ckpt.config.vocab_size, (batch, args.prompt_len), generator=gen)
        ponder_run(engine, prompts, 4), hf_run(hf, prompts, 4)  # warm-up
        p_times, h_times = [], []
        for _ in range(args.repeats):  # alternate, so drift on a noisy machine hits both
            t, p_tokens = ponder_run(engine, prompts, args.new_tokens)
            p_times.append(t)
            t, h_tokens = hf_run(hf, prompts, args.new_tokens)
            h_times.append(t)
        total = batch * args.new_tokens
        row = {"batch": batch, "ponder_tok_s": total / statistics.median(p_times),
               "hf_tok_s": total / statistics.median(h_times), "same_tokens": sorted(p_tokens) == sorted(h_tokens)}
        row["ratio"] = statistics.median(h / p for p, h in zip(p_times, h_times))
        rows.append(row)
        print(f"{batch:>5} {row['ponder_tok_s']:>13.1f} {row['hf_tok_s']:>9.1f} {row['ratio']:>5.2f}x {str(row['same_tokens']):>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                                          "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
