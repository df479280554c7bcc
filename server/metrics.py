"""Prometheus metrics: vLLM's names under `ponder:`, plus exit depth, steps saved and block usage.

Request-level figures are observed by the app as requests finish; engine-level figures (queue
sizes, KV usage, core steps, steps per block) are read from the engine's stats() at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class EngineCollector:
    def __init__(self, stats: Callable[[], dict], model_name: str) -> None:
        self.stats, self.model_name = stats, model_name

    def collect(self):
        s = self.stats()
        label = ["model_name"]
        for name, key, doc in (("ponder:num_requests_running", "num_running", "Requests holding KV and running."),
                               ("ponder:num_requests_waiting", "num_waiting", "Requests queued."),
                               ("ponder:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV blocks in use (0-1).")):
            g = GaugeMetricFamily(name, doc, labels=label)
            g.add_metric([self.model_name], float(s[key]))
            yield g
        for name, key, doc in (
            ("ponder:core_steps_executed", "core_steps", "Core block applications that ran."),
            ("ponder:core_steps_full_depth", "core_steps_full", "Core block applications full depth would have run."),
        ):
            c = CounterMetricFamily(name, doc, labels=label)
            c.add_metric([self.model_name], float(s[key]))
            yield c
        blocks = CounterMetricFamily("ponder:block_steps", "Core steps run by each pool block.", labels=label + ["block"])
        for b, n in enumerate(s["block_steps"]):
            blocks.add_metric([self.model_name, str(b)], float(n))
        yield blocks


class ServerMetrics:
    def __init__(self, model_name: str, max_depth: int, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lbl = self.registry, ["model_name"]
        self.prompt_tokens = Counter("ponder:prompt_tokens", "Prompt tokens processed.", lbl, registry=r)
        self.generation_tokens = Counter("ponder:generation_tokens", "Tokens generated.", lbl, registry=r)
        self.thought_tokens = Counter("ponder:thought_tokens", "Hidden thought tokens generated.", lbl, registry=r)
        self.success = Counter("ponder:request_success", "Finished requests.", lbl + ["finished_reason"], registry=r)
        self.ttft = Histogram("ponder:time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ponder:inter_token_latency_seconds", "Time between tokens.", lbl,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ponder:e2e_request_latency_seconds", "Request latency.", lbl,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("ponder:request_queue_time_seconds", "Time from arrival to first scheduling.", lbl,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.exit_depth = Histogram("ponder:token_exit_depth", "Core depth at which each generated token exited.",
                                    lbl, buckets=tuple(float(d) for d in range(max_depth + 1)), registry=r)
        self.budget = Histogram("ponder:request_compute_budget", "compute_budget of finished requests.", lbl,
                                buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        for metric in (self.prompt_tokens, self.generation_tokens, self.thought_tokens, self.ttft, self.itl, self.e2e,
                       self.queue_time, self.exit_depth, self.budget):
            metric.labels(model_name)  # exported (at 0) from the start, so dashboards and rate() see every series
        r.register(EngineCollector(stats, model_name))
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the soak test and dashboard watch memory

    def render(self) -> bytes:
        return generate_latest(self.registry)
