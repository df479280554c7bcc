"""HTTP overhead: output throughput through `ponder serve` against direct engine calls, in one run.

    python -m server.overhead_bench [--model checkpoints/austen-small] [--num-prompts 16] [--max-tokens 64]

The same token-id prompts, max_tokens, greedy sampling and ignore_eos go to three variants:
`direct` (LLM.generate in this process), `http` (all requests at once to /v1/completions) and
`http-stream` (the same, streamed as SSE). The server is a real `ponder serve` subprocess with the
same engine settings. Variants are interleaved round by round (rotating their order), since the CPU
is shared; each HTTP variant's figure is its throughput over the direct throughput of the same round.
Writes results/http-overhead.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from runtime.checkpoint import DEFAULT_MODEL

VARIANTS = ["direct", "http", "http-stream"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--num-prompts", type=int, default=16, help="requests per run, all sent at once")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every variant once")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, in this process and the server (1: a shared CPU does not stall a thread team)")
    p.add_argument("--out", default="results/http-overhead.json")
    args = p.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "max_tokens", "rounds", "max_num_seqs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_prompts(tokenizer, num: int, length: int) -> list[list[int]]:
    """`num` prompts of exactly `length` tokens, cut from the Austen corpus the model was trained on."""
    text = (Path(__file__).resolve().parents[1] / "training/data/austen/persuasion.txt").read_text()
    ids = tokenizer.encode(text[:200_000]).ids
    step = max(length, (len(ids) - length) // num)
    prompts = [ids[i * step: i * step + length] for i in range(num)]
    if any(len(p) < length for p in prompts):
        raise ValueError(f"the corpus is too short for {num} prompts of {length} tokens")
    return prompts


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ponder.cli", "serve", "--model", args.model, "--port", str(port), "--device", "cpu",
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"ponder serve did not start: {proc.stdout.read().decode()[-2000:]}")


def run_direct(llm, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from runtime.engine.params import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    done = llm.generate(prompts, sampling, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(c.outputs[0].token_ids) for c in done), wall


async def run_http(base: str, prompts: list[list[int]], max_tokens: int, stream: bool) -> tuple[int, float]:
    from loadtests.client import Client
    from loadtests.workload import Prompt

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
    import torch

    from runtime.engine.llm import LLM

    torch.set_num_threads(args.threads)

    llm = LLM(args.model, device="cpu", max_num_seqs=args.max_num_seqs)
    prompts = make_prompts(llm.tokenizer, args.num_prompts, args.prompt_len)
    proc, base = start_server(args)
    expected = args.num_prompts * args.max_tokens

    def once(variant: str) -> tuple[int, float]:
        if variant == "direct":
            tokens, wall = run_direct(llm, prompts, args.max_tokens)
        else:
            tokens, wall = asyncio.run(run_http(base, prompts, args.max_tokens, variant == "http-stream"))
        if tokens != expected:
            raise RuntimeError(f"{variant}: {tokens} output tokens, expected {expected}")
        return tokens, wall

    rounds = []
    try:
        for v in VARIANTS:  # warm-up: first-call costs (allocation, connection setup) are not overhead
            once(v)
        for r in tqdm(range(args.rounds), desc="rounds"):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # rotate, so no variant always runs first
            walls = {v: once(v)[1] for v in order}
            rounds.append({"order": order, "wall_s": walls,
                           "tok_s": {v: expected / w for v, w in walls.items()},
                           "ratio": {v: walls["direct"] / walls[v] for v in VARIANTS[1:]}})
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    summary = {v: {"median_ratio": statistics.median(r["ratio"][v] for r in rounds),
                   "min_ratio": min(r["ratio"][v] for r in rounds),
                   "max_ratio": max(r["ratio"][v] for r in rounds)} for v in VARIANTS[1:]}
    print(f"\n{args.num_prompts} prompts x {args.prompt_len} tokens, max_tokens={args.max_tokens}, greedy, ignore_eos, "
          f"{args.model}, {args.threads} torch thread(s)")
    print(f"{'round':>5} " + " ".join(f"{v + ' tok/s':>17}" for v in VARIANTS) + " " +
          " ".join(f"{v + ' ratio':>17}" for v in VARIANTS[1:]))
    for i, r in enumerate(rounds):
        print(f"{i:>5} " + " ".join(f"{r['tok_s'][v]:>17.1f}" for v in VARIANTS) + " " +
              " ".join(f"{r['ratio'][v]:>17.3f}" for v in VARIANTS[1:]))
    for v, s in summary.items():
        print(f"{v}: throughput / direct = {s['median_ratio']:.3f} (median of {len(rounds)} rounds; "
              f"range {s['min_ratio']:.3f}-{s['max_ratio']:.3f}); goal >= 0.9")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "threads": args.threads,
              "rounds": rounds, "summary": summary}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rounds, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        ax.bar([i + k * width for i in range(len(rounds))], [r["tok_s"][v] for r in rounds], width, label=v)
    ax.set_xticks([i + width for i in range(len(rounds))], [f"round {i}" for i in range(len(rounds))])
    ax.set_ylabel("output tokens / s")
    ax.set_title("HTTP overhead: server vs direct engine (same workload)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
