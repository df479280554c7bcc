"""`ponder bench`: decode throughput and latency of the engine at compute budgets and batch sizes.

Every cell runs the same prompts on the same engine in one process. Each round runs every budget
of a batch size, in an order rotated from round to round; a budget's speedup is its throughput over
the first budget's in the same round, and the table shows medians over rounds, so slow drifts of a
shared machine cancel out.

Two ideal speedups bound what the work actually done allows:
  - FLOPs: per-token MACs at full depth over MACs at the measured mean depth (runtime/flops.py:
    layers, LM head, exit tests, propagate fills). Hardware whose cost scales with rows reaches it.
  - weights: the weight bytes an iteration reads, from the batched block calls actually executed
    (a call reads its block once, whatever its rows). Small-batch decode that is bound by memory
    or by per-call overhead reaches only this one: rows leaving a call save little until the
    whole batch has left.
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
from runtime.flops import piece_macs, token_macs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(engine: LLMEngine, prompts: list[list[int]], budget: float, max_tokens: int) -> dict:
    """One run of the prompts at a budget: decode throughput, inter-token latencies, exit depths,
    and the batched core calls per decode iteration."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{budget}-{i}-{time.monotonic_ns()}", p, sampling, ComputeParams(compute_budget=budget))
    last_token_time: dict[str, float] = {}
    itl: list[float] = []
    depths: list[int] = []
    decode_tokens, decode_time, decode_steps, decode_calls, decode_fills = 0, 0.0, 0, 0, 0
    while engine.has_unfinished():
        all_decode = all(r.num_computed_tokens >= r.num_tokens - 1 for r in engine.scheduler.running) and not engine.scheduler.waiting
        calls, fills = engine.executor.num_batched_calls, engine.executor.num_fill_calls
        start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if all_decode:
            decode_tokens += sum(len(o.new_token_ids) for o in outs)
            decode_time += now - start
            decode_steps += 1
            decode_calls += engine.executor.num_batched_calls - calls
            decode_fills += engine.executor.num_fill_calls - fills
        for o in outs:
            if o.new_token_ids:
                if o.request_id in last_token_time:
                    itl.append(now - last_token_time[o.request_id])
                last_token_time[o.request_id] = now
                depths += o.exit_depths
    return {"tokens_per_s": decode_tokens / max(decode_time, 1e-9), "itl": itl, "depths": depths,
            "calls_per_step": decode_calls / max(decode_steps, 1), "fills_per_step": decode_fills / max(decode_steps, 1)}


def summarize(cfg, batch: int, budget: float, runs: list[dict], base_budget: float, base_runs: list[dict]) -> dict:
    """One table row from a budget's runs and the base budget's runs of the same rounds."""
    depth = statistics.fmean(d for r in runs for d in r["depths"])
    base_depth = statistics.fmean(d for r in base_runs for d in r["depths"])
    itl = [t for r in runs for t in r["itl"]]
    m = piece_macs(cfg)
    fixed = (cfg.n_prelude + cfg.n_coda) * m["layer"] + m["head"]  # weights every iteration reads
    def weights_read(rs: list[dict]) -> float:  # block calls read a layer; fill-only calls read its K/V projection
        return (fixed + statistics.fmean(r["calls_per_step"] for r in rs) * m["layer"]
                + statistics.fmean(r["fills_per_step"] for r in rs) * m["kv_proj"])

    calls = statistics.fmean(r["calls_per_step"] for r in runs)
    flops_ideal = (token_macs(cfg, base_depth, exit_tests=base_budget < 1.0)
                   / token_macs(cfg, depth, exit_tests=budget < 1.0))
    weights_ideal = weights_read(base_runs) / weights_read(runs)
    round_speedups = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, base_runs)]
    speedup = statistics.median(round_speedups)
    return {
        "batch": batch, "budget": budget, "rounds": len(runs),
        "decode_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99),
        "mean_core_depth": depth, "core_calls_per_step": calls,
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
    gen = torch.Generator().manual_seed(0)
    rows = []
    prompts_all = make_prompts(ckpt.tokenizer, cfg.vocab_size, max(batches), prompt_len, prompt_file, gen)
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
        runs: dict[float, list[dict]] = {b: [] for b in budgets}
        for r in range(rounds):
            for budget in budgets[r % len(budgets):] + budgets[: r % len(budgets)]:
                runs[budget].append(measure(engine, prompts, budget, max_tokens))
            print(f"  batch {batch}: round {r + 1}/{rounds} done", flush=True)
        for budget in budgets:
            row = summarize(cfg, batch, budget, runs[budget], budgets[0], runs[budgets[0]])
            rows.append(row)
            print(f"{batch:>5} {budget:>6.2f} {row['decode_tokens_per_s']:>9.1f} {row['itl_p50_ms']:>7.1f}ms "
                  f"{row['itl_p99_ms']:>7.1f}ms {row['mean_core_depth']:>6.2f} {row['core_calls_per_step']:>6.2f} "
                  f"{row['speedup']:>7.2f}x {min(row['round_speedups']):>5.2f}-{max(row['round_speedups']):.2f} "
                  f"{row['ideal_speedup']:>6.2f}x {row['fraction_of_ideal']:>4.0%} "
                  f"{row['weights_ideal_speedup']:>7.2f}x {row['fraction_of_weights_ideal']:>5.0%}", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"model": model, "device": str(dev), "dtype": dtype, "prompts": source,
                                         "threads": torch.get_num_threads(), "rounds": rounds,
                                         "block_call_ms": call_ms, "rows": rows}, indent=2))
        plot(rows, Path(out).with_suffix(".png"), f"{Path(model).name} on {dev} ({dtype})")
        print(f"wrote {out} and {Path(out).with_suffix('.png')}")
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Achieved speedup against both ideals, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.4), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        cells = [r for r in rows if r["batch"] == batch]
        budgets = [r["budget"] for r in cells]
        ax.plot(budgets, [r["speedup"] for r in cells], "o-", label="achieved")
        ax.plot(budgets, [r["ideal_speedup"] for r in cells], "--", label="ideal (FLOPs)")
        ax.plot(budgets, [r["weights_ideal_speedup"] for r in cells], ":", label="ideal (weight reads)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("compute budget")
        ax.invert_xaxis()
    axes[0][0].set_ylabel("decode speedup over full depth")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    b.add_argument("--threads", type=int, help="torch threads (use 1 on a shared machine)")
    b.add_argument("--rounds", type=int, default=3, help="rounds per batch size; the table shows medians")
    b.set_defaults(func=_run_from_args)


def _run_from_args(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    run_bench(a.model, [int(x) for x in a.batch_sizes.split(",")], [float(x) for x in a.budgets.split(",")],
              a.prompt_len, a.max_tokens, a.device, a.dtype, a.out, a.prompt_file, a.rounds)
