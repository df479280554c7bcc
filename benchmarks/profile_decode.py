"""Where a full-depth engine step's time goes, against ceilings measured on this CPU.

    python -m benchmarks.profile_decode [--model DIR | --source smollm2-135m] [--batches 1,16] [--threads 2]

Ceilings (this process, the same threads):
  - memory read bandwidth: a sum over a tensor far larger than the last-level cache;
  - the model's own linears: every weight one decode step multiplies (all layers, the LM head)
    run back to back as F.linear on M = 1, 16 and 1024 rows: the time no forward built on these
    kernels can beat, and its GFLOP/s.
The model's work: the weight bytes one decode step must read (each linear weight once, the
embedding rows aside) and the FLOPs of one prefill of --prefill-len tokens (linears, causal
attention, the LM head of the last token; the engine runs a whole prompt from position 0 as
causal SDPA, whose kernel skips the masked half, so that is also the attention as run).
Measured on the engine (LLMEngine, greedy, ignore_eos, full depth): ms per decode step at each
batch with --context tokens of context, the part of it in Executor.run (the forward), ops per
step (torch.profiler: every ATen and oneDNN op event, and those called from Python; the native
kernels' ctypes calls, five a layer, are no profiler events and are not counted), the ops that
take the most self time; and one --prefill-len prefill. With several --kernels (runtime/layers.py:
aten, onednn, auto) every variant runs in each round, in rotated order, and the ratios of their
times are medians of per-round ratios; `--fuse-linears on,off` adds the unfused q/k/v and gate/up
(EngineConfig.fuse_linears) as variants. JSON: results/profile-decode.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import csv_of, make_prompts, round_ratios, run_rounds, set_threads, write_results
from runtime.attention import attention_kernel_choices
from runtime.checkpoint import load_checkpoint
from runtime.devices import resolve_dtype
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.layers import PACK_ROWS, LINEAR_KERNELS, linear_kernel_choices, onednn_candidate, set_linear_kernel
from runtime.model import PonderModel


def cpu_flags() -> list[str]:
    """The CPU's feature flags that matter to kernel choice (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")
    return [f for f in line.split(":")[-1].split() if f in wanted]


def timed(fn, repeats: int, warmup: int = 2, best: bool = False) -> float:
    """Median (or, for a ceiling, the best) seconds of fn() over `repeats` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def read_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """GB/s of a sum over `gib` GiB of fp32 (read once per call), best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / timed(lambda: x.sum(), repeats, best=True) / 1e9


def decode_weights(model: PonderModel) -> list[torch.Tensor]:
    """Every weight matrix one full-depth decode step multiplies, in order (norms aside: tiny)."""
    mats = []
    for block in [*model.prelude, *model.pool, *model.coda]:
        mats += [m.weight for m in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo,
                                    block.mlp.w_gate, block.mlp.w_up, block.mlp.w_down)]
    return mats + [model.head.weight]


def linear_ceiling(mats: list[torch.Tensor], rows: int, repeats: int, kernel: str = "aten") -> dict:
    """Every matrix on `rows` rows with one kernel (aten: F.linear; onednn: prepacked), best of
    `repeats`: ms, GFLOP/s, and GB/s of weights streamed."""
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in mats}
    if kernel == "onednn":
        packed = [(torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS), w.shape[1]) for w in mats]

        def run():
            for p, k in packed:
                torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")
    else:
        def run():
            for w in mats:
                F.linear(xs[w.shape[1]], w)

    seconds = timed(run, repeats, best=True)
    flops = 2 * rows * sum(w.numel() for w in mats)
    return {"kernel": kernel, "rows": rows, "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
            "weight_gb_s": sum(w.numel() * w.element_size() for w in mats) / seconds / 1e9}


def prefill_flops(model: PonderModel, T: int) -> dict:
    """FLOPs of one T-token prefill at full depth (logits of the last token only)."""
    cfg = model.cfg
    layers = cfg.n_prelude + cfg.max_depth + cfg.n_coda
    linear = 2 * T * sum(w.numel() for w in decode_weights(model)[:-1])
    head = 2 * cfg.d_model * cfg.vocab_size
    per_key = 2 * 2 * cfg.n_heads * cfg.head_dim  # q.k and p.v, 2 FLOPs a MAC
    causal = layers * per_key * T * (T + 1) // 2
    as_run = causal  # Executor._attend_per_sequence: plain causal SDPA over exactly the prompt
    return {"tokens": T, "linear": linear, "head": head, "attention_causal": causal, "attention_as_run": as_run,
            "total_causal": linear + head + causal, "total_as_run": linear + head + as_run}


OP_PREFIXES = ("aten::", "mkldnn::")  # dispatcher ops: ATen's and the oneDNN linears'


def count_ops(events) -> tuple[int, int, Counter]:
    """(every op event, those with no op ancestor (called from Python), self CPU us per op name)."""
    total = top = 0
    self_us: Counter = Counter()
    for e in events:
        if not e.name.startswith(OP_PREFIXES):
            continue
        total += 1
        self_us[e.name] += e.self_cpu_time_total
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(OP_PREFIXES):
            parent = parent.cpu_parent
        top += parent is None
    return total, top, self_us


