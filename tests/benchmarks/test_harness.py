"""The shared harness: rotated rounds, per-round ratios, prompts, engine runs and the files it writes."""

import json

import pytest

from benchmarks.harness import (HELDOUT_TEXT, csv_of, make_prompts, median_ratio, round_ratios, rotated, run_engine,
                                run_rounds, write_results)
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams


def test_rounds_rotate_so_every_variant_runs_first_once():
    order = []
    rounds = run_rounds(["a", "b", "c"], 3, lambda v: order.append(v) or len(order))
    assert [list(r) for r in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert rotated([1, 2], 3) == [2, 1]
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        run_rounds(["a"], 0, lambda v: 0)


def test_ratios_are_taken_within_a_round_then_the_median():
    # A machine that slows down 10x halfway: ratios within rounds stay 2, a ratio of medians would not.
    rounds = [{"x": 2.0, "y": 1.0}, {"x": 20.0, "y": 10.0}, {"x": 21.0, "y": 10.0}]
    assert round_ratios(rounds, "x", "y", float) == [2.0, 2.0, 2.1]
    assert median_ratio(rounds, "x", "y", float) == 2.0


def test_prompts_are_windows_of_a_file_or_seeded_random_ids(tmp_path):
    ckpt = load_checkpoint(DEFAULT_MODEL)
    windows = make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, 3, 8, HELDOUT_TEXT)
    assert [len(p) for p in windows] == [8, 8, 8] and windows[0] != windows[1]
    random = make_prompts(None, ckpt.config.vocab_size, 2, 5)
    assert random == make_prompts(None, ckpt.config.vocab_size, 2, 5)  # seeded: every benchmark sees the same
    assert all(4 <= t < ckpt.config.vocab_size for p in random for t in p)
    short = tmp_path / "short.txt"
    short.write_text("Anne.")
    with pytest.raises(ValueError, match="need 800"):
        make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, 100, 8, str(short))
    with pytest.raises(FileNotFoundError, match="run from the repo root"):
        make_prompts(ckpt.tokenizer, ckpt.config.vocab_size, 1, 8, str(tmp_path / "missing.txt"))


def test_an_engine_run_yields_every_requested_token_and_counts_decode_steps():
    ckpt = load_checkpoint(DEFAULT_MODEL)
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=2))
    prompts = make_prompts(None, ckpt.config.vocab_size, 2, 6)
    run = run_engine(engine, prompts, [3, 5], ComputeParams(compute_budget=1.0))
    assert [len(t) for t in run.tokens] == [3, 5] and len(run.depths) == 8
    # The first token of each request comes with its prefill; every later step is a decode step.
    assert run.decode["steps"] == 4 and run.decode["tokens"] == 6 and run.decode_tokens_per_s > 0
    assert run.decode["calls"] >= run.decode["steps"] and len(run.itl) == 6


def test_results_are_json_with_the_png_beside_it(tmp_path, capsys):
    def plot(path):
        path.write_bytes(b"png")

    write_results(tmp_path / "sub" / "r.json", {"rows": [1]}, plot)
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "sub" / "r.png").read_bytes() == b"png"
    assert "wrote" in capsys.readouterr().out


def test_comma_separated_arguments_are_checked():
    assert csv_of(int)("1,8,32") == [1, 8, 32] and csv_of(float)("1.0,0.5") == [1.0, 0.5]
    with pytest.raises(Exception, match="comma-separated list of int"):
        csv_of(int)("1,x")
