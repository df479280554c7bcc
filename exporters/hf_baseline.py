"""Ponder's engine at full depth against Hugging Face `generate()` with the same weights.

    python -m exporters.hf_baseline [--model DIR] [--batch-sizes 1,16]

Both generate greedy tokens from the same prompts in one process; the figure is requested new
tokens per second over the whole batch (prefill included). `generate()` runs one static batch:
with --workload mixed it pads to the longest prompt and runs until the longest request is done,
which is what continuous batching avoids. The two alternate, and the ratio
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


def make_workload(kind: str, batch: int, prompt_len: int, new_tokens: int, vocab_size: int,
                  gen: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """Prompts and per-request new-token counts. uniform: every request alike. mixed: prompt lengths
    from prompt_len/4 to 2*prompt_len and new tokens from new_tokens/4 to 2*new_tokens, as a server sees them."""
    if kind == "uniform":
        return torch.randint(4, vocab_size, (batch, prompt_len), generator=gen).tolist(), [new_tokens] * batch
    lengths = torch.randint(max(prompt_len // 4, 1), 2 * prompt_len + 1, (batch,), generator=gen).tolist()
    counts = torch.randint(max(new_tokens // 4, 1), 2 * new_tokens + 1, (batch,), generator=gen).tolist()
    return [torch.randint(4, vocab_size, (n,), generator=gen).tolist() for n in lengths], counts


def ponder_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    ids = []
    for i, (p, n) in enumerate(zip(prompts, new_tokens)):
        ids.append(f"p{time.perf_counter_ns()}-{i}")
        engine.add_request(ids[-1], p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                           ComputeParams(compute_budget=1.0))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return time.perf_counter() - start, [tokens[i] for i in ids]


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
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--workload", choices=["uniform", "mixed"], default="uniform",
                    help="uniform: equal prompts and lengths; mixed: varied prompt and output lengths")
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
    print(f"{args.model} ({args.dtype}, {torch.get_num_threads()} threads), {args.workload} workload; ratio: median over {args.repeats} alternating repeats")
    print(f"{'batch':>5} {'ponder tok/s':>13} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>11}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=max(1024, 2 * batch * args.prompt_len)))
        prompts, new_tokens = make_workload(args.workload, batch, args.prompt_len, args.new_tokens,
                                            ckpt.config.vocab_size, gen)
        if max(map(len, prompts)) + max(new_tokens) > ckpt.config.max_seq_len:
            raise SystemExit(f"prompts plus new tokens exceed the model's max_seq_len={ckpt.config.max_seq_len}")
        ponder_run(engine, prompts, [4] * batch), hf_run(hf, prompts, [4] * batch)  # warm-up
        p_times, h_times = [], []
        for _ in range(args.repeats):  # alternate, so drift on a noisy machine hits both
            t, p_tokens = ponder_run(engine, prompts, new_tokens)
            p_times.append(t)
            t, h_tokens = hf_run(hf, prompts, new_tokens)
            h_times.append(t)
        total = sum(new_tokens)  # tokens the requests asked for; HF's extra tokens past a request's count are waste
        row = {"batch": batch, "workload": args.workload, "ponder_tok_s": total / statistics.median(p_times),
               "hf_tok_s": total / statistics.median(h_times), "same_tokens": p_tokens == h_tokens,
               "same_token_fraction": sum(a == b for p, h in zip(p_tokens, h_tokens) for a, b in zip(p, h)) / total}
        row["ratio"] = statistics.median(h / p for p, h in zip(p_times, h_times))
        rows.append(row)
        print(f"{batch:>5} {row['ponder_tok_s']:>13.1f} {row['hf_tok_s']:>9.1f} {row['ratio']:>5.2f}x "
              f"{row['same_token_fraction']:>11.1%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "workload": args.workload, "dtype": args.dtype, "threads": torch.get_num_threads(),
                                          "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
