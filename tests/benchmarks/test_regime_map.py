"""The regime map (benchmarks/regime_map.py) on the small default model: a cell per context and
batch with both ideals, the JSON and the PNG; bad input refused."""

import json

import pytest

from benchmarks.regime_map import main
from runtime.checkpoint import DEFAULT_MODEL


def test_regime_map_writes_a_cell_per_context_and_batch(tmp_path, capsys):
    out = tmp_path / "map.json"
    assert main(["--model", str(DEFAULT_MODEL), "--contexts", "8,32", "--batches", "1,2", "--max-tokens", "4",
                 "--rounds", "1", "--budget", "0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["context"], r["batch"]) for r in rows] == [(8, 1), (8, 2), (32, 1), (32, 2)]
    for r in rows:
        assert r["budget"] == 0.5 and r["speedup"] > 0 and r["full_depth_tokens_per_s"] > 0
        assert r["ideal_speedup"] > 1.0 and r["weights_ideal_speedup"] >= 1.0
    assert (tmp_path / "map.png").stat().st_size > 0
    assert "FLOPs ideal" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--budget", "1.0"], "--budget must be in (0, 1)"),
                                            (["--max-tokens", "1"], "--max-tokens >= 2")])
def test_regime_map_refuses_bad_input(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
