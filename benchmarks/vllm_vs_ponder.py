"""vLLM (through the Ponder plugin) against Ponder's engine: same weights, same greedy requests, one run.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        python -m benchmarks.vllm_vs_ponder [--model DIR] [--budgets 1.0,0.5]

Run it with the Python of the environment where vllm-cpu and ponder are both installed
(CONTRIBUTING.md). The checkpoint is exported once; for each budget vLLM serves it at the
calibrated exit price of that budget (full depth at 1.0), below 1.0 with and without attention
compaction (exited decode tokens skip attention: `--compact-attention on,off`), and Ponder's
engine runs the same prompts at the same fixed price. Figures: generated tokens per second over
the whole batch (prefill included), the median of --repeats runs, vLLM's speedup over its own
full depth, and whether both produced the same tokens. Ponder's engine runs in this process with
torch's threads, before vLLM starts and again after it has shut down (vLLM's idle worker polls
its queue and takes a core, so the two cannot share the time, nor rotate rounds); vLLM's worker
runs in its own process, bound by VLLM_CPU_OMP_THREADS_BIND. JSON goes to results/vllm-bench.json.
"""

from __future__ import annotations

import exporters.vllm_plugin.launch  # noqa: F401  (vllm-cpu version patch, before vllm is imported)

import argparse
import gc
import os
import statistics
import tempfile
import time

from benchmarks.harness import HELDOUT_TEXT, csv_of, make_prompts, run_engine, set_threads, write_results
from exporters.hf import export_hf
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams


def ponder_run(engine: LLMEngine, prompts: list[list[int]], price: float | None, max_tokens: int):
    """Wall seconds, tokens and mean exit depth of the prompts at a fixed price (None: full depth)."""
    compute = ComputeParams(exit_price=price) if price is not None else ComputeParams(compute_budget=1.0)
    run = run_engine(engine, prompts, max_tokens, compute)
    return run.wall_s, run.tokens, statistics.fmean(run.depths)


def vllm_run(llm, prompts: list[list[int]], max_tokens: int):
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    params = VSamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--budgets", type=csv_of(float), default="1.0,0.5")
    ap.add_argument("--compact-attention", type=csv_of(str), default="on,off",
                    help="vLLM variants below full depth: exited decode tokens skip attention (on) or not (off)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-file", default=HELDOUT_TEXT)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for Ponder's engine (on a busy 2-core machine 2 threads run ~50x slower)")
    ap.add_argument("--out", default="results/vllm-bench.json")
    args = ap.parse_args(argv)
    if budgets_bad := [b for b in args.budgets if not 0 < b <= 1]:
        ap.error(f"--budgets must be in (0, 1], got {budgets_bad}")
    if not set(args.compact_attention) <= {"on", "off"} or not args.compact_attention:
        ap.error("--compact-attention takes on, off or on,off")
    set_threads(args.threads)
    from vllm import LLM

    ckpt = load_checkpoint(args.model)
    prompts = make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, args.batch, args.prompt_len, args.prompt_file)
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(1024, args.batch * args.prompt_len)))
    hf_dir = export_hf(ckpt, tempfile.mkdtemp(prefix="ponder-hf-"))  # one export; each variant's price is an override
    rows = []
    print(f"{'budget':>6} {'price':>7} {'compact':>7} {'ponder tok/s':>13} {'vllm tok/s':>11} {'vllm/ponder':>12} "
          f"{'vllm/its 1.0':>13} {'depth':>6} {'same tokens':>12}")
    for budget in args.budgets:
        price = None if budget >= 1.0 else ckpt.calibration.price_for_budget(budget)
        ponder_run(engine, prompts[:1], price, 4)  # warm-up
        p_times = []
        for _ in range(args.repeats):
            t, p_tokens, depth = ponder_run(engine, prompts, price, args.max_tokens)
            p_times.append(t)
        v_runs = {}
        for compact in args.compact_attention if price is not None else ["on"]:
            llm = LLM(model=str(hf_dir), trust_remote_code=True, dtype="float32", enforce_eager=True,
                      max_model_len=ckpt.config.max_seq_len, max_num_seqs=args.batch, gpu_memory_utilization=0.1,
                      enable_prefix_caching=False,  # every repeat sends the same prompts; Ponder caches no prefixes
                      hf_overrides={"exit_price": price, "compact_attention": compact == "on"})
            vllm_run(llm, prompts[:1], 4)  # warm-up
            v_runs[compact] = [vllm_run(llm, prompts, args.max_tokens) for _ in range(args.repeats)]
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            time.sleep(2)
        for _ in range(args.repeats):  # Ponder again after vLLM, so drift over the run shows in both halves
            t, p_tokens_after, _ = ponder_run(engine, prompts, price, args.max_tokens)
            p_times.append(t)
        assert p_tokens_after == p_tokens
        total = len(prompts) * args.max_tokens
        ponder_tok_s = total / statistics.median(p_times)
        for compact, runs in v_runs.items():
            row = {"budget": budget, "exit_price": price, "compact_attention": compact == "on", "batch": len(prompts),
                   "prompt_len": args.prompt_len, "ponder_tok_s": ponder_tok_s,
                   "ponder_tok_s_before_after": [total / statistics.median(p_times[:args.repeats]),
                                                 total / statistics.median(p_times[args.repeats:])],
                   "vllm_tok_s": total / statistics.median(t for t, _ in runs), "ponder_mean_depth": depth,
                   "same_tokens": all(tokens == p_tokens for _, tokens in runs)}
            row["vllm_over_ponder"] = row["vllm_tok_s"] / ponder_tok_s
            full = next((r for r in rows if r["budget"] >= 1.0), None)
            row["vllm_over_its_full_depth"] = row["vllm_tok_s"] / full["vllm_tok_s"] if full else None
            rows.append(row)
            over_full = f"{row['vllm_over_its_full_depth']:.2f}x" if full else "-"
            print(f"{budget:>6.2f} {price or 0.0:>7.3f} {compact:>7} {ponder_tok_s:>13.1f} {row['vllm_tok_s']:>11.1f} "
                  f"{row['vllm_over_ponder']:>11.2f}x {over_full:>13} {depth:>6.2f} {str(row['same_tokens']):>12}",
                  flush=True)
    write_results(args.out, {"model": args.model, "prompts": args.prompt_file, "max_tokens": args.max_tokens,
                             "ponder_threads": args.threads,
                             "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
