"""The soak's CI version: 60 s of mixed load on a real `ponder serve` (both processes) leaves no leak."""

import json

from benchmarks import soak


def test_a_minute_of_mixed_load_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    assert soak.main(["--duration", "60", "--rate", "2", "--sample-every", "5", "--disconnect-fraction", "0.1",
                      "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["outcomes"].get("failed", 0) == 0, result["errors"]
    assert result["outcomes"]["ok"] > 60 and result["outcomes"].get("disconnected", 0) > 0
    assert result["kv_cache_usage_end"] == 0
    first, last = result["samples"][0], result["samples"][-1]
    assert last["core_fds"] <= first["core_fds"] + 2 and last["server_fds"] <= first["server_fds"] + 8
    assert last["core_rss_mb"] - first["core_rss_mb"] < 150 and last["server_rss_mb"] - first["server_rss_mb"] < 100
    assert (tmp_path / "soak.png").is_file()


def test_trends_give_rss_growth_per_request_over_the_second_half():
    # 20 samples 10 s apart; over the second half RSS grows 1 MiB while 1024 requests finish
    samples = [{"t_s": 10.0 * i, "server_rss_mb": 100.0 + max(0, i - 10) / 9, "core_rss_mb": 200.0,
                "server_fds": 10, "core_fds": 8, "kv_cache_usage": 0.0,
                "completed": 100 * i if i <= 10 else 1000 + (i - 10) * 100, "disconnected": 0,
                "failed": 0} for i in range(20)]
    samples[-1]["completed"] = samples[10]["completed"] + 1000
    samples[-1]["disconnected"] = 24
    t = soak.trends(samples)
    assert abs(t["server_rss_mb"]["bytes_per_request"] - 2**20 / 1024) < 1.0
    assert t["core_rss_mb"]["bytes_per_request"] == 0.0
    assert "bytes_per_request" not in t["server_fds"]
