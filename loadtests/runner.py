"""Runs the workload: one benchmark point, a sweep over budgets x loads, and a soak."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from loadtests import server_metrics
from loadtests.client import Client
from loadtests.metrics import RequestRecord, compute_metrics
from loadtests.workload import Prompt, arrival_times


@dataclass
class Load:
    """One load level: a request rate (inf: all at once) and a cap on requests in flight (None: no cap)."""

    request_rate: float = math.inf
    max_concurrency: int | None = None

    @property
    def label(self) -> str:
        if math.isinf(self.request_rate):
            return f"concurrency {self.max_concurrency}" if self.max_concurrency else "all at once"
        cap = f", max {self.max_concurrency} in flight" if self.max_concurrency else ""
        return f"{self.request_rate:g} req/s{cap}"


async def run_point(client: Client, prompts: list[Prompt], load: Load, max_tokens: int, stream: bool, extra: dict,
                    burstiness: float = 1.0, max_duration_s: float = 120.0, seed: int = 0,
                    slos: dict[str, float] | None = None, desc: str = "") -> dict:
    """Send `prompts` at `load`, stop issuing after `max_duration_s`, and return the point's figures."""
    times = arrival_times(len(prompts), load.request_rate, burstiness, seed)
    limit = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = tqdm(total=len(prompts), desc=desc or load.label, leave=False)

    async def one(prompt: Prompt, due: float, t0: float) -> RequestRecord | None:
        delay = due - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() - t0 > max_duration_s:
            return None  # past the time bound: not sent
        if limit is None:
            rec = await client.send(prompt, max_tokens, stream, extra)
        else:
            async with limit:
                if time.perf_counter() - t0 > max_duration_s:
                    return None
                rec = await client.send(prompt, max_tokens, stream, extra)
        bar.update(1)
        return rec

    await client.send(prompts[0], min(max_tokens, 4), stream, extra)  # warm-up, not counted
    before = server_metrics.parse(await client.get_text("/metrics"))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p, due, t0) for p, due in zip(prompts, times)))
    duration = time.perf_counter() - t0
    bar.close()
    after = server_metrics.parse(await client.get_text("/metrics"))
    records = [r for r in results if r is not None]
    if not records:
        raise RuntimeError(f"no request was sent within --max-duration {max_duration_s}s")
    point = {"request_rate": load.request_rate, "max_concurrency": load.max_concurrency, "load": load.label,
             "burstiness": burstiness, "not_sent": len(results) - len(records)}
    point |= compute_metrics(records, duration, slos)
    point |= server_metrics.server_figures(before, after)
    return point


def merge_histograms(points: list[dict]) -> dict[int, int] | None:
    hists = [p["server_depth_histogram"] for p in points if p.get("server_depth_histogram")]
    if not hists:
        return None
    out: dict[int, int] = {}
    for h in hists:
        for d, n in h.items():
            out[int(d)] = out.get(int(d), 0) + n
    return dict(sorted(out.items()))


async def soak(client: Client, prompts: list[Prompt], load: Load, max_tokens: int, stream: bool, extra: dict,
               duration_s: float, sample_every_s: float = 5.0, burstiness: float = 1.0, seed: int = 0,
               server_pid: int | None = None) -> dict:
    """Steady load for `duration_s`, sampling the server's memory, KV usage and queue every `sample_every_s`.

    Prompts are cycled. Memory is `process_resident_memory_bytes` from /metrics, or VmRSS of
    `server_pid` from /proc when given (the server must then run on this machine).
    """
    if math.isinf(load.request_rate):
        raise ValueError("a soak needs a finite --request-rate (moderate load), not inf")
    num = max(1, int(load.request_rate * duration_s * 1.5) + 10)
    times = [t for t in arrival_times(num, load.request_rate, burstiness, seed) if t < duration_s]
    records: list[RequestRecord] = []
    samples: list[dict] = []
    limit = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    start_metrics = server_metrics.parse(await client.get_text("/metrics"))

    async def one(i: int, due: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, due - (time.perf_counter() - t0)))
        if limit is None:
            records.append(await client.send(prompts[i % len(prompts)], max_tokens, stream, extra))
        else:
            async with limit:
                records.append(await client.send(prompts[i % len(prompts)], max_tokens, stream, extra))

    async def sampler(t0: float, stop: asyncio.Event) -> None:
        bar = tqdm(total=int(duration_s), desc="soak", unit="s")
        while True:  # the last sample comes after the load has stopped
            done = stop.is_set()
            s = server_metrics.parse(await client.get_text("/metrics"))
            elapsed = time.perf_counter() - t0
            samples.append({
                "t_s": elapsed,
                "rss_bytes": rss_of(server_pid) if server_pid else server_metrics.gauge(s, "process_resident_memory_bytes"),
                "kv_cache_usage": server_metrics.gauge(s, "ponder:kv_cache_usage_perc"),
                "running": server_metrics.gauge(s, "ponder:num_requests_running"),
                "waiting": server_metrics.gauge(s, "ponder:num_requests_waiting"),
                "completed": sum(r.success for r in records),
                "failed": sum(not r.success for r in records),
            })
            bar.n = min(int(duration_s), int(elapsed))
            bar.refresh()
            if done:
                break
            try:
                await asyncio.wait_for(stop.wait(), sample_every_s)
            except asyncio.TimeoutError:
                pass
        bar.close()

    t0 = time.perf_counter()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(t0, stop))
    await asyncio.gather(*(one(i, due, t0) for i, due in enumerate(times)))
    duration = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # let the engine free the last requests' KV before the final sample
    stop.set()
    await sampling
    end_metrics = server_metrics.parse(await client.get_text("/metrics"))
    out = {"load": load.label, "request_rate": load.request_rate, "target_duration_s": duration_s}
    out |= compute_metrics(records, duration)
    out |= server_metrics.server_figures(start_metrics, end_metrics)
    out["samples"] = samples
    out |= flatness(samples)
    return out


def rss_of(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


def quarter_means(values: list[float]) -> tuple[float, float] | None:
    """Mean of the first and of the last quarter of a series (None under 4 values)."""
    if len(values) < 4:
        return None
    q = len(values) // 4
    return sum(values[:q]) / q, sum(values[-q:]) / q


def flatness(samples: list[dict]) -> dict:
    """Memory and KV usage early against late in the soak, and KV usage once the load has stopped."""
    out: dict = {}
    rss = quarter_means([s["rss_bytes"] / 2**20 for s in samples if s["rss_bytes"] is not None])
    out["rss_first_quarter_mb"], out["rss_last_quarter_mb"] = rss or (None, None)
    out["rss_growth_fraction"] = rss[1] / rss[0] - 1.0 if rss else None
    kv_series = [s["kv_cache_usage"] for s in samples if s["kv_cache_usage"] is not None]
    kv = quarter_means(kv_series)
    out["kv_usage_first_quarter"], out["kv_usage_last_quarter"] = kv or (None, None)
    out["kv_usage_max"] = max(kv_series) if kv_series else None
    out["kv_usage_end"] = kv_series[-1] if kv_series else None
    return out
