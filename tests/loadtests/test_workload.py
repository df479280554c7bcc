"""Arrival processes and prompt sets of the load generator."""

import itertools
import math
import statistics

import pytest

from loadtests.client import check_target
from loadtests.quality import wilson
from loadtests.runner import Load, flatness
from loadtests.workload import Prompt, arrival_times, chat_prompts, file_prompts, paragraphs, random_token_prompts


def gaps(times):
    return [b - a for a, b in itertools.pairwise(times)]


def test_poisson_arrivals_have_the_asked_mean_gap_and_unit_coefficient_of_variation():
    g = gaps(arrival_times(20000, request_rate=4.0, burstiness=1.0, seed=1))
    assert statistics.mean(g) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(1.0, rel=0.05)  # exponential


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_sets_cv_to_one_over_sqrt_shape(burstiness):
    g = gaps(arrival_times(20000, request_rate=2.0, burstiness=burstiness, seed=2))
    assert statistics.mean(g) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_infinite_rate_sends_everything_at_once_and_arrivals_are_seeded():
    assert arrival_times(5, math.inf) == [0.0] * 5
    assert arrival_times(50, 3.0, seed=7) == arrival_times(50, 3.0, seed=7) != arrival_times(50, 3.0, seed=8)
    for bad in [(0, 1.0), (5, 0.0), (5, -1.0)]:
        with pytest.raises(ValueError):
            arrival_times(*bad)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(5, 1.0, burstiness=0)


def test_prompt_sets(tmp_path):
    prompts = random_token_prompts([5, 6, 7], num=4, input_len=9, seed=0)
    assert all(len(p.token_ids) == 9 and set(p.token_ids) <= {5, 6, 7} for p in prompts)
    assert prompts[0].body() == {"prompt": prompts[0].token_ids}
    f = tmp_path / "t.txt"
    f.write_text("short\n\n" + "one two three four five six seven eight nine ten eleven twelve\n\n"
                 + "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi\n")
    paras = paragraphs(f)
    assert len(paras) == 2  # the short paragraph is dropped
    cut = file_prompts(paras, num=3, input_len=4)
    assert all(len(p.text.split()) == 4 for p in cut)
    chat = chat_prompts(paras, num=2, input_len=None)
    assert chat[0].body()["messages"][0]["role"] == "user" and chat[0].body()["messages"][0]["content"] in paras
    assert Prompt(text="hi").body() == {"prompt": "hi"}
    with pytest.raises(FileNotFoundError):
        paragraphs(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        random_token_prompts([], 1, 4)


def test_only_loopback_targets_unless_allowed():
    assert check_target("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_target("http://localhost:9") == "http://localhost:9"
    assert check_target("http://[::1]:8000") == "http://[::1]:8000"
    for remote in ("http://10.0.0.5:8000", "http://example.com"):
        with pytest.raises(ValueError, match="--allow-remote"):
            check_target(remote)
    assert check_target("http://10.0.0.5:8000", allow_remote=True) == "http://10.0.0.5:8000"
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        check_target("ftp://127.0.0.1")


def test_load_labels_wilson_interval_and_soak_flatness():
    assert Load(math.inf, 8).label == "concurrency 8"
    assert Load(2.5, None).label == "2.5 req/s"
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    samples = [{"rss_bytes": (100 + i) * 2**20, "kv_cache_usage": 0.2} for i in range(8)] + \
              [{"rss_bytes": None, "kv_cache_usage": 0.0}]
    f = flatness(samples)
    assert f["rss_first_quarter_mb"] == pytest.approx(100.5) and f["rss_last_quarter_mb"] == pytest.approx(106.5)
    assert f["rss_growth_fraction"] == pytest.approx(106.5 / 100.5 - 1)
    assert f["kv_usage_max"] == 0.2 and f["kv_usage_end"] == 0.0
