"""Benchmark metrics as `vllm bench serve` defines them, from per-request client-side records.

- TTFT: request sent -> first chunk carrying output.
- ITL: the gap between consecutive output-carrying chunks (one entry per chunk, all requests pooled).
- TPOT: per request, (E2E - TTFT) / (output_tokens - 1), for requests with more than one output token.
- E2E: request sent -> last byte of the response.
- Throughput: completed requests (or tokens) / wall time of the whole run.
- Goodput: completed requests meeting every SLO (TTFT, TPOT, E2E; milliseconds) / wall time.
Percentiles are numpy's linear interpolation, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    mean_depth: float | None = None  # usage.compute.mean_depth when the server reports it

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds), as vLLM's --goodput."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be a positive number of milliseconds")
        slos[key] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    # A request with one output token has no TPOT; it cannot break a TPOT SLO.
    return all(values[k] is None or values[k] * 1000.0 <= ms for k, ms in slos.items())


def summarize(values: list[float], prefix: str, percentiles: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Mean, std and percentiles in milliseconds, keyed like vLLM's JSON (`mean_ttft_ms`, `p99_ttft_ms`, ...)."""
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {f"mean_{prefix}_ms": float("nan"), f"std_{prefix}_ms": float("nan"),
                **{f"p{p:g}_{prefix}_ms": float("nan") for p in percentiles}}
    out = {f"mean_{prefix}_ms": float(arr.mean()), f"std_{prefix}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """The run's figures: counts, throughputs, goodput, and TTFT/TPOT/ITL/E2E summaries."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out = {
        "duration_s": duration_s,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.success and r.error})[:10],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    if slos:
        out["goodput_slos_ms"] = dict(slos)
        out["request_goodput"] = sum(meets_slos(r, slos) for r in ok) / duration_s
    out |= summarize([r.ttft for r in ok], "ttft")
    out |= summarize([t for r in ok if (t := r.tpot) is not None], "tpot")
    out |= summarize([x for r in ok for x in r.itl], "itl")
    out |= summarize([r.e2e for r in ok], "e2el")
    depths = [(r.mean_depth, r.output_tokens) for r in ok if r.mean_depth is not None and r.output_tokens]
    weight = sum(n for _, n in depths)
    out["client_mean_depth"] = sum(d * n for d, n in depths) / weight if weight else None
    return out


def max_throughput_under_itl_slo(points: list[dict], slo_ms: float, key: str = "p99_itl_ms") -> dict | None:
    """The sweep point with the highest output throughput whose `key` latency meets the SLO, or None.

    Points are measured, never interpolated: the answer is a load the server actually sustained.
    """
    ok = [p for p in points if p["failed"] == 0 and p[key] == p[key] and p[key] <= slo_ms]
    return max(ok, key=lambda p: p["output_throughput"]) if ok else None
