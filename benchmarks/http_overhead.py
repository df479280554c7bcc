"""HTTP overhead: output throughput through `ponder serve` against direct engine calls, in one run.

    python -m benchmarks.http_overhead [--model checkpoints/austen-small] [--num-prompts 16] [--max-tokens 64]

The same token-id prompts, max_tokens, greedy sampling and ignore_eos go to three variants:
`direct` (LLM.generate in this process), `http` (all requests at once to /v1/completions) and
`http-stream` (the same, streamed as SSE). The server is a real `ponder serve` subprocess with the
same engine settings. Variants are interleaved round by round (rotating their order), since the CPU
is shared; each HTTP variant's figure is its throughput over the direct throughput of the same round.
Prompts are windows of the held-out Austen novel. Writes results/http-overhead.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import (HELDOUT_TEXT, make_prompts, pyplot, round_ratios, run_rounds, save_figure, set_threads,
                                write_results)
from benchmarks.soak import start_server_with
from loadtests.client import Client
from loadtests.workload import Prompt
from runtime.checkpoint import DEFAULT_MODEL
from runtime.engine.llm import LLM
from runtime.engine.params import SamplingParams

VARIANTS = ["direct", "http", "http-stream"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--num-prompts", type=int, default=16, help="requests per run, all sent at once")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every variant once")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto, in this process and the server")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, in this process and the server (1: a shared CPU does not stall a thread team)")
    p.add_argument("--out", default="results/http-overhead.json")
    args = p.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "max_tokens", "rounds", "max_num_seqs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    return start_server_with(args.model, args.threads, "--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype)


def run_direct(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    done = llm.generate(prompts, sampling, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(c.outputs[0].token_ids) for c in done), wall


async def run_http(base: str, prompts: list[list[int]], max_tokens: int, stream: bool) -> tuple[int, float]:
    client = Client(base, model=None)
    try:
        await client.resolve_model()
        extra = {"temperature": 0.0, "ignore_eos": True}
        start = time.perf_counter()
        records = await asyncio.gather(*(client.send(Prompt(token_ids=p), max_tokens, stream, extra) for p in prompts))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0]}")
    return sum(r.output_tokens for r in records), wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    llm = LLM(args.model, device="cpu", dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    prompts = make_prompts(llm.tokenizer, llm.engine.ckpt.config.vocab_size, args.num_prompts, args.prompt_len,
                           HELDOUT_TEXT)
    proc, base = start_server(args)
    expected = args.num_prompts * args.max_tokens

    def once(variant: str) -> float:
        if variant == "direct":
            tokens, wall = run_direct(llm, prompts, args.max_tokens)
        else:
            tokens, wall = asyncio.run(run_http(base, prompts, args.max_tokens, variant == "http-stream"))
        if tokens != expected:
            raise RuntimeError(f"{variant}: {tokens} output tokens, expected {expected}")
        return wall

    try:
        for v in VARIANTS:  # warm-up: first-call costs (allocation, connection setup) are not overhead
            once(v)
        walls = run_rounds(VARIANTS, args.rounds, once, "http overhead")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # Every variant yields the same tokens, so direct's wall over a variant's is its throughput over direct's.
    ratios = {v: round_ratios(walls, "direct", v, lambda wall: wall) for v in VARIANTS[1:]}
    rounds = [{"order": list(w), "wall_s": w, "tok_s": {v: expected / t for v, t in w.items()},
               "ratio": {v: ratios[v][i] for v in VARIANTS[1:]}} for i, w in enumerate(walls)]
    summary = {v: {"median_ratio": statistics.median(rs), "min_ratio": min(rs), "max_ratio": max(rs)}
               for v, rs in ratios.items()}
    print(f"\n{args.num_prompts} prompts x {args.prompt_len} tokens, max_tokens={args.max_tokens}, greedy, ignore_eos, "
          f"{args.model}, {threads} torch thread(s)")
    print(f"{'round':>5} " + " ".join(f"{v + ' tok/s':>17}" for v in VARIANTS) + " " +
          " ".join(f"{v + ' ratio':>17}" for v in VARIANTS[1:]))
    for i, r in enumerate(rounds):
        print(f"{i:>5} " + " ".join(f"{r['tok_s'][v]:>17.1f}" for v in VARIANTS) + " " +
              " ".join(f"{r['ratio'][v]:>17.3f}" for v in VARIANTS[1:]))
    for v, s in summary.items():
        print(f"{v}: throughput / direct = {s['median_ratio']:.3f} (median of {len(rounds)} rounds; "
              f"range {s['min_ratio']:.3f}-{s['max_ratio']:.3f}); goal >= 0.95")

    result = {"model": args.model, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "threads": args.threads,
              "rounds": rounds, "summary": summary}
    write_results(args.out, result, lambda path: plot(rounds, path))
    return 0


def plot(rounds: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    width = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        ax.bar([i + k * width for i in range(len(rounds))], [r["tok_s"][v] for r in rounds], width, label=v)
    ax.set_xticks([i + width for i in range(len(rounds))], [f"round {i}" for i in range(len(rounds))])
    ax.set_ylabel("output tokens / s")
    ax.set_title("HTTP overhead: server vs direct engine (same workload)")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
