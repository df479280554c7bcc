"""The overload benchmark on the default model: a bounded closed loop past capacity gets 429s, and
the report says what each process spent and what the server itself saw."""

import json

import pytest

from benchmarks.overload import main, parse_args


def test_past_capacity_the_excess_is_refused_and_the_cpu_is_accounted(tmp_path):
    out = tmp_path / "overload.json"
    assert main(["--max-num-seqs", "2", "--max-waiting", "0", "--loads", "1,3", "--seconds", "3",
                 "--max-tokens", "8", "--pause-after-429", "retry-after", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    at_capacity, over = result["points"]
    assert result["pause_after_429"] == "retry-after"
    assert at_capacity["num_admitted"] > 0 and over["num_429"] > 0 and over["other_errors"] == 0
    assert over["latency_429_ms_p99"] < 1000  # refused at once, not after a queue wait
    for point in result["points"]:
        assert set(point["cpu_cores_used"]) == {"server", "core", "load_generator"}
        assert point["cpu_cores_used"]["core"] > 0
        # the server's own view of the admitted requests, from its /metrics histograms
        assert 0 < point["server_ttft_ms_p99"] <= 60_000 and point["server_queue_ms_p99"] is not None
    assert out.with_suffix(".png").exists()


@pytest.mark.parametrize("bad", ["soon", "-1", "61"])
def test_a_bad_pause_is_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--pause-after-429", bad])
