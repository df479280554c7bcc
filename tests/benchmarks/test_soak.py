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
