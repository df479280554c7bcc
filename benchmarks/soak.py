"""Soak: `ponder serve` under a mixed load for a long time, sampling what would show a leak.

    python -m benchmarks.soak --duration 3600 [--rate 2] [--model checkpoints/austen-small]

It starts the server itself, so it knows both processes (the HTTP server and the engine core).
The load mixes compute budgets, prompt lengths, max_tokens, streamed and plain requests, and a few
clients that disconnect mid-stream (intended; not failures). Every `--sample-every` seconds it
records each process's RSS and open file descriptors (from /proc) and the KV cache usage. At the
end it fits a line to each series over the run's second half (after warm-up) and reports the
slope per hour with its standard error: a leak is a slope well outside its noise. Writes JSON
and a PNG (results/soak.json by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from benchmarks.harness import pyplot, save_figure, write_results
from runtime.checkpoint import DEFAULT_MODEL

WORDS = ("Anne Elliot walked along the Cobb at Lyme while Captain Wentworth spoke of the sea and the navy "
         "and of Louisa Musgrove who would jump from the steps").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--disconnect-fraction", type=float, default=0.03, help="streams the client drops mid-way")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine core")
    p.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bf16 where the CPU has it natively)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/soak.json")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 4 * 3600 or not 0 < args.rate <= 100 or args.sample_every <= 0:
        p.error("--duration must be in (0, 14400], --rate in (0, 100], --sample-every > 0")
    if not 0 <= args.disconnect_fraction < 1:
        p.error("--disconnect-fraction must be in [0, 1)")
    return args


def start_server_with(model: str, threads: int, *flags: str) -> tuple[subprocess.Popen, str]:
    """A `ponder serve` subprocess on a free loopback port, once /health answers: (process, base URL)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ponder.cli", "serve", "--model", model, "--port", str(port), "--device", "cpu",
           "--threads", str(threads), "--log-level", "warning", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"ponder serve did not start (exit code {proc.poll()})")


def proc_stats(pid: int) -> tuple[float | None, int | None]:
    """(RSS bytes, open file descriptors) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(float(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None, None


async def one_request(session: aiohttp.ClientSession, base: str, rng: random.Random, disconnect: bool) -> str:
    """Outcome: "ok", "disconnected" (intended) or an error message."""
    body = {"prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 60))), "max_tokens": rng.choice([4, 16, 48, 96]),
            "temperature": rng.choice([0.0, 0.8]), "compute_budget": rng.choice([1.0, 0.75, 0.5, 0.3]),
            "stream": disconnect or rng.random() < 0.5, "ignore_eos": True}
    chat = rng.random() < 0.3
    if chat:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    try:
        async with session.post(f"{base}/v1/{'chat/completions' if chat else 'completions'}", json=body) as r:
            if r.status != 200:
                return f"HTTP {r.status}: {(await r.text())[:200]}"
            if not body["stream"]:
                await r.json()
                return "ok"
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: ") and b'"error"' in line:
                    return f"stream error: {line[:200]!r}"
                seen += line.startswith(b"data: ")
                if disconnect and seen >= 2:
                    return "disconnected"  # leaving the block closes the connection mid-stream
            return "ok"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


def slope_per_hour(t: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope of y over t (seconds), per hour, and its standard error."""
    n = len(t)
    if n < 3:
        return math.nan, math.nan
    mt, my = statistics.fmean(t), statistics.fmean(y)
    sxx = sum((a - mt) ** 2 for a in t)
    b = sum((a - mt) * (c - my) for a, c in zip(t, y)) / sxx
    resid = [c - (my + b * (a - mt)) for a, c in zip(t, y)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx) if sxx else math.nan
    return b * 3600, se * 3600


