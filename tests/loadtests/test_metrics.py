"""The metric math of `ponder loadtest`, on hand-made request records with known answers."""

import math

import numpy as np
import pytest

from loadtests.metrics import (
    RequestRecord, compute_metrics, max_throughput_under_itl_slo, meets_slos, parse_slos, summarize,
)


def rec(ttft, itl, out, e2e=None, prompt=10, ok=True, depth=None):
    e2e = ttft + sum(itl) if e2e is None else e2e
    return RequestRecord(success=ok, prompt_tokens=prompt, output_tokens=out, ttft=ttft, e2e=e2e, itl=list(itl),
                         mean_depth=depth, error="" if ok else "HTTP 503: overloaded")


def test_tpot_excludes_the_first_token_and_needs_two_tokens():
    assert rec(0.1, [0.02, 0.04], 3).tpot == pytest.approx((0.16 - 0.1) / 2)
    assert rec(0.1, [], 1).tpot is None
    assert rec(0.1, [0.02], 2, ok=False).tpot is None


def test_summary_matches_numpy_linear_percentiles_in_ms():
    values = [0.010, 0.020, 0.030, 0.040, 0.100]
    s = summarize(values, "itl")
    assert s["mean_itl_ms"] == pytest.approx(40.0)
    assert s["p50_itl_ms"] == pytest.approx(30.0)
    assert s["p99_itl_ms"] == pytest.approx(np.percentile([10, 20, 30, 40, 100], 99))
    assert s["p99_itl_ms"] == pytest.approx(40 + 0.96 * 60)  # linear between the two largest
    assert math.isnan(summarize([], "ttft")["p99_ttft_ms"])


def test_run_figures_pool_itl_count_failures_and_divide_by_wall_time():
    records = [rec(0.1, [0.01, 0.03], 3, depth=2.0), rec(0.3, [0.05], 2, prompt=20, depth=5.0),
               rec(0.0, [], 0, ok=False)]
    m = compute_metrics(records, duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (3, 2, 1)
    assert m["errors"] == ["HTTP 503: overloaded"]
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(17.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)  # failed requests are left out of latencies
    assert m["mean_itl_ms"] == pytest.approx(30.0)  # (10 + 30 + 50) / 3: ITLs of all requests pooled
    assert m["mean_tpot_ms"] == pytest.approx((20.0 + 50.0) / 2)
    assert m["mean_e2el_ms"] == pytest.approx((140 + 350) / 2)
    assert m["client_mean_depth"] == pytest.approx((2.0 * 3 + 5.0 * 2) / 5)  # token-weighted
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(records, 0.0)


def test_goodput_counts_only_requests_meeting_every_slo():
    fast = rec(0.1, [0.01] * 9, 10)       # TTFT 100 ms, TPOT 10 ms
    slow_start = rec(0.9, [0.01] * 9, 10)  # TTFT 900 ms
    slow_decode = rec(0.1, [0.2] * 9, 10)  # TPOT 200 ms
    one_token = rec(0.1, [], 1)            # no TPOT: cannot break a TPOT SLO
    slos = parse_slos(["ttft:500", "tpot:50"])
    assert [meets_slos(r, slos) for r in (fast, slow_start, slow_decode, one_token)] == [True, False, False, True]
    m = compute_metrics([fast, slow_start, slow_decode, one_token, rec(0, [], 0, ok=False)], 2.0, slos)
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["goodput_slos_ms"] == {"ttft": 500.0, "tpot": 50.0}
    assert "request_goodput" not in compute_metrics([fast], 1.0)


@pytest.mark.parametrize("bad", ["ttft", "itl:5", "ttft:x", "e2el:-3", "tpot:0"])
def test_bad_slos_are_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_slos([bad])


def test_throughput_at_slo_is_the_best_measured_point_that_meets_it():
    points = [{"output_throughput": 100.0, "p99_itl_ms": 10.0, "failed": 0},
              {"output_throughput": 300.0, "p99_itl_ms": 25.0, "failed": 0},
              {"output_throughput": 400.0, "p99_itl_ms": 19.0, "failed": 2},  # failures disqualify a point
              {"output_throughput": 500.0, "p99_itl_ms": 80.0, "failed": 0}]
    assert max_throughput_under_itl_slo(points, 30.0)["output_throughput"] == 300.0
    assert max_throughput_under_itl_slo(points, 20.0)["output_throughput"] == 100.0
    assert max_throughput_under_itl_slo(points, 5.0) is None
