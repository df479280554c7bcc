"""`ponder bench` (benchmarks/engine.py): the table, the JSON and the PNG, and a clear refusal of bad input."""

import json

from ponder.cli import main


def test_bench_prints_a_table_and_writes_json_and_a_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-sizes", "2", "--budgets", "1.0,0.5", "--prompt-len", "16", "--max-tokens", "6",
                 "--rounds", "2", "--prompt-file", "training/data/austen/persuasion.txt", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert set(saved["block_call_ms"]) == {"1", "2"} and all(ms > 0 for ms in saved["block_call_ms"].values())
    assert [(r["batch"], r["budget"], r["rounds"]) for r in rows] == [(2, 1.0, 2), (2, 0.5, 2)]
    full, half = rows
    assert full["mean_core_depth"] == 6.0 and half["mean_core_depth"] < 6.0
    assert full["speedup"] == full["ideal_speedup"] == full["weights_ideal_speedup"] == 1.0
    # Fewer steps per token and fewer batched calls per iteration imply ideal speedups above 1.
    assert half["ideal_speedup"] > 1.0
    assert half["core_calls_per_step"] <= full["core_calls_per_step"] == 6.0
    assert half["weights_ideal_speedup"] >= 1.0
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "weights ideal" in capsys.readouterr().out


def test_bench_refuses_zero_rounds(tmp_path, capsys):
    assert main(["bench", "--batch-sizes", "1", "--budgets", "1.0", "--rounds", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
