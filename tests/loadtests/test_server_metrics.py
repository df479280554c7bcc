"""Server-side figures from two /metrics scrapes: depth histogram, mean depth, saved steps."""

import pytest

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtests.server_metrics import depth_histogram, gauge, histogram_quantile, parse, server_figures


def exposition(depth_counts: list[int], steps_run: float, steps_full: float, kv: float = 0.25) -> str:
    """A Ponder-shaped exposition with max_depth 3 and the given tokens per depth."""
    lines = ["# TYPE ponder:token_exit_depth histogram"]
    cumulative = 0
    for d, n in enumerate(depth_counts):
        cumulative += n
        lines.append(f'ponder:token_exit_depth_bucket{{le="{d:.1f}",model_name="m"}} {cumulative}')
    lines.append(f'ponder:token_exit_depth_bucket{{le="+Inf",model_name="m"}} {cumulative}')
    lines.append(f'ponder:token_exit_depth_count{{model_name="m"}} {cumulative}')
    lines.append(f'ponder:token_exit_depth_sum{{model_name="m"}} {sum(d * n for d, n in enumerate(depth_counts))}')
    lines += ["# TYPE ponder:core_steps_executed counter", f'ponder:core_steps_executed_total{{model_name="m"}} {steps_run}',
              "# TYPE ponder:core_steps_full_depth counter",
              f'ponder:core_steps_full_depth_total{{model_name="m"}} {steps_full}',
              "# TYPE ponder:kv_cache_usage_perc gauge", f'ponder:kv_cache_usage_perc{{model_name="m"}} {kv}']
    return "\n".join(lines) + "\n"


def test_figures_are_differences_between_scrapes():
    before = parse(exposition([5, 0, 0, 10], steps_run=100, steps_full=150))
    after = parse(exposition([5, 4, 2, 16], steps_run=130, steps_full=210))
    assert depth_histogram(before, after) == {0: 0, 1: 4, 2: 2, 3: 6}
    f = server_figures(before, after)
    assert f["server_mean_depth"] == pytest.approx((4 * 1 + 2 * 2 + 6 * 3) / 12)
    assert f["server_saved_fraction"] == pytest.approx(1 - 30 / 60)
    assert f["server_max_depth"] == 3
    assert gauge(after, "ponder:kv_cache_usage_perc") == 0.25


def test_a_server_without_ponder_metrics_gives_none():
    f = server_figures(parse(None), parse("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"))
    assert f["server_mean_depth"] is None and f["server_saved_fraction"] is None
    assert f["server_depth_histogram"] is None


def test_histogram_quantile_between_scrapes_interpolates_within_the_bucket():
    registry = CollectorRegistry()
    ttft = Histogram("ponder:time_to_first_token_seconds", "ttft", ["model_name"], buckets=(0.1, 0.5, 1.0),
                     registry=registry)
    for _ in range(50):  # before the first scrape: left out of the figures
        ttft.labels("m").observe(5.0)
    before = parse(generate_latest(registry).decode())
    for _ in range(90):
        ttft.labels("m").observe(0.05)
    for _ in range(10):
        ttft.labels("m").observe(0.3)
    after = parse(generate_latest(registry).decode())
    name = "ponder:time_to_first_token_seconds"
    assert histogram_quantile(before, after, name, 0.5) == pytest.approx(0.1 * 50 / 90)
    assert histogram_quantile(before, after, name, 0.99) == pytest.approx(0.1 + 0.4 * 9 / 10)
    ttft.labels("m").observe(7.0)  # past the last finite bucket: that bound is all one can say
    assert histogram_quantile(before, parse(generate_latest(registry).decode()), name, 1.0) == 1.0
    assert histogram_quantile(before, before, name, 0.99) is None
