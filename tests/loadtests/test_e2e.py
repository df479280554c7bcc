"""`ponder loadtest` against a real `ponder serve` on the default model: a tiny, bounded sweep and soak.

Besides producing its files, the run must account honestly: the server's exit-depth histogram
counts exactly the tokens the client received, and its mean depth equals the one in `usage`.
"""

import json

import pytest

from ponder.cli import main


def test_sweep_of_budgets_writes_report_json_and_plots(server, tmp_path):
    base, _ = server
    out = tmp_path / "lt"
    rc = main(["loadtest", "--base-url", base, "--budgets", "1.0,0.5", "--concurrencies", "2", "--num-prompts", "4",
               "--input-len", "8", "--output-len", "6", "--goodput", "ttft:60000", "--quality-text",
               "training/data/austen/persuasion.txt", "--quality-samples", "8", "--quality-context", "16",
               "--max-duration", "60", "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"report.md", "loadtest.json", "latency_vs_throughput.png",
                                                 "depth_histogram.png"}
    result = json.loads((out / "loadtest.json").read_text())
    full, half = result["points"]
    for p in (full, half):
        assert (p["completed"], p["failed"], p["total_output_tokens"]) == (4, 0, 24)
        assert p["total_input_tokens"] == 4 * 8
        assert sum(p["server_depth_histogram"].values()) == 24  # the server saw exactly our tokens
        assert p["server_mean_depth"] == pytest.approx(p["client_mean_depth"])
        assert p["request_goodput"] == pytest.approx(p["request_throughput"])  # a 60 s TTFT SLO: all good
        assert p["p99_itl_ms"] > 0 and p["p50_ttft_ms"] > 0
    assert full["server_mean_depth"] == full["server_max_depth"]  # budget 1.0 is full depth
    assert full["server_saved_fraction"] == pytest.approx(0.0)
    assert half["server_mean_depth"] < full["server_mean_depth"]
    assert half["server_saved_fraction"] > 0.1
    q = result["summary"]["1.0"]["quality"]
    assert q["num_samples"] == 8 and 0 <= q["top1_accuracy"] <= q["top5_accuracy"] <= 1
    assert result["summary"]["1.0"]["ratio_vs_first_budget"] == pytest.approx(1.0)
    assert "| 0.5 |" in (out / "report.md").read_text()


def test_chat_without_streaming(server, tmp_path):
    base, _ = server
    rc = main(["loadtest", "--base-url", base, "--dataset", "chat", "--no-stream", "--request-rates", "inf",
               "--num-prompts", "3", "--output-len", "4", "--out", str(tmp_path)])
    assert rc == 0
    p = json.loads((tmp_path / "loadtest.json").read_text())["points"][0]
    assert (p["completed"], p["failed"]) == (3, 0)
    assert p["mean_ttft_ms"] == pytest.approx(p["mean_e2el_ms"])  # non-streaming: the first token is the last


def test_short_soak_records_memory_and_kv_and_frees_everything(server, tmp_path):
    base, proc = server
    rc = main(["loadtest", "--base-url", base, "--soak", "3", "--request-rates", "4", "--output-len", "8",
               "--sample-every", "0.5", "--server-pid", str(proc.pid), "--out", str(tmp_path)])
    assert rc == 0
    soak = json.loads((tmp_path / "soak.json").read_text())
    assert soak["failed"] == 0 and soak["completed"] >= 3
    assert len(soak["samples"]) >= 4
    assert all(s["rss_bytes"] > 10 * 2**20 for s in soak["samples"])  # VmRSS of the server process
    assert soak["kv_usage_end"] == 0.0  # every KV block is free once the load stops
    assert (tmp_path / "soak.png").stat().st_size > 0
