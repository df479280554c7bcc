"""`ponder bench`: decode throughput and latency of the engine at compute budgets and batch sizes.

Every cell runs the same prompts on the same engine in one process. Each round runs every budget
of a batch size, in an order rotated from round to round; a budget's speedup is its throughput over
the first budget's in the same round, and the table shows medians over rounds, so slow drifts of a
shared machine cancel out.

Two ideal speedups bound what the work actually done allows:
  - FLOPs: per-token MACs at full depth over MACs at the measured mean depth (runtime/flops.py:
    layers, attention over the context, LM head, exit tests, propagate fills). Hardware whose cost
    scales with rows reaches it.
  - weights: the weight bytes an iteration reads, from the batched block calls actually executed
    (a call reads its block once, whatever its rows). Small-batch decode that is bound by memory
    or by per-call overhead reaches only this one: rows leaving a call save little until the
    whole batch has left.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import (EngineRun, make_prompts, percentile, pyplot, round_ratios, run_engine, run_rounds,
                                save_figure, write_results)
from runtime.checkpoint import load_checkpoint
from runtime.devices import resolve_device, resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams
from runtime.flops import piece_macs, token_macs


def measure(engine: LLMEngine, prompts: list[list[int]], budget: float, max_tokens: int) -> EngineRun:
    return run_engine(engine, prompts, max_tokens, ComputeParams(compute_budget=budget))


def summarize(cfg, batch: int, budget: float, rounds: list[dict[float, EngineRun]], base_budget: float,
              context: float = 0.0) -> dict:
    """One table row: a budget's runs against the base budget's runs of the same rounds. context: the
    mean number of keys a decode token attends over, for the attention term of the FLOPs ideal."""
    runs, base_runs = [r[budget] for r in rounds], [r[base_budget] for r in rounds]
    depth = statistics.fmean(d for r in runs for d in r.depths)
    base_depth = statistics.fmean(d for r in base_runs for d in r.depths)
    itl = [t for r in runs for t in r.itl]
    m = piece_macs(cfg)
    fixed = (cfg.n_prelude + cfg.n_coda) * m["layer"] + m["head"]  # weights every iteration reads

    def per_step(rs: list[EngineRun], key: str) -> float:
        return statistics.fmean(r.decode[key] / max(r.decode["steps"], 1) for r in rs)

    def weights_read(rs: list[EngineRun]) -> float:  # block calls read a layer; fill-only calls read its K/V projection
        return fixed + per_step(rs, "calls") * m["layer"] + per_step(rs, "fills") * m["kv_proj"]

    flops_ideal = (token_macs(cfg, base_depth, exit_tests=base_budget < 1.0, context=context)
                   / token_macs(cfg, depth, exit_tests=budget < 1.0, context=context))
    weights_ideal = weights_read(base_runs) / weights_read(runs)
    round_speedups = round_ratios(rounds, budget, base_budget, lambda r: r.decode_tokens_per_s)
    speedup = statistics.median(round_speedups)
    return {
        "batch": batch, "budget": budget, "rounds": len(runs),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99),
        "mean_core_depth": depth, "core_calls_per_step": per_step(runs, "calls"),
        "speedup": speedup, "round_speedups": round_speedups, "ideal_speedup": flops_ideal, "fraction_of_ideal": speedup / flops_ideal,
        "weights_ideal_speedup": weights_ideal, "fraction_of_weights_ideal": speedup / weights_ideal,
    }


@torch.inference_mode()
def block_call_ms(ckpt, rows: list[int], context: int = 64, repeats: int = 20) -> dict[int, float]:
    """Milliseconds of one core block call on `rows` decode rows over `context` given keys, through the
    block's reference path (K/V projection, then attention and MLP; no paged gather): roughly what a
    step costs at each row count. Each repeat calls every pool block once, so weights stream from
    memory as they do in decode; the figure is the median repeat over the pool size. A flat curve
    means rows leaving a call save little (memory- or overhead-bound); a steep one means they pay."""
    cfg, pool = ckpt.config, ckpt.model.pool
    p = next(ckpt.model.parameters())
    out = {}
    for n in rows:
        x = torch.randn(n, 1, cfg.d_model, device=p.device, dtype=p.dtype)
        k, v = (torch.randn(n, cfg.n_kv_heads, context, cfg.head_dim, device=p.device, dtype=p.dtype) for _ in range(2))
        cos, sin = (t[:, None, None] for t in ckpt.model.rope(torch.full((n,), context - 1, device=p.device)))
        mask = torch.ones(n, 1, 1, context, dtype=torch.bool, device=p.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for block in pool:
                block.kv(x, cos, sin)
                block.forward_with_kv(x, k, v, cos, sin, mask)
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / len(pool))
        out[n] = 1e3 * statistics.median(times)
    return out


def run_bench(model: str, batches: list[int], budgets: list[float], prompt_len: int, max_tokens: int,
              device: str, dtype: str, out: str | None, prompt_file: str | None = None, rounds: int = 3) -> list[dict]:
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(model, device=dev, dtype=resolve_dtype(dtype, dev))
    cfg = ckpt.config
    if prompt_len + max_tokens > cfg.max_seq_len:
        raise ValueError(f"--prompt-len + --max-tokens = {prompt_len + max_tokens} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(2048, max(batches) * prompt_len)))
    rows = []
    prompts_all = make_prompts(ckpt.tokenizer, cfg.vocab_size, max(batches), prompt_len, prompt_file)
    measure(engine, prompts_all[:1], 1.0, 4)  # warm-up
    source = prompt_file or "random token ids"
    call_ms = block_call_ms(ckpt, sorted({1, *batches}))
    print("one core block call (reference path: K/V projection, attention over 64 keys, MLP) by rows: "
          + ", ".join(f"{n}: {ms:.3f} ms" for n, ms in call_ms.items()))
    print(f"model {model} on {dev} ({dtype}, {torch.get_num_threads()} threads); prompts of {prompt_len} tokens from "
          f"{source}, {max_tokens} new tokens each; medians of {rounds} rounds, speedups over budget {budgets[0]}")
    print(f"{'batch':>5} {'budget':>6} {'tok/s':>9} {'ITL p50':>9} {'ITL p99':>9} {'depth':>6} {'calls':>6} "
          f"{'speedup':>8} {'(rounds)':>11} {'FLOPs ideal':>12} {'weights ideal':>14}")
    for batch in batches:
        prompts = prompts_all[:batch]
        results = run_rounds(budgets, rounds, lambda b: measure(engine, prompts, b, max_tokens), f"batch {batch}")
        for budget in budgets:
            row = summarize(cfg, batch, budget, results, budgets[0], context=prompt_len + max_tokens / 2)
            rows.append(row)
            print(f"{batch:>5} {budget:>6.2f} {row['decode_tokens_per_s']:>9.1f} {row['itl_p50_ms']:>7.1f}ms "
                  f"{row['itl_p99_ms']:>7.1f}ms {row['mean_core_depth']:>6.2f} {row['core_calls_per_step']:>6.2f} "
                  f"{row['speedup']:>7.2f}x {min(row['round_speedups']):>5.2f}-{max(row['round_speedups']):.2f} "
                  f"{row['ideal_speedup']:>6.2f}x {row['fraction_of_ideal']:>4.0%} "
                  f"{row['weights_ideal_speedup']:>7.2f}x {row['fraction_of_weights_ideal']:>5.0%}", flush=True)
    if out:
        result = {"model": model, "device": str(dev), "dtype": dtype, "prompts": source, "threads": torch.get_num_threads(),
                  "rounds": rounds, "block_call_ms": call_ms, "rows": rows}
        write_results(out, result, lambda path: plot(rows, path, f"{Path(model).name} on {dev} ({dtype})"))
    return rows


def plot(rows: list[dict], path: Path, title: str, x: str = "budget", xlabel: str = "compute budget") -> None:
    """Achieved speedup against both ideals over `x` (a row key), one panel per batch size. Budgets
    run from full depth down; contexts on a log2 axis."""
    plt = pyplot()
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        cells = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r[x])
        xs = [r[x] for r in cells]
        ax.plot(xs, [r["speedup"] for r in cells], "o-", label="achieved")
        ax.plot(xs, [r["ideal_speedup"] for r in cells], "--", label="ideal (FLOPs)")
        ax.plot(xs, [r["weights_ideal_speedup"] for r in cells], ":", label="ideal (weight reads)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel(xlabel)
        if x == "budget":
            ax.invert_xaxis()
        else:
            ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel("decode speedup over full depth")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
