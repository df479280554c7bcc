"""Overload: `ponder serve` at 1x to 4x its capacity, closed loop, bounded in time; loopback only.

    python -m benchmarks.overload [--max-num-seqs 8] [--max-waiting 8] [--loads 1,2,3,4] [--seconds 20]

Capacity is `--max-num-seqs` concurrent requests. At each load, that many times capacity clients
each send a streamed request, and the next as soon as one ends; after a 429 a client pauses
`--pause-after-429` seconds (0.05 by default: a retry storm), or `retry-after`: as long as the
response's Retry-After header says, as OpenAI's Python client does. It prints, per load: admitted
requests/s and output tokens/s, the 429 rate and how fast a 429 comes back, and TTFT and ITL p99
of the admitted requests, as ratios to their values at 1x, beside the server's own TTFT p99 (from
request to first token within the server, its `/metrics` histogram) and its queue-time p99, which
tell a wait in the server from one in the loopback or this client; the peak RSS of both server processes;
and the CPU cores that the HTTP server, the engine core and this load generator used (all three
share this machine's cores). Writes JSON and a PNG (results/overload.json by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

import aiohttp

from benchmarks.harness import csv_of, percentile, pyplot, save_figure, write_results
from benchmarks.soak import proc_stats, start_server_with
from loadtests.server_metrics import histogram_quantile, parse
from runtime.checkpoint import DEFAULT_MODEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--max-num-seqs", type=int, default=8, help="the server's capacity: requests running at once")
    p.add_argument("--max-waiting", type=int, default=8, help="the server's queue before 429")
    p.add_argument("--loads", type=csv_of(float), default=[1.0, 2.0, 3.0, 4.0], help="clients, as multiples of capacity")
    p.add_argument("--seconds", type=float, default=20.0, help="per load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pause-after-429", default="0.05",
                   help="seconds a client waits after a 429 before its next request, or retry-after (the header's)")
    p.add_argument("--out", default="results/overload.json")
    args = p.parse_args(argv)
    if args.max_num_seqs < 1 or args.max_waiting < 0 or not 0 < args.seconds <= 600 or any(x <= 0 for x in args.loads):
        p.error("--max-num-seqs must be >= 1, --max-waiting >= 0, --seconds in (0, 600], --loads > 0")
    if args.pause_after_429 != "retry-after":
        try:
            args.pause_after_429 = float(args.pause_after_429)
        except ValueError:
            p.error("--pause-after-429 must be a number of seconds or retry-after")
        if not 0 <= args.pause_after_429 <= 60:
            p.error("--pause-after-429 must be in [0, 60] seconds")
    return args


def pause_after(r: aiohttp.ClientResponse, pause: float | str) -> float:
    """Seconds to wait after refusal r: a fixed pause, or its Retry-After header (seconds, at most 60)."""
    if pause != "retry-after":
        return pause
    try:
        return min(60.0, max(0.0, float(r.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (/proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(session: aiohttp.ClientSession, base: str, max_tokens: int, until: float, log: list[dict],
                 pause: float | str) -> None:
    body = {"prompt": "Anne Elliot walked along the Cobb at Lyme", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0.0}
    while time.monotonic() < until:
        sent = time.monotonic()
        async with session.post(f"{base}/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                log.append({"status": r.status, "latency_s": time.monotonic() - sent})
                await asyncio.sleep(pause_after(r, pause))
                continue
            stamps = []
            async for line in r.content:
                if line.startswith(b"data: {") and b'"text"' in line:
                    stamps.append(time.monotonic())
            log.append({"status": 200, "ttft_s": stamps[0] - sent if stamps else None, "tokens": len(stamps),
                        "itl_s": [b - a for a, b in zip(stamps, stamps[1:])]})


def scrape(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        return parse(r.read().decode())


async def one_load(base: str, num_clients: int, args: argparse.Namespace, pids: list[int]) -> dict:
    log: list[dict] = []
    peak_rss = 0.0
    before = scrape(base)
    cpu0 = [cpu_seconds(p) for p in pids] + [time.process_time()]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.monotonic()
        until = start + args.seconds
        tasks = [asyncio.create_task(client(session, base, args.max_tokens, until, log, args.pause_after_429))
                 for _ in range(num_clients)]
        while not all(t.done() for t in tasks):
            peak_rss = max(peak_rss, sum(proc_stats(p)[0] or 0.0 for p in pids))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
        wall = time.monotonic() - start
    cpu1 = [cpu_seconds(p) for p in pids] + [time.process_time()]
    after = scrape(base)

    def server_p99_ms(name: str) -> float | None:  # within the server, from its own histograms
        q = histogram_quantile(before, after, name, 0.99)
        return None if q is None else q * 1e3
    cores = {name: (b - a) / wall for name, a, b in zip(("server", "core", "load_generator"), cpu0, cpu1)}
    ok = [x for x in log if x["status"] == 200]
    refused = [x for x in log if x["status"] == 429]
    ttft = [x["ttft_s"] for x in ok if x["ttft_s"] is not None]
    itl = [d for x in ok for d in x["itl_s"]]
    return {"clients": num_clients, "wall_s": wall, "admitted_per_s": len(ok) / wall,
            "output_tok_per_s": sum(x["tokens"] for x in ok) / wall, "num_admitted": len(ok),
            "num_429": len(refused), "other_errors": len(log) - len(ok) - len(refused),
            "rate_429": len(refused) / max(1, len(log)),
            "latency_429_ms_p50": percentile([x["latency_s"] * 1e3 for x in refused], 0.5) if refused else None,
            "latency_429_ms_p99": percentile([x["latency_s"] * 1e3 for x in refused], 0.99) if refused else None,
            "ttft_ms_p99": percentile([t * 1e3 for t in ttft], 0.99) if ttft else None,
            "itl_ms_p99": percentile([t * 1e3 for t in itl], 0.99) if itl else None,
            "server_ttft_ms_p99": server_p99_ms("ponder:time_to_first_token_seconds"),
            "server_queue_ms_p99": server_p99_ms("ponder:request_queue_time_seconds"),
            "peak_rss_mb": peak_rss / 2**20, "cpu_cores_used": cores}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc, base = start_server_with(args.model, args.threads, "--max-num-seqs", str(args.max_num_seqs),
                                   "--max-waiting", str(args.max_waiting))
    try:
        core = json.load(urllib.request.urlopen(f"{base}/health"))["engine_core_pid"]
        points = []
        for load in args.loads:
            points.append(asyncio.run(one_load(base, max(1, round(load * args.max_num_seqs)), args, [proc.pid, core])))
            points[-1]["load"] = load
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base_point = points[0]
    print(f"capacity {args.max_num_seqs} running + {args.max_waiting} waiting, {args.seconds:g} s per load, "
          f"max_tokens {args.max_tokens}")
    print(f"{'load':>5} {'clients':>7} {'adm/s':>7} {'tok/s':>7} {'429 %':>6} {'429 p99 ms':>10} "
          f"{'TTFT p99 ms':>11} {'x1x':>5} {'in server':>9} {'queue':>5} {'ITL p99 ms':>10} {'x1x':>5} "
          f"{'RSS MiB':>8} {'errors':>6} "
          f"{'cores: server':>13} {'core':>5} {'loadgen':>7}")
    for p in points:
        p["ttft_p99_vs_capacity"] = p["ttft_ms_p99"] / base_point["ttft_ms_p99"] if p["ttft_ms_p99"] else None
        p["itl_p99_vs_capacity"] = p["itl_ms_p99"] / base_point["itl_ms_p99"] if p["itl_ms_p99"] else None
        print(f"{p['load']:>5g} {p['clients']:>7} {p['admitted_per_s']:>7.1f} {p['output_tok_per_s']:>7.0f} "
              f"{100 * p['rate_429']:>6.1f} {p['latency_429_ms_p99'] or 0:>10.1f} {p['ttft_ms_p99'] or 0:>11.0f} "
              f"{p['ttft_p99_vs_capacity'] or 0:>5.2f} {p['server_ttft_ms_p99'] or 0:>9.0f} "
              f"{p['server_queue_ms_p99'] or 0:>5.0f} {p['itl_ms_p99'] or 0:>10.1f} "
              f"{p['itl_p99_vs_capacity'] or 0:>5.2f} "
              f"{p['peak_rss_mb']:>8.0f} {p['other_errors']:>6} {p['cpu_cores_used']['server']:>13.2f} "
              f"{p['cpu_cores_used']['core']:>5.2f} {p['cpu_cores_used']['load_generator']:>7.2f}")
    result = {"model": args.model, "max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
              "seconds_per_load": args.seconds, "max_tokens": args.max_tokens,
              "pause_after_429": args.pause_after_429, "points": points}
    write_results(args.out, result, lambda path: plot(points, path))
    return 0


def plot(points: list[dict], path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 4))
    x = [p["load"] for p in points]
    axes[0].plot(x, [p["output_tok_per_s"] for p in points], marker="o")
    axes[0].set_ylabel("admitted output tokens/s")
    axes[1].plot(x, [100 * p["rate_429"] for p in points], marker="o")
    axes[1].set_ylabel("429 responses (%)")
    axes[2].plot(x, [p["ttft_ms_p99"] for p in points], marker="o", label="TTFT p99")
    if all(p.get("server_ttft_ms_p99") for p in points):
        axes[2].plot(x, [p["server_ttft_ms_p99"] for p in points], marker="o", linestyle="--",
                     label="TTFT p99 within the server")
    axes[2].plot(x, [p["itl_ms_p99"] for p in points], marker="o", label="ITL p99")
    axes[2].set_ylabel("ms (admitted requests)")
    axes[2].set_yscale("log")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("offered load (x capacity)")
        ax.grid(alpha=0.3)
    fig.suptitle("Overload: closed loop past saturation")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
