"""`ponder bench`: decode throughput and latency of the engine at compute budgets and batch sizes.

Every cell runs the same prompts on the same engine in one process, so the speedup over
budget 1.0 is a ratio measured in one run. The ideal speedup is what the work actually done
implies: per-token MACs at full depth over MACs at the measured mean depth (runtime/flops.py:
layers, LM head, exit tests, propagate fills), so a large vocabulary's head is not ignored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.devices import resolve_device, resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.flops import token_macs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_cell(engine: LLMEngine, prompts: list[list[int]], budget: float, max_tokens: int) -> dict:
    cfg = engine.ckpt.config
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{budget}-{i}", p, sampling, ComputeParams(compute_budget=budget))
    last_token_time: dict[str, float] = {}
    itl: list[float] = []
    depths: list[int] = []
    decode_tokens, decode_time = 0, 0.0
    while engine.has_unfinished():
        all_decode = all(r.num_computed_tokens >= r.num_tokens - 1 for r in engine.scheduler.running) and not engine.scheduler.waiting
        start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if all_decode:
            decode_tokens += sum(len(o.new_token_ids) for o in outs)
            decode_time += now - start
        for o in outs:
            if o.new_token_ids:
                if o.request_id in last_token_time:
                    itl.append(now - last_token_time[o.request_id])
                last_token_time[o.request_id] = now
                depths += o.exit_depths
    mean_depth = statistics.fmean(depths) if depths else 0.0
    return {
        "batch": len(prompts), "budget": budget, "decode_tokens_per_s": decode_tokens / max(decode_time, 1e-9),
        "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99),
        "mean_core_depth": mean_depth,
        "ideal_speedup": token_macs(cfg, cfg.max_depth, exit_tests=False) / token_macs(cfg, mean_depth, exit_tests=budget < 1.0),
    }


def make_prompts(tokenizer, vocab_size: int, count: int, prompt_len: int, prompt_file: str | None,
                 gen: torch.Generator) -> list[list[int]]:
    """`count` prompts of `prompt_len` tokens: consecutive windows of a text file, or random ids."""
    if prompt_file is None:
        return [torch.randint(4, vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(count)]
    ids = tokenizer.encode(Path(prompt_file).read_text()).ids
    if len(ids) < count * prompt_len:
        raise ValueError(f"--prompt-file {prompt_file} has {len(ids)} tokens; need {count * prompt_len}")
    return [ids[i * prompt_len : (i + 1) * prompt_len] for i in range(count)]


def run_bench(model: str, batches: list[int], budgets: list[float], prompt_len: int, max_tokens: int,
              device: str, dtype: str, out: str | None, prompt_file: str | None = None) -> list[dict]:
    dev = resolve_device(device)
    ckpt = load_checkpoint(model, device=dev, dtype=resolve_dtype(dtype, dev))
    if prompt_len + max_tokens > ckpt.config.max_seq_len:
        raise ValueError(f"--prompt-len + --max-tokens = {prompt_len + max_tokens} exceeds the model's "
                         f"max_seq_len={ckpt.config.max_seq_len}")
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(2048, max(batches) * prompt_len)))
    gen = torch.Generator().manual_seed(0)
    rows = []
    prompts_all = make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, max(batches), prompt_len, prompt_file, gen)
    bench_cell(engine, prompts_all[:1], 1.0, 4)  # warm-up
    source = prompt_file or "random token ids"
    print(f"model {model} on {dev} ({dtype}); prompts of {prompt_len} tokens from {source}, {max_tokens} new tokens each")
    print(f"{'batch':>5} {'budget':>6} {'tok/s':>9} {'ITL p50':>9} {'ITL p99':>9} {'depth':>7} {'speedup':>8} {'ideal':>7} {'ratio':>6}")
    for batch in batches:
        prompts = prompts_all[:batch]
        base = None
        for budget in budgets:
            row = bench_cell(engine, prompts, budget, max_tokens)
            base = base or row
            row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["ideal_speedup"] /= base["ideal_speedup"]
            row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
            rows.append(row)
            print(f"{batch:>5} {budget:>6.2f} {row['decode_tokens_per_s']:>9.1f} {row['itl_p50_ms']:>7.1f}ms "
                  f"{row['itl_p99_ms']:>7.1f}ms {row['mean_core_depth']:>7.2f} {row['speedup']:>7.2f}x "
                  f"{row['ideal_speedup']:>6.2f}x {row['fraction_of_ideal']:>6.0%}", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"model": model, "device": str(dev), "dtype": dtype, "prompts": source,
                                               "rows": rows}, indent=2))
        print(f"wrote {out}")
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmark engine decode speed at compute budgets and batch sizes")
    b.add_argument("--model", default=str(DEFAULT_MODEL))
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--budgets", default="1.0,0.75,0.5,0.25")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--out", default="results/bench.json")
    b.add_argument("--prompt-file", help="take prompts from this text file (default: random token ids)")
    b.add_argument("--threads", type=int)
    b.set_defaults(func=_run_from_args)


def _run_from_args(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    run_bench(a.model, [int(x) for x in a.batch_sizes.split(",")], [float(x) for x in a.budgets.split(",")],
              a.prompt_len, a.max_tokens, a.device, a.dtype, a.out, a.prompt_file)