def decode_profile(engine: LLMEngine, prompts: list[list[int]], steps: int, profile_steps: int) -> dict:
    """Prefill `prompts`, then time `steps` decode steps one by one, then profile `profile_steps`."""
    tag = time.monotonic_ns()
    sampling = SamplingParams(max_tokens=4 + steps + profile_steps + 2, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"prof-{tag}-{i}", p, sampling, ComputeParams(compute_budget=1.0))
    started: set[str] = set()
    while len(started) < len(prompts):  # prefill (maybe several steps), then one decode step to settle
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    engine.step()
    forward: list[float] = []
    run = engine.executor.run

    def timed_run(*a, **k):
        t0 = time.perf_counter()
        out = run(*a, **k)
        forward.append(time.perf_counter() - t0)
        return out

    engine.executor.run = timed_run  # an instance attribute: this engine only
    step_s = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            outs = engine.step()
            step_s.append(time.perf_counter() - t0)
            assert sum(len(o.new_token_ids) for o in outs) == len(prompts), "a decode step that is not the whole batch"
    finally:
        del engine.executor.run
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            engine.step()
    total, top, self_us = count_ops(prof.events())
    while engine.has_unfinished():
        engine.step()
    all_us = sum(self_us.values())
    return {
        "batch": len(prompts), "context": len(prompts[0]), "steps": steps,
        "ms_per_step": statistics.median(step_s) * 1e3, "ms_per_step_min": min(step_s) * 1e3,
        "forward_ms_per_step": statistics.median(forward) * 1e3,
        "ops_per_step": total / profile_steps, "ops_from_python_per_step": top / profile_steps,
        "top_ops": [{"op": name, "self_ms_per_step": us / 1e3 / profile_steps, "share": us / max(all_us, 1)}
                    for name, us in self_us.most_common(8)],
    }