def trends(samples: list[dict]) -> dict:
    """Slope per hour (and its standard error) of every series over the second half of the run; for
    RSS also the fitted growth over that half per request answered in it. RSS moves in whole pages and
    seldom shrinks, so a few pages the allocator keeps read as a slope "outside noise" beside a tiny
    standard error; bytes per request say what such a slope would cost: an object left behind by
    each request is at least tens of bytes a request."""
    late = samples[len(samples) // 2:]
    requests = sum(late[-1].get(k, 0) - late[0].get(k, 0) for k in ("completed", "disconnected", "failed"))
    span_h = (late[-1]["t_s"] - late[0]["t_s"]) / 3600 if late else 0.0
    out = {}
    for key in ("server_rss_mb", "core_rss_mb", "server_fds", "core_fds", "kv_cache_usage"):
        points = [(s["t_s"], s[key]) for s in late if s[key] is not None]
        slope, se = slope_per_hour([p[0] for p in points], [p[1] for p in points])
        out[key] = {"slope_per_hour": slope, "stderr_per_hour": se, "first": samples[0][key], "last": samples[-1][key],
                    "within_noise": bool(abs(slope) <= 3 * se) if not math.isnan(se) else None}
        if key.endswith("rss_mb"):
            out[key]["bytes_per_request"] = slope * span_h * 2**20 / requests if requests else None
    return out


async def run(args: argparse.Namespace, base: str, server_pid: int, core_pid: int) -> dict:
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    errors: list[str] = []
    samples: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.monotonic()

        async def sample() -> None:
            async with session.get(f"{base}/health") as r:
                health = await r.json()
            server_rss, server_fds = proc_stats(server_pid)
            core_rss, core_fds = proc_stats(core_pid)
            samples.append({"t_s": time.monotonic() - t0, "server_rss_mb": server_rss and server_rss / 2**20,
                            "core_rss_mb": core_rss and core_rss / 2**20, "server_fds": server_fds, "core_fds": core_fds,
                            "kv_cache_usage": health["kv_cache_usage"], "running": health["num_running"],
                            "completed": outcomes.get("ok", 0), "disconnected": outcomes.get("disconnected", 0),
                            "failed": len(errors)})

        async def request() -> None:
            outcome = await one_request(session, base, rng, rng.random() < args.disconnect_fraction)
            key = outcome if outcome in ("ok", "disconnected") else "failed"
            outcomes[key] = outcomes.get(key, 0) + 1
            if key == "failed":
                errors.append(outcome)

        tasks: set[asyncio.Task] = set()
        next_sample = 0.0
        next_arrival = rng.expovariate(args.rate)
        while (now := time.monotonic() - t0) < args.duration:
            if now >= next_sample:
                await sample()
                next_sample += args.sample_every
                print(f"\rsoak {now:6.0f}/{args.duration:.0f} s: {outcomes}, KV {samples[-1]['kv_cache_usage']:.2f}, "
                      f"RSS {samples[-1]['server_rss_mb']:.0f}+{samples[-1]['core_rss_mb']:.0f} MiB", end="", flush=True)
            if now >= next_arrival:
                task = asyncio.create_task(request())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_arrival += rng.expovariate(args.rate)
            await asyncio.sleep(max(0.0, min(next_arrival, next_sample) - (time.monotonic() - t0)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)  # the core frees the last requests' KV
        await sample()
    print()
    return {"outcomes": outcomes, "errors": errors[:20], "samples": samples, "trends": trends(samples),
            "kv_cache_usage_end": samples[-1]["kv_cache_usage"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc, base = start_server_with(args.model, args.threads, "--dtype", args.dtype)
    try:
        core_pid = json.load(urllib.request.urlopen(f"{base}/health"))["engine_core_pid"]
        result = asyncio.run(run(args, base, proc.pid, core_pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result |= {"model": args.model, "duration_s": args.duration, "rate": args.rate, "seed": args.seed,
               "disconnect_fraction": args.disconnect_fraction}
    print(f"outcomes: {result['outcomes']}; KV usage at the end {result['kv_cache_usage_end']}")
    for key, t in result["trends"].items():
        per_request = f", {t['bytes_per_request']:+.1f} B/request" if t.get("bytes_per_request") is not None else ""
        print(f"{key:>15}: {t['first']} -> {t['last']}, slope {t['slope_per_hour']:+.3f}/h "
              f"(stderr {t['stderr_per_hour']:.3f}; within noise: {t['within_noise']}){per_request}")
    write_results(args.out, result, lambda path: plot(result, path))
    return 0


def plot(result: dict, path: Path) -> None:
    s = result["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for key, label in (("server_rss_mb", "HTTP server"), ("core_rss_mb", "engine core")):
        axes[0].plot(t, [x[key] for x in s], label=label)
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].set_ylim(bottom=0)
    for key, label in (("server_fds", "HTTP server"), ("core_fds", "engine core")):
        axes[1].plot(t, [x[key] for x in s], label=label)
    axes[1].set_ylabel("open file descriptors")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(t, [x["kv_cache_usage"] for x in s], label="KV usage (0-1)")
    axes[2].plot(t, [x["running"] / max(1, max(y["running"] for y in s)) for x in s], label="running (scaled)", alpha=0.5)
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
        ax.legend()
    o = result["outcomes"]
    fig.suptitle(f"Soak: {result['rate']:g} req/s for {result['duration_s'] / 60:.0f} min: {o.get('ok', 0)} ok, "
                 f"{o.get('disconnected', 0)} intended disconnects, {o.get('failed', 0)} failed")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
