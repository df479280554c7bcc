"""Ponder's engine at full depth against Hugging Face `generate()` with the same weights.

    python -m benchmarks.hf_baseline [--model DIR] [--batch-sizes 1,16]

Both generate greedy tokens from the same prompts in one process; the figure is requested new
tokens per second over the whole batch (prefill included). `generate()` runs one static batch:
with --workload mixed it pads to the longest prompt and runs until the longest request is done,
which is what continuous batching avoids. The two run in rounds of rotated order, and the ratio
is the median of the per-round ratios, so drift on a shared machine hits both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import (csv_of, make_prompts, median_ratio, run_engine, run_rounds, set_threads,
                                write_results)
from exporters.llama import to_llama
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams


def make_workload(kind: str, batch: int, prompt_len: int, new_tokens: int, vocab_size: int,
                  gen: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """Prompts and per-request new-token counts. uniform: every request alike. mixed: prompt lengths
    from prompt_len/4 to 2*prompt_len and new tokens from new_tokens/4 to 2*new_tokens, as a server sees them."""
    if kind == "uniform":
        return make_prompts(None, vocab_size, batch, prompt_len, gen=gen), [new_tokens] * batch
    lengths = torch.randint(max(prompt_len // 4, 1), 2 * prompt_len + 1, (batch,), generator=gen).tolist()
    counts = torch.randint(max(new_tokens // 4, 1), 2 * new_tokens + 1, (batch,), generator=gen).tolist()
    return [torch.randint(4, vocab_size, (n,), generator=gen).tolist() for n in lengths], counts


def ponder_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, list[list[int]]]:
    run = run_engine(engine, prompts, new_tokens, ComputeParams(compute_budget=1.0))
    return run.wall_s, run.tokens


@torch.inference_mode()
def hf_run(hf, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, list[list[int]]]:
    """One static batch, left-padded to the longest prompt, generating until the longest request is done."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max(new_tokens), min_new_tokens=max(new_tokens),
                      do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, [row[:n] for row, n in zip(out[:, width:].tolist(), new_tokens)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch-sizes", type=csv_of(int), default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workload", choices=["uniform", "mixed"], default="uniform",
                    help="uniform: equal prompts and lengths; mixed: varied prompt and output lengths")
    ap.add_argument("--repeats", type=int, default=5, help="rounds, each running both sides")
    ap.add_argument("--threads", type=int, help="torch threads (use 1 on a shared machine)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="results/hf-baseline.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    threads = set_threads(args.threads)
    ckpt = load_checkpoint(args.model, dtype=getattr(torch, args.dtype))
    hf = to_llama(ckpt.model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{args.model} ({args.dtype}, {threads} threads), {args.workload} workload; "
          f"ratio: median over {args.repeats} rotated rounds")
    print(f"{'batch':>5} {'ponder tok/s':>13} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>11}")
    for batch in args.batch_sizes:
        engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(1024, 2 * batch * args.prompt_len)))
        prompts, new_tokens = make_workload(args.workload, batch, args.prompt_len, args.new_tokens,
                                            ckpt.config.vocab_size, gen)
        if max(map(len, prompts)) + max(new_tokens) > ckpt.config.max_seq_len:
            raise SystemExit(f"prompts plus new tokens exceed the model's max_seq_len={ckpt.config.max_seq_len}")
        ponder_run(engine, prompts, [4] * batch), hf_run(hf, prompts, [4] * batch)  # warm-up
        sides = {"ponder": lambda: ponder_run(engine, prompts, new_tokens),
                 "hf": lambda: hf_run(hf, prompts, new_tokens)}
        rounds = run_rounds(list(sides), args.repeats, lambda side: sides[side]())
        (_, p_tokens), (_, h_tokens) = rounds[-1]["ponder"], rounds[-1]["hf"]
        total = sum(new_tokens)  # tokens the requests asked for; HF's extra tokens past a request's count are waste
        row = {"batch": batch, "workload": args.workload,
               "ponder_tok_s": total / statistics.median(r["ponder"][0] for r in rounds),
               "hf_tok_s": total / statistics.median(r["hf"][0] for r in rounds), "same_tokens": p_tokens == h_tokens,
               "same_token_fraction": sum(a == b for p, h in zip(p_tokens, h_tokens) for a, b in zip(p, h)) / total,
               "ratio": median_ratio(rounds, "hf", "ponder", lambda wall_and_tokens: wall_and_tokens[0])}
        rows.append(row)
        print(f"{batch:>5} {row['ponder_tok_s']:>13.1f} {row['hf_tok_s']:>9.1f} {row['ratio']:>5.2f}x "
              f"{row['same_token_fraction']:>11.1%}", flush=True)
    write_results(args.out, {"model": args.model, "workload": args.workload, "dtype": args.dtype, "threads": threads,
                             "repeats": args.repeats, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