def prefill_time(engine: LLMEngine, prompt: list[int], repeats: int) -> float:
    def once():
        tag = time.monotonic_ns()
        engine.add_request(f"prefill-{tag}", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()

    return timed(once, repeats, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Ponder checkpoint directory (default: the import of --source)")
    p.add_argument("--source", default="smollm2-135m", help="as in benchmarks.peer_serve: the weights both peers serve")
    p.add_argument("--batches", type=csv_of(int), default="1,16")
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each sequence before decoding")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per batch")
    p.add_argument("--profile-steps", type=int, default=4, help="decode steps under torch.profiler per batch")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="repeats of each ceiling and of the prefill")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", help="auto | float32 | bfloat16 (runtime/devices.py)")
    p.add_argument("--kernels", type=csv_of(str), default="auto",
                   help="CPU linear kernels to compare in this run (runtime/layers.py): auto, aten, onednn")
    p.add_argument("--fuse-linears", type=csv_of(str), default="on",
                   help="on, off or on,off: q/k/v and gate/up as one GEMM each (EngineConfig.fuse_linears); "
                        "each setting gets its own engine and copy of the weights")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the variants, in rotated order")
    p.add_argument("--out", default="results/profile-decode.json")
    args = p.parse_args(argv)
    bad = [k for k in args.kernels if k not in LINEAR_KERNELS]
    if bad or not args.kernels:
        p.error(f"--kernels {','.join(args.kernels)}: name some of {', '.join(LINEAR_KERNELS)}")
    if not args.fuse_linears or any(f not in ("on", "off") for f in args.fuse_linears):
        p.error(f"--fuse-linears {','.join(args.fuse_linears)}: on, off or both")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    label = args.model or f"{args.source} (Ponder's import)"
    if args.model is None:
        from benchmarks.peer_serve import prepare_weights

        args.model = str(prepare_weights(args.source)[1])
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    engines = {fuse: LLMEngine(load_checkpoint(args.model, dtype=dtype), EngineConfig(
        max_num_seqs=max(args.batches), block_size=16, max_num_batched_tokens=max(args.prefill_len, max(args.batches) * args.context),
        max_model_len=max(args.prefill_len, args.context + 64) + 16, fuse_linears=fuse == "on")) for fuse in args.fuse_linears}
    model = next(iter(engines.values())).ckpt.model
    cfg = model.cfg
    mats = decode_weights(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in mats)
    ceiling_kernels = ["aten"] + (["onednn"] if onednn_candidate(mats[0].dtype) else [])
    result = {
        "model": label, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(),
        "dtype": str(next(model.parameters()).dtype),
        "decode_weight_bytes": weight_bytes,
        "prefill_flops": prefill_flops(model, args.prefill_len),
        "read_bandwidth_gb_s": read_bandwidth(),
        "linear_ceilings": [linear_ceiling(mats, rows, args.repeats, k) for k in ceiling_kernels
                            for rows in (1, 16, args.prefill_len)],
    }
    prompts = make_prompts(None, cfg.vocab_size, max(args.batches) + 1, max(args.context, args.prefill_len))

    variants = {(f"{k}/{'fused' if f == 'on' else 'unfused'}" if len(args.fuse_linears) > 1 else k): (k, f)
                for f in args.fuse_linears for k in args.kernels}

    def once(variant: str) -> dict:
        kernel, fuse = variants[variant]
        set_linear_kernel(kernel)
        engine = engines[fuse]
        decode = [decode_profile(engine, [p[:args.context] for p in prompts[:b]], args.steps, args.profile_steps)
                  for b in args.batches]
        prefill = prefill_time(engine, prompts[-1][:args.prefill_len], max(2, args.repeats // 2))
        return {"decode": decode, "prefill_s": prefill}

    rounds = run_rounds(list(variants), args.rounds, once, "profile" if args.rounds > 1 else None)
    result["kernel_choices"] = linear_kernel_choices()
    result["attention_choices"] = attention_kernel_choices()
    result["rounds"] = [{"order": list(r), **r} for r in rounds]
    result |= combine(rounds, list(variants), args.batches)
    report(result)
    write_results(args.out, result)
    return result


def combine(rounds: list[dict[str, dict]], kernels: list[str], batches: list[int]) -> dict:
    """Each variant's medians over rounds, and every other variant's speedup over the first as the
    median of per-round time ratios."""
    def median_of(k: str, i: int, key: str) -> float:
        return statistics.median(r[k]["decode"][i][key] for r in rounds)

    variants = {k: {"decode": [{**d, "ms_per_step": median_of(k, i, "ms_per_step"),
                                "forward_ms_per_step": median_of(k, i, "forward_ms_per_step")}
                               for i, d in enumerate(rounds[0][k]["decode"])],
                    "prefill_s": statistics.median(r[k]["prefill_s"] for r in rounds)} for k in kernels}
    base, ratios = kernels[0], {}
    for k in kernels[1:]:
        ratios[k] = {f"decode_batch_{b}": statistics.median(round_ratios(
            rounds, base, k, lambda v, i=i: v["decode"][i]["ms_per_step"])) for i, b in enumerate(batches)}
        ratios[k]["prefill"] = statistics.median(round_ratios(rounds, base, k, lambda v: v["prefill_s"]))
    return {"variants": variants, f"ratios_vs_{base}": ratios}


def report(r: dict) -> None:
    bw = r["read_bandwidth_gb_s"]
    print(f"{r['model']}: {r['dtype']}, {r['threads']} thread(s), torch {r['torch']} ({r['cpu_capability']}; "
          f"flags {' '.join(r['cpu_flags'])})")
    print(f"memory read bandwidth {bw:.1f} GB/s; one decode step reads {r['decode_weight_bytes'] / 1e6:.0f} MB of "
          f"weights -> {r['decode_weight_bytes'] / bw / 1e6:.1f} ms at that bandwidth")
    best: dict[int, dict] = {}
    for c in r["linear_ceilings"]:
        print(f"  the model's linears, {c['kernel']:>6}, on {c['rows']:>4} rows: {c['ms']:8.2f} ms  "
              f"{c['gflops']:7.1f} GFLOP/s  {c['weight_gb_s']:5.1f} GB/s of weights")
        if c["rows"] not in best or c["ms"] < best[c["rows"]]["ms"]:
            best[c["rows"]] = c
    f = r["prefill_flops"]
    for kernel, v in r["variants"].items():
        print(f"variant {kernel}:")
        for d in v["decode"]:
            floor = best.get(d["batch"], best[16] if d["batch"] > 1 else best[1])
            print(f"  decode batch {d['batch']:>2} (context {d['context']}): {d['ms_per_step']:.1f} ms/step "
                  f"(forward {d['forward_ms_per_step']:.1f}; the best linears alone on {floor['rows']} rows "
                  f"{floor['ms']:.1f}), {d['ops_per_step']:.0f} ATen/oneDNN ops/step "
                  f"({d['ops_from_python_per_step']:.0f} from Python)")
            print("      " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in d["top_ops"][:6]))
        print(f"  prefill {f['tokens']}: {v['prefill_s'] * 1e3:.0f} ms; {f['total_causal'] / 1e9:.1f} GFLOP causal "
              f"({f['total_as_run'] / 1e9:.1f} as run) -> "
              f"{f['total_causal'] / v['prefill_s'] / 1e9:.1f} GFLOP/s useful, "
              f"against {best[f['tokens']]['gflops']:.1f} GFLOP/s of the best linears on {f['tokens']} rows")
    for k, ratios in {key.removeprefix("ratios_vs_") + " / " + v: rs for key, val in r.items()
                      if key.startswith("ratios_vs_") for v, rs in val.items()}.items():
        print(f"time {k} (median of per-round ratios): " + ", ".join(f"{n} {x:.2f}x" for n, x in ratios.items()))


if __name__ == "__main__":
    main()
