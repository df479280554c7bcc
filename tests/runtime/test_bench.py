import json

from ponder.cli import main


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-sizes", "2", "--budgets", "1.0,0.5", "--prompt-len", "16", "--max-tokens", "6",
                 "--prompt-file", "training/data/austen/persuasion.txt", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["budget"]) for r in rows] == [(2, 1.0), (2, 0.5)]
    assert rows[0]["mean_core_depth"] == 6.0 and rows[1]["mean_core_depth"] < 6.0
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert "speedup" in capsys.readouterr().out
