"""Server-side figures from two scrapes of Prometheus `/metrics`, taken before and after a run.

Ponder exports `ponder:token_exit_depth` (a histogram of the core depth each generated token
exited at, buckets le=0..max_depth) and the counters `ponder:core_steps_executed_total` and
`ponder:core_steps_full_depth_total` (every token, prompt tokens included; their ratio is the
compute actually spent). A server without them (vLLM, say) gives None for these figures.
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

DEPTH = "ponder:token_exit_depth"
STEPS_RUN = "ponder:core_steps_executed_total"
STEPS_FULL = "ponder:core_steps_full_depth_total"


def parse(text: str | None) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text or ""):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **match: str) -> float | None:
    """The sum of a metric's samples whose labels include `match`; None when it is absent."""
    values = [v for (n, labels), v in samples.items()
              if n == name and all(dict(labels).get(k) == want for k, want in match.items())]
    return sum(values) if values else None


def gauge(samples: Samples, name: str) -> float | None:
    return total(samples, name)


def bucket_deltas(before: Samples, after: Samples, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts (le -> count) gained between two scrapes, labels summed."""
    buckets: dict[float, float] = {}
    for (n, labels), v in after.items():
        if n == f"{name}_bucket":
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + v - before.get((n, labels), 0.0)
    return buckets


def depth_histogram(before: Samples, after: Samples) -> dict[int, int] | None:
    """Generated tokens per exit depth between two scrapes ({depth: count}), or None."""
    buckets = bucket_deltas(before, after, DEPTH)
    if not buckets:
        return None
    hist, below = {}, 0.0
    for le in sorted(buckets):  # cumulative (le) counts -> counts per integer depth
        if math.isinf(le):
            continue
        hist[int(le)] = round(buckets[le] - below)
        below = buckets[le]
    return hist


def delta(before: Samples, after: Samples, name: str) -> float | None:
    a, b = total(after, name), total(before, name)
    return None if a is None else a - (b or 0.0)


def server_figures(before: Samples, after: Samples) -> dict:
    """Mean exit depth of generated tokens, saved fraction of core steps, and the depth histogram."""
    count, depth_sum = delta(before, after, f"{DEPTH}_count"), delta(before, after, f"{DEPTH}_sum")
    run, full = delta(before, after, STEPS_RUN), delta(before, after, STEPS_FULL)
    hist = depth_histogram(before, after)
    return {
        "server_mean_depth": depth_sum / count if count else None,
        "server_max_depth": max(hist) if hist else None,
        "server_saved_fraction": 1.0 - run / full if full else None,
        "server_core_steps": run,
        "server_core_steps_full": full,
        "server_depth_histogram": hist,
    }


def histogram_quantile(before: Samples, after: Samples, name: str, q: float) -> float | None:
    """The q-quantile of a histogram's observations between two scrapes, interpolated within its
    bucket as PromQL's histogram_quantile does (so no finer than the buckets); None without any."""
    buckets = bucket_deltas(before, after, name)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower  # past the last finite bound: that bound is all a histogram can say
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower
