"""The engine on onnxruntime against the engine on torch: same weights, same scheduler, one run.

    python -m benchmarks.onnx_vs_torch [--model DIR] [--onnx-dir DIR] [--batch-sizes 1,8] [--budgets 1.0,0.5]

Both engines decode the same greedy requests; each cell runs --repeats rounds of both backends in
rotated order so drift on a noisy machine hits both. It prints decode tokens/s of each, their ratio
(the median of per-round ratios), whether the tokens are identical, and the largest logit difference
of the two executors over a prompt at full depth and at the budget-0.5 price. JSON goes to
results/onnx-bench.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.harness import (HELDOUT_TEXT, csv_of, make_prompts, median_ratio, percentile, run_engine, run_rounds,
                                set_threads, write_results)
from exporters.onnx_export import export_onnx
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.executor import SeqInput
from runtime.engine.params import ComputeParams


def max_logit_diff(engines: dict[str, LLMEngine], prompt: list[int], price: float | None) -> float:
    """Largest |ORT - torch| over every position's logits of one prefill, at a price (None: full depth)."""
    logits = {}
    for name, engine in engines.items():
        table = list(range(-(-len(prompt) // engine.config.block_size)))
        logits[name] = engine.executor.run([SeqInput(prompt, 0, table, price=price)], all_logits=True)[0].logits
    return float((logits["onnx"] - logits["torch"]).abs().max())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--onnx-dir", help="graphs from `ponder export --format onnx` (default: export to a temp dir)")
    ap.add_argument("--batch-sizes", type=csv_of(int), default="1,8")
    ap.add_argument("--budgets", type=csv_of(float), default="1.0,0.5")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per cell, each running both backends")
    ap.add_argument("--prompt-file", default=HELDOUT_TEXT)
    ap.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's)")
    ap.add_argument("--out", default="results/onnx-bench.json")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    batches, budgets = args.batch_sizes, args.budgets
    ckpt = load_checkpoint(args.model)
    onnx_dir = args.onnx_dir or export_onnx(ckpt, tempfile.mkdtemp(prefix="ponder-onnx-"))
    config = dict(max_num_seqs=max(batches), max_num_batched_tokens=max(1024, max(batches) * args.prompt_len))
    engines = {"torch": LLMEngine(ckpt, EngineConfig(**config)),
               "onnx": LLMEngine(ckpt, EngineConfig(**config, backend="onnx", onnx_dir=str(onnx_dir)))}
    prompts = make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, max(batches), args.prompt_len, args.prompt_file)
    half_price = ckpt.calibration.price_for_budget(0.5)
    diffs = {"full_depth": max_logit_diff(engines, prompts[0], None),
             "budget_0.5_price": max_logit_diff(engines, prompts[0], half_price)}
    print(f"max |onnx - torch| logits over a {args.prompt_len}-token prompt: full depth {diffs['full_depth']:.2e}, "
          f"price {half_price:.3f} (budget 0.5) {diffs['budget_0.5_price']:.2e}")
    for engine in engines.values():
        run_engine(engine, prompts[:1], 4, ComputeParams(compute_budget=1.0))  # warm-up
    rows = []
    print(f"{'batch':>5} {'budget':>6} {'torch tok/s':>12} {'onnx tok/s':>11} {'ratio':>6} {'depth':>6} {'same tokens':>12}")
    for batch in batches:
        for budget in budgets:
            compute = ComputeParams(compute_budget=budget)
            rounds = run_rounds(list(engines), args.repeats,
                                lambda name: run_engine(engines[name], prompts[:batch], args.max_tokens, compute))
            cells = {name: [r[name] for r in rounds] for name in engines}
            same = cells["torch"][0].tokens == cells["onnx"][0].tokens
            tps = {name: statistics.median(c.decode_tokens_per_s for c in cs) for name, cs in cells.items()}
            itl = {name: [t for c in cs for t in c.itl] for name, cs in cells.items()}
            row = {"batch": batch, "budget": budget, "torch_tok_s": tps["torch"], "onnx_tok_s": tps["onnx"],
                   "ratio_onnx_over_torch": median_ratio(rounds, "onnx", "torch", lambda c: c.decode_tokens_per_s),
                   "same_tokens": same,
                   "mean_core_depth": {n: statistics.fmean(d for c in cs for d in c.depths) for n, cs in cells.items()},
                   "itl_p50_ms": {n: 1e3 * percentile(t, 0.5) for n, t in itl.items()},
                   "itl_p99_ms": {n: 1e3 * percentile(t, 0.99) for n, t in itl.items()}}
            rows.append(row)
            print(f"{batch:>5} {budget:>6.2f} {tps['torch']:>12.1f} {tps['onnx']:>11.1f} {row['ratio_onnx_over_torch']:>5.2f}x "
                  f"{row['mean_core_depth']['onnx']:>6.2f} {str(same):>12}", flush=True)
    write_results(args.out, {"model": args.model, "threads": threads, "prompts": args.prompt_file,
                             "max_logit_diff": diffs, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
